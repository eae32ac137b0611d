//! Server configuration: TOML file (`RawServerConfig`), overridden by flags, validated into
//! `ServerConfig` with every bad field reported at once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use agentd_attestor::node::{
    claims, template::IdTemplate, x509pop, ClaimsConfig, NodeAttestorsConfig, X509PopConfig,
};
use serde::Deserialize;
use spiffe::TrustDomain;

use crate::bundle::Bundle;
use crate::ca::UpstreamCa;
use crate::config::{default_data_dir, ConfigError, Errors};
use crate::ttl::Ttl;

pub const DEFAULT_ADMIN_SOCKET: &str = "/tmp/agentd-server/private/admin.sock";
pub const DEFAULT_BIND_ADDRESS: &str = "0.0.0.0:8081";
pub const DEFAULT_TRUST_DOMAIN: &str = "example.org";

/// The server config file, as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServerConfig {
    pub trust_domain: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub bind_address: Option<String>,
    pub admin_socket: Option<PathBuf>,
    /// Lifetime of the signing CA certificate.
    pub ca_ttl: Option<String>,
    pub default_x509_svid_ttl: Option<String>,
    pub default_jwt_svid_ttl: Option<String>,
    pub node_svid_ttl: Option<String>,
    pub join_token_ttl: Option<String>,
    /// O= of the CA and SVID subjects.
    pub organization: Option<String>,
    pub upstream_ca: Option<RawUpstreamCa>,
    /// Node attestors besides join tokens (which are always enabled).
    pub node_attestors: Option<RawNodeAttestors>,
    /// Refuse entries without `owner`.
    pub require_owner: Option<bool>,
    /// Mint nothing for the entries of a disabled owner (`agentd owner disable`).
    pub suspend_disabled_owners: Option<bool>,
    pub audit: Option<RawAudit>,
    /// HOST:PORT of the metrics and health endpoint (`/metrics`, `/live`, `/ready`); off
    /// when unset.
    pub metrics_address: Option<String>,
    /// OID prefix of the scope (`.1`) and delegation (`.2`) X.509 extensions.
    pub extension_oid_base: Option<String>,
    /// Largest `--max-depth` a grant may carry (default 4).
    pub max_delegation_depth: Option<u32>,
    /// Connection, stream and request-rate limits of the node API.
    pub node_api: Option<RawNodeApi>,
    /// `[datastore]`: where the server keeps its records (default: sled in the data dir).
    pub datastore: Option<RawDatastore>,
    /// `[federation]`: this trust domain's bundle endpoint (docs/federation.md).
    pub federation: Option<RawFederation>,
    /// `[oauth]`: the OAuth front door (docs/oauth.md).
    pub oauth: Option<crate::server::oauth::config::RawOAuth>,
}

/// `[federation]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFederation {
    /// HOST:PORT of the bundle endpoint; off when unset.
    pub bind_address: Option<String>,
    /// The `spiffe_refresh_hint` the endpoint publishes (default 5m; 10s to 1h).
    pub refresh_hint: Option<String>,
    /// `[federation.https_web]`: serve the endpoint with this web PKI certificate (the
    /// https_web profile) instead of the server's SVID (https_spiffe).
    pub https_web: Option<RawHttpsWeb>,
}

/// `[federation.https_web]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttpsWeb {
    /// PEM certificate chain, leaf first.
    pub cert_file: Option<PathBuf>,
    /// PEM PKCS#8 (or SEC1/PKCS#1) private key of the leaf; mode 0600.
    pub key_file: Option<PathBuf>,
}

/// The bundle endpoint, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleEndpointConfig {
    pub bind_address: SocketAddr,
    pub refresh_hint: Duration,
    /// `Some` for https_web (certificate and key files), `None` for https_spiffe.
    pub https_web: Option<(PathBuf, PathBuf)>,
}

/// A `cert_file` + `key_file` section (`[federation.https_web]`, `[oauth.tls]`): both or
/// neither, each missing one named by its path.
pub(crate) fn cert_and_key(
    errs: &mut Errors,
    section: &str,
    raw: Option<RawHttpsWeb>,
) -> Option<(PathBuf, PathBuf)> {
    match raw.map(|w| (w.cert_file, w.key_file))? {
        (Some(c), Some(k)) => Some((c, k)),
        (c, k) => {
            for (missing, field) in [(c.is_none(), "cert_file"), (k.is_none(), "key_file")] {
                if missing {
                    errs.push(
                        &format!("{section}.{field}"),
                        format!("is required with [{section}]"),
                    );
                }
            }
            None
        }
    }
}

/// The published refresh hint's bounds: a peer polls at most this often, and at least.
const MIN_PUBLISHED_HINT: Duration = Duration::from_secs(10);
const MAX_PUBLISHED_HINT: Duration = Duration::from_secs(3600);

fn bundle_endpoint(errs: &mut Errors, raw: Option<RawFederation>) -> Option<BundleEndpointConfig> {
    const P: &str = "federation";
    let raw = raw?;
    let refresh_hint = match &raw.refresh_hint {
        None => crate::bundle::DEFAULT_REFRESH_HINT,
        Some(s) => match errs.parse(&format!("{P}.refresh_hint"), s.parse::<Ttl>()) {
            Some(t) if (MIN_PUBLISHED_HINT..=MAX_PUBLISHED_HINT).contains(&t.as_duration()) => {
                t.as_duration()
            }
            Some(_) => {
                errs.push(&format!("{P}.refresh_hint"), "must be 10s to 1h");
                crate::bundle::DEFAULT_REFRESH_HINT
            }
            None => crate::bundle::DEFAULT_REFRESH_HINT,
        },
    };
    let https_web = cert_and_key(errs, "federation.https_web", raw.https_web);
    let Some(addr) = raw.bind_address else {
        if https_web.is_some() || raw.refresh_hint.is_some() {
            errs.push(
                &format!("{P}.bind_address"),
                "is required to serve a bundle endpoint",
            );
        }
        return None;
    };
    let bind_address = errs.parse(
        &format!("{P}.bind_address"),
        addr.parse::<SocketAddr>()
            .map_err(|e| format!("{e} (expected HOST:PORT with an IP address)")),
    )?;
    Some(BundleEndpointConfig {
        bind_address,
        refresh_hint,
        https_web,
    })
}

/// `[datastore]`.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDatastore {
    /// `postgres://user[:password]@host[:port]/database` (docs/operations.md: several servers).
    pub url: Option<String>,
}

impl std::fmt::Debug for RawDatastore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawDatastore")
            .field(
                "url",
                &self
                    .url
                    .as_deref()
                    .map(crate::datastore::pg_store::without_password),
            )
            .finish()
    }
}

/// Where the server keeps its records.
#[derive(Clone, PartialEq, Eq)]
pub enum Datastore {
    /// The embedded sled store, in `data_dir/datastore` (one server).
    Sled,
    /// PostgreSQL at this URL, which may hold a password (kept out of `Debug`).
    Postgres(zeroize::Zeroizing<String>),
}

impl std::fmt::Debug for Datastore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sled => f.write_str("Sled"),
            Self::Postgres(url) => f
                .debug_tuple("Postgres")
                .field(&crate::datastore::pg_store::without_password(url))
                .finish(),
        }
    }
}

/// `[node_api]`: limits that keep an unauthenticated peer from exhausting the node API.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNodeApi {
    pub max_connections: Option<usize>,
    pub max_connections_per_source: Option<usize>,
    pub max_handshakes_per_source: Option<usize>,
    pub max_concurrent_streams: Option<u32>,
    pub attest_requests_per_source_per_minute: Option<u32>,
    /// How often refused attestations are written to the audit log, aggregated.
    pub failure_audit_interval: Option<String>,
}

/// `[audit]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    /// Also append every audit record, as one JSON line, to this file (for a SIEM).
    pub export_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNodeAttestors {
    pub x509pop: Option<RawX509Pop>,
    pub claims: Option<RawClaims>,
}

/// `[node_attestors.x509pop]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawX509Pop {
    /// PEM file of the CA certificates node certificates must chain to.
    pub ca_bundle: Option<PathBuf>,
    /// Default `spiffe://{trust_domain}/node/x509pop/{sha256}`.
    pub spiffe_id_template: Option<String>,
}

/// `[node_attestors.claims]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClaims {
    /// JWKS (JSON) file with the platform's token signing keys.
    pub jwks_file: Option<PathBuf>,
    /// Required `iss`.
    pub issuer: Option<String>,
    /// Required member of `aud`.
    pub audience: Option<String>,
    /// Default `spiffe://{trust_domain}/node/claims/{sub}`.
    pub spiffe_id_template: Option<String>,
    /// Claims turned into `claims:<name>:<value>` selectors. Default `["sub"]`.
    pub selector_claims: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstreamCa {
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub bundle_file: Option<PathBuf>,
}

/// The validated server config.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub trust_domain: TrustDomain,
    pub data_dir: PathBuf,
    pub bind_address: SocketAddr,
    pub admin_socket: PathBuf,
    pub ca_ttl: Duration,
    pub default_x509_svid_ttl: Ttl,
    pub default_jwt_svid_ttl: Ttl,
    pub node_svid_ttl: Ttl,
    pub join_token_ttl: Ttl,
    pub organization: String,
    pub upstream_ca: Option<UpstreamCa>,
    pub node_attestors: NodeAttestorsConfig,
    pub require_owner: bool,
    pub suspend_disabled_owners: bool,
    pub audit_export_file: Option<PathBuf>,
    pub metrics_address: Option<SocketAddr>,
    pub delegation: DelegationConfig,
    pub node_api: NodeApiLimits,
    pub datastore: Datastore,
    /// This trust domain's bundle endpoint; off when `None`.
    pub bundle_endpoint: Option<BundleEndpointConfig>,
    /// The OAuth front door; off when `None`.
    pub oauth: Option<crate::server::oauth::OAuthConfig>,
}

/// The node API's limits, validated (`[node_api]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeApiLimits {
    pub connections: crate::tls::ConnectionLimits,
    /// HTTP/2 streams one connection may have open at once (requests in flight).
    pub max_concurrent_streams: u32,
    /// `Attest` and `X509PopChallenge` calls one source may make per minute (a burst of
    /// this many, then refilled evenly); beyond it they are refused before any work.
    pub attest_requests_per_source_per_minute: u32,
    /// Refused attestations are counted per source and reason and written to the audit
    /// log as one record per interval.
    pub failure_audit_interval: Duration,
}

impl Default for NodeApiLimits {
    fn default() -> Self {
        Self {
            connections: crate::tls::ConnectionLimits::default(),
            max_concurrent_streams: 64,
            attest_requests_per_source_per_minute: 120,
            failure_audit_interval: Duration::from_secs(60),
        }
    }
}

fn node_api_limits(errs: &mut Errors, raw: Option<RawNodeApi>) -> NodeApiLimits {
    const P: &str = "node_api";
    let d = NodeApiLimits::default();
    let Some(raw) = raw else { return d };
    let mut count = |field: &str, v: Option<usize>, default: usize, max: usize| match v {
        None => default,
        Some(n) if (1..=max).contains(&n) => n,
        Some(n) => {
            errs.push(
                &format!("{P}.{field}"),
                format!("{n} is out of range: must be 1 to {max}"),
            );
            default
        }
    };
    let connections = crate::tls::ConnectionLimits {
        max_connections: count(
            "max_connections",
            raw.max_connections,
            d.connections.max_connections,
            1_000_000,
        ),
        max_connections_per_source: count(
            "max_connections_per_source",
            raw.max_connections_per_source,
            d.connections.max_connections_per_source,
            1_000_000,
        ),
        max_handshakes_per_source: count(
            "max_handshakes_per_source",
            raw.max_handshakes_per_source,
            d.connections.max_handshakes_per_source,
            10_000,
        ),
    };
    let max_concurrent_streams = count(
        "max_concurrent_streams",
        raw.max_concurrent_streams.map(|n| n as usize),
        d.max_concurrent_streams as usize,
        10_000,
    ) as u32;
    let attest_requests_per_source_per_minute = count(
        "attest_requests_per_source_per_minute",
        raw.attest_requests_per_source_per_minute
            .map(|n| n as usize),
        d.attest_requests_per_source_per_minute as usize,
        1_000_000,
    ) as u32;
    let failure_audit_interval = match raw.failure_audit_interval {
        None => d.failure_audit_interval,
        Some(text) => match humantime::parse_duration(&text) {
            Ok(i) if i >= Duration::from_secs(1) && i <= Duration::from_secs(3600) => i,
            Ok(_) => {
                errs.push(
                    &format!("{P}.failure_audit_interval"),
                    "must be between 1s and 1h",
                );
                d.failure_audit_interval
            }
            Err(e) => {
                errs.push(&format!("{P}.failure_audit_interval"), e.to_string());
                d.failure_audit_interval
            }
        },
    };
    NodeApiLimits {
        connections,
        max_concurrent_streams,
        attest_requests_per_source_per_minute,
        failure_audit_interval,
    }
}

/// Scope and delegation settings.
#[derive(Debug, Clone, Default)]
pub struct DelegationConfig {
    pub oid_base: crate::delegation::OidBase,
    pub max_depth: u32,
}

fn ttl_or(errs: &mut Errors, path: &str, raw: &Option<String>, default: u64) -> Ttl {
    let parsed = match raw {
        Some(s) => errs.parse(path, s.parse::<Ttl>()),
        None => None,
    };
    parsed.unwrap_or_else(|| Ttl::clamped(default))
}

impl TryFrom<RawServerConfig> for ServerConfig {
    type Error = ConfigError;

    fn try_from(raw: RawServerConfig) -> Result<Self, ConfigError> {
        let mut errs = Errors::default();
        let trust_domain = errs.parse(
            "trust_domain",
            TrustDomain::new(raw.trust_domain.as_deref().unwrap_or(DEFAULT_TRUST_DOMAIN)),
        );
        let bind_address = errs.parse(
            "bind_address",
            raw.bind_address
                .as_deref()
                .unwrap_or(DEFAULT_BIND_ADDRESS)
                .parse::<SocketAddr>()
                .map_err(|e| format!("{e} (expected HOST:PORT with an IP address)")),
        );
        let ca_ttl = ttl_or(&mut errs, "ca_ttl", &raw.ca_ttl, 365 * 24 * 3600);
        let default_x509_svid_ttl = ttl_or(
            &mut errs,
            "default_x509_svid_ttl",
            &raw.default_x509_svid_ttl,
            3600,
        );
        let default_jwt_svid_ttl = ttl_or(
            &mut errs,
            "default_jwt_svid_ttl",
            &raw.default_jwt_svid_ttl,
            300,
        );
        let node_svid_ttl = ttl_or(&mut errs, "node_svid_ttl", &raw.node_svid_ttl, 3600);
        let join_token_ttl = ttl_or(&mut errs, "join_token_ttl", &raw.join_token_ttl, 600);
        if ca_ttl.as_duration() < Duration::from_secs(60) {
            errs.push("ca_ttl", "must be at least 60s");
        }
        let organization = raw.organization.unwrap_or_else(|| "agentd".to_string());
        if organization.is_empty() || organization.chars().any(char::is_control) {
            errs.push("organization", "must be non-empty printable text");
        }
        let upstream_ca = raw.upstream_ca.and_then(|u| {
            let cert_file = u.cert_file.or_else(|| {
                errs.push("upstream_ca.cert_file", "is required with [upstream_ca]");
                None
            });
            let key_file = u.key_file.or_else(|| {
                errs.push("upstream_ca.key_file", "is required with [upstream_ca]");
                None
            });
            Some(UpstreamCa {
                cert_file: cert_file?,
                key_file: key_file?,
                bundle_file: u.bundle_file,
            })
        });
        let node_attestors = raw
            .node_attestors
            .map(|n| NodeAttestorsConfig {
                x509pop: n
                    .x509pop
                    .and_then(|x| x509pop_config(&mut errs, x, trust_domain.as_ref())),
                claims: n
                    .claims
                    .and_then(|c| claims_config(&mut errs, c, trust_domain.as_ref())),
            })
            .unwrap_or_default();
        let audit_export_file = raw.audit.and_then(|a| a.export_file);
        if let Some(path) = &audit_export_file {
            if path.as_os_str().is_empty() || path.is_dir() {
                errs.push("audit.export_file", "must be a file path");
            }
        }
        let metrics_address = raw.metrics_address.as_deref().and_then(|a| {
            errs.parse(
                "metrics_address",
                crate::telemetry::parse_metrics_address(a),
            )
        });
        let oid_base = match &raw.extension_oid_base {
            Some(s) => errs.parse("extension_oid_base", s.parse()),
            None => Some(crate::delegation::OidBase::default()),
        };
        let max_depth = raw
            .max_delegation_depth
            .unwrap_or(crate::delegation::DEFAULT_MAX_DEPTH);
        if max_depth > 32 {
            errs.push("max_delegation_depth", "must be at most 32");
        }
        let node_api = node_api_limits(&mut errs, raw.node_api);
        let bundle_endpoint = bundle_endpoint(&mut errs, raw.federation);
        let oauth = crate::server::oauth::config::oauth_config(&mut errs, raw.oauth);
        let datastore = match raw.datastore.and_then(|d| d.url) {
            None => Datastore::Sled,
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                Datastore::Postgres(zeroize::Zeroizing::new(url))
            }
            Some(url) => {
                errs.push(
                    "datastore.url",
                    format!(
                        "{:?} is not a postgres:// URL (postgres://user@host:port/database)",
                        crate::datastore::pg_store::without_password(&url)
                    ),
                );
                Datastore::Sled
            }
        };
        // Both are `Some` unless an error was recorded for them, which `finish` reports.
        let (Some(trust_domain), Some(bind_address)) = (trust_domain, bind_address) else {
            errs.finish()?;
            return Err(ConfigError { errors: vec![] });
        };
        errs.finish()?;
        Ok(ServerConfig {
            trust_domain,
            data_dir: raw.data_dir.unwrap_or_else(|| default_data_dir("server")),
            bind_address,
            admin_socket: raw
                .admin_socket
                .unwrap_or_else(|| PathBuf::from(DEFAULT_ADMIN_SOCKET)),
            ca_ttl: ca_ttl.as_duration(),
            default_x509_svid_ttl,
            default_jwt_svid_ttl,
            node_svid_ttl,
            join_token_ttl,
            organization,
            upstream_ca,
            node_attestors,
            require_owner: raw.require_owner.unwrap_or(false),
            suspend_disabled_owners: raw.suspend_disabled_owners.unwrap_or(false),
            audit_export_file,
            metrics_address,
            delegation: DelegationConfig {
                oid_base: oid_base.unwrap_or_default(),
                max_depth,
            },
            node_api,
            datastore,
            bundle_endpoint,
            oauth,
        })
    }
}

/// Parses a template and, when the trust domain is known, checks that it yields a node ID.
fn id_template(
    errs: &mut Errors,
    path: &str,
    raw: Option<String>,
    default: &str,
    known: &[&str],
    trust_domain: Option<&TrustDomain>,
) -> Option<IdTemplate> {
    let raw = raw.unwrap_or_else(|| default.to_string());
    let t = errs.parse(
        path,
        IdTemplate::parse(&raw, known, crate::tls::RESERVED_PATH_PREFIX),
    )?;
    if let Some(td) = trust_domain {
        errs.parse(path, t.check(td))?;
    }
    Some(t)
}

fn x509pop_config(
    errs: &mut Errors,
    raw: RawX509Pop,
    trust_domain: Option<&TrustDomain>,
) -> Option<X509PopConfig> {
    const P: &str = "node_attestors.x509pop";
    let ca_bundle = match raw.ca_bundle {
        None => {
            errs.push(
                &format!("{P}.ca_bundle"),
                "is required with [node_attestors.x509pop]",
            );
            None
        }
        Some(path) => {
            let loaded = std::fs::read_to_string(&path)
                .map_err(|e| format!("{}: {e}", path.display()))
                .and_then(|text| {
                    Bundle::x509_authorities_from_pem(&text)
                        .map_err(|e| format!("{}: {e}", path.display()))
                })
                .and_then(|certs| {
                    if certs.is_empty() {
                        return Err(format!("{}: no certificates", path.display()));
                    }
                    for (i, c) in certs.iter().enumerate() {
                        let der = rustls_pki_types::CertificateDer::from(c.as_slice());
                        webpki::anchor_from_trusted_cert(&der).map_err(|e| {
                            format!("{}: certificate {i} is unusable: {e}", path.display())
                        })?;
                    }
                    Ok(certs)
                });
            errs.parse(&format!("{P}.ca_bundle"), loaded)
        }
    };
    let template = id_template(
        errs,
        &format!("{P}.spiffe_id_template"),
        raw.spiffe_id_template,
        x509pop::DEFAULT_TEMPLATE,
        x509pop::TEMPLATE_VARIABLES,
        trust_domain,
    );
    Some(X509PopConfig {
        ca_bundle: ca_bundle?,
        template: template?,
    })
}

fn claims_config(
    errs: &mut Errors,
    raw: RawClaims,
    trust_domain: Option<&TrustDomain>,
) -> Option<ClaimsConfig> {
    const P: &str = "node_attestors.claims";
    let keys = match raw.jwks_file {
        None => {
            errs.push(
                &format!("{P}.jwks_file"),
                "is required with [node_attestors.claims]",
            );
            None
        }
        Some(path) => errs.parse(
            &format!("{P}.jwks_file"),
            std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|t| claims::parse_jwks(&t))
                .map_err(|e| format!("{}: {e}", path.display())),
        ),
    };
    let mut required = |field: &str, v: Option<String>| -> Option<String> {
        match v {
            Some(v) if !v.is_empty() && !v.chars().any(char::is_control) => Some(v),
            Some(_) => {
                errs.push(&format!("{P}.{field}"), "must be non-empty printable text");
                None
            }
            None => {
                errs.push(
                    &format!("{P}.{field}"),
                    "is required with [node_attestors.claims]",
                );
                None
            }
        }
    };
    let issuer = required("issuer", raw.issuer);
    let audience = required("audience", raw.audience);
    let template = id_template(
        errs,
        &format!("{P}.spiffe_id_template"),
        raw.spiffe_id_template,
        claims::DEFAULT_TEMPLATE,
        claims::TEMPLATE_VARIABLES,
        trust_domain,
    );
    let selector_claims = raw.selector_claims.unwrap_or_else(|| {
        claims::DEFAULT_SELECTOR_CLAIMS
            .iter()
            .map(|s| s.to_string())
            .collect()
    });
    for c in &selector_claims {
        if c.is_empty() || c.len() > 128 || c.contains(':') || c.chars().any(char::is_control) {
            errs.push(
                &format!("{P}.selector_claims"),
                format!("{c:?} must be a claim name of 1 to 128 printable characters without ':'"),
            );
        }
    }
    Some(ClaimsConfig {
        keys: keys?,
        issuer: issuer?,
        audience: audience?,
        template: template?,
        selector_claims,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_gives_working_defaults() {
        let cfg = ServerConfig::try_from(RawServerConfig::default()).unwrap();
        assert_eq!(cfg.trust_domain.as_str(), "example.org");
        assert_eq!(cfg.bind_address.port(), 8081);
        assert_eq!(cfg.default_x509_svid_ttl.as_secs(), 3600);
        assert_eq!(cfg.default_jwt_svid_ttl.as_secs(), 300);
        assert_eq!(cfg.admin_socket, PathBuf::from(DEFAULT_ADMIN_SOCKET));
    }

    #[test]
    fn every_bad_field_is_named() {
        let raw: RawServerConfig = toml::from_str(
            r#"
            trust_domain = "Bad Domain!"
            bind_address = "nowhere"
            default_x509_svid_ttl = "0"
            [upstream_ca]
            cert_file = "/x.pem"
            "#,
        )
        .unwrap();
        let err = ServerConfig::try_from(raw).unwrap_err();
        let paths: Vec<&str> = err.errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "trust_domain",
                "bind_address",
                "default_x509_svid_ttl",
                "upstream_ca.key_file"
            ]
        );
    }

    #[test]
    fn node_attestors_are_loaded_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let ca = agentd_attestor::node::test_support::ca("Node CA");
        let bundle = dir.path().join("ca.pem");
        std::fs::write(&bundle, &ca.pem).unwrap();
        let key = agentd_attestor::node::test_support::ec_key();
        let jwks = dir.path().join("jwks.json");
        std::fs::write(
            &jwks,
            serde_json::json!({"keys": [key.jwk("k1")]}).to_string(),
        )
        .unwrap();
        let raw: RawServerConfig = toml::from_str(&format!(
            r#"
            [node_attestors.x509pop]
            ca_bundle = "{}"
            [node_attestors.claims]
            jwks_file = "{}"
            issuer = "https://issuer.example"
            audience = "agentd"
            selector_claims = ["sub", "repository"]
            "#,
            bundle.display(),
            jwks.display()
        ))
        .unwrap();
        let cfg = ServerConfig::try_from(raw).unwrap();
        let x = cfg.node_attestors.x509pop.unwrap();
        assert_eq!(x.ca_bundle, vec![ca.der.clone()]);
        assert_eq!(x.template.as_str(), x509pop::DEFAULT_TEMPLATE);
        let c = cfg.node_attestors.claims.unwrap();
        assert_eq!(c.keys.len(), 1);
        assert_eq!(c.template.as_str(), claims::DEFAULT_TEMPLATE);
        assert_eq!(c.selector_claims, ["sub", "repository"]);
    }

    #[test]
    fn bad_node_attestor_fields_are_named() {
        let raw: RawServerConfig = toml::from_str(
            r#"
            [node_attestors.x509pop]
            ca_bundle = "/nonexistent/ca.pem"
            spiffe_id_template = "spiffe://{trust_domain}/agentd/x509pop/{fingerprint}"
            [node_attestors.claims]
            issuer = ""
            spiffe_id_template = "spiffe://{trust_domain}/agentd/{sub}"
            selector_claims = ["a:b"]
            "#,
        )
        .unwrap();
        let err = ServerConfig::try_from(raw).unwrap_err();
        let paths: Vec<&str> = err.errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "node_attestors.x509pop.ca_bundle",
                "node_attestors.x509pop.spiffe_id_template",
                "node_attestors.claims.jwks_file",
                "node_attestors.claims.issuer",
                "node_attestors.claims.audience",
                "node_attestors.claims.spiffe_id_template",
                "node_attestors.claims.selector_claims",
            ],
            "{err}"
        );
        let text = err.to_string();
        assert!(text.contains("unknown variable {fingerprint}"), "{text}");
        assert!(text.contains("reserved"), "{text}");
    }

    #[test]
    fn ownership_and_audit_settings() {
        let cfg = ServerConfig::try_from(RawServerConfig::default()).unwrap();
        assert!(!cfg.require_owner && !cfg.suspend_disabled_owners);
        assert_eq!(cfg.audit_export_file, None);
        let raw: RawServerConfig = toml::from_str(
            r#"
            require_owner = true
            suspend_disabled_owners = true
            [audit]
            export_file = "/var/log/agentd/audit.jsonl"
            "#,
        )
        .unwrap();
        let cfg = ServerConfig::try_from(raw).unwrap();
        assert!(cfg.require_owner && cfg.suspend_disabled_owners);
        assert_eq!(
            cfg.audit_export_file,
            Some(PathBuf::from("/var/log/agentd/audit.jsonl"))
        );
        let raw: RawServerConfig = toml::from_str("[audit]\nexport_file = \"/\"").unwrap();
        let err = ServerConfig::try_from(raw).unwrap_err();
        assert_eq!(err.errors[0].path, "audit.export_file");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = toml::from_str::<RawServerConfig>("trust_domian = \"x\"").unwrap_err();
        assert!(err.to_string().contains("trust_domian"), "{err}");
    }

    #[test]
    fn the_datastore_is_sled_by_default_or_a_postgres_url_kept_out_of_debug() {
        let cfg = ServerConfig::try_from(RawServerConfig::default()).unwrap();
        assert_eq!(cfg.datastore, Datastore::Sled);
        let raw: RawServerConfig = toml::from_str(
            "[datastore]\nurl = \"postgres://agentd:s3cret@db.example.org:5432/agentd\"",
        )
        .unwrap();
        let cfg = ServerConfig::try_from(raw).unwrap();
        assert!(matches!(&cfg.datastore, Datastore::Postgres(u) if u.contains("s3cret")));
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(
            shown.contains("postgres://agentd@db.example.org:5432/agentd"),
            "{shown}"
        );
        let raw: RawServerConfig =
            toml::from_str("[datastore]\nurl = \"sqlite:///tmp/x.db\"").unwrap();
        let err = ServerConfig::try_from(raw).unwrap_err();
        assert_eq!(err.errors[0].path, "datastore.url");
    }

    #[test]
    fn metrics_address_is_off_by_default_and_checked() {
        let cfg = ServerConfig::try_from(RawServerConfig::default()).unwrap();
        assert_eq!(cfg.metrics_address, None);
        let raw: RawServerConfig = toml::from_str("metrics_address = \"127.0.0.1:9090\"").unwrap();
        let cfg = ServerConfig::try_from(raw).unwrap();
        assert_eq!(cfg.metrics_address, Some("127.0.0.1:9090".parse().unwrap()));
        let raw: RawServerConfig = toml::from_str("metrics_address = \"metrics:9090\"").unwrap();
        let err = ServerConfig::try_from(raw).unwrap_err();
        assert_eq!(err.errors[0].path, "metrics_address");
        assert!(err.errors[0].reason.contains("HOST:PORT"), "{err}");
    }
}
