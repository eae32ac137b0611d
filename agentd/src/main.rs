//! The `agentd` binary: a thin wrapper over the library's CLI.
#![forbid(unsafe_code)]

use clap::Parser as _;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = match agentd::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version (stdout, exit 0), or a usage error: clap's whole message,
            // which names the argument, lists the valid values and suggests close matches
            // (stderr, exit 2).
            let _ = e.print();
            return std::process::ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    match agentd::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One clear line on stderr.
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {msg}");
            std::process::ExitCode::FAILURE
        }
    }
}
