//! A tool server (think: an MCP server fronting a calendar, a CRM and a payments API) that
//! authorizes every call with agentd's verifier: who is calling, on whose behalf, through
//! which agents, and does that identity hold the scope this tool needs?
//!
//! Agents connect over mTLS (`spiffe-rustls`, any SPIFFE ID of the trust domain), then send
//! one line per tool call, `CALL <scope>`; the answer is `ALLOW ...` or `DENY ...` with the
//! reason. The first line on stdout is the address it listens on.
//!
//! Only the top-level scopes and the current actor decide (docs/delegation.md); the chain
//! is printed for the audit trail.
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use agentd::bundle::{Bundle, DEFAULT_REFRESH_HINT};
use agentd::delegation::{Scope, VerifiedIdentity, Verifier};
use anyhow::Context;
use clap::Parser;
use spiffe::x509_source::SvidPicker;
use spiffe::{TrustDomain, X509Source, X509Svid};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET")]
    socket: String,
    #[arg(long, default_value = "127.0.0.1:0")]
    addr: String,
    #[arg(long, default_value = "example.org")]
    trust_domain: String,
    /// Serve with the SVID that has this hint.
    #[arg(long)]
    hint: Option<String>,
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
    let td = TrustDomain::new(&args.trust_domain)?;
    let mut builder = X509Source::builder()
        .endpoint(&args.socket)
        .initial_sync_timeout(Duration::from_secs(10));
    if let Some(hint) = args.hint {
        builder = builder.picker(ByHint(hint));
    }
    let source = builder.build().await.context("fetching the X.509-SVID")?;
    let config = spiffe_rustls::mtls_server(source.clone())
        .authorize(spiffe_rustls::authorizer::trust_domains([args
            .trust_domain
            .as_str()])?)
        .build()?;
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind(&args.addr).await?;
    println!("{}", listener.local_addr()?);
    eprintln!("tool server up as {}", source.svid()?.spiffe_id());
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (tcp, peer) = accepted?;
                let acceptor = acceptor.clone();
                let source = source.clone();
                let td = td.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve(acceptor, tcp, source, td).await {
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

/// The current bundle of the trust domain, as agentd's verifier takes it.
fn bundle(source: &X509Source, td: &TrustDomain) -> anyhow::Result<Bundle> {
    let set = source.bundle_set()?;
    let b = set.get(td).context("no bundle for the trust domain")?;
    Ok(Bundle {
        trust_domain: td.clone(),
        x509_authorities: b
            .authorities()
            .iter()
            .map(|c| c.as_bytes().to_vec())
            .collect(),
        jwt_authorities: Vec::new(),
        sequence: 0,
        refresh_hint: DEFAULT_REFRESH_HINT,
    })
}

fn decide(id: &VerifiedIdentity, raw: &str) -> String {
    let scope: Scope = match raw.parse() {
        Ok(s) => s,
        Err(e) => return format!("DENY {raw}: {e}"),
    };
    match id.authorize(&scope) {
        Ok(()) => {
            let behalf = id
                .principal()
                .map_or_else(|| "itself".to_string(), ToString::to_string);
            let chain = id
                .delegation
                .as_ref()
                .map(|d| {
                    d.chain
                        .iter()
                        .map(|h| h.agent.to_string())
                        .collect::<Vec<_>>()
                        .join(" -> ")
                })
                .unwrap_or_default();
            format!(
                "ALLOW {scope}: {} on behalf of {behalf} (chain: {chain})",
                id.spiffe_id
            )
        }
        Err(e) => format!("DENY {scope}: {e}"),
    }
}

async fn serve(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    source: X509Source,
    td: TrustDomain,
) -> anyhow::Result<()> {
    let tls = acceptor.accept(tcp).await.context("TLS handshake")?;
    let chain: Vec<Vec<u8>> = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.to_vec()).collect())
        .unwrap_or_default();
    let verified = Verifier::new(bundle(&source, &td)?).verify_x509(&chain, SystemTime::now());
    let mut tls = BufReader::new(tls);
    let mut line = String::new();
    while tls.read_line(&mut line).await? > 0 {
        let call = line
            .trim()
            .strip_prefix("CALL ")
            .unwrap_or(line.trim())
            .to_string();
        let answer = match &verified {
            Ok(id) => decide(id, &call),
            Err(e) => format!("DENY {call}: {e}"),
        };
        println!("{answer}");
        tls.write_all(format!("{answer}\n").as_bytes()).await?;
        line.clear();
    }
    tls.shutdown().await?;
    Ok(())
}
