//! The export file for a SIEM: one JSON line per sealed record, in sequence order, each
//! append fsynced before the call returns.
//!
//! The file is its own cursor: its last line names the last record it holds. At start (and
//! after a failed write) the records after it are copied from the store, so a crash between
//! the store's commit and the file's write loses nothing. A partial last line (a crash in the
//! middle of a write) is cut off first. A new or emptied file starts with the record the log
//! ends at, so that it too names where it takes over; records before it are in the file it
//! replaced.

use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use super::{AuditError, SealedAuditRecord, PAGE};
use crate::datastore::DataStore;

/// Bytes read at a time while looking for the last line from the end.
const TAIL_CHUNK: u64 = 64 * 1024;

#[derive(Debug)]
pub struct Exporter {
    path: PathBuf,
    file: std::fs::File,
    /// Bytes of complete lines in the file: a failed write is cut back to this.
    len: u64,
    /// The sequence number on the last line; `None` for an empty file.
    last_seq: Option<u64>,
}

impl Exporter {
    /// Opens (or creates, mode 0600) the file, cuts off a partial last line and reads the
    /// sequence number on the last complete one.
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        let io = |source| AuditError::Export {
            path: path.display().to_string(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        let (len, last) = last_line(&mut file, size).map_err(io)?;
        if len < size {
            tracing::warn!(path = %path.display(), bytes = size - len, "cutting off a partial last line of the audit export (a write interrupted by a crash)");
            file.set_len(len).map_err(io)?;
            file.sync_data().map_err(io)?;
        }
        let last_seq = match last {
            None => None,
            Some(line) => Some(
                serde_json::from_slice::<SealedAuditRecord>(&line)
                    .map_err(|e| AuditError::ExportMismatch {
                        path: path.display().to_string(),
                        reason: format!("its last line is not an audit record ({e}); move the file aside to start a new one"),
                    })?
                    .seq,
            ),
        };
        Ok(Self {
            path: path.to_path_buf(),
            file,
            len,
            last_seq,
        })
    }

    /// Copies from the store every record after the file's last one (for an empty file, the
    /// log's last record only).
    pub async fn catch_up(&mut self, store: &dyn DataStore) -> Result<(), AuditError> {
        let head = store.audit_head().await?.map_or(0, |h| h.seq);
        let mut after = match self.last_seq {
            Some(seq) if seq > head => {
                return Err(AuditError::ExportMismatch {
                    path: self.path.display().to_string(),
                    reason: format!(
                        "it ends at record {seq} but the log ends at record {head}: it belongs to another log, or the store was restored from an older copy"
                    ),
                })
            }
            Some(seq) => seq,
            None => head.saturating_sub(1),
        };
        let from = after;
        while after < head {
            let page = store.audit_records(after, PAGE).await?;
            let Some(last) = page.last() else { break };
            after = last.seq;
            let records: Vec<SealedAuditRecord> = page
                .iter()
                .filter(|r| r.seq <= head)
                .filter_map(|r| match serde_json::from_slice(&r.body) {
                    Ok(rec) => Some(rec),
                    Err(e) => {
                        // `audit verify` names it; the export goes on past it.
                        tracing::error!(seq = r.seq, error = %e, "an unreadable audit record was not exported");
                        None
                    }
                })
                .collect();
            self.write(&records)?;
            if page.len() < PAGE {
                break;
            }
        }
        if after > from {
            tracing::info!(path = %self.path.display(), from = from + 1, to = after, "copied audit records into the export file");
        }
        Ok(())
    }

    /// Appends `sealed`, first copying from the store any records a failed write kept from
    /// the file.
    pub async fn append(
        &mut self,
        store: &dyn DataStore,
        sealed: &[SealedAuditRecord],
    ) -> Result<(), AuditError> {
        let Some(first) = sealed.first() else {
            return Ok(());
        };
        if self.last_seq.is_some_and(|s| s + 1 < first.seq) {
            self.catch_up(store).await?;
        }
        let fresh: Vec<SealedAuditRecord> = sealed
            .iter()
            .filter(|r| self.last_seq.is_none_or(|s| r.seq > s))
            .cloned()
            .collect();
        self.write(&fresh)
    }

    /// Writes whole lines and fsyncs; on failure the file is cut back to its last complete
    /// line, so the next write does not continue a broken one.
    fn write(&mut self, records: &[SealedAuditRecord]) -> Result<(), AuditError> {
        let Some(last) = records.last() else {
            return Ok(());
        };
        let mut buf = Vec::new();
        for r in records {
            // Serialising our own struct cannot fail; skip rather than panic if it ever did.
            if let Ok(line) = serde_json::to_vec(r) {
                buf.extend_from_slice(&line);
                buf.push(b'\n');
            }
        }
        let result = self
            .file
            .write_all(&buf)
            .and_then(|()| self.file.sync_data());
        if let Err(source) = result {
            let _ = self.file.set_len(self.len);
            return Err(AuditError::Export {
                path: self.path.display().to_string(),
                source,
            });
        }
        self.len += buf.len() as u64;
        self.last_seq = Some(last.seq);
        Ok(())
    }
}

/// The length of the file's complete lines, and its last complete line (without the `\n`).
fn last_line(file: &mut std::fs::File, size: u64) -> std::io::Result<(u64, Option<Vec<u8>>)> {
    // Read backwards until the tail holds the last two newlines (or the start of the file).
    let mut tail: Vec<u8> = Vec::new();
    let mut start = size;
    loop {
        let newlines = tail.iter().filter(|&&b| b == b'\n').count();
        if newlines >= 2 || start == 0 {
            break;
        }
        let n = TAIL_CHUNK.min(start);
        start -= n;
        let mut chunk = vec![0u8; n as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut chunk)?;
        chunk.extend_from_slice(&tail);
        tail = chunk;
    }
    let Some(end) = tail.iter().rposition(|&b| b == b'\n') else {
        // No complete line at all.
        return Ok((0, None));
    };
    let begin = tail[..end]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let line = tail[begin..end].to_vec();
    let len = start + end as u64 + 1;
    Ok((len, (!line.is_empty()).then_some(line)))
}
