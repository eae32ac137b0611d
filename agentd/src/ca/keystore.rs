//! The CA's files in the key directory.
//!
//! Current layout (several authorities, see `docs/ca.md`): `authorities.json` (the manifest:
//! bundle sequence and every authority with its kind, id, state and expiry), and per
//! authority `x509-<id>.key` + `x509-<id>.pem` or `jwt-<id>.key` (keys PEM PKCS#8, mode
//! 0600). The manifest is the source of truth: key files are written before it names them
//! and removed only after it stops naming them, so a crash leaves at worst an unreferenced
//! file, never a manifest naming a missing key.
//!
//! Legacy single-CA layout, read once to upgrade in place: `x509-ca.key` / `jwt.key`,
//! `x509-ca.pem` (the signing CA certificate), `jwt.json` (kid and expiry of the JWT key) and
//! `bundle.json` (the bundle sequence number).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::CaError;
use crate::keys::{write_file_atomic, PrivateKey};

pub(crate) const X509_KEY: &str = "x509-ca.key";
pub(crate) const X509_CERT: &str = "x509-ca.pem";
pub(crate) const JWT_KEY: &str = "jwt.key";
pub(crate) const JWT_META: &str = "jwt.json";
pub(crate) const STATE: &str = "bundle.json";
pub(crate) const MANIFEST: &str = "authorities.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct JwtMeta {
    pub kid: String,
    /// Unix seconds.
    pub not_after: i64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct State {
    pub sequence: u64,
}

pub(crate) fn store_err(path: &Path, reason: impl std::fmt::Display) -> CaError {
    CaError::Store {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

#[derive(Debug)]
pub(crate) struct KeyStore {
    dir: PathBuf,
}

impl KeyStore {
    pub fn open(dir: &Path) -> Result<Self, CaError> {
        use std::os::unix::fs::DirBuilderExt;
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| store_err(dir, format!("creating the directory: {e}")))?;
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn read_opt(&self, name: &str) -> Result<Option<Vec<u8>>, CaError> {
        let path = self.path(name);
        match std::fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(store_err(&path, e)),
        }
    }

    fn key_opt(&self, name: &str) -> Result<Option<PrivateKey>, CaError> {
        let path = self.path(name);
        if !path.exists() {
            return Ok(None);
        }
        PrivateKey::load(&path)
            .map(Some)
            .map_err(|e| store_err(&path, e))
    }

    fn write(&self, name: &str, contents: &[u8], mode: u32) -> Result<(), CaError> {
        let path = self.path(name);
        write_file_atomic(&path, contents, mode).map_err(|e| store_err(&path, e))
    }

    fn save_key(&self, name: &str, key: &PrivateKey) -> Result<(), CaError> {
        let path = self.path(name);
        key.save(&path).map_err(|e| store_err(&path, e))
    }

    /// The stored X.509 CA (certificate DER and key), if both files are there.
    pub fn load_x509(&self) -> Result<Option<(Vec<u8>, PrivateKey)>, CaError> {
        let cert_pem = self.read_opt(X509_CERT)?;
        let key = self.key_opt(X509_KEY)?;
        match (cert_pem, key) {
            (Some(pem), Some(key)) => {
                let path = self.path(X509_CERT);
                let text = String::from_utf8(pem).map_err(|_| store_err(&path, "not PEM text"))?;
                let mut certs = crate::bundle::Bundle::x509_authorities_from_pem(&text)
                    .map_err(|e| store_err(&path, e))?;
                if certs.len() != 1 {
                    return Err(store_err(
                        &path,
                        format!("expected one certificate, found {}", certs.len()),
                    ));
                }
                Ok(Some((certs.remove(0), key)))
            }
            (None, None) => Ok(None),
            (cert, _) => {
                tracing::warn!(
                    dir = %self.dir.display(),
                    missing = if cert.is_none() { X509_CERT } else { X509_KEY },
                    "incomplete X.509 CA files; a new CA will be created"
                );
                Ok(None)
            }
        }
    }

    pub fn load_jwt(&self) -> Result<Option<(JwtMeta, PrivateKey)>, CaError> {
        let meta = self.read_opt(JWT_META)?;
        let key = self.key_opt(JWT_KEY)?;
        match (meta, key) {
            (Some(meta), Some(key)) => {
                let path = self.path(JWT_META);
                let meta: JwtMeta =
                    serde_json::from_slice(&meta).map_err(|e| store_err(&path, e))?;
                if meta.kid.is_empty() {
                    return Err(store_err(&path, "empty kid"));
                }
                Ok(Some((meta, key)))
            }
            (None, None) => Ok(None),
            (meta, _) => {
                tracing::warn!(
                    dir = %self.dir.display(),
                    missing = if meta.is_none() { JWT_META } else { JWT_KEY },
                    "incomplete JWT key files; a new JWT key will be created"
                );
                Ok(None)
            }
        }
    }

    pub fn load_state(&self) -> Result<State, CaError> {
        match self.read_opt(STATE)? {
            None => Ok(State::default()),
            Some(b) => serde_json::from_slice(&b).map_err(|e| store_err(&self.path(STATE), e)),
        }
    }
}

/// Which kind of key an authority is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum StoredKind {
    X509,
    Jwt,
}

/// One authority as the manifest records it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StoredAuthority {
    pub kind: StoredKind,
    /// SKI hex (X.509) or kid (JWT); lowercase hex, also the file name stem.
    pub id: String,
    pub state: super::AuthorityState,
    /// Unix seconds.
    pub not_after: i64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Manifest {
    pub sequence: u64,
    pub authorities: Vec<StoredAuthority>,
}

/// Ids become file names: only lowercase hex, 2 to 128 characters.
pub(crate) fn id_is_safe(id: &str) -> bool {
    (2..=128).contains(&id.len()) && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl KeyStore {
    pub fn x509_key_name(id: &str) -> String {
        format!("x509-{id}.key")
    }

    pub fn x509_cert_name(id: &str) -> String {
        format!("x509-{id}.pem")
    }

    pub fn jwt_key_name(id: &str) -> String {
        format!("jwt-{id}.key")
    }

    /// The manifest, or None when the directory has the legacy layout (or nothing).
    pub fn load_manifest(&self) -> Result<Option<Manifest>, CaError> {
        let path = self.path(MANIFEST);
        let Some(bytes) = self.read_opt(MANIFEST)? else {
            return Ok(None);
        };
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| store_err(&path, e))?;
        for a in &m.authorities {
            if !id_is_safe(&a.id) {
                return Err(store_err(
                    &path,
                    format!("authority id {:?} is not lowercase hex", a.id),
                ));
            }
        }
        Ok(Some(m))
    }

    pub fn save_manifest(&self, m: &Manifest) -> Result<(), CaError> {
        let json = serde_json::to_vec_pretty(m).map_err(|e| store_err(&self.path(MANIFEST), e))?;
        self.write(MANIFEST, &json, 0o644)
    }

    /// An X.509 authority's certificate (DER) and key; a missing file is an error naming it.
    pub fn load_x509_authority(&self, id: &str) -> Result<(Vec<u8>, PrivateKey), CaError> {
        let cert_name = Self::x509_cert_name(id);
        let key_name = Self::x509_key_name(id);
        let path = self.path(&cert_name);
        let pem = self
            .read_opt(&cert_name)?
            .ok_or_else(|| store_err(&path, "missing"))?;
        let text = String::from_utf8(pem).map_err(|_| store_err(&path, "not PEM text"))?;
        let mut certs = crate::bundle::Bundle::x509_authorities_from_pem(&text)
            .map_err(|e| store_err(&path, e))?;
        if certs.len() != 1 {
            return Err(store_err(
                &path,
                format!("expected one certificate, found {}", certs.len()),
            ));
        }
        let key = self
            .key_opt(&key_name)?
            .ok_or_else(|| store_err(&self.path(&key_name), "missing"))?;
        Ok((certs.remove(0), key))
    }

    pub fn save_x509_authority(
        &self,
        id: &str,
        cert_der: &[u8],
        key: &PrivateKey,
    ) -> Result<(), CaError> {
        self.save_key(&Self::x509_key_name(id), key)?;
        self.write(
            &Self::x509_cert_name(id),
            crate::keys::pem_encode("CERTIFICATE", cert_der).as_bytes(),
            0o644,
        )
    }

    pub fn load_jwt_authority(&self, id: &str) -> Result<PrivateKey, CaError> {
        let name = Self::jwt_key_name(id);
        self.key_opt(&name)?
            .ok_or_else(|| store_err(&self.path(&name), "missing"))
    }

    pub fn save_jwt_authority(&self, id: &str, key: &PrivateKey) -> Result<(), CaError> {
        self.save_key(&Self::jwt_key_name(id), key)
    }

    /// Removes an authority's files (after the manifest stopped naming it). Failures only
    /// warn: an unreferenced file is harmless.
    pub fn remove_authority_files(&self, kind: StoredKind, id: &str) {
        let names = match kind {
            StoredKind::X509 => vec![Self::x509_key_name(id), Self::x509_cert_name(id)],
            StoredKind::Jwt => vec![Self::jwt_key_name(id)],
        };
        for name in names {
            self.remove_file(&name);
        }
    }

    /// Removes the legacy single-CA files once the manifest has taken over.
    pub fn remove_legacy_files(&self) {
        for name in [X509_KEY, X509_CERT, JWT_KEY, JWT_META, STATE] {
            self.remove_file(name);
        }
    }

    fn remove_file(&self, name: &str) {
        let path = self.path(name);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "removing a CA file failed")
            }
        }
    }
}
