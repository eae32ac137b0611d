//! The records the server keeps: registration entries, attested nodes and join tokens.

use agentd_attestor::Selector;
use spiffe::SpiffeId;

use crate::ttl::Ttl;

pub use crate::model::ids::{EntryId, EntryIdError};

/// The fields an operator sets on an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntrySpec {
    pub spiffe_id: SpiffeId,
    pub parent_id: SpiffeId,
    /// Sorted and without duplicates.
    pub selectors: Vec<Selector>,
    pub x509_svid_ttl: Ttl,
    pub jwt_svid_ttl: Ttl,
    pub dns_names: Vec<String>,
    pub hint: String,
    pub scopes: Vec<String>,
    pub owner: Option<String>,
    /// Trust domains whose bundles the entry's workloads receive; sorted, no duplicates,
    /// never our own.
    pub federates_with: Vec<spiffe::TrustDomain>,
    /// What the entry may get OAuth access tokens for (RFC 8707 resources under these
    /// prefixes); sorted, no duplicates; none: no tokens.
    pub resources: Vec<crate::model::oauth::ResourcePrefix>,
}

/// A stored registration entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: EntryId,
    pub spec: EntrySpec,
    /// Bumps on every update; node agents use it to notice changes.
    pub revision: u64,
    pub created_at: i64,
}

/// A node that has attested to the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestedNode {
    pub spiffe_id: SpiffeId,
    pub attestation_type: String,
    /// Serial of the node's current SVID, lowercase hex.
    pub serial: String,
    pub svid_expires_at: i64,
    pub attested_at: i64,
    pub last_seen_at: i64,
    /// Selectors from node attestation (x509pop, claims); empty for join tokens.
    pub selectors: Vec<Selector>,
    /// Serial of the SVID before the last renewal. Still accepted, so that a node that never
    /// received its renewed SVID (a lost response, a crash before it was saved) is not locked
    /// out; cleared by a new attestation.
    pub previous_serial: Option<String>,
    /// When the SVID of `previous_serial` expires: a long-lived connection opened with it
    /// is refused after that, as one opened with the current SVID is.
    pub previous_svid_expires_at: Option<i64>,
}

/// A join token, stored by the SHA-256 of its secret so that the store never holds a usable
/// token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub token_sha256: String,
    pub spiffe_id: SpiffeId,
    pub expires_at: i64,
}

/// Filters for listing entries; `None` matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntryFilter {
    pub spiffe_id: Option<SpiffeId>,
    pub parent_id: Option<SpiffeId>,
    /// The entry has this selector among its own.
    pub selector: Option<Selector>,
    /// The entry's accountable owner is this one.
    pub owner: Option<String>,
}

impl EntryFilter {
    pub fn matches(&self, e: &Entry) -> bool {
        self.spiffe_id
            .as_ref()
            .is_none_or(|id| *id == e.spec.spiffe_id)
            && self
                .parent_id
                .as_ref()
                .is_none_or(|id| *id == e.spec.parent_id)
            && self
                .selector
                .as_ref()
                .is_none_or(|s| e.spec.selectors.contains(s))
            && self
                .owner
                .as_ref()
                .is_none_or(|o| e.spec.owner.as_ref() == Some(o))
    }
}

/// A delegation grant: `delegation.principal` authorizes the last agent of
/// `delegation.chain` (whose last hop carries this grant's id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub id: crate::delegation::GrantId,
    pub delegation: crate::delegation::Delegation,
    /// The grant this one was delegated from; None for a root grant from a principal.
    /// Lets a revocation cascade find every child.
    pub parent_grant_id: Option<crate::delegation::GrantId>,
    pub created_at: i64,
    /// Narrows the resources access tokens under this grant may be for (each must also be
    /// allowed by the agent's entry); empty: the entry's.
    pub resources: Vec<crate::model::oauth::ResourcePrefix>,
}

impl Grant {
    /// The agent this grant authorizes.
    pub fn agent(&self) -> Option<&SpiffeId> {
        self.delegation.agent()
    }
}

/// A single-use delegation offer: what a delegation token lets its audience claim. Kept
/// by the server so that the token is honoured once, and only on the terms recorded here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelegationOffer {
    /// 32 lowercase hex characters; the token's `agentd_offer` claim.
    pub id: String,
    pub parent_grant_id: crate::delegation::GrantId,
    pub from: SpiffeId,
    pub to: SpiffeId,
    pub scopes: crate::delegation::ScopeSet,
    /// When the child grant expires.
    pub expires_at: i64,
    /// When the token expires: after that the offer can never be redeemed, and is pruned.
    pub redeem_by: i64,
}

/// What one server of a shared store publishes of its CA (SPIRE's model: each server keeps
/// its own keys, the trust bundle is the union of every server's current authorities), so
/// that an SVID from any server verifies everywhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerAuthorities {
    /// The server's id (the `server.id` file in its data dir).
    pub server_id: String,
    /// DER CA certificates of its bundle (old, active, prepared; or its upstream roots).
    pub x509_authorities: Vec<Vec<u8>>,
    pub jwt_authorities: Vec<crate::bundle::JwtAuthority>,
    /// The sequence of its own bundle when it published this.
    pub sequence: u64,
    /// When it published this (unix seconds).
    pub updated_at: i64,
}
