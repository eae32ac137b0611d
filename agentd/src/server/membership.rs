//! Which entries a node serves: those parented to it, and those parented to a node-set alias
//! it belongs to (SPIRE's node aliases).

use spiffe::SpiffeId;

use crate::datastore::{AttestedNode, DataStoreError, Entry, EntryFilter};

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
