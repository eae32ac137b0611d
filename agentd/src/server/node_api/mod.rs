//! The node API: node attestation, entry sync and SVID minting for node agents.
//!
//! `Attest` is the only call accepted without a client certificate. Every other call must
//! come over mTLS with a node SVID of a node the server still knows (an evicted node must
//! attest again), and may only touch entries parented to that node.

use std::sync::Arc;
use std::time::Duration;

use agentd_proto::node as pb;
use agentd_proto::node::node_server::{Node, NodeServer};
use spiffe::SpiffeId;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::node_attestor::{ClaimsError, NodeAttestation, NodeAttestors, X509PopError};
use super::{ServerError, ServerState};
use crate::audit::{Actor, AuditError, AuditRecord};
use crate::ca::{CaError, IssuedX509Svid, X509SvidRequest};
use crate::clock::unix_seconds;
use crate::convert::bundle_to_proto;
use crate::datastore::{AttestedNode, DataStoreError, Entry, EntryFilter, EntryId, EntryIssuance};
use crate::revocation::feed::{feed_stream, FeedStream, HEARTBEAT};
use crate::revocation::{IssuedSvid, RevocationHandle, SvidKind};
use crate::telemetry::{AttestationFailure, SvidKind as MintedKind};
use crate::tls::{PeerIdentity, ServerConfigSource};

/// Most CSRs accepted in one `MintX509Svids` call.
pub const MAX_BATCH: usize = 1000;
/// Largest message the node API accepts.
const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum NodeApiError {
    #[error("no client certificate: only Attest may be called without a node SVID")]
    NoClientCertificate,
    #[error("node {0} is not attested (evicted, or never attested): attest again")]
    UnknownNode(String),
    #[error("node {spiffe_id}: certificate serial {presented} is not the node's current SVID (evicted and re-attested, or not a node SVID)")]
    StaleNodeSvid {
        spiffe_id: String,
        presented: String,
    },
    #[error("join token not found or already used")]
    UnknownJoinToken,
    #[error("join token expired")]
    ExpiredJoinToken,
    #[error("{field}: {reason}")]
    InvalidField { field: &'static str, reason: String },
    #[error("node attestor {0} is not enabled on this server")]
    AttestorNotEnabled(&'static str),
    #[error("x509pop: {0}")]
    X509Pop(#[from] X509PopError),
    #[error("claims: {0}")]
    Claims(#[from] ClaimsError),
    #[error("node {spiffe_id} was attested with {existing}, not {presented}: evict it first")]
    AttestationTypeMismatch {
        spiffe_id: String,
        existing: String,
        presented: &'static str,
    },
    #[error("entry {0} is not served by this node")]
    EntryNotAuthorized(String),
    #[error("node {spiffe_id} is revoked (revocation {sequence}): lift the revocation or generate a new join token for it")]
    NodeRevoked { spiffe_id: String, sequence: u64 },
    #[error("entry {id} is revoked (revocation {sequence})")]
    EntryRevoked { id: String, sequence: u64 },
    #[error("certificate serial {serial} is revoked")]
    SvidRevoked { serial: String },
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Store(#[from] DataStoreError),
    #[error("entry {entry} is suspended: its owner {owner} is disabled")]
    EntrySuspended { entry: String, owner: String },
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error(transparent)]
    Grant(#[from] super::grants::GrantError),
}

impl From<NodeApiError> for Status {
    fn from(e: NodeApiError) -> Self {
        let msg = e.to_string();
        match e {
            NodeApiError::NoClientCertificate => Status::unauthenticated(msg),
            NodeApiError::UnknownNode(_)
            | NodeApiError::StaleNodeSvid { .. }
            | NodeApiError::UnknownJoinToken
            | NodeApiError::ExpiredJoinToken
            | NodeApiError::EntryNotAuthorized(_)
            | NodeApiError::EntrySuspended { .. }
            | NodeApiError::NodeRevoked { .. }
            | NodeApiError::EntryRevoked { .. }
            | NodeApiError::SvidRevoked { .. } => Status::permission_denied(msg),
            NodeApiError::InvalidField { .. } => Status::invalid_argument(msg),
            NodeApiError::AttestorNotEnabled(_) => Status::failed_precondition(msg),
            NodeApiError::X509Pop(X509PopError::Busy) | NodeApiError::Claims(ClaimsError::Busy) => {
                Status::resource_exhausted(msg)
            }
            NodeApiError::X509Pop(e) if e.is_malformed() => Status::invalid_argument(msg),
            NodeApiError::Claims(e) if e.is_malformed() => Status::invalid_argument(msg),
            NodeApiError::X509Pop(_)
            | NodeApiError::Claims(_)
            | NodeApiError::AttestationTypeMismatch { .. } => Status::permission_denied(msg),
            NodeApiError::Ca(CaError::Csr { .. })
            | NodeApiError::Ca(CaError::ForeignTrustDomain { .. }) => Status::invalid_argument(msg),
            NodeApiError::Ca(_) | NodeApiError::Store(_) | NodeApiError::Audit(_) => {
                tracing::error!(error = %msg, "node API internal error");
                Status::internal(msg)
            }
            NodeApiError::Grant(g) => g.into(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct NodeApi {
    state: Arc<ServerState>,
    attestors: Arc<NodeAttestors>,
    /// Ends revocation feed streams when the server stops.
    stop: CancellationToken,
}

impl NodeApi {
    pub fn new(state: Arc<ServerState>, stop: CancellationToken) -> Self {
        let attestors = Arc::new(NodeAttestors::new(
            &state.config.node_attestors,
            &state.config.trust_domain,
        ));
        Self {
            state,
            attestors,
            stop,
        }
    }
}

pub async fn serve(
    state: Arc<ServerState>,
    listener: TcpListener,
    tls: ServerConfigSource,
    stop: CancellationToken,
) -> Result<(), ServerError> {
    let incoming = crate::tls::incoming(listener, tls, stop.clone());
    let svc = NodeServer::new(NodeApi::new(state.clone(), stop.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let rpc_metrics = state.metrics.rpc_layer("node");
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .trace_fn(rpc_span)
        .layer(rpc_metrics)
        .add_service(svc)
        .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
        .await
        .map_err(|e| ServerError::Serve {
            what: "node API",
            reason: e.to_string(),
        })
}

/// One span per node API call: the method, the peer address and, past attestation, the
/// calling node's SPIFFE ID (from its verified client certificate).
fn rpc_span(req: &tonic::codegen::http::Request<()>) -> tracing::Span {
    let span = tracing::info_span!(
        "rpc",
        api = "node",
        rpc = crate::telemetry::rpc::rpc_name(req.uri().path()),
        remote = tracing::field::Empty,
        node = tracing::field::Empty,
    );
    if let Some(peer) = req.extensions().get::<PeerIdentity>() {
        if let Some(addr) = peer.remote_addr {
            span.record("remote", tracing::field::display(addr));
        }
        if let Some(id) = &peer.spiffe_id {
            span.record("node", tracing::field::display(id));
        }
    }
    span
}

/// The metric label for a refused attestation: a fixed reason, never the error text.
fn attestation_failure(e: &NodeApiError) -> AttestationFailure {
    match e {
        NodeApiError::UnknownJoinToken => AttestationFailure::UnknownJoinToken,
        NodeApiError::ExpiredJoinToken => AttestationFailure::ExpiredJoinToken,
        NodeApiError::AttestorNotEnabled(_) => AttestationFailure::AttestorNotEnabled,
        NodeApiError::X509Pop(X509PopError::Busy) | NodeApiError::Claims(ClaimsError::Busy) => {
            AttestationFailure::Busy
        }
        NodeApiError::X509Pop(e) if e.is_malformed() => AttestationFailure::InvalidRequest,
        NodeApiError::Claims(e) if e.is_malformed() => AttestationFailure::InvalidRequest,
        NodeApiError::X509Pop(_) | NodeApiError::Claims(_) => AttestationFailure::EvidenceRejected,
        NodeApiError::InvalidField {
            field: "spiffe_id", ..
        }
        | NodeApiError::AttestationTypeMismatch { .. } => AttestationFailure::IdentityConflict,
        NodeApiError::InvalidField { .. }
        | NodeApiError::Ca(CaError::Csr { .. })
        | NodeApiError::Ca(CaError::ForeignTrustDomain { .. }) => {
            AttestationFailure::InvalidRequest
        }
        NodeApiError::NodeRevoked { .. } => AttestationFailure::Revoked,
        NodeApiError::Grant(_)
        | NodeApiError::NoClientCertificate
        | NodeApiError::UnknownNode(_)
        | NodeApiError::StaleNodeSvid { .. }
        | NodeApiError::EntryNotAuthorized(_)
        | NodeApiError::EntryRevoked { .. }
        | NodeApiError::SvidRevoked { .. }
        | NodeApiError::EntrySuspended { .. }
        | NodeApiError::Audit(_)
        | NodeApiError::Ca(_)
        | NodeApiError::Store(_) => AttestationFailure::Internal,
    }
}

pub fn svid_to_proto(s: &IssuedX509Svid) -> pb::X509Svid {
    pb::X509Svid {
        spiffe_id: s.spiffe_id.to_string(),
        cert_chain: s.cert_chain.clone(),
        expires_at: unix_seconds(s.not_after),
        serial: s.serial.clone(),
    }
}

pub fn entry_to_proto(e: &Entry) -> pb::Entry {
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
    }
}

/// The grant ids of every hop (root first) and the task of a delegated SVID; empty for a
/// plain one. What a grant or task revocation finds it by.
fn grant_lineage(grant: Option<&crate::datastore::Grant>) -> (Vec<String>, Option<String>) {
    match grant {
        Some(g) => (
            g.delegation
                .chain
                .iter()
                .map(|h| h.grant_id.to_string())
                .collect(),
            g.delegation.task_id.as_ref().map(ToString::to_string),
        ),
        None => (Vec::new(), None),
    }
}

/// The issuance record of a node SVID: the node itself is its node.
fn node_svid_record(svid: &IssuedX509Svid) -> IssuedSvid {
    IssuedSvid {
        kind: SvidKind::Node,
        id: svid.serial.clone(),
        spiffe_id: svid.spiffe_id.to_string(),
        entry_id: None,
        node_id: Some(svid.spiffe_id.clone()),
        grant_chain: vec![],
        task_id: None,
        authority_id: svid.authority_id.clone(),
        expires_at: unix_seconds(svid.not_after),
    }
}

/// SHA-256 of a join token, hex: the form the store keeps.
pub fn join_token_digest(token: &str) -> String {
    hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        token.as_bytes(),
    ))
}

impl NodeApi {
    /// The calling node, from its client certificate: the server must still know the node,
    /// and the certificate must be the node SVID it issued last. A workload SVID that
    /// happens to carry a node's SPIFFE ID, or the old SVID of an evicted node, is refused.
    async fn caller(&self, peer: Option<&PeerIdentity>) -> Result<AttestedNode, NodeApiError> {
        let (id, serial) = peer
            .and_then(|p| Some((p.spiffe_id.clone()?, p.serial.clone()?)))
            .ok_or(NodeApiError::NoClientCertificate)?;
        self.check_node_not_revoked(&id)?;
        if self.state.revocations.is_serial_revoked(&serial) {
            return Err(NodeApiError::SvidRevoked { serial });
        }
        let node = self
            .state
            .store
            .get_node(&id)
            .await?
            .ok_or_else(|| NodeApiError::UnknownNode(id.to_string()))?;
        // The current node SVID, or the one before the last renewal (see `previous_serial`).
        if node.serial != serial && node.previous_serial.as_deref() != Some(serial.as_str()) {
            tracing::warn!(node = %id, presented = %serial, "node API call with a certificate that is not the node's current SVID");
            return Err(NodeApiError::StaleNodeSvid {
                spiffe_id: id.to_string(),
                presented: serial,
            });
        }
        if serial == node.serial && node.svid_expires_at <= unix_seconds(self.state.clock.now()) {
            // rustls checks expiry at the handshake only; a long-lived connection must not
            // outlive the SVID it was opened with.
            return Err(NodeApiError::StaleNodeSvid {
                spiffe_id: id.to_string(),
                presented: serial,
            });
        }
        Ok(node)
    }

    /// The kill switch: a revoked node may not call, nor attest again, while the revocation
    /// stands.
    fn check_node_not_revoked(&self, id: &SpiffeId) -> Result<(), NodeApiError> {
        match self
            .state
            .revocations
            .standing(&RevocationHandle::Node(id.clone()))
        {
            Some(sequence) => Err(NodeApiError::NodeRevoked {
                spiffe_id: id.to_string(),
                sequence,
            }),
            None => Ok(()),
        }
    }

    /// Records issued SVIDs so that revocation handles find them. Issuing fails if this
    /// fails: an SVID nobody could revoke by entry, node or grant is not handed out.
    async fn record_issued(&self, svids: &[IssuedSvid]) -> Result<(), NodeApiError> {
        if svids.is_empty() {
            return Ok(());
        }
        Ok(self.state.store.record_issued(svids).await?)
    }

    /// Takes a join token (single use) and checks its expiry.
    async fn check_join_token(
        &self,
        token: &str,
        now: std::time::SystemTime,
    ) -> Result<NodeAttestation, NodeApiError> {
        if token.is_empty() || token.len() > 256 {
            return Err(NodeApiError::InvalidField {
                field: "join_token",
                reason: "must be 1 to 256 bytes".into(),
            });
        }
        let record = self
            .state
            .store
            .take_join_token(&join_token_digest(token))
            .await?
            .ok_or(NodeApiError::UnknownJoinToken)?;
        if record.expires_at <= unix_seconds(now) {
            return Err(NodeApiError::ExpiredJoinToken);
        }
        Ok(NodeAttestation {
            spiffe_id: record.spiffe_id,
            attestation_type: "join_token",
            selectors: Vec::new(),
        })
    }

    async fn entry_for_node(
        &self,
        node: &AttestedNode,
        raw_id: &str,
    ) -> Result<Entry, NodeApiError> {
        let id: EntryId = raw_id.parse().map_err(|e| NodeApiError::InvalidField {
            field: "entry_id",
            reason: format!("{e}"),
        })?;
        let server_id = crate::tls::server_spiffe_id(&self.state.config.trust_domain);
        let entry = match self.state.store.get_entry(&id).await? {
            Some(e) if node_serves(self.state.store.as_ref(), &server_id, node, &e).await? => e,
            _ => return Err(NodeApiError::EntryNotAuthorized(id.to_string())),
        };
        // A revoked handle is never re-issued while it stands.
        if let Some(sequence) = self
            .state
            .revocations
            .standing(&RevocationHandle::Entry(entry.id.clone()))
        {
            return Err(NodeApiError::EntryRevoked {
                id: entry.id.to_string(),
                sequence,
            });
        }
        Ok(entry)
    }

    /// Refuses an entry whose owner is disabled when the server suspends such entries; the
    /// refusal is recorded.
    async fn check_not_suspended(
        &self,
        node: &AttestedNode,
        entry: &Entry,
        kind: &str,
    ) -> Result<(), NodeApiError> {
        let suspend = self.state.config.suspend_disabled_owners;
        if !super::ownership::is_suspended(self.state.store.as_ref(), entry, suspend).await? {
            return Ok(());
        }
        let owner = entry.spec.owner.clone().unwrap_or_default();
        let err = NodeApiError::EntrySuspended {
            entry: entry.id.to_string(),
            owner: owner.clone(),
        };
        self.state
            .audit
            .record_or_log(
                AuditRecord::new(format!("{kind}.refuse"), Actor::from(&node.spiffe_id))
                    .subject(&entry.spec.spiffe_id)
                    .field("entry", entry.id.as_str())
                    .field("node", node.spiffe_id.to_string())
                    .field("owner", owner)
                    .field("reason", err.to_string()),
            )
            .await;
        Err(err)
    }

    fn sign(
        &self,
        csr: &[u8],
        id: &SpiffeId,
        ttl: Duration,
        dns: &[String],
    ) -> Result<IssuedX509Svid, NodeApiError> {
        Ok(self.state.ca.sign_x509_svid(
            &X509SvidRequest {
                csr_der: csr,
                spiffe_id: id,
                ttl,
                dns_names: dns,
            },
            self.state.clock.now(),
        )?)
    }
}

impl NodeApi {
    /// A plain workload SVID: it carries the entry's scopes (its ceiling) in the scope
    /// extension, and no delegation.
    fn sign_plain(&self, csr: &[u8], entry: &Entry) -> Result<IssuedX509Svid, NodeApiError> {
        let scopes = super::grants::entry_scopes(entry);
        let ext = crate::delegation::x509ext::svid_extensions(
            &self.state.config.delegation.oid_base,
            &scopes,
            None,
        );
        Ok(self.state.ca.sign_x509_svid_with_extensions(
            &X509SvidRequest {
                csr_der: csr,
                spiffe_id: &entry.spec.spiffe_id,
                ttl: entry.spec.x509_svid_ttl.as_duration(),
                dns_names: &entry.spec.dns_names,
            },
            &ext,
            self.state.clock.now(),
        )?)
    }

    /// A delegated SVID for `grant_id`, if `authorize_grant_mint` allows it.
    async fn sign_for_grant(
        &self,
        csr: &[u8],
        entry: &Entry,
        grant_id: &str,
    ) -> Result<(IssuedX509Svid, crate::datastore::Grant), NodeApiError> {
        let grant = self.grant_for_mint(entry, grant_id).await?;
        let svid = super::grants::sign_delegated_x509(&self.state, &grant, entry, csr)?;
        Ok((svid, grant))
    }

    /// The grant `grant_id`, if `authorize_grant_mint` allows minting for it now and no
    /// grant of its chain, nor its task, is revoked.
    async fn grant_for_mint(
        &self,
        entry: &Entry,
        grant_id: &str,
    ) -> Result<crate::datastore::Grant, NodeApiError> {
        let grant = super::grants::load_grant(
            self.state.store.as_ref(),
            &super::grants::parse_grant_id(grant_id)?,
        )
        .await?;
        super::grants::authorize_grant_mint(
            self.state.store.as_ref(),
            &grant,
            entry,
            unix_seconds(self.state.clock.now()),
        )
        .await?;
        super::grants::check_not_revoked(&self.state.revocations, &grant)?;
        Ok(grant)
    }
}

#[tonic::async_trait]
impl Node for NodeApi {
    async fn attest(
        &self,
        request: Request<pb::AttestRequest>,
    ) -> Result<Response<pb::AttestResponse>, Status> {
        let remote = request
            .extensions()
            .get::<PeerIdentity>()
            .and_then(|p| p.remote_addr);
        let req = request.into_inner();
        let now = self.state.clock.now();
        let kind = match &req.attestation {
            Some(pb::attest_request::Attestation::JoinToken(_)) => "join_token",
            Some(pb::attest_request::Attestation::X509pop(_)) => "x509pop",
            Some(pb::attest_request::Attestation::Claims(_)) => "claims",
            None => "none",
        };
        // What attestation established before a later check failed, for the audit record.
        let mut attested_as: Option<(SpiffeId, Vec<String>)> = None;
        let result: Result<_, NodeApiError> = async {
            // A bad CSR is refused before any single-use credential (join token, nonce,
            // token jti) is spent on it.
            self.state.ca.check_csr(&req.csr)?;
            let attested = match req.attestation {
                Some(pb::attest_request::Attestation::JoinToken(t)) => {
                    self.check_join_token(&t.token, now).await?
                }
                Some(pb::attest_request::Attestation::X509pop(x)) => self
                    .attestors
                    .x509pop
                    .as_ref()
                    .ok_or(NodeApiError::AttestorNotEnabled("x509pop"))?
                    .attest(&x.cert_chain, &x.nonce, &x.signature, now)?,
                Some(pb::attest_request::Attestation::Claims(c)) => self
                    .attestors
                    .claims
                    .as_ref()
                    .ok_or(NodeApiError::AttestorNotEnabled("claims"))?
                    .attest(&c.token, now)?,
                None => {
                    return Err(NodeApiError::InvalidField {
                        field: "attestation",
                        reason: "missing: a join token, x509pop or claims attestation is required"
                            .into(),
                    })
                }
            };
            attested_as = Some((
                attested.spiffe_id.clone(),
                attested.selectors.iter().map(ToString::to_string).collect(),
            ));
            // A node ID that is also an entry's SPIFFE ID (a node-set alias, a workload) would
            // receive every entry parented to it: refuse it (a template fed by a certificate
            // CN or a claim must not be able to pick such an ID).
            if !self
                .state
                .store
                .list_entries(&EntryFilter {
                    spiffe_id: Some(attested.spiffe_id.clone()),
                    ..Default::default()
                })
                .await?
                .is_empty()
            {
                return Err(NodeApiError::InvalidField {
                    field: "spiffe_id",
                    reason: format!(
                        "{} is the SPIFFE ID of a registration entry, not a node",
                        attested.spiffe_id
                    ),
                });
            }
            if attested.attestation_type != "join_token" {
                // A derived ID never takes over a node attested another way.
                if let Some(existing) = self.state.store.get_node(&attested.spiffe_id).await? {
                    if existing.attestation_type != attested.attestation_type {
                        return Err(NodeApiError::AttestationTypeMismatch {
                            spiffe_id: attested.spiffe_id.to_string(),
                            existing: existing.attestation_type,
                            presented: attested.attestation_type,
                        });
                    }
                }
            }
            self.check_node_not_revoked(&attested.spiffe_id)?;
            let svid = self.sign(
                &req.csr,
                &attested.spiffe_id,
                self.state.config.node_svid_ttl.as_duration(),
                &[],
            )?;
            self.record_issued(&[node_svid_record(&svid)]).await?;
            self.state
                .store
                .upsert_node(AttestedNode {
                    spiffe_id: attested.spiffe_id.clone(),
                    attestation_type: attested.attestation_type.into(),
                    serial: svid.serial.clone(),
                    svid_expires_at: unix_seconds(svid.not_after),
                    attested_at: unix_seconds(now),
                    last_seen_at: unix_seconds(now),
                    selectors: attested.selectors,
                    previous_serial: None,
                })
                .await?;
            Ok(svid)
        }
        .await;
        let remote_text = remote.map(|r| r.to_string());
        let selectors = attested_as
            .as_ref()
            .map(|(_, s)| s.clone())
            .unwrap_or_default();
        let result = match result {
            Ok(svid) => self
                .state
                .audit
                .record(
                    AuditRecord::new("node.attest", Actor::from(&svid.spiffe_id))
                        .subject(&svid.spiffe_id)
                        .field("attestation_type", kind)
                        .field("selectors", &selectors)
                        .field("serial", &svid.serial)
                        .field("expires_at", unix_seconds(svid.not_after))
                        .field("remote", &remote_text),
                )
                .await
                .map(|_| svid)
                .map_err(NodeApiError::from),
            Err(e) => {
                let mut record = AuditRecord::new("node.attest.fail", Actor::Remote(remote))
                    .field("attestation_type", kind)
                    .field("selectors", &selectors)
                    .field("reason", e.to_string())
                    .field("remote", &remote_text);
                if let Some((id, _)) = &attested_as {
                    record = record.subject(id);
                }
                self.state.audit.record_or_log(record).await;
                Err(e)
            }
        };
        match result {
            Ok(svid) => {
                self.state.metrics.node_attested(kind);
                tracing::info!(node = %svid.spiffe_id, serial = %svid.serial, attestation = kind, ?remote, "node attested");
                Ok(Response::new(pb::AttestResponse {
                    svid: Some(svid_to_proto(&svid)),
                    bundle: Some(bundle_to_proto(&self.state.ca.bundle())),
                }))
            }
            Err(e) => {
                self.state
                    .metrics
                    .attestation_failed(kind, attestation_failure(&e));
                tracing::warn!(?remote, attestation = kind, reason = %e, "node attestation refused");
                Err(e.into())
            }
        }
    }

    async fn x509_pop_challenge(
        &self,
        request: Request<pb::X509PopChallengeRequest>,
    ) -> Result<Response<pb::X509PopChallengeResponse>, Status> {
        let remote = request
            .extensions()
            .get::<PeerIdentity>()
            .and_then(|p| p.remote_addr);
        let result = self
            .attestors
            .x509pop
            .as_ref()
            .ok_or(NodeApiError::AttestorNotEnabled("x509pop"))
            .and_then(|a| {
                a.challenge(&request.get_ref().cert_chain, self.state.clock.now())
                    .map_err(NodeApiError::from)
            });
        match result {
            Ok(c) => Ok(Response::new(pb::X509PopChallengeResponse {
                nonce: c.nonce,
                context: c.context,
                expires_at: c.expires_at,
            })),
            Err(e) => {
                self.state
                    .metrics
                    .attestation_failed("x509pop", attestation_failure(&e));
                tracing::warn!(?remote, attestation = "x509pop", reason = %e, "node attestation refused");
                self.state
                    .audit
                    .record_or_log(
                        AuditRecord::new("node.attest.fail", Actor::Remote(remote))
                            .field("attestation_type", "x509pop")
                            .field("stage", "challenge")
                            .field("selectors", Vec::<String>::new())
                            .field("reason", e.to_string())
                            .field("remote", remote.map(|r| r.to_string())),
                    )
                    .await;
                Err(e.into())
            }
        }
    }

    async fn renew_node_svid(
        &self,
        request: Request<pb::RenewNodeSvidRequest>,
    ) -> Result<Response<pb::RenewNodeSvidResponse>, Status> {
        let presented = request
            .extensions()
            .get::<PeerIdentity>()
            .and_then(|p| p.serial.clone());
        let mut node = self
            .caller(request.extensions().get::<PeerIdentity>())
            .await?;
        let svid = self.sign(
            &request.get_ref().csr,
            &node.spiffe_id,
            self.state.config.node_svid_ttl.as_duration(),
            &[],
        )?;
        self.record_issued(&[node_svid_record(&svid)]).await?;
        // Keep accepting the SVID the node holds now until its next renewal: if this answer
        // is lost, the node can still call (and renew) with it. A node that renews with its
        // previous SVID never received the current one, so that one is dropped.
        if presented.as_deref() == Some(node.serial.as_str()) {
            node.previous_serial = Some(std::mem::take(&mut node.serial));
        }
        node.serial = svid.serial.clone();
        node.svid_expires_at = unix_seconds(svid.not_after);
        node.last_seen_at = unix_seconds(self.state.clock.now());
        self.state
            .audit
            .record(
                AuditRecord::new("node.svid.renew", Actor::from(&node.spiffe_id))
                    .subject(&node.spiffe_id)
                    .field("serial", &svid.serial)
                    .field("previous_serial", &presented)
                    .field("expires_at", unix_seconds(svid.not_after)),
            )
            .await
            .map_err(NodeApiError::from)?;
        self.state
            .store
            .upsert_node(node)
            .await
            .map_err(NodeApiError::from)?;
        tracing::info!(node = %svid.spiffe_id, serial = %svid.serial, "node SVID renewed");
        Ok(Response::new(pb::RenewNodeSvidResponse {
            svid: Some(svid_to_proto(&svid)),
        }))
    }

    async fn sync_entries(
        &self,
        request: Request<pb::SyncEntriesRequest>,
    ) -> Result<Response<pb::SyncEntriesResponse>, Status> {
        let node = self
            .caller(request.extensions().get::<PeerIdentity>())
            .await?;
        let fetched = request.into_inner().fetched_entry_ids;
        let server_id = crate::tls::server_spiffe_id(&self.state.config.trust_domain);
        let mut entries = entries_for_node(self.state.store.as_ref(), &server_id, &node)
            .await
            .map_err(NodeApiError::from)?;
        self.note_fetched(&entries, fetched).await?;
        if self.state.config.suspend_disabled_owners {
            // A suspended entry is withdrawn from the node: it drops the entry's SVIDs and its
            // workloads get no identity until the owner is enabled again.
            let disabled: std::collections::HashSet<String> = self
                .state
                .store
                .list_owners()
                .await
                .map_err(NodeApiError::from)?
                .into_iter()
                .filter(|o| o.disabled)
                .map(|o| o.owner)
                .collect();
            entries.retain(|e| e.spec.owner.as_ref().is_none_or(|o| !disabled.contains(o)));
        }
        let agents: std::collections::BTreeSet<&SpiffeId> =
            entries.iter().map(|e| &e.spec.spiffe_id).collect();
        let grants = super::grants::live_grants_for(
            self.state.store.as_ref(),
            &agents,
            unix_seconds(self.state.clock.now()),
        )
        .await
        .map_err(NodeApiError::from)?
        .into_iter()
        .filter(|g| super::grants::check_not_revoked(&self.state.revocations, g).is_ok())
        .collect::<Vec<_>>();
        let revocations = &self.state.revocations;
        Ok(Response::new(pb::SyncEntriesResponse {
            entries: entries
                .iter()
                .filter(|e| {
                    revocations
                        .standing(&RevocationHandle::Entry(e.id.clone()))
                        .is_none()
                })
                .map(entry_to_proto)
                .collect(),
            bundle: Some(bundle_to_proto(&self.state.ca.bundle())),
            grants: grants
                .iter()
                .map(super::grants::grant_to_node_proto)
                .collect(),
        }))
    }

    async fn mint_x509_svids(
        &self,
        request: Request<pb::MintX509SvidsRequest>,
    ) -> Result<Response<pb::MintX509SvidsResponse>, Status> {
        let node = self
            .caller(request.extensions().get::<PeerIdentity>())
            .await?;
        let params = request.into_inner().params;
        if params.len() > MAX_BATCH {
            return Err(NodeApiError::InvalidField {
                field: "params",
                reason: format!("{} CSRs in one call; at most {MAX_BATCH}", params.len()),
            }
            .into());
        }
        let mut results = Vec::with_capacity(params.len());
        let mut records = Vec::new();
        let mut issued = Vec::new();
        let mut revocable = Vec::new();
        for p in params {
            let result: Result<pb::mint_result::Result, NodeApiError> = async {
                let entry = self.entry_for_node(&node, &p.entry_id).await?;
                self.check_not_suspended(&node, &entry, "x509svid").await?;
                let started = std::time::Instant::now();
                let (svid, grant) = if p.grant_id.is_empty() {
                    (self.sign_plain(&p.csr, &entry)?, None)
                } else {
                    let (svid, grant) = self.sign_for_grant(&p.csr, &entry, &p.grant_id).await?;
                    (svid, Some(grant))
                };
                self.state
                    .metrics
                    .svid_minted(MintedKind::X509, started.elapsed());
                let expires_at = unix_seconds(svid.not_after);
                let (grant_chain, task_id) = grant_lineage(grant.as_ref());
                tracing::debug!(spiffe_id = %svid.spiffe_id, serial = %svid.serial, entry = %entry.id, grant = ?grant.as_ref().map(|g| g.id.to_string()), node = %node.spiffe_id, "X.509-SVID issued");
                records.push(
                    issuance_record("x509svid.issue", &node, &entry, expires_at)
                        .field("serial", &svid.serial)
                        .field("ttl", entry.spec.x509_svid_ttl.as_secs())
                        .field("dns_names", &entry.spec.dns_names)
                        .field("grant_chain", &grant_chain)
                        .field("task", &task_id),
                );
                issued.push(EntryIssuance {
                    entry_id: entry.id.clone(),
                    kind: "x509",
                    serial: svid.serial.clone(),
                    node: node.spiffe_id.to_string(),
                    expires_at,
                });
                revocable.push(IssuedSvid {
                    kind: SvidKind::X509,
                    id: svid.serial.clone(),
                    spiffe_id: svid.spiffe_id.to_string(),
                    entry_id: Some(entry.id.to_string()),
                    node_id: Some(node.spiffe_id.clone()),
                    grant_chain,
                    task_id,
                    authority_id: svid.authority_id.clone(),
                    expires_at,
                });
                Ok(pb::mint_result::Result::Svid(svid_to_proto(&svid)))
            }
            .await;
            results.push(pb::MintResult {
                result: Some(
                    result.unwrap_or_else(|e| pb::mint_result::Result::Error(e.to_string())),
                ),
            });
        }
        // Every SVID handed out is on record first (audit, and what revocation resolves):
        // if a record cannot be written, none is handed out (the node agent asks again).
        self.record_issued(&revocable).await?;
        self.state
            .audit
            .record_all(records)
            .await
            .map_err(NodeApiError::from)?;
        self.note_issued(issued).await;
        Ok(Response::new(pb::MintX509SvidsResponse { results }))
    }

    async fn mint_jwt_svid(
        &self,
        request: Request<pb::MintJwtSvidRequest>,
    ) -> Result<Response<pb::MintJwtSvidResponse>, Status> {
        let node = self
            .caller(request.extensions().get::<PeerIdentity>())
            .await?;
        let req = request.into_inner();
        let entry = self.entry_for_node(&node, &req.entry_id).await?;
        validate_audience(&req.audience)?;
        self.check_not_suspended(&node, &entry, "jwtsvid").await?;
        let started = std::time::Instant::now();
        let (jwt, grant) = if req.grant_id.is_empty() {
            // A plain JWT-SVID carries the entry's scopes (RFC 8693 `scope`).
            let extra =
                crate::delegation::claims::to_claims(&super::grants::entry_scopes(&entry), None);
            let jwt = self
                .state
                .ca
                .sign_jwt_svid_with_claims(
                    &entry.spec.spiffe_id,
                    &req.audience,
                    entry.spec.jwt_svid_ttl.as_duration(),
                    self.state.clock.now(),
                    &extra,
                )
                .map_err(NodeApiError::from)?;
            (jwt, None)
        } else {
            let grant = self.grant_for_mint(&entry, &req.grant_id).await?;
            let jwt = super::grants::sign_delegated_jwt(&self.state, &grant, &entry, &req.audience)
                .map_err(NodeApiError::from)?;
            (jwt, Some(grant))
        };
        let (grant_chain, task_id) = grant_lineage(grant.as_ref());
        self.record_issued(&[IssuedSvid {
            kind: SvidKind::Jwt,
            id: jwt.jti.clone(),
            spiffe_id: entry.spec.spiffe_id.to_string(),
            entry_id: Some(entry.id.to_string()),
            node_id: Some(node.spiffe_id.clone()),
            grant_chain: grant_chain.clone(),
            task_id: task_id.clone(),
            authority_id: jwt.key_id.clone(),
            expires_at: unix_seconds(jwt.expires_at),
        }])
        .await?;
        self.state
            .metrics
            .svid_minted(MintedKind::Jwt, started.elapsed());
        tracing::debug!(spiffe_id = %entry.spec.spiffe_id, entry = %entry.id, "JWT-SVID issued");
        let expires_at = unix_seconds(jwt.expires_at);
        // The token's id, not the token: the log must not hold a usable credential.
        let jti = jwt.jti.clone();
        self.state
            .audit
            .record(
                issuance_record("jwtsvid.issue", &node, &entry, expires_at)
                    .field("jti", &jti)
                    .field("audience", &req.audience)
                    .field("ttl", entry.spec.jwt_svid_ttl.as_secs())
                    .field("grant_chain", &grant_chain)
                    .field("task", &task_id),
            )
            .await
            .map_err(NodeApiError::from)?;
        self.note_issued(vec![EntryIssuance {
            entry_id: entry.id.clone(),
            kind: "jwt",
            serial: jti,
            node: node.spiffe_id.to_string(),
            expires_at,
        }])
        .await;
        Ok(Response::new(pb::MintJwtSvidResponse {
            token: jwt.token,
            expires_at: unix_seconds(jwt.expires_at),
        }))
    }

    async fn fetch_crls(
        &self,
        request: Request<agentd_proto::revocation::FetchCrlsRequest>,
    ) -> Result<Response<agentd_proto::revocation::FetchCrlsResponse>, Status> {
        self.caller(request.extensions().get::<PeerIdentity>())
            .await?;
        let crls = super::admin::current_crls(&self.state).map_err(NodeApiError::from)?;
        Ok(Response::new(agentd_proto::revocation::FetchCrlsResponse {
            crls,
        }))
    }

    type WatchRevocationsStream = FeedStream;

    async fn watch_revocations(
        &self,
        request: Request<agentd_proto::revocation::WatchRevocationsRequest>,
    ) -> Result<Response<FeedStream>, Status> {
        let node = self
            .caller(request.extensions().get::<PeerIdentity>())
            .await?;
        let after = request.get_ref().after_sequence;
        tracing::debug!(node = %node.spiffe_id, after, "revocation feed subscribed");
        Ok(Response::new(feed_stream(
            self.state.revocations.clone(),
            after,
            HEARTBEAT,
            self.stop.clone(),
        )))
    }

    async fn mint_delegation_token(
        &self,
        request: Request<pb::MintDelegationTokenRequest>,
    ) -> Result<Response<pb::MintDelegationTokenResponse>, Status> {
        let node = self
            .caller(request.extensions().get::<PeerIdentity>())
            .await?;
        let req = request.into_inner();
        let entry = self.entry_for_node(&node, &req.entry_id).await?;
        let token = super::grants::mint_delegation_token(&self.state, &entry, &req)
            .await
            .map_err(|e| {
                tracing::warn!(from = %entry.spec.spiffe_id, to = %req.to, reason = %e, "delegation refused");
                e
            })?;
        tracing::info!(from = %entry.spec.spiffe_id, to = %req.to, grant = %req.grant_id, "delegation token issued");
        self.state
            .audit
            .record(
                AuditRecord::new("delegation.offer", Actor::from(&entry.spec.spiffe_id))
                    .subject(&entry.spec.spiffe_id)
                    .field("node", node.spiffe_id.to_string())
                    .field("grant", &req.grant_id)
                    .field("to", &req.to)
                    .field("scopes", &req.scopes)
                    .field("jti", &token.jti)
                    .field("expires_at", unix_seconds(token.expires_at)),
            )
            .await
            .map_err(NodeApiError::from)?;
        Ok(Response::new(pb::MintDelegationTokenResponse {
            token: token.token,
            expires_at: unix_seconds(token.expires_at),
        }))
    }

    async fn exchange_delegation_token(
        &self,
        request: Request<pb::ExchangeDelegationTokenRequest>,
    ) -> Result<Response<pb::ExchangeDelegationTokenResponse>, Status> {
        let node = self
            .caller(request.extensions().get::<PeerIdentity>())
            .await?;
        let req = request.into_inner();
        let entry = self.entry_for_node(&node, &req.entry_id).await?;
        let grant = super::grants::exchange_delegation_token(&self.state, &entry, &req.token)
            .await
            .map_err(|e| {
                tracing::warn!(agent = %entry.spec.spiffe_id, reason = %e, "delegation token exchange refused");
                e
            })?;
        tracing::info!(agent = %entry.spec.spiffe_id, grant = %grant.id, parent = ?grant.parent_grant_id.as_ref().map(ToString::to_string), "delegated grant created by exchange");
        self.state
            .audit
            .record(
                super::grants::grant_audit(
                    AuditRecord::new("delegation.exchange", Actor::from(&entry.spec.spiffe_id)),
                    &grant,
                )
                .field("node", node.spiffe_id.to_string()),
            )
            .await
            .map_err(NodeApiError::from)?;
        Ok(Response::new(pb::ExchangeDelegationTokenResponse {
            grant: Some(super::grants::grant_to_node_proto(&grant)),
        }))
    }
}

/// The fields every issuance record carries.
fn issuance_record(
    action: &str,
    node: &AttestedNode,
    entry: &Entry,
    expires_at: i64,
) -> AuditRecord {
    AuditRecord::new(action, Actor::from(&node.spiffe_id))
        .subject(&entry.spec.spiffe_id)
        .field("entry", entry.id.as_str())
        .field("node", node.spiffe_id.to_string())
        .field("scopes", &entry.spec.scopes)
        .field("owner", &entry.spec.owner)
        .field("expires_at", expires_at)
}

/// Most fetched entry ids taken from one sync request.
const MAX_FETCHED_IDS: usize = 10_000;

impl NodeApi {
    /// Records `last_issued` and the live SVIDs; a failure costs only the statistics.
    async fn note_issued(&self, issued: Vec<EntryIssuance>) {
        let now = unix_seconds(self.state.clock.now());
        if let Err(e) = self.state.store.note_issued(issued, now).await {
            tracing::warn!(error = %e, "recording entry issuance failed");
        }
    }

    /// Records `last_fetched` for the entries the node reports, among those it serves (a node
    /// cannot vouch for another node's workloads).
    async fn note_fetched(
        &self,
        served: &[Entry],
        reported: Vec<String>,
    ) -> Result<(), NodeApiError> {
        if reported.len() > MAX_FETCHED_IDS {
            return Err(NodeApiError::InvalidField {
                field: "fetched_entry_ids",
                reason: format!("{} ids; at most {MAX_FETCHED_IDS}", reported.len()),
            });
        }
        let reported: std::collections::HashSet<String> = reported.into_iter().collect();
        let ids: Vec<EntryId> = served
            .iter()
            .filter(|e| reported.contains(e.id.as_str()))
            .map(|e| e.id.clone())
            .collect();
        let now = unix_seconds(self.state.clock.now());
        if let Err(e) = self.state.store.note_fetched(ids, now).await {
            tracing::warn!(error = %e, "recording entry fetches failed");
        }
        Ok(())
    }
}

/// Node-set aliases (as SPIRE's node aliases): an entry whose parent is the server's own ID
/// names a set of nodes by node selectors (`x509pop:...`, `claims:...`). Its SPIFFE ID can
/// then be the parent of workload entries, which every node whose attested selectors include
/// all of the alias's selectors serves. A node with no selectors (join token) is in no set.
fn aliases_of<'a>(
    all: &'a [Entry],
    server_id: &SpiffeId,
    node: &AttestedNode,
) -> impl Iterator<Item = &'a Entry> {
    let server_id = server_id.clone();
    let node_selectors = node.selectors.clone();
    all.iter().filter(move |e| {
        e.spec.parent_id == server_id
            && agentd_attestor::selector::all_present(&e.spec.selectors, &node_selectors)
    })
}

/// The entries a node serves: those parented to the node itself, and those parented to a
/// node-set alias the node belongs to.
pub async fn entries_for_node(
    store: &dyn crate::datastore::DataStore,
    server_id: &SpiffeId,
    node: &AttestedNode,
) -> Result<Vec<Entry>, DataStoreError> {
    let all = store.list_entries(&EntryFilter::default()).await?;
    let aliases: std::collections::HashSet<&SpiffeId> = aliases_of(&all, server_id, node)
        .map(|e| &e.spec.spiffe_id)
        .collect();
    let served = all
        .iter()
        .filter(|e| e.spec.parent_id == node.spiffe_id || aliases.contains(&e.spec.parent_id))
        .cloned()
        .collect();
    Ok(served)
}

/// Whether `node` may obtain SVIDs for `entry`.
pub async fn node_serves(
    store: &dyn crate::datastore::DataStore,
    server_id: &SpiffeId,
    node: &AttestedNode,
    entry: &Entry,
) -> Result<bool, DataStoreError> {
    if entry.spec.parent_id == node.spiffe_id {
        return Ok(true);
    }
    if node.selectors.is_empty() {
        return Ok(false);
    }
    let candidates = store
        .list_entries(&EntryFilter {
            spiffe_id: Some(entry.spec.parent_id.clone()),
            parent_id: Some(server_id.clone()),
            ..Default::default()
        })
        .await?;
    let is_member = aliases_of(&candidates, server_id, node).next().is_some();
    Ok(is_member)
}

/// JWT-SVID spec, section 3: `aud` holds one or more audiences; we accept 1 to 32 non-empty
/// printable strings of at most 1024 bytes.
pub fn validate_audience(audience: &[String]) -> Result<(), NodeApiError> {
    let bad = |reason: String| NodeApiError::InvalidField {
        field: "audience",
        reason,
    };
    if audience.is_empty() || audience.len() > 32 {
        return Err(bad(format!(
            "{} audiences; 1 to 32 required",
            audience.len()
        )));
    }
    // Bounds what one cached JWT-SVID can cost the node agent.
    let total: usize = audience.iter().map(String::len).sum();
    if total > 4096 {
        return Err(bad(format!(
            "{total} bytes of audiences; at most 4096 in all"
        )));
    }
    for a in audience {
        if a.is_empty() || a.len() > 1024 || a.chars().any(char::is_control) {
            return Err(bad(format!(
                "{:?} must be 1 to 1024 printable bytes",
                a.chars().take(40).collect::<String>()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::{DataStore, EntrySpec, SledStore};
    use crate::ttl::Ttl;

    fn spec(id: &str, parent: &str, selectors: &[&str]) -> EntrySpec {
        EntrySpec {
            spiffe_id: SpiffeId::new(id).unwrap(),
            parent_id: SpiffeId::new(parent).unwrap(),
            selectors: selectors.iter().map(|s| s.parse().unwrap()).collect(),
            x509_svid_ttl: Ttl::from_secs(3600).unwrap(),
            jwt_svid_ttl: Ttl::from_secs(300).unwrap(),
            dns_names: vec![],
            hint: String::new(),
            scopes: vec![],
            owner: None,
        }
    }

    fn node(id: &str, selectors: &[&str]) -> AttestedNode {
        AttestedNode {
            spiffe_id: SpiffeId::new(id).unwrap(),
            attestation_type: "x509pop".into(),
            serial: "1".into(),
            svid_expires_at: 0,
            attested_at: 0,
            last_seen_at: 0,
            selectors: selectors.iter().map(|s| s.parse().unwrap()).collect(),
            previous_serial: None,
        }
    }

    /// A server state on a temp dir, with `suspend_disabled_owners` as given.
    async fn state(dir: &std::path::Path, suspend: bool) -> Arc<ServerState> {
        use crate::clock::{Clock, ManualClock};
        let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(
            std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        ));
        let config = crate::server::ServerConfig::try_from(crate::server::RawServerConfig {
            suspend_disabled_owners: Some(suspend),
            data_dir: Some(dir.to_path_buf()),
            ..Default::default()
        })
        .unwrap();
        let store: Arc<dyn crate::datastore::DataStore> =
            Arc::new(SledStore::open(&dir.join("datastore")).unwrap());
        let ca = crate::ca::CertificateAuthority::load_or_create(
            &crate::ca::CaConfig {
                trust_domain: config.trust_domain.clone(),
                key_dir: dir.join("keys"),
                ca_ttl: config.ca_ttl,
                upstream: None,
                organization: config.organization.clone(),
            },
            clock.as_ref(),
        )
        .unwrap();
        let audit = Arc::new(crate::audit::Audit::new(store.clone(), clock.clone(), None).unwrap());
        let revocations = Arc::new(
            crate::revocation::log::RevocationLog::open(store.clone())
                .await
                .unwrap(),
        );
        Arc::new(ServerState {
            revocations,
            config,
            store,
            ca: Arc::new(ca),
            clock,
            node_api_address: "127.0.0.1:0".parse().unwrap(),
            audit,
            metrics: Arc::new(crate::telemetry::ServerMetrics::new()),
            readiness: crate::telemetry::Readiness::new(&[]),
        })
    }

    #[tokio::test]
    async fn a_suspended_entry_is_refused_and_the_refusal_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let st = state(dir.path(), true).await;
        let api = NodeApi::new(st.clone(), CancellationToken::new());
        let n = node("spiffe://example.org/node/a", &[]);
        let mut s = spec(
            "spiffe://example.org/agent/x",
            "spiffe://example.org/node/a",
            &["unix:uid:1"],
        );
        s.owner = Some("alice@example.com".into());
        let entry = st.store.create_entry(s, 0).await.unwrap();
        api.check_not_suspended(&n, &entry, "x509svid")
            .await
            .unwrap();

        st.store
            .set_owner_disabled("alice@example.com", true, 1)
            .await
            .unwrap();
        let err = api
            .check_not_suspended(&n, &entry, "x509svid")
            .await
            .unwrap_err();
        assert!(matches!(err, NodeApiError::EntrySuspended { .. }), "{err}");
        assert_eq!(Status::from(err).code(), tonic::Code::PermissionDenied);
        let records = st
            .audit
            .query(&crate::audit::AuditQuery {
                action: Some("x509svid.refuse".into()),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].actor, "spiffe://example.org/node/a");
        assert_eq!(
            records[0].subject.as_deref(),
            Some("spiffe://example.org/agent/x")
        );
        assert_eq!(records[0].fields["owner"], "alice@example.com");

        // Without the setting, a disabled owner's entry is only flagged.
        let dir = tempfile::tempdir().unwrap();
        let st = state(dir.path(), false).await;
        let api = NodeApi::new(st.clone(), CancellationToken::new());
        let entry = st.store.create_entry(entry.spec.clone(), 0).await.unwrap();
        st.store
            .set_owner_disabled("alice@example.com", true, 1)
            .await
            .unwrap();
        api.check_not_suspended(&n, &entry, "jwtsvid")
            .await
            .unwrap();
    }

    #[test]
    fn audiences_are_bounded_in_number_and_in_bytes() {
        assert!(validate_audience(&["a".into()]).is_ok());
        assert!(validate_audience(&[]).is_err());
        assert!(validate_audience(&vec!["a".to_string(); 33]).is_err());
        assert!(validate_audience(&["".into()]).is_err());
        let big = vec!["x".repeat(1000); 5];
        let err = validate_audience(&big).unwrap_err().to_string();
        assert!(err.contains("4096"), "{err}");
    }

    #[tokio::test]
    async fn node_set_aliases_give_entries_to_every_matching_node() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let server = "spiffe://example.org/agentd/server";
        let server_id = SpiffeId::new(server).unwrap();
        let ca = "x509pop:ca:fingerprint:aa";
        // Alias: every node whose certificate comes from CA aa.
        store
            .create_entry(spec("spiffe://example.org/nodes/fleet", server, &[ca]), 0)
            .await
            .unwrap();
        // Alias: only node a, by its CN, and CA.
        store
            .create_entry(
                spec(
                    "spiffe://example.org/nodes/a-only",
                    server,
                    &[ca, "x509pop:subject:cn:a"],
                ),
                0,
            )
            .await
            .unwrap();
        let fleet_wide = store
            .create_entry(
                spec(
                    "spiffe://example.org/agent/everywhere",
                    "spiffe://example.org/nodes/fleet",
                    &["unix:uid:1"],
                ),
                0,
            )
            .await
            .unwrap();
        let a_only = store
            .create_entry(
                spec(
                    "spiffe://example.org/agent/on-a",
                    "spiffe://example.org/nodes/a-only",
                    &["unix:uid:1"],
                ),
                0,
            )
            .await
            .unwrap();
        let direct = store
            .create_entry(
                spec(
                    "spiffe://example.org/agent/direct-b",
                    "spiffe://example.org/node/b",
                    &["unix:uid:1"],
                ),
                0,
            )
            .await
            .unwrap();

        let a = node("spiffe://example.org/node/a", &[ca, "x509pop:subject:cn:a"]);
        let b = node("spiffe://example.org/node/b", &[ca, "x509pop:subject:cn:b"]);
        let joined = node("spiffe://example.org/node/j", &[]);
        let ids = |v: Vec<Entry>| {
            let mut v: Vec<String> = v
                .iter()
                .map(|e| e.spec.spiffe_id.path().to_string())
                .collect();
            v.sort();
            v
        };
        assert_eq!(
            ids(entries_for_node(&store, &server_id, &a).await.unwrap()),
            ["/agent/everywhere", "/agent/on-a"]
        );
        assert_eq!(
            ids(entries_for_node(&store, &server_id, &b).await.unwrap()),
            ["/agent/direct-b", "/agent/everywhere"]
        );
        assert!(entries_for_node(&store, &server_id, &joined)
            .await
            .unwrap()
            .is_empty());
        // Minting follows the same rule.
        assert!(node_serves(&store, &server_id, &a, &a_only).await.unwrap());
        assert!(!node_serves(&store, &server_id, &b, &a_only).await.unwrap());
        assert!(node_serves(&store, &server_id, &b, &fleet_wide)
            .await
            .unwrap());
        assert!(node_serves(&store, &server_id, &b, &direct).await.unwrap());
        assert!(!node_serves(&store, &server_id, &a, &direct).await.unwrap());
        assert!(!node_serves(&store, &server_id, &joined, &fleet_wide)
            .await
            .unwrap());
    }
}
