//! (b) the node API: `MintX509Svids` over mTLS on loopback, one batch in flight.

use std::time::Instant;

use agentd::node::client::{attest_with_join_token, ServerLink};
use agentd_proto::admin::admin_client::AdminClient;
use agentd_proto::node as npb;
use agentd_proto::node::node_client::NodeClient;
use anyhow::{anyhow, bail, Context};
use spiffe::TrustDomain;
use tonic::transport::Channel;

use crate::ca::{csrs, CaFigures};
use crate::harness::{create_entries, join_token};
use crate::output::{per_sec, row};
use crate::{RUN, TRUST_DOMAIN, WARMUP};

/// CSRs per `MintX509Svids` call in (b) (the node agent's own batch size).
const MINT_BATCH: usize = 100;
const MINT_NODE_ID: &str = "spiffe://example.org/node/bench-mint";
/// Batches in flight in (b)'s second figure.
const CONCURRENT_BATCHES: usize = 4;

/// Measures (b) and prints its rows; `a` is (a), for the ratio. Returns the rate, for (g).
pub async fn run(
    admin: &mut AdminClient<Channel>,
    address: &str,
    roots: &[Vec<u8>],
    a: &CaFigures,
) -> anyhow::Result<f64> {
    let mint = bench_node_api(admin, address, roots, 1).await?;
    row(
        "(b) node API MintX509Svids, batch 100, mTLS loopback",
        per_sec(mint, "SVIDs"),
        "",
        None,
    );
    // Several batches in flight, as from several node agents: their audit records share
    // a flush (group commit), and signing uses both CPUs.
    let concurrent = bench_node_api(admin, address, roots, CONCURRENT_BATCHES).await?;
    row(
        "(b) same, 4 batches in flight",
        per_sec(concurrent, "SVIDs"),
        "",
        None,
    );
    row(
        "(b) ratio 4 in flight / 1 in flight",
        format!("{:.2}", concurrent / mint),
        "",
        None,
    );
    // Target (docs/PERFORMANCE.md): the node API keeps 0.7 of the CA's rate with every
    // audit record durable before the SVID is returned.
    row(
        "(b) ratio node API / CA mint (a)",
        format!("{:.2}", mint / a.mint),
        ">= 0.70",
        Some(mint / a.mint >= 0.70),
    );
    Ok(mint)
}

/// SVIDs per second through `MintX509Svids` (batches of 100, `in_flight` at once over one
/// node agent's connection).
pub async fn bench_node_api(
    admin: &mut AdminClient<Channel>,
    address: &str,
    roots: &[Vec<u8>],
    in_flight: usize,
) -> anyhow::Result<f64> {
    let node_id = format!("{MINT_NODE_ID}-{in_flight}");
    let token = join_token(admin, &node_id).await?;
    let trust_domain = TrustDomain::new(TRUST_DOMAIN)?;
    let identity = attest_with_join_token(address, Some(roots), Some(&trust_domain), &token)
        .await
        .context("attesting the bench node")?;
    let entries = create_entries(
        admin,
        &node_id,
        &format!("bench/mint-{in_flight}"),
        0..MINT_BATCH,
        "unix:uid:0",
    )
    .await?;
    let request = npb::MintX509SvidsRequest {
        params: entries
            .into_iter()
            .zip(csrs(MINT_BATCH)?)
            .map(|(entry_id, csr)| npb::X509SvidParams {
                entry_id,
                csr,
                grant_id: String::new(),
            })
            .collect(),
    };
    let link = ServerLink::new(address.to_string(), identity);
    let client = link.client().await?;
    let request = std::sync::Arc::new(request);
    let warm_end = Instant::now() + WARMUP;
    let run = |mut client: NodeClient<Channel>,
               request: std::sync::Arc<npb::MintX509SvidsRequest>| async move {
        while Instant::now() < warm_end {
            mint_batch(&mut client, &request).await?;
        }
        let start = Instant::now();
        let mut batches = 0u64;
        while start.elapsed() < RUN {
            mint_batch(&mut client, &request).await?;
            batches += 1;
        }
        anyhow::Ok((batches, start.elapsed()))
    };
    let results =
        futures::future::join_all((0..in_flight).map(|_| run(client.clone(), request.clone())))
            .await;
    let mut batches = 0u64;
    let mut longest = std::time::Duration::ZERO;
    for r in results {
        let (b, elapsed) = r?;
        batches += b;
        longest = longest.max(elapsed);
    }
    Ok((batches * MINT_BATCH as u64) as f64 / longest.as_secs_f64())
}

/// One `MintX509Svids` call; every CSR must come back signed.
async fn mint_batch(
    client: &mut NodeClient<Channel>,
    request: &npb::MintX509SvidsRequest,
) -> anyhow::Result<()> {
    let results = client
        .mint_x509_svids(request.clone())
        .await
        .map_err(|s| anyhow!("MintX509Svids: {}", s.message()))?
        .into_inner()
        .results;
    if results.len() != request.params.len() {
        bail!(
            "MintX509Svids: {} results for {} CSRs",
            results.len(),
            request.params.len()
        );
    }
    for r in results {
        match r.result {
            Some(npb::mint_result::Result::Svid(_)) => {}
            Some(npb::mint_result::Result::Error(e)) => bail!("MintX509Svids refused: {e}"),
            None => bail!("MintX509Svids: empty result"),
        }
    }
    Ok(())
}
