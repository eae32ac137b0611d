//! Join tokens.

use agentd_proto::admin as pb;
use tonic::{Request, Response, Status};

use super::revocations::revocation_audit;
use super::{caller_uid, AdminApi, AdminError};
use crate::audit::{Actor, AuditRecord};
use crate::clock::unix_seconds;
use crate::datastore::JoinToken;
use crate::revocation::RevocationHandle;
use crate::server::join_token::digest as join_token_digest;

pub(super) async fn create(
    api: &AdminApi,
    request: Request<pb::CreateJoinTokenRequest>,
) -> Result<Response<pb::JoinToken>, Status> {
    let uid = caller_uid(&request);
    let req = request.into_inner();
    let spiffe_id = api.issuable_id("spiffe_id", &req.spiffe_id)?;
    let ttl = api.ttl("ttl", req.ttl_seconds, api.state.config.join_token_ttl)?;
    // A new token for a revoked node is the operator re-admitting it: the revocation is
    // lifted (a lift event is logged), so the node can attest with this token. Tokens
    // made before the revocation stay refused while it stands.
    let now_secs = unix_seconds(api.state.clock.now());
    if let Some(sequence) = api
        .state
        .revocations
        .standing(&RevocationHandle::Node(spiffe_id.clone()))
    {
        let lift = api
            .state
            .revocations
            .lift(
                sequence,
                "a new join token was generated for the node",
                now_secs,
            )
            .await
            .map_err(AdminError::from)?;
        api.state
            .audit
            .record(
                revocation_audit(
                    AuditRecord::new("revocation.lift", Actor::admin(uid)),
                    &lift,
                )
                .field("lifts", sequence),
            )
            .await
            .map_err(AdminError::from)?;
        tracing::info!(?uid, node = %spiffe_id, revocation = sequence, "node revocation lifted by a new join token");
    }
    // 128 random bits from the system CSPRNG.
    let token = hex::encode(rand::random::<[u8; 16]>());
    let expires_at = unix_seconds(api.state.clock.now()) + ttl.as_secs() as i64;
    api.state
        .store
        .create_join_token(JoinToken {
            token_sha256: join_token_digest(&token),
            spiffe_id: spiffe_id.clone(),
            expires_at,
        })
        .await
        .map_err(AdminError::from)?;
    tracing::info!(?uid, %spiffe_id, expires_at, "join token created");
    // The token itself is never recorded: the log is readable by every admin.
    api.state
        .audit
        .record(
            AuditRecord::new("join_token.create", Actor::admin(uid))
                .subject(&spiffe_id)
                .field("expires_at", expires_at)
                .field("ttl", ttl.as_secs()),
        )
        .await
        .map_err(AdminError::from)?;
    Ok(Response::new(pb::JoinToken {
        token,
        spiffe_id: spiffe_id.to_string(),
        expires_at,
    }))
}
