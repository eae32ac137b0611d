//! The admin API, served on the server's Unix socket for the CLI. Requests carry raw strings;
//! every field is parsed here and a bad one is named in the error.

use std::collections::BTreeSet;
use std::sync::Arc;

use agentd_attestor::Selector;
use agentd_proto::admin as pb;
use agentd_proto::admin::admin_server::{Admin, AdminServer};
use agentd_proto::revocation as rpb;
use spiffe::SpiffeId;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

use super::node_api::join_token_digest;
use super::ownership::{self, EntryStatus, LifecycleFilter};
use super::{ServerError, ServerState};
use crate::audit::{Actor, AuditError, AuditQuery, AuditRecord, SealedAuditRecord};
use crate::clock::unix_seconds;
use crate::datastore::{
    AttestedNode, DataStoreError, Entry, EntryFilter, EntryId, EntrySpec, JoinToken,
};
use crate::revocation::log::RevocationLogError;
use crate::revocation::{event_to_proto, RevocationError, RevocationHandle};
use crate::ttl::Ttl;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{field}: {reason}")]
    InvalidField { field: String, reason: String },
    #[error("entry {0} not found")]
    EntryNotFound(String),
    #[error("node {0} not found")]
    NodeNotFound(String),
    #[error("an identical entry exists: {0}")]
    DuplicateEntry(String),
    #[error("store: {0}")]
    Store(String),
    /// The change was made but its audit record could not be written.
    #[error("audit log: {0}")]
    Audit(String),
    #[error(transparent)]
    Revocation(#[from] RevocationError),
    #[error(transparent)]
    Ca(#[from] crate::ca::CaError),
}

impl From<RevocationLogError> for AdminError {
    fn from(e: RevocationLogError) -> Self {
        match e {
            RevocationLogError::Revocation(e) => AdminError::Revocation(e),
            RevocationLogError::Store(e) => e.into(),
        }
    }
}

impl From<AuditError> for AdminError {
    fn from(e: AuditError) -> Self {
        AdminError::Audit(e.to_string())
    }
}

impl From<DataStoreError> for AdminError {
    fn from(e: DataStoreError) -> Self {
        match e {
            DataStoreError::EntryNotFound { id } => AdminError::EntryNotFound(id),
            DataStoreError::NodeNotFound { spiffe_id } => AdminError::NodeNotFound(spiffe_id),
            DataStoreError::DuplicateEntry { id } => AdminError::DuplicateEntry(id),
            other => AdminError::Store(other.to_string()),
        }
    }
}

impl From<AdminError> for Status {
    fn from(e: AdminError) -> Self {
        let msg = e.to_string();
        match e {
            AdminError::InvalidField { .. } => Status::invalid_argument(msg),
            AdminError::EntryNotFound(_) | AdminError::NodeNotFound(_) => Status::not_found(msg),
            AdminError::DuplicateEntry(_) => Status::already_exists(msg),
            AdminError::Store(_) | AdminError::Audit(_) => Status::internal(msg),
            AdminError::Revocation(e) => match e {
                RevocationError::InvalidField { .. } => Status::invalid_argument(msg),
                RevocationError::AlreadyRevoked { .. } => Status::already_exists(msg),
                RevocationError::NotStanding { .. }
                | RevocationError::UnknownSerial { .. }
                | RevocationError::UnknownEntry { .. } => Status::not_found(msg),
                RevocationError::Refused(_) => Status::failed_precondition(msg),
            },
            AdminError::Ca(e) => {
                use crate::ca::CaError;
                match e {
                    CaError::UnknownAuthority { .. } => Status::not_found(msg),
                    CaError::ActiveAuthority { .. }
                    | CaError::AlreadyPrepared { .. }
                    | CaError::NothingPrepared
                    | CaError::Expired { .. } => Status::failed_precondition(msg),
                    CaError::InvalidSerial { .. } => Status::invalid_argument(msg),
                    _ => Status::internal(msg),
                }
            }
        }
    }
}

fn invalid(field: impl Into<String>, reason: impl std::fmt::Display) -> AdminError {
    AdminError::InvalidField {
        field: field.into(),
        reason: reason.to_string(),
    }
}

#[derive(Debug, Clone)]
pub struct AdminApi {
    state: Arc<ServerState>,
}

pub async fn serve(
    state: Arc<ServerState>,
    listener: UnixListener,
    stop: CancellationToken,
) -> Result<(), ServerError> {
    // Only the server's own user (and root) may administer it, whatever the socket's mode
    // or the directory it sits in.
    let own_uid = crate::net::own_uid();
    let incoming = {
        use tokio_stream::StreamExt as _;
        tokio_stream::wrappers::UnixListenerStream::new(listener).filter(move |conn| match conn {
            Ok(stream) => match stream.peer_cred() {
                Ok(cred) if cred.uid() == own_uid || cred.uid() == 0 => true,
                Ok(cred) => {
                    tracing::warn!(
                        uid = cred.uid(),
                        "admin connection from another user refused"
                    );
                    false
                }
                Err(e) => {
                    tracing::warn!(error = %e, "admin connection without peer credentials refused");
                    false
                }
            },
            Err(_) => true,
        })
        // Any `:authority` is accepted on a Unix socket (net::authority).
        .map(|conn| {
            conn.map(|stream| {
                // What tonic would have told the handlers about a plain Unix stream: the
                // caller's uid, for the log and the audit trail.
                let info = tonic::transport::server::Connected::connect_info(&stream);
                crate::net::ConnWithInfo::new(
                    crate::net::authority::AuthorityRewrite::new(stream),
                    info,
                )
            })
        })
    };
    let rpc_metrics = state.metrics.rpc_layer("admin");
    tonic::transport::Server::builder()
        .trace_fn(rpc_span)
        .layer(rpc_metrics)
        .add_service(AdminServer::new(AdminApi { state }))
        .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
        .await
        .map_err(|e| ServerError::Serve {
            what: "admin API",
            reason: e.to_string(),
        })
}

/// One span per admin call: the method and the caller's uid.
fn rpc_span(req: &tonic::codegen::http::Request<()>) -> tracing::Span {
    let span = tracing::info_span!(
        "rpc",
        api = "admin",
        rpc = crate::telemetry::rpc::rpc_name(req.uri().path()),
        uid = tracing::field::Empty,
    );
    if let Some(uid) = req
        .extensions()
        .get::<UdsConnectInfo>()
        .and_then(|i| i.peer_cred)
        .map(|c| c.uid())
    {
        span.record("uid", uid);
    }
    span
}

/// The uid of the admin caller, for the log (and the audit trail).
fn caller_uid<T>(req: &Request<T>) -> Option<u32> {
    req.extensions()
        .get::<UdsConnectInfo>()
        .and_then(|i| i.peer_cred)
        .map(|c| c.uid())
}

impl AdminApi {
    fn spiffe_id_in_domain(&self, field: &str, raw: &str) -> Result<SpiffeId, AdminError> {
        if raw.is_empty() {
            return Err(invalid(field, "is required"));
        }
        let id = SpiffeId::new(raw).map_err(|e| invalid(field, format!("{raw:?}: {e}")))?;
        if !id.is_member_of(&self.state.config.trust_domain) {
            return Err(invalid(
                field,
                format!(
                    "{id} is not in this server's trust domain {}",
                    self.state.config.trust_domain
                ),
            ));
        }
        if id.path().is_empty() {
            return Err(invalid(field, format!("{id} has no path")));
        }
        Ok(id)
    }

    /// An identity to issue (a node's or a workload's): never in the reserved `/agentd/`
    /// namespace, which holds the server's own identity that node agents trust.
    fn issuable_id(&self, field: &str, raw: &str) -> Result<SpiffeId, AdminError> {
        let id = self.spiffe_id_in_domain(field, raw)?;
        if id.path() == crate::tls::RESERVED_PATH_PREFIX.trim_end_matches('/')
            || id.path().starts_with(crate::tls::RESERVED_PATH_PREFIX)
        {
            return Err(invalid(
                field,
                format!("{id} is reserved for the server's own identity"),
            ));
        }
        Ok(id)
    }

    /// The sequence of the entry's standing revocation; 0 when it is not revoked.
    fn revoked_by(&self, id: &EntryId) -> u64 {
        self.state
            .revocations
            .standing(&RevocationHandle::Entry(id.clone()))
            .unwrap_or(0)
    }

    async fn load_entry(&self, id: &EntryId) -> Result<Entry, AdminError> {
        self.state
            .store
            .get_entry(id)
            .await?
            .ok_or_else(|| AdminError::EntryNotFound(id.to_string()))
    }

    /// An entry must not carry an attested node's ID: that node would then also receive
    /// every entry parented to the entry.
    async fn refuse_node_id(&self, id: &SpiffeId) -> Result<(), AdminError> {
        if self.state.store.get_node(id).await?.is_some() {
            return Err(invalid(
                "spiffe_id",
                format!("{id} is the SPIFFE ID of an attested node"),
            ));
        }
        Ok(())
    }

    /// With `require_owner = true` every entry names its accountable owner.
    fn check_owner(&self, spec: &EntrySpec) -> Result<(), AdminError> {
        if self.state.config.require_owner && spec.owner.is_none() {
            return Err(invalid(
                "owner",
                "is required: this server is configured with require_owner = true",
            ));
        }
        Ok(())
    }

    fn now(&self) -> i64 {
        unix_seconds(self.state.clock.now())
    }

    fn ttl(&self, field: &str, secs: i64, default: Ttl) -> Result<Ttl, AdminError> {
        Ok(Ttl::from_proto_secs(secs)
            .map_err(|e| invalid(field, e))?
            .unwrap_or(default))
    }

    fn spec_from_proto(&self, p: pb::EntrySpec) -> Result<EntrySpec, AdminError> {
        let cfg = &self.state.config;
        Ok(EntrySpec {
            spiffe_id: self.issuable_id("spiffe_id", &p.spiffe_id)?,
            parent_id: self.spiffe_id_in_domain("parent_id", &p.parent_id)?,
            selectors: parse_selectors(&p.selectors)?,
            x509_svid_ttl: self.ttl(
                "x509_svid_ttl",
                p.x509_svid_ttl_seconds,
                cfg.default_x509_svid_ttl,
            )?,
            jwt_svid_ttl: self.ttl(
                "jwt_svid_ttl",
                p.jwt_svid_ttl_seconds,
                cfg.default_jwt_svid_ttl,
            )?,
            dns_names: parse_dns_names(&p.dns_names)?,
            hint: parse_hint(&p.hint)?,
            scopes: parse_scopes(&p.scopes)?,
            owner: parse_owner(&p.owner)?,
        })
    }
}

pub fn parse_selectors(raw: &[String]) -> Result<Vec<Selector>, AdminError> {
    if raw.is_empty() {
        return Err(invalid("selector", "at least one selector is required"));
    }
    let mut set = BTreeSet::new();
    for s in raw {
        let sel: Selector = s.parse().map_err(|e| invalid("selector", e))?;
        // Only selectors some attestor can produce: a typo would never match anything.
        agentd_attestor::validate_selector(&sel).map_err(|e| invalid("selector", e))?;
        set.insert(sel);
    }
    Ok(set.into_iter().collect())
}

/// DNS SANs: LDH labels, optionally a leading `*.` wildcard (RFC 5280 4.2.1.6, RFC 6125).
pub fn parse_dns_names(raw: &[String]) -> Result<Vec<String>, AdminError> {
    let mut out = Vec::new();
    for name in raw {
        let host = name.strip_prefix("*.").unwrap_or(name);
        let ok = !host.is_empty()
            && name.len() <= 253
            && host.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && !l.starts_with('-')
                    && !l.ends_with('-')
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !ok {
            return Err(invalid(
                "dns_name",
                format!("{name:?} is not a valid DNS name"),
            ));
        }
        let lower = name.to_ascii_lowercase();
        if !out.contains(&lower) {
            out.push(lower);
        }
    }
    Ok(out)
}

/// Workload API spec: a hint is at most 1024 bytes.
pub fn parse_hint(raw: &str) -> Result<String, AdminError> {
    if raw.len() > 1024 || raw.chars().any(char::is_control) {
        return Err(invalid("hint", "must be at most 1024 printable bytes"));
    }
    Ok(raw.to_string())
}

/// Scopes are `resource:action` strings (`resource:*` as a wildcard), parsed as
/// [`crate::delegation::Scope`]; an entry's scopes are the ceiling of its identity.
pub fn parse_scopes(raw: &[String]) -> Result<Vec<String>, AdminError> {
    crate::delegation::ScopeSet::parse(raw)
        .map(|set| set.to_strings())
        .map_err(|e| invalid("scope", e))
}

pub fn parse_owner(raw: &str) -> Result<Option<String>, AdminError> {
    if raw.is_empty() {
        return Ok(None);
    }
    if raw.len() > 256 || raw.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(invalid("owner", "must be at most 256 bytes without spaces"));
    }
    Ok(Some(raw.to_string()))
}

fn parse_node_id(raw: &str) -> Result<SpiffeId, AdminError> {
    SpiffeId::new(raw).map_err(|e| invalid("spiffe_id", format!("{raw:?}: {e}")))
}

fn parse_entry_id(raw: &str) -> Result<EntryId, AdminError> {
    raw.parse().map_err(|e| invalid("id", e))
}

fn entry_to_proto(e: &Entry) -> pb::Entry {
    pb::Entry {
        id: e.id.to_string(),
        spiffe_id: e.spec.spiffe_id.to_string(),
        parent_id: e.spec.parent_id.to_string(),
        selectors: e
            .spec
            .selectors
            .iter()
            .map(|s| pb::Selector {
                r#type: s.kind().to_string(),
                value: s.value().to_string(),
            })
            .collect(),
        x509_svid_ttl_seconds: e.spec.x509_svid_ttl.as_secs() as i64,
        jwt_svid_ttl_seconds: e.spec.jwt_svid_ttl.as_secs() as i64,
        dns_names: e.spec.dns_names.clone(),
        hint: e.spec.hint.clone(),
        scopes: e.spec.scopes.clone(),
        owner: e.spec.owner.clone().unwrap_or_default(),
        revision: e.revision,
        created_at: e.created_at,
        ..Default::default()
    }
}

fn status_to_proto(s: &EntryStatus) -> pb::Entry {
    pb::Entry {
        last_issued: s.activity.last_issued.unwrap_or(0),
        last_fetched: s.activity.last_fetched.unwrap_or(0),
        owner_disabled: s.owner_disabled,
        suspended: s.suspended,
        ..entry_to_proto(&s.entry)
    }
}

/// One RFC 5280 CRL per X.509 authority in the bundle, listing its unexpired revoked
/// serials; the CRL number is the revocation log's head, so it grows with every change.
pub fn current_crls(state: &ServerState) -> Result<Vec<rpb::Crl>, crate::ca::CaError> {
    let now = state.clock.now();
    let now_secs = unix_seconds(now);
    let head = state.revocations.head();
    state
        .ca
        .authorities()
        .into_iter()
        .filter(|a| a.kind == crate::ca::AuthorityKind::X509)
        .map(|a| {
            let revoked: Vec<crate::ca::RevokedSerial> = state
                .revocations
                .revoked_serials_of(&a.id, now_secs)
                .into_iter()
                .map(|(serial_hex, at)| crate::ca::RevokedSerial {
                    serial_hex,
                    revoked_at: crate::clock::from_unix_seconds(at),
                })
                .collect();
            let der = state.ca.crl_der(&a.id, &revoked, head, now)?;
            Ok(rpb::Crl {
                authority_id: a.id,
                der,
            })
        })
        .collect()
}

/// The audit fields describing a revocation event.
fn revocation_audit(record: AuditRecord, e: &crate::revocation::RevocationEvent) -> AuditRecord {
    record
        .field("sequence", e.sequence)
        .field("kind", e.handle.kind())
        .field("id", e.handle.id())
        .field("reason", &e.reason)
        .field(
            "serials",
            e.serials
                .iter()
                .map(|s| s.serial.clone())
                .collect::<Vec<_>>(),
        )
        .field("jwt_ids", &e.jwt_ids)
}

/// The audit fields describing an entry.
fn entry_audit(record: AuditRecord, e: &Entry) -> AuditRecord {
    record
        .subject(&e.spec.spiffe_id)
        .field("entry", e.id.as_str())
        .field("parent_id", e.spec.parent_id.to_string())
        .field(
            "selectors",
            e.spec
                .selectors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
        )
        .field("scopes", &e.spec.scopes)
        .field("owner", &e.spec.owner)
        .field("x509_svid_ttl", e.spec.x509_svid_ttl.as_secs())
        .field("jwt_svid_ttl", e.spec.jwt_svid_ttl.as_secs())
        .field("dns_names", &e.spec.dns_names)
        .field("revision", e.revision)
}

pub fn audit_to_proto(r: &SealedAuditRecord) -> pb::AuditRecord {
    pb::AuditRecord {
        seq: r.seq,
        time: r.time,
        action: r.action.clone(),
        actor: r.actor.clone(),
        subject: r.subject.clone().unwrap_or_default(),
        fields_json: serde_json::to_string(&r.fields).unwrap_or_else(|_| "{}".into()),
        prev_hash: r.prev_hash.clone(),
        hash: r.hash.clone(),
    }
}

fn node_to_proto(n: &AttestedNode) -> pb::Node {
    pb::Node {
        spiffe_id: n.spiffe_id.to_string(),
        attestation_type: n.attestation_type.clone(),
        serial: n.serial.clone(),
        svid_expires_at: n.svid_expires_at,
        attested_at: n.attested_at,
        last_seen_at: n.last_seen_at,
        selectors: n.selectors.iter().map(ToString::to_string).collect(),
    }
}

/// An authority for the admin API.
pub fn authority_to_proto(a: &crate::ca::AuthorityInfo) -> pb::Authority {
    pb::Authority {
        id: a.id.clone(),
        kind: a.kind.to_string(),
        state: a.state.to_string(),
        not_before: a.not_before.map(unix_seconds).unwrap_or(0),
        not_after: unix_seconds(a.not_after),
    }
}

impl AdminApi {
    fn authorities_response(&self, list: &[crate::ca::AuthorityInfo]) -> pb::Authorities {
        pb::Authorities {
            authorities: list.iter().map(authority_to_proto).collect(),
            bundle_sequence: self.state.ca.bundle().sequence,
        }
    }

    /// Runs a blocking CA change (key generation, fsynced writes) off the async workers.
    async fn ca_change<F>(&self, f: F) -> Result<Vec<crate::ca::AuthorityInfo>, AdminError>
    where
        F: FnOnce(
                &crate::ca::CertificateAuthority,
                std::time::SystemTime,
            ) -> Result<Vec<crate::ca::AuthorityInfo>, crate::ca::CaError>
            + Send
            + 'static,
    {
        let ca = self.state.ca.clone();
        let now = self.state.clock.now();
        tokio::task::spawn_blocking(move || f(&ca, now))
            .await
            .map_err(|e| AdminError::Store(format!("CA task: {e}")))?
            .map_err(AdminError::from)
    }
}

#[tonic::async_trait]
impl Admin for AdminApi {
    async fn get_server_info(
        &self,
        _request: Request<pb::GetServerInfoRequest>,
    ) -> Result<Response<pb::ServerInfo>, Status> {
        Ok(Response::new(pb::ServerInfo {
            trust_domain: self.state.config.trust_domain.to_string(),
            node_api_address: self.state.node_api_address.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            bundle_sequence: self.state.ca.bundle().sequence,
        }))
    }

    async fn create_join_token(
        &self,
        request: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::JoinToken>, Status> {
        let uid = caller_uid(&request);
        let req = request.into_inner();
        let spiffe_id = self.issuable_id("spiffe_id", &req.spiffe_id)?;
        let ttl = self.ttl("ttl", req.ttl_seconds, self.state.config.join_token_ttl)?;
        // A new token for a revoked node is the operator re-admitting it: the revocation is
        // lifted (a lift event is logged), so the node can attest with this token. Tokens
        // made before the revocation stay refused while it stands.
        let now_secs = unix_seconds(self.state.clock.now());
        if let Some(sequence) = self
            .state
            .revocations
            .standing(&RevocationHandle::Node(spiffe_id.clone()))
        {
            let lift = self
                .state
                .revocations
                .lift(
                    sequence,
                    "a new join token was generated for the node",
                    now_secs,
                )
                .await
                .map_err(AdminError::from)?;
            self.state
                .audit
                .record(
                    revocation_audit(
                        AuditRecord::new("revocation.lift", Actor::admin(uid)),
                        &lift,
                    )
                    .field("lifts", sequence),
                )
                .await
                .map_err(AdminError::from)?;
            tracing::info!(?uid, node = %spiffe_id, revocation = sequence, "node revocation lifted by a new join token");
        }
        // 128 random bits from the system CSPRNG.
        let token = hex::encode(rand::random::<[u8; 16]>());
        let expires_at = unix_seconds(self.state.clock.now()) + ttl.as_secs() as i64;
        self.state
            .store
            .create_join_token(JoinToken {
                token_sha256: join_token_digest(&token),
                spiffe_id: spiffe_id.clone(),
                expires_at,
            })
            .await
            .map_err(AdminError::from)?;
        tracing::info!(?uid, %spiffe_id, expires_at, "join token created");
        // The token itself is never recorded: the log is readable by every admin.
        self.state
            .audit
            .record(
                AuditRecord::new("join_token.create", Actor::admin(uid))
                    .subject(&spiffe_id)
                    .field("expires_at", expires_at)
                    .field("ttl", ttl.as_secs()),
            )
            .await
            .map_err(AdminError::from)?;
        Ok(Response::new(pb::JoinToken {
            token,
            spiffe_id: spiffe_id.to_string(),
            expires_at,
        }))
    }

    async fn create_entry(
        &self,
        request: Request<pb::EntrySpec>,
    ) -> Result<Response<pb::Entry>, Status> {
        let uid = caller_uid(&request);
        let spec = self.spec_from_proto(request.into_inner())?;
        self.check_owner(&spec)?;
        self.refuse_node_id(&spec.spiffe_id).await?;
        let entry = self
            .state
            .store
            .create_entry(spec, unix_seconds(self.state.clock.now()))
            .await
            .map_err(AdminError::from)?;
        tracing::info!(?uid, entry = %entry.id, spiffe_id = %entry.spec.spiffe_id, "entry created");
        self.state
            .audit
            .record(entry_audit(
                AuditRecord::new("entry.create", Actor::admin(uid)),
                &entry,
            ))
            .await
            .map_err(AdminError::from)?;
        Ok(Response::new(entry_to_proto(&entry)))
    }

    async fn get_entry(
        &self,
        request: Request<pb::GetEntryRequest>,
    ) -> Result<Response<pb::Entry>, Status> {
        let id = parse_entry_id(&request.get_ref().id)?;
        let entry = self.load_entry(&id).await?;
        let revoked_by = self.revoked_by(&entry.id);
        let status = ownership::entry_status(
            self.state.store.as_ref(),
            entry,
            self.state.config.suspend_disabled_owners,
        )
        .await
        .map_err(AdminError::from)?;
        let mut out = status_to_proto(&status);
        out.revoked_by = revoked_by;
        Ok(Response::new(out))
    }

    async fn list_entries(
        &self,
        request: Request<pb::ListEntriesRequest>,
    ) -> Result<Response<pb::ListEntriesResponse>, Status> {
        let req = request.into_inner();
        let parse_id = |field: &str, raw: &str| -> Result<Option<SpiffeId>, AdminError> {
            if raw.is_empty() {
                Ok(None)
            } else {
                SpiffeId::new(raw)
                    .map(Some)
                    .map_err(|e| invalid(field, format!("{raw:?}: {e}")))
            }
        };
        let filter = EntryFilter {
            spiffe_id: parse_id("spiffe_id", &req.spiffe_id)?,
            parent_id: parse_id("parent_id", &req.parent_id)?,
            selector: if req.selector.is_empty() {
                None
            } else {
                Some(req.selector.parse().map_err(|e| invalid("selector", e))?)
            },
        };
        let lifecycle = LifecycleFilter {
            stale: match req.stale_seconds {
                0 => None,
                s if s < 0 => return Err(invalid("stale", "must not be negative").into()),
                s => Some(std::time::Duration::from_secs(s.unsigned_abs())),
            },
            orphaned: req.orphaned,
        };
        let entries = ownership::list_entries(
            self.state.store.as_ref(),
            &filter,
            &lifecycle,
            self.state.config.suspend_disabled_owners,
            self.now(),
        )
        .await
        .map_err(AdminError::from)?;
        Ok(Response::new(pb::ListEntriesResponse {
            entries: entries
                .iter()
                .map(|s| {
                    let mut out = status_to_proto(s);
                    out.revoked_by = self.revoked_by(&s.entry.id);
                    out
                })
                .collect(),
        }))
    }

    async fn update_entry(
        &self,
        request: Request<pb::UpdateEntryRequest>,
    ) -> Result<Response<pb::Entry>, Status> {
        let uid = caller_uid(&request);
        let req = request.into_inner();
        let id = parse_entry_id(&req.id)?;
        let current = self.load_entry(&id).await?;
        let mut spec = current.spec;
        if let Some(v) = &req.spiffe_id {
            spec.spiffe_id = self.issuable_id("spiffe_id", v)?;
        }
        if let Some(v) = &req.parent_id {
            spec.parent_id = self.spiffe_id_in_domain("parent_id", v)?;
        }
        if let Some(v) = &req.selectors {
            spec.selectors = parse_selectors(&v.values)?;
        }
        if let Some(v) = req.x509_svid_ttl_seconds {
            spec.x509_svid_ttl =
                self.ttl("x509_svid_ttl", v, self.state.config.default_x509_svid_ttl)?;
        }
        if let Some(v) = req.jwt_svid_ttl_seconds {
            spec.jwt_svid_ttl =
                self.ttl("jwt_svid_ttl", v, self.state.config.default_jwt_svid_ttl)?;
        }
        if let Some(v) = &req.dns_names {
            spec.dns_names = parse_dns_names(&v.values)?;
        }
        if let Some(v) = &req.hint {
            spec.hint = parse_hint(v)?;
        }
        if let Some(v) = &req.scopes {
            spec.scopes = parse_scopes(&v.values)?;
        }
        if let Some(v) = &req.owner {
            spec.owner = parse_owner(v)?;
        }
        self.check_owner(&spec)?;
        self.refuse_node_id(&spec.spiffe_id).await?;
        let entry = self
            .state
            .store
            .update_entry(&id, spec)
            .await
            .map_err(AdminError::from)?;
        tracing::info!(?uid, entry = %entry.id, revision = entry.revision, "entry updated");
        self.state
            .audit
            .record(entry_audit(
                AuditRecord::new("entry.update", Actor::admin(uid)),
                &entry,
            ))
            .await
            .map_err(AdminError::from)?;
        Ok(Response::new(entry_to_proto(&entry)))
    }

    async fn delete_entry(
        &self,
        request: Request<pb::DeleteEntryRequest>,
    ) -> Result<Response<pb::Entry>, Status> {
        let uid = caller_uid(&request);
        let id = parse_entry_id(&request.get_ref().id)?;
        let entry = self
            .state
            .store
            .delete_entry(&id)
            .await
            .map_err(AdminError::from)?;
        tracing::info!(?uid, entry = %entry.id, "entry deleted");
        self.state
            .audit
            .record(entry_audit(
                AuditRecord::new("entry.delete", Actor::admin(uid)),
                &entry,
            ))
            .await
            .map_err(AdminError::from)?;
        Ok(Response::new(entry_to_proto(&entry)))
    }

    async fn list_nodes(
        &self,
        _request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let nodes = self
            .state
            .store
            .list_nodes()
            .await
            .map_err(AdminError::from)?;
        Ok(Response::new(pb::ListNodesResponse {
            nodes: nodes.iter().map(node_to_proto).collect(),
        }))
    }

    async fn get_node(
        &self,
        request: Request<pb::GetNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        let id = parse_node_id(&request.get_ref().spiffe_id)?;
        let node = self
            .state
            .store
            .get_node(&id)
            .await
            .map_err(AdminError::from)?
            .ok_or_else(|| AdminError::NodeNotFound(id.to_string()))?;
        Ok(Response::new(node_to_proto(&node)))
    }

    async fn evict_node(
        &self,
        request: Request<pb::EvictNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        let uid = caller_uid(&request);
        let id = parse_node_id(&request.get_ref().spiffe_id)?;
        let node = self
            .state
            .store
            .delete_node(&id)
            .await
            .map_err(AdminError::from)?;
        tracing::info!(?uid, node = %node.spiffe_id, "node evicted");
        self.state
            .audit
            .record(
                AuditRecord::new("node.evict", Actor::admin(uid))
                    .subject(&node.spiffe_id)
                    .field("attestation_type", &node.attestation_type)
                    .field("serial", &node.serial),
            )
            .await
            .map_err(AdminError::from)?;
        Ok(Response::new(node_to_proto(&node)))
    }

    async fn revoke(
        &self,
        request: Request<pb::RevokeRequest>,
    ) -> Result<Response<agentd_proto::revocation::RevocationEvent>, Status> {
        let uid = caller_uid(&request);
        let req = request.into_inner();
        let raw = req.handle.ok_or_else(|| invalid("handle", "is required"))?;
        let handle = RevocationHandle::parse(&raw.kind, &raw.id).map_err(AdminError::from)?;
        let now = unix_seconds(self.state.clock.now());
        match &handle {
            RevocationHandle::Entry(id) => {
                self.load_entry(id).await?;
            }
            RevocationHandle::Authority(id) => {
                // Out of the bundle first (refused for the active authority or an unknown
                // id, with nothing logged); then the log resolves and pushes what it signed,
                // which node agents mint again under the active authority.
                // A node authenticates to the server with its node SVID: removing the CA
                // that signed a live one would lock that node out. Node agents move to the
                // active authority at their next renewal (half their TTL).
                let now_secs = unix_seconds(self.state.clock.now());
                let nodes: BTreeSet<String> = self
                    .state
                    .store
                    .list_issued(now_secs)
                    .await
                    .map_err(AdminError::from)?
                    .into_iter()
                    .filter(|s| {
                        s.kind == crate::revocation::SvidKind::Node && s.authority_id == *id
                    })
                    .map(|s| s.spiffe_id)
                    .collect();
                if !nodes.is_empty() {
                    return Err(AdminError::from(RevocationError::Refused(format!(
                        "authority {id} still signs the node SVIDs of {} node(s) ({}): they move to the active authority when they renew (at half the node SVID TTL); revoke it after that, or revoke those nodes",
                        nodes.len(),
                        nodes.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
                    )))
                    .into());
                }
                self.state
                    .ca
                    .revoke_authority(id, self.state.clock.now())
                    .map_err(AdminError::from)?;
            }
            _ => {}
        }
        let event = self
            .state
            .revocations
            .revoke(handle.clone(), &req.reason, now)
            .await
            .map_err(AdminError::from)?;
        if let RevocationHandle::Node(id) = &handle {
            // The kill switch: the node's record goes, so it must attest again, and while the
            // revocation stands it may not (see node_api::check_node_not_revoked).
            match self.state.store.delete_node(id).await {
                Ok(_) | Err(DataStoreError::NodeNotFound { .. }) => {}
                Err(e) => return Err(AdminError::from(e).into()),
            }
        }
        tracing::info!(?uid, sequence = event.sequence, %handle, reason = %event.reason, svids = event.serials.len(), jwts = event.jwt_ids.len(), "revoked");
        {
            use crate::telemetry::RevocationHandle as Kind;
            self.state.metrics.revoked(match &handle {
                RevocationHandle::Svid(_) => Kind::Svid,
                RevocationHandle::Entry(_) => Kind::Entry,
                RevocationHandle::Node(_) => Kind::Node,
                RevocationHandle::Grant(_) => Kind::Grant,
                RevocationHandle::Task(_) => Kind::Task,
                RevocationHandle::Authority(_) => Kind::Authority,
            });
        }
        self.state
            .audit
            .record(revocation_audit(
                AuditRecord::new("revocation.create", Actor::admin(uid)),
                &event,
            ))
            .await
            .map_err(AdminError::from)?;
        Ok(Response::new(event_to_proto(&event)))
    }

    async fn lift_revocation(
        &self,
        request: Request<pb::LiftRevocationRequest>,
    ) -> Result<Response<agentd_proto::revocation::RevocationEvent>, Status> {
        let uid = caller_uid(&request);
        let req = request.into_inner();
        if req.sequence == 0 {
            return Err(invalid("sequence", "is required").into());
        }
        let event = self
            .state
            .revocations
            .lift(
                req.sequence,
                &req.reason,
                unix_seconds(self.state.clock.now()),
            )
            .await
            .map_err(AdminError::from)?;
        tracing::info!(?uid, sequence = event.sequence, lifted = req.sequence, handle = %event.handle, "revocation lifted");
        self.state
            .audit
            .record(
                revocation_audit(
                    AuditRecord::new("revocation.lift", Actor::admin(uid)),
                    &event,
                )
                .field("lifts", req.sequence),
            )
            .await
            .map_err(AdminError::from)?;
        Ok(Response::new(event_to_proto(&event)))
    }

    async fn list_revocations(
        &self,
        request: Request<pb::ListRevocationsRequest>,
    ) -> Result<Response<pb::ListRevocationsResponse>, Status> {
        let log = &self.state.revocations;
        Ok(Response::new(pb::ListRevocationsResponse {
            events: log
                .list(request.get_ref().all)
                .iter()
                .map(event_to_proto)
                .collect(),
            head_sequence: log.head(),
        }))
    }

    async fn get_crls(
        &self,
        _request: Request<rpb::FetchCrlsRequest>,
    ) -> Result<Response<rpb::FetchCrlsResponse>, Status> {
        let crls = current_crls(&self.state).map_err(AdminError::from)?;
        Ok(Response::new(rpb::FetchCrlsResponse { crls }))
    }

    async fn create_grant(
        &self,
        request: Request<pb::CreateGrantRequest>,
    ) -> Result<Response<pb::Grant>, Status> {
        let uid = caller_uid(&request);
        let req = request.into_inner();
        // A revoked task gets no new grants while its revocation stands.
        if !req.task_id.is_empty() {
            if let Some(sequence) = self
                .state
                .revocations
                .standing(&RevocationHandle::Task(req.task_id.clone()))
            {
                return Err(AdminError::from(RevocationError::Refused(format!(
                    "task {} is revoked (revocation {sequence})",
                    req.task_id
                )))
                .into());
            }
        }
        let grant = super::grants::create_root_grant(&self.state, req).await?;
        tracing::info!(?uid, grant = %grant.id, principal = %grant.delegation.principal, agent = ?grant.agent().map(ToString::to_string), scopes = %grant.delegation.scopes, expires_at = grant.delegation.expires_at, "grant created");
        self.state
            .audit
            .record(super::grants::grant_audit(
                AuditRecord::new("grant.create", Actor::admin(uid)),
                &grant,
            ))
            .await
            .map_err(AdminError::from)?;
        Ok(Response::new(super::grants::grant_to_admin_proto(&grant)))
    }

    async fn get_grant(
        &self,
        request: Request<pb::GetGrantRequest>,
    ) -> Result<Response<pb::Grant>, Status> {
        let id = super::grants::parse_grant_id(&request.get_ref().id)?;
        let grant = super::grants::load_grant(self.state.store.as_ref(), &id).await?;
        Ok(Response::new(super::grants::grant_to_admin_proto(&grant)))
    }

    async fn list_grants(
        &self,
        request: Request<pb::ListGrantsRequest>,
    ) -> Result<Response<pb::ListGrantsResponse>, Status> {
        let req = request.into_inner();
        let agent = if req.agent.is_empty() {
            None
        } else {
            Some(
                SpiffeId::new(&req.agent)
                    .map_err(|e| invalid("agent", format!("{:?}: {e}", req.agent)))?,
            )
        };
        let now = unix_seconds(self.state.clock.now());
        let grants = self
            .state
            .store
            .list_grants()
            .await
            .map_err(AdminError::from)?
            .into_iter()
            .filter(|g| agent.as_ref().is_none_or(|a| g.agent() == Some(a)))
            .filter(|g| req.include_expired || g.delegation.expires_at > now)
            .map(|g| super::grants::grant_to_admin_proto(&g))
            .collect();
        Ok(Response::new(pb::ListGrantsResponse { grants }))
    }

    async fn get_bundle(
        &self,
        _request: Request<pb::GetBundleRequest>,
    ) -> Result<Response<pb::Bundle>, Status> {
        let b = self.state.ca.bundle();
        Ok(Response::new(pb::Bundle {
            trust_domain: b.trust_domain.to_string(),
            x509_authorities: b.x509_authorities.clone(),
            sequence: b.sequence,
            spiffe_json: b.to_spiffe_json(),
            pem: b.x509_pem(),
        }))
    }

    async fn list_audit_records(
        &self,
        request: Request<pb::ListAuditRecordsRequest>,
    ) -> Result<Response<pb::ListAuditRecordsResponse>, Status> {
        let req = request.into_inner();
        let non_empty = |s: String| (!s.is_empty()).then_some(s);
        let query = AuditQuery {
            since: (req.since != 0).then_some(req.since),
            spiffe_id: match non_empty(req.spiffe_id) {
                Some(raw) => Some(
                    SpiffeId::new(&raw)
                        .map_err(|e| invalid("spiffe_id", format!("{raw:?}: {e}")))?
                        .to_string(),
                ),
                None => None,
            },
            action: non_empty(req.action),
        };
        let records = self
            .state
            .audit
            .query(&query)
            .await
            .map_err(AdminError::from)?;
        Ok(Response::new(pb::ListAuditRecordsResponse {
            records: records.iter().map(audit_to_proto).collect(),
        }))
    }

    async fn verify_audit_log(
        &self,
        _request: Request<pb::VerifyAuditLogRequest>,
    ) -> Result<Response<pb::VerifyAuditLogResponse>, Status> {
        let report = self.state.audit.verify().await.map_err(AdminError::from)?;
        if let Some(p) = &report.problem {
            tracing::error!(seq = p.seq, reason = %p.reason, "audit log verification failed");
        }
        Ok(Response::new(pb::VerifyAuditLogResponse {
            intact: report.is_intact(),
            records: report.records,
            head_seq: report.head.as_ref().map_or(0, |h| h.seq),
            head_hash: report
                .head
                .as_ref()
                .map(|h| h.hash.clone())
                .unwrap_or_default(),
            first_bad_seq: report.problem.as_ref().map_or(0, |p| p.seq),
            reason: report.problem.map(|p| p.reason).unwrap_or_default(),
        }))
    }

    async fn set_owner_disabled(
        &self,
        request: Request<pb::SetOwnerDisabledRequest>,
    ) -> Result<Response<pb::SetOwnerDisabledResponse>, Status> {
        let uid = caller_uid(&request);
        let req = request.into_inner();
        let owner = parse_owner(&req.owner)?.ok_or_else(|| invalid("owner", "is required"))?;
        let suspend = self.state.config.suspend_disabled_owners;
        self.state
            .store
            .set_owner_disabled(&owner, req.disabled, self.now())
            .await
            .map_err(AdminError::from)?;
        let entries: Vec<EntryStatus> = ownership::list_entries(
            self.state.store.as_ref(),
            &EntryFilter::default(),
            &LifecycleFilter::default(),
            suspend,
            self.now(),
        )
        .await
        .map_err(AdminError::from)?
        .into_iter()
        .filter(|s| s.entry.spec.owner.as_deref() == Some(owner.as_str()))
        .collect();
        let actor = Actor::admin(uid);
        let (owner_action, entry_action) = if req.disabled {
            ("owner.disable", "entry.owner_disabled")
        } else {
            ("owner.enable", "entry.owner_enabled")
        };
        let mut records = vec![AuditRecord::new(owner_action, &actor)
            .field("owner", &owner)
            .field("entries", entries.len())
            .field("suspended", req.disabled && suspend)];
        // One record per entry: who suspended (or resumed) which identity.
        records.extend(entries.iter().map(|s| {
            AuditRecord::new(entry_action, &actor)
                .subject(&s.entry.spec.spiffe_id)
                .field("entry", s.entry.id.as_str())
                .field("owner", &owner)
                .field("suspended", s.suspended)
        }));
        self.state
            .audit
            .record_all(records)
            .await
            .map_err(AdminError::from)?;
        tracing::info!(?uid, %owner, disabled = req.disabled, entries = entries.len(), "owner state changed");
        Ok(Response::new(pb::SetOwnerDisabledResponse {
            owner,
            disabled: req.disabled,
            suspended: req.disabled && suspend,
            entries: entries.iter().map(status_to_proto).collect(),
        }))
    }

    async fn get_inventory(
        &self,
        request: Request<pb::GetInventoryRequest>,
    ) -> Result<Response<pb::Inventory>, Status> {
        let window = match request.get_ref().stale_seconds {
            0 => ownership::DEFAULT_STALE_WINDOW,
            s if s < 0 => return Err(invalid("stale", "must not be negative").into()),
            s => std::time::Duration::from_secs(s.unsigned_abs()),
        };
        let now = self.now();
        let inv = ownership::inventory(
            self.state.store.as_ref(),
            &crate::tls::server_spiffe_id(&self.state.config.trust_domain),
            self.state.config.suspend_disabled_owners,
            window,
            now,
        )
        .await
        .map_err(AdminError::from)?;
        Ok(Response::new(pb::Inventory {
            entries: inv.entries,
            nodes: inv.nodes,
            live_svids: inv.live_svids,
            live_grants: inv.live_grants,
            revocations: inv.revocations,
            stale_entries: inv.stale_entries,
            orphaned_entries: inv.orphaned_entries,
            by_owner: inv
                .by_owner
                .into_iter()
                .map(|o| pb::OwnerInventory {
                    owner: o.owner.unwrap_or_default(),
                    disabled: o.disabled,
                    entries: o.entries,
                    live_svids: o.live_svids,
                })
                .collect(),
            by_node: inv
                .by_node
                .into_iter()
                .map(|n| pb::NodeInventory {
                    spiffe_id: n.spiffe_id,
                    entries: n.entries,
                    live_svids: n.live_svids,
                })
                .collect(),
            generated_at: now,
        }))
    }

    async fn list_authorities(
        &self,
        _request: Request<pb::ListAuthoritiesRequest>,
    ) -> Result<Response<pb::Authorities>, Status> {
        Ok(Response::new(
            self.authorities_response(&self.state.ca.authorities()),
        ))
    }

    async fn prepare_authority(
        &self,
        request: Request<pb::PrepareAuthorityRequest>,
    ) -> Result<Response<pb::Authorities>, Status> {
        let uid = caller_uid(&request);
        let prepared = self.ca_change(|ca, now| ca.prepare(now)).await?;
        tracing::info!(?uid, ids = ?prepared.iter().map(|a| &a.id).collect::<Vec<_>>(), "authorities prepared");
        Ok(Response::new(self.authorities_response(&prepared)))
    }

    async fn activate_authority(
        &self,
        request: Request<pb::ActivateAuthorityRequest>,
    ) -> Result<Response<pb::Authorities>, Status> {
        let uid = caller_uid(&request);
        let activated = self.ca_change(|ca, now| ca.activate(now)).await?;
        tracing::info!(?uid, ids = ?activated.iter().map(|a| &a.id).collect::<Vec<_>>(), "authorities activated");
        Ok(Response::new(self.authorities_response(&activated)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_are_sorted_deduplicated_and_required() {
        let got = parse_selectors(&[
            "unix:uid:1".into(),
            "unix:gid:2".into(),
            "unix:uid:1".into(),
        ])
        .unwrap();
        let got: Vec<String> = got.iter().map(ToString::to_string).collect();
        assert_eq!(got, ["unix:gid:2", "unix:uid:1"]);
        assert!(parse_selectors(&[]).is_err());
        let err = parse_selectors(&["nocolon".into()]).unwrap_err();
        assert!(err.to_string().starts_with("selector: "), "{err}");
    }

    #[test]
    fn dns_names_and_scopes_are_checked() {
        assert_eq!(
            parse_dns_names(&["API.example.com".into(), "*.svc".into()]).unwrap(),
            ["api.example.com", "*.svc"]
        );
        assert!(parse_dns_names(&["bad_name".into()]).is_err());
        assert!(parse_dns_names(&["-x.com".into()]).is_err());
        assert_eq!(
            parse_scopes(&["crm:read".into(), "calendar:*".into()]).unwrap(),
            ["calendar:*", "crm:read"]
        );
        assert!(parse_scopes(&["crm".into()]).is_err());
        assert!(parse_scopes(&["crm:re ad".into()]).is_err());
    }

    #[test]
    fn authority_errors_map_to_status_codes_with_the_reason() {
        use crate::ca::CaError;
        let cases = [
            (
                CaError::UnknownAuthority { id: "abcd".into() },
                tonic::Code::NotFound,
                "abcd",
            ),
            (
                CaError::ActiveAuthority { id: "ef01".into() },
                tonic::Code::FailedPrecondition,
                "prepare",
            ),
            (
                CaError::AlreadyPrepared { id: "ef01".into() },
                tonic::Code::FailedPrecondition,
                "ef01",
            ),
            (
                CaError::NothingPrepared,
                tonic::Code::FailedPrecondition,
                "authority prepare",
            ),
            (
                CaError::InvalidSerial {
                    serial: "zz".into(),
                    reason: "not hexadecimal".into(),
                },
                tonic::Code::InvalidArgument,
                "zz",
            ),
        ];
        for (err, code, needle) in cases {
            let status = Status::from(AdminError::from(err));
            assert_eq!(status.code(), code, "{status:?}");
            assert!(status.message().contains(needle), "{status:?}");
        }
    }

    #[test]
    fn hint_and_owner_limits() {
        assert!(parse_hint(&"x".repeat(1025)).is_err());
        assert_eq!(parse_owner("").unwrap(), None);
        assert!(parse_owner("alice smith").is_err());
    }
}
