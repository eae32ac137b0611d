//! The metrics of each daemon, in the Prometheus/OpenMetrics text format
//! (`prometheus-client`). Every label takes its values from a fixed set (enums here, or the
//! RPC paths a service actually implements), so that no caller can grow the number of series.

use std::fmt;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::rpc::RpcLayer;

/// A histogram per label set; the buckets come from the constructor.
pub(crate) type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// 0.5 ms to about 16 s, doubling: signing an SVID takes about a millisecond, a Workload API
/// call that waits for a mint up to the mint wait (10 s).
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Renders a daemon's metrics in the text exposition format.
pub trait Encode: Send + Sync + fmt::Debug + 'static {
    fn encode(&self, out: &mut String) -> fmt::Result;
}

/// Labels of the per-RPC metrics: which API, and the gRPC method path
/// (`/SpiffeWorkloadAPI/FetchX509SVID`), or `unknown` for a path no service implements.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RpcLabels {
    pub api: &'static str,
    pub rpc: String,
}

/// The kind of a minted workload SVID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SvidKind {
    X509,
    Jwt,
}

impl SvidKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SvidKind::X509 => "x509",
            SvidKind::Jwt => "jwt",
        }
    }
}

/// Why a node attestation was refused: a small fixed set, never the error text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttestationFailure {
    /// A missing or malformed field (CSR, certificate chain, token syntax).
    InvalidRequest,
    /// Join token not found, or already used.
    UnknownJoinToken,
    ExpiredJoinToken,
    /// The attestor the node asked for is not configured on the server.
    AttestorNotEnabled,
    /// The evidence did not verify (x509pop signature or chain, claims token).
    EvidenceRejected,
    /// The node ID belongs to a node attested another way, or to a registration entry.
    IdentityConflict,
    /// Too many attestations in flight.
    Busy,
    /// The node is revoked (`agentd revoke node`) and may not attest while that stands.
    Revoked,
    /// A store or CA failure on the server.
    Internal,
}

impl AttestationFailure {
    pub const ALL: [AttestationFailure; 9] = [
        AttestationFailure::InvalidRequest,
        AttestationFailure::UnknownJoinToken,
        AttestationFailure::ExpiredJoinToken,
        AttestationFailure::AttestorNotEnabled,
        AttestationFailure::EvidenceRejected,
        AttestationFailure::IdentityConflict,
        AttestationFailure::Busy,
        AttestationFailure::Revoked,
        AttestationFailure::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AttestationFailure::InvalidRequest => "invalid_request",
            AttestationFailure::UnknownJoinToken => "unknown_join_token",
            AttestationFailure::ExpiredJoinToken => "expired_join_token",
            AttestationFailure::AttestorNotEnabled => "attestor_not_enabled",
            AttestationFailure::EvidenceRejected => "evidence_rejected",
            AttestationFailure::IdentityConflict => "identity_conflict",
            AttestationFailure::Busy => "busy",
            AttestationFailure::Revoked => "revoked",
            AttestationFailure::Internal => "internal",
        }
    }
}

/// The revocation handles (design, section 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RevocationHandle {
    Svid,
    Entry,
    Node,
    Grant,
    Task,
    Authority,
}

impl RevocationHandle {
    pub const ALL: [RevocationHandle; 6] = [
        RevocationHandle::Svid,
        RevocationHandle::Entry,
        RevocationHandle::Node,
        RevocationHandle::Grant,
        RevocationHandle::Task,
        RevocationHandle::Authority,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RevocationHandle::Svid => "svid",
            RevocationHandle::Entry => "entry",
            RevocationHandle::Node => "node",
            RevocationHandle::Grant => "grant",
            RevocationHandle::Task => "task",
            RevocationHandle::Authority => "authority",
        }
    }
}

/// The node attestors a node can present; anything else is counted as `none`.
fn attestor_label(attestor: &str) -> &'static str {
    match attestor {
        "join_token" => "join_token",
        "x509pop" => "x509pop",
        "claims" => "claims",
        _ => "none",
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SvidTypeLabels {
    r#type: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttestorLabels {
    attestor: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttestationFailureLabels {
    attestor: &'static str,
    reason: &'static str,
}

/// A federated bundle fetch: the trust domain (operator-configured, so a bounded set) and
/// what came of it.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FederationFetchLabels {
    trust_domain: String,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandleLabels {
    handle: &'static str,
}

/// The server's metrics (prefix `agentd_server_`).
#[derive(Debug)]
pub struct ServerMetrics {
    registry: Registry,
    svids_minted: Family<SvidTypeLabels, Counter>,
    mint_duration: HistogramFamily<SvidTypeLabels>,
    node_attestations: Family<AttestorLabels, Counter>,
    attestation_failures: Family<AttestationFailureLabels, Counter>,
    revocations: Family<HandleLabels, Counter>,
    entries: Gauge,
    nodes: Gauge,
    rpc_duration: HistogramFamily<RpcLabels>,
    federation_fetches: Family<FederationFetchLabels, Counter>,
}

impl Default for ServerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ServerMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("agentd_server");
        let svids_minted = Family::<SvidTypeLabels, Counter>::default();
        registry.register(
            "svids_minted",
            "Workload SVIDs signed, by type (x509, jwt)",
            svids_minted.clone(),
        );
        let mint_duration = HistogramFamily::<SvidTypeLabels>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "svid_mint_duration_seconds",
            "Time to sign one workload SVID, by type (x509, jwt)",
            mint_duration.clone(),
        );
        let node_attestations = Family::<AttestorLabels, Counter>::default();
        registry.register(
            "node_attestations",
            "Successful node attestations, by attestor",
            node_attestations.clone(),
        );
        let attestation_failures = Family::<AttestationFailureLabels, Counter>::default();
        registry.register(
            "node_attestation_failures",
            "Refused node attestations, by attestor and reason",
            attestation_failures.clone(),
        );
        let revocations = Family::<HandleLabels, Counter>::default();
        registry.register(
            "revocations",
            "Revocations recorded, by handle kind",
            revocations.clone(),
        );
        let entries = Gauge::default();
        registry.register(
            "entries",
            "Registration entries in the store",
            entries.clone(),
        );
        let nodes = Gauge::default();
        registry.register("nodes", "Attested nodes in the store", nodes.clone());
        let rpc_duration = HistogramFamily::<RpcLabels>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "rpc_duration_seconds",
            "Time from an RPC's arrival to its response headers, by API (node, admin) and method",
            rpc_duration.clone(),
        );
        let federation_fetches = Family::<FederationFetchLabels, Counter>::default();
        registry.register(
            "federated_bundle_fetches",
            "Bundle endpoint fetches, by trust domain and outcome (updated, unchanged, failed: not fetched, rejected: fetched but refused)",
            federation_fetches.clone(),
        );
        // Counters with fixed label values exist from the start at 0, so that a rate or an
        // alert on them does not wait for the first event.
        for kind in [SvidKind::X509, SvidKind::Jwt] {
            let _ = svids_minted.get_or_create(&SvidTypeLabels {
                r#type: kind.as_str(),
            });
        }
        for handle in RevocationHandle::ALL {
            let _ = revocations.get_or_create(&HandleLabels {
                handle: handle.as_str(),
            });
        }
        Self {
            registry,
            svids_minted,
            mint_duration,
            node_attestations,
            attestation_failures,
            revocations,
            entries,
            nodes,
            rpc_duration,
            federation_fetches,
        }
    }

    /// One bundle endpoint fetch for `trust_domain`: `outcome` is "updated", "unchanged",
    /// "failed" (nothing usable came back) or "rejected" (a bundle came back and was refused).
    pub fn federation_fetched(&self, trust_domain: &str, outcome: &'static str) {
        self.federation_fetches
            .get_or_create(&FederationFetchLabels {
                trust_domain: trust_domain.to_string(),
                outcome,
            })
            .inc();
    }

    /// One workload SVID signed in `took`.
    pub fn svid_minted(&self, kind: SvidKind, took: Duration) {
        let labels = SvidTypeLabels {
            r#type: kind.as_str(),
        };
        self.svids_minted.get_or_create(&labels).inc();
        self.mint_duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    pub fn node_attested(&self, attestor: &str) {
        self.node_attestations
            .get_or_create(&AttestorLabels {
                attestor: attestor_label(attestor),
            })
            .inc();
    }

    pub fn attestation_failed(&self, attestor: &str, reason: AttestationFailure) {
        self.attestation_failures
            .get_or_create(&AttestationFailureLabels {
                attestor: attestor_label(attestor),
                reason: reason.as_str(),
            })
            .inc();
    }

    /// One revocation recorded (called once the revocation is durable).
    pub fn revoked(&self, handle: RevocationHandle) {
        self.revocations
            .get_or_create(&HandleLabels {
                handle: handle.as_str(),
            })
            .inc();
    }

    /// Sets the entry and node gauges (refreshed before each scrape).
    pub fn set_inventory(&self, entries: usize, nodes: usize) {
        self.entries.set(i64::try_from(entries).unwrap_or(i64::MAX));
        self.nodes.set(i64::try_from(nodes).unwrap_or(i64::MAX));
    }

    /// The tower layer that times each RPC of `api` and logs its end.
    pub fn rpc_layer(&self, api: &'static str) -> RpcLayer {
        RpcLayer::new(api, self.rpc_duration.clone(), None)
    }
}

impl Encode for ServerMetrics {
    fn encode(&self, out: &mut String) -> fmt::Result {
        prometheus_client::encoding::text::encode(out, &self.registry)
    }
}

/// The node agent's metrics (prefix `agentd_node_`).
#[derive(Debug)]
pub struct NodeMetrics {
    registry: Registry,
    rpc_duration: HistogramFamily<RpcLabels>,
    open_streams: Family<RpcLabels, Gauge>,
    cached_x509_svids: Gauge,
    cached_jwt_svids: Gauge,
    syncs: Counter,
    sync_failures: Counter,
    /// How many revocation events the node agent is behind the server's log (the server's
    /// latest sequence minus the last one applied). Set by the revocation feed.
    pub revocation_feed_lag: Gauge,
}

impl Default for NodeMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl NodeMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("agentd_node");
        let rpc_duration = HistogramFamily::<RpcLabels>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "rpc_duration_seconds",
            "Time from a Workload API call's arrival to its response headers (a stream's first message), by method",
            rpc_duration.clone(),
        );
        let open_streams = Family::<RpcLabels, Gauge>::default();
        registry.register(
            "rpc_open_streams",
            "Workload API calls in progress, by method; a watch stays open until the workload hangs up",
            open_streams.clone(),
        );
        let cached_x509_svids = Gauge::default();
        registry.register(
            "cache_x509_svids",
            "X.509-SVIDs held in the cache",
            cached_x509_svids.clone(),
        );
        let cached_jwt_svids = Gauge::default();
        registry.register(
            "cache_jwt_svids",
            "JWT-SVIDs held in the cache",
            cached_jwt_svids.clone(),
        );
        let syncs = Counter::default();
        registry.register("syncs", "Successful syncs with the server", syncs.clone());
        let sync_failures = Counter::default();
        registry.register(
            "sync_failures",
            "Failed syncs with the server (cached SVIDs are served meanwhile)",
            sync_failures.clone(),
        );
        let revocation_feed_lag = Gauge::default();
        registry.register(
            "revocation_feed_lag",
            "Revocation events the node agent is behind the server (sequence numbers)",
            revocation_feed_lag.clone(),
        );
        Self {
            registry,
            rpc_duration,
            open_streams,
            cached_x509_svids,
            cached_jwt_svids,
            syncs,
            sync_failures,
            revocation_feed_lag,
        }
    }

    pub fn sync_succeeded(&self) {
        self.syncs.inc();
    }

    pub fn sync_failed(&self) {
        self.sync_failures.inc();
    }

    /// Sets the cache size gauges.
    pub fn set_cache_size(&self, x509_svids: usize, jwt_svids: usize) {
        self.cached_x509_svids
            .set(i64::try_from(x509_svids).unwrap_or(i64::MAX));
        self.cached_jwt_svids
            .set(i64::try_from(jwt_svids).unwrap_or(i64::MAX));
    }

    /// Sets how many revocation events this node agent is behind the server.
    pub fn set_revocation_feed_lag(&self, behind: u64) {
        self.revocation_feed_lag
            .set(i64::try_from(behind).unwrap_or(i64::MAX));
    }

    /// The tower layer that times each Workload API call, counts open streams and logs the
    /// end of each call.
    pub fn rpc_layer(&self) -> RpcLayer {
        RpcLayer::new(
            "workload",
            self.rpc_duration.clone(),
            Some(self.open_streams.clone()),
        )
    }
}

impl Encode for NodeMetrics {
    fn encode(&self, out: &mut String) -> fmt::Result {
        prometheus_client::encoding::text::encode(out, &self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(m: &dyn Encode) -> String {
        let mut s = String::new();
        m.encode(&mut s).unwrap();
        s
    }

    #[test]
    fn server_counters_are_exposed_with_fixed_labels() {
        let m = ServerMetrics::new();
        // Zero before the first mint, so that rates work from the start.
        assert!(
            text(&m).contains("agentd_server_svids_minted_total{type=\"x509\"} 0"),
            "{}",
            text(&m)
        );
        m.svid_minted(SvidKind::X509, Duration::from_millis(2));
        m.svid_minted(SvidKind::X509, Duration::from_millis(3));
        m.svid_minted(SvidKind::Jwt, Duration::from_millis(1));
        m.attestation_failed("join_token", AttestationFailure::UnknownJoinToken);
        m.attestation_failed("something-else", AttestationFailure::Busy);
        m.node_attested("x509pop");
        m.revoked(RevocationHandle::Grant);
        m.set_inventory(7, 2);
        let t = text(&m);
        for line in [
            "agentd_server_svids_minted_total{type=\"x509\"} 2",
            "agentd_server_svids_minted_total{type=\"jwt\"} 1",
            "agentd_server_svid_mint_duration_seconds_count{type=\"x509\"} 2",
            "agentd_server_node_attestation_failures_total{attestor=\"join_token\",reason=\"unknown_join_token\"} 1",
            "agentd_server_node_attestation_failures_total{attestor=\"none\",reason=\"busy\"} 1",
            "agentd_server_node_attestations_total{attestor=\"x509pop\"} 1",
            "agentd_server_revocations_total{handle=\"grant\"} 1",
            "agentd_server_revocations_total{handle=\"svid\"} 0",
            "agentd_server_entries 7",
            "agentd_server_nodes 2",
        ] {
            assert!(t.contains(line), "missing {line:?} in\n{t}");
        }
        assert!(t.ends_with("# EOF\n"), "{t}");
    }

    #[test]
    fn node_gauges_and_counters() {
        let m = NodeMetrics::new();
        m.sync_succeeded();
        m.sync_succeeded();
        m.sync_failed();
        m.set_cache_size(3, 1);
        m.set_revocation_feed_lag(4);
        let t = text(&m);
        for line in [
            "agentd_node_syncs_total 2",
            "agentd_node_sync_failures_total 1",
            "agentd_node_cache_x509_svids 3",
            "agentd_node_cache_jwt_svids 1",
            "agentd_node_revocation_feed_lag 4",
        ] {
            assert!(t.contains(line), "missing {line:?} in\n{t}");
        }
    }

    #[test]
    fn failure_reasons_are_distinct_label_values() {
        let mut names: Vec<&str> = AttestationFailure::ALL.iter().map(|r| r.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), AttestationFailure::ALL.len());
    }
}
