//! The Workload API against clients nobody here wrote: the `spiffe` crate's `X509Source`,
//! `WorkloadApiClient` and JWT validation, `spiffe-rustls` for mTLS, and `openssl verify`.

use std::sync::Arc;
use std::time::Duration;

use agentd_e2e::{agentd, agentd_node_bin, serial_of, x509_source, Env, Node, NodeProgram, Server};
use spiffe::{SpiffeId, WorkloadApiClient, X509Source};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509_source_gets_the_svid_and_sees_it_rotate() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let node = Node::start(&env, &server, "n1")?;
    let id = "spiffe://example.org/agent/rotating";
    server.register_own_uid(&node.spiffe_id, id, &["--x509-svid-ttl", "6s"])?;
    node.wait_for_svid(id)?;

    let source = x509_source(&node).await?;
    let first = source.svid()?;
    assert_eq!(first.spiffe_id().to_string(), id);
    let first_serial = serial_of(first.leaf().as_bytes());

    // 6 s lifetime: rotation at about 3 s (half-life, with jitter).
    let mut updates = source.updated();
    tokio::time::timeout(Duration::from_secs(15), updates.changed()).await??;
    let second = source.svid()?;
    assert_eq!(second.spiffe_id().to_string(), id);
    assert_ne!(
        serial_of(second.leaf().as_bytes()),
        first_serial,
        "a rotation brings a new certificate"
    );
    source.shutdown().await;
    Ok(())
}

/// The node-only build (`agentd-node run`) is a whole node agent: it attests to the server
/// (the full build), serves the SVID to the `spiffe` crate's `X509Source`, and answers its own
/// `healthcheck`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_only_build_serves_the_spiffe_crate() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let node = Node::start_program(&env, &server, "n1", NodeProgram::AgentdNode, &[])?;
    let id = "spiffe://example.org/agent/on-a-node-build";
    server.register_own_uid(&node.spiffe_id, id, &[])?;
    node.wait_for_svid(id)?;

    let source = x509_source(&node).await?;
    assert_eq!(source.svid()?.spiffe_id().to_string(), id);
    source.shutdown().await;

    let health = std::process::Command::new(agentd_node_bin())
        .args(["healthcheck", "--socket-path", &node.socket_arg()])
        .output()?;
    assert!(
        health.status.success(),
        "agentd-node healthcheck: {}",
        String::from_utf8_lossy(&health.stderr)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_svid_validates_with_the_spiffe_crate_against_the_fetched_bundle() -> anyhow::Result<()>
{
    let env = Env::new();
    let server = Server::start(&env)?;
    let node = Node::start(&env, &server, "n1")?;
    let id = "spiffe://example.org/agent/jwt";
    server.register_own_uid(&node.spiffe_id, id, &[])?;
    node.wait_for_svid(id)?;

    let client = WorkloadApiClient::connect_to(node.endpoint()).await?;
    let svid = client.fetch_jwt_svid(["my_audience"], None).await?;
    assert_eq!(svid.spiffe_id().to_string(), id);
    let bundles = client.fetch_jwt_bundles().await?;
    let validated = spiffe::JwtSvid::parse_and_validate(svid.token(), &bundles, &["my_audience"])?;
    assert_eq!(validated.spiffe_id().to_string(), id);
    // The wrong audience is refused by the independent validator too.
    assert!(
        spiffe::JwtSvid::parse_and_validate(svid.token(), &bundles, &["other_audience"]).is_err()
    );

    // ValidateJWTSVID on the node agent agrees, and reports the claims.
    let validated = client
        .validate_jwt_token("my_audience", svid.token())
        .await?;
    assert_eq!(validated.spiffe_id().to_string(), id);
    assert!(client
        .validate_jwt_token("other_audience", svid.token())
        .await
        .is_err());

    // JwtSource, the other client the spec names.
    let jwt_source = spiffe::JwtSource::builder()
        .endpoint(node.endpoint())
        .build()
        .await?;
    let from_source = jwt_source.fetch_jwt_svid(["my_audience"]).await?;
    spiffe::JwtSvid::parse_and_validate(
        from_source.token(),
        &*jwt_source.bundle_set()?,
        &["my_audience"],
    )?;
    jwt_source.shutdown().await;
    Ok(())
}

#[derive(Debug)]
struct HintPicker(&'static str);

impl spiffe::x509_source::SvidPicker for HintPicker {
    fn pick_svid(&self, svids: &[Arc<spiffe::X509Svid>]) -> Option<usize> {
        svids.iter().position(|s| s.hint() == Some(self.0))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spiffe_rustls_endpoints_complete_an_mtls_handshake() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let env = Env::new();
    let server = Server::start(&env)?;
    let node = Node::start(&env, &server, "n1")?;
    let tool = "spiffe://example.org/tool/calendar";
    let agent = "spiffe://example.org/agent/scheduler";
    for (id, hint) in [(tool, "tool"), (agent, "agent")] {
        server.register_own_uid(&node.spiffe_id, id, &["--hint", hint])?;
        node.wait_for_svid(id)?;
    }
    let tool_source = X509Source::builder()
        .endpoint(node.endpoint())
        .picker(HintPicker("tool"))
        .initial_sync_timeout(Duration::from_secs(20))
        .build()
        .await?;
    let agent_source = X509Source::builder()
        .endpoint(node.endpoint())
        .picker(HintPicker("agent"))
        .initial_sync_timeout(Duration::from_secs(20))
        .build()
        .await?;
    assert_eq!(tool_source.svid()?.spiffe_id().to_string(), tool);
    assert_eq!(agent_source.svid()?.spiffe_id().to_string(), agent);

    let server_cfg = spiffe_rustls::mtls_server(tool_source.clone())
        .authorize(spiffe_rustls::authorizer::exact([agent])?)
        .build()?;
    let client_cfg = spiffe_rustls::mtls_client(agent_source.clone())
        .authorize(spiffe_rustls::authorizer::exact([tool])?)
        .build()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
    let server_task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut tls = acceptor.accept(tcp).await?;
        let peer = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec());
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await?;
        tls.write_all(b"pong").await?;
        tls.shutdown().await?;
        anyhow::Ok((buf, peer))
    });
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_cfg));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("calendar.example.org")?;
    let mut tls = connector.connect(name, tcp).await?;
    tls.write_all(b"ping").await?;
    let mut reply = Vec::new();
    tls.read_to_end(&mut reply).await?;
    assert_eq!(reply, b"pong");
    let (got, peer) = server_task.await??;
    assert_eq!(&got, b"ping");
    let peer = peer.expect("client presented a certificate");
    assert_eq!(
        agentd::tls::spiffe_id_of(&peer),
        Some(SpiffeId::new(agent)?)
    );

    // The exact-ID authorizer really decides: a client expecting another ID refuses the tool.
    let wrong = spiffe_rustls::mtls_client(agent_source.clone())
        .authorize(spiffe_rustls::authorizer::exact([
            "spiffe://example.org/tool/other",
        ])?)
        .build()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(
        spiffe_rustls::mtls_server(tool_source.clone())
            .authorize(spiffe_rustls::authorizer::exact([agent])?)
            .build()?,
    ));
    tokio::spawn(async move {
        if let Ok((tcp, _)) = listener.accept().await {
            let _ = acceptor.accept(tcp).await;
        }
    });
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("calendar.example.org")?;
    assert!(tokio_rustls::TlsConnector::from(Arc::new(wrong))
        .connect(name, tcp)
        .await
        .is_err());
    tool_source.shutdown().await;
    agent_source.shutdown().await;
    Ok(())
}

#[test]
fn openssl_verify_accepts_what_api_fetch_x509_wrote() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let node = Node::start(&env, &server, "n1")?;
    let id = "spiffe://example.org/agent/files";
    server.register_own_uid(&node.spiffe_id, id, &["--dns-name", "files.example.org"])?;
    node.wait_for_svid(id)?;
    let out_dir = env.path().join("out");
    let sock = node.socket_arg();
    let out = agentd(&[
        "api",
        "fetch",
        "x509",
        "--socket-path",
        &sock,
        "--write",
        out_dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in ["svid.0.pem", "svid.0.key", "bundle.0.pem"] {
        assert!(out_dir.join(f).exists(), "{f} written");
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(out_dir.join("svid.0.key"))?
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "the key file is private");

    let verify = |purpose: &str| {
        agentd_e2e::openssl()
            .args(["verify", "-purpose", purpose, "-CAfile"])
            .arg(out_dir.join("bundle.0.pem"))
            .arg(out_dir.join("svid.0.pem"))
            .output()
            .expect("running openssl")
    };
    for purpose in ["sslclient", "sslserver"] {
        let v = verify(purpose);
        assert!(
            v.status.success(),
            "openssl verify -purpose {purpose}: {}{}",
            String::from_utf8_lossy(&v.stdout),
            String::from_utf8_lossy(&v.stderr)
        );
    }
    // The key matches the certificate.
    let pubkey = |args: &[&str], file: &str| {
        let o = agentd_e2e::openssl()
            .args(args)
            .arg(out_dir.join(file))
            .output()
            .unwrap();
        assert!(o.status.success());
        o.stdout
    };
    assert_eq!(
        pubkey(&["pkey", "-pubout", "-in"], "svid.0.key"),
        pubkey(&["x509", "-noout", "-pubkey", "-in"], "svid.0.pem")
    );
    // And a certificate from another CA is rejected against this bundle.
    let other = Env::new();
    let other_server = Server::start(&other)?;
    other_server.write_bundle(&other.path().join("other.pem"))?;
    let v = agentd_e2e::openssl()
        .args(["verify", "-CAfile"])
        .arg(other.path().join("other.pem"))
        .arg(out_dir.join("svid.0.pem"))
        .output()?;
    assert!(
        !v.status.success(),
        "a foreign bundle must not verify our SVID"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_security_header_is_invalid_argument() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let node = Node::start(&env, &server, "n1")?;
    let channel = agentd::net::unix_channel(&node.socket).await?;
    let mut client =
        agentd_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(channel);
    let err = client
        .fetch_x509svid(agentd_proto::workload::X509svidRequest {})
        .await
        .expect_err("no header: refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    let err = client
        .fetch_jwtsvid(agentd_proto::workload::JwtsvidRequest {
            audience: vec!["a".into()],
            spiffe_id: String::new(),
        })
        .await
        .expect_err("no header: refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    // A wrong value is as bad as none.
    let mut req = tonic::Request::new(agentd_proto::workload::X509BundlesRequest {});
    req.metadata_mut()
        .insert("workload.spiffe.io", "false".parse()?);
    let err = client
        .fetch_x509_bundles(req)
        .await
        .expect_err("wrong header value");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_with_no_entry_gets_permission_denied_no_identity_issued() -> anyhow::Result<()>
{
    let env = Env::new();
    let server = Server::start(&env)?;
    let node = Node::start(&env, &server, "n1")?;
    // An entry for somebody else only.
    server.create_entry(&[
        "--parent-id",
        &node.spiffe_id,
        "--spiffe-id",
        "spiffe://example.org/agent/other",
        "--selector",
        "unix:uid:4294967000",
    ])?;
    // Asked only once the node has the other entry (it minted its SVID), so "no identity"
    // is not just "not synced yet".
    agentd_e2e::wait_for_mint_in_log(&node, "spiffe://example.org/agent/other")?;
    let client = WorkloadApiClient::connect_to(node.endpoint()).await?;
    let err = client.fetch_x509_svid().await.expect_err("no identity");
    assert!(
        matches!(
            err,
            spiffe::workload_api::error::WorkloadApiError::NoIdentityIssued
        ),
        "{err:?}"
    );
    let err = client
        .fetch_jwt_svid(["aud"], None)
        .await
        .expect_err("no identity");
    assert!(
        matches!(
            err,
            spiffe::workload_api::error::WorkloadApiError::NoIdentityIssued
        ),
        "{err:?}"
    );
    // The CLI says so in one line and exits non-zero.
    let out = agentd(&["api", "fetch", "x509", "--socket-path", &node.socket_arg()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no identity issued"));
    // Bundles need no identity.
    assert!(client.fetch_x509_bundles().await.is_ok());
    Ok(())
}
