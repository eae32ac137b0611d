//! The node API's errors, and the one place each becomes a gRPC status and a metric label.

use agentd_attestor::node::{ClaimsError, X509PopError};
use tonic::Status;

use crate::audit::AuditError;
use crate::ca::CaError;
use crate::datastore::DataStoreError;
use crate::telemetry::AttestationFailure;

/// Why a node API call was refused or failed. Mapped to a gRPC status once, below, and to an
/// attestation-failure metric label once, in [`attestation_failure`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeApiError {
    #[error("no client certificate: only Attest may be called without a node SVID")]
    NoClientCertificate,
    #[error("node {0} is not attested (evicted, or never attested): attest again")]
    UnknownNode(String),
    #[error("node {spiffe_id}: certificate serial {presented} is not the node's current SVID (evicted and re-attested, or not a node SVID)")]
    StaleNodeSvid {
        spiffe_id: String,
        presented: String,
    },
    /// A node SVID (current, or the one before the last renewal) past its expiry, on a
    /// connection opened while it was valid.
    #[error("node {spiffe_id}: certificate serial {presented} expired at {expired_at}: reconnect with the current node SVID, or attest again")]
    NodeSvidExpired {
        spiffe_id: String,
        presented: String,
        expired_at: i64,
    },
    #[error("join token not found or already used")]
    UnknownJoinToken,
    #[error("join token expired")]
    ExpiredJoinToken,
    #[error("{field}: {reason}")]
    InvalidField { field: &'static str, reason: String },
    #[error("node attestor {0} is not enabled on this server")]
    AttestorNotEnabled(&'static str),
    #[error("x509pop: {0}")]
    X509Pop(#[from] X509PopError),
    #[error("claims: {0}")]
    Claims(#[from] ClaimsError),
    #[error("node {spiffe_id} was attested with {existing}, not {presented}: evict it first")]
    AttestationTypeMismatch {
        spiffe_id: String,
        existing: String,
        presented: &'static str,
    },
    #[error("entry {0} is not served by this node")]
    EntryNotAuthorized(String),
    #[error("node {spiffe_id} is revoked (revocation {sequence}): lift the revocation or generate a new join token for it")]
    NodeRevoked { spiffe_id: String, sequence: u64 },
    #[error("entry {id} is revoked (revocation {sequence})")]
    EntryRevoked { id: String, sequence: u64 },
    #[error("certificate serial {serial} is revoked")]
    SvidRevoked { serial: String },
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Store(#[from] DataStoreError),
    #[error("entry {entry} is suspended: its owner {owner} is disabled")]
    EntrySuspended { entry: String, owner: String },
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error(transparent)]
    Grant(#[from] crate::server::grants::GrantError),
    /// A source made more `Attest`/`X509PopChallenge` calls than its budget
    /// (`[node_api] attest_requests_per_source_per_minute`).
    #[error("too many attestation requests from {address}; retry later")]
    RateLimited { address: String },
}

impl From<NodeApiError> for Status {
    fn from(e: NodeApiError) -> Self {
        let msg = e.to_string();
        match e {
            NodeApiError::NoClientCertificate => Status::unauthenticated(msg),
            NodeApiError::UnknownNode(_)
            | NodeApiError::StaleNodeSvid { .. }
            | NodeApiError::NodeSvidExpired { .. }
            | NodeApiError::UnknownJoinToken
            | NodeApiError::ExpiredJoinToken
            | NodeApiError::EntryNotAuthorized(_)
            | NodeApiError::EntrySuspended { .. }
            | NodeApiError::NodeRevoked { .. }
            | NodeApiError::EntryRevoked { .. }
            | NodeApiError::SvidRevoked { .. } => Status::permission_denied(msg),
            NodeApiError::InvalidField { .. } => Status::invalid_argument(msg),
            NodeApiError::AttestorNotEnabled(_) => Status::failed_precondition(msg),
            NodeApiError::X509Pop(X509PopError::Busy)
            | NodeApiError::Claims(ClaimsError::Busy)
            | NodeApiError::RateLimited { .. } => Status::resource_exhausted(msg),
            NodeApiError::Claims(ClaimsError::Store { .. }) => {
                // The caller is not authenticated yet: the store's error stays in the log.
                tracing::error!(error = %msg, "node API internal error");
                Status::internal("claims attestation: the server could not record the token's id")
            }
            NodeApiError::X509Pop(e) if e.is_malformed() => Status::invalid_argument(msg),
            NodeApiError::Claims(e) if e.is_malformed() => Status::invalid_argument(msg),
            NodeApiError::X509Pop(_)
            | NodeApiError::Claims(_)
            | NodeApiError::AttestationTypeMismatch { .. } => Status::permission_denied(msg),
            NodeApiError::Ca(CaError::Csr { .. })
            | NodeApiError::Ca(CaError::ForeignTrustDomain { .. }) => Status::invalid_argument(msg),
            // The database is out of reach: nothing was written, and another server of the
            // same database may answer (the node agent moves on to the next address).
            NodeApiError::Store(DataStoreError::Unavailable { .. })
            | NodeApiError::Audit(AuditError::Store(DataStoreError::Unavailable { .. })) => {
                tracing::warn!(error = %msg, "node API call refused: the datastore is unreachable");
                Status::unavailable(msg)
            }
            NodeApiError::Ca(_) | NodeApiError::Store(_) | NodeApiError::Audit(_) => {
                tracing::error!(error = %msg, "node API internal error");
                Status::internal(msg)
            }
            NodeApiError::Grant(g) => g.into(),
        }
    }
}

/// The metric label for a refused attestation: a fixed reason, never the error text.
pub(super) fn attestation_failure(e: &NodeApiError) -> AttestationFailure {
    match e {
        NodeApiError::UnknownJoinToken => AttestationFailure::UnknownJoinToken,
        NodeApiError::ExpiredJoinToken => AttestationFailure::ExpiredJoinToken,
        NodeApiError::AttestorNotEnabled(_) => AttestationFailure::AttestorNotEnabled,
        NodeApiError::X509Pop(X509PopError::Busy)
        | NodeApiError::Claims(ClaimsError::Busy)
        | NodeApiError::RateLimited { .. } => AttestationFailure::Busy,
        NodeApiError::Claims(ClaimsError::Store { .. }) => AttestationFailure::Internal,
        NodeApiError::X509Pop(e) if e.is_malformed() => AttestationFailure::InvalidRequest,
        NodeApiError::Claims(e) if e.is_malformed() => AttestationFailure::InvalidRequest,
        NodeApiError::X509Pop(_) | NodeApiError::Claims(_) => AttestationFailure::EvidenceRejected,
        NodeApiError::InvalidField {
            field: "spiffe_id", ..
        }
        | NodeApiError::AttestationTypeMismatch { .. } => AttestationFailure::IdentityConflict,
        NodeApiError::InvalidField { .. }
        | NodeApiError::Ca(CaError::Csr { .. })
        | NodeApiError::Ca(CaError::ForeignTrustDomain { .. }) => {
            AttestationFailure::InvalidRequest
        }
        NodeApiError::NodeRevoked { .. } => AttestationFailure::Revoked,
        NodeApiError::Grant(_)
        | NodeApiError::NoClientCertificate
        | NodeApiError::UnknownNode(_)
        | NodeApiError::StaleNodeSvid { .. }
        | NodeApiError::NodeSvidExpired { .. }
        | NodeApiError::EntryNotAuthorized(_)
        | NodeApiError::EntryRevoked { .. }
        | NodeApiError::SvidRevoked { .. }
        | NodeApiError::EntrySuspended { .. }
        | NodeApiError::Audit(_)
        | NodeApiError::Ca(_)
        | NodeApiError::Store(_) => AttestationFailure::Internal,
    }
}

impl From<crate::svid::audience::AudienceError> for NodeApiError {
    fn from(e: crate::svid::audience::AudienceError) -> Self {
        NodeApiError::InvalidField {
            field: "audience",
            reason: e.reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_datastore_is_unavailable_and_other_store_errors_internal() {
        let down = || DataStoreError::Unavailable {
            reason: "connection refused".into(),
        };
        for e in [
            NodeApiError::Store(down()),
            NodeApiError::Audit(AuditError::Store(down())),
        ] {
            let status = Status::from(e);
            assert_eq!(status.code(), tonic::Code::Unavailable);
            assert!(
                status.message().contains("nothing was written"),
                "{status:?}"
            );
        }
        let corrupt = NodeApiError::Store(DataStoreError::Corrupt {
            key: "k".into(),
            reason: "r".into(),
        });
        assert_eq!(Status::from(corrupt).code(), tonic::Code::Internal);
    }
}
