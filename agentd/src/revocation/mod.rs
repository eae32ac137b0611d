//! Revocation: handles, the numbered event log, and the set of what stands revoked.
//!
//! An operator revokes a *handle* (an SVID serial, an entry, a node, a grant, a task or a CA
//! authority). The server resolves it to the unexpired SVIDs it issued under that handle
//! (X.509 serials and JWT `jti`s), appends one numbered event to a durable log, and pushes it
//! to every node agent ([`feed`]); node agents apply it to their cache ([`crate::node::revocations`]) and
//! pass it on to local relying parties. [`RevocationSet`] is the one place that answers "is
//! this revoked?", on the server, in node agents and in relying parties alike.
//!
//! See docs/revocation.md for the semantics of each handle and the feed protocol.

pub mod feed;
pub mod log;

use std::collections::{BTreeMap, HashMap, HashSet};

pub use crate::model::revocation::*;

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
    use spiffe::SpiffeId;

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
