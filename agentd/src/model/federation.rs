//! Federation with other trust domains (SPIFFE Federation spec): the relationships an
//! operator configures and the foreign bundles the server holds. Parsed at the edge: a
//! `FederationRelationship` or a `FederatedBundle` is valid once it exists.

use std::fmt;
use std::str::FromStr;

use spiffe::{SpiffeId, TrustDomain};

use crate::bundle::Bundle;

/// How a bundle endpoint is authenticated (SPIFFE Federation spec, section 5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointProfile {
    /// Web PKI: the endpoint's certificate chains to a system root (or `SSL_CERT_FILE`) and
    /// names the URL's host.
    HttpsWeb,
    /// The endpoint presents an X509-SVID with this SPIFFE ID, verified against the bundle
    /// last fetched from it (bootstrapped from an operator-supplied one).
    HttpsSpiffe { endpoint_spiffe_id: SpiffeId },
}

impl EndpointProfile {
    pub fn name(&self) -> &'static str {
        match self {
            Self::HttpsWeb => "https_web",
            Self::HttpsSpiffe { .. } => "https_spiffe",
        }
    }

    pub fn endpoint_spiffe_id(&self) -> Option<&SpiffeId> {
        match self {
            Self::HttpsWeb => None,
            Self::HttpsSpiffe { endpoint_spiffe_id } => Some(endpoint_spiffe_id),
        }
    }
}

/// A bundle endpoint URL: `https://host[:port][/path]`, nothing else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointUrl {
    url: String,
    host: String,
    port: u16,
    path_and_query: String,
}

/// Why a string is not a bundle endpoint URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not a bundle endpoint URL: {reason}")]
pub struct EndpointUrlError {
    pub input: String,
    pub reason: &'static str,
}

impl FromStr for EndpointUrl {
    type Err = EndpointUrlError;

    fn from_str(s: &str) -> Result<Self, EndpointUrlError> {
        let err = |reason| EndpointUrlError {
            input: s.chars().take(200).collect(),
            reason,
        };
        if s.len() > 2048 {
            return Err(err("longer than 2048 bytes"));
        }
        let rest = s
            .strip_prefix("https://")
            .ok_or_else(|| err("it must start with https://"))?;
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(err("it holds whitespace or control characters"));
        }
        let (authority, path) = match rest.find(['/', '?', '#']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if path.contains('#') {
            return Err(err("it must not have a fragment"));
        }
        // What an HTTP request line may carry (RFC 3986 path and query, percent-encoded).
        if !path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b))
        {
            return Err(err("its path holds characters a URL must percent-encode"));
        }
        if authority.contains('@') {
            return Err(err("it must not carry credentials"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| err("unclosed [ in the host"))?;
            let port = match after {
                "" => 443,
                p => p
                    .strip_prefix(':')
                    .and_then(|p| p.parse::<u16>().ok())
                    .ok_or_else(|| err("bad port"))?,
            };
            (h.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (
                    h.to_string(),
                    p.parse::<u16>().map_err(|_| err("bad port"))?,
                ),
                None => (authority.to_string(), 443),
            }
        };
        if host.is_empty() {
            return Err(err("it has no host"));
        }
        if port == 0 {
            return Err(err("port 0 is not a port to fetch from"));
        }
        // A DNS name or an IP address, as a TLS client can name it (SNI, certificate check).
        if rustls_pki_types::ServerName::try_from(host.as_str()).is_err() {
            return Err(err("its host is neither a DNS name nor an IP address"));
        }
        let path_and_query = if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_string()
        };
        Ok(Self {
            url: s.to_string(),
            host,
            port,
            path_and_query,
        })
    }
}

impl EndpointUrl {
    pub fn as_str(&self) -> &str {
        &self.url
    }
    pub fn host(&self) -> &str {
        &self.host
    }
    pub fn port(&self) -> u16 {
        self.port
    }
    pub fn path_and_query(&self) -> &str {
        &self.path_and_query
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_urls_parse_host_port_and_path() {
        let u: EndpointUrl = "https://bundles.partner.example".parse().unwrap();
        assert_eq!(
            (u.host(), u.port(), u.path_and_query()),
            ("bundles.partner.example", 443, "/")
        );
        let u: EndpointUrl = "https://127.0.0.1:8443/b?x=1".parse().unwrap();
        assert_eq!(
            (u.host(), u.port(), u.path_and_query()),
            ("127.0.0.1", 8443, "/b?x=1")
        );
        let u: EndpointUrl = "https://[::1]:9443".parse().unwrap();
        assert_eq!((u.host(), u.port(), u.path_and_query()), ("::1", 9443, "/"));
        let u: EndpointUrl = "https://h.example?q".parse().unwrap();
        assert_eq!(u.path_and_query(), "/?q");
        for bad in [
            "http://h.example",
            "https://",
            "https://::1/",
            "https://h.example:0",
            "https://h.example:99999",
            "https://user@h.example",
            "https://h.example/#frag",
            "https://h ex/",
            "https://[::1",
            "https://h_under$score.example",
            "https://h.example/p\u{e9}",
            "https://h.example/a%20b c",
            "https://h.example/<x>",
        ] {
            assert!(bad.parse::<EndpointUrl>().is_err(), "{bad} was accepted");
        }
    }
}

impl fmt::Display for EndpointUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url)
    }
}

/// A federation relationship: where the other trust domain's bundle is fetched from, and
/// how that endpoint is authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FederationRelationship {
    pub trust_domain: TrustDomain,
    pub bundle_endpoint_url: EndpointUrl,
    pub profile: EndpointProfile,
    pub created_at: i64,
    pub updated_at: i64,
}

/// Where a federated bundle came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundleSource {
    /// Set by an operator (`bundle set`, `federation create --trust-bundle`).
    Static,
    /// Fetched from the trust domain's bundle endpoint.
    Endpoint,
}

impl BundleSource {
    pub fn name(self) -> &'static str {
        match self {
            Self::Static => "static",
            Self::Endpoint => "endpoint",
        }
    }
}

/// Another trust domain's bundle as the server holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FederatedBundle {
    pub bundle: Bundle,
    pub source: BundleSource,
    /// Unix seconds it was stored.
    pub updated_at: i64,
}
