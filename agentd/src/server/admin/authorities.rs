//! CA authorities: list, prepare, activate.

use agentd_proto::admin as pb;
use tonic::{Request, Response, Status};

use super::{caller_uid, AdminApi, AdminError};
use crate::clock::unix_seconds;

/// An authority for the admin API.
pub fn authority_to_proto(a: &crate::ca::AuthorityInfo) -> pb::Authority {
    pb::Authority {
        id: a.id.clone(),
        kind: a.kind.to_string(),
        state: a.state.to_string(),
        not_before: a.not_before.map(unix_seconds).unwrap_or(0),
        not_after: unix_seconds(a.not_after),
    }
}

impl AdminApi {
    pub(super) fn authorities_response(
        &self,
        list: &[crate::ca::AuthorityInfo],
    ) -> pb::Authorities {
        pb::Authorities {
            authorities: list.iter().map(authority_to_proto).collect(),
            bundle_sequence: self.state.ca.bundle().sequence,
        }
    }

    /// Runs a blocking CA change (key generation, fsynced writes) off the async workers.
    pub(super) async fn ca_change<F>(
        &self,
        f: F,
    ) -> Result<Vec<crate::ca::AuthorityInfo>, AdminError>
    where
        F: FnOnce(
                &crate::ca::CertificateAuthority,
                std::time::SystemTime,
            ) -> Result<Vec<crate::ca::AuthorityInfo>, crate::ca::CaError>
            + Send
            + 'static,
    {
        let ca = self.state.ca.clone();
        let now = self.state.clock.now();
        tokio::task::spawn_blocking(move || f(&ca, now))
            .await
            .map_err(|e| AdminError::Store(format!("CA task: {e}")))?
            .map_err(AdminError::from)
    }
}

pub(super) async fn list(
    api: &AdminApi,
    _request: Request<pb::ListAuthoritiesRequest>,
) -> Result<Response<pb::Authorities>, Status> {
    Ok(Response::new(
        api.authorities_response(&api.state.ca.authorities()),
    ))
}

pub(super) async fn prepare(
    api: &AdminApi,
    request: Request<pb::PrepareAuthorityRequest>,
) -> Result<Response<pb::Authorities>, Status> {
    let uid = caller_uid(&request);
    let prepared = api.ca_change(|ca, now| ca.prepare(now)).await?;
    tracing::info!(?uid, ids = ?prepared.iter().map(|a| &a.id).collect::<Vec<_>>(), "authorities prepared");
    Ok(Response::new(api.authorities_response(&prepared)))
}

pub(super) async fn activate(
    api: &AdminApi,
    request: Request<pb::ActivateAuthorityRequest>,
) -> Result<Response<pb::Authorities>, Status> {
    let uid = caller_uid(&request);
    let activated = api.ca_change(|ca, now| ca.activate(now)).await?;
    tracing::info!(?uid, ids = ?activated.iter().map(|a| &a.id).collect::<Vec<_>>(), "authorities activated");
    Ok(Response::new(api.authorities_response(&activated)))
}
