//! Fetches this process's X.509-SVID from the SPIFFE Workload API with the `spiffe` crate's
//! `X509Source` and prints its SPIFFE ID, serial number and expiry. With `--watch` it keeps
//! running and prints each rotated SVID until Ctrl-C.
//!
//! Run it against a node agent:
//!
//! ```sh
//! SPIFFE_ENDPOINT_SOCKET=unix:///tmp/agentd-node/public/api.sock \
//!     cargo run -p agentd-examples --bin fetch-x509 -- --watch
//! ```
#![forbid(unsafe_code)]

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use spiffe::X509Source;

#[derive(Debug, Parser)]
struct Args {
    /// The Workload API endpoint, e.g. unix:///tmp/agentd-node/public/api.sock.
    #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET")]
    socket: String,
    /// Keep running and print every rotation until Ctrl-C.
    #[arg(long)]
    watch: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The source fetches the SVID once, then keeps it current in the background.
    let source = X509Source::builder()
        .endpoint(&args.socket)
        .initial_sync_timeout(Duration::from_secs(10))
        .build()
        .await
        .with_context(|| format!("fetching an X.509-SVID from {}", args.socket))?;
    print_svid(&source)?;

    if args.watch {
        let mut updates = source.updated();
        loop {
            tokio::select! {
                changed = updates.changed() => {
                    changed?;
                    print_svid(&source)?;
                }
                _ = tokio::signal::ctrl_c() => break,
            }
        }
    }
    source.shutdown().await;
    Ok(())
}

fn print_svid(source: &X509Source) -> anyhow::Result<()> {
    let svid = source.svid()?;
    let (_, leaf) = x509_parser::parse_x509_certificate(svid.leaf().as_bytes())?;
    println!(
        "{}  serial {}  expires {}",
        svid.spiffe_id(),
        leaf.serial.to_str_radix(16),
        leaf.validity().not_after
    );
    Ok(())
}
