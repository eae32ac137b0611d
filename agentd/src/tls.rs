//! TLS between node agents and the server.
//!
//! The server presents an X.509-SVID for `spiffe://<trust domain>/agentd/server`; node agents
//! check it against the trust bundle and that exact SPIFFE ID (no DNS names involved). Node
//! agents present their node SVID as a client certificate for every call but `Attest`; the
//! server reads the caller's SPIFFE ID from it.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use spiffe::{SpiffeId, TrustDomain};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::keys::PrivateKey;

/// The path of the server's own SPIFFE ID.
pub const SERVER_ID_PATH: &str = "/agentd/server";
/// IDs under this path are the server's; no entry or join token may name one.
pub const RESERVED_PATH_PREFIX: &str = "/agentd/";

pub mod limits;
pub use limits::{source_of, ConnectionLimits};

/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once, from all sources; beyond it the accept loop waits
/// (backpressure), so a flood of idle connections cannot exhaust tasks and file
/// descriptors. One source gets at most `max_handshakes_per_source` of them.
const MAX_PENDING_HANDSHAKES: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("connecting to {addr}: {reason}")]
    Connect { addr: String, reason: String },
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn server_spiffe_id(trust_domain: &TrustDomain) -> SpiffeId {
    SpiffeId::new(format!(
        "spiffe://{}{SERVER_ID_PATH}",
        trust_domain.as_str()
    ))
    .expect("a trust domain plus a fixed path is a valid SPIFFE ID")
}

fn root_store(roots: &[Vec<u8>]) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for der in roots {
        store
            .add(CertificateDer::from(der.clone()))
            .map_err(|e| TlsError::Config(format!("trust bundle certificate: {e}")))?;
    }
    Ok(store)
}

/// The bundle's CA certificates as webpki trust anchors.
fn trust_anchors(
    roots: &[Vec<u8>],
) -> Result<Vec<rustls::pki_types::TrustAnchor<'static>>, TlsError> {
    roots
        .iter()
        .map(|r| {
            webpki::anchor_from_trusted_cert(&CertificateDer::from(r.clone()))
                .map(|a| a.to_owned())
                .map_err(|e| TlsError::Config(format!("trust bundle certificate: {e}")))
        })
        .collect()
}

fn key_der(key: &PrivateKey) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.pkcs8_der().to_vec()))
}

fn chain_der(chain: &[Vec<u8>]) -> Vec<CertificateDer<'static>> {
    chain
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect()
}

/// The server's TLS config: its SVID, and client certificates verified against the bundle
/// but optional (a node that is attesting has none yet).
pub fn server_config(
    chain: &[Vec<u8>],
    key: &PrivateKey,
    roots: &[Vec<u8>],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(root_store(roots)?), provider.clone())
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
    // TLS 1.3 only: in 1.2 client certificates travel in clear, and a node SVID's serial is
    // part of how the server recognises the node.
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain_der(chain), key_der(key))
        .map_err(|e| TlsError::Config(e.to_string()))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// The node agent's TLS config. `expected_server` None means `--insecure-bootstrap`: any
/// server certificate is accepted (only for the first attestation).
pub fn client_config(
    roots: &[Vec<u8>],
    expected_server: Option<SpiffeId>,
    client_cert: Option<(&[Vec<u8>], &PrivateKey)>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        roots: trust_anchors(roots)?,
        expected: expected_server,
        provider: provider.clone(),
    });
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut cfg = match client_cert {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain_der(chain), key_der(key))
            .map_err(|e| TlsError::Config(e.to_string()))?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// TLS for a SPIFFE bundle endpoint (SPIFFE Federation spec, section 5): a server
/// certificate (the server's SVID for https_spiffe, a web PKI one for https_web), no client
/// authentication, HTTP/1.1. TLS 1.2 too: peers are other SPIFFE implementations'
/// HTTP clients.
pub fn bundle_endpoint_server_config(
    chain: &[Vec<u8>],
    key: &PrivateKey,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain_der(chain), key_der(key))
        .map_err(|e| TlsError::Config(e.to_string()))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The client side of an https_spiffe bundle endpoint fetch: the endpoint's chain must lead
/// to one of `roots` (the bundle last fetched from it) and its SVID name `expected`.
pub fn bundle_endpoint_spiffe_client(
    roots: &[Vec<u8>],
    expected: SpiffeId,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        roots: trust_anchors(roots)?,
        expected: Some(expected),
        provider: provider.clone(),
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The client side of an https_web bundle endpoint fetch: web PKI against `roots` (the
/// system's, or `SSL_CERT_FILE`), the URL's host checked as usual.
pub fn bundle_endpoint_web_client(
    roots: &[CertificateDer<'static>],
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut store = RootCertStore::empty();
    let (added, _ignored) = store.add_parsable_certificates(roots.iter().cloned());
    if added == 0 {
        return Err(TlsError::Config(
            "no usable web PKI root certificates (system store or SSL_CERT_FILE)".into(),
        ));
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(store)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Verifies the server's certificate chain against the trust bundle and its SPIFFE ID
/// against the expected one, instead of a DNS name.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Vec<rustls::pki_types::TrustAnchor<'static>>,
    expected: Option<SpiffeId>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(expected) = &self.expected else {
            return Ok(ServerCertVerified::assertion());
        };
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| rustls::Error::General(format!("server certificate: {e}")))?;
        cert.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &self.roots,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| rustls::Error::General(format!("server certificate: {e}")))?;
        match spiffe_id_of(end_entity.as_ref()) {
            Some(id) if &id == expected => Ok(ServerCertVerified::assertion()),
            Some(id) => Err(rustls::Error::General(format!(
                "server presented {id}, expected {expected}"
            ))),
            None => Err(rustls::Error::General(
                "server certificate has no SPIFFE ID".into(),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The SPIFFE ID in a certificate's URI SAN, if it has exactly one.
pub fn spiffe_id_of(cert_der: &[u8]) -> Option<SpiffeId> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let first = uris.next()?;
    if uris.next().is_some() {
        return None;
    }
    SpiffeId::new(first).ok()
}

/// Lowercase hex serial of a certificate.
pub fn serial_of(cert_der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    Some(cert.tbs_certificate.serial.to_str_radix(16))
}

/// Who is on the other end of a server-side TLS connection.
#[derive(Debug, Clone, Default)]
pub struct PeerIdentity {
    pub remote_addr: Option<SocketAddr>,
    /// The SPIFFE ID of the client certificate, when one was presented (and verified).
    pub spiffe_id: Option<SpiffeId>,
    pub serial: Option<String>,
}

/// A server-side TLS connection, carrying the peer's identity to tonic handlers
/// (`request.extensions().get::<PeerIdentity>()`) and its place in the connection limits.
pub type TlsConn = crate::net::ConnWithInfo<
    limits::Held<tokio_rustls::server::TlsStream<TcpStream>>,
    PeerIdentity,
>;

/// The current server TLS config; replaced when the server's SVID or the bundle changes.
pub type ServerConfigSource = Arc<std::sync::RwLock<Arc<rustls::ServerConfig>>>;

/// Accepts TCP connections and completes TLS handshakes off the accept loop, yielding
/// connections for tonic's `serve_with_incoming`. A failed or slow handshake is logged and
/// dropped; it never stops the listener. A connection from a source at its limit is closed
/// at once (see `limits`), so no one source can keep others from connecting.
pub fn incoming(
    listener: TcpListener,
    config: ServerConfigSource,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsConn, io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let pending = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
    let open = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let sources = limits::SourceTable::new(limits);
    tokio::spawn(async move {
        loop {
            let (slot, permit) = tokio::select! {
                _ = shutdown.cancelled() => break,
                both = async {
                    let slot = open.clone().acquire_owned().await?;
                    let permit = pending.clone().acquire_owned().await?;
                    Ok::<_, tokio::sync::AcquireError>((slot, permit))
                } => match both {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let (tcp, remote) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let handshake = match sources.begin_handshake(remote.ip()) {
                Ok(h) => h,
                Err(why) => {
                    tracing::debug!(%remote, ?why, "connection closed: its source is at a limit");
                    drop(tcp);
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let cfg = config.read().unwrap_or_else(|p| p.into_inner()).clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let (_, conn) = tls.get_ref();
                        let leaf = conn.peer_certificates().and_then(|c| c.first());
                        let peer = PeerIdentity {
                            remote_addr: Some(remote),
                            spiffe_id: leaf.and_then(|c| spiffe_id_of(c.as_ref())),
                            serial: leaf.and_then(|c| serial_of(c.as_ref())),
                        };
                        let held = limits::Held::new(tls, handshake.connected(slot));
                        let _ = tx.send(Ok(TlsConn::new(held, peer))).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%remote, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Time for one address's TCP connect and TLS handshake before the next address is tried.
const CONNECT_ATTEMPT: Duration = Duration::from_secs(5);

/// The server addresses a node agent knows, and the one it reached last. Shared by the
/// channel's connector (tonic reconnects through it when a connection drops), so a server
/// that goes away is replaced by the next one that answers, on every stream at once.
#[derive(Debug, Clone)]
pub struct ServerAddresses {
    list: Arc<[String]>,
    current: Arc<std::sync::atomic::AtomicUsize>,
}

impl ServerAddresses {
    /// Starts at one address picked at random, so that a fleet of node agents given the same
    /// list spreads over the servers, as a load balancer would spread it.
    pub fn new(list: Vec<String>) -> Self {
        let start = match list.len() {
            0 | 1 => 0,
            n => {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos() as usize);
                (nanos ^ std::process::id() as usize) % n
            }
        };
        Self {
            list: list.into(),
            current: Arc::new(start.into()),
        }
    }

    pub fn one(address: &str) -> Self {
        Self::new(vec![address.to_string()])
    }

    /// The address in use (or to be tried first).
    pub fn current(&self) -> &str {
        let i = self.current.load(std::sync::atomic::Ordering::Relaxed);
        self.list.get(i).map_or("", String::as_str)
    }

    pub fn all(&self) -> &[String] {
        &self.list
    }

    /// Which address is in use (an index into [`Self::all`]), to hand to [`Self::advance`].
    pub fn position(&self) -> usize {
        self.current.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Moves on from the address at `from` to the next one in list order, so that the next
    /// connection tries it first; true if it moved. Nothing happens when the address in use
    /// is no longer `from` (another failure moved on already, or a connection went
    /// elsewhere), so two failures at once never skip a server or move back. One address:
    /// stays.
    pub fn advance(&self, from: usize) -> bool {
        let n = self.list.len();
        n > 1
            && self
                .current
                .compare_exchange(
                    from,
                    (from + 1) % n,
                    std::sync::atomic::Ordering::Relaxed,
                    std::sync::atomic::Ordering::Relaxed,
                )
                .is_ok()
    }

    /// Every address, the current one first, then the others in list order after it.
    fn in_order(&self) -> impl Iterator<Item = (usize, &str)> {
        let start = self.current.load(std::sync::atomic::Ordering::Relaxed);
        let n = self.list.len();
        (0..n).map(move |k| {
            let i = (start + k) % n;
            (i, self.list[i].as_str())
        })
    }
}

async fn connect_one(
    addr: &str,
    config: Arc<rustls::ClientConfig>,
) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from("agentd-server").map_err(io::Error::other)?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

/// A gRPC channel to the server over TLS with the given client config.
pub async fn connect(
    addr: &str,
    config: Arc<rustls::ClientConfig>,
) -> Result<tonic::transport::Channel, TlsError> {
    connect_any(&ServerAddresses::one(addr), config).await
}

/// A gRPC channel to whichever of `addresses` answers: the current one first, then the
/// others; every reconnect of the channel goes through the same choice.
pub async fn connect_any(
    addresses: &ServerAddresses,
    config: Arc<rustls::ClientConfig>,
) -> Result<tonic::transport::Channel, TlsError> {
    let shown = addresses.all().join(",");
    let first = addresses.current().to_string();
    let attempts = u32::try_from(addresses.all().len().max(1)).unwrap_or(u32::MAX);
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{first}"))
        .map_err(|e| TlsError::Connect {
            addr: shown.clone(),
            reason: e.to_string(),
        })?
        .connect_timeout(CONNECT_ATTEMPT.saturating_mul(attempts) + Duration::from_secs(1))
        .timeout(Duration::from_secs(30))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    let targets = addresses.clone();
    let connector = tower::service_fn(move |_uri: tonic::transport::Uri| {
        let config = config.clone();
        let targets = targets.clone();
        async move {
            let mut failures = Vec::new();
            let previous = targets.current().to_string();
            for (i, addr) in targets.in_order() {
                match tokio::time::timeout(CONNECT_ATTEMPT, connect_one(addr, config.clone())).await
                {
                    Ok(Ok(tls)) => {
                        targets
                            .current
                            .store(i, std::sync::atomic::Ordering::Relaxed);
                        if addr != previous {
                            tracing::warn!(from = %previous, to = %addr, "server unreachable; connected to another");
                        } else {
                            tracing::info!(server = %addr, "connected to the server");
                        }
                        return Ok::<_, io::Error>(TokioIo::new(tls));
                    }
                    Ok(Err(e)) => failures.push(format!("{addr}: {e}")),
                    Err(_) => failures.push(format!(
                        "{addr}: no answer within {} s",
                        CONNECT_ATTEMPT.as_secs()
                    )),
                }
            }
            Err(io::Error::other(if failures.is_empty() {
                "no server address configured".to_string()
            } else {
                failures.join("; ")
            }))
        }
    });
    endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|e| TlsError::Connect {
            addr: shown,
            reason: format!("{e}: {}", source_chain(&e)),
        })
}

/// The messages of an error's source chain, joined (tonic's transport errors hide the cause).
pub fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        let msg = s.to_string();
        if out.last() != Some(&msg) {
            out.push(msg);
        }
        cur = s.source();
    }
    out.join(": ")
}

#[cfg(test)]
mod tests {
    //! The node's server-certificate verifier through a real TLS 1.3 handshake (in memory):
    //! the server must present a certificate from the trust bundle for exactly the expected
    //! SPIFFE ID; another SVID of the same CA is not the server.
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::ca::{CaConfig, CertificateAuthority, X509SvidParams};
    use crate::clock::ManualClock;

    #[test]
    fn advancing_moves_once_from_the_failed_address_to_the_next() {
        let three = ServerAddresses::new(vec!["a:1".into(), "b:1".into(), "c:1".into()]);
        let all = ["a:1", "b:1", "c:1"];
        let start = three.position();
        assert!(three.advance(start));
        assert_eq!(three.current(), all[(start + 1) % 3]);
        // A second failure seen on the same address changes nothing: no server skipped.
        assert!(!three.advance(start));
        assert_eq!(three.current(), all[(start + 1) % 3]);
        assert!(three.advance(three.position()));
        assert_eq!(three.current(), all[(start + 2) % 3]);
        let one = ServerAddresses::one("a:1");
        assert!(!one.advance(one.position()));
        assert_eq!(one.current(), "a:1");
    }

    fn ca(dir: &std::path::Path) -> CertificateAuthority {
        let cfg = CaConfig {
            trust_domain: TrustDomain::new("example.org").unwrap(),
            key_dir: dir.to_path_buf(),
            ca_ttl: Duration::from_secs(86_400),
            upstream: None,
            organization: "tls test".into(),
        };
        CertificateAuthority::load_or_create(&cfg, &ManualClock::new(SystemTime::now())).unwrap()
    }

    /// A server certificate for `spiffe_id` from `ca` valid for `ttl` from `at`, and its key.
    fn svid(
        ca: &CertificateAuthority,
        spiffe_id: &str,
        at: SystemTime,
        ttl: Duration,
    ) -> (Vec<Vec<u8>>, PrivateKey) {
        let key = PrivateKey::generate().unwrap();
        let csr = key.csr_der().unwrap();
        let issued = ca
            .sign_x509_svid(
                &X509SvidParams {
                    csr_der: &csr,
                    spiffe_id: &SpiffeId::new(spiffe_id).unwrap(),
                    ttl,
                    dns_names: &[],
                    extensions: &[],
                },
                at,
            )
            .unwrap();
        (issued.cert_chain, key)
    }

    /// Handshakes a client trusting `roots` and expecting `expected` with a server presenting
    /// `chain`; the client's error, if any.
    async fn handshake(
        chain: &[Vec<u8>],
        key: &PrivateKey,
        roots: &[Vec<u8>],
        expected: Option<SpiffeId>,
    ) -> Result<(), String> {
        let server = tokio_rustls::TlsAcceptor::from(server_config(chain, key, roots).unwrap());
        let client =
            tokio_rustls::TlsConnector::from(client_config(roots, expected, None).unwrap());
        let (c, s) = tokio::io::duplex(64 * 1024);
        let accept = tokio::spawn(async move { server.accept(s).await.map(|_| ()) });
        let name = ServerName::try_from("agentd-server").unwrap();
        let result = client
            .connect(name, c)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string());
        let _ = accept.await;
        result
    }

    #[tokio::test]
    async fn only_the_expected_server_id_from_the_bundle_is_accepted() {
        let (dir, other_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (ca, other) = (ca(dir.path()), ca(other_dir.path()));
        let roots = ca.bundle().x509_authorities;
        let server_id = server_spiffe_id(ca.trust_domain());
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);

        let (chain, key) = svid(&ca, &server_id.to_string(), now, hour);
        handshake(&chain, &key, &roots, Some(server_id.clone()))
            .await
            .expect("the real server is accepted");

        // A workload's SVID from the same CA: the chain verifies, the ID is not the server's.
        let (chain, key) = svid(&ca, "spiffe://example.org/agent/impostor", now, hour);
        let err = handshake(&chain, &key, &roots, Some(server_id.clone()))
            .await
            .unwrap_err();
        assert!(
            err.contains(
                "server presented spiffe://example.org/agent/impostor, expected spiffe://example.org/agentd/server"
            ),
            "{err}"
        );
        // --insecure-bootstrap (no expected ID) accepts it: only for the first attestation.
        handshake(&chain, &key, &roots, None)
            .await
            .expect("insecure bootstrap verifies nothing");

        // The server's ID from a CA outside the bundle.
        let (chain, key) = svid(&other, &server_id.to_string(), now, hour);
        let err = handshake(&chain, &key, &roots, Some(server_id.clone()))
            .await
            .unwrap_err();
        // The impostor CA has the same name as ours, so the chain is built and its
        // signature is what fails.
        assert!(err.contains("InvalidSignatureForPublicKey"), "{err}");

        // The server's ID from the bundle's CA, but expired.
        let (chain, key) = svid(&ca, &server_id.to_string(), now - 2 * hour, hour);
        let err = handshake(&chain, &key, &roots, Some(server_id))
            .await
            .unwrap_err();
        assert!(err.contains("CertExpired"), "{err}");
    }
}
