//! A trust domain's bundle: its X.509 authorities and JWT authorities, in the formats the
//! SPIFFE Trust Domain and Bundle spec (section 4, the SPIFFE bundle format) and the Workload
//! API use.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use serde_json::{json, Map, Value};
use spiffe::TrustDomain;
use x509_parser::prelude::FromDer;

use crate::keys::{p256_point_from_spki, p256_spki_der};

/// The `spiffe_refresh_hint` we publish unless told otherwise.
pub const DEFAULT_REFRESH_HINT: Duration = Duration::from_secs(5 * 60);

/// Largest bundle document we parse.
const MAX_BUNDLE_BYTES: usize = 4 * 1024 * 1024;

/// A JWT signing authority: the key id and the public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtAuthority {
    pub key_id: String,
    /// SubjectPublicKeyInfo DER (P-256).
    pub public_key_spki_der: Vec<u8>,
    pub expires_at: SystemTime,
}

impl JwtAuthority {
    /// The expiry given to JWT authorities read from a SPIFFE bundle document, which does not
    /// carry one: 9999-12-31T23:59:59Z, i.e. "as long as the bundle lists it".
    pub fn unknown_expiry() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(253_402_300_799)
    }
}

/// The trust bundle of one trust domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    pub trust_domain: TrustDomain,
    /// DER CA certificates (roots; with an upstream CA, the upstream roots).
    pub x509_authorities: Vec<Vec<u8>>,
    pub jwt_authorities: Vec<JwtAuthority>,
    /// `spiffe_sequence`: bumps whenever the bundle changes.
    pub sequence: u64,
    /// `spiffe_refresh_hint`.
    pub refresh_hint: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("bundle: {reason}")]
    Invalid { reason: String },
}

fn invalid(reason: impl Into<String>) -> BundleError {
    BundleError::Invalid {
        reason: reason.into(),
    }
}

/// The JWK members describing a certificate's public key (`kty`, `crv`, `x`, `y` / `n`, `e`),
/// or None for a key type JWK cannot describe.
fn jwk_key_members(spki_der: &[u8]) -> Option<Map<String, Value>> {
    let mut m = Map::new();
    if let Some(point) = p256_point_from_spki(spki_der) {
        m.insert("kty".into(), "EC".into());
        m.insert("crv".into(), "P-256".into());
        m.insert("x".into(), URL_SAFE_NO_PAD.encode(&point[1..33]).into());
        m.insert("y".into(), URL_SAFE_NO_PAD.encode(&point[33..65]).into());
        return Some(m);
    }
    let (_, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki_der).ok()?;
    match spki.parsed().ok()? {
        x509_parser::public_key::PublicKey::EC(point) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())?;
            let (crv, len) = if curve == x509_parser::oid_registry::OID_NIST_EC_P384 {
                ("P-384", 48)
            } else if curve == x509_parser::oid_registry::OID_NIST_EC_P521 {
                ("P-521", 66)
            } else {
                return None;
            };
            let data = point.data();
            if data.len() != 1 + 2 * len || data[0] != 0x04 {
                return None;
            }
            m.insert("kty".into(), "EC".into());
            m.insert("crv".into(), crv.into());
            m.insert("x".into(), URL_SAFE_NO_PAD.encode(&data[1..1 + len]).into());
            m.insert("y".into(), URL_SAFE_NO_PAD.encode(&data[1 + len..]).into());
        }
        x509_parser::public_key::PublicKey::RSA(rsa) => {
            let strip = |b: &[u8]| {
                let skip = b.iter().take_while(|x| **x == 0).count();
                URL_SAFE_NO_PAD.encode(&b[skip..])
            };
            m.insert("kty".into(), "RSA".into());
            m.insert("n".into(), strip(rsa.modulus).into());
            m.insert("e".into(), strip(rsa.exponent).into());
        }
        _ => return None,
    }
    Some(m)
}

fn cert_spki_der(cert_der: &[u8]) -> Result<Vec<u8>, BundleError> {
    let (rest, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| invalid(format!("not an X.509 certificate: {e}")))?;
    if !rest.is_empty() {
        return Err(invalid("trailing bytes after the certificate"));
    }
    Ok(cert.public_key().raw.to_vec())
}

fn b64url_field(key: &Map<String, Value>, name: &str, at: &str) -> Result<Vec<u8>, BundleError> {
    let s = key
        .get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(format!("{at}: missing string member {name:?}")))?;
    URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|e| invalid(format!("{at}: {name:?} is not base64url: {e}")))
}

fn p256_point_from_jwk(key: &Map<String, Value>, at: &str) -> Result<Vec<u8>, BundleError> {
    let kty = key.get("kty").and_then(Value::as_str).unwrap_or("");
    let crv = key.get("crv").and_then(Value::as_str).unwrap_or("");
    if kty != "EC" || crv != "P-256" {
        return Err(invalid(format!(
            "{at}: key type {kty:?}/{crv:?} is not supported (only EC P-256)"
        )));
    }
    let x = b64url_field(key, "x", at)?;
    let y = b64url_field(key, "y", at)?;
    if x.len() != 32 || y.len() != 32 {
        return Err(invalid(format!("{at}: x and y must be 32 bytes each")));
    }
    let mut point = Vec::with_capacity(65);
    point.push(0x04);
    point.extend_from_slice(&x);
    point.extend_from_slice(&y);
    Ok(point)
}

impl Bundle {
    /// The SPIFFE bundle format: a JWKS with `keys` (x509-svid keys with `x5c` and no `kid`;
    /// jwt-svid keys with `kid`), `spiffe_sequence` and `spiffe_refresh_hint`.
    pub fn to_spiffe_json(&self) -> String {
        let mut keys = Vec::new();
        for cert in &self.x509_authorities {
            let mut k = cert_spki_der(cert)
                .ok()
                .and_then(|spki| jwk_key_members(&spki))
                .unwrap_or_default();
            k.insert("use".into(), "x509-svid".into());
            k.insert("x5c".into(), json!([STANDARD.encode(cert)]));
            keys.push(Value::Object(k));
        }
        for a in &self.jwt_authorities {
            let mut k = jwk_key_members(&a.public_key_spki_der).unwrap_or_default();
            k.insert("use".into(), "jwt-svid".into());
            k.insert("kid".into(), a.key_id.clone().into());
            keys.push(Value::Object(k));
        }
        json!({
            "keys": keys,
            "spiffe_sequence": self.sequence,
            "spiffe_refresh_hint": self.refresh_hint.as_secs(),
        })
        .to_string()
    }

    /// Parses the SPIFFE bundle format (used for `--trust-bundle` files as well as PEM).
    ///
    /// Input that starts with `-----BEGIN` is read as PEM CA certificates (no JWT
    /// authorities, sequence 0). Keys whose `use` is missing or unknown are skipped, as the
    /// spec asks; JWT authorities get [`JwtAuthority::unknown_expiry`], since the format
    /// carries no expiry.
    pub fn from_spiffe_json(trust_domain: TrustDomain, json: &str) -> Result<Self, BundleError> {
        if json.len() > MAX_BUNDLE_BYTES {
            return Err(invalid(format!(
                "document is {} bytes, more than the limit of {MAX_BUNDLE_BYTES}",
                json.len()
            )));
        }
        if json.trim_start().starts_with("-----BEGIN") {
            return Ok(Self {
                trust_domain,
                x509_authorities: Self::x509_authorities_from_pem(json)?,
                jwt_authorities: Vec::new(),
                sequence: 0,
                refresh_hint: DEFAULT_REFRESH_HINT,
            });
        }
        let doc: Map<String, Value> =
            serde_json::from_str(json).map_err(|e| invalid(format!("not a JSON object: {e}")))?;
        let keys = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or_else(|| invalid("missing \"keys\" array"))?;
        let sequence = match doc.get("spiffe_sequence") {
            None | Some(Value::Null) => 0,
            Some(v) => v
                .as_u64()
                .ok_or_else(|| invalid("spiffe_sequence must be a non-negative integer"))?,
        };
        let refresh_hint = match doc.get("spiffe_refresh_hint") {
            None | Some(Value::Null) => DEFAULT_REFRESH_HINT,
            Some(v) => Duration::from_secs(v.as_u64().ok_or_else(|| {
                invalid("spiffe_refresh_hint must be a non-negative integer (seconds)")
            })?),
        };
        let mut x509_authorities: Vec<Vec<u8>> = Vec::new();
        let mut jwt_authorities: Vec<JwtAuthority> = Vec::new();
        let mut skipped = 0usize;
        for (i, key) in keys.iter().enumerate() {
            let at = format!("keys[{i}]");
            let key = key
                .as_object()
                .ok_or_else(|| invalid(format!("{at}: not a JSON object")))?;
            match key.get("use").and_then(Value::as_str) {
                Some("x509-svid") => {
                    let x5c = key
                        .get("x5c")
                        .and_then(Value::as_array)
                        .ok_or_else(|| invalid(format!("{at}: x509-svid key without x5c")))?;
                    let [cert] = x5c.as_slice() else {
                        return Err(invalid(format!(
                            "{at}: x5c must hold exactly one certificate, found {}",
                            x5c.len()
                        )));
                    };
                    let der = cert
                        .as_str()
                        .ok_or_else(|| invalid(format!("{at}: x5c[0] is not a string")))
                        .and_then(|s| {
                            STANDARD
                                .decode(s)
                                .map_err(|e| invalid(format!("{at}: x5c[0] is not base64: {e}")))
                        })?;
                    let spki =
                        cert_spki_der(&der).map_err(|e| invalid(format!("{at}: x5c[0]: {e}")))?;
                    if key.contains_key("x") || key.contains_key("n") {
                        if let Some(members) = jwk_key_members(&spki) {
                            for (name, value) in &members {
                                if key.get(name) != Some(value) {
                                    return Err(invalid(format!(
                                        "{at}: {name:?} does not match the x5c certificate's key"
                                    )));
                                }
                            }
                        }
                    }
                    if !x509_authorities.contains(&der) {
                        x509_authorities.push(der);
                    }
                }
                Some("jwt-svid") => {
                    let kid = key
                        .get("kid")
                        .and_then(Value::as_str)
                        .filter(|k| !k.is_empty())
                        .ok_or_else(|| invalid(format!("{at}: jwt-svid key without kid")))?;
                    let point = p256_point_from_jwk(key, &at)?;
                    if jwt_authorities.iter().any(|a| a.key_id == kid) {
                        return Err(invalid(format!("{at}: duplicate kid {kid:?}")));
                    }
                    jwt_authorities.push(JwtAuthority {
                        key_id: kid.to_owned(),
                        public_key_spki_der: p256_spki_der(&point),
                        expires_at: JwtAuthority::unknown_expiry(),
                    });
                }
                other => {
                    if skipped == 0 {
                        tracing::warn!(key = %at, r#use = ?other, "skipping a bundle key with an unknown use");
                    }
                    skipped += 1;
                }
            }
        }
        if skipped > 1 {
            // One line per document, however many keys it holds (it may come from the network).
            tracing::warn!(skipped, "skipped bundle keys with an unknown use");
        }
        Ok(Self {
            trust_domain,
            x509_authorities,
            jwt_authorities,
            sequence,
            refresh_hint,
        })
    }

    /// The X.509 authorities as concatenated PEM certificates.
    pub fn x509_pem(&self) -> String {
        self.x509_authorities
            .iter()
            .map(|der| crate::keys::pem_encode("CERTIFICATE", der))
            .collect()
    }

    /// Parses concatenated PEM CA certificates into X.509 authorities.
    pub fn x509_authorities_from_pem(pem: &str) -> Result<Vec<Vec<u8>>, BundleError> {
        let mut rest = pem.as_bytes();
        let mut out: Vec<Vec<u8>> = Vec::new();
        loop {
            let item = rustls_pemfile::read_one_from_slice(rest)
                .map_err(|e| invalid(format!("PEM: {e:?}")))?;
            let Some((item, next)) = item else { break };
            rest = next;
            if let rustls_pemfile::Item::X509Certificate(der) = item {
                cert_spki_der(&der)
                    .map_err(|e| invalid(format!("certificate {}: {e}", out.len() + 1)))?;
                if !out.iter().any(|c| c.as_slice() == der.as_ref()) {
                    out.push(der.to_vec());
                }
            }
        }
        if out.is_empty() {
            return Err(invalid("no CERTIFICATE block in the PEM"));
        }
        Ok(out)
    }

    /// The X.509 authorities as concatenated DER, as the Workload API carries them.
    pub fn x509_der_concat(&self) -> Vec<u8> {
        self.x509_authorities.concat()
    }

    /// The JWT authorities as a plain JWKS (`{"keys":[...]}`), each key with `kid`, `kty`,
    /// `crv`, `x`, `y`, as the Workload API's FetchJWTBundles carries them.
    pub fn jwt_jwks_json(&self) -> String {
        let keys: Vec<Value> = self
            .jwt_authorities
            .iter()
            .filter_map(|a| {
                let mut k = jwk_key_members(&a.public_key_spki_der)?;
                k.insert("kid".into(), a.key_id.clone().into());
                Some(Value::Object(k))
            })
            .collect();
        json!({ "keys": keys }).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PrivateKey;

    fn test_bundle() -> Bundle {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        let jwt_key = PrivateKey::generate().unwrap();
        Bundle {
            trust_domain: TrustDomain::new("example.org").unwrap(),
            x509_authorities: vec![cert.der().to_vec()],
            jwt_authorities: vec![JwtAuthority {
                key_id: "0123456789abcdef0123456789abcdef".into(),
                public_key_spki_der: jwt_key.public_key_spki_der(),
                expires_at: JwtAuthority::unknown_expiry(),
            }],
            sequence: 7,
            refresh_hint: Duration::from_secs(300),
        }
    }

    #[test]
    fn spiffe_json_has_the_specified_members_and_round_trips() {
        let b = test_bundle();
        let text = b.to_spiffe_json();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["spiffe_sequence"], 7);
        assert_eq!(v["spiffe_refresh_hint"], 300);
        let keys = v["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 2);
        let x = &keys[0];
        assert_eq!(x["use"], "x509-svid");
        assert_eq!(x["kty"], "EC");
        assert_eq!(x["crv"], "P-256");
        assert!(x.get("kid").is_none());
        assert_eq!(x["x5c"].as_array().unwrap().len(), 1);
        assert_eq!(
            STANDARD.decode(x["x5c"][0].as_str().unwrap()).unwrap(),
            b.x509_authorities[0]
        );
        assert_eq!(
            URL_SAFE_NO_PAD
                .decode(x["x"].as_str().unwrap())
                .unwrap()
                .len(),
            32
        );
        let j = &keys[1];
        assert_eq!(j["use"], "jwt-svid");
        assert_eq!(j["kid"], "0123456789abcdef0123456789abcdef");
        assert_eq!(j["kty"], "EC");
        assert!(j.get("x5c").is_none());

        let back = Bundle::from_spiffe_json(b.trust_domain.clone(), &text).unwrap();
        assert_eq!(back, b);
    }

    #[test]
    fn pem_round_trip() {
        let b = test_bundle();
        let pem = b.x509_pem();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----\n"));
        assert_eq!(
            Bundle::x509_authorities_from_pem(&pem).unwrap(),
            b.x509_authorities
        );
        let from_pem = Bundle::from_spiffe_json(b.trust_domain.clone(), &pem).unwrap();
        assert_eq!(from_pem.x509_authorities, b.x509_authorities);
        assert!(Bundle::x509_authorities_from_pem("nothing").is_err());
        assert_eq!(b.x509_der_concat(), b.x509_authorities[0]);
    }

    #[test]
    fn workload_jwks_has_kid_and_no_use() {
        let b = test_bundle();
        let v: Value = serde_json::from_str(&b.jwt_jwks_json()).unwrap();
        let k = &v["keys"][0];
        for m in ["kid", "kty", "crv", "x", "y"] {
            assert!(k.get(m).is_some(), "{m} missing");
        }
        assert!(k.get("use").is_none());
        // The `spiffe` crate reads it.
        let jb = spiffe::JwtBundle::from_jwt_authorities(
            b.trust_domain.clone(),
            b.jwt_jwks_json().as_bytes(),
        )
        .unwrap();
        assert!(jb
            .find_jwt_authority("0123456789abcdef0123456789abcdef")
            .is_some());
    }

    #[test]
    fn bad_documents_name_what_failed() {
        let td = TrustDomain::new("example.org").unwrap();
        let cases = [
            ("[]", "not a JSON object"),
            ("{}", "keys"),
            (r#"{"keys":[1]}"#, "keys[0]"),
            (r#"{"keys":[{"use":"x509-svid"}]}"#, "x5c"),
            (r#"{"keys":[{"use":"x509-svid","x5c":["!!"]}]}"#, "base64"),
            (r#"{"keys":[{"use":"x509-svid","x5c":["AAAA"]}]}"#, "X.509"),
            (r#"{"keys":[{"use":"jwt-svid","kty":"EC"}]}"#, "kid"),
            (
                r#"{"keys":[{"use":"jwt-svid","kid":"a","kty":"RSA"}]}"#,
                "not supported",
            ),
            (r#"{"keys":[],"spiffe_sequence":-1}"#, "spiffe_sequence"),
        ];
        for (doc, needle) in cases {
            let err = Bundle::from_spiffe_json(td.clone(), doc).unwrap_err();
            assert!(err.to_string().contains(needle), "{doc}: {err}");
        }
        // Unknown uses are skipped.
        let b = Bundle::from_spiffe_json(td, r#"{"keys":[{"use":"other"}]}"#).unwrap();
        assert!(b.x509_authorities.is_empty() && b.jwt_authorities.is_empty());
    }
}
