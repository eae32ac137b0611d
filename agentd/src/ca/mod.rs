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

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use spiffe::{SpiffeId, TrustDomain};

use crate::bundle::{Bundle, DEFAULT_REFRESH_HINT};
use crate::clock::{from_unix_seconds, unix_seconds, Clock};
use crate::keys::PrivateKey;

mod jwt;
mod keystore;
mod x509;

pub use jwt::MAX_AUDIENCES;
pub use x509::{BACKDATE, CRL_NEXT_UPDATE, MAX_CSR_LEN};

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
    #[error("authority {id}: no such authority (`agentd authority list` shows them)")]
    UnknownAuthority { id: String },
    #[error("authority {id} is the active one and signs every new SVID: prepare and activate a new authority first (`agentd authority prepare`, then `agentd authority activate`)")]
    ActiveAuthority { id: String },
    #[error("authority {id} is already prepared: activate it (`agentd authority activate`) or revoke it before preparing another")]
    AlreadyPrepared { id: String },
    #[error("no authority is prepared: run `agentd authority prepare` first")]
    NothingPrepared,
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

/// One consistent set of authorities: exactly one active X.509 CA and one active JWT key
/// (by construction), at most one prepared of each, any number of old ones.
#[derive(Debug, Clone)]
struct Authorities {
    x509_active: Arc<x509::SigningCa>,
    x509_prepared: Option<Arc<x509::SigningCa>>,
    x509_old: Vec<Arc<x509::SigningCa>>,
    jwt_active: Arc<jwt::JwtSigner>,
    jwt_prepared: Option<Arc<jwt::JwtSigner>>,
    jwt_old: Vec<Arc<jwt::JwtSigner>>,
    sequence: u64,
    bundle: Bundle,
}

impl Authorities {
    fn x509_all(&self) -> impl Iterator<Item = (AuthorityState, &Arc<x509::SigningCa>)> {
        std::iter::once((AuthorityState::Active, &self.x509_active))
            .chain(
                self.x509_prepared
                    .iter()
                    .map(|a| (AuthorityState::Prepared, a)),
            )
            .chain(self.x509_old.iter().map(|a| (AuthorityState::Old, a)))
    }

    fn jwt_all(&self) -> impl Iterator<Item = (AuthorityState, &Arc<jwt::JwtSigner>)> {
        std::iter::once((AuthorityState::Active, &self.jwt_active))
            .chain(
                self.jwt_prepared
                    .iter()
                    .map(|a| (AuthorityState::Prepared, a)),
            )
            .chain(self.jwt_old.iter().map(|a| (AuthorityState::Old, a)))
    }

    fn manifest(&self) -> keystore::Manifest {
        let mut authorities = Vec::new();
        for (state, a) in self.x509_all() {
            authorities.push(keystore::StoredAuthority {
                kind: keystore::StoredKind::X509,
                id: a.authority_id.clone(),
                state,
                not_after: unix_seconds(a.not_after),
            });
        }
        for (state, a) in self.jwt_all() {
            authorities.push(keystore::StoredAuthority {
                kind: keystore::StoredKind::Jwt,
                id: a.kid().to_owned(),
                state,
                not_after: unix_seconds(a.not_after()),
            });
        }
        keystore::Manifest {
            sequence: self.sequence,
            authorities,
        }
    }

    fn infos(&self) -> Vec<AuthorityInfo> {
        let mut out: Vec<AuthorityInfo> = self
            .x509_all()
            .map(|(state, a)| AuthorityInfo {
                id: a.authority_id.clone(),
                kind: AuthorityKind::X509,
                state,
                not_before: Some(a.not_before),
                not_after: a.not_after,
            })
            .collect();
        out.extend(self.jwt_all().map(|(state, a)| AuthorityInfo {
            id: a.kid().to_owned(),
            kind: AuthorityKind::Jwt,
            state,
            not_before: None,
            not_after: a.not_after(),
        }));
        out
    }

    /// The bundle: every X.509 authority (old ones first, then the active, then the
    /// prepared one) or, under an upstream CA, the upstream roots; and every JWT key.
    fn build_bundle(&mut self, trust_domain: &TrustDomain, upstream: Option<&x509::Upstream>) {
        let x509_authorities = match upstream {
            // The intermediates chain to the upstream roots, which stay the bundle across
            // rotations; SVID chains carry the intermediate.
            Some(up) => up.roots.clone(),
            None => self
                .x509_old
                .iter()
                .chain(std::iter::once(&self.x509_active))
                .chain(self.x509_prepared.iter())
                .map(|a| a.cert_der.clone())
                .collect(),
        };
        let jwt_authorities = self
            .jwt_old
            .iter()
            .chain(std::iter::once(&self.jwt_active))
            .chain(self.jwt_prepared.iter())
            .map(|a| a.authority())
            .collect();
        self.bundle = Bundle {
            trust_domain: trust_domain.clone(),
            x509_authorities,
            jwt_authorities,
            sequence: self.sequence,
            refresh_hint: DEFAULT_REFRESH_HINT,
        };
    }
}

/// An X.509 authority read from the key dir, before it is checked.
struct LoadedX509 {
    /// Lowercase SKI hex, checked against the certificate.
    id: String,
    state: AuthorityState,
    cert_der: Vec<u8>,
    key: PrivateKey,
    /// Where the certificate came from, for errors.
    cert_path: PathBuf,
}

/// A JWT key read from the key dir.
struct LoadedJwt {
    state: AuthorityState,
    kid: String,
    not_after: i64,
    key: PrivateKey,
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
    /// Counts authority changes, so that users of the signing CA (the server's own TLS
    /// certificate) can follow them.
    changes: tokio::sync::watch::Sender<u64>,
}

fn new_jwt(not_after: SystemTime) -> Result<(jwt::JwtSigner, PrivateKey), CaError> {
    let key = PrivateKey::generate()?;
    let signer = jwt::JwtSigner::new(jwt::random_kid(), &key, not_after)?;
    Ok((signer, key))
}

impl CertificateAuthority {
    /// Loads the authorities from `cfg.key_dir`, or creates and persists an active X.509 CA
    /// and JWT key on first start (keys 0600). A restart with the same key dir gives the same
    /// authorities and bundle. A key dir in the former single-CA layout is upgraded in place
    /// (its CA and JWT key become the active authorities, with the same bundle sequence).
    ///
    /// A stored CA certificate that has expired, names another trust domain, or does not
    /// match the configured upstream CA is dropped (with a warning), and so is an expired JWT
    /// key. With no usable active authority left, a prepared one is activated, else a new
    /// one is made (a new X.509 CA always comes with a new JWT key). Each such change bumps
    /// the bundle sequence.
    pub fn load_or_create(cfg: &CaConfig, clock: &dyn Clock) -> Result<Self, CaError> {
        let now = clock.now();
        let now_secs = unix_seconds(now);
        let td = &cfg.trust_domain;
        let store = keystore::KeyStore::open(&cfg.key_dir)?;
        let upstream = cfg
            .upstream
            .as_ref()
            .map(|u| x509::Upstream::load(u, now))
            .transpose()?;

        // Read what is stored, in either layout.
        let mut x509_loaded: Vec<LoadedX509> = Vec::new();
        let mut jwt_loaded: Vec<LoadedJwt> = Vec::new();
        let mut sequence;
        let legacy = match store.load_manifest()? {
            Some(m) => {
                sequence = m.sequence;
                for a in m.authorities {
                    match a.kind {
                        keystore::StoredKind::X509 => {
                            let (cert_der, key) = store.load_x509_authority(&a.id)?;
                            let cert_path = store.path(&keystore::KeyStore::x509_cert_name(&a.id));
                            let actual = x509::authority_id_of(&cert_der)
                                .map_err(|e| keystore::store_err(&cert_path, e))?;
                            if actual != a.id {
                                return Err(keystore::store_err(
                                    &cert_path,
                                    format!(
                                        "the certificate's key identifier {actual} does not match its authority id {}",
                                        a.id
                                    ),
                                ));
                            }
                            x509_loaded.push(LoadedX509 {
                                id: a.id,
                                state: a.state,
                                cert_der,
                                key,
                                cert_path,
                            });
                        }
                        keystore::StoredKind::Jwt => {
                            jwt_loaded.push(LoadedJwt {
                                state: a.state,
                                key: store.load_jwt_authority(&a.id)?,
                                kid: a.id,
                                not_after: a.not_after,
                            });
                        }
                    }
                }
                false
            }
            None => {
                let state = store.load_state()?;
                sequence = state.sequence;
                let mut found = false;
                if let Some((cert_der, key)) = store.load_x509()? {
                    found = true;
                    let cert_path = store.path(keystore::X509_CERT);
                    let id = x509::authority_id_of(&cert_der)
                        .map_err(|e| keystore::store_err(&cert_path, e))?;
                    // Upgrade in place: the same key and certificate under the new names;
                    // the manifest naming them is written below, then the legacy files go.
                    store.save_x509_authority(&id, &cert_der, &key)?;
                    x509_loaded.push(LoadedX509 {
                        id,
                        state: AuthorityState::Active,
                        cert_der,
                        key,
                        cert_path,
                    });
                }
                if let Some((meta, key)) = store.load_jwt()? {
                    found = true;
                    if !keystore::id_is_safe(&meta.kid) {
                        return Err(keystore::store_err(
                            &store.path(keystore::JWT_META),
                            format!("kid {:?} is not lowercase hex", meta.kid),
                        ));
                    }
                    store.save_jwt_authority(&meta.kid, &key)?;
                    jwt_loaded.push(LoadedJwt {
                        state: AuthorityState::Active,
                        kid: meta.kid,
                        not_after: meta.not_after,
                        key,
                    });
                }
                found || sequence != 0
            }
        };

        // Check them; drop the unusable ones.
        let mut changed = false;
        let mut dropped: Vec<(keystore::StoredKind, String)> = Vec::new();
        let mut x509_active = None;
        let mut x509_prepared = None;
        let mut x509_old = Vec::new();
        for l in x509_loaded {
            let problem = x509::stored_cert_problem(&l.cert_der, td, upstream.as_ref(), now)
                .map_err(|e| keystore::store_err(&l.cert_path, e))?;
            if let Some(problem) = problem {
                tracing::warn!(path = %l.cert_path.display(), authority_id = %l.id, %problem, "dropping an X.509 authority");
                changed = true;
                dropped.push((keystore::StoredKind::X509, l.id));
                continue;
            }
            let ca =
                x509::SigningCa::new(l.cert_der, &l.key, &cfg.organization, upstream.is_some())
                    .map_err(|e| keystore::store_err(&l.cert_path, e))?;
            drop(l.key);
            let ca = Arc::new(ca);
            match l.state {
                AuthorityState::Active if x509_active.is_none() => x509_active = Some(ca),
                AuthorityState::Prepared if x509_prepared.is_none() => x509_prepared = Some(ca),
                _ => x509_old.push(ca),
            }
        }
        let mut jwt_active = None;
        let mut jwt_prepared = None;
        let mut jwt_old = Vec::new();
        for l in jwt_loaded {
            if l.not_after <= now_secs {
                tracing::warn!(kid = %l.kid, "dropping an expired JWT key");
                changed = true;
                dropped.push((keystore::StoredKind::Jwt, l.kid));
                continue;
            }
            let signer = Arc::new(jwt::JwtSigner::new(
                l.kid,
                &l.key,
                from_unix_seconds(l.not_after),
            )?);
            match l.state {
                AuthorityState::Active if jwt_active.is_none() => jwt_active = Some(signer),
                AuthorityState::Prepared if jwt_prepared.is_none() => jwt_prepared = Some(signer),
                _ => jwt_old.push(signer),
            }
        }

        // Make sure one X.509 CA and one JWT key are active.
        let mut new_x509 = false;
        let x509_active = match (x509_active, x509_prepared.take()) {
            (Some(a), prepared) => {
                x509_prepared = prepared;
                a
            }
            (None, Some(p)) => {
                tracing::warn!(authority_id = %p.authority_id, "no usable active X.509 authority: activating the prepared one");
                changed = true;
                p
            }
            (None, None) => {
                let key = PrivateKey::generate()?;
                let cert = x509::new_ca_cert(
                    td,
                    &cfg.organization,
                    &key,
                    upstream.as_ref(),
                    now,
                    cfg.ca_ttl,
                )?;
                let ca =
                    x509::SigningCa::new(cert.clone(), &key, &cfg.organization, upstream.is_some())
                        .map_err(|e| CaError::Sign { reason: e })?;
                store.save_x509_authority(&ca.authority_id, &cert, &key)?;
                tracing::info!(trust_domain = %td, upstream = upstream.is_some(), authority_id = %ca.authority_id, "created a new X.509 CA");
                changed = true;
                new_x509 = true;
                Arc::new(ca)
            }
        };
        if new_x509 {
            // A new CA gets a new JWT key with the same lifetime; the previous key stays
            // published (old) until it expires.
            if let Some(a) = jwt_active.take() {
                jwt_old.push(a);
            }
        }
        let jwt_active = match (jwt_active, jwt_prepared.take()) {
            (Some(a), prepared) => {
                jwt_prepared = prepared;
                a
            }
            (None, Some(p)) if !new_x509 => {
                tracing::warn!(kid = %p.kid(), "no usable active JWT key: activating the prepared one");
                changed = true;
                p
            }
            (None, prepared) => {
                jwt_prepared = prepared;
                let (signer, key) = new_jwt(x509_active.not_after)?;
                store.save_jwt_authority(signer.kid(), &key)?;
                tracing::info!(kid = %signer.kid(), "created a new JWT signing key");
                changed = true;
                Arc::new(signer)
            }
        };

        let bumped = changed || sequence == 0;
        if bumped {
            sequence += 1;
        }
        let mut auths = Authorities {
            x509_active,
            x509_prepared,
            x509_old,
            jwt_active,
            jwt_prepared,
            jwt_old,
            sequence,
            bundle: Bundle {
                trust_domain: td.clone(),
                x509_authorities: Vec::new(),
                jwt_authorities: Vec::new(),
                sequence,
                refresh_hint: DEFAULT_REFRESH_HINT,
            },
        };
        auths.build_bundle(td, upstream.as_ref());
        if legacy || changed || bumped {
            store.save_manifest(&auths.manifest())?;
        }
        if legacy {
            store.remove_legacy_files();
            tracing::info!(dir = %cfg.key_dir.display(), "upgraded the CA key directory to the multi-authority layout");
        }
        for (kind, id) in &dropped {
            store.remove_authority_files(*kind, id);
        }

        Ok(Self {
            trust_domain: td.clone(),
            organization: cfg.organization.clone(),
            ca_ttl: cfg.ca_ttl,
            upstream,
            store,
            current: RwLock::new(Arc::new(auths)),
            change: Mutex::new(()),
            changes: tokio::sync::watch::channel(0).0,
        })
    }

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

    /// The current bundle.
    pub fn bundle(&self) -> Bundle {
        self.snapshot().bundle.clone()
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

    /// Prepares the next authorities: a new X.509 CA (self-signed, or an intermediate under
    /// the upstream CA, whose roots stay the bundle) and a new JWT key expiring with it. Both
    /// enter the bundle at once (the sequence bumps) but sign nothing until
    /// [`activate`](Self::activate). Refused while another authority is prepared.
    pub fn prepare(&self, now: SystemTime) -> Result<Vec<AuthorityInfo>, CaError> {
        let _guard = self.lock_changes();
        let cur = self.snapshot();
        if let Some(p) = &cur.x509_prepared {
            return Err(CaError::AlreadyPrepared {
                id: p.authority_id.clone(),
            });
        }
        let key = PrivateKey::generate()?;
        let cert = x509::new_ca_cert(
            &self.trust_domain,
            &self.organization,
            &key,
            self.upstream.as_ref(),
            now,
            self.ca_ttl,
        )?;
        let ca = x509::SigningCa::new(
            cert.clone(),
            &key,
            &self.organization,
            self.upstream.is_some(),
        )
        .map_err(|e| CaError::Sign { reason: e })?;
        let (signer, jwt_key) = new_jwt(ca.not_after)?;
        let x509_id = ca.authority_id.clone();
        let jwt_id = signer.kid().to_owned();

        let result = (|| {
            self.store.save_x509_authority(&x509_id, &cert, &key)?;
            self.store.save_jwt_authority(&jwt_id, &jwt_key)?;
            let mut next = (*cur).clone();
            next.x509_prepared = Some(Arc::new(ca));
            // A prepared JWT key left without its X.509 pair (say, after a restart dropped
            // an unusable CA) is replaced along with it.
            if let Some(stale) = next.jwt_prepared.replace(Arc::new(signer)) {
                next.jwt_old.push(stale);
            }
            next.sequence += 1;
            self.commit(next)
        })();
        if let Err(e) = result {
            self.store
                .remove_authority_files(keystore::StoredKind::X509, &x509_id);
            self.store
                .remove_authority_files(keystore::StoredKind::Jwt, &jwt_id);
            return Err(e);
        }
        tracing::info!(authority_id = %x509_id, kid = %jwt_id, "prepared new authorities: published, not signing yet");
        Ok(self
            .authorities()
            .into_iter()
            .filter(|a| a.id == x509_id || a.id == jwt_id)
            .collect())
    }

    /// Activates the prepared authorities: they sign every SVID from `now` on, and the
    /// previously active ones become old (still in the bundle until they expire, so SVIDs
    /// they signed keep verifying). The bundle's contents do not change, nor its sequence.
    pub fn activate(&self, now: SystemTime) -> Result<Vec<AuthorityInfo>, CaError> {
        let _guard = self.lock_changes();
        let cur = self.snapshot();
        let Some(prepared) = cur.x509_prepared.clone() else {
            return Err(CaError::NothingPrepared);
        };
        if now >= prepared.not_after {
            return Err(CaError::Expired {
                not_after: prepared.not_after,
            });
        }
        let mut next = (*cur).clone();
        next.x509_prepared = None;
        let previous = std::mem::replace(&mut next.x509_active, prepared);
        next.x509_old.push(previous);
        let mut ids = vec![next.x509_active.authority_id.clone()];
        if let Some(jwt) = next.jwt_prepared.take() {
            let previous = std::mem::replace(&mut next.jwt_active, jwt);
            next.jwt_old.push(previous);
            ids.push(next.jwt_active.kid().to_owned());
        }
        self.commit(next)?;
        tracing::info!(ids = ?ids, "activated the prepared authorities");
        Ok(self
            .authorities()
            .into_iter()
            .filter(|a| ids.contains(&a.id))
            .collect())
    }

    /// Removes an old or prepared authority (X.509 SKI hex or JWT kid) from the set and the
    /// bundle (the sequence bumps) and deletes its key. Refuses the active authorities: a
    /// new one must be prepared and activated first. What the revoked authority signed must
    /// be re-issued by the caller (the revocation log does that).
    pub fn revoke_authority(&self, id: &str, now: SystemTime) -> Result<AuthorityInfo, CaError> {
        let _guard = self.lock_changes();
        let cur = self.snapshot();
        let info = cur
            .infos()
            .into_iter()
            .find(|a| a.id == id)
            .ok_or_else(|| CaError::UnknownAuthority { id: id.to_owned() })?;
        if info.state == AuthorityState::Active {
            return Err(CaError::ActiveAuthority { id: id.to_owned() });
        }
        let mut next = (*cur).clone();
        let kind = match info.kind {
            AuthorityKind::X509 => {
                if next
                    .x509_prepared
                    .as_ref()
                    .is_some_and(|a| a.authority_id == id)
                {
                    next.x509_prepared = None;
                }
                next.x509_old.retain(|a| a.authority_id != id);
                keystore::StoredKind::X509
            }
            AuthorityKind::Jwt => {
                if next.jwt_prepared.as_ref().is_some_and(|a| a.kid() == id) {
                    next.jwt_prepared = None;
                }
                next.jwt_old.retain(|a| a.kid() != id);
                keystore::StoredKind::Jwt
            }
        };
        next.sequence += 1;
        self.commit(next)?;
        self.store.remove_authority_files(kind, id);
        tracing::warn!(authority_id = %id, kind = %info.kind, state = %info.state, at = unix_seconds(now), "authority revoked: removed from the bundle");
        Ok(info)
    }

    /// Drops old and prepared authorities that have expired from the set and the bundle
    /// (the sequence bumps when any goes). Returns their ids.
    pub fn prune_expired(&self, now: SystemTime) -> Result<Vec<String>, CaError> {
        let _guard = self.lock_changes();
        let cur = self.snapshot();
        let mut gone: Vec<(keystore::StoredKind, String)> = Vec::new();
        let mut next = (*cur).clone();
        let expired_x509 = |a: &Arc<x509::SigningCa>| a.not_after <= now;
        let expired_jwt = |a: &Arc<jwt::JwtSigner>| a.not_after() <= now;
        if next.x509_prepared.as_ref().is_some_and(expired_x509) {
            if let Some(a) = next.x509_prepared.take() {
                gone.push((keystore::StoredKind::X509, a.authority_id.clone()));
            }
        }
        if next.jwt_prepared.as_ref().is_some_and(expired_jwt) {
            if let Some(a) = next.jwt_prepared.take() {
                gone.push((keystore::StoredKind::Jwt, a.kid().to_owned()));
            }
        }
        for a in next.x509_old.iter().filter(|a| expired_x509(a)) {
            gone.push((keystore::StoredKind::X509, a.authority_id.clone()));
        }
        next.x509_old.retain(|a| !expired_x509(a));
        for a in next.jwt_old.iter().filter(|a| expired_jwt(a)) {
            gone.push((keystore::StoredKind::Jwt, a.kid().to_owned()));
        }
        next.jwt_old.retain(|a| !expired_jwt(a));
        if gone.is_empty() {
            return Ok(Vec::new());
        }
        next.sequence += 1;
        self.commit(next)?;
        for (kind, id) in &gone {
            self.store.remove_authority_files(*kind, id);
        }
        let ids: Vec<String> = gone.into_iter().map(|(_, id)| id).collect();
        tracing::info!(ids = ?ids, "expired authorities left the bundle");
        Ok(ids)
    }

    /// When the rotation schedule prepares and activates, for the active X.509 CA of
    /// lifetime L from notBefore: prepare at L/2, activate at 5/6 L (SPIRE's schedule: the
    /// next key is published for a third of the lifetime before it signs, and the old one
    /// still has 1/6 L to run when it retires).
    pub fn rotation_times(&self) -> (SystemTime, SystemTime) {
        let cur = self.snapshot();
        let a = &cur.x509_active;
        let lifetime = a.not_after.duration_since(a.not_before).unwrap_or_default();
        (a.not_before + lifetime / 2, a.not_before + lifetime * 5 / 6)
    }

    /// One step of the rotation schedule at `now`: drop expired authorities, then prepare
    /// (past half the active CA's lifetime, when nothing is prepared) or activate (past 5/6
    /// of it, when something is prepared). At most one of prepare/activate per call, so a
    /// prepared key is always published for at least one step before it signs.
    pub fn rotate_if_due(&self, now: SystemTime) -> Result<Vec<RotationEvent>, CaError> {
        let mut events = Vec::new();
        let ids = self.prune_expired(now)?;
        if !ids.is_empty() {
            events.push(RotationEvent::Pruned { ids });
        }
        let (prepare_at, activate_at) = self.rotation_times();
        let prepared = self.snapshot().x509_prepared.is_some();
        if !prepared && now >= prepare_at {
            match self.prepare(now) {
                Ok(new) => events.push(RotationEvent::Prepared {
                    x509_id: pick(&new, AuthorityKind::X509),
                    jwt_id: pick(&new, AuthorityKind::Jwt),
                }),
                // Someone prepared by hand in the meantime: nothing to do.
                Err(CaError::AlreadyPrepared { .. }) => {}
                Err(e) => return Err(e),
            }
        } else if prepared && now >= activate_at {
            match self.activate(now) {
                Ok(new) => events.push(RotationEvent::Activated {
                    x509_id: pick(&new, AuthorityKind::X509),
                    jwt_id: pick(&new, AuthorityKind::Jwt),
                }),
                Err(CaError::NothingPrepared) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(events)
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
        x509::parse_csr(csr_der).map(|_| ())
    }

    /// Signs an X.509-SVID for `req.spiffe_id` over the CSR's public key, with the active
    /// CA. NotBefore = now - 10 s; NotAfter = min(now + ttl, the active CA's notAfter).
    pub fn sign_x509_svid(
        &self,
        req: &X509SvidRequest<'_>,
        now: SystemTime,
    ) -> Result<IssuedX509Svid, CaError> {
        let ca = self.snapshot().x509_active.clone();
        ca.sign(&self.trust_domain, req, now)
    }

    /// Signs an ES256 JWT-SVID with the active JWT key: header exactly `alg`, `kid`,
    /// `typ: JWT`; claims `sub`, `aud` (a string when one audience, else an array), `exp`,
    /// `iat` (integers) and `jti`. `exp` = min(now + ttl, JWT key expiry).
    pub fn sign_jwt_svid(
        &self,
        spiffe_id: &SpiffeId,
        audience: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<IssuedJwtSvid, CaError> {
        let signer = self.snapshot().jwt_active.clone();
        signer.sign(&self.trust_domain, spiffe_id, audience, ttl, now)
    }

    /// As `sign_x509_svid`, with extra non-critical extensions (scope, delegation).
    pub fn sign_x509_svid_with_extensions(
        &self,
        req: &X509SvidRequest<'_>,
        extensions: &[crate::delegation::SvidExtension],
        now: SystemTime,
    ) -> Result<IssuedX509Svid, CaError> {
        let ca = self.snapshot().x509_active.clone();
        ca.sign_with_extensions(&self.trust_domain, req, extensions, now)
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
        let signer = self.snapshot().jwt_active.clone();
        signer.sign_with_claims(&self.trust_domain, spiffe_id, audience, ttl, now, extra)
    }
}

fn pick(infos: &[AuthorityInfo], kind: AuthorityKind) -> String {
    infos
        .iter()
        .find(|a| a.kind == kind)
        .map(|a| a.id.clone())
        .unwrap_or_default()
}

#[cfg(test)]
mod rotation_tests;
#[cfg(test)]
mod tests;
