//! The JWT side of the CA: an ES256 key with a random `kid`, expiring with the X.509 CA, and
//! the minting of JWT-SVIDs (JWS compact serialization).

use std::time::SystemTime;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::EcdsaKeyPair;
use serde_json::{json, Map, Value};
use spiffe::TrustDomain;

use super::{CaError, IssuedJwtSvid, JwtSvidParams};
use crate::bundle::JwtAuthority;
use crate::clock::{from_unix_seconds, unix_seconds};
use crate::keys::PrivateKey;

/// Most audiences in one JWT-SVID (the SPIFFE clients refuse more).
pub const MAX_AUDIENCES: usize = 32;

/// Claims whose meaning the JWT-SVID spec (or RFC 7519) fixes.
const REGISTERED_CLAIMS: [&str; 7] = ["sub", "aud", "exp", "iat", "jti", "nbf", "iss"];

/// A fresh random key id: 32 lowercase hex characters.
pub(crate) fn random_kid() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

pub(crate) struct JwtSigner {
    kid: String,
    key_pair: EcdsaKeyPair,
    spki_der: Vec<u8>,
    not_after: SystemTime,
    rng: SystemRandom,
}

impl std::fmt::Debug for JwtSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtSigner")
            .field("kid", &self.kid)
            .field("not_after", &self.not_after)
            .field("key", &"<redacted>")
            .finish()
    }
}

fn sign_err(reason: impl Into<String>) -> CaError {
    CaError::Sign {
        reason: reason.into(),
    }
}

impl JwtSigner {
    pub fn new(kid: String, key: &PrivateKey, not_after: SystemTime) -> Result<Self, CaError> {
        Ok(Self {
            kid,
            key_pair: key.jws_key_pair()?,
            spki_der: key.public_key_spki_der(),
            not_after,
            rng: SystemRandom::new(),
        })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    pub fn authority(&self) -> JwtAuthority {
        JwtAuthority {
            key_id: self.kid.clone(),
            public_key_spki_der: self.spki_der.clone(),
            expires_at: self.not_after,
        }
    }

    /// Signs a JWT-SVID as [`JwtSvidParams`] describes. A registered claim (`sub`, `aud`,
    /// `exp`, `iat`, `jti`, `nbf`, `iss`) in `params.claims` is refused: the JWT-SVID spec
    /// fixes their meaning.
    pub fn sign(
        &self,
        trust_domain: &TrustDomain,
        params: &JwtSvidParams<'_>,
        issuer: Option<&str>,
        now: SystemTime,
    ) -> Result<IssuedJwtSvid, CaError> {
        let JwtSvidParams {
            spiffe_id,
            audience,
            ttl,
            claims: extra,
        } = *params;
        let no_claims = Map::new();
        let extra = extra.unwrap_or(&no_claims);
        if let Some(k) = extra
            .keys()
            .find(|k| REGISTERED_CLAIMS.contains(&k.as_str()))
        {
            return Err(sign_err(format!(
                "claim {k} is registered and cannot be set"
            )));
        }
        if !spiffe_id.is_member_of(trust_domain) {
            return Err(CaError::ForeignTrustDomain {
                spiffe_id: spiffe_id.to_string(),
                trust_domain: trust_domain.to_string(),
            });
        }
        if audience.is_empty() {
            return Err(sign_err("a JWT-SVID needs at least one audience"));
        }
        if audience.len() > MAX_AUDIENCES {
            return Err(sign_err(format!(
                "{} audiences, more than the limit of {MAX_AUDIENCES}",
                audience.len()
            )));
        }
        if audience.iter().any(String::is_empty) {
            return Err(sign_err("an audience is empty"));
        }
        let iat = unix_seconds(now);
        let key_exp = unix_seconds(self.not_after);
        if iat >= key_exp {
            return Err(CaError::Expired {
                not_after: self.not_after,
            });
        }
        let ttl = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        if ttl == 0 {
            return Err(sign_err("the TTL must be at least 1 second"));
        }
        let exp = iat.saturating_add(ttl).min(key_exp);
        let aud = match audience {
            [one] => Value::String(one.clone()),
            many => json!(many),
        };
        let jti = hex::encode(rand::random::<[u8; 16]>());
        let mut claims = Map::new();
        claims.insert("sub".into(), spiffe_id.to_string().into());
        claims.insert("aud".into(), aud);
        claims.insert("exp".into(), exp.into());
        claims.insert("iat".into(), iat.into());
        claims.insert("jti".into(), jti.clone().into());
        // The JWT-SVID spec leaves `iss` optional; with the OAuth front door on it names
        // the issuer, so OIDC libraries find the keys through discovery.
        if let Some(iss) = issuer {
            claims.insert("iss".into(), iss.into());
        }
        claims.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
        let token = self.sign_compact("JWT", &claims)?;
        Ok(IssuedJwtSvid {
            token,
            expires_at: from_unix_seconds(exp),
            jti,
            key_id: self.kid.clone(),
        })
    }

    /// The JWS compact serialization of `claims` under the header `alg: ES256`, this key's
    /// `kid`, and `typ`.
    fn sign_compact(&self, typ: &str, claims: &Map<String, Value>) -> Result<String, CaError> {
        let header = json!({"alg": "ES256", "kid": self.kid, "typ": typ});
        let mut token = URL_SAFE_NO_PAD.encode(header.to_string());
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(Value::Object(claims.clone()).to_string()));
        let sig = self
            .key_pair
            .sign(&self.rng, token.as_bytes())
            .map_err(|_| sign_err("ES256 signing failed"))?;
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(sig.as_ref()));
        Ok(token)
    }

    /// Signs an RFC 9068 access token: header `typ: at+jwt` (section 2.1), the claims as
    /// given (the caller sets every one RFC 9068 section 2.2 requires), except `exp`, which
    /// is capped at this key's expiry, and `jti`, which is made here. Returns the token,
    /// its `jti` and its `exp`.
    pub fn sign_access_token(
        &self,
        mut claims: Map<String, Value>,
        exp: i64,
        now: SystemTime,
    ) -> Result<IssuedJwtSvid, CaError> {
        let iat = unix_seconds(now);
        let key_exp = unix_seconds(self.not_after);
        if iat >= key_exp {
            return Err(CaError::Expired {
                not_after: self.not_after,
            });
        }
        let exp = exp.min(key_exp);
        if exp <= iat {
            return Err(sign_err("the token would expire before it is issued"));
        }
        let jti = hex::encode(rand::random::<[u8; 16]>());
        claims.insert("exp".into(), exp.into());
        claims.insert("iat".into(), iat.into());
        claims.insert("jti".into(), jti.clone().into());
        let token = self.sign_compact("at+jwt", &claims)?;
        Ok(IssuedJwtSvid {
            token,
            expires_at: from_unix_seconds(exp),
            jti,
            key_id: self.kid.clone(),
        })
    }
}
