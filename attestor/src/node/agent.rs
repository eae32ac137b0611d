//! The node agent's half of node attestation: which attestor to use (join token, x509pop or
//! platform claims) and the material each sends. Files are read at attestation time, so a
//! rotated certificate or a re-issued platform token is picked up on the next attestation.

use std::path::{Path, PathBuf};

use ring::rand::SystemRandom;
use ring::signature::{
    EcdsaKeyPair, Ed25519KeyPair, RsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING,
    ECDSA_P384_SHA384_ASN1_SIGNING, RSA_PKCS1_SHA256,
};

use zeroize::Zeroizing;

/// Largest certificate, key or token file read.
const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// Why the node agent could not put its attestation together.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeAttestorError {
    /// A certificate, key or token file could not be read.
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A file was read but holds nothing usable (too large, empty, not PEM, no key).
    #[error("{what} {path}: {reason}")]
    Invalid {
        what: &'static str,
        path: String,
        reason: String,
    },
    /// The x509pop key could not sign the challenge.
    #[error("signing the x509pop challenge failed")]
    Sign,
}

/// How this node agent attests, from its config and flags. `Debug` leaves the join token
/// out: a token must never reach a log line.
#[derive(Clone, PartialEq, Eq)]
pub enum AttestorConfig {
    JoinToken(String),
    X509Pop {
        cert_file: PathBuf,
        key_file: PathBuf,
    },
    Claims {
        token_file: PathBuf,
    },
}

impl std::fmt::Debug for AttestorConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttestorConfig::JoinToken(_) => f.write_str("JoinToken(<redacted>)"),
            AttestorConfig::X509Pop {
                cert_file,
                key_file,
            } => f
                .debug_struct("X509Pop")
                .field("cert_file", cert_file)
                .field("key_file", key_file)
                .finish(),
            AttestorConfig::Claims { token_file } => f
                .debug_struct("Claims")
                .field("token_file", token_file)
                .finish(),
        }
    }
}

impl AttestorConfig {
    pub fn name(&self) -> &'static str {
        match self {
            AttestorConfig::JoinToken(_) => "join_token",
            AttestorConfig::X509Pop { .. } => "x509pop",
            AttestorConfig::Claims { .. } => "claims",
        }
    }
}

fn read(what: &'static str, path: &Path) -> Result<String, NodeAttestorError> {
    let io = |source| NodeAttestorError::Io {
        what,
        path: path.display().to_string(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(NodeAttestorError::Invalid {
            what,
            path: path.display().to_string(),
            reason: format!("{} bytes; at most {MAX_FILE_BYTES}", meta.len()),
        });
    }
    std::fs::read_to_string(path).map_err(io)
}

/// Reads the platform token (trimmed).
pub fn read_token(path: &Path) -> Result<String, NodeAttestorError> {
    let token = read("claims token_file", path)?.trim().to_string();
    if token.is_empty() {
        return Err(NodeAttestorError::Invalid {
            what: "claims token_file",
            path: path.display().to_string(),
            reason: "empty".into(),
        });
    }
    Ok(token)
}

/// Reads a PEM certificate chain, leaf first.
pub fn read_cert_chain(path: &Path) -> Result<Vec<Vec<u8>>, NodeAttestorError> {
    let text = read("x509pop cert_file", path)?;
    let invalid = |reason: String| NodeAttestorError::Invalid {
        what: "x509pop cert_file",
        path: path.display().to_string(),
        reason,
    };
    let certs = rustls_pemfile::certs(&mut text.as_bytes())
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("PEM: {e}")))?;
    if certs.is_empty() {
        return Err(invalid("no CERTIFICATE block".into()));
    }
    Ok(certs)
}

/// The private key of the x509pop certificate: ECDSA P-256/P-384, Ed25519 or RSA.
pub enum PopKey {
    Ecdsa(EcdsaKeyPair),
    Ed25519(Ed25519KeyPair),
    Rsa(RsaKeyPair),
}

impl std::fmt::Debug for PopKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PopKey::Ecdsa(_) => "PopKey::Ecdsa(<redacted>)",
            PopKey::Ed25519(_) => "PopKey::Ed25519(<redacted>)",
            PopKey::Rsa(_) => "PopKey::Rsa(<redacted>)",
        })
    }
}

impl PopKey {
    /// Parses a PEM `PRIVATE KEY` (PKCS#8: EC, Ed25519 or RSA), `EC PRIVATE KEY` (SEC1) or
    /// `RSA PRIVATE KEY` (PKCS#1).
    pub fn from_pem(pem: &str) -> Result<Self, String> {
        let rng = SystemRandom::new();
        let mut rest = pem.as_bytes();
        loop {
            let (item, next) = rustls_pemfile::read_one_from_slice(rest)
                .map_err(|e| format!("PEM: {e:?}"))?
                .ok_or("no PRIVATE KEY, EC PRIVATE KEY or RSA PRIVATE KEY block")?;
            rest = next;
            match item {
                rustls_pemfile::Item::Pkcs8Key(k) => {
                    let der = k.secret_pkcs8_der();
                    if let Ok(k) =
                        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, der, &rng)
                    {
                        return Ok(PopKey::Ecdsa(k));
                    }
                    if let Ok(k) =
                        EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_ASN1_SIGNING, der, &rng)
                    {
                        return Ok(PopKey::Ecdsa(k));
                    }
                    if let Ok(k) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der) {
                        return Ok(PopKey::Ed25519(k));
                    }
                    return RsaKeyPair::from_pkcs8(der).map(PopKey::Rsa).map_err(|e| {
                        format!("PKCS#8 key is not ECDSA P-256/P-384, Ed25519 or RSA: {e}")
                    });
                }
                rustls_pemfile::Item::Sec1Key(k) => {
                    let pkcs8 = p256_sec1_to_pkcs8(k.secret_sec1_der());
                    return EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &pkcs8, &rng)
                        .map(PopKey::Ecdsa)
                        .map_err(|e| {
                            format!(
                                "the key is not a valid PKCS#8 P-256 key: SEC1 EC PRIVATE KEY \
                                 (must be P-256 and include the public key): {e}"
                            )
                        });
                }
                rustls_pemfile::Item::Pkcs1Key(k) => {
                    return RsaKeyPair::from_der(k.secret_pkcs1_der())
                        .map(PopKey::Rsa)
                        .map_err(|e| format!("RSA key: {e}"));
                }
                _ => continue,
            }
        }
    }

    pub fn load(path: &Path) -> Result<Self, NodeAttestorError> {
        let text = Zeroizing::new(read("x509pop key_file", path)?);
        Self::from_pem(&text).map_err(|reason| NodeAttestorError::Invalid {
            what: "x509pop key_file",
            path: path.display().to_string(),
            reason,
        })
    }

    /// Signs `message`: ECDSA (ASN.1 DER signature), Ed25519, or RSA PKCS#1 v1.5 SHA-256.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, NodeAttestorError> {
        let rng = SystemRandom::new();
        match self {
            PopKey::Ecdsa(k) => k
                .sign(&rng, message)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| NodeAttestorError::Sign),
            PopKey::Ed25519(k) => Ok(k.sign(message).as_ref().to_vec()),
            PopKey::Rsa(k) => {
                let mut sig = vec![0; k.public().modulus_len()];
                k.sign(&RSA_PKCS1_SHA256, &rng, message, &mut sig)
                    .map_err(|_| NodeAttestorError::Sign)?;
                Ok(sig)
            }
        }
    }
}

/// Wraps a SEC1 `ECPrivateKey` (RFC 5915) in a P-256 PKCS#8 `PrivateKeyInfo`, in zeroizing
/// memory, for ring to parse (ring reads PKCS#8 only). The curve and the public key are
/// checked when ring parses the result. agentd's key loader uses it too.
pub fn p256_sec1_to_pkcs8(sec1: &[u8]) -> Zeroizing<Vec<u8>> {
    // PrivateKeyInfo ::= SEQUENCE { INTEGER 0, AlgorithmIdentifier, OCTET STRING }
    const ALG_ID: [u8; 21] = [
        0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86,
        0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
    ];
    let mut body = Zeroizing::new(Vec::with_capacity(sec1.len() + 40));
    body.extend_from_slice(&[0x02, 0x01, 0x00]);
    body.extend_from_slice(&ALG_ID);
    body.push(0x04);
    push_der_len(&mut body, sec1.len());
    body.extend_from_slice(sec1);
    let mut pkcs8 = Zeroizing::new(Vec::with_capacity(body.len() + 4));
    pkcs8.push(0x30);
    push_der_len(&mut pkcs8, body.len());
    pkcs8.extend_from_slice(&body);
    pkcs8
}

fn push_der_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::template::IdTemplate;
    use crate::node::test_support::{self as xt, RESERVED};
    use crate::node::x509pop::{self, X509PopAttestor};
    use std::time::SystemTime;

    /// The node half signs what the server half verifies, for every key type, from files.
    #[test]
    fn pop_key_signatures_verify_on_the_server() {
        let dir = tempfile::tempdir().unwrap();
        let ca = xt::ca("Node CA");
        let server = X509PopAttestor::new(
            x509pop::X509PopConfig {
                ca_bundle: vec![ca.der.clone()],
                template: IdTemplate::parse(
                    x509pop::DEFAULT_TEMPLATE,
                    x509pop::TEMPLATE_VARIABLES,
                    RESERVED,
                )
                .unwrap(),
            },
            spiffe::TrustDomain::new("example.org").unwrap(),
        );
        for alg in [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &rcgen::PKCS_ED25519,
        ] {
            let node = xt::node_cert_with(&ca, "host-1", alg, None);
            let cert_file = dir.path().join("node.pem");
            let key_file = dir.path().join("node.key");
            std::fs::write(&cert_file, format!("{}{}", node.pem, ca.pem)).unwrap();
            std::fs::write(&key_file, node.key.serialize_pem()).unwrap();
            let chain = read_cert_chain(&cert_file).unwrap();
            assert_eq!(chain.len(), 2);
            let key = PopKey::load(&key_file).unwrap();
            let now = SystemTime::now();
            let c = server.challenge(&chain, now).unwrap();
            let sig = key
                .sign(&x509pop::signed_message(&c.nonce, &c.context))
                .unwrap();
            server.attest(&chain, &c.nonce, &sig, now).unwrap();
        }
    }

    #[test]
    fn rsa_keys_sign_pkcs1_sha256() {
        let key = PopKey::from_pem(xt::RSA_PEM).unwrap();
        let PopKey::Rsa(pair) = &key else {
            panic!("not RSA: {key:?}")
        };
        let sig = key.sign(b"hello").unwrap();
        let c: ring::rsa::PublicKeyComponents<Vec<u8>> = pair.public().into();
        c.verify(&ring::signature::RSA_PKCS1_2048_8192_SHA256, b"hello", &sig)
            .unwrap();
    }

    /// An `EC PRIVATE KEY` (SEC1) block is read as a P-256 key; a broken one is named.
    #[test]
    fn sec1_p256_keys_sign() {
        use base64::Engine;
        use ring::signature::KeyPair;
        let rng = SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
        // ring's P-256 PKCS#8 ends with an OCTET STRING (04 6d) holding the 109-byte SEC1
        // ECPrivateKey.
        let pkcs8 = doc.as_ref();
        let sec1 = &pkcs8[pkcs8.len() - 0x6d..];
        assert_eq!(pkcs8[pkcs8.len() - 0x6f..][..3], [0x04, 0x6d, 0x30]);
        let pem = format!(
            "-----BEGIN EC PRIVATE KEY-----\n{}\n-----END EC PRIVATE KEY-----\n",
            base64::engine::general_purpose::STANDARD.encode(sec1)
        );
        let key = PopKey::from_pem(&pem).unwrap();
        let sig = key.sign(b"hello").unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8, &rng).unwrap();
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_ASN1,
            pair.public_key().as_ref(),
        )
        .verify(b"hello", &sig)
        .unwrap();

        let broken = format!(
            "-----BEGIN EC PRIVATE KEY-----\n{}\n-----END EC PRIVATE KEY-----\n",
            base64::engine::general_purpose::STANDARD.encode(&sec1[..sec1.len() - 70])
        );
        let err = PopKey::from_pem(&broken).unwrap_err();
        assert!(
            err.starts_with(
                "the key is not a valid PKCS#8 P-256 key: SEC1 EC PRIVATE KEY (must be P-256 \
                 and include the public key): "
            ),
            "{err}"
        );
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        assert!(read_cert_chain(&missing)
            .unwrap_err()
            .to_string()
            .contains("missing.pem"));
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not pem").unwrap();
        assert!(read_cert_chain(&junk).is_err());
        assert!(PopKey::load(&junk).is_err());
        let empty = dir.path().join("token");
        std::fs::write(&empty, "\n").unwrap();
        assert!(read_token(&empty)
            .unwrap_err()
            .to_string()
            .contains("empty"));
    }

    #[test]
    fn debug_leaves_the_join_token_out() {
        let c = AttestorConfig::JoinToken("s3cr3t-token".into());
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("JoinToken"), "{shown}");
    }
}
