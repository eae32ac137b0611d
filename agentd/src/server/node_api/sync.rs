//! Entry sync: what a node serves, with bundle and grants.

use agentd_proto::node as pb;
use prost::Message;
use spiffe::SpiffeId;
use tonic::{Request, Response, Status};

use super::{NodeApi, NodeApiError};
use crate::clock::unix_seconds;
use crate::convert::bundle_to_proto;
use crate::datastore::{Entry, EntryId};
use crate::revocation::RevocationHandle;
use crate::tls::PeerIdentity;

pub fn entry_to_proto(e: &Entry) -> pb::Entry {
    pb::Entry {
        id: e.id.to_string(),
        spiffe_id: e.spec.spiffe_id.to_string(),
        parent_id: e.spec.parent_id.to_string(),
        selectors: e
            .spec
            .selectors
            .iter()
            .map(|s| pb::Selector {
                r#type: s.kind().to_string(),
                value: s.value().to_string(),
            })
            .collect(),
        x509_svid_ttl_seconds: e.spec.x509_svid_ttl.as_secs() as i64,
        jwt_svid_ttl_seconds: e.spec.jwt_svid_ttl.as_secs() as i64,
        dns_names: e.spec.dns_names.clone(),
        hint: e.spec.hint.clone(),
        scopes: e.spec.scopes.clone(),
        owner: e.spec.owner.clone().unwrap_or_default(),
        revision: e.revision,
        federates_with: e
            .spec
            .federates_with
            .iter()
            .map(|td| td.as_str().to_string())
            .collect(),
    }
}

/// Most fetched entry ids taken from one sync request.
const MAX_FETCHED_IDS: usize = 10_000;
/// About the most one sync page carries (encoded), well under a client's 4 MiB default.
const PAGE_BUDGET: usize = 2 << 20;
/// Most entries, and most agents, one delta sync may name.
const MAX_DELTA_IDS: usize = 1_000;
/// Most entries and grants on one sync page.
const PAGE_ITEMS: usize = 5_000;
/// About the most the federated bundles of one sync answer carry, beside [`PAGE_BUDGET`]:
/// together well under a client's 4 MiB default (a bundle is at most 64 keys).
const FEDERATED_BUDGET: usize = 1 << 20;

/// Where a sync page starts: after an entry (by its place in the order), or after a grant
/// once every entry went out.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SyncCursor {
    Start,
    AfterEntry { spiffe_id: String, id: String },
    AfterGrant { id: String },
}

impl SyncCursor {
    fn parse(token: &str) -> Result<Self, NodeApiError> {
        let bad = |reason: &str| NodeApiError::InvalidField {
            field: "page_token",
            reason: reason.to_string(),
        };
        if token.is_empty() {
            return Ok(Self::Start);
        }
        if token.len() > 4096 {
            return Err(bad("longer than 4096 bytes"));
        }
        let mut parts = token.split('\t');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("e"), Some(spiffe_id), Some(id), None) => Ok(Self::AfterEntry {
                spiffe_id: spiffe_id.to_string(),
                id: id.to_string(),
            }),
            (Some("g"), Some(id), None, None) => Ok(Self::AfterGrant { id: id.to_string() }),
            _ => Err(bad("not a token this server gave out")),
        }
    }

    fn token(&self) -> String {
        match self {
            Self::Start => String::new(),
            Self::AfterEntry { spiffe_id, id } => format!("e\t{spiffe_id}\t{id}"),
            Self::AfterGrant { id } => format!("g\t{id}"),
        }
    }
}

/// One page of a node's sync.
#[derive(Debug, Default)]
struct SyncPage {
    entries: Vec<pb::Entry>,
    grants: Vec<pb::Grant>,
    next: Option<SyncCursor>,
}

impl SyncPage {
    /// The cursor after this page's last entry (a page always holds one before it is cut).
    fn after_last_entry(&self) -> SyncCursor {
        let last = self.entries.last();
        SyncCursor::AfterEntry {
            spiffe_id: last.map(|l| l.spiffe_id.clone()).unwrap_or_default(),
            id: last.map(|l| l.id.clone()).unwrap_or_default(),
        }
    }

    /// The page after `cursor` of `entries` (in (SPIFFE ID, id) order) and then `grants`
    /// (sorted here by id). Entries that changed between pages are seen by the next sync
    /// (a change notice or the regular interval brings one).
    fn cut(entries: &[&Entry], grants: &[crate::datastore::Grant], cursor: &SyncCursor) -> Self {
        let mut page = Self::default();
        let mut size = 0usize;
        let mut full = |len: usize, items: usize| {
            let over = items > 0 && (size + len > PAGE_BUDGET || items >= PAGE_ITEMS);
            size += len;
            over
        };
        let entry_start = match cursor {
            SyncCursor::Start => 0,
            SyncCursor::AfterEntry { spiffe_id, id } => entries.partition_point(|e| {
                (e.spec.spiffe_id.to_string().as_str(), e.id.as_str())
                    <= (spiffe_id.as_str(), id.as_str())
            }),
            SyncCursor::AfterGrant { .. } => entries.len(),
        };
        for e in &entries[entry_start..] {
            let wire = entry_to_proto(e);
            if full(wire.encoded_len() + 4, page.entries.len()) {
                page.next = Some(page.after_last_entry());
                return page;
            }
            page.entries.push(wire);
        }
        let mut grants: Vec<&crate::datastore::Grant> = grants.iter().collect();
        grants.sort_by(|a, b| a.id.as_str().cmp(b.id.as_str()));
        let grant_start = match cursor {
            SyncCursor::AfterGrant { id } => {
                grants.partition_point(|g| g.id.as_str() <= id.as_str())
            }
            _ => 0,
        };
        for g in &grants[grant_start..] {
            let wire = crate::server::grants::grant_to_node_proto(g);
            if full(
                wire.encoded_len() + 4,
                page.entries.len() + page.grants.len(),
            ) {
                page.next = Some(match page.grants.last() {
                    Some(last) => SyncCursor::AfterGrant {
                        id: last.id.clone(),
                    },
                    // No grant on this page yet: the page ends after its last entry.
                    None => page.after_last_entry(),
                });
                return page;
            }
            page.grants.push(wire);
        }
        page
    }
}

impl NodeApi {
    pub(super) async fn sync_node(
        &self,
        request: Request<pb::SyncEntriesRequest>,
    ) -> Result<Response<pb::SyncEntriesResponse>, Status> {
        let node = self
            .caller(request.extensions().get::<PeerIdentity>())
            .await?;
        let request = request.into_inner();
        if request.bundles_only && request.entry_ids.is_empty() && request.grant_agents.is_empty() {
            return Ok(Response::new(pb::SyncEntriesResponse {
                bundle: Some(bundle_to_proto(&self.state.ca.bundle())),
                federated_bundles: self.federated_bundles().await?,
                federated_bundles_included: true,
                ..Default::default()
            }));
        }
        if !request.entry_ids.is_empty() || !request.grant_agents.is_empty() {
            // Fetches are reported with whole syncs, which know what the node serves.
            return self
                .sync_delta(&node, request.entry_ids, request.grant_agents)
                .await;
        }
        let cursor = SyncCursor::parse(&request.page_token)?;
        let fetched = request.fetched_entry_ids;
        let server_id = crate::tls::server_spiffe_id(&self.state.config.trust_domain);
        let mut entries = crate::server::membership::entries_for_node(
            self.state.store.as_ref(),
            &server_id,
            &node,
            Some(&self.state.revocations),
        )
        .await
        .map_err(NodeApiError::from)?;
        self.note_fetched(&entries, fetched).await?;
        if self.state.config.suspend_disabled_owners {
            // A suspended entry is withdrawn from the node: it drops the entry's SVIDs and its
            // workloads get no identity until the owner is enabled again.
            let disabled: std::collections::HashSet<String> = self
                .state
                .store
                .list_owners()
                .await
                .map_err(NodeApiError::from)?
                .into_iter()
                .filter(|o| o.disabled)
                .map(|o| o.owner)
                .collect();
            entries.retain(|e| e.spec.owner.as_ref().is_none_or(|o| !disabled.contains(o)));
        }
        let agents: std::collections::BTreeSet<&SpiffeId> =
            entries.iter().map(|e| &e.spec.spiffe_id).collect();
        let grants = crate::server::grants::live_grants_for(
            self.state.store.as_ref(),
            &agents,
            unix_seconds(self.state.clock.now()),
        )
        .await
        .map_err(NodeApiError::from)?
        .into_iter()
        .filter(|g| crate::server::grants::check_not_revoked(&self.state.revocations, g).is_ok())
        .collect::<Vec<_>>();
        let revocations = &self.state.revocations;
        let entries: Vec<&Entry> = entries
            .iter()
            .filter(|e| {
                revocations
                    .standing(&RevocationHandle::Entry(e.id.clone()))
                    .is_none()
            })
            .collect();
        let page = SyncPage::cut(&entries, &grants, &cursor);
        let last_page = page.next.is_none();
        Ok(Response::new(pb::SyncEntriesResponse {
            entries: page.entries,
            bundle: Some(bundle_to_proto(&self.state.ca.bundle())),
            grants: page.grants,
            next_page_token: page.next.map(|c| c.token()).unwrap_or_default(),
            removed_entry_ids: Vec::new(),
            grants_incomplete: false,
            // With the last page: the node takes the set from there.
            federated_bundles: if last_page {
                self.federated_bundles().await?
            } else {
                Vec::new()
            },
            federated_bundles_included: last_page,
        }))
    }

    /// A delta sync: the asked entries the node serves (each checked as a whole sync would:
    /// membership, standing revocations, owner suspension), the ids of those it does not,
    /// and the live grants to the asked agents it serves. O(asked), not O(node's entries).
    async fn sync_delta(
        &self,
        node: &crate::datastore::AttestedNode,
        entry_ids: Vec<String>,
        grant_agents: Vec<String>,
    ) -> Result<Response<pb::SyncEntriesResponse>, Status> {
        for (field, n) in [
            ("entry_ids", entry_ids.len()),
            ("grant_agents", grant_agents.len()),
        ] {
            if n > MAX_DELTA_IDS {
                return Err(NodeApiError::InvalidField {
                    field,
                    reason: format!("{n} ids; at most {MAX_DELTA_IDS}"),
                }
                .into());
            }
        }
        let state = &self.state;
        let server_id = crate::tls::server_spiffe_id(&state.config.trust_domain);
        let store = state.store.as_ref();
        let mut entries = Vec::new();
        let mut removed = Vec::new();
        let mut size = 0usize;
        for raw in entry_ids {
            let id: EntryId = raw.parse().map_err(|e| NodeApiError::InvalidField {
                field: "entry_ids",
                reason: format!("{raw:?}: {e}"),
            })?;
            if size > PAGE_BUDGET {
                // Too large for one answer: the ids left unanswered tell the node to sync
                // everything instead.
                break;
            }
            match store.get_entry(&id).await.map_err(NodeApiError::from)? {
                Some(e) if self.delta_serves(node, &server_id, &e).await? => {
                    let wire = entry_to_proto(&e);
                    size += wire.encoded_len();
                    entries.push(wire);
                }
                _ => removed.push(raw),
            }
        }
        let mut agents = std::collections::BTreeSet::new();
        for raw in &grant_agents {
            let agent = SpiffeId::new(raw).map_err(|e| NodeApiError::InvalidField {
                field: "grant_agents",
                reason: format!("{raw:?}: {e}"),
            })?;
            let filter = crate::datastore::EntryFilter {
                spiffe_id: Some(agent.clone()),
                ..Default::default()
            };
            for e in store
                .list_entries(&filter)
                .await
                .map_err(NodeApiError::from)?
            {
                if self.delta_serves(node, &server_id, &e).await? {
                    agents.insert(agent);
                    break;
                }
            }
        }
        let mut grants: Vec<pb::Grant> = if agents.is_empty() {
            Vec::new()
        } else {
            crate::server::grants::live_grants_for(
                store,
                &agents.iter().collect(),
                unix_seconds(state.clock.now()),
            )
            .await
            .map_err(NodeApiError::from)?
            .into_iter()
            .filter(|g| crate::server::grants::check_not_revoked(&state.revocations, g).is_ok())
            .map(|g| crate::server::grants::grant_to_node_proto(&g))
            .collect()
        };
        let grant_bytes: usize = grants.iter().map(|g| g.encoded_len() + 4).sum();
        let grants_incomplete = size + grant_bytes > PAGE_BUDGET;
        if grants_incomplete {
            grants.clear();
        }
        Ok(Response::new(pb::SyncEntriesResponse {
            entries,
            bundle: Some(bundle_to_proto(&state.ca.bundle())),
            grants,
            next_page_token: String::new(),
            removed_entry_ids: removed,
            grants_incomplete,
            federated_bundles: self.federated_bundles().await?,
            federated_bundles_included: true,
        }))
    }

    /// Every federated bundle the server holds (a handful; the node picks per workload), in
    /// trust domain order, as many as fit [`FEDERATED_BUDGET`] beside a full page; the rest
    /// are left out with a warning (a node keeps serving its own trust domain).
    async fn federated_bundles(&self) -> Result<Vec<pb::Bundle>, NodeApiError> {
        let all = self
            .state
            .store
            .list_federated_bundles()
            .await
            .map_err(NodeApiError::from)?;
        let mut out = Vec::with_capacity(all.len());
        let mut size = 0usize;
        for b in &all {
            let wire = bundle_to_proto(&b.bundle);
            size += wire.encoded_len();
            if size > FEDERATED_BUDGET {
                // Once a minute at most: every sync of every node comes through here.
                static WARNED_AT: std::sync::atomic::AtomicI64 =
                    std::sync::atomic::AtomicI64::new(0);
                let now = unix_seconds(self.state.clock.now());
                let last = WARNED_AT.load(std::sync::atomic::Ordering::Relaxed);
                if now - last >= 60
                    && WARNED_AT
                        .compare_exchange(
                            last,
                            now,
                            std::sync::atomic::Ordering::Relaxed,
                            std::sync::atomic::Ordering::Relaxed,
                        )
                        .is_ok()
                {
                    tracing::warn!(trust_domain = %b.bundle.trust_domain, budget = FEDERATED_BUDGET, "federated bundles over the sync budget: this one and those after it are not sent to node agents");
                }
                break;
            }
            out.push(wire);
        }
        Ok(out)
    }

    /// Whether a delta sync hands `e` to `node`: as a whole sync would (membership, no
    /// standing revocation of the entry, its owner not suspended).
    async fn delta_serves(
        &self,
        node: &crate::datastore::AttestedNode,
        server_id: &SpiffeId,
        e: &Entry,
    ) -> Result<bool, NodeApiError> {
        let state = &self.state;
        if state
            .revocations
            .standing(&RevocationHandle::Entry(e.id.clone()))
            .is_some()
        {
            return Ok(false);
        }
        if state.config.suspend_disabled_owners {
            if let Some(owner) = &e.spec.owner {
                if state
                    .store
                    .get_owner(owner)
                    .await?
                    .is_some_and(|o| o.disabled)
                {
                    return Ok(false);
                }
            }
        }
        Ok(crate::server::membership::node_serves(
            state.store.as_ref(),
            server_id,
            node,
            e,
            &state.revocations,
        )
        .await?)
    }

    /// Records `last_fetched` for the entries the node reports, among those it serves (a node
    /// cannot vouch for another node's workloads).
    async fn note_fetched(
        &self,
        served: &[Entry],
        reported: Vec<String>,
    ) -> Result<(), NodeApiError> {
        if reported.len() > MAX_FETCHED_IDS {
            return Err(NodeApiError::InvalidField {
                field: "fetched_entry_ids",
                reason: format!("{} ids; at most {MAX_FETCHED_IDS}", reported.len()),
            });
        }
        let reported: std::collections::HashSet<String> = reported.into_iter().collect();
        let ids: Vec<EntryId> = served
            .iter()
            .filter(|e| reported.contains(e.id.as_str()))
            .map(|e| e.id.clone())
            .collect();
        let now = unix_seconds(self.state.clock.now());
        if let Err(e) = self.state.store.note_fetched(ids, now).await {
            tracing::warn!(error = %e, "recording entry fetches failed");
        }
        Ok(())
    }
}
