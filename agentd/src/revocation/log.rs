//! The server's revocation log: resolves a handle to the SVIDs it covers, commits the event to
//! the store (durable before the caller hears back), keeps the standing set that minting
//! consults, and wakes every feed subscriber.
//!
//! Memory never runs ahead of or lags behind the store with a hole: events are published in
//! sequence order, and whenever the store may hold more than memory (an append that failed
//! after its commit, such as a flush error), the log reads the missing events back from the
//! store before it goes on. Otherwise a committed revocation would refuse nothing until a
//! restart, and a feed subscriber would see a gap it could not tell from compaction.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use tokio::sync::{watch, Mutex};

use super::{
    check_reason, IssuedSvid, RevocationAction, RevocationError, RevocationEvent, RevocationHandle,
    RevocationSet, RevokedSerial,
};
use crate::datastore::{DataStore, DataStoreError};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RevocationLogError {
    /// The request itself was refused (bad reason, already revoked, unknown serial...).
    #[error(transparent)]
    Revocation(#[from] RevocationError),
    /// The store failed before anything was committed.
    #[error(transparent)]
    Store(#[from] DataStoreError),
    /// The store committed the event under `sequence` and then reported an error (a failed
    /// flush): the event is in force and on the feed, but may not survive a crash.
    #[error("revocation {sequence} is in force, but the store reported an error after committing it (it may not survive a crash): {source}")]
    NotDurable {
        sequence: u64,
        #[source]
        source: DataStoreError,
    },
}

#[derive(Debug, Default)]
struct LogState {
    /// Every kept event, in sequence order.
    events: Vec<Arc<RevocationEvent>>,
    set: RevocationSet,
}

/// Kept events after a sequence, for a feed subscriber.
#[derive(Debug, Clone)]
pub struct EventsAfter {
    pub events: Vec<Arc<RevocationEvent>>,
    pub head: u64,
    /// Some events after the asked sequence were compacted away.
    pub compacted: bool,
}

#[derive(Debug)]
pub struct RevocationLog {
    store: Arc<dyn DataStore>,
    state: RwLock<LogState>,
    /// The newest committed sequence; feed subscribers wait on it.
    head: watch::Sender<u64>,
    /// Serialises appends, so events reach memory in sequence order.
    writes: Mutex<()>,
    /// Orders mints and revocations. Every mint holds it shared from its standing checks
    /// until its SVIDs are on record ([`RevocationLog::issuing`]); `revoke` holds it
    /// exclusively while it resolves what the handle covers and publishes the event. So a
    /// mint either finished recording before the revocation looked (and is listed in it),
    /// or checks standing after the event is in the set (and is refused): nothing handed
    /// out escapes the event, the CRLs and the relying parties' sets. Fair (tokio's lock),
    /// so a stream of mints cannot starve a revocation.
    issuance: tokio::sync::RwLock<()>,
}

impl RevocationLog {
    /// Loads the kept events from the store.
    pub async fn open(store: Arc<dyn DataStore>) -> Result<Self, DataStoreError> {
        // The head first: an event another server appends between the two reads is then
        // listed (and applied, moving `applied` past the head read), never skipped.
        let head = store.revocation_head().await?;
        let events = store.list_revocations().await?;
        let events: Vec<Arc<RevocationEvent>> = events.into_iter().map(Arc::new).collect();
        let mut set = RevocationSet::new();
        for e in &events {
            set.apply_shared(e);
        }
        set.applied = set.applied.max(head);
        let head = set.applied;
        Ok(Self {
            store,
            state: RwLock::new(LogState { events, set }),
            head: watch::channel(head).0,
            writes: Mutex::new(()),
            issuance: tokio::sync::RwLock::new(()),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, LogState> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, LogState> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    pub fn head(&self) -> u64 {
        *self.head.borrow()
    }

    /// Held by a mint from before its standing checks until its SVIDs are recorded (see
    /// the `issuance` field). Take it once per call: a second shared lock taken while a
    /// revocation waits would wait behind it.
    pub async fn issuing(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.issuance.read().await
    }

    /// Revokes `handle`: finds the unexpired SVIDs it covers, commits the event, and wakes
    /// the feed.
    pub async fn revoke(
        &self,
        handle: RevocationHandle,
        reason: &str,
        now: i64,
    ) -> Result<RevocationEvent, RevocationLogError> {
        self.revoke_cascading(handle, reason, now, None).await
    }

    /// [`revoke`](Self::revoke), where the event also covers the SVIDs of every entry
    /// whose parent is `children_of` (a node-set alias: its workload entries). The child
    /// entries are read under the issuance lock, so an entry created under the parent a
    /// moment before is covered too.
    pub async fn revoke_cascading(
        &self,
        handle: RevocationHandle,
        reason: &str,
        now: i64,
        children_of: Option<&spiffe::SpiffeId>,
    ) -> Result<RevocationEvent, RevocationLogError> {
        check_reason(reason)?;
        let _guard = self.writes.lock().await;
        // What other servers of a shared store committed counts too: one handle is not
        // revoked twice.
        self.catch_up().await?;
        if let Some(existing) = self.read().set.standing(&handle) {
            return Err(RevocationError::AlreadyRevoked {
                handle: handle.to_string(),
                sequence: existing.sequence,
            }
            .into());
        }
        // No mint is between its standing check and its record while this is held, and
        // none starts until the event is in the set.
        let _issuance = self.issuance.write().await;
        // What the handle covers, and each child entry's SVIDs, through the store's index.
        let mut covering = vec![handle.clone()];
        if let Some(parent) = children_of {
            covering.extend(
                self.store
                    .list_entries(&crate::datastore::EntryFilter {
                        parent_id: Some(parent.clone()),
                        ..Default::default()
                    })
                    .await?
                    .into_iter()
                    .map(|e| RevocationHandle::Entry(e.id)),
            );
        }
        let covered: Vec<IssuedSvid> = self.store.list_issued_covered(&covering, now).await?;
        if let RevocationHandle::Svid(serial) = &handle {
            if covered.is_empty() {
                return Err(RevocationError::UnknownSerial {
                    serial: serial.clone(),
                }
                .into());
            }
        }
        let event = RevocationEvent {
            sequence: 0,
            action: RevocationAction::Revoke,
            expires_at: covered.iter().map(|s| s.expires_at).max().unwrap_or(now),
            serials: covered
                .iter()
                .filter(|s| !s.kind.is_jwt())
                .map(|s| RevokedSerial {
                    serial: s.id.clone(),
                    authority_id: s.authority_id.clone(),
                    expires_at: s.expires_at,
                })
                .collect(),
            jwt_ids: covered
                .iter()
                .filter(|s| s.kind.is_jwt())
                .map(|s| s.id.clone())
                .collect(),
            handle,
            reason: reason.to_string(),
            at: now,
        };
        self.append(event).await
    }

    /// Ends the standing revocation with this sequence number.
    pub async fn lift(
        &self,
        sequence: u64,
        reason: &str,
        now: i64,
    ) -> Result<RevocationEvent, RevocationLogError> {
        check_reason(reason)?;
        let _guard = self.writes.lock().await;
        // A revocation another server committed may be the one lifted.
        self.catch_up().await?;
        let handle = self
            .read()
            .set
            .standing_events()
            .into_iter()
            .find(|e| e.sequence == sequence)
            .map(|e| e.handle.clone())
            .ok_or(RevocationError::NotStanding { sequence })?;
        let event = RevocationEvent {
            sequence: 0,
            action: RevocationAction::Lift {
                revocation: sequence,
            },
            handle,
            reason: reason.to_string(),
            at: now,
            serials: vec![],
            jwt_ids: vec![],
            expires_at: now,
        };
        self.append(event).await
    }

    /// Commits `event` and publishes it. Called with `writes` held, after `catch_up`.
    ///
    /// An error from the store does not prove that nothing was committed (sled commits the
    /// transaction, then flushes): the store's head is read back, and whatever it holds
    /// beyond memory is published before the error is reported, so the event is neither
    /// lost to the standing set nor skipped by the feed.
    async fn append(&self, event: RevocationEvent) -> Result<RevocationEvent, RevocationLogError> {
        // Both callers caught up with the store (a previous append whose read-back failed,
        // or another server's appends) before their checks, under the same lock.
        let before = self.read().set.applied;
        match self.store.append_revocation(event).await {
            Ok(committed) => {
                if committed.sequence == before + 1 {
                    self.publish(&committed);
                } else {
                    // Someone else wrote the store (not this process): take it all, in order.
                    self.catch_up().await?;
                }
                Ok(committed)
            }
            Err(source) => {
                let head = match self.catch_up().await {
                    Ok(head) => head,
                    Err(e) => {
                        tracing::error!(error = %e, "reading back the revocation log after a failed append failed; retried before the next append");
                        before
                    }
                };
                if head > before {
                    tracing::error!(sequence = head, error = %source, "revocation committed but the store reported an error; it is in force");
                    Err(RevocationLogError::NotDurable {
                        sequence: head,
                        source,
                    })
                } else {
                    Err(source.into())
                }
            }
        }
    }

    /// Publishes, in order, every event the store holds beyond memory; returns the head.
    async fn catch_up(&self) -> Result<u64, DataStoreError> {
        let stored = self.store.revocation_head().await?;
        let mine = self.read().set.applied;
        if stored <= mine {
            return Ok(mine);
        }
        let missing: Vec<RevocationEvent> = self.store.list_revocations_after(mine).await?;
        for e in &missing {
            self.publish(e);
        }
        if self.read().set.applied < stored {
            // The head's own event is gone (compacted elsewhere): nothing left to deliver.
            self.write().set.applied = stored;
            self.head.send_replace(stored);
        }
        tracing::info!(
            from = mine + 1,
            to = stored,
            "revocations in the store beyond this server's applied (committed by another server, or read back after an error)"
        );
        Ok(stored)
    }

    fn publish(&self, event: &RevocationEvent) {
        {
            let mut g = self.write();
            let event = Arc::new(event.clone());
            g.set.apply_shared(&event);
            g.events.push(event);
        }
        self.head.send_replace(event.sequence);
        tracing::info!(sequence = event.sequence, handle = %event.handle, lift = !event.is_revoke(), svids = event.serials.len(), jwts = event.jwt_ids.len(), "revocation committed");
    }

    /// Applies what other servers commit to a shared store: when the store signals an
    /// append (PostgreSQL's NOTIFY, `DataStore::revocation_signal`), and every `every` in
    /// case a signal was lost, the store's head is read and events beyond this server's are
    /// published in order (the standing set refuses them at once; node agents on this
    /// server's feed get them). Store errors are logged and tried again next time.
    pub async fn follow_store(
        self: Arc<Self>,
        every: std::time::Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let signal = self.store.revocation_signal();
        loop {
            let signalled = async {
                match &signal {
                    Some(s) => s.notified().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
                _ = signalled => {}
            }
            let _guard = self.writes.lock().await;
            if let Err(e) = self.catch_up().await {
                tracing::warn!(error = %e, "reading other servers' revocations failed; trying again");
            }
        }
    }

    /// The standing revocation of `handle`, if any: its sequence number.
    pub fn standing(&self, handle: &RevocationHandle) -> Option<u64> {
        self.read().set.standing(handle).map(|e| e.sequence)
    }

    pub fn is_serial_revoked(&self, serial: &str) -> bool {
        self.read().set.is_serial_revoked(serial)
    }

    pub fn is_jwt_revoked(&self, jti: &str) -> bool {
        self.read().set.is_jwt_revoked(jti)
    }

    /// Every kept event (with `all`), or the standing revocations only.
    pub fn list(&self, all: bool) -> Vec<RevocationEvent> {
        let g = self.read();
        if all {
            g.events.iter().map(|e| (**e).clone()).collect()
        } else {
            g.set.standing_events().into_iter().cloned().collect()
        }
    }

    /// Unexpired revoked serials signed by `authority_id`, with when they were revoked.
    pub fn revoked_serials_of(&self, authority_id: &str, now: i64) -> Vec<(String, i64)> {
        self.read().set.revoked_serials_of(authority_id, now)
    }

    /// Kept events after `after`.
    pub fn events_after(&self, after: u64) -> EventsAfter {
        let g = self.read();
        let head = g.set.applied;
        let start = g.events.partition_point(|e| e.sequence <= after);
        let events: Vec<Arc<RevocationEvent>> = g.events[start..].to_vec();
        // Gap-free numbering: anything missing between `after` and the head was compacted.
        let expected = head.saturating_sub(after);
        EventsAfter {
            compacted: (events.len() as u64) < expected,
            events,
            head,
        }
    }

    /// Removes events that can no longer matter (see [`compactable`]) from the store and
    /// from memory; returns how many.
    pub async fn compact(&self, now: i64) -> Result<usize, DataStoreError> {
        let _guard = self.writes.lock().await;
        let drop: Vec<u64> = {
            let g = self.read();
            let events: Vec<&RevocationEvent> = g.events.iter().map(|e| e.as_ref()).collect();
            compactable(&events, &g.set, now)
        };
        if drop.is_empty() {
            return Ok(0);
        }
        self.store.compact_revocations(&drop).await?;
        let gone: HashSet<u64> = drop.iter().copied().collect();
        let mut g = self.write();
        g.events.retain(|e| !gone.contains(&e.sequence));
        g.set.forget_expired(now);
        Ok(drop.len())
    }
}

/// Which kept events no longer matter at `now`: a revocation whose SVIDs have all expired
/// and that no longer stands (it was lifted), or that named one SVID (a serial is random and
/// never issued again); and a lift whose revocation goes too. Standing revocations of
/// entries, nodes, grants, tasks and authorities are kept: they still refuse issuance.
pub fn compactable(events: &[&RevocationEvent], set: &RevocationSet, now: i64) -> Vec<u64> {
    let mut out: Vec<u64> = Vec::new();
    let mut gone_revocations: HashSet<u64> = HashSet::new();
    for e in events {
        if e.is_revoke() && e.expires_at < now {
            let standing = set.standing(&e.handle).map(|s| s.sequence) == Some(e.sequence);
            if !standing || matches!(e.handle, RevocationHandle::Svid(_)) {
                out.push(e.sequence);
                gone_revocations.insert(e.sequence);
            }
        }
    }
    for e in events {
        if let RevocationAction::Lift { revocation } = e.action {
            if gone_revocations.contains(&revocation) {
                out.push(e.sequence);
            }
        }
    }
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::SledStore;
    use crate::revocation::SvidKind;

    fn issued(kind: SvidKind, id: &str, entry: &str, expires_at: i64) -> IssuedSvid {
        IssuedSvid {
            kind,
            id: id.into(),
            spiffe_id: "spiffe://example.org/a".into(),
            entry_id: Some(entry.into()),
            node_id: Some(spiffe::SpiffeId::new("spiffe://example.org/node/n").unwrap()),
            grant_chain: vec![],
            task_id: None,
            authority_id: "aa".into(),
            expires_at,
            derived_from: None,
        }
    }

    async fn open() -> (tempfile::TempDir, Arc<dyn DataStore>) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn DataStore> = Arc::new(SledStore::open(dir.path()).unwrap());
        (dir, store)
    }

    #[tokio::test]
    async fn revoking_resolves_commits_and_survives_reopen() {
        let (dir, store) = open().await;
        let entry = "0".repeat(32);
        store
            .record_issued(&[
                issued(SvidKind::X509, "a1", &entry, 200),
                issued(SvidKind::Jwt, "0ab1", &entry, 150),
                issued(SvidKind::X509, "b1", &"1".repeat(32), 200),
                issued(SvidKind::X509, "old", &entry, 50),
            ])
            .await
            .unwrap();
        let log = RevocationLog::open(store.clone()).await.unwrap();
        let rx = log.subscribe();
        let handle = RevocationHandle::Entry(entry.parse().unwrap());
        let e = log
            .revoke(handle.clone(), "compromised", 100)
            .await
            .unwrap();
        assert_eq!(e.sequence, 1);
        assert_eq!(e.serials.len(), 1, "only the unexpired SVID of that entry");
        assert_eq!(e.serials[0].serial, "a1");
        assert_eq!(e.jwt_ids, ["0ab1"]);
        assert_eq!(e.expires_at, 200);
        assert!(rx.has_changed().unwrap());
        assert_eq!(log.standing(&handle), Some(1));
        assert!(log.is_serial_revoked("a1"));
        // Twice is refused, and nothing is written.
        let err = log.revoke(handle.clone(), "", 100).await.unwrap_err();
        assert!(err.to_string().contains("already revoked"), "{err}");
        assert_eq!(store.revocation_head().await.unwrap(), 1);
        // An unknown serial is refused.
        let err = log
            .revoke(RevocationHandle::Svid("dead".into()), "", 100)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("dead"), "{err}");
        // A jti is found by `svid` with its leading zero dropped, as a serial would be.
        let jwt = log
            .revoke(RevocationHandle::Svid("ab1".into()), "", 100)
            .await
            .unwrap();
        assert_eq!(jwt.jwt_ids, ["0ab1"]);

        drop(log);
        drop(store);
        let store: Arc<dyn DataStore> = Arc::new(SledStore::open(dir.path()).unwrap());
        let log = RevocationLog::open(store.clone()).await.unwrap();
        assert_eq!(log.head(), 2);
        assert_eq!(log.standing(&handle), Some(1));
        let lift = log.lift(1, "cleared", 110).await.unwrap();
        assert_eq!(lift.sequence, 3);
        assert_eq!(log.standing(&handle), None);
        assert!(!log.is_serial_revoked("a1"));
        let err = log.lift(1, "", 110).await.unwrap_err();
        assert!(err.to_string().contains("not a standing"), "{err}");
        let after = log.events_after(1);
        assert_eq!(
            after.events.iter().map(|e| e.sequence).collect::<Vec<_>>(),
            [2, 3]
        );
        assert!(!after.compacted);
    }

    #[tokio::test]
    async fn a_flush_failing_after_the_commit_still_publishes_and_leaves_no_gap() {
        let dir = tempfile::tempdir().unwrap();
        let sled = Arc::new(SledStore::open(dir.path()).unwrap());
        let store: Arc<dyn DataStore> = sled.clone();
        let log = RevocationLog::open(store.clone()).await.unwrap();
        let rx = log.subscribe();
        let node = |n: &str| {
            RevocationHandle::Node(
                spiffe::SpiffeId::new(format!("spiffe://example.org/{n}")).unwrap(),
            )
        };
        sled.fail_flushes
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let err = log.revoke(node("a"), "", 100).await.unwrap_err();
        assert!(
            matches!(err, RevocationLogError::NotDurable { sequence: 1, .. }),
            "{err}"
        );
        assert!(
            err.to_string().contains("revocation 1 is in force"),
            "{err}"
        );
        // Committed, so in force and on the feed, though the caller heard an error.
        assert_eq!(store.revocation_head().await.unwrap(), 1);
        assert_eq!(log.standing(&node("a")), Some(1));
        assert_eq!(*rx.borrow(), 1);
        sled.fail_flushes
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let next = log.revoke(node("b"), "", 100).await.unwrap();
        assert_eq!(next.sequence, 2);
        let after = log.events_after(0);
        assert_eq!(
            after.events.iter().map(|e| e.sequence).collect::<Vec<_>>(),
            [1, 2]
        );
        assert!(!after.compacted, "a gap is not compaction");
        assert_eq!(after.head, 2);
    }

    #[tokio::test]
    async fn compaction_keeps_standing_handles_and_numbering() {
        let (_dir, store) = open().await;
        let entry = "0".repeat(32);
        store
            .record_issued(&[
                issued(SvidKind::X509, "a1", &entry, 200),
                issued(SvidKind::X509, "a2", &entry, 200),
            ])
            .await
            .unwrap();
        let log = RevocationLog::open(store.clone()).await.unwrap();
        let standing = RevocationHandle::Entry(entry.parse().unwrap());
        log.revoke(RevocationHandle::Svid("a1".into()), "", 100)
            .await
            .unwrap();
        log.revoke(standing.clone(), "", 100).await.unwrap();
        let node = RevocationHandle::Node(spiffe::SpiffeId::new("spiffe://example.org/x").unwrap());
        log.revoke(node.clone(), "", 100).await.unwrap();
        log.lift(3, "", 100).await.unwrap();
        // The lifted node revocation covered nothing: it and its lift go at once; the
        // serial's SVID has not expired yet.
        assert_eq!(log.compact(150).await.unwrap(), 2);
        // After expiry the serial goes too; the standing entry revocation stays.
        assert_eq!(log.compact(300).await.unwrap(), 1);
        let kept: Vec<u64> = log.list(true).iter().map(|e| e.sequence).collect();
        assert_eq!(kept, [2]);
        assert_eq!(log.standing(&standing), Some(2));
        let after = log.events_after(0);
        assert!(after.compacted);
        assert_eq!(after.head, 4);
        // Numbering continues after compaction.
        let next = log.revoke(node, "", 300).await.unwrap();
        assert_eq!(next.sequence, 5);
        assert_eq!(store.list_revocations().await.unwrap().len(), 2);
    }
}
