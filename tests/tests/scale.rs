//! Scale, sized for CI (`AGENTD_SCALE_ENTRIES`, default 20,000; `make bench` has the 100k
//! figures): a node with more entries than one gRPC message holds syncs and serves (SPIRE's
//! agent cannot, past ~17k); a new entry reaches its workload within 2 s through the pushed
//! change, with the node's own sync interval set to an hour; the server restarts with every
//! entry and answers within 10 s; peak RSS stays within the bounds.

use std::time::{Duration, Instant};

use agentd_e2e::{agentd, current_uid, wait_until, Daemon, Env, Server};
use serde_json::json;

fn scale_entries() -> usize {
    std::env::var("AGENTD_SCALE_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

/// Peak resident set of a process, in MiB (VmHWM).
fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc status");
    kib / 1024.0
}

/// Whether `api fetch x509` on `socket` lists `spiffe_id`.
fn fetch_lists(socket: &str, spiffe_id: &str) -> bool {
    let out = agentd(&[
        "api",
        "fetch",
        "x509",
        "--socket-path",
        socket,
        "--output",
        "json",
    ]);
    out.status.success() && String::from_utf8_lossy(&out.stdout).contains(spiffe_id)
}

#[test]
fn a_node_with_20k_entries_syncs_serves_gets_new_entries_pushed_and_survives_a_server_restart(
) -> anyhow::Result<()> {
    let n = scale_entries();
    let env = Env::new();
    let mut server = Server::start(&env)?;
    let node_id = "spiffe://example.org/node/big";
    let uid = current_uid();
    // Every entry is the node's, before the node first syncs: its first sync is all of them.
    let mut entries: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            json!({"spiffe_id": format!("spiffe://example.org/fleet/agent-{i:06}"),
                   "parent_id": node_id,
                   "selectors": [format!("unix:uid:{}", 2_000_000 + i)],
                   "owner": "team-scale@example.com", "scopes": ["tickets:read"]})
        })
        .collect();
    let mine = "spiffe://example.org/fleet/mine";
    entries.push(json!({"spiffe_id": mine, "parent_id": node_id,
                        "selectors": [format!("unix:uid:{uid}")]}));
    let file = env.path().join("entries.json");
    std::fs::write(&file, json!({ "entries": entries }).to_string())?;
    let started = Instant::now();
    server.cli_ok(&[
        "entry",
        "create",
        "--data",
        file.to_str().unwrap(),
        "--output",
        "json",
    ])?;
    eprintln!("bulk load of {} entries: {:?}", n + 1, started.elapsed());

    let token = server.join_token(node_id)?;
    let bundle = env.path().join("bundle.pem");
    server.write_bundle(&bundle)?;
    let data_dir = env.path().join("node");
    let socket = env.path().join("node.sock");
    let sock = socket.display().to_string();
    let node_args = |token: Option<&str>| {
        let mut args = vec![
            "node".to_string(),
            "run".into(),
            "--server-address".into(),
            server.address.clone(),
            "--trust-bundle".into(),
            bundle.display().to_string(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--socket-path".into(),
            sock.clone(),
            // Nothing below may wait for a poll: a change must be pushed.
            "--sync-interval".into(),
            "1h".into(),
            "--log-level".into(),
            "debug".into(),
        ];
        if let Some(t) = token {
            args.extend(["--join-token".into(), t.to_string()]);
        }
        args
    };
    let args = node_args(Some(&token));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut node = Daemon::spawn_args(&args, env.path().join("node.log"))?;
    node.wait_node_healthy(&socket)?;
    let synced = wait_until(Duration::from_secs(60), || fetch_lists(&sock, mine));
    assert!(
        synced,
        "no SVID from a node with {n} entries:\n{}",
        node.log_text()
    );
    let log = node.log_text();
    let minted = log.matches("X.509-SVID received").count();
    assert!(
        minted < 100,
        "{minted} SVIDs minted: above the prefetch bound only what a caller asks for is"
    );

    // A new entry reaches its workload within 2 s, pushed (the node polls hourly).
    for round in 0..3 {
        let id = format!("spiffe://example.org/fleet/new-{round}");
        let selector = format!("unix:uid:{uid}");
        server.create_entry(&[
            "--parent-id",
            node_id,
            "--spiffe-id",
            &id,
            "--selector",
            &selector,
        ])?;
        let created = Instant::now();
        let arrived = wait_until(Duration::from_secs(10), || fetch_lists(&sock, &id));
        let took = created.elapsed();
        assert!(arrived, "{id} never arrived:\n{}", node.log_text());
        eprintln!("new entry to workload, round {round}: {took:?}");
        if took > Duration::from_secs(1) {
            for l in node
                .log_text()
                .lines()
                .filter(|l| l.contains("change notice") || l.contains(&id) || l.contains("sync"))
                .rev()
                .take(12)
            {
                eprintln!("  {l}");
            }
        }
        assert!(took <= Duration::from_secs(2), "{id} took {took:?}");
    }

    // The server restarts with every entry and answers within 10 s.
    server.stop();
    let restarted = Instant::now();
    server.restart()?;
    let took = restarted.elapsed();
    eprintln!("server restart with {n} entries: {took:?}");
    assert!(took <= Duration::from_secs(10), "restart took {took:?}");
    let listed = server.cli_ok(&["entry", "show", "--spiffe-id", mine, "--output", "json"])?;
    assert!(listed.contains(mine), "{listed}");
    // The node is back on the new run's change stream: a new entry is pushed again.
    let id = "spiffe://example.org/fleet/after-restart";
    let selector = format!("unix:uid:{uid}");
    server.create_entry(&[
        "--parent-id",
        node_id,
        "--spiffe-id",
        id,
        "--selector",
        &selector,
    ])?;
    assert!(
        wait_until(Duration::from_secs(15), || fetch_lists(&sock, id)),
        "no push after the server restarted:\n{}",
        node.log_text()
    );

    let node_rss = peak_rss_mib(node.pid());
    let server_rss = peak_rss_mib(server.daemon.pid());
    eprintln!("peak RSS with {n} entries: node {node_rss:.1} MiB, server {server_rss:.1} MiB");
    assert!(node_rss <= 100.0, "node peak RSS {node_rss:.1} MiB");
    assert!(
        server_rss <= 400.0,
        "server peak RSS {server_rss:.1} MiB (after restart)"
    );
    Ok(())
}

fn scale_svids() -> usize {
    std::env::var("AGENTD_SCALE_SVIDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000)
}

fn json_of(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// `revoke authority` over 50,000 SVIDs: more than one 4 MiB message holds. The admin answer
/// lists 1,000 and counts the rest; a node agent that starts afterwards receives the whole
/// event through the paged feed and hands every serial to its local watchers.
#[test]
fn an_authority_revocation_of_50k_svids_reaches_a_node_that_starts_afterwards() -> anyhow::Result<()>
{
    let svids = scale_svids();
    // Delegated SVIDs: one per (entry, grant), so 1,000 entries of one agent and 50 grants
    // to it make 50,000 SVIDs without loading 50,000 entries.
    let entries = 1_000.min(svids);
    let grants = svids.div_ceil(entries);
    let env = Env::new();
    let config = env.path().join("server.toml");
    // Node SVIDs renew at half their TTL, so the node SVID the old authority signed is gone
    // soon after the rotation (until then the authority may not be revoked).
    std::fs::write(&config, "node_svid_ttl = \"10s\"\n")?;
    let server = Server::start_with(&env, &["--config", config.to_str().unwrap()])?;
    let mut minter =
        agentd_e2e::Node::start_with(&env, &server, "minter", &["--svid-prefetch", "5000"])?;
    let agent = "spiffe://example.org/fleet/worker";
    let data: Vec<serde_json::Value> = (0..entries)
        .map(|i| {
            json!({"spiffe_id": agent, "parent_id": minter.spiffe_id,
                   "selectors": [format!("unix:uid:{}", 3_000_000 + i)], "scopes": ["jobs:*"]})
        })
        .collect();
    let file = env.path().join("entries.json");
    std::fs::write(&file, json!({ "entries": data }).to_string())?;
    server.cli_ok(&["entry", "create", "--data", file.to_str().unwrap()])?;
    for g in 0..grants {
        server.cli_ok(&[
            "grant",
            "create",
            "--principal",
            &format!("user:p{g}@example.com"),
            "--agent",
            agent,
            "--scope",
            "jobs:run",
            "--ttl",
            "2h",
        ])?;
    }
    let started = Instant::now();
    let all_minted = wait_until(Duration::from_secs(600), || {
        minter
            .daemon
            .log_text()
            .matches("delegated X.509-SVID received")
            .count()
            >= entries * grants
    });
    assert!(
        all_minted,
        "the minter did not get its {} SVIDs",
        entries * grants
    );
    eprintln!(
        "{} delegated SVIDs minted in {:?}",
        entries * grants,
        started.elapsed()
    );

    let authorities = json_of(&server.cli_ok(&["authority", "list", "--output", "json"])?);
    let old = authorities
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|x| x["kind"] == "x509" && x["state"] == "active")
        })
        .and_then(|x| x["id"].as_str())
        .expect("an active X.509 authority")
        .to_string();
    server.cli_ok(&["authority", "prepare"])?;
    server.cli_ok(&["authority", "activate"])?;
    // The minter would mint all of them again under the new authority; it is not needed.
    minter.daemon.stop();
    let mut event = serde_json::Value::Null;
    let mut last = String::new();
    let revoked = wait_until(Duration::from_secs(60), || {
        let out = server.cli(&[
            "revoke",
            "authority",
            "--id",
            &old,
            "--reason",
            "rotated out",
            "--output",
            "json",
        ]);
        if out.status.success() {
            event = json_of(&String::from_utf8_lossy(&out.stdout));
            return true;
        }
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        false
    });
    assert!(revoked, "{last}");
    let listed = event["serials"].as_array().map(Vec::len).unwrap_or(0);
    let omitted = event["serials_omitted"].as_u64().unwrap_or(0) as usize;
    assert_eq!(listed, 1_000, "the admin answer lists the first 1,000");
    assert!(
        listed + omitted >= entries * grants,
        "covers {} of {}",
        listed + omitted,
        entries * grants
    );
    let list = json_of(&server.cli_ok(&["revoke", "list", "--output", "json"])?);
    assert_eq!(list["events"].as_array().map(Vec::len), Some(1), "{list}");

    // A node that starts now replays the feed from 0: the whole event, in parts.
    let late = agentd_e2e::Node::start(&env, &server, "late")?;
    let me = "spiffe://example.org/late/me";
    server.register_own_uid(&late.spiffe_id, me, &[])?;
    late.wait_for_svid(me)?;
    let out = agentd(&[
        "api",
        "revocations",
        "--socket-path",
        &late.socket_arg(),
        "--output",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = json_of(&String::from_utf8_lossy(&out.stdout));
    let event = &seen["events"][0];
    assert_eq!(
        event["kind"],
        "authority",
        "{}",
        &seen.to_string()[..500.min(seen.to_string().len())]
    );
    let serials = event["serials"].as_array().map(Vec::len).unwrap_or(0);
    assert_eq!(
        serials,
        listed + omitted,
        "the late node holds every serial"
    );
    assert!(
        late.daemon
            .log_text()
            .contains("revocation applied sequence=1"),
        "{}",
        late.daemon.log_text()
    );
    Ok(())
}
