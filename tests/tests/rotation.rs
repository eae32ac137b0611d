//! CA rotation end to end: a workload holding an SVID from the old key keeps working across
//! `authority prepare` and `authority activate`, and mTLS between an old-key SVID and a
//! new-key SVID succeeds both ways (spiffe-rustls).

use std::sync::Arc;
use std::time::Duration;

use agentd_e2e::{Env, Node, Server};
use spiffe::{TrustDomain, X509Source};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug)]
struct HintPicker(&'static str);

impl spiffe::x509_source::SvidPicker for HintPicker {
    fn pick_svid(&self, svids: &[Arc<spiffe::X509Svid>]) -> Option<usize> {
        svids.iter().position(|s| s.hint() == Some(self.0))
    }
}

async fn source(node: &Node, hint: &'static str) -> anyhow::Result<X509Source> {
    Ok(X509Source::builder()
        .endpoint(node.endpoint())
        .picker(HintPicker(hint))
        .initial_sync_timeout(Duration::from_secs(20))
        .build()
        .await?)
}

/// The authority key identifier of a certificate, lowercase hex: the signing authority's id.
fn aki_hex(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("certificate parses");
    cert.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(a) => {
                a.key_identifier.as_ref().map(|k| hex_lower(k.0))
            }
            _ => None,
        })
        .expect("an authority key identifier")
}

fn hex_lower(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `agentd authority list --output json`: (kind, state) -> ids.
fn authorities(server: &Server) -> anyhow::Result<Vec<(String, String, String)>> {
    let out = server.cli_ok(&["authority", "list", "--output", "json"])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    Ok(v.as_array()
        .ok_or_else(|| anyhow::anyhow!("not an array: {out}"))?
        .iter()
        .map(|a| {
            (
                a["kind"].as_str().unwrap_or_default().to_owned(),
                a["state"].as_str().unwrap_or_default().to_owned(),
                a["id"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect())
}

fn only(list: &[(String, String, String)], kind: &str, state: &str) -> anyhow::Result<String> {
    let ids: Vec<&String> = list
        .iter()
        .filter(|(k, s, _)| k == kind && s == state)
        .map(|(_, _, id)| id)
        .collect();
    anyhow::ensure!(ids.len() == 1, "{kind} {state}: {list:?}");
    Ok(ids[0].clone())
}

fn x509_authority_count(source: &X509Source) -> anyhow::Result<usize> {
    let td = TrustDomain::new("example.org")?;
    Ok(source
        .bundle_set()?
        .get(&td)
        .map(|b| b.authorities().len())
        .unwrap_or(0))
}

async fn wait_for(what: &str, mut f: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if f()? {
            return Ok(());
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An authority change is pushed: a node agent whose periodic sync is an hour away still
/// hands the prepared authority to its workloads within moments of `authority prepare`.
#[tokio::test]
async fn a_prepared_authority_reaches_workloads_without_waiting_for_a_sync() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let node = Node::start_with(&env, &server, "n1", &["--sync-interval", "1h"])?;
    let id = "spiffe://example.org/agent/pushed-bundle";
    server.register_own_uid(&node.spiffe_id, id, &["--hint", "old"])?;
    node.wait_for_svid(id)?;
    let source = source(&node, "old").await?;
    assert_eq!(x509_authority_count(&source)?, 1);
    let started = std::time::Instant::now();
    server.cli_ok(&["authority", "prepare"])?;
    wait_for("the workload's bundle has the prepared CA", || {
        Ok(x509_authority_count(&source)? == 2)
    })
    .await?;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "the prepared authority took {took:?} to reach the workload"
    );
    Ok(())
}

/// One mTLS exchange: `server` presents its SVID and requires `client_id`; `client`
/// presents its SVID and requires `server_id`.
async fn handshake(
    server: &X509Source,
    server_id: &str,
    client: &X509Source,
    client_id: &str,
) -> anyhow::Result<()> {
    let server_cfg = spiffe_rustls::mtls_server(server.clone())
        .authorize(spiffe_rustls::authorizer::exact([client_id])?)
        .build()?;
    let client_cfg = spiffe_rustls::mtls_client(client.clone())
        .authorize(spiffe_rustls::authorizer::exact([server_id])?)
        .build()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
    let server_task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut tls = acceptor.accept(tcp).await?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await?;
        tls.write_all(b"pong").await?;
        tls.shutdown().await?;
        anyhow::Ok(buf)
    });
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("rotation.example.org")?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(client_cfg))
        .connect(name, tcp)
        .await?;
    tls.write_all(b"ping").await?;
    let mut reply = Vec::new();
    tls.read_to_end(&mut reply).await?;
    anyhow::ensure!(reply == b"pong", "reply {reply:?}");
    let got = tokio::time::timeout(Duration::from_secs(10), server_task).await???;
    anyhow::ensure!(&got == b"ping");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_key_svid_keeps_working_across_prepare_and_activate() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let node = Node::start(&env, &server, "n1")?;
    let old_id = "spiffe://example.org/agent/old-key";
    let new_id = "spiffe://example.org/tool/new-key";

    // A workload with an SVID from the first CA.
    server.register_own_uid(&node.spiffe_id, old_id, &["--hint", "old"])?;
    node.wait_for_svid(old_id)?;
    let first = authorities(&server)?;
    let first_x509 = only(&first, "x509", "active")?;
    let first_jwt = only(&first, "jwt", "active")?;
    let old_source = source(&node, "old").await?;
    let old_svid = old_source.svid()?;
    assert_eq!(old_svid.spiffe_id().to_string(), old_id);
    let old_leaf = old_svid.leaf().as_bytes().to_vec();
    assert_eq!(aki_hex(&old_leaf), first_x509);
    assert_eq!(x509_authority_count(&old_source)?, 1);

    // Prepare: the next CA is published (the sequence bumps) but signs nothing yet.
    let seq_before: u64 = serde_json::from_str::<serde_json::Value>(&server.cli_ok(&[
        "healthcheck",
        "--output",
        "json",
    ])?)?["bundle_sequence"]
        .as_u64()
        .unwrap_or_default();
    let out = server.cli_ok(&["authority", "prepare", "--output", "json"])?;
    let prepared: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(
        prepared["bundle_sequence"].as_u64(),
        Some(seq_before + 1),
        "{out}"
    );
    let after_prepare = authorities(&server)?;
    let next_x509 = only(&after_prepare, "x509", "prepared")?;
    let next_jwt = only(&after_prepare, "jwt", "prepared")?;
    assert_eq!(only(&after_prepare, "x509", "active")?, first_x509);

    // The workload's stream brings the new bundle, with both CAs, before anything is signed
    // by the new one; its SVID is still the old-key one.
    wait_for("the workload's bundle has both CAs", || {
        Ok(x509_authority_count(&old_source)? == 2)
    })
    .await?;
    assert_eq!(old_source.svid()?.leaf().as_bytes(), &old_leaf[..]);
    let client = spiffe::WorkloadApiClient::connect_to(node.endpoint()).await?;
    let jwt_bundles = client.fetch_jwt_bundles().await?;
    let jwt_bundle = jwt_bundles
        .get(&TrustDomain::new("example.org")?)
        .ok_or_else(|| anyhow::anyhow!("no JWT bundle"))?;
    assert!(jwt_bundle.find_jwt_authority(&first_jwt).is_some());
    assert!(jwt_bundle.find_jwt_authority(&next_jwt).is_some());

    // Activate: the prepared CA signs from now on; the first one is old but still trusted.
    let out = server.cli_ok(&["authority", "activate", "--output", "json"])?;
    let activated: serde_json::Value = serde_json::from_str(&out)?;
    let ids: Vec<&str> = activated["authorities"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x["id"].as_str()).collect())
        .unwrap_or_default();
    assert!(
        ids.contains(&next_x509.as_str()) && ids.contains(&next_jwt.as_str()),
        "{out}"
    );
    let after_activate = authorities(&server)?;
    assert_eq!(only(&after_activate, "x509", "active")?, next_x509);
    assert_eq!(only(&after_activate, "x509", "old")?, first_x509);
    assert_eq!(only(&after_activate, "jwt", "old")?, first_jwt);
    // A second activate has nothing to activate: one clear line, non-zero exit.
    let again = server.cli(&["authority", "activate"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("prepare"));

    // A second workload gets an SVID from the new key.
    server.register_own_uid(&node.spiffe_id, new_id, &["--hint", "new"])?;
    node.wait_for_svid(new_id)?;
    let new_source = source(&node, "new").await?;
    let new_svid = new_source.svid()?;
    assert_eq!(new_svid.spiffe_id().to_string(), new_id);
    assert_eq!(aki_hex(new_svid.leaf().as_bytes()), next_x509);
    // The first workload still holds its old-key SVID.
    let held = old_source.svid()?;
    assert_eq!(held.leaf().as_bytes(), &old_leaf[..]);
    assert_eq!(aki_hex(held.leaf().as_bytes()), first_x509);

    // Old-key and new-key SVIDs authenticate each other, both ways.
    handshake(&old_source, old_id, &new_source, new_id).await?;
    handshake(&new_source, new_id, &old_source, old_id).await?;

    old_source.shutdown().await;
    new_source.shutdown().await;
    Ok(())
}
