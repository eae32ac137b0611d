//! How the sled store keeps issuance records and revocation events: JSON records, parsed
//! again on the way out so that a corrupt record is an error, not a wrong answer.

use serde::{Deserialize, Serialize};
use spiffe::SpiffeId;

use super::{DataStoreError, Result};
use crate::model::revocation::{
    DerivedFrom, IssuedSvid, RevocationAction, RevocationEvent, RevocationHandle, RevokedSerial,
    SvidKind,
};

fn corrupt(key: &[u8], field: &str, reason: impl std::fmt::Display) -> DataStoreError {
    DataStoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: format!("{field}: {reason}"),
    }
}

/// Key of an issuance record: kind, then id, so that the same serial never collides with a
/// jti.
pub fn issued_key(kind: SvidKind, id: &str) -> Vec<u8> {
    format!("{}:{id}", kind.as_str()).into_bytes()
}

#[derive(Debug, Serialize, Deserialize)]
pub struct IssuedRecord {
    kind: String,
    id: String,
    spiffe_id: String,
    entry_id: Option<String>,
    node_id: Option<String>,
    #[serde(default)]
    grant_chain: Vec<String>,
    task_id: Option<String>,
    authority_id: String,
    expires_at: i64,
    /// An access token's JWT-SVID: its jti and signing key (absent on every other record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    derived_from_jti: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    derived_from_key_id: Option<String>,
    /// When a workload SVID or token was issued (Unix seconds): its entry's live set and
    /// `last_issued` derive from these records, so a mint writes nothing else about them.
    /// Absent on node SVIDs and on records written before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    issued_at: Option<i64>,
}

impl IssuedRecord {
    pub fn from_issued(s: &IssuedSvid) -> Self {
        Self {
            kind: s.kind.as_str().into(),
            id: s.id.clone(),
            spiffe_id: s.spiffe_id.clone(),
            entry_id: s.entry_id.clone(),
            node_id: s.node_id.as_ref().map(ToString::to_string),
            grant_chain: s.grant_chain.clone(),
            task_id: s.task_id.clone(),
            authority_id: s.authority_id.clone(),
            expires_at: s.expires_at,
            derived_from_jti: s.derived_from.as_ref().map(|d| d.jti.clone()),
            derived_from_key_id: s.derived_from.as_ref().map(|d| d.key_id.clone()),
            issued_at: None,
        }
    }

    /// The record of `s`, issued at `issued_at`.
    pub fn issued_at(s: &IssuedSvid, issued_at: i64) -> Self {
        Self {
            issued_at: Some(issued_at),
            ..Self::from_issued(s)
        }
    }

    /// What this record says of its entry's activity: the entry, when it was issued and the
    /// live SVID it is; `None` for a record of no entry (a node SVID), and for one without
    /// `issued_at`: a delegation offer's token, or a record from before (whose entry's
    /// activity record still lists it).
    pub fn activity(&self) -> Option<super::lifecycle::IssuedForEntry> {
        let entry_id = self.entry_id.as_ref()?;
        Some(super::lifecycle::IssuedForEntry {
            entry_id: entry_id.clone(),
            issued_at: self.issued_at?,
            live: super::lifecycle::LiveSvid {
                kind: self.kind.clone(),
                serial: self.id.clone(),
                node: self.node_id.clone().unwrap_or_default(),
                expires_at: self.expires_at,
            },
        })
    }

    pub fn expires_at(&self) -> i64 {
        self.expires_at
    }

    pub fn into_issued(self, key: &[u8]) -> Result<IssuedSvid> {
        Ok(IssuedSvid {
            kind: SvidKind::parse(&self.kind)
                .ok_or_else(|| corrupt(key, "kind", format!("{:?}", self.kind)))?,
            id: self.id,
            spiffe_id: self.spiffe_id,
            entry_id: self.entry_id,
            node_id: self
                .node_id
                .map(|n| SpiffeId::new(&n).map_err(|e| corrupt(key, "node_id", e)))
                .transpose()?,
            grant_chain: self.grant_chain,
            task_id: self.task_id,
            authority_id: self.authority_id,
            expires_at: self.expires_at,
            derived_from: match (self.derived_from_jti, self.derived_from_key_id) {
                (None, None) => None,
                (Some(jti), Some(key_id)) => Some(DerivedFrom { jti, key_id }),
                _ => {
                    return Err(corrupt(
                        key,
                        "derived_from",
                        "a jti without its key id, or a key id without its jti",
                    ))
                }
            },
        })
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct SerialRecord {
    serial: String,
    authority_id: String,
    expires_at: i64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct EventRecord {
    sequence: u64,
    /// `revoke` or `lift`.
    action: String,
    /// For a lift: the revocation it ends.
    lifts: Option<u64>,
    kind: String,
    id: String,
    reason: String,
    at: i64,
    serials: Vec<SerialRecord>,
    jwt_ids: Vec<String>,
    expires_at: i64,
}

impl EventRecord {
    pub fn from_event(e: &RevocationEvent) -> Self {
        let (action, lifts) = match e.action {
            RevocationAction::Revoke => ("revoke", None),
            RevocationAction::Lift { revocation } => ("lift", Some(revocation)),
        };
        Self {
            sequence: e.sequence,
            action: action.into(),
            lifts,
            kind: e.handle.kind().into(),
            id: e.handle.id(),
            reason: e.reason.clone(),
            at: e.at,
            serials: e
                .serials
                .iter()
                .map(|s| SerialRecord {
                    serial: s.serial.clone(),
                    authority_id: s.authority_id.clone(),
                    expires_at: s.expires_at,
                })
                .collect(),
            jwt_ids: e.jwt_ids.clone(),
            expires_at: e.expires_at,
        }
    }

    pub fn into_event(self, key: &[u8]) -> Result<RevocationEvent> {
        let action = match (self.action.as_str(), self.lifts) {
            ("revoke", None) => RevocationAction::Revoke,
            ("lift", Some(revocation)) => RevocationAction::Lift { revocation },
            (other, _) => return Err(corrupt(key, "action", format!("{other:?}"))),
        };
        Ok(RevocationEvent {
            sequence: self.sequence,
            action,
            handle: RevocationHandle::parse(&self.kind, &self.id)
                .map_err(|e| corrupt(key, "handle", e))?,
            reason: self.reason,
            at: self.at,
            serials: self
                .serials
                .into_iter()
                .map(|s| RevokedSerial {
                    serial: s.serial,
                    authority_id: s.authority_id,
                    expires_at: s.expires_at,
                })
                .collect(),
            jwt_ids: self.jwt_ids,
            expires_at: self.expires_at,
        })
    }
}

/// The letter of each revocation handle kind in `issued_by_handle` keys: one table for the
/// lookup ([`handle_prefix`]) and the writing ([`issued_index_keys`]), which must agree or a
/// revocation would miss what it covers.
const SERIAL: u8 = b's';
const ENTRY: u8 = b'e';
const NODE: u8 = b'n';
const GRANT: u8 = b'g';
const TASK: u8 = b't';
const AUTHORITY: u8 = b'a';

/// The `issued_by_handle` index prefix of what `handle` covers: a letter for the handle's
/// kind, its id, a 0 byte. Each issuance record is indexed under one such prefix per
/// handle that covers it ([`issued_index_keys`]), so a revocation reads the records it
/// covers, not every record.
pub fn handle_prefix(handle: &RevocationHandle) -> Vec<u8> {
    match handle {
        RevocationHandle::Svid(serial) => prefix(SERIAL, serial),
        RevocationHandle::Entry(id) => prefix(ENTRY, id.as_str()),
        RevocationHandle::Node(id) => prefix(NODE, &id.to_string()),
        RevocationHandle::Grant(id) => prefix(GRANT, id),
        RevocationHandle::Task(id) => prefix(TASK, id),
        RevocationHandle::Authority(id) => prefix(AUTHORITY, id),
    }
}

fn prefix(kind: u8, id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(id.len() + 2);
    key.push(kind);
    key.extend_from_slice(id.as_bytes());
    key.push(0);
    key
}

/// The index keys of the issuance record stored under `record_key`: every handle that
/// covers it (see `RevocationHandle::covers`), then the record's key.
pub fn issued_index_keys(svid: &IssuedSvid, record_key: &[u8]) -> Vec<Vec<u8>> {
    let mut handles = vec![
        // `covers` compares a serial without its leading zeros.
        prefix(SERIAL, svid.id.trim_start_matches('0')),
        prefix(AUTHORITY, &svid.authority_id),
    ];
    if let Some(d) = &svid.derived_from {
        handles.push(prefix(SERIAL, d.jti.trim_start_matches('0')));
        handles.push(prefix(AUTHORITY, &d.key_id));
    }
    if let Some(entry) = &svid.entry_id {
        handles.push(prefix(ENTRY, entry));
    }
    if let Some(node) = &svid.node_id {
        handles.push(prefix(NODE, &node.to_string()));
    }
    for grant in &svid.grant_chain {
        handles.push(prefix(GRANT, grant));
    }
    if let Some(task) = &svid.task_id {
        handles.push(prefix(TASK, task));
    }
    handles.sort();
    handles.dedup();
    for key in &mut handles {
        key.extend_from_slice(record_key);
    }
    handles
}

/// The record key an index key names: what follows its handle prefix (the first 0 byte
/// after the kind letter; no handle id holds one).
pub fn record_key_of(index_key: &[u8]) -> Option<&[u8]> {
    let end = index_key.iter().skip(1).position(|b| *b == 0)? + 1;
    index_key.get(end + 1..)
}
