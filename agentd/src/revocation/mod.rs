//! Revocation: handles, the numbered event log, and the set of what stands revoked.
//!
//! An operator revokes a *handle* (an SVID serial, an entry, a node, a grant, a task or a CA
//! authority). The server resolves it to the unexpired SVIDs it issued under that handle
//! (X.509 serials and JWT `jti`s), appends one numbered event to a durable log, and pushes it
//! to every node agent ([`feed`]); node agents apply it to their cache ([`subscriber`]) and
//! pass it on to local relying parties. [`RevocationSet`] is the one place that answers "is
//! this revoked?", on the server, in node agents and in relying parties alike.
//!
//! See docs/revocation.md for the semantics of each handle and the feed protocol.

pub mod feed;
pub mod log;
pub mod subscriber;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use spiffe::SpiffeId;

use crate::datastore::EntryId;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RevocationError {
    #[error("{field}: {reason}")]
    InvalidField { field: &'static str, reason: String },
    #[error("revocation {sequence} not found, or not a standing revocation")]
    NotStanding { sequence: u64 },
    #[error("{handle} is already revoked (revocation {sequence})")]
    AlreadyRevoked { handle: String, sequence: u64 },
    #[error("no unexpired SVID with serial {serial} was issued by this server")]
    UnknownSerial { serial: String },
    #[error("entry {id} not found")]
    UnknownEntry { id: String },
    #[error("{0}")]
    Refused(String),
}

/// What a revocation names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RevocationHandle {
    /// One X.509-SVID, by serial (lowercase hex, no leading zeros); or a JWT-SVID by `jti`.
    Svid(String),
    Entry(EntryId),
    /// A node: its node SVID stops working and every SVID it obtained is revoked.
    Node(SpiffeId),
    /// A grant, and everything derived from it.
    Grant(String),
    Task(String),
    /// A CA authority (X.509: subject key identifier, hex; JWT: key id).
    Authority(String),
}

/// The kinds, as they appear on the wire, in the CLI and in docs.
pub const HANDLE_KINDS: &[&str] = &["svid", "entry", "node", "grant", "task", "authority"];

/// Normalises a certificate serial as people paste it (`0x0A:BC`, `0abc`, `ABC`) to the form
/// the server prints: lowercase hex without separators or leading zeros.
pub fn normalize_serial(input: &str) -> Result<String, RevocationError> {
    let bad = |reason: &str| RevocationError::InvalidField {
        field: "serial",
        reason: format!("{:?} {reason}", input.chars().take(80).collect::<String>()),
    };
    let s = input.trim();
    let s = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    let hex: String = s.chars().filter(|c| *c != ':').collect();
    if hex.is_empty() {
        return Err(bad("is empty"));
    }
    if !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(bad("is not hexadecimal"));
    }
    // RFC 5280 4.1.2.2: at most 20 octets.
    let trimmed = hex.trim_start_matches('0').to_ascii_lowercase();
    if trimmed.len() > 40 {
        return Err(bad("is longer than 20 octets (RFC 5280 4.1.2.2)"));
    }
    if trimmed.is_empty() {
        return Err(bad("is zero, which no certificate has"));
    }
    Ok(trimmed)
}

/// Grant, task and authority ids: 1 to 128 printable characters from a safe set.
fn check_token_id(field: &'static str, id: &str) -> Result<String, RevocationError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    if ok {
        Ok(id.to_string())
    } else {
        Err(RevocationError::InvalidField {
            field,
            reason: format!(
                "{:?} must be 1 to 128 characters of A-Z a-z 0-9 - _ . :",
                id.chars().take(80).collect::<String>()
            ),
        })
    }
}

impl RevocationHandle {
    /// Parses a handle from its kind and id, as the CLI and the APIs receive them.
    pub fn parse(kind: &str, id: &str) -> Result<Self, RevocationError> {
        match kind {
            "svid" => {
                // A JWT-SVID's jti is 32 hex digits as well; both are stored normalised.
                Ok(Self::Svid(normalize_serial(id)?))
            }
            "entry" => id
                .parse()
                .map(Self::Entry)
                .map_err(
                    |e: crate::datastore::EntryIdError| RevocationError::InvalidField {
                        field: "id",
                        reason: e.to_string(),
                    },
                ),
            "node" => {
                SpiffeId::new(id)
                    .map(Self::Node)
                    .map_err(|e| RevocationError::InvalidField {
                        field: "spiffe_id",
                        reason: format!("{id:?}: {e}"),
                    })
            }
            "grant" => check_token_id("id", id).map(Self::Grant),
            "task" => check_token_id("id", id).map(Self::Task),
            "authority" => check_token_id("id", &id.to_ascii_lowercase()).map(Self::Authority),
            other => Err(RevocationError::InvalidField {
                field: "kind",
                reason: format!(
                    "{:?} is not a revocation handle; one of: {}",
                    other.chars().take(40).collect::<String>(),
                    HANDLE_KINDS.join(", ")
                ),
            }),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Self::Svid(_) => "svid",
            Self::Entry(_) => "entry",
            Self::Node(_) => "node",
            Self::Grant(_) => "grant",
            Self::Task(_) => "task",
            Self::Authority(_) => "authority",
        }
    }

    pub fn id(&self) -> String {
        match self {
            Self::Svid(s) | Self::Grant(s) | Self::Task(s) | Self::Authority(s) => s.clone(),
            Self::Entry(e) => e.to_string(),
            Self::Node(n) => n.to_string(),
        }
    }

    /// Whether an issued SVID falls under this handle.
    pub fn covers(&self, svid: &IssuedSvid) -> bool {
        match self {
            // A jti is hex too, but keeps its leading zeros.
            Self::Svid(serial) => svid.id.trim_start_matches('0') == serial,
            Self::Entry(id) => svid.entry_id.as_deref() == Some(id.as_str()),
            Self::Node(node) => svid.node_id.as_ref() == Some(node),
            Self::Grant(g) => svid.grant_chain.iter().any(|x| x == g),
            Self::Task(t) => svid.task_id.as_deref() == Some(t.as_str()),
            Self::Authority(a) => svid.authority_id == *a,
        }
    }
}

impl fmt::Display for RevocationHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind(), self.id())
    }
}

/// Which kind of document an issuance record is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SvidKind {
    /// A workload X.509-SVID (id: serial).
    X509,
    /// A workload JWT-SVID (id: jti).
    Jwt,
    /// A node agent's own X.509-SVID (id: serial).
    Node,
}

impl SvidKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::X509 => "x509",
            Self::Jwt => "jwt",
            Self::Node => "node",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "x509" => Some(Self::X509),
            "jwt" => Some(Self::Jwt),
            "node" => Some(Self::Node),
            _ => None,
        }
    }
}

/// What the server records of every SVID it issues, so that each revocation handle can find
/// the SVIDs it covers (DESIGN.md section 3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedSvid {
    pub kind: SvidKind,
    /// X.509: serial, lowercase hex; JWT: jti.
    pub id: String,
    pub spiffe_id: String,
    pub entry_id: Option<String>,
    /// The node it was issued to (for a node SVID, the node itself).
    pub node_id: Option<SpiffeId>,
    /// Grant ids of every hop, root first; empty for a plain SVID.
    pub grant_chain: Vec<String>,
    pub task_id: Option<String>,
    /// X.509: the signing CA's authority id; JWT: the key id.
    pub authority_id: String,
    pub expires_at: i64,
}

/// An X.509-SVID a revocation covers, with what a CRL needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedSerial {
    pub serial: String,
    pub authority_id: String,
    pub expires_at: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevocationAction {
    Revoke,
    /// Ends the standing revocation with this sequence number.
    Lift {
        revocation: u64,
    },
}

/// One entry of the revocation log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationEvent {
    /// Gap-free, from 1; assigned by the store when the event is appended.
    pub sequence: u64,
    pub action: RevocationAction,
    pub handle: RevocationHandle,
    pub reason: String,
    /// Unix seconds.
    pub at: i64,
    /// Unexpired X.509-SVIDs (workload and node) the handle covered when it was revoked.
    pub serials: Vec<RevokedSerial>,
    /// Unexpired JWT-SVIDs (`jti`) the handle covered when it was revoked.
    pub jwt_ids: Vec<String>,
    /// After this (unix seconds) nothing the event covered is valid any more.
    pub expires_at: i64,
}

impl RevocationEvent {
    pub fn is_revoke(&self) -> bool {
        self.action == RevocationAction::Revoke
    }
}

/// Longest accepted reason text.
pub const MAX_REASON_LEN: usize = 1024;

pub fn check_reason(reason: &str) -> Result<(), RevocationError> {
    if reason.len() > MAX_REASON_LEN || reason.chars().any(|c| c.is_control() && c != '\t') {
        return Err(RevocationError::InvalidField {
            field: "reason",
            reason: format!("must be at most {MAX_REASON_LEN} bytes of printable text"),
        });
    }
    Ok(())
}

/// What stands revoked after applying a sequence of events: standing handles, and the
/// serials and JWT ids they covered. Node agents and relying parties keep one; the server
/// keeps one beside its log.
#[derive(Debug, Clone, Default)]
pub struct RevocationSet {
    /// The last sequence applied.
    pub applied: u64,
    /// Standing revocations by handle, with their event.
    standing: HashMap<RevocationHandle, RevocationEvent>,
    /// Sequence -> handle, to lift by sequence.
    by_sequence: BTreeMap<u64, RevocationHandle>,
    serials: HashSet<String>,
    jwt_ids: HashSet<String>,
}

impl RevocationSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one event; events at or below `applied` are ignored (a replay after a
    /// reconnect is harmless).
    pub fn apply(&mut self, event: &RevocationEvent) {
        if event.sequence <= self.applied {
            return;
        }
        self.applied = event.sequence;
        match event.action {
            RevocationAction::Revoke => {
                self.by_sequence
                    .insert(event.sequence, event.handle.clone());
                self.standing.insert(event.handle.clone(), event.clone());
                self.rebuild_covered();
            }
            RevocationAction::Lift { revocation } => {
                if let Some(handle) = self.by_sequence.remove(&revocation) {
                    self.standing.remove(&handle);
                    self.rebuild_covered();
                }
            }
        }
    }

    fn rebuild_covered(&mut self) {
        self.serials = self
            .standing
            .values()
            .flat_map(|e| e.serials.iter().map(|s| s.serial.clone()))
            .collect();
        self.jwt_ids = self
            .standing
            .values()
            .flat_map(|e| e.jwt_ids.iter().cloned())
            .collect();
        // A serial revoked by handle stands by its own value too.
        for h in self.standing.keys() {
            if let RevocationHandle::Svid(s) = h {
                self.serials.insert(s.clone());
            }
        }
    }

    /// Drops what can no longer matter: standing SVID revocations whose SVIDs all expired.
    pub fn forget_expired(&mut self, now: i64) {
        let before = self.standing.len();
        self.standing
            .retain(|h, e| !(matches!(h, RevocationHandle::Svid(_)) && e.expires_at < now));
        if self.standing.len() != before {
            let live: HashSet<u64> = self.standing.values().map(|e| e.sequence).collect();
            self.by_sequence.retain(|seq, _| live.contains(seq));
            self.rebuild_covered();
        }
    }

    pub fn is_serial_revoked(&self, serial: &str) -> bool {
        self.serials.contains(serial)
    }

    pub fn is_jwt_revoked(&self, jti: &str) -> bool {
        self.jwt_ids.contains(jti)
    }

    /// The standing revocation of this handle, if any.
    pub fn standing(&self, handle: &RevocationHandle) -> Option<&RevocationEvent> {
        self.standing.get(handle)
    }

    /// The standing revocation of this handle, if any.
    pub fn is_standing(&self, handle: &RevocationHandle) -> bool {
        self.standing.contains_key(handle)
    }

    /// Every standing revocation, by sequence.
    pub fn standing_events(&self) -> Vec<&RevocationEvent> {
        let mut v: Vec<&RevocationEvent> = self.standing.values().collect();
        v.sort_by_key(|e| e.sequence);
        v
    }

    /// The unexpired revoked X.509 serials signed by one authority: a CRL's contents.
    pub fn revoked_serials_of(&self, authority_id: &str, now: i64) -> Vec<(String, i64)> {
        let mut out: Vec<(String, i64)> = self
            .standing
            .values()
            .flat_map(|e| {
                e.serials
                    .iter()
                    .filter(|s| s.authority_id == authority_id && s.expires_at > now)
                    .map(move |s| (s.serial.clone(), e.at))
            })
            .collect();
        out.sort();
        out.dedup_by(|a, b| a.0 == b.0);
        out
    }
}

/// The wire form (`agentd.revocation.v1.RevocationEvent`).
pub fn event_to_proto(e: &RevocationEvent) -> agentd_proto::revocation::RevocationEvent {
    use agentd_proto::revocation as pb;
    pb::RevocationEvent {
        sequence: e.sequence,
        handle: Some(pb::RevocationHandle {
            kind: e.handle.kind().into(),
            id: e.handle.id(),
        }),
        lifts: match e.action {
            RevocationAction::Revoke => 0,
            RevocationAction::Lift { revocation } => revocation,
        },
        reason: e.reason.clone(),
        at: e.at,
        serials: e
            .serials
            .iter()
            .map(|s| pb::RevokedSerial {
                serial: s.serial.clone(),
                authority_id: s.authority_id.clone(),
                expires_at: s.expires_at,
            })
            .collect(),
        jwt_ids: e.jwt_ids.clone(),
        expires_at: e.expires_at,
    }
}

/// Parses an event from the wire; a bad field is named.
pub fn event_from_proto(
    e: agentd_proto::revocation::RevocationEvent,
) -> Result<RevocationEvent, RevocationError> {
    let handle = e.handle.ok_or(RevocationError::InvalidField {
        field: "handle",
        reason: "missing".into(),
    })?;
    if e.sequence == 0 {
        return Err(RevocationError::InvalidField {
            field: "sequence",
            reason: "must be at least 1".into(),
        });
    }
    Ok(RevocationEvent {
        sequence: e.sequence,
        action: match e.lifts {
            0 => RevocationAction::Revoke,
            revocation => RevocationAction::Lift { revocation },
        },
        handle: RevocationHandle::parse(&handle.kind, &handle.id)?,
        reason: e.reason,
        at: e.at,
        serials: e
            .serials
            .into_iter()
            .map(|s| RevokedSerial {
                serial: s.serial,
                authority_id: s.authority_id,
                expires_at: s.expires_at,
            })
            .collect(),
        jwt_ids: e.jwt_ids,
        expires_at: e.expires_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: u64, handle: RevocationHandle, serials: &[&str]) -> RevocationEvent {
        RevocationEvent {
            sequence: seq,
            action: RevocationAction::Revoke,
            handle,
            reason: String::new(),
            at: 100,
            serials: serials
                .iter()
                .map(|s| RevokedSerial {
                    serial: s.to_string(),
                    authority_id: "aa".into(),
                    expires_at: 200,
                })
                .collect(),
            jwt_ids: vec!["j1".into()],
            expires_at: 200,
        }
    }

    #[test]
    fn serials_are_normalised_and_bad_ones_named() {
        assert_eq!(normalize_serial("0x0A:BC").unwrap(), "abc");
        assert_eq!(normalize_serial("00ff").unwrap(), "ff");
        for bad in ["", "xyz", "0", &"f".repeat(41)] {
            let err = normalize_serial(bad).unwrap_err().to_string();
            assert!(err.starts_with("serial: "), "{err}");
        }
    }

    #[test]
    fn handles_parse_per_kind_and_name_the_field() {
        let e = RevocationHandle::parse("entry", "nothex").unwrap_err();
        assert!(e.to_string().starts_with("id: "), "{e}");
        let e = RevocationHandle::parse("node", "http://x").unwrap_err();
        assert!(e.to_string().starts_with("spiffe_id: "), "{e}");
        let e = RevocationHandle::parse("bogus", "1").unwrap_err();
        assert!(e.to_string().contains("svid, entry, node"), "{e}");
        let e = RevocationHandle::parse("task", "has space").unwrap_err();
        assert!(e.to_string().starts_with("id: "), "{e}");
        assert_eq!(
            RevocationHandle::parse("svid", "0A").unwrap(),
            RevocationHandle::Svid("a".into())
        );
        assert_eq!(
            RevocationHandle::parse("authority", "AB").unwrap(),
            RevocationHandle::Authority("ab".into())
        );
    }

    #[test]
    fn handles_cover_the_svids_issued_under_them() {
        let svid = IssuedSvid {
            kind: SvidKind::X509,
            id: "abc".into(),
            spiffe_id: "spiffe://example.org/a".into(),
            entry_id: Some("0".repeat(32)),
            node_id: Some(SpiffeId::new("spiffe://example.org/n").unwrap()),
            grant_chain: vec!["g1".into(), "g2".into()],
            task_id: Some("t".into()),
            authority_id: "aa".into(),
            expires_at: 10,
        };
        for (kind, id) in [
            ("svid", "abc"),
            ("entry", &"0".repeat(32)[..]),
            ("node", "spiffe://example.org/n"),
            ("grant", "g2"),
            ("task", "t"),
            ("authority", "aa"),
        ] {
            assert!(
                RevocationHandle::parse(kind, id).unwrap().covers(&svid),
                "{kind}"
            );
        }
        for (kind, id) in [
            ("svid", "abd"),
            ("entry", &"1".repeat(32)[..]),
            ("node", "spiffe://example.org/m"),
            ("grant", "g3"),
            ("task", "u"),
            ("authority", "bb"),
        ] {
            assert!(
                !RevocationHandle::parse(kind, id).unwrap().covers(&svid),
                "{kind}"
            );
        }
    }

    #[test]
    fn the_set_follows_revokes_and_lifts_and_ignores_replays() {
        let mut set = RevocationSet::new();
        let entry = RevocationHandle::Entry("0".repeat(32).parse().unwrap());
        set.apply(&event(1, entry.clone(), &["s1"]));
        assert!(set.is_standing(&entry));
        assert!(set.is_serial_revoked("s1"));
        assert!(set.is_jwt_revoked("j1"));
        set.apply(&event(2, RevocationHandle::Svid("s2".into()), &["s2"]));
        assert_eq!(set.revoked_serials_of("aa", 150).len(), 2);
        assert!(set.revoked_serials_of("aa", 250).is_empty());
        // A replay of an old event changes nothing.
        let mut lift = event(3, entry.clone(), &[]);
        lift.action = RevocationAction::Lift { revocation: 1 };
        set.apply(&lift);
        assert!(!set.is_standing(&entry));
        assert!(!set.is_serial_revoked("s1"));
        assert!(set.is_serial_revoked("s2"));
        set.apply(&event(1, entry.clone(), &["s1"]));
        assert!(!set.is_standing(&entry));
        assert_eq!(set.applied, 3);
        // Expired SVID revocations are forgotten; standing handles are kept.
        set.forget_expired(300);
        assert!(!set.is_serial_revoked("s2"));
    }
}
