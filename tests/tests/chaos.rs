//! Bounded chaos on one PostgreSQL database: three servers, two node agents given all three
//! addresses, a writer creating and revoking entries through whichever server it picks, and
//! servers killed (SIGKILL) and restarted at random meanwhile. Afterwards nothing the CLI
//! reported as done is missing, the revocation log has no gap, every node agent has applied
//! every revocation, and the shared audit log verifies.
//!
//! `AGENTD_CHAOS_ROUNDS` (default 4) sets how many kill-and-restart rounds run; `make bench`
//! territory starts well above that.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentd_e2e::pg::Database;
use agentd_e2e::{agentd, current_uid, wait_until, Env, Node, Server};

/// What the writer was told was done.
#[derive(Debug, Default)]
struct Done {
    entries: Vec<String>,
    revoked: Vec<String>,
    failed_calls: usize,
}

fn admin(socket: &std::path::Path, args: &[&str]) -> Option<String> {
    let sock = socket.display().to_string();
    let mut all = args.to_vec();
    all.extend(["--admin-socket", &sock]);
    let out = agentd(&all);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Sequences of the events a node agent has applied.
fn applied(node: &Node) -> BTreeSet<u64> {
    let out = agentd(&[
        "api",
        "revocations",
        "--socket-path",
        &node.socket_arg(),
        "--output",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["events"]
        .as_array()
        .map(|e| e.iter().filter_map(|e| e["sequence"].as_u64()).collect())
        .unwrap_or_default()
}

#[test]
fn servers_killed_at_random_lose_nothing_that_was_reported_done() -> anyhow::Result<()> {
    let rounds: usize = std::env::var("AGENTD_CHAOS_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let db = Database::create()?;
    let env = Env::new();
    let pg = ["--datastore", db.url.as_str()];
    let first = Server::start_named(&env, "s0", &pg)?;
    let mut servers = vec![first];
    for name in ["s1", "s2"] {
        let dir = env.path().join(name);
        std::fs::create_dir(&dir)?;
        std::fs::copy(servers[0].data_dir.join("audit.key"), dir.join("audit.key"))?;
        servers.push(Server::start_named(&env, name, &pg)?);
    }
    // Every server's CA in every bundle before any node agent starts.
    let bundles_agree = wait_until(Duration::from_secs(15), || {
        let pems: Vec<Option<String>> = servers
            .iter()
            .map(|s| s.cli_ok(&["bundle", "show", "--format", "pem"]).ok())
            .collect();
        pems.iter()
            .all(|p| p.as_deref().map(|p| p.matches("BEGIN CERTIFICATE").count()) == Some(3))
    });
    assert!(
        bundles_agree,
        "the three servers' bundles never held all three CAs"
    );

    let addresses = servers
        .iter()
        .map(|s| s.address.clone())
        .collect::<Vec<_>>()
        .join(",");
    let mut nodes = Vec::new();
    for name in ["c1", "c2"] {
        let token =
            servers[nodes.len()].join_token(&format!("spiffe://example.org/node/{name}"))?;
        // The periodic sync an hour away: what reaches the node comes by pushed notices,
        // whichever server it ended up on.
        let node = Node::start_at(
            &env,
            name,
            &addresses,
            &servers[0],
            &token,
            &["--sync-interval", "1h"],
        )?;
        nodes.push(node);
    }

    // The writer: entries for both nodes (so they mint), and revocations of earlier ones,
    // each through a server picked at random.
    let sockets: Vec<PathBuf> = servers.iter().map(|s| s.admin_socket.clone()).collect();
    let parents: Vec<String> = nodes.iter().map(|n| n.spiffe_id.clone()).collect();
    let done = Arc::new(Mutex::new(Done::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (done, stop) = (done.clone(), stop.clone());
        std::thread::spawn(move || {
            let selector = format!("unix:uid:{}", current_uid());
            let mut n = 0usize;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let socket = &sockets[rand::random_range(0..sockets.len())];
                let parent = &parents[n % parents.len()];
                let path = format!("spiffe://example.org/chaos/w{n}");
                let revoke_one = n.is_multiple_of(3);
                let target = if revoke_one {
                    let d = done.lock().unwrap();
                    let live: Vec<&String> = d
                        .entries
                        .iter()
                        .filter(|e| !d.revoked.contains(e))
                        .collect();
                    (!live.is_empty()).then(|| live[rand::random_range(0..live.len())].clone())
                } else {
                    None
                };
                let result = match &target {
                    Some(id) => admin(
                        socket,
                        &["revoke", "entry", "--id", id, "--reason", "chaos"],
                    )
                    .map(|_| ()),
                    None => admin(
                        socket,
                        &[
                            "entry",
                            "create",
                            "--parent-id",
                            parent,
                            "--spiffe-id",
                            &path,
                            "--selector",
                            &selector,
                        ],
                    )
                    .map(|id| done.lock().unwrap().entries.push(id)),
                };
                let mut d = done.lock().unwrap();
                match (result, target) {
                    (Some(()), Some(id)) => d.revoked.push(id),
                    (Some(()), None) => {}
                    (None, _) => d.failed_calls += 1,
                }
            }
        })
    };

    // Kill a server at random, let the others carry on, bring it back; again.
    for _ in 0..rounds {
        std::thread::sleep(Duration::from_millis(1500));
        let victim = rand::random_range(0..servers.len());
        servers[victim].kill();
        std::thread::sleep(Duration::from_millis(1500));
        servers[victim].restart()?;
    }
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::SeqCst);
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("the writer thread panicked"))?;
    let done = done.lock().unwrap();
    assert!(
        done.entries.len() >= 5 && !done.revoked.is_empty(),
        "too little was written to tell anything: {done:?}"
    );

    // Nothing reported done is missing, on any server.
    for server in &servers {
        let listed: serde_json::Value =
            serde_json::from_str(&server.cli_ok(&["entry", "show", "--output", "json"])?)?;
        let ids: BTreeSet<&str> = listed
            .as_array()
            .map(|a| a.iter().filter_map(|e| e["id"].as_str()).collect())
            .unwrap_or_default();
        for id in &done.entries {
            assert!(
                ids.contains(id.as_str()),
                "entry {id} was reported created and is missing"
            );
        }
    }
    // The revocation log: no gap, every reported revocation in it.
    let log: serde_json::Value =
        serde_json::from_str(&servers[0].cli_ok(&["revoke", "list", "--output", "json"])?)?;
    let head = log["head_sequence"].as_u64().unwrap_or(0);
    let sequences: BTreeSet<u64> = log["events"]
        .as_array()
        .map(|e| e.iter().filter_map(|e| e["sequence"].as_u64()).collect())
        .unwrap_or_default();
    assert_eq!(
        sequences,
        (1..=head).collect::<BTreeSet<_>>(),
        "the revocation log has gaps"
    );
    let text = log.to_string();
    for id in &done.revoked {
        assert!(text.contains(id.as_str()), "revocation of {id} is missing");
    }
    eprintln!(
        "chaos: {rounds} rounds, {} entries and {} revocations reported done, {} calls failed, revocation head {head}",
        done.entries.len(),
        done.revoked.len(),
        done.failed_calls
    );
    // Every node agent applies every revocation.
    for node in &nodes {
        let all = (1..=head).collect::<BTreeSet<_>>();
        let caught_up = wait_until(Duration::from_secs(15), || applied(node) == all);
        assert!(
            caught_up,
            "{} applied {:?} of 1..={head}:\n{}",
            node.spiffe_id,
            applied(node),
            node.daemon.log_text()
        );
    }
    // After the chaos, an entry made through any server reaches every node agent.
    let mut wanted = Vec::new();
    for (i, server) in servers.iter().enumerate() {
        for node in &nodes {
            let path = format!(
                "spiffe://example.org/chaos/after/s{i}/{}",
                node.spiffe_id.rsplit('/').next().unwrap_or("node")
            );
            server.register_own_uid(&node.spiffe_id, &path, &[])?;
            wanted.push((node, path));
        }
    }
    for (node, path) in wanted {
        node.wait_for_svid(&path)?;
    }
    // One audit chain, intact.
    let verify: serde_json::Value =
        serde_json::from_str(&servers[1].cli_ok(&["audit", "verify", "--output", "json"])?)?;
    assert_eq!(verify["intact"], true, "{verify}");
    Ok(())
}
