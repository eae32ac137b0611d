//! A trust domain's bundle: its X.509 authorities and JWT authorities, in the formats the
//! SPIFFE Trust Domain and Bundle spec (section 4, the SPIFFE bundle format) and the Workload
//! API use.

use std::time::{Duration, SystemTime};

use spiffe::TrustDomain;

/// A JWT signing authority: the key id and the public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtAuthority {
    pub key_id: String,
    /// SubjectPublicKeyInfo DER (P-256).
    pub public_key_spki_der: Vec<u8>,
    pub expires_at: SystemTime,
}

/// The trust bundle of one trust domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    pub trust_domain: TrustDomain,
    /// DER CA certificates (roots; with an upstream CA, the upstream roots).
    pub x509_authorities: Vec<Vec<u8>>,
    pub jwt_authorities: Vec<JwtAuthority>,
    /// `spiffe_sequence`: bumps whenever the bundle changes.
    pub sequence: u64,
    /// `spiffe_refresh_hint`.
    pub refresh_hint: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("bundle: {reason}")]
    Invalid { reason: String },
}

impl Bundle {
    /// The SPIFFE bundle format: a JWKS with `keys` (x509-svid keys with `x5c` and no `kid`;
    /// jwt-svid keys with `kid`), `spiffe_sequence` and `spiffe_refresh_hint`.
    pub fn to_spiffe_json(&self) -> String {
        todo!("CA helper")
    }

    /// Parses the SPIFFE bundle format (used for `--trust-bundle` files as well as PEM).
    pub fn from_spiffe_json(trust_domain: TrustDomain, json: &str) -> Result<Self, BundleError> {
        let _ = (trust_domain, json);
        todo!("CA helper")
    }

    /// The X.509 authorities as concatenated PEM certificates.
    pub fn x509_pem(&self) -> String {
        todo!("CA helper")
    }

    /// Parses concatenated PEM CA certificates into X.509 authorities.
    pub fn x509_authorities_from_pem(pem: &str) -> Result<Vec<Vec<u8>>, BundleError> {
        let _ = pem;
        todo!("CA helper")
    }

    /// The X.509 authorities as concatenated DER, as the Workload API carries them.
    pub fn x509_der_concat(&self) -> Vec<u8> {
        self.x509_authorities.concat()
    }

    /// The JWT authorities as a plain JWKS (`{"keys":[...]}`), each key with `kid`, `kty`,
    /// `crv`, `x`, `y`, as the Workload API's FetchJWTBundles carries them.
    pub fn jwt_jwks_json(&self) -> String {
        todo!("CA helper")
    }
}
