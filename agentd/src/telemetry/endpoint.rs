//! The HTTP endpoint on `metrics_address`: `GET /metrics` (OpenMetrics text, which Prometheus
//! scrapes), `GET /live` (the process is up) and `GET /ready` (every readiness condition is
//! met; 503 with the unmet ones otherwise). HTTP/1.1 only, plain text: it carries no secret,
//! and is meant for a loopback or an internal monitoring network.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::codegen::http::{self, header, Method, Request, Response, StatusCode};

use super::metrics::Encode;
use super::Readiness;

/// Connections served at once; more are closed at once (a scraper needs one).
const MAX_CONNECTIONS: usize = 32;
/// A client must send its request headers within this time (slow clients hold no slot).
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a connection is kept, keep-alive included.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// The OpenMetrics content type that `prometheus-client` writes.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("binding the metrics endpoint {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What a [`Refresh`] returns.
pub type RefreshFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Brings sampled values (gauges read from the store or a cache) up to date before a scrape.
pub type Refresh = Arc<dyn Fn() -> RefreshFuture + Send + Sync>;

struct Shared {
    metrics: Arc<dyn Encode>,
    readiness: Readiness,
    refresh: Option<Refresh>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("metrics", &self.metrics)
            .field("readiness", &self.readiness)
            .field("refresh", &self.refresh.is_some())
            .finish()
    }
}

/// The metrics and health endpoint of one daemon.
#[derive(Debug, Clone)]
pub struct Endpoint {
    shared: Arc<Shared>,
}

impl Endpoint {
    pub fn new(metrics: Arc<dyn Encode>, readiness: Readiness) -> Self {
        Self {
            shared: Arc::new(Shared {
                metrics,
                readiness,
                refresh: None,
            }),
        }
    }

    /// Runs `refresh` before rendering each `/metrics` answer.
    pub fn with_refresh(self, refresh: Refresh) -> Self {
        let s = &self.shared;
        Self {
            shared: Arc::new(Shared {
                metrics: s.metrics.clone(),
                readiness: s.readiness.clone(),
                refresh: Some(refresh),
            }),
        }
    }

    /// Binds `addr` (port 0 picks a free port); returns the listener and the bound address.
    pub async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), EndpointError> {
        let err = |source| EndpointError::Bind { addr, source };
        let listener = TcpListener::bind(addr).await.map_err(err)?;
        let bound = listener.local_addr().map_err(err)?;
        Ok((listener, bound))
    }

    /// Serves until `shutdown` is cancelled. Connection errors are logged, never fatal.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), EndpointError> {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let Ok(slot) = slots.clone().try_acquire_owned() else {
                            tracing::warn!(%peer, "metrics endpoint busy: connection closed");
                            continue;
                        };
                        let shared = self.shared.clone();
                        conns.spawn(async move {
                            let _slot = slot;
                            serve_connection(shared, stream, peer).await;
                        });
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: wait rather than spin.
                        tracing::warn!(error = %e, "metrics endpoint accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        conns.abort_all();
        Ok(())
    }
}

async fn serve_connection(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(handle(&shared, req.method(), req.uri().path()).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    let conn = builder.serve_connection(TokioIo::new(stream), svc);
    match tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "metrics endpoint connection error"),
        Err(_) => tracing::debug!(%peer, "metrics endpoint connection closed after its lifetime"),
    }
}

fn response(status: StatusCode, content_type: &'static str, body: String) -> Response<String> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    resp
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<String> {
    response(status, "application/json", format!("{value}\n"))
}

async fn handle(shared: &Shared, method: &Method, path: &str) -> Response<String> {
    if method != Method::GET && method != Method::HEAD {
        let mut resp = json(
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!({"error": "only GET and HEAD are served"}),
        );
        resp.headers_mut()
            .insert(header::ALLOW, http::HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    match path {
        "/metrics" => {
            if let Some(refresh) = &shared.refresh {
                refresh().await;
            }
            let mut text = String::new();
            match shared.metrics.encode(&mut text) {
                Ok(()) => response(StatusCode::OK, OPENMETRICS_CONTENT_TYPE, text),
                Err(_) => json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    serde_json::json!({"error": "encoding the metrics failed"}),
                ),
            }
        }
        "/live" => json(StatusCode::OK, serde_json::json!({"live": true})),
        "/ready" => {
            let unmet = shared.readiness.unmet();
            if unmet.is_empty() {
                json(StatusCode::OK, serde_json::json!({"ready": true}))
            } else {
                json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    serde_json::json!({"ready": false, "unmet": unmet}),
                )
            }
        }
        _ => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "not found: the paths are /metrics, /live and /ready"}),
        ),
    }
}

/// `GET path` on a metrics endpoint (for `agentd healthcheck --metrics-address`): the status
/// and body.
pub async fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), GetError> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| GetError(format!("connecting to {addr}: {e}")))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| GetError(format!("{addr}: {e}")))?;
    let driver = tokio::spawn(conn);
    let req = Request::get(path)
        .header(header::HOST, addr.to_string())
        .body(String::new())
        .map_err(|e| GetError(format!("request: {e}")))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| GetError(format!("{addr}{path}: {e}")))?;
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut bytes = Vec::new();
    while let Some(frame) =
        futures::future::poll_fn(|cx| hyper::body::Body::poll_frame(Pin::new(&mut body), cx)).await
    {
        let frame = frame.map_err(|e| GetError(format!("{addr}{path}: reading the body: {e}")))?;
        if let Some(data) = frame.data_ref() {
            bytes.extend_from_slice(data);
        }
        if bytes.len() > 16 * 1024 * 1024 {
            return Err(GetError(format!("{addr}{path}: body too large")));
        }
    }
    driver.abort();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

/// A failed [`get`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct GetError(String);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::{conditions, ServerMetrics, SvidKind};

    async fn start(
        readiness: Readiness,
        refresh: Option<Refresh>,
    ) -> (SocketAddr, Arc<ServerMetrics>, CancellationToken) {
        let metrics = Arc::new(ServerMetrics::new());
        let (listener, addr) = Endpoint::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let mut ep = Endpoint::new(metrics.clone(), readiness);
        if let Some(r) = refresh {
            ep = ep.with_refresh(r);
        }
        let stop = CancellationToken::new();
        tokio::spawn(ep.run(listener, stop.clone()));
        (addr, metrics, stop)
    }

    #[tokio::test]
    async fn serves_metrics_live_and_ready() {
        let readiness = Readiness::new(&[conditions::CA_LOADED, conditions::STORE_OPEN]);
        let m2 = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = m2.clone();
        let refresh: Refresh = Arc::new(move || -> RefreshFuture {
            let c = counted.clone();
            Box::pin(async move {
                c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            })
        });
        let (addr, metrics, stop) = start(readiness.clone(), Some(refresh)).await;
        metrics.svid_minted(SvidKind::Jwt, Duration::from_millis(1));

        let (status, body) = get(addr, "/metrics").await.unwrap();
        assert_eq!(status, 200);
        assert!(
            body.contains("agentd_server_svids_minted_total{type=\"jwt\"} 1"),
            "{body}"
        );
        assert_eq!(m2.load(std::sync::atomic::Ordering::SeqCst), 1);

        assert_eq!(get(addr, "/live").await.unwrap().0, 200);

        let (status, body) = get(addr, "/ready").await.unwrap();
        assert_eq!(status, 503);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["unmet"], serde_json::json!(["ca_loaded", "store_open"]));
        readiness.set(conditions::CA_LOADED, true);
        readiness.set(conditions::STORE_OPEN, true);
        let (status, body) = get(addr, "/ready").await.unwrap();
        assert_eq!((status, body.trim()), (200, r#"{"ready":true}"#));

        assert_eq!(get(addr, "/nope").await.unwrap().0, 404);
        stop.cancel();
    }

    #[tokio::test]
    async fn other_methods_and_garbage_are_refused_without_harm() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (addr, _m, stop) = start(Readiness::default(), None).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(
            b"POST /metrics HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 405"), "{out}");

        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"\x00\x01garbage\r\n\r\n").await.unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        // The endpoint is still up.
        assert_eq!(get(addr, "/live").await.unwrap().0, 200);
        stop.cancel();
    }

    #[tokio::test]
    async fn stops_on_shutdown() {
        let (addr, _m, stop) = start(Readiness::default(), None).await;
        stop.cancel();
        let stopped = wait_refused(addr).await;
        assert!(stopped, "endpoint still accepting after shutdown");
    }

    async fn wait_refused(addr: SocketAddr) -> bool {
        for _ in 0..50 {
            if TcpStream::connect(addr).await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }
}
