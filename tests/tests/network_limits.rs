//! The node API under hostile network input: idle connections from one source, oversized
//! unauthenticated messages, the 4 MiB cap, the handshake timeout, and a node that bootstrapped
//! without verifying the server verifying it from then on.

use std::io::Read;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use agentd_e2e::{wait_until, Env, Node, Server};
use agentd_proto::node as pb;
use pb::node_client::NodeClient;

/// A gRPC client that does not verify the server (as `--insecure-bootstrap` does) and
/// presents no client certificate: what anyone on the network can be.
async fn anonymous_client(address: &str) -> NodeClient<tonic::transport::Channel> {
    let cfg = agentd::tls::client_config(&[], None, None).expect("client TLS config");
    let channel = agentd::tls::connect(address, cfg)
        .await
        .expect("connecting to the node API");
    NodeClient::new(channel)
        .max_encoding_message_size(64 * 1024 * 1024)
        .max_decoding_message_size(64 * 1024 * 1024)
}

/// Opens `n` TCP connections to `server` from the source address `source` and sends nothing
/// on them. Connections the server does not take within a few seconds are given up.
async fn idle_connections(
    server: SocketAddr,
    source: &str,
    n: usize,
) -> Vec<tokio::net::TcpStream> {
    let source: SocketAddr = format!("{source}:0").parse().unwrap();
    let tries = (0..n).map(|_| async move {
        let socket = tokio::net::TcpSocket::new_v4().ok()?;
        socket.bind(source).ok()?;
        tokio::time::timeout(Duration::from_secs(3), socket.connect(server))
            .await
            .ok()?
            .ok()
    });
    futures::future::join_all(tries)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// The headline denial of service: before per-source limits, 1,500 idle TCP connections
/// from one address held every handshake slot (the accept loop waited for one to free, 10 s
/// each), and no node could attest for about a minute.
#[test]
fn idle_connections_from_one_source_do_not_keep_a_node_from_attesting() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let addr: SocketAddr = server.address.parse()?;
    let rt = tokio::runtime::Runtime::new()?;
    // The flood comes from 127.0.0.2; the node connects from 127.0.0.1.
    let flood = rt.block_on(idle_connections(addr, "127.0.0.2", 1500));
    assert!(
        flood.len() >= 300,
        "the flood opened only {} connections (more than the 256 handshake slots are needed)",
        flood.len()
    );
    let started = Instant::now();
    let node = Node::start(&env, &server, "n1")?;
    println!(
        "node attested and healthy {:?} after {} idle connections were opened",
        started.elapsed(),
        flood.len()
    );
    let nodes = server.cli_ok(&["node", "list", "--output", "json"])?;
    assert!(nodes.contains(&node.spiffe_id), "{nodes}");
    drop(flood);
    Ok(())
}

#[test]
fn an_oversized_unauthenticated_message_is_refused_naming_the_limit() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let mut client = anonymous_client(&server.address).await;
        let huge = pb::AttestRequest {
            attestation: Some(pb::attest_request::Attestation::Claims(
                pb::ClaimsAttestation {
                    token: "a".repeat(100 * 1024),
                },
            )),
            csr: vec![],
        };
        let err = client.attest(huge).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::OutOfRange, "{err}");
        assert!(
            err.message().contains("Attest") && err.message().contains("at most 65536"),
            "{}",
            err.message()
        );
        let huge = pb::X509PopChallengeRequest {
            cert_chain: vec![vec![0u8; 70 * 1024]],
        };
        let err = client.x509_pop_challenge(huge).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::OutOfRange, "{err}");

        // The 4 MiB cap of the other calls: a 5 MiB mint batch is refused before any
        // handler sees it, a 3 MiB one reaches the handler (which wants a node SVID).
        let batch = |bytes: usize| pb::MintX509SvidsRequest {
            params: vec![pb::X509SvidParams {
                entry_id: "e".into(),
                csr: vec![0u8; bytes],
                grant_id: String::new(),
            }],
        };
        let err = client
            .mint_x509_svids(batch(5 * 1024 * 1024))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::OutOfRange, "{err}");
        let err = client
            .mint_x509_svids(batch(3 * 1024 * 1024))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    });
    Ok(())
}

/// A peer that connects and never starts the TLS handshake is dropped after 10 s.
#[test]
fn a_silent_connection_is_dropped_at_the_handshake_timeout() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let mut tcp = std::net::TcpStream::connect(&server.address)?;
    tcp.set_read_timeout(Some(Duration::from_secs(40)))?;
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let read = tcp.read(&mut buf);
    let waited = started.elapsed();
    assert!(
        matches!(read, Ok(0))
            || matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "expected the server to close the connection, got {read:?} after {waited:?}"
    );
    let timeout = agentd::tls::HANDSHAKE_TIMEOUT;
    assert!(
        waited >= timeout - Duration::from_millis(500) && waited < timeout * 3,
        "closed after {waited:?}, the handshake timeout is {timeout:?}"
    );
    Ok(())
}

/// `--insecure-bootstrap` skips verifying the server only for the first attestation: a node
/// restarted against another server (another CA) refuses it, the flag notwithstanding.
#[test]
fn an_insecure_bootstrap_node_verifies_the_server_after_attesting() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let token = server.join_token("spiffe://example.org/node/trial")?;
    let data_dir = env.path().join("trial");
    let socket = env.path().join("trial.sock");
    let args = |addr: &str| {
        vec![
            "node".to_string(),
            "run".into(),
            "--server-address".into(),
            addr.into(),
            "--insecure-bootstrap".into(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--socket-path".into(),
            socket.display().to_string(),
            "--sync-interval".into(),
            "1s".into(),
        ]
    };
    let mut first = args(&server.address);
    first.extend(["--join-token".into(), token]);
    let first: Vec<&str> = first.iter().map(String::as_str).collect();
    let mut node = agentd_e2e::Daemon::spawn_args(&first, env.path().join("trial-1.log"))?;
    node.wait_node_healthy(&socket)?;
    node.stop();

    let other_env = Env::new();
    let other = Server::start(&other_env)?;
    let again = args(&other.address);
    let again: Vec<&str> = again.iter().map(String::as_str).collect();
    let node = agentd_e2e::Daemon::spawn_args(&again, env.path().join("trial-2.log"))?;
    assert!(
        wait_until(Duration::from_secs(30), || node
            .log_text()
            .contains("server certificate")),
        "the node did not refuse the other server's certificate:\n{}",
        node.log_text()
    );
    // And it never talked to it: the other server has no node.
    let nodes = other.cli_ok(&["node", "list", "--output", "json"])?;
    assert!(!nodes.contains("trial"), "{nodes}");
    Ok(())
}

/// The audit records of `server`.
fn audit_records(server: &Server) -> anyhow::Result<Vec<serde_json::Value>> {
    let out = server.cli_ok(&["audit", "show", "--output", "json"])?;
    Ok(serde_json::from_str::<serde_json::Value>(&out)?
        .as_array()
        .cloned()
        .unwrap_or_default())
}

/// Before aggregation, each of these refusals appended and fsynced one audit record with
/// the peer's text: 300 bad join tokens made 300 records.
#[test]
fn a_flood_of_bad_attestations_makes_a_few_audit_records_and_is_rate_limited() -> anyhow::Result<()>
{
    let env = Env::new();
    let config = env.path().join("server.toml");
    std::fs::write(
        &config,
        "[node_api]\nattest_requests_per_source_per_minute = 100\nfailure_audit_interval = \"1s\"\n",
    )?;
    let server = Server::start_with(&env, &["--config", &config.display().to_string()])?;
    let rt = tokio::runtime::Runtime::new()?;
    let (refused, limited) = rt.block_on(async {
        let mut client = anonymous_client(&server.address).await;
        let (mut refused, mut limited) = (0, 0);
        for i in 0..300 {
            let req = pb::AttestRequest {
                attestation: Some(pb::attest_request::Attestation::JoinToken(
                    pb::JoinTokenAttestation {
                        token: format!("not-a-token-{i}-{}", "x".repeat(200)),
                    },
                )),
                csr: vec![],
            };
            match client.attest(req).await {
                Ok(_) => panic!("a made-up join token was accepted"),
                Err(s) if s.code() == tonic::Code::ResourceExhausted => limited += 1,
                Err(_) => refused += 1,
            }
        }
        (refused, limited)
    });
    println!("{refused} refused, {limited} rate limited");
    // The budget is 100 a minute, refilled continuously: a loop that takes up to 30 s on a
    // loaded machine gets at most 50 more; without the limit all 300 would be refused.
    assert!((100..=150).contains(&refused), "{refused} refused");
    assert_eq!(refused + limited, 300);

    let mut all = Vec::new();
    let summarised = wait_until(Duration::from_secs(20), || {
        all = audit_records(&server).unwrap_or_default();
        let counted: u64 = all
            .iter()
            .filter(|r| r["action"] == "node.attest.fail.summary")
            .filter_map(|r| r["fields"]["refused"].as_u64())
            .sum();
        counted >= 300
    });
    assert!(summarised, "no summary counts the 300 refusals: {all:#?}");
    let single: Vec<&serde_json::Value> = all
        .iter()
        .filter(|r| r["action"] == "node.attest.fail")
        .collect();
    // One per (reason, interval): the bad tokens and the rate limit, in one or a few
    // one-second intervals.
    assert!(
        !single.is_empty() && single.len() <= 12,
        "{} node.attest.fail records",
        single.len()
    );
    for r in &single {
        let reason = r["fields"]["reason"].as_str().unwrap_or_default();
        assert!(reason.len() <= 300, "an untruncated reason: {reason}");
    }
    Ok(())
}

/// A platform token with a `jti`, accepted once, stays used after the server restarts
/// (the used ids were in memory: a restart let a captured token attest again).
#[test]
fn a_claims_token_accepted_before_a_restart_is_refused_after_it() -> anyhow::Result<()> {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use ring::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING};

    let env = Env::new();
    let rng = ring::rand::SystemRandom::new();
    let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let key =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, doc.as_ref(), &rng).unwrap();
    let p = key.public_key().as_ref();
    let jwks = serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1",
        "x": URL_SAFE_NO_PAD.encode(&p[1..33]), "y": URL_SAFE_NO_PAD.encode(&p[33..65])}]});
    let jwks_file = env.path().join("jwks.json");
    std::fs::write(&jwks_file, jwks.to_string())?;
    let config = env.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "[node_attestors.claims]\njwks_file = \"{}\"\nissuer = \"https://issuer.example\"\naudience = \"agentd\"\n",
            jwks_file.display()
        ),
    )?;
    let mut server = Server::start_with(&env, &["--config", &config.display().to_string()])?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let claims = serde_json::json!({"iss": "https://issuer.example", "aud": "agentd",
        "sub": "runner-1", "jti": "captured-1", "exp": now + 600, "iat": now});
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"ES256","kid":"k1"}"#),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig = key.sign(&rng, input.as_bytes()).unwrap();
    let token = format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()));

    let rt = tokio::runtime::Runtime::new()?;
    let attest = |address: String, token: String| {
        rt.block_on(async move {
            let node_key = agentd::keys::PrivateKey::generate().expect("a node key");
            let csr = node_key.csr_der().expect("a CSR");
            let mut client = anonymous_client(&address).await;
            client
                .attest(pb::AttestRequest {
                    attestation: Some(pb::attest_request::Attestation::Claims(
                        pb::ClaimsAttestation { token },
                    )),
                    csr,
                })
                .await
        })
    };
    attest(server.address.clone(), token.clone()).expect("the first use is accepted");
    let again = attest(server.address.clone(), token.clone()).unwrap_err();
    assert!(again.message().contains("already used"), "{again}");
    server.restart()?;
    let replayed = attest(server.address.clone(), token).unwrap_err();
    assert_eq!(replayed.code(), tonic::Code::PermissionDenied, "{replayed}");
    assert!(replayed.message().contains("already used"), "{replayed}");
    Ok(())
}
