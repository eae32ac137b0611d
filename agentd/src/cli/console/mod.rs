//! `agentd console`: a local web UI over the admin API (docs/console.md).
//!
//! It is a client of the server's admin socket, like the CLI, so it can do what the user who
//! started it can do and no more; the server audits its revocations as done by that user.
//! The web side is guarded the way Jupyter guards its notebooks, plus what a kill switch
//! needs:
//! - it binds to loopback unless `--insecure-bind-any` says otherwise, and refuses a `Host`
//!   that is not its own loopback address (DNS rebinding);
//! - the first stdout line is the URL with a one-time login token, exchanged on first use
//!   for an HttpOnly, SameSite=Strict session cookie; anything without it gets 401;
//! - every POST carries the session's CSRF token and, when the browser sends one, an
//!   `Origin` equal to the console's own; otherwise 403;
//! - a strict Content-Security-Policy, and every asset served from the binary.
//!
//! Pages are rendered on the server ([`pages`]); the delegation graph is an SVG drawn here
//! ([`graph`]).

mod graph;
mod pages;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentd_proto::admin::admin_client::AdminClient;
use anyhow::Context as _;
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::{header, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tonic::transport::Channel;
use zeroize::Zeroizing;

/// The session cookie's name.
const COOKIE: &str = "agentd_console";
/// The largest form a page posts (a revocation: kind, id, reason, token).
const MAX_FORM: usize = 16 * 1024;
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECTION_LIFETIME: Duration = Duration::from_secs(300);
/// Connections served at once; more wait in the kernel's queue.
const MAX_CONNECTIONS: usize = 64;

/// What every page is sent with: nothing from elsewhere, no inline script or style, no
/// framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

const CSS: &str = include_str!("assets/console.css");
const JS: &str = include_str!("assets/console.js");
const ICON: &str = include_str!("assets/icon.svg");

#[derive(Debug, clap::Args)]
pub struct ConsoleArgs {
    /// Where the console listens: a loopback address unless --insecure-bind-any (port 0: a
    /// free port; the URL printed says which).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub bind_address: SocketAddr,
    /// Allows a non-loopback --bind-address: anyone who can reach it and learns the login
    /// token can revoke identities. Put TLS and access control in front.
    #[arg(long)]
    pub insecure_bind_any: bool,
    #[command(flatten)]
    pub admin: super::AdminSocketArg,
}

/// One browser session.
struct Session {
    csrf: Zeroizing<String>,
}

/// The login token (until used) and the sessions it opened, keyed by the SHA-256 of the
/// session id (so that the map holds no secret, and a lookup compares digests).
struct Auth {
    login_token: Option<Zeroizing<String>>,
    sessions: HashMap<[u8; 32], Session>,
}

fn session_key(sid: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, sid.as_bytes());
    let mut key = [0u8; 32];
    key.copy_from_slice(d.as_ref());
    key
}

/// Everything a request handler needs.
pub(crate) struct Console {
    admin: AdminClient<Channel>,
    /// The `Host` values the console answers to; empty: any (`--insecure-bind-any`).
    hosts: Vec<String>,
    auth: Mutex<Auth>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("hosts", &self.hosts)
            .finish_non_exhaustive()
    }
}

fn random_token() -> Zeroizing<String> {
    let mut bytes = Zeroizing::new([0u8; 32]);
    rand::fill(&mut bytes[..]);
    Zeroizing::new(hex::encode(&bytes[..]))
}

/// Refuses a non-loopback address unless the flag allows it.
pub fn check_bind(addr: SocketAddr, insecure_bind_any: bool) -> anyhow::Result<()> {
    if addr.ip().is_loopback() || insecure_bind_any {
        return Ok(());
    }
    anyhow::bail!(
        "--bind-address {addr}: not a loopback address; the console can revoke identities, so it \
         listens on 127.0.0.1 or ::1 only, unless --insecure-bind-any is given"
    )
}

pub async fn run(args: ConsoleArgs) -> anyhow::Result<()> {
    check_bind(args.bind_address, args.insecure_bind_any)?;
    let admin = super::connect::admin_client(&args.admin.admin_socket).await?;
    // Fail now, not at the first page, when the socket is not the server's.
    admin
        .clone()
        .get_server_info(agentd_proto::admin::GetServerInfoRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("the admin API refused: {}", s.message()))?;
    let listener = tokio::net::TcpListener::bind(args.bind_address)
        .await
        .with_context(|| format!("--bind-address {}: cannot listen", args.bind_address))?;
    let bound = listener.local_addr()?;
    let hosts = if bound.ip().is_loopback() {
        let port = bound.port();
        let mut h = vec![bound.to_string(), format!("localhost:{port}")];
        if bound.is_ipv4() {
            h.push(format!("[::1]:{port}"));
        } else {
            h.push(format!("127.0.0.1:{port}"));
        }
        h
    } else {
        Vec::new()
    };
    let login = random_token();
    let url_host = if bound.ip().is_unspecified() {
        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), bound.port()).to_string()
    } else {
        bound.to_string()
    };
    // The first stdout line, as the design fixes it; nothing else goes to stdout.
    println!("http://{url_host}/?token={}", login.as_str());
    let console = Arc::new(Console {
        admin,
        hosts,
        auth: Mutex::new(Auth {
            login_token: Some(login),
            sessions: HashMap::new(),
        }),
    });
    eprintln!(
        "agentd console on http://{url_host}/ (admin socket {}); open the URL above. Ctrl-C stops it.",
        args.admin.admin_socket.display()
    );
    serve(listener, console).await
}

async fn serve(listener: tokio::net::TcpListener, console: Arc<Console>) -> anyhow::Result<()> {
    let mut conns = tokio::task::JoinSet::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = &mut ctrl_c => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            Ok(slot) = slots.clone().acquire_owned() => {
                let accepted = tokio::select! {
                    _ = &mut ctrl_c => break,
                    a = listener.accept() => a,
                };
                let (stream, _) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::debug!(error = %e, "accept failed");
                        continue;
                    }
                };
                let console = console.clone();
                conns.spawn(async move {
                    let _slot = slot;
                    let svc = hyper::service::service_fn(move |req| {
                        let console = console.clone();
                        async move { Ok::<_, Infallible>(handle(&console, req).await) }
                    });
                    let mut builder = hyper::server::conn::http1::Builder::new();
                    builder.timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT);
                    let served = builder.serve_connection(TokioIo::new(stream), svc);
                    // A bounded life, so that idle keep-alive connections give their slot back.
                    if let Ok(Err(e)) = tokio::time::timeout(CONNECTION_LIFETIME, served).await {
                        tracing::debug!(error = %e, "console connection error");
                    }
                });
            }
        }
    }
    conns.abort_all();
    Ok(())
}

/// A response with the headers every answer carries.
fn respond(status: StatusCode, content_type: &str, body: String) -> Response<String> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    let h = r.headers_mut();
    let set = |h: &mut hyper::HeaderMap, k: header::HeaderName, v: &str| {
        if let Ok(v) = header::HeaderValue::from_str(v) {
            h.insert(k, v);
        }
    };
    set(h, header::CONTENT_TYPE, content_type);
    set(h, header::CONTENT_SECURITY_POLICY, CSP);
    set(h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(h, header::X_FRAME_OPTIONS, "DENY");
    // Not no-referrer: with it, browsers send `Origin: null` on the console's own form
    // posts. same-origin still gives other sites no referrer.
    set(h, header::REFERRER_POLICY, "same-origin");
    set(h, header::CACHE_CONTROL, "no-store");
    r
}

fn html(status: StatusCode, body: String) -> Response<String> {
    respond(status, "text/html; charset=utf-8", body)
}

fn refusal(status: StatusCode, why: &str) -> Response<String> {
    html(status, pages::refusal(status, why))
}

fn redirect(to: &str, cookie: Option<&str>) -> Response<String> {
    let mut r = respond(
        StatusCode::SEE_OTHER,
        "text/plain; charset=utf-8",
        String::new(),
    );
    if let Ok(v) = header::HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    if let Some(c) = cookie.and_then(|c| header::HeaderValue::from_str(c).ok()) {
        r.headers_mut().insert(header::SET_COOKIE, c);
    }
    r
}

/// The query string's parameters (each name's last value).
fn query_params(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default()
}

fn cookie_session(req: &Request<Incoming>) -> Option<Zeroizing<String>> {
    req.headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| Zeroizing::new(v.to_string()))
}

/// The session's CSRF token, when the request carries a live session cookie.
fn session_csrf(console: &Console, req: &Request<Incoming>) -> Option<Zeroizing<String>> {
    let sid = cookie_session(req)?;
    let auth = console.auth.lock().ok()?;
    auth.sessions
        .get(&session_key(&sid))
        .map(|s| s.csrf.clone())
}

/// Spends the login token, when `offered` is it: a new session's cookie.
fn log_in(console: &Console, offered: &str) -> Option<Zeroizing<String>> {
    let mut auth = console.auth.lock().ok()?;
    let valid = auth
        .login_token
        .as_ref()
        .is_some_and(|t| crate::audit::key::constant_time_eq(t, offered));
    if !valid {
        return None;
    }
    auth.login_token = None;
    let sid = random_token();
    auth.sessions.insert(
        session_key(&sid),
        Session {
            csrf: random_token(),
        },
    );
    Some(Zeroizing::new(format!(
        "{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/",
        sid.as_str()
    )))
}

async fn handle(console: &Console, req: Request<Incoming>) -> Response<String> {
    // DNS rebinding: a page of another site that resolves its name to 127.0.0.1 sends its
    // own name as Host.
    if !console.hosts.is_empty() {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default();
        if !console.hosts.iter().any(|h| h == host) {
            return refusal(
                StatusCode::MISDIRECTED_REQUEST,
                "this console answers only to its own loopback address",
            );
        }
    }
    let path = req.uri().path().to_string();
    match path.as_str() {
        "/static/console.css" => {
            return respond(StatusCode::OK, "text/css; charset=utf-8", CSS.into())
        }
        "/static/console.js" => {
            return respond(StatusCode::OK, "text/javascript; charset=utf-8", JS.into())
        }
        "/static/icon.svg" | "/favicon.ico" => {
            return respond(StatusCode::OK, "image/svg+xml", ICON.into())
        }
        _ => {}
    }
    let mut query = query_params(&req);
    if let Some(offered) = query.remove("token").map(Zeroizing::new) {
        return match log_in(console, &offered) {
            // Always to the inventory: the path is the requester's, and `//host/` would be
            // a redirect to another site.
            Some(cookie) => redirect("/", Some(&cookie)),
            None => refusal(
                StatusCode::UNAUTHORIZED,
                "this login token is not valid (it works once; restart agentd console for a new one)",
            ),
        };
    }
    let Some(csrf) = session_csrf(console, &req) else {
        return refusal(
            StatusCode::UNAUTHORIZED,
            "not logged in: open the URL agentd console printed",
        );
    };
    let method = req.method().clone();
    let mut admin = console.admin.clone();
    let answer = match (&method, path.as_str()) {
        (&Method::GET | &Method::HEAD, "/") => pages::inventory(&mut admin, &query).await,
        (&Method::GET | &Method::HEAD, "/graph") => pages::graph(&mut admin).await,
        (&Method::GET | &Method::HEAD, "/audit") => pages::audit(&mut admin, &query).await,
        (&Method::GET | &Method::HEAD, "/revoke") => {
            pages::confirm_revoke(&mut admin, &query, &csrf).await
        }
        (&Method::GET | &Method::HEAD, "/revoked") => pages::revoked(&mut admin, &query).await,
        (&Method::GET | &Method::HEAD, p) if p.starts_with("/agent/") => {
            pages::agent(&mut admin, &p["/agent/".len()..]).await
        }
        (&Method::POST, "/revoke") => {
            let origin_ok = req_origin_ok(&req, &console.hosts);
            let form = match checked_form(origin_ok, req, &csrf).await {
                Ok(f) => f,
                Err(r) => return r,
            };
            // Post/redirect/get: reloading the result does not revoke again.
            return match pages::revoke(&mut admin, &form).await {
                Ok(sequence) => redirect(&format!("/revoked?sequence={sequence}"), None),
                Err(e) => html(e.status(), pages::refusal(e.status(), &e.to_string())),
            };
        }
        (_, "/" | "/graph" | "/audit" | "/revoke" | "/revoked") => {
            return refusal(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here")
        }
        _ => return refusal(StatusCode::NOT_FOUND, "no such page"),
    };
    match answer {
        Ok(body) => html(StatusCode::OK, body),
        Err(e) => html(e.status(), pages::refusal(e.status(), &e.to_string())),
    }
}

/// Whether the request's `Origin`, when it has one, is the console's own.
fn req_origin_ok(req: &Request<Incoming>, hosts: &[String]) -> bool {
    let Some(origin) = req.headers().get(header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let own = format!("http://{host}");
    origin == own && (hosts.is_empty() || hosts.iter().any(|h| *h == host))
}

/// A POSTed form, once its origin and CSRF token check out.
async fn checked_form(
    origin_ok: bool,
    req: Request<Incoming>,
    csrf: &str,
) -> Result<HashMap<String, String>, Response<String>> {
    if !origin_ok {
        return Err(refusal(
            StatusCode::FORBIDDEN,
            "cross-site request refused (its Origin is not this console)",
        ));
    }
    let body = tokio::time::timeout(
        BODY_TIMEOUT,
        http_body_util::Limited::new(req.into_body(), MAX_FORM).collect(),
    )
    .await
    .map_err(|_| refusal(StatusCode::REQUEST_TIMEOUT, "the form was not sent in time"))?
    .map_err(|_| refusal(StatusCode::PAYLOAD_TOO_LARGE, "form too large"))?
    .to_bytes();
    let mut form: HashMap<String, String> =
        url::form_urlencoded::parse(&body).into_owned().collect();
    let offered = Zeroizing::new(form.remove("csrf").unwrap_or_default());
    if offered.is_empty() || !crate::audit::key::constant_time_eq(&offered, csrf) {
        return Err(refusal(
            StatusCode::FORBIDDEN,
            "missing or wrong CSRF token: state-changing requests come from the console's own pages",
        ));
    }
    Ok(form)
}

/// Why a page could not be shown.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum PageError {
    /// The admin API refused or failed.
    #[error("the admin API said: {0}")]
    Admin(#[from] tonic::Status),
    /// A parameter of the request is missing or malformed.
    #[error("{field}: {reason}")]
    BadRequest { field: &'static str, reason: String },
}

impl PageError {
    fn status(&self) -> StatusCode {
        match self {
            Self::Admin(s) => match s.code() {
                tonic::Code::NotFound => StatusCode::NOT_FOUND,
                tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => {
                    StatusCode::BAD_REQUEST
                }
                tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
                _ => StatusCode::BAD_GATEWAY,
            },
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_binds_without_the_insecure_flag() {
        assert!(check_bind("127.0.0.1:0".parse().unwrap(), false).is_ok());
        assert!(check_bind("[::1]:8080".parse().unwrap(), false).is_ok());
        let e = check_bind("0.0.0.0:8080".parse().unwrap(), false).unwrap_err();
        assert!(e.to_string().contains("--insecure-bind-any"), "{e}");
        assert!(check_bind("0.0.0.0:8080".parse().unwrap(), true).is_ok());
    }

    #[test]
    fn the_csp_allows_nothing_from_elsewhere() {
        assert!(CSP.contains("default-src 'none'"));
        assert!(!CSP.contains("unsafe-inline") && !CSP.contains("http"));
    }
}
