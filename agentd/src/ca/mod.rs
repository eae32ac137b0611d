//! The server's certificate authority: X.509 signing CAs (self-signed roots, or
//! intermediates under an upstream CA on disk) and JWT signing keys, persisted with key files
//! of mode 0600, and the minting of X.509-SVIDs and JWT-SVIDs that meet every MUST of the
//! SPIFFE X509-SVID and JWT-SVID specs.
//!
//! Several authorities live side by side so that the CA rotates with overlap (DESIGN.md
//! section 3, docs/ca.md): a *prepared* authority is published in the bundle but does not
//! sign; *activating* it makes it sign and retires the previous one to *old*, which stays in
//! the bundle until it expires or is revoked. Relying parties thus learn a key before any
//! SVID signed by it exists, and keep trusting SVIDs from the previous key until they expire.
//!
//! Layout: this file holds the public types and the signing entry points; `load` starts the
//! CA from its key dir, `rotation` changes the authority set at run time, `authorities` is
//! the set itself (manifest, authority list, bundle), `keystore` the files on disk, `x509`
//! and `jwt` the two kinds of signer.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use spiffe::{SpiffeId, TrustDomain};

use crate::bundle::Bundle;
use crate::keys::PrivateKey;

use authorities::Authorities;

mod authorities;
mod jwt;
mod keystore;
mod load;
mod rotation;
mod x509;

pub use jwt::MAX_AUDIENCES;
pub use x509::{BACKDATE, CRL_NEXT_UPDATE, MAX_CSR_LEN};

/// Why the CA refused or failed an operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// A CSR that cannot be used: empty, too large, malformed, not a P-256 key, or with a
    /// signature that does not verify.
    #[error("CSR: {reason}")]
    Csr { reason: String },
    /// The SPIFFE ID to sign for is not in the CA's trust domain.
    #[error("SPIFFE ID {spiffe_id} is not in trust domain {trust_domain}")]
    ForeignTrustDomain {
        spiffe_id: String,
        trust_domain: String,
    },
    /// The authority that would sign (or be activated) has expired.
    #[error("the CA has expired (not after {not_after:?})")]
    Expired { not_after: SystemTime },
    /// The configured upstream CA cannot be read or used.
    #[error("upstream CA: {reason}")]
    Upstream { reason: String },
    /// A file in the CA key dir cannot be read, written or trusted.
    #[error("CA key store {path}: {reason}")]
    Store { path: String, reason: String },
    /// A stored authority does not match the configuration (trust domain, upstream CA): the
    /// server refuses to start instead of replacing its CA.
    #[error("refusing to start: {problem} ({path}, authority {authority_id}); the CA keys are kept: fix the configuration, or move the key directory aside to start a new CA")]
    StoredAuthorityMismatch {
        path: String,
        authority_id: String,
        problem: String,
    },
    /// Signing a certificate or token failed, or its request was refused (TTL, audience,
    /// claims, DNS names).
    #[error("signing failed: {reason}")]
    Sign { reason: String },
    /// A key could not be generated, loaded or used.
    #[error(transparent)]
    Key(#[from] crate::keys::KeyError),
    /// No authority has this id.
    #[error("authority {id}: no such authority (`agentd authority list` shows them)")]
    UnknownAuthority { id: String },
    /// The authority is active, so it cannot be revoked.
    #[error("authority {id} is the active one and signs every new SVID: prepare and activate a new authority first (`agentd authority prepare`, then `agentd authority activate`)")]
    ActiveAuthority { id: String },
    /// Another authority is already prepared.
    #[error("authority {id} is already prepared: activate it (`agentd authority activate`) or revoke it before preparing another")]
    AlreadyPrepared { id: String },
    /// Activation was asked for with no authority prepared.
    #[error("no authority is prepared: run `agentd authority prepare` first")]
    NothingPrepared,
    /// A revoked serial for a CRL that is not a valid certificate serial.
    #[error("serial {serial:?}: {reason}")]
    InvalidSerial { serial: String, reason: String },
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

/// What [`CertificateAuthority::sign_x509_svid`] needs besides the CA.
#[derive(Debug, Clone)]
pub struct X509SvidParams<'a> {
    /// PKCS#10 DER; its signature is checked, and only its public key is used.
    pub csr_der: &'a [u8],
    pub spiffe_id: &'a SpiffeId,
    pub ttl: Duration,
    /// DNS SANs after the SPIFFE ID URI SAN; empty for none.
    pub dns_names: &'a [String],
    /// Extra extensions (scope, delegation), always non-critical; empty for none.
    pub extensions: &'a [crate::delegation::SvidExtension],
}

/// What [`CertificateAuthority::sign_jwt_svid`] needs besides the CA.
#[derive(Debug, Clone, Copy)]
pub struct JwtSvidParams<'a> {
    /// The `sub` claim.
    pub spiffe_id: &'a SpiffeId,
    /// The `aud` claim: at least one, at most [`MAX_AUDIENCES`], none empty.
    pub audience: &'a [String],
    pub ttl: Duration,
    /// Extra private claims (scope, delegation, task); `None` for none. A registered claim
    /// (`sub`, `aud`, `exp`, `iat`, `jti`, `nbf`, `iss`) here is refused.
    pub claims: Option<&'a serde_json::Map<String, serde_json::Value>>,
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
    /// The signing authority's id (lowercase hex of its Subject Key Identifier).
    pub authority_id: String,
}

/// A signed JWT-SVID.
#[derive(Debug, Clone)]
pub struct IssuedJwtSvid {
    pub token: String,
    pub expires_at: SystemTime,
    pub jti: String,
    /// The `kid` of the signing key: the JWT authority's id.
    pub key_id: String,
}

/// Where an authority is in its life (docs/ca.md, "Rotation model").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthorityState {
    /// In the bundle, not signing yet.
    Prepared,
    /// Signs every new SVID.
    Active,
    /// Retired: in the bundle until it expires or is revoked, signs nothing.
    Old,
}

impl AuthorityState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Prepared => "prepared",
            Self::Active => "active",
            Self::Old => "old",
        }
    }
}

impl std::fmt::Display for AuthorityState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthorityKind {
    X509,
    Jwt,
}

impl AuthorityKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::X509 => "x509",
            Self::Jwt => "jwt",
        }
    }
}

impl std::fmt::Display for AuthorityKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One authority, as `authorities()` and the admin API report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorityInfo {
    /// X.509: lowercase hex of the CA certificate's Subject Key Identifier (SPIRE's
    /// authority id). JWT: the key's `kid`.
    pub id: String,
    pub kind: AuthorityKind,
    pub state: AuthorityState,
    /// X.509: the certificate's notBefore; JWT: None (a JWT key carries no start).
    pub not_before: Option<SystemTime>,
    pub not_after: SystemTime,
}

/// A revoked certificate for a CRL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedSerial {
    /// Hex, as [`IssuedX509Svid::serial`] spells it.
    pub serial_hex: String,
    pub revoked_at: SystemTime,
}

/// What one [`CertificateAuthority::rotate_if_due`] call did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RotationEvent {
    /// Expired old (or prepared) authorities left the bundle.
    Pruned { ids: Vec<String> },
    /// A new X.509 CA and JWT key were published, not signing yet.
    Prepared { x509_id: String, jwt_id: String },
    /// The prepared pair signs from now on.
    Activated { x509_id: String, jwt_id: String },
}

/// The CA. Cheap to share behind an `Arc`; signing takes `&self`, works on a snapshot of
/// the authorities (an `Arc` cloned under a read lock held for nanoseconds) and holds no
/// lock while it signs. Changes (prepare, activate, revoke, prune) are serialized, persisted
/// first, then published by swapping the snapshot.
#[derive(Debug)]
pub struct CertificateAuthority {
    trust_domain: TrustDomain,
    organization: String,
    ca_ttl: Duration,
    upstream: Option<x509::Upstream>,
    store: keystore::KeyStore,
    current: RwLock<Arc<Authorities>>,
    /// Held while an authority change is written and published.
    change: Mutex<()>,
    /// Counts authority changes, this server's and its peers', so that users of the
    /// bundle (the server's own TLS roots, the node agents) can follow them.
    changes: tokio::sync::watch::Sender<u64>,
    /// What the other servers of a shared store publish, merged into [`Self::bundle`].
    peers: RwLock<Arc<PeerAuthorities>>,
    /// The `iss` of JWT-SVIDs: the OAuth front door's issuer URL, when it is on.
    jwt_issuer: std::sync::OnceLock<String>,
}

/// Authorities of the other servers of one trust domain (each keeps its own keys; the
/// bundle is the union of every server's current authorities, as in SPIRE).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerAuthorities {
    /// DER CA certificates.
    pub x509_authorities: Vec<Vec<u8>>,
    pub jwt_authorities: Vec<crate::bundle::JwtAuthority>,
    /// The sum of the peers' own bundle sequences: the merged bundle's sequence is this
    /// server's plus this, so it grows when any server's authorities change, survives a
    /// restart (the peers' sequences are in the store), and is the same at every server.
    pub sequence: u64,
}

fn new_jwt(not_after: SystemTime) -> Result<(jwt::JwtSigner, PrivateKey), CaError> {
    let key = PrivateKey::generate()?;
    let signer = jwt::JwtSigner::new(jwt::random_kid(), &key, not_after)?;
    Ok((signer, key))
}

impl CertificateAuthority {
    fn snapshot(&self) -> Arc<Authorities> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Persists `next` (manifest), then publishes it. Called with `self.change` held.
    fn commit(&self, mut next: Authorities) -> Result<(), CaError> {
        next.build_bundle(&self.trust_domain, self.upstream.as_ref());
        self.store.save_manifest(&next.manifest())?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
        self.changes.send_modify(|n| *n += 1);
        Ok(())
    }

    fn lock_changes(&self) -> std::sync::MutexGuard<'_, ()> {
        self.change.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The current bundle: this server's authorities and those of its peers.
    pub fn bundle(&self) -> Bundle {
        let mut bundle = self.snapshot().bundle.clone();
        let peers = self.peers.read().unwrap_or_else(|p| p.into_inner()).clone();
        for der in &peers.x509_authorities {
            if !bundle.x509_authorities.contains(der) {
                bundle.x509_authorities.push(der.clone());
            }
        }
        for jwt in &peers.jwt_authorities {
            if !bundle
                .jwt_authorities
                .iter()
                .any(|own| own.key_id == jwt.key_id)
            {
                bundle.jwt_authorities.push(jwt.clone());
            }
        }
        bundle.sequence += peers.sequence;
        bundle
    }

    /// This server's own part of the bundle (what it publishes to its peers).
    pub fn own_bundle(&self) -> Bundle {
        self.snapshot().bundle.clone()
    }

    /// Replaces the peers' authorities; true (and a change for [`Self::subscribe`]rs) when
    /// they differ from the last ones.
    pub fn set_peer_authorities(&self, authorities: PeerAuthorities) -> bool {
        let mut peers = self.peers.write().unwrap_or_else(|p| p.into_inner());
        if **peers == authorities {
            return false;
        }
        *peers = Arc::new(authorities);
        drop(peers);
        self.changes.send_modify(|n| *n += 1);
        true
    }

    /// The active (signing) CA certificate's notAfter: no new SVID outlives it.
    pub fn not_after(&self) -> SystemTime {
        self.snapshot().x509_active.not_after
    }

    /// The active signing CA certificate (DER): the root, or the intermediate under an
    /// upstream CA.
    pub fn signing_cert_der(&self) -> Vec<u8> {
        self.snapshot().x509_active.cert_der.clone()
    }

    /// The `kid` of the active JWT signing key.
    pub fn jwt_key_id(&self) -> String {
        self.snapshot().jwt_active.kid().to_owned()
    }

    /// Every authority: X.509 ones (active, prepared, old), then JWT ones (same order).
    pub fn authorities(&self) -> Vec<AuthorityInfo> {
        self.snapshot().infos()
    }

    /// Follows authority changes: the value bumps on every prepare, activate, revoke and
    /// prune (whether or not the bundle changed).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// An RFC 5280 CRL for the X.509 authority `authority_id`, signed by its key, listing
    /// `revoked`: thisUpdate `now`, nextUpdate `now + CRL_NEXT_UPDATE`, with the authority
    /// key identifier and CRL number extensions (docs/ca.md, "CRL").
    pub fn crl_der(
        &self,
        authority_id: &str,
        revoked: &[RevokedSerial],
        crl_number: u64,
        now: SystemTime,
    ) -> Result<Vec<u8>, CaError> {
        let cur = self.snapshot();
        let ca = cur
            .x509_all()
            .map(|(_, a)| a)
            .find(|a| a.authority_id == authority_id)
            .ok_or_else(|| CaError::UnknownAuthority {
                id: authority_id.to_owned(),
            })?
            .clone();
        drop(cur);
        ca.crl(revoked, crl_number, now)
    }

    /// Checks a CSR as `sign_x509_svid` would (P-256 key, valid signature) without signing:
    /// lets a caller refuse bad input before spending something single-use on it.
    pub fn check_csr(&self, csr_der: &[u8]) -> Result<(), CaError> {
        check_csr_der(csr_der)
    }

    /// Signs an X.509-SVID for `params.spiffe_id` over the CSR's public key, with the active
    /// CA, adding `params.dns_names` as DNS SANs and `params.extensions` as non-critical
    /// extensions. NotBefore = now - 10 s; NotAfter = min(now + ttl, the active CA's
    /// notAfter).
    pub fn sign_x509_svid(
        &self,
        params: &X509SvidParams<'_>,
        now: SystemTime,
    ) -> Result<IssuedX509Svid, CaError> {
        let ca = self.snapshot().x509_active.clone();
        ca.sign(&self.trust_domain, params, now)
    }

    /// Signs an ES256 JWT-SVID with the active JWT key: header exactly `alg`, `kid`,
    /// `typ: JWT`; claims `sub`, `aud` (a string when one audience, else an array), `exp`,
    /// `iat` (integers) and `jti`, then `params.claims`. `exp` = min(now + ttl, JWT key
    /// expiry).
    pub fn sign_jwt_svid(
        &self,
        params: &JwtSvidParams<'_>,
        now: SystemTime,
    ) -> Result<IssuedJwtSvid, CaError> {
        let signer = self.snapshot().jwt_active.clone();
        signer.sign(
            &self.trust_domain,
            params,
            self.jwt_issuer.get().map(String::as_str),
            now,
        )
    }

    /// Makes every JWT-SVID signed from now on carry `iss` = `issuer` (the OAuth front
    /// door's issuer URL). Set once, at start; a second call is refused.
    pub fn set_jwt_issuer(&self, issuer: String) -> Result<(), CaError> {
        self.jwt_issuer.set(issuer).map_err(|_| CaError::Sign {
            reason: "the JWT issuer is already set".into(),
        })
    }

    /// The `iss` JWT-SVIDs carry, if any.
    pub fn jwt_issuer(&self) -> Option<&str> {
        self.jwt_issuer.get().map(String::as_str)
    }

    /// Signs an RFC 9068 access token (`typ: at+jwt`) with the active JWT key: `claims`
    /// as given plus `exp` (capped at the key's expiry), `iat` and `jti`.
    pub fn sign_access_token(
        &self,
        claims: serde_json::Map<String, serde_json::Value>,
        exp: i64,
        now: SystemTime,
    ) -> Result<IssuedJwtSvid, CaError> {
        let signer = self.snapshot().jwt_active.clone();
        signer.sign_access_token(claims, exp, now)
    }
}

/// Parses a PKCS#10 CSR as every signing path does (P-256 key, valid self-signature),
/// without a CA: the one entry point for the CSR parser (used by `Ca::check_csr` and the
/// fuzz targets).
pub fn check_csr_der(csr_der: &[u8]) -> Result<(), CaError> {
    x509::parse_csr(csr_der).map(|_| ())
}

#[cfg(test)]
mod rotation_tests;
#[cfg(test)]
mod tests;
