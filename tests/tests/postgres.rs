//! The server on the PostgreSQL datastore (`--datastore postgres://...`): entries, node
//! attestation, issuance, revocation and the audit log live in the database, survive a
//! restart, and nothing is written to an embedded store in the data dir. Each test makes its
//! own database on the local PostgreSQL (scripts/install-tools.sh starts one) and drops it.

use std::time::Duration;

use agentd_e2e::pg::{Database, Relay};
use agentd_e2e::{wait_until, Env, Node, Server};

#[test]
fn a_server_on_postgres_issues_revokes_and_keeps_everything_across_a_restart() -> anyhow::Result<()>
{
    let db = Database::create()?;
    let env = Env::new();
    let mut server = Server::start_with(&env, &["--datastore", &db.url])?;
    let node = Node::start(&env, &server, "n1")?;
    let kept = "spiffe://example.org/pg/kept";
    let revoked = "spiffe://example.org/pg/revoked";
    server.register_own_uid(&node.spiffe_id, kept, &["--hint", "kept"])?;
    let revoked_id = server.register_own_uid(&node.spiffe_id, revoked, &["--hint", "revoked"])?;
    node.wait_for_svid(kept)?;
    node.wait_for_svid(revoked)?;
    server.cli_ok(&[
        "revoke",
        "entry",
        "--id",
        &revoked_id,
        "--reason",
        "postgres test",
    ])?;
    let gone = wait_until(Duration::from_secs(10), || {
        !String::from_utf8_lossy(&node.fetch_x509().stdout).contains(revoked)
    });
    assert!(gone, "the revoked SVID is still served");
    assert!(
        !server.data_dir.join("datastore").exists(),
        "an embedded store was made in the data dir"
    );

    // Everything is in the database: a restart (same data dir for the CA keys) sees it.
    server.restart()?;
    let entries: serde_json::Value =
        serde_json::from_str(&server.cli_ok(&["entry", "show", "--output", "json"])?)?;
    let ids: Vec<&str> = entries
        .as_array()
        .map(|a| a.iter().filter_map(|e| e["spiffe_id"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(ids, [kept, revoked]);
    let listed: serde_json::Value =
        serde_json::from_str(&server.cli_ok(&["revoke", "list", "--output", "json"])?)?;
    assert!(listed.to_string().contains(&revoked_id), "{listed}");
    let nodes = server.cli_ok(&["node", "list"])?;
    assert!(nodes.contains(&node.spiffe_id), "{nodes}");
    let verify: serde_json::Value =
        serde_json::from_str(&server.cli_ok(&["audit", "verify", "--output", "json"])?)?;
    assert_eq!(verify["intact"], true, "{verify}");
    assert!(verify["head_seq"].as_u64().unwrap_or(0) > 3, "{verify}");
    // The node agent carries on against the restarted server.
    node.wait_for_svid(kept)?;
    Ok(())
}

/// `agentd server migrate --to postgres://...`: a stopped sled server's records move into an
/// empty database with their ids, sequence numbers and audit chain; the server then runs on
/// the same data dir with `--datastore` and serves its node agent as before. A running
/// server's data dir, a database that holds records and a URL that is not PostgreSQL are
/// refused, naming the flag.
#[test]
fn a_sled_server_moves_onto_postgres_with_server_migrate() -> anyhow::Result<()> {
    let db = Database::create()?;
    let env = Env::new();
    let mut server = Server::start(&env)?;
    let node = Node::start(&env, &server, "n1")?;
    let kept = "spiffe://example.org/moved/kept";
    let revoked = "spiffe://example.org/moved/revoked";
    let kept_id = server.register_own_uid(&node.spiffe_id, kept, &[])?;
    let revoked_id = server.register_own_uid(&node.spiffe_id, revoked, &[])?;
    node.wait_for_svid(kept)?;
    server.cli_ok(&["revoke", "entry", "--id", &revoked_id, "--reason", "moved"])?;
    let data_dir = server.data_dir.display().to_string();
    let migrate =
        |to: &str| agentd_e2e::agentd(&["server", "migrate", "--data-dir", &data_dir, "--to", to]);

    let running = migrate(&db.url);
    assert!(!running.status.success());
    let stderr = String::from_utf8_lossy(&running.stderr);
    assert!(
        stderr.contains("--data-dir") && stderr.contains("stop it first"),
        "{stderr}"
    );

    let before_entries = server.cli_ok(&["entry", "show", "--output", "json"])?;
    let before_revocations = server.cli_ok(&["revoke", "list", "--output", "json"])?;
    server.stop();
    let bad = migrate("mysql://root:hunter2@db/agentd");
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && stderr.contains("--to"), "{stderr}");
    assert!(
        !stderr.contains("hunter2"),
        "the password was printed: {stderr}"
    );

    let out = migrate(&db.url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("2 entries") && said.contains("1 nodes"),
        "{said}"
    );
    let again = migrate(&db.url);
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        !again.status.success() && stderr.contains("already holds records"),
        "{stderr}"
    );
    assert!(
        server.data_dir.join("datastore").is_dir(),
        "the embedded store was removed"
    );

    server.restart_with(&["--datastore", &db.url])?;
    let moved = &mut server;
    // The same entries (ids, revisions, selectors), with their activity.
    let identity = |json: &str| -> anyhow::Result<Vec<String>> {
        let all: serde_json::Value = serde_json::from_str(json)?;
        Ok(all
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|e| {
                        format!(
                            "{} {} {} {} {}",
                            e["id"], e["spiffe_id"], e["parent_id"], e["selectors"], e["revision"]
                        )
                    })
                    .collect()
            })
            .unwrap_or_default())
    };
    let after_entries = moved.cli_ok(&["entry", "show", "--output", "json"])?;
    assert_eq!(identity(&after_entries)?, identity(&before_entries)?);
    let shown: serde_json::Value = serde_json::from_str(&after_entries)?;
    let kept_entry = shown
        .as_array()
        .and_then(|a| a.iter().find(|e| e["id"] == kept_id.as_str()).cloned())
        .unwrap_or_default();
    assert!(
        kept_entry["last_issued"].is_number(),
        "activity not copied: {kept_entry}"
    );
    assert_eq!(
        moved.cli_ok(&["revoke", "list", "--output", "json"])?,
        before_revocations
    );
    let verify: serde_json::Value =
        serde_json::from_str(&moved.cli_ok(&["audit", "verify", "--output", "json"])?)?;
    assert_eq!(verify["intact"], true, "{verify}");
    // The node agent carries on without a restart (same address, same CA), and new
    // entries reach it.
    node.wait_for_svid(kept)?;
    assert!(!String::from_utf8_lossy(&node.fetch_x509().stdout).contains(revoked));
    moved.register_own_uid(&node.spiffe_id, "spiffe://example.org/moved/new", &[])?;
    node.wait_for_svid("spiffe://example.org/moved/new")?;
    moved.stop();
    Ok(())
}

#[test]
fn a_bad_datastore_url_is_refused_naming_the_field() {
    let env = Env::new();
    let out = agentd_e2e::agentd(&[
        "server",
        "run",
        "--data-dir",
        &env.path().join("server").display().to_string(),
        "--admin-socket",
        &env.path().join("admin.sock").display().to_string(),
        "--datastore",
        "mysql://root:hunter2@db/agentd",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("datastore.url"), "{stderr}");
    assert!(
        !stderr.contains("hunter2"),
        "the password was printed: {stderr}"
    );
}

/// While the database is unreachable the server is not ready and refuses writes with a clear
/// error, writing nothing; when it is back the server is ready and writes again, without a
/// restart.
#[test]
fn a_server_whose_database_goes_away_is_not_ready_refuses_writes_and_recovers() -> anyhow::Result<()>
{
    let db = Database::create()?;
    let relay = Relay::start()?;
    let url = relay.url_for(&db.url);
    let env = Env::new();
    let server = Server::start_with(
        &env,
        &["--datastore", &url, "--metrics-address", "127.0.0.1:0"],
    )?;
    let metrics = agentd_e2e::metrics_address(&server.daemon)?;
    let ready = || agentd_e2e::http_get(&metrics, "/ready").map(|(code, _)| code == 200);
    assert!(ready()?);
    let create = |path: &str| {
        server.cli(&[
            "entry",
            "create",
            "--parent-id",
            "spiffe://example.org/node/n1",
            "--spiffe-id",
            &format!("spiffe://example.org/db/{path}"),
            "--selector",
            "unix:uid:4242",
        ])
    };
    assert!(create("before").status.success());
    // A node agent with an SVID: it keeps serving while the database is gone.
    let node = Node::start(&env, &server, "n1")?;
    let served = "spiffe://example.org/db/served";
    server.register_own_uid(&node.spiffe_id, served, &[])?;
    node.wait_for_svid(served)?;

    relay.cut();
    let cut_at = std::time::Instant::now();
    assert!(
        wait_until(Duration::from_secs(15), || ready().is_ok_and(|r| !r)),
        "/ready stayed 200 with the database gone"
    );
    let out = create("while-down");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("datastore is unreachable") && stderr.contains("nothing was written"),
        "{stderr}"
    );
    let health = server.cli(&["healthcheck"]);
    assert!(!health.status.success());
    assert!(
        String::from_utf8_lossy(&health.stderr).contains("datastore_reachable"),
        "{}",
        String::from_utf8_lossy(&health.stderr)
    );

    // Ten seconds without the database: the node agent still serves its SVID.
    std::thread::sleep(Duration::from_secs(10).saturating_sub(cut_at.elapsed()));
    let out = node.fetch_x509();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains(served),
        "the node agent stopped serving with the database down: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    relay.restore()?;
    assert!(
        wait_until(Duration::from_secs(20), || ready().unwrap_or(false)),
        "/ready did not come back with the database"
    );
    // Recovered without a restart: a new entry reaches the node agent.
    let later = "spiffe://example.org/db/later";
    server.register_own_uid(&node.spiffe_id, later, &[])?;
    node.wait_for_svid(later)?;
    assert!(create("after").status.success());
    let listed: serde_json::Value =
        serde_json::from_str(&server.cli_ok(&["entry", "show", "--output", "json"])?)?;
    let ids: Vec<&str> = listed
        .as_array()
        .map(|a| a.iter().filter_map(|e| e["spiffe_id"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(
        ids,
        [
            "spiffe://example.org/db/after",
            "spiffe://example.org/db/before",
            "spiffe://example.org/db/later",
            "spiffe://example.org/db/served"
        ]
    );
    Ok(())
}
