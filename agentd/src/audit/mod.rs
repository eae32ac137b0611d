//! The audit trail: an append-only, hash-chained log of everything that grants or changes an
//! identity (issuance, node attestation, admin changes, and, through the same API, grants,
//! delegation and revocation).
//!
//! Each sealed record carries its sequence number, the time, the action, the actor, the
//! subject SPIFFE ID, structured fields, the SHA-256 of the previous record and its own
//! SHA-256 over all of those. The store keeps the head (last sequence number and hash) as a
//! checkpoint, written in the same transaction as the records, so that deleting records from
//! the end is detected as well as editing or deleting one in the middle. Each record and the
//! head also carry an HMAC under a key kept outside the store ([`key`]): someone who can write
//! the store can recompute every hash and the head, but not the MACs.
//!
//! The optional export file is fsynced with each append and, when the server starts, gets
//! whatever records a crash (or a failed write) kept from it.
//!
//! Any module records a new kind of event without touching this one:
//!
//! ```ignore
//! state.audit.record(
//!     AuditRecord::new("revocation.create", Actor::admin(uid))
//!         .subject(&spiffe_id)
//!         .field("handle", "serial")
//!         .field("serial", &serial),
//! ).await?;
//! ```

mod export;
pub mod key;
mod verify;

use std::path::Path;
use std::sync::Arc;

use tokio::sync::Mutex;

use crate::model::revocation::IssuedSvid;

pub use crate::model::audit::*;
pub use export::Exporter;
pub use key::AuditKey;
pub use verify::{verify_records, ChainBreak, VerifyReport};

use crate::clock::{unix_seconds, Clock};
use crate::datastore::{DataStore, DataStoreError};

/// Records read from the store per call while scanning.
const PAGE: usize = 1000;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// The store failed.
    #[error("audit store: {0}")]
    Store(#[from] DataStoreError),
    /// Reading or writing the export file failed.
    #[error("audit export file {path}: {source}")]
    Export {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The export file cannot be continued: its last line is not a record, or it ends
    /// beyond the log (another server's file, or a store restored from an older copy).
    #[error("audit export file {path}: {reason}")]
    ExportMismatch { path: String, reason: String },
    /// The audit key file cannot be read or written, or is not a key.
    #[error("audit key file {path}: {reason}")]
    Key { path: String, reason: String },
}

/// The audit log service the server's APIs share.
#[derive(Debug)]
pub struct Audit {
    store: Arc<dyn DataStore>,
    clock: Arc<dyn Clock>,
    key: Arc<AuditKey>,
    /// The id of the server writing (`server` field of each record), so that a log shared
    /// by several servers says which one did what; `None` in tests.
    server: Option<String>,
    /// The writer's turn: held across the store write and the export, so the export file
    /// is in sequence order.
    export: Arc<Mutex<Option<Exporter>>>,
    /// Writes waiting for the writer's turn (see [`Audit::append`]).
    queue: std::sync::Mutex<Vec<QueuedWrite>>,
}

fn lost() -> AuditError {
    AuditError::Store(DataStoreError::Backend {
        reason: "the audit writer stopped before it answered".into(),
    })
}

/// What the holder of the writer's turn needs to write a group of queued writes.
struct GroupWrite {
    store: Arc<dyn DataStore>,
    clock: Arc<dyn Clock>,
    key: Arc<AuditKey>,
}

impl GroupWrite {
    /// Writes `queued` in one store write (one transaction, one flush), exports what was
    /// sealed, and answers each caller with its own records, in its order.
    async fn run(
        self,
        mut export: tokio::sync::OwnedMutexGuard<Option<Exporter>>,
        queued: Vec<QueuedWrite>,
    ) {
        if queued.is_empty() {
            return;
        }
        let mut all_svids = Vec::new();
        let mut all_records = Vec::new();
        let mut answers = Vec::with_capacity(queued.len());
        for q in queued {
            all_svids.extend(q.svids);
            answers.push((q.done, q.records.len()));
            all_records.extend(q.records);
        }
        let time = unix_seconds(self.clock.now());
        let written = if all_svids.is_empty() {
            self.store.append_audit(all_records, time, &*self.key).await
        } else {
            self.store
                .append_issuance(&all_svids, all_records, time, &*self.key)
                .await
        };
        match written {
            Ok(sealed) => {
                if let Some(exporter) = export.as_mut() {
                    // The store holds the record; a failed export is an operator problem to
                    // fix, not a reason to undo the action. What a failed write kept from the
                    // file is written with the next record that gets through (or at the
                    // next start).
                    if let Err(e) = exporter.append(self.store.as_ref(), &sealed).await {
                        tracing::error!(error = %e, "audit export failed");
                    }
                }
                let mut rest = sealed.into_iter();
                for (done, n) in answers {
                    // A caller that gave up meanwhile has dropped its receiver.
                    let _ = done.send(Ok(rest.by_ref().take(n).collect()));
                }
            }
            Err(e) => {
                for (done, _) in answers {
                    let _ = done.send(Err(AuditError::Store(e.clone())));
                }
            }
        }
    }
}

/// One caller's write, waiting for the writer's turn.
#[derive(Debug)]
struct QueuedWrite {
    svids: Vec<IssuedSvid>,
    records: Vec<AuditRecord>,
    done: tokio::sync::oneshot::Sender<Result<Vec<SealedAuditRecord>, AuditError>>,
}

impl Audit {
    /// The server's audit log: loads the key at `key_path` (creating it on the first start),
    /// and brings the export file up to the store's head.
    ///
    /// A log whose head is signed and no key file: refused, since every record since the key
    /// was made could no longer be verified (and a key made now would sign whatever the
    /// store holds). A key that does not verify the signed head is refused too: several
    /// servers on one database share one log, so they share its key (copy `audit.key` from
    /// the first server), and records signed with another key could never be verified. A log
    /// written before it had a key gets one, and a first signed record, `audit.key.create`,
    /// whose MAC and the head's cover the unsigned records before it. Every record the
    /// server writes names it (`server` = `server_id`).
    pub async fn open(
        store: Arc<dyn DataStore>,
        clock: Arc<dyn Clock>,
        export_file: Option<&Path>,
        key_path: &Path,
        server_id: &str,
    ) -> Result<Self, AuditError> {
        let head = store.audit_head().await?;
        let signed = head
            .as_ref()
            .and_then(|h| Some((h.seq, &h.hash, h.mac.as_ref()?)));
        let (key, created) = match AuditKey::load(key_path)? {
            Some(key) => {
                if let Some((seq, hash, mac)) = signed {
                    // A head the key does not verify is either another key or a rewritten
                    // head; only the first is refused here (the second is for `audit
                    // verify` to name): a key that verifies no record MAC either is not
                    // the log's key.
                    if !key.verify_head(seq, hash, mac) && !signed_any(store.as_ref(), &key).await? {
                        return Err(AuditError::Key {
                            path: key_path.display().to_string(),
                            reason: "is not the key that signed the audit log (it verifies neither the head nor any record): servers sharing a database share one audit key, so copy audit.key from a server of that database".into(),
                        });
                    }
                }
                (key, false)
            }
            None if signed.is_some() => {
                return Err(AuditError::Key {
                    path: key_path.display().to_string(),
                    reason: "is missing, but the audit log was signed with it: restore the file (the server never deletes it), or, for another server on the same database, copy it from one of its servers; without it `audit verify` cannot tell the log from a rewritten one".into(),
                })
            }
            None => (AuditKey::create(key_path)?, true),
        };
        // The first key to open the log is recorded (its fingerprint): a server that made
        // or holds another one, even on a log with nothing signed yet, is refused before it
        // signs anything.
        let key_id = key.key_id();
        if store.claim_audit_key_id(&key_id).await? != key_id {
            return Err(AuditError::Key {
                path: key_path.display().to_string(),
                reason: format!(
                    "is not the key of the audit log (another key was recorded for it first): servers sharing a database share one audit key, so replace this file with the audit.key of a server of that database{}",
                    if created { " (this file was just made)" } else { "" }
                ),
            });
        }
        let mut audit = Self::with_key(store, clock, None, key);
        audit.server = Some(server_id.to_owned());
        if created {
            if let Some(h) = head.as_ref().filter(|h| h.seq > 0) {
                audit
                    .record(
                        AuditRecord::new("audit.key.create", Actor::Server)
                            .field("unsigned_records", h.seq),
                    )
                    .await?;
            }
        }
        if let Some(path) = export_file {
            let mut exporter = Exporter::open(path)?;
            exporter.catch_up(audit.store.as_ref()).await?;
            *audit.export.lock().await = Some(exporter);
        }
        Ok(audit)
    }

    /// An audit log signed with a fresh key that lives only as long as this value and is
    /// saved nowhere, with no export catch-up: for tests. The server uses [`Audit::open`].
    pub fn new(
        store: Arc<dyn DataStore>,
        clock: Arc<dyn Clock>,
        export_file: Option<&Path>,
    ) -> Result<Self, AuditError> {
        let export = export_file.map(Exporter::open).transpose()?;
        Ok(Self::with_key(store, clock, export, AuditKey::generate()))
    }

    fn with_key(
        store: Arc<dyn DataStore>,
        clock: Arc<dyn Clock>,
        export: Option<Exporter>,
        key: AuditKey,
    ) -> Self {
        Self {
            store,
            clock,
            key: Arc::new(key),
            server: None,
            export: Arc::new(Mutex::new(export)),
            queue: Default::default(),
        }
    }

    /// Seals and stores one record (durable when this returns).
    pub async fn record(&self, record: AuditRecord) -> Result<SealedAuditRecord, AuditError> {
        let mut sealed = self.record_all(vec![record]).await?;
        sealed.pop().ok_or_else(|| {
            AuditError::Store(DataStoreError::Backend {
                reason: "the store sealed no record".into(),
            })
        })
    }

    /// Seals and stores several records in one transaction, in order.
    pub async fn record_all(
        &self,
        records: Vec<AuditRecord>,
    ) -> Result<Vec<SealedAuditRecord>, AuditError> {
        self.append(&[], records).await
    }

    /// A mint's one durable write: the issuance records of `svids` and their audit
    /// `records`, together (`DataStore::append_issuance`). Nothing is handed out before
    /// this returns.
    pub async fn record_issuance(
        &self,
        svids: &[IssuedSvid],
        records: Vec<AuditRecord>,
    ) -> Result<Vec<SealedAuditRecord>, AuditError> {
        self.append(svids, records).await
    }

    /// Group commit: the caller queues its write, then takes the writer's turn; whoever
    /// has the turn writes every write queued by then in one store write (one transaction,
    /// one flush), so concurrent mints share a flush instead of queueing for one each.
    /// Each caller gets its own records back, or the write's error.
    async fn append(
        &self,
        svids: &[IssuedSvid],
        records: Vec<AuditRecord>,
    ) -> Result<Vec<SealedAuditRecord>, AuditError> {
        if records.is_empty() && svids.is_empty() {
            return Ok(Vec::new());
        }
        let records = match &self.server {
            Some(server) => records
                .into_iter()
                .map(|mut r| {
                    r.fields
                        .entry("server".to_owned())
                        .or_insert_with(|| server.as_str().into());
                    r
                })
                .collect(),
            None => records,
        };
        let (done, mut outcome) = tokio::sync::oneshot::channel();
        self.lock_queue().push(QueuedWrite {
            svids: svids.to_vec(),
            records,
            done,
        });
        let turn = tokio::select! {
            // The writer before wrote this one with its own.
            result = &mut outcome => return result.unwrap_or_else(|_| Err(lost())),
            turn = self.export.clone().lock_owned() => turn,
        };
        match outcome.try_recv() {
            Ok(result) => return result,
            Err(tokio::sync::oneshot::error::TryRecvError::Closed) => return Err(lost()),
            Err(tokio::sync::oneshot::error::TryRecvError::Empty) => {}
        }
        // A caller that gave up while queued is not written: its mint hands nothing out,
        // and a revocation it no longer holds off could not have covered it.
        let queued: Vec<QueuedWrite> = std::mem::take(&mut *self.lock_queue())
            .into_iter()
            .filter(|q| !q.done.is_closed())
            .collect();
        // The group's write runs in its own task, holding the turn: a caller that gives up
        // meanwhile (its client went away) cancels neither the write nor the others' answers.
        let group = GroupWrite {
            store: self.store.clone(),
            clock: self.clock.clone(),
            key: self.key.clone(),
        };
        // A panic in the write drops every sender: each caller then gets `lost()`.
        let _ = tokio::spawn(group.run(turn, queued)).await;
        outcome.await.unwrap_or_else(|_| Err(lost()))
    }

    fn lock_queue(&self) -> std::sync::MutexGuard<'_, Vec<QueuedWrite>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records an event whose outcome must not depend on the audit store (a refusal that
    /// happens anyway); a failure is logged.
    pub async fn record_or_log(&self, record: AuditRecord) {
        let action = record.action.clone();
        if let Err(e) = self.record(record).await {
            tracing::error!(error = %e, %action, "writing an audit record failed");
        }
    }

    /// The records matching `query`, oldest first. Unreadable records are skipped here (and
    /// reported by `verify`).
    /// At most `limit` records matching `query` after sequence `after`, oldest first, and
    /// whether more may follow (the sequence to ask after next).
    pub async fn query_page(
        &self,
        query: &AuditQuery,
        mut after: u64,
        limit: usize,
    ) -> Result<(Vec<SealedAuditRecord>, Option<u64>), AuditError> {
        let mut out = Vec::new();
        loop {
            let page = self.store.audit_records(after, PAGE).await?;
            let short = page.len() < PAGE;
            for stored in &page {
                after = stored.seq;
                match serde_json::from_slice::<SealedAuditRecord>(&stored.body) {
                    Ok(r) if query.matches(&r) => {
                        out.push(r);
                        if out.len() >= limit {
                            return Ok((out, Some(after)));
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(seq = stored.seq, error = %e, "unreadable audit record skipped")
                    }
                }
            }
            if short {
                return Ok((out, None));
            }
        }
    }

    pub async fn query(&self, query: &AuditQuery) -> Result<Vec<SealedAuditRecord>, AuditError> {
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let page = self.store.audit_records(after, PAGE).await?;
            let Some(last) = page.last() else { break };
            after = last.seq;
            for stored in &page {
                match serde_json::from_slice::<SealedAuditRecord>(&stored.body) {
                    Ok(r) if query.matches(&r) => out.push(r),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(seq = stored.seq, error = %e, "unreadable audit record skipped")
                    }
                }
            }
            if page.len() < PAGE {
                break;
            }
        }
        Ok(out)
    }

    /// Walks the whole chain and compares its end with the checkpointed head.
    pub async fn verify(&self) -> Result<VerifyReport, AuditError> {
        let head = self.store.audit_head().await?;
        let mut all = Vec::new();
        let mut after = 0;
        loop {
            let page = self.store.audit_records(after, PAGE).await?;
            let Some(last) = page.last() else { break };
            after = last.seq;
            let short = page.len() < PAGE;
            all.extend(page);
            if short {
                break;
            }
        }
        Ok(verify_records(&all, head.as_ref(), &self.key))
    }
}

/// Whether `key` verifies the MAC of any of the log's first signed records (`true` when
/// none is signed, since then nothing can tell).
async fn signed_any(store: &dyn DataStore, key: &AuditKey) -> Result<bool, AuditError> {
    // Pages on past unsigned records (a log from before it had a key), up to the first
    // page holding signed ones.
    let mut after = 0;
    loop {
        let page = store.audit_records(after, PAGE).await?;
        let Some(last) = page.last() else {
            return Ok(true);
        };
        after = last.seq;
        let mut seen_signed = false;
        for stored in &page {
            let Ok(record) = serde_json::from_slice::<SealedAuditRecord>(&stored.body) else {
                continue;
            };
            if let Some(mac) = &record.mac {
                seen_signed = true;
                if key.verify_record(&record.hash, mac) {
                    return Ok(true);
                }
            }
        }
        if seen_signed {
            return Ok(false);
        }
        if page.len() < PAGE {
            return Ok(true);
        }
    }
}

#[cfg(test)]
mod tests;
