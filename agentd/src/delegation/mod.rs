//! Scope and delegation (DESIGN section 3): what an identity may do, and on whose behalf.
//!
//! - [`scope`]: `Scope` (`resource:action`, `resource:*`) and `ScopeSet` with a decidable
//!   subset test.
//! - [`model`]: principals, grants and chains, and the narrowing rules as pure functions.
//! - [`x509ext`]: the DER-encoded, non-critical X.509 extensions.
//! - [`claims`]: the JWT-SVID claims.
//! - [`verify`]: the relying party's verifier.

pub mod claims;
pub mod model;
pub mod scope;
pub mod verify;
pub mod x509ext;

pub use model::{
    derive_child, root_grant, ChildRequest, Delegation, GrantId, Hop, Principal, RootRequest,
    RuleError, TaskId, DEFAULT_MAX_DEPTH,
};
pub use scope::{Scope, ScopeError, ScopeSet};
pub use verify::{VerifiedIdentity, Verifier, VerifyError};
pub use x509ext::{OidBase, SvidExtension};

#[cfg(test)]
mod verify_tests;
