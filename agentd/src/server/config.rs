//! Server configuration: TOML file (`RawServerConfig`), overridden by flags, validated into
//! `ServerConfig` with every bad field reported at once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use spiffe::TrustDomain;

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
}

fn ttl_or(errs: &mut Errors, path: &str, raw: &Option<String>, default: u64) -> Ttl {
    let parsed = match raw {
        Some(s) => errs.parse(path, s.parse::<Ttl>()),
        None => None,
    };
    parsed.unwrap_or_else(|| Ttl::from_secs(default).expect("default TTLs are valid"))
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
        errs.finish()?;
        Ok(ServerConfig {
            trust_domain: trust_domain.expect("checked"),
            data_dir: raw.data_dir.unwrap_or_else(|| default_data_dir("server")),
            bind_address: bind_address.expect("checked"),
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
        })
    }
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
    fn unknown_fields_are_refused() {
        let err = toml::from_str::<RawServerConfig>("trust_domian = \"x\"").unwrap_err();
        assert!(err.to_string().contains("trust_domian"), "{err}");
    }
}
