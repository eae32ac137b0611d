//! Revocations (the kill switch), their lifts and list, and the CRLs.

use std::collections::BTreeSet;

use agentd_proto::admin as pb;
use agentd_proto::revocation as rpb;
use tonic::{Request, Response, Status};

use super::{caller_uid, invalid, AdminApi, AdminError};
use crate::audit::{Actor, AuditRecord};
use crate::clock::unix_seconds;
use crate::datastore::DataStoreError;
use crate::revocation::{event_summary_to_proto, RevocationError, RevocationHandle};
use crate::server::crl::current_crls;

/// The audit fields describing a revocation event.
pub(super) fn revocation_audit(
    record: AuditRecord,
    e: &crate::revocation::RevocationEvent,
) -> AuditRecord {
    record
        .field("sequence", e.sequence)
        .field("kind", e.handle.kind())
        .field("id", e.handle.id())
        .field("reason", &e.reason)
        .field(
            "serials",
            e.serials
                .iter()
                .map(|s| s.serial.clone())
                .collect::<Vec<_>>(),
        )
        .field("jwt_ids", &e.jwt_ids)
}

pub(super) async fn revoke(
    api: &AdminApi,
    request: Request<pb::RevokeRequest>,
) -> Result<Response<agentd_proto::revocation::RevocationEvent>, Status> {
    let uid = caller_uid(&request);
    let req = request.into_inner();
    let raw = req.handle.ok_or_else(|| invalid("handle", "is required"))?;
    let handle = RevocationHandle::parse(&raw.kind, &raw.id).map_err(AdminError::from)?;
    // Every input is checked before any effect: an authority leaves the bundle below, before
    // the log is written, so a bad reason must be refused here.
    crate::revocation::check_reason(&req.reason).map_err(AdminError::from)?;
    let now = unix_seconds(api.state.clock.now());
    // Whose child entries the event covers too: a node-set alias (by its entry, or named as
    // a node) gives entries to every node in its set, and revoking it takes them all back
    // (see `membership::alias_revoked`). For a real node the children are its own entries,
    // whose SVIDs the node handle covers anyway.
    let mut children_of = None;
    match &handle {
        RevocationHandle::Entry(id) => {
            let entry = api.load_entry(id).await?;
            let server_id = crate::tls::server_spiffe_id(&api.state.config.trust_domain);
            if crate::server::membership::is_alias(&server_id, &entry) {
                children_of = Some(entry.spec.spiffe_id);
            }
        }
        RevocationHandle::Node(id) => children_of = Some(id.clone()),
        RevocationHandle::Authority(id) => {
            // Out of the bundle first (refused for the active authority or an unknown
            // id, with nothing logged); then the log resolves and pushes what it signed,
            // which node agents mint again under the active authority.
            // A node authenticates to the server with its node SVID: removing the CA
            // that signed a live one would lock that node out. Node agents move to the
            // active authority at their next renewal (half their TTL).
            let now_secs = unix_seconds(api.state.clock.now());
            let nodes: BTreeSet<String> = api
                .state
                .store
                .list_issued_covered(std::slice::from_ref(&handle), now_secs)
                .await
                .map_err(AdminError::from)?
                .into_iter()
                .filter(|s| s.kind == crate::revocation::SvidKind::Node)
                .map(|s| s.spiffe_id)
                .collect();
            if !nodes.is_empty() {
                return Err(AdminError::from(RevocationError::Refused(format!(
                    "authority {id} still signs the node SVIDs of {} node(s) ({}): they move to the active authority when they renew (at half the node SVID TTL); revoke it after that, or revoke those nodes",
                    nodes.len(),
                    nodes.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
                )))
                .into());
            }
            api.state
                .ca
                .revoke_authority(id, api.state.clock.now())
                .map_err(AdminError::from)?;
        }
        _ => {}
    }
    let event = api
        .state
        .revocations
        .revoke_cascading(handle.clone(), &req.reason, now, children_of.as_ref())
        .await
        .map_err(AdminError::from)?;
    if let RevocationHandle::Node(id) = &handle {
        // The kill switch: the node's record goes, so it must attest again, and while the
        // revocation stands it may not (see node_api::check_node_not_revoked).
        match api.state.store.delete_node(id).await {
            Ok(_) | Err(DataStoreError::NodeNotFound { .. }) => {}
            Err(e) => return Err(AdminError::from(e).into()),
        }
    }
    tracing::info!(?uid, sequence = event.sequence, %handle, reason = %event.reason, svids = event.serials.len(), jwts = event.jwt_ids.len(), "revoked");
    {
        use crate::telemetry::RevocationHandle as Kind;
        api.state.metrics.revoked(match &handle {
            RevocationHandle::Svid(_) => Kind::Svid,
            RevocationHandle::Entry(_) => Kind::Entry,
            RevocationHandle::Node(_) => Kind::Node,
            RevocationHandle::Grant(_) => Kind::Grant,
            RevocationHandle::Task(_) => Kind::Task,
            RevocationHandle::Authority(_) => Kind::Authority,
        });
    }
    api.state
        .audit
        .record(revocation_audit(
            AuditRecord::new("revocation.create", Actor::admin(uid)),
            &event,
        ))
        .await
        .map_err(AdminError::from)?;
    Ok(Response::new(event_summary_to_proto(
        &event,
        LISTED_PER_EVENT,
    )))
}

pub(super) async fn lift(
    api: &AdminApi,
    request: Request<pb::LiftRevocationRequest>,
) -> Result<Response<agentd_proto::revocation::RevocationEvent>, Status> {
    let uid = caller_uid(&request);
    let req = request.into_inner();
    if req.sequence == 0 {
        return Err(invalid("sequence", "is required").into());
    }
    let event = api
        .state
        .revocations
        .lift(
            req.sequence,
            &req.reason,
            unix_seconds(api.state.clock.now()),
        )
        .await
        .map_err(AdminError::from)?;
    tracing::info!(?uid, sequence = event.sequence, lifted = req.sequence, handle = %event.handle, "revocation lifted");
    api.state
        .audit
        .record(
            revocation_audit(
                AuditRecord::new("revocation.lift", Actor::admin(uid)),
                &event,
            )
            .field("lifts", req.sequence),
        )
        .await
        .map_err(AdminError::from)?;
    Ok(Response::new(event_summary_to_proto(
        &event,
        LISTED_PER_EVENT,
    )))
}

/// Serials (and JWT ids) an admin answer lists per event; the rest are counted.
const LISTED_PER_EVENT: usize = 1_000;
const DEFAULT_REVOCATION_PAGE: usize = 500;
const MAX_REVOCATION_PAGE: usize = 1_000;
/// A page stops before this many encoded bytes (clients take 4 MiB by default).
const MAX_REVOCATION_PAGE_BYTES: usize = 2 << 20;

pub(super) async fn list(
    api: &AdminApi,
    request: Request<pb::ListRevocationsRequest>,
) -> Result<Response<pb::ListRevocationsResponse>, Status> {
    use prost::Message;
    let req = request.into_inner();
    let size =
        super::paging::page_size_or(req.page_size, DEFAULT_REVOCATION_PAGE, MAX_REVOCATION_PAGE)?;
    let after = super::paging::sequence_token(&req.page_token)?;
    let log = &api.state.revocations;
    let head = log.head();
    let mut events = Vec::new();
    let mut bytes = 0;
    let mut next = None;
    for e in log.list(req.all).iter().filter(|e| e.sequence > after) {
        let wire = event_summary_to_proto(e, LISTED_PER_EVENT);
        let len = wire.encoded_len() + 8;
        if events.len() >= size || (!events.is_empty() && bytes + len > MAX_REVOCATION_PAGE_BYTES) {
            next = events
                .last()
                .map(|l: &agentd_proto::revocation::RevocationEvent| l.sequence.to_string());
            break;
        }
        bytes += len;
        events.push(wire);
    }
    Ok(Response::new(pb::ListRevocationsResponse {
        events,
        head_sequence: head,
        next_page_token: next.unwrap_or_default(),
    }))
}

pub(super) async fn crls(
    api: &AdminApi,
    _request: Request<rpb::FetchCrlsRequest>,
) -> Result<Response<rpb::FetchCrlsResponse>, Status> {
    let crls = current_crls(&api.state).map_err(AdminError::from)?;
    Ok(Response::new(rpb::FetchCrlsResponse { crls }))
}
