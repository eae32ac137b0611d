//! An mTLS client with `spiffe-rustls`: it presents this workload's X.509-SVID, accepts the
//! server only if its SPIFFE ID is exactly `--server-id`, sends one line and prints the
//! answer. Pairs with `mtls-server`.
//!
//! Run it against a node agent:
//!
//! ```sh
//! SPIFFE_ENDPOINT_SOCKET=unix:///tmp/agentd-node/public/api.sock \
//!     cargo run -p agentd-examples --bin mtls-client -- \
//!     --addr 127.0.0.1:8443 --server-id spiffe://example.org/tool/calendar
//! ```
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use rustls::pki_types::ServerName;
use spiffe::x509_source::SvidPicker;
use spiffe::{X509Source, X509Svid};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

#[derive(Debug, Parser)]
struct Args {
    /// The Workload API endpoint, e.g. unix:///tmp/agentd-node/public/api.sock.
    #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET")]
    socket: String,
    /// The server's address.
    #[arg(long, default_value = "127.0.0.1:8443")]
    addr: String,
    /// The SPIFFE ID the server must have.
    #[arg(long)]
    server_id: String,
    /// Connect with the SVID that has this hint (when the workload has several identities).
    #[arg(long)]
    hint: Option<String>,
    /// The line to send.
    #[arg(long, default_value = "hello")]
    message: String,
}

/// Picks the SVID whose hint (set on the registration entry) matches.
#[derive(Debug)]
struct ByHint(String);

impl SvidPicker for ByHint {
    fn pick_svid(&self, svids: &[Arc<X509Svid>]) -> Option<usize> {
        svids.iter().position(|s| s.hint() == Some(self.0.as_str()))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut builder = X509Source::builder()
        .endpoint(&args.socket)
        .initial_sync_timeout(Duration::from_secs(10));
    if let Some(hint) = args.hint {
        builder = builder.picker(ByHint(hint));
    }
    let source = builder.build().await.context("fetching the X.509-SVID")?;

    let config = spiffe_rustls::mtls_client(source.clone())
        .authorize(spiffe_rustls::authorizer::exact([args.server_id.as_str()])?)
        .build()?;
    let connector = TlsConnector::from(Arc::new(config));

    let tcp = TcpStream::connect(&args.addr)
        .await
        .with_context(|| format!("connecting to {}", args.addr))?;
    // The server is authenticated by its SPIFFE ID, not by this name; rustls needs one anyway.
    let name = ServerName::from(tcp.peer_addr()?.ip());
    let tls = connector
        .connect(name, tcp)
        .await
        .context("TLS handshake (is the server's SPIFFE ID the one expected?)")?;

    let mut tls = BufReader::new(tls);
    tls.write_all(format!("{}\n", args.message).as_bytes())
        .await?;
    let mut answer = String::new();
    tls.read_line(&mut answer).await?;
    print!("{answer}");
    source.shutdown().await;
    Ok(())
}
