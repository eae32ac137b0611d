//! Node attestation with x509pop and platform claims: a real server configured for each
//! attestor, real node agents attesting with certificate files or a token file, and SVIDs
//! served for entries parented to the node ID the server derived.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use agentd_e2e::{agentd, wait_until, Daemon, Env, Node, Server};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::json;

struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn make_ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = p.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        issuer: Issuer::new(p, key),
    }
}

/// Writes `<name>.pem` and `<name>.key` for a node certificate with CN `cn`.
fn write_node_cert(dir: &Path, name: &str, ca: &Ca, cn: &str) -> (PathBuf, PathBuf) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(vec![format!("{cn}.nodes.example")]).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = p.signed_by(&key, &ca.issuer).unwrap();
    let (c, k) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

/// Starts a node agent with extra attestor flags; returns it without waiting.
fn launch_node(env: &Env, server: &Server, name: &str, spiffe_id: &str, extra: &[&str]) -> Node {
    let bundle = env.path().join(format!("{name}-bundle.pem"));
    server.write_bundle(&bundle).unwrap();
    let data_dir = env.path().join(name);
    let socket = env.path().join(format!("{name}.sock"));
    let (d, s, b) = (
        data_dir.display().to_string(),
        socket.display().to_string(),
        bundle.display().to_string(),
    );
    let mut args = vec![
        "node",
        "run",
        "--server-address",
        &server.address,
        "--trust-bundle",
        &b,
        "--data-dir",
        &d,
        "--socket-path",
        &s,
        "--sync-interval",
        "1s",
    ];
    args.extend_from_slice(extra);
    let daemon = Daemon::spawn_args(&args, data_dir.with_extension("log")).unwrap();
    Node {
        spiffe_id: spiffe_id.to_string(),
        data_dir,
        socket,
        bundle,
        server_address: server.address.clone(),
        daemon,
    }
}

fn node_json(server: &Server, id: &str) -> serde_json::Value {
    serde_json::from_str(
        &server
            .cli_ok(&["node", "show", "--spiffe-id", id, "--output", "json"])
            .unwrap(),
    )
    .unwrap()
}

fn has_selector(node: &serde_json::Value, selector: &str) -> bool {
    node["selectors"]
        .as_array()
        .is_some_and(|a| a.iter().any(|s| s == selector))
}

/// The node agent must exit with an attestation error naming `reason`; the server logs the
/// refusal.
fn assert_refused(node: &mut Node, server: &Server, reason: &str) {
    let status = node.daemon.wait_exit(Duration::from_secs(20)).unwrap();
    assert!(!status.success());
    let log = node.daemon.log_text();
    assert!(log.contains(reason), "node log lacks {reason:?}:\n{log}");
    let server_log = server.daemon.log_text();
    assert!(
        server_log.contains("node attestation refused") && server_log.contains(reason),
        "server log lacks the refusal:\n{server_log}"
    );
}

#[test]
fn x509pop_node_attests_and_serves_svids() -> anyhow::Result<()> {
    let env = Env::new();
    let ca = make_ca("Node CA");
    let ca_file = env.path().join("node-ca.pem");
    std::fs::write(&ca_file, &ca.pem)?;
    let config = env.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "[node_attestors.x509pop]\nca_bundle = \"{}\"\nspiffe_id_template = \"spiffe://{{trust_domain}}/node/x509pop/{{common_name}}\"\n",
            ca_file.display()
        ),
    )?;
    let server = Server::start_with(&env, &["--config", &config.display().to_string()])?;

    let (cert, key) = write_node_cert(env.path(), "host1", &ca, "host-1");
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let node_id = "spiffe://example.org/node/x509pop/host-1";
    let flags = [
        "--x509pop-cert",
        cert.as_str(),
        "--x509pop-key",
        key.as_str(),
    ];
    let mut node = launch_node(&env, &server, "n1", node_id, &flags);
    node.wait_healthy()?;

    let workload_id = "spiffe://example.org/agent/on-x509pop-node";
    server.register_own_uid(node_id, workload_id, &[])?;
    node.wait_for_svid(workload_id)?;

    let shown = node_json(&server, node_id);
    assert_eq!(shown["attestation_type"], "x509pop");
    assert!(has_selector(&shown, "x509pop:subject:cn:host-1"), "{shown}");
    assert!(has_selector(&shown, "x509pop:issuer:cn:Node CA"), "{shown}");
    assert!(
        has_selector(&shown, "x509pop:san:dns:host-1.nodes.example"),
        "{shown}"
    );
    let text = server.cli_ok(&["node", "show", "--spiffe-id", node_id])?;
    assert!(text.contains("x509pop:subject:cn:host-1"), "{text}");

    // A node-set alias: every node whose certificate was issued by "Node CA". A workload
    // entry parented to the alias reaches this node without naming it.
    server.create_entry(&[
        "--parent-id",
        "spiffe://example.org/agentd/server",
        "--spiffe-id",
        "spiffe://example.org/nodes/node-ca",
        "--selector",
        "x509pop:issuer:cn:Node CA",
    ])?;
    let fleet_workload = "spiffe://example.org/agent/fleet-wide";
    server.register_own_uid("spiffe://example.org/nodes/node-ca", fleet_workload, &[])?;
    node.wait_for_svid(fleet_workload)?;

    // Re-attestation of the same machine (identity lost): same ID, new serial, one record.
    let first_serial = shown["serial"].clone();
    node.daemon.stop();
    std::fs::remove_dir_all(&node.data_dir)?;
    let mut again = launch_node(&env, &server, "n1", node_id, &flags);
    again.wait_healthy()?;
    again.wait_for_svid(workload_id)?;
    let shown = node_json(&server, node_id);
    assert_ne!(shown["serial"], first_serial, "a new node SVID");
    let nodes: serde_json::Value =
        serde_json::from_str(&server.cli_ok(&["node", "list", "--output", "json"])?)?;
    assert_eq!(nodes.as_array().map(Vec::len), Some(1));

    // A certificate from another CA is refused (expired certificates: unit tests).
    let other = make_ca("Other CA");
    let (cert, key) = write_node_cert(env.path(), "rogue", &other, "rogue");
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let mut rogue = launch_node(
        &env,
        &server,
        "rogue",
        "spiffe://example.org/node/x509pop/rogue",
        &["--x509pop-cert", &cert, "--x509pop-key", &key],
    );
    assert_refused(
        &mut rogue,
        &server,
        "does not chain to the x509pop CA bundle",
    );

    // A key that does not belong to the certificate cannot sign the challenge.
    let (cert, _) = write_node_cert(env.path(), "host2", &ca, "host-2");
    let (_, wrong_key) = write_node_cert(env.path(), "host3", &ca, "host-3");
    let (cert, wrong_key) = (cert.display().to_string(), wrong_key.display().to_string());
    let mut thief = launch_node(
        &env,
        &server,
        "thief",
        "spiffe://example.org/node/x509pop/host-2",
        &["--x509pop-cert", &cert, "--x509pop-key", &wrong_key],
    );
    assert_refused(
        &mut thief,
        &server,
        "signature over the challenge does not verify",
    );
    Ok(())
}

struct JwtKey {
    pair: EcdsaKeyPair,
}

impl JwtKey {
    fn new() -> Self {
        let rng = SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        Self {
            pair: EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, doc.as_ref(), &rng)
                .unwrap(),
        }
    }

    fn jwks(&self, kid: &str) -> String {
        let p = self.pair.public_key().as_ref();
        json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig",
            "x": URL_SAFE_NO_PAD.encode(&p[1..33]), "y": URL_SAFE_NO_PAD.encode(&p[33..65])}]})
        .to_string()
    }

    fn sign(&self, kid: &str, claims: &serde_json::Value) -> String {
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(json!({"alg": "ES256", "kid": kid, "typ": "JWT"}).to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = self
            .pair
            .sign(&SystemRandom::new(), input.as_bytes())
            .unwrap();
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn claims_node_attests_and_serves_svids() -> anyhow::Result<()> {
    let env = Env::new();
    let key = JwtKey::new();
    let jwks = env.path().join("jwks.json");
    std::fs::write(&jwks, key.jwks("k1"))?;
    let issuer = "https://token.actions.example";
    let config = env.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "[node_attestors.claims]\njwks_file = \"{}\"\nissuer = \"{issuer}\"\naudience = \"agentd\"\nselector_claims = [\"sub\", \"repository\"]\n",
            jwks.display()
        ),
    )?;
    let server = Server::start_with(&env, &["--config", &config.display().to_string()])?;

    let claims = json!({
        "iss": issuer, "aud": "agentd", "sub": "runner-7", "repository": "acme/agents",
        "exp": unix_now() + 600, "iat": unix_now(),
    });
    let token_file = env.path().join("token.jwt");
    std::fs::write(&token_file, key.sign("k1", &claims))?;
    let token_arg = token_file.display().to_string();
    let node_id = "spiffe://example.org/node/claims/runner-7";
    let mut node = launch_node(
        &env,
        &server,
        "n1",
        node_id,
        &["--claims-token-file", &token_arg],
    );
    node.wait_healthy()?;
    let workload_id = "spiffe://example.org/agent/on-claims-node";
    server.register_own_uid(node_id, workload_id, &[])?;
    node.wait_for_svid(workload_id)?;
    let shown = node_json(&server, node_id);
    assert_eq!(shown["attestation_type"], "claims");
    assert!(has_selector(&shown, "claims:sub:runner-7"), "{shown}");
    assert!(
        has_selector(&shown, "claims:repository:acme/agents"),
        "{shown}"
    );

    // A token for another audience is refused with the reason.
    let mut wrong = claims.clone();
    wrong["aud"] = json!("someone-else");
    let wrong_file = env.path().join("wrong.jwt");
    std::fs::write(&wrong_file, key.sign("k1", &wrong))?;
    let wrong_arg = wrong_file.display().to_string();
    let mut other = launch_node(
        &env,
        &server,
        "n2",
        node_id,
        &["--claims-token-file", &wrong_arg],
    );
    assert_refused(&mut other, &server, "is not among the token's audiences");
    // The first node keeps serving.
    assert!(wait_until(Duration::from_secs(5), || agentd(&[
        "healthcheck",
        "--socket-path",
        &node.socket_arg()
    ])
    .status
    .success()));
    Ok(())
}
