//! The push feed: one server-stream per subscriber that first sends every kept event after
//! the subscriber's sequence, then each new event as soon as it is committed, and a heartbeat
//! in between so the subscriber can tell a quiet feed from a lost one. The server serves it
//! to node agents (`agentd.node.v1.Node/WatchRevocations`); node agents serve the same shape
//! to local relying parties (`agentd.workload.v1.Revocations/Watch`).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use agentd_proto::revocation as pb;
use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use prost::Message;

use super::event_to_proto;
use super::log::{EventsAfter, RevocationLog};
use super::RevocationEvent;
use crate::clock::{unix_seconds, Clock};

/// How often a quiet feed sends an empty message. A subscriber that hears nothing for
/// several of these treats the feed as lost and reconnects.
pub const HEARTBEAT: Duration = Duration::from_secs(2);

pub type FeedStream = Pin<Box<dyn Stream<Item = Result<pb::RevocationFeed, Status>> + Send>>;

/// Where a feed takes its events from.
pub trait EventSource: Send + Sync + std::fmt::Debug + 'static {
    fn events_after(&self, after: u64) -> EventsAfter;
    /// Changes whenever a new event is kept.
    fn subscribe(&self) -> watch::Receiver<u64>;
}

impl EventSource for RevocationLog {
    fn events_after(&self, after: u64) -> EventsAfter {
        RevocationLog::events_after(self, after)
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        RevocationLog::subscribe(self)
    }
}

/// About the most one feed message carries (encoded): well under the 4 MiB a gRPC client
/// takes by default, however large the backlog or one revocation is.
pub const MESSAGE_BUDGET: usize = 1 << 20;

/// Streams `source` to one subscriber, starting after `after`, until the subscriber hangs up
/// or `stop` is cancelled. A backlog larger than [`MESSAGE_BUDGET`] goes out as several
/// messages (`more`), and one event with more serials than fit is split into parts
/// (`continued`); serials expired at `clock`'s now are left out.
pub fn feed_stream(
    source: Arc<dyn EventSource>,
    after: u64,
    heartbeat: Duration,
    clock: Arc<dyn Clock>,
    stop: CancellationToken,
) -> FeedStream {
    let (tx, rx) = mpsc::channel::<Result<pb::RevocationFeed, Status>>(4);
    tokio::spawn(async move {
        let mut head_rx = source.subscribe();
        let mut last = after;
        loop {
            // Marked before reading, so an event committed in between wakes the next round.
            head_rx.mark_unchanged();
            let batch = source.events_after(last);
            let now = unix_seconds(clock.now());
            let mut pages = Pager::new(&batch.events, now, MESSAGE_BUDGET);
            let mut page = pages.next_page().unwrap_or_default();
            loop {
                let next = pages.next_page();
                let msg = pb::RevocationFeed {
                    events: std::mem::take(&mut page),
                    head_sequence: batch.head,
                    compacted: batch.compacted,
                    more: next.is_some(),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
                match next {
                    Some(n) => page = n,
                    None => break,
                }
            }
            last = last.max(batch.head);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tx.closed() => return,
                changed = head_rx.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(heartbeat) => {}
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// Cuts a batch of events into pages of at most `budget` encoded bytes (the first page may be
/// empty: a batch with no events is one empty message).
struct Pager<'a> {
    events: std::slice::Iter<'a, Arc<RevocationEvent>>,
    /// Parts of a split event not yet paged.
    parts: std::collections::VecDeque<pb::RevocationEvent>,
    now: i64,
    budget: usize,
    started: bool,
}

impl<'a> Pager<'a> {
    fn new(events: &'a [Arc<RevocationEvent>], now: i64, budget: usize) -> Self {
        Self {
            events: events.iter(),
            parts: Default::default(),
            now,
            // Room for the message's own fields (head, flags).
            budget: budget - 32,
            started: false,
        }
    }

    /// The next page, or None once every event went out (the first call always gives one).
    fn next_page(&mut self) -> Option<Vec<pb::RevocationEvent>> {
        let mut page = Vec::new();
        let mut size = 0;
        loop {
            if self.parts.is_empty() {
                match self.events.next() {
                    Some(e) => self.parts = split_event(shed_expired(e, self.now), self.budget),
                    None => break,
                }
            }
            let Some(part) = self.parts.front() else {
                continue;
            };
            let len = field_len(part.encoded_len());
            if !page.is_empty() && size + len > self.budget {
                break;
            }
            size += len;
            page.extend(self.parts.pop_front());
        }
        if page.is_empty() && std::mem::replace(&mut self.started, true) {
            return None;
        }
        self.started = true;
        Some(page)
    }
}

/// Bytes a length-delimited field of `len` bytes takes (its key is one byte: fields 1-15).
fn field_len(len: usize) -> usize {
    1 + prost::length_delimiter_len(len) + len
}

/// The wire form of `event` without the serials that expired before `now`.
fn shed_expired(event: &RevocationEvent, now: i64) -> pb::RevocationEvent {
    let mut wire = event_to_proto(event);
    wire.serials.retain(|s| s.expires_at >= now);
    wire
}

/// Splits an event too large for one message into parts of the same sequence, each within
/// `budget`, every part but the last `continued`. The handle, reason and times ride on
/// every part, so each part alone says what it belongs to.
fn split_event(
    mut event: pb::RevocationEvent,
    budget: usize,
) -> std::collections::VecDeque<pb::RevocationEvent> {
    let mut parts = std::collections::VecDeque::new();
    if field_len(event.encoded_len()) <= budget {
        parts.push_back(event);
        return parts;
    }
    let serials = std::mem::take(&mut event.serials);
    let jwt_ids = std::mem::take(&mut event.jwt_ids);
    let header = event;
    // What a part holds besides its serials and ids, with room for the `continued` flag.
    let base = field_len(header.encoded_len()) + 2;
    let mut part = header.clone();
    let mut size = base;
    for serial in serials {
        let len = field_len(serial.encoded_len());
        if size + len > budget && (!part.serials.is_empty() || !part.jwt_ids.is_empty()) {
            part.continued = true;
            parts.push_back(std::mem::replace(&mut part, header.clone()));
            size = base;
        }
        size += len;
        part.serials.push(serial);
    }
    for id in jwt_ids {
        let len = field_len(id.len());
        if size + len > budget && (!part.serials.is_empty() || !part.jwt_ids.is_empty()) {
            part.continued = true;
            parts.push_back(std::mem::replace(&mut part, header.clone()));
            size = base;
        }
        size += len;
        part.jwt_ids.push(id);
    }
    parts.push_back(part);
    parts
}

/// Puts split events back together on the receiving side of a feed.
#[derive(Debug, Default)]
pub struct EventAssembler {
    pending: Option<pb::RevocationEvent>,
}

impl EventAssembler {
    /// Takes one event (or part) off the wire; gives back the whole event once its last part
    /// is in. A part of another sequence while one is pending drops the pending one (the
    /// sender broke off), and that is logged.
    pub fn push(&mut self, part: pb::RevocationEvent) -> Option<pb::RevocationEvent> {
        let mut whole = match self.pending.take() {
            Some(mut pending) if pending.sequence == part.sequence => {
                pending.serials.extend(part.serials);
                pending.jwt_ids.extend(part.jwt_ids);
                pending.continued = part.continued;
                pending
            }
            Some(dropped) => {
                tracing::warn!(
                    sequence = dropped.sequence,
                    next = part.sequence,
                    "a revocation event's parts were cut off; dropping the incomplete event"
                );
                part
            }
            None => part,
        };
        if whole.continued {
            self.pending = Some(whole);
            return None;
        }
        whole.continued = false;
        Some(whole)
    }

    /// Whether part of an event is waiting for the rest.
    pub fn is_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Forgets a pending part (a new connection starts from whole events).
    pub fn reset(&mut self) {
        self.pending = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;
    use crate::datastore::{DataStore, SledStore};
    use crate::revocation::RevocationHandle;
    use futures::StreamExt;

    /// Far beyond any test's run time: a test that waits for a heartbeat uses a short one.
    const QUIET: Duration = Duration::from_secs(3600);
    /// Bounds each wait, so a broken feed fails the test instead of hanging it.
    const WAIT: Duration = Duration::from_secs(20);

    fn node(n: &str) -> RevocationHandle {
        RevocationHandle::Node(spiffe::SpiffeId::new(format!("spiffe://example.org/{n}")).unwrap())
    }

    /// The next message that carries events, skipping heartbeats (however many a slow
    /// machine lets through while a revocation is being flushed).
    async fn next_events(feed: &mut FeedStream) -> pb::RevocationFeed {
        tokio::time::timeout(WAIT, async {
            loop {
                let msg = feed.next().await.unwrap().unwrap();
                if !msg.events.is_empty() {
                    return msg;
                }
            }
        })
        .await
        .expect("no events within the bound")
    }

    #[tokio::test]
    async fn subscriber_gets_missed_events_then_live_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn DataStore> = Arc::new(SledStore::open(dir.path()).unwrap());
        let log = Arc::new(RevocationLog::open(store).await.unwrap());
        log.revoke(node("a"), "", 1).await.unwrap();
        log.revoke(node("b"), "", 1).await.unwrap();
        let stop = CancellationToken::new();
        let mut feed = feed_stream(log.clone(), 1, QUIET, Arc::new(SystemClock), stop.clone());
        let first = next_events(&mut feed).await;
        assert_eq!(first.head_sequence, 2);
        assert_eq!(
            first.events.iter().map(|e| e.sequence).collect::<Vec<_>>(),
            [2]
        );
        log.revoke(node("c"), "", 1).await.unwrap();
        let live = next_events(&mut feed).await;
        assert_eq!(
            live.events.iter().map(|e| e.sequence).collect::<Vec<_>>(),
            [3]
        );
        assert_eq!(live.head_sequence, 3);
        stop.cancel();
        let end = tokio::time::timeout(WAIT, async { while feed.next().await.is_some() {} }).await;
        assert!(end.is_ok(), "the stream ends when the server stops");
    }

    #[tokio::test]
    async fn a_quiet_feed_sends_heartbeats_naming_the_head() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn DataStore> = Arc::new(SledStore::open(dir.path()).unwrap());
        let log = Arc::new(RevocationLog::open(store).await.unwrap());
        log.revoke(node("a"), "", 1).await.unwrap();
        let stop = CancellationToken::new();
        let mut feed = feed_stream(
            log.clone(),
            1,
            Duration::from_millis(20),
            Arc::new(SystemClock),
            stop.clone(),
        );
        // Nothing is revoked meanwhile, so every message after the first is a heartbeat.
        for _ in 0..3 {
            let beat = tokio::time::timeout(WAIT, feed.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            assert!(beat.events.is_empty());
            assert_eq!(beat.head_sequence, 1);
            assert!(!beat.compacted);
        }
        stop.cancel();
    }

    #[tokio::test]
    async fn an_event_whose_flush_failed_is_still_delivered_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let sled = Arc::new(SledStore::open(dir.path()).unwrap());
        let store: Arc<dyn DataStore> = sled.clone();
        let log = Arc::new(RevocationLog::open(store).await.unwrap());
        let stop = CancellationToken::new();
        let mut feed = feed_stream(log.clone(), 0, QUIET, Arc::new(SystemClock), stop.clone());
        sled.fail_flushes
            .store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(log.revoke(node("a"), "", 1).await.is_err());
        sled.fail_flushes
            .store(false, std::sync::atomic::Ordering::SeqCst);
        log.revoke(node("b"), "", 1).await.unwrap();
        let mut got = Vec::new();
        while got.len() < 2 {
            let msg = next_events(&mut feed).await;
            assert!(!msg.compacted, "{msg:?}");
            got.extend(msg.events.iter().map(|e| e.sequence));
        }
        assert_eq!(got, [1, 2]);
        stop.cancel();
    }
}

#[cfg(test)]
mod paging_tests {
    use super::*;
    use crate::revocation::{event_from_proto, RevocationAction, RevocationHandle, RevokedSerial};
    use prost::Message;

    fn authority_revocation(seq: u64, serials: usize, expires_at: i64) -> RevocationEvent {
        RevocationEvent {
            sequence: seq,
            action: RevocationAction::Revoke,
            handle: RevocationHandle::Authority("ab".repeat(20)),
            reason: "key compromise".into(),
            at: 10,
            serials: (0..serials)
                .map(|i| RevokedSerial {
                    serial: format!("{:032x}", i + 1),
                    authority_id: "ab".repeat(20),
                    expires_at: expires_at + (i % 2) as i64,
                })
                .collect(),
            jwt_ids: (0..serials / 10).map(|i| format!("jti-{i:028}")).collect(),
            expires_at: expires_at + 1,
        }
    }

    fn pages(events: &[Arc<RevocationEvent>], now: i64) -> Vec<Vec<pb::RevocationEvent>> {
        let mut pager = Pager::new(events, now, MESSAGE_BUDGET);
        std::iter::from_fn(|| pager.next_page()).collect()
    }

    #[test]
    fn a_revocation_of_100k_svids_is_split_into_messages_under_the_budget_and_put_back_whole() {
        let big = Arc::new(authority_revocation(7, 100_000, 1_000));
        let wire_len = event_to_proto(&big).encoded_len();
        assert!(
            wire_len > 4 * MESSAGE_BUDGET,
            "{wire_len}: the case must not fit"
        );
        let pages = self::pages(std::slice::from_ref(&big), 0);
        assert!(pages.len() >= 5, "{} pages", pages.len());
        let mut parts = EventAssembler::default();
        let mut whole = Vec::new();
        for (i, page) in pages.iter().enumerate() {
            let msg = pb::RevocationFeed {
                events: page.clone(),
                head_sequence: 7,
                compacted: false,
                more: i + 1 < pages.len(),
            };
            assert!(
                msg.encoded_len() <= MESSAGE_BUDGET,
                "page {i}: {}",
                msg.encoded_len()
            );
            assert!(page.iter().all(|p| p.sequence == 7 && p.handle.is_some()));
            whole.extend(page.iter().cloned().filter_map(|p| parts.push(p)));
        }
        assert!(!parts.is_pending());
        assert_eq!(whole.len(), 1, "one event comes out");
        assert_eq!(event_from_proto(whole.remove(0)).unwrap(), *big);
    }

    #[test]
    fn many_small_events_share_pages_in_order_and_an_empty_batch_is_one_empty_page() {
        let events: Vec<Arc<RevocationEvent>> = (1..=30_000)
            .map(|seq| Arc::new(authority_revocation(seq, 1, 1_000)))
            .collect();
        let paged = pages(&events, 0);
        assert!(paged.len() > 1 && paged.len() < 30, "{} pages", paged.len());
        let seqs: Vec<u64> = paged.iter().flatten().map(|e| e.sequence).collect();
        assert_eq!(seqs, (1..=30_000).collect::<Vec<_>>());
        assert!(paged.iter().flatten().all(|e| !e.continued));
        assert_eq!(pages(&[], 0), vec![Vec::new()]);
    }

    #[test]
    fn serials_already_expired_are_not_sent() {
        let event = Arc::new(authority_revocation(1, 10, 1_000));
        // Half the serials expire at 1000, half at 1001.
        let sent = pages(&[event], 1_001);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0][0].serials.len(), 5);
        assert!(sent[0][0].serials.iter().all(|s| s.expires_at == 1_001));
    }

    #[test]
    fn a_part_cut_off_by_another_sequence_is_dropped() {
        let mut parts = EventAssembler::default();
        let mut first = event_to_proto(&authority_revocation(3, 2, 1_000));
        first.continued = true;
        assert!(parts.push(first).is_none());
        assert!(parts.is_pending());
        let next = event_to_proto(&authority_revocation(4, 2, 1_000));
        let out = parts.push(next.clone()).expect("the new whole event");
        assert_eq!(out, next);
        assert!(!parts.is_pending());
    }
}
