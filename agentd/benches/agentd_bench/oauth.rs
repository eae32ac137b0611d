//! (h) The OAuth front door: RFC 8693 token exchanges per second (HTTPS POST on loopback,
//! one keep-alive connection, one request in flight), beside JWT-SVIDs minted per second
//! through the node API (`MintJwtSvid`, mTLS loopback, one in flight), in the same run,
//! against one in-process server on a current-thread runtime: server and client share one
//! core, so the figures are per core, client included.

use std::sync::Arc;
use std::time::Instant;

use agentd::node::client::{attest_with_join_token, ServerLink};
use agentd_proto::admin as apb;
use agentd_proto::node as npb;
use anyhow::{anyhow, bail, Context};
use http_body_util::BodyExt as _;
use spiffe::TrustDomain;

use crate::harness::{address_and_bundle, join_token, start_server_full};
use crate::output::{per_sec, row};
use crate::{RUN, TRUST_DOMAIN, WARMUP};

const NODE_ID: &str = "spiffe://example.org/node/bench-oauth";
const AGENT_ID: &str = "spiffe://example.org/bench/oauth-agent";
const RESOURCE: &str = "https://tools.example/mcp";

/// Measures (h) on a runtime of its own (one thread) and prints its rows.
pub fn run(dir: &std::path::Path) -> anyhow::Result<()> {
    let dir = dir.join("oauth");
    std::fs::create_dir_all(&dir)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mint, exchange) = rt.block_on(measure(&dir))?;
    row(
        "(h) JWT-SVID mint, node API MintJwtSvid, one core",
        per_sec(mint, "JWTs"),
        "",
        None,
    );
    row(
        "(h) token exchange (RFC 8693) over HTTPS, one core",
        per_sec(exchange, "tokens"),
        "",
        None,
    );
    row(
        "(h) ratio token exchange / JWT-SVID mint",
        format!("{:.2}", exchange / mint),
        "",
        None,
    );
    Ok(())
}

async fn measure(dir: &std::path::Path) -> anyhow::Result<(f64, f64)> {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let issuer = format!("https://127.0.0.1:{port}");
    let (server, mut admin) = start_server_full(
        dir,
        None,
        None,
        Some(agentd::server::oauth::config::RawOAuth {
            bind_address: Some(format!("127.0.0.1:{port}")),
            ..Default::default()
        }),
    )
    .await?;
    let (address, bundle) = address_and_bundle(&mut admin).await?;
    let token = join_token(&mut admin, NODE_ID).await?;
    let identity = attest_with_join_token(
        &address,
        Some(&bundle.x509_authorities),
        Some(&TrustDomain::new(TRUST_DOMAIN)?),
        &token,
    )
    .await
    .context("attesting the bench node")?;
    let entry = admin
        .create_entry(apb::EntrySpec {
            spiffe_id: AGENT_ID.into(),
            parent_id: NODE_ID.into(),
            selectors: vec!["unix:uid:0".into()],
            scopes: vec!["calendar:read".into()],
            resources: vec![RESOURCE.into()],
            ..Default::default()
        })
        .await
        .map_err(|s| anyhow!("creating the entry: {}", s.message()))?
        .into_inner()
        .id;
    let link = ServerLink::new(address.clone(), identity);
    let node = link.client().await?;
    let request = npb::MintJwtSvidRequest {
        entry_id: entry,
        audience: vec![issuer.clone()],
        grant_id: String::new(),
    };
    let mut mint = || {
        let mut node = node.clone();
        let request = request.clone();
        async move {
            node.mint_jwt_svid(request)
                .await
                .map_err(|s| anyhow!("MintJwtSvid: {}", s.message()))
                .map(|r| r.into_inner().token)
        }
    };
    let svid = mint().await?;
    let mint_rate = rate(&mut mint).await?;

    // One TLS connection to the front door, trusting the bundle's authorities.
    let mut roots = rustls::RootCertStore::empty();
    for der in &bundle.x509_authorities {
        roots.add(rustls::pki_types::CertificateDer::from(der.clone()))?;
    }
    let tls = rustls::ClientConfig::builder_with_provider(agentd::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(
            rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
            tcp,
        )
        .await
        .context("TLS to the front door")?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let body = url::form_urlencoded::Serializer::new(String::new())
        .append_pair(
            "grant_type",
            "urn:ietf:params:oauth:grant-type:token-exchange",
        )
        .append_pair("subject_token", &svid)
        .append_pair("subject_token_type", "urn:ietf:params:oauth:token-type:jwt")
        .append_pair("resource", RESOURCE)
        .append_pair("scope", "calendar:read")
        .finish();
    let mut exchange_once = async || -> anyhow::Result<()> {
        let req = hyper::Request::post("/oauth2/token")
            .header("host", format!("127.0.0.1:{port}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body.clone())?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        if status != 200 {
            bail!(
                "token exchange: {status}: {}",
                String::from_utf8_lossy(&bytes)
            );
        }
        Ok(())
    };
    let warm_end = Instant::now() + WARMUP;
    while Instant::now() < warm_end {
        exchange_once().await?;
    }
    let start = Instant::now();
    let mut n = 0u64;
    let exchange_rate = loop {
        exchange_once().await?;
        n += 1;
        let elapsed = start.elapsed();
        if elapsed >= RUN {
            break n as f64 / elapsed.as_secs_f64();
        }
    };
    server.shutdown().await?;
    Ok((mint_rate, exchange_rate))
}

/// Calls per second of `f`, one in flight, for [`RUN`] after [`WARMUP`].
async fn rate<F, Fut>(f: &mut F) -> anyhow::Result<f64>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<String>>,
{
    let warm_end = Instant::now() + WARMUP;
    while Instant::now() < warm_end {
        f().await?;
    }
    let start = Instant::now();
    let mut n = 0u64;
    loop {
        f().await?;
        n += 1;
        let elapsed = start.elapsed();
        if elapsed >= RUN {
            return Ok(n as f64 / elapsed.as_secs_f64());
        }
    }
}
