//! `make bench` (`cargo bench -p agentd --bench agentd_bench`): the figures of
//! docs/PERFORMANCE.md, printed as one table.
//!
//! - (a) X.509-SVIDs minted per second by the CA on one thread (CSR in, signed certificate
//!   out), beside ring's raw ECDSA P-256 sign and verify rates measured in the same run.
//! - (b) X.509-SVIDs per second through the node API (mTLS on loopback, `MintX509Svids`
//!   with batches of 100 CSRs, one batch in flight), against an in-process server.
//! - (c) FetchX509SVID latency (time to the first stream message) with 100 concurrent
//!   Workload API clients on a warm cache, against a real `agentd node run` child process.
//! - (d) The resident memory of that node agent process once it holds 100 SVIDs and serves
//!   100 open FetchX509SVID streams.
//!
//! - (e) Revocation latency: time from an `agentd revoke` (the admin `Revoke` call)
//!   returning to the workload's FetchX509SVID stream sending the update, over 100
//!   revocations, with 1 node agent; then again with 200 simulated node agents also
//!   subscribed to the revocation feed (the load harness `FeedLoad` in `revocation`).
//!
//! - (f) Scale: bulk load rate, SyncEntries CPU at 1,000 vs 100,000 stored entries, new
//!   entry to node latency with 10,000 simulated node agents on `WatchChanges` (in a child
//!   process, `scale_child`), a node agent with 20,000 entries, restart time with every entry,
//!   startup with 1,000,000 revocation events and a node agent catching them up, peak RSS
//!   (its own server and data dir; see `scale`).
//!
//! - (g) The PostgreSQL store beside sled, in the same run: (b)'s mint rate and (e)'s
//!   revocation latency (one node agent) against a second in-process server on a fresh
//!   PostgreSQL database (`AGENTD_BENCH_POSTGRES`, default the local server
//!   scripts/install-tools.sh starts; without one the bench fails saying so).
//!
//! - (h) The OAuth front door: token exchanges per second beside JWT-SVID mints per second,
//!   both through a real server on one core, client included (`oauth`).
//!
//! One module per figure: `ca` (a), `node_api` (b), `fetch_latency` (c), `node_rss` (d),
//! `revocation` (e), `scale` (f), `store` (g); `harness` starts the server and the node agents, `output`
//! prints the table. `AGENTD_BENCH_ONLY=scale` runs (f) alone, `AGENTD_BENCH_ONLY=store` (g),
//! `AGENTD_BENCH_ONLY=oauth` (h),
//! `AGENTD_BENCH_ONLY=mint` (a) and (b).
//!
//! Temp dirs are removed and the child process is killed on every exit path (Drop guards).
#![forbid(unsafe_code)]

mod ca;
mod fetch_latency;
mod harness;
mod node_api;
mod node_rss;
mod oauth;
mod output;
mod revocation;
mod scale;
mod scale_child;
mod store;

use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use harness::NodeEnv;

/// Every rate is measured for `RUN` after `WARMUP`.
const WARMUP: Duration = Duration::from_millis(500);
const RUN: Duration = Duration::from_secs(2);
/// Slices the (a) measurements are interleaved in.
const ROUNDS: u32 = 20;
/// Concurrent Workload API clients in (c) and (d).
const CLIENTS: usize = 100;

const TRUST_DOMAIN: &str = "example.org";

fn main() -> anyhow::Result<()> {
    if let Ok(role) = std::env::var(scale_child::ROLE_VAR) {
        return scale_child::main(&role);
    }
    let dir = tempfile::Builder::new()
        .prefix("agentd-bench-")
        .tempdir()
        .context("creating a temp dir")?;
    output::print_header();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    match std::env::var("AGENTD_BENCH_ONLY").as_deref() {
        Ok("scale") => {
            rt.block_on(scale::run(dir.path()))?;
            drop(rt);
            dir.close().context("removing the temp dir")?;
            return Ok(());
        }
        Ok("oauth") => {
            drop(rt);
            oauth::run(dir.path())?;
            dir.close().context("removing the temp dir")?;
            return Ok(());
        }
        Ok("node") => {
            // (c), (d) and (e) alone: the node agent's figures, against one server.
            rt.block_on(run_node_figures(dir.path()))?;
            drop(rt);
            dir.close().context("removing the temp dir")?;
            return Ok(());
        }
        Ok("mint") => {
            // (a) and (b) alone: the CA's mint rate and the node API's beside it.
            let a = ca::run(dir.path())?;
            rt.block_on(async {
                let (server, mut admin) = harness::start_server(dir.path()).await?;
                let (address, bundle) = harness::address_and_bundle(&mut admin).await?;
                node_api::run(&mut admin, &address, &bundle.x509_authorities, &a).await?;
                server.shutdown().await
            })?;
            drop(rt);
            dir.close().context("removing the temp dir")?;
            return Ok(());
        }
        Ok("store") => {
            rt.block_on(store::run_alone(dir.path()))?;
            drop(rt);
            dir.close().context("removing the temp dir")?;
            return Ok(());
        }
        _ => {}
    }

    let a = ca::run(dir.path())?;
    oauth::run(dir.path())?;
    rt.block_on(run_online(dir.path(), &a))?;
    drop(rt);
    dir.close().context("removing the temp dir")?;
    Ok(())
}

/// (c) to (e) only, against one in-process server (`AGENTD_BENCH_ONLY=node`).
async fn run_node_figures(dir: &Path) -> anyhow::Result<()> {
    let (server, mut admin) = harness::start_server(dir).await?;
    let (address, bundle) = harness::address_and_bundle(&mut admin).await?;
    node_figures(dir, &mut admin, &address, &bundle).await?;
    server.shutdown().await?;
    output::print_notes();
    Ok(())
}

/// (c), (d) and (e) against the server at `address`; (e)'s one-node-agent figures, for (g).
async fn node_figures(
    dir: &Path,
    admin: &mut agentd_proto::admin::admin_client::AdminClient<tonic::transport::Channel>,
    address: &str,
    bundle: &agentd_proto::admin::Bundle,
) -> anyhow::Result<revocation::RevocationFigures> {
    let bundle_file = dir.join("bundle.pem");
    std::fs::write(&bundle_file, &bundle.pem)?;
    let selector = format!("unix:uid:{}", agentd::net::own_uid());
    let env = NodeEnv {
        dir,
        address,
        bundle_file: &bundle_file,
    };
    fetch_latency::run(&env, admin, &selector).await?;
    node_rss::run(&env, admin, &selector).await?;
    revocation::run(&env, admin, address, &bundle.x509_authorities).await
}

/// (b) to (e), against one in-process server.
async fn run_online(dir: &Path, a: &ca::CaFigures) -> anyhow::Result<()> {
    let (server, mut admin) = harness::start_server(dir).await?;
    let (address, bundle) = harness::address_and_bundle(&mut admin).await?;
    let sled_mint = node_api::run(&mut admin, &address, &bundle.x509_authorities, a).await?;
    let sled_revocation = node_figures(dir, &mut admin, &address, &bundle).await?;
    server.shutdown().await?;

    store::run(dir, sled_mint, &sled_revocation).await?;

    scale::run(dir).await?;

    output::print_notes();
    Ok(())
}
