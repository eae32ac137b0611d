//! The node agent's side of pushed changes (`Node/WatchChanges`): a notice that something
//! this node serves changed makes the sync loop sync at once. The regular sync interval
//! still runs, so a lost stream costs latency, never an entry.

use std::sync::Arc;
use std::time::Duration;

use agentd_proto::node as pb;
use tokio_util::sync::CancellationToken;

use crate::node::cache::Cache;
use crate::node::client::ServerLink;
use crate::node::NodeError;

/// The server sends a heartbeat every 30 s; three missed and the stream counts as lost.
const SILENCE: Duration = Duration::from_secs(90);
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct ChangeSubscriber {
    pub link: Arc<ServerLink>,
    pub cache: Arc<Cache>,
}

/// How a connection to the change stream ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// After delivering at least one notice.
    Heard,
    /// Silent, or closed before any notice.
    Silent,
    /// The server does not serve the stream.
    Unsupported,
}

/// Where the node is in the server's change log.
#[derive(Debug, Default, Clone, Copy)]
struct Position {
    sequence: u64,
    epoch: u64,
}

impl Position {
    /// Where a notice leaves the node: another run of the server numbers from its own
    /// start, so its sequence is taken as it is.
    fn after(self, notice: &pb::ChangeNotice) -> Self {
        let sequence = if notice.epoch == self.epoch {
            self.sequence.max(notice.sequence)
        } else {
            notice.sequence
        };
        Self {
            sequence,
            epoch: notice.epoch,
        }
    }
}

impl ChangeSubscriber {
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), NodeError> {
        let mut at = Position::default();
        let mut backoff = MIN_BACKOFF;
        loop {
            let result = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                r = self.follow(&mut at) => r,
            };
            match result {
                Ok(Ended::Heard) => backoff = MIN_BACKOFF,
                Ok(Ended::Silent) => {}
                Ok(Ended::Unsupported) => {
                    // A server without pushed changes: the regular sync is all there is.
                    tracing::info!("the server pushes no changes; syncing at the interval");
                    shutdown.cancelled().await;
                    return Ok(());
                }
                Err(e) => {
                    tracing::debug!(error = %e, retry_in = ?backoff, "change stream lost; reconnecting");
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One connection, until it fails or goes silent.
    async fn follow(&self, at: &mut Position) -> Result<Ended, NodeError> {
        let mut client = self.link.client().await?;
        let request = pb::WatchChangesRequest {
            after_sequence: at.sequence,
            epoch: at.epoch,
        };
        let mut stream = match client.watch_changes(request).await {
            Ok(s) => s.into_inner(),
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                return Ok(Ended::Unsupported)
            }
            Err(status) => return Err(NodeError::from_status(status)),
        };
        let mut heard = Ended::Silent;
        loop {
            let notice = match tokio::time::timeout(SILENCE, stream.message()).await {
                Err(_) => return Ok(heard),
                Ok(Err(status)) => return Err(NodeError::from_status(status)),
                Ok(Ok(None)) => return Ok(heard),
                Ok(Ok(Some(n))) => n,
            };
            heard = Ended::Heard;
            *at = at.after(&notice);
            if notice.sync {
                if notice.bundles && notice.entry_ids.is_empty() && notice.grant_agents.is_empty() {
                    tracing::debug!(
                        sequence = notice.sequence,
                        "change notice: fetching the bundles now"
                    );
                    self.cache.request_bundles();
                } else if notice.entry_ids.is_empty() && notice.grant_agents.is_empty() {
                    tracing::debug!(
                        sequence = notice.sequence,
                        "change notice: syncing everything now"
                    );
                    self.cache.request_sync();
                } else {
                    tracing::debug!(sequence = notice.sequence, entries = ?notice.entry_ids, agents = ?notice.grant_agents, "change notice: syncing what changed now");
                    self.cache
                        .request_delta(notice.entry_ids, notice.grant_agents);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_server_run_resets_the_position_and_the_same_run_never_goes_back() {
        let notice = |sequence, epoch| pb::ChangeNotice {
            sequence,
            epoch,
            ..Default::default()
        };
        let at = Position::default().after(&notice(5_000, 7));
        assert_eq!((at.sequence, at.epoch), (5_000, 7));
        // A notice delivered late (out of order) on the same run does not move it back.
        let same = at.after(&notice(4_000, 7));
        assert_eq!(same.sequence, 5_000);
        // The server restarted: its head is near 0, and that is where the node now is, so a
        // reconnect after changes 1-3 is told to sync.
        let restarted = at.after(&notice(2, 9));
        assert_eq!((restarted.sequence, restarted.epoch), (2, 9));
    }
}
