//! Revocation end to end: the server's log and push feed, node agents applying it, and the
//! `spiffe` crate's `X509Source` seeing the result.

use std::time::{Duration, Instant};

use agentd_e2e::{agentd, serial_of, spawn_node, wait_until, x509_source, Env, Node, Server};
use spiffe::{X509Source, X509SourceError};

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

type SvidResult = Result<std::sync::Arc<spiffe::X509Svid>, X509SourceError>;

/// Waits (at most `within`) until the source's current SVID satisfies `want`; returns it.
async fn source_until(
    source: &X509Source,
    within: Duration,
    want: impl Fn(&SvidResult) -> bool,
) -> anyhow::Result<SvidResult> {
    let deadline = Instant::now() + within;
    loop {
        let now = source.svid();
        if want(&now) {
            return Ok(now);
        }
        if Instant::now() > deadline {
            anyhow::bail!("the source did not change as expected; last: {now:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn withdrawn(r: &SvidResult) -> bool {
    matches!(r, Err(X509SourceError::Withdrawn(_)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_an_entry_withdraws_its_svid_and_jwt_until_lifted() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let node = Node::start(&env, &server, "n1")?;
    let id = "spiffe://example.org/agent/revoked";
    let entry = server.register_own_uid(&node.spiffe_id, id, &[])?;
    node.wait_for_svid(id)?;
    let source = x509_source(&node).await?;
    assert_eq!(source.svid()?.spiffe_id().to_string(), id);

    // A JWT-SVID fetched before the revocation validates now, and not after.
    let sock = node.socket_arg();
    let token = agentd(&[
        "api",
        "fetch",
        "jwt",
        "--audience",
        "tools",
        "--socket-path",
        &sock,
        "--output",
        "json",
    ]);
    assert!(
        token.status.success(),
        "{}",
        String::from_utf8_lossy(&token.stderr)
    );
    let token = json(&String::from_utf8_lossy(&token.stdout))["svids"][0]["svid"]
        .as_str()
        .expect("a token")
        .to_string();
    let validate = || {
        agentd(&[
            "api",
            "validate",
            "jwt",
            "--audience",
            "tools",
            "--svid",
            &token,
            "--socket-path",
            &sock,
        ])
    };
    assert!(validate().status.success());
    // `api watch` holds a stream open across the revocation.
    let sock = node.socket_arg();
    let mut watch = std::process::Command::new(agentd_e2e::agentd_bin())
        .args(["api", "watch", "--socket-path", &sock])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    // Revoke only once the watch holds its stream (its first update is printed).
    let mut watch_out = std::io::BufReader::new(watch.stdout.take().expect("piped"));
    let mut first = String::new();
    std::io::BufRead::read_line(&mut watch_out, &mut first)?;
    assert!(first.starts_with("Received 1 svid"), "{first}");

    let out = server.cli_ok(&[
        "revoke",
        "entry",
        "--id",
        &entry,
        "--reason",
        "key leaked",
        "--output",
        "json",
    ])?;
    let event = json(&out);
    assert_eq!(event["kind"], "entry");
    assert_eq!(event["action"], "revoke");
    assert_eq!(
        event["serials"].as_array().map(Vec::len),
        Some(1),
        "{event}"
    );
    assert_eq!(
        event["jwt_ids"].as_array().map(Vec::len),
        Some(1),
        "{event}"
    );
    let sequence = event["sequence"].as_u64().expect("sequence");

    // The workload's stream is updated: the source reports the SVID withdrawn. (That the
    // feed, not a later sync, did it is shown by the watch's last words below, which name
    // the revocation; the bound is only a give-up time.)
    let _ = source_until(&source, Duration::from_secs(30), withdrawn).await?;
    // The watch ends, saying which revocation took the identity away.
    let watched = watch.wait_with_output()?;
    assert!(!watched.status.success());
    let stderr = String::from_utf8_lossy(&watched.stderr);
    assert!(
        stderr.contains(&format!(
            "no identity issued: revoked by entry {entry} (revocation #{sequence}: key leaked)"
        )),
        "{stderr}"
    );
    let out = node.fetch_x509();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no identity issued"));
    let v = validate();
    assert!(!v.status.success());
    assert!(
        String::from_utf8_lossy(&v.stderr).contains("revoked"),
        "{}",
        String::from_utf8_lossy(&v.stderr)
    );

    // The entry stays, marked revoked, and no SVID is issued for it across syncs.
    let shown = json(&server.cli_ok(&["entry", "show", "--id", &entry, "--output", "json"])?);
    assert_eq!(shown["revoked_by"].as_u64(), Some(sequence), "{shown}");
    agentd_e2e::wait_for_a_full_sync(&server, &node, "revoked")?;
    assert!(
        !node.fetch_x509().status.success(),
        "never re-issued while it stands"
    );
    let listed = json(&server.cli_ok(&["revoke", "list", "--output", "json"])?);
    assert_eq!(listed["events"][0]["sequence"].as_u64(), Some(sequence));
    // Revoking twice is refused with a clear line.
    let again = server.cli(&["revoke", "entry", "--id", &entry]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already revoked"));

    // Relying parties see the event on the node agent's watch service; it needs an
    // attested caller, and the revoked workload has no identity left.
    let revocations = |bin: &std::path::Path| {
        std::process::Command::new(bin)
            .args([
                "api",
                "revocations",
                "--socket-path",
                &sock,
                "--output",
                "json",
            ])
            .output()
            .expect("running agentd api revocations")
    };
    let refused = revocations(&agentd_e2e::agentd_bin());
    assert!(!refused.status.success(), "an unattested caller watched");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("no identity issued"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    // A relying party with its own entry (its binary's path) is served.
    let relying_party = env.path().join("relying-party");
    std::fs::copy(agentd_e2e::agentd_bin(), &relying_party)?;
    server.create_entry(&[
        "--parent-id",
        &node.spiffe_id,
        "--spiffe-id",
        "spiffe://example.org/relying-party",
        "--selector",
        &format!("unix:path:{}", relying_party.display()),
    ])?;
    let mut seen = serde_json::Value::Null;
    assert!(
        wait_until(Duration::from_secs(20), || {
            let out = revocations(&relying_party);
            if !out.status.success() {
                seen = String::from_utf8_lossy(&out.stderr).into();
                return false;
            }
            seen = json(&String::from_utf8_lossy(&out.stdout));
            true
        }),
        "the relying party was never served: {seen}"
    );
    assert_eq!(
        seen["events"][0]["sequence"].as_u64(),
        Some(sequence),
        "{seen}"
    );

    // Lifted: the entry serves again, with a new SVID.
    server.cli_ok(&["revoke", "lift", "--sequence", &sequence.to_string()])?;
    node.wait_for_svid(id)?;
    let back = source_until(&source, Duration::from_secs(10), Result::is_ok).await?;
    assert_eq!(back?.spiffe_id().to_string(), id);
    source.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_an_svid_by_serial_brings_a_fresh_one() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let node = Node::start(&env, &server, "n1")?;
    let id = "spiffe://example.org/agent/reissued";
    server.register_own_uid(&node.spiffe_id, id, &["--x509-svid-ttl", "1h"])?;
    node.wait_for_svid(id)?;
    let source = x509_source(&node).await?;
    let old = serial_of(source.svid()?.leaf().as_bytes());

    // openssl prints serials in upper case with colons; both forms are accepted.
    let pasted = old.to_uppercase();
    let out = json(&server.cli_ok(&["revoke", "svid", "--serial", &pasted, "--output", "json"])?);
    assert_eq!(out["id"], old.as_str());

    let fresh = source_until(&source, Duration::from_secs(10), |r| {
        r.as_ref()
            .is_ok_and(|s| serial_of(s.leaf().as_bytes()) != old)
    })
    .await??;
    let new = serial_of(fresh.leaf().as_bytes());
    assert_ne!(new, old, "a fresh SVID, with a new serial");
    assert_eq!(fresh.spiffe_id().to_string(), id);
    // The revoked serial is never served again.
    let served = json(&String::from_utf8_lossy(&node.fetch_x509().stdout));
    assert_ne!(served["svids"][0]["serial"], old.as_str(), "{served}");

    // An unknown serial is refused and nothing is logged.
    let bad = server.cli(&["revoke", "svid", "--serial", "0xdeadbeef"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("deadbeef"));
    let bad = server.cli(&["revoke", "svid", "--serial", "zz"]);
    assert!(
        String::from_utf8_lossy(&bad.stderr).starts_with("error: serial:")
            || String::from_utf8_lossy(&bad.stderr).contains("serial: ")
    );
    let listed = json(&server.cli_ok(&["revoke", "list", "--output", "json"])?);
    assert_eq!(listed["head_sequence"].as_u64(), Some(1), "{listed}");
    source.shutdown().await;
    Ok(())
}

#[test]
fn a_node_offline_during_a_revocation_applies_it_before_serving() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let mut node = Node::start(&env, &server, "n1")?;
    let kept = "spiffe://example.org/agent/kept";
    let gone = "spiffe://example.org/agent/gone";
    server.register_own_uid(&node.spiffe_id, kept, &[])?;
    let gone_entry = server.register_own_uid(&node.spiffe_id, gone, &[])?;
    node.wait_for_svid(gone)?;

    node.daemon.stop();
    let event =
        json(&server.cli_ok(&["revoke", "entry", "--id", &gone_entry, "--output", "json"])?);
    let sequence = event["sequence"].as_u64().expect("sequence");
    node.restart()?;
    // Healthy means caught up with the feed: the event is applied before anything is served.
    let seen = json(&String::from_utf8_lossy(
        &agentd(&[
            "api",
            "revocations",
            "--socket-path",
            &node.socket_arg(),
            "--output",
            "json",
        ])
        .stdout,
    ));
    assert_eq!(seen["head_sequence"].as_u64(), Some(sequence), "{seen}");
    node.wait_for_svid(kept)?;
    let served = String::from_utf8_lossy(&node.fetch_x509().stdout).into_owned();
    assert!(served.contains(kept));
    assert!(!served.contains(gone), "{served}");
    Ok(())
}

#[test]
fn revocations_survive_a_server_restart() -> anyhow::Result<()> {
    let env = Env::new();
    let mut server = Server::start(&env)?;
    let node = Node::start(&env, &server, "n1")?;
    let id = "spiffe://example.org/agent/persisted";
    let entry = server.register_own_uid(&node.spiffe_id, id, &[])?;
    node.wait_for_svid(id)?;
    server.cli_ok(&["revoke", "entry", "--id", &entry, "--reason", "audit"])?;
    server.cli_ok(&["revoke", "task", "--id", "task-7"])?;
    server.restart()?;

    let listed = json(&server.cli_ok(&["revoke", "list", "--output", "json"])?);
    let events = listed["events"].as_array().expect("events");
    assert_eq!(events.len(), 2, "{listed}");
    assert_eq!(events[0]["reason"], "audit");
    assert_eq!(listed["head_sequence"].as_u64(), Some(2));
    // Still refused once the node has synced with the restarted server, and numbering
    // continues.
    agentd_e2e::wait_for_a_full_sync(&server, &node, "restarted")?;
    let out = node.fetch_x509();
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("no identity issued"));
    let next = json(&server.cli_ok(&["revoke", "lift", "--sequence", "1", "--output", "json"])?);
    assert_eq!(next["sequence"].as_u64(), Some(3));
    node.wait_for_svid(id)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_node_is_a_kill_switch() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let node = Node::start(&env, &server, "n1")?;
    let other = Node::start(&env, &server, "n2")?;
    let id = "spiffe://example.org/agent/on-n1";
    server.register_own_uid(&node.spiffe_id, id, &[])?;
    let other_id = "spiffe://example.org/agent/on-n2";
    server.register_own_uid(&other.spiffe_id, other_id, &[])?;
    node.wait_for_svid(id)?;
    other.wait_for_svid(other_id)?;
    let source = x509_source(&node).await?;
    // A token made before the revocation, never used.
    let old_token = server.join_token(&node.spiffe_id)?;

    let event = json(&server.cli_ok(&[
        "revoke",
        "node",
        "--spiffe-id",
        &node.spiffe_id,
        "--output",
        "json",
    ])?);
    // The node's own SVID and its workload's SVID are covered.
    assert_eq!(
        event["serials"].as_array().map(Vec::len),
        Some(2),
        "{event}"
    );
    let _ = source_until(&source, Duration::from_secs(5), withdrawn).await?;
    // The node is gone from the server and its SVID no longer works there.
    let nodes = server.cli_ok(&["node", "list", "--output", "json"])?;
    assert!(!nodes.contains(&node.spiffe_id), "{nodes}");
    assert!(wait_until(Duration::from_secs(10), || node
        .daemon
        .log_text()
        .contains("is revoked")));
    // Another node is untouched.
    assert!(other.fetch_x509().status.success());

    // A join token made before the revocation cannot bring it back...
    let bundle = env.path().join("readmit-bundle.pem");
    server.write_bundle(&bundle)?;
    let fresh_dir = env.path().join("readmit");
    let socket = env.path().join("readmit.sock");
    let mut refused = spawn_node(
        &server.address,
        &bundle,
        &fresh_dir,
        &socket,
        Some(&old_token),
    )?;
    let status = refused.wait_exit(Duration::from_secs(20))?;
    assert!(!status.success());
    assert!(
        refused.log_text().contains("is revoked"),
        "{}",
        refused.log_text()
    );
    // ...a new one is the operator re-admitting it: the revocation is lifted.
    let new_token = server.join_token(&node.spiffe_id)?;
    let listed = json(&server.cli_ok(&["revoke", "list", "--output", "json"])?);
    assert_eq!(
        listed["events"].as_array().map(Vec::len),
        Some(0),
        "{listed}"
    );
    let mut readmitted = spawn_node(
        &server.address,
        &bundle,
        &fresh_dir,
        &socket,
        Some(&new_token),
    )?;
    readmitted.wait_node_healthy(&socket)?;
    source.shutdown().await;
    Ok(())
}

fn openssl_crl_check(
    dir: &std::path::Path,
    crl: &std::path::Path,
    leaf: &str,
) -> std::process::Output {
    agentd_e2e::openssl()
        .args(["verify", "-crl_check", "-CAfile"])
        .arg(dir.join("bundle.0.pem"))
        .arg("-CRLfile")
        .arg(crl)
        .arg(dir.join(leaf))
        .output()
        .expect("running openssl")
}

#[test]
fn openssl_crl_check_rejects_a_revoked_leaf_and_accepts_a_live_one() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let node = Node::start(&env, &server, "n1")?;
    let id = "spiffe://example.org/agent/crl";
    server.register_own_uid(&node.spiffe_id, id, &["--x509-svid-ttl", "1h"])?;
    node.wait_for_svid(id)?;
    let sock = node.socket_arg();
    let fetch_to = |dir: &std::path::Path| {
        let out = agentd(&[
            "api",
            "fetch",
            "x509",
            "--socket-path",
            &sock,
            "--write",
            dir.to_str().unwrap(),
            "--crl",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let old = env.path().join("old");
    fetch_to(&old);
    // Before the revocation the CRL lists nothing, and the leaf verifies with -crl_check.
    let v = openssl_crl_check(&old, &old.join("crl.pem"), "svid.0.pem");
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));

    let pem = std::fs::read_to_string(old.join("svid.0.pem"))?;
    let der = agentd::bundle::Bundle::x509_authorities_from_pem(&pem)?.remove(0);
    let serial = serial_of(&der);
    server.cli_ok(&["revoke", "svid", "--serial", &serial])?;
    // The published CRL (from the server, and through the node agent) lists it now.
    let crl = env.path().join("server-crl.pem");
    std::fs::write(&crl, server.cli_ok(&["bundle", "crl"])?)?;
    let v = openssl_crl_check(&old, &crl, "svid.0.pem");
    assert!(!v.status.success(), "a revoked leaf must fail -crl_check");
    assert!(
        String::from_utf8_lossy(&v.stdout).contains("revoked")
            || String::from_utf8_lossy(&v.stderr).contains("revoked"),
        "{}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    // The fresh SVID the workload now receives passes with the same CRL.
    let new = env.path().join("new");
    assert!(wait_until(Duration::from_secs(10), || {
        fetch_to(&new);
        std::fs::read_to_string(new.join("svid.0.pem")).is_ok_and(|p| p != pem)
    }));
    let v = openssl_crl_check(&new, &new.join("crl.pem"), "svid.0.pem");
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    let v = openssl_crl_check(&new, &new.join("crl.pem"), "../old/svid.0.pem");
    assert!(!v.status.success());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_an_old_authority_drops_it_and_reissues_what_it_signed() -> anyhow::Result<()> {
    let env = Env::new();
    let config = env.path().join("server.toml");
    // Node SVIDs renew at half their TTL: 5 s here, so the node moves to the new authority
    // soon, while the node SVID the old authority signed last stays live for at least 5 s
    // after the activation (the window in which the revocation must be refused).
    std::fs::write(&config, "node_svid_ttl = \"10s\"\n")?;
    let server = Server::start_with(&env, &["--config", config.to_str().unwrap()])?;
    let node = Node::start(&env, &server, "n1")?;
    let id = "spiffe://example.org/agent/rekeyed";
    server.register_own_uid(&node.spiffe_id, id, &["--x509-svid-ttl", "1h"])?;
    node.wait_for_svid(id)?;
    let source = x509_source(&node).await?;
    let old_serial = serial_of(source.svid()?.leaf().as_bytes());
    let authorities = json(&server.cli_ok(&["authority", "list", "--output", "json"])?);
    let old_x509 = authorities
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|x| x["kind"] == "x509" && x["state"] == "active")
        })
        .and_then(|x| x["id"].as_str())
        .expect("an active X.509 authority")
        .to_string();
    // The active authority cannot be revoked.
    let refused = server.cli(&["revoke", "authority", "--id", &old_x509]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("active"));

    server.cli_ok(&["authority", "prepare"])?;
    // One whole sync, so the node agent has the new bundle before anything is signed by it.
    agentd_e2e::wait_for_a_full_sync(&server, &node, "prepared")?;
    server.cli_ok(&["authority", "activate"])?;
    // Refused while the node's own SVID is from the old authority (it was issued at most half
    // a TTL before the activation, so it is live for at least 5 s more), naming the node.
    let refused = server.cli(&["revoke", "authority", "--id", &old_x509, "--output", "json"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success(),
        "revoking the authority that signs a live node SVID was accepted: {}",
        String::from_utf8_lossy(&refused.stdout)
    );
    assert!(
        stderr.contains("node SVIDs") && stderr.contains(&node.spiffe_id),
        "{stderr}"
    );
    let listed = json(&server.cli_ok(&["authority", "list", "--output", "json"])?);
    assert!(
        listed.to_string().contains(&old_x509),
        "refused, yet gone: {listed}"
    );
    // Accepted once the node renewed under the new authority and the old SVID expired.
    let mut last = String::new();
    let mut event = serde_json::Value::Null;
    let accepted = wait_until(Duration::from_secs(30), || {
        let out = server.cli(&["revoke", "authority", "--id", &old_x509, "--output", "json"]);
        if out.status.success() {
            event = json(&String::from_utf8_lossy(&out.stdout));
            true
        } else {
            last = String::from_utf8_lossy(&out.stderr).into_owned();
            false
        }
    });
    assert!(accepted, "{last}");
    assert!(last.is_empty() || last.contains("node SVIDs"), "{last}");
    let log = json(&server.cli_ok(&["revoke", "list", "--all", "--output", "json"])?);
    assert_eq!(
        log["events"].as_array().map(Vec::len),
        Some(1),
        "the refused attempts logged nothing: {log}"
    );
    let covered: Vec<&str> = event["serials"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s["serial"].as_str()).collect())
        .unwrap_or_default();
    assert!(covered.contains(&old_serial.as_str()), "{event}");
    // The workload receives an SVID signed by the new authority, and a bundle without the
    // old one.
    let fresh = source_until(&source, Duration::from_secs(15), |r| {
        r.as_ref()
            .is_ok_and(|s| serial_of(s.leaf().as_bytes()) != old_serial)
    })
    .await??;
    assert_eq!(fresh.spiffe_id().to_string(), id);
    let listed = json(&server.cli_ok(&["authority", "list", "--output", "json"])?);
    assert!(!listed.to_string().contains(&old_x509), "{listed}");
    source.shutdown().await;
    Ok(())
}

#[test]
fn a_node_that_loses_the_feed_reports_unhealthy_and_fails_closed_when_configured(
) -> anyhow::Result<()> {
    let env = Env::new();
    let mut server = Server::start(&env)?;
    let mut node = Node::start(&env, &server, "n1")?;
    let id = "spiffe://example.org/agent/closed";
    server.register_own_uid(&node.spiffe_id, id, &["--x509-svid-ttl", "1h"])?;
    node.wait_for_svid(id)?;
    // Restart the node agent with a short feed timeout and fail-closed.
    let config = env.path().join("node.toml");
    std::fs::write(
        &config,
        "[revocation]\nfeed_timeout = \"2s\"\nfail_closed = true\n",
    )?;
    node.daemon.stop();
    node.daemon = agentd_e2e::spawn_node_with(
        &node.server_address,
        &node.bundle,
        &node.data_dir,
        &node.socket,
        None,
        &["--config", config.to_str().unwrap()],
    )?;
    node.wait_healthy()?;
    node.wait_for_svid(id)?;

    // The server goes away: cached SVIDs would still be served, but fail_closed stops that
    // once the feed has been lost for longer than the timeout, and health says why.
    server.stop();
    let sock = node.socket_arg();
    let mut last = String::new();
    let closed = wait_until(Duration::from_secs(20), || {
        let out = node.fetch_x509();
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        !out.status.success() && last.contains("revocation feed")
    });
    assert!(closed, "still served with the feed lost: {last}");
    let health = agentd(&["healthcheck", "--socket-path", &sock]);
    assert!(!health.status.success(), "healthy with the feed lost");
    // Back once the server is.
    server.restart()?;
    assert!(
        wait_until(Duration::from_secs(30), || node
            .fetch_x509()
            .status
            .success()),
        "{}",
        node.daemon.log_text()
    );
    Ok(())
}

#[test]
fn node_ban_is_revoke_node() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let id = "spiffe://example.org/node/banned";
    let event = json(&server.cli_ok(&[
        "node",
        "ban",
        "--spiffe-id",
        id,
        "--reason",
        "stolen",
        "--output",
        "json",
    ])?);
    assert_eq!(event["kind"], "node");
    assert_eq!(event["id"], id);
    let listed = json(&server.cli_ok(&["revoke", "list", "--output", "json"])?);
    assert_eq!(listed["events"][0]["reason"], "stolen", "{listed}");
    let bad = server.cli(&["node", "ban", "--spiffe-id", "not-an-id"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("spiffe_id"));
    Ok(())
}

#[test]
fn a_bad_reason_is_refused_before_an_authority_leaves_the_bundle() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let active = |listed: &serde_json::Value| {
        listed
            .as_array()
            .and_then(|a| {
                a.iter()
                    .find(|x| x["kind"] == "x509" && x["state"] == "active")
            })
            .and_then(|x| x["id"].as_str())
            .map(str::to_string)
    };
    let old = active(&json(&server.cli_ok(&[
        "authority",
        "list",
        "--output",
        "json",
    ])?))
    .expect("an active X.509 authority");
    server.cli_ok(&["authority", "prepare"])?;
    server.cli_ok(&["authority", "activate"])?;
    let too_long = "x".repeat(2000);
    let out = server.cli(&["revoke", "authority", "--id", &old, "--reason", &too_long]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("reason"), "{stderr}");
    // Nothing happened: the old authority is still listed, and nothing was logged.
    let listed = server.cli_ok(&["authority", "list", "--output", "json"])?;
    assert!(listed.contains(&old), "{listed}");
    let log = json(&server.cli_ok(&["revoke", "list", "--all", "--output", "json"])?);
    assert_eq!(log["events"].as_array().map(Vec::len), Some(0), "{log}");
    assert_eq!(log["head_sequence"], 0, "{log}");
    Ok(())
}

#[test]
fn a_restarted_node_serves_an_entry_whose_revocation_was_lifted() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let mut node = Node::start(&env, &server, "n1")?;
    let id = "spiffe://example.org/agent/lifted";
    let entry = server.register_own_uid(&node.spiffe_id, id, &[])?;
    node.wait_for_svid(id)?;
    let event = json(&server.cli_ok(&["revoke", "entry", "--id", &entry, "--output", "json"])?);
    let sequence = event["sequence"].as_u64().expect("sequence").to_string();
    server.cli_ok(&["revoke", "lift", "--sequence", &sequence])?;
    node.wait_for_svid(id)?;
    // On every restart the feed replays the revocation and its lift, in a race with the
    // first sync (which already lists the entry): healthy must mean the entry is served.
    for attempt in 0..6 {
        node.restart()?;
        let out = node.fetch_x509();
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains(id),
            "restart {attempt}: healthy but not serving {id}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            node.daemon.log_text()
        );
    }
    Ok(())
}

#[test]
fn crls_are_signed_once_per_revocation_not_per_fetch() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let node = Node::start(&env, &server, "n1")?;
    let id = "spiffe://example.org/agent/crl-reader";
    server.register_own_uid(&node.spiffe_id, id, &[])?;
    node.wait_for_svid(id)?;
    let sock = node.socket_arg();
    let crl = |n: usize| -> anyhow::Result<String> {
        let dir = env.path().join(format!("crl-{n}"));
        let dir_arg = dir.display().to_string();
        agentd_e2e::agentd_ok(&[
            "api",
            "fetch",
            "x509",
            "--write",
            &dir_arg,
            "--crl",
            "--socket-path",
            &sock,
        ])?;
        Ok(std::fs::read_to_string(dir.join("crl.pem"))?)
    };
    // ECDSA signatures are randomized: equal bytes mean one signing served both.
    let first = crl(0)?;
    assert!(first.contains("BEGIN X509 CRL"), "{first}");
    for n in 1..5 {
        assert_eq!(crl(n)?, first, "fetch {n} was signed anew");
    }
    // A revocation moves the head: a new CRL.
    server.cli_ok(&["revoke", "task", "--id", "t-1"])?;
    let after = crl(5)?;
    assert_ne!(after, first);
    assert_eq!(crl(6)?, after);
    Ok(())
}

/// A TCP proxy between a node agent and the server that can cut every connection and
/// refuse new ones (`cut`), or hold every byte while keeping the connections open
/// (`freeze`), until `restore`: the feed is lost, or goes silent, while the server stays up.
struct CutProxy {
    address: String,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
    live: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

/// Copies `from` to `to` until either ends, holding what it read while `frozen` is set.
fn copy_unless_frozen(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    frozen: &std::sync::atomic::AtomicBool,
) {
    use std::io::{Read, Write};
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while frozen.load(std::sync::atomic::Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
}

impl CutProxy {
    fn start(upstream: &str) -> anyhow::Result<Self> {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let address = listener.local_addr()?.to_string();
        let down = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let frozen = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let live = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (d, f, l, up) = (
            down.clone(),
            frozen.clone(),
            live.clone(),
            upstream.to_string(),
        );
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(client) = conn else { return };
                if d.load(Ordering::SeqCst) {
                    continue; // dropped: refused while cut
                }
                let Ok(server) = std::net::TcpStream::connect(&up) else {
                    continue;
                };
                let mut guard = l.lock().unwrap();
                for s in [&client, &server] {
                    if let Ok(c) = s.try_clone() {
                        guard.push(c);
                    }
                }
                drop(guard);
                for (from, to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let f = f.clone();
                    std::thread::spawn(move || copy_unless_frozen(from, to, &f));
                }
            }
        });
        Ok(Self {
            address,
            down,
            frozen,
            live,
        })
    }

    fn freeze(&self) {
        self.frozen.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn cut(&self) {
        self.down.store(true, std::sync::atomic::Ordering::SeqCst);
        for s in self.live.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.down.store(false, std::sync::atomic::Ordering::SeqCst);
        self.frozen
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The head sequence the node agent's watch service reports (as a registered caller).
fn node_head(node_socket: &str) -> Option<u64> {
    let out = agentd(&[
        "api",
        "revocations",
        "--socket-path",
        node_socket,
        "--output",
        "json",
    ]);
    out.status.success().then_some(())?;
    json(&String::from_utf8_lossy(&out.stdout))["head_sequence"].as_u64()
}

#[test]
fn a_feed_cut_while_revocations_happen_resumes_after_the_last_applied_event() -> anyhow::Result<()>
{
    let env = Env::new();
    // Debug logs name the sequence each feed subscription starts after.
    let server = Server::start_with(&env, &["--log-level", "debug"])?;
    let proxy = CutProxy::start(&server.address)?;
    let node_id = "spiffe://example.org/node/cut";
    let token = server.join_token(node_id)?;
    let bundle = env.path().join("cut-bundle.pem");
    server.write_bundle(&bundle)?;
    // A short feed timeout, and fail_closed left at its default (false).
    let config = env.path().join("cut.toml");
    std::fs::write(&config, "[revocation]\nfeed_timeout = \"2s\"\n")?;
    let socket = env.path().join("cut.sock");
    let sock = socket.display().to_string();
    let mut daemon = agentd_e2e::spawn_node_with(
        &proxy.address,
        &bundle,
        &env.path().join("cut"),
        &socket,
        Some(&token),
        &["--config", config.to_str().unwrap()],
    )?;
    daemon.wait_node_healthy(&socket)?;
    let id = "spiffe://example.org/agent/cut";
    server.register_own_uid(node_id, id, &["--x509-svid-ttl", "1h"])?;
    let served = || {
        let out = agentd(&[
            "api",
            "fetch",
            "x509",
            "--socket-path",
            &sock,
            "--output",
            "json",
        ]);
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains(id)
    };
    assert!(
        wait_until(Duration::from_secs(20), served),
        "{}",
        daemon.log_text()
    );
    for t in ["t-1", "t-2"] {
        server.cli_ok(&["revoke", "task", "--id", t])?;
    }
    assert!(wait_until(Duration::from_secs(10), || node_head(&sock) == Some(2)));

    // The feed is cut while revocations happen.
    proxy.cut();
    for t in ["t-3", "t-4", "t-5"] {
        server.cli_ok(&["revoke", "task", "--id", t])?;
    }
    // Silent past the feed timeout: unhealthy, yet still serving (fail_closed is false).
    assert!(
        wait_until(Duration::from_secs(20), || !agentd(&[
            "healthcheck",
            "--socket-path",
            &sock
        ])
        .status
        .success()),
        "still healthy with the feed cut:\n{}",
        daemon.log_text()
    );
    assert!(
        served(),
        "fail_closed defaults to false: cached SVIDs are still served"
    );
    assert_eq!(node_head(&sock), Some(2));

    proxy.restore();
    assert!(
        wait_until(Duration::from_secs(30), || node_head(&sock) == Some(5)),
        "the missed events never arrived:\n{}",
        daemon.log_text()
    );
    daemon.wait_node_healthy(&socket)?;
    // The node asked for the events after the last one it applied, not for the whole log.
    let log = server.daemon.log_text();
    let subscribed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("revocation feed subscribed"))
        .collect();
    assert!(
        subscribed.iter().any(|l| l.contains("after=2")),
        "{subscribed:#?}"
    );
    let out = agentd(&[
        "api",
        "revocations",
        "--after",
        "2",
        "--socket-path",
        &sock,
        "--output",
        "json",
    ]);
    let events = json(&String::from_utf8_lossy(&out.stdout));
    let seqs: Vec<u64> = events["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["sequence"].as_u64())
        .collect();
    assert_eq!(seqs, [3, 4, 5], "{events}");
    Ok(())
}

#[test]
fn api_revocations_follow_prints_each_new_revocation() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let node = Node::start(&env, &server, "n1")?;
    let id = "spiffe://example.org/agent/follower";
    server.register_own_uid(&node.spiffe_id, id, &[])?;
    node.wait_for_svid(id)?;
    server.cli_ok(&["revoke", "task", "--id", "first"])?;
    let sock = node.socket_arg();
    assert!(wait_until(Duration::from_secs(10), || node_head(&sock) == Some(1)));
    let mut follow = std::process::Command::new(agentd_e2e::agentd_bin())
        .args([
            "api",
            "revocations",
            "--follow",
            "--socket-path",
            &sock,
            "--output",
            "json",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = follow.stdout.take().expect("piped");
    let _guard = Kill(&mut follow);
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    let mut next = || -> anyhow::Result<serde_json::Value> {
        let line = lines
            .next()
            .ok_or_else(|| anyhow::anyhow!("--follow ended"))??;
        Ok(json(&line))
    };
    // The backlog first (heartbeats are not printed), then each revocation as it is made.
    let first = next()?;
    assert_eq!(first["events"][0]["id"], "first", "{first}");
    server.cli_ok(&["revoke", "task", "--id", "second", "--reason", "done"])?;
    let second = next()?;
    assert_eq!(second["head_sequence"].as_u64(), Some(2), "{second}");
    assert_eq!(second["events"][0]["id"], "second", "{second}");
    assert_eq!(second["events"][0]["reason"], "done", "{second}");
    Ok(())
}

#[test]
fn a_feed_that_goes_silent_is_dropped_and_followed_again() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let proxy = CutProxy::start(&server.address)?;
    let node_id = "spiffe://example.org/node/silent";
    let token = server.join_token(node_id)?;
    let bundle = env.path().join("silent-bundle.pem");
    server.write_bundle(&bundle)?;
    let socket = env.path().join("silent.sock");
    let sock = socket.display().to_string();
    let mut daemon = agentd_e2e::spawn_node_with(
        &proxy.address,
        &bundle,
        &env.path().join("silent"),
        &socket,
        Some(&token),
        &[],
    )?;
    daemon.wait_node_healthy(&socket)?;
    let id = "spiffe://example.org/agent/silent";
    server.register_own_uid(node_id, id, &[])?;
    server.cli_ok(&["revoke", "task", "--id", "t-1"])?;
    assert!(
        wait_until(Duration::from_secs(20), || node_head(&sock) == Some(1)),
        "{}",
        daemon.log_text()
    );

    // Every byte is held but no connection closes: only the missing heartbeats tell.
    proxy.freeze();
    assert!(
        wait_until(Duration::from_secs(30), || daemon
            .log_text()
            .contains("revocation feed went silent")),
        "a silent feed was never given up:\n{}",
        daemon.log_text()
    );
    server.cli_ok(&["revoke", "task", "--id", "t-2"])?;
    // Drop the held connections before reopening: the revocation must come over a feed the
    // node opens again, not from the old stream coming back to life.
    proxy.cut();
    proxy.restore();
    assert!(
        wait_until(Duration::from_secs(60), || node_head(&sock) == Some(2)),
        "the feed was not followed again after the silence:\n{}",
        daemon.log_text()
    );
    daemon.wait_node_healthy(&socket)?;
    Ok(())
}
