//! Workload attestors: given the peer credentials of a Workload API caller, return the
//! selectors that describe it. Selectors come only from the kernel (peer credentials, /proc),
//! never from anything the caller says about itself.

pub mod unix;

use crate::Selector;

/// The caller as the kernel reports it on the Unix socket (SO_PEERCRED).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCredentials {
    pub pid: Option<i32>,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    #[error("process {pid} exited while it was being attested")]
    ProcessGone { pid: i32 },
    #[error("reading {path}: {source}")]
    Proc {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// A workload attestor.
pub trait WorkloadAttestor: Send + Sync + std::fmt::Debug {
    /// The selector type it produces, e.g. `unix`.
    fn kind(&self) -> &'static str;

    /// Selectors for the caller.
    fn attest(&self, peer: &PeerCredentials) -> Result<Vec<Selector>, AttestError>;
}
