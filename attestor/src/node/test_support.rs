//! Test material for the node attestors, shared with the tests of crates that configure them
//! (behind the `test-support` feature): a CA and node certificates for x509pop, JWKS keys and
//! signed tokens for claims. Never for production use.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair as _, RsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::{json, Value};

/// The reserved path prefix the tests give to [`super::IdTemplate::parse`] (agentd's).
pub const RESERVED: &str = "/agentd/";

pub struct TestCa {
    pub der: Vec<u8>,
    pub pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

pub fn ca(name: &str) -> TestCa {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = p.self_signed(&key).unwrap();
    TestCa {
        der: cert.der().to_vec(),
        pem: cert.pem(),
        issuer: Issuer::new(p, key),
    }
}

pub struct TestNode {
    pub der: Vec<u8>,
    pub pem: String,
    pub key: KeyPair,
}

impl std::fmt::Debug for TestNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestNode").finish_non_exhaustive()
    }
}

pub fn node_cert_with(
    ca: &TestCa,
    cn: &str,
    alg: &'static rcgen::SignatureAlgorithm,
    not_after: Option<time::OffsetDateTime>,
) -> TestNode {
    let key = KeyPair::generate_for(alg).unwrap();
    let mut p = CertificateParams::new(vec![format!("{cn}.nodes.example")]).unwrap();
    p.subject_alt_names
        .push(SanType::URI("urn:host:1".try_into().unwrap()));
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(2);
    p.not_after = not_after.unwrap_or(now + time::Duration::days(30));
    let cert = p.signed_by(&key, &ca.issuer).unwrap();
    TestNode {
        der: cert.der().to_vec(),
        pem: cert.pem(),
        key,
    }
}

pub fn node_cert(ca: &TestCa, cn: &str) -> TestNode {
    node_cert_with(ca, cn, &rcgen::PKCS_ECDSA_P256_SHA256, None)
}

pub const RSA_PEM: &str = include_str!("../../testdata/claims-test-rsa.pem");

pub enum TestKey {
    Ec(EcdsaKeyPair),
    Rsa(RsaKeyPair),
}

impl std::fmt::Debug for TestKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.alg())
    }
}

pub fn ec_key() -> TestKey {
    let rng = SystemRandom::new();
    let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    TestKey::Ec(
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, doc.as_ref(), &rng).unwrap(),
    )
}

pub fn rsa_key() -> TestKey {
    let der = rustls_pemfile::private_key(&mut RSA_PEM.as_bytes())
        .unwrap()
        .expect("a PRIVATE KEY block");
    TestKey::Rsa(RsaKeyPair::from_pkcs8(der.secret_der()).unwrap())
}

impl TestKey {
    pub fn jwk(&self, kid: &str) -> Value {
        match self {
            TestKey::Ec(k) => {
                let p = k.public_key().as_ref();
                json!({"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig",
                    "x": URL_SAFE_NO_PAD.encode(&p[1..33]),
                    "y": URL_SAFE_NO_PAD.encode(&p[33..65])})
            }
            TestKey::Rsa(k) => {
                let c: ring::rsa::PublicKeyComponents<Vec<u8>> = k.public().into();
                json!({"kty": "RSA", "kid": kid, "alg": "RS256",
                    "n": URL_SAFE_NO_PAD.encode(&c.n), "e": URL_SAFE_NO_PAD.encode(&c.e)})
            }
        }
    }

    pub fn alg(&self) -> &'static str {
        match self {
            TestKey::Ec(_) => "ES256",
            TestKey::Rsa(_) => "RS256",
        }
    }

    /// A signed token with `header` fields added to alg/kid.
    pub fn sign(&self, kid: &str, claims: &Value) -> String {
        self.sign_with_header(
            &json!({"alg": self.alg(), "kid": kid, "typ": "JWT"}),
            claims,
        )
    }

    pub fn sign_with_header(&self, header: &Value, claims: &Value) -> String {
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let rng = SystemRandom::new();
        let sig = match self {
            TestKey::Ec(k) => k.sign(&rng, input.as_bytes()).unwrap().as_ref().to_vec(),
            TestKey::Rsa(k) => {
                let mut sig = vec![0; k.public().modulus_len()];
                k.sign(
                    &ring::signature::RSA_PKCS1_SHA256,
                    &rng,
                    input.as_bytes(),
                    &mut sig,
                )
                .unwrap();
                sig
            }
        };
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
    }
}
