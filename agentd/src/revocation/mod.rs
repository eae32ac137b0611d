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
use std::sync::Arc;

pub use crate::model::revocation::*;

/// What stands revoked after applying a sequence of events: standing handles, and the
/// serials and JWT ids they covered. Node agents and relying parties keep one; the server
/// keeps one beside its log.
#[derive(Debug, Clone, Default)]
pub struct RevocationSet {
    /// The last sequence applied.
    pub applied: u64,
    /// Standing revocations by handle, with their event (shared with the log or feed that
    /// keeps the same event: a million standing events are held once, not twice).
    standing: HashMap<RevocationHandle, Arc<RevocationEvent>>,
    /// Sequence -> its event (the same one), to lift by sequence.
    by_sequence: BTreeMap<u64, Arc<RevocationEvent>>,
    /// Revoked serials, each with the number of standing events that cover it: an event
    /// applied or lifted adds or removes only its own, so applying is O(what it covers), not
    /// O(everything standing), and a serial two events cover stays revoked when one is lifted.
    serials: HashMap<String, u32>,
    jwt_ids: HashMap<String, u32>,
}

/// Counts `key` in or out of `map` (a count reaching zero removes it).
fn count(map: &mut HashMap<String, u32>, key: &str, up: bool) {
    if up {
        *map.entry(key.to_string()).or_default() += 1;
    } else if let Some(n) = map.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(key);
        }
    }
}

impl RevocationSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one event; events at or below `applied` are ignored (a replay after a
    /// reconnect is harmless).
    pub fn apply(&mut self, event: &RevocationEvent) {
        if event.sequence > self.applied {
            self.apply_shared(&Arc::new(event.clone()));
        }
    }

    /// [`apply`](Self::apply) of an event the caller keeps too, without a copy of it.
    pub fn apply_shared(&mut self, event: &Arc<RevocationEvent>) {
        if event.sequence <= self.applied {
            return;
        }
        self.applied = event.sequence;
        match event.action {
            RevocationAction::Revoke => {
                self.by_sequence.insert(event.sequence, event.clone());
                if let Some(old) = self.standing.insert(event.handle.clone(), event.clone()) {
                    self.account(&old, false);
                }
                self.account(event, true);
            }
            RevocationAction::Lift { revocation } => {
                if let Some(lifted) = self.by_sequence.remove(&revocation) {
                    if let Some(old) = self.standing.remove(&lifted.handle) {
                        self.account(&old, false);
                    }
                }
            }
        }
    }

    /// Counts what a standing event covers in (`up`) or out.
    fn account(&mut self, e: &RevocationEvent, up: bool) {
        for s in &e.serials {
            count(&mut self.serials, &s.serial, up);
        }
        for j in &e.jwt_ids {
            count(&mut self.jwt_ids, j, up);
        }
        // A serial revoked by handle stands by its own value too.
        if let RevocationHandle::Svid(s) = &e.handle {
            count(&mut self.serials, s, up);
        }
    }

    /// Drops what can no longer matter: standing SVID revocations whose SVIDs all expired.
    pub fn forget_expired(&mut self, now: i64) {
        let expired: Vec<RevocationHandle> = self
            .standing
            .iter()
            .filter(|(h, e)| matches!(h, RevocationHandle::Svid(_)) && e.expires_at < now)
            .map(|(h, _)| h.clone())
            .collect();
        if expired.is_empty() {
            return;
        }
        for h in &expired {
            if let Some(old) = self.standing.remove(h) {
                self.account(&old, false);
            }
        }
        let live: HashSet<u64> = self.standing.values().map(|e| e.sequence).collect();
        self.by_sequence.retain(|seq, _| live.contains(seq));
    }

    pub fn is_serial_revoked(&self, serial: &str) -> bool {
        self.serials.contains_key(serial)
    }

    pub fn is_jwt_revoked(&self, jti: &str) -> bool {
        self.jwt_ids.contains_key(jti)
    }

    /// The standing revocation of this handle, if any.
    pub fn standing(&self, handle: &RevocationHandle) -> Option<&RevocationEvent> {
        self.standing.get(handle).map(|e| &**e)
    }

    /// The standing revocation of this handle, if any.
    pub fn is_standing(&self, handle: &RevocationHandle) -> bool {
        self.standing.contains_key(handle)
    }

    /// Every standing revocation, by sequence.
    pub fn standing_events(&self) -> Vec<&RevocationEvent> {
        let mut v: Vec<&RevocationEvent> = self.standing.values().map(|e| &**e).collect();
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
        continued: false,
        serials_omitted: 0,
        jwt_ids_omitted: 0,
    }
}

/// The wire form with at most `listed` serials and JWT ids, and how many were left out: an
/// answer to an admin call stays small however many SVIDs the event covers (the feed and
/// the CRLs carry every one).
pub fn event_summary_to_proto(
    e: &RevocationEvent,
    listed: usize,
) -> agentd_proto::revocation::RevocationEvent {
    let mut wire = event_to_proto(e);
    wire.serials_omitted = wire.serials.len().saturating_sub(listed) as u64;
    wire.jwt_ids_omitted = wire.jwt_ids.len().saturating_sub(listed) as u64;
    wire.serials.truncate(listed);
    wire.jwt_ids.truncate(listed);
    wire
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
            derived_from: None,
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

    /// What a set with `standing` must answer, computed from scratch (the old way).
    fn oracle(standing: &[RevocationEvent]) -> (HashSet<String>, HashSet<String>) {
        let mut serials: HashSet<String> = standing
            .iter()
            .flat_map(|e| e.serials.iter().map(|s| s.serial.clone()))
            .collect();
        for e in standing {
            if let RevocationHandle::Svid(s) = &e.handle {
                serials.insert(s.clone());
            }
        }
        let jwts = standing.iter().flat_map(|e| e.jwt_ids.clone()).collect();
        (serials, jwts)
    }

    proptest::proptest! {
        /// Revokes (overlapping serials and jtis, re-revoked handles), lifts and expiry in
        /// any order: the counted set answers as a set rebuilt from the standing events.
        #[test]
        fn the_counted_set_matches_a_rebuild(ops in proptest::collection::vec((0u8..4, 0u8..6, proptest::collection::vec(0u8..8, 0..4)), 1..60)) {
            let mut set = RevocationSet::new();
            let mut seq = 0;
            for (op, h, covered) in ops {
                seq += 1;
                let handle = if h < 3 {
                    RevocationHandle::Svid(format!("h{h}"))
                } else {
                    RevocationHandle::Task(format!("t{h}"))
                };
                match op {
                    0 | 1 => {
                        let names: Vec<String> = covered.iter().map(|c| format!("s{c}")).collect();
                        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
                        let mut e = event(seq, handle, &refs);
                        e.jwt_ids = covered.iter().map(|c| format!("j{c}")).collect();
                        e.expires_at = 100 + i64::from(h) * 10;
                        set.apply(&e);
                    }
                    2 => {
                        if let Some(target) = set.standing_events().first().map(|e| e.sequence) {
                            let mut lift = event(seq, handle, &[]);
                            lift.action = RevocationAction::Lift { revocation: target };
                            set.apply(&lift);
                        }
                    }
                    _ => set.forget_expired(100 + i64::from(h) * 10 + 1),
                }
                let standing: Vec<RevocationEvent> =
                    set.standing_events().into_iter().cloned().collect();
                let (serials, jwts) = oracle(&standing);
                for n in 0..8 {
                    let s = format!("s{n}");
                    proptest::prop_assert_eq!(set.is_serial_revoked(&s), serials.contains(&s), "serial {}", s);
                    let j = format!("j{n}");
                    proptest::prop_assert_eq!(set.is_jwt_revoked(&j), jwts.contains(&j), "jti {}", j);
                }
                for n in 0..3 {
                    let h = format!("h{n}");
                    proptest::prop_assert_eq!(set.is_serial_revoked(&h), serials.contains(&h), "handle {}", h);
                }
            }
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
