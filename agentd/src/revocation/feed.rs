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

use super::event_to_proto;
use super::log::{EventsAfter, RevocationLog};

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

/// Streams `source` to one subscriber, starting after `after`, until the subscriber hangs up
/// or `stop` is cancelled.
pub fn feed_stream(
    source: Arc<dyn EventSource>,
    after: u64,
    heartbeat: Duration,
    stop: CancellationToken,
) -> FeedStream {
    let (tx, rx) = mpsc::channel::<Result<pb::RevocationFeed, Status>>(16);
    tokio::spawn(async move {
        let mut head_rx = source.subscribe();
        let mut last = after;
        loop {
            // Marked before reading, so an event committed in between wakes the next round.
            head_rx.mark_unchanged();
            let batch = source.events_after(last);
            let msg = pb::RevocationFeed {
                events: batch.events.iter().map(|e| event_to_proto(e)).collect(),
                head_sequence: batch.head,
                compacted: batch.compacted,
            };
            last = last.max(batch.head);
            if tx.send(Ok(msg)).await.is_err() {
                return;
            }
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

#[cfg(test)]
mod tests {
    use super::*;
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
        let mut feed = feed_stream(log.clone(), 1, QUIET, stop.clone());
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
        let mut feed = feed_stream(log.clone(), 1, Duration::from_millis(20), stop.clone());
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
        let mut feed = feed_stream(log.clone(), 0, QUIET, stop.clone());
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
