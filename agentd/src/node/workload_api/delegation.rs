//! `agentd.workload.v1.Delegation`: a workload's delegated identities beyond the delegated
//! X.509-SVIDs that `FetchX509SVID` already carries (hint `grant:<id>`): JWT-SVIDs for a
//! grant, and agent-to-agent delegation (delegate, then exchange). The node agent only
//! attests the caller and forwards; every rule is decided by the server.

use agentd_proto::agentd_workload as apb;
use agentd_proto::agentd_workload::delegation_server::{Delegation, DelegationServer};
use agentd_proto::node as npb;
use tonic::{Request, Response, Status};

use super::{check_header, WorkloadApi, NO_IDENTITY};
use crate::clock::{from_unix_seconds, unix_seconds};
use crate::node::cache::{CachedJwtSvid, NodeEntry, NodeGrant};

pub(super) fn service(api: WorkloadApi) -> DelegationServer<DelegationService> {
    DelegationServer::new(DelegationService { api })
}

#[derive(Debug, Clone)]
pub struct DelegationService {
    api: WorkloadApi,
}

/// A server refusal keeps its meaning (the server names the rule); anything else means
/// the server could not be reached.
fn from_server(s: Status, what: &str) -> Status {
    match s.code() {
        tonic::Code::PermissionDenied
        | tonic::Code::InvalidArgument
        | tonic::Code::NotFound
        | tonic::Code::FailedPrecondition => Status::new(s.code(), s.message().to_string()),
        _ => Status::unavailable(format!("{what} failed: {}", s.message())),
    }
}

impl DelegationService {
    async fn client(
        &self,
    ) -> Result<npb::node_client::NodeClient<tonic::transport::Channel>, Status> {
        self.api
            .link
            .client()
            .await
            .map_err(|e| Status::unavailable(format!("cannot reach the server: {e}")))
    }

    /// The caller's (entry, grant) pairs, after the header check and attestation.
    async fn caller_grants<T>(
        &self,
        req: &Request<T>,
    ) -> Result<(Vec<NodeEntry>, Vec<(NodeEntry, NodeGrant)>), Status> {
        check_header(req)?;
        let selectors = self.api.attest(req).await?;
        self.api.ready()?;
        let now = self.api.clock.now();
        let entries = self.api.cache.view_for(&selectors, now).entries;
        if entries.is_empty() {
            return Err(Status::permission_denied(NO_IDENTITY));
        }
        Ok((entries, self.api.cache.grants_for(&selectors, now)))
    }
}

fn pick_grant(
    grants: Vec<(NodeEntry, NodeGrant)>,
    wanted: &str,
) -> Result<(NodeEntry, NodeGrant), Status> {
    if wanted.is_empty() {
        let mut it = grants.into_iter();
        return match (it.next(), it.next()) {
            (Some(one), None) => Ok(one),
            (None, _) => Err(Status::permission_denied(
                "this workload holds no live grant",
            )),
            (Some(_), Some(_)) => Err(Status::invalid_argument(
                "grant_id: this workload holds several grants; name one",
            )),
        };
    }
    grants
        .into_iter()
        .find(|(_, g)| g.id == wanted)
        .ok_or_else(|| {
            Status::permission_denied(format!(
                "grant {wanted} is not held by this workload (unknown, expired, or for another agent)"
            ))
        })
}

#[tonic::async_trait]
impl Delegation for DelegationService {
    async fn fetch_jwtsvid(
        &self,
        request: Request<apb::DelegatedJwtsvidRequest>,
    ) -> Result<Response<apb::DelegatedJwtsvidResponse>, Status> {
        let (_, grants) = self.caller_grants(&request).await?;
        let req = request.into_inner();
        if req.grant_id.is_empty() {
            return Err(Status::invalid_argument("grant_id must be specified"));
        }
        crate::svid::audience::validate_audience(&req.audience)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (entry, grant) = pick_grant(grants, &req.grant_id)?;
        let now = self.api.clock.now();
        let cache_key = format!("{}/{}", entry.id, grant.id);
        if let Some(token) = self.api.cache.jwt(&cache_key, &req.audience, now) {
            let expires_at = crate::svid::jwt::decode_unverified(&token)
                .ok()
                .and_then(|c| c.get("exp").and_then(serde_json::Value::as_i64))
                .unwrap_or_default();
            return Ok(Response::new(apb::DelegatedJwtsvidResponse {
                spiffe_id: entry.spiffe_id.to_string(),
                svid: token,
                grant_id: grant.id,
                expires_at,
            }));
        }
        let resp = self
            .client()
            .await?
            .mint_jwt_svid(npb::MintJwtSvidRequest {
                entry_id: entry.id.clone(),
                audience: req.audience.clone(),
                grant_id: grant.id.clone(),
            })
            .await
            .map_err(|s| from_server(s, "minting a delegated JWT-SVID"))?
            .into_inner();
        self.api.cache.put_jwt(
            &cache_key,
            &req.audience,
            CachedJwtSvid {
                token: resp.token.clone(),
                issued_at: now,
                expires_at: from_unix_seconds(resp.expires_at),
            },
        );
        Ok(Response::new(apb::DelegatedJwtsvidResponse {
            spiffe_id: entry.spiffe_id.to_string(),
            svid: resp.token,
            grant_id: grant.id,
            expires_at: resp.expires_at,
        }))
    }

    async fn delegate(
        &self,
        request: Request<apb::DelegateRequest>,
    ) -> Result<Response<apb::DelegateResponse>, Status> {
        let (_, grants) = self.caller_grants(&request).await?;
        let req = request.into_inner();
        let (entry, grant) = pick_grant(grants, &req.grant_id)?;
        let resp = self
            .client()
            .await?
            .mint_delegation_token(npb::MintDelegationTokenRequest {
                entry_id: entry.id.clone(),
                grant_id: grant.id.clone(),
                to: req.to,
                scopes: req.scopes,
                ttl_seconds: req.ttl_seconds,
            })
            .await
            .map_err(|s| from_server(s, "delegating"))?
            .into_inner();
        Ok(Response::new(apb::DelegateResponse {
            token: resp.token,
            expires_at: resp.expires_at,
            grant_id: grant.id,
        }))
    }

    async fn exchange(
        &self,
        request: Request<apb::ExchangeRequest>,
    ) -> Result<Response<apb::ExchangeResponse>, Status> {
        let (entries, _) = self.caller_grants(&request).await?;
        let req = request.into_inner();
        if req.token.is_empty() {
            return Err(Status::invalid_argument("token must be specified"));
        }
        // The audience picks which of the caller's identities redeems the token; the
        // server verifies the token and the binding.
        let claims = crate::svid::jwt::decode_unverified(&req.token)
            .map_err(|e| Status::invalid_argument(format!("token: {e}")))?;
        let audience: Vec<String> = match claims.get("aud") {
            Some(serde_json::Value::String(a)) => vec![a.clone()],
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            _ => Vec::new(),
        };
        // A token for another agent still goes to the server with the caller's first
        // identity, which refuses it (and says why): the binding is the server's decision.
        let entry = entries
            .iter()
            .find(|e| audience.iter().any(|a| *a == e.spiffe_id.to_string()))
            .or_else(|| entries.first())
            .ok_or_else(|| Status::permission_denied(NO_IDENTITY))?;
        let resp = self
            .client()
            .await?
            .exchange_delegation_token(npb::ExchangeDelegationTokenRequest {
                entry_id: entry.id.clone(),
                token: req.token,
            })
            .await
            .map_err(|s| from_server(s, "exchanging the delegation token"))?
            .into_inner();
        let g = resp
            .grant
            .ok_or_else(|| Status::internal("the server answered without a grant"))?;
        let reply = apb::ExchangeResponse {
            grant_id: g.id.clone(),
            spiffe_id: g.agent.clone(),
            scopes: g.scopes.clone(),
            expires_at: g.expires_at,
            grant_chain: g.grant_chain.clone(),
            principal: g.principal.clone(),
            task_id: g.task_id.clone(),
        };
        if let Some(grant) = crate::node::sync::grant_from_proto(g) {
            tracing::info!(grant = %grant.id, agent = %grant.agent, expires_at = unix_seconds(grant.expires_at), "delegated grant received by exchange");
            // The sync loop mints its SVID at its next tick.
            self.api.cache.add_grant(grant);
        }
        Ok(Response::new(reply))
    }
}
