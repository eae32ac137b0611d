//! This trust domain's bundle endpoint (SPIFFE Federation spec, section 5): `GET` on any
//! path answers the bundle in the SPIFFE bundle format, with `spiffe_sequence` and the
//! configured `spiffe_refresh_hint`, over HTTPS. https_spiffe presents the server's own
//! SVID (`spiffe://<td>/agentd/server`), so a peer authenticates us with the bundle it
//! fetched last; https_web presents a configured web PKI certificate.
//!
//! The endpoint is unauthenticated and faces other organisations: it shares the node API's
//! accept path (handshakes off the accept loop, per-source connection limits), reads headers
//! under a timeout and closes a connection after a bounded lifetime.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper::{header, Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::server::{ServerError, ServerState};
use crate::tls::ServerConfigSource;

/// Serves the bundle on `listener` until `stop`.
pub async fn serve(
    state: Arc<ServerState>,
    listener: TcpListener,
    tls: ServerConfigSource,
    refresh_hint: Duration,
    stop: CancellationToken,
) -> Result<(), ServerError> {
    let limits = state.config.node_api.connections;
    crate::server::https::serve("bundle endpoint", listener, tls, limits, stop, move |req| {
        let resp = answer(&state, &req, refresh_hint);
        async move { resp }
    })
    .await
}

/// The trust domain's bundle document as the endpoint serves it: authorities in a fixed
/// order (DER, key id), so that every server of a shared store serves the same document.
pub fn bundle_document(state: &ServerState, refresh_hint: Duration) -> String {
    let mut bundle = state.ca.bundle().clone();
    bundle.refresh_hint = refresh_hint;
    bundle.x509_authorities.sort();
    bundle
        .jwt_authorities
        .sort_by(|a, b| a.key_id.cmp(&b.key_id));
    bundle.to_spiffe_json()
}

fn answer<B>(state: &ServerState, req: &Request<B>, refresh_hint: Duration) -> Response<String> {
    let mut resp = if req.method() == Method::GET || req.method() == Method::HEAD {
        let mut r = Response::new(bundle_document(state, refresh_hint));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
        r
    } else {
        let mut r = Response::new("only GET is served\n".to_string());
        *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        r.headers_mut().insert(
            header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        r
    };
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    resp
}

/// The https_web certificate and key from their files: the chain as PEM, the key as PEM
/// (PKCS#8, SEC1 or PKCS#1, any type rustls can sign with), readable by the server's user
/// only.
pub fn https_web_config(
    what: &str,
    cert_file: &Path,
    key_file: &Path,
) -> Result<Arc<rustls::ServerConfig>, ServerError> {
    let err = |path: &Path, reason: String| ServerError::Config {
        reason: format!("{what}: {}: {reason}", path.display()),
    };
    let certs_pem = std::fs::read(cert_file).map_err(|e| err(cert_file, e.to_string()))?;
    let chain: Vec<rustls::pki_types::CertificateDer<'static>> =
        rustls_pemfile::certs(&mut certs_pem.as_slice())
            .collect::<Result<_, _>>()
            .map_err(|e| err(cert_file, format!("not PEM certificates: {e}")))?;
    if chain.is_empty() {
        return Err(err(cert_file, "holds no CERTIFICATE block".into()));
    }
    {
        use std::os::unix::fs::MetadataExt as _;
        let meta = std::fs::metadata(key_file).map_err(|e| err(key_file, e.to_string()))?;
        if meta.mode() & 0o077 != 0 {
            return Err(err(
                key_file,
                format!(
                    "mode {:o} lets other users read the key; chmod 600 it",
                    meta.mode() & 0o777
                ),
            ));
        }
    }
    let key_pem =
        zeroize::Zeroizing::new(std::fs::read(key_file).map_err(|e| err(key_file, e.to_string()))?);
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| err(key_file, format!("not a PEM private key: {e}")))?
        .ok_or_else(|| err(key_file, "holds no private key block".into()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| err(cert_file, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| err(key_file, format!("does not fit the certificate: {e}")))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}
