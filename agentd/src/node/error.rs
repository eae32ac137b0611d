//! The node agent's errors.

use super::identity::IdentityError;
use crate::keys::KeyError;
use crate::tls::TlsError;

/// Why the node agent could not start or keep running.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    #[error("no node identity in {data_dir}: pass --join-token, or configure [node_attestor.x509pop] (--x509pop-cert/--x509pop-key) or [node_attestor.claims] (--claims-token-file) to attest this node")]
    /// No stored node SVID and no way to attest.
    NoIdentity { data_dir: String },
    #[error("no way to authenticate the server: pass --trust-bundle FILE (or --insecure-bootstrap for a trial)")]
    /// No trust bundle and no insecure bootstrap: the server cannot be authenticated.
    NoBootstrap,
    #[error("trust bundle {path}: {reason}")]
    /// The trust bundle file could not be read or parsed.
    TrustBundle { path: String, reason: String },
    #[error("node attestation failed: {0}")]
    /// Node attestation was refused or failed.
    Attestation(String),
    #[error("server: {0}")]
    /// The server answered with an error.
    Server(String),
    #[error("server refused: {0}")]
    /// The server refused this node (PermissionDenied, Unauthenticated).
    Refused(String),
    #[error("{what} {path}: {source}")]
    /// A file or socket could not be used.
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("node attestation: {0}")]
    /// The node attestor could not produce its evidence.
    Attestor(#[from] agentd_attestor::node::agent::NodeAttestorError),
    #[error(transparent)]
    /// The stored node identity is unusable.
    Identity(#[from] IdentityError),
    #[error(transparent)]
    /// A key could not be generated, read or written.
    Key(#[from] KeyError),
    #[error(transparent)]
    /// TLS configuration failed.
    Tls(#[from] TlsError),
    #[error(transparent)]
    /// A component of the node agent failed.
    Task(#[from] crate::runtime::TaskFailed),
    #[error(transparent)]
    /// The metrics endpoint failed.
    Metrics(#[from] crate::telemetry::EndpointError),
}

impl NodeError {
    pub fn from_status(s: tonic::Status) -> Self {
        match s.code() {
            tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => {
                NodeError::Refused(s.message().to_string())
            }
            _ => NodeError::Server(format!("{:?}: {}", s.code(), s.message())),
        }
    }
}
