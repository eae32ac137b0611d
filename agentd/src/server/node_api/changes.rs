//! `Node/WatchChanges`: the notices that make a node sync as soon as something it serves
//! changes (see `server::changes`).

use std::collections::BTreeSet;
use std::pin::Pin;
use std::time::Duration;

use agentd_proto::node as pb;
use futures::Stream;
use spiffe::SpiffeId;
use tokio::sync::{broadcast, mpsc};
use tonic::{Request, Response, Status};

use super::{NodeApi, NodeApiError};
use crate::server::changes::ChangeScope;
use crate::tls::PeerIdentity;

/// How often a quiet change stream sends a heartbeat notice; a node that hears nothing for
/// three of these reconnects.
pub const CHANGE_HEARTBEAT: Duration = Duration::from_secs(30);

pub type ChangeStream = Pin<Box<dyn Stream<Item = Result<pb::ChangeNotice, Status>> + Send>>;

impl NodeApi {
    pub(super) async fn change_notices(
        &self,
        request: Request<pb::WatchChangesRequest>,
    ) -> Result<Response<ChangeStream>, Status> {
        let node = self
            .caller(request.extensions().get::<PeerIdentity>())
            .await?;
        let req = request.into_inner();
        let state = self.state.clone();
        let stop = self.stop.clone();
        // Subscribed before the first notice is worked out, so no change falls in between.
        let mut changes = state.changes.subscribe();
        let epoch = state.changes.epoch();
        let head = state.changes.head();
        let mut parents = node_parents(&state, &node)
            .await
            .map_err(NodeApiError::from)?;
        let (tx, rx) = mpsc::channel::<Result<pb::ChangeNotice, Status>>(2);
        let first = pb::ChangeNotice {
            sequence: head,
            epoch,
            sync: req.epoch != epoch || req.after_sequence < head,
            ..Default::default()
        };
        tokio::spawn(async move {
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            // The heartbeat is due 30 s after the last notice sent, however many changes for
            // other nodes pass by meanwhile; it names the last change this stream has
            // looked at, not the log's head (a change still queued here is not yet seen).
            let mut beat = tokio::time::Instant::now() + CHANGE_HEARTBEAT;
            let mut seen = head;
            loop {
                let notice = tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep_until(beat) => pb::ChangeNotice {
                        sequence: seen,
                        epoch,
                        ..Default::default()
                    },
                    change = changes.recv() => match change {
                        Ok(change) => {
                            seen = seen.max(change.sequence);
                            let touches = match &change.scope {
                                ChangeScope::All => true,
                                ChangeScope::Parents(p) => !p.is_disjoint(&parents),
                            };
                            if !touches {
                                continue;
                            }
                            if change.scope == ChangeScope::All && !change.what.bundles {
                                // An alias may have changed: work out the node's sets again.
                                if let Ok(now) = node_parents(&state, &node).await {
                                    parents = now;
                                }
                            }
                            pb::ChangeNotice {
                                sequence: change.sequence,
                                epoch,
                                sync: true,
                                entry_ids: change.what.entries.iter().map(ToString::to_string).collect(),
                                grant_agents: change.what.grant_agents.iter().map(ToString::to_string).collect(),
                                bundles: change.what.bundles,
                            }
                        }
                        // Fell behind: whatever was missed, a sync covers it.
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            seen = state.changes.head();
                            pb::ChangeNotice {
                                sequence: seen,
                                epoch,
                                sync: true,
                                ..Default::default()
                            }
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                };
                if tx.send(Ok(notice)).await.is_err() {
                    return;
                }
                beat = tokio::time::Instant::now() + CHANGE_HEARTBEAT;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// The parents whose entries `node` may serve: its own ID and every alias whose selectors
/// it has, revoked or not (a lifted alias must not go quiet; a superset is safe, since the
/// delta sync checks what the node is given).
async fn node_parents(
    state: &crate::server::ServerState,
    node: &crate::datastore::AttestedNode,
) -> Result<BTreeSet<SpiffeId>, crate::datastore::DataStoreError> {
    let server_id = crate::tls::server_spiffe_id(&state.config.trust_domain);
    let mut parents =
        crate::server::membership::aliases_for_node(state.store.as_ref(), &server_id, node, None)
            .await?;
    parents.insert(node.spiffe_id.clone());
    Ok(parents)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use agentd_proto::admin as apb;
    use agentd_proto::admin::admin_server::Admin;
    use futures::StreamExt;
    use tokio_util::sync::CancellationToken;
    use tonic::Request;

    use super::super::issuance_tests::{attested, fixture, from_node, NODE};
    use super::*;

    const WAIT: Duration = Duration::from_secs(20);

    async fn next(stream: &mut ChangeStream) -> pb::ChangeNotice {
        tokio::time::timeout(WAIT, stream.next())
            .await
            .expect("a notice within the bound")
            .unwrap()
            .unwrap()
    }

    fn spec(id: &str, parent: &str) -> Request<apb::EntrySpec> {
        Request::new(apb::EntrySpec {
            spiffe_id: id.into(),
            parent_id: parent.into(),
            selectors: vec!["unix:uid:1000".into()],
            ..Default::default()
        })
    }

    /// A federated bundle set by hand is a "bundles only" notice to every node, and the
    /// bundles-only sync it asks for answers the bundles and no entries.
    #[tokio::test]
    async fn a_federated_bundle_change_asks_nodes_for_the_bundles_only() {
        let dir = tempfile::tempdir().unwrap();
        let (state, _clock) = fixture(dir.path()).await;
        let api = NodeApi::new(state.clone(), CancellationToken::new());
        let admin = crate::server::admin::AdminApi::new(state.clone());
        attested(&state, NODE, "a1", &[]).await;
        admin
            .create_entry(spec("spiffe://example.org/w/own", NODE))
            .await
            .unwrap();
        let mut stream = api
            .change_notices(from_node(pb::WatchChangesRequest::default(), NODE, "a1"))
            .await
            .unwrap()
            .into_inner();
        let _first = next(&mut stream).await;
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let pem = p.self_signed(&key).unwrap().pem();
        admin
            .set_federated_bundle(Request::new(apb::SetFederatedBundleRequest {
                trust_domain: "partner.example".into(),
                format: "pem".into(),
                data: pem.into_bytes(),
            }))
            .await
            .unwrap();
        let notice = next(&mut stream).await;
        assert!(notice.sync && notice.bundles, "{notice:?}");
        assert!(notice.entry_ids.is_empty() && notice.grant_agents.is_empty());

        let resp = api
            .sync_node(from_node(
                pb::SyncEntriesRequest {
                    bundles_only: true,
                    ..Default::default()
                },
                NODE,
                "a1",
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(
            resp.entries.is_empty(),
            "no entries in a bundles-only answer"
        );
        assert!(resp.bundle.is_some());
        assert!(resp.federated_bundles_included);
        assert_eq!(resp.federated_bundles.len(), 1);
        assert_eq!(resp.federated_bundles[0].trust_domain, "partner.example");
    }

    /// A node hears of changes to what it serves (its own entries, its alias's), and of
    /// nothing else; a reconnect with an old position is told to sync at once.
    #[tokio::test]
    async fn a_node_is_told_of_changes_to_what_it_serves_and_only_those() {
        let dir = tempfile::tempdir().unwrap();
        let (state, _clock) = fixture(dir.path()).await;
        let api = NodeApi::new(state.clone(), CancellationToken::new());
        let admin = crate::server::admin::AdminApi::new(state.clone());
        let ca = "x509pop:ca:fingerprint:aa";
        attested(&state, NODE, "a1", &[ca]).await;
        let server = crate::tls::server_spiffe_id(&state.config.trust_domain).to_string();
        let mut alias = spec("spiffe://example.org/nodes/fleet", &server);
        alias.get_mut().selectors = vec![ca.into()];
        admin.create_entry(alias).await.unwrap();

        let mut stream = api
            .change_notices(from_node(pb::WatchChangesRequest::default(), NODE, "a1"))
            .await
            .unwrap()
            .into_inner();
        let first = next(&mut stream).await;
        assert!(first.sync, "a new node (epoch 0) syncs at once: {first:?}");
        assert_eq!(first.epoch, state.changes.epoch());

        // Another node's entry: no notice. Then this node's own: a notice.
        admin
            .create_entry(spec(
                "spiffe://example.org/w/other",
                "spiffe://example.org/node/b",
            ))
            .await
            .unwrap();
        let own = admin
            .create_entry(spec("spiffe://example.org/w/own", NODE))
            .await
            .unwrap()
            .into_inner();
        let notice = next(&mut stream).await;
        assert!(notice.sync);
        assert_eq!(
            notice.sequence,
            state.changes.head(),
            "{notice:?}: the other node's change was skipped"
        );
        assert_eq!(notice.entry_ids, std::slice::from_ref(&own.id));
        assert_eq!(
            notice.grant_agents,
            ["spiffe://example.org/w/own"],
            "a new entry brings its agent's grants"
        );
        // An entry under the node's alias, and a deletion: a notice each.
        admin
            .create_entry(spec(
                "spiffe://example.org/w/fleet",
                "spiffe://example.org/nodes/fleet",
            ))
            .await
            .unwrap();
        assert!(next(&mut stream).await.sync);
        admin
            .delete_entry(Request::new(apb::DeleteEntryRequest { id: own.id }))
            .await
            .unwrap();
        assert!(next(&mut stream).await.sync);
        let head = state.changes.head();
        drop(stream);

        // Reconnecting where it left off: nothing to do. From an older position: sync.
        let mut again = api
            .change_notices(from_node(
                pb::WatchChangesRequest {
                    after_sequence: head,
                    epoch: state.changes.epoch(),
                },
                NODE,
                "a1",
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(!next(&mut again).await.sync);
        let mut behind = api
            .change_notices(from_node(
                pb::WatchChangesRequest {
                    after_sequence: head - 1,
                    epoch: state.changes.epoch(),
                },
                NODE,
                "a1",
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(next(&mut behind).await.sync);
    }

    /// Changes for other nodes do not hold back this node's heartbeat (it would go silent
    /// and reconnect into a whole sync), and the heartbeat names the last change the stream
    /// looked at.
    #[tokio::test(start_paused = true)]
    async fn the_heartbeat_comes_on_time_however_many_changes_pass_for_other_nodes() {
        let dir = tempfile::tempdir().unwrap();
        let (state, _clock) = fixture(dir.path()).await;
        let api = NodeApi::new(state.clone(), CancellationToken::new());
        attested(&state, NODE, "a1", &[]).await;
        let mut stream = api
            .change_notices(from_node(pb::WatchChangesRequest::default(), NODE, "a1"))
            .await
            .unwrap()
            .into_inner();
        next(&mut stream).await;
        let server = crate::tls::server_spiffe_id(&state.config.trust_domain);
        let other = SpiffeId::new("spiffe://example.org/node/b").unwrap();
        let id: crate::datastore::EntryId = "0".repeat(32).parse().unwrap();
        // A change for another node every 5 s, for 40 s.
        for _ in 0..8 {
            state.changes.publish_entry(&server, &id, [&other], []);
            tokio::time::advance(Duration::from_secs(5)).await;
            tokio::task::yield_now().await;
        }
        let beat = futures::FutureExt::now_or_never(stream.next())
            .expect("a heartbeat within 40 s")
            .unwrap()
            .unwrap();
        assert!(!beat.sync, "{beat:?}");
        assert!(beat.sequence >= 6, "{beat:?}: the changes looked at so far");
    }

    /// An alias revoked when the node connected still counts for its stream (a lift
    /// publishes nothing, so the alias must not go quiet): changes under it reach the node,
    /// and the delta sync decides what it is given.
    #[tokio::test]
    async fn changes_under_an_alias_revoked_at_connect_still_reach_the_node() {
        let dir = tempfile::tempdir().unwrap();
        let (state, _clock) = fixture(dir.path()).await;
        let api = NodeApi::new(state.clone(), CancellationToken::new());
        let admin = crate::server::admin::AdminApi::new(state.clone());
        let ca = "x509pop:ca:fingerprint:aa";
        attested(&state, NODE, "a1", &[ca]).await;
        let server = crate::tls::server_spiffe_id(&state.config.trust_domain).to_string();
        let mut alias = spec("spiffe://example.org/nodes/fleet", &server);
        alias.get_mut().selectors = vec![ca.into()];
        let alias = admin.create_entry(alias).await.unwrap().into_inner();
        state
            .revocations
            .revoke(
                crate::revocation::RevocationHandle::Entry(alias.id.parse().unwrap()),
                "",
                1,
            )
            .await
            .unwrap();
        let mut stream = api
            .change_notices(from_node(pb::WatchChangesRequest::default(), NODE, "a1"))
            .await
            .unwrap()
            .into_inner();
        next(&mut stream).await;
        let child = admin
            .create_entry(spec(
                "spiffe://example.org/w/fleet",
                "spiffe://example.org/nodes/fleet",
            ))
            .await
            .unwrap()
            .into_inner();
        let notice = next(&mut stream).await;
        assert_eq!(notice.entry_ids, [child.id]);
    }
}
