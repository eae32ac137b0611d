//! Audit records as they are made, sealed into the hash chain and stored. The datastore and
//! the audit log both use these; neither is needed to build one.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `prev_hash` of the first record.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Prefix of the hashed bytes: a new record format gets a new tag.
const HASH_DOMAIN: &[u8] = b"agentd-audit-v1\n";
/// Who did it: the admin caller (by the uid of its peer credentials), a node or workload (by
/// its SPIFFE ID), an unauthenticated peer (by address), or the server itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    Admin { uid: Option<u32> },
    Spiffe(spiffe::SpiffeId),
    Remote(Option<SocketAddr>),
    Server,
}

impl Actor {
    pub fn admin(uid: Option<u32>) -> Self {
        Actor::Admin { uid }
    }
}

impl From<&spiffe::SpiffeId> for Actor {
    fn from(id: &spiffe::SpiffeId) -> Self {
        Actor::Spiffe(id.clone())
    }
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Actor::Admin { uid: Some(uid) } => write!(f, "admin:uid:{uid}"),
            Actor::Admin { uid: None } => f.write_str("admin:uid:unknown"),
            Actor::Spiffe(id) => write!(f, "{id}"),
            Actor::Remote(Some(addr)) => write!(f, "remote:{addr}"),
            Actor::Remote(None) => f.write_str("remote:unknown"),
            Actor::Server => f.write_str("server"),
        }
    }
}

/// An event to record: built by the caller, sealed (numbered, timed, chained) by the store.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRecord {
    pub action: String,
    pub actor: String,
    pub subject: Option<String>,
    pub fields: BTreeMap<String, Value>,
}

impl AuditRecord {
    /// `action` is a dotted name (`x509svid.issue`, `entry.create`, `revocation.create`);
    /// `actor` anything that displays as the acting identity, usually an [`Actor`].
    pub fn new(action: impl Into<String>, actor: impl fmt::Display) -> Self {
        Self {
            action: action.into(),
            actor: actor.to_string(),
            subject: None,
            fields: BTreeMap::new(),
        }
    }

    /// The SPIFFE ID the event is about.
    pub fn subject(mut self, id: impl fmt::Display) -> Self {
        self.subject = Some(id.to_string());
        self
    }

    /// A structured field. Never pass key material or a token: the log is readable by every
    /// admin and may be exported to a SIEM.
    pub fn field(mut self, key: impl Into<String>, value: impl Serialize) -> Self {
        let value = serde_json::to_value(value)
            .unwrap_or_else(|e| Value::String(format!("(unserialisable: {e})")));
        self.fields.insert(key.into(), value);
        self
    }
}

/// A record as stored: numbered, timed and chained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SealedAuditRecord {
    pub seq: u64,
    /// Unix seconds.
    pub time: i64,
    pub action: String,
    pub actor: String,
    pub subject: Option<String>,
    pub fields: BTreeMap<String, Value>,
    /// Hex SHA-256 of the previous record ([`GENESIS_HASH`] for the first).
    pub prev_hash: String,
    /// Hex SHA-256 of this record (every field above).
    pub hash: String,
    /// Hex HMAC-SHA256 of `hash` under the audit key (see [`ChainSigner`]); absent on records
    /// written before the log had a key. Not part of `hash`: it seals the hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// The checkpointed head of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditHead {
    pub seq: u64,
    pub hash: String,
    /// Hex HMAC-SHA256 of the head under the audit key; absent before the log had a key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// Signs the chain while the store seals it, with a key the store does not hold: whoever can
/// write the store can recompute every hash, but not these. Kept apart for records and the
/// head (different domains), so a record's MAC cannot stand in for a truncated head's.
pub trait ChainSigner: Send + Sync + fmt::Debug {
    /// The MAC of a record with this `hash`.
    fn record_mac(&self, hash: &str) -> String;
    /// The MAC of a head at `seq` with this `hash`.
    fn head_mac(&self, seq: u64, hash: &str) -> String;
}

/// A record as the store holds it, not yet parsed: a record that no longer parses is a
/// finding for `verify`, not a reason to fail the scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAuditRecord {
    /// The sequence number the store files it under.
    pub seq: u64,
    pub body: Vec<u8>,
}

/// Seals `records` after `head` (`None`: the first records of the log): numbered on from
/// it, each chained to the one before, all timed `time`; returns them and the new head, its
/// MAC by `signer`. Every store's append makes the chain here, inside its transaction.
pub fn seal_after(
    head: Option<&AuditHead>,
    records: &[AuditRecord],
    time: i64,
    signer: &dyn ChainSigner,
) -> (Vec<SealedAuditRecord>, AuditHead) {
    let (mut seq, mut prev) = match head {
        Some(h) => (h.seq, h.hash.clone()),
        None => (0, GENESIS_HASH.to_string()),
    };
    let mut sealed = Vec::with_capacity(records.len());
    for r in records {
        seq += 1;
        let s = seal(r.clone(), seq, time, &prev, signer);
        prev = s.hash.clone();
        sealed.push(s);
    }
    let head = AuditHead {
        seq,
        mac: Some(signer.head_mac(seq, &prev)),
        hash: prev,
    };
    (sealed, head)
}

/// Numbers, times, chains and signs a record: called by the store inside its append
/// transaction.
pub fn seal(
    record: AuditRecord,
    seq: u64,
    time: i64,
    prev_hash: &str,
    signer: &dyn ChainSigner,
) -> SealedAuditRecord {
    let mut sealed = SealedAuditRecord {
        seq,
        time,
        action: record.action,
        actor: record.actor,
        subject: record.subject,
        fields: record.fields,
        prev_hash: prev_hash.to_string(),
        hash: String::new(),
        mac: None,
    };
    sealed.hash = record_hash(&sealed);
    sealed.mac = Some(signer.record_mac(&sealed.hash));
    sealed
}

/// SHA-256 over a canonical JSON form of every field but `hash` (object keys sorted at every
/// level), so the hash does not depend on how a JSON library orders keys.
pub fn record_hash(r: &SealedAuditRecord) -> String {
    let mut obj = serde_json::Map::new();
    obj.insert("seq".into(), Value::from(r.seq));
    obj.insert("time".into(), Value::from(r.time));
    obj.insert("action".into(), Value::from(r.action.clone()));
    obj.insert("actor".into(), Value::from(r.actor.clone()));
    obj.insert(
        "subject".into(),
        r.subject.clone().map(Value::from).unwrap_or(Value::Null),
    );
    obj.insert(
        "fields".into(),
        Value::Object(r.fields.clone().into_iter().collect()),
    );
    obj.insert("prev_hash".into(), Value::from(r.prev_hash.clone()));
    let mut text = String::new();
    canonical_json(&Value::Object(obj), &mut text);
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(HASH_DOMAIN);
    ctx.update(text.as_bytes());
    hex::encode(ctx.finish())
}

fn canonical_json(v: &Value, out: &mut String) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                if let Some(v) = map.get(k) {
                    canonical_json(v, out);
                }
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_json(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// Filters for `audit show`; `None` matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditQuery {
    /// Records at or after this Unix time.
    pub since: Option<i64>,
    /// Records whose subject or actor is this SPIFFE ID.
    pub spiffe_id: Option<String>,
    /// An action name, or a prefix ending in `.*` (`entry.*`).
    pub action: Option<String>,
}

impl AuditQuery {
    pub fn matches(&self, r: &SealedAuditRecord) -> bool {
        self.since.is_none_or(|t| r.time >= t)
            && self
                .spiffe_id
                .as_deref()
                .is_none_or(|id| r.subject.as_deref() == Some(id) || r.actor == id)
            && self
                .action
                .as_deref()
                .is_none_or(|a| match a.strip_suffix('*') {
                    Some(prefix) => r.action.starts_with(prefix),
                    None => r.action == a,
                })
    }
}
