//! What a node agent learns of revocations: the CRLs and the push feed.

use tonic::{Request, Response, Status};

use super::{NodeApi, NodeApiError};
use crate::revocation::feed::{feed_stream, FeedStream, HEARTBEAT};
use crate::tls::PeerIdentity;

impl NodeApi {
    pub(super) async fn crls_for_node(
        &self,
        request: Request<agentd_proto::revocation::FetchCrlsRequest>,
    ) -> Result<Response<agentd_proto::revocation::FetchCrlsResponse>, Status> {
        self.caller(request.extensions().get::<PeerIdentity>())
            .await?;
        let crls = self.crls.get(&self.state).map_err(NodeApiError::from)?;
        Ok(Response::new(agentd_proto::revocation::FetchCrlsResponse {
            crls,
        }))
    }

    pub(super) async fn revocation_feed(
        &self,
        request: Request<agentd_proto::revocation::WatchRevocationsRequest>,
    ) -> Result<Response<FeedStream>, Status> {
        let node = self
            .caller(request.extensions().get::<PeerIdentity>())
            .await?;
        let after = request.get_ref().after_sequence;
        tracing::debug!(node = %node.spiffe_id, after, "revocation feed subscribed");
        Ok(Response::new(feed_stream(
            self.state.revocations.clone(),
            after,
            HEARTBEAT,
            self.state.clock.clone(),
            self.stop.clone(),
        )))
    }
}
