//! Storage for the server, grouped by resource. The trait is free of any backend's types so
//! that another store (PostgreSQL, shared by several servers) can sit behind it. Every
//! operation is one transaction, durable when it returns.

#[cfg(test)]
pub(crate) mod conformance;
mod lifecycle;
pub mod migrate;
mod model;
pub mod pg_store;
mod records;
mod revocation_records;
mod seen_tokens;
pub mod sled_store;

use std::fmt::Debug;

pub use model::{AttestedNode, Entry, EntryFilter, EntryId, EntryIdError, EntrySpec, JoinToken};
pub use model::{DelegationOffer, Grant, ServerAuthorities};
pub use pg_store::PgStore;
pub use sled_store::SledStore;

pub use lifecycle::{EntryActivity, IssuedForEntry, LiveSvid, OwnerState};

use std::collections::HashMap;

use crate::model::audit::{
    AuditHead, AuditRecord, ChainSigner, SealedAuditRecord, StoredAuditRecord,
};

use spiffe::{SpiffeId, TrustDomain};

use crate::model::federation::{FederatedBundle, FederationRelationship};

use crate::model::revocation::{IssuedSvid, RevocationEvent, RevocationHandle};

/// Clone: one failed group write of audit records is every waiting caller's error.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DataStoreError {
    #[error("entry {id} not found")]
    EntryNotFound { id: String },
    #[error("an entry with the same spiffe id, parent id and selectors exists: {id}")]
    DuplicateEntry { id: String },
    #[error("node {spiffe_id} not found")]
    NodeNotFound { spiffe_id: String },
    #[error("stored record {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("grant {id} exists")]
    DuplicateGrant { id: String },
    #[error("store backend: {reason}")]
    Backend { reason: String },
    /// Another process holds the store's lock (a second server on the same data dir).
    #[error("{path} is locked: another process is using it")]
    InUse { path: String },
    /// The database could not be reached: nothing was read or written.
    #[error("the datastore is unreachable ({reason}); nothing was written")]
    Unavailable { reason: String },
}

pub type Result<T> = std::result::Result<T, DataStoreError>;

/// The largest notice [`DataStore::notify_servers`] takes (PostgreSQL's NOTIFY payload is
/// under 8,000 bytes).
pub const MAX_SERVER_NOTICE: usize = 7_900;

#[async_trait::async_trait]
pub trait DataStore: Send + Sync + Debug + 'static {
    // Registration entries.
    async fn create_entry(&self, spec: EntrySpec, now: i64) -> Result<Entry>;
    async fn get_entry(&self, id: &EntryId) -> Result<Option<Entry>>;
    /// The entries of `ids` that exist, by id: what a mint batch reads in one query
    /// instead of one per CSR. This default reads them one by one.
    async fn get_entries(&self, ids: &[EntryId]) -> Result<HashMap<EntryId, Entry>> {
        let mut found = HashMap::with_capacity(ids.len());
        for id in ids {
            if let Some(entry) = self.get_entry(id).await? {
                found.insert(id.clone(), entry);
            }
        }
        Ok(found)
    }
    async fn list_entries(&self, filter: &EntryFilter) -> Result<Vec<Entry>>;
    async fn update_entry(&self, id: &EntryId, spec: EntrySpec) -> Result<Entry>;
    async fn delete_entry(&self, id: &EntryId) -> Result<Entry>;

    // Attested nodes.
    async fn upsert_node(&self, node: AttestedNode) -> Result<()>;
    async fn get_node(&self, spiffe_id: &SpiffeId) -> Result<Option<AttestedNode>>;
    async fn list_nodes(&self) -> Result<Vec<AttestedNode>>;
    async fn delete_node(&self, spiffe_id: &SpiffeId) -> Result<AttestedNode>;

    // Join tokens.
    async fn create_join_token(&self, token: JoinToken) -> Result<()>;
    /// Removes and returns the token in one step, so a token is used at most once even when
    /// two nodes present it at the same moment.
    async fn take_join_token(&self, token_sha256: &str) -> Result<Option<JoinToken>>;

    // Issued SVIDs: what each revocation handle resolves to.
    /// Records issued SVIDs. Unlike the other writes this one is not flushed before it
    /// returns (it is on the minting path); the backend makes it durable within a second.
    async fn record_issued(&self, svids: &[IssuedSvid]) -> Result<()>;
    /// Issued SVIDs that have not expired at `now`.
    async fn list_issued(&self, now: i64) -> Result<Vec<IssuedSvid>>;
    /// Issued SVIDs that have not expired at `now` and that any of `handles` covers
    /// (`RevocationHandle::covers`), each once: what a revocation of them lists. Through an
    /// index where the store has one, so a revocation reads what it covers, not every
    /// record; this default scans.
    async fn list_issued_covered(
        &self,
        handles: &[RevocationHandle],
        now: i64,
    ) -> Result<Vec<IssuedSvid>> {
        Ok(self
            .list_issued(now)
            .await?
            .into_iter()
            .filter(|s| handles.iter().any(|h| h.covers(s)))
            .collect())
    }
    /// Removes expired issuance records; returns how many.
    async fn prune_issued(&self, now: i64) -> Result<usize>;

    // The revocation log.
    /// Appends an event under the next sequence number (the `sequence` passed in is
    /// ignored) and returns it; durable before it returns. Sequence numbers are gap-free
    /// and never reused, even after compaction.
    async fn append_revocation(&self, event: RevocationEvent) -> Result<RevocationEvent>;
    /// Appends `events` in order under the next sequence numbers, all or none (a bulk
    /// import; the scale bench's million-event log). This default appends them one by one,
    /// which is not all-or-none; a store with transactions overrides it.
    async fn append_revocations(
        &self,
        events: Vec<RevocationEvent>,
    ) -> Result<Vec<RevocationEvent>> {
        let mut out = Vec::with_capacity(events.len());
        for e in events {
            out.push(self.append_revocation(e).await?);
        }
        Ok(out)
    }
    /// Every event still kept, in sequence order.
    async fn list_revocations(&self) -> Result<Vec<RevocationEvent>>;
    /// The kept events after sequence `after`, in order (what another server appended since
    /// this one last looked). This default filters the whole log.
    async fn list_revocations_after(&self, after: u64) -> Result<Vec<RevocationEvent>> {
        Ok(self
            .list_revocations()
            .await?
            .into_iter()
            .filter(|e| e.sequence > after)
            .collect())
    }
    /// The last sequence number handed out (0 when none).
    async fn revocation_head(&self) -> Result<u64>;
    /// Removes events that no longer matter (see `revocation::log::compactable`).
    async fn compact_revocations(&self, sequences: &[u64]) -> Result<()>;

    // Audit log (see `crate::audit`).
    /// Seals `records` in order (numbered after the current head, each chained to the one
    /// before, all timed `time`, each and the new head signed by `signer`), stores them and
    /// moves the checkpointed head, in one transaction: a sequence number is never used twice
    /// or skipped.
    async fn append_audit(
        &self,
        records: Vec<AuditRecord>,
        time: i64,
        signer: &dyn ChainSigner,
    ) -> Result<Vec<SealedAuditRecord>>;
    /// A mint's one write: the issuance records of `svids` (issued at `time`: what
    /// revocation handles resolve to, and what their entries' live sets and `last_issued`
    /// derive from) and `records` sealed onto the audit chain as [`Self::append_audit`]
    /// does, durable together when this returns. Issuance records go first, so a failure
    /// leaves at most records of SVIDs never handed out, never an audit record without
    /// its issuance record.
    async fn append_issuance(
        &self,
        svids: &[IssuedSvid],
        records: Vec<AuditRecord>,
        time: i64,
        signer: &dyn ChainSigner,
    ) -> Result<Vec<SealedAuditRecord>>;
    /// Up to `limit` records with a sequence number above `after_seq`, in order, unparsed.
    async fn audit_records(&self, after_seq: u64, limit: usize) -> Result<Vec<StoredAuditRecord>>;
    /// The checkpointed head; `None` before the first record.
    async fn audit_head(&self) -> Result<Option<AuditHead>>;
    /// Records `key_id` (a fingerprint of the audit key, not the key) as the log's key
    /// unless one is recorded already; returns the one recorded (the first writer's, when
    /// several servers start at once), so a server holding another key can tell.
    async fn claim_audit_key_id(&self, key_id: &str) -> Result<String>;

    // Entry activity and owners (ownership and lifecycle).
    /// Sets `last_fetched` of the entries (not flushed either).
    async fn note_fetched(&self, entries: Vec<EntryId>, now: i64) -> Result<()>;
    /// Activity of every entry that has any: the activity records with what the issuance
    /// records of each existing entry say (`lifecycle::with_issued`).
    async fn entry_activity(&self) -> Result<HashMap<EntryId, EntryActivity>>;
    /// One entry's activity, as [`Self::entry_activity`] has it (the default reads every
    /// entry's; the stores read the entry's issuance records through its handle index).
    async fn entry_activity_of(&self, id: &EntryId) -> Result<EntryActivity> {
        Ok(self.entry_activity().await?.remove(id).unwrap_or_default())
    }
    async fn set_owner_disabled(&self, owner: &str, disabled: bool, now: i64)
        -> Result<OwnerState>;
    async fn get_owner(&self, owner: &str) -> Result<Option<OwnerState>>;
    async fn list_owners(&self) -> Result<Vec<OwnerState>>;

    // Inventory counts. Live grants: none by default, the stores that keep grants count
    // them; standing revocations: from the log, the same for every store.
    /// Grants not yet expired at `now`.
    async fn count_live_grants(&self, _now: i64) -> Result<u64> {
        Ok(0)
    }
    /// Revocations standing in the revocation log: revokes no kept lift ends.
    async fn count_revocations(&self) -> Result<u64> {
        let events = self.list_revocations().await?;
        let lifted: std::collections::HashSet<u64> = events
            .iter()
            .filter_map(|e| match e.action {
                crate::model::revocation::RevocationAction::Lift { revocation } => Some(revocation),
                crate::model::revocation::RevocationAction::Revoke => None,
            })
            .collect();
        Ok(events
            .iter()
            .filter(|e| e.is_revoke() && !lifted.contains(&e.sequence))
            .count() as u64)
    }

    // Delegation grants and single-use delegation offers.
    async fn create_grant(&self, grant: Grant) -> Result<()>;
    async fn get_grant(&self, id: &crate::delegation::GrantId) -> Result<Option<Grant>>;
    /// Every grant, expired ones included, ordered by (agent, id).
    async fn list_grants(&self) -> Result<Vec<Grant>>;
    /// The grants to one agent, expired ones included (through an index where the store
    /// has one; this default scans).
    async fn list_grants_for_agent(&self, agent: &SpiffeId) -> Result<Vec<Grant>> {
        Ok(self
            .list_grants()
            .await?
            .into_iter()
            .filter(|g| g.agent() == Some(agent))
            .collect())
    }
    /// Stores `offer` unless its parent grant already has `max_per_grant` offers still
    /// redeemable at `now` (the count and the insert are one step); false when refused.
    async fn create_delegation_offer(
        &self,
        offer: DelegationOffer,
        max_per_grant: usize,
        now: i64,
    ) -> Result<bool>;
    /// Removes and returns the offer in one step: a delegation token is honoured once.
    async fn take_delegation_offer(&self, id: &str) -> Result<Option<DelegationOffer>>;
    /// Removes offers whose token has expired at `now`, and grants that expired before
    /// `grants_expired_before`; returns how many of each.
    async fn prune_delegation(
        &self,
        now: i64,
        grants_expired_before: i64,
    ) -> Result<(usize, usize)>;

    // Federation (docs/federation.md), by trust domain name.
    /// Creates or replaces the relationship with `relationship.trust_domain`.
    async fn put_federation(&self, relationship: &FederationRelationship) -> Result<()>;
    /// Every relationship, ordered by trust domain name.
    async fn list_federations(&self) -> Result<Vec<FederationRelationship>>;
    /// Removes the relationship; false when there was none.
    async fn delete_federation(&self, trust_domain: &TrustDomain) -> Result<bool>;
    /// Creates or replaces the bundle of `bundle.bundle.trust_domain`.
    async fn put_federated_bundle(&self, bundle: &FederatedBundle) -> Result<()>;
    /// Every federated bundle, ordered by trust domain name.
    async fn list_federated_bundles(&self) -> Result<Vec<FederatedBundle>>;
    /// Removes the bundle; false when there was none.
    async fn delete_federated_bundle(&self, trust_domain: &TrustDomain) -> Result<bool>;

    // Servers sharing the store: one trust domain, a CA per server.
    /// Stores what `published.server_id` holds of its authorities now, replacing what it
    /// published before.
    async fn publish_server_authorities(&self, published: ServerAuthorities) -> Result<()>;
    /// What every server published, ordered by server id.
    async fn list_server_authorities(&self) -> Result<Vec<ServerAuthorities>>;
    /// Tells the other servers of the store of a committed change (`notice` is under
    /// [`MAX_SERVER_NOTICE`] bytes). A notice is a hint to read the store, never the data:
    /// where no other server writes (the embedded store) there is nobody to tell.
    async fn notify_servers(&self, _notice: &str) -> Result<()> {
        Ok(())
    }
    /// The notices other servers (and this one) sent through [`Self::notify_servers`];
    /// `None` where no other server writes.
    fn server_notices(&self) -> Option<tokio::sync::broadcast::Receiver<String>> {
        None
    }

    /// Woken when another server may have appended revocations (PostgreSQL's NOTIFY); `None`
    /// where no other server writes (the embedded store). A wake-up is a hint to read the
    /// log; the log stays the truth.
    fn revocation_signal(&self) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        None
    }

    /// Whether the store answers now (a shared database may be down); the embedded store
    /// always does.
    async fn ping(&self) -> Result<()> {
        Ok(())
    }

    /// The used platform token ids (SHA-256 digests) and until when each is kept, for a
    /// migration; none where they are kept in memory only.
    async fn list_seen_tokens(&self) -> Result<Vec<(Vec<u8>, i64)>> {
        Ok(Vec::new())
    }

    /// Where node attestation records single-use platform token ids so that they stay
    /// used across restarts; `None` keeps them in memory only.
    fn seen_tokens(&self) -> Option<std::sync::Arc<dyn agentd_attestor::node::SeenTokens>> {
        None
    }
}
