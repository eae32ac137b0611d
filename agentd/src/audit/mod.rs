//! The audit trail: an append-only, hash-chained log of everything that grants or changes an
//! identity (issuance, node attestation, admin changes, and, through the same API, grants,
//! delegation and revocation).
//!
//! Each sealed record carries its sequence number, the time, the action, the actor, the
//! subject SPIFFE ID, structured fields, the SHA-256 of the previous record and its own
//! SHA-256 over all of those. The store keeps the head (last sequence number and hash) as a
//! checkpoint, written in the same transaction as the records, so that deleting records from
//! the end is detected as well as editing or deleting one in the middle.
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

mod verify;

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::Mutex;

pub use crate::model::audit::*;
pub use verify::{verify_records, ChainBreak, VerifyReport};

use crate::clock::{unix_seconds, Clock};
use crate::datastore::{DataStore, DataStoreError};

/// Records read from the store per call while scanning.
const PAGE: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit store: {0}")]
    Store(#[from] DataStoreError),
    #[error("audit export file {path}: {source}")]
    Export {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Appends sealed records to a JSON-lines file for a SIEM, one line per record, in sequence
/// order.
#[derive(Debug)]
struct Exporter {
    path: PathBuf,
    file: std::fs::File,
}

impl Exporter {
    fn open(path: &Path) -> Result<Self, AuditError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| AuditError::Export {
                path: path.display().to_string(),
                source,
            })?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    fn write(&mut self, records: &[SealedAuditRecord]) -> Result<(), AuditError> {
        let mut buf = Vec::new();
        for r in records {
            // Serialising our own struct cannot fail; skip rather than panic if it ever did.
            if let Ok(line) = serde_json::to_vec(r) {
                buf.extend_from_slice(&line);
                buf.push(b'\n');
            }
        }
        self.file
            .write_all(&buf)
            .map_err(|source| AuditError::Export {
                path: self.path.display().to_string(),
                source,
            })
    }
}

/// The audit log service the server's APIs share.
#[derive(Debug)]
pub struct Audit {
    store: Arc<dyn DataStore>,
    clock: Arc<dyn Clock>,
    /// Held across the append and the export, so the export file is in sequence order.
    export: Mutex<Option<Exporter>>,
}

impl Audit {
    pub fn new(
        store: Arc<dyn DataStore>,
        clock: Arc<dyn Clock>,
        export_file: Option<&Path>,
    ) -> Result<Self, AuditError> {
        let export = export_file.map(Exporter::open).transpose()?;
        Ok(Self {
            store,
            clock,
            export: Mutex::new(export),
        })
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
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let mut export = self.export.lock().await;
        let sealed = self
            .store
            .append_audit(records, unix_seconds(self.clock.now()))
            .await?;
        if let Some(exporter) = export.as_mut() {
            // The store holds the record; a failed export is an operator problem to fix, not a
            // reason to undo the action.
            if let Err(e) = exporter.write(&sealed) {
                tracing::error!(error = %e, "audit export failed");
            }
        }
        Ok(sealed)
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
        Ok(verify_records(&all, head.as_ref()))
    }
}

#[cfg(test)]
mod tests;
