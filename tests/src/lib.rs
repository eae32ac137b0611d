//! Harness for end-to-end tests: starts real `agentd server` and `agentd node` processes in
//! a temp dir (port 0, per-test sockets), drives the real CLI, and kills everything on drop.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

pub mod pg;

/// The `agentd` binary, built once per test run if it is missing or stale.
pub fn agentd_bin() -> PathBuf {
    built_bin_dir().join("agentd")
}

/// The `agentd-node` binary (the node agent alone), built with `agentd`.
pub fn agentd_node_bin() -> PathBuf {
    built_bin_dir().join("agentd-node")
}

/// Where cargo put both binaries, after building them once per test run.
fn built_bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        // Always ask cargo: it is a no-op when the binaries are up to date.
        let status = cargo_command()
            .args(["build", "-q", "-p", "agentd", "--bin", "agentd"])
            .args(["--bin", "agentd-node"])
            .current_dir(&root)
            .status()
            .expect("running cargo build for the agentd binaries");
        assert!(status.success(), "building agentd failed");
        target.join("debug")
    })
}

/// `cargo` (the one running the tests, if any) for a nested build, without the per-package
/// variables cargo sets for a test process: build scripts that watch them (ring's watches
/// `CARGO_PKG_NAME`) would otherwise rebuild on every switch between the outer and the
/// nested cargo.
pub fn cargo_command() -> Command {
    const PER_PACKAGE: &[&str] = &[
        "CARGO_PKG_",
        "CARGO_MANIFEST_",
        "CARGO_BIN_",
        "CARGO_CRATE_",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "CARGO_RUSTC_CURRENT_DIR",
        "OUT_DIR",
    ];
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    for (name, _) in std::env::vars_os() {
        if let Some(name) = name.to_str() {
            if PER_PACKAGE.iter().any(|p| name.starts_with(p)) {
                cmd.env_remove(name);
            }
        }
    }
    cmd
}

/// A running daemon; killed (and reaped) on drop. Its stderr goes to a log file that the
/// test prints when it fails.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Daemon {
    fn spawn(args: &[String], log: PathBuf) -> anyhow::Result<Self> {
        Self::spawn_program(&agentd_bin(), args, log)
    }

    fn spawn_program(program: &Path, args: &[String], log: PathBuf) -> anyhow::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .context("spawning agentd")?;
        Ok(Self {
            child: Some(child),
            log,
        })
    }

    /// Starts `agentd` with any arguments, logging to `log`.
    pub fn spawn_args(args: &[&str], log: PathBuf) -> anyhow::Result<Self> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        Self::spawn(&args, log)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGTERM, then wait (bounded); SIGKILL if it does not stop. Returns the exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        child.wait().ok()
    }

    /// Waits for the process to exit by itself (bounded).
    pub fn wait_exit(&mut self, within: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let child = self.child.as_mut().ok_or_else(|| anyhow!("not running"))?;
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("process did not exit within {within:?}")
    }

    /// Waits until this node agent process answers `agentd healthcheck` on `socket`; fails
    /// with its log if it exits or takes longer than 20 s.
    pub fn wait_node_healthy(&mut self, socket: &Path) -> anyhow::Result<()> {
        let sock = socket.display().to_string();
        let ok = wait_until(Duration::from_secs(20), || {
            !self.is_running()
                || agentd(&["healthcheck", "--socket-path", &sock])
                    .status
                    .success()
        });
        if !ok || !self.is_running() {
            bail!("node agent did not become healthy:\n{}", self.log_text());
        }
        Ok(())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs the CLI to completion.
pub fn agentd(args: &[&str]) -> Output {
    Command::new(agentd_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running agentd")
}

/// Runs the CLI and returns stdout; fails with stderr when the command fails.
pub fn agentd_ok(args: &[&str]) -> anyhow::Result<String> {
    let out = agentd(args);
    if !out.status.success() {
        bail!(
            "agentd {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Polls `f` until it returns true or `within` passes.
pub fn wait_until(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A test's private directory; removed on drop.
#[derive(Debug)]
pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Self {
        // Short paths: Unix socket paths are limited to 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("agentd-e2e-")
            .tempdir_in("/tmp")
            .expect("temp dir");
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Default for Env {
    fn default() -> Self {
        Self::new()
    }
}

/// A server process and how to reach it.
#[derive(Debug)]
pub struct Server {
    pub data_dir: PathBuf,
    pub admin_socket: PathBuf,
    /// HOST:PORT of the node API.
    pub address: String,
    pub daemon: Daemon,
    extra: Vec<String>,
}

impl Server {
    /// Starts a server on 127.0.0.1 with a free port, and waits until it answers.
    pub fn start(env: &Env) -> anyhow::Result<Self> {
        Self::start_with(env, &[])
    }

    pub fn start_with(env: &Env, extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_in(
            env.path().join("server"),
            env.path().join("admin.sock"),
            extra,
        )
    }

    /// A server of its own in `env` (data dir `env/NAME`, admin socket `env/NAME.sock`):
    /// one of several servers of a deployment.
    pub fn start_named(env: &Env, name: &str, extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_in(
            env.path().join(name),
            env.path().join(format!("{name}.sock")),
            extra,
        )
    }

    fn start_in(data_dir: PathBuf, admin_socket: PathBuf, extra: &[&str]) -> anyhow::Result<Self> {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let (daemon, address) = Self::launch(&data_dir, &admin_socket, "127.0.0.1:0", &extra)?;
        Ok(Self {
            data_dir,
            admin_socket,
            address,
            daemon,
            extra,
        })
    }

    fn launch(
        data_dir: &Path,
        admin_socket: &Path,
        bind: &str,
        extra: &[String],
    ) -> anyhow::Result<(Daemon, String)> {
        let mut args: Vec<String> = vec![
            "server".into(),
            "run".into(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--admin-socket".into(),
            admin_socket.display().to_string(),
            "--bind-address".into(),
            bind.into(),
        ];
        args.extend(extra.iter().cloned());
        let log = data_dir.with_extension("log");
        let mut daemon = Daemon::spawn(&args, log)?;
        let sock = admin_socket.display().to_string();
        let mut address = None;
        let ok = wait_until(Duration::from_secs(20), || {
            if !daemon.is_running() {
                return true;
            }
            let out = agentd(&["healthcheck", "--admin-socket", &sock, "--output", "json"]);
            if out.status.success() {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
                address = v["node_api_address"].as_str().map(str::to_string);
                return address.is_some();
            }
            false
        });
        match address {
            Some(a) if ok => Ok((daemon, a)),
            _ => bail!("server did not become healthy:\n{}", daemon.log_text()),
        }
    }

    /// Stops the server (SIGTERM).
    pub fn stop(&mut self) {
        self.daemon.stop();
    }

    /// Starts the server again on the same data dir and port.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.daemon.stop();
        let (daemon, address) = Self::launch(
            &self.data_dir,
            &self.admin_socket,
            &self.address,
            &self.extra,
        )?;
        self.daemon = daemon;
        anyhow::ensure!(address == self.address, "server came back on {address}");
        Ok(())
    }

    /// Starts the server again on the same data dir and port with other extra flags.
    pub fn restart_with(&mut self, extra: &[&str]) -> anyhow::Result<()> {
        self.extra = extra.iter().map(|s| s.to_string()).collect();
        self.restart()
    }

    /// Starts the server again on the same data dir at another address (`bind`,
    /// HOST:PORT), as a second server of the same deployment would answer there.
    pub fn restart_at(&mut self, bind: &str) -> anyhow::Result<()> {
        self.daemon.stop();
        let (daemon, address) =
            Self::launch(&self.data_dir, &self.admin_socket, bind, &self.extra)?;
        self.daemon = daemon;
        self.address = address;
        Ok(())
    }

    /// Kills the server with SIGKILL (no shutdown of any kind) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.daemon.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Runs an admin command against this server (`--admin-socket` appended).
    pub fn cli(&self, args: &[&str]) -> Output {
        let sock = self.admin_socket.display().to_string();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--admin-socket", &sock]);
        agentd(&all)
    }

    pub fn cli_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.cli(args);
        if !out.status.success() {
            bail!(
                "agentd {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn join_token(&self, node_id: &str) -> anyhow::Result<String> {
        Ok(self
            .cli_ok(&["token", "generate", "--spiffe-id", node_id])?
            .trim()
            .to_string())
    }

    /// Writes the trust bundle (PEM) into `path`.
    pub fn write_bundle(&self, path: &Path) -> anyhow::Result<()> {
        std::fs::write(path, self.cli_ok(&["bundle", "show", "--format", "pem"])?)?;
        Ok(())
    }

    /// Registers this test process (its uid) as `spiffe_id` under `parent_id`; `extra` are
    /// more `entry create` flags. Returns the entry id.
    pub fn register_own_uid(
        &self,
        parent_id: &str,
        spiffe_id: &str,
        extra: &[&str],
    ) -> anyhow::Result<String> {
        let selector = format!("unix:uid:{}", current_uid());
        let mut args = vec![
            "--parent-id",
            parent_id,
            "--spiffe-id",
            spiffe_id,
            "--selector",
            &selector,
        ];
        args.extend_from_slice(extra);
        self.create_entry(&args)
    }

    /// Creates an entry; returns its id.
    pub fn create_entry(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["entry", "create"];
        all.extend_from_slice(args);
        Ok(self.cli_ok(&all)?.trim().to_string())
    }
}

/// Starts `agentd node run` verifying the server with `bundle`; returns without waiting.
pub fn spawn_node(
    server_address: &str,
    bundle: &Path,
    data_dir: &Path,
    socket: &Path,
    token: Option<&str>,
) -> anyhow::Result<Daemon> {
    spawn_node_with(server_address, bundle, data_dir, socket, token, &[])
}

/// [`spawn_node`] with more `node run` flags.
pub fn spawn_node_with(
    server_address: &str,
    bundle: &Path,
    data_dir: &Path,
    socket: &Path,
    token: Option<&str>,
    extra: &[&str],
) -> anyhow::Result<Daemon> {
    spawn_node_program(
        NodeProgram::Agentd,
        server_address,
        bundle,
        data_dir,
        socket,
        token,
        extra,
    )
}

/// The program a node agent runs as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeProgram {
    /// `agentd node run`.
    Agentd,
    /// `agentd-node run`, the node-only build.
    AgentdNode,
}

/// [`spawn_node_with`], run as `program`.
pub fn spawn_node_program(
    program: NodeProgram,
    server_address: &str,
    bundle: &Path,
    data_dir: &Path,
    socket: &Path,
    token: Option<&str>,
    extra: &[&str],
) -> anyhow::Result<Daemon> {
    let (bin, mut args): (PathBuf, Vec<String>) = match program {
        NodeProgram::Agentd => (agentd_bin(), vec!["node".into(), "run".into()]),
        NodeProgram::AgentdNode => (agentd_node_bin(), vec!["run".into()]),
    };
    args.extend([
        "--server-address".into(),
        server_address.into(),
        "--trust-bundle".into(),
        bundle.display().to_string(),
        "--data-dir".into(),
        data_dir.display().to_string(),
        "--socket-path".into(),
        socket.display().to_string(),
        "--log-level".into(),
        "debug".into(),
    ]);
    // A short sync interval unless the test sets its own.
    if !extra.contains(&"--sync-interval") {
        args.extend(["--sync-interval".into(), "1s".into()]);
    }
    if let Some(t) = token {
        args.extend(["--join-token".into(), t.into()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    Daemon::spawn_program(&bin, &args, data_dir.with_extension("log"))
}

/// The uid of this test process (from /proc, no libc).
pub fn current_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .expect("reading the owner of /proc/self (is /proc mounted?)")
}

/// A `Command` for the `openssl` binary, which several tests use as an independent verifier.
/// Without it the test fails naming it (scripts/install-tools.sh, run by `make test`,
/// installs it) rather than failing on a bare "No such file or directory".
pub fn openssl() -> Command {
    match Command::new("openssl").arg("version").output() {
        Ok(o) if o.status.success() => Command::new("openssl"),
        Ok(o) => panic!(
            "`openssl version` failed ({}): this test verifies agentd's output with OpenSSL; install it (scripts/install-tools.sh)",
            o.status
        ),
        Err(e) => panic!(
            "the openssl binary is missing ({e}): this test verifies agentd's output with OpenSSL; install it (scripts/install-tools.sh)"
        ),
    }
}

/// A self-signed CA certificate of trust domain `td` (URI SAN `spiffe://TD`, as SPIFFE CAs
/// carry), made with OpenSSL in `dir`; returns the PEM file. A foreign trust domain's bundle
/// for `agentd bundle set`.
pub fn foreign_ca_pem(dir: &Path, td: &str) -> anyhow::Result<PathBuf> {
    let cert = dir.join(format!("{td}-ca.pem"));
    let key = dir.join(format!("{td}-ca.key"));
    let out = openssl()
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "2", "-subj", &format!("/CN={td} CA")])
        .args(["-addext", "basicConstraints=critical,CA:TRUE"])
        .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        .args(["-addext", &format!("subjectAltName=URI:spiffe://{td}")])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()?;
    if !out.status.success() {
        bail!(
            "openssl req failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(cert)
}

/// A 127.0.0.1 port nothing listens on at the moment (bound, read, released).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A node agent process.
#[derive(Debug)]
pub struct Node {
    pub spiffe_id: String,
    pub data_dir: PathBuf,
    pub socket: PathBuf,
    pub bundle: PathBuf,
    pub server_address: String,
    pub daemon: Daemon,
}

impl Node {
    /// Generates a join token and starts a node agent with it, verifying the server with
    /// its PEM bundle; waits until it is healthy.
    pub fn start(env: &Env, server: &Server, name: &str) -> anyhow::Result<Self> {
        Self::start_with(env, server, name, &[])
    }

    /// [`Node::start`] with more `node run` flags.
    pub fn start_with(
        env: &Env,
        server: &Server,
        name: &str,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        Self::start_program(env, server, name, NodeProgram::Agentd, extra)
    }

    /// [`Node::start_with`], run as `program`.
    pub fn start_program(
        env: &Env,
        server: &Server,
        name: &str,
        program: NodeProgram,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let spiffe_id = format!("spiffe://example.org/node/{name}");
        let token = server.join_token(&spiffe_id)?;
        let bundle = env.path().join(format!("{name}-bundle.pem"));
        server.write_bundle(&bundle)?;
        let data_dir = env.path().join(name);
        let socket = env.path().join(format!("{name}.sock"));
        let daemon = spawn_node_program(
            program,
            &server.address,
            &bundle,
            &data_dir,
            &socket,
            Some(&token),
            extra,
        )?;
        let mut node = Self {
            spiffe_id,
            data_dir,
            socket,
            bundle,
            server_address: server.address.clone(),
            daemon,
        };
        node.wait_healthy()?;
        Ok(node)
    }

    /// A node agent `name` (`spiffe://example.org/node/NAME`) given `addresses` (one or a
    /// comma-separated list), attesting with `token` and verifying the servers with the
    /// bundle `bundle_from` serves now; waits until it is healthy.
    pub fn start_at(
        env: &Env,
        name: &str,
        addresses: &str,
        bundle_from: &Server,
        token: &str,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let bundle = env.path().join(format!("{name}-bundle.pem"));
        bundle_from.write_bundle(&bundle)?;
        let data_dir = env.path().join(name);
        let socket = env.path().join(format!("{name}.sock"));
        let daemon = spawn_node_with(addresses, &bundle, &data_dir, &socket, Some(token), extra)?;
        let mut node = Self {
            spiffe_id: format!("spiffe://example.org/node/{name}"),
            data_dir,
            socket,
            bundle,
            server_address: addresses.to_string(),
            daemon,
        };
        node.wait_healthy()?;
        Ok(node)
    }

    /// A node agent `name` of another trust domain `td` (`spiffe://TD/node/NAME`) on `server`
    /// (a server of that trust domain); waits until it is healthy.
    pub fn start_in_domain(
        env: &Env,
        server: &Server,
        name: &str,
        td: &str,
    ) -> anyhow::Result<Self> {
        let spiffe_id = format!("spiffe://{td}/node/{name}");
        let token = server.join_token(&spiffe_id)?;
        let mut node = Self::start_at(env, name, &server.address, server, &token, &[])?;
        node.spiffe_id = spiffe_id;
        Ok(node)
    }

    /// Starts another node agent process on this node's data dir; returns without waiting.
    pub fn launch(&self, token: Option<&str>) -> anyhow::Result<Daemon> {
        spawn_node(
            &self.server_address,
            &self.bundle,
            &self.data_dir,
            &self.socket,
            token,
        )
    }

    pub fn wait_healthy(&mut self) -> anyhow::Result<()> {
        self.daemon.wait_node_healthy(&self.socket)
    }

    /// Stops and starts the node agent again, without a join token.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.daemon.stop();
        self.daemon = self.launch(None)?;
        self.wait_healthy()
    }

    /// `unix:///...` for SPIFFE clients.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    pub fn socket_arg(&self) -> String {
        self.socket.display().to_string()
    }

    /// `agentd api fetch x509 --output json` against this node agent.
    pub fn fetch_x509(&self) -> Output {
        agentd(&[
            "api",
            "fetch",
            "x509",
            "--socket-path",
            &self.socket_arg(),
            "--output",
            "json",
        ])
    }

    /// Waits until `api fetch x509` returns an SVID for `spiffe_id`.
    pub fn wait_for_svid(&self, spiffe_id: &str) -> anyhow::Result<()> {
        let sock = self.socket_arg();
        let ok = wait_until(Duration::from_secs(20), || {
            let out = agentd(&[
                "api",
                "fetch",
                "x509",
                "--socket-path",
                &sock,
                "--output",
                "json",
            ]);
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains(spiffe_id)
        });
        if !ok {
            bail!("no SVID for {spiffe_id}:\n{}", self.daemon.log_text());
        }
        Ok(())
    }

    /// `agentd api ARGS --output json` against this node agent, parsed.
    pub fn api_json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let sock = self.socket_arg();
        let mut all = vec!["api"];
        all.extend_from_slice(args);
        all.extend(["--socket-path", &sock, "--output", "json"]);
        let out = agentd(&all);
        if !out.status.success() {
            bail!("api {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Waits (up to 20 s) until this node agent serves a JWT-SVID through grant `id` (the
    /// grant reached it).
    pub fn wait_for_grant(&self, id: &str) -> anyhow::Result<()> {
        let held = wait_until(Duration::from_secs(20), || {
            self.api_json(&["fetch", "jwt", "--audience", "probe", "--grant", id])
                .is_ok()
        });
        if !held {
            bail!("node agent {} never held grant {id}", self.spiffe_id);
        }
        Ok(())
    }

    /// Delegates `scope` of `grant` (held here) to `to_agent` on node agent `to`, through
    /// both node agents' delegation service (`api delegate`, then `api exchange`); waits
    /// until `to` holds the child grant and returns its id.
    pub fn delegate_to(
        &self,
        to: &Node,
        to_agent: &str,
        scope: &str,
        grant: &str,
    ) -> anyhow::Result<String> {
        let offer = self.api_json(&[
            "delegate", "--to", to_agent, "--scope", scope, "--grant", grant,
        ])?;
        let token = offer["token"].as_str().context("no token in the offer")?;
        let x = to.api_json(&["exchange", "--token", token])?;
        let child = x["grant_id"]
            .as_str()
            .context("no grant_id in the exchange")?
            .to_string();
        to.wait_for_grant(&child)?;
        Ok(child)
    }
}

/// The metrics endpoint a daemon started with `--metrics-address HOST:0` bound: read from the
/// last "metrics endpoint listening" line of its log (text or JSON format). Waits up to 20 s.
pub fn metrics_address(daemon: &Daemon) -> anyhow::Result<String> {
    let mut found = None;
    wait_until(Duration::from_secs(20), || {
        found = daemon
            .log_text()
            .lines()
            .rev()
            .filter(|l| l.contains("metrics endpoint listening"))
            .find_map(|l| {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(l) {
                    return v["fields"]["address"].as_str().map(str::to_string);
                }
                let rest = &l[l.find("address=")? + "address=".len()..];
                Some(rest.split_whitespace().next()?.to_string())
            });
        found.is_some()
    });
    found.ok_or_else(|| anyhow!("no metrics endpoint in the log:\n{}", daemon.log_text()))
}

/// A plain HTTP/1.1 GET (the way a scraper or a load balancer probe asks); returns the
/// status code and the body.
pub fn http_get(address: &str, path: &str) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(address)
        .with_context(|| format!("connecting to {address}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no HTTP response from {address}: {raw:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("bad status line from {address}: {head:?}"))?;
    Ok((status, body.to_string()))
}

/// The value of one sample in a Prometheus/OpenMetrics text exposition, by its exact name
/// and labels as written (`agentd_node_syncs_total`, `x_total{type="x509"}`).
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// A certificate's serial number, lowercase hex without leading zeros (as agentd prints it).
pub fn serial_of(der: &[u8]) -> String {
    let (_, c) = x509_parser::parse_x509_certificate(der).expect("leaf parses");
    c.tbs_certificate.serial.to_str_radix(16)
}

/// The `spiffe` crate's `X509Source` on a node agent's socket, with the default picker.
pub async fn x509_source(node: &Node) -> anyhow::Result<spiffe::X509Source> {
    Ok(spiffe::X509Source::builder()
        .endpoint(node.endpoint())
        .initial_sync_timeout(Duration::from_secs(20))
        .build()
        .await?)
}

/// Where `scripts/install-tools.sh` (run by `make test` and CI) puts the third-party clients
/// the interop tests drive: a venv with py-spiffe and grpcio, and Node's grpc-js.
pub fn interop_dir() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("interop")
}

/// The venv's `python` with py-spiffe and grpcio. Fails, naming what is missing and how to
/// get it, when the venv is not there: a missing client is a failure, never a skip.
pub fn interop_python() -> anyhow::Result<PathBuf> {
    let python = interop_dir().join("venv/bin/python");
    if !python.exists() {
        bail!(
            "py-spiffe is not installed: {} is missing; run `make tools` \
             (scripts/install-tools.sh installs spiffe and grpcio into that venv)",
            python.display()
        );
    }
    Ok(python)
}

/// `node` with `NODE_PATH` at the installed @grpc/grpc-js and @grpc/proto-loader.
pub fn interop_node() -> anyhow::Result<Command> {
    let modules = interop_dir().join("node/node_modules");
    if !modules.join("@grpc/grpc-js").exists() {
        bail!(
            "@grpc/grpc-js is not installed: {} is missing; run `make tools` \
             (scripts/install-tools.sh installs it with npm)",
            modules.join("@grpc/grpc-js").display()
        );
    }
    let mut cmd = Command::new("node");
    cmd.env("NODE_PATH", modules);
    Ok(cmd)
}

/// The checked-in directory of a test asset (`tests/interop/...`, `examples/...`).
pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// Runs a client program to completion (at most `within`) and parses the one JSON object it
/// prints; fails with its stderr when it exits non-zero.
pub fn run_json_client(mut cmd: Command, within: Duration) -> anyhow::Result<serde_json::Value> {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {shown}"))?;
    let deadline = Instant::now() + within;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            bail!(
                "{shown} did not finish within {within:?}; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "{shown} printed no JSON: {:?}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Waits (up to 30 s) until `node`'s log says it received an X.509-SVID for `spiffe_id`: the
/// event that a sync begun after that entry was created has reached its mint step. For
/// entries no process of the test matches, which `Node::wait_for_svid` cannot see.
pub fn wait_for_mint_in_log(node: &Node, spiffe_id: &str) -> anyhow::Result<()> {
    let minted = wait_until(Duration::from_secs(30), || {
        node.daemon
            .log_text()
            .lines()
            .any(|l| l.contains("X.509-SVID received") && l.contains(spiffe_id))
    });
    if !minted {
        bail!(
            "{} never logged an SVID for {spiffe_id}:\n{}",
            node.spiffe_id,
            node.daemon.log_text()
        );
    }
    Ok(())
}

/// Waits until `node` has completed a whole sync that began after this call, in place of
/// sleeping "long enough" (which passes without having checked anything on a slow machine).
/// Two marker entries (for a uid no process has) are created one after the other: the second
/// cannot be in the entry list of the sync that minted the first, so when it is minted that
/// sync, entries, mints and all, is over. `tag` keeps marker IDs apart within one test.
pub fn wait_for_a_full_sync(server: &Server, node: &Node, tag: &str) -> anyhow::Result<()> {
    let name = node
        .spiffe_id
        .rsplit('/')
        .next()
        .unwrap_or("node")
        .to_string();
    for i in 0..2 {
        let marker = format!("spiffe://example.org/sync-marker/{name}/{tag}-{i}");
        server.create_entry(&[
            "--parent-id",
            &node.spiffe_id,
            "--spiffe-id",
            &marker,
            "--selector",
            "unix:uid:4294967001",
        ])?;
        wait_for_mint_in_log(node, &marker)?;
    }
    Ok(())
}
