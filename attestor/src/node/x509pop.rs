//! x509pop node attestation: the node proves possession of the private key of a certificate
//! that chains to the CA bundle configured on the server.
//!
//! Two steps over the node API: `X509PopChallenge` (the chain is checked, a single-use
//! 32-byte nonce bound to the leaf is returned) and `Attest` with the chain, the nonce and
//! the leaf key's signature over `nonce || context`. The context names this server's trust
//! domain and the leaf's fingerprint, so a signature made for one server or certificate is
//! useless anywhere else.
//!
//! Over 600 lines only with its unit tests, which build their own CA chains.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use ring::signature::{
    UnparsedPublicKey, VerificationAlgorithm, ECDSA_P256_SHA256_ASN1, ECDSA_P384_SHA384_ASN1,
    ED25519, RSA_PKCS1_2048_8192_SHA256,
};
use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use spiffe::{SpiffeId, TrustDomain};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_SIG_ED25519,
};

use super::template::{IdTemplate, TemplateError};
use super::{unix_seconds, NodeAttestation};
use crate::Selector;

pub const ATTESTATION_TYPE: &str = "x509pop";
pub const DEFAULT_TEMPLATE: &str = "spiffe://{trust_domain}/node/x509pop/{sha256}";
pub const TEMPLATE_VARIABLES: &[&str] = &["trust_domain", "common_name", "sha256", "sha1"];
/// How long a nonce may be used after it was handed out.
pub const NONCE_TTL: Duration = Duration::from_secs(60);
/// Most outstanding nonces; beyond this, challenges are refused until some expire.
pub const MAX_PENDING: usize = 10_000;
/// Most certificates in a presented chain, and the largest one.
pub const MAX_CHAIN_LEN: usize = 8;
pub const MAX_CERT_BYTES: usize = 64 * 1024;
const NONCE_LEN: usize = 32;

/// Why an x509pop challenge or attestation is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum X509PopError {
    /// The presented chain is empty, too long, too large or not X.509.
    #[error("cert_chain: {reason}")]
    Malformed { reason: String },
    /// The leaf certificate's notAfter has passed.
    #[error("certificate {subject:?} expired at {not_after} (unix seconds)")]
    Expired { subject: String, not_after: i64 },
    /// The leaf certificate's notBefore is still ahead.
    #[error("certificate {subject:?} is not valid before {not_before} (unix seconds)")]
    NotYetValid { subject: String, not_before: i64 },
    /// The chain does not verify up to a CA of the configured bundle.
    #[error("certificate {subject:?} does not chain to the x509pop CA bundle: {reason}")]
    Untrusted { subject: String, reason: String },
    /// The leaf's key is of a type whose signatures are not checked here.
    #[error("certificate key type {algorithm} is not supported (ECDSA P-256/P-384, Ed25519, RSA)")]
    UnsupportedKey { algorithm: String },
    /// The nonce is not one this server handed out for this certificate, or was used.
    #[error("nonce: {reason}")]
    BadNonce { reason: &'static str },
    /// The nonce was handed out more than [`NONCE_TTL`] ago.
    #[error("nonce expired at {expired_at} (unix seconds): request a new challenge")]
    ExpiredNonce { expired_at: i64 },
    /// The signature is not the leaf key's over `nonce || context`.
    #[error("the signature over the challenge does not verify with the certificate's key")]
    BadSignature,
    /// [`MAX_PENDING`] challenges are outstanding.
    #[error("too many outstanding challenges; retry later")]
    Busy,
    /// The certificate does not yield a usable node ID from the template.
    #[error("node SPIFFE ID from spiffe_id_template: {0}")]
    Template(#[from] TemplateError),
}

impl X509PopError {
    /// Whether the request itself is malformed (InvalidArgument) rather than refused.
    pub fn is_malformed(&self) -> bool {
        matches!(self, X509PopError::Malformed { .. })
    }
}

/// The server's x509pop settings, validated.
#[derive(Debug, Clone)]
pub struct X509PopConfig {
    /// DER CA certificates the node certificates must chain to.
    pub ca_bundle: Vec<Vec<u8>>,
    pub template: IdTemplate,
}

/// A challenge handed to a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub nonce: Vec<u8>,
    pub context: String,
    pub expires_at: i64,
}

#[derive(Debug)]
struct Pending {
    leaf_sha256: String,
    expires_at: i64,
}

/// The verifier, with its outstanding nonces.
#[derive(Debug)]
pub struct X509PopAttestor {
    config: X509PopConfig,
    trust_domain: TrustDomain,
    pending: Mutex<HashMap<Vec<u8>, Pending>>,
}

/// The text the node signs after the nonce.
pub fn context(trust_domain: &TrustDomain, leaf_sha256: &str) -> String {
    format!(
        "agentd x509pop v1; trust_domain={}; leaf_sha256={leaf_sha256}",
        trust_domain.as_str()
    )
}

/// The bytes the node signs: `nonce || context`.
pub fn signed_message(nonce: &[u8], context: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(nonce.len() + context.len());
    m.extend_from_slice(nonce);
    m.extend_from_slice(context.as_bytes());
    m
}

fn malformed(reason: impl Into<String>) -> X509PopError {
    X509PopError::Malformed {
        reason: reason.into(),
    }
}

fn sha256_hex(der: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, der))
}

fn sha1_hex(der: &[u8]) -> String {
    hex::encode(ring::digest::digest(
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        der,
    ))
}

fn common_name(name: &x509_parser::x509::X509Name<'_>) -> Option<String> {
    name.iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned)
}

/// A chain that verified, and what the selectors are made of.
struct Verified {
    leaf_der: Vec<u8>,
    /// The certificate that issued the leaf (an intermediate, or the bundle's CA).
    issuer_der: Vec<u8>,
}

impl X509PopAttestor {
    pub fn new(config: X509PopConfig, trust_domain: TrustDomain) -> Self {
        Self {
            config,
            trust_domain,
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// Step 1: checks the chain, hands out a nonce bound to the leaf.
    pub fn challenge(&self, chain: &[Vec<u8>], now: SystemTime) -> Result<Challenge, X509PopError> {
        let verified = self.verify_chain(chain, now)?;
        let leaf_sha256 = sha256_hex(&verified.leaf_der);
        let nonce: [u8; NONCE_LEN] = rand::random();
        let now_s = unix_seconds(now);
        let expires_at = now_s + NONCE_TTL.as_secs() as i64;
        {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            if pending.len() >= MAX_PENDING {
                pending.retain(|_, p| p.expires_at > now_s);
            }
            if pending.len() >= MAX_PENDING {
                return Err(X509PopError::Busy);
            }
            pending.insert(
                nonce.to_vec(),
                Pending {
                    leaf_sha256: leaf_sha256.clone(),
                    expires_at,
                },
            );
        }
        Ok(Challenge {
            nonce: nonce.to_vec(),
            context: context(&self.trust_domain, &leaf_sha256),
            expires_at,
        })
    }

    /// Step 2: the nonce (used up whatever the outcome), the chain again (time has passed),
    /// the signature; then the node's SPIFFE ID and selectors.
    pub fn attest(
        &self,
        chain: &[Vec<u8>],
        nonce: &[u8],
        signature: &[u8],
        now: SystemTime,
    ) -> Result<NodeAttestation, X509PopError> {
        if nonce.len() != NONCE_LEN {
            return Err(X509PopError::BadNonce {
                reason: "must be the 32 bytes from X509PopChallenge",
            });
        }
        let pending = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(nonce)
            .ok_or(X509PopError::BadNonce {
                reason: "unknown or already used: request a new challenge",
            })?;
        if pending.expires_at <= unix_seconds(now) {
            return Err(X509PopError::ExpiredNonce {
                expired_at: pending.expires_at,
            });
        }
        let verified = self.verify_chain(chain, now)?;
        let leaf_sha256 = sha256_hex(&verified.leaf_der);
        if leaf_sha256 != pending.leaf_sha256 {
            return Err(X509PopError::BadNonce {
                reason: "issued for another certificate",
            });
        }
        let (_, leaf) = x509_parser::parse_x509_certificate(&verified.leaf_der)
            .map_err(|e| malformed(format!("leaf: {e}")))?;
        let message = signed_message(nonce, &context(&self.trust_domain, &leaf_sha256));
        verify_signature(&leaf, &message, signature)?;

        let cn = common_name(leaf.subject());
        let sha1 = sha1_hex(&verified.leaf_der);
        let spiffe_id: SpiffeId =
            self.config
                .template
                .render(&self.trust_domain, |name| match name {
                    "common_name" => cn
                        .clone()
                        .ok_or_else(|| "the certificate has no subject CN".to_string()),
                    "sha256" => Ok(leaf_sha256.clone()),
                    "sha1" => Ok(sha1.clone()),
                    other => Err(format!("unknown variable {other}")),
                })?;
        Ok(NodeAttestation {
            spiffe_id,
            attestation_type: ATTESTATION_TYPE,
            selectors: selectors(&leaf, &verified),
        })
    }

    fn verify_chain(&self, chain: &[Vec<u8>], now: SystemTime) -> Result<Verified, X509PopError> {
        if chain.is_empty() {
            return Err(malformed("empty: the leaf certificate is required"));
        }
        if chain.len() > MAX_CHAIN_LEN {
            return Err(malformed(format!(
                "{} certificates; at most {MAX_CHAIN_LEN}",
                chain.len()
            )));
        }
        if let Some(big) = chain.iter().find(|c| c.len() > MAX_CERT_BYTES) {
            return Err(malformed(format!(
                "a certificate of {} bytes; at most {MAX_CERT_BYTES}",
                big.len()
            )));
        }
        let leaf_der = &chain[0];
        let (_, leaf) = x509_parser::parse_x509_certificate(leaf_der)
            .map_err(|e| malformed(format!("leaf is not an X.509 certificate: {e}")))?;
        let subject = leaf.subject().to_string();
        // Our own validity check first, for a precise message.
        let now_s = unix_seconds(now);
        let not_after = leaf.validity().not_after.timestamp();
        let not_before = leaf.validity().not_before.timestamp();
        if now_s > not_after {
            return Err(X509PopError::Expired { subject, not_after });
        }
        if now_s < not_before {
            return Err(X509PopError::NotYetValid {
                subject,
                not_before,
            });
        }

        let untrusted = |reason: String| X509PopError::Untrusted {
            subject: subject.clone(),
            reason,
        };
        let bundle: Vec<CertificateDer<'_>> = self
            .config
            .ca_bundle
            .iter()
            .map(|d| CertificateDer::from(d.as_slice()))
            .collect();
        let anchors: Vec<TrustAnchor<'_>> = bundle
            .iter()
            .map(|c| webpki::anchor_from_trusted_cert(c))
            .collect::<Result<_, _>>()
            .map_err(|e| untrusted(format!("the CA bundle holds an unusable certificate: {e}")))?;
        let leaf_cert = CertificateDer::from(leaf_der.as_slice());
        let ee = webpki::EndEntityCert::try_from(&leaf_cert)
            .map_err(|e| malformed(format!("leaf: {e}")))?;
        let intermediates: Vec<CertificateDer<'_>> = chain[1..]
            .iter()
            .map(|d| CertificateDer::from(d.as_slice()))
            .collect();
        let time = UnixTime::since_unix_epoch(
            now.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default(),
        );
        let path = ee
            .verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &anchors,
                &intermediates,
                time,
                webpki::KeyUsage::client_auth(),
                None,
                None,
            )
            .map_err(|e| match e {
                webpki::Error::UnknownIssuer => {
                    untrusted("issued by a CA that is not in the bundle".into())
                }
                other => untrusted(format!("{other:?}")),
            })?;
        let issuer_der = match path.intermediate_certificates().next() {
            Some(i) => i.der().to_vec(),
            None => {
                let anchor = path.anchor();
                anchors
                    .iter()
                    .position(|a| {
                        a.subject == anchor.subject
                            && a.subject_public_key_info == anchor.subject_public_key_info
                    })
                    .map(|i| self.config.ca_bundle[i].clone())
                    .ok_or_else(|| untrusted("the trust anchor is not in the bundle".into()))?
            }
        };
        Ok(Verified {
            leaf_der: leaf_der.clone(),
            issuer_der,
        })
    }
}

/// Verifies `signature` over `message` with the leaf's public key; the algorithm follows
/// from the key type.
fn verify_signature(
    leaf: &X509Certificate<'_>,
    message: &[u8],
    signature: &[u8],
) -> Result<(), X509PopError> {
    let spki = leaf.public_key();
    let oid = &spki.algorithm.algorithm;
    let key = spki.subject_public_key.data.as_ref();
    let alg: &'static dyn VerificationAlgorithm = if *oid == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        match curve {
            Some(c) if c == OID_EC_P256 => &ECDSA_P256_SHA256_ASN1,
            Some(c) if c == OID_NIST_EC_P384 => &ECDSA_P384_SHA384_ASN1,
            other => {
                return Err(X509PopError::UnsupportedKey {
                    algorithm: format!(
                        "EC with curve {}",
                        other.map(|o| o.to_id_string()).unwrap_or_default()
                    ),
                })
            }
        }
    } else if *oid == OID_SIG_ED25519 {
        &ED25519
    } else if *oid == OID_PKCS1_RSAENCRYPTION {
        &RSA_PKCS1_2048_8192_SHA256
    } else {
        return Err(X509PopError::UnsupportedKey {
            algorithm: oid.to_id_string(),
        });
    };
    UnparsedPublicKey::new(alg, key)
        .verify(message, signature)
        .map_err(|_| X509PopError::BadSignature)
}

fn push(out: &mut Vec<Selector>, value: String) {
    match Selector::new(ATTESTATION_TYPE, value) {
        Ok(s) => out.push(s),
        Err(e) => {
            tracing::debug!(error = %e, "x509pop: a certificate field is not usable as a selector; skipped")
        }
    }
}

fn selectors(leaf: &X509Certificate<'_>, verified: &Verified) -> Vec<Selector> {
    let mut out = Vec::new();
    if let Some(cn) = common_name(leaf.subject()) {
        push(&mut out, format!("subject:cn:{cn}"));
    }
    if let Some(cn) = common_name(leaf.issuer()) {
        push(&mut out, format!("issuer:cn:{cn}"));
    }
    if let Ok(Some(san)) = leaf.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(d) => push(&mut out, format!("san:dns:{d}")),
                GeneralName::URI(u) => push(&mut out, format!("san:uri:{u}")),
                _ => {}
            }
        }
    }
    push(
        &mut out,
        format!("ca:fingerprint:{}", sha256_hex(&verified.issuer_der)),
    );
    push(
        &mut out,
        format!("fingerprint:sha1:{}", sha1_hex(&verified.leaf_der)),
    );
    push(
        &mut out,
        format!("fingerprint:sha256:{}", sha256_hex(&verified.leaf_der)),
    );
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::test_support::{ca, node_cert, node_cert_with, TestCa, TestNode, RESERVED};
    use rcgen::{KeyPair, SigningKey};

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn attestor(ca: &TestCa, template: &str) -> X509PopAttestor {
        X509PopAttestor::new(
            X509PopConfig {
                ca_bundle: vec![ca.der.clone()],
                template: IdTemplate::parse(template, TEMPLATE_VARIABLES, RESERVED).unwrap(),
            },
            td(),
        )
    }

    fn sign(key: &KeyPair, c: &Challenge) -> Vec<u8> {
        key.sign(&signed_message(&c.nonce, &c.context)).unwrap()
    }

    fn full(
        a: &X509PopAttestor,
        node: &TestNode,
        signer: &KeyPair,
    ) -> Result<NodeAttestation, X509PopError> {
        let chain = vec![node.der.clone()];
        let now = SystemTime::now();
        let c = a.challenge(&chain, now)?;
        a.attest(&chain, &c.nonce, &sign(signer, &c), now)
    }

    /// Why the nonce table may stay in memory (issue 12, item 7 named it with the jti cache):
    /// a nonce is random and single-use, so a server that forgot its nonces (restarted)
    /// refuses every signed challenge from before; nothing captured can be replayed. Only
    /// a challenge in flight during the restart fails, and the node asks for a new one.
    #[test]
    fn a_signed_challenge_from_before_a_restart_is_refused_and_used_once() {
        let ca = ca("Node CA");
        let node = node_cert(&ca, "n1");
        let chain = vec![node.der.clone()];
        let now = SystemTime::now();
        let before = attestor(&ca, DEFAULT_TEMPLATE);
        let c = before.challenge(&chain, now).unwrap();
        let sig = sign(&node.key, &c);
        let restarted = attestor(&ca, DEFAULT_TEMPLATE);
        let err = restarted.attest(&chain, &c.nonce, &sig, now).unwrap_err();
        assert!(matches!(err, X509PopError::BadNonce { .. }), "{err}");
        // And on the same server, the captured answer works once only.
        before.attest(&chain, &c.nonce, &sig, now).unwrap();
        let err = before.attest(&chain, &c.nonce, &sig, now).unwrap_err();
        assert!(matches!(err, X509PopError::BadNonce { .. }), "{err}");
    }

    #[test]
    fn attests_with_p256_ed25519_and_p384_keys() {
        let ca = ca("Node CA");
        let a = attestor(&ca, DEFAULT_TEMPLATE);
        for alg in [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ED25519,
            &rcgen::PKCS_ECDSA_P384_SHA384,
        ] {
            let node = node_cert_with(&ca, "host-1", alg, None);
            let got = full(&a, &node, &node.key).unwrap();
            assert_eq!(
                got.spiffe_id.to_string(),
                format!(
                    "spiffe://example.org/node/x509pop/{}",
                    sha256_hex(&node.der)
                )
            );
        }
    }

    #[test]
    fn selectors_and_template_from_the_certificate() {
        let ca = ca("Node CA");
        let a = attestor(&ca, "spiffe://{trust_domain}/node/{common_name}");
        let node = node_cert(&ca, "host-1");
        let got = full(&a, &node, &node.key).unwrap();
        assert_eq!(
            got.spiffe_id.to_string(),
            "spiffe://example.org/node/host-1"
        );
        assert_eq!(got.attestation_type, "x509pop");
        let sel: Vec<String> = got.selectors.iter().map(ToString::to_string).collect();
        for want in [
            "x509pop:subject:cn:host-1".to_string(),
            "x509pop:issuer:cn:Node CA".to_string(),
            "x509pop:san:dns:host-1.nodes.example".to_string(),
            "x509pop:san:uri:urn:host:1".to_string(),
            format!("x509pop:ca:fingerprint:{}", sha256_hex(&ca.der)),
            format!("x509pop:fingerprint:sha1:{}", sha1_hex(&node.der)),
            format!("x509pop:fingerprint:sha256:{}", sha256_hex(&node.der)),
        ] {
            assert!(sel.contains(&want), "{want} missing from {sel:?}");
        }
        // Same certificate, same ID: re-attestation keeps the node's identity.
        let again = full(&a, &node, &node.key).unwrap();
        assert_eq!(again.spiffe_id, got.spiffe_id);
    }

    #[test]
    fn a_certificate_from_another_ca_is_refused() {
        let trusted = ca("Node CA");
        let other = ca("Other CA");
        let a = attestor(&trusted, DEFAULT_TEMPLATE);
        let node = node_cert(&other, "host-1");
        let err = a
            .challenge(std::slice::from_ref(&node.der), SystemTime::now())
            .unwrap_err();
        assert!(matches!(err, X509PopError::Untrusted { .. }), "{err}");
        assert!(err.to_string().contains("not in the bundle"), "{err}");
        // Straight to Attest with a made-up nonce: refused too.
        let err = a
            .attest(
                std::slice::from_ref(&node.der),
                &[0; 32],
                b"sig",
                SystemTime::now(),
            )
            .unwrap_err();
        assert!(matches!(err, X509PopError::BadNonce { .. }), "{err}");
    }

    #[test]
    fn an_expired_certificate_is_refused() {
        let ca = ca("Node CA");
        let a = attestor(&ca, DEFAULT_TEMPLATE);
        let past = time::OffsetDateTime::now_utc() - time::Duration::days(1);
        let node = node_cert_with(&ca, "host-1", &rcgen::PKCS_ECDSA_P256_SHA256, Some(past));
        let err = a
            .challenge(std::slice::from_ref(&node.der), SystemTime::now())
            .unwrap_err();
        assert!(matches!(err, X509PopError::Expired { .. }), "{err}");
        assert!(err.to_string().contains("expired"), "{err}");
    }

    #[test]
    fn a_signature_by_another_key_is_refused() {
        let ca = ca("Node CA");
        let a = attestor(&ca, DEFAULT_TEMPLATE);
        let node = node_cert(&ca, "host-1");
        let wrong = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let err = full(&a, &node, &wrong).unwrap_err();
        assert_eq!(err, X509PopError::BadSignature);
    }

    #[test]
    fn a_signature_over_another_context_is_refused() {
        let ca = ca("Node CA");
        let a = attestor(&ca, DEFAULT_TEMPLATE);
        let node = node_cert(&ca, "host-1");
        let chain = vec![node.der.clone()];
        let now = SystemTime::now();
        let c = a.challenge(&chain, now).unwrap();
        let sig = node.key.sign(&signed_message(&c.nonce, "other")).unwrap();
        assert_eq!(
            a.attest(&chain, &c.nonce, &sig, now).unwrap_err(),
            X509PopError::BadSignature
        );
    }

    #[test]
    fn a_nonce_is_single_use_and_expires() {
        let ca = ca("Node CA");
        let a = attestor(&ca, DEFAULT_TEMPLATE);
        let node = node_cert(&ca, "host-1");
        let chain = vec![node.der.clone()];
        let now = SystemTime::now();
        let c = a.challenge(&chain, now).unwrap();
        let sig = sign(&node.key, &c);
        a.attest(&chain, &c.nonce, &sig, now).unwrap();
        let err = a.attest(&chain, &c.nonce, &sig, now).unwrap_err();
        assert!(
            matches!(err, X509PopError::BadNonce { .. }),
            "replay: {err}"
        );

        let c = a.challenge(&chain, now).unwrap();
        let sig = sign(&node.key, &c);
        let later = now + NONCE_TTL + Duration::from_secs(1);
        let err = a.attest(&chain, &c.nonce, &sig, later).unwrap_err();
        assert!(matches!(err, X509PopError::ExpiredNonce { .. }), "{err}");
    }

    #[test]
    fn a_nonce_is_bound_to_its_certificate() {
        let ca = ca("Node CA");
        let a = attestor(&ca, DEFAULT_TEMPLATE);
        let n1 = node_cert(&ca, "host-1");
        let n2 = node_cert(&ca, "host-2");
        let now = SystemTime::now();
        let c = a.challenge(std::slice::from_ref(&n1.der), now).unwrap();
        let sig = n2.key.sign(&signed_message(&c.nonce, &c.context)).unwrap();
        let err = a
            .attest(std::slice::from_ref(&n2.der), &c.nonce, &sig, now)
            .unwrap_err();
        assert!(matches!(err, X509PopError::BadNonce { .. }), "{err}");
    }

    #[test]
    fn malformed_chains_are_refused_without_panicking() {
        let ca = ca("Node CA");
        let a = attestor(&ca, DEFAULT_TEMPLATE);
        let now = SystemTime::now();
        for chain in [
            vec![],
            vec![b"junk".to_vec()],
            vec![vec![0u8; MAX_CERT_BYTES + 1]],
            vec![ca.der.clone(); MAX_CHAIN_LEN + 1],
        ] {
            let err = a.challenge(&chain, now).unwrap_err();
            assert!(err.is_malformed(), "{err}");
        }
        // The CA itself is not an end-entity certificate.
        assert!(a.challenge(std::slice::from_ref(&ca.der), now).is_err());
        assert!(matches!(
            a.attest(&[], &[1, 2], b"", now),
            Err(X509PopError::BadNonce { .. })
        ));
    }

    #[test]
    fn a_cn_that_is_not_a_valid_path_segment_is_refused() {
        let ca = ca("Node CA");
        let a = attestor(&ca, "spiffe://{trust_domain}/node/{common_name}");
        let node = node_cert(&ca, "bad name with spaces");
        let err = full(&a, &node, &node.key).unwrap_err();
        assert!(matches!(err, X509PopError::Template(_)), "{err}");
    }
}
