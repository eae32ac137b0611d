//! Registration entries: create, show, list, update, delete, and their batch forms.

use agentd_proto::admin as pb;
use spiffe::SpiffeId;
use tonic::{Request, Response, Status};

use super::parse::parse_entry_id;
use super::{caller_uid, invalid, AdminApi, AdminError};
use super::{parse_dns_names, parse_hint, parse_owner, parse_scopes, parse_selectors};
use crate::audit::{Actor, AuditRecord};
use crate::clock::unix_seconds;
use crate::datastore::{Entry, EntryFilter, EntryId, EntrySpec};
use crate::revocation::RevocationHandle;
use crate::server::ownership::{self, EntryStatus, LifecycleFilter};

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
        federates_with: e
            .spec
            .federates_with
            .iter()
            .map(|td| td.as_str().to_string())
            .collect(),
        resources: e.spec.resources.iter().map(ToString::to_string).collect(),
        ..Default::default()
    }
}

pub(super) fn status_to_proto(s: &EntryStatus) -> pb::Entry {
    pb::Entry {
        last_issued: s.activity.last_issued.unwrap_or(0),
        last_fetched: s.activity.last_fetched.unwrap_or(0),
        owner_disabled: s.owner_disabled,
        suspended: s.suspended,
        ..entry_to_proto(&s.entry)
    }
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
        .field(
            "federates_with",
            e.spec
                .federates_with
                .iter()
                .map(|td| td.as_str())
                .collect::<Vec<_>>(),
        )
        .field(
            "resources",
            e.spec
                .resources
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
        )
        .field("revision", e.revision)
}

impl AdminApi {
    /// The sequence of the entry's standing revocation; 0 when it is not revoked.
    pub(super) fn revoked_by(&self, id: &EntryId) -> u64 {
        self.state
            .revocations
            .standing(&RevocationHandle::Entry(id.clone()))
            .unwrap_or(0)
    }

    pub(super) async fn load_entry(&self, id: &EntryId) -> Result<Entry, AdminError> {
        self.state
            .store
            .get_entry(id)
            .await?
            .ok_or_else(|| AdminError::EntryNotFound(id.to_string()))
    }

    /// An entry must not carry an attested node's ID: that node would then also receive
    /// every entry parented to the entry.
    pub(super) async fn refuse_node_id(&self, id: &SpiffeId) -> Result<(), AdminError> {
        if self.state.store.get_node(id).await?.is_some() {
            return Err(invalid(
                "spiffe_id",
                format!("{id} is the SPIFFE ID of an attested node"),
            ));
        }
        Ok(())
    }

    /// With `require_owner = true` every entry names its accountable owner.
    pub(super) fn check_owner(&self, spec: &EntrySpec) -> Result<(), AdminError> {
        if self.state.config.require_owner && spec.owner.is_none() {
            return Err(invalid(
                "owner",
                "is required: this server is configured with require_owner = true",
            ));
        }
        Ok(())
    }
}

pub(super) async fn create(
    api: &AdminApi,
    request: Request<pb::EntrySpec>,
) -> Result<Response<pb::Entry>, Status> {
    let uid = caller_uid(&request);
    create_one(api, uid, request.into_inner())
        .await
        .map(Response::new)
}

/// Most entries or ids in one batch call: a page the CLI sends, well under the message limit.
pub const MAX_BATCH_ENTRIES: usize = 1000;

fn check_batch_len(field: &'static str, n: usize) -> Result<(), Status> {
    if n > MAX_BATCH_ENTRIES {
        return Err(invalid(
            field,
            format!("{n} in one call; at most {MAX_BATCH_ENTRIES} (send several pages)"),
        )
        .into());
    }
    Ok(())
}

fn entry_result(r: Result<pb::Entry, Status>) -> pb::EntryResult {
    match r {
        Ok(entry) => pb::EntryResult {
            entry: Some(entry),
            code: 0,
            message: String::new(),
        },
        Err(s) => pb::EntryResult {
            entry: None,
            code: s.code() as i32,
            message: s.message().to_string(),
        },
    }
}

/// Each entry on its own, as `create` would: a refusal is that entry's result.
pub(super) async fn batch_create(
    api: &AdminApi,
    request: Request<pb::BatchCreateEntriesRequest>,
) -> Result<Response<pb::BatchEntriesResponse>, Status> {
    let uid = caller_uid(&request);
    let specs = request.into_inner().entries;
    check_batch_len("entries", specs.len())?;
    let mut results = Vec::with_capacity(specs.len());
    for spec in specs {
        results.push(entry_result(create_one(api, uid, spec).await));
    }
    Ok(Response::new(pb::BatchEntriesResponse { results }))
}

/// Each id on its own, as `delete` would.
pub(super) async fn batch_delete(
    api: &AdminApi,
    request: Request<pb::BatchDeleteEntriesRequest>,
) -> Result<Response<pb::BatchEntriesResponse>, Status> {
    let uid = caller_uid(&request);
    let ids = request.into_inner().ids;
    check_batch_len("ids", ids.len())?;
    let mut results = Vec::with_capacity(ids.len());
    for id in ids {
        results.push(entry_result(delete_one(api, uid, &id).await));
    }
    Ok(Response::new(pb::BatchEntriesResponse { results }))
}

async fn create_one(
    api: &AdminApi,
    uid: Option<u32>,
    spec: pb::EntrySpec,
) -> Result<pb::Entry, Status> {
    let spec = api.spec_from_proto(spec)?;
    api.check_owner(&spec)?;
    api.check_federates_with(&spec.federates_with).await?;
    api.refuse_node_id(&spec.spiffe_id).await?;
    let entry = api
        .state
        .store
        .create_entry(spec, unix_seconds(api.state.clock.now()))
        .await
        .map_err(AdminError::from)?;
    api.state.changes.publish_entry(
        &api.server_id(),
        &entry.id,
        [&entry.spec.parent_id],
        [&entry.spec.spiffe_id],
    );
    tracing::info!(?uid, entry = %entry.id, spiffe_id = %entry.spec.spiffe_id, "entry created");
    api.state
        .audit
        .record(entry_audit(
            AuditRecord::new("entry.create", Actor::admin(uid)),
            &entry,
        ))
        .await
        .map_err(AdminError::from)?;
    Ok(entry_to_proto(&entry))
}

pub(super) async fn get(
    api: &AdminApi,
    request: Request<pb::GetEntryRequest>,
) -> Result<Response<pb::Entry>, Status> {
    let id = parse_entry_id(&request.get_ref().id)?;
    let entry = api.load_entry(&id).await?;
    let revoked_by = api.revoked_by(&entry.id);
    let status = ownership::entry_status(
        api.state.store.as_ref(),
        entry,
        api.state.config.suspend_disabled_owners,
    )
    .await
    .map_err(AdminError::from)?;
    let mut out = status_to_proto(&status);
    out.revoked_by = revoked_by;
    let now = unix_seconds(api.state.clock.now());
    out.live = status
        .activity
        .live_at(now)
        .map(|s| pb::LiveDocument {
            kind: s.kind.clone(),
            id: s.serial.clone(),
            node: s.node.clone(),
            expires_at: s.expires_at,
        })
        .collect();
    Ok(Response::new(out))
}

pub(super) async fn list(
    api: &AdminApi,
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
        owner: parse_owner(&req.owner)?,
    };
    let lifecycle = LifecycleFilter {
        stale: match req.stale_seconds {
            0 => None,
            s if s < 0 => return Err(invalid("stale", "must not be negative").into()),
            s => Some(std::time::Duration::from_secs(s.unsigned_abs())),
        },
        orphaned: req.orphaned,
    };
    let page_size = match req.page_size as usize {
        0 => DEFAULT_ENTRY_PAGE,
        n if n > MAX_ENTRY_PAGE => {
            return Err(invalid("page_size", format!("{n}: at most {MAX_ENTRY_PAGE}")).into())
        }
        n => n,
    };
    // The token is the last entry's sort key (SPIFFE ID, a space, entry id): the listing is
    // sorted by it, so the next page starts after it even if entries came or went meanwhile.
    let after: Option<(String, String)> = if req.page_token.is_empty() {
        None
    } else {
        match req.page_token.split_once(' ') {
            Some((id, entry)) if parse_entry_id(entry).is_ok() && SpiffeId::new(id).is_ok() => {
                Some((id.to_string(), entry.to_string()))
            }
            _ => {
                return Err(invalid(
                    "page_token",
                    "not a token from a previous ListEntries answer",
                )
                .into())
            }
        }
    };
    let mut entries = ownership::list_entries(
        api.state.store.as_ref(),
        &filter,
        &lifecycle,
        api.state.config.suspend_disabled_owners,
        api.now(),
    )
    .await
    .map_err(AdminError::from)?;
    let key = |s: &EntryStatus| (s.entry.spec.spiffe_id.to_string(), s.entry.id.to_string());
    // Pages follow the token's own order, whatever order the store lists in.
    entries.sort_by_cached_key(key);
    let mut page = Vec::new();
    let mut bytes = 0;
    let mut more = false;
    for s in entries
        .iter()
        .filter(|s| after.as_ref().is_none_or(|a| key(s) > *a))
    {
        let mut out = status_to_proto(s);
        out.revoked_by = api.revoked_by(&s.entry.id);
        let len = prost::Message::encoded_len(&out) + 8;
        if page.len() == page_size || (!page.is_empty() && bytes + len > MAX_ENTRY_PAGE_BYTES) {
            more = true;
            break;
        }
        bytes += len;
        page.push((key(s), out));
    }
    let next_page_token = match (more, page.last()) {
        (true, Some(((id, entry), _))) => format!("{id} {entry}"),
        _ => String::new(),
    };
    Ok(Response::new(pb::ListEntriesResponse {
        entries: page.into_iter().map(|(_, e)| e).collect(),
        next_page_token,
    }))
}

/// Entries in a ListEntries page when the request names no size, and the most it may name.
pub const DEFAULT_ENTRY_PAGE: usize = 1000;
pub const MAX_ENTRY_PAGE: usize = 5000;
/// A page stops before this many encoded bytes (the admin API's messages are capped at 4 MiB).
const MAX_ENTRY_PAGE_BYTES: usize = 3 * 1024 * 1024;

pub(super) async fn update(
    api: &AdminApi,
    request: Request<pb::UpdateEntryRequest>,
) -> Result<Response<pb::Entry>, Status> {
    let uid = caller_uid(&request);
    let req = request.into_inner();
    let id = parse_entry_id(&req.id)?;
    let current = api.load_entry(&id).await?;
    let current_parent = current.spec.parent_id.clone();
    let current_spiffe_id = current.spec.spiffe_id.clone();
    let mut spec = current.spec;
    if let Some(v) = &req.spiffe_id {
        spec.spiffe_id = api.issuable_id("spiffe_id", v)?;
    }
    if let Some(v) = &req.parent_id {
        spec.parent_id = api.spiffe_id_in_domain("parent_id", v)?;
    }
    if let Some(v) = &req.selectors {
        spec.selectors = parse_selectors(&v.values)?;
    }
    if let Some(v) = req.x509_svid_ttl_seconds {
        spec.x509_svid_ttl = api.ttl("x509_svid_ttl", v, api.state.config.default_x509_svid_ttl)?;
    }
    if let Some(v) = req.jwt_svid_ttl_seconds {
        spec.jwt_svid_ttl = api.ttl("jwt_svid_ttl", v, api.state.config.default_jwt_svid_ttl)?;
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
    if let Some(v) = &req.federates_with {
        spec.federates_with =
            super::federation::parse_federates_with(&v.values, &api.state.config.trust_domain)?;
        api.check_federates_with(&spec.federates_with).await?;
    }
    if let Some(v) = &req.resources {
        spec.resources = super::parse::parse_resources(&v.values)?;
    }
    api.check_owner(&spec)?;
    api.refuse_node_id(&spec.spiffe_id).await?;
    let entry = api
        .state
        .store
        .update_entry(&id, spec)
        .await
        .map_err(AdminError::from)?;
    api.state.changes.publish_entry(
        &api.server_id(),
        &entry.id,
        [&current_parent, &entry.spec.parent_id],
        [&current_spiffe_id, &entry.spec.spiffe_id],
    );
    tracing::info!(?uid, entry = %entry.id, revision = entry.revision, "entry updated");
    api.state
        .audit
        .record(entry_audit(
            AuditRecord::new("entry.update", Actor::admin(uid)),
            &entry,
        ))
        .await
        .map_err(AdminError::from)?;
    Ok(Response::new(entry_to_proto(&entry)))
}

pub(super) async fn delete(
    api: &AdminApi,
    request: Request<pb::DeleteEntryRequest>,
) -> Result<Response<pb::Entry>, Status> {
    let uid = caller_uid(&request);
    delete_one(api, uid, &request.get_ref().id)
        .await
        .map(Response::new)
}

async fn delete_one(api: &AdminApi, uid: Option<u32>, id: &str) -> Result<pb::Entry, Status> {
    let id = parse_entry_id(id)?;
    let entry = api
        .state
        .store
        .delete_entry(&id)
        .await
        .map_err(AdminError::from)?;
    api.state
        .changes
        .publish_entry(&api.server_id(), &entry.id, [&entry.spec.parent_id], []);
    tracing::info!(?uid, entry = %entry.id, "entry deleted");
    api.state
        .audit
        .record(entry_audit(
            AuditRecord::new("entry.delete", Actor::admin(uid)),
            &entry,
        ))
        .await
        .map_err(AdminError::from)?;
    Ok(entry_to_proto(&entry))
}
