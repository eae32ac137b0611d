//! Delegation grants made by an operator.

use agentd_proto::admin as pb;
use spiffe::SpiffeId;
use tonic::{Request, Response, Status};

use super::{caller_uid, invalid, AdminApi, AdminError};
use crate::audit::{Actor, AuditRecord};
use crate::clock::unix_seconds;
use crate::revocation::{RevocationError, RevocationHandle};

pub(super) async fn create(
    api: &AdminApi,
    request: Request<pb::CreateGrantRequest>,
) -> Result<Response<pb::Grant>, Status> {
    let uid = caller_uid(&request);
    let req = request.into_inner();
    // A revoked task gets no new grants while its revocation stands.
    if !req.task_id.is_empty() {
        if let Some(sequence) = api
            .state
            .revocations
            .standing(&RevocationHandle::Task(req.task_id.clone()))
        {
            return Err(AdminError::from(RevocationError::Refused(format!(
                "task {} is revoked (revocation {sequence})",
                req.task_id
            )))
            .into());
        }
    }
    let grant = crate::server::grants::create_root_grant(&api.state, req).await?;
    tracing::info!(?uid, grant = %grant.id, principal = %grant.delegation.principal, agent = ?grant.agent().map(ToString::to_string), scopes = %grant.delegation.scopes, expires_at = grant.delegation.expires_at, "grant created");
    api.state
        .audit
        .record(crate::server::grants::grant_audit(
            AuditRecord::new("grant.create", Actor::admin(uid)),
            &grant,
        ))
        .await
        .map_err(AdminError::from)?;
    Ok(Response::new(crate::server::grants::grant_to_admin_proto(
        &grant,
    )))
}

pub(super) async fn get(
    api: &AdminApi,
    request: Request<pb::GetGrantRequest>,
) -> Result<Response<pb::Grant>, Status> {
    let id = crate::server::grants::parse_grant_id(&request.get_ref().id)?;
    let grant = crate::server::grants::load_grant(api.state.store.as_ref(), &id).await?;
    Ok(Response::new(crate::server::grants::grant_to_admin_proto(
        &grant,
    )))
}

pub(super) async fn list(
    api: &AdminApi,
    request: Request<pb::ListGrantsRequest>,
) -> Result<Response<pb::ListGrantsResponse>, Status> {
    let req = request.into_inner();
    let agent = if req.agent.is_empty() {
        None
    } else {
        Some(
            SpiffeId::new(&req.agent)
                .map_err(|e| invalid("agent", format!("{:?}: {e}", req.agent)))?,
        )
    };
    let page = super::paging::PageRequest::parse(req.page_size, &req.page_token, 1_000, 5_000)?;
    let now = unix_seconds(api.state.clock.now());
    let store = api.state.store.as_ref();
    let grants = match &agent {
        Some(a) => store.list_grants_for_agent(a).await,
        None => store.list_grants().await,
    }
    .map_err(AdminError::from)?
    .into_iter()
    .filter(|g| req.include_expired || g.delegation.expires_at > now)
    .map(|g| {
        let key = format!(
            "{}\t{}",
            g.agent().map(ToString::to_string).unwrap_or_default(),
            g.id
        );
        (key, crate::server::grants::grant_to_admin_proto(&g))
    })
    .collect();
    let (grants, next_page_token) = page.cut(grants);
    Ok(Response::new(pb::ListGrantsResponse {
        grants,
        next_page_token,
    }))
}
