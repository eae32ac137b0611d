//! Crash test: a server under a steady load of mints (a node agent and a workload fetching
//! X.509- and JWT-SVIDs for ever-new audiences), revocations and admin writes is killed with
//! SIGKILL at random points, and restarted, many times. After each restart:
//!
//! - `audit verify` passes, and the audit export file holds every record exactly once, in
//!   order (nothing a crash kept from it is missing);
//! - every revocation the CLI reported as done is in `revoke list --all`, and on the feed (the
//!   node agent's `api revocations`), and the sequence numbers on both have no gap;
//! - every entry the CLI reported as created is there;
//! - the CA bundle is unchanged.
//!
//! `AGENTD_CRASH_ROUNDS` sets the number of kills (default 20); `AGENTD_CRASH_SEED` replays
//! the random kill points of a run (each run prints its seed).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentd_e2e::{agentd, wait_until, Env, Node, Server};
use anyhow::{bail, ensure, Context};
use rand::{Rng, SeedableRng};
use serde_json::Value;

const DEFAULT_ROUNDS: usize = 20;
/// How long the load runs before each kill: a random point in this range.
const LOAD_MS: std::ops::Range<u64> = 50..400;
/// How soon after the server is back the node agent's feed must hold every revocation. Its
/// first reconnect comes at most a few hundred milliseconds after the server is up; a node
/// whose backoff grew with each restart waited 10 s.
const FEED_CATCH_UP: Duration = Duration::from_secs(8);

fn env_number(name: &str) -> anyhow::Result<Option<u64>> {
    match std::env::var(name) {
        Err(_) => Ok(None),
        Ok(v) => v
            .parse()
            .map(Some)
            .with_context(|| format!("{name}={v:?} is not a whole number")),
    }
}

/// Runs the CLI against the admin socket; stdout as JSON when it succeeded.
fn admin_json(sock: &str, args: &[&str]) -> Option<Value> {
    let mut all = args.to_vec();
    all.extend(["--admin-socket", sock, "--output", "json"]);
    let out = agentd(&all);
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

fn admin_json_ok(sock: &str, args: &[&str]) -> anyhow::Result<Value> {
    let mut all = args.to_vec();
    all.extend(["--admin-socket", sock, "--output", "json"]);
    let out = agentd(&all);
    if !out.status.success() {
        bail!(
            "agentd {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "agentd {}: not JSON: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// What the load did that the CLI reported as done.
#[derive(Debug, Default)]
struct Reported {
    revocations: Vec<u64>,
    entries: Vec<String>,
}

/// The load: a few threads that each loop over one kind of work until stopped, and hold off
/// while `paused` (the checks between rounds want a quiet server).
#[derive(Debug)]
struct Load {
    stop: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    in_flight: Arc<AtomicUsize>,
    reported: Arc<Mutex<Reported>>,
    /// Operations finished, successful or not, per kind.
    done: Arc<[AtomicUsize; 3]>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(admin_socket: String, node_socket: String, parent_id: String) -> Self {
        let load = Load {
            stop: Arc::default(),
            paused: Arc::default(),
            in_flight: Arc::default(),
            reported: Arc::default(),
            done: Arc::new(Default::default()),
            threads: Vec::new(),
        };
        let mut threads = Vec::new();
        let worker = |kind: usize, mut op: Box<dyn FnMut(u64) + Send>| {
            let stop = load.stop.clone();
            let paused = load.paused.clone();
            let in_flight = load.in_flight.clone();
            let done = load.done.clone();
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    in_flight.fetch_add(1, Ordering::SeqCst);
                    // Checked after announcing the operation, so a pause that sees no
                    // operation in flight sees none start.
                    if paused.load(Ordering::SeqCst) {
                        in_flight.fetch_sub(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                    op(i);
                    i += 1;
                    done[kind].fetch_add(1, Ordering::SeqCst);
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                }
            })
        };
        // Mints: the workload fetches its X.509-SVID, and a JWT-SVID for a new audience
        // each time (the node agent mints one through the server for each).
        let sock = node_socket.clone();
        threads.push(worker(
            0,
            Box::new(move |i| {
                let _ = agentd(&["api", "fetch", "x509", "--socket-path", &sock]);
                let aud = format!("crash-{i}");
                let _ = agentd(&[
                    "api",
                    "fetch",
                    "jwt",
                    "--audience",
                    &aud,
                    "--socket-path",
                    &sock,
                ]);
            }),
        ));
        // Admin writes: entries under the node (which mints their SVIDs at its next sync).
        let sock = admin_socket.clone();
        let reported = load.reported.clone();
        let run = std::process::id();
        threads.push(worker(
            1,
            Box::new(move |i| {
                let id = format!("spiffe://example.org/crash/{run}/{i}");
                let uid = format!("unix:uid:{}", 4_000_000_000u64 + i);
                if let Some(v) = admin_json(
                    &sock,
                    &[
                        "entry",
                        "create",
                        "--parent-id",
                        &parent_id,
                        "--spiffe-id",
                        &id,
                        "--selector",
                        &uid,
                    ],
                ) {
                    if let Some(entry) = v["id"].as_str() {
                        reported
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .entries
                            .push(entry.to_string());
                    }
                }
            }),
        ));
        // Revocations: a task each time, and now and then one of the entries made above
        // (which covers the SVIDs minted for it).
        let sock = admin_socket;
        let reported = load.reported.clone();
        threads.push(worker(
            2,
            Box::new(move |i| {
                let target = if i % 3 == 2 {
                    let r = reported.lock().unwrap_or_else(|p| p.into_inner());
                    r.entries
                        .get((i / 3) as usize)
                        .map(|e| ("entry", e.clone()))
                } else {
                    None
                };
                let (kind, id) = target.unwrap_or(("task", format!("crash-task-{i}")));
                if let Some(v) = admin_json(
                    &sock,
                    &["revoke", kind, "--id", &id, "--reason", "crash test"],
                ) {
                    if let Some(seq) = v["sequence"].as_u64() {
                        reported
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .revocations
                            .push(seq);
                    }
                }
            }),
        ));
        Load { threads, ..load }
    }

    /// Holds the load off and waits until no operation is in flight.
    fn pause(&self) -> anyhow::Result<()> {
        self.paused.store(true, Ordering::SeqCst);
        ensure!(
            wait_until(Duration::from_secs(30), || self
                .in_flight
                .load(Ordering::SeqCst)
                == 0),
            "the load did not pause"
        );
        Ok(())
    }

    fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }

    fn reported(&self) -> (Vec<u64>, Vec<String>) {
        let r = self.reported.lock().unwrap_or_else(|p| p.into_inner());
        (r.revocations.clone(), r.entries.clone())
    }

    fn done(&self) -> [usize; 3] {
        [0, 1, 2].map(|k| self.done[k].load(Ordering::SeqCst))
    }

    fn finish(self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn sequences(events: &Value) -> Vec<u64> {
    let mut seqs: Vec<u64> = events
        .as_array()
        .map(|a| a.iter().filter_map(|e| e["sequence"].as_u64()).collect())
        .unwrap_or_default();
    seqs.sort_unstable();
    seqs
}

/// `seqs` (sorted) is 1, 2, ... with no gap and no repeat.
fn gap_free(what: &str, seqs: &[u64]) -> anyhow::Result<()> {
    for (want, got) in (1u64..).zip(seqs) {
        ensure!(
            *got == want,
            "{what}: sequence {want} is missing or repeated (got {got}) in {seqs:?}"
        );
    }
    Ok(())
}

fn node_revocations(node: &Node) -> anyhow::Result<Value> {
    let out = agentd(&[
        "api",
        "revocations",
        "--socket-path",
        &node.socket_arg(),
        "--output",
        "json",
    ]);
    ensure!(
        out.status.success(),
        "api revocations: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The checks after a restart, with the load paused.
fn check(
    server: &Server,
    node: &Node,
    load: &Load,
    bundle: &str,
    export: &std::path::Path,
) -> anyhow::Result<()> {
    let sock = server.admin_socket.display().to_string();
    let (revoked, entries) = load.reported();

    // The node agent keeps minting after the restart (a resync, re-mints of revoked SVIDs),
    // and each mint's records reach the store, then the export file: read at any moment the
    // export is a prefix of the log, and it reaches the log's head once the mint is done.
    let read_export = || -> anyhow::Result<Vec<u64>> {
        std::fs::read_to_string(export)?
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l)
                    .ok()
                    .and_then(|v| v["seq"].as_u64())
                    .with_context(|| format!("export line is not a record: {l}"))
            })
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let (head, exported) = loop {
        let verify = admin_json_ok(&sock, &["audit", "verify"])?;
        ensure!(verify["intact"] == true, "audit verify: {verify}");
        let head = verify["head_seq"].as_u64().context("head_seq")?;
        let exported = read_export()?;
        ensure!(
            exported.iter().copied().eq(1..=exported.len() as u64),
            "the export file does not hold records 1 to {} once each, in order: {exported:?}",
            exported.len()
        );
        if exported.len() as u64 >= head || Instant::now() > deadline {
            break (head, exported);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    ensure!(
        exported == (1..=head).collect::<Vec<_>>() || exported.len() as u64 > head,
        "the export file does not hold records 1 to {head} once each, in order: {exported:?}"
    );

    let listed = admin_json_ok(&sock, &["revoke", "list", "--all"])?;
    let on_server = sequences(&listed["events"]);
    gap_free("revoke list --all", &on_server)?;
    for seq in &revoked {
        ensure!(
            on_server.contains(seq),
            "revocation {seq} was reported done but is not in revoke list: {on_server:?}"
        );
    }
    // The node agent reconnects to the restarted server and catches up, soon: its backoff
    // starts over after a connection that worked, so restarts do not add up.
    let want = on_server.clone();
    let mut last = Value::Null;
    let caught_up = wait_until(FEED_CATCH_UP, || match node_revocations(node) {
        Ok(v) => {
            let got = sequences(&v["events"]);
            let ok = got == want;
            // What the node holds, in short (the events themselves make pages).
            last = serde_json::json!({
                "head_sequence": v["head_sequence"],
                "events": got.len(),
                "missing": want.iter().filter(|s| !got.contains(s)).collect::<Vec<_>>(),
            });
            ok
        }
        Err(e) => {
            last = Value::String(e.to_string());
            false
        }
    });
    ensure!(
        caught_up,
        "the feed (node agent) did not hold revocations 1 to {} within {FEED_CATCH_UP:?} of the restart: {last}",
        want.len()
    );

    let all_entries = admin_json_ok(&sock, &["entry", "show"])?;
    let ids: Vec<&str> = all_entries
        .as_array()
        .map(|a| a.iter().filter_map(|e| e["id"].as_str()).collect())
        .unwrap_or_default();
    for e in &entries {
        ensure!(
            ids.contains(&e.as_str()),
            "entry {e} was reported created but is not listed"
        );
    }

    let now = server.cli_ok(&["bundle", "show", "--format", "pem"])?;
    ensure!(
        now == bundle,
        "the CA bundle changed:\n{bundle}\n---\n{now}"
    );
    Ok(())
}

fn sigkill(server: &mut Server) -> anyhow::Result<()> {
    let pid = server.daemon.pid().to_string();
    let st = std::process::Command::new("kill")
        .args(["-KILL", &pid])
        .status()?;
    ensure!(st.success(), "kill -KILL {pid} failed");
    ensure!(
        wait_until(Duration::from_secs(10), || !server.daemon.is_running()),
        "the server did not die"
    );
    Ok(())
}

#[test]
fn the_server_survives_sigkill_under_load() -> anyhow::Result<()> {
    let rounds = env_number("AGENTD_CRASH_ROUNDS")?.unwrap_or(DEFAULT_ROUNDS as u64) as usize;
    let seed = env_number("AGENTD_CRASH_SEED")?.unwrap_or_else(rand::random);
    eprintln!("crash test: {rounds} rounds, AGENTD_CRASH_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let started = Instant::now();

    let env = Env::new();
    let config = env.path().join("server.toml");
    let export = env.path().join("audit.jsonl");
    std::fs::write(
        &config,
        format!("[audit]\nexport_file = \"{}\"\n", export.display()),
    )?;
    let mut server = Server::start_with(&env, &["--config", &config.display().to_string()])?;
    let node = Node::start(&env, &server, "n1")?;
    let id = "spiffe://example.org/crash/workload";
    server.register_own_uid(&node.spiffe_id, id, &[])?;
    node.wait_for_svid(id)?;
    let bundle = server.cli_ok(&["bundle", "show", "--format", "pem"])?;

    let load = Load::start(
        server.admin_socket.display().to_string(),
        node.socket_arg(),
        node.spiffe_id.clone(),
    );
    let result = (|| -> anyhow::Result<()> {
        for round in 1..=rounds {
            let before = load.done();
            std::thread::sleep(Duration::from_millis(rng.random_range(LOAD_MS)));
            sigkill(&mut server)?;
            server
                .restart()
                .with_context(|| format!("round {round}: restart"))?;
            load.pause()?;
            check(&server, &node, &load, &bundle, &export)
                .with_context(|| format!("round {round} (AGENTD_CRASH_SEED={seed})"))?;
            let after = load.done();
            eprintln!(
                "round {round}: ok at {:.1} s (fetches {}, entry creates {}, revokes {})",
                started.elapsed().as_secs_f64(),
                after[0] - before[0],
                after[1] - before[1],
                after[2] - before[2]
            );
            load.resume();
        }
        Ok(())
    })();
    let (revoked, entries) = load.reported();
    load.finish();
    result.map_err(|e| anyhow::anyhow!("{e:#}\nserver log:\n{}", server.daemon.log_text()))?;
    eprintln!(
        "crash test: {rounds} kills in {:.1} s; {} revocations and {} entries reported done, all kept",
        started.elapsed().as_secs_f64(),
        revoked.len(),
        entries.len()
    );
    // The load did reach the server: a run where every operation failed proves nothing.
    ensure!(
        revoked.len() >= rounds && !entries.is_empty(),
        "too little load got through: {} revocations, {} entries",
        revoked.len(),
        entries.len()
    );
    Ok(())
}
