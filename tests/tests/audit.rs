//! The audit trail, ownership and inventory, end to end: a real server and node agent, the
//! real CLI, and the server's sled store edited offline as an attacker with the files would.

use std::time::Duration;

use agentd_e2e::{agentd, current_uid, spawn_node, wait_until, Env, Node, Server};
use anyhow::Context;
use serde_json::Value;

fn json(server: &Server, args: &[&str]) -> anyhow::Result<Value> {
    let mut all = args.to_vec();
    all.extend(["--output", "json"]);
    let out = server.cli_ok(&all)?;
    serde_json::from_str(&out).with_context(|| format!("not one JSON value: {out}"))
}

fn records(server: &Server, args: &[&str]) -> anyhow::Result<Vec<Value>> {
    let mut all = vec!["audit", "show"];
    all.extend_from_slice(args);
    Ok(json(server, &all)?.as_array().cloned().unwrap_or_default())
}

/// The one record with this action (and subject, if given).
fn the_record(all: &[Value], action: &str, subject: Option<&str>) -> Value {
    let found: Vec<&Value> = all
        .iter()
        .filter(|r| r["action"] == action && subject.is_none_or(|s| r["subject"] == s))
        .collect();
    assert!(!found.is_empty(), "no {action} record in {all:#?}");
    found[0].clone()
}

fn fetch_ok(node: &Node) -> bool {
    agentd(&["api", "fetch", "x509", "--socket-path", &node.socket_arg()])
        .status
        .success()
}

#[test]
fn every_kind_of_event_is_recorded_with_its_fields() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let admin = format!("admin:uid:{}", current_uid());
    let node = Node::start(&env, &server, "n1")?;
    let id = "spiffe://example.org/agent/audited";
    let entry_id = server.register_own_uid(
        &node.spiffe_id,
        id,
        &[
            "--owner",
            "alice@example.com",
            "--scope",
            "crm:read",
            "--x509-svid-ttl",
            "2h",
        ],
    )?;
    node.wait_for_svid(id)?;
    let jwt = agentd(&[
        "api",
        "fetch",
        "jwt",
        "--audience",
        "mcp://tools",
        "--socket-path",
        &node.socket_arg(),
        "--output",
        "json",
    ]);
    assert!(
        jwt.status.success(),
        "{}",
        String::from_utf8_lossy(&jwt.stderr)
    );
    let jwt: Value = serde_json::from_slice(&jwt.stdout)?;
    let token = jwt["svids"][0]["svid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    server.cli_ok(&["entry", "update", "--id", &entry_id, "--hint", "primary"])?;

    // A node presenting an unknown join token is refused, and that is recorded too.
    let bundle = env.path().join("bad-bundle.pem");
    server.write_bundle(&bundle)?;
    let mut bad = spawn_node(
        &server.address,
        &bundle,
        &env.path().join("bad"),
        &env.path().join("bad.sock"),
        Some("0123456789abcdef0123456789abcdef"),
    )?;
    assert!(!bad.wait_exit(Duration::from_secs(20))?.success());

    server.cli_ok(&["owner", "disable", "alice@example.com"])?;
    let deleted =
        server.register_own_uid(&node.spiffe_id, "spiffe://example.org/agent/gone", &[])?;
    server.cli_ok(&["entry", "delete", "--id", &deleted])?;
    server.cli_ok(&["node", "evict", "--spiffe-id", &node.spiffe_id])?;

    let all = records(&server, &[])?;
    let seqs: Vec<u64> = all.iter().filter_map(|r| r["seq"].as_u64()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());

    let r = the_record(&all, "join_token.create", Some(node.spiffe_id.as_str()));
    assert_eq!(r["actor"], admin.as_str());
    assert!(r["fields"]["expires_at"].is_i64());
    assert!(!r.to_string().contains("token\":\""), "no token in {r}");

    let r = the_record(&all, "node.attest", Some(node.spiffe_id.as_str()));
    assert_eq!(r["actor"], node.spiffe_id.as_str());
    assert_eq!(r["fields"]["attestation_type"], "join_token");
    assert!(r["fields"]["serial"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
    assert!(r["fields"]["selectors"].is_array());

    let r = the_record(&all, "node.attest.fail", None);
    assert_eq!(r["fields"]["attestation_type"], "join_token");
    assert_eq!(
        r["fields"]["reason"],
        "join token not found or already used"
    );
    assert!(
        r["actor"]
            .as_str()
            .is_some_and(|a| a.starts_with("remote:127.0.0.1:")),
        "{r}"
    );

    let r = the_record(&all, "entry.create", Some(id));
    assert_eq!(r["actor"], admin.as_str());
    assert_eq!(r["fields"]["entry"], entry_id.as_str());
    assert_eq!(r["fields"]["owner"], "alice@example.com");
    assert_eq!(r["fields"]["scopes"], serde_json::json!(["crm:read"]));
    assert_eq!(r["fields"]["parent_id"], node.spiffe_id.as_str());

    let x = the_record(&all, "x509svid.issue", Some(id));
    assert_eq!(x["actor"], node.spiffe_id.as_str());
    assert_eq!(x["fields"]["entry"], entry_id.as_str());
    assert_eq!(x["fields"]["node"], node.spiffe_id.as_str());
    assert_eq!(x["fields"]["scopes"], serde_json::json!(["crm:read"]));
    assert_eq!(x["fields"]["ttl"], 7200);
    assert!(
        x["fields"]["serial"]
            .as_str()
            .is_some_and(|s| s.len() >= 16),
        "{x}"
    );
    assert!(x["fields"]["expires_at"].is_i64());

    let j = the_record(&all, "jwtsvid.issue", Some(id));
    assert_eq!(j["fields"]["entry"], entry_id.as_str());
    assert_eq!(j["fields"]["node"], node.spiffe_id.as_str());
    assert_eq!(j["fields"]["audience"], serde_json::json!(["mcp://tools"]));
    assert_eq!(j["fields"]["scopes"], serde_json::json!(["crm:read"]));
    assert_eq!(j["fields"]["ttl"], 300);
    assert!(
        j["fields"]["jti"].as_str().is_some_and(|s| s.len() == 32),
        "{j}"
    );
    assert!(!token.is_empty() && !all.iter().any(|r| r.to_string().contains(&token)));

    let r = the_record(&all, "entry.update", Some(id));
    assert_eq!(r["fields"]["revision"], 2);
    let r = the_record(&all, "owner.disable", None);
    assert_eq!(r["fields"]["owner"], "alice@example.com");
    assert_eq!(r["fields"]["entries"], 1);
    let r = the_record(&all, "entry.owner_disabled", Some(id));
    assert_eq!(r["fields"]["suspended"], false);
    let r = the_record(
        &all,
        "entry.delete",
        Some("spiffe://example.org/agent/gone"),
    );
    assert_eq!(r["fields"]["entry"], deleted.as_str());
    let r = the_record(&all, "node.evict", Some(node.spiffe_id.as_str()));
    assert_eq!(r["actor"], admin.as_str());

    // Filters.
    let issued = records(&server, &["--action", "x509svid.issue", "--spiffe-id", id])?;
    assert!(!issued.is_empty() && issued.iter().all(|r| r["action"] == "x509svid.issue"));
    let entry_changes = records(&server, &["--action", "entry.*"])?;
    assert!(entry_changes.iter().all(|r| r["action"]
        .as_str()
        .is_some_and(|a| a.starts_with("entry."))));
    assert_eq!(
        entry_changes.len(),
        all.iter()
            .filter(|r| r["action"]
                .as_str()
                .is_some_and(|a| a.starts_with("entry.")))
            .count()
    );
    let by_node = records(&server, &["--spiffe-id", &node.spiffe_id])?;
    assert!(
        by_node.iter().any(|r| r["action"] == "x509svid.issue"),
        "actor matches too"
    );
    assert!(records(&server, &["--since", "2000-01-01T00:00:00Z"])?.len() == all.len());
    let future = records(&server, &["--since", "2099-01-01T00:00:00Z"])?;
    assert!(future.is_empty());
    let out = server.cli(&["audit", "show", "--since", "whenever"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("since"));

    let v = json(&server, &["audit", "verify"])?;
    assert_eq!(v["intact"], true);
    assert_eq!(v["head_seq"], all.len());
    Ok(())
}

/// Opens the stopped server's store and runs `f` on the audit tree.
fn edit_store(server: &Server, f: impl FnOnce(&sled::Tree)) -> anyhow::Result<()> {
    let db = sled::open(server.data_dir.join("datastore"))?;
    f(&db.open_tree("audit")?);
    db.flush()?;
    Ok(())
}

fn verify_fails_naming(server: &Server, seq: u64, why: &str) {
    let out = server.cli(&["audit", "verify"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "verify must fail: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!("at record {seq}:")) && stderr.contains(why),
        "{stderr}"
    );
}

#[test]
fn the_log_survives_restarts_and_offline_edits_are_named() -> anyhow::Result<()> {
    let env = Env::new();
    let mut server = Server::start(&env)?;
    for i in 0..3 {
        server.join_token(&format!("spiffe://example.org/node/n{i}"))?;
    }
    let before = json(&server, &["audit", "verify"])?;
    assert_eq!(before["intact"], true);
    assert_eq!(before["head_seq"], 3);

    // A restart keeps the log, and the next record chains onto the old head.
    server.restart()?;
    server.join_token("spiffe://example.org/node/n3")?;
    let all = records(&server, &[])?;
    assert_eq!(all.len(), 4);
    assert_eq!(all[3]["seq"], 4);
    assert_eq!(all[3]["prev_hash"], before["head_hash"]);
    assert_eq!(json(&server, &["audit", "verify"])?["intact"], true);

    // Edit one record offline: verify names it.
    server.stop();
    let key2 = 2u64.to_be_bytes();
    let mut original = Vec::new();
    edit_store(&server, |log| {
        let v = log.get(key2).unwrap().unwrap();
        original = v.to_vec();
        let text = String::from_utf8(original.clone()).unwrap();
        let edited = text.replace(
            "spiffe://example.org/node/n1",
            "spiffe://example.org/node/x1",
        );
        assert_ne!(text, edited);
        log.insert(key2, edited.as_bytes()).unwrap();
    })?;
    server.restart()?;
    verify_fails_naming(&server, 2, "record 2 was altered");

    // Put it back and delete another one instead.
    server.stop();
    let mut third = Vec::new();
    edit_store(&server, |log| {
        log.insert(key2, original.clone()).unwrap();
        third = log.remove(3u64.to_be_bytes()).unwrap().unwrap().to_vec();
    })?;
    server.restart()?;
    verify_fails_naming(&server, 3, "record 3 is missing");

    // Deleting the newest record is caught by the checkpointed head.
    server.stop();
    let mut fourth = Vec::new();
    edit_store(&server, |log| {
        log.insert(3u64.to_be_bytes(), third.clone()).unwrap();
        fourth = log.remove(4u64.to_be_bytes()).unwrap().unwrap().to_vec();
    })?;
    server.restart()?;
    verify_fails_naming(&server, 4, "record 4 is missing");

    // Restored as it was, the log verifies again.
    server.stop();
    edit_store(&server, |log| {
        log.insert(4u64.to_be_bytes(), fourth.clone()).unwrap();
    })?;
    server.restart()?;
    assert_eq!(json(&server, &["audit", "verify"])?["intact"], true);
    Ok(())
}

fn entry_ids(list: &Value) -> Vec<String> {
    let mut ids: Vec<String> = list
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

#[test]
fn stale_orphaned_and_inventory_from_the_cli() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let node = Node::start(&env, &server, "n1")?;
    let used_id = "spiffe://example.org/agent/used";
    let used =
        server.register_own_uid(&node.spiffe_id, used_id, &["--owner", "alice@example.com"])?;
    // Nobody runs as this uid: minted, never fetched.
    let idle = server.create_entry(&[
        "--parent-id",
        &node.spiffe_id,
        "--spiffe-id",
        "spiffe://example.org/agent/idle",
        "--selector",
        "unix:uid:4000000000",
    ])?;
    let bobs = server.create_entry(&[
        "--parent-id",
        &node.spiffe_id,
        "--spiffe-id",
        "spiffe://example.org/agent/bobs",
        "--selector",
        "unix:uid:4000000001",
        "--owner",
        "bob@example.com",
    ])?;
    node.wait_for_svid(used_id)?;

    // The node agent reports the fetch at its next sync.
    let ok = wait_until(Duration::from_secs(20), || {
        json(&server, &["entry", "show", "--id", &used])
            .is_ok_and(|e| e["last_fetched"].is_i64() && e["last_issued"].is_i64())
    });
    assert!(ok, "last_fetched never set");
    let idle_json = json(&server, &["entry", "show", "--id", &idle])?;
    assert!(idle_json["last_issued"].is_i64(), "{idle_json}");
    assert!(idle_json["last_fetched"].is_null(), "{idle_json}");

    // Nothing is 30 days old.
    assert!(entry_ids(&json(&server, &["entry", "show", "--stale", "30d"])?).is_empty());
    // With a 3 s window, the entries nobody fetches become zombies; the one in use does not.
    let mut want = vec![idle.clone(), bobs.clone()];
    want.sort();
    let ok = wait_until(Duration::from_secs(20), || {
        fetch_ok(&node)
            && json(&server, &["entry", "show", "--stale", "3s"])
                .is_ok_and(|l| entry_ids(&l) == want)
    });
    assert!(
        ok,
        "stale list: {}",
        server.cli_ok(&["entry", "show", "--stale", "3s", "--output", "json"])?
    );

    // Orphaned: no owner, or the owner is disabled.
    assert_eq!(
        entry_ids(&json(&server, &["entry", "show", "--orphaned"])?),
        [idle.as_str()]
    );
    let out = json(&server, &["owner", "disable", "bob@example.com"])?;
    assert_eq!(out["disabled"], true);
    assert_eq!(out["suspended"], false);
    assert_eq!(entry_ids(&out["entries"]), [bobs.as_str()]);
    assert_eq!(
        entry_ids(&json(&server, &["entry", "show", "--orphaned"])?),
        want
    );
    let b = json(&server, &["entry", "show", "--id", &bobs])?;
    assert_eq!(
        (b["owner_disabled"].clone(), b["suspended"].clone()),
        (Value::Bool(true), Value::Bool(false))
    );

    let inv = json(&server, &["inventory"])?;
    assert_eq!(inv["entries"], 3);
    assert_eq!(inv["nodes"], 1);
    assert_eq!(inv["live_svids"], 3, "{inv}");
    assert_eq!(inv["live_grants"], 0);
    assert_eq!(inv["revocations"], 0);
    assert_eq!(inv["orphaned_entries"], 2);
    assert_eq!(inv["stale_entries"], 0);
    let owners = inv["by_owner"].as_array().cloned().unwrap_or_default();
    let owner = |name: Value| {
        owners
            .iter()
            .find(|o| o["owner"] == name)
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(owner(Value::Null)["entries"], 1);
    assert_eq!(owner("alice@example.com".into())["live_svids"], 1);
    assert_eq!(owner("bob@example.com".into())["disabled"], true);
    assert_eq!(inv["by_node"][0]["spiffe_id"], node.spiffe_id.as_str());
    assert_eq!(inv["by_node"][0]["entries"], 3);
    assert_eq!(inv["by_node"][0]["live_svids"], 3);
    let text = server.cli_ok(&["inventory"])?;
    assert!(text.contains("bob@example.com [disabled]"), "{text}");
    // One owner's entries.
    assert_eq!(
        entry_ids(&json(
            &server,
            &["entry", "show", "--owner", "bob@example.com"]
        )?),
        [bobs.as_str()]
    );
    assert_eq!(
        entry_ids(&json(
            &server,
            &["entry", "show", "--owner", "alice@example.com"]
        )?),
        [used.as_str()]
    );
    let out = server.cli(&["entry", "show", "--owner", "not an owner"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("owner"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn a_disabled_owners_entries_stop_getting_svids_when_suspension_is_configured() -> anyhow::Result<()>
{
    let env = Env::new();
    let config = env.path().join("server.toml");
    let export = env.path().join("audit.jsonl");
    std::fs::write(
        &config,
        format!(
            "require_owner = true\nsuspend_disabled_owners = true\n[audit]\nexport_file = \"{}\"\n",
            export.display()
        ),
    )?;
    let server = Server::start_with(&env, &["--config", &config.display().to_string()])?;
    let node = Node::start(&env, &server, "n1")?;
    let id = "spiffe://example.org/agent/alices";

    // require_owner: an entry without one is refused, naming the field.
    let out = server.cli(&[
        "entry",
        "create",
        "--parent-id",
        &node.spiffe_id,
        "--spiffe-id",
        id,
        "--selector",
        &format!("unix:uid:{}", current_uid()),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("owner: is required"), "{stderr}");

    let entry = server.register_own_uid(&node.spiffe_id, id, &["--owner", "alice@example.com"])?;
    node.wait_for_svid(id)?;

    let out = json(&server, &["owner", "disable", "alice@example.com"])?;
    assert_eq!(out["suspended"], true);
    // The node agent drops the SVID at its next sync; the workload gets no identity.
    assert!(
        wait_until(Duration::from_secs(20), || !fetch_ok(&node)),
        "still served"
    );
    let out = agentd(&["api", "fetch", "x509", "--socket-path", &node.socket_arg()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no identity issued"));
    let jwt = agentd(&[
        "api",
        "fetch",
        "jwt",
        "--audience",
        "a",
        "--socket-path",
        &node.socket_arg(),
    ]);
    assert!(!jwt.status.success());
    let e = json(&server, &["entry", "show", "--id", &entry])?;
    assert_eq!(e["suspended"], true);
    let r = records(&server, &["--action", "entry.owner_disabled"])?;
    assert_eq!(r.len(), 1);
    assert_eq!(r[0]["subject"], id);
    assert_eq!(r[0]["fields"]["suspended"], true);
    assert_eq!(r[0]["fields"]["entry"], entry.as_str());

    // Enabled again: SVIDs come back.
    server.cli_ok(&["owner", "enable", "alice@example.com"])?;
    node.wait_for_svid(id)?;
    assert_eq!(
        records(&server, &["--action", "entry.owner_enabled"])?.len(),
        1
    );

    // Every record is also in the export file, in order.
    let shown = records(&server, &[])?;
    let exported: Vec<Value> = std::fs::read_to_string(&export)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(exported.len(), shown.len());
    for (a, b) in exported.iter().zip(&shown) {
        assert_eq!(a["seq"], b["seq"]);
        assert_eq!(a["hash"], b["hash"]);
    }
    Ok(())
}

/// Rewrites record `at` of the stopped server's log with `edit`, then re-chains and re-hashes
/// every record after it and the checkpointed head, as someone with write access to the
/// store but without the audit key would (the MACs are left as they were).
fn rewrite_and_rechain(
    server: &Server,
    at: u64,
    mut edit: impl FnMut(&mut agentd::audit::SealedAuditRecord),
) -> anyhow::Result<()> {
    use agentd::audit::{record_hash, AuditHead, SealedAuditRecord, GENESIS_HASH};
    let db = sled::open(server.data_dir.join("datastore"))?;
    let log = db.open_tree("audit")?;
    let meta = db.open_tree("audit_meta")?;
    let read = |seq: u64| -> anyhow::Result<SealedAuditRecord> {
        let v = log
            .get(seq.to_be_bytes())?
            .with_context(|| format!("no record {seq}"))?;
        Ok(serde_json::from_slice(&v)?)
    };
    let mut head: AuditHead =
        serde_json::from_slice(&meta.get("head")?.context("no checkpointed head")?)?;
    let mut prev = if at == 1 {
        GENESIS_HASH.to_string()
    } else {
        read(at - 1)?.hash
    };
    for seq in at..=head.seq {
        let mut r = read(seq)?;
        if seq == at {
            edit(&mut r);
        }
        r.prev_hash = prev;
        r.hash = record_hash(&r);
        prev = r.hash.clone();
        log.insert(seq.to_be_bytes(), serde_json::to_vec(&r)?)?;
    }
    head.hash = prev;
    meta.insert("head", serde_json::to_vec(&head)?)?;
    db.flush()?;
    Ok(())
}

#[test]
fn a_rewrite_with_the_chain_and_head_recomputed_is_named() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let env = Env::new();
    let mut server = Server::start(&env)?;
    for i in 0..4 {
        server.join_token(&format!("spiffe://example.org/node/n{i}"))?;
    }
    assert_eq!(json(&server, &["audit", "verify"])?["intact"], true);
    // The key that signs the log lives beside the store, not in it.
    let key = server.data_dir.join("audit.key");
    let meta = std::fs::metadata(&key).with_context(|| format!("{}", key.display()))?;
    assert_eq!(meta.len(), 32);
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    server.stop();
    rewrite_and_rechain(&server, 2, |r| {
        r.subject = Some("spiffe://example.org/node/x1".into());
    })?;
    server.restart()?;
    verify_fails_naming(&server, 2, "record 2 was altered: its MAC does not match");
    // The key file is still the one the log was written with.
    assert_eq!(std::fs::metadata(&key)?.len(), 32);
    Ok(())
}
