//! The audit log: query and verify.

use agentd_proto::admin as pb;
use spiffe::SpiffeId;
use tonic::{Request, Response, Status};

use super::{invalid, AdminApi, AdminError};
use crate::audit::{AuditQuery, SealedAuditRecord};

pub fn audit_to_proto(r: &SealedAuditRecord) -> pb::AuditRecord {
    pb::AuditRecord {
        seq: r.seq,
        time: r.time,
        action: r.action.clone(),
        actor: r.actor.clone(),
        subject: r.subject.clone().unwrap_or_default(),
        fields_json: serde_json::to_string(&r.fields).unwrap_or_else(|_| "{}".into()),
        prev_hash: r.prev_hash.clone(),
        hash: r.hash.clone(),
    }
}

pub(super) async fn list(
    api: &AdminApi,
    request: Request<pb::ListAuditRecordsRequest>,
) -> Result<Response<pb::ListAuditRecordsResponse>, Status> {
    let req = request.into_inner();
    let non_empty = |s: String| (!s.is_empty()).then_some(s);
    let query = AuditQuery {
        since: (req.since != 0).then_some(req.since),
        spiffe_id: match non_empty(req.spiffe_id) {
            Some(raw) => Some(
                SpiffeId::new(&raw)
                    .map_err(|e| invalid("spiffe_id", format!("{raw:?}: {e}")))?
                    .to_string(),
            ),
            None => None,
        },
        action: non_empty(req.action),
    };
    let limit = super::paging::page_size_or(req.page_size, DEFAULT_AUDIT_PAGE, MAX_AUDIT_PAGE)?;
    let after = super::paging::sequence_token(&req.page_token)?;
    let (records, mut next) = api
        .state
        .audit
        .query_page(&query, after, limit)
        .await
        .map_err(AdminError::from)?;
    let mut out = Vec::with_capacity(records.len());
    let mut bytes = 0;
    for r in &records {
        let wire = audit_to_proto(r);
        let len = prost::Message::encoded_len(&wire) + 8;
        if !out.is_empty() && bytes + len > MAX_AUDIT_PAGE_BYTES {
            next = out.last().map(|l: &pb::AuditRecord| l.seq);
            break;
        }
        bytes += len;
        out.push(wire);
    }
    Ok(Response::new(pb::ListAuditRecordsResponse {
        records: out,
        next_page_token: next.map(|n| n.to_string()).unwrap_or_default(),
    }))
}

const DEFAULT_AUDIT_PAGE: usize = 1_000;
const MAX_AUDIT_PAGE: usize = 5_000;
/// A page stops before this many encoded bytes (clients take 4 MiB by default).
const MAX_AUDIT_PAGE_BYTES: usize = 2 << 20;

pub(super) async fn verify(
    api: &AdminApi,
    _request: Request<pb::VerifyAuditLogRequest>,
) -> Result<Response<pb::VerifyAuditLogResponse>, Status> {
    let report = api.state.audit.verify().await.map_err(AdminError::from)?;
    if let Some(p) = &report.problem {
        tracing::error!(seq = p.seq, reason = %p.reason, "audit log verification failed");
    }
    Ok(Response::new(pb::VerifyAuditLogResponse {
        intact: report.is_intact(),
        records: report.records,
        head_seq: report.head.as_ref().map_or(0, |h| h.seq),
        head_hash: report
            .head
            .as_ref()
            .map(|h| h.hash.clone())
            .unwrap_or_default(),
        first_bad_seq: report.problem.as_ref().map_or(0, |p| p.seq),
        reason: report.problem.map(|p| p.reason).unwrap_or_default(),
    }))
}
