//! `[oauth]` and `--oauth-bind-address` / `--oauth-issuer`, validated.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::config::Errors;
use crate::ttl::Ttl;

/// The longest access token unless configured otherwise.
pub const DEFAULT_MAX_TOKEN_TTL: Duration = Duration::from_secs(300);
/// The longest `max_token_ttl` accepted.
const MAX_MAX_TOKEN_TTL: Duration = Duration::from_secs(3600);

/// `[oauth]`, as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOAuth {
    /// HOST:PORT of the front door; off when unset.
    pub bind_address: Option<String>,
    /// The issuer URL (RFC 8414 section 2: https, no query or fragment); default
    /// `https://HOST:PORT` of the bound address.
    pub issuer: Option<String>,
    /// Longest access token (default 5m, at most 1h); a token never outlives its JWT-SVID.
    pub max_token_ttl: Option<String>,
    /// `[oauth.tls]`: a web PKI certificate for the front door, instead of one from the
    /// server's own CA.
    pub tls: Option<super::super::config::RawHttpsWeb>,
}

/// The front door, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthConfig {
    pub bind_address: SocketAddr,
    /// `None`: `https://` + the bound address.
    pub issuer: Option<String>,
    pub max_token_ttl: Duration,
    /// Certificate and key files (PEM); `None`: a certificate from the server's CA.
    pub tls: Option<(PathBuf, PathBuf)>,
}

/// Checks an issuer URL: https, a host, no query, fragment or credentials, no trailing
/// slash (RFC 8414 section 3.3 compares issuers as strings).
pub fn check_issuer(raw: &str) -> Result<String, String> {
    let url = url::Url::parse(raw).map_err(|e| format!("{raw:?} is not a URL: {e}"))?;
    if url.scheme() != "https" {
        return Err(format!("{raw:?} must be an https URL (RFC 8414 section 2)"));
    }
    if url.host_str().is_none() {
        return Err(format!("{raw:?} has no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("{raw:?} must have no query or fragment"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!("{raw:?} must hold no credentials"));
    }
    if raw.ends_with('/') {
        return Err(format!("{raw:?} must not end with '/'"));
    }
    // The endpoints and the well-known documents are served at the root; an issuer with a
    // path would need them under `/.well-known/oauth-authorization-server/PATH` (RFC 8414
    // section 3.1), which a reverse proxy in front would have to map. Refused rather than
    // published wrong.
    if url.path() != "/" {
        return Err(format!(
            "{raw:?} must have no path: the front door serves its endpoints and metadata at the root of its host"
        ));
    }
    Ok(raw.to_string())
}

pub fn oauth_config(errs: &mut Errors, raw: Option<RawOAuth>) -> Option<OAuthConfig> {
    const P: &str = "oauth";
    let raw = raw?;
    let issuer = raw
        .issuer
        .as_deref()
        .and_then(|i| errs.parse(&format!("{P}.issuer"), check_issuer(i)));
    let max_token_ttl = match &raw.max_token_ttl {
        None => DEFAULT_MAX_TOKEN_TTL,
        Some(s) => match errs.parse(&format!("{P}.max_token_ttl"), s.parse::<Ttl>()) {
            Some(t) if t.as_duration() <= MAX_MAX_TOKEN_TTL && t.as_secs() > 0 => t.as_duration(),
            Some(_) => {
                errs.push(&format!("{P}.max_token_ttl"), "must be 1s to 1h");
                DEFAULT_MAX_TOKEN_TTL
            }
            None => DEFAULT_MAX_TOKEN_TTL,
        },
    };
    let tls = super::super::config::cert_and_key(errs, "oauth.tls", raw.tls);
    let Some(addr) = raw.bind_address else {
        errs.push(
            &format!("{P}.bind_address"),
            "is required to serve the OAuth front door",
        );
        return None;
    };
    let bind_address = errs.parse(
        &format!("{P}.bind_address"),
        addr.parse::<SocketAddr>()
            .map_err(|e| format!("{e} (expected HOST:PORT with an IP address)")),
    )?;
    if bind_address.ip().is_unspecified() && raw.issuer.is_none() {
        errs.push(
            &format!("{P}.issuer"),
            format!(
                "is required when bind_address is the wildcard {}",
                bind_address.ip()
            ),
        );
    }
    Some(OAuthConfig {
        bind_address,
        issuer,
        max_token_ttl,
        tls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issuers_are_https_origins_without_path_query_fragment_or_trailing_slash() {
        assert!(check_issuer("https://agentd.example").is_ok());
        assert!(check_issuer("https://127.0.0.1:8443").is_ok());
        for (bad, why) in [
            ("http://agentd.example", "https"),
            ("https://agentd.example/", "'/'"),
            ("https://agentd.example?x=1", "query"),
            ("https://127.0.0.1:8443/td", "no path"),
            ("https://agentd.example#f", "fragment"),
            ("agentd.example", "not a URL"),
        ] {
            let e = check_issuer(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn every_bad_field_is_named() {
        let mut errs = Errors::default();
        let got = oauth_config(
            &mut errs,
            Some(RawOAuth {
                bind_address: Some("0.0.0.0:8443".into()),
                issuer: None,
                max_token_ttl: Some("2h".into()),
                tls: Some(super::super::super::config::RawHttpsWeb {
                    cert_file: Some("c.pem".into()),
                    key_file: None,
                }),
            }),
        );
        assert!(got.is_some());
        let text = errs.finish().unwrap_err().to_string();
        for field in ["oauth.issuer", "oauth.max_token_ttl", "oauth.tls.key_file"] {
            assert!(text.contains(field), "{field} not in {text}");
        }
    }
}
