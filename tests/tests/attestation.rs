//! Workload attestation with real processes under different uids. Starting a process under
//! another uid needs root (CI and `make test` run as root); without it the uid test fails and
//! says so rather than passing without having run.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output};

use agentd_e2e::{agentd_bin, current_uid, Env, Node, Server};

/// A copy of the `agentd` binary in the test's own directory, runnable by every user: the
/// checkout (and its target dir) may sit under a directory other users cannot enter.
fn world_runnable_agentd(env: &Env) -> std::path::PathBuf {
    let copy = env.path().join("agentd-for-all");
    if !copy.exists() {
        std::fs::copy(agentd_bin(), &copy).expect("copying the agentd binary");
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    copy
}

/// Runs `agentd <args>` (the world-runnable copy) as `uid`/`gid`.
fn agentd_as(bin: &std::path::Path, uid: u32, args: &[&str]) -> Output {
    Command::new(bin)
        .args(args)
        .uid(uid)
        .gid(uid)
        .output()
        .expect("running agentd as another user")
}

fn fetched_ids(out: &Output) -> Vec<String> {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    v["svids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["spiffe_id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn each_process_gets_only_the_svids_whose_selectors_match_it() -> anyhow::Result<()> {
    assert_eq!(
        current_uid(),
        0,
        "this test starts workloads as uids 65534 and 65533 and needs root (CAP_SETUID): run it as root"
    );
    let env = Env::new();
    // Other users must reach the Workload API socket inside the test's private dir.
    std::fs::set_permissions(env.path(), std::fs::Permissions::from_mode(0o755))?;
    let server = Server::start(&env)?;
    let node = Node::start(&env, &server, "n1")?;
    let nobody = "spiffe://example.org/agent/nobody";
    let mine = "spiffe://example.org/agent/mine";
    let both = "spiffe://example.org/agent/nobody-group";
    server.create_entry(&[
        "--parent-id",
        &node.spiffe_id,
        "--spiffe-id",
        nobody,
        "--selector",
        "unix:uid:65534",
        "--hint",
        "nobody",
    ])?;
    server.create_entry(&[
        "--parent-id",
        &node.spiffe_id,
        "--spiffe-id",
        mine,
        "--selector",
        &format!("unix:uid:{}", current_uid()),
    ])?;
    // All selectors must match: uid 65534 *and* gid 65534.
    server.create_entry(&[
        "--parent-id",
        &node.spiffe_id,
        "--spiffe-id",
        both,
        "--selector",
        "unix:uid:65534",
        "--selector",
        "unix:gid:65534",
        "--hint",
        "both",
    ])?;
    node.wait_for_svid(mine)?;
    let sock = node.socket_arg();
    let fetch = [
        "api",
        "fetch",
        "x509",
        "--output",
        "json",
        "--socket-path",
        sock.as_str(),
    ];
    let bin = world_runnable_agentd(&env);

    // uid 65534: its two entries, in a stable order, and never ours.
    let mut got = Vec::new();
    assert!(agentd_e2e::wait_until(
        std::time::Duration::from_secs(15),
        || {
            let out = agentd_as(&bin, 65534, &fetch);
            out.status.success() && {
                got = fetched_ids(&out);
                got.len() == 2
            }
        }
    ));
    assert_eq!(got, [nobody, both], "sorted by SPIFFE ID");
    assert_eq!(
        fetched_ids(&agentd_as(&bin, 65534, &fetch)),
        got,
        "the same order every time"
    );

    // This process: only its own.
    assert_eq!(fetched_ids(&agentd_e2e::agentd(&fetch)), [mine]);

    // A uid with no entry: PermissionDenied, "no identity issued".
    let out = agentd_as(&bin, 65533, &fetch);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no identity issued"));

    // `api selectors` shows a process what it was attested with.
    let out = agentd_as(
        &bin,
        65534,
        &[
            "api",
            "selectors",
            "--output",
            "json",
            "--socket-path",
            &sock,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let selectors: Vec<&str> = v["selectors"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s.as_str())
        .collect();
    assert!(
        selectors.contains(&"unix:uid:65534") && selectors.contains(&"unix:gid:65534"),
        "{selectors:?}"
    );
    assert_eq!(v["spiffe_ids"], serde_json::json!([nobody, both]));
    Ok(())
}

/// Starts a node agent with a config file (the debug `agentd` binary is larger than the
/// default hashing limit, so the limit is raised).
fn node_with_config(
    env: &Env,
    server: &Server,
    name: &str,
    config: &str,
) -> anyhow::Result<(agentd_e2e::Daemon, String, String)> {
    let node_id = format!("spiffe://example.org/node/{name}");
    let token = server.join_token(&node_id)?;
    let bundle = env.path().join(format!("{name}.pem"));
    server.write_bundle(&bundle)?;
    let cfg = env.path().join(format!("{name}.toml"));
    std::fs::write(&cfg, config)?;
    let socket = env
        .path()
        .join(format!("{name}.sock"))
        .display()
        .to_string();
    let mut node = agentd_e2e::Daemon::spawn_args(
        &[
            "node",
            "run",
            "--config",
            cfg.to_str().unwrap(),
            "--server-address",
            &server.address,
            "--trust-bundle",
            bundle.to_str().unwrap(),
            "--join-token",
            &token,
            "--data-dir",
            env.path().join(name).to_str().unwrap(),
            "--socket-path",
            &socket,
            "--sync-interval",
            "1s",
        ],
        env.path().join(format!("{name}.log")),
    )?;
    node.wait_node_healthy(std::path::Path::new(&socket))?;
    Ok((node, node_id, socket))
}

fn sha256_hex(path: &std::path::Path) -> anyhow::Result<String> {
    let out = Command::new("sha256sum").arg(path).output()?;
    anyhow::ensure!(out.status.success());
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// What a workload got from `api fetch x509`.
#[derive(Debug, PartialEq)]
enum Fetched {
    /// The SPIFFE IDs of the SVIDs it was given.
    Ids(Vec<String>),
    /// The refusal the Workload API gives a caller no entry matches: PermissionDenied
    /// "no identity issued" (the CLI prints the message).
    NoIdentity,
}

/// Runs `bin api fetch x509` against `socket`. Any failure other than "no identity issued"
/// (the node down, a bad socket path, a crash) fails the test, so that a check for "no SVID"
/// cannot pass on an unrelated error.
fn ids_from(bin: &std::path::Path, socket: &str) -> Fetched {
    let out = Command::new(bin)
        .args([
            "api",
            "fetch",
            "x509",
            "--output",
            "json",
            "--socket-path",
            socket,
        ])
        .output()
        .expect("run");
    if out.status.success() {
        return Fetched::Ids(fetched_ids(&out));
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.trim(),
        "error: no identity issued",
        "{} failed for another reason than having no identity",
        bin.display()
    );
    Fetched::NoIdentity
}

#[test]
fn path_and_sha256_selectors_match_only_the_named_binary() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let (_node, node_id, socket) = node_with_config(
        &env,
        &server,
        "bin",
        "[workload_attestors.unix]\nmax_binary_size = \"2GiB\"\n",
    )?;
    let original = std::fs::canonicalize(agentd_bin())?;
    let same_bytes = env.path().join("agentd-copy");
    std::fs::copy(&original, &same_bytes)?;
    let changed = env.path().join("agentd-changed");
    std::fs::copy(&original, &changed)?;
    {
        use std::io::Write;
        // Appending to an ELF file leaves it runnable and changes its hash.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&changed)?
            .write_all(b"x")?;
    }
    let by_path = "spiffe://example.org/agent/by-path";
    let by_hash = "spiffe://example.org/agent/by-hash";
    server.create_entry(&[
        "--parent-id",
        &node_id,
        "--spiffe-id",
        by_path,
        "--selector",
        &format!("unix:path:{}", original.display()),
    ])?;
    server.create_entry(&[
        "--parent-id",
        &node_id,
        "--spiffe-id",
        by_hash,
        "--selector",
        &format!("unix:sha256:{}", sha256_hex(&original)?),
    ])?;

    let mut got = Fetched::NoIdentity;
    assert!(
        agentd_e2e::wait_until(std::time::Duration::from_secs(30), || {
            got = ids_from(&original, &socket);
            matches!(&got, Fetched::Ids(ids) if ids.len() == 2)
        }),
        "the original binary gets both: {got:?}"
    );
    assert_eq!(got, Fetched::Ids(vec![by_hash.into(), by_path.into()]));
    // Same bytes, another path: the hash matches, the path does not.
    assert_eq!(
        ids_from(&same_bytes, &socket),
        Fetched::Ids(vec![by_hash.into()])
    );
    // Another binary altogether: neither.
    assert_eq!(ids_from(&changed, &socket), Fetched::NoIdentity);
    Ok(())
}

#[test]
fn entry_selectors_are_checked_against_the_known_attestors() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let create = |sel: &str| {
        server.cli(&[
            "entry",
            "create",
            "--parent-id",
            "spiffe://example.org/node/n",
            "--spiffe-id",
            "spiffe://example.org/a",
            "--selector",
            sel,
        ])
    };
    let out = create("dockr:id:abc");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("selector") && err.contains("unix") && err.contains("container"),
        "lists the valid types: {err}"
    );
    let out = create("unix:uid:alice");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("uid"));
    let out = create("unix:sha256:xyz");
    assert!(!out.status.success());
    assert!(create("unix:uid:1000").status.success());
    Ok(())
}

/// Connects to the Workload API, forks, and once the node agent has accepted the connection
/// (its HTTP/2 SETTINGS arrived) the parent execs `victim` (same pid, start time and uid)
/// while the child relays another client's bytes onto the inherited connection.
const CONNECT_THEN_EXEC: &str = r#"
import os, select, socket, sys
agent_sock, relay_path, victim = sys.argv[1:4]
wl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
wl.connect(agent_sock)
relay = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
relay.bind(relay_path)
relay.listen(1)
r, w = os.pipe()
if os.fork() == 0:
    os.close(r)
    wl.settimeout(20)
    first = wl.recv(65536)
    if not first:
        os._exit(2)
    os.write(w, b"x")
    os.close(w)
    c, _ = relay.accept()
    c.sendall(first)
    wl.settimeout(None)
    while True:
        ready, _, _ = select.select([c, wl], [], [])
        for s in ready:
            data = s.recv(65536)
            if not data:
                os._exit(0)
            (wl if s is c else c).sendall(data)
os.close(w)
os.read(r, 1)
relay.close()
os.execv(victim, [victim, "60"])
"#;

#[test]
fn a_connection_made_before_exec_does_not_carry_the_new_binarys_identity() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let node = Node::start(&env, &server, "n1")?;
    // The "victim": a binary registered for an identity of the same uid.
    let sleep = Command::new("sh")
        .args(["-c", "command -v sleep"])
        .output()?;
    anyhow::ensure!(sleep.status.success(), "`sleep` is not installed");
    let victim = env.path().join("victim");
    std::fs::copy(String::from_utf8_lossy(&sleep.stdout).trim(), &victim)?;
    let id = "spiffe://example.org/agent/victim";
    server.create_entry(&[
        "--parent-id",
        &node.spiffe_id,
        "--spiffe-id",
        id,
        "--selector",
        &format!("unix:path:{}", victim.display()),
        "--selector",
        &format!("unix:uid:{}", current_uid()),
    ])?;
    // The node holds the victim's SVID before the attempt, so only attestation can refuse.
    anyhow::ensure!(
        agentd_e2e::wait_until(std::time::Duration::from_secs(20), || {
            node.daemon
                .log_text()
                .lines()
                .any(|l| l.contains("X.509-SVID received") && l.contains(id))
        }),
        "the node never minted the victim's SVID:\n{}",
        node.daemon.log_text()
    );
    let script = env.path().join("connect_then_exec.py");
    std::fs::write(&script, CONNECT_THEN_EXEC)?;
    let relay = env.path().join("relay.sock");
    let attacker = Command::new("python3")
        .arg(&script)
        .arg(&node.socket)
        .arg(&relay)
        .arg(&victim)
        .spawn();
    let attacker = match attacker {
        Ok(c) => c,
        Err(e) => anyhow::bail!("python3 is needed for this test and could not run: {e}"),
    };
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let attacker = Kill(attacker);
    let pid = attacker.0.id();
    let exe = format!("/proc/{pid}/exe");
    anyhow::ensure!(
        agentd_e2e::wait_until(std::time::Duration::from_secs(20), || {
            std::fs::read_link(&exe).is_ok_and(|p| p == victim) && relay.exists()
        }),
        "the helper never exec'ed the victim binary"
    );
    // The call arrives on the connection the process made before it exec'ed: refused.
    let out = agentd_e2e::agentd(&[
        "api",
        "fetch",
        "x509",
        "--output",
        "json",
        "--socket-path",
        relay.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "served on an inherited connection: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(stderr.contains("no identity issued"), "{stderr}");
    assert!(
        node.daemon.log_text().contains("exec'ed after connecting"),
        "{}",
        node.daemon.log_text()
    );
    drop(attacker);
    Ok(())
}
