//! The central server: CA, registration entries, attested nodes. It serves the node API
//! (TLS, node agents) and the admin API (Unix socket, the CLI).

pub mod admin;
pub mod config;
pub mod grants;
pub mod node_api;
pub mod node_attestor;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use config::{RawServerConfig, ServerConfig};

use crate::ca::{CaConfig, CaError, CertificateAuthority, X509SvidRequest};
use crate::clock::Clock;
use crate::datastore::{DataStore, DataStoreError, SledStore};
use crate::keys::PrivateKey;
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
        create_private_dir(&cfg.data_dir)?;
        let store: Arc<dyn DataStore> = Arc::new(SledStore::open(&cfg.data_dir.join("datastore"))?);
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

        let state = Arc::new(ServerState {
            config: cfg.clone(),
            store,
            ca,
            clock: self.clock.clone(),
            node_api_address,
        });
        let (tls_config, renew_at) = issue_server_tls(&state)?;
        let tls_source: ServerConfigSource = Arc::new(std::sync::RwLock::new(tls_config));

        let stop = shutdown.child_token();
        let mut tasks: JoinSet<Result<(), ServerError>> = JoinSet::new();
        tasks.spawn(node_api::serve(
            state.clone(),
            listener,
            tls_source.clone(),
            stop.clone(),
        ));
        tasks.spawn(admin::serve(state.clone(), admin_listener, stop.clone()));
        tasks.spawn(renew_server_tls(
            state.clone(),
            tls_source,
            renew_at,
            stop.clone(),
        ));
        tracing::info!(
            trust_domain = %cfg.trust_domain,
            node_api = %node_api_address,
            admin_socket = %cfg.admin_socket.display(),
            data_dir = %cfg.data_dir.display(),
            "server ready"
        );

        let result = crate::runtime::supervise(&mut tasks, &stop).await;
        let _ = std::fs::remove_file(&cfg.admin_socket);
        result
    }
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
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(bind_err(e)),
    }
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    Ok(listener)
}

/// Issues the server's own SVID (a fresh key each time) and the TLS config around it.
/// Returns the config and when to renew it.
fn issue_server_tls(
    state: &ServerState,
) -> Result<(Arc<rustls::ServerConfig>, std::time::SystemTime), ServerError> {
    let key = PrivateKey::generate().map_err(CaError::from)?;
    let csr = key.csr_der().map_err(CaError::from)?;
    let id = tls::server_spiffe_id(&state.config.trust_domain);
    let now = state.clock.now();
    let svid = state.ca.sign_x509_svid(
        &X509SvidRequest {
            csr_der: &csr,
            spiffe_id: &id,
            ttl: SERVER_SVID_TTL,
            dns_names: &[],
        },
        now,
    )?;
    let bundle = state.ca.bundle();
    let cfg = tls::server_config(&svid.cert_chain, &key, &bundle.x509_authorities)?;
    let lifetime = svid.not_after.duration_since(now).unwrap_or_default();
    Ok((cfg, now + lifetime / 2))
}

async fn renew_server_tls(
    state: Arc<ServerState>,
    source: ServerConfigSource,
    mut renew_at: std::time::SystemTime,
    stop: CancellationToken,
) -> Result<(), ServerError> {
    loop {
        let wait = renew_at
            .duration_since(state.clock.now())
            .unwrap_or_default()
            .min(Duration::from_secs(60));
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(wait) => {}
        }
        if state.clock.now() < renew_at {
            continue;
        }
        match issue_server_tls(&state) {
            Ok((cfg, next)) => {
                *source.write().unwrap_or_else(|p| p.into_inner()) = cfg;
                renew_at = next;
                tracing::info!("server TLS certificate renewed");
            }
            Err(e) => {
                tracing::error!(error = %e, "renewing the server TLS certificate failed");
                renew_at = state.clock.now() + Duration::from_secs(30);
            }
        }
    }
}
