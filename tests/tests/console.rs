//! `agentd console` in a real browser (Debian's chromium, driven by playwright-core) against a
//! real server and node agents: login, inventory, agent page, delegation graph, audit
//! timeline, CSRF, and the kill switch ending a workload's identity.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agentd_e2e::{interop_dir, repo_path, run_json_client, Env, Node, Server};
use anyhow::{bail, Context};
use serde_json::Value;

const ORCH: &str = "spiffe://example.org/agent/orchestrator";
const SCHED: &str = "spiffe://example.org/agent/scheduler";
const ALICE: &str = "user:alice@example.com";
const REASON: &str = "console kill switch test";

/// `agentd console`, stopped on drop; its login URL.
struct Console {
    child: Child,
    url: String,
}

impl Console {
    fn start(server: &Server, extra: &[&str]) -> anyhow::Result<Self> {
        let mut child = Command::new(agentd_e2e::agentd_bin())
            .arg("console")
            .arg("--admin-socket")
            .arg(&server.admin_socket)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let mut first = String::new();
        BufReader::new(child.stdout.take().context("piped")?).read_line(&mut first)?;
        let url = first.trim().to_string();
        if !url.starts_with("http://127.0.0.1:") || !url.contains("/?token=") {
            let _ = child.kill();
            bail!("the first stdout line is not the login URL: {first:?}");
        }
        Ok(Self { child, url })
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `node` with playwright-core, or a failure naming what is missing.
fn browser_driver() -> anyhow::Result<Command> {
    let modules = interop_dir().join("node/node_modules");
    if !modules.join("playwright-core").exists() {
        bail!(
            "playwright-core is not installed: {} is missing; run `make tools` \
             (scripts/install-tools.sh installs it with npm)",
            modules.join("playwright-core").display()
        );
    }
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !std::path::Path::new(&chromium).exists() {
        bail!(
            "chromium is not installed at {chromium}; run `make tools` \
             (scripts/install-tools.sh installs Debian's chromium)"
        );
    }
    let mut cmd = Command::new("node");
    cmd.env("NODE_PATH", modules).env("CHROMIUM", chromium);
    Ok(cmd)
}

/// Where the screenshots go (`target/NAME`): kept after the test, as its artifacts
/// (docs/console.md).
fn screenshot_dir(name: &str) -> anyhow::Result<PathBuf> {
    let dir = interop_dir()
        .parent()
        .map(|t| t.join(name))
        .context("no target dir")?;
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

#[test]
fn a_security_engineer_sees_the_agents_and_their_delegations_and_kills_one() -> anyhow::Result<()> {
    security_engineer_session(&[], "console-screenshots")
}

/// The same session against a server on the PostgreSQL datastore: the console uses only the
/// admin API, so nothing changes.
#[test]
fn the_console_works_the_same_on_postgresql() -> anyhow::Result<()> {
    let db = agentd_e2e::pg::Database::create()?;
    security_engineer_session(&["--datastore", &db.url], "console-screenshots-postgres")
}

fn security_engineer_session(server_args: &[&str], shots: &str) -> anyhow::Result<()> {
    let driver = browser_driver()?;
    let env = Env::new();
    let server = Server::start_with(&env, server_args)?;
    let n1 = Node::start(&env, &server, "n1")?;
    let n2 = Node::start(&env, &server, "n2")?;
    server.register_own_uid(
        &n1.spiffe_id,
        ORCH,
        &["--scope", "calendar:*", "--owner", "team-planning"],
    )?;
    let sched_entry = server.register_own_uid(
        &n2.spiffe_id,
        SCHED,
        &["--scope", "calendar:read", "--owner", "team-scheduling"],
    )?;
    n1.wait_for_svid(ORCH)?;
    n2.wait_for_svid(SCHED)?;

    // The delegation example's chain: alice -> orchestrator -> scheduler.
    let g: Value = serde_json::from_str(&server.cli_ok(&[
        "grant",
        "create",
        "--output",
        "json",
        "--principal",
        ALICE,
        "--agent",
        ORCH,
        "--scope",
        "calendar:*",
        "--ttl",
        "1h",
        "--max-depth",
        "1",
    ])?)?;
    let root = g["id"].as_str().unwrap_or_default().to_string();
    n1.wait_for_grant(&root)?;
    n1.delegate_to(&n2, SCHED, "calendar:read", &root)?;

    // A workload of the scheduler holds its X.509-SVID stream open across the kill.
    let mut watch = Command::new(agentd_e2e::agentd_bin())
        .args(["api", "watch", "--socket-path", &n2.socket_arg()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut watch_out = BufReader::new(watch.stdout.take().context("piped")?);
    let mut line = String::new();
    watch_out.read_line(&mut line)?;
    assert!(line.starts_with("Received "), "{line}");
    let watch_ended = std::thread::spawn(move || {
        // The stream ends when the identity is withdrawn; its stdout closes then.
        let mut rest = String::new();
        while watch_out
            .read_line(&mut rest)
            .map(|n| n > 0)
            .unwrap_or(false)
        {}
        let at = unix_ms();
        let out = watch.wait_with_output();
        (at, out)
    });

    // A non-loopback address needs the insecure flag.
    let refused = agentd_e2e::agentd(&[
        "console",
        "--bind-address",
        "0.0.0.0:0",
        "--admin-socket",
        &server.admin_socket.display().to_string(),
    ]);
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("--insecure-bind-any"), "{why}");

    let console = Console::start(&server, &["--bind-address", "127.0.0.1:0"])?;
    // DNS rebinding: another site's name, resolved to 127.0.0.1, is refused before anything.
    let addr = console
        .url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    let mut conn = std::net::TcpStream::connect(&addr)?;
    let port = addr.rsplit(':').next().unwrap_or_default();
    std::io::Write::write_all(
        &mut conn,
        format!("GET / HTTP/1.1\r\nHost: rebound.example:{port}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )?;
    let mut status_line = String::new();
    BufReader::new(conn).read_line(&mut status_line)?;
    assert!(status_line.contains(" 421 "), "{status_line}");
    let shots = screenshot_dir(shots)?;
    let mut cmd = driver;
    cmd.arg(repo_path("tests/interop/node/console_browser.js"))
        .args(["--url", &console.url])
        .arg("--screenshots")
        .arg(&shots)
        .args(["--agent", SCHED, "--delegator", ORCH, "--principal", ALICE])
        .args(["--victim", SCHED, "--reason", REASON]);
    let seen = run_json_client(cmd, Duration::from_secs(120))?;

    // Login by token; nothing without it.
    assert_eq!(seen["anonymous_status"], 401, "{seen}");
    assert_eq!(seen["anonymous_graph_status"], 401, "{seen}");
    assert_eq!(seen["wrong_token_status"], 401, "{seen}");
    assert_eq!(seen["login_status"], 200, "{seen}");
    assert!(
        !seen["after_login_url"]
            .as_str()
            .unwrap_or_default()
            .contains("token="),
        "{seen}"
    );
    assert_eq!(
        seen["cookie"],
        serde_json::json!([{"name": "agentd_console", "httpOnly": true, "sameSite": "Strict"}])
    );
    assert_eq!(
        seen["token_reuse_status"], 401,
        "the login token works once"
    );
    let csp = seen["csp"].as_str().unwrap_or_default();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert_eq!(seen["errors"], serde_json::json!([]), "JavaScript errors");

    // The inventory lists the agents with their owners.
    let rows = seen["inventory"].as_array().context("inventory")?;
    let row = |id: &str| rows.iter().find(|r| r["spiffe_id"] == id).cloned();
    assert_eq!(
        row(SCHED).map(|r| r["owner"].clone()),
        Some("team-scheduling".into()),
        "{seen}"
    );
    assert_eq!(
        row(ORCH).map(|r| r["status"].clone()),
        Some("live".into()),
        "{seen}"
    );
    assert_eq!(seen["rows_visible_after_find"], 1, "{seen}");
    assert_eq!(
        seen["rows_owner_team_scheduling"],
        serde_json::json!([SCHED]),
        "{seen}"
    );
    assert_eq!(
        seen["rows_status_orphaned"],
        serde_json::json!([]),
        "{seen}"
    );
    let counts = seen["counts"].as_str().unwrap_or_default();
    assert!(
        counts.contains("2 agents") && counts.contains("2 live grants"),
        "{counts}"
    );

    // The agent page shows its grant's principal and scopes.
    assert_eq!(seen["agent_title"], SCHED);
    // Its live documents: the X.509-SVIDs (plain and delegated) the watch below holds.
    let live = seen["agent_live"].as_str().unwrap_or_default();
    assert!(
        live.trim_start_matches("Live SVIDs and tokens (")
            .trim_end_matches(')')
            .parse::<u32>()
            .is_ok_and(|n| n >= 2),
        "{live}"
    );
    let grants = seen["agent_grants"].as_array().context("grants")?;
    assert_eq!(grants.len(), 1, "{seen}");
    assert_eq!(grants[0]["principal"], ALICE);
    assert_eq!(
        grants[0]["scopes"].as_str().map(str::trim),
        Some("calendar:read")
    );
    assert_eq!(
        grants[0]["chain"],
        format!("{ALICE} → {ORCH} → {SCHED}"),
        "{seen}"
    );

    // The graph draws alice -> orchestrator -> scheduler, and its boxes link to agents.
    let edges = seen["graph_edges"].as_array().context("edges")?;
    let edge = |from: &str, to: &str| {
        edges
            .iter()
            .find(|e| e["from"] == from && e["to"] == to)
            .map(|e| e["label"].clone())
    };
    assert_eq!(edge(ALICE, ORCH), Some("calendar:*".into()), "{seen}");
    assert_eq!(edge(ORCH, SCHED), Some("calendar:read".into()), "{seen}");
    assert_eq!(edges.len(), 2, "{seen}");
    assert!(
        seen["graph_vertices"].as_array().is_some_and(|v| v
            .iter()
            .any(|x| x["name"] == ALICE && x["kind"] == "principal")),
        "{seen}"
    );
    for v in seen["graph_vertices"].as_array().context("vertices")? {
        assert!(
            v["label_width"].as_f64().unwrap_or(0.0) > 20.0,
            "the label of {v} is not drawn"
        );
    }
    assert_eq!(seen["graph_click_title"], ORCH);

    // The audit timeline: newest first, verified.
    let verify = seen["audit_verify"].as_str().unwrap_or_default();
    assert!(verify.contains("intact"), "{verify}");
    // Newest first: the first row is the head `audit verify` names, and each row older.
    let seqs: Vec<u64> = seen["audit_seqs"]
        .as_array()
        .context("audit seqs")?
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    assert!(seqs.len() > 3, "{seen}");
    assert_eq!(Some(seqs[0]), seen["audit_head"].as_u64(), "{seen}");
    assert!(
        seqs.windows(2).all(|w| w[0] > w[1]),
        "not newest first: {seqs:?}"
    );

    // Forged POSTs without the CSRF token are refused.
    assert_eq!(seen["forged_status"], 403, "{seen}");
    assert_eq!(seen["forged_same_origin_status"], 403, "{seen}");
    assert_eq!(seen["forged_with_token_status"], 403, "{seen}");

    // The kill switch: the confirmation names what stops, the result what it covered.
    let confirm = seen["confirm_text"].as_str().unwrap_or_default();
    assert!(
        confirm.contains(SCHED) && confirm.contains("stops working everywhere"),
        "{confirm}"
    );
    assert!(seen["covered"].as_u64().unwrap_or(0) >= 1, "{seen}");
    let result = seen["result_text"].as_str().unwrap_or_default();
    assert!(
        result.contains(&format!("Revoked entry {sched_entry}")) && result.contains(REASON),
        "{result}"
    );
    assert!(
        seen["result_url"]
            .as_str()
            .is_some_and(|u| u.contains("/revoked?sequence=")),
        "{seen}"
    );
    assert_eq!(
        seen["rows_status_revoked"],
        serde_json::json!([SCHED]),
        "{seen}"
    );
    assert!(
        seen["audit_after_actions"]
            .as_array()
            .is_some_and(|a| !a.is_empty()
                && a.iter()
                    .all(|x| x.as_str().is_some_and(|s| s.starts_with("revocation.")))),
        "{seen}"
    );
    let (ended_at, watched) = watch_ended
        .join()
        .map_err(|_| anyhow::anyhow!("the watch thread panicked"))?;
    let watched = watched?;
    let stderr = String::from_utf8_lossy(&watched.stderr);
    assert!(
        stderr.contains(&format!("revoked by entry {sched_entry}")) && stderr.contains(REASON),
        "{stderr}"
    );
    let clicked = u128::from(seen["revoke_clicked_ms"].as_u64().unwrap_or(0));
    assert!(
        ended_at.saturating_sub(clicked) <= 1_000,
        "the workload lost its SVID {} ms after the click",
        ended_at.saturating_sub(clicked)
    );

    // Audited as done by the console's user, with the reason given.
    let audit_after = seen["audit_after"].as_str().unwrap_or_default();
    assert!(audit_after.contains(REASON), "{audit_after}");
    let records = server.cli_ok(&[
        "audit",
        "show",
        "--action",
        "revocation.create",
        "--output",
        "json",
    ])?;
    let records: Value = serde_json::from_str(&records)?;
    assert_eq!(
        records.as_array().map(Vec::len),
        Some(1),
        "one revocation: not the forgeries', not a reload's: {records}"
    );
    let rec = records
        .as_array()
        .and_then(|r| r.iter().find(|r| r.to_string().contains(REASON)))
        .cloned()
        .with_context(|| format!("no revocation record with the reason in {records}"))?;
    assert_eq!(
        rec["actor"],
        format!("admin:uid:{}", agentd_e2e::current_uid()),
        "{rec}"
    );
    for name in ["inventory", "agent", "graph", "audit", "confirm", "revoked"] {
        assert!(shots.join(format!("{name}.png")).exists(), "no {name}.png");
    }
    drop(console);
    Ok(())
}
