//! (f) scale, against its own in-process server on its own data dir: the bulk load rate;
//! the CPU one SyncEntries costs (a node with 10 entries) when the store holds `SMALL` and
//! then `ENTRIES` entries, and their ratio; new entry to node latency with `NODES` simulated
//! node agents holding `WatchChanges` streams (notice, then the delta sync that brings the
//! entry) in a process of their own (`scale_child`); a real `agentd node run` with `BIG`
//! entries parented to it (time to serve, peak RSS); the server's restart time with every
//! entry; then `REVOCATIONS` standing revocation events appended to the stopped server's
//! store, the server's startup time with them, and a new real node agent catching up all of
//! them from sequence 0 (it serves nothing before it has); the server's peak RSS (the bench
//! process, without the simulated nodes) at both points.
//!
//! Sizes: `AGENTD_BENCH_ENTRIES` (default 100,000, parented to `ENTRIES / 10` nodes),
//! `AGENTD_BENCH_NODES` (default 10,000): the simulated node agents attested and holding a
//! stream, `AGENTD_BENCH_BIG` (default 20,000) and `AGENTD_BENCH_REVOCATIONS` (default
//! 1,000,000).

use std::path::Path;
use std::time::{Duration, Instant};

use agentd::node::client::{attest_with_join_token, ServerLink};
use agentd_proto::admin as apb;
use agentd_proto::node as npb;
use anyhow::{anyhow, bail, Context};
use spiffe::TrustDomain;
use tokio::io::AsyncBufReadExt;

use crate::harness::{join_token, percentile, wait_for_svids_within, NodeEnv};
use crate::output::row;
use crate::scale_child;
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
const TARGET_CATCH_UP_S: f64 = 10.0;
const TARGET_NODE_RSS_MB: f64 = 100.0;

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

/// Entries for one node agent, `BIG` of them plus one this process matches (so the node's
/// serving it says it has synced them all).
fn big_specs(node: &str, big: usize, uid: u32) -> Vec<apb::EntrySpec> {
    let mut specs: Vec<apb::EntrySpec> = (0..big)
        .map(|i| apb::EntrySpec {
            spiffe_id: format!("spiffe://{TRUST_DOMAIN}/scale/{node}-{i}"),
            parent_id: format!("spiffe://{TRUST_DOMAIN}/node/{node}"),
            selectors: vec![format!("unix:uid:{}", 1_000_000 + i)],
            ..Default::default()
        })
        .collect();
    specs.push(apb::EntrySpec {
        spiffe_id: format!("spiffe://{TRUST_DOMAIN}/scale/{node}-mine"),
        parent_id: format!("spiffe://{TRUST_DOMAIN}/node/{node}"),
        selectors: vec![format!("unix:uid:{uid}")],
        ..Default::default()
    });
    specs
}

/// The simulated node agents' process, once every one holds its stream.
struct SimulatedNodes {
    _child: tokio::process::Child,
    attest_time: f64,
}

async fn start_simulated_nodes(
    dir: &Path,
    admin: &mut apb::admin_client::AdminClient<tonic::transport::Channel>,
    address: &str,
    bundle_file: &Path,
    nodes: std::ops::Range<usize>,
) -> anyhow::Result<SimulatedNodes> {
    let mut tokens = Vec::with_capacity(nodes.len());
    for i in nodes.clone() {
        tokens.push(join_token(admin, &node_id(i)).await?);
    }
    let tokens_file = dir.join("sim-tokens");
    std::fs::write(&tokens_file, tokens.join("\n"))?;
    let log = dir.join("sim-nodes.log");
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .env(scale_child::ROLE_VAR, scale_child::ROLE_NODES)
        .env(scale_child::ADDRESS_VAR, address)
        .env(scale_child::BUNDLE_VAR, bundle_file)
        .env(scale_child::TOKENS_VAR, &tokens_file)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log)?)
        .kill_on_drop(true)
        .spawn()
        .context("starting the simulated nodes' process")?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("no stdout from the simulated nodes"))?;
    let line = tokio::time::timeout(
        Duration::from_secs(900),
        tokio::io::BufReader::new(stdout).lines().next_line(),
    )
    .await
    .context("the simulated nodes were not ready within 15 min")??;
    let Some(line) = line else {
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        bail!("the simulated nodes' process exited: {}", log.trim());
    };
    let attest_time = match line.split_whitespace().collect::<Vec<_>>()[..] {
        ["ready", n, secs] if n.parse::<usize>().ok() == Some(nodes.len()) => secs.parse()?,
        _ => bail!("the simulated nodes said {line:?}"),
    };
    Ok(SimulatedNodes {
        _child: child,
        attest_time,
    })
}

/// Appends `count` standing revocations to the stopped server's store, in a child process
/// (so the server process's peak RSS is the server's); returns the rate.
async fn make_revocation_log(
    store_dir: &Path,
    count: usize,
    authority_id: &str,
) -> anyhow::Result<f64> {
    let out = tokio::process::Command::new(std::env::current_exe()?)
        .env(scale_child::ROLE_VAR, scale_child::ROLE_REVOCATIONS)
        .env(scale_child::STORE_VAR, store_dir)
        .env(scale_child::COUNT_VAR, count.to_string())
        .env(scale_child::AUTHORITY_VAR, authority_id)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .context("running the revocation appender")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    match stdout.trim().strip_prefix("appended ") {
        Some(rate) if out.status.success() => Ok(rate.parse()?),
        _ => bail!(
            "the revocation appender failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    }
}

pub async fn run(dir: &Path) -> anyhow::Result<()> {
    let entries = size("AGENTD_BENCH_ENTRIES", 100_000);
    let nodes = size("AGENTD_BENCH_NODES", 10_000).max(1);
    let big = size("AGENTD_BENCH_BIG", 20_000);
    let revocations = size("AGENTD_BENCH_REVOCATIONS", 1_000_000);
    let uid = agentd::net::own_uid();
    let dir = dir.join("scale");
    std::fs::create_dir_all(&dir)?;
    let limits = || crate::harness::fleet_limits(nodes);
    let (server, mut admin) = crate::harness::start_server_with(&dir, Some(limits())).await?;
    let (address, bundle) = crate::harness::address_and_bundle(&mut admin).await?;
    let roots = bundle.x509_authorities;
    let bundle_file = dir.join("bundle.pem");
    std::fs::write(&bundle_file, &bundle.pem)?;
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

    // The rest of the entries (with the big node's and the catching-up node's): the bulk
    // load rate.
    let mut rest = specs(SMALL..entries);
    rest.extend(big_specs("scale-big", big, uid));
    rest.extend(big_specs("scale-catch-up", 0, uid));
    let loaded = rest.len();
    let started = Instant::now();
    bulk_create(&mut admin, rest).await?;
    let load_rate = loaded as f64 / started.elapsed().as_secs_f64();
    let large_cpu = sync_cpu(&mut client0).await?;
    let ratio = large_cpu.as_secs_f64() / small_cpu.as_secs_f64().max(1e-9);
    let total = SMALL + loaded;

    // Every other node attested and on its change stream, in their own process.
    let sims = start_simulated_nodes(&dir, &mut admin, &address, &bundle_file, 1..nodes).await?;

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

    // A real node agent with `big` entries parented to it.
    let env = NodeEnv {
        dir: &dir,
        address: &address,
        bundle_file: &bundle_file,
    };
    let started = Instant::now();
    let (mut big_node, big_socket) = env.start_node(&mut admin, "scale-big").await?;
    wait_for_svids_within(&mut big_node, &big_socket, 1, Duration::from_secs(300)).await?;
    let big_serving = started.elapsed().as_secs_f64();
    let big_rss = crate::node_rss::proc_status(&mut big_node)?.hwm_mb;
    drop(big_node);
    let authorities = admin
        .list_authorities(apb::ListAuthoritiesRequest {})
        .await?
        .into_inner()
        .authorities;
    let authority_id = authorities
        .iter()
        .find(|a| a.kind == "x509" && a.state == "active")
        .map(|a| a.id.clone())
        .ok_or_else(|| anyhow!("no active X.509 authority"))?;
    let attest_time = sims.attest_time;
    drop(sims);
    drop(link0);
    let server_rss = peak_rss_mb();

    // Restart on the same data dir: time to the admin socket answering.
    server.shutdown().await?;
    let started = Instant::now();
    let (server, _admin) = crate::harness::start_server_with(&dir, Some(limits())).await?;
    let restart = started.elapsed().as_secs_f64();
    server.shutdown().await?;

    // The revocation log, then a start with it and a node agent catching up from 0.
    let append_rate = make_revocation_log(
        &dir.join("server").join("datastore"),
        revocations,
        &authority_id,
    )
    .await?;
    let started = Instant::now();
    let (server, mut admin) = crate::harness::start_server_with(&dir, Some(limits())).await?;
    let startup = started.elapsed().as_secs_f64();
    let info = admin
        .get_server_info(apb::GetServerInfoRequest {})
        .await?
        .into_inner();
    let env = NodeEnv {
        dir: &dir,
        address: &info.node_api_address,
        bundle_file: &bundle_file,
    };
    let started = Instant::now();
    let (mut catch_up, catch_up_socket) = env.start_node(&mut admin, "scale-catch-up").await?;
    wait_for_svids_within(&mut catch_up, &catch_up_socket, 1, Duration::from_secs(600)).await?;
    let catch_up_time = started.elapsed().as_secs_f64();
    let catch_up_rss = crate::node_rss::proc_status(&mut catch_up)?.hwm_mb;
    drop(catch_up);
    let standing = admin
        .get_inventory(apb::GetInventoryRequest::default())
        .await
        .map_err(|s| anyhow!("GetInventory: {}", s.message()))?
        .into_inner()
        .revocations;
    if standing < revocations as u64 {
        bail!("the restarted server holds {standing} revocations, not {revocations}");
    }
    let server_rss_revocations = peak_rss_mb();
    server.shutdown().await?;

    row(
        &format!("(f) bulk load, {loaded} entries"),
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
        &format!("(f) SyncEntries CPU per call, {total} entries stored"),
        format!("{:.0} us", large_cpu.as_secs_f64() * 1e6),
        "",
        None,
    );
    row(
        &format!("(f) SyncEntries CPU ratio, {total} vs {SMALL}"),
        format!("{ratio:.2}"),
        &format!("<= {TARGET_SYNC_RATIO}"),
        Some(ratio <= TARGET_SYNC_RATIO),
    );
    row(
        &format!("(f) {nodes} nodes attested + on WatchChanges"),
        format!("{attest_time:.1} s"),
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
        &format!("(f) node agent, {} entries: start to serving", big + 1),
        format!("{big_serving:.1} s"),
        "",
        None,
    );
    row(
        &format!("(f) node agent, {} entries: peak RSS", big + 1),
        format!("{big_rss:.0} MB"),
        &format!("<= {TARGET_NODE_RSS_MB:.0} MB"),
        Some(big_rss <= TARGET_NODE_RSS_MB),
    );
    row(
        &format!("(f) server peak RSS, {total} entries, {nodes} nodes"),
        format!("{server_rss:.0} MB"),
        "",
        None,
    );
    row(
        &format!("(f) server restart, {total} entries"),
        format!("{restart:.2} s"),
        &format!("<= {TARGET_RESTART_S:.0} s"),
        Some(restart <= TARGET_RESTART_S),
    );
    row(
        &format!(
            "(f) revocation events appended ({} a batch)",
            scale_child::APPEND_BATCH
        ),
        format!("{append_rate:.0} events/s"),
        "",
        None,
    );
    row(
        &format!("(f) server start, {total} entries + {revocations} revocations"),
        format!("{startup:.2} s"),
        &format!("<= {TARGET_RESTART_S:.0} s"),
        Some(startup <= TARGET_RESTART_S),
    );
    row(
        &format!("(f) new node agent catching up {revocations} events"),
        format!("{catch_up_time:.1} s"),
        &format!("<= {TARGET_CATCH_UP_S:.0} s"),
        Some(catch_up_time <= TARGET_CATCH_UP_S),
    );
    row(
        "(f) that node agent's peak RSS",
        format!("{catch_up_rss:.0} MB"),
        "",
        None,
    );
    row(
        &format!("(f) server peak RSS so far, after {revocations} revocations"),
        format!("{server_rss_revocations:.0} MB"),
        "",
        None,
    );
    Ok(())
}
