//! Per-RPC telemetry for the gRPC servers: a tower layer that times each call (to its
//! response headers, which for a server stream is its first message), counts the calls
//! still open (a stream stays open until the client hangs up), and logs the end of each
//! call with its gRPC status inside the call's span. The spans themselves are made by each
//! API (`tonic::transport::Server::trace_fn`), which knows its caller's identity fields.
//!
//! Paths come from the network: a method no service implements (answered Unimplemented) is
//! labelled `unknown`, so a client cannot create series at will.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use hyper::body::{Body, Frame, SizeHint};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tonic::codegen::http;

use super::metrics::{HistogramFamily, RpcLabels};

/// The label and log value for a path that is not a known method.
pub const UNKNOWN_RPC: &str = "unknown";
/// Longest path logged or used as a label as it is.
const MAX_RPC_LEN: usize = 128;

/// The RPC path as it may appear in a log line or a label: printable ASCII of bounded
/// length, else `unknown`.
pub fn rpc_name(path: &str) -> &str {
    if !path.is_empty() && path.len() <= MAX_RPC_LEN && path.bytes().all(|b| b.is_ascii_graphic()) {
        path
    } else {
        UNKNOWN_RPC
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<i32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse().ok())
}

/// Times and counts the calls of one API. Made by `ServerMetrics::rpc_layer` and
/// `NodeMetrics::rpc_layer`; add it with `tonic::transport::Server::builder().layer(..)`.
#[derive(Debug, Clone)]
pub struct RpcLayer {
    api: &'static str,
    duration: HistogramFamily<RpcLabels>,
    open: Option<Family<RpcLabels, Gauge>>,
}

impl RpcLayer {
    pub(crate) fn new(
        api: &'static str,
        duration: HistogramFamily<RpcLabels>,
        open: Option<Family<RpcLabels, Gauge>>,
    ) -> Self {
        Self {
            api,
            duration,
            open,
        }
    }
}

impl<S> tower::Layer<S> for RpcLayer {
    type Service = RpcService<S>;

    fn layer(&self, inner: S) -> RpcService<S> {
        RpcService {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RpcService<S> {
    inner: S,
    layer: RpcLayer,
}

impl<S, B> tower::Service<http::Request<B>> for RpcService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // The service that was polled ready is the one that must take the call.
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        let layer = self.layer.clone();
        let path = req.uri().path().to_owned();
        Box::pin(async move {
            let start = Instant::now();
            // Polled inside the span the API's `trace_fn` made for this call.
            let span = tracing::Span::current();
            let resp = inner.call(req).await?;
            let status = grpc_status(resp.headers());
            let rpc = if status == Some(tonic::Code::Unimplemented as i32) {
                UNKNOWN_RPC.to_string()
            } else {
                rpc_name(&path).to_string()
            };
            let labels = RpcLabels {
                api: layer.api,
                rpc,
            };
            layer
                .duration
                .get_or_create(&labels)
                .observe(start.elapsed().as_secs_f64());
            let open = layer.open.as_ref().map(|f| {
                let g = f.get_or_create(&labels).clone();
                g.inc();
                g
            });
            let guard = CallGuard {
                open,
                span,
                start,
                status,
            };
            Ok(resp.map(|body| {
                tonic::body::Body::new(TrackedBody {
                    inner: body,
                    guard: Some(guard),
                })
            }))
        })
    }
}

/// Lives as long as the call's response body: the call is open until the body ends or the
/// client hangs up (hyper then drops the body).
#[derive(Debug)]
struct CallGuard {
    open: Option<Gauge>,
    span: tracing::Span,
    start: Instant,
    /// From the headers (an immediate error) or the trailers.
    status: Option<i32>,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if let Some(g) = &self.open {
            g.dec();
        }
        let elapsed_ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        match self.status {
            Some(code) => {
                let code = tonic::Code::from_i32(code);
                tracing::debug!(parent: &self.span, grpc_status = ?code, elapsed_ms, "rpc finished");
            }
            None => {
                tracing::debug!(parent: &self.span, elapsed_ms, "rpc ended by the client")
            }
        }
    }
}

#[derive(Debug)]
struct TrackedBody {
    inner: tonic::body::Body,
    guard: Option<CallGuard>,
}

impl Body for TrackedBody {
    type Data = <tonic::body::Body as Body>::Data;
    type Error = <tonic::body::Body as Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(trailers), Some(g)) = (frame.trailers_ref(), this.guard.as_mut()) {
                    g.status = grpc_status(trailers).or(g.status);
                }
            }
            Poll::Ready(Some(Err(status))) => {
                if let Some(g) = this.guard.as_mut() {
                    g.status = Some(status.code() as i32);
                }
            }
            // The call is over: count and log it now rather than when hyper drops the body.
            Poll::Ready(None) => drop(this.guard.take()),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::metrics::{Encode, NodeMetrics};
    use tower::{Layer as _, ServiceExt as _};

    fn text(m: &NodeMetrics) -> String {
        let mut s = String::new();
        m.encode(&mut s).unwrap();
        s
    }

    fn request(path: &str) -> http::Request<()> {
        http::Request::builder().uri(path).body(()).unwrap()
    }

    #[test]
    fn rpc_names_are_bounded_and_printable() {
        assert_eq!(
            rpc_name("/SpiffeWorkloadAPI/FetchX509SVID"),
            "/SpiffeWorkloadAPI/FetchX509SVID"
        );
        assert_eq!(rpc_name("/a b"), UNKNOWN_RPC);
        assert_eq!(rpc_name("/a\nb"), UNKNOWN_RPC);
        assert_eq!(rpc_name(&format!("/{}", "x".repeat(200))), UNKNOWN_RPC);
        assert_eq!(rpc_name(""), UNKNOWN_RPC);
    }

    #[tokio::test]
    async fn calls_are_timed_and_open_until_their_body_is_dropped() {
        let m = NodeMetrics::new();
        let svc = m
            .rpc_layer()
            .layer(tower::service_fn(|req: http::Request<()>| async move {
                let mut resp = http::Response::new(tonic::body::Body::new(String::from("x")));
                // Only /Svc/Watch is implemented: anything else is answered Unimplemented.
                if req.uri().path() != "/Svc/Watch" && !req.uri().path().starts_with("/Svc/Long") {
                    resp.headers_mut()
                        .insert("grpc-status", http::HeaderValue::from_static("12"));
                }
                Ok::<_, std::convert::Infallible>(resp)
            }));
        let first = svc.clone().oneshot(request("/Svc/Watch")).await.unwrap();
        let t = text(&m);
        assert!(
            t.contains("agentd_node_rpc_open_streams{api=\"workload\",rpc=\"/Svc/Watch\"} 1"),
            "{t}"
        );
        assert!(
            t.contains(
                "agentd_node_rpc_duration_seconds_count{api=\"workload\",rpc=\"/Svc/Watch\"} 1"
            ),
            "{t}"
        );
        drop(first);
        assert!(text(&m)
            .contains("agentd_node_rpc_open_streams{api=\"workload\",rpc=\"/Svc/Watch\"} 0"));
        // Unimplemented methods share one label, whatever the path: two different paths
        // answered Unimplemented, and a path too long to be a label (answered, so only the
        // length bound keeps it out), all count under `unknown`.
        let long = format!("/Svc/Long{}", "x".repeat(MAX_RPC_LEN));
        for p in ["/Svc/Nope", "/Other/Missing", long.as_str()] {
            drop(svc.clone().oneshot(request(p)).await.unwrap());
        }
        let t = text(&m);
        assert!(
            t.contains(
                "agentd_node_rpc_duration_seconds_count{api=\"workload\",rpc=\"unknown\"} 3"
            ),
            "{t}"
        );
        for p in ["/Svc/Nope", "/Other/Missing", "/Svc/Long"] {
            assert!(!t.contains(p), "{p} became a label: {t}");
        }
    }
}
