//! The node agent: attests to the server, keeps the SVIDs of the entries parented to it,
//! and serves them to local workloads on the Workload API socket.

pub mod cache;
pub mod changes;
pub mod client;
pub mod config;
mod error;
pub mod identity;
pub mod revocations;
pub mod sync;
pub mod workload_api;

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use config::{Bootstrap, NodeConfig, RawNodeConfig};
pub use error::NodeError;

use crate::bundle::Bundle;
use crate::clock::Clock;
use crate::telemetry::{conditions, Endpoint, NodeMetrics, Readiness};

use cache::Cache;
use client::ServerLink;
use identity::NodeIdentity;

/// Threads of the node agent's blocking pool, where Workload API calls are attested (reads of
/// /proc, and the hash of a binary the first time it is seen). Enough for a burst of
/// first-time hashes to leave room for the rest; tokio's default (512) lets a burst of
/// concurrent calls grow the process by a thread and its stack each.
pub const MAX_BLOCKING_THREADS: usize = 16;

/// Raises the soft limit on open files to the hard limit: every workload holds a connection
/// (a file descriptor) for as long as it runs, and the usual soft limit of 1,024 would turn
/// the 1,000th agent runtime away with EMFILE. Go raises it for SPIRE's agent the same way.
fn raise_open_file_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let limit = getrlimit(Resource::Nofile);
    // `None` is unlimited: compare for inequality, since `None` orders below every `Some`.
    if limit.current != limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => tracing::debug!(open_files = ?limit.maximum, "raised the open file limit"),
            Err(e) => tracing::warn!(error = %e, "cannot raise the open file limit"),
        }
    }
}

/// A configured node agent, not yet running.
#[derive(Debug)]
pub struct NodeAgent {
    config: NodeConfig,
    clock: Arc<dyn Clock>,
}

impl NodeAgent {
    pub fn new(config: NodeConfig, clock: Arc<dyn Clock>) -> Self {
        Self { config, clock }
    }

    /// Runs until `shutdown` is cancelled or a component fails.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), NodeError> {
        raise_open_file_limit();
        let cfg = self.config;
        let metrics = Arc::new(NodeMetrics::new());
        let readiness = Readiness::new(&[conditions::ATTESTED, conditions::SYNCED]);
        let cache_slot: Arc<std::sync::OnceLock<Arc<Cache>>> = Arc::default();
        // Up before attestation, so that /live answers and /ready says what is missing;
        // stopped when `run` returns, however it returns.
        let _metrics_endpoint = match cfg.metrics_address {
            Some(addr) => Some(
                start_metrics_endpoint(
                    addr,
                    metrics.clone(),
                    readiness.clone(),
                    cache_slot.clone(),
                    &shutdown,
                )
                .await?,
            ),
            None => None,
        };
        std::fs::create_dir_all(&cfg.data_dir).map_err(|source| NodeError::Io {
            what: "data dir",
            path: cfg.data_dir.display().to_string(),
            source,
        })?;
        let _ = std::fs::set_permissions(&cfg.data_dir, std::fs::Permissions::from_mode(0o700));
        // One list for the attestation and the link: the server first tried is picked once.
        let servers = crate::tls::ServerAddresses::new(cfg.server_addresses.clone());
        let identity = obtain_identity(&cfg, &servers, self.clock.as_ref()).await?;
        tracing::info!(node = %identity.spiffe_id, serial = %identity.serial, "node identity ready");
        readiness.set(conditions::ATTESTED, true);

        let cache = Arc::new(Cache::with_prefetch(cfg.svid_prefetch));
        let _ = cache_slot.set(cache.clone());
        cache.set_bundle(identity.bundle.clone());
        let link = Arc::new(ServerLink::with_addresses(servers, identity));
        let listener = crate::node::workload_api::bind_socket(&cfg.socket_path)?;

        let revocations = Arc::new(crate::node::revocations::NodeRevocations::new(
            cfg.revocation_feed_timeout,
            cfg.revocation_fail_closed,
        ));
        let stop = shutdown.child_token();
        let mut tasks: JoinSet<Result<(), NodeError>> = JoinSet::new();
        tasks.spawn(
            crate::node::revocations::RevocationSubscriber {
                link: link.clone(),
                cache: cache.clone(),
                revocations: revocations.clone(),
                clock: self.clock.clone(),
                metrics: metrics.clone(),
                readiness: readiness.clone(),
            }
            .run(stop.clone()),
        );
        tasks.spawn(
            changes::ChangeSubscriber {
                link: link.clone(),
                cache: cache.clone(),
            }
            .run(stop.clone()),
        );
        let syncer = sync::Syncer {
            link: link.clone(),
            cache: cache.clone(),
            clock: self.clock.clone(),
            sync_interval: cfg.sync_interval,
            data_dir: cfg.data_dir.clone(),
            mint_retry: Default::default(),
            metrics: metrics.clone(),
            readiness: readiness.clone(),
        };
        tasks.spawn(syncer.run(stop.clone()));
        tasks.spawn(
            crate::node::workload_api::WorkloadApi::new(
                cache.clone(),
                link.clone(),
                self.clock.clone(),
                Arc::new(agentd_attestor::workload::WorkloadAttestors::from_config(
                    &cfg.workload_attestors,
                )),
                revocations,
            )
            .with_metrics(metrics.clone())
            .serve(listener, stop.clone()),
        );
        tracing::info!(socket = %cfg.socket_path.display(), server = %link.current_address(), servers = cfg.server_addresses.len(), "node agent ready");
        let result = crate::runtime::supervise(&mut tasks, &stop).await;
        let _ = std::fs::remove_file(&cfg.socket_path);
        result
    }
}

/// Binds the metrics endpoint and serves it on its own task until the returned guard is
/// dropped (or `shutdown` is cancelled). The cache size gauges are read before each scrape.
async fn start_metrics_endpoint(
    addr: std::net::SocketAddr,
    metrics: Arc<NodeMetrics>,
    readiness: Readiness,
    cache: Arc<std::sync::OnceLock<Arc<Cache>>>,
    shutdown: &CancellationToken,
) -> Result<tokio_util::sync::DropGuard, NodeError> {
    let (listener, bound) = Endpoint::bind(addr).await?;
    let gauges = metrics.clone();
    let refresh: crate::telemetry::Refresh =
        Arc::new(move || -> crate::telemetry::RefreshFuture {
            if let Some(cache) = cache.get() {
                gauges.set_cache_size(cache.svid_count(), cache.jwt_svid_count());
            }
            Box::pin(std::future::ready(()))
        });
    let stop = shutdown.child_token();
    let endpoint = Endpoint::new(metrics, readiness).with_refresh(refresh);
    tokio::spawn(endpoint.run(listener, stop.clone()));
    tracing::info!(address = %bound, "metrics endpoint listening");
    Ok(stop.drop_guard())
}

/// The persisted identity if it is still valid; otherwise a fresh attestation with the
/// configured attestor (join token, else x509pop, else platform claims).
async fn obtain_identity(
    cfg: &NodeConfig,
    servers: &crate::tls::ServerAddresses,
    clock: &dyn Clock,
) -> Result<NodeIdentity, NodeError> {
    match NodeIdentity::load(&cfg.data_dir) {
        Ok(Some(id)) if id.expires_at > clock.now() => {
            if let Some(a) = &cfg.attestor {
                tracing::info!(
                    attestor = a.name(),
                    "a persisted node identity exists; the node attestor is not used"
                );
            }
            return Ok(id);
        }
        Ok(Some(id)) => {
            tracing::warn!(node = %id.spiffe_id, "the persisted node SVID has expired; attesting again")
        }
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(error = %e, "the persisted node identity is unreadable; attesting again")
        }
    }
    let attestor = cfg.attestor.as_ref().ok_or_else(|| NodeError::NoIdentity {
        data_dir: cfg.data_dir.display().to_string(),
    })?;
    tracing::info!(attestor = attestor.name(), "attesting this node");
    let identity = match cfg.bootstrap.as_ref().ok_or(NodeError::NoBootstrap)? {
        Bootstrap::Insecure => {
            tracing::warn!(
                "insecure bootstrap: the server's certificate is not verified for attestation"
            );
            client::attest_any(servers, None, None, attestor).await?
        }
        Bootstrap::TrustBundle(path) => {
            let (roots, td) = load_trust_bundle(path, cfg.trust_domain.as_ref())?;
            client::attest_any(servers, Some(&roots), Some(&td), attestor).await?
        }
    };
    identity.save(&cfg.data_dir)?;
    Ok(identity)
}

/// Reads a PEM trust bundle (as printed by `agentd bundle show --format pem`) or a SPIFFE
/// bundle; the trust domain comes from the CA certificate's SPIFFE ID.
fn load_trust_bundle(
    path: &std::path::Path,
    configured: Option<&spiffe::TrustDomain>,
) -> Result<(Vec<Vec<u8>>, spiffe::TrustDomain), NodeError> {
    let err = |reason: String| NodeError::TrustBundle {
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let roots = if text.trim_start().starts_with('{') {
        let td = spiffe::TrustDomain::new("placeholder.invalid").map_err(|e| err(e.to_string()))?;
        Bundle::from_spiffe_json(td, &text)
            .map_err(|e| err(e.to_string()))?
            .x509_authorities
    } else {
        Bundle::x509_authorities_from_pem(&text).map_err(|e| err(e.to_string()))?
    };
    if roots.is_empty() {
        return Err(err("no certificates".into()));
    }
    if let Some(td) = configured {
        return Ok((roots, td.clone()));
    }
    let td = roots
        .iter()
        .find_map(|r| crate::tls::spiffe_id_of(r))
        .map(|id| spiffe::TrustDomain::new(id.trust_domain_name()))
        .transpose()
        .map_err(|e| err(e.to_string()))?
        .ok_or_else(|| {
            err("no CA certificate carries a SPIFFE ID (spiffe://<trust domain>): set trust_domain in the node config".into())
        })?;
    Ok((roots, td))
}

#[cfg(test)]
mod tests {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

    #[test]
    fn the_open_file_limit_is_raised_to_the_hard_limit() {
        let before = getrlimit(Resource::Nofile);
        let Some(max) = before.maximum else {
            // Unlimited hard limit: lower the soft one all the same.
            setrlimit(
                Resource::Nofile,
                Rlimit {
                    current: Some(4095),
                    maximum: None,
                },
            )
            .unwrap();
            super::raise_open_file_limit();
            assert_eq!(getrlimit(Resource::Nofile).current, None);
            return;
        };
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(max.min(4096).saturating_sub(1)),
                maximum: Some(max),
            },
        )
        .unwrap();
        super::raise_open_file_limit();
        assert_eq!(getrlimit(Resource::Nofile).current, Some(max));
    }
}
