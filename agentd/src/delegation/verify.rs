//! The verifier a relying party (a tool server, an MCP server) calls with a peer's
//! X.509-SVID chain or a JWT-SVID and the trust bundle. It checks the chain or signature,
//! expiry and trust domain, reads the scope and delegation extensions or claims, and
//! answers "who is this, on whose behalf, through which agents, and may it do X?".
//!
//! How to decide (docs/delegation.md, "Relying parties"): the top-level scopes and the
//! current actor (the SVID's SPIFFE ID, the last hop) decide; the earlier chain is for
//! audit. A bare SPIFFE ID with no scope authorizes no tool.

use std::sync::Arc;
use std::time::SystemTime;

use rustls::pki_types::{CertificateDer, UnixTime};
use serde_json::{json, Value};
use spiffe::SpiffeId;

use super::claims::{self, ClaimError};
use super::model::{Delegation, Principal, TaskId};
use super::scope::{Scope, ScopeSet};
use super::x509ext::{self, ExtensionError, OidBase};
use crate::bundle::Bundle;
use crate::clock::unix_seconds;
use crate::svid::jwt::JwtError;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("malformed SVID: {reason}")]
    Malformed { reason: String },
    #[error("untrusted: {reason}")]
    Untrusted { reason: String },
    #[error("expired: {reason}")]
    Expired { reason: String },
    #[error("not yet valid: {reason}")]
    NotYetValid { reason: String },
    #[error("{spiffe_id} is not in trust domain {trust_domain}")]
    ForeignTrustDomain {
        spiffe_id: String,
        trust_domain: String,
    },
    #[error("JWT-SVID: {0}")]
    Jwt(#[from] JwtError),
    #[error(transparent)]
    Extension(#[from] ExtensionError),
    #[error(transparent)]
    Claims(#[from] ClaimError),
    #[error("revoked: {reason}")]
    Revoked { reason: String },
    #[error("scope {scope} not held by {spiffe_id} (holds: {held})")]
    ScopeNotHeld {
        scope: String,
        spiffe_id: String,
        held: String,
    },
}

fn malformed(reason: impl std::fmt::Display) -> VerifyError {
    VerifyError::Malformed {
        reason: reason.to_string(),
    }
}

/// Which document an identity came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SvidKind {
    X509,
    Jwt,
}

/// What a verified SVID says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedIdentity {
    pub kind: SvidKind,
    /// The current actor: the agent presenting the SVID.
    pub spiffe_id: SpiffeId,
    /// X.509 only: the certificate serial, lowercase hex.
    pub serial: Option<String>,
    /// JWT only: the token's `jti`, the handle its revocation events list it by.
    pub jti: Option<String>,
    /// Unix seconds.
    pub expires_at: i64,
    /// The scopes the identity holds (empty: no tool at all).
    pub scopes: ScopeSet,
    /// Present when the SVID acts for a principal under a grant.
    pub delegation: Option<Delegation>,
}

impl VerifiedIdentity {
    pub fn principal(&self) -> Option<&Principal> {
        self.delegation.as_ref().map(|d| &d.principal)
    }

    pub fn task_id(&self) -> Option<&TaskId> {
        self.delegation.as_ref().and_then(|d| d.task_id.as_ref())
    }

    /// Ok when the identity holds `scope`; else a precise refusal.
    pub fn authorize(&self, scope: &Scope) -> Result<(), VerifyError> {
        if self.scopes.allows(scope) {
            Ok(())
        } else {
            Err(VerifyError::ScopeNotHeld {
                scope: scope.to_string(),
                spiffe_id: self.spiffe_id.to_string(),
                held: if self.scopes.is_empty() {
                    "no scope".into()
                } else {
                    self.scopes.to_space_separated()
                },
            })
        }
    }

    /// The JSON `svid inspect --output json` prints.
    pub fn to_json(&self) -> Value {
        json!({
            "kind": match self.kind { SvidKind::X509 => "x509", SvidKind::Jwt => "jwt" },
            "spiffe_id": self.spiffe_id.to_string(),
            "serial": self.serial,
            "jti": self.jti,
            "expires_at": self.expires_at,
            "scopes": self.scopes.to_strings(),
            "principal": self.principal().map(ToString::to_string),
            "chain": self.delegation.as_ref().map(|d| d.chain.iter().map(|h| json!({"agent": h.agent.to_string(), "grant_id": h.grant_id.as_str()})).collect::<Vec<_>>()).unwrap_or_default(),
            "remaining_depth": self.delegation.as_ref().map(|d| d.remaining_depth),
            "task_id": self.task_id().map(ToString::to_string),
        })
    }
}

/// Answers whether an identity is revoked (the revocation feed plugs in here); `Some`
/// carries the reason.
pub type RevocationCheck = Arc<dyn Fn(&VerifiedIdentity) -> Option<String> + Send + Sync>;

/// Verifies SVIDs of one trust domain against its bundle.
#[derive(Clone)]
pub struct Verifier {
    bundle: Bundle,
    oid_base: OidBase,
    revocation: Option<RevocationCheck>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("trust_domain", &self.bundle.trust_domain)
            .field("oid_base", &self.oid_base)
            .field("revocation", &self.revocation.is_some())
            .finish()
    }
}

impl Verifier {
    pub fn new(bundle: Bundle) -> Self {
        Self {
            bundle,
            oid_base: OidBase::default(),
            revocation: None,
        }
    }

    /// The OID base the issuing server is configured with (`extension_oid_base`).
    pub fn with_oid_base(mut self, base: OidBase) -> Self {
        self.oid_base = base;
        self
    }

    pub fn with_revocation_check(mut self, check: RevocationCheck) -> Self {
        self.revocation = Some(check);
        self
    }

    /// Refuses identities the revocation feed revoked: an X.509-SVID by serial, a JWT-SVID by
    /// its `jti` (every entry, node or serial revocation lists the JWTs it covers), and any SVID
    /// whose delegation chain holds a revoked grant or whose task is revoked. Keep `set` fed
    /// from the node agent's `agentd.workload.v1.Revocations/Watch` (docs/revocation.md).
    pub fn with_revocations(
        self,
        set: Arc<std::sync::RwLock<crate::revocation::RevocationSet>>,
    ) -> Self {
        self.with_revocation_check(Arc::new(move |id: &VerifiedIdentity| {
            use crate::revocation::RevocationHandle;
            let set = set.read().unwrap_or_else(|p| p.into_inner());
            if let Some(serial) = &id.serial {
                if set.is_serial_revoked(serial) {
                    return Some(format!("serial {serial} is revoked"));
                }
            }
            // A JWT-SVID revoked by entry, node or serial handle is listed by its jti.
            if let Some(jti) = &id.jti {
                if set.is_jwt_revoked(jti) {
                    return Some(format!("JWT-SVID {jti} is revoked"));
                }
            }
            let d = id.delegation.as_ref()?;
            let mut handles: Vec<RevocationHandle> = d
                .chain
                .iter()
                .map(|h| RevocationHandle::Grant(h.grant_id.to_string()))
                .collect();
            if let Some(t) = &d.task_id {
                handles.push(RevocationHandle::Task(t.to_string()));
            }
            handles.into_iter().find_map(|h| {
                set.standing(&h)
                    .map(|e| format!("{h} is revoked (revocation {})", e.sequence))
            })
        }))
    }

    fn finish(&self, id: VerifiedIdentity) -> Result<VerifiedIdentity, VerifyError> {
        if !id.spiffe_id.is_member_of(&self.bundle.trust_domain) {
            return Err(VerifyError::ForeignTrustDomain {
                spiffe_id: id.spiffe_id.to_string(),
                trust_domain: self.bundle.trust_domain.to_string(),
            });
        }
        if let Some(d) = &id.delegation {
            // The current actor is the last hop; anything else is not an SVID we issued.
            if d.agent() != Some(&id.spiffe_id) {
                return Err(malformed(format!(
                    "the delegation chain ends at {}, not at the SVID's subject {}",
                    d.agent()
                        .map_or_else(|| "nothing".into(), ToString::to_string),
                    id.spiffe_id
                )));
            }
        }
        if let Some(reason) = self.revocation.as_ref().and_then(|c| c(&id)) {
            return Err(VerifyError::Revoked { reason });
        }
        Ok(id)
    }

    /// Verifies an X.509-SVID chain (DER, leaf first) at `now`.
    pub fn verify_x509(
        &self,
        chain: &[Vec<u8>],
        now: SystemTime,
    ) -> Result<VerifiedIdentity, VerifyError> {
        let leaf = chain
            .first()
            .ok_or_else(|| malformed("empty certificate chain"))?;
        let roots = self
            .bundle
            .x509_authorities
            .iter()
            .map(|r| {
                webpki::anchor_from_trusted_cert(&CertificateDer::from(r.as_slice()))
                    .map(|a| a.to_owned())
                    .map_err(|e| VerifyError::Untrusted {
                        reason: format!("bundle certificate: {e}"),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let leaf_der = CertificateDer::from(leaf.as_slice());
        let intermediates: Vec<CertificateDer<'_>> = chain[1..]
            .iter()
            .map(|c| CertificateDer::from(c.as_slice()))
            .collect();
        let cert = webpki::EndEntityCert::try_from(&leaf_der).map_err(malformed)?;
        let secs = u64::try_from(unix_seconds(now)).unwrap_or(0);
        cert.verify_for_usage(
            crate::tls::provider().signature_verification_algorithms.all,
            &roots,
            &intermediates,
            UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs)),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| match e {
            webpki::Error::CertExpired { .. } => VerifyError::Expired {
                reason: e.to_string(),
            },
            webpki::Error::CertNotValidYet { .. } => VerifyError::NotYetValid {
                reason: e.to_string(),
            },
            other => VerifyError::Untrusted {
                reason: other.to_string(),
            },
        })?;
        self.finish(read_x509(leaf, &self.oid_base)?)
    }

    /// Verifies a JWT-SVID for `audience` at `now`.
    pub fn verify_jwt(
        &self,
        token: &str,
        audience: &str,
        now: SystemTime,
    ) -> Result<VerifiedIdentity, VerifyError> {
        let v = crate::svid::jwt::validate(token, audience, &self.bundle, now)?;
        let (scopes, delegation) = claims::from_claims(&v.claims)?;
        let jti = v
            .claims
            .get("jti")
            .and_then(Value::as_str)
            .map(str::to_string);
        self.finish(VerifiedIdentity {
            kind: SvidKind::Jwt,
            spiffe_id: v.spiffe_id,
            serial: None,
            jti,
            expires_at: v.expires_at,
            scopes,
            delegation,
        })
    }
}

/// Reads an X.509-SVID leaf WITHOUT verifying it (for `svid inspect` without a bundle).
/// Never use the result for an authorization decision.
pub fn decode_x509_unverified(
    leaf: &[u8],
    oid_base: &OidBase,
) -> Result<VerifiedIdentity, VerifyError> {
    read_x509(leaf, oid_base)
}

/// Reads a JWT-SVID WITHOUT verifying it (for `svid inspect` without a bundle).
pub fn decode_jwt_unverified(token: &str) -> Result<VerifiedIdentity, VerifyError> {
    let claims = crate::svid::jwt::decode_unverified(token)?;
    let sub = claims
        .get("sub")
        .and_then(Value::as_str)
        .ok_or_else(|| malformed("claim sub missing"))?;
    let spiffe_id = SpiffeId::new(sub).map_err(|e| malformed(format!("sub {sub:?}: {e}")))?;
    let (scopes, delegation) = claims::from_claims(&claims)?;
    Ok(VerifiedIdentity {
        kind: SvidKind::Jwt,
        spiffe_id,
        serial: None,
        jti: claims
            .get("jti")
            .and_then(Value::as_str)
            .map(str::to_string),
        expires_at: claims.get("exp").and_then(Value::as_i64).unwrap_or(0),
        scopes,
        delegation,
    })
}

fn read_x509(leaf: &[u8], oid_base: &OidBase) -> Result<VerifiedIdentity, VerifyError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf).map_err(malformed)?;
    let spiffe_id = crate::tls::spiffe_id_of(leaf)
        .ok_or_else(|| malformed("the leaf has no single SPIFFE ID URI SAN"))?;
    let scope_oid = oid_base.scope_oid_string();
    let delegation_oid = oid_base.delegation_oid_string();
    let mut scopes = ScopeSet::new();
    let mut delegation_der = None;
    for ext in parsed.extensions() {
        let oid = ext.oid.to_id_string();
        if oid == scope_oid {
            scopes = x509ext::decode_scopes(ext.value)?;
        } else if oid == delegation_oid {
            delegation_der = Some(ext.value);
        }
    }
    let expires_at = parsed.validity().not_after.timestamp();
    let delegation = delegation_der
        .map(|der| {
            x509ext::decode_delegation(der, scopes.clone()).map(|mut d| {
                d.expires_at = expires_at;
                d
            })
        })
        .transpose()?;
    Ok(VerifiedIdentity {
        kind: SvidKind::X509,
        spiffe_id,
        serial: Some(parsed.tbs_certificate.serial.to_str_radix(16)),
        jti: None,
        expires_at,
        scopes,
        delegation,
    })
}
