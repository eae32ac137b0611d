//! Starting the CA from its key dir: [`CertificateAuthority::load_or_create`] and its steps.
//!
//! 1. [`load_stored`] reads what the key dir holds, in either layout.
//! 2. [`discard_unusable`] drops what can no longer be used and sorts the rest by state.
//! 3. [`ensure_active`] makes sure one X.509 CA and one JWT key are active, activating a
//!    prepared one or creating a new one.
//! 4. [`save_startup_set`] bumps the bundle sequence, writes the manifest and removes the
//!    files that are no longer needed.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use spiffe::TrustDomain;

use super::authorities::Authorities;
use super::{
    jwt, keystore, new_jwt, x509, AuthorityState, CaConfig, CaError, CertificateAuthority,
};
use crate::bundle::{Bundle, DEFAULT_REFRESH_HINT};
use crate::clock::{from_unix_seconds, unix_seconds, Clock};
use crate::keys::PrivateKey;

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

/// Everything the key dir holds, before it is checked.
struct Stored {
    x509: Vec<LoadedX509>,
    jwt: Vec<LoadedJwt>,
    /// The bundle sequence the key dir was last saved with.
    sequence: u64,
    /// The key dir is in the former single-CA layout and not empty: the manifest must be
    /// written and the legacy files removed.
    legacy: bool,
}

/// Authorities of one kind sorted by state: at most one active, at most one prepared, and
/// any number of old ones (an extra active or prepared one, which a consistent manifest never
/// holds, counts as old).
struct ByState<T> {
    active: Option<T>,
    prepared: Option<T>,
    old: Vec<T>,
}

impl<T> ByState<T> {
    fn new() -> Self {
        Self {
            active: None,
            prepared: None,
            old: Vec::new(),
        }
    }

    fn place(&mut self, state: AuthorityState, a: T) {
        match state {
            AuthorityState::Active if self.active.is_none() => self.active = Some(a),
            AuthorityState::Prepared if self.prepared.is_none() => self.prepared = Some(a),
            _ => self.old.push(a),
        }
    }
}

/// The stored authorities that can still be used, and those that cannot.
struct Usable {
    x509: ByState<Arc<x509::SigningCa>>,
    jwt: ByState<Arc<jwt::JwtSigner>>,
    /// Dropped authorities, whose files are removed once the new manifest is saved.
    dropped: Vec<(keystore::StoredKind, String)>,
}

/// The authorities after [`ensure_active`]: one of each kind is active.
struct Ensured {
    x509_active: Arc<x509::SigningCa>,
    x509_prepared: Option<Arc<x509::SigningCa>>,
    x509_old: Vec<Arc<x509::SigningCa>>,
    jwt_active: Arc<jwt::JwtSigner>,
    jwt_prepared: Option<Arc<jwt::JwtSigner>>,
    jwt_old: Vec<Arc<jwt::JwtSigner>>,
    /// An authority was activated or created.
    changed: bool,
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
        let store = keystore::KeyStore::open(&cfg.key_dir)?;
        let upstream = cfg
            .upstream
            .as_ref()
            .map(|u| x509::Upstream::load(u, now))
            .transpose()?;

        let stored = load_stored(&store)?;
        let usable = discard_unusable(stored.x509, stored.jwt, cfg, upstream.as_ref(), now)?;
        let ensured = ensure_active(usable.x509, usable.jwt, cfg, upstream.as_ref(), &store, now)?;
        let changed = !usable.dropped.is_empty() || ensured.changed;
        let auths = save_startup_set(
            ensured,
            StartupChanges {
                sequence: stored.sequence,
                legacy: stored.legacy,
                changed,
                dropped: &usable.dropped,
            },
            cfg,
            upstream.as_ref(),
            &store,
        )?;

        Ok(Self {
            trust_domain: cfg.trust_domain.clone(),
            organization: cfg.organization.clone(),
            ca_ttl: cfg.ca_ttl,
            upstream,
            store,
            current: RwLock::new(Arc::new(auths)),
            change: Mutex::new(()),
            changes: tokio::sync::watch::channel(0).0,
            peers: RwLock::default(),
            jwt_issuer: std::sync::OnceLock::new(),
        })
    }
}

/// Reads what the key dir holds: the manifest and the authorities it names, or, when there
/// is no manifest, the former single-CA layout (`x509-ca.pem`/`.key`, `jwt.json`/`.key`,
/// the state file). A legacy CA and JWT key are copied under their new names here (the same
/// key and certificate), so that the manifest written at the end names files that exist;
/// the legacy files go only after that manifest is saved.
///
/// Nothing is judged here beyond what makes the files unreadable: an X.509 authority whose
/// certificate's key identifier is not its id, or a legacy JWT `kid` that is not lowercase
/// hex, fails the start.
fn load_stored(store: &keystore::KeyStore) -> Result<Stored, CaError> {
    match store.load_manifest()? {
        Some(m) => load_manifest_layout(store, m),
        None => load_legacy_layout(store),
    }
}

/// The manifest layout: every authority the manifest names, with its key.
fn load_manifest_layout(
    store: &keystore::KeyStore,
    m: keystore::Manifest,
) -> Result<Stored, CaError> {
    let mut x509_loaded: Vec<LoadedX509> = Vec::new();
    let mut jwt_loaded: Vec<LoadedJwt> = Vec::new();
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
    Ok(Stored {
        x509: x509_loaded,
        jwt: jwt_loaded,
        sequence: m.sequence,
        legacy: false,
    })
}

/// The former single-CA layout: its CA and JWT key, both active, copied under their new
/// names. An empty key dir (first start) also lands here, and is not legacy.
fn load_legacy_layout(store: &keystore::KeyStore) -> Result<Stored, CaError> {
    let mut x509_loaded: Vec<LoadedX509> = Vec::new();
    let mut jwt_loaded: Vec<LoadedJwt> = Vec::new();
    let state = store.load_state()?;
    let sequence = state.sequence;
    let mut found = false;
    if let Some((cert_der, key)) = store.load_x509()? {
        found = true;
        let cert_path = store.path(keystore::X509_CERT);
        let id =
            x509::authority_id_of(&cert_der).map_err(|e| keystore::store_err(&cert_path, e))?;
        // Upgrade in place: the same key and certificate under the new names; the manifest
        // naming them is written at the end of the start, then the legacy files go.
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
    Ok(Stored {
        x509: x509_loaded,
        jwt: jwt_loaded,
        sequence,
        legacy: found || sequence != 0,
    })
}

/// Drops the stored authorities that can no longer be used, because nothing they signed
/// would be accepted for this trust domain: an X.509 CA whose certificate has expired,
/// names another trust domain, or does not match the configured upstream CA
/// (`x509::stored_cert_problem`), and an expired JWT key. Each is logged with a
/// warning and listed in [`Usable::dropped`]. The rest are turned into signers and sorted by
/// state. A certificate or key that cannot be read at all fails the start instead.
fn discard_unusable(
    x509_loaded: Vec<LoadedX509>,
    jwt_loaded: Vec<LoadedJwt>,
    cfg: &CaConfig,
    upstream: Option<&x509::Upstream>,
    now: SystemTime,
) -> Result<Usable, CaError> {
    let now_secs = unix_seconds(now);
    let mut dropped: Vec<(keystore::StoredKind, String)> = Vec::new();
    let mut x509 = ByState::new();
    for l in x509_loaded {
        let problem = x509::stored_cert_problem(&l.cert_der, &cfg.trust_domain, upstream, now)
            .map_err(|e| keystore::store_err(&l.cert_path, e))?;
        match problem {
            None => {}
            Some(x509::StoredCertProblem::Expired(problem)) => {
                tracing::warn!(path = %l.cert_path.display(), authority_id = %l.id, %problem, "dropping an expired X.509 authority (its files are kept)");
                dropped.push((keystore::StoredKind::X509, l.id));
                continue;
            }
            // A configuration that does not match the stored CA (a changed trust domain, a
            // removed or different upstream CA) is refused: replacing the CA would cut off
            // every node and relying party, and its keys are never deleted implicitly.
            Some(x509::StoredCertProblem::Mismatch(problem)) => {
                return Err(CaError::StoredAuthorityMismatch {
                    path: l.cert_path.display().to_string(),
                    authority_id: l.id,
                    problem,
                });
            }
        }
        let ca = x509::SigningCa::new(l.cert_der, &l.key, &cfg.organization, upstream.is_some())
            .map_err(|e| keystore::store_err(&l.cert_path, e))?;
        drop(l.key);
        x509.place(l.state, Arc::new(ca));
    }
    let mut jwt = ByState::new();
    for l in jwt_loaded {
        if l.not_after <= now_secs {
            tracing::warn!(kid = %l.kid, "dropping an expired JWT key");
            dropped.push((keystore::StoredKind::Jwt, l.kid));
            continue;
        }
        let signer = Arc::new(jwt::JwtSigner::new(
            l.kid,
            &l.key,
            from_unix_seconds(l.not_after),
        )?);
        jwt.place(l.state, signer);
    }
    Ok(Usable { x509, jwt, dropped })
}

/// Makes sure one X.509 CA and one JWT key are active, so that the CA can sign from the
/// first request on. The X.509 CA: the stored active one, else the prepared one (activated,
/// with a warning), else a new CA (created and its files saved). A new CA always comes with
/// a new JWT key of the same lifetime, the previous active key staying published as old
/// until it expires. Otherwise the JWT key: the stored active one, else the prepared one
/// (activated), else a new key.
fn ensure_active(
    mut x509: ByState<Arc<x509::SigningCa>>,
    mut jwt: ByState<Arc<jwt::JwtSigner>>,
    cfg: &CaConfig,
    upstream: Option<&x509::Upstream>,
    store: &keystore::KeyStore,
    now: SystemTime,
) -> Result<Ensured, CaError> {
    let td = &cfg.trust_domain;
    let mut changed = false;
    let mut new_x509 = false;
    let x509_active = match (x509.active, x509.prepared.take()) {
        (Some(a), prepared) => {
            x509.prepared = prepared;
            a
        }
        (None, Some(p)) => {
            tracing::warn!(authority_id = %p.authority_id, "no usable active X.509 authority: activating the prepared one");
            changed = true;
            p
        }
        (None, None) => {
            let key = PrivateKey::generate()?;
            let cert = x509::new_ca_cert(td, &cfg.organization, &key, upstream, now, cfg.ca_ttl)?;
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
        if let Some(a) = jwt.active.take() {
            jwt.old.push(a);
        }
    }
    let jwt_active = match (jwt.active, jwt.prepared.take()) {
        (Some(a), prepared) => {
            jwt.prepared = prepared;
            a
        }
        (None, Some(p)) if !new_x509 => {
            tracing::warn!(kid = %p.kid(), "no usable active JWT key: activating the prepared one");
            changed = true;
            p
        }
        (None, prepared) => {
            jwt.prepared = prepared;
            let (signer, key) = new_jwt(x509_active.not_after)?;
            store.save_jwt_authority(signer.kid(), &key)?;
            tracing::info!(kid = %signer.kid(), "created a new JWT signing key");
            changed = true;
            Arc::new(signer)
        }
    };
    Ok(Ensured {
        x509_active,
        x509_prepared: x509.prepared,
        x509_old: x509.old,
        jwt_active,
        jwt_prepared: jwt.prepared,
        jwt_old: jwt.old,
        changed,
    })
}

/// What the earlier steps found that [`save_startup_set`] must record.
struct StartupChanges<'a> {
    /// The stored bundle sequence.
    sequence: u64,
    /// The key dir was in the former layout.
    legacy: bool,
    /// An authority was dropped, activated or created.
    changed: bool,
    /// The dropped authorities.
    dropped: &'a [(keystore::StoredKind, String)],
}

/// Records the start: the bundle sequence bumps when the set changed (and on first start,
/// so that no bundle has sequence 0), the manifest is written when anything is new, and only
/// then do the legacy files and the dropped authorities' files go, so that every file the
/// saved manifest names exists.
fn save_startup_set(
    ensured: Ensured,
    changes: StartupChanges<'_>,
    cfg: &CaConfig,
    upstream: Option<&x509::Upstream>,
    store: &keystore::KeyStore,
) -> Result<Authorities, CaError> {
    let td: &TrustDomain = &cfg.trust_domain;
    let mut sequence = changes.sequence;
    let bumped = changes.changed || sequence == 0;
    if bumped {
        sequence += 1;
    }
    let mut auths = Authorities {
        x509_active: ensured.x509_active,
        x509_prepared: ensured.x509_prepared,
        x509_old: ensured.x509_old,
        jwt_active: ensured.jwt_active,
        jwt_prepared: ensured.jwt_prepared,
        jwt_old: ensured.jwt_old,
        sequence,
        bundle: Bundle {
            trust_domain: td.clone(),
            x509_authorities: Vec::new(),
            jwt_authorities: Vec::new(),
            sequence,
            refresh_hint: DEFAULT_REFRESH_HINT,
        },
    };
    auths.build_bundle(td, upstream);
    if changes.legacy || changes.changed || bumped {
        store.save_manifest(&auths.manifest())?;
    }
    if changes.legacy {
        store.remove_legacy_files();
        tracing::info!(dir = %cfg.key_dir.display(), "upgraded the CA key directory to the multi-authority layout");
    }
    // Dropped (expired) authorities leave the manifest, but their key files stay: key
    // material is deleted only by an explicit command (`revoke authority`, pruning).
    for (kind, id) in changes.dropped {
        tracing::info!(?kind, authority_id = %id, dir = %cfg.key_dir.display(), "expired authority left out of the manifest; its files are kept");
    }
    Ok(auths)
}
