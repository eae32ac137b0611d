//! Pushed changes: a numbered, in-memory log of what changed in the entries and grants a
//! node syncs, so that a node agent syncs within moments of a change instead of at its next
//! poll. Each change names the parents it touches (a node's SPIFFE ID, or a node-set alias);
//! a node's stream (`Node/WatchChanges`) sends a notice only for changes that touch it.
//!
//! The notice is a nudge, not the data: the node answers it with a (paged) SyncEntries, so a
//! missed or dropped notice costs latency (the regular sync interval still runs), never an
//! entry. The sequence restarts with the process; `epoch` tells a node it is talking to
//! another run, and a node that reconnects with an older sequence or another epoch is told
//! to sync at once ("since N").

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};

use spiffe::SpiffeId;
use tokio::sync::broadcast;

/// Changes a slow subscriber may fall behind before it is told to sync everything.
const BUFFER: usize = 4096;

/// Which nodes a change touches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeScope {
    /// Nodes serving entries parented to these IDs (a node's own ID, or an alias's).
    Parents(BTreeSet<SpiffeId>),
    /// Every node (an owner suspended or restored, the bundle, an alias changed).
    All,
}

#[derive(Debug, Clone)]
pub struct Change {
    pub sequence: u64,
    pub scope: ChangeScope,
    /// What changed, for a node to fetch just that (a delta); empty with `All`.
    pub what: Changed,
    /// Whether the other servers of a shared store are to hear of it: true for a change
    /// committed through this server, false for one a peer told us of (it told the others
    /// itself) or one every server sees for itself (the bundle).
    pub forward: bool,
}

/// What a change touched.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changed {
    pub entries: Vec<crate::datastore::EntryId>,
    /// Agents (SPIFFE IDs) with a new grant.
    pub grant_agents: Vec<SpiffeId>,
    /// Only bundles changed (with `All`): nodes fetch just the bundles.
    pub bundles: bool,
}

#[derive(Debug)]
pub struct ChangeLog {
    /// Differs between runs of the server, so a node can tell a restart from a quiet log.
    epoch: u64,
    head: AtomicU64,
    tx: broadcast::Sender<Change>,
}

impl Default for ChangeLog {
    fn default() -> Self {
        Self::new()
    }
}

impl ChangeLog {
    pub fn new() -> Self {
        Self {
            epoch: rand::random::<u64>() | 1,
            head: AtomicU64::new(0),
            tx: broadcast::channel(BUFFER).0,
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The sequence of the last change published.
    pub fn head(&self) -> u64 {
        self.head.load(Ordering::SeqCst)
    }

    /// Publishes a change after it was committed to the store; `All` asks every node for a
    /// whole sync.
    pub fn publish(&self, scope: ChangeScope, what: Changed) {
        self.send(scope, what, true);
    }

    /// Publishes a change to this server's nodes only (see [`Change::forward`]).
    pub fn publish_here(&self, scope: ChangeScope, what: Changed) {
        self.send(scope, what, false);
    }

    fn send(&self, scope: ChangeScope, what: Changed, forward: bool) {
        // fetch_add under no lock: two publishers may send out of order, which a subscriber
        // tolerates (every notice means "sync now").
        let sequence = self.head.fetch_add(1, Ordering::SeqCst) + 1;
        let what = if scope == ChangeScope::All {
            Changed {
                bundles: what.bundles,
                ..Changed::default()
            }
        } else {
            what
        };
        // No receiver (no node connected) is not an error.
        let _ = self.tx.send(Change {
            sequence,
            scope,
            what,
            forward,
        });
    }

    /// Publishes a change touching nodes that serve entries under these parents; an alias
    /// (an entry parented to the server) changes which nodes are in its set, so a change
    /// under the server reaches every node, as a whole sync.
    pub fn publish_under<'a>(
        &self,
        server_id: &SpiffeId,
        parents: impl IntoIterator<Item = &'a SpiffeId>,
        what: Changed,
    ) {
        let parents: BTreeSet<SpiffeId> = parents.into_iter().cloned().collect();
        if parents.contains(server_id) {
            self.publish(ChangeScope::All, what);
        } else if !parents.is_empty() {
            self.publish(ChangeScope::Parents(parents), what);
        }
    }

    /// An entry created, changed or deleted, under these parents (before and after). `agents`
    /// are the entry's SPIFFE IDs when it was created or renamed: their grants come with it
    /// (a new entry for an agent that already has grants serves them at once).
    pub fn publish_entry<'a>(
        &self,
        server_id: &SpiffeId,
        entry: &crate::datastore::EntryId,
        parents: impl IntoIterator<Item = &'a SpiffeId>,
        agents: impl IntoIterator<Item = &'a SpiffeId>,
    ) {
        let mut grant_agents: Vec<SpiffeId> = agents.into_iter().cloned().collect();
        grant_agents.sort();
        grant_agents.dedup();
        let what = Changed {
            entries: vec![entry.clone()],
            grant_agents,
            bundles: false,
        };
        self.publish_under(server_id, parents, what);
    }

    /// Federated bundles changed: every node fetches the bundles, not its entries.
    pub fn publish_bundles(&self) {
        self.publish(
            ChangeScope::All,
            Changed {
                bundles: true,
                ..Changed::default()
            },
        );
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.tx.subscribe()
    }

    /// Tells every node of each authority change (`authority changes`, a watch that bumps
    /// on every prepare, activate, revoke and prune): node agents fetch the new bundle at
    /// once, not at their next periodic sync. A prepared authority must be in the workloads'
    /// bundles before it signs (docs/ca.md), whatever the node's sync interval.
    pub async fn follow_authorities(
        self: std::sync::Arc<Self>,
        mut authority_changes: tokio::sync::watch::Receiver<u64>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Result<(), crate::server::ServerError> {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                changed = authority_changes.changed() => {
                    if changed.is_err() {
                        // The CA is gone: the server is stopping.
                        return Ok(());
                    }
                    // Every server follows the shared bundle itself: nothing to forward.
                    self.publish_here(ChangeScope::All, Changed::default());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_authority_change_is_a_notice_to_every_node() {
        let log = std::sync::Arc::new(ChangeLog::new());
        let mut rx = log.subscribe();
        let (authorities, watched) = tokio::sync::watch::channel(0u64);
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(log.clone().follow_authorities(watched, stop.clone()));
        authorities.send_replace(1);
        let change = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(change.scope, ChangeScope::All);
        authorities.send_replace(2);
        let next = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(next.sequence > change.sequence);
        stop.cancel();
        task.await.unwrap().unwrap();
    }

    #[test]
    fn changes_are_numbered_in_order_and_subscribers_see_those_after_they_joined() {
        let log = ChangeLog::new();
        log.publish(ChangeScope::All, Changed::default());
        let mut rx = log.subscribe();
        let server = SpiffeId::new("spiffe://example.org/agentd/server").unwrap();
        let a = SpiffeId::new("spiffe://example.org/node/a").unwrap();
        let id: crate::datastore::EntryId = "0".repeat(32).parse().unwrap();
        log.publish_entry(&server, &id, [&a], []);
        log.publish_under(&server, std::iter::empty(), Changed::default());
        assert_eq!(log.head(), 2, "an empty parent set is no change");
        let got = rx.try_recv().unwrap();
        assert_eq!(got.sequence, 2);
        assert_eq!(got.scope, ChangeScope::Parents([a].into()));
        assert_eq!(got.what.entries, std::slice::from_ref(&id));
        // Under the server (an alias): every node, as a whole sync.
        log.publish_entry(&server, &id, [&server], []);
        let got = rx.try_recv().unwrap();
        assert_eq!(got.scope, ChangeScope::All);
        assert_eq!(got.what, Changed::default());
        assert!(rx.try_recv().is_err());
        assert_ne!(ChangeLog::new().epoch(), log.epoch());
    }
}
