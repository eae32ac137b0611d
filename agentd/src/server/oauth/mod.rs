//! The OAuth front door (docs/oauth.md): an HTTPS endpoint on the server that lets tools
//! which speak OAuth 2, not SPIFFE, accept agentd identities.
//!
//! - discovery: RFC 8414 authorization server metadata, OpenID Connect discovery and the
//!   JWKS (the trust domain's JWT keys), so plain OIDC libraries validate JWT-SVIDs;
//! - the token endpoint: RFC 8693 token exchange and the RFC 7523 section 2.1 JWT bearer
//!   grant (as MCP's workload identity federation uses it), both turning a JWT-SVID whose
//!   `aud` names the issuer into an RFC 9068 access token for one resource (RFC 8707);
//! - RFC 7662 introspection for relying parties that ask rather than validate.
//!
//! Policy lives in [`issue`] (what a token may carry) and [`introspect`]; the wire in
//! [`form`] and [`endpoint`].

pub mod config;
pub mod endpoint;
pub mod form;
pub mod introspect;
pub mod issue;

use serde_json::{json, Value};

pub use config::OAuthConfig;

/// RFC 8693 section 2.1.
pub const GRANT_TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// RFC 7523 section 2.1.
pub const GRANT_JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// RFC 7523 section 2.2.
pub const CLIENT_ASSERTION_JWT_BEARER: &str =
    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// RFC 8693 section 3.
pub const TOKEN_TYPE_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
pub const TOKEN_TYPE_ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";

/// Paths of the front door.
pub const TOKEN_PATH: &str = "/oauth2/token";
pub const INTROSPECTION_PATH: &str = "/oauth2/introspect";
pub const JWKS_PATH: &str = "/oauth2/jwks";

/// A refusal, as RFC 6749 section 5.2 (and RFC 8693 section 2.2.2, RFC 8707 section 2)
/// spell it: the error code, a description naming the field and the reason, and the HTTP
/// status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OAuthError {
    /// A parameter is missing, repeated, too large or malformed; or the body is not a form.
    #[error("invalid_request: {0}")]
    InvalidRequest(String),
    /// The client could not be authenticated (a bad `client_assertion`).
    #[error("invalid_client: {0}")]
    InvalidClient(String),
    /// The subject token or assertion is invalid, expired, revoked, or not for us.
    #[error("invalid_grant: {0}")]
    InvalidGrant(String),
    #[error("unsupported_grant_type: {0}")]
    UnsupportedGrantType(String),
    /// A scope is malformed or beyond what the identity holds.
    #[error("invalid_scope: {0}")]
    InvalidScope(String),
    /// The resource is malformed or not one the identity may get tokens for.
    #[error("invalid_target: {0}")]
    InvalidTarget(String),
    /// The server could not decide (its store is unreachable); nothing was issued.
    #[error("temporarily_unavailable: {0}")]
    Unavailable(String),
}

impl OAuthError {
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidRequest(_) => "invalid_request",
            Self::InvalidClient(_) => "invalid_client",
            Self::InvalidGrant(_) => "invalid_grant",
            Self::UnsupportedGrantType(_) => "unsupported_grant_type",
            Self::InvalidScope(_) => "invalid_scope",
            Self::InvalidTarget(_) => "invalid_target",
            Self::Unavailable(_) => "temporarily_unavailable",
        }
    }

    pub fn description(&self) -> &str {
        match self {
            Self::InvalidRequest(d)
            | Self::InvalidClient(d)
            | Self::InvalidGrant(d)
            | Self::UnsupportedGrantType(d)
            | Self::InvalidScope(d)
            | Self::InvalidTarget(d)
            | Self::Unavailable(d) => d,
        }
    }

    /// 400 for every refusal but a failed client authentication (401, RFC 6749 section
    /// 5.2) and an unreachable store (503).
    pub fn status(&self) -> u16 {
        match self {
            Self::InvalidClient(_) => 401,
            Self::Unavailable(_) => 503,
            _ => 400,
        }
    }

    /// This refusal as a failed client authentication (RFC 6749 section 5.2), except an
    /// unreachable store, which stays a 503: the client may be fine.
    pub fn into_client_error(self) -> Self {
        match self {
            Self::Unavailable(_) | Self::InvalidClient(_) => self,
            other => Self::InvalidClient(other.description().to_string()),
        }
    }

    pub fn to_json(&self) -> Value {
        json!({"error": self.code(), "error_description": self.description()})
    }
}

impl From<crate::datastore::DataStoreError> for OAuthError {
    fn from(e: crate::datastore::DataStoreError) -> Self {
        Self::Unavailable(format!("the datastore failed ({e}); nothing was issued"))
    }
}

/// The authorization server metadata (RFC 8414 section 2); the OpenID configuration is the
/// same document plus what OIDC discovery requires of a provider.
pub fn metadata(issuer: &str, scopes: &[String], openid: bool) -> Value {
    let mut m = json!({
        "issuer": issuer,
        "token_endpoint": format!("{issuer}{TOKEN_PATH}"),
        "jwks_uri": format!("{issuer}{JWKS_PATH}"),
        "introspection_endpoint": format!("{issuer}{INTROSPECTION_PATH}"),
        "grant_types_supported": [GRANT_TOKEN_EXCHANGE, GRANT_JWT_BEARER],
        "token_endpoint_auth_methods_supported": ["private_key_jwt", "none"],
        "token_endpoint_auth_signing_alg_values_supported": ["ES256"],
        "introspection_endpoint_auth_methods_supported": ["private_key_jwt"],
        "introspection_endpoint_auth_signing_alg_values_supported": ["ES256"],
        "scopes_supported": scopes,
        "response_types_supported": [],
    });
    if openid {
        m["response_types_supported"] = json!(["id_token"]);
        m["subject_types_supported"] = json!(["public"]);
        m["id_token_signing_alg_values_supported"] = json!(["ES256"]);
    }
    m
}

/// The JWKS: every JWT key of the trust domain's bundle, with `alg` and `use` (RFC 7517
/// section 4) so that OIDC libraries pick them.
pub fn jwks(bundle: &crate::bundle::Bundle) -> Value {
    let mut doc: Value =
        serde_json::from_str(&bundle.jwt_jwks_json()).unwrap_or_else(|_| json!({"keys": []}));
    if let Some(keys) = doc.get_mut("keys").and_then(Value::as_array_mut) {
        for k in keys.iter_mut() {
            if k.get("crv").and_then(Value::as_str) == Some("P-256") {
                k["alg"] = json!("ES256");
            }
            k["use"] = json!("sig");
        }
    }
    doc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_carry_their_rfc_6749_code_and_status() {
        let cases = [
            (
                OAuthError::InvalidRequest("x".into()),
                "invalid_request",
                400,
            ),
            (OAuthError::InvalidClient("x".into()), "invalid_client", 401),
            (OAuthError::InvalidGrant("x".into()), "invalid_grant", 400),
            (
                OAuthError::UnsupportedGrantType("x".into()),
                "unsupported_grant_type",
                400,
            ),
            (OAuthError::InvalidScope("x".into()), "invalid_scope", 400),
            (OAuthError::InvalidTarget("x".into()), "invalid_target", 400),
            (
                OAuthError::Unavailable("x".into()),
                "temporarily_unavailable",
                503,
            ),
        ];
        for (e, code, status) in cases {
            assert_eq!(
                e.to_json(),
                json!({"error": code, "error_description": "x"})
            );
            assert_eq!(e.status(), status, "{code}");
        }
    }

    #[test]
    fn a_bad_client_assertion_is_401_but_an_unreachable_store_stays_503() {
        let bad = OAuthError::InvalidGrant("expired".into()).into_client_error();
        assert_eq!((bad.code(), bad.status()), ("invalid_client", 401));
        assert_eq!(bad.description(), "expired");
        let down = OAuthError::Unavailable("down".into()).into_client_error();
        assert_eq!(
            (down.code(), down.status()),
            ("temporarily_unavailable", 503)
        );
    }

    #[test]
    fn metadata_names_every_endpoint_under_the_issuer() {
        let m = metadata("https://a.example", &[], false);
        assert_eq!(m["token_endpoint"], "https://a.example/oauth2/token");
        assert_eq!(m["jwks_uri"], "https://a.example/oauth2/jwks");
        assert_eq!(
            m["introspection_endpoint"],
            "https://a.example/oauth2/introspect"
        );
        assert!(m.get("id_token_signing_alg_values_supported").is_none());
        let o = metadata("https://a.example", &[], true);
        assert_eq!(o["id_token_signing_alg_values_supported"], json!(["ES256"]));
        assert_eq!(o["subject_types_supported"], json!(["public"]));
    }
}
