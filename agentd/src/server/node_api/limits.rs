//! Transport limits of the node API: streams per connection, and a small body cap on the
//! calls anyone may make without a client certificate.
//!
//! tonic's `max_decoding_message_size` is per service, and the node API's other calls need
//! up to 4 MiB (a batch of 1000 CSRs). `Attest` and `X509PopChallenge` need a few KiB (a
//! CSR, a certificate chain or a platform token), so their request bodies are cut off at
//! [`MAX_UNAUTHENTICATED_MESSAGE_BYTES`] before tonic buffers them: an unauthenticated
//! caller can no longer make the server hold 4 MiB per stream.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::{Frame, SizeHint};
use tonic::body::Body;
use tonic::codegen::http;
use tonic::Status;

use crate::server::config::NodeApiLimits;

/// Largest `Attest` or `X509PopChallenge` request body (the gRPC frame included).
pub const MAX_UNAUTHENTICATED_MESSAGE_BYTES: usize = 64 * 1024;

/// The calls that need no client certificate, by gRPC path.
const UNAUTHENTICATED: &[(&str, &str)] = &[
    ("/agentd.node.v1.Node/Attest", "Attest"),
    ("/agentd.node.v1.Node/X509PopChallenge", "X509PopChallenge"),
];

/// A tonic server builder with the node API's HTTP/2 limits.
pub fn server_builder(limits: &NodeApiLimits) -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        // Without it each connection may open streams without bound (tonic's default is
        // none): every stream is a task and a buffer.
        .max_concurrent_streams(limits.max_concurrent_streams)
}

/// Caps the body of the unauthenticated calls; other requests pass unchanged.
pub fn cap_unauthenticated_body(req: http::Request<Body>) -> http::Request<Body> {
    let Some((_, method)) = UNAUTHENTICATED
        .iter()
        .find(|(path, _)| *path == req.uri().path())
    else {
        return req;
    };
    let method = *method;
    req.map(|body| {
        Body::new(CappedBody {
            inner: body,
            seen: 0,
            limit: MAX_UNAUTHENTICATED_MESSAGE_BYTES,
            method,
        })
    })
}

/// A request body that fails with OutOfRange once more than `limit` bytes arrived.
struct CappedBody {
    inner: Body,
    seen: usize,
    limit: usize,
    method: &'static str,
}

impl http_body::Body for CappedBody {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        if this.seen > this.limit {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen = this.seen.saturating_add(data.len());
                    if this.seen > this.limit {
                        return Poll::Ready(Some(Err(Status::out_of_range(format!(
                            "{} request: more than {} bytes; the node API accepts at most {} \
                             for this call",
                            this.method, this.limit, this.limit
                        )))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.seen > self.limit || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;

    fn request(path: &str, bytes: usize) -> http::Request<Body> {
        let body = Body::new(http_body_util_full(vec![0u8; bytes]));
        http::Request::builder().uri(path).body(body).unwrap()
    }

    /// A body of one data frame.
    fn http_body_util_full(
        data: Vec<u8>,
    ) -> impl http_body::Body<Data = bytes::Bytes, Error = Status> {
        struct Once(Option<bytes::Bytes>);
        impl http_body::Body for Once {
            type Data = bytes::Bytes;
            type Error = Status;
            fn poll_frame(
                mut self: Pin<&mut Self>,
                _: &mut Context<'_>,
            ) -> Poll<Option<Result<Frame<bytes::Bytes>, Status>>> {
                Poll::Ready(self.0.take().map(|d| Ok(Frame::data(d))))
            }
        }
        Once(Some(bytes::Bytes::from(data)))
    }

    async fn read_all(req: http::Request<Body>) -> Result<usize, Status> {
        let mut body = req.into_body();
        let mut n = 0;
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        {
            if let Some(d) = frame?.data_ref() {
                n += d.len();
            }
        }
        Ok(n)
    }

    /// The HTTP/2 SETTINGS the server sends advertise the stream limit (tonic's default
    /// advertises none).
    #[tokio::test]
    async fn the_server_advertises_its_stream_limit() {
        let limits = NodeApiLimits {
            max_concurrent_streams: 7,
            ..Default::default()
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_, health) = tonic_health::server::health_reporter();
        let stop = tokio_util::sync::CancellationToken::new();
        let serving = tokio::spawn(
            server_builder(&limits)
                .add_service(health)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    stop.clone().cancelled_owned(),
                ),
        );
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (client, mut conn) = h2::client::handshake(tcp).await.unwrap();
        // Drive the connection until the server's SETTINGS have been applied (before them
        // the client assumes no limit).
        let applied = std::future::poll_fn(|cx| {
            use std::future::Future;
            let before = conn.max_concurrent_send_streams();
            if before == 7 {
                return Poll::Ready(Ok(()));
            }
            match Pin::new(&mut conn).poll(cx) {
                Poll::Ready(r) => Poll::Ready(Err(format!("connection ended: {r:?}"))),
                Poll::Pending if conn.max_concurrent_send_streams() == 7 => Poll::Ready(Ok(())),
                Poll::Pending => Poll::Pending,
            }
        });
        let waited = tokio::time::timeout(std::time::Duration::from_secs(10), applied).await;
        assert!(
            matches!(waited, Ok(Ok(()))),
            "the server's SETTINGS did not limit streams to 7: {waited:?}"
        );
        drop(client);
        drop(conn);
        stop.cancel();
        serving.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn attest_and_challenge_bodies_are_capped_and_others_are_not() {
        let big = MAX_UNAUTHENTICATED_MESSAGE_BYTES + 1;
        for path in [
            "/agentd.node.v1.Node/Attest",
            "/agentd.node.v1.Node/X509PopChallenge",
        ] {
            let err = read_all(cap_unauthenticated_body(request(path, big)))
                .await
                .unwrap_err();
            assert_eq!(err.code(), tonic::Code::OutOfRange, "{path}");
            assert!(err.message().contains("at most 65536"), "{}", err.message());
            let ok = read_all(cap_unauthenticated_body(request(
                path,
                MAX_UNAUTHENTICATED_MESSAGE_BYTES,
            )))
            .await
            .unwrap();
            assert_eq!(ok, MAX_UNAUTHENTICATED_MESSAGE_BYTES);
        }
        // A mint batch may be large.
        let n = read_all(cap_unauthenticated_body(request(
            "/agentd.node.v1.Node/MintX509Svids",
            1024 * 1024,
        )))
        .await
        .unwrap();
        assert_eq!(n, 1024 * 1024);
    }
}
