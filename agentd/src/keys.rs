//! Private keys held in zeroizing memory, and the CSRs made from them.
//!
//! Keys are ECDSA P-256. A key never appears in Debug output or logs; on disk it is written
//! with mode 0600 (see [`write_secret_file`]).

use std::path::Path;

use zeroize::Zeroizing;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("generating a P-256 key failed")]
    Generate,
    #[error("the key is not a valid PKCS#8 P-256 key: {reason}")]
    Invalid { reason: String },
    #[error("building the CSR failed: {reason}")]
    Csr { reason: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// An ECDSA P-256 private key as unencrypted PKCS#8 DER, wiped from memory on drop.
pub struct PrivateKey {
    pkcs8: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

impl PrivateKey {
    /// A fresh P-256 key from the system's secure random source.
    pub fn generate() -> Result<Self, KeyError> {
        todo!("CA helper")
    }

    /// Parses (and checks) a PKCS#8 DER P-256 key.
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, KeyError> {
        let _ = der;
        todo!("CA helper")
    }

    /// Parses a PEM `PRIVATE KEY` (PKCS#8); also accepts `EC PRIVATE KEY` (SEC1).
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        let _ = pem;
        todo!("CA helper")
    }

    pub fn pkcs8_der(&self) -> &[u8] {
        &self.pkcs8
    }

    /// PEM `PRIVATE KEY`, in zeroizing memory.
    pub fn to_pem(&self) -> Zeroizing<String> {
        todo!("CA helper")
    }

    /// SubjectPublicKeyInfo DER of the public half.
    pub fn public_key_spki_der(&self) -> Vec<u8> {
        todo!("CA helper")
    }

    /// A PKCS#10 CSR (DER) signed by this key. The subject carries no meaning: the server
    /// takes only the public key from a CSR and decides every other field itself.
    pub fn csr_der(&self) -> Result<Vec<u8>, KeyError> {
        todo!("CA helper")
    }

    /// Loads a key file (PEM or DER).
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let _ = path;
        todo!("CA helper")
    }

    /// Writes the key as PEM with mode 0600 (atomically: temp file + rename).
    pub fn save(&self, path: &Path) -> Result<(), KeyError> {
        write_secret_file(path, self.to_pem().as_bytes())
    }
}

/// Writes `contents` to `path` with mode 0600, atomically (temp file in the same directory,
/// fsync, rename), so a crash never leaves a half-written key.
pub fn write_secret_file(path: &Path, contents: &[u8]) -> Result<(), KeyError> {
    let _ = (path, contents);
    todo!("CA helper")
}
