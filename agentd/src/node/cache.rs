//! The node agent's cache: the entries this node serves, the trust bundle, and the current
//! X.509-SVID (and JWT-SVIDs) of each entry. Workload API streams subscribe to its version
//! counter and re-send when it moves.
//!
//! Over 600 lines with its unit tests (the code is about 600): every way an SVID enters or
//! leaves the cache, and its tests, in one place.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use agentd_attestor::selector::all_present;
use agentd_attestor::Selector;
use spiffe::SpiffeId;
use tokio::sync::watch;

use crate::bundle::Bundle;
use crate::keys::PrivateKey;
use crate::revocation::{RevocationAction, RevocationEvent, RevocationHandle};

/// A registration entry as the node agent sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeEntry {
    pub id: String,
    pub spiffe_id: SpiffeId,
    pub selectors: Vec<Selector>,
    pub x509_svid_ttl: Duration,
    pub jwt_svid_ttl: Duration,
    pub dns_names: Vec<String>,
    pub hint: String,
    pub revision: u64,
    /// Trust domains whose bundles this entry's workloads receive.
    pub federates_with: Vec<spiffe::TrustDomain>,
}

/// An X.509-SVID held for an entry. The key was generated on this node and never left it.
#[derive(Debug)]
pub struct CachedX509Svid {
    pub entry_id: String,
    pub entry_revision: u64,
    pub spiffe_id: SpiffeId,
    pub hint: String,
    /// DER, leaf first.
    pub chain: Vec<Vec<u8>>,
    pub key: PrivateKey,
    pub serial: String,
    pub expires_at: SystemTime,
    /// About half-way through the lifetime, with jitter, so that many SVIDs minted together
    /// do not all come due in the same second.
    pub rotate_at: SystemTime,
    /// Delegated SVIDs: the grant id of every hop, root first (revocation handles). Empty
    /// for a plain SVID.
    pub grant_chain: Vec<String>,
    /// The task id of a delegated SVID's grant, if it names one.
    pub task_id: Option<String>,
}

impl CachedX509Svid {
    /// The grant a delegated SVID was minted for (the last hop).
    pub fn grant_id(&self) -> Option<&str> {
        self.grant_chain.last().map(String::as_str)
    }
}

/// A live delegation grant to the SPIFFE ID of one of this node's entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeGrant {
    pub id: String,
    pub agent: SpiffeId,
    pub principal: String,
    pub scopes: Vec<String>,
    pub expires_at: SystemTime,
    pub task_id: Option<String>,
    /// Root first; the last is `id`.
    pub grant_chain: Vec<String>,
    pub remaining_depth: u32,
}

impl NodeGrant {
    /// The Workload API hint of SVIDs for this grant: standard clients pick them by it.
    pub fn hint(&self) -> String {
        format!("grant:{}", self.id)
    }
}

#[derive(Debug, Clone)]
pub struct CachedJwtSvid {
    pub token: String,
    pub issued_at: SystemTime,
    pub expires_at: SystemTime,
}

/// Most JWT-SVIDs held at once (one per entry and audience set). At the bound the least
/// recently used goes, so that a workload asking for endless new audiences evicts its own
/// tokens, not every other workload's (as clearing the whole cache would).
pub const MAX_JWT_SVIDS: usize = 10_000;

/// A cached JWT-SVID and when it was last handed out (a tick of `Inner::jwt_clock`).
#[derive(Debug)]
struct JwtSlot {
    svid: CachedJwtSvid,
    last_used: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Default)]
struct Inner {
    bundle: Option<Bundle>,
    /// Other trust domains' bundles, by name (all the server holds; each workload gets
    /// those its entries federate with).
    federated: std::collections::BTreeMap<String, Arc<Bundle>>,
    /// Sorted by (SPIFFE ID, entry id): the order SVIDs are served in.
    entries: Vec<NodeEntry>,
    synced: bool,
    x509: HashMap<String, Arc<CachedX509Svid>>,
    jwt: HashMap<(String, Vec<String>), JwtSlot>,
    /// Counts JWT-SVID uses, for least-recently-used eviction (bumped under the read lock).
    jwt_clock: std::sync::atomic::AtomicU64,
    /// Entries revoked by the feed: dropped, kept out of later syncs, never minted again
    /// until the revocation is lifted.
    revoked_entries: std::collections::HashSet<String>,
    /// Entries whose SVID was revoked (by serial, authority, grant): a new one is being
    /// minted, so a stream waits for it rather than ending.
    remint: std::collections::HashSet<String>,
    /// This node itself was revoked: nothing is served.
    node_revoked: bool,
    /// Why an entry (by id) or this node (key `""`) stands revoked, for the message a
    /// workload's stream ends with.
    revoked_because: HashMap<String, String>,
    /// Grants revoked by the feed (directly, by cascade or by task): kept out of later
    /// syncs.
    revoked_grants: std::collections::HashSet<String>,
    /// Live grants, sorted by id.
    grants: Vec<NodeGrant>,
    /// Entries a revocation (of the entry, or of this node) took out of `entries`, put back
    /// when it is lifted: the sync that listed them may already be behind us (a restarted
    /// node replays the revocation and its lift after its first sync), and the next regular
    /// sync may be a whole interval away.
    held: HashMap<String, NodeEntry>,
    /// Lifts applied so far, and how many of them the last completed sync had seen when it
    /// was asked: while the second is behind, a sync is wanted at once.
    lifts: u64,
    synced_lifts: u64,
    /// Delegated SVIDs by (entry id, grant id).
    delegated: HashMap<(String, String), Arc<CachedX509Svid>>,
    /// Entries an attested caller matched: above the prefetch bound, only these are minted.
    wanted: std::collections::HashSet<String>,
}

/// The held bundles of the trust domains `entries` federate with, in name order.
fn federated_for<'a>(
    held: &std::collections::BTreeMap<String, Arc<Bundle>>,
    entries: impl IntoIterator<Item = &'a NodeEntry>,
) -> Vec<Arc<Bundle>> {
    if held.is_empty() {
        return Vec::new();
    }
    let wanted: std::collections::BTreeSet<&str> = entries
        .into_iter()
        .flat_map(|e| e.federates_with.iter().map(|td| td.as_str()))
        .collect();
    wanted
        .into_iter()
        .filter_map(|td| held.get(td).cloned())
        .collect()
}

/// "revoked by entry <id> (revocation #N: reason)": what a workload is told.
fn revoked_because(event: &RevocationEvent) -> String {
    let reason = if event.reason.is_empty() {
        String::new()
    } else {
        format!(": {}", event.reason)
    };
    format!(
        "revoked by {} (revocation #{}{reason})",
        event.handle, event.sequence
    )
}

/// What a workload is entitled to right now.
#[derive(Debug, Clone)]
pub struct WorkloadView {
    pub svids: Vec<Arc<CachedX509Svid>>,
    /// Entries that match, whether or not an SVID is ready for them yet.
    pub entries: Vec<NodeEntry>,
    pub bundle: Option<Bundle>,
    /// The bundles of the trust domains the matching entries federate with, by name;
    /// never one without keys.
    pub federated: Vec<Arc<Bundle>>,
    /// A matching entry's SVID was revoked and its replacement is on its way.
    pub reminting: bool,
}

#[derive(Debug)]
pub struct Cache {
    inner: RwLock<Inner>,
    version: watch::Sender<u64>,
    /// Wakes the sync loop when an SVID must be minted now (a revoked one was dropped).
    mint_now: tokio::sync::Notify,
    /// Entries whose SVIDs workloads fetched since the last report to the server.
    fetched: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// While the node has at most this many entries every SVID is minted ahead of any
    /// request; above it, only those of entries a caller matched (see `due_for_mint`).
    prefetch: usize,
    /// The server said something this node serves changed: sync now.
    sync_requested: std::sync::atomic::AtomicBool,
    /// Entries and grant agents the server said changed, for a delta sync.
    delta: std::sync::Mutex<DeltaRequest>,
}

/// What a delta sync asks for (see `Cache::request_delta`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DeltaRequest {
    pub entry_ids: std::collections::BTreeSet<String>,
    pub grant_agents: std::collections::BTreeSet<String>,
    /// The bundles changed (and nothing else the node serves).
    pub bundles: bool,
}

/// More changed ids than this pending at once and a whole sync is cheaper.
const MAX_DELTA: usize = 1_000;

impl Default for Cache {
    fn default() -> Self {
        Self::new()
    }
}

impl Cache {
    pub fn new() -> Self {
        Self::with_prefetch(crate::node::config::DEFAULT_SVID_PREFETCH)
    }

    /// A cache that mints every SVID ahead of any request up to `prefetch` entries.
    pub fn with_prefetch(prefetch: usize) -> Self {
        Self {
            inner: RwLock::new(Inner::default()),
            version: watch::channel(0).0,
            mint_now: tokio::sync::Notify::new(),
            fetched: Default::default(),
            prefetch,
            sync_requested: Default::default(),
            delta: Default::default(),
        }
    }

    /// Asks the sync loop for a delta: these entries and these agents' grants changed.
    pub fn request_delta(
        &self,
        entry_ids: impl IntoIterator<Item = String>,
        grant_agents: impl IntoIterator<Item = String>,
    ) {
        let mut d = self.delta.lock().unwrap_or_else(|p| p.into_inner());
        d.entry_ids.extend(entry_ids);
        d.grant_agents.extend(grant_agents);
        let too_many = d.entry_ids.len() > MAX_DELTA || d.grant_agents.len() > MAX_DELTA;
        if too_many {
            *d = DeltaRequest::default();
        }
        drop(d);
        if too_many {
            self.request_sync();
        } else {
            self.mint_now.notify_one();
        }
    }

    /// Asks the sync loop for the bundles alone (a federated bundle changed).
    pub fn request_bundles(&self) {
        self.delta.lock().unwrap_or_else(|p| p.into_inner()).bundles = true;
        self.mint_now.notify_one();
    }

    /// Whether a delta is waiting.
    pub fn delta_pending(&self) -> bool {
        let d = self.delta.lock().unwrap_or_else(|p| p.into_inner());
        !d.entry_ids.is_empty() || !d.grant_agents.is_empty() || d.bundles
    }

    /// Takes the pending delta (a whole sync takes it too: it covers everything).
    pub fn take_delta(&self) -> DeltaRequest {
        std::mem::take(&mut *self.delta.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Applies a delta sync: the entries given replace (or join) those held, the removed
    /// ones go with their SVIDs, and the grants of the asked agents are replaced by those
    /// given. Revocations already applied keep what they cover out, as in `set_entries`.
    pub fn apply_delta(
        &self,
        upserts: Vec<NodeEntry>,
        removed: &[String],
        agents: &[SpiffeId],
        grants: Vec<NodeGrant>,
    ) {
        let mut g = self.write();
        let mut changed = false;
        for id in removed {
            if let Some(i) = g.entries.iter().position(|e| e.id == *id) {
                g.entries.remove(i);
                g.x509.remove(id);
                g.remint.remove(id);
                g.wanted.remove(id);
                g.jwt.retain(|(e, _), _| e != id);
                g.delegated.retain(|(e, _), _| e != id);
                changed = true;
            }
        }
        for e in upserts {
            if g.node_revoked || g.revoked_entries.contains(&e.id) {
                continue;
            }
            let key = |x: &NodeEntry| (x.spiffe_id.clone(), x.id.clone());
            match g.entries.iter().position(|x| x.id == e.id) {
                Some(i) if g.entries[i] == e => {}
                Some(i) => {
                    g.entries.remove(i);
                    let at = g.entries.partition_point(|x| key(x) < key(&e));
                    g.entries.insert(at, e);
                    changed = true;
                }
                None => {
                    let at = g.entries.partition_point(|x| key(x) < key(&e));
                    g.entries.insert(at, e);
                    changed = true;
                }
            }
        }
        if !agents.is_empty() {
            let before = g.grants.clone();
            let Inner {
                grants: held,
                revoked_grants,
                ..
            } = &mut *g;
            held.retain(|gr| !agents.contains(&gr.agent));
            held.extend(
                grants
                    .into_iter()
                    .filter(|gr| !revoked_grants.contains(&gr.id)),
            );
            held.sort_by(|a, b| a.id.cmp(&b.id));
            if *held != before {
                let live: std::collections::HashSet<String> =
                    held.iter().map(|gr| gr.id.clone()).collect();
                g.delegated.retain(|(_, grant), _| live.contains(grant));
                changed = true;
            }
        }
        drop(g);
        if changed {
            self.bump();
        }
    }

    /// Asks the sync loop for a sync now (a change notice from the server).
    pub fn request_sync(&self) {
        self.sync_requested
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.mint_now.notify_one();
    }

    /// Whether a sync was asked for and not yet started.
    pub fn sync_requested(&self) -> bool {
        self.sync_requested
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Takes the request as a sync starts (a notice arriving during the sync asks again).
    pub fn take_sync_request(&self) {
        self.sync_requested
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether `entry`'s SVIDs are minted without a caller asking: every entry of a node
    /// within the prefetch bound, else those a caller matched. A node with 20,000 entries
    /// must not hold 20,000 keys it never serves; a small node answers its first call
    /// without waiting for a mint. Chosen over an LRU of SVIDs (SPIRE's agent) because a
    /// wanted entry is as many as the callers on this machine, bounded by what they match,
    /// and an SVID a stream holds is never evicted under it.
    fn minted_ahead(&self, g: &Inner, entry: &NodeEntry) -> bool {
        g.entries.len() <= self.prefetch || g.wanted.contains(&entry.id)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    /// A receiver that changes whenever anything in the cache changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// True once entries and the bundle have been synced at least once (or restored).
    pub fn is_ready(&self) -> bool {
        let g = self.read();
        g.synced && g.bundle.is_some()
    }

    pub fn bundle(&self) -> Option<Bundle> {
        self.read().bundle.clone()
    }

    pub fn entries(&self) -> Vec<NodeEntry> {
        self.read().entries.clone()
    }

    pub fn svid_count(&self) -> usize {
        self.read().x509.len()
    }

    /// JWT-SVIDs held (one per entry and audience set).
    pub fn jwt_svid_count(&self) -> usize {
        self.read().jwt.len()
    }

    /// Sets the bundle alone (at start, from the persisted identity).
    pub fn set_bundle(&self, bundle: Bundle) {
        let mut g = self.write();
        if g.bundle.as_ref() != Some(&bundle) {
            g.bundle = Some(bundle);
            drop(g);
            self.bump();
        }
    }

    /// Replaces the entry set and bundle after a sync. SVIDs of entries that are gone are
    /// dropped at once.
    pub fn set_entries(&self, mut entries: Vec<NodeEntry>, bundle: Bundle) {
        {
            // A sync answered before a revocation arrived must not bring the entry back.
            let g = self.read();
            if g.node_revoked {
                entries.clear();
            }
            entries.retain(|e| !g.revoked_entries.contains(&e.id));
        }
        // Every entry of a node is in one trust domain, so ordering by `SpiffeId` is ordering
        // by path, as by the string, without building strings per comparison.
        entries.sort_by(|a, b| (&a.spiffe_id, &a.id).cmp(&(&b.spiffe_id, &b.id)));
        let mut g = self.write();
        let mut changed = !g.synced;
        g.synced = true;
        if g.bundle.as_ref() != Some(&bundle) {
            g.bundle = Some(bundle);
            changed = true;
        }
        if g.entries != entries {
            let live: std::collections::HashSet<&str> =
                entries.iter().map(|e| e.id.as_str()).collect();
            g.x509.retain(|id, _| live.contains(id.as_str()));
            g.remint.retain(|id| live.contains(id.as_str()));
            g.jwt.retain(|(id, _), _| live.contains(id.as_str()));
            g.delegated.retain(|(id, _), _| live.contains(id.as_str()));
            g.wanted.retain(|id| live.contains(id.as_str()));
            let Inner { held, .. } = &mut *g;
            held.retain(|id, _| !live.contains(id.as_str()));
            g.entries = entries;
            changed = true;
        }
        drop(g);
        if changed {
            self.bump();
        }
    }

    /// Entries that need a (new) X.509-SVID: none yet, due for rotation, or the entry
    /// changed since the SVID was minted.
    pub fn due_for_mint(&self, now: SystemTime) -> Vec<NodeEntry> {
        let g = self.read();
        g.entries
            .iter()
            .filter(|e| self.minted_ahead(&g, e))
            .filter(|e| match g.x509.get(&e.id) {
                None => true,
                Some(s) => s.rotate_at <= now || s.entry_revision != e.revision,
            })
            .cloned()
            .collect()
    }

    /// Stores freshly minted SVIDs (ignoring any whose entry went away meanwhile).
    pub fn put_x509(&self, svids: Vec<CachedX509Svid>) {
        if svids.is_empty() {
            return;
        }
        let mut g = self.write();
        for s in svids {
            if g.entries.iter().any(|e| e.id == s.entry_id) {
                g.remint.remove(&s.entry_id);
                g.x509.insert(s.entry_id.clone(), Arc::new(s));
            }
        }
        drop(g);
        self.bump();
    }

    /// Notes that a workload received SVIDs of these entries (the server's `last_fetched`).
    pub fn note_fetched<I, S>(&self, entry_ids: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut g = self.fetched.lock().unwrap_or_else(|p| p.into_inner());
        g.extend(entry_ids.into_iter().map(Into::into));
    }

    /// Takes the entries fetched since the last call, to report them to the server (given
    /// back with `note_fetched` if the report fails).
    /// At most the 10,000 the server takes per sync; the rest wait for the next one.
    pub fn take_fetched(&self) -> Vec<String> {
        const MAX_REPORTED: usize = 10_000;
        let mut g = self.fetched.lock().unwrap_or_else(|p| p.into_inner());
        if g.len() <= MAX_REPORTED {
            return std::mem::take(&mut *g).into_iter().collect();
        }
        let rest = match g.iter().nth(MAX_REPORTED).cloned() {
            Some(first_left) => g.split_off(&first_left),
            None => Default::default(),
        };
        std::mem::replace(&mut *g, rest).into_iter().collect()
    }

    /// Drops SVIDs past their expiry, and grants past theirs with their SVIDs: a stale SVID
    /// is never served.
    pub fn drop_expired(&self, now: SystemTime) {
        let mut g = self.write();
        let before = g.x509.len() + g.delegated.len() + g.grants.len();
        g.x509.retain(|_, s| s.expires_at > now);
        g.jwt.retain(|_, j| j.svid.expires_at > now);
        g.grants.retain(|gr| gr.expires_at > now);
        let live: std::collections::HashSet<String> =
            g.grants.iter().map(|gr| gr.id.clone()).collect();
        g.delegated
            .retain(|(_, grant), s| s.expires_at > now && live.contains(grant));
        let changed = g.x509.len() + g.delegated.len() + g.grants.len() != before;
        drop(g);
        if changed {
            self.bump();
        }
    }

    /// The SVIDs and bundle for a workload with these selectors, in entry order.
    pub fn view_for(&self, selectors: &[Selector], now: SystemTime) -> WorkloadView {
        let g = self.read();
        let entries: Vec<NodeEntry> = g
            .entries
            .iter()
            .filter(|e| all_present(&e.selectors, selectors))
            .cloned()
            .collect();
        let mut svids: Vec<Arc<CachedX509Svid>> = entries
            .iter()
            .filter_map(|e| g.x509.get(&e.id))
            .filter(|s| s.expires_at > now)
            .cloned()
            .collect();
        // Delegated SVIDs follow the plain ones (the first SVID is the default, and a
        // standard client must keep getting the plain identity by default).
        for e in &entries {
            for gr in g.grants.iter().filter(|gr| gr.agent == e.spiffe_id) {
                if let Some(s) = g.delegated.get(&(e.id.clone(), gr.id.clone())) {
                    if s.expires_at > now && gr.expires_at > now {
                        svids.push(s.clone());
                    }
                }
            }
        }
        let reminting = entries.iter().any(|e| g.remint.contains(&e.id));
        let unwanted =
            g.entries.len() > self.prefetch && entries.iter().any(|e| !g.wanted.contains(&e.id));
        let bundle = g.bundle.clone();
        let federated = federated_for(&g.federated, &entries);
        drop(g);
        if unwanted {
            self.want(&entries);
        }
        WorkloadView {
            svids,
            entries,
            bundle,
            federated,
            reminting,
        }
    }

    /// Replaces the federated bundles (after a sync); a change wakes every stream, which
    /// re-sends to the workloads whose view it changed.
    pub fn set_federated(&self, bundles: Vec<Bundle>) {
        let own = self.read().bundle.as_ref().map(|b| b.trust_domain.clone());
        let next: std::collections::BTreeMap<String, Arc<Bundle>> = bundles
            .into_iter()
            // Never our own trust domain (the server refuses it; a node does not trust it
            // to), never an empty bundle (py-spiffe closes its source on one).
            .filter(|b| Some(&b.trust_domain) != own.as_ref())
            .filter(|b| !b.x509_authorities.is_empty() || !b.jwt_authorities.is_empty())
            .map(|b| (b.trust_domain.as_str().to_string(), Arc::new(b)))
            .collect();
        let mut g = self.write();
        if g.federated == next {
            return;
        }
        g.federated = next;
        drop(g);
        self.bump();
    }

    /// The federated bundles a caller with these selectors receives.
    pub fn federated_for_selectors(&self, selectors: &[Selector]) -> Vec<Arc<Bundle>> {
        let g = self.read();
        if g.federated.is_empty() {
            return Vec::new();
        }
        federated_for(
            &g.federated,
            g.entries
                .iter()
                .filter(|e| all_present(&e.selectors, selectors)),
        )
    }

    /// Marks entries a caller matched as wanted and wakes the sync loop to mint them (above
    /// the prefetch bound nothing is minted before a caller asks).
    fn want(&self, entries: &[NodeEntry]) {
        let mut g = self.write();
        let before = g.wanted.len();
        g.wanted.extend(entries.iter().map(|e| e.id.clone()));
        let added = g.wanted.len() != before;
        drop(g);
        if added {
            self.mint_now.notify_one();
        }
    }

    /// Entries marked wanted by callers (see [`Cache::with_prefetch`]).
    pub fn wanted_count(&self) -> usize {
        self.read().wanted.len()
    }

    /// Applies a revocation event from the feed (DESIGN.md section 4): drops every cached
    /// SVID it covers at once. An SVID revoked by serial or authority is minted again (a
    /// fresh serial); a revoked entry is dropped with its SVIDs and not asked for again until
    /// the revocation is lifted; a revocation of this node drops everything. Cached JWT-SVIDs
    /// are all dropped (they are minted again on demand), so no revoked one is handed out.
    /// Returns whether anything changed.
    pub fn apply_revocation(&self, event: &RevocationEvent, own_id: &SpiffeId) -> bool {
        let mut g = self.write();
        let mut changed = !g.jwt.is_empty();
        g.jwt.clear();
        match (&event.action, &event.handle) {
            (RevocationAction::Revoke, handle) => {
                let serials: std::collections::HashSet<&str> =
                    event.serials.iter().map(|s| s.serial.as_str()).collect();
                let because = revoked_because(event);
                if let RevocationHandle::Entry(id) = handle {
                    g.revoked_entries.insert(id.to_string());
                    // Wakes streams waiting to say why their identity went (the sync may
                    // have dropped the entry already).
                    changed |= g
                        .revoked_because
                        .insert(id.to_string(), because.clone())
                        .is_none();
                    if let Some(at) = g.entries.iter().position(|e| e.id == id.as_str()) {
                        let held = g.entries.remove(at);
                        g.held.insert(held.id.clone(), held);
                        changed = true;
                    }
                    changed |= g.x509.remove(id.as_str()).is_some();
                }
                if matches!(handle, RevocationHandle::Node(n) if n == own_id) {
                    g.node_revoked = true;
                    g.revoked_because.insert(String::new(), because);
                    changed |= !g.entries.is_empty() || !g.x509.is_empty();
                    let dropped = std::mem::take(&mut g.entries);
                    g.held
                        .extend(dropped.into_iter().map(|e| (e.id.clone(), e)));
                    g.x509.clear();
                    g.grants.clear();
                    g.delegated.clear();
                }
                // A grant revocation cascades to every grant derived from it, and a task's
                // to every grant for the task: those grants go (a later sync no longer
                // lists them), and with them their delegated SVIDs, which are not minted
                // again.
                let grant_gone = |chain: &[String], task: Option<&String>| match handle {
                    RevocationHandle::Grant(id) => chain.iter().any(|c| c == id),
                    RevocationHandle::Task(t) => task == Some(t),
                    _ => false,
                };
                let before = g.grants.len();
                let gone: Vec<String> = g
                    .grants
                    .iter()
                    .filter(|gr| grant_gone(&gr.grant_chain, gr.task_id.as_ref()))
                    .map(|gr| gr.id.clone())
                    .collect();
                g.revoked_grants.extend(gone.iter().cloned());
                g.grants.retain(|gr| !gone.contains(&gr.id));
                changed |= g.grants.len() != before;
                let before = g.delegated.len();
                g.delegated.retain(|_, s| {
                    !grant_gone(&s.grant_chain, s.task_id.as_ref())
                        && !serials.contains(s.serial.as_str())
                });
                changed |= g.delegated.len() != before;
                let hit: Vec<String> = g
                    .x509
                    .values()
                    .filter(|s| {
                        serials.contains(s.serial.as_str())
                            || matches!(handle, RevocationHandle::Svid(x) if *x == s.serial)
                    })
                    .map(|s| s.entry_id.clone())
                    .collect();
                for entry_id in hit {
                    g.x509.remove(&entry_id);
                    g.remint.insert(entry_id);
                    changed = true;
                    self.mint_now.notify_one();
                }
            }
            (RevocationAction::Lift { .. }, RevocationHandle::Entry(id)) => {
                // Back at once (and minted again), and a sync is asked for now to confirm
                // the entry as the server has it.
                g.revoked_entries.remove(id.as_str());
                g.revoked_because.remove(id.as_str());
                if !g.node_revoked {
                    if let Some(e) = g.held.remove(id.as_str()) {
                        g.entries.push(e);
                    }
                }
                g.lifts += 1;
                changed = true;
            }
            (RevocationAction::Lift { .. }, RevocationHandle::Node(n)) if n == own_id => {
                g.node_revoked = false;
                g.revoked_because.remove("");
                let held: Vec<NodeEntry> = std::mem::take(&mut g.held).into_values().collect();
                for e in held {
                    if g.revoked_entries.contains(&e.id) {
                        g.held.insert(e.id.clone(), e);
                    } else if !g.entries.iter().any(|x| x.id == e.id) {
                        g.entries.push(e);
                    }
                }
                g.lifts += 1;
                changed = true;
            }
            (RevocationAction::Lift { .. }, _) => {}
        }
        g.entries
            .sort_by(|a, b| (&a.spiffe_id, &a.id).cmp(&(&b.spiffe_id, &b.id)));
        let resync = g.synced_lifts < g.lifts;
        drop(g);
        if changed {
            self.bump();
        }
        if resync {
            // Wakes the sync loop: it mints the restored entries and syncs (`resync_wanted`).
            self.mint_now.notify_one();
        }
        changed
    }

    /// The number of lifts applied so far: read before asking the server for a sync, and
    /// passed to [`Self::synced_as_of`] when it completes.
    pub fn lift_generation(&self) -> u64 {
        self.read().lifts
    }

    /// A sync asked when `lift_generation` was `as_of` has been applied.
    pub fn synced_as_of(&self, as_of: u64) {
        let mut g = self.write();
        g.synced_lifts = g.synced_lifts.max(as_of);
    }

    /// A lift was applied after the last sync was asked: sync now rather than at the next
    /// interval.
    pub fn resync_wanted(&self) -> bool {
        let g = self.read();
        g.synced_lifts < g.lifts
    }

    /// Completes when an SVID should be minted without waiting for the next tick.
    pub async fn mint_wanted(&self) {
        self.mint_now.notified().await
    }

    /// Why a workload that held SVIDs of `entry_ids` has none now, when a revocation is the
    /// reason: this node's, or the first of those entries that stands revoked.
    pub fn revoked_reason<'a>(
        &self,
        entry_ids: impl IntoIterator<Item = &'a str>,
    ) -> Option<String> {
        let g = self.read();
        if g.node_revoked {
            return g.revoked_because.get("").cloned();
        }
        entry_ids
            .into_iter()
            .find_map(|id| g.revoked_because.get(id).cloned())
    }

    /// Whether this node was revoked (a kill switch): it serves nothing until re-admitted.
    pub fn node_revoked(&self) -> bool {
        self.read().node_revoked
    }

    /// A cached JWT-SVID that still has more than half its lifetime left.
    pub fn jwt(&self, entry_id: &str, audience: &[String], now: SystemTime) -> Option<String> {
        use std::sync::atomic::Ordering;
        let g = self.read();
        let slot = g.jwt.get(&(entry_id.to_string(), audience.to_vec()))?;
        let j = &slot.svid;
        let lifetime = j.expires_at.duration_since(j.issued_at).ok()?;
        let left = j.expires_at.duration_since(now).ok()?;
        if left <= lifetime / 2 {
            return None;
        }
        let tick = g.jwt_clock.fetch_add(1, Ordering::Relaxed);
        slot.last_used.store(tick, Ordering::Relaxed);
        Some(j.token.clone())
    }

    /// Holds a freshly minted JWT-SVID. At [`MAX_JWT_SVIDS`], expired ones are dropped
    /// first, then the least recently used.
    pub fn put_jwt(&self, entry_id: &str, audience: &[String], jwt: CachedJwtSvid) {
        use std::sync::atomic::{AtomicU64, Ordering};
        let mut g = self.write();
        let key = (entry_id.to_string(), audience.to_vec());
        if g.jwt.len() >= MAX_JWT_SVIDS && !g.jwt.contains_key(&key) {
            let now = jwt.issued_at;
            g.jwt.retain(|_, j| j.svid.expires_at > now);
            if g.jwt.len() >= MAX_JWT_SVIDS {
                // A scan at the bound only: inserts past it are limited per workload by the
                // Workload API's mint rate.
                let oldest = g
                    .jwt
                    .iter()
                    .min_by_key(|(_, j)| j.last_used.load(Ordering::Relaxed))
                    .map(|(k, _)| k.clone());
                if let Some(oldest) = oldest {
                    g.jwt.remove(&oldest);
                }
            }
        }
        let tick = g.jwt_clock.fetch_add(1, Ordering::Relaxed);
        g.jwt.insert(
            key,
            JwtSlot {
                svid: jwt,
                last_used: AtomicU64::new(tick),
            },
        );
    }
}

impl Cache {
    /// Replaces the grant set after a sync; SVIDs of grants that are gone are dropped at
    /// once (an expired or withdrawn grant stops being served).
    pub fn set_grants(&self, mut grants: Vec<NodeGrant>) {
        grants.sort_by(|a, b| a.id.cmp(&b.id));
        {
            // A sync answered before a revocation arrived must not bring the grant back.
            let g = self.read();
            grants.retain(|gr| !g.revoked_grants.contains(&gr.id));
        }
        let mut g = self.write();
        if g.grants == grants {
            return;
        }
        let live: std::collections::HashSet<String> =
            grants.iter().map(|gr| gr.id.clone()).collect();
        g.delegated.retain(|(_, grant), _| live.contains(grant));
        g.grants = grants;
        drop(g);
        self.bump();
    }

    /// Adds one grant (just obtained by a token exchange), ahead of the next sync.
    pub fn add_grant(&self, grant: NodeGrant) {
        let mut g = self.write();
        if g.grants.iter().any(|gr| gr.id == grant.id) {
            return;
        }
        g.grants.push(grant);
        g.grants.sort_by(|a, b| a.id.cmp(&b.id));
        drop(g);
        self.bump();
    }

    pub fn grants(&self) -> Vec<NodeGrant> {
        self.read().grants.clone()
    }

    /// (entry, grant) pairs that need a (new) delegated SVID: none yet, due for rotation,
    /// or the entry changed since it was minted.
    pub fn due_delegated(&self, now: SystemTime) -> Vec<(NodeEntry, NodeGrant)> {
        let g = self.read();
        let mut out = Vec::new();
        for gr in g.grants.iter().filter(|gr| gr.expires_at > now) {
            for e in g
                .entries
                .iter()
                .filter(|e| e.spiffe_id == gr.agent && self.minted_ahead(&g, e))
            {
                let due = match g.delegated.get(&(e.id.clone(), gr.id.clone())) {
                    None => true,
                    Some(s) => s.rotate_at <= now || s.entry_revision != e.revision,
                };
                if due {
                    out.push((e.clone(), gr.clone()));
                }
            }
        }
        out
    }

    /// Stores a freshly minted delegated SVID (ignored if its entry or grant went away).
    pub fn put_delegated(&self, svid: CachedX509Svid) {
        let Some(grant) = svid.grant_id().map(str::to_string) else {
            return;
        };
        let mut g = self.write();
        if !g.entries.iter().any(|e| e.id == svid.entry_id)
            || !g.grants.iter().any(|gr| gr.id == grant)
        {
            return;
        }
        g.delegated
            .insert((svid.entry_id.clone(), grant), Arc::new(svid));
        drop(g);
        self.bump();
    }

    /// The caller's grants (by its matching entries), each with the entry it is served
    /// through.
    pub fn grants_for(
        &self,
        selectors: &[Selector],
        now: SystemTime,
    ) -> Vec<(NodeEntry, NodeGrant)> {
        let g = self.read();
        let mut out = Vec::new();
        for e in g
            .entries
            .iter()
            .filter(|e| all_present(&e.selectors, selectors))
        {
            for gr in g
                .grants
                .iter()
                .filter(|gr| gr.agent == e.spiffe_id && gr.expires_at > now)
            {
                out.push((e.clone(), gr.clone()));
            }
        }
        out
    }
}

/// When to rotate an SVID that lives from `now` to `expires_at`: at half its lifetime,
/// give or take up to a tenth of it.
pub fn rotation_time(now: SystemTime, expires_at: SystemTime) -> SystemTime {
    let lifetime = expires_at.duration_since(now).unwrap_or_default();
    let half = lifetime / 2;
    let spread = lifetime / 10;
    let jitter_ms = spread.as_millis() as u64;
    let offset = if jitter_ms == 0 {
        0
    } else {
        rand::random_range(0..=2 * jitter_ms)
    };
    now + half + Duration::from_millis(offset) - spread.min(half)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn entry(id: &str, spiffe: &str, sel: &str, rev: u64) -> NodeEntry {
        NodeEntry {
            id: id.into(),
            spiffe_id: SpiffeId::new(spiffe).unwrap(),
            selectors: vec![sel.parse().unwrap()],
            x509_svid_ttl: Duration::from_secs(60),
            jwt_svid_ttl: Duration::from_secs(60),
            dns_names: vec![],
            hint: String::new(),
            revision: rev,
            federates_with: vec![],
        }
    }

    fn bundle() -> Bundle {
        Bundle {
            trust_domain: spiffe::TrustDomain::new("example.org").unwrap(),
            x509_authorities: vec![vec![1, 2, 3]],
            jwt_authorities: vec![],
            sequence: 1,
            refresh_hint: Duration::from_secs(300),
        }
    }

    fn foreign(td: &str, x509: usize, jwt: usize) -> Bundle {
        Bundle {
            trust_domain: spiffe::TrustDomain::new(td).unwrap(),
            x509_authorities: (0..x509).map(|i| vec![9, i as u8]).collect(),
            jwt_authorities: (0..jwt)
                .map(|i| crate::bundle::JwtAuthority {
                    key_id: format!("k{i}"),
                    public_key_spki_der: vec![7, i as u8],
                    expires_at: UNIX_EPOCH,
                })
                .collect(),
            sequence: 3,
            refresh_hint: Duration::from_secs(300),
        }
    }

    #[test]
    fn a_workload_gets_the_federated_bundles_of_its_entries_and_no_others() {
        let cache = Cache::new();
        let td = |s: &str| spiffe::TrustDomain::new(s).unwrap();
        let mut a = entry("a", "spiffe://example.org/a", "unix:uid:1", 1);
        a.federates_with = vec![td("partner.example")];
        let mut b = entry("b", "spiffe://example.org/b", "unix:uid:2", 1);
        b.federates_with = vec![td("other.example"), td("missing.example")];
        let c = entry("c", "spiffe://example.org/c", "unix:uid:3", 1);
        cache.set_entries(vec![a, b, c], bundle());
        let mut rx = cache.subscribe();
        rx.mark_unchanged();
        cache.set_federated(vec![
            foreign("partner.example", 1, 1),
            foreign("other.example", 2, 0),
            // Never our own trust domain, never an empty bundle.
            foreign("example.org", 5, 0),
            foreign("empty.example", 0, 0),
        ]);
        assert!(
            rx.has_changed().unwrap(),
            "a new federated set wakes the streams"
        );
        let names = |sel: &str| -> Vec<String> {
            cache
                .federated_for_selectors(&[sel.parse().unwrap()])
                .iter()
                .map(|b| b.trust_domain.as_str().to_string())
                .collect()
        };
        assert_eq!(names("unix:uid:1"), ["partner.example"]);
        assert_eq!(names("unix:uid:2"), ["other.example"]);
        assert!(names("unix:uid:3").is_empty());
        assert!(names("unix:uid:4").is_empty());
        let view = cache.view_for(&["unix:uid:1".parse().unwrap()], UNIX_EPOCH);
        assert_eq!(view.federated.len(), 1);
        assert_eq!(view.federated[0].x509_authorities.len(), 1);

        // The same set again (every sync sends it) changes nothing and wakes nobody.
        rx.mark_unchanged();
        cache.set_federated(vec![
            foreign("partner.example", 1, 1),
            foreign("other.example", 2, 0),
        ]);
        assert!(
            !rx.has_changed().unwrap(),
            "an identical set must not re-send streams"
        );
        // A changed bundle does.
        cache.set_federated(vec![
            foreign("partner.example", 2, 1),
            foreign("other.example", 2, 0),
        ]);
        assert!(rx.has_changed().unwrap());
        let view = cache.view_for(&["unix:uid:1".parse().unwrap()], UNIX_EPOCH);
        assert_eq!(view.federated[0].x509_authorities.len(), 2);
    }

    fn svid(entry_id: &str, rev: u64, expires: SystemTime, rotate: SystemTime) -> CachedX509Svid {
        CachedX509Svid {
            entry_id: entry_id.into(),
            entry_revision: rev,
            spiffe_id: SpiffeId::new("spiffe://example.org/a").unwrap(),
            hint: String::new(),
            chain: vec![vec![0]],
            key: PrivateKey::generate().unwrap(),
            serial: "1".into(),
            expires_at: expires,
            rotate_at: rotate,
            grant_chain: vec![],
            task_id: None,
        }
    }

    fn grant(id: &str, agent: &str, expires: SystemTime) -> NodeGrant {
        NodeGrant {
            id: id.into(),
            agent: SpiffeId::new(agent).unwrap(),
            principal: "user:alice".into(),
            scopes: vec!["calendar:read".into()],
            expires_at: expires,
            task_id: None,
            grant_chain: vec![id.into()],
            remaining_depth: 0,
        }
    }

    #[test]
    fn fetches_are_reported_at_most_10000_at_a_time_and_none_is_lost() {
        let cache = Cache::new();
        cache.note_fetched((0..25_000).map(|i| format!("{i:06}")));
        let mut all = Vec::new();
        for expected in [10_000, 10_000, 5_000, 0] {
            let batch = cache.take_fetched();
            assert_eq!(batch.len(), expected);
            all.extend(batch);
        }
        assert_eq!(
            all,
            (0..25_000).map(|i| format!("{i:06}")).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_delta_replaces_adds_and_removes_entries_and_the_grants_of_the_asked_agents() {
        let now = UNIX_EPOCH + Duration::from_secs(1000);
        let cache = Cache::new();
        cache.set_entries(
            vec![
                entry("a", "spiffe://example.org/a", "unix:uid:1", 1),
                entry("c", "spiffe://example.org/c", "unix:uid:3", 1),
            ],
            bundle(),
        );
        cache.put_x509(vec![svid(
            "c",
            1,
            now + Duration::from_secs(60),
            now + Duration::from_secs(30),
        )]);
        let ga = grant(
            "g-a",
            "spiffe://example.org/a",
            now + Duration::from_secs(60),
        );
        let gc = grant(
            "g-c",
            "spiffe://example.org/c",
            now + Duration::from_secs(60),
        );
        cache.set_grants(vec![ga.clone(), gc.clone()]);
        let mut rx = cache.subscribe();
        rx.mark_unchanged();
        cache.apply_delta(
            vec![
                entry("b", "spiffe://example.org/b", "unix:uid:2", 1),
                entry("a", "spiffe://example.org/a", "unix:uid:1", 2),
            ],
            &["c".to_string(), "not-held".to_string()],
            &[SpiffeId::new("spiffe://example.org/a").unwrap()],
            vec![],
        );
        assert!(rx.has_changed().unwrap());
        let held: Vec<(String, u64)> = cache
            .entries()
            .into_iter()
            .map(|e| (e.id, e.revision))
            .collect();
        assert_eq!(
            held,
            [("a".to_string(), 2), ("b".to_string(), 1)],
            "in order, a at its new revision"
        );
        assert_eq!(
            cache.svid_count(),
            0,
            "the removed entry's SVID went with it"
        );
        let grants: Vec<String> = cache.grants().into_iter().map(|g| g.id).collect();
        assert_eq!(
            grants,
            ["g-c"],
            "a's grants replaced by none; c's untouched though c went"
        );
        // The same delta again changes nothing and notifies no one.
        rx.mark_unchanged();
        cache.apply_delta(
            vec![entry("b", "spiffe://example.org/b", "unix:uid:2", 1)],
            &[],
            &[],
            vec![],
        );
        assert!(!rx.has_changed().unwrap());
    }

    #[test]
    fn above_the_prefetch_bound_only_entries_a_caller_matched_are_minted() {
        let now = UNIX_EPOCH + Duration::from_secs(1000);
        let entries = || {
            (0..3)
                .map(|i| {
                    entry(
                        &format!("e{i}"),
                        &format!("spiffe://example.org/w{i}"),
                        &format!("unix:uid:{i}"),
                        1,
                    )
                })
                .collect::<Vec<_>>()
        };
        // Within the bound, every entry is minted ahead of any caller.
        let small = Cache::with_prefetch(3);
        small.set_entries(entries(), bundle());
        assert_eq!(small.due_for_mint(now).len(), 3);

        let large = Cache::with_prefetch(2);
        large.set_entries(entries(), bundle());
        assert!(
            large.due_for_mint(now).is_empty(),
            "nothing before a caller asks"
        );
        let uid1: Vec<Selector> = vec!["unix:uid:1".parse().unwrap()];
        let view = large.view_for(&uid1, now);
        assert_eq!(view.entries.len(), 1);
        assert!(view.svids.is_empty());
        let due: Vec<String> = large.due_for_mint(now).into_iter().map(|e| e.id).collect();
        assert_eq!(due, ["e1"], "the caller's entry, and only it");
        assert_eq!(large.wanted_count(), 1);
        large.set_grants(vec![
            grant(
                "g1",
                "spiffe://example.org/w1",
                now + Duration::from_secs(60),
            ),
            grant(
                "g2",
                "spiffe://example.org/w2",
                now + Duration::from_secs(60),
            ),
        ]);
        let delegated: Vec<String> = large
            .due_delegated(now)
            .into_iter()
            .map(|(_, g)| g.id)
            .collect();
        assert_eq!(delegated, ["g1"], "delegated SVIDs of wanted entries only");
        // An entry that goes is no longer wanted.
        large.set_entries(
            entries().into_iter().filter(|e| e.id != "e1").collect(),
            bundle(),
        );
        assert_eq!(large.wanted_count(), 0);
    }

    #[test]
    fn delegated_svids_follow_their_grant_and_go_with_it() {
        let now = UNIX_EPOCH + Duration::from_secs(1000);
        let cache = Cache::new();
        cache.set_entries(
            vec![entry("a", "spiffe://example.org/a", "unix:uid:1", 1)],
            bundle(),
        );
        cache.put_x509(vec![svid(
            "a",
            1,
            now + Duration::from_secs(60),
            now + Duration::from_secs(30),
        )]);
        let g_end = now + Duration::from_secs(20);
        cache.set_grants(vec![grant("g1", "spiffe://example.org/a", g_end)]);
        let due = cache.due_delegated(now);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].1.hint(), "grant:g1");
        let mut d = svid("a", 1, g_end, now + Duration::from_secs(10));
        d.grant_chain = vec!["g1".into()];
        d.serial = "2".into();
        cache.put_delegated(d);
        assert!(cache.due_delegated(now).is_empty());
        let uid1: Vec<Selector> = vec!["unix:uid:1".parse().unwrap()];
        let view = cache.view_for(&uid1, now);
        let serials: Vec<&str> = view.svids.iter().map(|s| s.serial.as_str()).collect();
        assert_eq!(
            serials,
            ["1", "2"],
            "plain SVID first, then the delegated one"
        );
        assert_eq!(cache.grants_for(&uid1, now).len(), 1);
        // The grant expires: its SVID is no longer served, and dropping it notifies.
        let mut rx = cache.subscribe();
        rx.mark_unchanged();
        let after = g_end + Duration::from_secs(1);
        cache.drop_expired(after);
        assert!(rx.has_changed().unwrap());
        assert_eq!(cache.view_for(&uid1, after).svids.len(), 1);
        assert!(cache.grants().is_empty());
        // A grant that disappears from the sync loses its SVIDs at once.
        cache.set_grants(vec![grant(
            "g2",
            "spiffe://example.org/a",
            now + Duration::from_secs(600),
        )]);
        let mut d = svid(
            "a",
            1,
            now + Duration::from_secs(600),
            now + Duration::from_secs(300),
        );
        d.grant_chain = vec!["g2".into()];
        cache.put_delegated(d);
        assert_eq!(cache.view_for(&uid1, now).svids.len(), 2);
        cache.set_grants(vec![]);
        assert_eq!(cache.view_for(&uid1, now).svids.len(), 1);
    }

    #[test]
    fn rotation_is_about_half_way() {
        let now = UNIX_EPOCH + Duration::from_secs(1000);
        for _ in 0..100 {
            let at = rotation_time(now, now + Duration::from_secs(100));
            let secs = at.duration_since(now).unwrap().as_secs_f64();
            assert!((40.0..=60.0).contains(&secs), "{secs}");
        }
    }

    #[test]
    fn mint_due_for_missing_rotating_and_changed_entries() {
        let now = UNIX_EPOCH + Duration::from_secs(1000);
        let cache = Cache::new();
        cache.set_entries(
            vec![
                entry("a", "spiffe://example.org/a", "unix:uid:1", 1),
                entry("b", "spiffe://example.org/b", "unix:uid:1", 1),
            ],
            bundle(),
        );
        assert_eq!(cache.due_for_mint(now).len(), 2);
        let later = now + Duration::from_secs(60);
        cache.put_x509(vec![
            svid("a", 1, later, now + Duration::from_secs(30)),
            svid("b", 1, later, now + Duration::from_secs(30)),
        ]);
        assert!(cache.due_for_mint(now).is_empty());
        // Half-life passed: both due.
        assert_eq!(cache.due_for_mint(now + Duration::from_secs(31)).len(), 2);
        // Entry b changed: due at once.
        cache.set_entries(
            vec![
                entry("a", "spiffe://example.org/a", "unix:uid:1", 1),
                entry("b", "spiffe://example.org/b", "unix:uid:1", 2),
            ],
            bundle(),
        );
        let due: Vec<String> = cache.due_for_mint(now).into_iter().map(|e| e.id).collect();
        assert_eq!(due, ["b"]);
    }

    #[test]
    fn view_matches_selectors_drops_expired_and_notifies() {
        let now = UNIX_EPOCH + Duration::from_secs(1000);
        let cache = Cache::new();
        let mut rx = cache.subscribe();
        cache.set_entries(
            vec![
                entry("a", "spiffe://example.org/a", "unix:uid:1", 1),
                entry("b", "spiffe://example.org/b", "unix:uid:2", 1),
            ],
            bundle(),
        );
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        cache.put_x509(vec![svid("a", 1, now + Duration::from_secs(10), now)]);
        assert!(rx.has_changed().unwrap());
        let uid1: Vec<Selector> = vec!["unix:uid:1".parse().unwrap()];
        assert_eq!(cache.view_for(&uid1, now).svids.len(), 1);
        let uid3: Vec<Selector> = vec!["unix:uid:3".parse().unwrap()];
        assert!(cache.view_for(&uid3, now).entries.is_empty());
        // Expired SVIDs are never served, and dropping them notifies.
        let after = now + Duration::from_secs(11);
        assert!(cache.view_for(&uid1, after).svids.is_empty());
        rx.mark_unchanged();
        cache.drop_expired(after);
        assert!(rx.has_changed().unwrap());
    }

    #[test]
    fn fetched_entries_are_reported_once() {
        let cache = Cache::new();
        cache.note_fetched(["b", "a"]);
        cache.note_fetched(vec!["a".to_string()]);
        assert_eq!(cache.take_fetched(), ["a", "b"]);
        assert!(cache.take_fetched().is_empty());
    }

    #[test]
    fn removed_entries_lose_their_svids() {
        let now = UNIX_EPOCH + Duration::from_secs(1000);
        let cache = Cache::new();
        cache.set_entries(
            vec![entry("a", "spiffe://example.org/a", "unix:uid:1", 1)],
            bundle(),
        );
        cache.put_x509(vec![svid("a", 1, now + Duration::from_secs(10), now)]);
        assert_eq!(cache.svid_count(), 1);
        cache.set_entries(vec![], bundle());
        assert_eq!(cache.svid_count(), 0);
    }

    fn revoke(seq: u64, handle: RevocationHandle, serials: &[&str]) -> RevocationEvent {
        RevocationEvent {
            sequence: seq,
            action: RevocationAction::Revoke,
            handle,
            reason: String::new(),
            at: 0,
            serials: serials
                .iter()
                .map(|s| crate::revocation::RevokedSerial {
                    serial: s.to_string(),
                    authority_id: String::new(),
                    expires_at: 0,
                })
                .collect(),
            jwt_ids: vec![],
            expires_at: 0,
        }
    }

    #[test]
    fn revocations_drop_svids_and_keep_revoked_entries_out() {
        let now = UNIX_EPOCH + Duration::from_secs(1000);
        let own = SpiffeId::new("spiffe://example.org/node/self").unwrap();
        let a_id = "a".repeat(32);
        let b_id = "b".repeat(32);
        let entries = || {
            vec![
                entry(&a_id, "spiffe://example.org/a", "unix:uid:1", 1),
                entry(&b_id, "spiffe://example.org/b", "unix:uid:1", 1),
            ]
        };
        let cache = Cache::new();
        cache.set_entries(entries(), bundle());
        let mut a = svid(
            &a_id,
            1,
            now + Duration::from_secs(60),
            now + Duration::from_secs(30),
        );
        a.serial = "a1".into();
        let mut b = svid(
            &b_id,
            1,
            now + Duration::from_secs(60),
            now + Duration::from_secs(30),
        );
        b.serial = "b1".into();
        cache.put_x509(vec![a, b]);
        let uid1: Vec<Selector> = vec!["unix:uid:1".parse().unwrap()];

        // By serial: dropped at once, due for a new mint, and the view says one is coming.
        let mut rx = cache.subscribe();
        rx.mark_unchanged();
        assert!(cache.apply_revocation(
            &revoke(1, RevocationHandle::Svid("a1".into()), &["a1"]),
            &own
        ));
        assert!(rx.has_changed().unwrap());
        let view = cache.view_for(&uid1, now);
        assert_eq!(view.svids.len(), 1);
        assert!(view.reminting);
        let due: Vec<String> = cache.due_for_mint(now).into_iter().map(|e| e.id).collect();
        assert_eq!(due, std::slice::from_ref(&a_id));

        // By entry: the entry goes, and a sync answered before the event cannot bring it back.
        let entry_b = RevocationHandle::Entry(b_id.parse().unwrap());
        cache.apply_revocation(&revoke(2, entry_b.clone(), &["b1"]), &own);
        cache.set_entries(entries(), bundle());
        let view = cache.view_for(&uid1, now);
        assert_eq!(
            view.entries
                .iter()
                .map(|e| e.id.clone())
                .collect::<Vec<_>>(),
            std::slice::from_ref(&a_id)
        );
        assert!(cache.due_for_mint(now).iter().all(|e| e.id != b_id));
        // Lifted: back at once, due for a mint, and a sync is wanted now.
        let mut lift = revoke(3, entry_b, &[]);
        lift.action = RevocationAction::Lift { revocation: 2 };
        let as_of = cache.lift_generation();
        assert!(!cache.resync_wanted());
        cache.apply_revocation(&lift, &own);
        assert_eq!(cache.view_for(&uid1, now).entries.len(), 2);
        assert!(cache.due_for_mint(now).iter().any(|e| e.id == b_id));
        assert!(cache.resync_wanted());
        // A sync asked before the lift does not count.
        cache.synced_as_of(as_of);
        assert!(cache.resync_wanted());
        cache.set_entries(entries(), bundle());
        cache.synced_as_of(cache.lift_generation());
        assert!(!cache.resync_wanted());
        assert_eq!(cache.view_for(&uid1, now).entries.len(), 2);

        // This node revoked: nothing at all.
        let node = RevocationHandle::Node(own.clone());
        cache.apply_revocation(&revoke(4, node.clone(), &[]), &own);
        assert!(cache.node_revoked());
        cache.set_entries(entries(), bundle());
        assert!(cache.view_for(&uid1, now).entries.is_empty());
        assert_eq!(cache.svid_count(), 0);
        // Re-admitted: its entries are back before the next sync.
        let mut lift = revoke(5, node, &[]);
        lift.action = RevocationAction::Lift { revocation: 4 };
        cache.apply_revocation(&lift, &own);
        assert!(!cache.node_revoked());
        assert_eq!(cache.view_for(&uid1, now).entries.len(), 2);
    }

    #[test]
    fn the_jwt_cache_is_bounded_and_evicts_the_least_recently_used() {
        let now = UNIX_EPOCH + Duration::from_secs(1000);
        let cache = Cache::new();
        let jwt = |token: &str| CachedJwtSvid {
            token: token.into(),
            issued_at: now,
            expires_at: now + Duration::from_secs(300),
        };
        let aud = |i: usize| vec![format!("aud-{i}")];
        cache.put_jwt("busy", &["db".to_string()], jwt("kept"));
        for i in 0..MAX_JWT_SVIDS + 500 {
            cache.put_jwt("flood", &aud(i), jwt("x"));
            // Another workload keeps using its token while one floods new audiences.
            if i % 1000 == 0 {
                assert_eq!(
                    cache.jwt("busy", &["db".to_string()], now).as_deref(),
                    Some("kept"),
                    "evicted after {i} inserts"
                );
            }
        }
        assert_eq!(cache.jwt_svid_count(), MAX_JWT_SVIDS);
        assert_eq!(
            cache.jwt("busy", &["db".to_string()], now).as_deref(),
            Some("kept")
        );
        // The flood evicted its own oldest tokens, and kept its newest.
        assert!(cache.jwt("flood", &aud(0), now).is_none());
        assert!(cache.jwt("flood", &aud(MAX_JWT_SVIDS + 499), now).is_some());
    }

    #[test]
    fn a_lift_replayed_after_the_first_sync_restores_the_entry() {
        // A restarted node: its first sync lists the entry, then the feed replays the
        // revocation and its lift.
        let now = UNIX_EPOCH + Duration::from_secs(1000);
        let own = SpiffeId::new("spiffe://example.org/node/self").unwrap();
        let a_id = "a".repeat(32);
        let cache = Cache::new();
        cache.set_entries(
            vec![entry(&a_id, "spiffe://example.org/a", "unix:uid:1", 1)],
            bundle(),
        );
        let handle = RevocationHandle::Entry(a_id.parse().unwrap());
        cache.apply_revocation(&revoke(1, handle.clone(), &[]), &own);
        let uid1: Vec<Selector> = vec!["unix:uid:1".parse().unwrap()];
        assert!(cache.view_for(&uid1, now).entries.is_empty());
        let mut lift = revoke(2, handle, &[]);
        lift.action = RevocationAction::Lift { revocation: 1 };
        cache.apply_revocation(&lift, &own);
        assert_eq!(cache.view_for(&uid1, now).entries.len(), 1);
        assert_eq!(cache.due_for_mint(now).len(), 1);
    }
}
