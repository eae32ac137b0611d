//! The server's certificate authority: an X.509 signing CA (self-signed root, or an
//! intermediate under an upstream CA on disk) and a JWT signing key, both persisted with key
//! files of mode 0600, and the minting of X.509-SVIDs and JWT-SVIDs that meet every MUST of
//! the SPIFFE X509-SVID and JWT-SVID specs.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use spiffe::{SpiffeId, TrustDomain};

use crate::bundle::{Bundle, DEFAULT_REFRESH_HINT};
use crate::clock::{from_unix_seconds, unix_seconds, Clock};
use crate::keys::PrivateKey;

mod jwt;
mod keystore;
mod x509;

pub use jwt::MAX_AUDIENCES;
pub use x509::{BACKDATE, MAX_CSR_LEN};

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
    trust_domain: TrustDomain,
    x509: x509::SigningCa,
    jwt: jwt::JwtSigner,
    bundle: Bundle,
}

impl CertificateAuthority {
    /// Loads the CA and JWT keys from `cfg.key_dir`, or creates and persists them on first
    /// start (keys 0600). A restart with the same key dir gives the same bundle.
    ///
    /// A stored CA certificate that has expired, names another trust domain, or does not
    /// match the configured upstream CA is replaced (with a warning); the JWT key is replaced
    /// with it, and when it has expired. Each replacement bumps the bundle sequence.
    pub fn load_or_create(cfg: &CaConfig, clock: &dyn Clock) -> Result<Self, CaError> {
        let now = clock.now();
        let td = &cfg.trust_domain;
        let store = keystore::KeyStore::open(&cfg.key_dir)?;
        let upstream = cfg
            .upstream
            .as_ref()
            .map(|u| x509::Upstream::load(u, now))
            .transpose()?;
        let mut state = store.load_state()?;
        let mut changed = false;

        let stored = match store.load_x509()? {
            Some((cert, key)) => {
                let path = store.path(keystore::X509_CERT);
                match x509::stored_cert_problem(&cert, td, upstream.as_ref(), now)
                    .map_err(|e| keystore::store_err(&path, e))?
                {
                    None => Some((cert, key)),
                    Some(problem) => {
                        tracing::warn!(path = %path.display(), %problem, "creating a new X.509 CA");
                        None
                    }
                }
            }
            None => None,
        };
        let (cert_der, key) = match stored {
            Some(ck) => ck,
            None => {
                let key = PrivateKey::generate()?;
                let cert = x509::new_ca_cert(
                    td,
                    &cfg.organization,
                    &key,
                    upstream.as_ref(),
                    now,
                    cfg.ca_ttl,
                )?;
                store.save_x509(&cert, &key)?;
                changed = true;
                tracing::info!(trust_domain = %td, upstream = upstream.is_some(), "created a new X.509 CA");
                (cert, key)
            }
        };
        let signing = x509::SigningCa::new(cert_der, &key, &cfg.organization, upstream.is_some())
            .map_err(|e| keystore::store_err(&store.path(keystore::X509_CERT), e))?;
        drop(key);

        let now_secs = unix_seconds(now);
        let stored_jwt = match store.load_jwt()? {
            Some(_) if changed => None,
            Some((meta, _)) if meta.not_after <= now_secs => {
                tracing::warn!(kid = %meta.kid, "the stored JWT key has expired; creating a new one");
                None
            }
            other => other,
        };
        let jwt = match stored_jwt {
            Some((meta, key)) => {
                jwt::JwtSigner::new(meta.kid, &key, from_unix_seconds(meta.not_after))?
            }
            None => {
                let key = PrivateKey::generate()?;
                let meta = keystore::JwtMeta {
                    kid: jwt::random_kid(),
                    not_after: unix_seconds(signing.not_after),
                };
                store.save_jwt(&meta, &key)?;
                changed = true;
                tracing::info!(kid = %meta.kid, "created a new JWT signing key");
                jwt::JwtSigner::new(meta.kid, &key, from_unix_seconds(meta.not_after))?
            }
        };

        if changed || state.sequence == 0 {
            state.sequence += 1;
            store.save_state(&state)?;
        }
        let bundle = Bundle {
            trust_domain: td.clone(),
            x509_authorities: match &upstream {
                Some(up) => up.roots.clone(),
                None => vec![signing.cert_der.clone()],
            },
            jwt_authorities: vec![jwt.authority()],
            sequence: state.sequence,
            refresh_hint: DEFAULT_REFRESH_HINT,
        };
        Ok(Self {
            trust_domain: td.clone(),
            x509: signing,
            jwt,
            bundle,
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The current bundle.
    pub fn bundle(&self) -> Bundle {
        self.bundle.clone()
    }

    /// The signing CA certificate's notAfter: no SVID outlives it.
    pub fn not_after(&self) -> SystemTime {
        self.x509.not_after
    }

    /// The signing CA certificate (DER): the root, or the intermediate under an upstream CA.
    pub fn signing_cert_der(&self) -> &[u8] {
        &self.x509.cert_der
    }

    /// The `kid` of the current JWT signing key.
    pub fn jwt_key_id(&self) -> &str {
        self.jwt.kid()
    }

    /// Checks a CSR as `sign_x509_svid` would (P-256 key, valid signature) without signing:
    /// lets a caller refuse bad input before spending something single-use on it.
    pub fn check_csr(&self, csr_der: &[u8]) -> Result<(), CaError> {
        x509::parse_csr(csr_der).map(|_| ())
    }

    /// Signs an X.509-SVID for `req.spiffe_id` over the CSR's public key.
    /// NotBefore = now - 10 s; NotAfter = min(now + ttl, CA notAfter).
    pub fn sign_x509_svid(
        &self,
        req: &X509SvidRequest<'_>,
        now: SystemTime,
    ) -> Result<IssuedX509Svid, CaError> {
        self.x509.sign(&self.trust_domain, req, now)
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
        self.jwt
            .sign(&self.trust_domain, spiffe_id, audience, ttl, now)
    }

    /// As `sign_x509_svid`, with extra non-critical extensions (scope, delegation).
    pub fn sign_x509_svid_with_extensions(
        &self,
        req: &X509SvidRequest<'_>,
        extensions: &[crate::delegation::SvidExtension],
        now: SystemTime,
    ) -> Result<IssuedX509Svid, CaError> {
        self.x509
            .sign_with_extensions(&self.trust_domain, req, extensions, now)
    }

    /// As `sign_jwt_svid`, with extra private claims (scope, delegation, task).
    pub fn sign_jwt_svid_with_claims(
        &self,
        spiffe_id: &SpiffeId,
        audience: &[String],
        ttl: Duration,
        now: SystemTime,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<IssuedJwtSvid, CaError> {
        self.jwt
            .sign_with_claims(&self.trust_domain, spiffe_id, audience, ttl, now, extra)
    }
}

#[cfg(test)]
mod tests;
