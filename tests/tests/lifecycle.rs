//! Restarts, join tokens, and the server going away: real processes, real sockets.

use std::time::Duration;

use agentd_e2e::{agentd, spawn_node, wait_until, Env, Node, Server};

fn fetch_json(node: &Node) -> Option<serde_json::Value> {
    let out = node.fetch_x509();
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

#[test]
fn server_restart_keeps_bundle_entries_nodes_and_tokens() -> anyhow::Result<()> {
    let env = Env::new();
    let mut server = Server::start(&env)?;
    let node = Node::start(&env, &server, "n1")?;
    let id = "spiffe://example.org/agent/persisted";
    let entry_id = server.register_own_uid(&node.spiffe_id, id, &[])?;
    let unused_token = server.join_token("spiffe://example.org/node/later")?;
    let bundle_before = server.cli_ok(&["bundle", "show", "--format", "spiffe"])?;
    node.wait_for_svid(id)?;

    server.restart()?;
    assert_eq!(
        server.cli_ok(&["bundle", "show", "--format", "spiffe"])?,
        bundle_before,
        "same trust bundle"
    );
    let entry: serde_json::Value = serde_json::from_str(
        &server.cli_ok(&["entry", "show", "--id", &entry_id, "--output", "json"])?,
    )?;
    assert_eq!(entry["spiffe_id"], id);
    let nodes: serde_json::Value =
        serde_json::from_str(&server.cli_ok(&["node", "list", "--output", "json"])?)?;
    assert_eq!(nodes[0]["spiffe_id"], node.spiffe_id.as_str());

    // The node agent keeps working against the restarted server: a new entry reaches it.
    let id2 = "spiffe://example.org/agent/after-restart";
    server.register_own_uid(&node.spiffe_id, id2, &[])?;
    node.wait_for_svid(id2)?;

    // A token created before the restart still attests a node.
    let mut later = Node {
        spiffe_id: "spiffe://example.org/node/later".into(),
        data_dir: env.path().join("later"),
        socket: env.path().join("later.sock"),
        bundle: node.bundle.clone(),
        server_address: server.address.clone(),
        daemon: spawn_node(
            &server.address,
            &node.bundle,
            &env.path().join("later"),
            &env.path().join("later.sock"),
            Some(&unused_token),
        )?,
    };
    later.wait_healthy()?;
    Ok(())
}

#[test]
fn node_restart_needs_no_new_token() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let mut node = Node::start(&env, &server, "n1")?;
    let id = "spiffe://example.org/agent/a";
    server.register_own_uid(&node.spiffe_id, id, &[])?;
    node.wait_for_svid(id)?;
    node.restart()?; // no --join-token
    node.wait_for_svid(id)?;
    assert!(node.daemon.log_text().contains("node identity ready"));
    // Still one node on the server, attested once.
    let nodes: serde_json::Value =
        serde_json::from_str(&server.cli_ok(&["node", "list", "--output", "json"])?)?;
    assert_eq!(nodes.as_array().map(Vec::len), Some(1));
    Ok(())
}

#[test]
fn a_used_join_token_is_refused() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let token = server.join_token("spiffe://example.org/node/n1")?;
    let bundle = env.path().join("bundle.pem");
    server.write_bundle(&bundle)?;
    let mut first = spawn_node(
        &server.address,
        &bundle,
        &env.path().join("a"),
        &env.path().join("a.sock"),
        Some(&token),
    )?;
    first.wait_node_healthy(&env.path().join("a.sock"))?;
    // A second node presenting the same token fails with one clear line.
    let mut second = spawn_node(
        &server.address,
        &bundle,
        &env.path().join("b"),
        &env.path().join("b.sock"),
        Some(&token),
    )?;
    let status = second.wait_exit(Duration::from_secs(20))?;
    assert!(!status.success());
    let log = second.log_text();
    assert!(
        log.contains("join token not found or already used"),
        "{log}"
    );
    assert!(first.is_running());
    Ok(())
}

#[test]
fn an_expired_join_token_is_refused() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let token = server
        .cli_ok(&[
            "token",
            "generate",
            "--spiffe-id",
            "spiffe://example.org/node/n1",
            "--ttl",
            "1s",
        ])?
        .trim()
        .to_string();
    std::thread::sleep(Duration::from_millis(2100));
    let bundle = env.path().join("bundle.pem");
    server.write_bundle(&bundle)?;
    let mut node = spawn_node(
        &server.address,
        &bundle,
        &env.path().join("a"),
        &env.path().join("a.sock"),
        Some(&token),
    )?;
    let status = node.wait_exit(Duration::from_secs(20))?;
    assert!(!status.success());
    assert!(
        node.log_text().contains("join token expired"),
        "{}",
        node.log_text()
    );
    Ok(())
}

#[test]
fn an_evicted_node_is_refused_until_it_attests_again() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let node = Node::start(&env, &server, "n1")?;
    server.cli_ok(&["node", "evict", "--spiffe-id", &node.spiffe_id])?;
    let log_has_refusal = wait_until(Duration::from_secs(10), || {
        node.daemon.log_text().contains("is not attested")
    });
    assert!(log_has_refusal, "{}", node.daemon.log_text());

    // The same SPIFFE ID attested again by another machine: the evicted node's old SVID
    // stays refused, because it is not the node's current SVID.
    let token = server.join_token(&node.spiffe_id)?;
    let mut replacement = spawn_node(
        &server.address,
        &node.bundle,
        &env.path().join("replacement"),
        &env.path().join("replacement.sock"),
        Some(&token),
    )?;
    replacement.wait_node_healthy(&env.path().join("replacement.sock"))?;
    let stale = wait_until(Duration::from_secs(10), || {
        node.daemon
            .log_text()
            .contains("is not the node's current SVID")
    });
    assert!(stale, "{}", node.daemon.log_text());
    assert!(replacement.is_running());
    Ok(())
}

#[test]
fn server_down_then_up_cached_svids_keep_being_served_and_the_node_reconnects() -> anyhow::Result<()>
{
    let env = Env::new();
    let mut server = Server::start(&env)?;
    let node = Node::start(&env, &server, "n1")?;
    let id = "spiffe://example.org/agent/steady";
    server.register_own_uid(&node.spiffe_id, id, &[])?;
    node.wait_for_svid(id)?;
    let serial = fetch_json(&node).unwrap()["svids"][0]["serial"].clone();

    server.stop();
    std::thread::sleep(Duration::from_secs(3));
    // The server is gone; the workload still gets the same cached SVID.
    let v = fetch_json(&node).expect("served from cache while the server is down");
    assert_eq!(v["svids"][0]["serial"], serial);
    let health = agentd(&["healthcheck", "--socket-path", &node.socket_arg()]);
    assert!(
        health.status.success(),
        "serving from cache counts as healthy"
    );

    server.restart()?;
    // The node reconnects (with backoff) and picks up new work.
    let id2 = "spiffe://example.org/agent/new";
    server.register_own_uid(&node.spiffe_id, id2, &[])?;
    node.wait_for_svid(id2)?;
    Ok(())
}

#[test]
fn entry_changes_reach_the_workload_and_deletion_withdraws_the_svid() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let node = Node::start(&env, &server, "n1")?;
    let id = "spiffe://example.org/agent/changing";
    let entry = server.register_own_uid(&node.spiffe_id, id, &[])?;
    node.wait_for_svid(id)?;
    server.cli_ok(&["entry", "update", "--id", &entry, "--hint", "primary"])?;
    assert!(wait_until(Duration::from_secs(15), || {
        fetch_json(&node).is_some_and(|v| v["svids"][0]["hint"] == "primary")
    }));
    server.cli_ok(&["entry", "delete", "--id", &entry])?;
    assert!(wait_until(Duration::from_secs(15), || {
        let out = agentd(&["api", "fetch", "x509", "--socket-path", &node.socket_arg()]);
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no identity issued")
    }));
    Ok(())
}

#[test]
fn insecure_bootstrap_attests_and_then_verifies_the_server() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let token = server.join_token("spiffe://example.org/node/trial")?;
    let data_dir = env.path().join("trial");
    let socket = env.path().join("trial.sock");
    let mut node = agentd_e2e::Daemon::spawn_args(
        &[
            "node",
            "run",
            "--server-address",
            &server.address,
            "--insecure-bootstrap",
            "--join-token",
            &token,
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--socket-path",
            socket.to_str().unwrap(),
            "--sync-interval",
            "1s",
        ],
        env.path().join("trial.log"),
    )?;
    node.wait_node_healthy(&socket)?;
    assert!(
        node.log_text().contains("insecure bootstrap"),
        "the trial mode is announced"
    );
    assert!(node.is_running());
    Ok(())
}

#[test]
fn a_node_refuses_a_server_its_trust_bundle_does_not_vouch_for() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let other_env = Env::new();
    let other = Server::start(&other_env)?;
    // The bundle of another server (same trust domain name, other CA).
    let wrong_bundle = env.path().join("wrong.pem");
    other.write_bundle(&wrong_bundle)?;
    let token = server.join_token("spiffe://example.org/node/n1")?;
    let mut node = spawn_node(
        &server.address,
        &wrong_bundle,
        &env.path().join("n1"),
        &env.path().join("n1.sock"),
        Some(&token),
    )?;
    let status = node.wait_exit(Duration::from_secs(30))?;
    assert!(!status.success());
    let log = node.log_text();
    assert!(log.contains("server certificate"), "{log}");
    // The token was never presented to a server it could not verify, so it still works.
    let mut good = spawn_node(
        &server.address,
        &node_bundle(&env, &server)?,
        &env.path().join("n2"),
        &env.path().join("n2.sock"),
        Some(&token),
    )?;
    good.wait_node_healthy(&env.path().join("n2.sock"))?;
    Ok(())
}

fn node_bundle(env: &Env, server: &Server) -> anyhow::Result<std::path::PathBuf> {
    let p = env.path().join("good.pem");
    server.write_bundle(&p)?;
    Ok(p)
}

#[test]
fn upstream_ca_chain_is_served_and_verifies_against_the_upstream_root() -> anyhow::Result<()> {
    let env = Env::new();
    let up_key = env.path().join("upstream.key");
    let up_cert = env.path().join("upstream.pem");
    let gen = agentd_e2e::openssl()
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/O=Example/CN=Upstream Root",
        ])
        .args([
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ])
        .arg("-keyout")
        .arg(&up_key)
        .arg("-out")
        .arg(&up_cert)
        .output()?;
    anyhow::ensure!(
        gen.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&gen.stderr)
    );
    let cfg = env.path().join("server.toml");
    std::fs::write(
        &cfg,
        format!(
            "[upstream_ca]\ncert_file = {:?}\nkey_file = {:?}\n",
            up_cert, up_key
        ),
    )?;
    let server = Server::start_with(&env, &["--config", cfg.to_str().unwrap()])?;

    // The node trusts only the upstream root, which carries no SPIFFE ID: the trust domain
    // comes from its config file.
    let node_cfg = env.path().join("node.toml");
    std::fs::write(&node_cfg, "trust_domain = \"example.org\"\n")?;
    let token = server.join_token("spiffe://example.org/node/up")?;
    let socket = env.path().join("up.sock");
    let mut node = agentd_e2e::Daemon::spawn_args(
        &[
            "node",
            "run",
            "--config",
            node_cfg.to_str().unwrap(),
            "--server-address",
            &server.address,
            "--trust-bundle",
            up_cert.to_str().unwrap(),
            "--join-token",
            &token,
            "--data-dir",
            env.path().join("up").to_str().unwrap(),
            "--socket-path",
            socket.to_str().unwrap(),
            "--sync-interval",
            "1s",
        ],
        env.path().join("up.log"),
    )?;
    node.wait_node_healthy(&socket)?;
    let sock = socket.display().to_string();
    server.register_own_uid(
        "spiffe://example.org/node/up",
        "spiffe://example.org/agent/up",
        &[],
    )?;
    let out_dir = env.path().join("out");
    assert!(wait_until(Duration::from_secs(20), || {
        agentd(&[
            "api",
            "fetch",
            "x509",
            "--socket-path",
            &sock,
            "--write",
            out_dir.to_str().unwrap(),
        ])
        .status
        .success()
    }));
    // svid.0.pem holds the leaf and the intermediate; the bundle is the upstream root.
    let chain = std::fs::read_to_string(out_dir.join("svid.0.pem"))?;
    assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 2);
    let v = agentd_e2e::openssl()
        .args(["verify", "-CAfile"])
        .arg(&up_cert)
        .arg("-untrusted")
        .arg(out_dir.join("svid.0.pem"))
        .arg(out_dir.join("svid.0.pem"))
        .output()?;
    assert!(
        v.status.success(),
        "{}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    assert!(node.is_running());
    Ok(())
}

#[test]
fn the_node_svid_renews_at_half_life_and_the_node_keeps_working() -> anyhow::Result<()> {
    let env = Env::new();
    let cfg = env.path().join("server.toml");
    std::fs::write(&cfg, "node_svid_ttl = \"4s\"\n")?;
    let server = Server::start_with(&env, &["--config", cfg.to_str().unwrap()])?;
    let node = Node::start(&env, &server, "n1")?;
    let serial = |server: &Server| -> anyhow::Result<serde_json::Value> {
        let v: serde_json::Value = serde_json::from_str(&server.cli_ok(&[
            "node",
            "show",
            "--spiffe-id",
            "spiffe://example.org/node/n1",
            "--output",
            "json",
        ])?)?;
        Ok(v["serial"].clone())
    };
    let first = serial(&server)?;
    let mut seen = vec![first.clone()];
    // Several lifetimes: each renewal must leave the node able to call the server.
    assert!(
        wait_until(Duration::from_secs(20), || {
            if let Ok(s) = serial(&server) {
                if !seen.contains(&s) {
                    seen.push(s);
                }
            }
            seen.len() >= 3
        }),
        "renewals seen: {seen:?}\n{}",
        node.daemon.log_text()
    );
    let id = "spiffe://example.org/agent/after-renewals";
    server.register_own_uid(&node.spiffe_id, id, &[])?;
    node.wait_for_svid(id)?;
    assert!(
        !node
            .daemon
            .log_text()
            .contains("not the node's current SVID"),
        "{}",
        node.daemon.log_text()
    );
    Ok(())
}
