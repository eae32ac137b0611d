//! The CA's files in the key directory: `x509-ca.key` / `jwt.key` (PEM PKCS#8, mode 0600),
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

    pub fn save_x509(&self, cert_der: &[u8], key: &PrivateKey) -> Result<(), CaError> {
        // Key first: a crash in between leaves a key without a certificate, which is
        // detected as incomplete and replaced.
        self.save_key(X509_KEY, key)?;
        self.write(
            X509_CERT,
            crate::keys::pem_encode("CERTIFICATE", cert_der).as_bytes(),
            0o644,
        )
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

    pub fn save_jwt(&self, meta: &JwtMeta, key: &PrivateKey) -> Result<(), CaError> {
        self.save_key(JWT_KEY, key)?;
        let json =
            serde_json::to_vec_pretty(meta).map_err(|e| store_err(&self.path(JWT_META), e))?;
        self.write(JWT_META, &json, 0o644)
    }

    pub fn load_state(&self) -> Result<State, CaError> {
        match self.read_opt(STATE)? {
            None => Ok(State::default()),
            Some(b) => serde_json::from_slice(&b).map_err(|e| store_err(&self.path(STATE), e)),
        }
    }

    pub fn save_state(&self, state: &State) -> Result<(), CaError> {
        let json = serde_json::to_vec_pretty(state).map_err(|e| store_err(&self.path(STATE), e))?;
        self.write(STATE, &json, 0o644)
    }
}
