//! (f) scale, against its own in-process server on its own data dir: the bulk load rate;
//! the CPU one SyncEntries costs (a node with 10 entries) when the store holds `SMALL` and
//! then `ENTRIES` entries, and their ratio; new entry to node latency with `NODES` simulated
//! node agents holding `WatchChanges` streams (notice, then the delta sync that brings the
//! entry); the server's restart time with every entry; the bench process's peak RSS (server
//! and simulated nodes share it).
//!
//! Sizes: `AGENTD_BENCH_ENTRIES` (default 100,000, parented to `ENTRIES / 10` nodes) and
//! `AGENTD_BENCH_NODES` (default 5,000): the node agents attested and holding a stream. Both
//! ends of every connection are in this one process, so the 20,000 file descriptors a
//! process may open here cap it below 10,000; raise `ulimit -n` to run more.

use std::path::Path;
use std::time::{Duration, Instant};

use agentd::node::client::{attest_with_join_token, ServerLink};
use agentd_proto::admin as apb;
use agentd_proto::node as npb;
use anyhow::{anyhow, bail, Context};
use spiffe::TrustDomain;

use crate::harness::{join_token, percentile};
use crate::output::row;
use crate::TRUST_DOMAIN;

/// Entries in the store for the first SyncEntries figure.
const SMALL: usize = 1_000;
/// Entries each simulated node has.
const PER_NODE: usize = 10;
/// New entries timed to their node.
const SAMPLES: usize = 200;
/// SyncEntries calls per CPU figure.
const SYNC_CALLS: usize = 2_000;

// Targets (issue 13, docs/PERFORMANCE.md).
const TARGET_SYNC_RATIO: f64 = 1.5;
const TARGET_NEW_ENTRY_P99_MS: f64 = 1_000.0;
const TARGET_RESTART_S: f64 = 10.0;

fn size(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn node_id(i: usize) -> String {
    format!("spiffe://{TRUST_DOMAIN}/node/scale-{i}")
}

/// CPU time (user + system) of this process so far.
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 (1-based), 11 and 12 after the command.
    let total = ticks(11) + ticks(12);
    // The kernel's USER_HZ is 100 on Linux.
    Duration::from_millis(total * 10)
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib * 1024.0 / 1e6)
}

async fn bulk_create(
    admin: &mut apb::admin_client::AdminClient<tonic::transport::Channel>,
    specs: Vec<apb::EntrySpec>,
) -> anyhow::Result<()> {
    for chunk in specs.chunks(1_000) {
        let resp = admin
            .batch_create_entries(apb::BatchCreateEntriesRequest {
                entries: chunk.to_vec(),
            })
            .await
            .map_err(|s| anyhow!("BatchCreateEntries: {}", s.message()))?
            .into_inner();
        if let Some(bad) = resp.results.iter().find(|r| r.code != 0) {
            bail!("an entry was not created: {bad:?}");
        }
    }
    Ok(())
}

/// Entries `range`, `PER_NODE` to a node in order (node 0 has entries 0-9).
fn specs(range: std::ops::Range<usize>) -> Vec<apb::EntrySpec> {
    range
        .map(|i| apb::EntrySpec {
            spiffe_id: format!("spiffe://{TRUST_DOMAIN}/scale/agent-{i}"),
            parent_id: node_id(i / PER_NODE),
            selectors: vec![format!("unix:uid:{}", 100_000 + i)],
            ..Default::default()
        })
        .collect()
}

/// CPU per whole SyncEntries of node 0 (which has `PER_NODE` entries).
async fn sync_cpu(
    client: &mut npb::node_client::NodeClient<tonic::transport::Channel>,
) -> anyhow::Result<Duration> {
    let before = process_cpu();
    for _ in 0..SYNC_CALLS {
        let page = client
            .sync_entries(npb::SyncEntriesRequest::default())
            .await
            .map_err(|s| anyhow!("SyncEntries: {}", s.message()))?
            .into_inner();
        if page.entries.len() < PER_NODE {
            bail!(
                "node 0 synced {} entries, not {PER_NODE}",
                page.entries.len()
            );
        }
    }
    Ok((process_cpu() - before) / SYNC_CALLS as u32)
}

pub async fn run(dir: &Path) -> anyhow::Result<()> {
    let entries = size("AGENTD_BENCH_ENTRIES", 100_000);
    let parents = (entries / PER_NODE).max(1);
    let nodes = size("AGENTD_BENCH_NODES", 5_000).min(parents).max(1);
    let dir = dir.join("scale");
    std::fs::create_dir_all(&dir)?;
    let limits = || agentd::server::config::RawNodeApi {
        max_connections: Some(2 * nodes + 100),
        max_connections_per_source: Some(2 * nodes + 100),
        max_handshakes_per_source: Some(64),
        attest_requests_per_source_per_minute: Some(1_000_000),
        ..Default::default()
    };
    let (server, mut admin) = crate::harness::start_server_with(&dir, Some(limits())).await?;
    let info = admin
        .get_server_info(apb::GetServerInfoRequest {})
        .await?
        .into_inner();
    let roots = admin
        .get_bundle(apb::GetBundleRequest {})
        .await?
        .into_inner()
        .x509_authorities;
    let address = info.node_api_address;
    let trust_domain = TrustDomain::new(TRUST_DOMAIN)?;

    // The store at `SMALL` entries; node 0 attested; its sync cost.
    bulk_create(&mut admin, specs(0..SMALL)).await?;
    let token = join_token(&mut admin, &node_id(0)).await?;
    let identity = attest_with_join_token(&address, Some(&roots), Some(&trust_domain), &token)
        .await
        .context("attesting node 0")?;
    let link0 = ServerLink::new(address.clone(), identity);
    let mut client0 = link0.client().await?;
    let small_cpu = sync_cpu(&mut client0).await?;

    // The rest of the entries: the bulk load rate.
    let started = Instant::now();
    bulk_create(&mut admin, specs(SMALL..entries)).await?;
    let load_rate = (entries - SMALL) as f64 / started.elapsed().as_secs_f64();
    let large_cpu = sync_cpu(&mut client0).await?;
    let ratio = large_cpu.as_secs_f64() / small_cpu.as_secs_f64().max(1e-9);

    // Every other node attested and on its change stream.
    let started = Instant::now();
    let mut streams = Vec::with_capacity(nodes);
    let mut links = Vec::with_capacity(nodes);
    for i in 1..nodes {
        let token = join_token(&mut admin, &node_id(i)).await?;
        let identity = attest_with_join_token(&address, Some(&roots), Some(&trust_domain), &token)
            .await
            .with_context(|| format!("attesting node {i}"))?;
        let link = ServerLink::new(address.clone(), identity);
        let mut client = link.client().await?;
        let stream = client
            .watch_changes(npb::WatchChangesRequest::default())
            .await
            .map_err(|s| anyhow!("WatchChanges: {}", s.message()))?
            .into_inner();
        streams.push(stream);
        links.push(link);
    }
    let attest_time = started.elapsed();
    // Drain the other nodes' streams so the server is never held back by them.
    let drains: Vec<_> = streams
        .into_iter()
        .map(|mut s| tokio::spawn(async move { while let Ok(Some(_)) = s.message().await {} }))
        .collect();

    // New entry to node 0: create, notice, delta sync with the entry in it.
    let mut stream0 = client0
        .watch_changes(npb::WatchChangesRequest::default())
        .await
        .map_err(|s| anyhow!("WatchChanges: {}", s.message()))?
        .into_inner();
    stream0.message().await?; // the first notice
    let mut samples = Vec::with_capacity(SAMPLES);
    for n in 0..SAMPLES {
        let t0 = Instant::now();
        let created = admin
            .create_entry(apb::EntrySpec {
                spiffe_id: format!("spiffe://{TRUST_DOMAIN}/scale/new-{n}"),
                parent_id: node_id(0),
                selectors: vec![format!("unix:uid:{}", 50_000 + n)],
                ..Default::default()
            })
            .await
            .map_err(|s| anyhow!("CreateEntry: {}", s.message()))?
            .into_inner();
        let notice = loop {
            let msg = tokio::time::timeout(Duration::from_secs(10), stream0.message())
                .await
                .context("no change notice within 10 s")??
                .ok_or_else(|| anyhow!("the change stream ended"))?;
            if msg.entry_ids.contains(&created.id) {
                break msg;
            }
        };
        let delta = client0
            .sync_entries(npb::SyncEntriesRequest {
                entry_ids: notice.entry_ids,
                ..Default::default()
            })
            .await
            .map_err(|s| anyhow!("SyncEntries: {}", s.message()))?
            .into_inner();
        if !delta.entries.iter().any(|e| e.id == created.id) {
            bail!("the delta did not bring entry {}", created.id);
        }
        samples.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    samples.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&samples, 0.50), percentile(&samples, 0.99));
    for d in drains {
        d.abort();
    }
    drop(links);
    drop(link0);
    let rss_running = peak_rss_mb();

    // Restart on the same data dir: time to the admin socket answering.
    server.shutdown().await?;
    let started = Instant::now();
    let (server, _admin) = crate::harness::start_server_with(&dir, Some(limits())).await?;
    let restart = started.elapsed().as_secs_f64();
    server.shutdown().await?;

    let total = entries + SAMPLES;
    row(
        &format!("(f) bulk load, {entries} entries for {parents} nodes"),
        format!("{load_rate:.0} entries/s"),
        "",
        None,
    );
    row(
        &format!("(f) SyncEntries CPU per call, {SMALL} entries stored"),
        format!("{:.0} us", small_cpu.as_secs_f64() * 1e6),
        "",
        None,
    );
    row(
        &format!("(f) SyncEntries CPU per call, {entries} entries stored"),
        format!("{:.0} us", large_cpu.as_secs_f64() * 1e6),
        "",
        None,
    );
    row(
        &format!("(f) SyncEntries CPU ratio, {entries} vs {SMALL}"),
        format!("{ratio:.2}"),
        &format!("<= {TARGET_SYNC_RATIO}"),
        Some(ratio <= TARGET_SYNC_RATIO),
    );
    row(
        &format!("(f) {nodes} nodes attested + on WatchChanges"),
        format!("{:.1} s", attest_time.as_secs_f64()),
        "",
        None,
    );
    row(
        &format!("(f) new entry -> node (delta), {nodes} nodes: p50"),
        format!("{p50:.1} ms"),
        "",
        None,
    );
    row(
        &format!("(f) new entry -> node (delta), {nodes} nodes: p99"),
        format!("{p99:.1} ms"),
        &format!("<= {TARGET_NEW_ENTRY_P99_MS:.0} ms"),
        Some(p99 <= TARGET_NEW_ENTRY_P99_MS),
    );
    row(
        &format!("(f) server restart, {total} entries"),
        format!("{restart:.2} s"),
        &format!("<= {TARGET_RESTART_S:.0} s"),
        Some(restart <= TARGET_RESTART_S),
    );
    row(
        "(f) peak RSS, server + simulated nodes (one process)",
        format!("{rss_running:.0} MB"),
        "",
        None,
    );
    Ok(())
}
