//! An agent calling the tool server with one of its identities (picked by hint, e.g. the
//! delegated SVID `grant:<id>`): one `CALL <scope>` line per `--call`, printing each answer.
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
    #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET")]
    socket: String,
    #[arg(long)]
    addr: String,
    /// The tool server's SPIFFE ID.
    #[arg(long)]
    server_id: String,
    /// Connect with the SVID that has this hint.
    #[arg(long)]
    hint: String,
    /// Scopes to call, in order.
    #[arg(long = "call", required = true)]
    calls: Vec<String>,
}

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
    let source = X509Source::builder()
        .endpoint(&args.socket)
        .picker(ByHint(args.hint.clone()))
        .initial_sync_timeout(Duration::from_secs(10))
        .build()
        .await
        .context("fetching the X.509-SVID")?;
    let config = spiffe_rustls::mtls_client(source.clone())
        .authorize(spiffe_rustls::authorizer::exact([args.server_id.as_str()])?)
        .build()?;
    let tcp = TcpStream::connect(&args.addr).await?;
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("tool.example.org")?, tcp)
        .await
        .context("TLS handshake")?;
    let mut tls = BufReader::new(tls);
    for call in &args.calls {
        tls.write_all(format!("CALL {call}\n").as_bytes()).await?;
        let mut answer = String::new();
        tls.read_line(&mut answer).await?;
        println!("{}", answer.trim_end());
    }
    tls.get_mut().shutdown().await?;
    source.shutdown().await;
    Ok(())
}
