//! Operational telemetry shared by the server and the node agent: Prometheus metrics, the
//! readiness state behind `/ready`, the HTTP endpoint that serves both, and the per-RPC
//! tracing spans and latency histograms of the gRPC APIs.
//!
//! Metric handles live in one struct per daemon ([`ServerMetrics`], [`NodeMetrics`]) that is
//! passed to the components through their state; nothing is global, so two daemons in one
//! test process keep separate counters.

pub mod endpoint;
pub mod metrics;
pub mod rpc;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

pub use endpoint::{Endpoint, EndpointError, Refresh, RefreshFuture};
pub use metrics::{
    AttestationFailure, Encode, NodeMetrics, RevocationHandle, ServerMetrics, SvidKind,
};
pub use rpc::RpcLayer;

/// The readiness conditions the daemons use. A daemon is ready when every condition it
/// requires is met.
pub mod conditions {
    /// Server: the CA (signing key and certificate) is loaded.
    pub const CA_LOADED: &str = "ca_loaded";
    /// Server: the datastore is open.
    pub const STORE_OPEN: &str = "store_open";
    /// Server: the datastore answered its last check (a shared database may go away).
    pub const STORE_REACHABLE: &str = "datastore_reachable";
    /// Server: the node API and admin API are accepting calls; cleared at shutdown.
    pub const SERVING: &str = "serving";
    /// Node agent: it holds a node SVID (attested now, or a persisted identity).
    pub const ATTESTED: &str = "attested";
    /// Node agent: entries and the bundle have been synced from the server at least once.
    pub const SYNCED: &str = "synced";
    /// Node agent: the revocation feed from the server is connected.
    pub const REVOCATION_FEED: &str = "revocation_feed_connected";
}

/// The readiness of a daemon: a set of named conditions, each met or not. Components
/// register the conditions they are responsible for ([`Readiness::require`]) and flip them
/// ([`Readiness::set`]); `/ready` answers 200 only when all are met. Cloning shares the state.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    conditions: Arc<Mutex<BTreeMap<&'static str, bool>>>,
}

impl Readiness {
    /// A readiness with `conditions`, none met yet.
    pub fn new(conditions: &[&'static str]) -> Self {
        let r = Self::default();
        for c in conditions {
            r.require(c);
        }
        r
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, bool>> {
        self.conditions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a condition (not met) unless it is already known.
    pub fn require(&self, condition: &'static str) {
        self.lock().entry(condition).or_insert(false);
    }

    /// Marks a condition met or not; an unknown condition is added.
    pub fn set(&self, condition: &'static str, met: bool) {
        self.lock().insert(condition, met);
    }

    /// Whether one condition is met (false if it is not known).
    pub fn is_met(&self, condition: &str) -> bool {
        self.lock().get(condition).copied().unwrap_or(false)
    }

    /// The conditions not met yet, sorted.
    pub fn unmet(&self) -> Vec<&'static str> {
        self.lock()
            .iter()
            .filter(|(_, met)| !**met)
            .map(|(c, _)| *c)
            .collect()
    }

    pub fn is_ready(&self) -> bool {
        self.unmet().is_empty()
    }
}

/// Parses `metrics_address` (config key and `--metrics-address`): an IP address and a port;
/// port 0 picks a free one (the bound address is logged).
pub fn parse_metrics_address(raw: &str) -> Result<SocketAddr, String> {
    raw.parse::<SocketAddr>()
        .map_err(|e| format!("{raw:?}: {e} (expected HOST:PORT with an IP address)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_required_condition_is_met() {
        let r = Readiness::new(&[conditions::ATTESTED, conditions::SYNCED]);
        assert!(!r.is_ready());
        assert_eq!(r.unmet(), vec!["attested", "synced"]);
        r.set(conditions::ATTESTED, true);
        assert_eq!(r.unmet(), vec!["synced"]);
        r.set(conditions::SYNCED, true);
        assert!(r.is_ready());
        // A condition registered later (the revocation feed) makes it unready until met.
        let shared = r.clone();
        shared.require(conditions::REVOCATION_FEED);
        assert_eq!(r.unmet(), vec!["revocation_feed_connected"]);
        // Requiring a known condition again does not reset it.
        r.require(conditions::SYNCED);
        assert!(r.is_met(conditions::SYNCED));
        shared.set(conditions::REVOCATION_FEED, true);
        assert!(r.is_ready());
    }

    #[test]
    fn metrics_address_must_be_ip_and_port() {
        assert_eq!(
            parse_metrics_address("127.0.0.1:0")
                .unwrap()
                .ip()
                .to_string(),
            "127.0.0.1"
        );
        assert!(parse_metrics_address("[::1]:9090").is_ok());
        let e = parse_metrics_address("localhost:9090").unwrap_err();
        assert!(e.contains("HOST:PORT"), "{e}");
        assert!(parse_metrics_address("127.0.0.1").is_err());
    }
}
