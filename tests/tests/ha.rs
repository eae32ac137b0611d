//! Two servers of one trust domain on one PostgreSQL database, and a node agent given both
//! addresses: each server has its own CA, both publish the same bundle (the union of their
//! authorities), an entry made through either reaches the node, and when the server the node
//! is connected to is killed (SIGKILL) the node fails over: entries and revocations made on
//! the other still reach its workloads, renewals go on, and the killed server, restarted,
//! sees everything done meanwhile. A rotation on one server shows in the other's bundle. The
//! shared audit log verifies and says which server did what.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use agentd_e2e::pg::Database;
use agentd_e2e::{wait_until, Env, Node, Server};

/// The X.509 authorities (PEM blocks) a server's bundle holds.
fn x509_authorities(server: &Server) -> anyhow::Result<BTreeSet<String>> {
    let pem = server.cli_ok(&["bundle", "show", "--format", "pem"])?;
    Ok(pem
        .split("-----END CERTIFICATE-----")
        .map(str::trim)
        .filter(|b| !b.is_empty())
        .map(str::to_string)
        .collect())
}

fn jwt_key_ids(server: &Server) -> anyhow::Result<BTreeSet<String>> {
    let doc: serde_json::Value =
        serde_json::from_str(&server.cli_ok(&["bundle", "show", "--format", "spiffe"])?)?;
    Ok(doc["keys"]
        .as_array()
        .map(|keys| {
            keys.iter()
                .filter(|k| k["use"] == "jwt-svid")
                .filter_map(|k| k["kid"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

/// The serial of the SVID for `spiffe_id` the node's workload gets now, if any.
fn serial_served(node: &Node, spiffe_id: &str) -> Option<String> {
    let out = node.fetch_x509();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["svids"]
        .as_array()?
        .iter()
        .find(|s| s["spiffe_id"] == spiffe_id)
        .and_then(|s| s["serial"].as_str().map(str::to_string))
}

/// The server address the node agent connected to last (its "connected" log lines).
fn connected_to(node: &Node) -> Option<String> {
    node.daemon.log_text().lines().rev().find_map(|line| {
        if !(line.contains("connected to the server")
            || line.contains("server unreachable; connected to another"))
        {
            return None;
        }
        let key = if line.contains("connected to another") {
            "to="
        } else {
            "server="
        };
        let at = line.find(key)? + key.len();
        Some(
            line[at..]
                .trim_start_matches('"')
                .split(|c: char| c.is_whitespace() || c == '"')
                .next()?
                .to_string(),
        )
    })
}

#[test]
fn two_servers_on_one_database_serve_one_node_that_fails_over() -> anyhow::Result<()> {
    let db = Database::create()?;
    let env = Env::new();
    let pg = ["--datastore", db.url.as_str()];
    let a = Server::start_named(&env, "a", &pg)?;
    // The second server shares the log, so it shares the log's audit key (docs/ha.md); its
    // CA is its own.
    let b_dir = env.path().join("b");
    std::fs::create_dir(&b_dir)?;
    std::fs::copy(a.data_dir.join("audit.key"), b_dir.join("audit.key"))?;
    let b = Server::start_named(&env, "b", &pg)?;

    // Both publish the same bundle: both CAs, both JWT keys.
    let same = wait_until(Duration::from_secs(10), || {
        match (x509_authorities(&a), x509_authorities(&b)) {
            (Ok(x), Ok(y)) => x == y && x.len() == 2,
            _ => false,
        }
    });
    assert!(
        same,
        "the servers' bundles differ: {:?} vs {:?}",
        x509_authorities(&a)?,
        x509_authorities(&b)?
    );
    let jwt = jwt_key_ids(&a)?;
    assert_eq!(jwt.len(), 2, "{jwt:?}");
    assert_eq!(jwt, jwt_key_ids(&b)?);
    // A rotation on one server shows in the other's bundle: a prepared authority of A (a
    // new CA and JWT key) is in B's bundle within moments.
    a.cli_ok(&["authority", "prepare"])?;
    let rotated = wait_until(Duration::from_secs(10), || {
        x509_authorities(&b).is_ok_and(|x| x.len() == 3)
            && jwt_key_ids(&b).is_ok_and(|j| j.len() == 3)
    });
    assert!(rotated, "A's prepared authority never reached B's bundle");
    assert_eq!(x509_authorities(&a)?, x509_authorities(&b)?);

    // A node agent knowing both; its periodic sync an hour away, so what reaches it comes by
    // the servers' pushed notices.
    let token = b.join_token("spiffe://example.org/node/ha")?;
    let addresses = format!("{},{}", a.address, b.address);
    let mut node = Node::start_at(
        &env,
        "ha",
        &addresses,
        &a,
        &token,
        &["--sync-interval", "1h"],
    )?;
    let via_a = "spiffe://example.org/ha/via-a";
    let via_b = "spiffe://example.org/ha/via-b";
    let doomed_id = a.register_own_uid(&node.spiffe_id, via_a, &["--x509-svid-ttl", "10s"])?;
    b.register_own_uid(&node.spiffe_id, via_b, &[])?;
    node.wait_for_svid(via_a)?;
    node.wait_for_svid(via_b)?;

    // Kill the server the node is connected to; the other carries on.
    let on = connected_to(&node).ok_or_else(|| {
        anyhow::anyhow!(
            "the node agent's log names no server:\n{}",
            node.daemon.log_text()
        )
    })?;
    let (mut killed, live) = if on == a.address {
        (a, b)
    } else {
        assert_eq!(on, b.address, "connected to neither server");
        (b, a)
    };
    let renewed_from = serial_served(&node, via_a);
    assert!(
        renewed_from.is_some(),
        "no SVID for {via_a} before the kill"
    );
    killed.kill();

    // An entry made on the live server reaches the node's workload.
    let after = "spiffe://example.org/ha/after";
    live.register_own_uid(&node.spiffe_id, after, &[])?;
    node.wait_for_svid(after)?;
    let log = node.daemon.log_text();
    assert!(
        log.contains("server unreachable; connected to another"),
        "the node agent's log says nothing of the failover:\n{log}"
    );
    // Renewals go on: the 10 s SVID gets a new serial from the live server.
    let renewed = wait_until(Duration::from_secs(20), || {
        let now = serial_served(&node, via_a);
        now.is_some() && now != renewed_from
    });
    assert!(
        renewed,
        "the short-lived SVID was not renewed after the failover:\n{}",
        node.daemon.log_text()
    );

    // A revocation made on the live server is in force at the workload within 2 s.
    node.wait_healthy()?;
    let started = Instant::now();
    live.cli_ok(&["revoke", "entry", "--id", &doomed_id, "--reason", "ha test"])?;
    let gone = wait_until(Duration::from_secs(10), || {
        !String::from_utf8_lossy(&node.fetch_x509().stdout).contains(via_a)
    });
    let took = started.elapsed();
    assert!(
        gone,
        "the revoked SVID is still served:\n{}",
        node.daemon.log_text()
    );
    assert!(
        took <= Duration::from_secs(2),
        "the revocation took {took:?} to reach the workload"
    );

    // The killed server, back, sees everything done while it was down.
    killed.restart()?;
    let entries = killed.cli_ok(&["entry", "show", "--output", "json"])?;
    assert!(entries.contains(after), "{entries}");
    let revocations = killed.cli_ok(&["revoke", "list", "--output", "json"])?;
    assert!(revocations.contains(&doomed_id), "{revocations}");

    // One shared audit log: it verifies through either server and records both.
    for server in [&killed, &live] {
        let out = server.cli(&["audit", "verify"]);
        assert!(
            out.status.success(),
            "audit verify: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let records: serde_json::Value =
        serde_json::from_str(&live.cli_ok(&["audit", "show", "--output", "json"])?)?;
    let writers: BTreeSet<&str> = records
        .as_array()
        .map(|all| {
            all.iter()
                .filter_map(|r| r["fields"]["server"].as_str())
                .collect()
        })
        .unwrap_or_default();
    let ids: BTreeSet<String> = [&killed, &live]
        .iter()
        .map(|s| {
            std::fs::read_to_string(s.data_dir.join("server.id")).map(|t| t.trim().to_string())
        })
        .collect::<Result<_, _>>()?;
    assert_eq!(
        writers,
        ids.iter().map(String::as_str).collect::<BTreeSet<_>>(),
        "the audit records should name both servers"
    );
    Ok(())
}

/// A server that still accepts connections but has lost its database fails every call; a
/// node agent on it moves to the next address (the other server, whose database answers)
/// and gets what is made there.
#[test]
fn a_node_agent_leaves_a_server_whose_database_is_gone() -> anyhow::Result<()> {
    let db = Database::create()?;
    let relay = agentd_e2e::pg::Relay::start()?;
    let env = Env::new();
    // A reaches the database through the relay; B directly.
    let a = Server::start_named(&env, "a", &["--datastore", &relay.url_for(&db.url)])?;
    let b_dir = env.path().join("b");
    std::fs::create_dir(&b_dir)?;
    std::fs::copy(a.data_dir.join("audit.key"), b_dir.join("audit.key"))?;
    let mut b = Server::start_named(&env, "b", &["--datastore", &db.url])?;
    let both = wait_until(Duration::from_secs(10), || {
        x509_authorities(&a).is_ok_and(|x| x.len() == 2)
            && x509_authorities(&b).is_ok_and(|x| x.len() == 2)
    });
    assert!(both, "the two servers' bundles never held both CAs");
    // B down while the node agent starts, so that it is on A.
    b.stop();
    let token = a.join_token("spiffe://example.org/node/left")?;
    let addresses = format!("{},{}", a.address, b.address);
    let node = Node::start_at(&env, "left", &addresses, &a, &token, &[])?;
    let before = "spiffe://example.org/left/before";
    a.register_own_uid(&node.spiffe_id, before, &[])?;
    node.wait_for_svid(before)?;
    b.restart()?;

    // A loses its database (it keeps answering connections, and fails every call).
    relay.cut();
    let after = "spiffe://example.org/left/after";
    b.register_own_uid(&node.spiffe_id, after, &[])?;
    if let Err(e) = node.wait_for_svid(after) {
        anyhow::bail!("{e}\nserver A's log:\n{}", a.daemon.log_text());
    }
    let log = node.daemon.log_text();
    assert!(
        log.contains("the server failed a call; trying the next server address"),
        "the node agent's log says nothing of leaving A:\n{log}"
    );
    // It kept serving meanwhile.
    assert!(String::from_utf8_lossy(&node.fetch_x509().stdout).contains(before));
    Ok(())
}
