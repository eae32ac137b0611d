//! The admin API's errors, and the one place each becomes a gRPC status.

use tonic::Status;

use crate::audit::AuditError;
use crate::datastore::DataStoreError;
use crate::revocation::log::RevocationLogError;
use crate::revocation::RevocationError;

/// Why an admin call was refused or failed; [`Status`] is made from it in one place, below.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    #[error("{field}: {reason}")]
    InvalidField { field: String, reason: String },
    #[error("entry {0} not found")]
    EntryNotFound(String),
    #[error("node {0} not found")]
    NodeNotFound(String),
    #[error("an identical entry exists: {0}")]
    DuplicateEntry(String),
    #[error("store: {0}")]
    Store(String),
    /// The datastore is down: the call did nothing; try again when it is back.
    #[error("{0}")]
    StoreUnavailable(String),
    /// The change was made but its audit record could not be written.
    #[error("audit log: {0}")]
    Audit(String),
    /// No federation relationship, or no federated bundle, for the trust domain.
    #[error("{0}")]
    FederationNotFound(String),
    /// A relationship with the trust domain exists already.
    #[error("{0}")]
    FederationExists(String),
    /// The change would leave something depending on what it removes.
    #[error("{0}")]
    InUse(String),
    #[error(transparent)]
    Revocation(#[from] RevocationError),
    #[error(transparent)]
    Ca(#[from] crate::ca::CaError),
}

impl From<RevocationLogError> for AdminError {
    fn from(e: RevocationLogError) -> Self {
        match e {
            RevocationLogError::Revocation(e) => AdminError::Revocation(e),
            RevocationLogError::Store(e) => e.into(),
            e @ RevocationLogError::NotDurable { .. } => AdminError::Store(e.to_string()),
        }
    }
}

impl From<AuditError> for AdminError {
    fn from(e: AuditError) -> Self {
        AdminError::Audit(e.to_string())
    }
}

impl From<DataStoreError> for AdminError {
    fn from(e: DataStoreError) -> Self {
        match e {
            DataStoreError::EntryNotFound { id } => AdminError::EntryNotFound(id),
            DataStoreError::NodeNotFound { spiffe_id } => AdminError::NodeNotFound(spiffe_id),
            DataStoreError::DuplicateEntry { id } => AdminError::DuplicateEntry(id),
            e @ DataStoreError::Unavailable { .. } => AdminError::StoreUnavailable(e.to_string()),
            other => AdminError::Store(other.to_string()),
        }
    }
}

impl From<AdminError> for Status {
    fn from(e: AdminError) -> Self {
        let msg = e.to_string();
        match e {
            AdminError::InvalidField { .. } => Status::invalid_argument(msg),
            AdminError::EntryNotFound(_) | AdminError::NodeNotFound(_) => Status::not_found(msg),
            AdminError::DuplicateEntry(_) | AdminError::FederationExists(_) => {
                Status::already_exists(msg)
            }
            AdminError::FederationNotFound(_) => Status::not_found(msg),
            AdminError::InUse(_) => Status::failed_precondition(msg),
            AdminError::Store(_) | AdminError::Audit(_) => Status::internal(msg),
            AdminError::StoreUnavailable(_) => Status::unavailable(msg),
            AdminError::Revocation(e) => match e {
                RevocationError::InvalidField { .. } => Status::invalid_argument(msg),
                RevocationError::AlreadyRevoked { .. } => Status::already_exists(msg),
                RevocationError::NotStanding { .. }
                | RevocationError::UnknownSerial { .. }
                | RevocationError::UnknownEntry { .. } => Status::not_found(msg),
                RevocationError::Refused(_) => Status::failed_precondition(msg),
            },
            AdminError::Ca(e) => {
                use crate::ca::CaError;
                match e {
                    CaError::UnknownAuthority { .. } => Status::not_found(msg),
                    CaError::ActiveAuthority { .. }
                    | CaError::AlreadyPrepared { .. }
                    | CaError::NothingPrepared
                    | CaError::Expired { .. } => Status::failed_precondition(msg),
                    CaError::InvalidSerial { .. } => Status::invalid_argument(msg),
                    _ => Status::internal(msg),
                }
            }
        }
    }
}

pub(super) fn invalid(field: impl Into<String>, reason: impl std::fmt::Display) -> AdminError {
    AdminError::InvalidField {
        field: field.into(),
        reason: reason.to_string(),
    }
}
