//! The node agent's loop: sync entries and the bundle from the server, mint X.509-SVIDs for
//! new, changed and half-expired entries (keys made here; only CSRs travel), drop expired
//! SVIDs, and renew the node SVID. When the server is unreachable, cached SVIDs keep being
//! served until they expire, and the loop retries with exponential backoff.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use agentd_proto::node as pb;
use spiffe::SpiffeId;
use tokio_util::sync::CancellationToken;

use super::cache::{rotation_time, Cache, CachedX509Svid, NodeEntry, NodeGrant};
use super::client::ServerLink;
use super::identity::NodeIdentity;
use super::NodeError;
use crate::clock::{from_unix_seconds, Clock};
use crate::convert::bundle_from_proto;
use crate::keys::PrivateKey;
use crate::telemetry::{conditions, NodeMetrics, Readiness};

/// How often the loop wakes to check rotation and expiry.
const TICK: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// CSRs per MintX509Svids call.
const MINT_BATCH: usize = 100;
/// Pages one sync may take (a page holds up to 5,000 entries): a bound on a server that
/// never ends its pages.
const MAX_SYNC_PAGES: usize = 1_000;

#[derive(Debug)]
pub struct Syncer {
    pub link: Arc<ServerLink>,
    pub cache: Arc<Cache>,
    pub clock: Arc<dyn Clock>,
    pub sync_interval: Duration,
    pub data_dir: std::path::PathBuf,
    /// Entries the server refused to mint, and when to ask again: a refusal must not turn
    /// into a request every tick.
    pub mint_retry: std::sync::Mutex<std::collections::HashMap<String, SystemTime>>,
    /// Sync counters and the cache size gauges.
    pub metrics: Arc<NodeMetrics>,
    /// Gets `synced` once the first sync succeeds.
    pub readiness: Readiness,
}

/// How long to wait before asking again for an entry the server refused to mint.
const MINT_RETRY: Duration = Duration::from_secs(10);

fn entry_from_proto(e: pb::Entry) -> Result<NodeEntry, String> {
    let selectors = e
        .selectors
        .iter()
        .map(|s| agentd_attestor::Selector::new(s.r#type.clone(), s.value.clone()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| format!("entry {}: selector: {err}", e.id))?;
    let federates_with = e
        .federates_with
        .iter()
        .filter_map(|td| match spiffe::TrustDomain::new(td) {
            Ok(td) => Some(td),
            Err(err) => {
                tracing::warn!(entry = %e.id, trust_domain = %td, error = %err, "skipping a federated trust domain the server sent");
                None
            }
        })
        .collect();
    Ok(NodeEntry {
        spiffe_id: SpiffeId::new(&e.spiffe_id).map_err(|err| format!("entry {}: {err}", e.id))?,
        id: e.id,
        selectors,
        x509_svid_ttl: Duration::from_secs(e.x509_svid_ttl_seconds.max(1).unsigned_abs()),
        jwt_svid_ttl: Duration::from_secs(e.jwt_svid_ttl_seconds.max(1).unsigned_abs()),
        dns_names: e.dns_names,
        hint: e.hint,
        revision: e.revision,
        federates_with,
    })
}

/// The federated bundles of a sync answer; a malformed one is skipped (and logged), so one
/// bad bundle does not cost a workload the others.
fn federated_from_proto(bundles: &[pb::Bundle]) -> Vec<crate::bundle::Bundle> {
    bundles
        .iter()
        .filter_map(|b| match crate::convert::federated_bundle_from_proto(b) {
            Ok(b) => Some(b),
            Err(e) => {
                tracing::warn!(trust_domain = %b.trust_domain, error = %e, "skipping a federated bundle the server sent");
                None
            }
        })
        .collect()
}

/// A grant as the server sent it; None (and a warning) when it is malformed.
pub fn grant_from_proto(g: pb::Grant) -> Option<NodeGrant> {
    let agent = match SpiffeId::new(&g.agent) {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(grant = %g.id, error = %e, "skipping a grant the server sent");
            return None;
        }
    };
    Some(NodeGrant {
        agent,
        principal: g.principal,
        scopes: g.scopes,
        expires_at: from_unix_seconds(g.expires_at),
        task_id: (!g.task_id.is_empty()).then_some(g.task_id),
        grant_chain: if g.grant_chain.is_empty() {
            vec![g.id.clone()]
        } else {
            g.grant_chain
        },
        remaining_depth: g.remaining_depth,
        id: g.id,
    })
}

impl Syncer {
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), NodeError> {
        // Next regular sync, and the earliest retry after a failure (backoff).
        let mut next_sync = SystemTime::UNIX_EPOCH;
        let mut not_before = SystemTime::UNIX_EPOCH;
        let mut backoff = Duration::from_secs(1);
        loop {
            let now = self.clock.now();
            // A sync also mints, so an SVID coming due for rotation triggers one at once
            // rather than waiting for the regular interval.
            // A lifted revocation wants a sync at once too (the cache restored what it held,
            // the server has the entry as it stands).
            let mint_due =
                !self.due_for_mint(now).is_empty() || !self.due_delegated(now).is_empty();
            let sync_due =
                now >= next_sync || self.cache.resync_wanted() || self.cache.sync_requested();
            if now >= not_before && (sync_due || mint_due || self.cache.delta_pending()) {
                // SVIDs alone (a rotation, a caller's first request on a large node) need no
                // sync of every entry first.
                let on = self.link.position();
                let round = if sync_due {
                    self.sync_once().await
                } else if self.cache.delta_pending() {
                    self.delta_once().await
                } else {
                    self.mint_once().await
                };
                match round {
                    Ok(()) => {
                        if sync_due {
                            self.metrics.sync_succeeded();
                            self.readiness.set(conditions::SYNCED, true);
                            next_sync = self.clock.now() + self.sync_interval;
                        }
                        backoff = Duration::from_secs(1);
                        not_before = self.clock.now();
                    }
                    Err(e) => {
                        if sync_due {
                            self.metrics.sync_failed();
                        }
                        tracing::warn!(error = %e, retry_in = ?backoff, "sync with the server failed; serving cached SVIDs");
                        self.link.fail_over(on).await;
                        not_before = self.clock.now() + backoff;
                        next_sync = not_before;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
            self.cache.drop_expired(self.clock.now());
            self.metrics
                .set_cache_size(self.cache.svid_count(), self.cache.jwt_svid_count());
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(TICK) => {}
                _ = self.cache.mint_wanted() => {}
            }
        }
    }

    /// One round: entries and bundle, then minting, then the node SVID.
    pub async fn sync_once(&self) -> Result<(), NodeError> {
        self.cache.take_sync_request();
        // A whole sync covers any delta asked for before it began.
        let delta = self.cache.take_delta();
        let mut client = match self.link.client().await {
            Ok(c) => c,
            Err(e) => {
                self.cache
                    .request_delta(delta.entry_ids, delta.grant_agents);
                return Err(e);
            }
        };
        let as_of = self.cache.lift_generation();
        let fetched = self.cache.take_fetched();
        let resp = match self.fetch_pages(&mut client, fetched.clone()).await {
            Ok(r) => r,
            Err(e) => {
                // Reported with the next sync instead.
                self.cache.note_fetched(fetched);
                return Err(e);
            }
        };
        let bundle = resp
            .bundle
            .as_ref()
            .ok_or_else(|| NodeError::Server("sync response without a bundle".into()))
            .and_then(|b| bundle_from_proto(b).map_err(|e| NodeError::Server(e.to_string())))?;
        let mut entries = Vec::with_capacity(resp.entries.len());
        for e in resp.entries {
            match entry_from_proto(e) {
                Ok(e) => entries.push(e),
                Err(reason) => tracing::warn!(%reason, "skipping an entry the server sent"),
            }
        }
        if self.link.identity().bundle != bundle {
            if let Err(e) = NodeIdentity::save_bundle(&self.data_dir, &bundle) {
                tracing::warn!(error = %e, "persisting the new bundle failed");
            }
            self.link.update_bundle(bundle.clone()).await;
        }
        self.cache.set_entries(entries, bundle);
        // A server that did not say (an older one) leaves the federated bundles as held.
        if resp.federated_bundles_included {
            self.cache
                .set_federated(federated_from_proto(&resp.federated_bundles));
        }
        self.cache.synced_as_of(as_of);
        self.cache.set_grants(
            resp.grants
                .into_iter()
                .filter_map(grant_from_proto)
                .collect(),
        );
        self.mint_due(&mut client).await?;
        self.mint_delegated(&mut client).await?;
        self.renew_node_svid_if_due().await.map(|_| ())
    }

    /// A delta sync: just the entries and grant agents a change notice named, then mints.
    /// O(changes) on both sides, whatever the node's size.
    pub async fn delta_once(&self) -> Result<(), NodeError> {
        let delta = self.cache.take_delta();
        let result = self.fetch_delta(&delta).await;
        if result.is_err() {
            // Asked again after the backoff.
            self.cache
                .request_delta(delta.entry_ids.clone(), delta.grant_agents.clone());
        }
        result
    }

    async fn fetch_delta(&self, delta: &super::cache::DeltaRequest) -> Result<(), NodeError> {
        let mut client = self.link.client().await?;
        let resp = client
            .sync_entries(pb::SyncEntriesRequest {
                entry_ids: delta.entry_ids.iter().cloned().collect(),
                grant_agents: delta.grant_agents.iter().cloned().collect(),
                // Answered with the bundles alone when no ids are asked; with ids, a
                // delta carries the federated bundles anyway.
                bundles_only: delta.bundles,
                ..Default::default()
            })
            .await
            .map_err(NodeError::from_status)?
            .into_inner();
        let mut entries = Vec::with_capacity(resp.entries.len());
        for e in resp.entries {
            match entry_from_proto(e) {
                Ok(e) => entries.push(e),
                Err(reason) => tracing::warn!(%reason, "skipping an entry the server sent"),
            }
        }
        // Grants that did not fit are not "none": keep what is held and sync everything.
        let agents: Vec<SpiffeId> = if resp.grants_incomplete {
            self.cache.request_sync();
            Vec::new()
        } else {
            delta
                .grant_agents
                .iter()
                .filter_map(|a| SpiffeId::new(a).ok())
                .collect()
        };
        tracing::debug!(
            entries = entries.len(),
            removed = resp.removed_entry_ids.len(),
            agents = agents.len(),
            "delta sync"
        );
        // An asked entry the server neither sent nor removed (its answer was full): a whole
        // sync settles it.
        let answered = entries.len() + resp.removed_entry_ids.len();
        if answered < delta.entry_ids.len() {
            self.cache.request_sync();
        }
        if resp.federated_bundles_included {
            self.cache
                .set_federated(federated_from_proto(&resp.federated_bundles));
        }
        self.cache.apply_delta(
            entries,
            &resp.removed_entry_ids,
            &agents,
            resp.grants
                .into_iter()
                .filter_map(grant_from_proto)
                .collect(),
        );
        self.mint_due(&mut client).await?;
        self.mint_delegated(&mut client).await
    }

    /// Mints what is due with the entries as last synced.
    pub async fn mint_once(&self) -> Result<(), NodeError> {
        let mut client = self.link.client().await?;
        self.mint_due(&mut client).await?;
        self.mint_delegated(&mut client).await
    }

    /// Every page of one sync, put together (the bundle from the last page).
    async fn fetch_pages(
        &self,
        client: &mut agentd_proto::node::node_client::NodeClient<tonic::transport::Channel>,
        fetched: Vec<String>,
    ) -> Result<pb::SyncEntriesResponse, NodeError> {
        let mut whole = pb::SyncEntriesResponse::default();
        let mut request = pb::SyncEntriesRequest {
            fetched_entry_ids: fetched,
            ..Default::default()
        };
        for _ in 0..MAX_SYNC_PAGES {
            let page = client
                .sync_entries(std::mem::take(&mut request))
                .await
                .map_err(NodeError::from_status)?
                .into_inner();
            whole.entries.extend(page.entries);
            whole.grants.extend(page.grants);
            whole.bundle = page.bundle;
            // Sent with the last page.
            whole.federated_bundles = page.federated_bundles;
            whole.federated_bundles_included = page.federated_bundles_included;
            if page.next_page_token.is_empty() {
                return Ok(whole);
            }
            request.page_token = page.next_page_token;
        }
        Err(NodeError::Server(format!(
            "sync did not end within {MAX_SYNC_PAGES} pages"
        )))
    }

    /// Entries due for an SVID, less those waiting out a refusal.
    fn due_for_mint(&self, now: SystemTime) -> Vec<NodeEntry> {
        let mut retry = self.mint_retry.lock().unwrap_or_else(|p| p.into_inner());
        retry.retain(|_, at| *at > now);
        self.cache
            .due_for_mint(now)
            .into_iter()
            .filter(|e| !retry.contains_key(&e.id))
            .collect()
    }

    async fn mint_due(
        &self,
        client: &mut agentd_proto::node::node_client::NodeClient<tonic::transport::Channel>,
    ) -> Result<(), NodeError> {
        let due = self.due_for_mint(self.clock.now());
        for chunk in due.chunks(MINT_BATCH) {
            self.keep_node_svid(client).await?;
            let mut keys = Vec::with_capacity(chunk.len());
            let mut params = Vec::with_capacity(chunk.len());
            for e in chunk {
                let key = PrivateKey::generate()?;
                params.push(pb::X509SvidParams {
                    entry_id: e.id.clone(),
                    csr: key.csr_der()?,
                    grant_id: String::new(),
                });
                keys.push(key);
            }
            let results = client
                .mint_x509_svids(pb::MintX509SvidsRequest { params })
                .await
                .map_err(NodeError::from_status)?
                .into_inner()
                .results;
            let now = self.clock.now();
            let mut minted = Vec::with_capacity(chunk.len());
            for ((entry, key), result) in chunk.iter().zip(keys).zip(results) {
                match result.result {
                    Some(pb::mint_result::Result::Svid(s)) => {
                        let expires_at = from_unix_seconds(s.expires_at);
                        tracing::info!(spiffe_id = %entry.spiffe_id, serial = %s.serial, entry = %entry.id, "X.509-SVID received");
                        minted.push(CachedX509Svid {
                            entry_id: entry.id.clone(),
                            entry_revision: entry.revision,
                            spiffe_id: entry.spiffe_id.clone(),
                            hint: entry.hint.clone(),
                            chain: s.cert_chain,
                            key,
                            serial: s.serial,
                            expires_at,
                            rotate_at: rotation_time(now, expires_at),
                            grant_chain: Vec::new(),
                            task_id: None,
                        });
                    }
                    Some(pb::mint_result::Result::Error(reason)) => {
                        tracing::warn!(entry = %entry.id, %reason, retry_in = ?MINT_RETRY, "server refused to mint an SVID");
                        self.mint_retry
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(entry.id.clone(), now + MINT_RETRY);
                    }
                    None => tracing::warn!(entry = %entry.id, "empty mint result"),
                }
            }
            self.cache.put_x509(minted);
        }
        Ok(())
    }

    /// Delegated SVIDs due, less those waiting out a refusal (keyed `entry/grant`).
    fn due_delegated(&self, now: SystemTime) -> Vec<(NodeEntry, NodeGrant)> {
        let mut retry = self.mint_retry.lock().unwrap_or_else(|p| p.into_inner());
        retry.retain(|_, at| *at > now);
        self.cache
            .due_delegated(now)
            .into_iter()
            .filter(|(e, g)| !retry.contains_key(&format!("{}/{}", e.id, g.id)))
            .collect()
    }

    /// Mints delegated SVIDs for live grants to this node's entries; each is served with
    /// the hint `grant:<id>` beside the entry's plain SVID.
    async fn mint_delegated(
        &self,
        client: &mut agentd_proto::node::node_client::NodeClient<tonic::transport::Channel>,
    ) -> Result<(), NodeError> {
        let due = self.due_delegated(self.clock.now());
        for chunk in due.chunks(MINT_BATCH) {
            self.keep_node_svid(client).await?;
            let mut keys = Vec::with_capacity(chunk.len());
            let mut params = Vec::with_capacity(chunk.len());
            for (e, g) in chunk {
                let key = PrivateKey::generate()?;
                params.push(pb::X509SvidParams {
                    entry_id: e.id.clone(),
                    csr: key.csr_der()?,
                    grant_id: g.id.clone(),
                });
                keys.push(key);
            }
            let results = client
                .mint_x509_svids(pb::MintX509SvidsRequest { params })
                .await
                .map_err(NodeError::from_status)?
                .into_inner()
                .results;
            let now = self.clock.now();
            for (((entry, grant), key), result) in chunk.iter().zip(keys).zip(results) {
                match result.result {
                    Some(pb::mint_result::Result::Svid(s)) => {
                        let expires_at = from_unix_seconds(s.expires_at);
                        tracing::info!(spiffe_id = %entry.spiffe_id, serial = %s.serial, entry = %entry.id, grant = %grant.id, "delegated X.509-SVID received");
                        self.cache.put_delegated(CachedX509Svid {
                            entry_id: entry.id.clone(),
                            entry_revision: entry.revision,
                            spiffe_id: entry.spiffe_id.clone(),
                            hint: grant.hint(),
                            chain: s.cert_chain,
                            key,
                            serial: s.serial,
                            expires_at,
                            rotate_at: rotation_time(now, expires_at),
                            grant_chain: grant.grant_chain.clone(),
                            task_id: grant.task_id.clone(),
                        });
                    }
                    Some(pb::mint_result::Result::Error(reason)) => {
                        tracing::warn!(entry = %entry.id, grant = %grant.id, %reason, retry_in = ?MINT_RETRY, "server refused to mint a delegated SVID");
                        self.mint_retry
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(format!("{}/{}", entry.id, grant.id), now + MINT_RETRY);
                    }
                    None => {
                        tracing::warn!(entry = %entry.id, grant = %grant.id, "empty mint result")
                    }
                }
            }
        }
        Ok(())
    }

    /// Between mint batches: a long round (thousands of SVIDs) must not outlast the node
    /// SVID, or the node is locked out mid-round. Renews when due and reconnects with the
    /// new SVID.
    async fn keep_node_svid(
        &self,
        client: &mut agentd_proto::node::node_client::NodeClient<tonic::transport::Channel>,
    ) -> Result<(), NodeError> {
        if self.renew_node_svid_if_due().await? {
            *client = self.link.client().await?;
        }
        Ok(())
    }

    /// Renews the node SVID when due; true when it did.
    async fn renew_node_svid_if_due(&self) -> Result<bool, NodeError> {
        let id = self.link.identity();
        let now = self.clock.now();
        // Renew when less than half of a (typical) lifetime is left; we only know the expiry,
        // so use the time since the last renewal recorded in the SVID's validity.
        let not_before = cert_not_before(&id.chain[0]).unwrap_or(now);
        let lifetime = id.expires_at.duration_since(not_before).unwrap_or_default();
        if now < not_before + lifetime / 2 {
            return Ok(false);
        }
        let key = PrivateKey::generate()?;
        let csr = key.csr_der()?;
        let resp = self
            .link
            .client()
            .await?
            .renew_node_svid(pb::RenewNodeSvidRequest { csr })
            .await
            .map_err(NodeError::from_status)?
            .into_inner();
        let renewed = NodeIdentity::from_response(resp.svid, key, id.bundle.clone())?;
        // Use the new SVID even if persisting it fails: the server now expects it (it still
        // accepts the old one until the next renewal, which covers a restart in between).
        if let Err(e) = renewed.save(&self.data_dir) {
            tracing::error!(error = %e, "persisting the renewed node SVID failed; using it anyway");
        }
        tracing::info!(serial = %renewed.serial, "node SVID renewed");
        self.link.replace_identity(renewed).await;
        Ok(true)
    }
}

fn cert_not_before(der: &[u8]) -> Option<SystemTime> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(from_unix_seconds(cert.validity().not_before.timestamp()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(td: &str, x509: usize, jwt: usize) -> pb::Bundle {
        pb::Bundle {
            trust_domain: td.into(),
            x509_authorities: (0..x509).map(|i| vec![1, i as u8]).collect(),
            jwt_authorities: (0..jwt)
                .map(|i| pb::JwtAuthority {
                    key_id: format!("k{i}"),
                    public_key: vec![2, i as u8],
                    expires_at: 0,
                })
                .collect(),
            sequence: 1,
            refresh_hint_seconds: 60,
        }
    }

    /// A federated trust domain may publish JWT keys only; a bundle with no keys at all,
    /// or a bad trust domain name, is skipped without costing the others.
    #[test]
    fn federated_bundles_need_a_key_of_either_kind() {
        let got = federated_from_proto(&[
            wire("jwt-only.example", 0, 1),
            wire("x509.example", 1, 0),
            wire("empty.example", 0, 0),
            wire("Not A Domain", 1, 1),
        ]);
        let names: Vec<&str> = got.iter().map(|b| b.trust_domain.as_str()).collect();
        assert_eq!(names, ["jwt-only.example", "x509.example"]);
    }
}
