//! The admin API, served on the server's Unix socket for the CLI. Requests carry raw strings;
//! every field is parsed here and a bad one is named in the error.

use std::collections::BTreeSet;
use std::sync::Arc;

use agentd_attestor::Selector;
use agentd_proto::admin as pb;
use agentd_proto::admin::admin_server::{Admin, AdminServer};
use spiffe::SpiffeId;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

use super::node_api::join_token_digest;
use super::{ServerError, ServerState};
use crate::clock::unix_seconds;
use crate::datastore::{
    AttestedNode, DataStoreError, Entry, EntryFilter, EntryId, EntrySpec, JoinToken,
};
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
            AdminError::Store(_) => Status::internal(msg),
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
    };
    tonic::transport::Server::builder()
        .add_service(AdminServer::new(AdminApi { state }))
        .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
        .await
        .map_err(|e| ServerError::Serve {
            what: "admin API",
            reason: e.to_string(),
        })
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
        self.refuse_node_id(&spec.spiffe_id).await?;
        let entry = self
            .state
            .store
            .create_entry(spec, unix_seconds(self.state.clock.now()))
            .await
            .map_err(AdminError::from)?;
        tracing::info!(?uid, entry = %entry.id, spiffe_id = %entry.spec.spiffe_id, "entry created");
        Ok(Response::new(entry_to_proto(&entry)))
    }

    async fn get_entry(
        &self,
        request: Request<pb::GetEntryRequest>,
    ) -> Result<Response<pb::Entry>, Status> {
        let id = parse_entry_id(&request.get_ref().id)?;
        let entry = self.load_entry(&id).await?;
        Ok(Response::new(entry_to_proto(&entry)))
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
        let entries = self
            .state
            .store
            .list_entries(&filter)
            .await
            .map_err(AdminError::from)?;
        Ok(Response::new(pb::ListEntriesResponse {
            entries: entries.iter().map(entry_to_proto).collect(),
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
        self.refuse_node_id(&spec.spiffe_id).await?;
        let entry = self
            .state
            .store
            .update_entry(&id, spec)
            .await
            .map_err(AdminError::from)?;
        tracing::info!(?uid, entry = %entry.id, revision = entry.revision, "entry updated");
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
        Ok(Response::new(node_to_proto(&node)))
    }

    async fn create_grant(
        &self,
        request: Request<pb::CreateGrantRequest>,
    ) -> Result<Response<pb::Grant>, Status> {
        let uid = caller_uid(&request);
        let grant = super::grants::create_root_grant(&self.state, request.into_inner()).await?;
        tracing::info!(?uid, grant = %grant.id, principal = %grant.delegation.principal, agent = ?grant.agent().map(ToString::to_string), scopes = %grant.delegation.scopes, expires_at = grant.delegation.expires_at, "grant created");
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
    fn hint_and_owner_limits() {
        assert!(parse_hint(&"x".repeat(1025)).is_err());
        assert_eq!(parse_owner("").unwrap(), None);
        assert!(parse_owner("alice smith").is_err());
    }
}
