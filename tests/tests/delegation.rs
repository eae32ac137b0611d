//! Scope and delegation end to end: grants through the admin CLI, delegated SVIDs served by
//! real node agents, agent-to-agent delegation across two node agents, and the delegated
//! documents checked by clients nobody here wrote (`spiffe`, `spiffe-rustls`, `openssl`).
//!
//! Two node agents separate the agents: everything on n1 is the orchestrator, everything on
//! n2 the scheduler (both run as this test's uid).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use agentd::bundle::Bundle;
use agentd::delegation::{Principal, Scope, Verifier};
use agentd_e2e::{agentd, wait_until, Env, Node, Server};
use futures::StreamExt;
use spiffe::{WorkloadApiClient, X509Source};

const ORCH: &str = "spiffe://example.org/agent/orchestrator";
const SCHED: &str = "spiffe://example.org/agent/scheduler";

fn json_of(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "command failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON value on stdout")
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn api(node: &Node, args: &[&str]) -> std::process::Output {
    let sock = node.socket_arg();
    let mut all = vec!["api"];
    all.extend_from_slice(args);
    all.extend(["--socket-path", &sock, "--output", "json"]);
    agentd(&all)
}

/// The hints of the SVIDs the node agent serves this process now.
fn hints(node: &Node) -> Vec<String> {
    let out = api(node, &["fetch", "x509"]);
    if !out.status.success() {
        return vec![];
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["svids"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s["hint"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn wait_for_hint(node: &Node, hint: &str) -> anyhow::Result<()> {
    if !wait_until(Duration::from_secs(20), || {
        hints(node).iter().any(|h| h == hint)
    }) {
        anyhow::bail!("no SVID with hint {hint}:\n{}", node.daemon.log_text());
    }
    Ok(())
}

#[derive(Debug)]
struct HintPicker(String);

impl spiffe::x509_source::SvidPicker for HintPicker {
    fn pick_svid(&self, svids: &[Arc<spiffe::X509Svid>]) -> Option<usize> {
        svids.iter().position(|s| s.hint() == Some(self.0.as_str()))
    }
}

async fn source_by_hint(node: &Node, hint: &str) -> anyhow::Result<X509Source> {
    Ok(X509Source::builder()
        .endpoint(node.endpoint())
        .picker(HintPicker(hint.to_string()))
        .initial_sync_timeout(Duration::from_secs(20))
        .build()
        .await?)
}

fn verifier(server: &Server, env: &Env) -> anyhow::Result<Verifier> {
    let path = env.path().join("bundle-for-verifier.pem");
    server.write_bundle(&path)?;
    let pem = std::fs::read_to_string(&path)?;
    let spiffe_json = server.cli_ok(&["bundle", "show", "--format", "spiffe"])?;
    let td = spiffe::TrustDomain::new("example.org")?;
    let mut bundle = Bundle::from_spiffe_json(td, &spiffe_json)?;
    bundle.x509_authorities = Bundle::x509_authorities_from_pem(&pem)?;
    Ok(Verifier::new(bundle))
}

/// Server, n1 with the orchestrator (ceiling calendar:* crm:read), n2 with the scheduler
/// (ceiling calendar:read crm:read).
fn setup(env: &Env) -> anyhow::Result<(Server, Node, Node)> {
    let server = Server::start(env)?;
    let n1 = Node::start(env, &server, "n1")?;
    let n2 = Node::start(env, &server, "n2")?;
    server.register_own_uid(
        &n1.spiffe_id,
        ORCH,
        &[
            "--scope",
            "calendar:*",
            "--scope",
            "crm:read",
            "--hint",
            "orchestrator",
        ],
    )?;
    server.register_own_uid(
        &n2.spiffe_id,
        SCHED,
        &[
            "--scope",
            "calendar:read",
            "--scope",
            "crm:read",
            "--hint",
            "scheduler",
        ],
    )?;
    n1.wait_for_svid(ORCH)?;
    n2.wait_for_svid(SCHED)?;
    Ok((server, n1, n2))
}

fn create_grant(server: &Server, args: &[&str]) -> std::process::Output {
    let mut all = vec!["grant", "create", "--output", "json"];
    all.extend_from_slice(args);
    server.cli(&all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grant_yields_a_delegated_svid_that_standard_clients_accept() -> anyhow::Result<()> {
    let env = Env::new();
    let (server, n1, _n2) = setup(&env)?;
    let alice = "user:alice@example.com";

    // Beyond the ceiling: refused, naming the scope, and nothing is written.
    let out = create_grant(
        &server,
        &[
            "--principal",
            alice,
            "--agent",
            ORCH,
            "--scope",
            "payments:execute",
            "--ttl",
            "1h",
        ],
    );
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(
        err.contains("scope: payments:execute exceeds the entry ceiling"),
        "{err}"
    );
    let list = json_of(&server.cli(&["grant", "list", "--all", "--output", "json"]));
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");

    let g = json_of(&create_grant(
        &server,
        &[
            "--principal",
            alice,
            "--agent",
            ORCH,
            "--scope",
            "calendar:*",
            "--scope",
            "crm:read",
            "--ttl",
            "1h",
            "--max-depth",
            "2",
        ],
    ));
    let gid = g["id"].as_str().unwrap().to_string();
    assert_eq!(g["remaining_depth"], 2);
    let shown = json_of(&server.cli(&["grant", "show", "--id", &gid, "--output", "json"]));
    assert_eq!(shown["principal"], alice);
    assert_eq!(shown["agent"], ORCH);

    // FetchX509SVID: the plain SVID first, then the delegated one named by its hint.
    let hint = format!("grant:{gid}");
    wait_for_hint(&n1, &hint)?;
    assert_eq!(
        hints(&n1)[0],
        "orchestrator",
        "the default SVID stays the plain one"
    );

    // The spiffe crate's X509Source selects it by hint.
    let source = source_by_hint(&n1, &hint).await?;
    let svid = source.svid()?;
    assert_eq!(svid.spiffe_id().to_string(), ORCH);
    let chain: Vec<Vec<u8>> = svid
        .cert_chain()
        .iter()
        .map(|c| c.as_ref().to_vec())
        .collect();
    let verifier = verifier(&server, &env)?;
    let id = verifier.verify_x509(&chain, SystemTime::now())?;
    assert_eq!(id.principal(), Some(&alice.parse::<Principal>()?));
    assert_eq!(id.scopes.to_strings(), ["calendar:*", "crm:read"]);
    assert_eq!(
        id.delegation.as_ref().unwrap().grant_chain(),
        vec![gid.clone()]
    );
    id.authorize(&"calendar:write".parse::<Scope>()?)?;
    let refused = id
        .authorize(&"payments:execute".parse::<Scope>()?)
        .unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("scope payments:execute not held"),
        "{refused}"
    );
    source.shutdown().await;

    // openssl verify accepts the delegated SVID (our extensions are non-critical).
    let dir = env.path().join("out");
    let w = api(&n1, &["fetch", "x509", "--write", dir.to_str().unwrap()]);
    assert!(w.status.success(), "{}", stderr_of(&w));
    let v = agentd_e2e::openssl()
        .args(["verify", "-purpose", "sslclient", "-CAfile"])
        .arg(dir.join("bundle.1.pem"))
        .arg(dir.join("svid.1.pem"))
        .output()
        .expect("running openssl");
    assert!(
        v.status.success(),
        "openssl verify: {}{}",
        String::from_utf8_lossy(&v.stdout),
        stderr_of(&v)
    );

    // `svid inspect` and `svid check` on the written file.
    let bundle_pem = dir.join("bundle.1.pem");
    let svid_pem = dir.join("svid.1.pem");
    let inspect = json_of(&agentd(&[
        "svid",
        "inspect",
        svid_pem.to_str().unwrap(),
        "--bundle",
        bundle_pem.to_str().unwrap(),
        "--output",
        "json",
    ]));
    assert_eq!(inspect["verified"], true);
    assert_eq!(inspect["principal"], alice);
    assert_eq!(inspect["chain"][0]["agent"], ORCH);
    let ok = agentd(&[
        "svid",
        "check",
        svid_pem.to_str().unwrap(),
        "--bundle",
        bundle_pem.to_str().unwrap(),
        "--scope",
        "calendar:read",
    ]);
    assert!(ok.status.success(), "{}", stderr_of(&ok));
    let no = agentd(&[
        "svid",
        "check",
        svid_pem.to_str().unwrap(),
        "--bundle",
        bundle_pem.to_str().unwrap(),
        "--scope",
        "crm:write",
    ]);
    assert!(!no.status.success());
    assert!(
        stderr_of(&no).contains("scope crm:write not held"),
        "{}",
        stderr_of(&no)
    );

    // The delegated JWT-SVID through agentd.workload.v1.Delegation.
    let jwt = json_of(&api(
        &n1,
        &[
            "fetch",
            "jwt",
            "--grant",
            &gid,
            "--audience",
            "calendar-tool",
        ],
    ));
    let token = jwt["svids"][0]["svid"].as_str().unwrap().to_string();
    let client = WorkloadApiClient::connect_to(n1.endpoint()).await?;
    let bundles = client.fetch_jwt_bundles().await?;
    let parsed = spiffe::JwtSvid::parse_and_validate(&token, &bundles, &["calendar-tool"])?;
    assert_eq!(parsed.spiffe_id().to_string(), ORCH);
    let validated = client.validate_jwt_token("calendar-tool", &token).await?;
    assert_eq!(validated.spiffe_id().to_string(), ORCH);
    let id = verifier.verify_jwt(&token, "calendar-tool", SystemTime::now())?;
    assert_eq!(id.principal(), Some(&alice.parse::<Principal>()?));
    assert!(id.scopes.allows(&"calendar:read".parse()?));
    // A grant the caller does not hold gives nothing.
    let other = api(
        &n1,
        &[
            "fetch",
            "jwt",
            "--grant",
            &"0".repeat(32),
            "--audience",
            "a",
        ],
    );
    assert!(!other.status.success());
    assert!(
        stderr_of(&other).contains("not held by this workload"),
        "{}",
        stderr_of(&other)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_to_agent_delegation_is_single_use_bound_and_narrowing() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let env = Env::new();
    let (server, n1, n2) = setup(&env)?;
    let g = json_of(&create_grant(
        &server,
        &[
            "--principal",
            "user:alice@example.com",
            "--agent",
            ORCH,
            "--scope",
            "calendar:*",
            "--scope",
            "crm:read",
            "--ttl",
            "1h",
            "--max-depth",
            "1",
        ],
    ));
    let root = g["id"].as_str().unwrap().to_string();
    wait_for_hint(&n1, &format!("grant:{root}"))?;

    // Widening is refused at the source.
    let wide = api(
        &n1,
        &["delegate", "--to", SCHED, "--scope", "payments:execute"],
    );
    assert!(!wide.status.success());
    assert!(
        stderr_of(&wide).contains("payments:execute is not held by the parent grant"),
        "{}",
        stderr_of(&wide)
    );
    let long = api(
        &n1,
        &[
            "delegate",
            "--to",
            SCHED,
            "--scope",
            "calendar:read",
            "--ttl",
            "2h",
        ],
    );
    assert!(!long.status.success());
    assert!(
        stderr_of(&long).contains("ttl: the delegation would expire"),
        "{}",
        stderr_of(&long)
    );

    let d = json_of(&api(
        &n1,
        &[
            "delegate",
            "--to",
            SCHED,
            "--scope",
            "calendar:read",
            "--ttl",
            "10m",
        ],
    ));
    let token = d["token"].as_str().unwrap().to_string();
    // The token is a JWT-SVID of the orchestrator for the scheduler.
    let client = WorkloadApiClient::connect_to(n1.endpoint()).await?;
    let bundles = client.fetch_jwt_bundles().await?;
    let parsed = spiffe::JwtSvid::parse_and_validate(&token, &bundles, &[SCHED])?;
    assert_eq!(parsed.spiffe_id().to_string(), ORCH);

    // Presented by the wrong agent (the orchestrator itself, on n1): refused, not spent.
    let wrong = api(&n1, &["exchange", "--token", &token]);
    assert!(!wrong.status.success());
    assert!(
        stderr_of(&wrong).contains("not to spiffe://example.org/agent/orchestrator"),
        "{}",
        stderr_of(&wrong)
    );

    // The scheduler redeems it on its own node agent.
    let x = json_of(&api(&n2, &["exchange", "--token", &token]));
    let child = x["grant_id"].as_str().unwrap().to_string();
    assert_eq!(x["spiffe_id"], SCHED);
    assert_eq!(x["principal"], "user:alice@example.com");
    assert_eq!(x["scopes"], serde_json::json!(["calendar:read"]));
    assert_eq!(x["grant_chain"], serde_json::json!([root, child]));

    // Replayed: refused.
    let replay = api(&n2, &["exchange", "--token", &token]);
    assert!(!replay.status.success());
    assert!(
        stderr_of(&replay).contains("single-use"),
        "{}",
        stderr_of(&replay)
    );

    // The child grant has depth 0: the scheduler cannot delegate further.
    let deeper = api(&n2, &["delegate", "--to", ORCH, "--scope", "calendar:read"]);
    assert!(!deeper.status.success());
    assert!(
        stderr_of(&deeper).contains("max_depth"),
        "{}",
        stderr_of(&deeper)
    );

    // n2 serves the scheduler an SVID whose chain is alice -> orchestrator -> scheduler.
    let hint = format!("grant:{child}");
    wait_for_hint(&n2, &hint)?;
    let sched_source = source_by_hint(&n2, &hint).await?;
    let tool_source = source_by_hint(&n1, "orchestrator").await?;
    let verifier = verifier(&server, &env)?;

    // spiffe-rustls mTLS with the delegated SVID as the client certificate; the tool side
    // decides with the verifier.
    let server_cfg = spiffe_rustls::mtls_server(tool_source.clone())
        .authorize(spiffe_rustls::authorizer::exact([SCHED])?)
        .build()?;
    let client_cfg = spiffe_rustls::mtls_client(sched_source.clone())
        .authorize(spiffe_rustls::authorizer::exact([ORCH])?)
        .build()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
    let tool = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut tls = acceptor.accept(tcp).await?;
        let chain: Vec<Vec<u8>> = tls
            .get_ref()
            .1
            .peer_certificates()
            .map(|c| c.iter().map(|c| c.to_vec()).collect())
            .unwrap_or_default();
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await?;
        tls.write_all(b"pong").await?;
        tls.shutdown().await?;
        anyhow::Ok(chain)
    });
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("tool.example.org")?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(client_cfg))
        .connect(name, tcp)
        .await?;
    tls.write_all(b"ping").await?;
    let mut reply = Vec::new();
    tls.read_to_end(&mut reply).await?;
    assert_eq!(reply, b"pong");
    let peer_chain = tool.await??;
    let id = verifier.verify_x509(&peer_chain, SystemTime::now())?;
    assert_eq!(id.spiffe_id.to_string(), SCHED);
    let d = id.delegation.clone().expect("a delegated SVID");
    assert_eq!(d.principal.to_string(), "user:alice@example.com");
    let agents: Vec<String> = d.chain.iter().map(|h| h.agent.to_string()).collect();
    assert_eq!(agents, [ORCH, SCHED]);
    assert_eq!(d.grant_chain(), [root.clone(), child.clone()]);
    id.authorize(&"calendar:read".parse()?)?;
    assert!(
        id.authorize(&"crm:read".parse()?).is_err(),
        "the hop narrowed to calendar:read"
    );
    sched_source.shutdown().await;
    tool_source.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_task_grant_stops_producing_svids_and_the_stream_drops_it() -> anyhow::Result<()>
{
    let env = Env::new();
    let (server, _n1, n2) = setup(&env)?;
    let g = json_of(&create_grant(
        &server,
        &[
            "--principal",
            "user:bob@example.com",
            "--agent",
            SCHED,
            "--scope",
            "calendar:read",
            "--ttl",
            "6s",
            "--task",
            "t-42",
        ],
    ));
    let gid = g["id"].as_str().unwrap().to_string();
    assert_eq!(g["task_id"], "t-42");
    let hint = format!("grant:{gid}");

    // A raw Workload API stream, as standard clients hold it.
    let channel = agentd::net::unix_channel(&n2.socket).await?;
    let mut client =
        agentd_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(channel);
    let mut req = tonic::Request::new(agentd_proto::workload::X509svidRequest {});
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse()?);
    let mut stream = client.fetch_x509svid(req).await?.into_inner();
    let hints_of = |m: &agentd_proto::workload::X509svidResponse| -> Vec<String> {
        m.svids.iter().map(|s| s.hint.clone()).collect()
    };
    // Wait for a message with the task SVID, then for one without it.
    let mut seen = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, stream.next()).await {
        let msg = msg?;
        let h = hints_of(&msg);
        if h.contains(&hint) {
            let svid = msg.svids.iter().find(|s| s.hint == hint).unwrap();
            let (rest, _) = x509_parser::parse_x509_certificate(&svid.x509_svid)?;
            let leaf = svid.x509_svid[..svid.x509_svid.len() - rest.len()].to_vec();
            let id = agentd::delegation::verify::decode_x509_unverified(
                &leaf,
                &agentd::delegation::OidBase::default(),
            )?;
            assert_eq!(
                id.task_id().map(ToString::to_string).as_deref(),
                Some("t-42")
            );
            seen = true;
        } else if seen {
            assert_eq!(h, ["scheduler"], "the plain SVID stays");
            // The grant is gone from the server's live list too.
            let live = json_of(&server.cli(&["grant", "list", "--output", "json"]));
            assert_eq!(live.as_array().map(Vec::len), Some(0), "{live}");
            return Ok(());
        }
    }
    anyhow::bail!(
        "seen the task SVID: {seen}; the stream never dropped it:\n{}",
        n2.daemon.log_text()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_grant_drops_its_delegated_svids_and_its_childrens_but_not_the_plain_ones(
) -> anyhow::Result<()> {
    let env = Env::new();
    let (server, n1, n2) = setup(&env)?;
    let g = json_of(&create_grant(
        &server,
        &[
            "--principal",
            "user:alice@example.com",
            "--agent",
            ORCH,
            "--scope",
            "calendar:*",
            "--ttl",
            "1h",
            "--max-depth",
            "1",
        ],
    ));
    let root = g["id"].as_str().unwrap().to_string();
    wait_for_hint(&n1, &format!("grant:{root}"))?;
    let d = json_of(&api(
        &n1,
        &["delegate", "--to", SCHED, "--scope", "calendar:read"],
    ));
    let token = d["token"].as_str().unwrap().to_string();
    let x = json_of(&api(&n2, &["exchange", "--token", &token]));
    let child = x["grant_id"].as_str().unwrap().to_string();
    wait_for_hint(&n2, &format!("grant:{child}"))?;

    // The orchestrator's X509Source holds its plain and its delegated SVID.
    let source = X509Source::builder()
        .endpoint(n1.endpoint())
        .initial_sync_timeout(Duration::from_secs(20))
        .build()
        .await?;
    assert_eq!(source.x509_context()?.svids().len(), 2);

    let event = json_of(&server.cli(&[
        "revoke",
        "grant",
        "--id",
        &root,
        "--reason",
        "alice left",
        "--output",
        "json",
    ]));
    // The root's SVIDs and the child's (on the other node) are covered.
    assert!(
        event["serials"].as_array().map(Vec::len).unwrap_or(0) >= 2,
        "{event}"
    );
    // The source keeps only the plain SVID; the default pick is unchanged.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while source.x509_context()?.svids().len() != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the delegated SVID stayed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(source.svid()?.spiffe_id().to_string(), ORCH);
    assert_eq!(source.svid()?.hint(), Some("orchestrator"));
    // The child grant on the other node went with it; the scheduler's plain SVID stays.
    assert!(wait_until(Duration::from_secs(20), || hints(&n2)
        == vec!["scheduler".to_string()]));
    // Never minted again while the revocation stands (checked after a whole sync of each
    // node), and nothing more can be delegated.
    agentd_e2e::wait_for_a_full_sync(&server, &n1, "after-revoke")?;
    agentd_e2e::wait_for_a_full_sync(&server, &n2, "after-revoke")?;
    assert_eq!(hints(&n1), vec!["orchestrator".to_string()]);
    assert_eq!(hints(&n2), vec!["scheduler".to_string()]);
    let again = api(
        &n1,
        &[
            "delegate",
            "--to",
            SCHED,
            "--scope",
            "calendar:read",
            "--grant",
            &root,
        ],
    );
    assert!(!again.status.success());
    let jwt = api(
        &n1,
        &["fetch", "jwt", "--audience", "tools", "--grant", &root],
    );
    assert!(!jwt.status.success());

    // Each step is in the audit trail, with who did it and the chain.
    let audit = |action: &str| {
        json_of(&server.cli(&["audit", "show", "--action", action, "--output", "json"]))
    };
    let created = audit("grant.create").to_string();
    assert!(
        created.contains(&root) && created.contains("user:alice@example.com"),
        "{created}"
    );
    let offered = audit("delegation.offer").to_string();
    assert!(
        offered.contains(SCHED) && offered.contains(ORCH),
        "{offered}"
    );
    let exchanged = audit("delegation.exchange").to_string();
    assert!(
        exchanged.contains(&child) && exchanged.contains(&root),
        "{exchanged}"
    );
    let revoked = audit("revocation.create").to_string();
    assert!(
        revoked.contains(&root) && revoked.contains("alice left"),
        "{revoked}"
    );
    let issued = audit("x509svid.issue").to_string();
    assert!(
        issued.contains(&child),
        "delegated issuance names its grant chain: {issued}"
    );
    source.shutdown().await;
    Ok(())
}
