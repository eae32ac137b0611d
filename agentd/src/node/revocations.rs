//! The node agent's side of the feed: follows the server's revocation stream from the last
//! sequence it applied, applies each event to the SVID cache at once, keeps the events for
//! local relying parties (`agentd.workload.v1.Revocations`), and tracks whether the feed is
//! alive, so that a node agent cut off from revocations for too long reports unhealthy (and,
//! when configured to fail closed, stops serving).

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use agentd_proto::revocation as rpb;
use spiffe::SpiffeId;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::node::cache::Cache;
use crate::node::client::ServerLink;
use crate::node::NodeError;
use crate::revocation::feed::{EventAssembler, EventSource, HEARTBEAT};
use crate::revocation::log::EventsAfter;
use crate::revocation::{event_from_proto, RevocationEvent, RevocationSet};

/// A feed that has been silent this long is treated as lost, and the subscriber reconnects.
const SILENCE: Duration = Duration::from_secs(3 * HEARTBEAT.as_secs());
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
struct Applied {
    set: RevocationSet,
    /// Events applied, in order, for local watchers (expired ones are forgotten).
    events: Vec<Arc<RevocationEvent>>,
    /// When the feed last delivered a message (events or heartbeat).
    last_heard: Option<Instant>,
    /// The server's head is at or below what we applied: nothing is pending.
    caught_up: bool,
    /// The parts of a split event received so far on this connection.
    parts: EventAssembler,
}

/// What the node agent knows of revocations. Shared by the subscriber (writes), the
/// Workload API (ValidateJWTSVID, readiness) and the local watch service (reads).
#[derive(Debug)]
pub struct NodeRevocations {
    applied: RwLock<Applied>,
    head: watch::Sender<u64>,
    /// How long the feed may be lost before the node agent reports unhealthy.
    pub max_silence: Duration,
    /// Stop serving SVIDs while the feed is lost for longer than `max_silence`.
    pub fail_closed: bool,
}

impl NodeRevocations {
    pub fn new(max_silence: Duration, fail_closed: bool) -> Self {
        Self {
            applied: RwLock::new(Applied::default()),
            head: watch::channel(0).0,
            max_silence,
            fail_closed,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Applied> {
        self.applied.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Applied> {
        self.applied.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The last sequence applied.
    pub fn applied(&self) -> u64 {
        self.read().set.applied
    }

    /// True once the feed has delivered everything the server had when we connected.
    pub fn caught_up(&self) -> bool {
        self.read().caught_up
    }

    /// Whether the feed has been heard from within `max_silence` (a node that never reached
    /// the feed is not connected).
    pub fn connected(&self, now: Instant) -> bool {
        self.read()
            .last_heard
            .is_some_and(|t| now.duration_since(t) <= self.max_silence)
    }

    /// Whether the feed delivered a message at or after `t`.
    fn heard_since(&self, t: Instant) -> bool {
        self.read().last_heard.is_some_and(|h| h >= t)
    }

    pub fn is_jwt_revoked(&self, jti: &str) -> bool {
        self.read().set.is_jwt_revoked(jti)
    }

    pub fn is_serial_revoked(&self, serial: &str) -> bool {
        self.read().set.is_serial_revoked(serial)
    }

    /// Applies one feed message: events to the cache first, then to the set.
    pub(crate) fn apply_message(
        &self,
        msg: rpb::RevocationFeed,
        cache: &Cache,
        own_id: &SpiffeId,
        now: Instant,
        unix_now: i64,
    ) -> usize {
        let mut applied_count = 0;
        // Sequence numbers are gap-free: a hole the server did not flag as compacted means
        // an event was skipped. Stop there and leave `applied` below it, so the subscriber
        // reconnects and asks again from that point (see `follow`).
        let mut seen = self.applied();
        let mut gap = false;
        for raw in msg.events {
            if raw.sequence > seen + 1 && !msg.compacted {
                gap = true;
                break;
            }
            seen = seen.max(raw.sequence);
            // A part of a split event waits for the rest (see `EventAssembler`).
            let Some(raw) = self.write().parts.push(raw) else {
                continue;
            };
            let event = match event_from_proto(raw) {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(error = %e, "skipping a malformed revocation event");
                    continue;
                }
            };
            if event.sequence <= self.applied() {
                continue;
            }
            cache.apply_revocation(&event, own_id);
            // Per event at debug: a node catching up a long log applies a million of them.
            tracing::debug!(sequence = event.sequence, handle = %event.handle, lift = !event.is_revoke(), "revocation applied");
            let event = Arc::new(event);
            let mut g = self.write();
            g.set.apply_shared(&event);
            g.events.push(event);
            applied_count += 1;
        }
        if applied_count > 0 {
            tracing::info!(
                applied = applied_count,
                through = self.applied(),
                head = msg.head_sequence,
                "revocations applied"
            );
        }
        // A page of the backlog (`more`) does not reach the head; the last page does.
        gap |= !msg.compacted && !msg.more && seen < msg.head_sequence;
        let mut g = self.write();
        if msg.head_sequence > g.set.applied && !gap && !msg.more && !g.parts.is_pending() {
            // Compacted events below the head no longer matter; move past them.
            g.set.applied = msg.head_sequence;
        }
        g.last_heard = Some(now);
        g.caught_up = !gap && !msg.more;
        // Expired events go once the backlog is in (each pass is O(events kept); once per
        // page of a million-event catch-up would make it quadratic).
        if !msg.more {
            g.set.forget_expired(unix_now);
            let live = |e: &RevocationEvent| {
                !e.is_revoke() || e.expires_at >= unix_now || g.set.is_standing(&e.handle)
            };
            let keep: Vec<Arc<RevocationEvent>> =
                g.events.iter().filter(|e| live(e)).cloned().collect();
            g.events = keep;
        }
        let head = g.set.applied;
        drop(g);
        self.head.send_replace(head);
        applied_count
    }

    /// When the server's head is below what this node applied, the server's log was reset
    /// (a new data dir): forget everything and return true, so the subscriber reconnects
    /// asking from 0.
    fn reset_if_behind(&self, server_head: u64) -> bool {
        let applied = self.applied();
        if server_head >= applied {
            return false;
        }
        tracing::warn!(
            server_head,
            applied,
            "the server's revocation log is behind this node; starting over from its beginning"
        );
        self.reset();
        true
    }

    /// A new connection to the feed: parts of an event cut off with the last one are dropped
    /// (the event is sent again whole, from the last sequence applied).
    fn connection_started(&self) {
        self.write().parts.reset();
    }

    /// The server's log was reset (a new data dir): start again from zero.
    fn reset(&self) {
        let mut g = self.write();
        g.set = RevocationSet::new();
        g.events.clear();
    }
}

impl EventSource for NodeRevocations {
    fn events_after(&self, after: u64) -> EventsAfter {
        let g = self.read();
        let start = g.events.partition_point(|e| e.sequence <= after);
        let events: Vec<Arc<RevocationEvent>> = g.events[start..].to_vec();
        let head = g.set.applied;
        EventsAfter {
            compacted: (events.len() as u64) < head.saturating_sub(after),
            events,
            head,
        }
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }
}

/// Follows the server's feed for as long as the node agent runs.
#[derive(Debug)]
pub struct RevocationSubscriber {
    pub link: Arc<ServerLink>,
    pub cache: Arc<Cache>,
    pub revocations: Arc<NodeRevocations>,
    pub clock: Arc<dyn crate::clock::Clock>,
    pub metrics: Arc<crate::telemetry::NodeMetrics>,
    /// `/ready` requires the feed to be connected.
    pub readiness: crate::telemetry::Readiness,
}

impl RevocationSubscriber {
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), NodeError> {
        use crate::telemetry::conditions::REVOCATION_FEED;
        self.readiness.require(REVOCATION_FEED);
        let mut backoff = MIN_BACKOFF;
        loop {
            let connected_at = Instant::now();
            let result = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                r = self.follow() => r,
            };
            self.readiness.set(REVOCATION_FEED, false);
            if self.revocations.heard_since(connected_at) {
                // That connection worked: a server restart is not a run of failures, and
                // the node should be back on the feed as soon as the server is.
                backoff = MIN_BACKOFF;
            }
            if let Err(e) = result {
                tracing::warn!(error = %e, retry_in = ?backoff, applied = self.revocations.applied(), "revocation feed lost; reconnecting");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One connection to the feed, until it fails or goes silent.
    async fn follow(&self) -> Result<(), NodeError> {
        let own_id = self.link.identity().spiffe_id.clone();
        self.revocations.connection_started();
        let mut client = self.link.client().await?;
        let mut stream = client
            .watch_revocations(rpb::WatchRevocationsRequest {
                after_sequence: self.revocations.applied(),
            })
            .await
            .map_err(NodeError::from_status)?
            .into_inner();
        loop {
            let msg = match tokio::time::timeout(SILENCE, stream.message()).await {
                Err(_) => return Err(NodeError::Server("revocation feed went silent".into())),
                Ok(Err(status)) => return Err(NodeError::from_status(status)),
                Ok(Ok(None)) => return Err(NodeError::Server("revocation feed ended".into())),
                Ok(Ok(Some(msg))) => msg,
            };
            if self.revocations.reset_if_behind(msg.head_sequence) {
                return Err(NodeError::Server("revocation log reset".into()));
            }
            let unix_now = crate::clock::unix_seconds(self.clock.now());
            // How far behind the server this node was when the message arrived.
            self.metrics.set_revocation_feed_lag(
                msg.head_sequence.saturating_sub(self.revocations.applied()),
            );
            let head = msg.head_sequence;
            let more = msg.more;
            self.revocations
                .apply_message(msg, &self.cache, &own_id, Instant::now(), unix_now);
            if more {
                // A page of the backlog; the rest follows at once.
                continue;
            }
            if self.revocations.applied() < head {
                // A gap the server did not explain: ask again from the last event applied.
                return Err(NodeError::Server(format!(
                    "the revocation feed skipped events after {} (head {head}); resyncing",
                    self.revocations.applied()
                )));
            }
            self.metrics.set_revocation_feed_lag(0);
            self.readiness
                .set(crate::telemetry::conditions::REVOCATION_FEED, true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::revocation::{event_to_proto, RevocationAction, RevocationHandle};

    fn event(seq: u64, handle: RevocationHandle) -> rpb::RevocationEvent {
        event_to_proto(&RevocationEvent {
            sequence: seq,
            action: RevocationAction::Revoke,
            handle,
            reason: String::new(),
            at: 10,
            serials: vec![],
            jwt_ids: vec!["jj".into()],
            expires_at: 100,
        })
    }

    #[test]
    fn messages_are_applied_once_in_order_and_kept_for_watchers() {
        let revs = NodeRevocations::new(Duration::from_secs(5), false);
        let cache = Cache::new();
        let own = SpiffeId::new("spiffe://example.org/node/a").unwrap();
        let now = Instant::now();
        assert!(!revs.connected(now));
        let entry = RevocationHandle::Entry("0".repeat(32).parse().unwrap());
        let n = revs.apply_message(
            rpb::RevocationFeed {
                events: vec![
                    event(1, entry.clone()),
                    event(2, RevocationHandle::Task("t".into())),
                ],
                head_sequence: 2,
                compacted: false,
                more: false,
            },
            &cache,
            &own,
            now,
            10,
        );
        assert_eq!(n, 2);
        assert!(revs.caught_up());
        assert!(revs.connected(now));
        assert!(!revs.connected(now + Duration::from_secs(6)));
        assert!(revs.is_jwt_revoked("jj"));
        // A replayed event is skipped.
        let n = revs.apply_message(
            rpb::RevocationFeed {
                events: vec![event(2, RevocationHandle::Task("t".into()))],
                head_sequence: 2,
                compacted: false,
                more: false,
            },
            &cache,
            &own,
            now,
            10,
        );
        assert_eq!(n, 0);
        let after = revs.events_after(1);
        assert_eq!(after.events.len(), 1);
        assert_eq!(after.head, 2);
        // A heartbeat beyond what we hold moves the applied sequence (compacted events).
        revs.apply_message(
            rpb::RevocationFeed {
                events: vec![],
                head_sequence: 5,
                compacted: true,
                more: false,
            },
            &cache,
            &own,
            now,
            10,
        );
        assert_eq!(revs.applied(), 5);

        // A server whose head is behind us has a new log: everything is forgotten, and its
        // events (numbered from 1 again) are applied, not skipped as replays.
        assert!(!revs.reset_if_behind(5));
        assert_eq!(revs.applied(), 5);
        assert!(revs.reset_if_behind(1));
        assert_eq!(revs.applied(), 0);
        assert!(!revs.is_jwt_revoked("jj"));
        assert!(revs.events_after(0).events.is_empty());
        let n = revs.apply_message(
            rpb::RevocationFeed {
                events: vec![event(1, RevocationHandle::Task("new".into()))],
                head_sequence: 1,
                compacted: false,
                more: false,
            },
            &cache,
            &own,
            now,
            10,
        );
        assert_eq!(n, 1);
        assert_eq!(revs.applied(), 1);
    }

    #[test]
    fn an_unflagged_gap_stops_before_the_hole_instead_of_jumping_to_the_head() {
        let revs = NodeRevocations::new(Duration::from_secs(5), false);
        let cache = Cache::new();
        let own = SpiffeId::new("spiffe://example.org/node/a").unwrap();
        let now = Instant::now();
        let task = |t: &str| RevocationHandle::Task(t.into());
        // Event 2 is missing, and the server does not say it was compacted.
        let n = revs.apply_message(
            rpb::RevocationFeed {
                events: vec![event(1, task("a")), event(3, task("c"))],
                head_sequence: 3,
                compacted: false,
                more: false,
            },
            &cache,
            &own,
            now,
            10,
        );
        assert_eq!(n, 1);
        assert_eq!(
            revs.applied(),
            1,
            "resumes after the last event before the hole"
        );
        assert!(!revs.caught_up());
        // A heartbeat naming a head beyond what was delivered is a gap too.
        revs.apply_message(
            rpb::RevocationFeed {
                events: vec![],
                head_sequence: 3,
                compacted: false,
                more: false,
            },
            &cache,
            &own,
            now,
            10,
        );
        assert_eq!(revs.applied(), 1);
        // The resent events fill it.
        let n = revs.apply_message(
            rpb::RevocationFeed {
                events: vec![event(2, task("b")), event(3, task("c"))],
                head_sequence: 3,
                compacted: false,
                more: false,
            },
            &cache,
            &own,
            now,
            10,
        );
        assert_eq!(n, 2);
        assert_eq!(revs.applied(), 3);
        assert!(revs.caught_up());
    }

    #[test]
    fn a_split_event_is_applied_once_whole_and_pages_do_not_count_as_caught_up() {
        let revs = NodeRevocations::new(Duration::from_secs(5), false);
        let cache = Cache::new();
        let own = SpiffeId::new("spiffe://example.org/node/a").unwrap();
        let now = Instant::now();
        let feed = |events, more| rpb::RevocationFeed {
            events,
            head_sequence: 2,
            compacted: false,
            more,
        };
        let mut first = event(1, RevocationHandle::Task("t".into()));
        first.jwt_ids = vec!["a".into()];
        first.continued = true;
        let mut second = event(1, RevocationHandle::Task("t".into()));
        second.jwt_ids = vec!["b".into()];
        // Page one: half of event 1.
        assert_eq!(
            revs.apply_message(feed(vec![first], true), &cache, &own, now, 10),
            0
        );
        assert_eq!(revs.applied(), 0);
        assert!(!revs.caught_up());
        assert!(
            !revs.is_jwt_revoked("a"),
            "nothing applied before the event is whole"
        );
        // Page two: the rest of event 1 and event 2, the last page.
        let n = revs.apply_message(
            feed(
                vec![second, event(2, RevocationHandle::Task("u".into()))],
                false,
            ),
            &cache,
            &own,
            now,
            10,
        );
        assert_eq!(n, 2);
        assert_eq!(revs.applied(), 2);
        assert!(revs.caught_up());
        assert!(revs.is_jwt_revoked("a") && revs.is_jwt_revoked("b"));
        assert_eq!(revs.events_after(0).events[0].jwt_ids, ["a", "b"]);
    }
}
