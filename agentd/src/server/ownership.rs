//! Ownership and lifecycle: which entries are zombies (nothing fetched for a while), which
//! are orphaned (no owner, or the owner is disabled), which are suspended (the owner is
//! disabled and the server is configured to mint nothing for them), and the inventory.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use spiffe::SpiffeId;

use crate::datastore::{
    DataStore, DataStoreError, Entry, EntryActivity, EntryFilter, EntryId, OwnerState,
};

/// The window `inventory` counts stale entries in when none is given.
pub const DEFAULT_STALE_WINDOW: Duration = Duration::from_secs(30 * 24 * 3600);

/// An entry with what the server knows about its use and its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryStatus {
    pub entry: Entry,
    pub activity: EntryActivity,
    pub owner_disabled: bool,
    pub suspended: bool,
}

/// Lifecycle filters on top of [`EntryFilter`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LifecycleFilter {
    /// Only entries none of whose SVIDs was fetched within this window (zombies).
    pub stale: Option<Duration>,
    /// Only entries without an owner, or whose owner is disabled.
    pub orphaned: bool,
}

/// Nothing fetched within `window` before `now`. An entry never fetched counts from its
/// creation, so a new entry is not a zombie before it had the chance to be used.
pub fn is_stale(entry: &Entry, activity: &EntryActivity, now: i64, window: Duration) -> bool {
    let since = activity.last_fetched.unwrap_or(entry.created_at);
    let window = i64::try_from(window.as_secs()).unwrap_or(i64::MAX);
    now.saturating_sub(since) >= window
}

pub fn is_orphaned(status: &EntryStatus) -> bool {
    status.entry.spec.owner.is_none() || status.owner_disabled
}

fn disabled_owners(owners: &[OwnerState]) -> std::collections::HashSet<&str> {
    owners
        .iter()
        .filter(|o| o.disabled)
        .map(|o| o.owner.as_str())
        .collect()
}

/// Entries matching both filters, with their status, at `now` (Unix seconds).
pub async fn list_entries(
    store: &dyn DataStore,
    filter: &EntryFilter,
    lifecycle: &LifecycleFilter,
    suspend_disabled_owners: bool,
    now: i64,
) -> Result<Vec<EntryStatus>, DataStoreError> {
    let entries = store.list_entries(filter).await?;
    let mut activity = store.entry_activity().await?;
    let owners = store.list_owners().await?;
    let disabled = disabled_owners(&owners);
    let mut out = Vec::new();
    for entry in entries {
        let activity = activity.remove(&entry.id).unwrap_or_default();
        let owner_disabled = entry
            .spec
            .owner
            .as_deref()
            .is_some_and(|o| disabled.contains(o));
        let status = EntryStatus {
            suspended: owner_disabled && suspend_disabled_owners,
            owner_disabled,
            activity,
            entry,
        };
        if let Some(window) = lifecycle.stale {
            if !is_stale(&status.entry, &status.activity, now, window) {
                continue;
            }
        }
        if lifecycle.orphaned && !is_orphaned(&status) {
            continue;
        }
        out.push(status);
    }
    Ok(out)
}

/// One entry's status.
pub async fn entry_status(
    store: &dyn DataStore,
    entry: Entry,
    suspend_disabled_owners: bool,
) -> Result<EntryStatus, DataStoreError> {
    let owner_disabled = match &entry.spec.owner {
        Some(o) => store.get_owner(o).await?.is_some_and(|s| s.disabled),
        None => false,
    };
    let activity = store.entry_activity_of(&entry.id).await?;
    Ok(EntryStatus {
        suspended: owner_disabled && suspend_disabled_owners,
        owner_disabled,
        activity,
        entry,
    })
}

/// Whether the server must refuse to mint for `entry`.
pub async fn is_suspended(
    store: &dyn DataStore,
    entry: &Entry,
    suspend_disabled_owners: bool,
) -> Result<bool, DataStoreError> {
    if !suspend_disabled_owners {
        return Ok(false);
    }
    match &entry.spec.owner {
        Some(o) => Ok(store.get_owner(o).await?.is_some_and(|s| s.disabled)),
        None => Ok(false),
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnerInventory {
    /// `None`: entries without an owner.
    pub owner: Option<String>,
    pub disabled: bool,
    pub entries: u64,
    pub live_svids: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInventory {
    pub spiffe_id: String,
    pub entries: u64,
    pub live_svids: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inventory {
    pub entries: u64,
    pub nodes: u64,
    pub live_svids: u64,
    pub live_grants: u64,
    pub revocations: u64,
    pub stale_entries: u64,
    pub orphaned_entries: u64,
    pub by_owner: Vec<OwnerInventory>,
    pub by_node: Vec<NodeInventory>,
}

/// The inventory at `now`: every count the server can make, by owner and by node.
pub async fn inventory(
    store: &dyn DataStore,
    server_id: &SpiffeId,
    suspend_disabled_owners: bool,
    stale_window: Duration,
    now: i64,
) -> Result<Inventory, DataStoreError> {
    let statuses = list_entries(
        store,
        &EntryFilter::default(),
        &LifecycleFilter::default(),
        suspend_disabled_owners,
        now,
    )
    .await?;
    let owners = store.list_owners().await?;
    let nodes = store.list_nodes().await?;
    let live_of: HashMap<&EntryId, u64> = statuses
        .iter()
        .map(|s| (&s.entry.id, s.activity.live_at(now).count() as u64))
        .collect();

    let mut by_owner: BTreeMap<Option<String>, OwnerInventory> = BTreeMap::new();
    for o in owners.iter().filter(|o| o.disabled) {
        by_owner.insert(
            Some(o.owner.clone()),
            OwnerInventory {
                owner: Some(o.owner.clone()),
                disabled: true,
                ..Default::default()
            },
        );
    }
    for s in &statuses {
        let slot = by_owner
            .entry(s.entry.spec.owner.clone())
            .or_insert_with(|| OwnerInventory {
                owner: s.entry.spec.owner.clone(),
                ..Default::default()
            });
        slot.disabled |= s.owner_disabled;
        slot.entries += 1;
        slot.live_svids += live_of.get(&s.entry.id).copied().unwrap_or(0);
    }

    // One pass over the entries for every node's counts (a node with a scan of its own
    // would make the inventory nodes x entries): entries by parent, live SVIDs by node, and
    // the node-set aliases, which each node is matched against.
    let mut by_parent: HashMap<&SpiffeId, u64> = HashMap::new();
    let mut live_by_node: HashMap<&str, u64> = HashMap::new();
    for s in &statuses {
        *by_parent.entry(&s.entry.spec.parent_id).or_default() += 1;
        for live in s.activity.live_at(now) {
            *live_by_node.entry(live.node.as_str()).or_default() += 1;
        }
    }
    let alias_entries: Vec<Entry> = statuses
        .iter()
        .filter(|s| s.entry.spec.parent_id == *server_id)
        .map(|s| s.entry.clone())
        .collect();
    let mut by_node = Vec::with_capacity(nodes.len());
    for n in &nodes {
        let node_id = n.spiffe_id.to_string();
        let aliases: std::collections::BTreeSet<&SpiffeId> =
            crate::server::membership::aliases_of(&alias_entries, server_id, n, None)
                .map(|e| &e.spec.spiffe_id)
                .filter(|id| **id != n.spiffe_id)
                .collect();
        let served = by_parent.get(&n.spiffe_id).copied().unwrap_or(0)
            + aliases
                .iter()
                .map(|a| by_parent.get(a).copied().unwrap_or(0))
                .sum::<u64>();
        by_node.push(NodeInventory {
            entries: served,
            live_svids: live_by_node.get(node_id.as_str()).copied().unwrap_or(0),
            spiffe_id: node_id,
        });
    }
    by_node.sort_by(|a, b| a.spiffe_id.cmp(&b.spiffe_id));

    Ok(Inventory {
        entries: statuses.len() as u64,
        nodes: nodes.len() as u64,
        live_svids: live_of.values().sum(),
        live_grants: store.count_live_grants(now).await?,
        revocations: store.count_revocations().await?,
        stale_entries: statuses
            .iter()
            .filter(|s| is_stale(&s.entry, &s.activity, now, stale_window))
            .count() as u64,
        orphaned_entries: statuses.iter().filter(|s| is_orphaned(s)).count() as u64,
        by_owner: by_owner.into_values().collect(),
        by_node,
    })
}

#[cfg(test)]
mod tests;
