//! An mTLS echo server with `spiffe-rustls`: it presents this workload's X.509-SVID, accepts
//! only a client whose SPIFFE ID is exactly `--allow`, and echoes one line back. The first
//! line on stdout is the address it listens on (useful with `--addr 127.0.0.1:0`).
//! The certificates rotate without a restart: the TLS config reads the current SVID from the
//! `X509Source` on every handshake.
//!
//! Run it against a node agent:
//!
//! ```sh
//! SPIFFE_ENDPOINT_SOCKET=unix:///tmp/agentd-node/public/api.sock \
//!     cargo run -p agentd-examples --bin mtls-server -- \
//!     --addr 127.0.0.1:8443 --allow spiffe://example.org/agent/scheduler
//! ```
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use spiffe::x509_source::SvidPicker;
use spiffe::{X509Source, X509Svid};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

#[derive(Debug, Parser)]
struct Args {
    /// The Workload API endpoint, e.g. unix:///tmp/agentd-node/public/api.sock.
    #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET")]
    socket: String,
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:8443")]
    addr: String,
    /// The one client SPIFFE ID allowed to connect.
    #[arg(long)]
    allow: String,
    /// Serve with the SVID that has this hint (when the workload has several identities).
    #[arg(long)]
    hint: Option<String>,
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

    let config = spiffe_rustls::mtls_server(source.clone())
        .authorize(spiffe_rustls::authorizer::exact([args.allow.as_str()])?)
        .build()?;
    let acceptor = TlsAcceptor::from(Arc::new(config));

    let listener = TcpListener::bind(&args.addr).await?;
    println!("{}", listener.local_addr()?);
    eprintln!(
        "serving as {}, allowing {}",
        source.svid()?.spiffe_id(),
        args.allow
    );

    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (tcp, peer) = accepted?;
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Err(e) = echo(acceptor, tcp).await {
                        eprintln!("{peer}: {e:#}");
                    }
                });
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    source.shutdown().await;
    Ok(())
}

/// Completes the handshake (which checks the client's SPIFFE ID), then echoes one line.
async fn echo(acceptor: TlsAcceptor, tcp: TcpStream) -> anyhow::Result<()> {
    let tls = acceptor.accept(tcp).await.context("TLS handshake")?;
    let client_id = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .map(|leaf| spiffe::cert::spiffe_id_from_der(leaf))
        .transpose()?;
    let mut tls = BufReader::new(tls);
    let mut line = String::new();
    tls.read_line(&mut line).await?;
    if let Some(id) = client_id {
        eprintln!("{id}: {}", line.trim_end());
    }
    tls.write_all(line.as_bytes()).await?;
    tls.shutdown().await?;
    Ok(())
}
