//! The example programs in examples/ (what users copy) run against a real node agent.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

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

/// `make demo-delegation`: the script in examples/delegation/ runs the whole flow with real
/// processes; the tool server built on the verifier allows the scheduler's calendar:read
/// and refuses its crm:read and payments:execute calls, saying why.
#[test]
fn delegation_example_allows_and_refuses_the_right_calls() -> anyhow::Result<()> {
    let bins = example_bins();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(root.join("examples/delegation/run.sh"))
        .env("AGENTD_BIN", agentd_e2e::agentd_bin())
        .env("EXAMPLES_BIN_DIR", &bins)
        .env_remove("SPIFFE_ENDPOINT_SOCKET")
        .stdin(Stdio::null())
        .output()?;
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "run.sh failed:\n{stdout}\n{}",
        text(&out.stderr)
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
