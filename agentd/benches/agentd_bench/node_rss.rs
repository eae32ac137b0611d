//! (d) the resident memory of a real node agent serving 100 workloads.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agentd_proto::admin::admin_client::AdminClient;
use anyhow::{anyhow, bail, Context};
use tonic::transport::Channel;

use crate::harness::{
    create_entries, fetch_x509, wait_for_svids, workload_client, ChildGuard, NodeBuild, NodeEnv,
};
use crate::output::row;
use crate::{CLIENTS, TRUST_DOMAIN};

/// Entries (hence SVIDs) the node agent holds in (d).
const NODE_ENTRIES: usize = 100;
const RSS_NODE: &str = "bench-rss";

// Targets (docs/PERFORMANCE.md).
const TARGET_RSS_MB: f64 = 15.0;
const TARGET_RSS_1000_STREAMS_MB: f64 = 20.0;
/// Streams held open for the second figure, over `CLIENTS` connections.
const MANY_STREAMS: usize = 1_000;

/// Measures (d) on a fresh node agent of each build and prints their rows: the targets are
/// the node-only build's (`agentd-node`, what a node host installs); the full `agentd`
/// binary's figures are printed beside them.
pub async fn run(
    env: &NodeEnv<'_>,
    admin: &mut AdminClient<Channel>,
    selector: &str,
) -> anyhow::Result<()> {
    let node_only = measure(env, admin, selector, NodeBuild::NodeOnly).await?;
    let full = measure(env, admin, selector, NodeBuild::Full).await?;
    let label = if is_root() {
        "100 workload processes, 1 SVID each"
    } else {
        "1 process, 100 streams x 100 SVIDs"
    };
    row(
        &format!("(d) node agent VmRSS serving 100 workloads ({label}), agentd-node"),
        format!("{:.1} MB", node_only.serving.rss_mb),
        &format!("<= {TARGET_RSS_MB:.0} MB"),
        Some(node_only.serving.rss_mb <= TARGET_RSS_MB),
    );
    row(
        "(d) the same, the full agentd binary (agentd node run)",
        format!("{:.1} MB", full.serving.rss_mb),
        "",
        None,
    );
    row(
        "(d) agentd-node VmHWM (peak RSS) at that point",
        format!("{:.1} MB", node_only.serving.hwm_mb),
        "",
        None,
    );
    row(
        "(d) agentd-node threads at that point",
        node_only.serving.threads.to_string(),
        "",
        None,
    );
    row(
        &format!(
            "(d) node agent VmRSS with {MANY_STREAMS} FetchX509SVID streams open ({CLIENTS} connections), agentd-node"
        ),
        format!("{:.1} MB", node_only.many.rss_mb),
        &format!("<= {TARGET_RSS_1000_STREAMS_MB:.0} MB"),
        Some(node_only.many.rss_mb <= TARGET_RSS_1000_STREAMS_MB),
    );
    row(
        "(d) the same, the full agentd binary",
        format!("{:.1} MB", full.many.rss_mb),
        "",
        None,
    );
    row(
        "(d) VmRSS before the workloads connect: agentd-node / agentd",
        format!("{:.1} / {:.1} MB", node_only.idle.rss_mb, full.idle.rss_mb),
        "",
        None,
    );
    Ok(())
}

/// One build's (d) figures.
struct Measured {
    idle: ProcStatus,
    serving: ProcStatus,
    many: ProcStatus,
}

/// Starts a node agent of `build`, reads its memory idle, serving 100 workloads and holding
/// `MANY_STREAMS` streams, and stops it.
async fn measure(
    env: &NodeEnv<'_>,
    admin: &mut AdminClient<Channel>,
    selector: &str,
    build: NodeBuild,
) -> anyhow::Result<Measured> {
    // A fresh node agent serving 100 workloads. As root (as in CI), the workloads are
    // 100 real processes (`agentd api watch`), each under its own uid with its own entry, so
    // each holds one open stream with its own SVID, as 100 agent runtimes on a host would.
    // Otherwise, one process opens 100 streams that all match every entry (a worst case).
    let name = match build {
        NodeBuild::Full => RSS_NODE.to_string(),
        NodeBuild::NodeOnly => format!("{RSS_NODE}-node-only"),
    };
    let (mut node, socket) = env.start_node_build(admin, &name, build).await?;
    let parent = format!("spiffe://{TRUST_DOMAIN}/node/{name}");
    let prefix = format!("bench/{name}");
    let measured = if is_root() {
        let ready = Instant::now() + Duration::from_secs(20);
        while !socket.exists() && Instant::now() < ready {
            node.check_alive()?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let idle = proc_status(&mut node)?;
        let serving =
            node_rss_distinct_workloads(&mut node, &socket, admin, &parent, &prefix).await?;
        // And this process, with an identity of its own, for the many streams.
        create_entries(admin, &parent, &format!("{prefix}/streams"), 0..1, selector).await?;
        wait_for_svids(&mut node, &socket, 1).await?;
        let many = node_rss_many_streams(&mut node, &socket, MANY_STREAMS).await?;
        Measured {
            idle,
            serving,
            many,
        }
    } else {
        create_entries(admin, &parent, &prefix, 0..NODE_ENTRIES, selector).await?;
        wait_for_svids(&mut node, &socket, NODE_ENTRIES).await?;
        let idle = proc_status(&mut node)?;
        let (serving, _) = node_rss(&mut node, &socket).await?;
        let many = node_rss_many_streams(&mut node, &socket, MANY_STREAMS).await?;
        Measured {
            idle,
            serving,
            many,
        }
    };
    drop(node);
    Ok(measured)
}

#[derive(Debug)]
pub(crate) struct ProcStatus {
    rss_mb: f64,
    pub(crate) hwm_mb: f64,
    threads: u64,
}

/// VmRSS, VmHWM and Threads of the (live) child process.
pub(crate) fn proc_status(node: &mut ChildGuard) -> anyhow::Result<ProcStatus> {
    node.check_alive()?;
    let status = std::fs::read_to_string(format!("/proc/{}/status", node.pid()))?;
    Ok(ProcStatus {
        rss_mb: status_mb(&status, "VmRSS")?,
        hwm_mb: status_mb(&status, "VmHWM")?,
        threads: status_field(&status, "Threads")?.parse()?,
    })
}

fn status_field<'a>(status: &'a str, field: &str) -> anyhow::Result<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(str::trim)
        .ok_or_else(|| anyhow!("no {field} in /proc/<pid>/status"))
}

/// A `kB` field of /proc/<pid>/status, in MB (10^6 bytes).
fn status_mb(status: &str, field: &str) -> anyhow::Result<f64> {
    let kb: f64 = status_field(status, field)?
        .strip_suffix("kB")
        .ok_or_else(|| anyhow!("{field} is not in kB"))?
        .trim()
        .parse()?;
    Ok(kb * 1024.0 / 1e6)
}

/// Whether the bench runs as root (and so can start workloads under other uids).
fn is_root() -> bool {
    agentd::net::own_uid() == 0
}

/// First uid of the simulated workloads; chosen far from real accounts.
const WORKLOAD_UID_BASE: u32 = 61_000;

/// Registers 100 entries, one per uid, starts 100 `agentd api watch` processes under those
/// uids, waits until each has received its SVID, and reads the node agent's memory.
async fn node_rss_distinct_workloads(
    node: &mut ChildGuard,
    socket: &Path,
    admin: &mut AdminClient<Channel>,
    parent: &str,
    prefix: &str,
) -> anyhow::Result<ProcStatus> {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    // The workloads run as other users: they must be able to reach the socket.
    let mut dir = socket.parent();
    while let Some(d) = dir {
        if d == Path::new("/tmp") || d == Path::new("/") {
            break;
        }
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
        dir = d.parent();
    }
    for i in 0..NODE_ENTRIES {
        let uid = WORKLOAD_UID_BASE + i as u32;
        create_entries(
            admin,
            parent,
            &format!("{prefix}/{i}"),
            0..1,
            &format!("unix:uid:{uid}"),
        )
        .await?;
    }
    let out_dir = socket
        .parent()
        .unwrap_or(Path::new("/tmp"))
        .join("workloads");
    std::fs::create_dir_all(&out_dir)?;
    std::fs::set_permissions(&out_dir, std::fs::Permissions::from_mode(0o777))?;
    let spawn = |i: usize| -> anyhow::Result<ChildGuard> {
        let uid = WORKLOAD_UID_BASE + i as u32;
        let out = out_dir.join(format!("w{i}.out"));
        let child = Command::new(env!("CARGO_BIN_EXE_agentd"))
            .args(["api", "watch", "--output", "json", "--socket-path"])
            .arg(socket)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out)?)
            .stderr(Stdio::null())
            .uid(uid)
            .gid(uid)
            .spawn()
            .context("starting a workload process")?;
        Ok(ChildGuard { child, log: out })
    };
    let mut workloads: Vec<ChildGuard> = (0..NODE_ENTRIES).map(spawn).collect::<Result<_, _>>()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        node.check_alive()?;
        let mut served = 0;
        for (i, w) in workloads.iter_mut().enumerate() {
            if std::fs::metadata(&w.log).is_ok_and(|m| m.len() > 0) {
                served += 1;
            } else if w.child.try_wait()?.is_some() {
                // Its entry was not synced yet (no identity): start it again.
                *w = spawn(i)?;
            }
        }
        if served == NODE_ENTRIES {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {served} of {NODE_ENTRIES} workloads received an SVID within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Let allocations settle after the burst.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let status = proc_status(node)?;
    drop(workloads);
    Ok(status)
}

/// Opens `streams` FetchX509SVID streams from this process over `CLIENTS` connections (as
/// many agent runtimes would hold them, with fewer file descriptors in this process), keeps
/// them all open with their first message read, and reads the node agent's RSS.
async fn node_rss_many_streams(
    node: &mut ChildGuard,
    socket: &Path,
    streams: usize,
) -> anyhow::Result<ProcStatus> {
    let per_connection = streams.div_ceil(CLIENTS);
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..CLIENTS {
        let socket = socket.to_path_buf();
        let n = per_connection.min(streams.saturating_sub(c * per_connection));
        tasks.spawn(async move {
            let mut client = workload_client(&socket).await?;
            let mut open = Vec::with_capacity(n);
            for _ in 0..n {
                let (_, stream) = fetch_x509(&mut client).await?;
                open.push(stream);
            }
            Ok::<_, anyhow::Error>((client, open))
        });
    }
    let mut held = Vec::with_capacity(CLIENTS);
    let mut total = 0;
    while let Some(r) = tasks.join_next().await {
        let (client, open) = r??;
        total += open.len();
        held.push((client, open));
    }
    if total != streams {
        bail!("{total} streams open, expected {streams}");
    }
    // Let allocations settle after the burst.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let status = proc_status(node)?;
    drop(held);
    Ok(status)
}

/// Opens `CLIENTS` FetchX509SVID streams (each on its own connection, each first message
/// carrying all `NODE_ENTRIES` SVIDs), keeps them open and reads the node agent's RSS.
/// Also returns the encoded size of the first stream message.
async fn node_rss(node: &mut ChildGuard, socket: &Path) -> anyhow::Result<(ProcStatus, usize)> {
    let mut open = Vec::with_capacity(CLIENTS);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CLIENTS {
        let socket = socket.to_path_buf();
        tasks.spawn(async move {
            let mut client = workload_client(&socket).await?;
            let (msg, stream) = fetch_x509(&mut client).await?;
            if msg.svids.len() != NODE_ENTRIES {
                bail!(
                    "{} SVIDs in a stream, expected {NODE_ENTRIES}",
                    msg.svids.len()
                );
            }
            Ok::<_, anyhow::Error>((client, stream, prost::Message::encoded_len(&msg)))
        });
    }
    let mut message_bytes = 0;
    while let Some(r) = tasks.join_next().await {
        let (client, stream, len) = r??;
        message_bytes = message_bytes.max(len);
        open.push((client, stream));
    }
    // Let allocations settle after the burst.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let status = proc_status(node)?;
    drop(open);
    Ok((status, message_bytes))
}
