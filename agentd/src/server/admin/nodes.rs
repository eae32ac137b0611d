//! Attested nodes: list, show, evict.

use agentd_proto::admin as pb;
use tonic::{Request, Response, Status};

use super::parse::parse_node_id;
use super::{caller_uid, AdminApi, AdminError};
use crate::audit::{Actor, AuditRecord};
use crate::datastore::AttestedNode;

fn node_to_proto(n: &AttestedNode) -> pb::Node {
    pb::Node {
        spiffe_id: n.spiffe_id.to_string(),
        attestation_type: n.attestation_type.clone(),
        serial: n.serial.clone(),
        svid_expires_at: n.svid_expires_at,
        attested_at: n.attested_at,
        last_seen_at: n.last_seen_at,
        selectors: n.selectors.iter().map(ToString::to_string).collect(),
    }
}

pub(super) async fn list(
    api: &AdminApi,
    request: Request<pb::ListNodesRequest>,
) -> Result<Response<pb::ListNodesResponse>, Status> {
    let req = request.into_inner();
    let page = super::paging::PageRequest::parse(req.page_size, &req.page_token, 1_000, 5_000)?;
    let nodes = api
        .state
        .store
        .list_nodes()
        .await
        .map_err(AdminError::from)?;
    let (nodes, next_page_token) = page.cut(
        nodes
            .iter()
            .map(|n| (n.spiffe_id.to_string(), node_to_proto(n)))
            .collect(),
    );
    Ok(Response::new(pb::ListNodesResponse {
        nodes,
        next_page_token,
    }))
}

pub(super) async fn get(
    api: &AdminApi,
    request: Request<pb::GetNodeRequest>,
) -> Result<Response<pb::Node>, Status> {
    let id = parse_node_id(&request.get_ref().spiffe_id)?;
    let node = api
        .state
        .store
        .get_node(&id)
        .await
        .map_err(AdminError::from)?
        .ok_or_else(|| AdminError::NodeNotFound(id.to_string()))?;
    Ok(Response::new(node_to_proto(&node)))
}

pub(super) async fn evict(
    api: &AdminApi,
    request: Request<pb::EvictNodeRequest>,
) -> Result<Response<pb::Node>, Status> {
    let uid = caller_uid(&request);
    let id = parse_node_id(&request.get_ref().spiffe_id)?;
    let node = api
        .state
        .store
        .delete_node(&id)
        .await
        .map_err(AdminError::from)?;
    tracing::info!(?uid, node = %node.spiffe_id, "node evicted");
    api.state
        .audit
        .record(
            AuditRecord::new("node.evict", Actor::admin(uid))
                .subject(&node.spiffe_id)
                .field("attestation_type", &node.attestation_type)
                .field("serial", &node.serial),
        )
        .await
        .map_err(AdminError::from)?;
    Ok(Response::new(node_to_proto(&node)))
}
