//! The example programs in examples/ (what users copy) run against a real node agent.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use agentd_e2e::{cargo_command, current_uid, Env, Node, Server};

/// The directory holding the example binaries, built once (a no-op when up to date).
fn example_bins() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let status = cargo_command()
        .args(["build", "-q", "-p", "agentd-examples", "--bins"])
        .current_dir(&root)
        .status()
        .expect("running cargo build for the example binaries");
    assert!(status.success(), "building the examples failed");
    target.join("debug")
}

/// A running example program; killed (and reaped) on drop.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(bin: &Path, args: &[&str]) -> Output {
    Command::new(bin)
        .args(args)
        .env_remove("SPIFFE_ENDPOINT_SOCKET")
        .stdin(Stdio::null())
        .output()
        .expect("running an example")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn example_programs_fetch_svids_and_complete_mtls() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let node = Node::start(&env, &server, "n1")?;
    let tool = "spiffe://example.org/tool/calendar";
    let agent = "spiffe://example.org/agent/scheduler";
    for (id, hint) in [(tool, "tool"), (agent, "agent")] {
        server.create_entry(&[
            "--parent-id",
            &node.spiffe_id,
            "--spiffe-id",
            id,
            "--selector",
            &format!("unix:uid:{}", current_uid()),
            "--hint",
            hint,
        ])?;
        node.wait_for_svid(id)?;
    }
    let bins = example_bins();
    let endpoint = node.endpoint();
    // Without a hint the first identity is used: either of the two.
    let one_of_ours = |s: &str| s.contains(tool) || s.contains(agent);

    // fetch-x509 finds the node agent through SPIFFE_ENDPOINT_SOCKET, as users run it.
    let out = Command::new(bins.join("fetch-x509"))
        .env("SPIFFE_ENDPOINT_SOCKET", &endpoint)
        .stdin(Stdio::null())
        .output()?;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "fetch-x509: {}", text(&out.stderr));
    assert!(one_of_ours(&stdout), "fetch-x509 printed: {stdout}");
    assert!(stdout.contains("serial") && stdout.contains("expires"));

    let out = run(
        &bins.join("fetch-jwt"),
        &[
            "--socket",
            &endpoint,
            "--audience",
            "https://api.example.com",
        ],
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "fetch-jwt: {}", text(&out.stderr));
    assert!(one_of_ours(&stdout), "fetch-jwt printed: {stdout}");

    // mtls-server as the tool, allowing only the agent; its first stdout line is its address.
    let server_log = env.path().join("mtls-server.log");
    let mut mtls_server = Running(
        Command::new(bins.join("mtls-server"))
            .args(["--socket", &endpoint, "--addr", "127.0.0.1:0"])
            .args(["--hint", "tool", "--allow", agent])
            .env_remove("SPIFFE_ENDPOINT_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&server_log)?)
            .spawn()?,
    );
    let mut addr = String::new();
    BufReader::new(mtls_server.0.stdout.take().expect("piped stdout")).read_line(&mut addr)?;
    let addr = addr.trim().to_string();
    assert!(
        !addr.is_empty(),
        "mtls-server printed no address: {}",
        std::fs::read_to_string(&server_log)?
    );

    let client = bins.join("mtls-client");
    let message = "hello over mTLS";
    let out = run(
        &client,
        &[
            "--socket",
            &endpoint,
            "--addr",
            &addr,
            "--hint",
            "agent",
            "--server-id",
            tool,
            "--message",
            message,
        ],
    );
    assert!(
        out.status.success(),
        "mtls-client: {}\nserver: {}",
        text(&out.stderr),
        std::fs::read_to_string(&server_log)?
    );
    assert_eq!(text(&out.stdout).trim_end(), message);

    // A client that expects another server ID refuses this server.
    let out = run(
        &client,
        &[
            "--socket",
            &endpoint,
            "--addr",
            &addr,
            "--hint",
            "agent",
            "--server-id",
            "spiffe://example.org/tool/other",
            "--message",
            message,
        ],
    );
    assert!(!out.status.success(), "the wrong server ID must fail");
    assert!(!text(&out.stdout).contains(message));
    drop(mtls_server);
    Ok(())
}

/// The environment variable that marks a script's processes: everything a script starts
/// inherits it, so a live process holding it after the script has exited was left behind.
const MARKER: &str = "AGENTD_E2E_SCRIPT_MARKER";

/// A script (`scripts/demo.sh`, `examples/delegation/run.sh`) ready to run in the test's own
/// temp dir (`TMPDIR`, where the scripts put theirs) with a marker in its environment.
fn script(env: &agentd_e2e::Env, rel: &str) -> Command {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut cmd = Command::new(root.join(rel));
    cmd.env("AGENTD_BIN", agentd_e2e::agentd_bin())
        .env("TMPDIR", env.path())
        .env(MARKER, env.path())
        .env_remove("SPIFFE_ENDPOINT_SOCKET")
        .env_remove("AGENTD_ADMIN_SOCKET")
        .stdin(Stdio::null());
    cmd
}

/// The processes still alive that a script run in `env` started: those holding its marker,
/// and any whose command line names the test's temp dir. They are killed (so that a failing
/// test leaves nothing behind) and returned as `pid: command line`.
fn leftovers(env: &agentd_e2e::Env) -> Vec<String> {
    let marker = format!("{MARKER}={}", env.path().display());
    let dir = env.path().display().to_string();
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").expect("reading /proc").flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        // A zombie (or a process gone meanwhile) has neither: it is not running.
        let environ = std::fs::read(e.path().join("environ")).unwrap_or_default();
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let marked = environ.split(|b| *b == 0).any(|v| v == marker.as_bytes());
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if marked || cmdline.contains(&dir) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            found.push(format!("{pid}: {}", cmdline.trim_end()));
        }
    }
    found
}

/// What is left in the test's temp dir: the scripts remove their own temp dir on exit.
fn left_in(dir: &Path, except: &[&str]) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("reading the test dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !except.contains(&n.as_str()))
        .collect()
}

/// Starts `cmd` with stdout in `out`, waits until stdout has a line containing `when` (the
/// script's daemons are then running), sends the script SIGTERM and waits for it to exit.
fn interrupt_script(mut cmd: Command, out: &Path, when: &str) -> anyhow::Result<ExitStatus> {
    let mut child = Running(
        cmd.stdout(std::fs::File::create(out)?)
            .stderr(std::fs::File::create(out.with_extension("err"))?)
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(out)?.contains(when) {
        if let Some(status) = child.0.try_wait()? {
            anyhow::bail!(
                "the script exited ({status}) before printing {when:?}:\n{}\n{}",
                std::fs::read_to_string(out)?,
                std::fs::read_to_string(out.with_extension("err"))?
            );
        }
        anyhow::ensure!(Instant::now() < deadline, "no {when:?} within 60 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()?;
    anyhow::ensure!(status.success(), "kill -TERM failed");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.0.try_wait()? {
            return Ok(status);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the script did not exit within 30 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `make demo`: says what each step shows, and stops the server and node agent it started
/// (they do not outlive it).
#[test]
fn demo_labels_its_steps_and_leaves_no_process_behind() -> anyhow::Result<()> {
    let env = agentd_e2e::Env::new();
    let out = script(&env, "scripts/demo.sh").output()?;
    let stdout = text(&out.stdout);
    let left = leftovers(&env);
    assert!(
        out.status.success(),
        "demo.sh failed:\n{stdout}\n{}",
        text(&out.stderr)
    );
    assert!(left.is_empty(), "demo.sh left processes running: {left:?}");
    assert!(
        left_in(env.path(), &[]).is_empty(),
        "demo.sh left its temp dir"
    );

    let value = |label: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(label))
            .map(str::trim)
            .unwrap_or_default()
            .to_string()
    };
    let id = value("entry id:");
    assert!(
        id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "no labelled entry id in:\n{stdout}"
    );
    // Serials as the certificate holds them: whole octets in hex, leading zeros kept (an
    // integer printed in hex drops them, and then has an odd length one time in eight).
    for label in ["current serial:", "rotated serial:"] {
        let serial = value(label);
        assert!(
            !serial.is_empty()
                && serial.len() % 2 == 0
                && serial
                    .bytes()
                    .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
            "{label} {serial:?} is not the certificate's serial in hex:\n{stdout}"
        );
    }
    assert_ne!(value("current serial:"), value("rotated serial:"));
    let revoked = stdout
        .find("expected: no identity after revocation")
        .unwrap_or_else(|| panic!("the revocation step says nothing of what to expect:\n{stdout}"));
    assert!(
        text(&out.stderr).contains("no identity issued"),
        "the fetch after revocation did not fail with no identity: {}",
        text(&out.stderr)
    );
    assert!(stdout[..revoked].contains("Revoking the entry"), "{stdout}");
    assert!(stdout.contains("stopped the server (pid "), "{stdout}");
    assert!(stdout.contains("stopped the node agent (pid "), "{stdout}");
    Ok(())
}

/// `make demo` interrupted (Ctrl-C, a kill) while its daemons run stops them too.
#[test]
fn interrupted_demo_leaves_no_process_behind() -> anyhow::Result<()> {
    let env = agentd_e2e::Env::new();
    let out = env.path().join("demo.out");
    let status = interrupt_script(
        script(&env, "scripts/demo.sh"),
        &out,
        "Registering the current user",
    )?;
    let left = leftovers(&env);
    assert!(!status.success(), "demo.sh exited 0 after SIGTERM");
    assert!(
        left.is_empty(),
        "demo.sh left processes running after SIGTERM: {left:?}\n{}",
        std::fs::read_to_string(&out)?
    );
    assert!(
        left_in(env.path(), &["demo.out", "demo.err"]).is_empty(),
        "demo.sh left its temp dir after SIGTERM"
    );
    Ok(())
}

/// `make demo-delegation`: the script in examples/delegation/ runs the whole flow with real
/// processes; the tool server built on the verifier allows the scheduler's calendar:read
/// and refuses its crm:read and payments:execute calls, saying why. The server, node agents
/// and tool server it started do not outlive it.
#[test]
fn delegation_example_allows_and_refuses_the_right_calls() -> anyhow::Result<()> {
    let bins = example_bins();
    let env = agentd_e2e::Env::new();
    let out = script(&env, "examples/delegation/run.sh")
        .env("EXAMPLES_BIN_DIR", &bins)
        .output()?;
    let stdout = text(&out.stdout);
    let left = leftovers(&env);
    assert!(
        out.status.success(),
        "run.sh failed:\n{stdout}\n{}",
        text(&out.stderr)
    );
    assert!(left.is_empty(), "run.sh left processes running: {left:?}");
    assert!(
        left_in(env.path(), &[]).is_empty(),
        "run.sh left its temp dir"
    );
    let lines: Vec<&str> = stdout.lines().collect();
    let answer = |scope: &str| {
        let allow = format!("ALLOW {scope}:");
        let deny = format!("DENY {scope}:");
        lines
            .iter()
            .find(|l| l.starts_with(&allow) || l.starts_with(&deny))
            .map(|l| l.to_string())
            .unwrap_or_default()
    };
    let calendar = answer("calendar:read");
    assert!(
        calendar.starts_with("ALLOW calendar:read: spiffe://example.org/agent/scheduler on behalf of user:alice@example.com")
            && calendar.contains("orchestrator -> spiffe://example.org/agent/scheduler"),
        "{stdout}"
    );
    let crm = answer("crm:read");
    assert!(
        crm.starts_with("DENY crm:read: scope crm:read not held"),
        "{stdout}"
    );
    let pay = answer("payments:execute");
    assert!(
        pay.starts_with("DENY payments:execute: scope payments:execute not held"),
        "{stdout}"
    );
    // svid inspect showed the chain to a human.
    assert!(
        stdout.contains("On behalf of    : user:alice@example.com"),
        "{stdout}"
    );
    Ok(())
}

/// The delegation example interrupted while its server and node agents run stops them too.
#[test]
fn interrupted_delegation_example_leaves_no_process_behind() -> anyhow::Result<()> {
    let bins = example_bins();
    let env = agentd_e2e::Env::new();
    let out = env.path().join("run.out");
    let mut cmd = script(&env, "examples/delegation/run.sh");
    cmd.env("EXAMPLES_BIN_DIR", &bins);
    let status = interrupt_script(cmd, &out, "Entries: the scope ceilings")?;
    let left = leftovers(&env);
    assert!(!status.success(), "run.sh exited 0 after SIGTERM");
    assert!(
        left.is_empty(),
        "run.sh left processes running after SIGTERM: {left:?}\n{}",
        std::fs::read_to_string(&out)?
    );
    assert!(
        left_in(env.path(), &["run.out", "run.err"]).is_empty(),
        "run.sh left its temp dir after SIGTERM"
    );
    Ok(())
}
