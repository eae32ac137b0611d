//! What the server keeps about an entry's use and its owner: when it was last issued and
//! fetched, which of its SVIDs are still live, and which owners are disabled.

/// An SVID the server issued, as the inventory counts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryIssuance {
    pub entry_id: super::EntryId,
    /// `x509` or `jwt`.
    pub kind: &'static str,
    /// Serial (X.509), empty for a JWT-SVID.
    pub serial: String,
    /// The node it was issued to.
    pub node: String,
    pub expires_at: i64,
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
}

/// An owner's state. Owners that were never disabled have no record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerState {
    pub owner: String,
    pub disabled: bool,
    /// Unix seconds of the last change.
    pub changed_at: i64,
}
