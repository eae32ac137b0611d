//! What the server keeps about an entry's use and its owner: when it was last issued and
//! fetched, which of its SVIDs are still live, and which owners are disabled.
//!
//! When an entry was last issued and which of its SVIDs are live derive from the issuance
//! records (the one write a mint makes, beside its audit records); the activity record
//! keeps `last_fetched`, and the `last_issued` of records pruned since.

use std::collections::HashMap;

use super::EntryId;

/// Most live SVIDs listed per entry; the oldest go first.
pub const MAX_LIVE_PER_ENTRY: usize = 256;

/// What one issuance record says of its entry's activity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedForEntry {
    pub entry_id: String,
    pub issued_at: i64,
    pub live: LiveSvid,
}

/// An SVID that has not expired yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveSvid {
    pub kind: String,
    pub serial: String,
    pub node: String,
    pub expires_at: i64,
}

/// Per-entry activity. Kept apart from the entry, so that use never bumps the entry's
/// revision (which node agents watch for changes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntryActivity {
    /// Unix seconds of the last SVID the server minted for the entry.
    pub last_issued: Option<i64>,
    /// Unix seconds of the last time a workload fetched one of its SVIDs, as reported by
    /// node agents at their next sync.
    pub last_fetched: Option<i64>,
    /// SVIDs not yet expired when they were last counted (expired ones are dropped on the
    /// next write and ignored on read).
    pub live: Vec<LiveSvid>,
}

impl EntryActivity {
    pub fn live_at(&self, now: i64) -> impl Iterator<Item = &LiveSvid> {
        self.live.iter().filter(move |s| s.expires_at > now)
    }

    /// Moves `last_issued` forward to `at` (never back).
    pub fn issued_at(&mut self, at: i64) {
        self.last_issued = Some(self.last_issued.map_or(at, |t| t.max(at)));
    }
}

/// Every entry's activity: `stored` (the activity records) with what the issuance records
/// say, for the entries `exists` (records outlive a deleted entry until they expire, its
/// activity does not). The live set of each entry lists each SVID once, at most
/// [`MAX_LIVE_PER_ENTRY`] of them, the latest to expire last.
pub fn with_issued(
    mut stored: HashMap<EntryId, EntryActivity>,
    issued: Vec<IssuedForEntry>,
    exists: impl Fn(&str) -> bool,
) -> HashMap<EntryId, EntryActivity> {
    for record in issued {
        let Ok(id) = record.entry_id.parse::<EntryId>() else {
            continue;
        };
        if !stored.contains_key(&id) && !exists(record.entry_id.as_str()) {
            continue;
        }
        let activity = stored.entry(id).or_default();
        activity.issued_at(record.issued_at);
        activity.live.push(record.live);
    }
    for activity in stored.values_mut() {
        // Activity records written before kept their own live set: one listing per SVID.
        activity.live.sort_by(|a, b| {
            (a.expires_at, &a.kind, &a.serial).cmp(&(b.expires_at, &b.kind, &b.serial))
        });
        activity
            .live
            .dedup_by(|a, b| a.kind == b.kind && a.serial == b.serial);
        if activity.live.len() > MAX_LIVE_PER_ENTRY {
            let extra = activity.live.len() - MAX_LIVE_PER_ENTRY;
            activity.live.drain(..extra);
        }
    }
    stored
}

/// An owner's state. Owners that were never disabled have no record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerState {
    pub owner: String,
    pub disabled: bool,
    /// Unix seconds of the last change.
    pub changed_at: i64,
}
