//! The server's public HTTPS listeners (the federation bundle endpoint, the OAuth front
//! door) share one shape: the node API's accept path (handshakes off the accept loop,
//! per-source connection limits), HTTP/1.1 with a header read timeout, and a bounded
//! connection lifetime, since they face unauthenticated peers.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::server::ServerError;
use crate::tls::ServerConfigSource;

const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Serves `answer` on `listener` until `stop`; `what` names the listener in logs. `limits`
/// are the node API's (`[node_api]`), so that one setting bounds every public listener.
pub async fn serve<F, Fut>(
    what: &'static str,
    listener: TcpListener,
    tls: ServerConfigSource,
    limits: crate::tls::ConnectionLimits,
    stop: CancellationToken,
    answer: F,
) -> Result<(), ServerError>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<String>> + Send + 'static,
{
    use tokio_stream::StreamExt as _;
    let mut incoming = crate::tls::incoming(listener, tls, limits, stop.clone());
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            next = incoming.next() => match next {
                Some(Ok(conn)) => {
                    let answer = answer.clone();
                    conns.spawn(async move {
                        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                            let fut = answer(req);
                            async move { Ok::<_, Infallible>(fut.await) }
                        });
                        let mut builder = hyper::server::conn::http1::Builder::new();
                        builder.timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT);
                        let served = builder.serve_connection(TokioIo::new(conn), svc);
                        match tokio::time::timeout(CONNECTION_LIFETIME, served).await {
                            Ok(Ok(())) | Err(_) => {}
                            Ok(Err(e)) => tracing::debug!(error = %e, listener = what, "connection error"),
                        }
                    });
                }
                Some(Err(e)) => tracing::debug!(error = %e, listener = what, "accept failed"),
                None => break,
            },
        }
    }
    conns.abort_all();
    Ok(())
}
