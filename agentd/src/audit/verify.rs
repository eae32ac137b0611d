//! `agentd audit verify`: walks the chain from the first record and names the first record
//! that was altered, removed or added behind the server's back. The hashes catch an edit;
//! the MACs (audit key, [`super::key`]) catch an edit whose hashes and head were recomputed.

use super::{record_hash, AuditHead, AuditKey, SealedAuditRecord, StoredAuditRecord, GENESIS_HASH};

/// Where the chain breaks first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainBreak {
    /// The sequence number of the first altered or missing record.
    pub seq: u64,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Records read.
    pub records: u64,
    /// The checkpointed head.
    pub head: Option<AuditHead>,
    /// `None` when the log is intact.
    pub problem: Option<ChainBreak>,
}

impl VerifyReport {
    pub fn is_intact(&self) -> bool {
        self.problem.is_none()
    }
}

/// Checks `records` (in store order) against each other, against their MACs under `key` and
/// against the checkpoint.
///
/// Records without a MAC are accepted only before the first one with a MAC (a log written
/// before it had a key, adopted by the signed `audit.key.create` record after them); the head
/// of a non-empty log always needs a valid MAC. A MAC is not part of a record's hash, so
/// stripping MACs leaves the chain and the head as they were: a rewrite under stripped MACs
/// still breaks the head's.
pub fn verify_records(
    records: &[StoredAuditRecord],
    head: Option<&AuditHead>,
    key: &AuditKey,
) -> VerifyReport {
    let report = |problem: Option<ChainBreak>| VerifyReport {
        records: records.len() as u64,
        head: head.cloned(),
        problem,
    };
    let broken = |seq: u64, reason: String| report(Some(ChainBreak { seq, reason }));
    let mut prev: Option<SealedAuditRecord> = None;
    let mut signed = false;
    for (expected, stored) in (1u64..).zip(records) {
        if stored.seq > expected {
            return broken(
                expected,
                if stored.seq == expected + 1 {
                    format!("record {expected} is missing")
                } else {
                    format!("records {expected} to {} are missing", stored.seq - 1)
                },
            );
        }
        if stored.seq < expected {
            // Only a store that lost its ordering could do this.
            return broken(stored.seq, format!("record {} is out of order", stored.seq));
        }
        let record: SealedAuditRecord = match serde_json::from_slice(&stored.body) {
            Ok(r) => r,
            Err(e) => {
                return broken(
                    stored.seq,
                    format!(
                        "record {} was altered: it no longer parses ({e})",
                        stored.seq
                    ),
                )
            }
        };
        if record.seq != stored.seq {
            return broken(
                stored.seq,
                format!(
                    "record {} was altered: it says it is record {}",
                    stored.seq, record.seq
                ),
            );
        }
        if record_hash(&record) != record.hash {
            return broken(
                stored.seq,
                format!(
                    "record {} was altered: its contents do not match its hash",
                    stored.seq
                ),
            );
        }
        match &record.mac {
            Some(mac) if key.verify_record(&record.hash, mac) => signed = true,
            Some(_) => {
                return broken(
                    stored.seq,
                    format!(
                        "record {} was altered: its MAC does not match (rewritten and re-hashed without the audit key)",
                        stored.seq
                    ),
                )
            }
            None if signed => {
                return broken(
                    stored.seq,
                    format!(
                        "record {} was altered: it has no MAC though the records before it do",
                        stored.seq
                    ),
                )
            }
            None => {}
        }
        let prev_hash = prev.as_ref().map_or(GENESIS_HASH, |p| p.hash.as_str());
        if record.prev_hash != prev_hash {
            // This record is self-consistent, so either it was rewritten with a new hash, or
            // the record before it was: the earlier one is where the chain first breaks.
            let at = stored.seq.saturating_sub(1).max(1);
            return broken(
                at,
                format!(
                    "record {at} was altered: the chain breaks between records {at} and {} (a record was rewritten and re-hashed)",
                    stored.seq
                ),
            );
        }
        prev = Some(record);
    }
    let last = prev.as_ref().map_or(0, |p| p.seq);
    match head {
        None if last == 0 => report(None),
        None => broken(
            1,
            "the checkpointed head is missing while the log holds records".into(),
        ),
        Some(h) if h.seq > last => broken(
            last + 1,
            if h.seq == last + 1 {
                format!(
                    "record {} is missing (the checkpoint says the log ends at record {})",
                    last + 1,
                    h.seq
                )
            } else {
                format!(
                    "records {} to {} are missing (the checkpoint says the log ends at record {})",
                    last + 1,
                    h.seq,
                    h.seq
                )
            },
        ),
        Some(h) if h.seq < last => broken(
            h.seq + 1,
            format!(
                "record {} was added behind the server's back (the checkpoint says the log ends at record {})",
                h.seq + 1,
                h.seq
            ),
        ),
        Some(h) => match &prev {
            Some(p) if p.hash != h.hash => broken(
                h.seq,
                format!(
                    "record {} was altered: its hash does not match the checkpointed head",
                    h.seq
                ),
            ),
            _ => match &h.mac {
                Some(mac) if key.verify_head(h.seq, &h.hash, mac) => report(None),
                Some(_) => broken(
                    h.seq,
                    format!(
                        "the checkpointed head (record {}) was altered: its MAC does not match (the log was rewritten and the head recomputed without the audit key, or the key file is not this log's)",
                        h.seq
                    ),
                ),
                // Even with no signed record: stripping every MAC must not pass as a log
                // from before the key (the server signs such a log when it makes the key).
                None => broken(
                    h.seq,
                    format!(
                        "the checkpointed head (record {}) was altered: it has no MAC",
                        h.seq
                    ),
                ),
            },
        },
    }
}
