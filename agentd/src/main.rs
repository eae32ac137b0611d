//! The `agentd` binary: a thin wrapper over the library's CLI.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    agentd::cli::main_of(agentd::cli::Cli::max_blocking_threads, agentd::cli::run)
}
