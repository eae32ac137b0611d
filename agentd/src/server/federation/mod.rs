//! Federation with other trust domains (SPIFFE Federation spec; docs/federation.md).
//!
//! - `validate`: what a foreign bundle must be before it is stored, whether an operator
//!   supplied it or an endpoint served it.
//! - `fetch`: one HTTPS GET of a bundle endpoint, in the https_spiffe or https_web profile.
//! - `refresh`: the loop that fetches each relationship's bundle at its refresh hint and
//!   keeps the last good one when a fetch fails or is refused.
//! - `endpoint`: this trust domain's own bundle endpoint.
//!
//! Relationships and bundles live in the datastore (shared by every server of a shared
//! store); the refresh status is this server's own and is kept in memory.

use std::collections::BTreeMap;
use std::sync::Mutex;

use spiffe::TrustDomain;

pub mod endpoint;
pub mod fetch;
pub mod refresh;
pub mod validate;

pub use validate::{parse_bundle, BundleFormat, BundleRejected};

/// What this server's last fetch of a trust domain's bundle did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RefreshStatus {
    /// Unix seconds of the last attempt (0: none yet).
    pub last_attempt_at: i64,
    /// Why it failed; `None` when it succeeded.
    pub last_error: Option<String>,
    /// Unix seconds of the next attempt (0: not scheduled).
    pub next_refresh_at: i64,
}

/// The federation state a server keeps in memory: refresh status per trust domain, and a
/// wake-up for the refresh loop when a relationship is created or changed.
#[derive(Debug, Default)]
pub struct FederationState {
    status: Mutex<BTreeMap<String, RefreshStatus>>,
    wake: tokio::sync::Notify,
}

impl FederationState {
    pub fn status(&self, trust_domain: &TrustDomain) -> RefreshStatus {
        self.lock()
            .get(trust_domain.as_str())
            .cloned()
            .unwrap_or_default()
    }

    pub(crate) fn set_status(&self, trust_domain: &TrustDomain, status: RefreshStatus) {
        self.lock()
            .insert(trust_domain.as_str().to_string(), status);
    }

    pub(crate) fn forget(&self, trust_domain: &TrustDomain) {
        self.lock().remove(trust_domain.as_str());
    }

    /// Asks the refresh loop to look at the relationships again now (one was created,
    /// changed or deleted).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    pub(crate) async fn woken(&self) {
        self.wake.notified().await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, RefreshStatus>> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }
}
