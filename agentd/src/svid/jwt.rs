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
    Audience { expected: String, actual: Vec<String> },
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
    #[serde(default)]
    kid: Option<serde_json::Value>,
    #[serde(default)]
    typ: Option<serde_json::Value>,
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

fn header_of(header: &str) -> Result<String, JwtError> {
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
    if let Some(typ) = &h.typ {
        match typ.as_str() {
            Some("JWT" | "JOSE") => {}
            _ => {
                return Err(JwtError::Header {
                    reason: format!("typ {typ} is not \"JWT\" or \"JOSE\""),
                })
            }
        }
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
    let authority = bundle
        .jwt_authorities
        .iter()
        .find(|a| a.key_id == kid)
        .ok_or_else(|| JwtError::UnknownKey { kid: kid.clone() })?;
    let point = p256_point_from_spki(&authority.public_key_spki_der).ok_or_else(|| {
        JwtError::Header {
            reason: format!("the bundle key {kid:?} is not an EC P-256 key"),
        }
    })?;
    let signature = b64(parts.signature, "signature")?;
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point)
        .verify(parts.signing_input.as_bytes(), &signature)
        .map_err(|_| JwtError::BadSignature)?;

    let claims = claims_of(parts.payload)?;
    let sub = claims
        .get("sub")
        .ok_or_else(|| claim_err("sub", "missing"))?
        .as_str()
        .ok_or_else(|| claim_err("sub", "not a string"))?;
    let spiffe_id =
        SpiffeId::new(sub).map_err(|e| claim_err("sub", format!("{sub:?}: {e}")))?;
    if !spiffe_id.is_member_of(&bundle.trust_domain) {
        return Err(claim_err(
            "sub",
            format!("{sub} is not in trust domain {}", bundle.trust_domain),
        ));
    }
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
    let actual: Vec<String> = match claims.get("aud") {
        None => return Err(claim_err("aud", "missing")),
        Some(Value::String(a)) => vec![a.clone()],
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| claim_err("aud", format!("{v} is not a string")))
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(claim_err(
                "aud",
                format!("{other} is not a string or a non-empty array of strings"),
            ))
        }
    };
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
