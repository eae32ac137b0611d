//! Federation end to end (docs/federation.md): two trust domains on one machine, each a
//! server and node agents, federated over https_spiffe from the CLI alone; workloads of
//! each domain complete mTLS with `spiffe-rustls`; bundle changes and endpoint outages; and
//! the published `spiffe` crate's own Workload API integration tests against a node agent
//! set up the way that crate's CI sets up SPIRE.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use agentd_e2e::{
    cargo_command, foreign_ca_pem, free_port, metric, metrics_address, wait_until, Env, Node,
    Server,
};
use anyhow::{bail, Context};
use spiffe::{BundleSource as _, TrustDomain, WorkloadApiClient, X509Source};

const PARTNER: &str = "partner.example";

/// A server of trust domain `td` whose bundle endpoint is on a free port and publishes a
/// 10 s refresh hint; returns it with the endpoint's URL.
fn federating_server(env: &Env, name: &str, td: &str) -> anyhow::Result<(Server, String)> {
    let port = free_port()?;
    let config = env.path().join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "trust_domain = \"{td}\"\n[federation]\nbind_address = \"127.0.0.1:{port}\"\nrefresh_hint = \"10s\"\n"
        ),
    )?;
    let config = config.display().to_string();
    let server = Server::start_named(
        env,
        name,
        &["--config", &config, "--metrics-address", "127.0.0.1:0"],
    )?;
    Ok((server, format!("https://127.0.0.1:{port}")))
}

/// `federation create --trust-domain TD --bundle-endpoint-url URL` over https_spiffe, with
/// `extra` flags, on `server`.
fn federate(server: &Server, td: &str, url: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "federation",
        "create",
        "--trust-domain",
        td,
        "--bundle-endpoint-url",
        url,
        "--bundle-endpoint-profile",
        "https_spiffe",
    ];
    args.extend_from_slice(extra);
    server.cli(&args)
}

/// The output of a command that must succeed, or its stderr as the error.
fn ok(out: std::process::Output) -> anyhow::Result<std::process::Output> {
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out)
}

fn json(out: &str) -> anyhow::Result<serde_json::Value> {
    serde_json::from_str(out).with_context(|| format!("not JSON: {out}"))
}

/// `federation show --output json` on `server`.
fn federation(server: &Server, td: &str) -> anyhow::Result<serde_json::Value> {
    json(&server.cli_ok(&[
        "federation",
        "show",
        "--trust-domain",
        td,
        "--output",
        "json",
    ])?)
}

/// Waits until `server` holds a bundle of `td` fetched from its endpoint with `authorities`
/// X.509 authorities.
fn wait_fetched(
    server: &Server,
    td: &str,
    authorities: u64,
    within: Duration,
) -> anyhow::Result<()> {
    let mut last = serde_json::Value::Null;
    let ok = wait_until(within, || {
        last = federation(server, td).unwrap_or_default();
        last["bundle"]["source"] == "endpoint"
            && last["bundle"]["x509_authorities"].as_u64() == Some(authorities)
    });
    if !ok {
        bail!("no fetched bundle of {td} with {authorities} authorities: {last}");
    }
    Ok(())
}

/// The X.509 authorities of `td` in the context the workload API hands a caller of `node`.
async fn context_authorities(node: &Node, td: &str) -> anyhow::Result<Option<usize>> {
    let client = WorkloadApiClient::connect_to(node.endpoint()).await?;
    let ctx = client.fetch_x509_context().await?;
    let bundle = ctx
        .bundle_set()
        .bundle_for_trust_domain(&TrustDomain::new(td)?)?;
    Ok(bundle.map(|b| b.authorities().len()))
}

/// Waits until a caller of `node` holds `n` X.509 authorities of `td`.
async fn wait_authorities(node: &Node, td: &str, n: usize, within: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    let mut last = None;
    while tokio::time::Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(10), context_authorities(node, td))
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within 10 s")))
        {
            Ok(got) if got == Some(n) => return Ok(()),
            Ok(got) => last = Some(format!("{got:?}")),
            Err(e) => last = Some(e.to_string()),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!(
        "{td} never had {n} authorities at {}: last {last:?}",
        node.endpoint()
    )
}

async fn source(node: &Node) -> anyhow::Result<X509Source> {
    Ok(X509Source::builder()
        .endpoint(node.endpoint())
        .initial_sync_timeout(Duration::from_secs(20))
        .build()
        .await?)
}

/// mTLS between `server_source` (as the TLS server) and `client_source`, each allowing both
/// trust domains; returns the SPIFFE IDs each side saw.
async fn mtls(
    server_source: X509Source,
    client_source: X509Source,
) -> anyhow::Result<(String, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let both = ["example.org", PARTNER];
    let server_cfg = spiffe_rustls::mtls_server(server_source)
        .authorize(spiffe_rustls::authorizer::trust_domains(both)?)
        .build()?;
    let client_cfg = spiffe_rustls::mtls_client(client_source)
        .authorize(spiffe_rustls::authorizer::trust_domains(both)?)
        .build()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
    let served = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut tls = acceptor.accept(tcp).await?;
        let peer = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| agentd::tls::spiffe_id_of(c.as_ref()))
            .map(|id| id.to_string())
            .unwrap_or_default();
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await?;
        tls.write_all(b"pong").await?;
        tls.shutdown().await?;
        anyhow::Ok(peer)
    });
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_cfg));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut tls = connector
        .connect(rustls::pki_types::ServerName::try_from("tool.local")?, tcp)
        .await?;
    let seen_server = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| agentd::tls::spiffe_id_of(c.as_ref()))
        .map(|id| id.to_string())
        .unwrap_or_default();
    tls.write_all(b"ping").await?;
    let mut reply = Vec::new();
    tls.read_to_end(&mut reply).await?;
    anyhow::ensure!(reply == b"pong", "reply {reply:?}");
    Ok((seen_server, served.await??))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_trust_domains_federate_from_the_cli_and_their_workloads_complete_mtls(
) -> anyhow::Result<()> {
    let env = Env::new();
    let (ours, our_url) = federating_server(&env, "ours", "example.org")?;
    let (partner, partner_url) = federating_server(&env, "partner", PARTNER)?;
    let our_pem = env.path().join("ours-bundle.pem");
    let partner_pem = env.path().join("partner-bundle.pem");
    ours.write_bundle(&our_pem)?;
    partner.write_bundle(&partner_pem)?;

    // Each side: the other's endpoint, authenticated by the bundle it was handed once.
    let partner_pem_arg = partner_pem.display().to_string();
    ok(federate(
        &ours,
        PARTNER,
        &partner_url,
        &[
            "--trust-bundle",
            &partner_pem_arg,
            "--trust-bundle-format",
            "pem",
        ],
    ))?;
    let our_pem_arg = our_pem.display().to_string();
    ok(federate(
        &partner,
        "example.org",
        &our_url,
        &[
            "--endpoint-spiffe-id",
            "spiffe://example.org/agentd/server",
            "--trust-bundle",
            &our_pem_arg,
            "--trust-bundle-format",
            "pem",
        ],
    ))?;
    wait_fetched(&ours, PARTNER, 1, Duration::from_secs(20))?;
    wait_fetched(&partner, "example.org", 1, Duration::from_secs(20))?;
    let shown = federation(&ours, PARTNER)?;
    assert_eq!(shown["bundle_endpoint_profile"], "https_spiffe", "{shown}");
    assert_eq!(
        shown["endpoint_spiffe_id"], "spiffe://partner.example/agentd/server",
        "the default endpoint ID: {shown}"
    );
    assert!(shown["last_error"].is_null(), "{shown}");
    let listed = json(&ours.cli_ok(&["federation", "list", "--output", "json"])?)?;
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");

    // Our own trust domain is refused, as is an entry federating with an unknown one.
    let own = federate(&ours, "example.org", &partner_url, &[]);
    assert!(!own.status.success());
    assert!(
        String::from_utf8_lossy(&own.stderr).contains("own trust domain"),
        "{}",
        String::from_utf8_lossy(&own.stderr)
    );

    let agent_node = Node::start(&env, &ours, "agents")?;
    let loner_node = Node::start(&env, &ours, "loners")?;
    let tool_node = Node::start_in_domain(&env, &partner, "tools", PARTNER)?;
    let agent = "spiffe://example.org/agent/planner";
    let loner = "spiffe://example.org/agent/loner";
    let tool = "spiffe://partner.example/tool/calendar";
    let unknown = ours.cli(&[
        "entry",
        "create",
        "--parent-id",
        &agent_node.spiffe_id,
        "--spiffe-id",
        agent,
        "--selector",
        &format!("unix:uid:{}", agentd_e2e::current_uid()),
        "--federates-with",
        "typo.example",
    ]);
    assert!(!unknown.status.success());
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("federates_with"),
        "{}",
        String::from_utf8_lossy(&unknown.stderr)
    );
    let agent_entry =
        ours.register_own_uid(&agent_node.spiffe_id, agent, &["--federates-with", PARTNER])?;
    ours.register_own_uid(&loner_node.spiffe_id, loner, &[])?;
    partner.register_own_uid(
        &tool_node.spiffe_id,
        tool,
        &["--federates-with", "example.org"],
    )?;
    let shown =
        json(&ours.cli_ok(&["entry", "show", "--id", &agent_entry, "--output", "json"])?)?;
    assert_eq!(
        shown["federates_with"],
        serde_json::json!([PARTNER]),
        "{shown}"
    );
    agent_node.wait_for_svid(agent)?;
    loner_node.wait_for_svid(loner)?;
    tool_node.wait_for_svid(tool)?;

    // Each workload holds exactly the bundles its entries federate with.
    wait_authorities(&agent_node, PARTNER, 1, Duration::from_secs(20)).await?;
    assert_eq!(
        context_authorities(&tool_node, "example.org").await?,
        Some(1)
    );
    assert_eq!(context_authorities(&loner_node, PARTNER).await?, None);
    assert_eq!(
        context_authorities(&loner_node, "example.org").await?,
        Some(1)
    );

    // mTLS both ways between the trust domains.
    let agent_source = source(&agent_node).await?;
    let tool_source = source(&tool_node).await?;
    let (seen, peer) = mtls(tool_source.clone(), agent_source.clone()).await?;
    assert_eq!((seen.as_str(), peer.as_str()), (tool, agent));
    let (seen, peer) = mtls(agent_source.clone(), tool_source.clone()).await?;
    assert_eq!((seen.as_str(), peer.as_str()), (agent, tool));
    // The loner does not trust the partner: its handshake with the tool fails.
    let loner_source = source(&loner_node).await?;
    let refused = mtls(tool_source.clone(), loner_source.clone())
        .await
        .expect_err("the loner trusted the partner's tool");
    assert!(
        format!("{refused:#}").contains("no bundle for trust domain partner.example"),
        "refused for another reason: {refused:#}"
    );
    // ...while it still completes mTLS inside its own trust domain.
    let (seen, peer) = mtls(agent_source.clone(), loner_source).await?;
    assert_eq!((seen.as_str(), peer.as_str()), (agent, loner));

    // A new authority on the partner side reaches our workloads within the hint (10 s, plus
    // a sync).
    partner.cli_ok(&["authority", "prepare"])?;
    wait_authorities(&agent_node, PARTNER, 2, Duration::from_secs(30)).await?;
    // The source opened before the change got it on its open stream.
    let partner_td = TrustDomain::new(PARTNER)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let held = agent_source
            .bundle_for_trust_domain(&partner_td)?
            .map(|b| b.authorities().len());
        if held == Some(2) {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the open X509Source still holds {held:?} partner authorities"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The partner's endpoint goes away: the fetch fails, is counted, and the last good
    // bundle stays with our workloads.
    let metrics = metrics_address(&ours.daemon)?;
    let mut partner = partner;
    partner.stop();
    let mut last = serde_json::Value::Null;
    let ok = wait_until(Duration::from_secs(30), || {
        last = federation(&ours, PARTNER).unwrap_or_default();
        last["last_error"].is_string()
    });
    assert!(ok, "no failed fetch recorded: {last}");
    assert_eq!(last["bundle"]["x509_authorities"], 2, "{last}");
    let (_, text) = agentd_e2e::http_get(&metrics, "/metrics")?;
    let failed = metric(
        &text,
        "agentd_server_federated_bundle_fetches_total{trust_domain=\"partner.example\",outcome=\"failed\"}",
    );
    assert!(failed >= Some(1.0), "{text}");
    assert_eq!(context_authorities(&agent_node, PARTNER).await?, Some(2));
    Ok(())
}

#[test]
fn bad_bundles_and_a_wrong_endpoint_id_are_refused_and_the_last_good_bundle_stays(
) -> anyhow::Result<()> {
    let env = Env::new();
    let (ours, _) = federating_server(&env, "ours", "example.org")?;
    let (partner, partner_url) = federating_server(&env, "partner", PARTNER)?;
    let partner_pem = env.path().join("partner-bundle.pem");
    partner.write_bundle(&partner_pem)?;
    let partner_pem_arg = partner_pem.display().to_string();

    // Supplied bundles: another domain's CA, no keys, too large, not a bundle.
    let evil = foreign_ca_pem(env.path(), "evil.example")?;
    let refused = |args: &[&str], needle: &str| -> anyhow::Result<()> {
        let out = ours.cli(args);
        let err = String::from_utf8_lossy(&out.stderr);
        anyhow::ensure!(
            !out.status.success() && err.contains(needle),
            "{args:?}: {err}"
        );
        Ok(())
    };
    let evil_arg = evil.display().to_string();
    refused(
        &[
            "bundle",
            "set",
            "--trust-domain",
            PARTNER,
            "--path",
            &evil_arg,
        ],
        "spiffe://evil.example",
    )?;
    let empty = env.path().join("empty.json");
    std::fs::write(&empty, r#"{"keys":[]}"#)?;
    let empty_arg = empty.display().to_string();
    refused(
        &[
            "bundle",
            "set",
            "--trust-domain",
            PARTNER,
            "--format",
            "spiffe",
            "--path",
            &empty_arg,
        ],
        "no keys",
    )?;
    let huge = env.path().join("huge.json");
    std::fs::write(&huge, vec![b' '; 600 * 1024])?;
    let huge_arg = huge.display().to_string();
    refused(
        &[
            "bundle",
            "set",
            "--trust-domain",
            PARTNER,
            "--format",
            "spiffe",
            "--path",
            &huge_arg,
        ],
        "over the limit",
    )?;
    refused(
        &[
            "bundle",
            "set",
            "--trust-domain",
            "example.org",
            "--path",
            &partner_pem_arg,
        ],
        "own trust domain",
    )?;
    let listed = json(&ours.cli_ok(&["bundle", "list", "--output", "json"])?)?;
    assert_eq!(
        listed,
        serde_json::json!([]),
        "nothing was stored: {listed}"
    );

    // A good bundle set by hand, then a relationship whose endpoint presents another ID
    // than the one configured: every fetch is refused (and counted), the bundle stays.
    ours.cli_ok(&[
        "bundle",
        "set",
        "--trust-domain",
        PARTNER,
        "--path",
        &partner_pem_arg,
    ])?;
    ok(federate(
        &ours,
        PARTNER,
        &partner_url,
        &[
            "--endpoint-spiffe-id",
            "spiffe://partner.example/not-the-server",
        ],
    ))?;
    let mut last = serde_json::Value::Null;
    let ok = wait_until(Duration::from_secs(20), || {
        last = federation(&ours, PARTNER).unwrap_or_default();
        last["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("not-the-server"))
    });
    assert!(ok, "the wrong endpoint ID was not refused: {last}");
    assert_eq!(last["bundle"]["source"], "static", "{last}");
    let metrics = metrics_address(&ours.daemon)?;
    let (_, text) = agentd_e2e::http_get(&metrics, "/metrics")?;
    let rejected = metric(
        &text,
        "agentd_server_federated_bundle_fetches_total{trust_domain=\"partner.example\",outcome=\"rejected\"}",
    );
    assert!(rejected >= Some(1.0), "{text}");
    // Fixed: the next fetch (woken by the update) succeeds.
    ours.cli_ok(&[
        "federation",
        "update",
        "--trust-domain",
        PARTNER,
        "--endpoint-spiffe-id",
        "spiffe://partner.example/agentd/server",
    ])?;
    wait_fetched(&ours, PARTNER, 1, Duration::from_secs(20))?;

    // A bundle in use is not deleted: the relationship goes first, then the entries that
    // federate with it let go (`--federates-with ""` clears the list), then the bundle.
    let entry = ours.create_entry(&[
        "--parent-id",
        "spiffe://example.org/node/somewhere",
        "--spiffe-id",
        "spiffe://example.org/agent/x",
        "--selector",
        "unix:uid:4242",
        "--federates-with",
        PARTNER,
    ])?;
    refused(
        &["bundle", "delete", "--trust-domain", PARTNER],
        "federation delete",
    )?;
    ours.cli_ok(&["federation", "delete", "--trust-domain", PARTNER])?;
    refused(
        &["bundle", "delete", "--trust-domain", PARTNER],
        "entries federating with partner.example: 1",
    )?;
    ours.cli_ok(&["entry", "update", "--id", &entry, "--federates-with", ""])?;
    let shown = json(&ours.cli_ok(&["entry", "show", "--id", &entry, "--output", "json"])?)?;
    assert_eq!(shown["federates_with"], serde_json::json!([]), "{shown}");
    ours.cli_ok(&["bundle", "delete", "--trust-domain", PARTNER])?;
    let listed = json(&ours.cli_ok(&["bundle", "list", "--output", "json"])?)?;
    assert_eq!(listed, serde_json::json!([]), "{listed}");
    let audit = ours.cli_ok(&["audit", "show", "--output", "json"])?;
    for action in [
        "bundle.set",
        "federation.create",
        "federation.update",
        "federation.delete",
        "bundle.delete",
        "federation.bundle_updated",
    ] {
        assert!(audit.contains(action), "no {action} in the audit log");
    }
    Ok(())
}

/// Two servers of one trust domain on one PostgreSQL database share their federation: a
/// relationship created through one is listed by the other, both fetch, and a node agent
/// attached to the other gets the federated bundle for an entry made through the first.
#[test]
fn servers_on_one_database_share_their_federation() -> anyhow::Result<()> {
    // The database helper runs its own runtime: this test is synchronous and drives the
    // Workload API client on one of its own.
    let db = agentd_e2e::pg::Database::create()?;
    let rt = tokio::runtime::Runtime::new()?;
    let env = Env::new();
    let (partner, partner_url) = federating_server(&env, "partner", PARTNER)?;
    let partner_pem = env.path().join("partner-bundle.pem");
    partner.write_bundle(&partner_pem)?;
    let pg = ["--datastore", db.url.as_str()];
    let a = Server::start_named(&env, "a", &pg)?;
    let b_dir = env.path().join("b");
    std::fs::create_dir(&b_dir)?;
    std::fs::copy(a.data_dir.join("audit.key"), b_dir.join("audit.key"))?;
    let b = Server::start_named(&env, "b", &pg)?;

    ok(federate(
        &a,
        PARTNER,
        &partner_url,
        &["--trust-bundle", &partner_pem.display().to_string()],
    ))?;
    wait_fetched(&a, PARTNER, 1, Duration::from_secs(20))?;
    // The other server sees the relationship and the bundle, and fetches for itself.
    wait_fetched(&b, PARTNER, 1, Duration::from_secs(20))?;
    let mut last = serde_json::Value::Null;
    let ok = wait_until(Duration::from_secs(20), || {
        last = federation(&b, PARTNER).unwrap_or_default();
        last["last_attempt_at"].is_number() && last["last_error"].is_null()
    });
    assert!(ok, "the second server never fetched: {last}");

    let node = Node::start(&env, &b, "n")?;
    let id = "spiffe://example.org/agent/planner";
    a.register_own_uid(&node.spiffe_id, id, &["--federates-with", PARTNER])?;
    node.wait_for_svid(id)?;
    rt.block_on(wait_authorities(&node, PARTNER, 1, Duration::from_secs(20)))?;
    // A rotation on the partner reaches the node through either server's fetch.
    partner.cli_ok(&["authority", "prepare"])?;
    rt.block_on(wait_authorities(&node, PARTNER, 2, Duration::from_secs(30)))?;
    Ok(())
}

/// A GET over TLS trusting only `root`, to `addr` named `host`: the status line and body.
async fn https_get(
    addr: &str,
    host: &str,
    root: &[u8],
    method: &str,
) -> anyhow::Result<(String, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from(root.to_vec()))?;
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(
            rustls::pki_types::ServerName::try_from(host.to_string())?,
            tcp,
        )
        .await?;
    tls.write_all(
        format!("{method} /anything HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\ncontent-length: 0\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    let _ = tls.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Ok((
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_web_bundle_endpoint_serves_the_bundle_with_its_certificate() -> anyhow::Result<()>
{
    use std::os::unix::fs::PermissionsExt as _;
    let env = Env::new();
    // A web PKI of our own: a root, and a certificate for localhost under it.
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key)?;
    let leaf_key = rcgen::KeyPair::generate()?;
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])?
        .signed_by(&leaf_key, &rcgen::Issuer::from_params(&ca, &ca_key))?;
    let cert_file = env.path().join("web.crt");
    let key_file = env.path().join("web.key");
    std::fs::write(&cert_file, format!("{}{}", leaf.pem(), ca_cert.pem()))?;
    std::fs::write(&key_file, leaf_key.serialize_pem())?;
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644))?;
    let port = free_port()?;
    let config = env.path().join("web.toml");
    std::fs::write(
        &config,
        format!(
            "[federation]\nbind_address = \"127.0.0.1:{port}\"\n[federation.https_web]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            cert_file.display(),
            key_file.display()
        ),
    )?;
    let config_arg = config.display().to_string();
    // A key others can read is refused at start, naming the file.
    let err = Server::start_named(&env, "loose", &["--config", &config_arg])
        .expect_err("a world-readable key was accepted");
    assert!(format!("{err:#}").contains("chmod 600"), "{err:#}");
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600))?;
    let server = Server::start_named(&env, "web", &["--config", &config_arg])?;

    let addr = format!("127.0.0.1:{port}");
    let (status, body) = https_get(&addr, "localhost", ca_cert.der(), "GET").await?;
    assert!(status.contains(" 200 "), "{status}");
    let doc: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(doc["spiffe_refresh_hint"], 300, "{doc}");
    let served = doc["keys"].as_array().map(Vec::len).unwrap_or(0);
    let ours = json(&server.cli_ok(&["bundle", "show", "--format", "spiffe"])?)?;
    assert_eq!(Some(served), ours["keys"].as_array().map(Vec::len), "{doc}");
    assert!(served >= 2, "X.509 and JWT authorities: {doc}");
    let (status, _) = https_get(&addr, "localhost", ca_cert.der(), "POST").await?;
    assert!(status.contains(" 405 "), "{status}");
    Ok(())
}

/// The published `spiffe` crate's source, as cargo fetched it for this workspace.
fn spiffe_crate_source() -> anyhow::Result<PathBuf> {
    let out = cargo_command()
        .args(["metadata", "--format-version", "1"])
        .current_dir(agentd_e2e::repo_path(""))
        .stderr(Stdio::inherit())
        .output()?;
    anyhow::ensure!(out.status.success(), "cargo metadata failed");
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let manifest = meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "spiffe" && p["version"] == "0.19.0")
        .and_then(|p| p["manifest_path"].as_str())
        .context("spiffe 0.19.0 is not in the workspace's dependency graph")?;
    Ok(Path::new(manifest)
        .parent()
        .context("manifest without a directory")?
        .to_path_buf())
}

/// A copy of the crate that builds its Workload API integration tests on their own: the
/// dev-dependencies only its other tests use (OpenSSL built from source, p256, base64ct) and
/// those tests are left out. The three test files run are the published ones, unchanged.
fn prepare_suite(src: &Path, dst: &Path) -> anyhow::Result<()> {
    let status = std::process::Command::new("cp")
        .arg("-r")
        .arg(src)
        .arg(dst)
        .status()?;
    anyhow::ensure!(status.success(), "copying {} failed", src.display());
    let manifest = std::fs::read_to_string(dst.join("Cargo.toml"))?;
    let mut kept = String::new();
    let mut skip = false;
    for line in manifest.lines() {
        if line.starts_with('[') {
            skip = matches!(
                line,
                "[dev-dependencies.openssl]"
                    | "[dev-dependencies.p256]"
                    | "[dev-dependencies.base64ct]"
            );
        }
        if line.starts_with("name = \"jwt_authority_policy\"")
            || line.starts_with("name = \"x509_bundle\"")
            || line.starts_with("name = \"x509_svid\"")
        {
            // Drop the `[[test]]` header just written, and this target.
            if let Some(at) = kept.trim_end().rfind("[[test]]") {
                kept.truncate(at);
            }
            skip = true;
            continue;
        }
        if !skip {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    // Its own workspace, outside ours.
    kept.push_str("\n[workspace]\n");
    std::fs::write(dst.join("Cargo.toml"), kept)?;
    for t in ["jwt_authority_policy.rs", "x509_bundle.rs", "x509_svid.rs"] {
        let _ = std::fs::remove_file(dst.join("tests").join(t));
    }
    // The versions this workspace already built, where they fit.
    std::fs::copy(agentd_e2e::repo_path("Cargo.lock"), dst.join("Cargo.lock"))?;
    Ok(())
}

/// Where SPIRE's agent listens in the crate's CI; two of its tests name the path itself.
const SPIRE_CI_SOCKET_DIR: &str = "/tmp/spire-agent/public";

/// Removes the socket directory SPIRE's CI path needs when the test ends, however it ends.
struct SocketDir(PathBuf);

impl Drop for SocketDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0).or_else(|_| std::fs::remove_file(&self.0));
    }
}

#[test]
fn the_spiffe_crates_own_workload_api_integration_tests_pass() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    // The node agent on SPIRE's CI socket path: the suite connects there by name as well
    // as through SPIFFE_ENDPOINT_SOCKET.
    let dir = PathBuf::from(SPIRE_CI_SOCKET_DIR);
    let socket = dir.join("api.sock");
    if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        bail!("{} is in use by another Workload API server (a SPIRE agent?): stop it, this test needs the path", socket.display());
    }
    let created = !Path::new("/tmp/spire-agent").exists();
    std::fs::create_dir_all(&dir)?;
    // Only what this test made is removed afterwards.
    let _cleanup = SocketDir(if created {
        PathBuf::from("/tmp/spire-agent")
    } else {
        dir.join("api.sock")
    });
    let node_id = "spiffe://example.org/myagent";
    let token = server.join_token(node_id)?;
    let bundle = env.path().join("myagent-bundle.pem");
    server.write_bundle(&bundle)?;
    let data_dir = env.path().join("myagent");
    let mut daemon =
        agentd_e2e::spawn_node(&server.address, &bundle, &data_dir, &socket, Some(&token))?;
    daemon.wait_node_healthy(&socket)?;
    let node = Node {
        spiffe_id: node_id.to_string(),
        data_dir,
        socket,
        bundle,
        server_address: server.address.clone(),
        daemon,
    };
    // As the crate's CI sets up SPIRE: example-federated.org's bundle, two entries with
    // hints federating with it.
    let federated = foreign_ca_pem(env.path(), "example-federated.org")?;
    server.cli_ok(&[
        "bundle",
        "set",
        "--trust-domain",
        "example-federated.org",
        "--path",
        &federated.display().to_string(),
    ])?;
    for name in ["myservice", "myservice2"] {
        server.register_own_uid(
            &node.spiffe_id,
            &format!("spiffe://example.org/{name}"),
            &["--hint", name, "--federates-with", "example-federated.org"],
        )?;
        node.wait_for_svid(&format!("spiffe://example.org/{name}"))?;
    }
    let crate_dir = env.path().join("spiffe-0.19.0");
    prepare_suite(&spiffe_crate_source()?, &crate_dir)?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| agentd_e2e::repo_path("target"))
        .join("spiffe-suite");
    let out = cargo_command()
        .args(["test", "--manifest-path"])
        .arg(crate_dir.join("Cargo.toml"))
        .args(["--features", "workload-api,x509-source,jwt-source,jwt"])
        .args([
            "--test",
            "workload_api_client",
            "--test",
            "x509_source",
            "--test",
            "jwt_source",
        ])
        .args(["--", "--ignored", "--test-threads", "2"])
        .env("CARGO_TARGET_DIR", &target)
        .env("SPIFFE_ENDPOINT_SOCKET", node.endpoint())
        .env_remove("RUSTFLAGS")
        .stdin(Stdio::null())
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the spiffe crate's tests failed:\n{stdout}\n{stderr}"
    );
    // Every ignored test ran: three suites, none skipped, none filtered out.
    let passed: usize = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("test result: ok. "))
        .filter_map(|l| l.split(' ').next()?.parse::<usize>().ok())
        .sum();
    assert!(passed >= 60, "only {passed} tests passed:\n{stdout}");
    assert!(
        stdout.contains("fetch_x509_context ... ok")
            && stdout.contains("stream_x509_contexts ... ok"),
        "the federation tests did not run:\n{stdout}"
    );
    Ok(())
}
