//! The server's certificate authority: an X.509 signing CA (self-signed root, or an
//! intermediate under an upstream CA on disk) and a JWT signing key, both persisted with key
//! files of mode 0600, and the minting of X.509-SVIDs and JWT-SVIDs that meet every MUST of
//! the SPIFFE X509-SVID and JWT-SVID specs.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use spiffe::{SpiffeId, TrustDomain};

use crate::bundle::Bundle;
use crate::clock::Clock;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("CSR: {reason}")]
    Csr { reason: String },
    #[error("SPIFFE ID {spiffe_id} is not in trust domain {trust_domain}")]
    ForeignTrustDomain {
        spiffe_id: String,
        trust_domain: String,
    },
    #[error("the CA has expired (not after {not_after:?})")]
    Expired { not_after: SystemTime },
    #[error("upstream CA: {reason}")]
    Upstream { reason: String },
    #[error("CA key store {path}: {reason}")]
    Store { path: String, reason: String },
    #[error("signing failed: {reason}")]
    Sign { reason: String },
    #[error(transparent)]
    Key(#[from] crate::keys::KeyError),
}

/// An upstream CA whose certificate and key are files on disk: the server's CA is then an
/// intermediate it signs, and the bundle holds the upstream root(s).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamCa {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Extra roots for the bundle (PEM); when absent the upstream certificate is the root.
    pub bundle_file: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct CaConfig {
    pub trust_domain: TrustDomain,
    /// Where `x509-ca.key`, `x509-ca.pem`, `jwt.key` and `jwt.json` live.
    pub key_dir: PathBuf,
    pub ca_ttl: Duration,
    pub upstream: Option<UpstreamCa>,
    /// X.509 Subject of the CA certificate: `O=<organization>, CN=<trust domain>`.
    pub organization: String,
}

/// What `sign_x509_svid` needs besides the CA.
#[derive(Debug, Clone)]
pub struct X509SvidRequest<'a> {
    /// PKCS#10 DER; its signature is checked, and only its public key is used.
    pub csr_der: &'a [u8],
    pub spiffe_id: &'a SpiffeId,
    pub ttl: Duration,
    pub dns_names: &'a [String],
}

/// A signed X.509-SVID.
#[derive(Debug, Clone)]
pub struct IssuedX509Svid {
    pub spiffe_id: SpiffeId,
    /// DER, leaf first, then intermediates (not the root, which is in the bundle).
    pub cert_chain: Vec<Vec<u8>>,
    /// Lowercase hex, no leading zeros.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// A signed JWT-SVID.
#[derive(Debug, Clone)]
pub struct IssuedJwtSvid {
    pub token: String,
    pub expires_at: SystemTime,
}

/// The CA. Cheap to share behind an `Arc`; signing takes `&self`.
#[derive(Debug)]
pub struct CertificateAuthority {
    _private: (),
}

impl CertificateAuthority {
    /// Loads the CA and JWT keys from `cfg.key_dir`, or creates and persists them on first
    /// start (keys 0600). A restart with the same key dir gives the same bundle.
    pub fn load_or_create(cfg: &CaConfig, clock: &dyn Clock) -> Result<Self, CaError> {
        let _ = (cfg, clock);
        todo!("CA helper")
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        todo!("CA helper")
    }

    /// The current bundle.
    pub fn bundle(&self) -> Bundle {
        todo!("CA helper")
    }

    /// The signing CA certificate's notAfter: no SVID outlives it.
    pub fn not_after(&self) -> SystemTime {
        todo!("CA helper")
    }

    /// Signs an X.509-SVID for `req.spiffe_id` over the CSR's public key.
    /// NotBefore = now - 10 s; NotAfter = min(now + ttl, CA notAfter).
    pub fn sign_x509_svid(
        &self,
        req: &X509SvidRequest<'_>,
        now: SystemTime,
    ) -> Result<IssuedX509Svid, CaError> {
        let _ = (req, now);
        todo!("CA helper")
    }

    /// Signs an ES256 JWT-SVID: header exactly `alg`, `kid`, `typ: JWT`; claims `sub`, `aud`
    /// (a string when one audience, else an array), `exp`, `iat` (integers) and `jti`.
    /// `exp` = min(now + ttl, JWT key expiry).
    pub fn sign_jwt_svid(
        &self,
        spiffe_id: &SpiffeId,
        audience: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<IssuedJwtSvid, CaError> {
        let _ = (spiffe_id, audience, ttl, now);
        todo!("CA helper")
    }
}
