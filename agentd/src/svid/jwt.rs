//! JWT-SVID validation (SPIFFE JWT-SVID spec, sections 2 and 3): JWS compact, ES256 (the
//! only algorithm we issue; others are refused), header limited to `alg`, `kid`, `typ`,
//! signature by a key in the bundle, `aud` containing the expected audience, `exp` in the
//! future, `sub` a SPIFFE ID of the bundle's trust domain.

use std::time::SystemTime;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};
use serde_json::{Map, Value};
use spiffe::SpiffeId;

use crate::bundle::Bundle;
use crate::clock::unix_seconds;
use crate::keys::p256_point_from_spki;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("token is not a JWS compact serialization: {reason}")]
    Malformed { reason: String },
    #[error("unsupported header: {reason}")]
    Header { reason: String },
    #[error("no key with kid {kid:?} in the bundle")]
    UnknownKey { kid: String },
    #[error("signature does not verify")]
    BadSignature,
    #[error("token expired at {exp}")]
    Expired { exp: i64 },
    #[error("audience {expected:?} not in token audience {actual:?}")]
    Audience {
        expected: String,
        actual: Vec<String>,
    },
    #[error("claim {claim}: {reason}")]
    Claim { claim: &'static str, reason: String },
}

/// A JWT-SVID that passed validation.
#[derive(Debug, Clone)]
pub struct ValidatedJwtSvid {
    pub spiffe_id: SpiffeId,
    pub expires_at: i64,
    /// Every claim of the payload.
    pub claims: serde_json::Map<String, serde_json::Value>,
}

/// Longest token accepted (the Workload API caps JWT-SVIDs well below this).
pub const MAX_TOKEN_LEN: usize = 64 * 1024;

/// The JOSE header of a JWT-SVID: nothing but `alg`, `kid` and `typ` (duplicates refused).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    alg: serde_json::Value,
    #[serde(default, deserialize_with = "present")]
    kid: Option<serde_json::Value>,
    #[serde(default, deserialize_with = "present")]
    typ: Option<serde_json::Value>,
}

/// A member that is present is `Some`, even when it is `null` (which is then refused).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    <Value as serde::Deserialize>::deserialize(d).map(Some)
}

struct Parts<'a> {
    signing_input: &'a str,
    header: &'a str,
    payload: &'a str,
    signature: &'a str,
}

fn malformed(reason: impl Into<String>) -> JwtError {
    JwtError::Malformed {
        reason: reason.into(),
    }
}

fn split(token: &str) -> Result<Parts<'_>, JwtError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(malformed(format!(
            "token is {} bytes, more than the limit of {MAX_TOKEN_LEN}",
            token.len()
        )));
    }
    let token = token.trim();
    let mut it = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (it.next(), it.next(), it.next(), it.next())
    else {
        return Err(malformed(format!(
            "expected 3 dot-separated parts, found {}",
            token.split('.').count()
        )));
    };
    if header.is_empty() || payload.is_empty() || signature.is_empty() {
        return Err(malformed("a part is empty"));
    }
    Ok(Parts {
        signing_input: &token[..header.len() + 1 + payload.len()],
        header,
        payload,
        signature,
    })
}

fn b64(part: &str, what: &str) -> Result<Vec<u8>, JwtError> {
    URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|e| malformed(format!("{what} is not base64url without padding: {e}")))
}

fn claims_of(payload: &str) -> Result<Map<String, Value>, JwtError> {
    let bytes = b64(payload, "payload")?;
    serde_json::from_slice(&bytes)
        .map_err(|e| malformed(format!("payload is not a JSON object: {e}")))
}

/// The `kid` of a JWT-SVID header (`typ`, when present, `JWT` or `JOSE`).
fn header_of(header: &str) -> Result<String, JwtError> {
    header_with_typ(header, &["JWT", "JOSE"], false)
}

/// The `kid` of a header whose `alg` is ES256 and whose `typ` is one of `typs` (and
/// present, when `typ_required`).
fn header_with_typ(header: &str, typs: &[&str], typ_required: bool) -> Result<String, JwtError> {
    let bytes = b64(header, "header")?;
    let h: Header = serde_json::from_slice(&bytes).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => JwtError::Header {
            reason: e.to_string(),
        },
        _ => malformed(format!("header is not JSON: {e}")),
    })?;
    match h.alg.as_str() {
        Some("ES256") => {}
        Some(other) => {
            return Err(JwtError::Header {
                reason: format!("alg {other:?} is not accepted (only ES256)"),
            })
        }
        None => {
            return Err(JwtError::Header {
                reason: "alg is not a string".into(),
            })
        }
    }
    match &h.typ {
        Some(typ) => match typ.as_str() {
            Some(t) if typs.iter().any(|x| x.eq_ignore_ascii_case(t)) => {}
            _ => {
                return Err(JwtError::Header {
                    reason: format!("typ {typ} is not {}", typs.join(" or ")),
                })
            }
        },
        None if typ_required => {
            return Err(JwtError::Header {
                reason: format!("typ is missing (must be {})", typs.join(" or ")),
            })
        }
        None => {}
    }
    match h.kid {
        Some(Value::String(kid)) if !kid.is_empty() => Ok(kid),
        Some(other) => Err(JwtError::Header {
            reason: format!("kid {other} is not a non-empty string"),
        }),
        None => Err(JwtError::Header {
            reason: "kid is missing".into(),
        }),
    }
}

fn claim_err(claim: &'static str, reason: impl Into<String>) -> JwtError {
    JwtError::Claim {
        claim,
        reason: reason.into(),
    }
}

/// Validates `token` for `audience` against the JWT authorities in `bundle`.
pub fn validate(
    token: &str,
    audience: &str,
    bundle: &Bundle,
    now: SystemTime,
) -> Result<ValidatedJwtSvid, JwtError> {
    let parts = split(token)?;
    let kid = header_of(parts.header)?;
    verify_signature(&parts, &kid, bundle)?;
    let claims = claims_of(parts.payload)?;
    let sub = claims
        .get("sub")
        .ok_or_else(|| claim_err("sub", "missing"))?
        .as_str()
        .ok_or_else(|| claim_err("sub", "not a string"))?;
    let spiffe_id = SpiffeId::new(sub).map_err(|e| claim_err("sub", format!("{sub:?}: {e}")))?;
    if !spiffe_id.is_member_of(&bundle.trust_domain) {
        return Err(claim_err(
            "sub",
            format!("{sub} is not in trust domain {}", bundle.trust_domain),
        ));
    }
    let exp = check_times(&claims, now)?;
    let actual = audiences(&claims)?;
    if !actual.iter().any(|a| a == audience) {
        return Err(JwtError::Audience {
            expected: audience.to_owned(),
            actual,
        });
    }
    Ok(ValidatedJwtSvid {
        spiffe_id,
        expires_at: exp,
        claims,
    })
}

/// Validates an RFC 9068 access token this trust domain issued (section 4): header
/// `typ: at+jwt`, ES256 by a key of `bundle`, `iss` = `issuer`, `exp` in the future.
/// Returns its claims; what they grant is the caller's to judge.
pub fn validate_access_token(
    token: &str,
    issuer: &str,
    bundle: &Bundle,
    now: SystemTime,
) -> Result<Map<String, Value>, JwtError> {
    let parts = split(token)?;
    let kid = header_with_typ(parts.header, &["at+jwt", "application/at+jwt"], true)?;
    verify_signature(&parts, &kid, bundle)?;
    let claims = claims_of(parts.payload)?;
    match claims.get("iss").and_then(Value::as_str) {
        Some(iss) if iss == issuer => {}
        Some(other) => return Err(claim_err("iss", format!("{other:?} is not {issuer:?}"))),
        None => return Err(claim_err("iss", "missing or not a string")),
    }
    check_times(&claims, now)?;
    audiences(&claims)?;
    Ok(claims)
}

fn verify_signature(parts: &Parts<'_>, kid: &str, bundle: &Bundle) -> Result<(), JwtError> {
    let authority = bundle
        .jwt_authorities
        .iter()
        .find(|a| a.key_id == kid)
        .ok_or_else(|| JwtError::UnknownKey {
            kid: kid.to_string(),
        })?;
    let point =
        p256_point_from_spki(&authority.public_key_spki_der).ok_or_else(|| JwtError::Header {
            reason: format!("the bundle key {kid:?} is not an EC P-256 key"),
        })?;
    let signature = b64(parts.signature, "signature")?;
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point)
        .verify(parts.signing_input.as_bytes(), &signature)
        .map_err(|_| JwtError::BadSignature)
}

/// `exp` (required, in the future) and `nbf` (if present, passed); returns `exp`.
fn check_times(claims: &Map<String, Value>, now: SystemTime) -> Result<i64, JwtError> {
    let exp = match claims.get("exp") {
        None => return Err(claim_err("exp", "missing")),
        Some(v) => v
            .as_i64()
            .ok_or_else(|| claim_err("exp", format!("{v} is not an integer")))?,
    };
    let now_secs = unix_seconds(now);
    if exp <= now_secs {
        return Err(JwtError::Expired { exp });
    }
    if let Some(nbf) = claims.get("nbf") {
        let nbf = nbf
            .as_i64()
            .ok_or_else(|| claim_err("nbf", format!("{nbf} is not an integer")))?;
        if nbf > now_secs {
            return Err(claim_err("nbf", format!("not valid before {nbf}")));
        }
    }
    Ok(exp)
}

/// `aud`: a string or a non-empty array of strings.
/// The `aud` claim as a list (RFC 7519 section 4.1.3: a string or an array of strings).
pub fn audiences(claims: &Map<String, Value>) -> Result<Vec<String>, JwtError> {
    match claims.get("aud") {
        None => Err(claim_err("aud", "missing")),
        Some(Value::String(a)) => Ok(vec![a.clone()]),
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| claim_err("aud", format!("{v} is not a string")))
            })
            .collect(),
        Some(other) => Err(claim_err(
            "aud",
            format!("{other} is not a string or a non-empty array of strings"),
        )),
    }
}

/// Decodes the payload without verifying anything (for `svid inspect`).
pub fn decode_unverified(
    token: &str,
) -> Result<serde_json::Map<String, serde_json::Value>, JwtError> {
    claims_of(split(token)?.payload)
}

/// Decodes the header without verifying anything (for `svid inspect`).
pub fn decode_header_unverified(
    token: &str,
) -> Result<serde_json::Map<String, serde_json::Value>, JwtError> {
    let parts = split(token)?;
    let bytes = b64(parts.header, "header")?;
    serde_json::from_slice(&bytes)
        .map_err(|e| malformed(format!("header is not a JSON object: {e}")))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ring::rand::SystemRandom;
    use spiffe::TrustDomain;

    use super::*;
    use crate::ca::{CaConfig, CertificateAuthority};
    use crate::clock::{from_unix_seconds, ManualClock};
    use crate::keys::PrivateKey;

    struct Fixture {
        _dir: tempfile::TempDir,
        ca: CertificateAuthority,
        jwt_key: PrivateKey,
        now: SystemTime,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let now = from_unix_seconds(unix_seconds(SystemTime::now()));
        let ca = CertificateAuthority::load_or_create(
            &CaConfig {
                trust_domain: TrustDomain::new("example.org").unwrap(),
                key_dir: dir.path().to_path_buf(),
                ca_ttl: Duration::from_secs(3600),
                upstream: None,
                organization: "test".into(),
            },
            &ManualClock::new(now),
        )
        .unwrap();
        let jwt_key =
            PrivateKey::load(&dir.path().join(format!("jwt-{}.key", ca.jwt_key_id()))).unwrap();
        Fixture {
            _dir: dir,
            ca,
            jwt_key,
            now,
        }
    }

    impl Fixture {
        fn token(&self, aud: &[&str], ttl: u64) -> String {
            let aud: Vec<String> = aud.iter().map(|s| s.to_string()).collect();
            self.ca
                .sign_jwt_svid(
                    &crate::ca::JwtSvidParams {
                        spiffe_id: &SpiffeId::new("spiffe://example.org/agent").unwrap(),
                        audience: &aud,
                        ttl: Duration::from_secs(ttl),
                        claims: None,
                    },
                    self.now,
                )
                .unwrap()
                .token
        }

        /// A token with an arbitrary header and claims, validly signed by the CA's JWT key.
        fn forge(&self, header: &Value, claims: &Value) -> String {
            let mut t = URL_SAFE_NO_PAD.encode(header.to_string());
            t.push('.');
            t.push_str(&URL_SAFE_NO_PAD.encode(claims.to_string()));
            let sig = self
                .jwt_key
                .jws_key_pair()
                .unwrap()
                .sign(&SystemRandom::new(), t.as_bytes())
                .unwrap();
            t.push('.');
            t.push_str(&URL_SAFE_NO_PAD.encode(sig.as_ref()));
            t
        }

        fn claims(&self) -> Value {
            serde_json::json!({
                "sub": "spiffe://example.org/agent",
                "aud": "svc",
                "exp": unix_seconds(self.now) + 60,
            })
        }

        fn header(&self) -> Value {
            serde_json::json!({"alg": "ES256", "kid": self.ca.jwt_key_id(), "typ": "JWT"})
        }

        fn validate(&self, token: &str) -> Result<ValidatedJwtSvid, JwtError> {
            validate(token, "svc", &self.ca.bundle(), self.now)
        }
    }

    #[test]
    fn signed_token_validates() {
        let f = fixture();
        let v = f.validate(&f.token(&["svc"], 300)).unwrap();
        assert_eq!(v.spiffe_id.to_string(), "spiffe://example.org/agent");
        assert_eq!(v.expires_at, unix_seconds(f.now) + 300);
        assert_eq!(v.claims["aud"], "svc");
        // Several audiences.
        let v = f.validate(&f.token(&["x", "svc"], 300)).unwrap();
        assert_eq!(v.claims["aud"], serde_json::json!(["x", "svc"]));
        // A forged-but-valid token with typ JOSE and no typ passes too.
        let mut h = f.header();
        h["typ"] = "JOSE".into();
        f.validate(&f.forge(&h, &f.claims())).unwrap();
        h.as_object_mut().unwrap().remove("typ");
        f.validate(&f.forge(&h, &f.claims())).unwrap();
        // decode_unverified gives the claims.
        let claims = decode_unverified(&f.token(&["svc"], 300)).unwrap();
        assert_eq!(claims["sub"], "spiffe://example.org/agent");
    }

    #[test]
    fn wrong_audience_is_refused() {
        let f = fixture();
        let err = f.validate(&f.token(&["other", "more"], 300)).unwrap_err();
        assert_eq!(
            err,
            JwtError::Audience {
                expected: "svc".into(),
                actual: vec!["other".into(), "more".into()],
            }
        );
    }

    #[test]
    fn expired_token_is_refused() {
        let f = fixture();
        let token = f.token(&["svc"], 60);
        let exp = unix_seconds(f.now) + 60;
        assert!(validate(&token, "svc", &f.ca.bundle(), from_unix_seconds(exp - 1)).is_ok());
        for at in [exp, exp + 1, exp + 3600] {
            let err = validate(&token, "svc", &f.ca.bundle(), from_unix_seconds(at)).unwrap_err();
            assert_eq!(err, JwtError::Expired { exp });
        }
        // Through a ManualClock as well.
        let clock = ManualClock::new(f.now);
        clock.advance(Duration::from_secs(61));
        use crate::clock::Clock;
        assert!(matches!(
            validate(&token, "svc", &f.ca.bundle(), clock.now()),
            Err(JwtError::Expired { .. })
        ));
    }

    #[test]
    fn tampered_payload_is_refused() {
        let f = fixture();
        let token = f.token(&["svc"], 300);
        let parts: Vec<&str> = token.split('.').collect();
        let mut claims: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        claims["sub"] = "spiffe://example.org/admin".into();
        let tampered = format!(
            "{}.{}.{}",
            parts[0],
            URL_SAFE_NO_PAD.encode(claims.to_string()),
            parts[2]
        );
        assert_eq!(f.validate(&tampered).unwrap_err(), JwtError::BadSignature);
        // A flipped signature bit too.
        let mut sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        sig[5] ^= 1;
        let bad = format!("{}.{}.{}", parts[0], parts[1], URL_SAFE_NO_PAD.encode(sig));
        assert_eq!(f.validate(&bad).unwrap_err(), JwtError::BadSignature);
    }

    #[test]
    fn unknown_kid_is_refused() {
        let f = fixture();
        let mut h = f.header();
        h["kid"] = "nope".into();
        assert_eq!(
            f.validate(&f.forge(&h, &f.claims())).unwrap_err(),
            JwtError::UnknownKey { kid: "nope".into() }
        );
        // A bundle without our key.
        let mut b = f.ca.bundle();
        b.jwt_authorities.clear();
        assert!(matches!(
            validate(&f.token(&["svc"], 60), "svc", &b, f.now),
            Err(JwtError::UnknownKey { .. })
        ));
    }

    #[test]
    fn alg_none_and_other_algs_are_refused() {
        let f = fixture();
        for alg in ["none", "HS256", "RS256", "ES384", "es256"] {
            let mut h = f.header();
            h["alg"] = alg.into();
            let err = f.validate(&f.forge(&h, &f.claims())).unwrap_err();
            assert!(matches!(err, JwtError::Header { .. }), "{alg}: {err:?}");
            // Unsigned `none` token with an empty signature part.
            let unsigned = format!(
                "{}.{}.",
                URL_SAFE_NO_PAD.encode(h.to_string()),
                URL_SAFE_NO_PAD.encode(f.claims().to_string())
            );
            assert!(f.validate(&unsigned).is_err());
        }
    }

    #[test]
    fn extra_or_bad_header_fields_are_refused() {
        let f = fixture();
        let mut h = f.header();
        h["x5u"] = "https://evil.example/key".into();
        let err = f.validate(&f.forge(&h, &f.claims())).unwrap_err();
        assert!(
            matches!(&err, JwtError::Header { reason } if reason.contains("x5u")),
            "{err:?}"
        );

        let mut h = f.header();
        h["typ"] = "at+jwt".into();
        assert!(matches!(
            f.validate(&f.forge(&h, &f.claims())),
            Err(JwtError::Header { .. })
        ));
        let mut h = f.header();
        h["typ"] = Value::Null;
        assert!(matches!(
            f.validate(&f.forge(&h, &f.claims())),
            Err(JwtError::Header { .. })
        ));
        let mut h = f.header();
        h.as_object_mut().unwrap().remove("kid");
        assert!(matches!(
            f.validate(&f.forge(&h, &f.claims())),
            Err(JwtError::Header { .. })
        ));
        // A duplicated member.
        let raw = format!(
            r#"{{"alg":"ES256","alg":"ES256","kid":"{}"}}"#,
            f.ca.jwt_key_id()
        );
        let mut t = URL_SAFE_NO_PAD.encode(raw);
        t.push('.');
        t.push_str(&URL_SAFE_NO_PAD.encode(f.claims().to_string()));
        t.push_str(".AAAA");
        assert!(matches!(f.validate(&t), Err(JwtError::Header { .. })));
    }

    #[test]
    fn bad_claims_name_the_claim() {
        let f = fixture();
        let cases: Vec<(Value, &str)> = vec![
            (
                serde_json::json!({"aud": "svc", "exp": unix_seconds(f.now) + 60}),
                "sub",
            ),
            (
                serde_json::json!({"sub": "spiffe://other.org/a", "aud": "svc", "exp": unix_seconds(f.now) + 60}),
                "sub",
            ),
            (
                serde_json::json!({"sub": "not an id", "aud": "svc", "exp": unix_seconds(f.now) + 60}),
                "sub",
            ),
            (
                serde_json::json!({"sub": "spiffe://example.org/a", "aud": "svc", "exp": 1.5e12}),
                "exp",
            ),
            (
                serde_json::json!({"sub": "spiffe://example.org/a", "aud": "svc", "exp": "soon"}),
                "exp",
            ),
            (
                serde_json::json!({"sub": "spiffe://example.org/a", "aud": "svc"}),
                "exp",
            ),
            (
                serde_json::json!({"sub": "spiffe://example.org/a", "exp": unix_seconds(f.now) + 60}),
                "aud",
            ),
            (
                serde_json::json!({"sub": "spiffe://example.org/a", "aud": [], "exp": unix_seconds(f.now) + 60}),
                "aud",
            ),
            (
                serde_json::json!({"sub": "spiffe://example.org/a", "aud": [1], "exp": unix_seconds(f.now) + 60}),
                "aud",
            ),
            (
                serde_json::json!({"sub": "spiffe://example.org/a", "aud": "svc", "exp": unix_seconds(f.now) + 60, "nbf": unix_seconds(f.now) + 30}),
                "nbf",
            ),
        ];
        for (claims, name) in cases {
            match f.validate(&f.forge(&f.header(), &claims)) {
                Err(JwtError::Claim { claim, .. }) => assert_eq!(claim, name, "{claims}"),
                other => panic!("{claims}: expected a {name} claim error, got {other:?}"),
            }
        }
    }

    #[test]
    fn garbage_never_panics() {
        let f = fixture();
        let bundle = f.ca.bundle();
        let good = f.token(&["svc"], 60);
        let huge = "a".repeat(MAX_TOKEN_LEN + 1);
        let huge_dots = format!("{}.{}.{}", "A".repeat(40_000), "B".repeat(20_000), "C");
        let mut inputs: Vec<String> = vec![
            String::new(),
            ".".into(),
            "..".into(),
            "...".into(),
            "a.b".into(),
            "a.b.c.d".into(),
            "a.b.c".into(),
            "!!!.???.***".into(),
            "eyJ.eyJ.eyJ".into(),
            "e30.e30.e30".into(),
            "bnVsbA.bnVsbA.bnVsbA".into(),
            "W10.W10.AAAA".into(),
            "\u{0}\u{1}.\u{ff}.é".into(),
            good.replace('.', ".."),
            format!("{good}."),
            format!("{good}=="),
            good[..good.len() / 2].to_string(),
            huge,
            huge_dots,
        ];
        // Every single-character truncation and a sprinkling of byte flips.
        for cut in (0..good.len()).step_by(7) {
            inputs.push(good[..cut].to_string());
        }
        let bytes = good.as_bytes();
        for i in (0..bytes.len()).step_by(5) {
            let mut b = bytes.to_vec();
            b[i] = b"A-_.=+/~"[i % 8];
            inputs.push(String::from_utf8_lossy(&b).into_owned());
        }
        // Random junk.
        for n in 0..200 {
            let len = (n * 37) % 300;
            let junk: Vec<u8> = (0..len).map(|_| rand::random::<u8>()).collect();
            inputs.push(String::from_utf8_lossy(&junk).into_owned());
            inputs
                .push(URL_SAFE_NO_PAD.encode(&junk) + "." + &URL_SAFE_NO_PAD.encode(&junk) + ".x");
        }
        for input in &inputs {
            if input == &good {
                continue;
            }
            let r = validate(input, "svc", &bundle, f.now);
            assert!(r.is_err() || input.trim() == good, "accepted {input:?}");
            let _ = decode_unverified(input);
            let _ = decode_header_unverified(input);
        }
        let err = validate(&"a".repeat(MAX_TOKEN_LEN + 1), "svc", &bundle, f.now).unwrap_err();
        assert!(matches!(err, JwtError::Malformed { .. }));
        let err = validate("a.b", "svc", &bundle, f.now).unwrap_err();
        assert!(
            matches!(&err, JwtError::Malformed { reason } if reason.contains("3")),
            "{err:?}"
        );
    }
}
