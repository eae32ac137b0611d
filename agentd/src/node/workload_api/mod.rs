//! The SPIFFE Workload API, served by the node agent on its Unix socket
//! (SPIFFE Workload API spec; X509-SVID and JWT-SVID profiles).
//!
//! - Every call must carry `workload.spiffe.io: true`, else InvalidArgument (spec 5.2).
//! - The caller is identified out of band, by the socket's peer credentials, and attested
//!   into selectors; entries whose selectors are all among them give its identities.
//! - A caller with no identity gets PermissionDenied "no identity issued".
//! - Streams send their first message at once and a full snapshot on every change.
//! - The socket also serves `grpc.health.v1.Health` for `agentd healthcheck`.
//!
//! Long on purpose: the five `SpiffeWorkloadAPI` calls share their attestation, readiness and
//! stream helpers, and the spec's per-call rules read best side by side. The delegation
//! service is in `delegation.rs`; the claims conversion in `claims.rs`.

pub mod claims;
mod delegation;
pub mod limit;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use agentd_attestor::workload::{ConnectionFacts, PeerCredentials, WorkloadAttestors};
use agentd_attestor::Selector;
use agentd_proto::agentd_workload as apb;
use agentd_proto::agentd_workload::revocations_server::{Revocations, RevocationsServer};
use agentd_proto::agentd_workload::selectors_server::{Selectors, SelectorsServer};
use agentd_proto::node as npb;
use agentd_proto::workload as pb;
use agentd_proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use futures::Stream;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::clock::{from_unix_seconds, Clock};
use crate::node::cache::{Cache, CachedJwtSvid, WorkloadView};
use crate::node::client::ServerLink;
use crate::node::revocations::NodeRevocations;
use crate::node::NodeError;
use crate::revocation::feed::{feed_stream, EventSource, FeedStream, HEARTBEAT};
use crate::telemetry::NodeMetrics;

/// The message PermissionDenied carries when the caller has no identity; clients key off it.
pub const NO_IDENTITY: &str = "no identity issued";
/// How long a new stream waits for SVIDs of entries that match but are still being minted.
const MINT_WAIT: Duration = Duration::from_secs(10);
/// How long a stream about to end with "no identity issued" waits for the revocation feed to
/// say why (the sync may drop a revoked entry first).
const REVOCATION_GRACE: Duration = Duration::from_secs(1);

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// What the kernel told us about a Workload API connection when it was accepted.
#[derive(Debug, Clone, Default)]
pub struct WorkloadConnInfo {
    /// SO_PEERCRED: the process that connected.
    pub peer: Option<PeerCredentials>,
    /// The accept time (a process that started later is not the one that connected: its
    /// pid was reused) and the binary the process ran then (one that has `exec`ed since
    /// is refused): checked at every call on the connection.
    pub connection: ConnectionFacts,
}

/// A Workload API connection as the HTTP/2 server sees it: any `:authority` accepted (see
/// `net::authority`), with what the kernel said about the peer.
type WorkloadConn = crate::net::ConnWithInfo<
    crate::net::authority::AuthorityRewrite<tokio::net::UnixStream>,
    WorkloadConnInfo,
>;

/// Records what the kernel says about a Workload API connection as it is accepted (before
/// anything is read from it).
fn accept_workload_conn(
    attestors: &WorkloadAttestors,
    inner: tokio::net::UnixStream,
) -> WorkloadConn {
    let peer = inner.peer_cred().ok().map(|c| PeerCredentials {
        pid: c.pid(),
        uid: c.uid(),
        gid: c.gid(),
    });
    let connection = peer
        .map(|p| attestors.observe_connection(&p))
        .unwrap_or_default();
    crate::net::ConnWithInfo::new(
        crate::net::authority::AuthorityRewrite::new(inner),
        WorkloadConnInfo { peer, connection },
    )
}

/// Binds the Workload API socket. Like SPIRE's, it is connectable by every local user: the
/// caller is identified by its peer credentials, not by who may open the socket.
pub fn bind_socket(path: &Path) -> Result<UnixListener, NodeError> {
    let err = |source| NodeError::Io {
        what: "workload API socket",
        path: path.display().to_string(),
        source,
    };
    if let Some(parent) = path.parent() {
        crate::net::check_socket_dir(parent).map_err(|r| err(std::io::Error::other(r)))?;
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    crate::net::clear_socket_path(path).map_err(err)?;
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777)).map_err(err)?;
    Ok(listener)
}

#[derive(Debug, Clone)]
pub struct WorkloadApi {
    cache: Arc<Cache>,
    link: Arc<ServerLink>,
    clock: Arc<dyn Clock>,
    attestors: Arc<WorkloadAttestors>,
    revocations: Arc<NodeRevocations>,
    metrics: Arc<NodeMetrics>,
    /// JWT-SVID mints (cache misses) per entry.
    jwt_mints: Arc<limit::MintLimiter>,
    /// Attestations that hash a binary, at most [`HASHES_AT_ONCE`] at a time.
    hashing: Arc<tokio::sync::Semaphore>,
}

/// Attestations that may hash a binary at once. When a hundred agent runtimes of one new
/// binary connect together, one or two hash it and the rest find it cached, rather than a
/// blocking thread (and its allocator arena) each hashing the same file.
const HASHES_AT_ONCE: usize = 2;

impl WorkloadApi {
    pub fn new(
        cache: Arc<Cache>,
        link: Arc<ServerLink>,
        clock: Arc<dyn Clock>,
        attestors: Arc<WorkloadAttestors>,
        revocations: Arc<NodeRevocations>,
    ) -> Self {
        Self {
            cache,
            link,
            clock,
            attestors,
            revocations,
            metrics: Arc::new(NodeMetrics::new()),
            jwt_mints: Arc::new(limit::MintLimiter::default()),
            hashing: Arc::new(tokio::sync::Semaphore::new(HASHES_AT_ONCE)),
        }
    }

    /// Limits JWT-SVID mints per entry with `limiter` instead of the default.
    pub fn with_jwt_mint_limit(mut self, limiter: limit::MintLimiter) -> Self {
        self.jwt_mints = Arc::new(limiter);
        self
    }

    /// Records the calls' latency and open streams in `metrics` (the node agent's).
    pub fn with_metrics(mut self, metrics: Arc<NodeMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Healthy: synced, caught up with the revocation feed, and the feed heard from within
    /// its timeout.
    fn healthy(&self) -> bool {
        self.cache.is_ready()
            && self.revocations.caught_up()
            && self.revocations.connected(std::time::Instant::now())
    }

    pub async fn serve(
        self,
        listener: UnixListener,
        stop: CancellationToken,
    ) -> Result<(), NodeError> {
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        let api = self.clone();
        let watch_stop = stop.clone();
        tokio::spawn(async move {
            let mut rx = api.cache.subscribe();
            let mut feed = api.revocations.subscribe();
            let mut last = None;
            loop {
                let healthy = api.healthy();
                if last != Some(healthy) {
                    if !healthy && last.is_some() {
                        tracing::warn!(
                            "node agent unhealthy: not synced, or the revocation feed is lost"
                        );
                    }
                    let status = if healthy {
                        tonic_health::ServingStatus::Serving
                    } else {
                        tonic_health::ServingStatus::NotServing
                    };
                    reporter.set_service_status("", status).await;
                    last = Some(healthy);
                }
                // Feed silence is a matter of time, so look again every second too.
                tokio::select! {
                    _ = watch_stop.cancelled() => return,
                    changed = rx.changed() => if changed.is_err() { return },
                    changed = feed.changed() => if changed.is_err() { return },
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
        let incoming = {
            use tokio_stream::StreamExt as _;
            let attestors = self.attestors.clone();
            tokio_stream::wrappers::UnixListenerStream::new(listener)
                .map(move |conn| conn.map(|c| accept_workload_conn(&attestors, c)))
        };
        let selectors = SelectorsServer::new(SelectorsService { api: self.clone() });
        let revocations = RevocationsServer::new(RevocationsService {
            api: self.clone(),
            stop: stop.clone(),
        });
        let rpc_metrics = self.metrics.rpc_layer();
        let delegation = delegation::service(self.clone());
        tonic::transport::Server::builder()
            .trace_fn(rpc_span)
            .layer(rpc_metrics)
            .add_service(SpiffeWorkloadApiServer::new(self))
            .add_service(selectors)
            .add_service(revocations)
            .add_service(delegation)
            .add_service(health)
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await
            .map_err(|e| NodeError::Server(format!("workload API stopped: {e}")))
    }

    /// Selectors for the caller, from its peer credentials and a /proc snapshot checked
    /// against the connection's accept time. Attestation is a few small /proc and /etc
    /// reads, done in place; only hashing a binary seen for the first time goes to the
    /// blocking pool (a hop there cost more than the reads themselves).
    async fn attest<T>(&self, req: &Request<T>) -> Result<Vec<Selector>, Status> {
        Ok(self.attest_explained(req).await?.selectors)
    }

    /// As [`Self::attest`], with the attestors' notes on the selectors they left out.
    async fn attest_explained<T>(
        &self,
        req: &Request<T>,
    ) -> Result<agentd_attestor::workload::Attestation, Status> {
        let info = req
            .extensions()
            .get::<WorkloadConnInfo>()
            .cloned()
            .unwrap_or_default();
        let peer = info
            .peer
            .ok_or_else(|| Status::internal("no peer credentials on the connection"))?;
        let result = match self
            .attestors
            .attest_connection_without_blocking(&peer, &info.connection)
        {
            Err(agentd_attestor::workload::AttestError::WouldBlock { .. }) => {
                // Owned, and moved into the blocking task below: a client that resets its
                // stream drops this future, but the hash it started runs on and keeps its turn.
                let turn = self
                    .hashing
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|e| Status::internal(format!("attestation: {e}")))?;
                // Whoever held the turn before may have hashed this very binary.
                match self
                    .attestors
                    .attest_connection_without_blocking(&peer, &info.connection)
                {
                    Err(agentd_attestor::workload::AttestError::WouldBlock { .. }) => {
                        let attestors = self.attestors.clone();
                        tokio::task::spawn_blocking(move || {
                            let _turn = turn;
                            attestors.attest_connection_explained(&peer, &info.connection)
                        })
                        .await
                        .map_err(|e| Status::internal(format!("attestation task: {e}")))?
                    }
                    done => done,
                }
            }
            done => done,
        };
        match result {
            Ok(a) => {
                tracing::debug!(pid = ?peer.pid, uid = peer.uid, selectors = ?a.selectors.iter().map(ToString::to_string).collect::<Vec<_>>(), "workload attested");
                Ok(a)
            }
            Err(e) => {
                tracing::warn!(pid = ?peer.pid, uid = peer.uid, reason = %e, "workload attestation failed");
                Err(Status::permission_denied(NO_IDENTITY))
            }
        }
    }

    fn ready(&self) -> Result<(), Status> {
        if !self.cache.is_ready() {
            return Err(Status::unavailable(
                "node agent is not ready: not yet synced with the server",
            ));
        }
        // Revocations made while this node agent was away are applied before it serves.
        if !self.revocations.caught_up() {
            return Err(Status::unavailable(
                "node agent is not ready: catching up with the revocation feed",
            ));
        }
        if self.revocations.fail_closed && !self.revocations.connected(std::time::Instant::now()) {
            return Err(Status::unavailable(
                "node agent has lost the revocation feed (fail_closed is set)",
            ));
        }
        Ok(())
    }

    /// The caller's view, waiting briefly when entries match but their SVIDs are still
    /// being minted.
    async fn view_with_svids(&self, selectors: &[Selector]) -> WorkloadView {
        let mut rx = self.cache.subscribe();
        let deadline = tokio::time::Instant::now() + MINT_WAIT;
        loop {
            let view = self.cache.view_for(selectors, self.clock.now());
            if !view.svids.is_empty() || view.entries.is_empty() {
                return view;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return view;
            }
        }
    }
}

/// One span per Workload API call: the method and the calling process (pid, uid). Made
/// with every field at once: each later `record` would format the span's fields again, on
/// a path taken at machine speed.
fn rpc_span(req: &tonic::codegen::http::Request<()>) -> tracing::Span {
    let rpc = crate::telemetry::rpc::rpc_name(req.uri().path());
    let peer = req
        .extensions()
        .get::<WorkloadConnInfo>()
        .and_then(|i| i.peer.as_ref());
    match peer {
        Some(PeerCredentials {
            pid: Some(pid),
            uid,
            ..
        }) => tracing::info_span!("rpc", api = "workload", rpc, pid, uid),
        Some(PeerCredentials { uid, .. }) => {
            tracing::info_span!("rpc", api = "workload", rpc, uid)
        }
        None => tracing::info_span!("rpc", api = "workload", rpc),
    }
}

/// Spec 5.2: the security header must be present with the value `true`.
fn check_header<T>(req: &Request<T>) -> Result<(), Status> {
    match req.metadata().get(agentd_proto::WORKLOAD_HEADER) {
        Some(v) if v.as_bytes() == b"true" => Ok(()),
        _ => Err(Status::invalid_argument(
            "security header missing from request: workload.spiffe.io: true",
        )),
    }
}

/// What identifies a bundles snapshot: our own bundle and the federated ones.
type BundlesKey = (Vec<u8>, Vec<(String, u64)>);
type JwtBundlesKey = (String, Vec<(String, u64)>);

fn x509_response(view: &WorkloadView) -> Option<pb::X509svidResponse> {
    let bundle = view.bundle.as_ref()?;
    if view.svids.is_empty() || bundle.x509_authorities.is_empty() {
        return None;
    }
    let bundle_der = bundle.x509_der_concat();
    Some(pb::X509svidResponse {
        svids: view
            .svids
            .iter()
            .map(|s| pb::X509svid {
                spiffe_id: s.spiffe_id.to_string(),
                x509_svid: s.chain.concat(),
                x509_svid_key: s.key.pkcs8_der().to_vec(),
                bundle: bundle_der.clone(),
                hint: s.hint.clone(),
            })
            .collect(),
        crl: vec![],
        federated_bundles: federated_x509(&view.federated),
    })
}

/// The federated X.509 bundles, keyed by trust domain ID (`spiffe://partner.example`, as
/// SPIRE sends them); a bundle without X.509 authorities is left out, never sent empty.
fn federated_x509(bundles: &[Arc<crate::bundle::Bundle>]) -> HashMap<String, Vec<u8>> {
    bundles
        .iter()
        .filter(|b| !b.x509_authorities.is_empty())
        .map(|b| (b.trust_domain.id_string(), b.x509_der_concat()))
        .collect()
}

/// The federated JWT bundles (JWKS), keyed as [`federated_x509`]; one without JWT
/// authorities is left out.
fn federated_jwt(bundles: &[Arc<crate::bundle::Bundle>]) -> HashMap<String, Vec<u8>> {
    bundles
        .iter()
        .filter(|b| !b.jwt_authorities.is_empty())
        .map(|b| (b.trust_domain.id_string(), b.jwt_jwks_json().into_bytes()))
        .collect()
}

/// What tells federated bundles apart: each trust domain with a digest of its keys (a
/// bundle set by hand may keep its sequence number while its keys change).
fn federated_fingerprint(bundles: &[Arc<crate::bundle::Bundle>]) -> Vec<(String, u64)> {
    use std::hash::{Hash as _, Hasher as _};
    bundles
        .iter()
        .map(|b| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            b.x509_authorities.hash(&mut h);
            for a in &b.jwt_authorities {
                a.key_id.hash(&mut h);
                a.public_key_spki_der.hash(&mut h);
            }
            b.sequence.hash(&mut h);
            (b.trust_domain.as_str().to_string(), h.finish())
        })
        .collect()
}

/// What identifies one X.509 snapshot, to send only on change.
type X509Fingerprint = (Vec<String>, u64, usize, Vec<(String, u64)>);

fn x509_fingerprint(view: &WorkloadView) -> X509Fingerprint {
    (
        view.svids.iter().map(|s| s.serial.clone()).collect(),
        view.bundle.as_ref().map(|b| b.sequence).unwrap_or(0),
        view.bundle
            .as_ref()
            .map(|b| b.x509_authorities.len())
            .unwrap_or(0),
        federated_fingerprint(&view.federated),
    )
}

/// A watch stream: `first`, then a new snapshot from `next` whenever the cache changes and
/// the snapshot differs (`next` gives `None` when there is nothing to send yet); it ends
/// when `next` says to end. It runs inside the HTTP/2 stream's own task, so a call costs no
/// task or channel of its own, the first message goes out with the response headers, and a
/// client that hangs up drops it.
fn watch_stream<T, K, F>(cache: Arc<Cache>, first: T, first_key: K, next: F) -> ResponseStream<T>
where
    T: Send + 'static,
    K: PartialEq + Send + 'static,
    F: FnMut() -> Result<Option<(T, K)>, Status> + Send + 'static,
{
    let mut changes = cache.subscribe();
    changes.mark_unchanged();
    let watch = Watch {
        changes,
        last: first_key,
        next,
        ending: None,
        ended: false,
    };
    let rest = futures::stream::unfold(watch, |mut watch| async move {
        let item = watch.next_item().await?;
        Some((item, watch))
    });
    Box::pin(futures::StreamExt::chain(
        futures::stream::once(std::future::ready(Ok(first))),
        rest,
    ))
}

/// The state of a [`watch_stream`] stream after its first message.
struct Watch<K, F> {
    changes: tokio::sync::watch::Receiver<u64>,
    last: K,
    next: F,
    /// The error to end with, after the message just sent.
    ending: Option<Status>,
    ended: bool,
}

impl<T, K, F> Watch<K, F>
where
    K: PartialEq,
    F: FnMut() -> Result<Option<(T, K)>, Status>,
{
    /// The next message to send, or `None` when the stream is over.
    async fn next_item(&mut self) -> Option<Result<T, Status>> {
        if self.ended {
            return None;
        }
        if let Some(status) = self.ending.take() {
            self.ended = true;
            return Some(Err(status));
        }
        loop {
            if self.changes.changed().await.is_err() {
                return None;
            }
            match (self.next)() {
                Ok(None) => {}
                Ok(Some((msg, key))) => {
                    if key != self.last {
                        self.last = key;
                        return Some(Ok(msg));
                    }
                }
                Err(status) => match self.revocation_grace(status).await {
                    Grace::Send(msg, ending) => {
                        self.ending = ending;
                        return Some(Ok(msg));
                    }
                    Grace::Carry => {}
                    Grace::End(status) => {
                        self.ended = true;
                        return Some(Err(status));
                    }
                },
            }
        }
    }

    /// The sync can drop a revoked entry a moment before the revocation feed says why: a
    /// bare "no identity issued" waits up to [`REVOCATION_GRACE`] for the feed, so the stream
    /// ends naming the revocation, or carries on if the identity comes back.
    async fn revocation_grace(&mut self, mut status: Status) -> Grace<T> {
        if status.code() != tonic::Code::PermissionDenied || status.message() != NO_IDENTITY {
            return Grace::End(status);
        }
        let deadline = tokio::time::Instant::now() + REVOCATION_GRACE;
        let mut back = None;
        while status.message() == NO_IDENTITY {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                changed = self.changes.changed() => if changed.is_err() { break },
            }
            match (self.next)() {
                Err(later) => status = later,
                // The identity is back (or being minted): carry on.
                Ok(Some((msg, key))) => {
                    if key != self.last {
                        self.last = key;
                        back = Some(msg);
                    }
                    break;
                }
                Ok(None) => break,
            }
        }
        let ends = status.message() != NO_IDENTITY || tokio::time::Instant::now() >= deadline;
        match (back, ends) {
            (Some(msg), ends) => Grace::Send(msg, ends.then_some(status)),
            (None, true) => Grace::End(status),
            (None, false) => Grace::Carry,
        }
    }
}

/// What the revocation grace decided.
enum Grace<T> {
    /// Send this message, then end with the error if there is one.
    Send(T, Option<Status>),
    /// Nothing to send: wait for the next change.
    Carry,
    /// End the stream with this error.
    End(Status),
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = ResponseStream<pb::X509svidResponse>;
    type FetchX509BundlesStream = ResponseStream<pb::X509BundlesResponse>;
    type FetchJWTBundlesStream = ResponseStream<pb::JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        check_header(&request)?;
        let selectors = self.attest(&request).await?;
        self.ready()?;
        let view = self.view_with_svids(&selectors).await;
        let first = x509_response(&view).ok_or_else(|| Status::permission_denied(NO_IDENTITY))?;
        self.cache
            .note_fetched(view.svids.iter().map(|s| s.entry_id.clone()));
        let key = x509_fingerprint(&view);
        let cache = self.cache.clone();
        let clock = self.clock.clone();
        let api = self.clone();
        let mut served: Vec<String> = view.svids.iter().map(|s| s.entry_id.clone()).collect();
        let stream = watch_stream(self.cache.clone(), first, key, move || {
            api.ready()?;
            let view = cache.view_for(&selectors, clock.now());
            match x509_response(&view) {
                Some(msg) => {
                    served = view.svids.iter().map(|s| s.entry_id.clone()).collect();
                    // A rotated SVID pushed on a stream is a fetch too. Noted even when the
                    // snapshot is unchanged: the workload still holds and uses them.
                    cache.note_fetched(view.svids.iter().map(|s| s.entry_id.clone()));
                    Ok(Some((msg, x509_fingerprint(&view))))
                }
                // A revoked SVID was dropped and its replacement is being minted: the next
                // change brings it.
                None if view.reminting => Ok(None),
                // Every identity is gone (entry deleted or revoked, expired): say so, and by
                // which revocation if one is the reason, and end the stream. Clients match
                // the "no identity issued" prefix, so it stays first.
                None => Err(Status::permission_denied(
                    match cache.revoked_reason(served.iter().map(String::as_str)) {
                        Some(why) => format!("{NO_IDENTITY}: {why}"),
                        None => NO_IDENTITY.to_string(),
                    },
                )),
            }
        });
        Ok(Response::new(stream))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        check_header(&request)?;
        self.ready()?;
        // Our own bundle goes to any caller; federated ones only to a caller whose entries
        // federate with them (an unattested caller gets none).
        let selectors = self.attest(&request).await.unwrap_or_default();
        let make = move |cache: &Cache| -> Result<(pb::X509BundlesResponse, BundlesKey), Status> {
            let bundle = cache
                .bundle()
                .filter(|b| !b.x509_authorities.is_empty())
                .ok_or_else(|| Status::unavailable("no trust bundle yet"))?;
            let federated = cache.federated_for_selectors(&selectors);
            let der = bundle.x509_der_concat();
            let mut bundles = federated_x509(&federated);
            bundles.insert(bundle.trust_domain.id_string(), der.clone());
            Ok((
                pb::X509BundlesResponse {
                    crl: vec![],
                    bundles,
                },
                (der, federated_fingerprint(&federated)),
            ))
        };
        let (first, key) = make(&self.cache)?;
        let cache = self.cache.clone();
        Ok(Response::new(watch_stream(
            self.cache.clone(),
            first,
            key,
            move || make(&cache).map(Some),
        )))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        check_header(&request)?;
        let selectors = self.attest(&request).await?;
        self.ready()?;
        let req = request.into_inner();
        if req.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        crate::svid::audience::validate_audience(&req.audience)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let wanted = if req.spiffe_id.is_empty() {
            None
        } else {
            Some(
                spiffe::SpiffeId::new(&req.spiffe_id)
                    .map_err(|e| Status::invalid_argument(format!("spiffe_id: {e}")))?,
            )
        };
        let now = self.clock.now();
        let entries: Vec<_> = self
            .cache
            .view_for(&selectors, now)
            .entries
            .into_iter()
            .filter(|e| wanted.as_ref().is_none_or(|w| *w == e.spiffe_id))
            .collect();
        if entries.is_empty() {
            return Err(Status::permission_denied(NO_IDENTITY));
        }
        let mut svids = Vec::with_capacity(entries.len());
        for e in entries {
            let token = match self.cache.jwt(&e.id, &req.audience, now) {
                Some(t) => t,
                None => {
                    self.jwt_mints.take(&e.id, now).map_err(|wait| {
                        Status::resource_exhausted(format!(
                            "too many new JWT-SVIDs for {} (at most {} at once, then {} a \
                             second, per identity); cached audiences are served freely; \
                             retry in {} ms",
                            e.spiffe_id,
                            self.jwt_mints.burst(),
                            self.jwt_mints.per_second(),
                            wait.as_millis().max(1)
                        ))
                    })?;
                    let mut client = self.link.client().await.map_err(|e| {
                        Status::unavailable(format!(
                            "cannot reach the server to mint a JWT-SVID: {e}"
                        ))
                    })?;
                    let on = self.link.position();
                    let resp = client
                        .mint_jwt_svid(npb::MintJwtSvidRequest {
                            entry_id: e.id.clone(),
                            audience: req.audience.clone(),
                            grant_id: String::new(),
                        })
                        .await
                        .map_err(|s| {
                            if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown) {
                                // The server is gone or cannot serve (its database): the
                                // next call goes to the next address.
                                let link = self.link.clone();
                                tokio::spawn(async move { link.fail_over(on).await });
                            }
                            Status::unavailable(format!(
                                "minting a JWT-SVID failed: {}",
                                s.message()
                            ))
                        })?
                        .into_inner();
                    self.cache.put_jwt(
                        &e.id,
                        &req.audience,
                        CachedJwtSvid {
                            token: resp.token.clone(),
                            issued_at: now,
                            expires_at: from_unix_seconds(resp.expires_at),
                        },
                    );
                    resp.token
                }
            };
            self.cache.note_fetched([e.id.clone()]);
            svids.push(pb::Jwtsvid {
                spiffe_id: e.spiffe_id.to_string(),
                svid: token,
                hint: e.hint.clone(),
            });
        }
        Ok(Response::new(pb::JwtsvidResponse { svids }))
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        check_header(&request)?;
        self.ready()?;
        let selectors = self.attest(&request).await.unwrap_or_default();
        let make = move |cache: &Cache| -> Result<(pb::JwtBundlesResponse, JwtBundlesKey), Status> {
            let bundle = cache
                .bundle()
                .ok_or_else(|| Status::unavailable("no trust bundle yet"))?;
            let federated = cache.federated_for_selectors(&selectors);
            let jwks = bundle.jwt_jwks_json();
            let mut bundles = federated_jwt(&federated);
            bundles.insert(bundle.trust_domain.id_string(), jwks.clone().into_bytes());
            Ok((
                pb::JwtBundlesResponse { bundles },
                (jwks, federated_fingerprint(&federated)),
            ))
        };
        let (first, key) = make(&self.cache)?;
        let cache = self.cache.clone();
        Ok(Response::new(watch_stream(
            self.cache.clone(),
            first,
            key,
            move || make(&cache).map(Some),
        )))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        check_header(&request)?;
        self.ready()?;
        let req = request.into_inner();
        if req.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if req.svid.is_empty() {
            return Err(Status::invalid_argument("svid must be specified"));
        }
        let bundle = self
            .cache
            .bundle()
            .ok_or_else(|| Status::unavailable("no trust bundle yet"))?;
        let validated =
            crate::svid::jwt::validate(&req.svid, &req.audience, &bundle, self.clock.now())
                .map_err(|e| Status::invalid_argument(format!("invalid JWT-SVID: {e}")))?;
        // Revoked by the feed: by its own jti, or under a handle (entry, node, grant, task)
        // the server resolved to it.
        if let Some(jti) = validated.claims.get("jti").and_then(|v| v.as_str()) {
            if self.revocations.is_jwt_revoked(jti) {
                return Err(Status::invalid_argument("invalid JWT-SVID: revoked"));
            }
        }
        Ok(Response::new(pb::ValidateJwtsvidResponse {
            spiffe_id: validated.spiffe_id.to_string(),
            claims: Some(claims::to_struct(validated.claims)),
        }))
    }
}

/// `agentd.workload.v1.Selectors`: shows a caller how it was attested.
#[derive(Debug, Clone)]
pub struct SelectorsService {
    api: WorkloadApi,
}

#[tonic::async_trait]
impl Selectors for SelectorsService {
    async fn get_selectors(
        &self,
        request: Request<apb::GetSelectorsRequest>,
    ) -> Result<Response<apb::GetSelectorsResponse>, Status> {
        check_header(&request)?;
        let attested = self.api.attest_explained(&request).await?;
        let view = self
            .api
            .cache
            .view_for(&attested.selectors, self.api.clock.now());
        Ok(Response::new(apb::GetSelectorsResponse {
            selectors: attested
                .selectors
                .iter()
                .map(|s| apb::Selector {
                    r#type: s.kind().to_string(),
                    value: s.value().to_string(),
                })
                .collect(),
            spiffe_ids: view
                .entries
                .iter()
                .map(|e| e.spiffe_id.to_string())
                .collect(),
            notes: attested.notes,
        }))
    }
}

/// `agentd.workload.v1.Revocations`: the revocations this node agent applied, for local
/// relying parties. `Watch` needs an attested caller (one this node serves an identity):
/// the events name every revoked handle and reason in the fleet, which is not for any local
/// user to read. `FetchCrls` needs the header only (CRLs are published to relying parties
/// anyway).
#[derive(Debug, Clone)]
pub struct RevocationsService {
    api: WorkloadApi,
    stop: CancellationToken,
}

#[tonic::async_trait]
impl Revocations for RevocationsService {
    type WatchStream = FeedStream;

    async fn watch(
        &self,
        request: Request<agentd_proto::revocation::WatchRevocationsRequest>,
    ) -> Result<Response<FeedStream>, Status> {
        check_header(&request)?;
        let selectors = self.api.attest(&request).await?;
        self.api.ready()?;
        if self
            .api
            .cache
            .view_for(&selectors, self.api.clock.now())
            .entries
            .is_empty()
        {
            return Err(Status::permission_denied(format!(
                "{NO_IDENTITY}: watching revocations needs a caller with an identity on this node"
            )));
        }
        Ok(Response::new(feed_stream(
            self.api.revocations.clone(),
            request.get_ref().after_sequence,
            HEARTBEAT,
            self.api.clock.clone(),
            self.stop.clone(),
        )))
    }

    async fn fetch_crls(
        &self,
        request: Request<agentd_proto::revocation::FetchCrlsRequest>,
    ) -> Result<Response<agentd_proto::revocation::FetchCrlsResponse>, Status> {
        check_header(&request)?;
        let mut client = self
            .api
            .link
            .client()
            .await
            .map_err(|e| Status::unavailable(format!("server: {e}")))?;
        // The server's answer is passed on as it is: same message on both sockets.
        let crls = client
            .fetch_crls(agentd_proto::revocation::FetchCrlsRequest {})
            .await
            .map_err(|s| Status::unavailable(format!("server: {}", s.message())))?;
        Ok(crls)
    }
}

#[cfg(test)]
mod tests;
