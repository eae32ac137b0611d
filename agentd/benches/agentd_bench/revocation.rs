//! (e) revocation latency: from the admin `Revoke` call to the workload's stream update,
//! with one node agent, then with 1,000 simulated node agents on the revocation feed.

use std::path::Path;
use std::time::{Duration, Instant};

use agentd::node::client::{attest_with_join_token, ServerLink};
use agentd_proto::admin as apb;
use agentd_proto::admin::admin_client::AdminClient;
use anyhow::{anyhow, bail, Context};
use spiffe::TrustDomain;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::harness::{
    create_entries, fetch_x509, join_token, percentile, wait_for_svids, workload_client,
    ChildGuard, Latency, NodeEnv,
};
use crate::output::row;
use crate::TRUST_DOMAIN;

const REVOCATION_NODE: &str = "bench-revocation";
/// Revocations timed in (e), and the simulated node agents of its loaded run.
const REVOCATIONS: usize = 100;
pub const FEED_SUBSCRIBERS: usize = 1_000;

// Target (docs/PERFORMANCE.md): from the start of the revoke call, durable commit included,
// to the workload's stream update, with 1,000 node agents subscribed.
const TARGET_REVOCATION_P99_MS: f64 = 50.0;

/// Revoke -> stream update latency, and from the call's start (commit included) p50, p99.
pub type RevocationFigures = (Latency, f64, f64);

/// Measures (e) on a fresh node agent and prints its rows; returns the one-node-agent
/// figures, for (g).
pub async fn run(
    env: &NodeEnv<'_>,
    admin: &mut AdminClient<Channel>,
    address: &str,
    roots: &[Vec<u8>],
) -> anyhow::Result<RevocationFigures> {
    // Revocation latency, alone and with 1,000 more feed subscribers.
    let (mut node, socket) = env.start_node(admin, REVOCATION_NODE).await?;
    let parent = format!("spiffe://{TRUST_DOMAIN}/node/{REVOCATION_NODE}");
    let alone = bench_revocation(&mut node, &socket, admin, &parent, "bench/revoke-a").await?;
    let load = FeedLoad::start(admin, address, roots, FEED_SUBSCRIBERS).await?;
    let loaded = bench_revocation(&mut node, &socket, admin, &parent, "bench/revoke-b").await?;
    let delivered = load.stop().await?;
    node.check_alive()?;
    drop(node);
    for (label, (l, whole50, whole99)) in [
        ("1 node agent", &alone),
        ("+1000 feed subscribers", &loaded),
    ] {
        row(
            &format!("(e) revoke -> stream update, {label}: p50"),
            format!("{:.1} ms", l.p50),
            "",
            None,
        );
        row(
            &format!("(e) revoke -> stream update, {label}: p99"),
            format!("{:.1} ms", l.p99),
            "",
            None,
        );
        let target = format!("<= {TARGET_REVOCATION_P99_MS:.0} ms");
        let (target, met) = if label.starts_with('+') {
            (target.as_str(), Some(*whole99 <= TARGET_REVOCATION_P99_MS))
        } else {
            ("", None)
        };
        row(
            &format!("(e) revoke call start -> update (commit incl.), {label}: p50"),
            format!("{whole50:.1} ms"),
            "",
            None,
        );
        row(
            &format!("(e) revoke call start -> update (commit incl.), {label}: p99"),
            format!("{whole99:.1} ms"),
            target,
            met,
        );
    }
    row(
        "(e) events delivered to the 1000 simulated node agents",
        delivered.to_string(),
        &format!("= {}", FEED_SUBSCRIBERS * REVOCATIONS),
        Some(delivered == (FEED_SUBSCRIBERS * REVOCATIONS) as u64),
    );
    Ok(alone)
}

/// One workload stream holding `REVOCATIONS` SVIDs (one entry each); each entry is revoked
/// in turn, and the time from the `Revoke` call returning to the stream's next snapshot
/// (one SVID fewer) is recorded. The update can reach the stream before the admin call's
/// answer reaches this process; such a sample counts as 0.
pub async fn bench_revocation(
    node: &mut ChildGuard,
    socket: &Path,
    admin: &mut AdminClient<Channel>,
    parent: &str,
    prefix: &str,
) -> anyhow::Result<(Latency, f64, f64)> {
    let selector = format!("unix:uid:{}", agentd::net::own_uid());
    let entries = create_entries(admin, parent, prefix, 0..REVOCATIONS, &selector).await?;
    // Earlier runs' entries are revoked, so this process holds exactly these SVIDs.
    wait_for_svids(node, socket, REVOCATIONS).await?;
    let mut client = workload_client(socket).await?;
    let (first, mut stream) = fetch_x509(&mut client).await?;
    if first.svids.len() != REVOCATIONS {
        bail!(
            "(e) expected {REVOCATIONS} SVIDs, got {}",
            first.svids.len()
        );
    }
    // Arrival times of stream messages (or of the stream's end), by SVID count.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Instant)>();
    let reader = tokio::spawn(async move {
        loop {
            match stream.message().await {
                Ok(Some(msg)) => {
                    if tx.send((msg.svids.len(), Instant::now())).is_err() {
                        return;
                    }
                }
                // The last revocation leaves nothing: PermissionDenied ends the stream.
                _ => {
                    let _ = tx.send((0, Instant::now()));
                    return;
                }
            }
        }
    });
    let mut samples = Vec::with_capacity(REVOCATIONS);
    let mut whole = Vec::with_capacity(REVOCATIONS);
    let start = Instant::now();
    for (i, id) in entries.iter().enumerate() {
        let called = Instant::now();
        admin
            .revoke(apb::RevokeRequest {
                handle: Some(agentd_proto::revocation::RevocationHandle {
                    kind: "entry".into(),
                    id: id.clone(),
                }),
                reason: "bench".into(),
            })
            .await
            .map_err(|s| anyhow!("Revoke: {}", s.message()))?;
        let returned = Instant::now();
        let want = REVOCATIONS - i - 1;
        loop {
            let (count, at) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .map_err(|_| anyhow!("(e) no stream update within 10 s of revocation {i}"))?
                .ok_or_else(|| anyhow!("(e) the stream reader stopped"))?;
            if count == want {
                samples.push(at.saturating_duration_since(returned).as_secs_f64() * 1e3);
                whole.push(at.saturating_duration_since(called).as_secs_f64() * 1e3);
                break;
            }
        }
    }
    let elapsed = start.elapsed();
    reader.abort();
    samples.sort_by(f64::total_cmp);
    whole.sort_by(f64::total_cmp);
    Ok((
        Latency {
            samples: samples.len(),
            throughput: samples.len() as f64 / elapsed.as_secs_f64(),
            p50: percentile(&samples, 0.50),
            p99: percentile(&samples, 0.99),
            p999: percentile(&samples, 0.999),
            max: samples.last().copied().unwrap_or(0.0),
        },
        // From the `Revoke` call (durable commit included) to the stream update.
        percentile(&whole, 0.50),
        percentile(&whole, 0.99),
    ))
}

/// The load harness of (e): `n` simulated node agents, each attested with its own join
/// token and holding its own mTLS connection to the node API, subscribed to the revocation
/// feed and counting the events they receive.
#[derive(Debug)]
struct FeedLoad {
    stop: CancellationToken,
    tasks: tokio::task::JoinSet<anyhow::Result<u64>>,
}

impl FeedLoad {
    async fn start(
        admin: &mut AdminClient<Channel>,
        address: &str,
        roots: &[Vec<u8>],
        n: usize,
    ) -> anyhow::Result<Self> {
        let trust_domain = TrustDomain::new(TRUST_DOMAIN)?;
        let stop = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(n);
        for i in 0..n {
            let token = join_token(admin, &format!("spiffe://{TRUST_DOMAIN}/node/sim-{i}")).await?;
            let identity =
                attest_with_join_token(address, Some(roots), Some(&trust_domain), &token)
                    .await
                    .context("attesting a simulated node agent")?;
            let link = ServerLink::new(address.to_string(), identity);
            let mut client = link.client().await?;
            let head = admin
                .list_revocations(apb::ListRevocationsRequest {
                    all: false,
                    ..Default::default()
                })
                .await?
                .into_inner()
                .head_sequence;
            let mut feed = client
                .watch_revocations(agentd_proto::revocation::WatchRevocationsRequest {
                    after_sequence: head,
                })
                .await
                .map_err(|s| anyhow!("WatchRevocations: {}", s.message()))?
                .into_inner();
            let stop = stop.clone();
            let ready = ready_tx.clone();
            tasks.spawn(async move {
                let _link = link;
                let mut events = 0u64;
                let mut first = true;
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return Ok(events),
                        msg = feed.message() => match msg {
                            Ok(Some(m)) => {
                                events += m.events.len() as u64;
                                if first {
                                    first = false;
                                    let _ = ready.send(()).await;
                                }
                            }
                            Ok(None) => bail!("a simulated node agent's feed ended"),
                            Err(s) => bail!("a simulated node agent's feed failed: {}", s.message()),
                        },
                    }
                }
            });
        }
        for _ in 0..n {
            ready_rx
                .recv()
                .await
                .ok_or_else(|| anyhow!("a simulated node agent stopped before subscribing"))?;
        }
        Ok(Self { stop, tasks })
    }

    /// Stops every subscriber; returns the events they received in all.
    async fn stop(mut self) -> anyhow::Result<u64> {
        // Let the last event reach everyone.
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.stop.cancel();
        let mut total = 0;
        while let Some(r) = self.tasks.join_next().await {
            total += r??;
        }
        Ok(total)
    }
}
