//! Platform claims node attestation: the node presents a JWT issued by its platform (a
//! Kubernetes projected service account token, a cloud instance identity token, a CI OIDC
//! token). The server checks the signature against the keys of a JWKS file, then `iss`,
//! `aud`, `exp` and `nbf`; selectors come from the configured claims.
//!
//! Only RS256 and ES256 are accepted: `none` and the HMAC algorithms (whose "key" would be
//! the public JWKS) are refused by name. A token carrying a `jti` is accepted once until it
//! expires, across server restarts when the server gives it a persistent [`SeenTokens`];
//! tokens without one may be presented again (platforms re-issue them).
//!
//! Over 600 lines only with its unit tests, which sign their own tokens.

use std::sync::Arc;
use std::time::SystemTime;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::signature::{
    RsaPublicKeyComponents, UnparsedPublicKey, ECDSA_P256_SHA256_FIXED, RSA_PKCS1_2048_8192_SHA256,
};
use serde_json::{Map, Value};
use spiffe::TrustDomain;

use super::seen::{MemorySeenTokens, SeenError, SeenTokens};
use super::template::{IdTemplate, TemplateError};
use super::{unix_seconds, NodeAttestation};
use crate::Selector;

pub const ATTESTATION_TYPE: &str = "claims";
pub const DEFAULT_TEMPLATE: &str = "spiffe://{trust_domain}/node/claims/{sub}";
pub const TEMPLATE_VARIABLES: &[&str] = &["trust_domain", "sub", "claim:"];
pub const DEFAULT_SELECTOR_CLAIMS: &[&str] = &["sub"];
/// Clock skew tolerated on `exp` and `nbf`, in seconds.
pub const LEEWAY_SECS: i64 = 30;
/// Longest token accepted.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
/// Most `jti` values remembered; beyond this, tokens with a `jti` are refused until some
/// expire.
pub const MAX_SEEN_JTI: usize = 100_000;

/// Why a platform token is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClaimsError {
    /// The token is not three base64url parts of JSON, or is too long.
    #[error("token is not a JWS compact serialization: {reason}")]
    Malformed { reason: String },
    /// The header says `alg: none`.
    #[error("alg \"none\" (an unsigned token) is refused")]
    AlgNone,
    /// The header names an algorithm other than RS256 and ES256.
    #[error("alg {alg:?} is not accepted (only RS256 and ES256)")]
    UnsupportedAlg { alg: String },
    /// The header's `kid` names no JWKS key of the token's algorithm.
    #[error("no key with kid {kid:?} for {alg} in the JWKS")]
    UnknownKey { kid: String, alg: String },
    /// No `kid`, and the JWKS has no key of the token's algorithm.
    #[error("the JWKS has no key for {alg}")]
    NoKey { alg: String },
    /// No candidate JWKS key verifies the signature.
    #[error("signature does not verify with the JWKS keys")]
    BadSignature,
    /// `exp` has passed (beyond [`LEEWAY_SECS`]).
    #[error("token expired at {exp} (unix seconds)")]
    Expired { exp: i64 },
    /// `nbf` is still ahead (beyond [`LEEWAY_SECS`]).
    #[error("token is not valid before {nbf} (unix seconds)")]
    NotYetValid { nbf: i64 },
    /// `iss` is not the configured issuer.
    #[error("issuer {actual:?} is not the configured issuer {expected:?}")]
    Issuer { expected: String, actual: String },
    /// `aud` does not include the configured audience.
    #[error("audience {expected:?} is not among the token's audiences {actual:?}")]
    Audience {
        expected: String,
        actual: Vec<String>,
    },
    /// A required claim is missing or of the wrong type.
    #[error("claim {claim}: {reason}")]
    Claim { claim: &'static str, reason: String },
    /// The token's `jti` was accepted before and the token has not expired.
    #[error("token with jti {jti:?} was already used")]
    Replayed { jti: String },
    /// [`MAX_SEEN_JTI`] token ids are remembered.
    #[error("too many remembered token ids; retry later")]
    Busy,
    /// The claims do not yield a usable node ID from the template.
    #[error("node SPIFFE ID from spiffe_id_template: {0}")]
    Template(#[from] TemplateError),
    /// The store of used token ids failed; the token is refused.
    #[error("recording the token id: {reason}")]
    Store { reason: String },
}

impl ClaimsError {
    /// Whether the request itself is malformed (InvalidArgument) rather than refused.
    pub fn is_malformed(&self) -> bool {
        matches!(self, ClaimsError::Malformed { .. })
    }
}

/// A verification key from the JWKS file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwkKey {
    /// Big-endian modulus and exponent.
    Rsa { n: Vec<u8>, e: Vec<u8> },
    /// Uncompressed point, `04 || x || y`.
    EcP256 { point: Vec<u8> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jwk {
    pub kid: Option<String>,
    pub key: JwkKey,
}

/// The server's claims settings, validated.
#[derive(Debug, Clone)]
pub struct ClaimsConfig {
    pub keys: Vec<Jwk>,
    pub issuer: String,
    pub audience: String,
    pub template: IdTemplate,
    pub selector_claims: Vec<String>,
}

/// Parses a JWKS document (`{"keys": [...]}`); RSA (n, e) and EC P-256 (x, y) keys are
/// kept, keys marked for another use (`use` other than `sig`) or of other types are skipped.
pub fn parse_jwks(text: &str) -> Result<Vec<Jwk>, String> {
    let doc: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let keys = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("no \"keys\" array")?;
    let mut out = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        let field = |name: &str| k.get(name).and_then(Value::as_str);
        let b64 = |name: &str| -> Result<Vec<u8>, String> {
            let v = field(name).ok_or_else(|| format!("keys[{i}].{name} is missing"))?;
            URL_SAFE_NO_PAD
                .decode(v.trim_end_matches('='))
                .map_err(|e| format!("keys[{i}].{name} is not base64url: {e}"))
        };
        if field("use").is_some_and(|u| u != "sig") {
            continue;
        }
        let kid = field("kid").map(str::to_owned);
        let key = match field("kty") {
            Some("RSA") => {
                let mut n = b64("n")?;
                let e = b64("e")?;
                let lead = n.iter().take_while(|b| **b == 0).count();
                n.drain(..lead);
                if n.len() < 256 {
                    return Err(format!(
                        "keys[{i}]: RSA modulus of {} bits; at least 2048 required",
                        n.len() * 8
                    ));
                }
                JwkKey::Rsa { n, e }
            }
            Some("EC") => {
                if field("crv") != Some("P-256") {
                    continue;
                }
                let (x, y) = (b64("x")?, b64("y")?);
                if x.len() != 32 || y.len() != 32 {
                    return Err(format!("keys[{i}]: P-256 x and y must be 32 bytes each"));
                }
                let mut point = vec![0x04];
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                JwkKey::EcP256 { point }
            }
            Some(_) => continue,
            None => return Err(format!("keys[{i}].kty is missing")),
        };
        out.push(Jwk { kid, key });
    }
    if out.is_empty() {
        return Err("no usable RSA or EC P-256 signing key".into());
    }
    Ok(out)
}

/// The verifier, with the `jti` values already seen.
#[derive(Debug)]
pub struct ClaimsAttestor {
    config: ClaimsConfig,
    trust_domain: TrustDomain,
    seen_jti: Arc<dyn SeenTokens>,
}

fn malformed(reason: impl Into<String>) -> ClaimsError {
    ClaimsError::Malformed {
        reason: reason.into(),
    }
}

fn claim_err(claim: &'static str, reason: impl Into<String>) -> ClaimsError {
    ClaimsError::Claim {
        claim,
        reason: reason.into(),
    }
}

fn b64(part: &str, what: &str) -> Result<Vec<u8>, ClaimsError> {
    URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|e| malformed(format!("{what} is not base64url without padding: {e}")))
}

fn int_claim(claims: &Map<String, Value>, name: &'static str) -> Result<Option<i64>, ClaimsError> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_i64()
            .or_else(|| v.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
            .map(Some)
            .ok_or_else(|| claim_err(name, format!("{v} is not a number"))),
    }
}

/// A claim as template text: strings as they are, numbers and booleans as written.
fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

impl ClaimsAttestor {
    pub fn new(config: ClaimsConfig, trust_domain: TrustDomain) -> Self {
        Self {
            config,
            trust_domain,
            seen_jti: Arc::new(MemorySeenTokens::new(MAX_SEEN_JTI)),
        }
    }

    /// Remembers used `jti` values in `seen` instead of in memory.
    pub fn with_seen_tokens(mut self, seen: Arc<dyn SeenTokens>) -> Self {
        self.seen_jti = seen;
        self
    }

    /// Verifies `token`; returns the node's SPIFFE ID and selectors.
    pub fn attest(&self, token: &str, now: SystemTime) -> Result<NodeAttestation, ClaimsError> {
        let token = token.trim();
        if token.len() > MAX_TOKEN_LEN {
            return Err(malformed(format!(
                "{} bytes; at most {MAX_TOKEN_LEN}",
                token.len()
            )));
        }
        let mut it = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (it.next(), it.next(), it.next(), it.next())
        else {
            return Err(malformed("expected 3 dot-separated parts"));
        };
        let header: Map<String, Value> = serde_json::from_slice(&b64(header, "header")?)
            .map_err(|e| malformed(format!("header is not a JSON object: {e}")))?;
        let alg = header
            .get("alg")
            .and_then(Value::as_str)
            .ok_or_else(|| malformed("header alg is missing or not a string"))?;
        match alg {
            "RS256" | "ES256" => {}
            a if a.eq_ignore_ascii_case("none") => return Err(ClaimsError::AlgNone),
            other => {
                return Err(ClaimsError::UnsupportedAlg {
                    alg: other.chars().take(32).collect(),
                })
            }
        }
        if signature.is_empty() {
            return Err(malformed("the signature is empty"));
        }
        let kid = match header.get("kid") {
            None => None,
            Some(Value::String(k)) => Some(k.as_str()),
            Some(other) => return Err(malformed(format!("header kid {other} is not a string"))),
        };
        let signing_input = &token[..header_len(token)];
        let sig = b64(signature, "signature")?;
        self.verify_signature(alg, kid, signing_input.as_bytes(), &sig)?;

        let claims: Map<String, Value> = serde_json::from_slice(&b64(payload, "payload")?)
            .map_err(|e| malformed(format!("payload is not a JSON object: {e}")))?;
        let now_s = unix_seconds(now);
        let exp = int_claim(&claims, "exp")?.ok_or_else(|| claim_err("exp", "missing"))?;
        if exp.saturating_add(LEEWAY_SECS) <= now_s {
            return Err(ClaimsError::Expired { exp });
        }
        if let Some(nbf) = int_claim(&claims, "nbf")? {
            if nbf.saturating_sub(LEEWAY_SECS) > now_s {
                return Err(ClaimsError::NotYetValid { nbf });
            }
        }
        let iss = claims
            .get("iss")
            .and_then(Value::as_str)
            .ok_or_else(|| claim_err("iss", "missing or not a string"))?;
        if iss != self.config.issuer {
            return Err(ClaimsError::Issuer {
                expected: self.config.issuer.clone(),
                actual: iss.chars().take(200).collect(),
            });
        }
        let aud: Vec<String> = match claims.get("aud") {
            Some(Value::String(a)) => vec![a.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            None => return Err(claim_err("aud", "missing")),
            Some(other) => {
                return Err(claim_err(
                    "aud",
                    format!("{other} is not a string or array"),
                ))
            }
        };
        if !aud.contains(&self.config.audience) {
            return Err(ClaimsError::Audience {
                expected: self.config.audience.clone(),
                actual: aud.into_iter().take(8).collect(),
            });
        }

        let spiffe_id = self.config.template.render(&self.trust_domain, |name| {
            let claim = if name == "sub" {
                "sub"
            } else {
                name.strip_prefix("claim:").unwrap_or(name)
            };
            match claims.get(claim) {
                Some(v) => {
                    scalar(v).ok_or_else(|| format!("claim {claim} is not a string or a number"))
                }
                None => Err(format!("the token has no claim {claim}")),
            }
        })?;
        let selectors = self.selectors(&claims);

        if let Some(jti) = claims.get("jti") {
            let jti = jti
                .as_str()
                .ok_or_else(|| claim_err("jti", "not a string"))?;
            // Remembered until the token could no longer be accepted (exp plus the leeway).
            let until = exp.saturating_add(LEEWAY_SECS);
            self.seen_jti
                .first_use(jti, until, now_s)
                .map_err(|e| match e {
                    SeenError::Replayed => ClaimsError::Replayed {
                        jti: jti.chars().take(100).collect(),
                    },
                    SeenError::Full => ClaimsError::Busy,
                    other => ClaimsError::Store {
                        reason: other.to_string(),
                    },
                })?;
        }
        Ok(NodeAttestation {
            spiffe_id,
            attestation_type: ATTESTATION_TYPE,
            selectors,
        })
    }

    fn verify_signature(
        &self,
        alg: &str,
        kid: Option<&str>,
        message: &[u8],
        sig: &[u8],
    ) -> Result<(), ClaimsError> {
        let fits = |k: &JwkKey| {
            matches!(
                (alg, k),
                ("RS256", JwkKey::Rsa { .. }) | ("ES256", JwkKey::EcP256 { .. })
            )
        };
        let candidates: Vec<&Jwk> = self
            .config
            .keys
            .iter()
            .filter(|k| fits(&k.key) && (kid.is_none() || k.kid.as_deref() == kid))
            .collect();
        if candidates.is_empty() {
            return Err(match kid {
                Some(kid) => ClaimsError::UnknownKey {
                    kid: kid.chars().take(100).collect(),
                    alg: alg.to_string(),
                },
                None => ClaimsError::NoKey {
                    alg: alg.to_string(),
                },
            });
        }
        let ok = candidates.iter().any(|k| match &k.key {
            JwkKey::Rsa { n, e } => RsaPublicKeyComponents { n, e }
                .verify(&RSA_PKCS1_2048_8192_SHA256, message, sig)
                .is_ok(),
            JwkKey::EcP256 { point } => UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point)
                .verify(message, sig)
                .is_ok(),
        });
        if ok {
            Ok(())
        } else {
            Err(ClaimsError::BadSignature)
        }
    }

    fn selectors(&self, claims: &Map<String, Value>) -> Vec<Selector> {
        let mut out = Vec::new();
        for name in &self.config.selector_claims {
            let values: Vec<&str> = match claims.get(name) {
                Some(Value::String(s)) => vec![s.as_str()],
                Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
                _ => continue,
            };
            for v in values {
                match Selector::new(ATTESTATION_TYPE, format!("{name}:{v}")) {
                    Ok(s) => out.push(s),
                    Err(e) => {
                        tracing::debug!(error = %e, claim = %name, "claims: a value is not usable as a selector; skipped")
                    }
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }
}

/// Length of `header.payload` in a token known to have three parts.
fn header_len(token: &str) -> usize {
    token.rfind('.').unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::test_support::{ec_key, rsa_key, TestKey, RESERVED};
    use serde_json::json;

    pub const ISSUER: &str = "https://token.actions.githubusercontent.com";
    pub const AUDIENCE: &str = "agentd";

    fn now() -> i64 {
        unix_seconds(SystemTime::now())
    }

    pub fn good_claims() -> Value {
        json!({
            "iss": ISSUER,
            "aud": ["other", AUDIENCE],
            "sub": "runner-7",
            "repository": "acme/agents",
            "groups": ["ops", "ci"],
            "exp": now() + 300,
            "nbf": now() - 10,
        })
    }

    fn attestor_with(keys: &[(&TestKey, &str)], template: &str) -> ClaimsAttestor {
        let jwks = json!({"keys": keys.iter().map(|(k, kid)| k.jwk(kid)).collect::<Vec<_>>()});
        ClaimsAttestor::new(
            ClaimsConfig {
                keys: parse_jwks(&jwks.to_string()).unwrap(),
                issuer: ISSUER.into(),
                audience: AUDIENCE.into(),
                template: IdTemplate::parse(template, TEMPLATE_VARIABLES, RESERVED).unwrap(),
                selector_claims: vec!["sub".into(), "repository".into(), "groups".into()],
            },
            TrustDomain::new("example.org").unwrap(),
        )
    }

    fn attestor(key: &TestKey) -> ClaimsAttestor {
        attestor_with(&[(key, "k1")], DEFAULT_TEMPLATE)
    }

    #[test]
    fn es256_and_rs256_tokens_attest_with_selectors() {
        for key in [ec_key(), rsa_key()] {
            let a = attestor(&key);
            let got = a
                .attest(&key.sign("k1", &good_claims()), SystemTime::now())
                .unwrap();
            assert_eq!(
                got.spiffe_id.to_string(),
                "spiffe://example.org/node/claims/runner-7"
            );
            assert_eq!(got.attestation_type, "claims");
            let sel: Vec<String> = got.selectors.iter().map(ToString::to_string).collect();
            assert_eq!(
                sel,
                [
                    "claims:groups:ci",
                    "claims:groups:ops",
                    "claims:repository:acme/agents",
                    "claims:sub:runner-7"
                ]
            );
        }
    }

    #[test]
    fn template_with_claims_and_reuse_without_jti() {
        let key = ec_key();
        let a = attestor_with(
            &[(&key, "k1")],
            "spiffe://{trust_domain}/ci/{claim:repository}/{sub}",
        );
        let token = key.sign("k1", &good_claims());
        let first = a.attest(&token, SystemTime::now()).unwrap();
        assert_eq!(
            first.spiffe_id.to_string(),
            "spiffe://example.org/ci/acme/agents/runner-7"
        );
        // No jti: the same token may be presented again, and gives the same ID.
        let second = a.attest(&token, SystemTime::now()).unwrap();
        assert_eq!(second.spiffe_id, first.spiffe_id);

        let mut c = good_claims();
        c.as_object_mut().unwrap().remove("repository");
        let err = a
            .attest(&key.sign("k1", &c), SystemTime::now())
            .unwrap_err();
        assert!(matches!(err, ClaimsError::Template(_)), "{err}");
    }

    #[test]
    fn a_token_with_jti_is_used_once() {
        let key = ec_key();
        let a = attestor(&key);
        let mut c = good_claims();
        c["jti"] = json!("abc-1");
        let token = key.sign("k1", &c);
        a.attest(&token, SystemTime::now()).unwrap();
        let err = a.attest(&token, SystemTime::now()).unwrap_err();
        assert!(matches!(err, ClaimsError::Replayed { .. }), "{err}");
    }

    #[test]
    fn an_expired_token_is_refused() {
        let key = ec_key();
        let a = attestor(&key);
        let mut c = good_claims();
        c["exp"] = json!(now() - 2 * LEEWAY_SECS);
        let err = a
            .attest(&key.sign("k1", &c), SystemTime::now())
            .unwrap_err();
        assert!(matches!(err, ClaimsError::Expired { .. }), "{err}");
        c["exp"] = json!(now() + 300);
        c["nbf"] = json!(now() + 2 * LEEWAY_SECS);
        let err = a
            .attest(&key.sign("k1", &c), SystemTime::now())
            .unwrap_err();
        assert!(matches!(err, ClaimsError::NotYetValid { .. }), "{err}");
        c.as_object_mut().unwrap().remove("nbf");
        c.as_object_mut().unwrap().remove("exp");
        let err = a
            .attest(&key.sign("k1", &c), SystemTime::now())
            .unwrap_err();
        assert!(err.to_string().contains("exp: missing"), "{err}");
    }

    #[test]
    fn a_wrong_audience_is_refused() {
        let key = ec_key();
        let a = attestor(&key);
        let mut c = good_claims();
        c["aud"] = json!("someone-else");
        let err = a
            .attest(&key.sign("k1", &c), SystemTime::now())
            .unwrap_err();
        assert!(matches!(err, ClaimsError::Audience { .. }), "{err}");
    }

    #[test]
    fn a_wrong_issuer_is_refused() {
        let key = ec_key();
        let a = attestor(&key);
        let mut c = good_claims();
        c["iss"] = json!("https://evil.example");
        let err = a
            .attest(&key.sign("k1", &c), SystemTime::now())
            .unwrap_err();
        assert!(matches!(err, ClaimsError::Issuer { .. }), "{err}");
    }

    #[test]
    fn a_bad_signature_is_refused() {
        let trusted = ec_key();
        let other = ec_key();
        let a = attestor(&trusted);
        // Signed by a key that is not in the JWKS, under the JWKS key's kid.
        let err = a
            .attest(&other.sign("k1", &good_claims()), SystemTime::now())
            .unwrap_err();
        assert_eq!(err, ClaimsError::BadSignature);
        // A payload swapped under a valid signature.
        let token = trusted.sign("k1", &good_claims());
        let mut parts: Vec<&str> = token.split('.').collect();
        let mut c = good_claims();
        c["sub"] = json!("someone-else");
        let forged = URL_SAFE_NO_PAD.encode(c.to_string());
        parts[1] = &forged;
        let err = a.attest(&parts.join("."), SystemTime::now()).unwrap_err();
        assert_eq!(err, ClaimsError::BadSignature);
        // An RSA token against an EC-only JWKS: no key.
        let err = a
            .attest(&rsa_key().sign("k1", &good_claims()), SystemTime::now())
            .unwrap_err();
        assert!(matches!(err, ClaimsError::UnknownKey { .. }), "{err}");
    }

    #[test]
    fn alg_none_and_hmac_are_refused() {
        let key = ec_key();
        let a = attestor(&key);
        let payload = URL_SAFE_NO_PAD.encode(good_claims().to_string());
        for alg in ["none", "None"] {
            let header = URL_SAFE_NO_PAD.encode(json!({"alg": alg}).to_string());
            for token in [
                format!("{header}.{payload}."),
                format!("{header}.{payload}.e30"),
            ] {
                assert_eq!(
                    a.attest(&token, SystemTime::now()).unwrap_err(),
                    ClaimsError::AlgNone
                );
            }
        }
        let hs = key.sign_with_header(&json!({"alg": "HS256", "kid": "k1"}), &good_claims());
        let err = a.attest(&hs, SystemTime::now()).unwrap_err();
        assert!(matches!(err, ClaimsError::UnsupportedAlg { .. }), "{err}");
    }

    #[test]
    fn malformed_tokens_are_errors_not_panics() {
        let key = ec_key();
        let a = attestor(&key);
        for token in [
            "",
            "a.b",
            "a.b.c.d",
            "!!.??.**",
            "e30.e30.e30",
            &"x".repeat(MAX_TOKEN_LEN + 1),
        ] {
            let err = a.attest(token, SystemTime::now()).unwrap_err();
            assert!(err.is_malformed(), "{token:.20}: {err}");
        }
    }

    #[test]
    fn jwks_parsing() {
        let ec = ec_key();
        let rsa = rsa_key();
        let text = json!({"keys": [ec.jwk("a"), rsa.jwk("b"),
            {"kty": "oct", "k": "c2VjcmV0"},
            {"kty": "RSA", "use": "enc", "n": "AQAB", "e": "AQAB"}]})
        .to_string();
        let keys = parse_jwks(&text).unwrap();
        assert_eq!(keys.len(), 2);
        assert!(parse_jwks("{}").is_err());
        assert!(parse_jwks(r#"{"keys": []}"#).is_err());
        assert!(
            parse_jwks(r#"{"keys": [{"kty": "RSA", "n": "AQAB", "e": "AQAB"}]}"#)
                .unwrap_err()
                .contains("2048")
        );
        assert!(
            parse_jwks(r#"{"keys": [{"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}]}"#)
                .is_err()
        );
    }
}
