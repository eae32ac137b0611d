//! The front door's HTTPS listener: discovery documents, the JWKS, the token and the
//! introspection endpoints. It faces the network unauthenticated, so it shares the node
//! API's accept path (handshakes off the accept loop, per-source connection limits), reads
//! headers under a timeout, bounds every body and closes a connection after a bounded
//! lifetime. Bad input gets an RFC 6749 error, never a 500.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::{header, Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::form::{Form, MAX_BODY};
use super::issue::FrontDoor;
use super::OAuthError;
use crate::server::{ServerError, ServerState};
use crate::tls::ServerConfigSource;

/// Serves the front door on `listener` until `stop`.
pub async fn serve(
    state: Arc<ServerState>,
    door: Arc<FrontDoor>,
    listener: TcpListener,
    tls: ServerConfigSource,
    stop: CancellationToken,
) -> Result<(), ServerError> {
    let limits = state.config.node_api.connections;
    crate::server::https::serve(
        "OAuth front door",
        listener,
        tls,
        limits,
        stop,
        move |req| {
            let state = state.clone();
            let door = door.clone();
            async move { answer(&state, &door, req).await }
        },
    )
    .await
}

fn json_response(status: u16, body: &Value) -> Response<String> {
    let mut r = Response::new(body.to_string());
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    // RFC 6749 section 5.1: token responses are not cached.
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    r
}

fn error_response(e: &OAuthError) -> Response<String> {
    let mut r = json_response(e.status(), &e.to_json());
    if e.status() == 401 {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer error=\"invalid_client\""),
        );
    }
    r
}

fn method_not_allowed(allow: &'static str) -> Response<String> {
    let mut r = json_response(
        405,
        &json!({"error": "invalid_request", "error_description": format!("only {allow} is served here")}),
    );
    r.headers_mut()
        .insert(header::ALLOW, header::HeaderValue::from_static(allow));
    r
}

async fn answer(state: &ServerState, door: &FrontDoor, req: Request<Incoming>) -> Response<String> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let get = method == Method::GET || method == Method::HEAD;
    match path.as_str() {
        "/.well-known/oauth-authorization-server" | "/.well-known/openid-configuration" => {
            if !get {
                return method_not_allowed("GET, HEAD");
            }
            let mut doc = super::metadata(
                &door.issuer,
                &[],
                path == "/.well-known/openid-configuration",
            );
            if let Some(m) = doc.as_object_mut() {
                m.remove("scopes_supported");
            }
            json_response(200, &doc)
        }
        super::JWKS_PATH => {
            if !get {
                return method_not_allowed("GET, HEAD");
            }
            json_response(200, &super::jwks(&state.ca.bundle()))
        }
        super::TOKEN_PATH | super::INTROSPECTION_PATH => {
            if method != Method::POST {
                return method_not_allowed("POST");
            }
            let form = match read_form(req).await {
                Ok(f) => f,
                Err(e) => return error_response(&e),
            };
            let answered = if path == super::TOKEN_PATH {
                super::issue::token(state, door, &form).await
            } else {
                super::introspect::introspect(state, door, &form).await
            };
            match answered {
                Ok(v) => json_response(200, &v),
                Err(e) => {
                    tracing::debug!(path = %path, error = %e, "OAuth request refused");
                    error_response(&e)
                }
            }
        }
        _ => json_response(
            404,
            &json!({"error": "not_found", "error_description": format!("nothing is served at {}", path.chars().take(80).collect::<String>())}),
        ),
    }
}

/// The body as a form: `Content-Type: application/x-www-form-urlencoded` (RFC 6749
/// section 4.1.3), at most [`MAX_BODY`] bytes.
async fn read_form(req: Request<Incoming>) -> Result<Form, OAuthError> {
    let ct = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let media = ct.split(';').next().unwrap_or_default().trim();
    if !media.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        return Err(OAuthError::InvalidRequest(format!(
            "Content-Type {:?} is not application/x-www-form-urlencoded",
            ct.chars().take(80).collect::<String>()
        )));
    }
    let body = http_body_util::Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            OAuthError::InvalidRequest(format!(
                "the body could not be read or is larger than {MAX_BODY} bytes ({e})"
            ))
        })?
        .to_bytes();
    Form::parse(&body)
}

/// How long a front door certificate from the server's CA lives; renewed at half-life.
const OWN_CERT_TTL: Duration = Duration::from_secs(24 * 3600);

/// A TLS config with a certificate from the server's own CA: the server's SPIFFE ID, and
/// the issuer's host as a DNS or IP SAN, so that a client trusting the bundle's X.509
/// authorities (`agentd bundle show --format pem`) connects. Returns it and when to renew.
pub fn own_ca_config(
    state: &ServerState,
    issuer: &str,
) -> Result<(Arc<rustls::ServerConfig>, std::time::SystemTime), ServerError> {
    let host = url::Url::parse(issuer)
        .ok()
        .and_then(|u| u.host_str().map(|h| h.trim_matches(['[', ']']).to_string()))
        .ok_or_else(|| ServerError::Config {
            reason: format!("oauth.issuer {issuer:?} has no host"),
        })?;
    let key = crate::keys::PrivateKey::generate().map_err(crate::ca::CaError::from)?;
    let csr = key.csr_der().map_err(crate::ca::CaError::from)?;
    let id = crate::tls::server_spiffe_id(&state.config.trust_domain);
    let now = state.clock.now();
    let svid = state.ca.sign_x509_svid(
        &crate::ca::X509SvidParams {
            csr_der: &csr,
            spiffe_id: &id,
            ttl: OWN_CERT_TTL,
            dns_names: &[host],
            extensions: &[],
        },
        now,
    )?;
    let cfg = crate::tls::bundle_endpoint_server_config(&svid.cert_chain, &key)?;
    let lifetime = svid.not_after.duration_since(now).unwrap_or_default();
    Ok((cfg, now + lifetime / 2))
}

/// Renews the own-CA certificate at half-life (and when the CA's authorities change, so
/// that a certificate from a revoked authority is replaced at once).
pub async fn renew_own_certificate(
    state: Arc<ServerState>,
    door: Arc<FrontDoor>,
    source: ServerConfigSource,
    mut renew_at: std::time::SystemTime,
    stop: CancellationToken,
) -> Result<(), ServerError> {
    let mut changes = state.ca.subscribe();
    loop {
        let wait = renew_at
            .duration_since(state.clock.now())
            .unwrap_or_default()
            .max(Duration::from_secs(1));
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(wait) => {}
            changed = changes.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
            }
        }
        match own_ca_config(&state, &door.issuer) {
            Ok((cfg, at)) => {
                *source.write().unwrap_or_else(|p| p.into_inner()) = cfg;
                renew_at = at;
            }
            Err(e) => {
                tracing::warn!(error = %e, "renewing the OAuth front door certificate failed; retrying in 10 s");
                renew_at = state.clock.now() + Duration::from_secs(10);
            }
        }
    }
}
