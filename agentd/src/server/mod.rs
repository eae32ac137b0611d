//! The central server: CA, registration entries, attested nodes. It serves the node API
//! (TLS, node agents) and the admin API (Unix socket, the CLI).

pub mod admin;
pub mod changes;
pub mod config;
pub mod crl;
pub mod federation;
pub mod grants;
pub mod https;
pub mod issuance;
pub mod join_token;
pub mod membership;
pub mod node_api;
pub mod oauth;
pub mod ownership;
pub mod peers;
pub mod rotation;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use config::{RawServerConfig, ServerConfig};

use crate::ca::{CaConfig, CaError, CertificateAuthority, X509SvidParams};
use crate::clock::Clock;
use crate::datastore::{DataStore, DataStoreError, SledStore};
use crate::keys::PrivateKey;
use crate::revocation::log::RevocationLog;
use crate::telemetry::{conditions, Endpoint, Readiness, ServerMetrics};
use crate::tls::{self, ServerConfigSource, TlsError};

/// How long the server's own TLS certificate lives; it is re-issued at half-life.
const SERVER_SVID_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("data dir {path}: {source}")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("another server is using the data dir {path} (its datastore is locked); stop it, or give this one another --data-dir")]
    DataDirInUse { path: String },
    #[error("binding {what} {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Store(#[from] DataStoreError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("{what} stopped: {reason}")]
    Serve { what: &'static str, reason: String },
    #[error(transparent)]
    Task(#[from] crate::runtime::TaskFailed),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    #[error(transparent)]
    Metrics(#[from] crate::telemetry::EndpointError),
    /// A setting could not be put to use (a file it names is unreadable or unusable).
    #[error("{reason}")]
    Config { reason: String },
    /// The server's id file (`server.id` in the data dir) cannot be read, written or used.
    #[error("server id file {path}: {reason}")]
    ServerId { path: String, reason: String },
}

/// What the admin and node APIs share.
#[derive(Debug)]
pub struct ServerState {
    pub config: ServerConfig,
    pub store: Arc<dyn DataStore>,
    pub ca: Arc<CertificateAuthority>,
    pub clock: Arc<dyn Clock>,
    /// The node API address actually bound (differs from the config with port 0).
    pub node_api_address: SocketAddr,
    pub revocations: Arc<RevocationLog>,
    /// The audit trail every API records into.
    pub audit: Arc<crate::audit::Audit>,
    /// Metric handles (SVIDs minted, attestation failures, revocations, ...).
    pub metrics: Arc<ServerMetrics>,
    /// What `/ready` reports.
    pub readiness: Readiness,
    /// Entry and grant changes, pushed to the node agents they touch.
    pub changes: Arc<changes::ChangeLog>,
    /// This server's id among the servers of its store ([`peers::server_id`]).
    pub server_id: String,
    /// Federation refresh status, and the refresh loop's wake-up.
    pub federation: Arc<federation::FederationState>,
}

/// A configured server, not yet running.
#[derive(Debug)]
pub struct Server {
    config: ServerConfig,
    clock: Arc<dyn Clock>,
}

fn create_private_dir(path: &Path) -> Result<(), ServerError> {
    let err = |source| ServerError::DataDir {
        path: path.display().to_string(),
        source,
    };
    std::fs::create_dir_all(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    Ok(())
}

impl Server {
    pub fn new(config: ServerConfig, clock: Arc<dyn Clock>) -> Self {
        Self { config, clock }
    }

    /// Runs until `shutdown` is cancelled or a component fails; the first failure stops
    /// every other component.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ServerError> {
        let cfg = self.config;
        let metrics = Arc::new(ServerMetrics::new());
        let readiness = Readiness::new(&[
            conditions::STORE_OPEN,
            conditions::STORE_REACHABLE,
            conditions::CA_LOADED,
            conditions::SERVING,
        ]);
        let store_slot: Arc<OnceLock<Arc<dyn DataStore>>> = Arc::default();
        // Up before the store and the CA, so that /live answers and /ready says what is
        // still missing while they load; stopped when `run` returns, however it returns.
        let _metrics_endpoint = match cfg.metrics_address {
            Some(addr) => Some(
                start_metrics_endpoint(
                    addr,
                    metrics.clone(),
                    readiness.clone(),
                    store_slot.clone(),
                    &shutdown,
                )
                .await?,
            ),
            None => None,
        };
        create_private_dir(&cfg.data_dir)?;
        let server_id = peers::server_id(&cfg.data_dir)?;
        let store: Arc<dyn DataStore> = match &cfg.datastore {
            config::Datastore::Sled => Arc::new(
                SledStore::open(&cfg.data_dir.join("datastore")).map_err(|e| match e {
                    DataStoreError::InUse { .. } => ServerError::DataDirInUse {
                        path: cfg.data_dir.display().to_string(),
                    },
                    other => ServerError::Store(other),
                })?,
            ),
            config::Datastore::Postgres(url) => Arc::new(
                crate::datastore::PgStore::open(url)
                    .await
                    .map_err(ServerError::Store)?,
            ),
        };
        let _ = store_slot.set(store.clone());
        readiness.set(conditions::STORE_OPEN, true);
        readiness.set(conditions::STORE_REACHABLE, true);
        let ca = Arc::new(CertificateAuthority::load_or_create(
            &CaConfig {
                trust_domain: cfg.trust_domain.clone(),
                key_dir: cfg.data_dir.join("keys"),
                ca_ttl: cfg.ca_ttl,
                upstream: cfg.upstream_ca.clone(),
                organization: cfg.organization.clone(),
            },
            self.clock.as_ref(),
        )?);
        readiness.set(conditions::CA_LOADED, true);

        let listener = TcpListener::bind(cfg.bind_address)
            .await
            .map_err(|source| ServerError::Bind {
                what: "node API",
                addr: cfg.bind_address.to_string(),
                source,
            })?;
        let node_api_address = listener.local_addr().map_err(|source| ServerError::Bind {
            what: "node API",
            addr: cfg.bind_address.to_string(),
            source,
        })?;
        let admin_listener = bind_admin_socket(&cfg.admin_socket)?;
        let revocations = Arc::new(RevocationLog::open(store.clone()).await?);

        let audit = Arc::new(
            crate::audit::Audit::open(
                store.clone(),
                self.clock.clone(),
                cfg.audit_export_file.as_deref(),
                &cfg.data_dir.join(crate::audit::key::KEY_FILE),
                &server_id,
            )
            .await?,
        );
        let state = Arc::new(ServerState {
            config: cfg.clone(),
            store,
            ca,
            clock: self.clock.clone(),
            node_api_address,
            revocations,
            audit,
            metrics,
            readiness: readiness.clone(),
            changes: Arc::new(changes::ChangeLog::new()),
            server_id,
            federation: Arc::default(),
        });
        let (tls_config, renew_at, server_svid) = issue_server_tls(&state)?;
        let tls_source: ServerConfigSource = Arc::new(std::sync::RwLock::new(tls_config));
        // The bundle endpoint: bound before anything is served, so that a taken port fails
        // the start. https_spiffe follows the server's SVID as it is renewed.
        let mut spiffe_endpoint_tls: Option<ServerConfigSource> = None;
        let bundle_endpoint = match &cfg.bundle_endpoint {
            None => None,
            Some(ep) => {
                let listener = TcpListener::bind(ep.bind_address).await.map_err(|source| {
                    ServerError::Bind {
                        what: "bundle endpoint",
                        addr: ep.bind_address.to_string(),
                        source,
                    }
                })?;
                let tls: ServerConfigSource = match &ep.https_web {
                    Some((cert, key)) => Arc::new(std::sync::RwLock::new(
                        federation::endpoint::https_web_config("federation.https_web", cert, key)?,
                    )),
                    None => {
                        let source =
                            Arc::new(std::sync::RwLock::new(tls::bundle_endpoint_server_config(
                                &server_svid.chain,
                                &server_svid.key,
                            )?));
                        spiffe_endpoint_tls = Some(source.clone());
                        source
                    }
                };
                let bound = listener.local_addr().map_err(|source| ServerError::Bind {
                    what: "bundle endpoint",
                    addr: ep.bind_address.to_string(),
                    source,
                })?;
                tracing::info!(address = %bound, profile = if ep.https_web.is_some() { "https_web" } else { "https_spiffe" }, "bundle endpoint listening");
                Some((listener, tls, ep.refresh_hint))
            }
        };

        // The OAuth front door: bound before anything is served too; its issuer is known
        // once bound (port 0), and every JWT-SVID signed from here on names it as `iss`.
        let oauth_door = match &cfg.oauth {
            None => None,
            Some(o) => {
                let bind_err = |source| ServerError::Bind {
                    what: "OAuth front door",
                    addr: o.bind_address.to_string(),
                    source,
                };
                let listener = TcpListener::bind(o.bind_address).await.map_err(bind_err)?;
                let bound = listener.local_addr().map_err(bind_err)?;
                let issuer = o
                    .issuer
                    .clone()
                    .unwrap_or_else(|| format!("https://{bound}"));
                state.ca.set_jwt_issuer(issuer.clone())?;
                let door = Arc::new(oauth::issue::FrontDoor {
                    issuer,
                    max_token_ttl: o.max_token_ttl,
                });
                let (tls, renew_at) = match &o.tls {
                    Some((cert, key)) => (
                        federation::endpoint::https_web_config("oauth.tls", cert, key)?,
                        None,
                    ),
                    None => {
                        let (cfg, at) = oauth::endpoint::own_ca_config(&state, &door.issuer)?;
                        (cfg, Some(at))
                    }
                };
                let source: ServerConfigSource = Arc::new(std::sync::RwLock::new(tls));
                tracing::info!(address = %bound, issuer = %door.issuer, "OAuth front door listening");
                Some((listener, door, source, renew_at))
            }
        };

        let stop = shutdown.child_token();
        let mut tasks: JoinSet<Result<(), ServerError>> = JoinSet::new();
        if let Some((listener, door, source, renew_at)) = oauth_door {
            if let Some(at) = renew_at {
                tasks.spawn(oauth::endpoint::renew_own_certificate(
                    state.clone(),
                    door.clone(),
                    source.clone(),
                    at,
                    stop.clone(),
                ));
            }
            tasks.spawn(oauth::endpoint::serve(
                state.clone(),
                door,
                listener,
                source,
                stop.clone(),
            ));
        }
        tasks.spawn(node_api::serve(
            state.clone(),
            listener,
            tls_source.clone(),
            stop.clone(),
        ));
        tasks.spawn(admin::serve(state.clone(), admin_listener, stop.clone()));
        tasks.spawn(compact_revocations(state.clone(), stop.clone()));
        tasks.spawn(renew_server_tls(
            state.clone(),
            tls_source,
            spiffe_endpoint_tls,
            renew_at,
            server_svid,
            stop.clone(),
        ));
        if let Some((listener, tls, hint)) = bundle_endpoint {
            tasks.spawn(federation::endpoint::serve(
                state.clone(),
                listener,
                tls,
                hint,
                stop.clone(),
            ));
        }
        tasks.spawn(federation::refresh::run(state.clone(), stop.clone()));
        tasks.spawn(
            rotation::CaRotation::new(state.ca.clone(), state.clock.clone()).run(stop.clone()),
        );
        tasks.spawn(
            state
                .changes
                .clone()
                .follow_authorities(state.ca.subscribe(), stop.clone()),
        );
        tasks.spawn(watch_datastore(
            state.store.clone(),
            readiness.clone(),
            stop.clone(),
        ));
        tasks.spawn(peers::share_authorities(state.clone(), stop.clone()));
        if matches!(cfg.datastore, config::Datastore::Postgres(_)) {
            tasks.spawn(peers::forward_changes(state.clone(), stop.clone()));
            tasks.spawn(peers::follow_peer_changes(state.clone(), stop.clone()));
            // Another server may append to the shared log: its revocations are applied
            // here within a poll (the log in the database is the source of truth).
            let log = state.revocations.clone();
            let stop = stop.clone();
            tasks.spawn(async move {
                log.follow_store(FOLLOW_STORE_EVERY, stop).await;
                Ok(())
            });
        }
        tracing::info!(
            trust_domain = %cfg.trust_domain,
            node_api = %node_api_address,
            admin_socket = %cfg.admin_socket.display(),
            data_dir = %cfg.data_dir.display(),
            server_id = %state.server_id,
            "server ready"
        );

        readiness.set(conditions::SERVING, true);
        let result = crate::runtime::supervise(&mut tasks, &stop).await;
        readiness.set(conditions::SERVING, false);
        let _ = std::fs::remove_file(&cfg.admin_socket);
        result
    }
}

/// Binds the metrics endpoint and serves it on its own task until the returned guard is
/// dropped (or `shutdown` is cancelled). Before each scrape, the entry and node gauges are
/// read from the store (once it is open).
async fn start_metrics_endpoint(
    addr: SocketAddr,
    metrics: Arc<ServerMetrics>,
    readiness: Readiness,
    store: Arc<OnceLock<Arc<dyn DataStore>>>,
    shutdown: &CancellationToken,
) -> Result<tokio_util::sync::DropGuard, ServerError> {
    let (listener, bound) = Endpoint::bind(addr).await?;
    let gauges = metrics.clone();
    let refresh: crate::telemetry::Refresh =
        Arc::new(move || -> crate::telemetry::RefreshFuture {
            let metrics = gauges.clone();
            let store = store.get().cloned();
            Box::pin(async move {
                let Some(store) = store else { return };
                let entries = store
                    .list_entries(&crate::datastore::EntryFilter::default())
                    .await;
                let nodes = store.list_nodes().await;
                match (entries, nodes) {
                    (Ok(e), Ok(n)) => metrics.set_inventory(e.len(), n.len()),
                    (Err(e), _) | (_, Err(e)) => {
                        tracing::warn!(error = %e, "reading the inventory for the metrics failed")
                    }
                }
            })
        });
    let stop = shutdown.child_token();
    let endpoint = Endpoint::new(metrics, readiness).with_refresh(refresh);
    tokio::spawn(endpoint.run(listener, stop.clone()));
    tracing::info!(address = %bound, "metrics endpoint listening");
    Ok(stop.drop_guard())
}

/// Binds the admin socket in a directory of mode 0700 and makes the socket 0600: only the
/// server's own user can administer it.
fn bind_admin_socket(path: &Path) -> Result<UnixListener, ServerError> {
    let bind_err = |source| ServerError::Bind {
        what: "admin socket",
        addr: path.display().to_string(),
        source,
    };
    // A directory we create is private (0700). An existing one is left as it is: it may be
    // shared (say /run), and the socket's own mode (0600) is what guards the admin API.
    if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() && !parent.exists() {
            create_private_dir(parent)?;
        }
        crate::net::check_socket_dir(parent)
            .map_err(|reason| bind_err(std::io::Error::other(reason)))?;
    }
    crate::net::clear_socket_path(path).map_err(bind_err)?;
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    Ok(listener)
}

/// The server's own SVID, kept so that its TLS config can be rebuilt with new roots.
struct ServerSvid {
    chain: Vec<Vec<u8>>,
    key: PrivateKey,
    authority_id: String,
}

/// Issues the server's own SVID (a fresh key each time) and the TLS config around it.
/// Returns the config, when to renew it, and the SVID.
fn issue_server_tls(
    state: &ServerState,
) -> Result<(Arc<rustls::ServerConfig>, std::time::SystemTime, ServerSvid), ServerError> {
    let key = PrivateKey::generate().map_err(CaError::from)?;
    let csr = key.csr_der().map_err(CaError::from)?;
    let id = tls::server_spiffe_id(&state.config.trust_domain);
    let now = state.clock.now();
    let svid = state.ca.sign_x509_svid(
        &X509SvidParams {
            csr_der: &csr,
            spiffe_id: &id,
            ttl: SERVER_SVID_TTL,
            dns_names: &[],
            extensions: &[],
        },
        now,
    )?;
    let bundle = state.ca.bundle();
    let cfg = tls::server_config(&svid.cert_chain, &key, &bundle.x509_authorities)?;
    let lifetime = svid.not_after.duration_since(now).unwrap_or_default();
    Ok((
        cfg,
        now + lifetime / 2,
        ServerSvid {
            chain: svid.cert_chain,
            key,
            authority_id: svid.authority_id,
        },
    ))
}

/// After an authority change: node SVIDs may now come from a newly published CA, so the
/// accepted client roots follow the bundle at once. The server's own certificate stays
/// (node agents learn a new CA only on their next sync, so presenting a certificate from a
/// just-activated CA could lock them out) unless its signer has left the set (revoked or
/// expired); then it is re-issued.
fn refresh_server_tls(
    state: &ServerState,
    source: &ServerConfigSource,
    svid: &ServerSvid,
) -> Result<bool, ServerError> {
    let signer_present = state
        .ca
        .authorities()
        .iter()
        .any(|a| a.id == svid.authority_id);
    if !signer_present {
        return Ok(false);
    }
    let cfg = tls::server_config(&svid.chain, &svid.key, &state.ca.bundle().x509_authorities)?;
    *source.write().unwrap_or_else(|p| p.into_inner()) = cfg;
    Ok(true)
}

async fn renew_server_tls(
    state: Arc<ServerState>,
    source: ServerConfigSource,
    bundle_endpoint: Option<ServerConfigSource>,
    mut renew_at: std::time::SystemTime,
    mut svid: ServerSvid,
    stop: CancellationToken,
) -> Result<(), ServerError> {
    let mut ca_changes = state.ca.subscribe();
    loop {
        let wait = renew_at
            .duration_since(state.clock.now())
            .unwrap_or_default()
            .min(Duration::from_secs(60));
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(wait) => {}
            Ok(()) = ca_changes.changed() => {
                match refresh_server_tls(&state, &source, &svid) {
                    Ok(true) => {
                        tracing::info!("server TLS trust roots follow the new bundle");
                        continue;
                    }
                    Ok(false) => renew_at = state.clock.now(),
                    Err(e) => tracing::error!(error = %e, "refreshing the server TLS roots failed"),
                }
            }
        }
        if state.clock.now() < renew_at {
            continue;
        }
        match issue_server_tls(&state) {
            Ok((cfg, next, new_svid)) => {
                *source.write().unwrap_or_else(|p| p.into_inner()) = cfg;
                if let Some(endpoint) = &bundle_endpoint {
                    match tls::bundle_endpoint_server_config(&new_svid.chain, &new_svid.key) {
                        Ok(c) => *endpoint.write().unwrap_or_else(|p| p.into_inner()) = c,
                        Err(e) => {
                            tracing::error!(error = %e, "renewing the bundle endpoint certificate failed")
                        }
                    }
                }
                renew_at = next;
                svid = new_svid;
                tracing::info!("server TLS certificate renewed");
            }
            Err(e) => {
                tracing::error!(error = %e, "renewing the server TLS certificate failed");
                renew_at = state.clock.now() + Duration::from_secs(30);
            }
        }
    }
}

/// How often expired issuance records, revocation events that no longer matter, expired
/// delegation offers and long-expired grants are removed.
const COMPACT_EVERY: Duration = Duration::from_secs(600);
/// How often the datastore is asked whether it answers (`datastore_reachable`).
const PING_EVERY: Duration = Duration::from_secs(1);

/// Keeps `datastore_reachable` true while the store answers: `/ready` goes false while a
/// shared database is down (calls then fail with Unavailable, writing nothing) and true
/// again when it is back, without a restart.
async fn watch_datastore(
    store: Arc<dyn DataStore>,
    readiness: Readiness,
    stop: CancellationToken,
) -> Result<(), ServerError> {
    let mut reachable = true;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(PING_EVERY) => {}
        }
        let now = match store.ping().await {
            Ok(()) => true,
            Err(e) => {
                if reachable {
                    tracing::warn!(error = %e, "the datastore is unreachable; not ready until it answers");
                }
                false
            }
        };
        if now && !reachable {
            tracing::info!("the datastore answers again; ready");
        }
        reachable = now;
        readiness.set(conditions::STORE_REACHABLE, now);
    }
}

/// How often a server on a shared database reads the revocations other servers committed
/// when no notification came (a lost NOTIFY costs this much latency at most).
const FOLLOW_STORE_EVERY: Duration = Duration::from_secs(1);

async fn compact_revocations(
    state: Arc<ServerState>,
    stop: CancellationToken,
) -> Result<(), ServerError> {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(COMPACT_EVERY) => {}
        }
        let now = crate::clock::unix_seconds(state.clock.now());
        match state.revocations.compact(now).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(events = n, "compacted the revocation log"),
            Err(e) => tracing::warn!(error = %e, "compacting the revocation log failed"),
        }
        match state.store.prune_issued(now).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(records = n, "pruned expired issuance records"),
            Err(e) => tracing::warn!(error = %e, "pruning issuance records failed"),
        }
        match grants::prune(state.store.as_ref(), now).await {
            Ok((0, 0)) => {}
            Ok((offers, grants)) => {
                tracing::debug!(
                    offers,
                    grants,
                    "pruned expired delegation offers and grants"
                )
            }
            Err(e) => tracing::warn!(error = %e, "pruning delegation offers and grants failed"),
        }
    }
}
