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
    _request: Request<pb::ListNodesRequest>,
) -> Result<Response<pb::ListNodesResponse>, Status> {
    let nodes = api
        .state
        .store
        .list_nodes()
        .await
        .map_err(AdminError::from)?;
    Ok(Response::new(pb::ListNodesResponse {
        nodes: nodes.iter().map(node_to_proto).collect(),
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
