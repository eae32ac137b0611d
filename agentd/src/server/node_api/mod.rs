//! The node API: node attestation, entry sync and SVID minting for node agents.
//!
//! `Attest` is the only call accepted without a client certificate. Every other call must
//! come over mTLS with a node SVID of a node the server still knows (an evicted node must
//! attest again), and may only touch entries parented to that node.
//!
//! This file is the transport: the tonic service, its limits, and one thin method per call.
//! What each call does lives beside it: `attest` (node attestation, renewal), `sync`, `mint`,
//! `feed` (CRLs, revocation feed), `delegation`; `caller` checks the calling node once;
//! `status` maps every error to a gRPC status. Shared policy lives in `server::issuance`,
//! `server::membership` and `server::grants`.

use std::sync::Arc;

use agentd_attestor::node::NodeAttestors;
use agentd_proto::node as pb;
use agentd_proto::node::node_server::{Node, NodeServer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::{ServerError, ServerState};
use crate::revocation::feed::FeedStream;
use crate::tls::{PeerIdentity, ServerConfigSource};

mod attest;
mod caller;
mod changes;
mod delegation;
mod failures;
mod feed;
#[cfg(test)]
pub(crate) mod issuance_tests;
pub mod limits;
#[cfg(test)]
mod limits_tests;
mod mint;
mod status;
mod sync;
#[cfg(test)]
mod tests;

pub use mint::svid_to_proto;
pub use status::NodeApiError;
pub use sync::entry_to_proto;

/// Most CSRs accepted in one `MintX509Svids` call.
pub const MAX_BATCH: usize = 1000;
/// Largest message the node API accepts.
const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct NodeApi {
    state: Arc<ServerState>,
    attestors: Arc<NodeAttestors>,
    /// Refused attestations, counted; request budgets per source.
    failures: Arc<failures::AttestFailures>,
    /// Ends revocation feed streams when the server stops.
    stop: CancellationToken,
    /// FetchCrls answers, signed once per revocation head.
    crls: Arc<crate::server::crl::CrlCache>,
}

impl NodeApi {
    pub fn new(state: Arc<ServerState>, stop: CancellationToken) -> Self {
        let attestors = Arc::new(
            NodeAttestors::new(&state.config.node_attestors, &state.config.trust_domain)
                .with_seen_tokens(state.store.seen_tokens()),
        );
        let failures = Arc::new(failures::AttestFailures::new(
            &state.config.node_api,
            state.clock.clone(),
        ));
        Self {
            state,
            attestors,
            failures,
            stop,
            crls: Arc::default(),
        }
    }
}

pub async fn serve(
    state: Arc<ServerState>,
    listener: TcpListener,
    tls: ServerConfigSource,
    stop: CancellationToken,
) -> Result<(), ServerError> {
    let limits = state.config.node_api.clone();
    let incoming = crate::tls::incoming(listener, tls, limits.connections, stop.clone());
    let api = NodeApi::new(state.clone(), stop.clone());
    tokio::spawn(api.failures.clone().run(
        state.audit.clone(),
        limits.failure_audit_interval,
        stop.clone(),
    ));
    let svc = NodeServer::new(api)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let rpc_metrics = state.metrics.rpc_layer("node");
    limits::server_builder(&limits)
        .trace_fn(rpc_span)
        .layer(rpc_metrics)
        .layer(tower::util::MapRequestLayer::new(
            limits::cap_unauthenticated_body,
        ))
        .add_service(svc)
        .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
        .await
        .map_err(|e| ServerError::Serve {
            what: "node API",
            reason: e.to_string(),
        })
}

/// One span per node API call: the method, the peer address and, past attestation, the
/// calling node's SPIFFE ID (from its verified client certificate).
fn rpc_span(req: &tonic::codegen::http::Request<()>) -> tracing::Span {
    let span = tracing::info_span!(
        "rpc",
        api = "node",
        rpc = crate::telemetry::rpc::rpc_name(req.uri().path()),
        remote = tracing::field::Empty,
        node = tracing::field::Empty,
    );
    if let Some(peer) = req.extensions().get::<PeerIdentity>() {
        if let Some(addr) = peer.remote_addr {
            span.record("remote", tracing::field::display(addr));
        }
        if let Some(id) = &peer.spiffe_id {
            span.record("node", tracing::field::display(id));
        }
    }
    span
}

#[tonic::async_trait]
impl Node for NodeApi {
    async fn attest(
        &self,
        request: Request<pb::AttestRequest>,
    ) -> Result<Response<pb::AttestResponse>, Status> {
        self.attest_node(request).await
    }

    async fn x509_pop_challenge(
        &self,
        request: Request<pb::X509PopChallengeRequest>,
    ) -> Result<Response<pb::X509PopChallengeResponse>, Status> {
        self.issue_x509_pop_challenge(request).await
    }

    async fn renew_node_svid(
        &self,
        request: Request<pb::RenewNodeSvidRequest>,
    ) -> Result<Response<pb::RenewNodeSvidResponse>, Status> {
        self.renew_node(request).await
    }

    async fn sync_entries(
        &self,
        request: Request<pb::SyncEntriesRequest>,
    ) -> Result<Response<pb::SyncEntriesResponse>, Status> {
        self.sync_node(request).await
    }

    async fn mint_x509_svids(
        &self,
        request: Request<pb::MintX509SvidsRequest>,
    ) -> Result<Response<pb::MintX509SvidsResponse>, Status> {
        self.mint_x509(request).await
    }

    async fn mint_jwt_svid(
        &self,
        request: Request<pb::MintJwtSvidRequest>,
    ) -> Result<Response<pb::MintJwtSvidResponse>, Status> {
        self.mint_jwt(request).await
    }

    async fn fetch_crls(
        &self,
        request: Request<agentd_proto::revocation::FetchCrlsRequest>,
    ) -> Result<Response<agentd_proto::revocation::FetchCrlsResponse>, Status> {
        self.crls_for_node(request).await
    }

    type WatchRevocationsStream = FeedStream;

    async fn watch_revocations(
        &self,
        request: Request<agentd_proto::revocation::WatchRevocationsRequest>,
    ) -> Result<Response<FeedStream>, Status> {
        self.revocation_feed(request).await
    }

    async fn mint_delegation_token(
        &self,
        request: Request<pb::MintDelegationTokenRequest>,
    ) -> Result<Response<pb::MintDelegationTokenResponse>, Status> {
        self.offer_delegation(request).await
    }

    async fn exchange_delegation_token(
        &self,
        request: Request<pb::ExchangeDelegationTokenRequest>,
    ) -> Result<Response<pb::ExchangeDelegationTokenResponse>, Status> {
        self.exchange_delegation(request).await
    }

    type WatchChangesStream = changes::ChangeStream;

    async fn watch_changes(
        &self,
        request: Request<pb::WatchChangesRequest>,
    ) -> Result<Response<changes::ChangeStream>, Status> {
        self.change_notices(request).await
    }
}
