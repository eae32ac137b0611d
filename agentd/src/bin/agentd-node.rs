//! The `agentd-node` binary: the node agent alone (`run`, `healthcheck`), the build a node
//! host installs. See [`agentd::cli::NodeCli`] for why it exists beside `agentd`.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    agentd::cli::main_of(
        agentd::cli::NodeCli::max_blocking_threads,
        agentd::cli::run_node_cli,
    )
}
