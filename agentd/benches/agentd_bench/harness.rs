//! What the online figures (b) to (e) share: the server in-process, the node agent as a
//! child process, entries and join tokens through the admin API, Workload API clients and
//! latency percentiles.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentd::cli::connect::{add_header, unix_channel, HeaderFn, WorkloadClient};
use agentd::clock::SystemClock;
use agentd::server::{RawServerConfig, Server, ServerConfig};
use agentd_proto::admin as apb;
use agentd_proto::admin::admin_client::AdminClient;
use agentd_proto::workload as wpb;
use agentd_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use anyhow::{anyhow, bail, Context};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::TRUST_DOMAIN;

/// Kills and reaps the child process when dropped, whatever the exit path.
#[derive(Debug)]
pub struct ChildGuard {
    pub child: Child,
    pub log: PathBuf,
}

impl ChildGuard {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails (with the end of its log) if the process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "the node agent exited ({status}); its log ends with:\n{}",
                tail.join("\n")
            );
        }
        Ok(())
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The in-process server; cancelled when dropped.
#[derive(Debug)]
pub struct ServerGuard {
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<(), agentd::server::ServerError>>>,
}

impl ServerGuard {
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            task.await??;
        }
        Ok(())
    }
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub async fn start_server(dir: &Path) -> anyhow::Result<(ServerGuard, AdminClient<Channel>)> {
    start_server_with(dir, Some(fleet_limits(crate::revocation::FEED_SUBSCRIBERS))).await
}

/// Node API limits for `nodes` simulated node agents that all connect from 127.0.0.1: each
/// holds its stream, with room for attestation connections closing meanwhile, and their
/// attestations are not rate-limited as one source's would be.
pub fn fleet_limits(nodes: usize) -> agentd::server::config::RawNodeApi {
    agentd::server::config::RawNodeApi {
        max_connections: Some(2 * nodes + 100),
        max_connections_per_source: Some(2 * nodes + 100),
        max_handshakes_per_source: Some(64),
        attest_requests_per_source_per_minute: Some(1_000_000),
        ..Default::default()
    }
}

/// [`start_server`] with other node API limits (the scale figures connect thousands of
/// simulated nodes from one address).
pub async fn start_server_with(
    dir: &Path,
    node_api: Option<agentd::server::config::RawNodeApi>,
) -> anyhow::Result<(ServerGuard, AdminClient<Channel>)> {
    start_server_on(dir, node_api, None).await
}

/// [`start_server_with`] on a datastore URL (PostgreSQL) instead of the embedded store.
pub async fn start_server_on(
    dir: &Path,
    node_api: Option<agentd::server::config::RawNodeApi>,
    datastore: Option<String>,
) -> anyhow::Result<(ServerGuard, AdminClient<Channel>)> {
    start_server_full(dir, node_api, datastore, None).await
}

/// [`start_server_on`] with the OAuth front door configured as `oauth` says.
pub async fn start_server_full(
    dir: &Path,
    node_api: Option<agentd::server::config::RawNodeApi>,
    datastore: Option<String>,
    oauth: Option<agentd::server::oauth::config::RawOAuth>,
) -> anyhow::Result<(ServerGuard, AdminClient<Channel>)> {
    let admin_socket = dir.join("admin").join("admin.sock");
    let config = ServerConfig::try_from(RawServerConfig {
        trust_domain: Some(TRUST_DOMAIN.into()),
        data_dir: Some(dir.join("server")),
        bind_address: Some("127.0.0.1:0".into()),
        admin_socket: Some(admin_socket.clone()),
        node_api,
        datastore: datastore.map(|url| agentd::server::config::RawDatastore { url: Some(url) }),
        oauth,
        ..Default::default()
    })?;
    let stop = CancellationToken::new();
    let mut guard = ServerGuard {
        stop: stop.clone(),
        task: Some(tokio::spawn(
            Server::new(config, Arc::new(SystemClock)).run(stop),
        )),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if guard.task.as_ref().is_some_and(|t| t.is_finished()) {
            if let Some(task) = guard.task.take() {
                task.await??;
            }
            bail!("the server stopped before it was ready");
        }
        if admin_socket.exists() {
            if let Ok(ch) = unix_channel(&admin_socket).await {
                let mut admin = AdminClient::new(ch);
                if admin
                    .get_server_info(apb::GetServerInfoRequest {})
                    .await
                    .is_ok()
                {
                    return Ok((guard, admin));
                }
            }
        }
        if Instant::now() > deadline {
            bail!("the server did not answer on its admin socket within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The server's node API address and its bundle, through the admin API.
pub async fn address_and_bundle(
    admin: &mut AdminClient<Channel>,
) -> anyhow::Result<(String, apb::Bundle)> {
    let info = admin
        .get_server_info(apb::GetServerInfoRequest {})
        .await?
        .into_inner();
    let bundle = admin
        .get_bundle(apb::GetBundleRequest {})
        .await?
        .into_inner();
    Ok((info.node_api_address, bundle))
}

pub async fn create_entries(
    admin: &mut AdminClient<Channel>,
    parent_id: &str,
    prefix: &str,
    range: std::ops::Range<usize>,
    selector: &str,
) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::with_capacity(range.len());
    for i in range {
        let entry = admin
            .create_entry(apb::EntrySpec {
                spiffe_id: format!("spiffe://{TRUST_DOMAIN}/{prefix}/{i}"),
                parent_id: parent_id.into(),
                selectors: vec![selector.into()],
                ..Default::default()
            })
            .await
            .map_err(|s| anyhow!("creating an entry: {}", s.message()))?
            .into_inner();
        ids.push(entry.id);
    }
    Ok(ids)
}

pub async fn join_token(
    admin: &mut AdminClient<Channel>,
    spiffe_id: &str,
) -> anyhow::Result<String> {
    Ok(admin
        .create_join_token(apb::CreateJoinTokenRequest {
            spiffe_id: spiffe_id.into(),
            ttl_seconds: 0,
        })
        .await
        .map_err(|s| anyhow!("creating a join token: {}", s.message()))?
        .into_inner()
        .token)
}

/// What starting a node agent child process needs.
#[derive(Debug)]
pub struct NodeEnv<'a> {
    pub dir: &'a Path,
    pub address: &'a str,
    pub bundle_file: &'a Path,
}

/// Which build of the node agent a bench starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeBuild {
    /// `agentd node run`: the one binary with server, node agent and CLI.
    Full,
    /// `agentd-node run`: the node-only build a node host installs.
    NodeOnly,
}

impl NodeEnv<'_> {
    /// Starts `agentd node run` (release binary) attesting as `spiffe://<td>/node/<name>`;
    /// returns it and its Workload API socket.
    pub async fn start_node(
        &self,
        admin: &mut AdminClient<Channel>,
        name: &str,
    ) -> anyhow::Result<(ChildGuard, PathBuf)> {
        self.start_node_build(admin, name, NodeBuild::Full).await
    }

    /// [`Self::start_node`], with either build.
    pub async fn start_node_build(
        &self,
        admin: &mut AdminClient<Channel>,
        name: &str,
        build: NodeBuild,
    ) -> anyhow::Result<(ChildGuard, PathBuf)> {
        let token = join_token(admin, &format!("spiffe://{TRUST_DOMAIN}/node/{name}")).await?;
        let node_dir = self.dir.join(name);
        std::fs::create_dir_all(&node_dir)?;
        let log = node_dir.join("node.log");
        let socket = node_dir.join("api.sock");
        let mut command = match build {
            NodeBuild::Full => {
                let mut c = Command::new(env!("CARGO_BIN_EXE_agentd"));
                c.args(["node", "run"]);
                c
            }
            NodeBuild::NodeOnly => {
                let mut c = Command::new(env!("CARGO_BIN_EXE_agentd-node"));
                c.arg("run");
                c
            }
        };
        let child = command
            .args(["--server-address", self.address])
            .args(["--join-token", &token])
            .arg("--trust-bundle")
            .arg(self.bundle_file)
            .arg("--data-dir")
            .arg(node_dir.join("data"))
            .arg("--socket-path")
            .arg(&socket)
            .args(["--sync-interval", "1s"])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting the node agent ({build:?})"))?;
        Ok((ChildGuard { child, log }, socket))
    }
}

// ---------------------------------------------------------------------------------------
// The Workload API of a real node agent

/// A client on its own connection, as each workload has.
pub async fn workload_client(socket: &Path) -> anyhow::Result<WorkloadClient> {
    Ok(SpiffeWorkloadApiClient::with_interceptor(
        unix_channel(socket).await?,
        add_header as HeaderFn,
    ))
}

/// Opens a FetchX509SVID stream and reads its first message.
pub async fn fetch_x509(
    client: &mut WorkloadClient,
) -> anyhow::Result<(
    wpb::X509svidResponse,
    tonic::Streaming<wpb::X509svidResponse>,
)> {
    let mut stream = client
        .fetch_x509svid(wpb::X509svidRequest {})
        .await
        .map_err(|s| anyhow!("FetchX509SVID: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    let first = stream
        .message()
        .await
        .map_err(|s| anyhow!("FetchX509SVID stream: {:?}: {}", s.code(), s.message()))?
        .ok_or_else(|| anyhow!("FetchX509SVID: the stream ended without a message"))?;
    Ok((first, stream))
}

/// Waits until the node agent serves `n` SVIDs to this process.
pub async fn wait_for_svids(node: &mut ChildGuard, socket: &Path, n: usize) -> anyhow::Result<()> {
    wait_for_svids_within(node, socket, n, Duration::from_secs(30)).await
}

/// [`wait_for_svids`], giving up after `limit`; polls every 50 ms.
pub async fn wait_for_svids_within(
    node: &mut ChildGuard,
    socket: &Path,
    n: usize,
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    let mut last = String::from("the socket is not there yet");
    loop {
        node.check_alive()?;
        if socket.exists() {
            match workload_client(socket).await {
                Ok(mut client) => match fetch_x509(&mut client).await {
                    Ok((msg, _)) if msg.svids.len() >= n => return Ok(()),
                    Ok((msg, _)) => last = format!("{} of {n} SVIDs served", msg.svids.len()),
                    Err(e) => last = e.to_string(),
                },
                Err(e) => last = e.to_string(),
            }
        }
        if Instant::now() > deadline {
            bail!(
                "the node agent did not serve {n} SVIDs within {} s: {last}",
                limit.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[derive(Debug)]
pub struct Latency {
    pub samples: usize,
    /// Calls completed per second over the timed phase.
    pub throughput: f64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// Nearest-rank percentile of sorted milliseconds.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}
