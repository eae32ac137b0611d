//! The admin API, served on the server's Unix socket for the CLI. Requests carry raw strings;
//! every field is parsed (`parse`) and a bad one is named in the error.
//!
//! This file is the transport: the tonic service on the Unix socket and one thin method per
//! call, delegating to the module of its resource (`entries`, `nodes`, `tokens`,
//! `revocations`, `grants`, `bundle`, `audit`, `owners`, `authorities`, `federation`); `status` maps every
//! error to a gRPC status once.

use std::sync::Arc;

use agentd_proto::admin as pb;
use agentd_proto::admin::admin_server::{Admin, AdminServer};
use agentd_proto::revocation as rpb;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

use super::{ServerError, ServerState};

mod audit;
mod authorities;
mod bundle;
mod entries;
mod federation;
mod grants;
mod nodes;
mod owners;
mod paging;
mod parse;
mod revocations;
mod status;
#[cfg(test)]
mod tests;
mod tokens;

pub use audit::audit_to_proto;
pub use authorities::authority_to_proto;
pub use parse::{parse_dns_names, parse_hint, parse_owner, parse_scopes, parse_selectors};
use status::invalid;
pub use status::AdminError;

#[derive(Debug, Clone)]
pub struct AdminApi {
    state: Arc<ServerState>,
}

impl AdminApi {
    /// The admin API over `state`, without its socket (in-process tests call it directly).
    pub fn new(state: Arc<ServerState>) -> Self {
        Self { state }
    }

    /// The server's own SPIFFE ID (the parent of node-set aliases).
    pub(crate) fn server_id(&self) -> spiffe::SpiffeId {
        crate::tls::server_spiffe_id(&self.state.config.trust_domain)
    }
}

pub async fn serve(
    state: Arc<ServerState>,
    listener: UnixListener,
    stop: CancellationToken,
) -> Result<(), ServerError> {
    // Only the server's own user (and root) may administer it, whatever the socket's mode
    // or the directory it sits in.
    let own_uid = crate::net::own_uid();
    let incoming = {
        use tokio_stream::StreamExt as _;
        tokio_stream::wrappers::UnixListenerStream::new(listener).filter(move |conn| match conn {
            Ok(stream) => match stream.peer_cred() {
                Ok(cred) if cred.uid() == own_uid || cred.uid() == 0 => true,
                Ok(cred) => {
                    tracing::warn!(
                        uid = cred.uid(),
                        "admin connection from another user refused"
                    );
                    false
                }
                Err(e) => {
                    tracing::warn!(error = %e, "admin connection without peer credentials refused");
                    false
                }
            },
            Err(_) => true,
        })
        // Any `:authority` is accepted on a Unix socket (net::authority).
        .map(|conn| {
            conn.map(|stream| {
                // What tonic would have told the handlers about a plain Unix stream: the
                // caller's uid, for the log and the audit trail.
                let info = tonic::transport::server::Connected::connect_info(&stream);
                crate::net::ConnWithInfo::new(
                    crate::net::authority::AuthorityRewrite::new(stream),
                    info,
                )
            })
        })
    };
    let rpc_metrics = state.metrics.rpc_layer("admin");
    tonic::transport::Server::builder()
        .trace_fn(rpc_span)
        .layer(rpc_metrics)
        .add_service(AdminServer::new(AdminApi { state }))
        .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
        .await
        .map_err(|e| ServerError::Serve {
            what: "admin API",
            reason: e.to_string(),
        })
}

/// One span per admin call: the method and the caller's uid.
fn rpc_span(req: &tonic::codegen::http::Request<()>) -> tracing::Span {
    let span = tracing::info_span!(
        "rpc",
        api = "admin",
        rpc = crate::telemetry::rpc::rpc_name(req.uri().path()),
        uid = tracing::field::Empty,
    );
    if let Some(uid) = req
        .extensions()
        .get::<UdsConnectInfo>()
        .and_then(|i| i.peer_cred)
        .map(|c| c.uid())
    {
        span.record("uid", uid);
    }
    span
}

/// The uid of the admin caller, for the log (and the audit trail).
fn caller_uid<T>(req: &Request<T>) -> Option<u32> {
    req.extensions()
        .get::<UdsConnectInfo>()
        .and_then(|i| i.peer_cred)
        .map(|c| c.uid())
}

#[tonic::async_trait]
impl Admin for AdminApi {
    async fn get_server_info(
        &self,
        _request: Request<pb::GetServerInfoRequest>,
    ) -> Result<Response<pb::ServerInfo>, Status> {
        bundle::server_info(self, _request).await
    }

    async fn create_join_token(
        &self,
        request: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::JoinToken>, Status> {
        tokens::create(self, request).await
    }

    async fn create_entry(
        &self,
        request: Request<pb::EntrySpec>,
    ) -> Result<Response<pb::Entry>, Status> {
        entries::create(self, request).await
    }

    async fn get_entry(
        &self,
        request: Request<pb::GetEntryRequest>,
    ) -> Result<Response<pb::Entry>, Status> {
        entries::get(self, request).await
    }

    async fn list_entries(
        &self,
        request: Request<pb::ListEntriesRequest>,
    ) -> Result<Response<pb::ListEntriesResponse>, Status> {
        entries::list(self, request).await
    }

    async fn update_entry(
        &self,
        request: Request<pb::UpdateEntryRequest>,
    ) -> Result<Response<pb::Entry>, Status> {
        entries::update(self, request).await
    }

    async fn delete_entry(
        &self,
        request: Request<pb::DeleteEntryRequest>,
    ) -> Result<Response<pb::Entry>, Status> {
        entries::delete(self, request).await
    }

    async fn batch_create_entries(
        &self,
        request: Request<pb::BatchCreateEntriesRequest>,
    ) -> Result<Response<pb::BatchEntriesResponse>, Status> {
        entries::batch_create(self, request).await
    }

    async fn batch_delete_entries(
        &self,
        request: Request<pb::BatchDeleteEntriesRequest>,
    ) -> Result<Response<pb::BatchEntriesResponse>, Status> {
        entries::batch_delete(self, request).await
    }

    async fn list_nodes(
        &self,
        _request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        nodes::list(self, _request).await
    }

    async fn get_node(
        &self,
        request: Request<pb::GetNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        nodes::get(self, request).await
    }

    async fn evict_node(
        &self,
        request: Request<pb::EvictNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        nodes::evict(self, request).await
    }

    async fn revoke(
        &self,
        request: Request<pb::RevokeRequest>,
    ) -> Result<Response<agentd_proto::revocation::RevocationEvent>, Status> {
        revocations::revoke(self, request).await
    }

    async fn lift_revocation(
        &self,
        request: Request<pb::LiftRevocationRequest>,
    ) -> Result<Response<agentd_proto::revocation::RevocationEvent>, Status> {
        revocations::lift(self, request).await
    }

    async fn list_revocations(
        &self,
        request: Request<pb::ListRevocationsRequest>,
    ) -> Result<Response<pb::ListRevocationsResponse>, Status> {
        revocations::list(self, request).await
    }

    async fn get_crls(
        &self,
        _request: Request<rpb::FetchCrlsRequest>,
    ) -> Result<Response<rpb::FetchCrlsResponse>, Status> {
        revocations::crls(self, _request).await
    }

    async fn create_grant(
        &self,
        request: Request<pb::CreateGrantRequest>,
    ) -> Result<Response<pb::Grant>, Status> {
        grants::create(self, request).await
    }

    async fn get_grant(
        &self,
        request: Request<pb::GetGrantRequest>,
    ) -> Result<Response<pb::Grant>, Status> {
        grants::get(self, request).await
    }

    async fn list_grants(
        &self,
        request: Request<pb::ListGrantsRequest>,
    ) -> Result<Response<pb::ListGrantsResponse>, Status> {
        grants::list(self, request).await
    }

    async fn get_bundle(
        &self,
        _request: Request<pb::GetBundleRequest>,
    ) -> Result<Response<pb::Bundle>, Status> {
        bundle::get(self, _request).await
    }

    async fn list_audit_records(
        &self,
        request: Request<pb::ListAuditRecordsRequest>,
    ) -> Result<Response<pb::ListAuditRecordsResponse>, Status> {
        audit::list(self, request).await
    }

    async fn verify_audit_log(
        &self,
        _request: Request<pb::VerifyAuditLogRequest>,
    ) -> Result<Response<pb::VerifyAuditLogResponse>, Status> {
        audit::verify(self, _request).await
    }

    async fn set_owner_disabled(
        &self,
        request: Request<pb::SetOwnerDisabledRequest>,
    ) -> Result<Response<pb::SetOwnerDisabledResponse>, Status> {
        owners::set_disabled(self, request).await
    }

    async fn get_inventory(
        &self,
        request: Request<pb::GetInventoryRequest>,
    ) -> Result<Response<pb::Inventory>, Status> {
        owners::inventory(self, request).await
    }

    async fn list_authorities(
        &self,
        _request: Request<pb::ListAuthoritiesRequest>,
    ) -> Result<Response<pb::Authorities>, Status> {
        authorities::list(self, _request).await
    }

    async fn prepare_authority(
        &self,
        request: Request<pb::PrepareAuthorityRequest>,
    ) -> Result<Response<pb::Authorities>, Status> {
        authorities::prepare(self, request).await
    }

    async fn activate_authority(
        &self,
        request: Request<pb::ActivateAuthorityRequest>,
    ) -> Result<Response<pb::Authorities>, Status> {
        authorities::activate(self, request).await
    }

    async fn create_federation(
        &self,
        request: Request<pb::FederationSpec>,
    ) -> Result<Response<pb::Federation>, Status> {
        federation::create(self, request).await
    }

    async fn get_federation(
        &self,
        request: Request<pb::GetFederationRequest>,
    ) -> Result<Response<pb::Federation>, Status> {
        federation::get(self, request).await
    }

    async fn list_federations(
        &self,
        request: Request<pb::ListFederationsRequest>,
    ) -> Result<Response<pb::ListFederationsResponse>, Status> {
        federation::list(self, request).await
    }

    async fn update_federation(
        &self,
        request: Request<pb::UpdateFederationRequest>,
    ) -> Result<Response<pb::Federation>, Status> {
        federation::update(self, request).await
    }

    async fn delete_federation(
        &self,
        request: Request<pb::DeleteFederationRequest>,
    ) -> Result<Response<pb::Federation>, Status> {
        federation::delete(self, request).await
    }

    async fn set_federated_bundle(
        &self,
        request: Request<pb::SetFederatedBundleRequest>,
    ) -> Result<Response<pb::FederatedBundle>, Status> {
        federation::set_bundle(self, request).await
    }

    async fn list_federated_bundles(
        &self,
        request: Request<pb::ListFederatedBundlesRequest>,
    ) -> Result<Response<pb::ListFederatedBundlesResponse>, Status> {
        federation::list_bundles(self, request).await
    }

    async fn delete_federated_bundle(
        &self,
        request: Request<pb::DeleteFederatedBundleRequest>,
    ) -> Result<Response<pb::FederatedBundle>, Status> {
        federation::delete_bundle(self, request).await
    }
}
