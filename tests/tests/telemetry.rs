//! Metrics, health and logs of real daemons: `/metrics` counts what a flow did, `/live` and
//! `/ready` follow the daemons' state, `agentd healthcheck --metrics-address` reads them, the
//! JSON log carries one span per RPC, and no log line ever holds a key or a token.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use agentd_e2e::*;
use anyhow::{anyhow, bail, ensure, Context};

const WORKLOAD_ID: &str = "spiffe://example.org/agent/telemetry";

fn scrape(address: &str) -> anyhow::Result<String> {
    let (status, body) = http_get(address, "/metrics")?;
    ensure!(status == 200, "/metrics answered {status}: {body}");
    Ok(body)
}

/// A sample's value; a missing sample is an error that shows the whole scrape.
fn value(text: &str, series: &str) -> anyhow::Result<f64> {
    metric(text, series).ok_or_else(|| anyhow!("no sample {series} in:\n{text}"))
}

fn workload_calls(text: &str, rpc: &str) -> f64 {
    metric(
        text,
        &format!("agentd_node_rpc_duration_seconds_count{{api=\"workload\",rpc=\"{rpc}\"}}"),
    )
    .unwrap_or(0.0)
}

const FETCH_X509: &str = "/SpiffeWorkloadAPI/FetchX509SVID";
const FETCH_JWT: &str = "/SpiffeWorkloadAPI/FetchJWTSVID";
const VALIDATE_JWT: &str = "/SpiffeWorkloadAPI/ValidateJWTSVID";

#[test]
fn metrics_count_what_an_end_to_end_run_did() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start_with(
        &env,
        &[
            "--metrics-address",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--log-level",
            "debug",
        ],
    )?;
    let server_metrics = metrics_address(&server.daemon)?;
    let node = Node::start_with(&env, &server, "n1", &["--metrics-address", "127.0.0.1:0"])?;
    let node_metrics = metrics_address(&node.daemon)?;
    server.register_own_uid(&node.spiffe_id, WORKLOAD_ID, &[])?;
    node.wait_for_svid(WORKLOAD_ID)?;

    // A node agent with a join token the server never issued: one refused attestation.
    let bad_dir = env.path().join("bad");
    let mut bad = spawn_node(
        &server.address,
        &node.bundle,
        &bad_dir,
        &env.path().join("bad.sock"),
        Some("not-a-token-the-server-issued"),
    )?;
    let status = bad.wait_exit(Duration::from_secs(20))?;
    ensure!(!status.success(), "a node with a bogus token must fail");

    // Exactly these Workload API calls from here on (waiting above made some already).
    let before = scrape(&node_metrics)?;
    let sock = node.socket_arg();
    for _ in 0..3 {
        agentd_ok(&["api", "fetch", "x509", "--socket-path", &sock])?;
    }
    let mut token = String::new();
    for _ in 0..2 {
        let out = agentd_ok(&[
            "api",
            "fetch",
            "jwt",
            "--audience",
            "spiffe://example.org/tool",
            "--socket-path",
            &sock,
            "--output",
            "json",
        ])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        token = v["svids"][0]["svid"]
            .as_str()
            .context("no JWT-SVID")?
            .to_string();
    }
    agentd_ok(&[
        "api",
        "validate",
        "jwt",
        "--audience",
        "spiffe://example.org/tool",
        "--svid",
        &token,
        "--socket-path",
        &sock,
    ])?;
    let after = scrape(&node_metrics)?;
    for (rpc, calls) in [(FETCH_X509, 3.0), (FETCH_JWT, 2.0), (VALIDATE_JWT, 1.0)] {
        assert_eq!(
            workload_calls(&after, rpc) - workload_calls(&before, rpc),
            calls,
            "{rpc} calls counted in\n{after}"
        );
    }
    // The cache: one X.509-SVID, and one JWT-SVID (the second fetch was served from it).
    assert_eq!(value(&after, "agentd_node_cache_x509_svids")?, 1.0);
    assert_eq!(value(&after, "agentd_node_cache_jwt_svids")?, 1.0);
    ensure!(value(&after, "agentd_node_syncs_total")? >= 1.0);
    assert_eq!(value(&after, "agentd_node_sync_failures_total")?, 0.0);
    assert_eq!(value(&after, "agentd_node_revocation_feed_lag")?, 0.0);
    ensure!(
        value(
            &after,
            &format!("agentd_node_rpc_open_streams{{api=\"workload\",rpc=\"{FETCH_X509}\"}}")
        )? == 0.0,
        "no stream is open after the fetches:\n{after}"
    );

    // The server minted one X.509-SVID and one JWT-SVID for the workload, attested one node,
    // refused one unknown join token, and holds one entry and one node.
    let s = scrape(&server_metrics)?;
    for (series, want) in [
        ("agentd_server_svids_minted_total{type=\"x509\"}", 1.0),
        ("agentd_server_svids_minted_total{type=\"jwt\"}", 1.0),
        ("agentd_server_svid_mint_duration_seconds_count{type=\"x509\"}", 1.0),
        ("agentd_server_svid_mint_duration_seconds_count{type=\"jwt\"}", 1.0),
        ("agentd_server_node_attestations_total{attestor=\"join_token\"}", 1.0),
        (
            "agentd_server_node_attestation_failures_total{attestor=\"join_token\",reason=\"unknown_join_token\"}",
            1.0,
        ),
        // Registered from the start, at 0 until revocations are recorded.
        ("agentd_server_revocations_total{handle=\"entry\"}", 0.0),
        ("agentd_server_entries", 1.0),
        ("agentd_server_nodes", 1.0),
        (
            "agentd_server_rpc_duration_seconds_count{api=\"node\",rpc=\"/agentd.node.v1.Node/MintJwtSvid\"}",
            1.0,
        ),
    ] {
        assert_eq!(value(&s, series)?, want, "{series} in\n{s}");
    }

    // An open watch is an open stream until the workload hangs up.
    let mut watch = Command::new(agentd_bin())
        .args(["api", "watch", "--socket-path", &sock])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let open = format!("agentd_node_rpc_open_streams{{api=\"workload\",rpc=\"{FETCH_X509}\"}}");
    let opened = wait_until(Duration::from_secs(10), || {
        scrape(&node_metrics).is_ok_and(|t| metric(&t, &open) == Some(1.0))
    });
    let _ = watch.kill();
    let _ = watch.wait();
    ensure!(opened, "the watch was never counted as open");
    ensure!(
        wait_until(Duration::from_secs(10), || {
            scrape(&node_metrics).is_ok_and(|t| metric(&t, &open) == Some(0.0))
        }),
        "the watch was still counted as open after the client hung up"
    );

    // Health: both daemons live and ready, over plain HTTP and through the CLI.
    for addr in [&server_metrics, &node_metrics] {
        assert_eq!(http_get(addr, "/live")?.0, 200);
        let (status, body) = http_get(addr, "/ready")?;
        assert_eq!(status, 200, "{body}");
        let out = agentd_ok(&["healthcheck", "--metrics-address", addr, "--output", "json"])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        assert_eq!(v["ready"], true, "{out}");
    }

    // The server's JSON log: every line is one JSON object, and RPCs are logged inside a
    // span naming the API and the method.
    let log = server.daemon.log_text();
    let mut rpc_lines = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))?;
        if v["fields"]["message"] == "rpc finished"
            && v["span"]["api"] == "node"
            && v["span"]["rpc"] == "/agentd.node.v1.Node/MintX509Svids"
        {
            ensure!(v["span"]["node"] == node.spiffe_id.as_str(), "{line}");
            ensure!(v["fields"]["grpc_status"] == "Ok", "{line}");
            rpc_lines += 1;
        }
    }
    ensure!(rpc_lines >= 1, "no span for MintX509SVIDs in:\n{log}");
    Ok(())
}

#[test]
fn ready_follows_the_node_agents_sync_with_the_server() -> anyhow::Result<()> {
    let env = Env::new();
    let mut server = Server::start(&env)?;
    let mut node = Node::start(&env, &server, "n1")?;
    // With the server down, a restarted node agent has its identity but cannot sync.
    server.stop();
    node.daemon.stop();
    node.daemon = spawn_node_with(
        &node.server_address,
        &node.bundle,
        &node.data_dir,
        &node.socket,
        None,
        &["--metrics-address", "127.0.0.1:0"],
    )?;
    let addr = metrics_address(&node.daemon)?;
    assert_eq!(http_get(&addr, "/live")?.0, 200);
    let mut last = (0, String::new());
    let not_ready = wait_until(Duration::from_secs(10), || {
        last = http_get(&addr, "/ready").unwrap_or_default();
        last.0 == 503
            && metric(
                &scrape(&addr).unwrap_or_default(),
                "agentd_node_sync_failures_total",
            )
            .is_some_and(|v| v >= 1.0)
    });
    ensure!(not_ready, "expected 503 and a sync failure, got {last:?}");
    let v: serde_json::Value = serde_json::from_str(&last.1)?;
    // Neither synced nor connected to the revocation feed.
    assert_eq!(
        v["unmet"],
        serde_json::json!(["revocation_feed_connected", "synced"]),
        "{}",
        last.1
    );
    let out = agentd(&["healthcheck", "--metrics-address", &addr]);
    ensure!(
        !out.status.success(),
        "healthcheck passed on an unready node"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(err.contains("not ready") && err.contains("synced"), "{err}");
    ensure!(err.lines().count() == 1, "one line on stderr: {err}");

    // Back once the server is.
    server.restart()?;
    let ready = wait_until(Duration::from_secs(40), || {
        http_get(&addr, "/ready").is_ok_and(|(s, _)| s == 200)
    });
    ensure!(
        ready,
        "not ready after the server came back:\n{}",
        node.daemon.log_text()
    );
    agentd_ok(&["healthcheck", "--metrics-address", &addr])?;
    Ok(())
}

#[test]
fn healthcheck_on_a_closed_metrics_address_fails_with_one_line() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    drop(listener);
    let out = agentd(&["healthcheck", "--metrics-address", &addr]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&addr), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");

    let out = agentd(&["healthcheck", "--metrics-address", "localhost"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--metrics-address"), "{err}");
}

#[test]
fn a_bad_metrics_address_is_named_at_startup() -> anyhow::Result<()> {
    let env = Env::new();
    let out = agentd(&[
        "server",
        "run",
        "--data-dir",
        &env.path().join("s").display().to_string(),
        "--admin-socket",
        &env.path().join("a.sock").display().to_string(),
        "--bind-address",
        "127.0.0.1:0",
        "--metrics-address",
        "nowhere",
    ]);
    ensure!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(err.contains("metrics_address"), "{err}");
    Ok(())
}

/// Lines of base64 inside every PEM private key under `dir` (recursively), each long enough
/// not to match by chance.
fn private_key_material(dir: &Path, found: &mut Vec<String>) -> anyhow::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let path = e?.path();
        if path.is_dir() {
            private_key_material(&path, found)?;
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        if !text.contains("PRIVATE KEY-----") {
            continue;
        }
        let body: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with("-----") && l.len() >= 16)
            .collect();
        found.extend(body.iter().map(|l| l.to_string()));
        // Also the DER, as hex and as a Rust byte list (what a stray `{:?}` would print).
        use base64::Engine as _;
        if let Ok(der) = base64::engine::general_purpose::STANDARD.decode(body.concat()) {
            found.push(der.iter().map(|b| format!("{b:02x}")).collect());
            found.push(format!("{:?}", &der[der.len().saturating_sub(24)..]));
        }
    }
    Ok(())
}

#[test]
fn no_key_or_token_in_any_log_line() -> anyhow::Result<()> {
    let env = Env::new();
    let mut server = Server::start_with(&env, &["--log-level", "debug"])?;
    let node_id = "spiffe://example.org/node/n1";
    let join_token = server.join_token(node_id)?;
    let bundle = env.path().join("bundle.pem");
    server.write_bundle(&bundle)?;
    let data_dir = env.path().join("n1");
    let socket = env.path().join("n1.sock");
    // spawn_node logs at debug level.
    let mut node = spawn_node(
        &server.address,
        &bundle,
        &data_dir,
        &socket,
        Some(&join_token),
    )?;
    node.wait_node_healthy(&socket)?;
    server.register_own_uid(node_id, WORKLOAD_ID, &[])?;
    let sock = socket.display().to_string();
    let svid_dir = env.path().join("svid");
    let fetched = wait_until(Duration::from_secs(20), || {
        agentd(&[
            "api",
            "fetch",
            "x509",
            "--write",
            &svid_dir.display().to_string(),
            "--socket-path",
            &sock,
        ])
        .status
        .success()
    });
    ensure!(fetched, "no X.509-SVID:\n{}", node.log_text());
    let out = agentd_ok(&[
        "api",
        "fetch",
        "jwt",
        "--audience",
        "spiffe://example.org/tool",
        "--socket-path",
        &sock,
        "--output",
        "json",
    ])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let jwt = v["svids"][0]["svid"]
        .as_str()
        .context("no JWT-SVID")?
        .to_string();
    agentd_ok(&[
        "api",
        "validate",
        "jwt",
        "--audience",
        "spiffe://example.org/tool",
        "--svid",
        &jwt,
        "--socket-path",
        &sock,
    ])?;
    // A refused validation logs too: its token must not appear either.
    let forged = format!("{jwt}x");
    let out = agentd(&[
        "api",
        "validate",
        "jwt",
        "--audience",
        "spiffe://example.org/tool",
        "--svid",
        &forged,
        "--socket-path",
        &sock,
    ]);
    ensure!(!out.status.success());
    // A second, refused attestation with a spent token.
    let mut again = spawn_node(
        &server.address,
        &bundle,
        &env.path().join("n2"),
        &env.path().join("n2.sock"),
        Some(&join_token),
    )?;
    ensure!(!again.wait_exit(Duration::from_secs(20))?.success());
    node.stop();
    server.stop();

    let mut secrets: Vec<(String, String)> = vec![
        ("join token".into(), join_token.clone()),
        ("JWT-SVID".into(), jwt.clone()),
    ];
    // Each part of the token past the (shared, public) header: claims and signature.
    for part in jwt.split('.').skip(1) {
        secrets.push(("JWT-SVID part".into(), part.to_string()));
    }
    let mut keys = Vec::new();
    for dir in [&svid_dir, &data_dir, &server.data_dir] {
        private_key_material(dir, &mut keys)?;
    }
    ensure!(
        keys.len() >= 3 * 3,
        "expected the workload, node and CA keys, found {} lines",
        keys.len()
    );
    secrets.extend(keys.into_iter().map(|k| ("private key".to_string(), k)));

    let logs = [
        ("server", server.daemon.log_text()),
        ("node agent", node.log_text()),
        ("refused node agent", again.log_text()),
    ];
    for (who, log) in &logs {
        ensure!(
            log.lines().count() > 10,
            "{who} logged almost nothing:\n{log}"
        );
        for marker in ["PRIVATE KEY", "-----BEGIN"] {
            if log.contains(marker) {
                bail!("{who} log contains {marker:?}:\n{log}");
            }
        }
        for (what, secret) in &secrets {
            if let Some(line) = log.lines().find(|l| l.contains(secret.as_str())) {
                bail!("{who} log contains the {what}: {line}");
            }
        }
    }
    Ok(())
}
