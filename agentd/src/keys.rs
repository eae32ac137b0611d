//! Private keys held in zeroizing memory, and the CSRs made from them.
//!
//! Keys are ECDSA P-256. A key never appears in Debug output or logs; on disk it is written
//! with mode 0600 (see [`write_secret_file`]).

use std::io::Write;
use std::path::Path;

use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{
    EcdsaKeyPair, EcdsaSigningAlgorithm, KeyPair, ECDSA_P256_SHA256_ASN1_SIGNING,
    ECDSA_P256_SHA256_FIXED_SIGNING,
};
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

/// DER prefix of a P-256 SubjectPublicKeyInfo (id-ecPublicKey, prime256v1, BIT STRING of 66
/// bytes); the 65-byte uncompressed point follows.
pub(crate) const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// SubjectPublicKeyInfo DER for an uncompressed P-256 point (65 bytes, `04 || x || y`).
pub fn p256_spki_der(point: &[u8]) -> Vec<u8> {
    let mut spki = Vec::with_capacity(P256_SPKI_PREFIX.len() + point.len());
    spki.extend_from_slice(&P256_SPKI_PREFIX);
    spki.extend_from_slice(point);
    spki
}

/// The uncompressed EC point of a P-256 SubjectPublicKeyInfo, if `spki` is one.
pub fn p256_point_from_spki(spki: &[u8]) -> Option<&[u8]> {
    let point = spki.strip_prefix(&P256_SPKI_PREFIX[..])?;
    (point.len() == 65 && point[0] == 0x04).then_some(point)
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
        let rng = SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
            .map_err(|_| KeyError::Generate)?;
        Ok(Self {
            pkcs8: Zeroizing::new(doc.as_ref().to_vec()),
        })
    }

    /// Parses (and checks) a PKCS#8 DER P-256 key.
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, KeyError> {
        let key = Self {
            pkcs8: Zeroizing::new(der.to_vec()),
        };
        key.ecdsa_key_pair(&ECDSA_P256_SHA256_ASN1_SIGNING)?;
        Ok(key)
    }

    /// Parses a PEM `PRIVATE KEY` (PKCS#8); also accepts `EC PRIVATE KEY` (SEC1).
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        let mut rest = pem.as_bytes();
        loop {
            let item =
                rustls_pemfile::read_one_from_slice(rest).map_err(|e| KeyError::Invalid {
                    reason: format!("PEM: {e:?}"),
                })?;
            let Some((item, next)) = item else {
                return Err(KeyError::Invalid {
                    reason: "no PRIVATE KEY or EC PRIVATE KEY block in the PEM".into(),
                });
            };
            rest = next;
            match item {
                rustls_pemfile::Item::Pkcs8Key(k) => {
                    return Self::from_pkcs8_der(k.secret_pkcs8_der())
                }
                rustls_pemfile::Item::Sec1Key(k) => {
                    return Self::from_sec1_der(k.secret_sec1_der())
                }
                rustls_pemfile::Item::Pkcs1Key(_) => {
                    return Err(KeyError::Invalid {
                        reason: "an RSA key (RSA PRIVATE KEY) is not a P-256 key".into(),
                    })
                }
                _ => continue,
            }
        }
    }

    /// Parses a SEC1 `ECPrivateKey` (RFC 5915; it must carry the public key) by wrapping it
    /// in PKCS#8.
    pub fn from_sec1_der(sec1: &[u8]) -> Result<Self, KeyError> {
        let pkcs8 = agentd_attestor::node::agent::p256_sec1_to_pkcs8(sec1);
        Self::from_pkcs8_der(&pkcs8).map_err(|e| match e {
            KeyError::Invalid { reason } => KeyError::Invalid {
                reason: format!(
                    "SEC1 EC PRIVATE KEY (must be P-256 and include the public key): {reason}"
                ),
            },
            other => other,
        })
    }

    pub fn pkcs8_der(&self) -> &[u8] {
        &self.pkcs8
    }

    /// PEM `PRIVATE KEY`, in zeroizing memory.
    pub fn to_pem(&self) -> Zeroizing<String> {
        pem_encode_secret("PRIVATE KEY", &self.pkcs8)
    }

    /// SubjectPublicKeyInfo DER of the public half.
    pub fn public_key_spki_der(&self) -> Vec<u8> {
        p256_spki_der(&self.public_key_point())
    }

    /// The uncompressed public point (65 bytes, `04 || x || y`).
    pub fn public_key_point(&self) -> Vec<u8> {
        // The key was checked when it was made, so this only fails on a broken invariant;
        // an empty point then makes every later use fail loudly rather than panic.
        self.ecdsa_key_pair(&ECDSA_P256_SHA256_ASN1_SIGNING)
            .map(|kp| kp.public_key().as_ref().to_vec())
            .unwrap_or_default()
    }

    /// The key as a ring ECDSA key pair for `alg` (ASN.1 signatures for X.509, fixed-size
    /// for JWS).
    pub fn ecdsa_key_pair(
        &self,
        alg: &'static EcdsaSigningAlgorithm,
    ) -> Result<EcdsaKeyPair, KeyError> {
        EcdsaKeyPair::from_pkcs8(alg, &self.pkcs8, &SystemRandom::new()).map_err(|e| {
            KeyError::Invalid {
                reason: e.to_string(),
            }
        })
    }

    /// A signer for X.509 certificates and CSRs (ecdsa-with-SHA256).
    pub fn cert_signer(&self) -> Result<CertSigner, KeyError> {
        let key_pair = self.ecdsa_key_pair(&ECDSA_P256_SHA256_ASN1_SIGNING)?;
        let public_point = key_pair.public_key().as_ref().to_vec();
        Ok(CertSigner {
            key_pair,
            public_point,
            rng: SystemRandom::new(),
        })
    }

    /// A signer for ES256 JWS (fixed-size `r || s` signatures).
    pub fn jws_key_pair(&self) -> Result<EcdsaKeyPair, KeyError> {
        self.ecdsa_key_pair(&ECDSA_P256_SHA256_FIXED_SIGNING)
    }

    /// A PKCS#10 CSR (DER) signed by this key. The subject carries no meaning: the server
    /// takes only the public key from a CSR and decides every other field itself.
    pub fn csr_der(&self) -> Result<Vec<u8>, KeyError> {
        let signer = self.cert_signer().map_err(|e| KeyError::Csr {
            reason: e.to_string(),
        })?;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr = params
            .serialize_request(&signer)
            .map_err(|e| KeyError::Csr {
                reason: e.to_string(),
            })?;
        Ok(csr.der().to_vec())
    }

    /// Loads a key file (PEM or DER).
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let bytes = Zeroizing::new(std::fs::read(path).map_err(|source| KeyError::Io {
            path: path.display().to_string(),
            source,
        })?);
        let parsed = if bytes.first() == Some(&0x30) {
            Self::from_pkcs8_der(&bytes).or_else(|_| Self::from_sec1_der(&bytes))
        } else {
            match std::str::from_utf8(&bytes) {
                Ok(pem) => Self::from_pem(pem),
                Err(_) => Err(KeyError::Invalid {
                    reason: "neither PEM text nor DER".into(),
                }),
            }
        };
        parsed.map_err(|e| match e {
            KeyError::Invalid { reason } => KeyError::Invalid {
                reason: format!("{}: {reason}", path.display()),
            },
            other => other,
        })
    }

    /// Writes the key as PEM with mode 0600 (atomically: temp file + rename).
    pub fn save(&self, path: &Path) -> Result<(), KeyError> {
        write_secret_file(path, self.to_pem().as_bytes())
    }
}

/// A P-256 key ready to sign certificates and CSRs through rcgen (ecdsa-with-SHA256).
/// Debug output never shows the key.
pub struct CertSigner {
    key_pair: EcdsaKeyPair,
    public_point: Vec<u8>,
    rng: SystemRandom,
}

impl std::fmt::Debug for CertSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertSigner(<redacted>)")
    }
}

impl CertSigner {
    /// The uncompressed public point.
    pub fn public_point(&self) -> &[u8] {
        &self.public_point
    }
}

impl rcgen::PublicKeyData for CertSigner {
    fn der_bytes(&self) -> &[u8] {
        &self.public_point
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl rcgen::SigningKey for CertSigner {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.key_pair
            .sign(&self.rng, msg)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| rcgen::Error::RingUnspecified)
    }
}

/// PEM-encodes `der` under `label` (64-column lines, LF endings).
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    let mut out = String::new();
    pem_encode_into(&mut out, label, der, &mut String::new());
    out
}

/// PEM of secret material (a private key), built in zeroizing memory.
pub fn pem_encode_secret(label: &str, der: &[u8]) -> Zeroizing<String> {
    let b64_len = der.len().div_ceil(3) * 4;
    // Reserve up front so that no reallocation leaves copies of the key behind.
    let mut b64 = Zeroizing::new(String::with_capacity(b64_len));
    let mut out = Zeroizing::new(String::with_capacity(
        b64_len + b64_len / 64 + 2 * label.len() + 40,
    ));
    pem_encode_into(&mut out, label, der, &mut b64);
    out
}

fn pem_encode_into(out: &mut String, label: &str, der: &[u8], b64: &mut String) {
    base64::engine::general_purpose::STANDARD.encode_string(der, b64);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    let mut rest = b64.as_str();
    while !rest.is_empty() {
        let (line, tail) = rest.split_at(rest.len().min(64));
        out.push_str(line);
        out.push('\n');
        rest = tail;
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
}

/// Writes `contents` to `path` with mode 0600, atomically (temp file in the same directory,
/// fsync, rename), so a crash never leaves a half-written key.
pub fn write_secret_file(path: &Path, contents: &[u8]) -> Result<(), KeyError> {
    write_file_atomic(path, contents, 0o600)
}

/// Writes `contents` to `path` with `mode`, atomically (temp file in the same directory,
/// fsync, rename, fsync of the directory). Missing parent directories are created with
/// mode 0700.
pub fn write_file_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), KeyError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};

    let io_err = |p: &Path| {
        let p = p.display().to_string();
        move |source| KeyError::Io { path: p, source }
    };
    let file_name = path.file_name().ok_or_else(|| KeyError::Io {
        path: path.display().to_string(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"),
    })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err(&dir))?;
    }
    let tmp = dir.join(format!(
        ".{}.tmp.{}.{}",
        file_name.to_string_lossy(),
        std::process::id(),
        hex::encode(rand::random::<[u8; 6]>())
    ));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        // The umask may have narrowed the mode; set it exactly.
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(io_err(&tmp))?;
        file.write_all(contents).map_err(io_err(&tmp))?;
        file.sync_all().map_err(io_err(&tmp))?;
        drop(file);
        std::fs::rename(&tmp, path).map_err(io_err(path))?;
        if let Ok(d) = std::fs::File::open(&dir) {
            // Best effort: persist the rename itself.
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn generate_pem_round_trip_and_spki() {
        let key = PrivateKey::generate().unwrap();
        let pem = key.to_pem();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let again = PrivateKey::from_pem(&pem).unwrap();
        assert_eq!(again.pkcs8_der(), key.pkcs8_der());
        let spki = key.public_key_spki_der();
        assert_eq!(spki.len(), 91);
        assert_eq!(
            p256_point_from_spki(&spki).unwrap(),
            &key.public_key_point()[..]
        );
        // Cross-check the SPKI with rcgen's own encoding.
        let kp = rcgen::KeyPair::try_from(key.pkcs8_der()).unwrap();
        assert_eq!(rcgen::PublicKeyData::subject_public_key_info(&kp), spki);
    }

    #[test]
    fn debug_never_shows_key_material() {
        let key = PrivateKey::generate().unwrap();
        let hex_key = hex::encode(key.pkcs8_der());
        for dbg in [
            format!("{key:?}"),
            format!("{:?}", key.cert_signer().unwrap()),
        ] {
            assert!(dbg.contains("redacted"), "{dbg}");
            assert!(!dbg.contains(&hex_key[hex_key.len() - 16..]));
            assert!(dbg.len() < 40);
        }
    }

    #[test]
    fn sec1_pem_is_accepted() {
        // ring writes PKCS#8 v1 as 30 81 87 | 02 01 00 | AlgorithmIdentifier (21) | 04 6d
        // followed by the SEC1 ECPrivateKey, which is what `EC PRIVATE KEY` PEM holds.
        let key = PrivateKey::generate().unwrap();
        let der = key.pkcs8_der();
        assert_eq!(&der[27..29], &[0x04, 0x6d]);
        let sec1 = &der[29..];
        let parsed = PrivateKey::from_pem(&pem_encode("EC PRIVATE KEY", sec1)).unwrap();
        assert_eq!(parsed.public_key_point(), key.public_key_point());

        // And one written by OpenSSL (with the [0] curve parameters). Without openssl the
        // test fails and says so: scripts/install-tools.sh (run by `make test`) installs it.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ec.pem");
        let status = std::process::Command::new("openssl")
            .args([
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
            ])
            .arg(&path)
            .status()
            .unwrap_or_else(|e| {
                panic!("the openssl binary is missing ({e}): this test reads a key OpenSSL wrote; install it (scripts/install-tools.sh)")
            });
        assert!(status.success(), "openssl ecparam -genkey failed: {status}");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("EC PRIVATE KEY"));
        PrivateKey::load(&path).unwrap();
    }

    #[test]
    fn bad_keys_are_refused_with_a_reason() {
        assert!(matches!(
            PrivateKey::from_pkcs8_der(b"garbage"),
            Err(KeyError::Invalid { .. })
        ));
        assert!(PrivateKey::from_pem("no pem here").is_err());
        let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let err = PrivateKey::from_pem(&ed.serialize_pem()).unwrap_err();
        assert!(err.to_string().contains("not a valid"), "{err}");
    }

    #[test]
    fn csr_carries_the_public_key_and_verifies() {
        let key = PrivateKey::generate().unwrap();
        let csr = key.csr_der().unwrap();
        let params =
            rcgen::CertificateSigningRequestParams::from_der(&csr.as_slice().into()).unwrap();
        assert_eq!(
            rcgen::PublicKeyData::der_bytes(&params.public_key),
            &key.public_key_point()[..]
        );
    }

    #[test]
    fn key_files_are_0600_and_load_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/dir/key.pem");
        let key = PrivateKey::generate().unwrap();
        key.save(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dmode, 0o700);
        let loaded = PrivateKey::load(&path).unwrap();
        assert_eq!(loaded.pkcs8_der(), key.pkcs8_der());
        // Overwriting keeps 0600 and leaves no temp files behind.
        key.save(&path).unwrap();
        let entries: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(entries.len(), 1);
        // DER works too.
        let der_path = dir.path().join("key.der");
        write_secret_file(&der_path, key.pkcs8_der()).unwrap();
        assert_eq!(
            PrivateKey::load(&der_path).unwrap().pkcs8_der(),
            key.pkcs8_der()
        );
        let err = PrivateKey::load(&dir.path().join("missing")).unwrap_err();
        assert!(err.to_string().contains("missing"));
    }
}
