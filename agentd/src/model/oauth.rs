//! Resource indicators (RFC 8707): the URL of a tool server an access token is for, and the
//! URL prefixes an entry or a grant may get tokens for (`--resource`).
//!
//! A resource is an absolute `https` or `http` URL with a host and no fragment (RFC 8707
//! section 2), no query and no credentials. A prefix allows a resource of the same scheme,
//! host and port whose path is the prefix's path or lies under it, segment by segment:
//! `https://tools.example/mcp` allows `https://tools.example/mcp` and
//! `https://tools.example/mcp/calendar`, never `https://tools.example/mcp-admin`.

use std::fmt;
use std::str::FromStr;

/// Longest resource URL accepted.
pub const MAX_RESOURCE_LEN: usize = 2048;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ResourceError {
    /// Not an absolute URL, or one this profile refuses.
    #[error("resource {input:?}: {reason}")]
    Invalid { input: String, reason: String },
}

fn invalid(input: &str, reason: impl Into<String>) -> ResourceError {
    ResourceError::Invalid {
        input: input.chars().take(120).collect(),
        reason: reason.into(),
    }
}

/// A resource indicator as a client sent it, checked. `as_str` is what the client sent
/// (the access token's `aud`, so a resource server compares it with its own URL exactly).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceUrl {
    raw: String,
    origin: String,
    path: String,
}

impl ResourceUrl {
    pub fn as_str(&self) -> &str {
        &self.raw
    }
}

fn parse_parts(s: &str) -> Result<(String, String), ResourceError> {
    if s.is_empty() {
        return Err(invalid(s, "is empty"));
    }
    if s.len() > MAX_RESOURCE_LEN {
        return Err(invalid(
            s,
            format!("is longer than {MAX_RESOURCE_LEN} bytes"),
        ));
    }
    if s.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(invalid(s, "holds whitespace or control characters"));
    }
    let url = url::Url::parse(s).map_err(|e| invalid(s, format!("is not an absolute URL: {e}")))?;
    if !matches!(url.scheme(), "https" | "http") {
        return Err(invalid(
            s,
            format!("scheme {:?} is not https or http", url.scheme()),
        ));
    }
    let Some(host) = url.host_str() else {
        return Err(invalid(s, "has no host"));
    };
    if url.fragment().is_some() {
        return Err(invalid(s, "has a fragment (RFC 8707 section 2)"));
    }
    if url.query().is_some() {
        return Err(invalid(s, "has a query"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(s, "holds credentials"));
    }
    let origin = match url.port() {
        Some(p) => format!("{}://{host}:{p}", url.scheme()),
        None => format!("{}://{host}", url.scheme()),
    };
    Ok((origin, url.path().to_string()))
}

impl FromStr for ResourceUrl {
    type Err = ResourceError;

    fn from_str(s: &str) -> Result<Self, ResourceError> {
        let (origin, path) = parse_parts(s)?;
        Ok(Self {
            raw: s.to_string(),
            origin,
            path,
        })
    }
}

impl fmt::Display for ResourceUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

/// What an entry or a grant may get access tokens for: resources under this URL.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourcePrefix(ResourceUrl);

impl ResourcePrefix {
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// Whether `resource` is this prefix or lies under it (same origin; the path equal, or
    /// continuing after a `/`).
    pub fn allows(&self, resource: &ResourceUrl) -> bool {
        let p = &self.0;
        if p.origin != resource.origin {
            return false;
        }
        let (pp, rp) = (p.path.as_str(), resource.path.as_str());
        if pp == "/" || pp == rp {
            return true;
        }
        match rp.strip_prefix(pp) {
            Some(rest) => pp.ends_with('/') || rest.starts_with('/'),
            None => false,
        }
    }
}

impl FromStr for ResourcePrefix {
    type Err = ResourceError;

    fn from_str(s: &str) -> Result<Self, ResourceError> {
        s.parse().map(Self)
    }
}

impl fmt::Display for ResourcePrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Parses `--resource` values: sorted, duplicates dropped, every bad one named.
pub fn parse_prefixes<S: AsRef<str>>(raw: &[S]) -> Result<Vec<ResourcePrefix>, ResourceError> {
    let mut out = raw
        .iter()
        .map(|s| s.as_ref().parse())
        .collect::<Result<Vec<ResourcePrefix>, _>>()?;
    out.sort();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> ResourceUrl {
        s.parse().unwrap()
    }

    fn p(s: &str) -> ResourcePrefix {
        s.parse().unwrap()
    }

    #[test]
    fn a_prefix_allows_its_path_and_below_it_only() {
        let mcp = p("https://tools.example/mcp");
        assert!(mcp.allows(&r("https://tools.example/mcp")));
        assert!(mcp.allows(&r("https://tools.example/mcp/calendar")));
        assert!(!mcp.allows(&r("https://tools.example/mcp-admin")));
        assert!(!mcp.allows(&r("https://tools.example/")));
        assert!(!mcp.allows(&r("http://tools.example/mcp")));
        assert!(!mcp.allows(&r("https://tools.example:8443/mcp")));
        assert!(!mcp.allows(&r("https://tools.example.evil/mcp")));
        // Host case and the default port do not matter; the path's case does.
        assert!(mcp.allows(&r("https://TOOLS.example:443/mcp")));
        assert!(!mcp.allows(&r("https://tools.example/MCP")));
        let slash = p("https://tools.example/api/");
        assert!(slash.allows(&r("https://tools.example/api/x")));
        assert!(!slash.allows(&r("https://tools.example/apix")));
        let origin = p("http://127.0.0.1:9000");
        assert!(origin.allows(&r("http://127.0.0.1:9000/mcp")));
        assert!(!origin.allows(&r("http://127.0.0.1:9001/mcp")));
    }

    #[test]
    fn bad_resources_are_refused_with_the_reason() {
        for (input, why) in [
            ("", "is empty"),
            ("tools.example/mcp", "absolute URL"),
            ("ftp://tools.example/", "scheme"),
            ("https://tools.example/mcp#x", "fragment"),
            ("https://tools.example/mcp?a=b", "query"),
            ("https://u:p@tools.example/", "credentials"),
            ("https://tools.example/ mcp", "whitespace"),
        ] {
            let e = input.parse::<ResourceUrl>().unwrap_err().to_string();
            assert!(e.contains(why), "{input:?}: {e}");
        }
        let long = format!("https://t.example/{}", "a".repeat(MAX_RESOURCE_LEN));
        assert!(long
            .parse::<ResourceUrl>()
            .unwrap_err()
            .to_string()
            .contains("longer"));
    }

    #[test]
    fn the_resource_keeps_what_the_client_sent() {
        assert_eq!(
            r("https://Tools.example:443/mcp").as_str(),
            "https://Tools.example:443/mcp"
        );
        let set = parse_prefixes(&[
            "https://b.example/",
            "https://a.example/",
            "https://b.example/",
        ])
        .unwrap();
        assert_eq!(set.len(), 2);
        assert_eq!(set[0].as_str(), "https://a.example/");
    }
}
