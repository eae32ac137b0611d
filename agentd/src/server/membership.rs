//! Which entries a node serves: those parented to it, and those parented to a node-set alias
//! it belongs to (SPIRE's node aliases).

use spiffe::SpiffeId;

use crate::datastore::{AttestedNode, DataStoreError, Entry, EntryFilter};
use crate::revocation::log::RevocationLog;
use crate::revocation::RevocationHandle;

/// Whether a node-set alias stands revoked: by its entry (`revoke entry <alias entry>`) or by
/// its SPIFFE ID (`revoke node <alias id>`, the set named as a node). A revoked alias gives
/// its workload entries to no node: they are neither synced nor minted while it stands, and
/// the revocation event lists their SVIDs (see `RevocationLog::revoke_cascading`).
pub fn alias_revoked(revocations: &RevocationLog, alias: &Entry) -> bool {
    revocations
        .standing(&RevocationHandle::Entry(alias.id.clone()))
        .is_some()
        || revocations
            .standing(&RevocationHandle::Node(alias.spec.spiffe_id.clone()))
            .is_some()
}

/// Whether `entry` is a node-set alias (its parent is the server).
pub fn is_alias(server_id: &SpiffeId, entry: &Entry) -> bool {
    entry.spec.parent_id == *server_id
}

/// Node-set aliases (as SPIRE's node aliases): an entry whose parent is the server's own ID
/// names a set of nodes by node selectors (`x509pop:...`, `claims:...`). Its SPIFFE ID can
/// then be the parent of workload entries, which every node whose attested selectors include
/// all of the alias's selectors serves. A node with no selectors (join token) is in no set.
/// With `revocations`, a revoked alias is no set at all.
pub(crate) fn aliases_of<'a>(
    all: &'a [Entry],
    server_id: &SpiffeId,
    node: &AttestedNode,
    revocations: Option<&'a RevocationLog>,
) -> impl Iterator<Item = &'a Entry> {
    let server_id = server_id.clone();
    let node_selectors = node.selectors.clone();
    all.iter().filter(move |e| {
        e.spec.parent_id == server_id
            && agentd_attestor::selector::all_present(&e.spec.selectors, &node_selectors)
            && !revocations.is_some_and(|r| alias_revoked(r, e))
    })
}

/// The entries a node serves: those parented to the node itself, and those parented to a
/// node-set alias the node belongs to (with `revocations`, one not revoked; without, by
/// parentage alone, as the inventory counts).
pub async fn entries_for_node(
    store: &dyn crate::datastore::DataStore,
    server_id: &SpiffeId,
    node: &AttestedNode,
    revocations: Option<&RevocationLog>,
) -> Result<Vec<Entry>, DataStoreError> {
    // Through the store's parent index: the node's own entries, the aliases (entries
    // parented to the server), then each alias's entries; never every entry.
    let by_parent = |parent: &SpiffeId| EntryFilter {
        parent_id: Some(parent.clone()),
        ..Default::default()
    };
    let mut served = store.list_entries(&by_parent(&node.spiffe_id)).await?;
    for alias in aliases_for_node(store, server_id, node, revocations).await? {
        served.extend(store.list_entries(&by_parent(&alias)).await?);
    }
    // The order a full listing has (by SPIFFE ID, then id).
    served.sort_by(|a, b| (&a.spec.spiffe_id, &a.id).cmp(&(&b.spec.spiffe_id, &b.id)));
    Ok(served)
}

/// The SPIFFE IDs of the node-set aliases `node` belongs to (with `revocations`, those not
/// revoked), besides its own ID.
pub async fn aliases_for_node(
    store: &dyn crate::datastore::DataStore,
    server_id: &SpiffeId,
    node: &AttestedNode,
    revocations: Option<&RevocationLog>,
) -> Result<std::collections::BTreeSet<SpiffeId>, DataStoreError> {
    let alias_entries = store
        .list_entries(&EntryFilter {
            parent_id: Some(server_id.clone()),
            ..Default::default()
        })
        .await?;
    Ok(aliases_of(&alias_entries, server_id, node, revocations)
        .map(|e| e.spec.spiffe_id.clone())
        .filter(|id| *id != node.spiffe_id)
        .collect())
}

/// Whether `node` may obtain SVIDs for `entry` (through an alias not revoked).
pub async fn node_serves(
    store: &dyn crate::datastore::DataStore,
    server_id: &SpiffeId,
    node: &AttestedNode,
    entry: &Entry,
    revocations: &RevocationLog,
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
    let is_member = aliases_of(&candidates, server_id, node, Some(revocations))
        .next()
        .is_some();
    Ok(is_member)
}
