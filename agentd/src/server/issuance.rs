//! Issuance bookkeeping shared by every mint path: the record each issued SVID leaves (what
//! revocation handles resolve to), its audit record, and the entry activity statistics.
//! Signing itself is the CA's; then a workload mint's issuance records and audit records go
//! in one durable write (`Audit::record_issuance`), which the entry's activity (its live
//! SVIDs, `last_issued`) derives from: nothing is handed out that is not on record first.
//! Node SVIDs and delegation tokens are recorded with [`record_issued`].

use crate::audit::{Actor, AuditRecord};
use crate::ca::IssuedX509Svid;
use crate::clock::unix_seconds;
use crate::datastore::{AttestedNode, DataStore, DataStoreError, Entry, Grant};
use crate::revocation::{IssuedSvid, SvidKind};

/// The grant ids of every hop (root first) and the task of a delegated SVID; empty for a
/// plain one. What a grant or task revocation finds it by.
pub fn grant_lineage(grant: Option<&Grant>) -> (Vec<String>, Option<String>) {
    match grant {
        Some(g) => (
            g.delegation
                .chain
                .iter()
                .map(|h| h.grant_id.to_string())
                .collect(),
            g.delegation.task_id.as_ref().map(ToString::to_string),
        ),
        None => (Vec::new(), None),
    }
}

/// The issuance record of a node SVID: the node itself is its node.
pub fn node_svid_record(svid: &IssuedX509Svid) -> IssuedSvid {
    IssuedSvid {
        kind: SvidKind::Node,
        id: svid.serial.clone(),
        spiffe_id: svid.spiffe_id.to_string(),
        entry_id: None,
        node_id: Some(svid.spiffe_id.clone()),
        grant_chain: vec![],
        task_id: None,
        authority_id: svid.authority_id.clone(),
        expires_at: unix_seconds(svid.not_after),
        derived_from: None,
    }
}

/// The issuance record of a workload X.509-SVID minted for `entry` on `node`.
pub fn x509_svid_record(
    svid: &IssuedX509Svid,
    entry: &Entry,
    node: &AttestedNode,
    grant_chain: Vec<String>,
    task_id: Option<String>,
) -> IssuedSvid {
    IssuedSvid {
        kind: SvidKind::X509,
        id: svid.serial.clone(),
        spiffe_id: svid.spiffe_id.to_string(),
        entry_id: Some(entry.id.to_string()),
        node_id: Some(node.spiffe_id.clone()),
        grant_chain,
        task_id,
        authority_id: svid.authority_id.clone(),
        expires_at: unix_seconds(svid.not_after),
        derived_from: None,
    }
}

/// The issuance record of a workload JWT-SVID (by `jti`) minted for `entry` on `node`.
pub fn jwt_svid_record(
    jwt: &crate::ca::IssuedJwtSvid,
    entry: &Entry,
    node: &AttestedNode,
    grant_chain: Vec<String>,
    task_id: Option<String>,
) -> IssuedSvid {
    IssuedSvid {
        kind: SvidKind::Jwt,
        id: jwt.jti.clone(),
        spiffe_id: entry.spec.spiffe_id.to_string(),
        entry_id: Some(entry.id.to_string()),
        node_id: Some(node.spiffe_id.clone()),
        grant_chain,
        task_id,
        authority_id: jwt.key_id.clone(),
        expires_at: unix_seconds(jwt.expires_at),
        derived_from: None,
    }
}

/// Records issued SVIDs so that revocation handles find them. Issuing fails if this fails:
/// an SVID nobody could revoke by entry, node or grant is not handed out.
pub async fn record_issued(
    store: &dyn DataStore,
    svids: &[IssuedSvid],
) -> Result<(), DataStoreError> {
    if svids.is_empty() {
        return Ok(());
    }
    store.record_issued(svids).await
}

/// The fields every issuance record carries.
pub fn audit_record(
    action: &str,
    node: &AttestedNode,
    entry: &Entry,
    expires_at: i64,
) -> AuditRecord {
    AuditRecord::new(action, Actor::from(&node.spiffe_id))
        .subject(&entry.spec.spiffe_id)
        .field("entry", entry.id.as_str())
        .field("node", node.spiffe_id.to_string())
        .field("scopes", &entry.spec.scopes)
        .field("owner", &entry.spec.owner)
        .field("expires_at", expires_at)
}
