//! Entry owners (suspension) and the inventory.

use agentd_proto::admin as pb;
use tonic::{Request, Response, Status};

use super::entries::status_to_proto;
use super::paging::PageRequest;
use super::parse_owner;
use super::{caller_uid, invalid, AdminApi, AdminError};
use crate::audit::{Actor, AuditRecord};
use crate::datastore::EntryFilter;
use crate::server::ownership::{self, EntryStatus, LifecycleFilter};

pub(super) async fn set_disabled(
    api: &AdminApi,
    request: Request<pb::SetOwnerDisabledRequest>,
) -> Result<Response<pb::SetOwnerDisabledResponse>, Status> {
    let uid = caller_uid(&request);
    let req = request.into_inner();
    let owner = parse_owner(&req.owner)?.ok_or_else(|| invalid("owner", "is required"))?;
    let suspend = api.state.config.suspend_disabled_owners;
    api.state
        .store
        .set_owner_disabled(&owner, req.disabled, api.now())
        .await
        .map_err(AdminError::from)?;
    // Suspension withdraws (and restores) entries on whichever nodes serve them.
    api.state
        .changes
        .publish(crate::server::changes::ChangeScope::All, Default::default());
    // The owner's entries, through the store's owner index.
    let entries: Vec<EntryStatus> = ownership::list_entries(
        api.state.store.as_ref(),
        &EntryFilter {
            owner: Some(owner.clone()),
            ..Default::default()
        },
        &LifecycleFilter::default(),
        suspend,
        api.now(),
    )
    .await
    .map_err(AdminError::from)?;
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
    api.state
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

/// A row of the inventory's two listings, which page as one sequence.
enum InventoryRow {
    Node(pb::NodeInventory),
    Owner(pb::OwnerInventory),
}

/// Rows per inventory page by default, and at most.
const INVENTORY_PAGE: usize = 1_000;
const MAX_INVENTORY_PAGE: usize = 5_000;

pub(super) async fn inventory(
    api: &AdminApi,
    request: Request<pb::GetInventoryRequest>,
) -> Result<Response<pb::Inventory>, Status> {
    let req = request.get_ref();
    let window = match req.stale_seconds {
        0 => ownership::DEFAULT_STALE_WINDOW,
        s if s < 0 => return Err(invalid("stale", "must not be negative").into()),
        s => std::time::Duration::from_secs(s.unsigned_abs()),
    };
    let page = PageRequest::parse(
        req.page_size,
        &req.page_token,
        INVENTORY_PAGE,
        MAX_INVENTORY_PAGE,
    )?;
    let now = api.now();
    let inv = ownership::inventory(
        api.state.store.as_ref(),
        &crate::tls::server_spiffe_id(&api.state.config.trust_domain),
        api.state.config.suspend_disabled_owners,
        window,
        now,
    )
    .await
    .map_err(AdminError::from)?;
    // Nodes first ('n' sorts before 'o'), each list in its own key order.
    let rows: Vec<(String, InventoryRow)> = inv
        .by_node
        .into_iter()
        .map(|n| {
            (
                format!("n\t{}", n.spiffe_id),
                InventoryRow::Node(pb::NodeInventory {
                    spiffe_id: n.spiffe_id,
                    entries: n.entries,
                    live_svids: n.live_svids,
                }),
            )
        })
        .chain(inv.by_owner.into_iter().map(|o| {
            let owner = o.owner.unwrap_or_default();
            (
                format!("o\t{owner}"),
                InventoryRow::Owner(pb::OwnerInventory {
                    owner,
                    disabled: o.disabled,
                    entries: o.entries,
                    live_svids: o.live_svids,
                }),
            )
        }))
        .collect();
    let (rows, next_page_token) = page.cut_by(rows, |row| match row {
        InventoryRow::Node(n) => prost::Message::encoded_len(n),
        InventoryRow::Owner(o) => prost::Message::encoded_len(o),
    });
    let (mut by_node, mut by_owner) = (Vec::new(), Vec::new());
    for row in rows {
        match row {
            InventoryRow::Node(n) => by_node.push(n),
            InventoryRow::Owner(o) => by_owner.push(o),
        }
    }
    Ok(Response::new(pb::Inventory {
        entries: inv.entries,
        nodes: inv.nodes,
        live_svids: inv.live_svids,
        live_grants: inv.live_grants,
        revocations: inv.revocations,
        stale_entries: inv.stale_entries,
        orphaned_entries: inv.orphaned_entries,
        by_owner,
        by_node,
        generated_at: now,
        next_page_token,
    }))
}
