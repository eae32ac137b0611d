//! (c) FetchX509SVID latency (to the first stream message) against a real node agent.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use agentd_proto::admin::admin_client::AdminClient;
use anyhow::bail;
use tonic::transport::Channel;

use crate::harness::{
    create_entries, fetch_x509, percentile, wait_for_svids, workload_client, Latency, NodeBuild,
    NodeEnv,
};
use crate::output::{per_sec, row};
use crate::{CLIENTS, TRUST_DOMAIN};

/// FetchX509SVID calls per client in (c): warm-up, then timed samples.
const WARMUP_CALLS: usize = 5;
const SAMPLES_PER_CLIENT: usize = 500;
/// Samples of the single-client baseline in (c).
const SAMPLES_ONE_CLIENT: usize = 500;
const LATENCY_NODE: &str = "bench-latency";

// Targets (docs/PERFORMANCE.md).
const TARGET_P99_MS: f64 = 5.0;
/// Node agent CPU (user + system) per FetchX509SVID call, all attestors on.
const TARGET_CPU_US_PER_CALL: f64 = 50.0;
/// Linux's USER_HZ: the unit of utime and stime in /proc/<pid>/stat (100 on every
/// mainstream architecture; the kernel exports ticks in it whatever HZ it runs at).
const USER_HZ: f64 = 100.0;

/// Measures (c) on a fresh node agent and prints its rows.
pub async fn run(
    env: &NodeEnv<'_>,
    admin: &mut AdminClient<Channel>,
    selector: &str,
) -> anyhow::Result<()> {
    // A node agent serving one entry that matches this process: the node-only build, which
    // is what a node host runs (the full binary's code is the same, its text twice as big).
    let (mut node, socket) = env
        .start_node_build(admin, LATENCY_NODE, NodeBuild::NodeOnly)
        .await?;
    let parent = format!("spiffe://{TRUST_DOMAIN}/node/{LATENCY_NODE}");
    create_entries(admin, &parent, "bench/latency", 0..1, selector).await?;
    wait_for_svids(&mut node, &socket, 1).await?;
    let one = bench_fetch_latency(&socket, 1, SAMPLES_ONE_CLIENT).await?;
    let cpu_before = cpu_seconds(node.pid())?;
    let lat = bench_fetch_latency(&socket, CLIENTS, SAMPLES_PER_CLIENT).await?;
    let cpu = cpu_seconds(node.pid())? - cpu_before;
    node.check_alive()?;
    // The warm-up calls ran inside the CPU window too.
    let calls = (CLIENTS * (SAMPLES_PER_CLIENT + WARMUP_CALLS)) as f64;
    let cpu_us_per_call = cpu * 1e6 / calls;
    drop(node);
    row(
        "(c) FetchX509SVID to first message, 1 client: p50",
        format!("{:.2} ms", one.p50),
        "",
        None,
    );
    row(
        "(c) FetchX509SVID, 1 client: p99",
        format!("{:.2} ms", one.p99),
        "",
        None,
    );
    row(
        "(c) FetchX509SVID, 100 concurrent clients: p50",
        format!("{:.2} ms", lat.p50),
        "",
        None,
    );
    row(
        "(c) FetchX509SVID, 100 concurrent clients: p99",
        format!("{:.2} ms", lat.p99),
        &format!("<= {TARGET_P99_MS:.0} ms"),
        Some(lat.p99 <= TARGET_P99_MS),
    );
    row(
        "(c) FetchX509SVID, 100 concurrent clients: p99.9",
        format!("{:.2} ms", lat.p999),
        "",
        None,
    );
    row(
        "(c) node agent CPU per FetchX509SVID (user+sys / calls)",
        format!("{cpu_us_per_call:.0} us"),
        &format!("<= {TARGET_CPU_US_PER_CALL:.0} us"),
        Some(cpu_us_per_call <= TARGET_CPU_US_PER_CALL),
    );
    row(
        &format!("(c) FetchX509SVID, 100 clients: max of {}", lat.samples),
        format!("{:.2} ms", lat.max),
        "",
        None,
    );
    row(
        "(c) FetchX509SVID, 100 clients: calls completed",
        per_sec(lat.throughput, "calls"),
        "",
        None,
    );
    Ok(())
}

/// utime + stime of a process so far, in seconds (/proc/<pid>/stat fields 14 and 15, counted
/// after the parenthesized command name, which may hold spaces).
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow::anyhow!("/proc/{pid}/stat has no command name"))?;
    // After ")": state is field 3, so utime (14) and stime (15) are the 12th and 13th.
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(i)
            .ok_or_else(|| anyhow::anyhow!("/proc/{pid}/stat is short"))?
            .parse::<f64>()?)
    };
    Ok((ticks(11)? + ticks(12)?) / USER_HZ)
}

/// `clients` concurrent clients, each on its own connection, each timing `samples` calls
/// after a warm-up; all start timing together.
async fn bench_fetch_latency(
    socket: &Path,
    clients: usize,
    samples: usize,
) -> anyhow::Result<Latency> {
    let start = Arc::new(tokio::sync::Barrier::new(clients + 1));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let socket = socket.to_path_buf();
        let start = start.clone();
        tasks.spawn(async move {
            let mut client = workload_client(&socket).await?;
            for _ in 0..WARMUP_CALLS {
                fetch_x509(&mut client).await?;
            }
            start.wait().await;
            let mut times = Vec::with_capacity(samples);
            for _ in 0..samples {
                let t = Instant::now();
                let (msg, stream) = fetch_x509(&mut client).await?;
                times.push(t.elapsed().as_secs_f64() * 1e3);
                if msg.svids.is_empty() {
                    bail!("FetchX509SVID: no SVID in the first message");
                }
                drop(stream);
            }
            Ok::<_, anyhow::Error>(times)
        });
    }
    start.wait().await;
    let began = Instant::now();
    let mut all = Vec::with_capacity(clients * samples);
    while let Some(r) = tasks.join_next().await {
        all.extend(r??);
    }
    let wall = began.elapsed();
    all.sort_by(f64::total_cmp);
    Ok(Latency {
        samples: all.len(),
        throughput: all.len() as f64 / wall.as_secs_f64(),
        p50: percentile(&all, 0.50),
        p99: percentile(&all, 0.99),
        p999: percentile(&all, 0.999),
        max: all.last().copied().unwrap_or(f64::NAN),
    })
}
