//! Fetches a JWT-SVID for an audience from the SPIFFE Workload API, fetches the JWT bundles,
//! and validates the token locally with the `spiffe` crate (signature, expiry, audience), as
//! the service receiving the token would. Prints the subject (SPIFFE ID) and the expiry.
//!
//! Run it against a node agent:
//!
//! ```sh
//! SPIFFE_ENDPOINT_SOCKET=unix:///tmp/agentd-node/public/api.sock \
//!     cargo run -p agentd-examples --bin fetch-jwt -- --audience https://api.example.com
//! ```
#![forbid(unsafe_code)]

use anyhow::Context;
use clap::Parser;
use spiffe::{JwtSvid, WorkloadApiClient};

#[derive(Debug, Parser)]
struct Args {
    /// The Workload API endpoint, e.g. unix:///tmp/agentd-node/public/api.sock.
    #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET")]
    socket: String,
    /// The audience the token is for (the service that will receive it).
    #[arg(long)]
    audience: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = WorkloadApiClient::connect_to(&args.socket)
        .await
        .with_context(|| format!("connecting to {}", args.socket))?;
    let audience = [args.audience.as_str()];

    // The caller's side: ask for a token (None: the first identity this workload has).
    let svid = client
        .fetch_jwt_svid(audience, None)
        .await
        .context("fetching a JWT-SVID")?;

    // The receiver's side: check the token against the trust domain's JWT bundle.
    let bundles = client
        .fetch_jwt_bundles()
        .await
        .context("fetching JWT bundles")?;
    let validated = JwtSvid::parse_and_validate(svid.token(), &bundles, &audience)
        .context("validating the JWT-SVID")?;

    println!("{}  expires {}", validated.spiffe_id(), validated.expiry());
    Ok(())
}
