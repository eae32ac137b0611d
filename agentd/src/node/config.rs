//! Node agent configuration: TOML file, overridden by flags, validated with every bad field
//! reported at once.

use std::path::PathBuf;
use std::time::Duration;

use agentd_attestor::node::agent::AttestorConfig;
use serde::Deserialize;

use crate::config::{default_data_dir, ConfigError, Errors};
use crate::ttl::Ttl;

pub const DEFAULT_SOCKET_PATH: &str = "/tmp/agentd-node/public/api.sock";
pub const DEFAULT_SERVER_ADDRESS: &str = "127.0.0.1:8081";
/// How often the node agent syncs with the server when neither flag nor file says.
pub const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_secs(5);
/// How long the revocation feed may be lost before the node agent reports unhealthy.
pub const DEFAULT_FEED_TIMEOUT: Duration = Duration::from_secs(30);
/// Entries up to which a node mints every SVID ahead of any request (SPIRE's agent keeps an
/// LRU of 1000 by default, `x509_svid_cache_max_size`).
pub const DEFAULT_SVID_PREFETCH: usize = 1_000;
const MAX_SVID_PREFETCH: u64 = 1_000_000;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNodeConfig {
    /// HOST:PORT of the server's node API; several, comma-separated, for several servers.
    pub server_address: Option<String>,
    /// The servers' node API addresses (with `server_address`, both lists are used).
    pub server_addresses: Option<Vec<String>>,
    pub join_token: Option<String>,
    /// PEM or SPIFFE bundle (JSON) file with the server's trust bundle.
    pub trust_bundle: Option<PathBuf>,
    /// Accept any server certificate for the first attestation. Trial use only.
    pub insecure_bootstrap: Option<bool>,
    pub socket_path: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
    /// How often entries and the bundle are synced from the server.
    pub sync_interval: Option<String>,
    /// A node with at most this many entries mints an X.509-SVID for every one ahead of any
    /// request; above it, only for entries an attested caller asked for (default 1000).
    pub svid_prefetch: Option<u64>,
    /// The server's trust domain. Needed with a trust bundle whose CA carries no SPIFFE ID
    /// (an upstream CA); otherwise taken from the bundle.
    pub trust_domain: Option<String>,
    /// `[workload_attestors.unix|container|systemd]`; all enabled by default.
    #[serde(default)]
    pub workload_attestors: agentd_attestor::workload::WorkloadAttestorsConfig,
    /// Node attestors besides the join token; used when no join token is given.
    pub node_attestor: Option<RawNodeAttestor>,
    /// `[revocation]`: how the node agent treats a lost revocation feed.
    pub revocation: Option<RawRevocationConfig>,
    /// HOST:PORT of the metrics and health endpoint (`/metrics`, `/live`, `/ready`); off
    /// when unset.
    pub metrics_address: Option<String>,
}

/// `[revocation]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRevocationConfig {
    /// How long the feed may be lost before the node agent reports unhealthy (default 30s).
    pub feed_timeout: Option<String>,
    /// When the feed has been lost for longer than `feed_timeout`, stop serving SVIDs
    /// (Workload API answers Unavailable) instead of serving what may have been revoked.
    /// Default false: availability first, as SPIRE.
    pub fail_closed: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNodeAttestor {
    pub x509pop: Option<RawNodeX509Pop>,
    pub claims: Option<RawNodeClaims>,
}

/// `[node_attestor.x509pop]`: a certificate (PEM, leaf first, intermediates may follow) and
/// its private key.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNodeX509Pop {
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// `[node_attestor.claims]`: the platform token file, read at each attestation.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNodeClaims {
    pub token_file: Option<PathBuf>,
}

/// How the node agent authenticates the server on its first contact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bootstrap {
    TrustBundle(PathBuf),
    Insecure,
}

#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Every server's node API address, in the order given, without repeats (at least one).
    pub server_addresses: Vec<String>,
    /// How to attest when there is no valid persisted identity: the join token if one is
    /// given, else x509pop if configured, else claims if configured.
    pub attestor: Option<AttestorConfig>,
    pub bootstrap: Option<Bootstrap>,
    pub socket_path: PathBuf,
    pub data_dir: PathBuf,
    pub sync_interval: Duration,
    /// Entries up to which every SVID is minted ahead of any request (see
    /// `Cache::due_for_mint`).
    pub svid_prefetch: usize,
    /// How long the revocation feed may be lost before the node agent reports unhealthy.
    pub revocation_feed_timeout: Duration,
    /// Stop serving while the revocation feed is lost for longer than the timeout.
    pub revocation_fail_closed: bool,
    pub trust_domain: Option<spiffe::TrustDomain>,
    pub workload_attestors: agentd_attestor::workload::WorkloadAttestorsConfig,
    pub metrics_address: Option<std::net::SocketAddr>,
}

/// `server_address` (comma-separated) then `server_addresses`: each trimmed and checked as
/// HOST:PORT, repeats dropped; the default when neither names one.
fn server_addresses(
    joined: Option<&str>,
    list: Option<&[String]>,
    errs: &mut Errors,
) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut check = |field: String, raw: &str| {
        let addr = raw.trim();
        match addr.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
                if !out.iter().any(|a| a == addr) {
                    out.push(addr.to_string());
                }
            }
            _ => errs.push(&field, format!("{addr:?} is not HOST:PORT")),
        }
    };
    if let Some(joined) = joined {
        for part in joined.split(',') {
            check("server_address".into(), part);
        }
    }
    for (i, addr) in list.unwrap_or_default().iter().enumerate() {
        check(format!("server_addresses[{i}]"), addr);
    }
    match (joined, list) {
        (None, None) => out.push(DEFAULT_SERVER_ADDRESS.to_string()),
        (None, Some([])) => errs.push("server_addresses", "is empty: name at least one HOST:PORT"),
        _ => {}
    }
    out
}

impl TryFrom<RawNodeConfig> for NodeConfig {
    type Error = ConfigError;

    fn try_from(raw: RawNodeConfig) -> Result<Self, ConfigError> {
        let mut errs = Errors::default();
        let server_addresses = server_addresses(
            raw.server_address.as_deref(),
            raw.server_addresses.as_deref(),
            &mut errs,
        );
        let join_token = raw.join_token.filter(|t| !t.is_empty());
        if let Some(t) = &join_token {
            if t.len() > 256 || !t.bytes().all(|b| b.is_ascii_graphic()) {
                errs.push("join_token", "must be at most 256 printable characters");
            }
        }
        let x509pop = raw.node_attestor.as_ref().and_then(|a| a.x509pop.as_ref());
        let x509pop = x509pop.and_then(|x| {
            let cert = x.cert_file.clone().or_else(|| {
                errs.push(
                    "node_attestor.x509pop.cert_file",
                    "is required with [node_attestor.x509pop]",
                );
                None
            });
            let key = x.key_file.clone().or_else(|| {
                errs.push(
                    "node_attestor.x509pop.key_file",
                    "is required with [node_attestor.x509pop]",
                );
                None
            });
            Some(AttestorConfig::X509Pop {
                cert_file: cert?,
                key_file: key?,
            })
        });
        let claims = raw
            .node_attestor
            .as_ref()
            .and_then(|a| a.claims.as_ref())
            .and_then(|c| match &c.token_file {
                Some(p) => Some(AttestorConfig::Claims {
                    token_file: p.clone(),
                }),
                None => {
                    errs.push(
                        "node_attestor.claims.token_file",
                        "is required with [node_attestor.claims]",
                    );
                    None
                }
            });
        let attestor = join_token
            .clone()
            .map(AttestorConfig::JoinToken)
            .or(x509pop)
            .or(claims);
        let bootstrap = match (raw.trust_bundle, raw.insecure_bootstrap.unwrap_or(false)) {
            (Some(_), true) => {
                errs.push(
                    "insecure_bootstrap",
                    "cannot be combined with trust_bundle: choose one",
                );
                None
            }
            (Some(p), false) => Some(Bootstrap::TrustBundle(p)),
            (None, true) => Some(Bootstrap::Insecure),
            (None, false) => None,
        };
        let sync_interval = match &raw.sync_interval {
            Some(s) => errs
                .parse("sync_interval", s.parse::<Ttl>())
                .map(Ttl::as_duration)
                .unwrap_or_default(),
            None => DEFAULT_SYNC_INTERVAL,
        };
        let svid_prefetch = match raw.svid_prefetch {
            Some(n) if n > MAX_SVID_PREFETCH => {
                errs.push(
                    "svid_prefetch",
                    format!("{n} is more than {MAX_SVID_PREFETCH}"),
                );
                0
            }
            Some(n) => n as usize,
            None => DEFAULT_SVID_PREFETCH,
        };
        let revocation = raw.revocation.clone().unwrap_or_default();
        let revocation_feed_timeout = match &revocation.feed_timeout {
            Some(s) => errs
                .parse("revocation.feed_timeout", s.parse::<Ttl>())
                .map(Ttl::as_duration)
                .unwrap_or_default(),
            None => DEFAULT_FEED_TIMEOUT,
        };
        let socket_path = raw
            .socket_path
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET_PATH));
        if !socket_path.is_absolute() {
            errs.push("socket_path", "must be an absolute path");
        }
        let trust_domain = raw
            .trust_domain
            .as_deref()
            .and_then(|t| errs.parse("trust_domain", spiffe::TrustDomain::new(t)));
        let metrics_address = raw.metrics_address.as_deref().and_then(|a| {
            errs.parse(
                "metrics_address",
                crate::telemetry::parse_metrics_address(a),
            )
        });
        errs.finish()?;
        Ok(NodeConfig {
            metrics_address,
            trust_domain,
            workload_attestors: raw.workload_attestors,
            server_addresses,
            attestor,
            bootstrap,
            socket_path,
            data_dir: raw.data_dir.unwrap_or_else(|| default_data_dir("node")),
            sync_interval,
            svid_prefetch,
            revocation_feed_timeout,
            revocation_fail_closed: revocation.fail_closed.unwrap_or(false),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let cfg = NodeConfig::try_from(RawNodeConfig::default()).unwrap();
        assert_eq!(cfg.server_addresses, [DEFAULT_SERVER_ADDRESS]);
        assert_eq!(cfg.sync_interval, Duration::from_secs(5));
        assert_eq!(cfg.bootstrap, None);
    }

    #[test]
    fn workload_attestors_are_configured_per_attestor() {
        let raw: RawNodeConfig = toml::from_str(
            "[workload_attestors.container]\nenabled = false\n[workload_attestors.unix]\nmax_binary_size = \"1MiB\"\n",
        )
        .unwrap();
        let cfg = NodeConfig::try_from(raw).unwrap();
        assert!(!cfg.workload_attestors.container.enabled);
        assert!(cfg.workload_attestors.unix.enabled);
        assert!(cfg.workload_attestors.systemd.enabled);
        let err = toml::from_str::<RawNodeConfig>("[workload_attestors.docker]\nenabled = true\n")
            .unwrap_err();
        assert!(err.to_string().contains("docker"), "{err}");
    }

    #[test]
    fn attestor_choice_join_token_then_x509pop_then_claims() {
        let both = r#"
            [node_attestor.x509pop]
            cert_file = "/n.pem"
            key_file = "/n.key"
            [node_attestor.claims]
            token_file = "/t"
        "#;
        let raw: RawNodeConfig = toml::from_str(both).unwrap();
        let cfg = NodeConfig::try_from(raw.clone()).unwrap();
        assert_eq!(
            cfg.attestor,
            Some(AttestorConfig::X509Pop {
                cert_file: "/n.pem".into(),
                key_file: "/n.key".into()
            })
        );
        let cfg = NodeConfig::try_from(RawNodeConfig {
            join_token: Some("tok".into()),
            ..raw
        })
        .unwrap();
        assert_eq!(cfg.attestor, Some(AttestorConfig::JoinToken("tok".into())));
        let raw: RawNodeConfig =
            toml::from_str("[node_attestor.claims]\ntoken_file = \"/t\"").unwrap();
        assert_eq!(
            NodeConfig::try_from(raw).unwrap().attestor,
            Some(AttestorConfig::Claims {
                token_file: "/t".into()
            })
        );
        assert_eq!(
            NodeConfig::try_from(RawNodeConfig::default())
                .unwrap()
                .attestor,
            None
        );
        let raw: RawNodeConfig =
            toml::from_str("[node_attestor.x509pop]\n[node_attestor.claims]").unwrap();
        let err = NodeConfig::try_from(raw).unwrap_err();
        let paths: Vec<&str> = err.errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "node_attestor.x509pop.cert_file",
                "node_attestor.x509pop.key_file",
                "node_attestor.claims.token_file"
            ]
        );
    }

    #[test]
    fn every_bad_field_is_named() {
        let raw: RawNodeConfig = toml::from_str(
            r#"
            server_address = "nohost"
            trust_bundle = "/b.pem"
            insecure_bootstrap = true
            sync_interval = "0s"
            socket_path = "relative.sock"
            "#,
        )
        .unwrap();
        let err = NodeConfig::try_from(raw).unwrap_err();
        let paths: Vec<&str> = err.errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "server_address",
                "insecure_bootstrap",
                "sync_interval",
                "socket_path"
            ]
        );
    }

    #[test]
    fn several_server_addresses_are_listed_in_order_once_and_each_checked() {
        let raw: RawNodeConfig = toml::from_str(
            r#"
            server_address = "10.0.0.1:8081, 10.0.0.2:8081"
            server_addresses = ["10.0.0.2:8081", "server-c:8081"]
            "#,
        )
        .unwrap();
        let cfg = NodeConfig::try_from(raw).unwrap();
        assert_eq!(
            cfg.server_addresses,
            ["10.0.0.1:8081", "10.0.0.2:8081", "server-c:8081"]
        );
        let raw: RawNodeConfig = toml::from_str(
            r#"
            server_address = "10.0.0.1:8081,nohost"
            server_addresses = ["ok:1", "bad:0"]
            "#,
        )
        .unwrap();
        let err = NodeConfig::try_from(raw).unwrap_err();
        let paths: Vec<&str> = err.errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["server_address", "server_addresses[1]"]);
        assert!(
            err.to_string().contains("\"nohost\" is not HOST:PORT"),
            "{err}"
        );
        let raw: RawNodeConfig = toml::from_str("server_addresses = []").unwrap();
        let err = NodeConfig::try_from(raw).unwrap_err();
        assert!(err.to_string().contains("server_addresses"), "{err}");
    }

    #[test]
    fn metrics_address_is_off_by_default_and_checked() {
        let cfg = NodeConfig::try_from(RawNodeConfig::default()).unwrap();
        assert_eq!(cfg.metrics_address, None);
        let raw: RawNodeConfig = toml::from_str("metrics_address = \"127.0.0.1:9090\"").unwrap();
        let cfg = NodeConfig::try_from(raw).unwrap();
        assert_eq!(cfg.metrics_address, Some("127.0.0.1:9090".parse().unwrap()));
        let raw: RawNodeConfig = toml::from_str("metrics_address = \"metrics:9090\"").unwrap();
        let err = NodeConfig::try_from(raw).unwrap_err();
        assert_eq!(err.errors[0].path, "metrics_address");
        assert!(err.errors[0].reason.contains("HOST:PORT"), "{err}");
    }
}
