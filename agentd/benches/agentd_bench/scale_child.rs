//! The child processes of (f): this bench binary again, with `AGENTD_BENCH_ROLE` naming the
//! role, so that what the server process's figures measure is the server alone.
//!
//! - `nodes`: the simulated node agents. Each attests with its join token, opens its own
//!   connection and holds a `WatchChanges` stream, draining it. With the server in the bench
//!   process and the nodes here, each process holds one end of every connection, so 10,000
//!   nodes fit in the 20,000 file descriptors a process may open on this machine. The
//!   environment names the server's node API address, a PEM bundle file and a file of join
//!   tokens (one per line); the child prints `ready <nodes> <seconds>` on stdout once every
//!   stream is open, and exits when its stdin closes (or the parent kills it).
//! - `revocations`: appends `AGENTD_BENCH_SIM_COUNT` standing revocations of one X.509-SVID
//!   each (signed by `AGENTD_BENCH_SIM_AUTHORITY`, expiring in an hour) to the stopped
//!   server's store at `AGENTD_BENCH_SIM_STORE`, in batches, and prints `appended <rate>`.

use std::sync::Arc;
use std::time::Instant;

use agentd::node::client::{attest_with_join_token, ServerLink};
use agentd_proto::node as npb;
use anyhow::{anyhow, Context};
use spiffe::TrustDomain;
use tokio::io::AsyncReadExt;

use crate::TRUST_DOMAIN;

pub const ROLE_VAR: &str = "AGENTD_BENCH_ROLE";
pub const ROLE_NODES: &str = "nodes";
pub const ROLE_REVOCATIONS: &str = "revocations";
pub const STORE_VAR: &str = "AGENTD_BENCH_SIM_STORE";
pub const COUNT_VAR: &str = "AGENTD_BENCH_SIM_COUNT";
pub const AUTHORITY_VAR: &str = "AGENTD_BENCH_SIM_AUTHORITY";
/// Revocation events per store transaction.
pub const APPEND_BATCH: usize = 10_000;
pub const ADDRESS_VAR: &str = "AGENTD_BENCH_SIM_ADDRESS";
pub const BUNDLE_VAR: &str = "AGENTD_BENCH_SIM_BUNDLE";
pub const TOKENS_VAR: &str = "AGENTD_BENCH_SIM_TOKENS";
/// Attestations in flight at once (the server allows 64 handshakes per source here).
const PARALLEL: usize = 8;

fn var(name: &str) -> anyhow::Result<String> {
    std::env::var(name).with_context(|| format!("{name} is not set"))
}

/// The child's main, for the role `AGENTD_BENCH_ROLE` names.
pub fn main(role: &str) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    let result = match role {
        ROLE_NODES => rt.block_on(run()),
        ROLE_REVOCATIONS => rt.block_on(append_revocations()),
        other => Err(anyhow!("no bench role {other:?}")),
    };
    // Do not wait for the streams' tasks on the way out.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}

async fn run() -> anyhow::Result<()> {
    let address = var(ADDRESS_VAR)?;
    let pem = std::fs::read_to_string(var(BUNDLE_VAR)?).context("reading the bundle")?;
    let roots = Arc::new(agentd::bundle::Bundle::x509_authorities_from_pem(&pem)?);
    let tokens: Vec<String> = std::fs::read_to_string(var(TOKENS_VAR)?)
        .context("reading the join tokens")?
        .lines()
        .map(str::to_string)
        .collect();
    let trust_domain = TrustDomain::new(TRUST_DOMAIN)?;
    let started = Instant::now();
    let chunk = tokens.len().div_ceil(PARALLEL).max(1);
    let mut workers = tokio::task::JoinSet::new();
    for part in tokens.chunks(chunk) {
        let part = part.to_vec();
        let (address, roots, trust_domain) = (address.clone(), roots.clone(), trust_domain.clone());
        workers.spawn(async move {
            let mut links = Vec::with_capacity(part.len());
            for token in part {
                // As a node agent does: a failed attestation is tried again (a join token is
                // only used up by an attestation that succeeds).
                let mut tries = 0;
                let identity = loop {
                    match attest_with_join_token(
                        &address,
                        Some(&roots),
                        Some(&trust_domain),
                        &token,
                    )
                    .await
                    {
                        Ok(identity) => break identity,
                        Err(e) if tries < 5 => {
                            tries += 1;
                            eprintln!("attestation failed ({e}); trying again");
                            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                        }
                        Err(e) => {
                            return Err(anyhow::Error::new(e).context(format!(
                                "attesting a simulated node, {} attested",
                                links.len()
                            )))
                        }
                    }
                };
                let link = ServerLink::new(address.clone(), identity);
                let mut client = link.client().await?;
                let mut stream = client
                    .watch_changes(npb::WatchChangesRequest::default())
                    .await
                    .map_err(|s| anyhow!("WatchChanges: {}", s.message()))?
                    .into_inner();
                // Drained, so the server is never held back by a full stream.
                tokio::spawn(async move { while let Ok(Some(_)) = stream.message().await {} });
                links.push(link);
            }
            anyhow::Ok(links)
        });
    }
    let mut links = Vec::new();
    while let Some(done) = workers.join_next().await {
        links.extend(done??);
    }
    println!(
        "ready {} {:.3}",
        links.len(),
        started.elapsed().as_secs_f64()
    );
    // Hold every link until the parent is done with us.
    let mut rest = Vec::new();
    tokio::io::stdin().read_to_end(&mut rest).await?;
    drop(links);
    Ok(())
}

async fn append_revocations() -> anyhow::Result<()> {
    use agentd::datastore::DataStore;
    use agentd::model::revocation::{
        RevocationAction, RevocationEvent, RevocationHandle, RevokedSerial,
    };
    let store = agentd::datastore::SledStore::open(std::path::Path::new(&var(STORE_VAR)?))?;
    let count: usize = var(COUNT_VAR)?.parse().context(COUNT_VAR)?;
    let authority_id = var(AUTHORITY_VAR)?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let started = Instant::now();
    let mut made = 0;
    while made < count {
        let n = APPEND_BATCH.min(count - made);
        let events = (made..made + n)
            .map(|i| {
                let serial = format!("b{i:031x}");
                RevocationEvent {
                    sequence: 0,
                    action: RevocationAction::Revoke,
                    handle: RevocationHandle::Svid(serial.clone()),
                    reason: "bench".into(),
                    at: now,
                    serials: vec![RevokedSerial {
                        serial,
                        authority_id: authority_id.clone(),
                        expires_at: now + 3_600,
                    }],
                    jwt_ids: vec![],
                    expires_at: now + 3_600,
                }
            })
            .collect();
        store.append_revocations(events).await?;
        made += n;
    }
    println!(
        "appended {:.0}",
        count as f64 / started.elapsed().as_secs_f64()
    );
    Ok(())
}
