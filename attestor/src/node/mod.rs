//! Node attestors: how a node agent proves to the server which machine it runs on.
//!
//! The server's halves, beyond join tokens (which the server checks against its own store):
//! [`x509pop`] (proof of possession of a certificate's key, challenge-response) and
//! [`claims`] (a platform-issued JWT checked against a JWKS file). Each returns the node's
//! SPIFFE ID, derived from a configured [`template`] so that the same machine always gets the
//! same ID, and the selectors it was attested with.
//!
//! The node agent's half is [`agent`]: which attestor to use and the material each sends.
//!
//! Nothing here keeps time or knows the server's own namespace: every check takes the
//! current time from its caller, and templates are given the path prefix the server keeps
//! for itself ([`IdTemplate::parse`]).

pub mod agent;
pub mod claims;
pub mod seen;
pub mod template;
#[cfg(any(test, feature = "test-support"))]
#[doc(hidden)]
pub mod test_support;
pub mod x509pop;

use std::time::{SystemTime, UNIX_EPOCH};

use spiffe::{SpiffeId, TrustDomain};

use crate::Selector;

pub use claims::{ClaimsAttestor, ClaimsConfig, ClaimsError};
pub use seen::{MemorySeenTokens, SeenError, SeenTokens};
pub use template::{IdTemplate, TemplateError};
pub use x509pop::{X509PopAttestor, X509PopConfig, X509PopError};

/// What a node attestor established about a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAttestation {
    pub spiffe_id: SpiffeId,
    /// `x509pop` or `claims`; stored on the node record.
    pub attestation_type: &'static str,
    /// Sorted, without duplicates.
    pub selectors: Vec<Selector>,
}

/// The node attestors this server has enabled (join tokens are always on).
#[derive(Debug, Default)]
pub struct NodeAttestors {
    pub x509pop: Option<X509PopAttestor>,
    pub claims: Option<ClaimsAttestor>,
}

/// Node attestor settings from the server config.
#[derive(Debug, Clone, Default)]
pub struct NodeAttestorsConfig {
    pub x509pop: Option<X509PopConfig>,
    pub claims: Option<ClaimsConfig>,
}

impl NodeAttestors {
    pub fn new(config: &NodeAttestorsConfig, trust_domain: &TrustDomain) -> Self {
        Self {
            x509pop: config
                .x509pop
                .clone()
                .map(|c| X509PopAttestor::new(c, trust_domain.clone())),
            claims: config
                .claims
                .clone()
                .map(|c| ClaimsAttestor::new(c, trust_domain.clone())),
        }
    }

    /// Remembers the claims attestor's token ids in `seen` (kept across restarts) instead of
    /// in memory.
    pub fn with_seen_tokens(mut self, seen: Option<std::sync::Arc<dyn SeenTokens>>) -> Self {
        if let (Some(seen), Some(claims)) = (seen, self.claims.take()) {
            self.claims = Some(claims.with_seen_tokens(seen));
        }
        self
    }
}

/// Seconds since the Unix epoch (negative before it), as certificates and JWT claims carry
/// them.
fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}
