//! The embedded default store, on sled. Records are JSON, one tree per resource; every write
//! is flushed to disk before it returns.
//!
//! Over 600 lines (about 1,150 of code, then its unit tests; the record codecs are in
//! `records.rs`): it is one implementation of the
//! whole `DataStore` trait, and its multi-tree transactions (entries with their indexes,
//! revocation events with issued records and the head, audit records with the checkpoint)
//! share the tree handles and locks below; splitting it by resource would spread each
//! transaction over several files.

use std::path::Path;

use sled::Transactional;
use spiffe::SpiffeId;
use tokio::sync::Mutex;

use super::records::{
    backend, corrupt, decode, encode, identity_key, key_name, ActivityRecord, EntryRecord,
    FederatedBundleRecord, FederationRecord, GrantRecord, JoinTokenRecord, NodeRecord, OfferRecord,
    OwnerRecord, ServerAuthoritiesRecord,
};
use super::revocation_records::{
    handle_prefix, issued_index_keys, issued_key, record_key_of, EventRecord, IssuedRecord,
};
use super::{
    AttestedNode, DataStore, DataStoreError, Entry, EntryFilter, EntryId, EntrySpec, JoinToken,
    Result,
};
use super::{DelegationOffer, Grant, ServerAuthorities};
use super::{EntryActivity, OwnerState};
use crate::delegation::GrantId;
use crate::model::audit::{
    AuditHead, AuditRecord, ChainSigner, SealedAuditRecord, StoredAuditRecord,
};
use crate::model::federation::{FederatedBundle, FederationRelationship};
use crate::model::revocation::{IssuedSvid, RevocationEvent, RevocationHandle};

const ENTRIES: &str = "entries";
const NODES: &str = "nodes";
const JOIN_TOKENS: &str = "join_tokens";
const ISSUED: &str = "issued_svids";
const REVOCATIONS: &str = "revocations";
const META: &str = "meta";
/// Key in META: the last revocation sequence handed out (u64 big-endian).
const REVOCATION_HEAD: &[u8] = b"revocation_head";
/// Audit records, keyed by sequence number (8 bytes big-endian, so keys sort in order).
pub const AUDIT: &str = "audit";
/// The audit log's checkpointed head, under [`AUDIT_HEAD_KEY`].
pub const AUDIT_META: &str = "audit_meta";
pub const AUDIT_HEAD_KEY: &[u8] = b"head";
/// The audit key's fingerprint, under this key of [`AUDIT_META`].
const AUDIT_KEY_ID: &[u8] = b"key_id";
const ENTRY_ACTIVITY: &str = "entry_activity";
const OWNERS: &str = "owners";
/// Server id -> what that server published of its authorities (one server here, but the
/// same records as a shared store, so the server code has one path).
const SERVER_AUTHORITIES: &str = "server_authorities";
const GRANTS: &str = "grants";
const FEDERATIONS: &str = "federations";
const FEDERATED_BUNDLES: &str = "federated_bundles";
const DELEGATION_OFFERS: &str = "delegation_offers";
/// Used platform token ids (see `seen_tokens`).
const SEEN_TOKENS: &str = "seen_tokens";
/// Index: an entry's identity (SPIFFE ID, parent, selectors; see `identity_key`) -> its id,
/// so the duplicate check of a create or update is one lookup, not a scan of every entry.
/// Written in each entry's transaction; rebuilt at open when it may not match
/// (`ensure_entry_indexes`), like the two below.
const ENTRY_IDENTITIES: &str = "entry_identities";
/// Index: parent ID, a 0 byte, entry id -> nothing, so the entries a node (or a node-set
/// alias) serves are a prefix scan, not a scan of every entry.
const ENTRIES_BY_PARENT: &str = "entries_by_parent";
/// Index: SPIFFE ID, a 0 byte, entry id -> nothing: the entries of one workload identity
/// (a delegated mint's ceiling, Attest's node-ID check) without a scan.
const ENTRIES_BY_SPIFFE_ID: &str = "entries_by_spiffe_id";
/// Index: agent SPIFFE ID, a 0 byte, grant id -> nothing: an agent's grants without a scan
/// (a sync's or a delta's grants). Kept after each grant write; rebuilt at open when its
/// count differs from the grants'.
const GRANTS_BY_AGENT: &str = "grants_by_agent";
/// Index: a revocation handle's prefix (`revocation_records::handle_prefix`), then an
/// issuance record's key -> nothing: the records each handle covers without a scan of every
/// record (an authority revocation over 50,000 SVIDs reads those 50,000, an entry's its
/// few). Written before the records it names, removed after them (`prune_issued`), so a
/// crash can leave a key naming no record (skipped, and dropped at the next open), never a
/// record its handles miss; every open also indexes any record without its keys.
const ISSUED_BY_HANDLE: &str = "issued_by_handle";
/// Index: owner, a 0 byte, entry id -> nothing: an owner's entries (owner suspension,
/// `entry show --owner`) without a scan. Entries without an owner are not in it. Kept in each
/// entry's transaction; built at open once (`OWNER_INDEX_BUILT`) and with the other entry
/// indexes whenever they are rebuilt.
const ENTRIES_BY_OWNER: &str = "entries_by_owner";
const OWNER_INDEX_BUILT: &[u8] = b"owner_index_built";
/// In `meta`: the entry indexes have been built; they are kept in each entry's transaction
/// from then on.
const ENTRY_INDEXES_BUILT: &[u8] = b"entry_indexes_built";

#[derive(Debug)]
pub struct SledStore {
    db: sled::Db,
    entries: sled::Tree,
    entry_identities: sled::Tree,
    entries_by_parent: sled::Tree,
    entries_by_spiffe_id: sled::Tree,
    entries_by_owner: sled::Tree,
    nodes: sled::Tree,
    join_tokens: sled::Tree,
    issued: sled::Tree,
    issued_by_handle: sled::Tree,
    /// Revocation events keyed by sequence (u64 big-endian, so iteration is in order).
    revocations: sled::Tree,
    meta: sled::Tree,
    /// Serialises revocation appends: read head, write event and head, as one step.
    revocation_writes: Mutex<()>,
    grants: sled::Tree,
    grants_by_agent: sled::Tree,
    delegation_offers: sled::Tree,
    /// Serialises entry writes, so the duplicate check and the insert are one step.
    entry_writes: Mutex<()>,
    /// Serialises offer creation, so the per-grant count and the insert are one step.
    offer_writes: Mutex<()>,
    audit: sled::Tree,
    audit_meta: sled::Tree,
    entry_activity: sled::Tree,
    owners: sled::Tree,
    server_authorities: sled::Tree,
    federations: sled::Tree,
    federated_bundles: sled::Tree,
    /// Serialises audit appends (the transaction would retry on conflict anyway; this keeps
    /// them from contending).
    audit_writes: Mutex<()>,
    /// Serialises read-modify-write of activity and owner records.
    activity_writes: Mutex<()>,
    /// Tests: make every flush fail (after its transaction committed), as a full disk would.
    #[cfg(test)]
    pub(crate) fail_flushes: std::sync::atomic::AtomicBool,
    /// Tests: flushes so far (how many durable writes a group of mints took).
    #[cfg(test)]
    pub(crate) flushes: std::sync::atomic::AtomicUsize,
    seen_tokens: std::sync::Arc<super::seen_tokens::SledSeenTokens>,
}

/// Opens the sled database in `dir`, waiting up to [`OPEN_LOCK_WAIT`] for a lock being
/// released.
///
/// sled releases its file lock when the last handle goes, which includes its own flusher
/// thread: a store reopened in the same process right after it was dropped (or one whose
/// previous owner is just exiting) can find it locked for a moment. Another live owner keeps
/// it locked, and is reported as InUse after the wait.
pub(crate) fn open_db(dir: &Path) -> Result<sled::Db> {
    let deadline = std::time::Instant::now() + OPEN_LOCK_WAIT;
    loop {
        match sled::Config::new().path(dir).open() {
            Ok(db) => return Ok(db),
            Err(e) => match open_error(dir, e) {
                DataStoreError::InUse { .. } if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                err => return Err(err),
            },
        }
    }
}

impl SledStore {
    pub fn open(dir: &Path) -> Result<Self> {
        let db = open_db(dir)?;
        let store = Self {
            entries: db.open_tree(ENTRIES).map_err(backend)?,
            entry_identities: db.open_tree(ENTRY_IDENTITIES).map_err(backend)?,
            entries_by_parent: db.open_tree(ENTRIES_BY_PARENT).map_err(backend)?,
            entries_by_spiffe_id: db.open_tree(ENTRIES_BY_SPIFFE_ID).map_err(backend)?,
            entries_by_owner: db.open_tree(ENTRIES_BY_OWNER).map_err(backend)?,
            nodes: db.open_tree(NODES).map_err(backend)?,
            join_tokens: db.open_tree(JOIN_TOKENS).map_err(backend)?,
            issued: db.open_tree(ISSUED).map_err(backend)?,
            issued_by_handle: db.open_tree(ISSUED_BY_HANDLE).map_err(backend)?,
            revocations: db.open_tree(REVOCATIONS).map_err(backend)?,
            meta: db.open_tree(META).map_err(backend)?,
            revocation_writes: Mutex::new(()),
            audit: db.open_tree(AUDIT).map_err(backend)?,
            audit_meta: db.open_tree(AUDIT_META).map_err(backend)?,
            entry_activity: db.open_tree(ENTRY_ACTIVITY).map_err(backend)?,
            owners: db.open_tree(OWNERS).map_err(backend)?,
            server_authorities: db.open_tree(SERVER_AUTHORITIES).map_err(backend)?,
            federations: db.open_tree(FEDERATIONS).map_err(backend)?,
            federated_bundles: db.open_tree(FEDERATED_BUNDLES).map_err(backend)?,
            grants: db.open_tree(GRANTS).map_err(backend)?,
            grants_by_agent: db.open_tree(GRANTS_BY_AGENT).map_err(backend)?,
            delegation_offers: db.open_tree(DELEGATION_OFFERS).map_err(backend)?,
            seen_tokens: std::sync::Arc::new(super::seen_tokens::SledSeenTokens::new(
                db.clone(),
                db.open_tree(SEEN_TOKENS).map_err(backend)?,
            )),
            db,
            entry_writes: Mutex::new(()),
            offer_writes: Mutex::new(()),
            audit_writes: Mutex::new(()),
            activity_writes: Mutex::new(()),
            #[cfg(test)]
            fail_flushes: Default::default(),
            #[cfg(test)]
            flushes: Default::default(),
        };
        store.ensure_entry_indexes()?;
        store.ensure_grant_index()?;
        store.ensure_issued_index()?;
        Ok(store)
    }

    /// Makes the issuance index cover every record, at every open: a store from before the
    /// index, or one an older binary wrote to meanwhile, has records with no keys, which no
    /// revocation would find. Also drops keys naming no record (a crash between a record's
    /// index and its write, or between a prune's two steps). Issuance records live only until
    /// their SVIDs expire, so this pass is bounded by the live SVIDs, not by history.
    fn ensure_issued_index(&self) -> Result<()> {
        let mut add = sled::Batch::default();
        let mut added = 0usize;
        for kv in self.issued.iter() {
            let (k, v) = kv.map_err(backend)?;
            match decode::<IssuedRecord>(&k, &v).and_then(|r| r.into_issued(&k)) {
                Ok(svid) => {
                    for key in issued_index_keys(&svid, &k) {
                        if !self.issued_by_handle.contains_key(&key).map_err(backend)? {
                            add.insert(key, &[]);
                            added += 1;
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "issuance record not indexed"),
            }
        }
        let mut drop = sled::Batch::default();
        let mut dropped = 0usize;
        for kv in self.issued_by_handle.iter() {
            let (key, _) = kv.map_err(backend)?;
            let named = match record_key_of(&key) {
                Some(record) => self.issued.contains_key(record).map_err(backend)?,
                None => false,
            };
            if !named {
                drop.remove(key);
                dropped += 1;
            }
        }
        if added + dropped > 0 {
            tracing::info!(added, dropped, "issuance index brought up to date");
            self.issued_by_handle.apply_batch(add).map_err(backend)?;
            self.issued_by_handle.apply_batch(drop).map_err(backend)?;
            self.db.flush().map_err(backend)?;
        }
        Ok(())
    }

    /// Rebuilds the grants-by-agent index when its count differs from the grants' (a store
    /// from before it, or a crash between a grant and its index write).
    fn ensure_grant_index(&self) -> Result<()> {
        if self.grants.len() == self.grants_by_agent.len() {
            return Ok(());
        }
        self.grants_by_agent.clear().map_err(backend)?;
        for kv in self.grants.iter() {
            let (k, v) = kv.map_err(backend)?;
            match decode::<GrantRecord>(&k, &v).and_then(|r| r.into_grant(&k)) {
                Ok(g) => {
                    if let Some(agent) = g.agent() {
                        self.grants_by_agent
                            .insert(grant_index_key(agent, &g.id), &[])
                            .map_err(backend)?;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "grant record not indexed"),
            }
        }
        self.db.flush().map_err(backend)?;
        Ok(())
    }

    /// Rebuilds the entry indexes when they may not match the entries: never built (a store
    /// from before them), or a count that differs (an index lost, or entries written by an
    /// older binary). Otherwise nothing is written at open: with 100k entries a rebuild is
    /// 300k index writes.
    fn ensure_entry_indexes(&self) -> Result<()> {
        let built = self
            .meta
            .get(ENTRY_INDEXES_BUILT)
            .map_err(backend)?
            .is_some();
        let owners_built = self.meta.get(OWNER_INDEX_BUILT).map_err(backend)?.is_some();
        let n = self.entries.len();
        if built
            && owners_built
            && self.entry_identities.len() == n
            && self.entries_by_parent.len() == n
            && self.entries_by_spiffe_id.len() == n
        {
            return Ok(());
        }
        self.rebuild_entry_indexes()?;
        self.meta
            .insert(ENTRY_INDEXES_BUILT, &[1u8])
            .map_err(backend)?;
        self.meta
            .insert(OWNER_INDEX_BUILT, &[1u8])
            .map_err(backend)?;
        self.db.flush().map_err(backend)?;
        Ok(())
    }

    /// Makes the entry indexes exactly what the entries say.
    fn rebuild_entry_indexes(&self) -> Result<()> {
        self.entry_identities.clear().map_err(backend)?;
        self.entries_by_parent.clear().map_err(backend)?;
        self.entries_by_spiffe_id.clear().map_err(backend)?;
        self.entries_by_owner.clear().map_err(backend)?;
        for kv in self.entries.iter() {
            let (k, v) = kv.map_err(backend)?;
            // A record that does not decode is not indexed: reading it keeps failing with
            // an error naming it (`Corrupt`), but it does not keep the store from opening.
            match decode::<EntryRecord>(&k, &v).and_then(|r| r.into_entry(&k)) {
                Ok(e) => {
                    self.entry_identities
                        .insert(identity_key(&e.spec), e.id.as_str())
                        .map_err(backend)?;
                    self.entries_by_parent
                        .insert(index_key(&e.spec.parent_id, &e.id), &[])
                        .map_err(backend)?;
                    self.entries_by_spiffe_id
                        .insert(index_key(&e.spec.spiffe_id, &e.id), &[])
                        .map_err(backend)?;
                    if let Some(key) = owner_key(&e.spec, &e.id) {
                        self.entries_by_owner.insert(key, &[]).map_err(backend)?;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "entry record not indexed"),
            }
        }
        Ok(())
    }

    /// The id of the entry with `spec`'s identity, if any.
    fn entry_with_identity(&self, spec: &EntrySpec) -> Result<Option<String>> {
        Ok(self
            .entry_identities
            .get(identity_key(spec))
            .map_err(backend)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Issuance records of `svids` (with `issued_at` for workload mints), not flushed.
    fn write_issued(&self, svids: &[IssuedSvid], issued_at: Option<i64>) -> Result<()> {
        let mut records = sled::Batch::default();
        let mut index = sled::Batch::default();
        for svid in svids {
            let key = issued_key(svid.kind, &svid.id);
            for index_key in issued_index_keys(svid, &key) {
                index.insert(index_key, &[]);
            }
            let record = match issued_at {
                Some(at) => IssuedRecord::issued_at(svid, at),
                None => IssuedRecord::from_issued(svid),
            };
            records.insert(key, encode(&record)?);
        }
        // The index first: a crash between the two leaves keys naming no record, which
        // lookups skip, never a record no handle finds.
        self.issued_by_handle.apply_batch(index).map_err(backend)?;
        self.issued.apply_batch(records).map_err(backend)
    }

    /// Seals `records` after the audit head and stores them with the new head in one
    /// transaction, not flushed; the caller holds `audit_writes`.
    fn seal_audit(
        &self,
        records: &[AuditRecord],
        time: i64,
        signer: &dyn ChainSigner,
    ) -> Result<Vec<SealedAuditRecord>> {
        use sled::transaction::{ConflictableTransactionError, TransactionError};
        use sled::Transactional as _;
        (&self.audit, &self.audit_meta)
            .transaction(|(log, meta)| {
                let abort = ConflictableTransactionError::Abort;
                let head: Option<AuditHead> = match meta.get(AUDIT_HEAD_KEY)? {
                    None => None,
                    Some(v) => Some(decode(AUDIT_HEAD_KEY, &v).map_err(abort)?),
                };
                let (sealed, head) =
                    crate::model::audit::seal_after(head.as_ref(), records, time, signer);
                for s in &sealed {
                    log.insert(audit_key(s.seq).to_vec(), encode(s).map_err(abort)?)?;
                }
                meta.insert(AUDIT_HEAD_KEY, encode(&head).map_err(abort)?)?;
                Ok(sealed)
            })
            .map_err(|e| match e {
                TransactionError::Abort(e) => e,
                TransactionError::Storage(e) => backend(e),
            })
    }

    async fn flush(&self) -> Result<()> {
        #[cfg(test)]
        {
            self.flushes
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if self.fail_flushes.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(backend("flush failed (injected by a test)"));
            }
        }
        self.db.flush_async().await.map_err(backend)?;
        Ok(())
    }

    async fn entry_records(&self) -> Result<Vec<Entry>> {
        scan_tree(&self.entries, |k, v| {
            decode::<EntryRecord>(k, v)?.into_entry(k).map(Some)
        })
        .await
    }
}

/// Decodes every record of `tree` through `decode_one` (`None` skips one) on the blocking
/// pool: a scan of a large tree (100,000 entries, a million revocation events) runs long
/// enough to stall an async worker, and with it every call that worker serves. Lookups
/// through a key or an index stay inline; they are a few microseconds.
async fn scan_tree<T, F>(tree: &sled::Tree, decode_one: F) -> Result<Vec<T>>
where
    T: Send + 'static,
    F: Fn(&[u8], &[u8]) -> Result<Option<T>> + Send + 'static,
{
    let tree = tree.clone();
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        for kv in tree.iter() {
            let (k, v) = kv.map_err(backend)?;
            if let Some(item) = decode_one(&k, &v)? {
                out.push(item);
            }
        }
        Ok(out)
    })
    .await
    .map_err(|e| backend(format!("store scan: {e}")))?
}

/// sled reports a store locked by another process as a generic I/O error whose message
/// starts with this (sled 0.34, `Config::open_file`); the lock is an exclusive flock on the
/// store's `db` file.
const SLED_LOCKED: &str = "could not acquire lock on";

/// How long [`SledStore::open`] waits for a store lock that is being released.
const OPEN_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

fn open_error(dir: &Path, e: sled::Error) -> DataStoreError {
    match &e {
        sled::Error::Io(io) if io.to_string().starts_with(SLED_LOCKED) => DataStoreError::InUse {
            path: dir.display().to_string(),
        },
        _ => DataStoreError::Backend {
            reason: format!("opening {}: {e}", dir.display()),
        },
    }
}

impl SledStore {
    fn activity_record(&self, key: &str) -> Result<ActivityRecord> {
        match self.entry_activity.get(key).map_err(backend)? {
            None => Ok(ActivityRecord::default()),
            Some(v) => decode(key.as_bytes(), &v),
        }
    }
}

fn audit_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

/// `entries_by_parent` and `entries_by_spiffe_id` key: the SPIFFE ID indexed by, a 0 byte
/// (in no SPIFFE ID), the entry id.
fn index_key(parent: &SpiffeId, id: &EntryId) -> Vec<u8> {
    let mut key = index_prefix(parent);
    key.extend_from_slice(id.as_str().as_bytes());
    key
}

/// `grants_by_agent` key: the agent's SPIFFE ID, a 0 byte, the grant id.
fn grant_index_key(agent: &SpiffeId, id: &GrantId) -> Vec<u8> {
    let mut key = index_prefix(agent);
    key.extend_from_slice(id.as_str().as_bytes());
    key
}

/// `entries_by_owner` key of an entry with an owner: the owner, a 0 byte, the entry id.
fn owner_key(spec: &EntrySpec, id: &EntryId) -> Option<Vec<u8>> {
    let mut key = owner_prefix(spec.owner.as_deref()?);
    key.extend_from_slice(id.as_str().as_bytes());
    Some(key)
}

fn owner_prefix(owner: &str) -> Vec<u8> {
    let mut key = owner.as_bytes().to_vec();
    key.push(0);
    key
}

fn index_prefix(parent: &SpiffeId) -> Vec<u8> {
    let mut key = parent.to_string().into_bytes();
    key.push(0);
    key
}

fn tx_err(e: sled::transaction::TransactionError<()>) -> DataStoreError {
    backend(format!("{e:?}"))
}

#[async_trait::async_trait]
impl DataStore for SledStore {
    fn seen_tokens(&self) -> Option<std::sync::Arc<dyn agentd_attestor::node::SeenTokens>> {
        Some(self.seen_tokens.clone())
    }

    async fn create_entry(&self, spec: EntrySpec, now: i64) -> Result<Entry> {
        let _guard = self.entry_writes.lock().await;
        if let Some(id) = self.entry_with_identity(&spec)? {
            return Err(DataStoreError::DuplicateEntry { id });
        }
        let entry = Entry {
            id: EntryId::generate(),
            spec,
            revision: 1,
            created_at: now,
        };
        let value = encode(&EntryRecord::from_entry(&entry))?;
        let key = identity_key(&entry.spec);
        let by_parent = index_key(&entry.spec.parent_id, &entry.id);
        let by_id = index_key(&entry.spec.spiffe_id, &entry.id);
        let by_owner = owner_key(&entry.spec, &entry.id);
        (
            &self.entries,
            &self.entry_identities,
            &self.entries_by_parent,
            &self.entries_by_spiffe_id,
            &self.entries_by_owner,
        )
            .transaction(|(entries, identities, parents, ids, owners)| {
                entries.insert(entry.id.as_str(), value.as_slice())?;
                identities.insert(&key, entry.id.as_str())?;
                parents.insert(by_parent.as_slice(), &[])?;
                ids.insert(by_id.as_slice(), &[])?;
                if let Some(k) = &by_owner {
                    owners.insert(k.as_slice(), &[])?;
                }
                Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(tx_err)?;
        self.flush().await?;
        Ok(entry)
    }

    async fn get_entry(&self, id: &EntryId) -> Result<Option<Entry>> {
        match self.entries.get(id.as_str()).map_err(backend)? {
            None => Ok(None),
            Some(v) => Ok(Some(
                decode::<EntryRecord>(id.as_str().as_bytes(), &v)?
                    .into_entry(id.as_str().as_bytes())?,
            )),
        }
    }

    async fn list_entries(&self, filter: &EntryFilter) -> Result<Vec<Entry>> {
        // O(matching entries) through an index when the filter names a parent or a SPIFFE ID.
        let index = match (&filter.parent_id, &filter.spiffe_id, &filter.owner) {
            (Some(parent), _, _) => Some((&self.entries_by_parent, index_prefix(parent))),
            (None, Some(id), _) => Some((&self.entries_by_spiffe_id, index_prefix(id))),
            (None, None, Some(owner)) => Some((&self.entries_by_owner, owner_prefix(owner))),
            (None, None, None) => None,
        };
        let candidates = match index {
            Some((tree, prefix)) => {
                let mut out = Vec::new();
                for kv in tree.scan_prefix(&prefix) {
                    let (k, _) = kv.map_err(backend)?;
                    let id = &k[prefix.len()..];
                    if let Some(v) = self.entries.get(id).map_err(backend)? {
                        out.push(decode::<EntryRecord>(id, &v)?.into_entry(id)?);
                    }
                }
                out
            }
            None => self.entry_records().await?,
        };
        let mut entries: Vec<Entry> = candidates
            .into_iter()
            .filter(|e| filter.matches(e))
            .collect();
        entries.sort_by(|a, b| (&a.spec.spiffe_id, &a.id).cmp(&(&b.spec.spiffe_id, &b.id)));
        Ok(entries)
    }

    async fn update_entry(&self, id: &EntryId, spec: EntrySpec) -> Result<Entry> {
        let _guard = self.entry_writes.lock().await;
        let current = self
            .get_entry(id)
            .await?
            .ok_or_else(|| DataStoreError::EntryNotFound { id: id.to_string() })?;
        if let Some(dup) = self.entry_with_identity(&spec)? {
            if dup != id.as_str() {
                return Err(DataStoreError::DuplicateEntry { id: dup });
            }
        }
        let old_key = identity_key(&current.spec);
        let updated = Entry {
            id: current.id,
            spec,
            revision: current.revision + 1,
            created_at: current.created_at,
        };
        let value = encode(&EntryRecord::from_entry(&updated))?;
        let new_key = identity_key(&updated.spec);
        let old_parent = index_key(&current.spec.parent_id, id);
        let new_parent = index_key(&updated.spec.parent_id, id);
        let old_id = index_key(&current.spec.spiffe_id, id);
        let new_id = index_key(&updated.spec.spiffe_id, id);
        let old_owner = owner_key(&current.spec, id);
        let new_owner = owner_key(&updated.spec, id);
        (
            &self.entries,
            &self.entry_identities,
            &self.entries_by_parent,
            &self.entries_by_spiffe_id,
            &self.entries_by_owner,
        )
            .transaction(|(entries, identities, parents, ids, owners)| {
                entries.insert(id.as_str(), value.as_slice())?;
                identities.remove(&old_key)?;
                identities.insert(&new_key, id.as_str())?;
                parents.remove(old_parent.as_slice())?;
                parents.insert(new_parent.as_slice(), &[])?;
                ids.remove(old_id.as_slice())?;
                ids.insert(new_id.as_slice(), &[])?;
                if let Some(k) = &old_owner {
                    owners.remove(k.as_slice())?;
                }
                if let Some(k) = &new_owner {
                    owners.insert(k.as_slice(), &[])?;
                }
                Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(tx_err)?;
        self.flush().await?;
        Ok(updated)
    }

    async fn delete_entry(&self, id: &EntryId) -> Result<Entry> {
        let _guard = self.entry_writes.lock().await;
        let old = self
            .get_entry(id)
            .await?
            .ok_or_else(|| DataStoreError::EntryNotFound { id: id.to_string() })?;
        let key = identity_key(&old.spec);
        let by_parent = index_key(&old.spec.parent_id, id);
        let by_id = index_key(&old.spec.spiffe_id, id);
        let by_owner = owner_key(&old.spec, id);
        (
            &self.entries,
            &self.entry_identities,
            &self.entries_by_parent,
            &self.entries_by_spiffe_id,
            &self.entries_by_owner,
        )
            .transaction(|(entries, identities, parents, ids, owners)| {
                entries.remove(id.as_str())?;
                identities.remove(&key)?;
                parents.remove(by_parent.as_slice())?;
                ids.remove(by_id.as_slice())?;
                if let Some(k) = &by_owner {
                    owners.remove(k.as_slice())?;
                }
                Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(tx_err)?;
        self.entry_activity.remove(id.as_str()).map_err(backend)?;
        self.flush().await?;
        Ok(old)
    }

    async fn upsert_node(&self, node: AttestedNode) -> Result<()> {
        let record = NodeRecord::from_node(&node);
        self.nodes
            .insert(record.spiffe_id.as_bytes(), encode(&record)?)
            .map_err(backend)?;
        self.flush().await
    }

    async fn get_node(&self, spiffe_id: &SpiffeId) -> Result<Option<AttestedNode>> {
        let key = spiffe_id.to_string();
        match self.nodes.get(key.as_bytes()).map_err(backend)? {
            None => Ok(None),
            Some(v) => Ok(Some(
                decode::<NodeRecord>(key.as_bytes(), &v)?.into_node(key.as_bytes())?,
            )),
        }
    }

    async fn list_nodes(&self) -> Result<Vec<AttestedNode>> {
        scan_tree(&self.nodes, |k, v| {
            decode::<NodeRecord>(k, v)?.into_node(k).map(Some)
        })
        .await
    }

    async fn delete_node(&self, spiffe_id: &SpiffeId) -> Result<AttestedNode> {
        let key = spiffe_id.to_string();
        let old = self
            .nodes
            .remove(key.as_bytes())
            .map_err(backend)?
            .ok_or_else(|| DataStoreError::NodeNotFound {
                spiffe_id: key.clone(),
            })?;
        self.flush().await?;
        decode::<NodeRecord>(key.as_bytes(), &old)?.into_node(key.as_bytes())
    }

    async fn create_join_token(&self, token: JoinToken) -> Result<()> {
        let record = JoinTokenRecord {
            spiffe_id: token.spiffe_id.to_string(),
            expires_at: token.expires_at,
        };
        self.join_tokens
            .insert(token.token_sha256.as_bytes(), encode(&record)?)
            .map_err(backend)?;
        self.flush().await
    }

    async fn take_join_token(&self, token_sha256: &str) -> Result<Option<JoinToken>> {
        let Some(v) = self
            .join_tokens
            .remove(token_sha256.as_bytes())
            .map_err(backend)?
        else {
            return Ok(None);
        };
        self.flush().await?;
        let record: JoinTokenRecord = decode(token_sha256.as_bytes(), &v)?;
        Ok(Some(JoinToken {
            token_sha256: token_sha256.to_string(),
            spiffe_id: SpiffeId::new(&record.spiffe_id)
                .map_err(|e| corrupt(token_sha256.as_bytes(), "spiffe_id", e))?,
            expires_at: record.expires_at,
        }))
    }

    async fn record_issued(&self, svids: &[IssuedSvid]) -> Result<()> {
        self.write_issued(svids, None)
    }

    async fn list_issued(&self, now: i64) -> Result<Vec<IssuedSvid>> {
        scan_tree(&self.issued, move |k, v| {
            let record: IssuedRecord = decode(k, v)?;
            if record.expires_at() > now {
                record.into_issued(k).map(Some)
            } else {
                Ok(None)
            }
        })
        .await
    }

    async fn list_issued_covered(
        &self,
        handles: &[RevocationHandle],
        now: i64,
    ) -> Result<Vec<IssuedSvid>> {
        let mut seen = std::collections::BTreeSet::new();
        let mut out = Vec::new();
        for handle in handles {
            let prefix = handle_prefix(handle);
            for kv in self.issued_by_handle.scan_prefix(&prefix) {
                let (index_key, _) = kv.map_err(backend)?;
                let Some(key) = index_key.strip_prefix(prefix.as_slice()) else {
                    continue;
                };
                if seen.contains(key) {
                    continue;
                }
                let Some(v) = self.issued.get(key).map_err(backend)? else {
                    continue; // a key a crash left behind
                };
                let record: IssuedRecord = decode(key, &v)?;
                if record.expires_at() <= now {
                    continue;
                }
                let svid = record.into_issued(key)?;
                // The index narrows, `covers` decides. Only this handle: checking every one
                // would make a cascade over many child entries quadratic.
                if handle.covers(&svid) {
                    seen.insert(key.to_vec());
                    out.push(svid);
                }
            }
        }
        Ok(out)
    }

    async fn prune_issued(&self, now: i64) -> Result<usize> {
        let expired = scan_tree(&self.issued, move |k, v| {
            let record: IssuedRecord = decode(k, v)?;
            if record.expires_at() > now {
                return Ok(None);
            }
            let issued = record.activity().map(|a| (a.entry_id, a.issued_at));
            // A record whose other fields do not parse still goes; its index keys, if it
            // had any, are dropped at the next open.
            let index_keys = match record.into_issued(k) {
                Ok(svid) => issued_index_keys(&svid, k),
                Err(e) => {
                    tracing::warn!(error = %e, "pruning an unreadable issuance record");
                    Vec::new()
                }
            };
            Ok(Some((k.to_vec(), index_keys, issued)))
        })
        .await?;
        // What `last_issued` derived from these records stays in the activity record.
        let mut last_issued = std::collections::BTreeMap::<&str, i64>::new();
        for (_, _, issued) in &expired {
            if let Some((entry, at)) = issued {
                let t = last_issued.entry(entry.as_str()).or_insert(*at);
                *t = (*t).max(*at);
            }
        }
        if !last_issued.is_empty() {
            let _guard = self.activity_writes.lock().await;
            let mut batch = sled::Batch::default();
            for (id, at) in last_issued {
                if !self.entries.contains_key(id).map_err(backend)? {
                    continue;
                }
                let mut rec = self.activity_record(id)?;
                rec.note_issued_at(at);
                batch.insert(id.as_bytes(), encode(&rec)?);
            }
            self.entry_activity.apply_batch(batch).map_err(backend)?;
            // Before the records go: a crash in between keeps both, never neither.
            self.flush().await?;
        }
        // Records first, then their index keys (see ISSUED_BY_HANDLE).
        let mut records = sled::Batch::default();
        let mut index = sled::Batch::default();
        for (k, index_keys, _) in &expired {
            records.remove(k.as_slice());
            for key in index_keys {
                index.remove(key.as_slice());
            }
        }
        self.issued.apply_batch(records).map_err(backend)?;
        self.issued_by_handle.apply_batch(index).map_err(backend)?;
        Ok(expired.len())
    }

    async fn append_revocation(&self, event: RevocationEvent) -> Result<RevocationEvent> {
        self.append_revocations(vec![event])
            .await?
            .pop()
            .ok_or_else(|| backend("a batch of one revocation appended none"))
    }

    async fn append_revocations(
        &self,
        mut events: Vec<RevocationEvent>,
    ) -> Result<Vec<RevocationEvent>> {
        let _guard = self.revocation_writes.lock().await;
        let head = self.revocation_head().await?;
        let mut records = Vec::with_capacity(events.len());
        for (n, event) in (1..).zip(events.iter_mut()) {
            event.sequence = head + n;
            records.push((
                event.sequence.to_be_bytes(),
                encode(&EventRecord::from_event(event))?,
            ));
        }
        let Some((last, _)) = records.last() else {
            return Ok(events);
        };
        let last = *last;
        (&self.revocations, &self.meta)
            .transaction(|(revocations, meta)| {
                for (key, value) in &records {
                    revocations.insert(key, value.as_slice())?;
                }
                meta.insert(REVOCATION_HEAD, &last)?;
                Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(|e| backend(format!("{e:?}")))?;
        self.flush().await?;
        Ok(events)
    }

    async fn list_revocations(&self) -> Result<Vec<RevocationEvent>> {
        scan_tree(&self.revocations, |k, v| {
            decode::<EventRecord>(k, v)?.into_event(k).map(Some)
        })
        .await
    }

    async fn list_revocations_after(&self, after: u64) -> Result<Vec<RevocationEvent>> {
        let Some(from) = after.checked_add(1) else {
            return Ok(Vec::new());
        };
        self.revocations
            .range(from.to_be_bytes()..)
            .map(|kv| {
                let (k, v) = kv.map_err(backend)?;
                decode::<EventRecord>(&k, &v)?.into_event(&k)
            })
            .collect()
    }

    async fn revocation_head(&self) -> Result<u64> {
        match self.meta.get(REVOCATION_HEAD).map_err(backend)? {
            None => Ok(0),
            Some(v) => {
                let bytes: [u8; 8] =
                    v.as_ref().try_into().map_err(|_| DataStoreError::Corrupt {
                        key: "revocation_head".into(),
                        reason: format!("{} bytes, expected 8", v.len()),
                    })?;
                Ok(u64::from_be_bytes(bytes))
            }
        }
    }

    async fn compact_revocations(&self, sequences: &[u64]) -> Result<()> {
        let mut batch = sled::Batch::default();
        for seq in sequences {
            batch.remove(&seq.to_be_bytes());
        }
        self.revocations.apply_batch(batch).map_err(backend)?;
        self.flush().await
    }

    async fn append_audit(
        &self,
        records: Vec<AuditRecord>,
        time: i64,
        signer: &dyn ChainSigner,
    ) -> Result<Vec<SealedAuditRecord>> {
        let sealed = {
            let _guard = self.audit_writes.lock().await;
            self.seal_audit(&records, time, signer)?
        };
        self.flush().await?;
        Ok(sealed)
    }

    async fn append_issuance(
        &self,
        svids: &[IssuedSvid],
        records: Vec<AuditRecord>,
        time: i64,
        signer: &dyn ChainSigner,
    ) -> Result<Vec<SealedAuditRecord>> {
        self.write_issued(svids, Some(time))?;
        let sealed = {
            let _guard = self.audit_writes.lock().await;
            self.seal_audit(&records, time, signer)?
        };
        // One flush makes both durable (sled's log is one for every tree); concurrent
        // mints that sealed meanwhile share it.
        self.flush().await?;
        Ok(sealed)
    }

    async fn audit_records(&self, after_seq: u64, limit: usize) -> Result<Vec<StoredAuditRecord>> {
        let Some(start) = after_seq.checked_add(1) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for kv in self.audit.range(audit_key(start)..).take(limit) {
            let (k, v) = kv.map_err(backend)?;
            let seq = <[u8; 8]>::try_from(k.as_ref())
                .map(u64::from_be_bytes)
                .map_err(|_| corrupt(&k, "key", "not an 8-byte sequence number"))?;
            out.push(StoredAuditRecord {
                seq,
                body: v.to_vec(),
            });
        }
        Ok(out)
    }

    async fn audit_head(&self) -> Result<Option<AuditHead>> {
        match self.audit_meta.get(AUDIT_HEAD_KEY).map_err(backend)? {
            None => Ok(None),
            Some(v) => Ok(Some(decode(AUDIT_HEAD_KEY, &v)?)),
        }
    }

    async fn claim_audit_key_id(&self, key_id: &str) -> Result<String> {
        let claimed = match self
            .audit_meta
            .compare_and_swap(AUDIT_KEY_ID, None::<&[u8]>, Some(key_id.as_bytes()))
            .map_err(backend)?
        {
            Ok(()) => {
                self.flush().await?;
                key_id.to_owned()
            }
            Err(held) => key_name(held.current.as_deref().unwrap_or_default()),
        };
        Ok(claimed)
    }

    async fn list_seen_tokens(&self) -> Result<Vec<(Vec<u8>, i64)>> {
        self.seen_tokens.list().map_err(backend)
    }

    async fn note_fetched(&self, entries: Vec<EntryId>, now: i64) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let _guard = self.activity_writes.lock().await;
        let mut batch = sled::Batch::default();
        for id in entries {
            if !self.entries.contains_key(id.as_str()).map_err(backend)? {
                continue;
            }
            let mut rec = self.activity_record(id.as_str())?;
            rec.note_fetched(now);
            batch.insert(id.as_str().as_bytes(), encode(&rec)?);
        }
        // Statistics, on the minting and sync paths: not flushed here (see the trait).
        self.entry_activity.apply_batch(batch).map_err(backend)
    }

    async fn entry_activity(&self) -> Result<std::collections::HashMap<EntryId, EntryActivity>> {
        // Issuance records first: a prune moves `last_issued` into the activity record
        // before it deletes, so one of the two reads sees it.
        let issued = scan_tree(&self.issued, |k, v| {
            Ok(decode::<IssuedRecord>(k, v)?.activity())
        })
        .await?;
        let pairs = scan_tree(&self.entry_activity, |k, v| {
            let id: EntryId = std::str::from_utf8(k)
                .map_err(|e| corrupt(k, "key", e))?
                .parse()
                .map_err(|e| corrupt(k, "key", e))?;
            Ok(Some((id, decode::<ActivityRecord>(k, v)?.into_activity())))
        })
        .await?;
        let entries = self.entries.clone();
        Ok(super::lifecycle::with_issued(
            pairs.into_iter().collect(),
            issued,
            |id| entries.contains_key(id).unwrap_or(false),
        ))
    }

    async fn entry_activity_of(&self, id: &EntryId) -> Result<EntryActivity> {
        // Through the entry's handle index, not a scan of every record.
        let prefix = handle_prefix(&RevocationHandle::Entry(id.clone()));
        let mut issued = Vec::new();
        for kv in self.issued_by_handle.scan_prefix(&prefix) {
            let (index_key, _) = kv.map_err(backend)?;
            let Some(key) = index_key.strip_prefix(prefix.as_slice()) else {
                continue;
            };
            let Some(v) = self.issued.get(key).map_err(backend)? else {
                continue; // a key a crash left behind
            };
            issued.extend(decode::<IssuedRecord>(key, &v)?.activity());
        }
        let stored = match self.entry_activity.get(id.as_str()).map_err(backend)? {
            Some(v) => decode::<ActivityRecord>(id.as_str().as_bytes(), &v)?.into_activity(),
            None => EntryActivity::default(),
        };
        let exists = self.entries.contains_key(id.as_str()).map_err(backend)?;
        Ok(super::lifecycle::with_issued(
            std::collections::HashMap::from([(id.clone(), stored)]),
            issued,
            |_| exists,
        )
        .remove(id)
        .filter(|_| exists)
        .unwrap_or_default())
    }

    async fn set_owner_disabled(
        &self,
        owner: &str,
        disabled: bool,
        now: i64,
    ) -> Result<OwnerState> {
        let _guard = self.activity_writes.lock().await;
        let record = OwnerRecord {
            disabled,
            changed_at: now,
        };
        self.owners
            .insert(owner.as_bytes(), encode(&record)?)
            .map_err(backend)?;
        self.flush().await?;
        Ok(OwnerState {
            owner: owner.to_string(),
            disabled,
            changed_at: now,
        })
    }

    async fn get_owner(&self, owner: &str) -> Result<Option<OwnerState>> {
        match self.owners.get(owner.as_bytes()).map_err(backend)? {
            None => Ok(None),
            Some(v) => {
                let r: OwnerRecord = decode(owner.as_bytes(), &v)?;
                Ok(Some(OwnerState {
                    owner: owner.to_string(),
                    disabled: r.disabled,
                    changed_at: r.changed_at,
                }))
            }
        }
    }

    async fn list_owners(&self) -> Result<Vec<OwnerState>> {
        self.owners
            .iter()
            .map(|kv| {
                let (k, v) = kv.map_err(backend)?;
                let r: OwnerRecord = decode(&k, &v)?;
                Ok(OwnerState {
                    owner: key_name(&k),
                    disabled: r.disabled,
                    changed_at: r.changed_at,
                })
            })
            .collect()
    }

    async fn publish_server_authorities(&self, published: ServerAuthorities) -> Result<()> {
        let record = ServerAuthoritiesRecord::from_published(&published);
        self.server_authorities
            .insert(published.server_id.as_bytes(), encode(&record)?)
            .map_err(backend)?;
        self.flush().await
    }

    async fn list_server_authorities(&self) -> Result<Vec<ServerAuthorities>> {
        self.server_authorities
            .iter()
            .map(|kv| {
                let (k, v) = kv.map_err(backend)?;
                let record: ServerAuthoritiesRecord = decode(&k, &v)?;
                record.into_published(&k, key_name(&k))
            })
            .collect()
    }

    async fn put_federation(&self, relationship: &FederationRelationship) -> Result<()> {
        let record = FederationRecord::from_relationship(relationship);
        self.federations
            .insert(
                relationship.trust_domain.as_str().as_bytes(),
                encode(&record)?,
            )
            .map_err(backend)?;
        self.flush().await
    }

    async fn list_federations(&self) -> Result<Vec<FederationRelationship>> {
        self.federations
            .iter()
            .map(|kv| {
                let (k, v) = kv.map_err(backend)?;
                decode::<FederationRecord>(&k, &v)?.into_relationship(&k)
            })
            .collect()
    }

    async fn delete_federation(&self, trust_domain: &spiffe::TrustDomain) -> Result<bool> {
        let gone = self
            .federations
            .remove(trust_domain.as_str().as_bytes())
            .map_err(backend)?
            .is_some();
        self.flush().await?;
        Ok(gone)
    }

    async fn put_federated_bundle(&self, bundle: &FederatedBundle) -> Result<()> {
        let record = FederatedBundleRecord::from_bundle(bundle);
        self.federated_bundles
            .insert(
                bundle.bundle.trust_domain.as_str().as_bytes(),
                encode(&record)?,
            )
            .map_err(backend)?;
        self.flush().await
    }

    async fn list_federated_bundles(&self) -> Result<Vec<FederatedBundle>> {
        self.federated_bundles
            .iter()
            .map(|kv| {
                let (k, v) = kv.map_err(backend)?;
                decode::<FederatedBundleRecord>(&k, &v)?.into_bundle(&k)
            })
            .collect()
    }

    async fn delete_federated_bundle(&self, trust_domain: &spiffe::TrustDomain) -> Result<bool> {
        let gone = self
            .federated_bundles
            .remove(trust_domain.as_str().as_bytes())
            .map_err(backend)?
            .is_some();
        self.flush().await?;
        Ok(gone)
    }

    async fn count_live_grants(&self, now: i64) -> Result<u64> {
        Ok(self
            .list_grants()
            .await?
            .iter()
            .filter(|g| g.delegation.expires_at > now)
            .count() as u64)
    }

    async fn create_grant(&self, grant: Grant) -> Result<()> {
        let record = GrantRecord::from_grant(&grant);
        // compare_and_swap from "absent": a grant id is never overwritten.
        self.grants
            .compare_and_swap(
                record.id.as_bytes(),
                None as Option<&[u8]>,
                Some(encode(&record)?),
            )
            .map_err(backend)?
            .map_err(|_| DataStoreError::DuplicateGrant {
                id: record.id.clone(),
            })?;
        if let Some(agent) = grant.agent() {
            self.grants_by_agent
                .insert(grant_index_key(agent, &grant.id), &[])
                .map_err(backend)?;
        }
        self.flush().await
    }

    async fn get_grant(&self, id: &GrantId) -> Result<Option<Grant>> {
        let key = id.as_str().as_bytes();
        match self.grants.get(key).map_err(backend)? {
            None => Ok(None),
            Some(v) => Ok(Some(decode::<GrantRecord>(key, &v)?.into_grant(key)?)),
        }
    }

    async fn list_grants(&self) -> Result<Vec<Grant>> {
        let mut grants = scan_tree(&self.grants, |k, v| {
            decode::<GrantRecord>(k, v)?.into_grant(k).map(Some)
        })
        .await?;
        grants.sort_by(|a, b| (a.agent(), &a.id).cmp(&(b.agent(), &b.id)));
        Ok(grants)
    }

    async fn list_grants_for_agent(&self, agent: &SpiffeId) -> Result<Vec<Grant>> {
        let prefix = index_prefix(agent);
        let mut out = Vec::new();
        for kv in self.grants_by_agent.scan_prefix(&prefix) {
            let (k, _) = kv.map_err(backend)?;
            let id = &k[prefix.len()..];
            if let Some(v) = self.grants.get(id).map_err(backend)? {
                out.push(decode::<GrantRecord>(id, &v)?.into_grant(id)?);
            }
        }
        Ok(out)
    }

    async fn create_delegation_offer(
        &self,
        offer: DelegationOffer,
        max_per_grant: usize,
        now: i64,
    ) -> Result<bool> {
        let record = OfferRecord::from_offer(&offer);
        let _guard = self.offer_writes.lock().await;
        // Offers are pruned at expiry, so this scan stays short.
        let mut live = 0;
        for kv in self.delegation_offers.iter() {
            let (k, v) = kv.map_err(backend)?;
            let r: OfferRecord = decode(&k, &v)?;
            if r.parent_grant_id == record.parent_grant_id && r.redeem_by > now {
                live += 1;
            }
        }
        if live >= max_per_grant {
            return Ok(false);
        }
        self.delegation_offers
            .insert(offer.id.as_bytes(), encode(&record)?)
            .map_err(backend)?;
        self.flush().await?;
        Ok(true)
    }

    async fn prune_delegation(
        &self,
        now: i64,
        grants_expired_before: i64,
    ) -> Result<(usize, usize)> {
        let mut offers = sled::Batch::default();
        let mut n_offers = 0;
        for kv in self.delegation_offers.iter() {
            let (k, v) = kv.map_err(backend)?;
            if decode::<OfferRecord>(&k, &v)?.redeem_by <= now {
                offers.remove(k);
                n_offers += 1;
            }
        }
        let mut grants = sled::Batch::default();
        let mut index = sled::Batch::default();
        let mut n_grants = 0;
        for kv in self.grants.iter() {
            let (k, v) = kv.map_err(backend)?;
            let record = decode::<GrantRecord>(&k, &v)?;
            if record.expires_at < grants_expired_before {
                let grant = record.into_grant(&k)?;
                if let Some(agent) = grant.agent() {
                    index.remove(grant_index_key(agent, &grant.id));
                }
                grants.remove(k);
                n_grants += 1;
            }
        }
        self.grants_by_agent.apply_batch(index).map_err(backend)?;
        self.delegation_offers
            .apply_batch(offers)
            .map_err(backend)?;
        self.grants.apply_batch(grants).map_err(backend)?;
        self.flush().await?;
        Ok((n_offers, n_grants))
    }

    async fn take_delegation_offer(&self, id: &str) -> Result<Option<DelegationOffer>> {
        let Some(v) = self
            .delegation_offers
            .remove(id.as_bytes())
            .map_err(backend)?
        else {
            return Ok(None);
        };
        self.flush().await?;
        Ok(Some(
            decode::<OfferRecord>(id.as_bytes(), &v)?.into_offer(id)?,
        ))
    }
}

/// The store conformance suite (`datastore::conformance`) on sled.
#[cfg(test)]
mod conformance_suite {
    fn open() -> (tempfile::TempDir, crate::datastore::conformance::Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(super::SledStore::open(dir.path()).unwrap());
        (dir, store)
    }

    crate::datastore::conformance::datastore_conformance!(open());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delegation::{Delegation, Hop, ScopeSet};
    use crate::ttl::Ttl;

    fn spec(id: &str, sel: &str) -> EntrySpec {
        EntrySpec {
            resources: vec![],
            spiffe_id: SpiffeId::new(id).unwrap(),
            parent_id: SpiffeId::new("spiffe://example.org/node/a").unwrap(),
            selectors: vec![sel.parse().unwrap()],
            x509_svid_ttl: Ttl::from_secs(3600).unwrap(),
            jwt_svid_ttl: Ttl::from_secs(300).unwrap(),
            dns_names: vec![],
            hint: String::new(),
            scopes: vec!["crm:read".into()],
            owner: Some("alice@example.com".into()),
            federates_with: vec![],
        }
    }

    #[test]
    fn a_store_open_elsewhere_is_in_use_naming_its_dir() {
        let dir = tempfile::tempdir().unwrap();
        let _first = SledStore::open(dir.path()).unwrap();
        match SledStore::open(dir.path()) {
            Err(DataStoreError::InUse { path }) => {
                assert_eq!(path, dir.path().display().to_string())
            }
            other => panic!("expected InUse, got {other:?}"),
        }
    }

    fn serial_revocation(serial: &str) -> RevocationEvent {
        use crate::model::revocation::{RevocationAction, RevocationHandle, RevokedSerial};
        RevocationEvent {
            sequence: 0,
            action: RevocationAction::Revoke,
            handle: RevocationHandle::Svid(serial.into()),
            reason: "test".into(),
            at: 10,
            serials: vec![RevokedSerial {
                serial: serial.into(),
                authority_id: "ca".into(),
                expires_at: 100,
            }],
            jwt_ids: vec![],
            expires_at: 100,
        }
    }

    #[tokio::test]
    async fn a_batch_of_revocations_takes_the_next_sequences_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path()).unwrap();
            let one = store
                .append_revocation(serial_revocation("a1"))
                .await
                .unwrap();
            assert_eq!(one.sequence, 1);
            let batch = store
                .append_revocations(vec![
                    serial_revocation("b1"),
                    serial_revocation("b2"),
                    serial_revocation("b3"),
                ])
                .await
                .unwrap();
            let seqs: Vec<u64> = batch.iter().map(|e| e.sequence).collect();
            assert_eq!(seqs, [2, 3, 4]);
            assert!(store.append_revocations(vec![]).await.unwrap().is_empty());
            assert_eq!(store.revocation_head().await.unwrap(), 4);
        }
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(store.revocation_head().await.unwrap(), 4);
        let kept: Vec<(u64, String)> = store
            .list_revocations()
            .await
            .unwrap()
            .into_iter()
            .map(|e| (e.sequence, e.handle.id()))
            .collect();
        assert_eq!(
            kept,
            [(1, "a1"), (2, "b1"), (3, "b2"), (4, "b3")].map(|(n, s)| (n, s.to_string()))
        );
        // The next single append follows the batch.
        let next = store
            .append_revocation(serial_revocation("c1"))
            .await
            .unwrap();
        assert_eq!(next.sequence, 5);
    }

    fn issued(kind: crate::model::revocation::SvidKind, id: &str, expires_at: i64) -> IssuedSvid {
        IssuedSvid {
            kind,
            id: id.into(),
            spiffe_id: "spiffe://example.org/w".into(),
            entry_id: None,
            node_id: None,
            grant_chain: vec![],
            task_id: None,
            authority_id: "ca1".into(),
            expires_at,
            derived_from: None,
        }
    }

    /// Every handle a set of records could be revoked by, with what a scan finds for it.
    async fn covered_by_index_and_by_scan(
        store: &SledStore,
        handles: &[RevocationHandle],
        now: i64,
    ) -> (Vec<String>, Vec<String>) {
        let ids = |v: Vec<IssuedSvid>| {
            let mut ids: Vec<String> = v
                .into_iter()
                .map(|s| format!("{:?}:{}", s.kind, s.id))
                .collect();
            ids.sort();
            ids
        };
        let indexed = store.list_issued_covered(handles, now).await.unwrap();
        let scanned: Vec<IssuedSvid> = store
            .list_issued(now)
            .await
            .unwrap()
            .into_iter()
            .filter(|s| handles.iter().any(|h| h.covers(s)))
            .collect();
        (ids(indexed), ids(scanned))
    }

    #[tokio::test]
    async fn the_issuance_index_finds_what_each_handle_covers() {
        use crate::model::revocation::SvidKind;
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let node = SpiffeId::new("spiffe://example.org/node/a").unwrap();
        let entry: EntryId = "ab".repeat(16).parse().unwrap();
        let mut delegated = issued(SvidKind::X509, "00c0ffee", 1_000);
        delegated.entry_id = Some(entry.to_string());
        delegated.node_id = Some(node.clone());
        delegated.grant_chain = vec!["g-root".into(), "g-hop".into()];
        delegated.task_id = Some("task-7".into());
        let mut jwt = issued(SvidKind::Jwt, "0011", 1_000);
        jwt.entry_id = Some(entry.to_string());
        jwt.authority_id = "kid2".into();
        let mut node_svid = issued(SvidKind::Node, "5", 1_000);
        node_svid.node_id = Some(node.clone());
        let expired = {
            let mut s = issued(SvidKind::X509, "e1", 50);
            s.entry_id = Some(entry.to_string());
            s
        };
        store
            .record_issued(&[
                delegated,
                jwt,
                node_svid,
                expired,
                issued(SvidKind::X509, "77", 1_000),
            ])
            .await
            .unwrap();
        let handles = [
            RevocationHandle::Svid("c0ffee".into()),
            RevocationHandle::Svid("11".into()),
            RevocationHandle::Entry(entry.clone()),
            RevocationHandle::Node(node.clone()),
            RevocationHandle::Grant("g-hop".into()),
            RevocationHandle::Grant("g-root".into()),
            RevocationHandle::Task("task-7".into()),
            RevocationHandle::Authority("ca1".into()),
            RevocationHandle::Authority("kid2".into()),
            RevocationHandle::Authority("nobody".into()),
        ];
        for h in &handles {
            let (indexed, scanned) =
                covered_by_index_and_by_scan(&store, std::slice::from_ref(h), 100).await;
            assert_eq!(indexed, scanned, "{h}");
        }
        let (indexed, scanned) = covered_by_index_and_by_scan(&store, &handles, 100).await;
        assert_eq!(indexed, scanned, "several handles: each record once");
        assert_eq!(indexed.len(), 4, "{indexed:?}");
        let (entry_svids, _) =
            covered_by_index_and_by_scan(&store, &[RevocationHandle::Entry(entry.clone())], 100)
                .await;
        assert_eq!(
            entry_svids,
            ["Jwt:0011", "X509:00c0ffee"],
            "the expired one is left out"
        );

        // Pruning removes the expired record's index keys with it.
        let before = store.issued_by_handle.len();
        assert_eq!(store.prune_issued(100).await.unwrap(), 1);
        assert!(store.issued_by_handle.len() < before);
        assert_eq!(store.prune_issued(2_000).await.unwrap(), 4);
        assert_eq!(store.issued_by_handle.len(), 0);
    }

    #[tokio::test]
    async fn the_issuance_index_is_brought_up_to_date_at_every_open() {
        use crate::model::revocation::SvidKind;
        let dir = tempfile::tempdir().unwrap();
        let entry: EntryId = "cd".repeat(16).parse().unwrap();
        {
            let store = SledStore::open(dir.path()).unwrap();
            let mut s = issued(SvidKind::X509, "aa", 1_000);
            s.entry_id = Some(entry.to_string());
            store.record_issued(&[s]).await.unwrap();
            // As a store written before the index was, or by an older binary since: a
            // record without its keys. And a key naming no record, as a crash leaves one.
            store.issued_by_handle.clear().unwrap();
            let mut ghost = issued(SvidKind::X509, "bb", 1_000);
            ghost.entry_id = Some(entry.to_string());
            for key in issued_index_keys(&ghost, &issued_key(SvidKind::X509, "bb")) {
                store.issued_by_handle.insert(key, &[]).unwrap();
            }
            store.db.flush().unwrap();
        }
        let store = SledStore::open(dir.path()).unwrap();
        let found = store
            .list_issued_covered(&[RevocationHandle::Entry(entry.clone())], 0)
            .await
            .unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].id, "aa");
        let expected: usize = store
            .list_issued(0)
            .await
            .unwrap()
            .iter()
            .map(|s| issued_index_keys(s, &issued_key(s.kind, &s.id)).len())
            .sum();
        assert_eq!(
            store.issued_by_handle.len(),
            expected,
            "the record's keys are back and the ghost's are gone"
        );
    }

    #[tokio::test]
    async fn the_owner_index_follows_creates_updates_deletes_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let by_owner = |owner: &str| EntryFilter {
            owner: Some(owner.into()),
            ..Default::default()
        };
        let paths = |v: Vec<Entry>| -> Vec<String> {
            v.into_iter()
                .map(|e| e.spec.spiffe_id.path().to_string())
                .collect()
        };
        {
            let store = SledStore::open(dir.path()).unwrap();
            // `spec` gives alice as the owner.
            let a = store
                .create_entry(spec("spiffe://example.org/a", "unix:uid:1"), 0)
                .await
                .unwrap();
            let b = store
                .create_entry(spec("spiffe://example.org/b", "unix:uid:2"), 0)
                .await
                .unwrap();
            let mut none = spec("spiffe://example.org/c", "unix:uid:3");
            none.owner = None;
            store.create_entry(none, 0).await.unwrap();
            assert_eq!(
                store.entries_by_owner.len(),
                2,
                "entries without an owner are not indexed"
            );
            assert_eq!(
                paths(
                    store
                        .list_entries(&by_owner("alice@example.com"))
                        .await
                        .unwrap()
                ),
                ["/a", "/b"]
            );
            let mut moved = b.spec.clone();
            moved.owner = Some("bob@example.com".into());
            store.update_entry(&b.id, moved).await.unwrap();
            assert_eq!(
                paths(
                    store
                        .list_entries(&by_owner("alice@example.com"))
                        .await
                        .unwrap()
                ),
                ["/a"]
            );
            assert_eq!(
                paths(
                    store
                        .list_entries(&by_owner("bob@example.com"))
                        .await
                        .unwrap()
                ),
                ["/b"]
            );
            store.delete_entry(&a.id).await.unwrap();
            assert!(store
                .list_entries(&by_owner("alice@example.com"))
                .await
                .unwrap()
                .is_empty());
            // As a store written before the owner index.
            store.entries_by_owner.clear().unwrap();
            store.meta.remove(OWNER_INDEX_BUILT).unwrap();
            store.db.flush().unwrap();
        }
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(
            paths(
                store
                    .list_entries(&by_owner("bob@example.com"))
                    .await
                    .unwrap()
            ),
            ["/b"]
        );
        assert_eq!(store.entries_by_owner.len(), 1);
    }

    #[tokio::test]
    async fn entries_survive_reopen_and_revisions_bump() {
        let dir = tempfile::tempdir().unwrap();
        let id = {
            let store = SledStore::open(dir.path()).unwrap();
            let e = store
                .create_entry(spec("spiffe://example.org/a", "unix:uid:1"), 10)
                .await
                .unwrap();
            assert_eq!(e.revision, 1);
            let mut s = e.spec.clone();
            s.hint = "primary".into();
            let u = store.update_entry(&e.id, s).await.unwrap();
            assert_eq!(u.revision, 2);
            e.id
        };
        let store = SledStore::open(dir.path()).unwrap();
        let e = store.get_entry(&id).await.unwrap().unwrap();
        assert_eq!(e.spec.hint, "primary");
        assert_eq!(e.revision, 2);
        assert_eq!(e.spec.owner.as_deref(), Some("alice@example.com"));
    }

    #[tokio::test]
    async fn duplicate_entries_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        store
            .create_entry(spec("spiffe://example.org/a", "unix:uid:1"), 0)
            .await
            .unwrap();
        let err = store
            .create_entry(spec("spiffe://example.org/a", "unix:uid:1"), 0)
            .await
            .unwrap_err();
        assert!(matches!(err, DataStoreError::DuplicateEntry { .. }));
        // Another selector is another entry.
        store
            .create_entry(spec("spiffe://example.org/a", "unix:uid:2"), 0)
            .await
            .unwrap();
        assert_eq!(
            store
                .list_entries(&EntryFilter::default())
                .await
                .unwrap()
                .len(),
            2
        );
    }

    /// The identity index follows every write: an update moves an entry's identity (the old
    /// one is free, the new one taken), a delete frees it, a reopen keeps it, and an index
    /// lost or stale (a store from before it, or a crash between the trees) is rebuilt.
    #[tokio::test]
    async fn the_duplicate_check_follows_updates_deletes_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let a_spec = || spec("spiffe://example.org/a", "unix:uid:1");
        let b_spec = || spec("spiffe://example.org/b", "unix:uid:1");
        let dup = |r: Result<Entry>| matches!(r, Err(DataStoreError::DuplicateEntry { .. }));
        let a_id = {
            let store = SledStore::open(dir.path()).unwrap();
            let a = store.create_entry(a_spec(), 0).await.unwrap();
            let b = store.create_entry(b_spec(), 0).await.unwrap();
            // b cannot take a's identity; a may keep its own.
            assert!(dup(store.update_entry(&b.id, a_spec()).await));
            store.update_entry(&a.id, a_spec()).await.unwrap();
            // a moves to c: a's identity is free, c's is taken.
            let c_spec = spec("spiffe://example.org/c", "unix:uid:1");
            store.update_entry(&a.id, c_spec.clone()).await.unwrap();
            assert!(dup(store.create_entry(c_spec, 0).await));
            let a2 = store.create_entry(a_spec(), 0).await.unwrap();
            // Deleting frees the identity.
            store.delete_entry(&a2.id).await.unwrap();
            store.create_entry(a_spec(), 0).await.unwrap();
            a.id
        };
        let store = SledStore::open(dir.path()).unwrap();
        assert!(dup(store.create_entry(a_spec(), 0).await));
        assert!(dup(store.create_entry(b_spec(), 0).await));
        assert!(store.get_entry(&a_id).await.unwrap().is_some());
        // A stale index (here: emptied behind the store's back) is repaired at open.
        store.entry_identities.clear().unwrap();
        drop(store);
        let store = SledStore::open(dir.path()).unwrap();
        assert!(dup(store.create_entry(a_spec(), 0).await));
        assert_eq!(store.entry_identities.len(), 3);
        assert_eq!(store.entries_by_parent.len(), 3);
        assert_eq!(store.entries_by_spiffe_id.len(), 3);
    }

    /// Asserts that listing by each parent (and one with no entries) answers as a scan
    /// filtered by parent; returns how many entries there are.
    async fn listing_by_parent_check(store: &SledStore, parents: &[&str]) -> usize {
        let all = store.list_entries(&EntryFilter::default()).await.unwrap();
        for parent in parents.iter().chain(&["spiffe://example.org/node/none"]) {
            let parent = SpiffeId::new(parent).unwrap();
            let scanned: Vec<_> = all
                .iter()
                .filter(|e| e.spec.parent_id == parent)
                .cloned()
                .collect();
            let filter = EntryFilter {
                parent_id: Some(parent.clone()),
                ..Default::default()
            };
            assert_eq!(
                store.list_entries(&filter).await.unwrap(),
                scanned,
                "{parent}"
            );
        }
        // And by SPIFFE ID, through its own index.
        for e in &all {
            let scanned: Vec<_> = all
                .iter()
                .filter(|o| o.spec.spiffe_id == e.spec.spiffe_id)
                .cloned()
                .collect();
            let filter = EntryFilter {
                spiffe_id: Some(e.spec.spiffe_id.clone()),
                ..Default::default()
            };
            assert_eq!(store.list_entries(&filter).await.unwrap(), scanned);
        }
        all.len()
    }

    /// Listing by parent (or SPIFFE ID) goes through an index and answers as a filtered full
    /// scan would, after creates, a re-parenting update, a delete and a reopen.
    #[tokio::test]
    async fn listing_by_parent_matches_a_scan() {
        let dir = tempfile::tempdir().unwrap();
        let with_parent = |id: &str, parent: &str| {
            let mut s = spec(id, "unix:uid:1");
            s.parent_id = SpiffeId::new(parent).unwrap();
            s
        };
        let (n1, n2) = (
            "spiffe://example.org/node/n1",
            "spiffe://example.org/node/n2",
        );
        {
            let store = SledStore::open(dir.path()).unwrap();
            let mut ids = Vec::new();
            for i in 0..6 {
                let parent = if i % 2 == 0 { n1 } else { n2 };
                let e = store
                    .create_entry(
                        with_parent(&format!("spiffe://example.org/w{i}"), parent),
                        0,
                    )
                    .await
                    .unwrap();
                ids.push(e.id);
            }
            assert_eq!(listing_by_parent_check(&store, &[n1, n2]).await, 6);
            // w0 moves from n1 to n2; w1 is deleted.
            store
                .update_entry(&ids[0], with_parent("spiffe://example.org/w0", n2))
                .await
                .unwrap();
            store.delete_entry(&ids[1]).await.unwrap();
            assert_eq!(listing_by_parent_check(&store, &[n1, n2]).await, 5);
            let n1_filter = EntryFilter {
                parent_id: Some(SpiffeId::new(n1).unwrap()),
                ..Default::default()
            };
            assert_eq!(store.list_entries(&n1_filter).await.unwrap().len(), 2);
        }
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(listing_by_parent_check(&store, &[n1, n2]).await, 5);
    }

    #[tokio::test]
    async fn filters_and_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let a = store
            .create_entry(spec("spiffe://example.org/a", "unix:uid:1"), 0)
            .await
            .unwrap();
        store
            .create_entry(spec("spiffe://example.org/b", "unix:uid:2"), 0)
            .await
            .unwrap();
        let by_sel = store
            .list_entries(&EntryFilter {
                selector: Some("unix:uid:2".parse().unwrap()),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(by_sel.len(), 1);
        assert_eq!(by_sel[0].spec.spiffe_id.path(), "/b");
        store.delete_entry(&a.id).await.unwrap();
        assert!(store.get_entry(&a.id).await.unwrap().is_none());
        assert!(matches!(
            store.delete_entry(&a.id).await,
            Err(DataStoreError::EntryNotFound { .. })
        ));
    }

    #[tokio::test]
    async fn join_token_is_taken_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        store
            .create_join_token(JoinToken {
                token_sha256: "abc".into(),
                spiffe_id: SpiffeId::new("spiffe://example.org/node/a").unwrap(),
                expires_at: 100,
            })
            .await
            .unwrap();
        assert!(store.take_join_token("abc").await.unwrap().is_some());
        assert!(store.take_join_token("abc").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn node_selectors_round_trip_and_old_records_stay_readable() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let id = SpiffeId::new("spiffe://example.org/node/x509pop/ab").unwrap();
        let node = AttestedNode {
            spiffe_id: id.clone(),
            attestation_type: "x509pop".into(),
            serial: "01".into(),
            svid_expires_at: 10,
            attested_at: 1,
            last_seen_at: 1,
            selectors: vec!["x509pop:subject:cn:host-1".parse().unwrap()],
            previous_serial: Some("00".into()),
            previous_svid_expires_at: Some(5),
        };
        store.upsert_node(node.clone()).await.unwrap();
        assert_eq!(store.get_node(&id).await.unwrap(), Some(node));

        // A record written before node selectors existed.
        let old = SpiffeId::new("spiffe://example.org/node/old").unwrap();
        store
            .nodes
            .insert(
                old.to_string().as_bytes(),
                br#"{"spiffe_id":"spiffe://example.org/node/old","attestation_type":"join_token","serial":"02","svid_expires_at":10,"attested_at":1,"last_seen_at":1}"#.to_vec(),
            )
            .unwrap();
        let got = store.get_node(&old).await.unwrap().unwrap();
        assert!(got.selectors.is_empty());
        assert_eq!(got.attestation_type, "join_token");
    }

    fn grant_to(agent: &str, expires_at: i64) -> Grant {
        let id = GrantId::generate();
        Grant {
            resources: vec![],
            id: id.clone(),
            delegation: Delegation {
                principal: "user:alice@example.com".parse().unwrap(),
                chain: vec![Hop {
                    agent: SpiffeId::new(agent).unwrap(),
                    grant_id: id,
                }],
                scopes: ScopeSet::parse(&["calendar:*"]).unwrap(),
                expires_at,
                remaining_depth: 0,
                task_id: None,
            },
            parent_grant_id: None,
            created_at: 1,
        }
    }

    /// An agent's grants come from the index, which pruning keeps exact and which is
    /// rebuilt at open when it was lost.
    #[tokio::test]
    async fn an_agents_grants_come_from_an_index_kept_through_pruning_and_rebuilt_at_open() {
        let dir = tempfile::tempdir().unwrap();
        const A: &str = "spiffe://example.org/a";
        const AB: &str = "spiffe://example.org/ab";
        let (a1, a2, ab) = (grant_to(A, 100), grant_to(A, 10), grant_to(AB, 100));
        let ids = |gs: Vec<Grant>| {
            let mut v: Vec<String> = gs.into_iter().map(|g| g.id.to_string()).collect();
            v.sort();
            v
        };
        let sorted = |gs: &[&Grant]| {
            let mut v: Vec<String> = gs.iter().map(|g| g.id.to_string()).collect();
            v.sort();
            v
        };
        let a = SpiffeId::new(A).unwrap();
        {
            let store = SledStore::open(dir.path()).unwrap();
            for g in [&a1, &a2, &ab] {
                store.create_grant(g.clone()).await.unwrap();
            }
            // A prefix of another agent's ID is another agent.
            assert_eq!(
                ids(store.list_grants_for_agent(&a).await.unwrap()),
                sorted(&[&a1, &a2])
            );
            store.prune_delegation(50, 50).await.unwrap();
            assert_eq!(
                ids(store.list_grants_for_agent(&a).await.unwrap()),
                sorted(&[&a1])
            );
            assert_eq!(
                store.grants_by_agent.len(),
                2,
                "the pruned grant left the index"
            );
            store.grants_by_agent.clear().unwrap();
            store.db.flush().unwrap();
        }
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(
            ids(store.list_grants_for_agent(&a).await.unwrap()),
            sorted(&[&a1])
        );
        let ab_id = SpiffeId::new(AB).unwrap();
        assert_eq!(
            ids(store.list_grants_for_agent(&ab_id).await.unwrap()),
            sorted(&[&ab])
        );
    }

    #[tokio::test]
    async fn grants_and_offers_round_trip_and_offers_are_taken_once() {
        let dir = tempfile::tempdir().unwrap();
        let root_id = GrantId::generate();
        let grant = Grant {
            resources: vec![],
            id: root_id.clone(),
            delegation: Delegation {
                principal: "user:alice@example.com".parse().unwrap(),
                chain: vec![Hop {
                    agent: SpiffeId::new("spiffe://example.org/orchestrator").unwrap(),
                    grant_id: root_id.clone(),
                }],
                scopes: ScopeSet::parse(&["calendar:*"]).unwrap(),
                expires_at: 100,
                remaining_depth: 2,
                task_id: Some("t1".parse().unwrap()),
            },
            parent_grant_id: None,
            created_at: 5,
        };
        {
            let store = SledStore::open(dir.path()).unwrap();
            store.create_grant(grant.clone()).await.unwrap();
            assert!(matches!(
                store.create_grant(grant.clone()).await,
                Err(DataStoreError::DuplicateGrant { .. })
            ));
            assert!(store
                .create_delegation_offer(offer(&"ab".repeat(16), &root_id, 30), 8, 10)
                .await
                .unwrap());
        }
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(
            store.get_grant(&root_id).await.unwrap(),
            Some(grant.clone())
        );
        assert_eq!(store.list_grants().await.unwrap(), vec![grant]);
        let offer = store.take_delegation_offer(&"ab".repeat(16)).await.unwrap();
        assert_eq!(offer.unwrap().scopes.to_strings(), ["calendar:read"]);
        assert!(store
            .take_delegation_offer(&"ab".repeat(16))
            .await
            .unwrap()
            .is_none());
    }

    fn offer(id: &str, parent: &GrantId, redeem_by: i64) -> DelegationOffer {
        DelegationOffer {
            id: id.into(),
            parent_grant_id: parent.clone(),
            from: SpiffeId::new("spiffe://example.org/orchestrator").unwrap(),
            to: SpiffeId::new("spiffe://example.org/scheduler").unwrap(),
            scopes: ScopeSet::parse(&["calendar:read"]).unwrap(),
            expires_at: 50,
            redeem_by,
        }
    }

    fn grant(expires_at: i64) -> Grant {
        let id = GrantId::generate();
        Grant {
            resources: vec![],
            id: id.clone(),
            delegation: Delegation {
                principal: "user:alice@example.com".parse().unwrap(),
                chain: vec![Hop {
                    agent: SpiffeId::new("spiffe://example.org/orchestrator").unwrap(),
                    grant_id: id,
                }],
                scopes: ScopeSet::parse(&["calendar:*"]).unwrap(),
                expires_at,
                remaining_depth: 1,
                task_id: None,
            },
            parent_grant_id: None,
            created_at: 0,
        }
    }

    #[tokio::test]
    async fn offers_are_bounded_per_grant_and_pruned_with_expired_grants() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let (a, b) = (GrantId::generate(), GrantId::generate());
        // Two live offers of grant a fill a bound of 2; an expired one does not count,
        // nor does grant b's.
        for (i, redeem_by) in [(1, 20), (2, 20), (3, 5)] {
            let id = format!("{i:032x}");
            assert!(store
                .create_delegation_offer(offer(&id, &a, redeem_by), 8, 10)
                .await
                .unwrap());
        }
        assert!(store
            .create_delegation_offer(offer(&format!("{:032x}", 4), &b, 20), 2, 10)
            .await
            .unwrap());
        assert!(!store
            .create_delegation_offer(offer(&format!("{:032x}", 5), &a, 20), 2, 10)
            .await
            .unwrap());
        assert!(store
            .take_delegation_offer(&format!("{:032x}", 5))
            .await
            .unwrap()
            .is_none());
        // Once the tokens of the first two expire, the grant may offer again.
        assert!(store
            .create_delegation_offer(offer(&format!("{:032x}", 6), &a, 40), 2, 25)
            .await
            .unwrap());

        let (old, recent, live) = (grant(5), grant(15), grant(100));
        for g in [&old, &recent, &live] {
            store.create_grant(g.clone()).await.unwrap();
        }
        // At 30: the offers redeemable until 5 and 20 go, the one until 40 stays; grants
        // expired before 10 go, a recently expired one is kept.
        assert_eq!(store.prune_delegation(30, 10).await.unwrap(), (4, 1));
        let left: Vec<GrantId> = store
            .list_grants()
            .await
            .unwrap()
            .into_iter()
            .map(|g| g.id)
            .collect();
        assert!(!left.contains(&old.id) && left.contains(&recent.id) && left.contains(&live.id));
        assert!(store
            .take_delegation_offer(&format!("{:032x}", 6))
            .await
            .unwrap()
            .is_some());
        assert_eq!(store.prune_delegation(30, 10).await.unwrap(), (0, 0));
    }

    #[tokio::test]
    async fn corrupt_record_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        store
            .entries
            .insert("0123456789abcdef0123456789abcdef", b"{not json".to_vec())
            .unwrap();
        assert!(matches!(
            store.list_entries(&EntryFilter::default()).await,
            Err(DataStoreError::Corrupt { .. })
        ));
        // The store still opens (the identity index skips it), and still names it.
        drop(store);
        let store = SledStore::open(dir.path()).unwrap();
        assert!(matches!(
            store.list_entries(&EntryFilter::default()).await,
            Err(DataStoreError::Corrupt { .. })
        ));
    }
}
