//! Keeps each federated trust domain's bundle current (SPIFFE Federation spec, section 4.2):
//! fetch at the bundle's `spiffe_refresh_hint` (bounded to 10 s .. 5 min), store it when it
//! changed and tell every node agent; on a failed or refused fetch keep the last good bundle,
//! log, count, and try again sooner (10 s, doubling up to the hint).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::CertificateDer;
use tokio_util::sync::CancellationToken;

use super::fetch::{fetch, FetchError};
use super::validate::{parse_bundle, BundleFormat};
use super::RefreshStatus;
use crate::audit::{Actor, AuditRecord};
use crate::clock::unix_seconds;
use crate::model::federation::{BundleSource, FederatedBundle, FederationRelationship};
use crate::server::changes::ChangeScope;
use crate::server::{ServerError, ServerState};

/// A federated bundle is fetched at least this often, whatever its hint says...
pub const MAX_REFRESH: Duration = Duration::from_secs(5 * 60);
/// ...and at most this often.
pub const MIN_REFRESH: Duration = Duration::from_secs(10);
/// How often the relationships are read again when nothing woke the loop: a relationship
/// another server of a shared store created is picked up within this.
const RELIST_EVERY: Duration = Duration::from_secs(5);

/// The hint, bounded.
pub fn bounded_hint(hint: Duration) -> Duration {
    hint.clamp(MIN_REFRESH, MAX_REFRESH)
}

/// The wait after the `failures`-th failure in a row: 10 s, doubling, at most `hint`.
fn retry_after(failures: u32, hint: Duration) -> Duration {
    let doubled = MIN_REFRESH.saturating_mul(1u32 << failures.saturating_sub(1).min(8));
    doubled.min(hint.max(MIN_REFRESH))
}

#[derive(Debug)]
struct Schedule {
    next: SystemTime,
    failures: u32,
}

impl Default for Schedule {
    fn default() -> Self {
        Self {
            next: SystemTime::UNIX_EPOCH,
            failures: 0,
        }
    }
}

/// Loads the web PKI roots once (the system store, or `SSL_CERT_FILE`).
fn web_roots() -> Vec<CertificateDer<'static>> {
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        tracing::debug!(error = %e, "a web PKI root could not be loaded");
    }
    found.certs
}

/// Runs the refresh loop until `stop`.
pub async fn run(state: Arc<ServerState>, stop: CancellationToken) -> Result<(), ServerError> {
    let roots = Arc::new(web_roots());
    let mut schedule: BTreeMap<String, Schedule> = BTreeMap::new();
    loop {
        let relationships = match state.store.list_federations().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "reading the federation relationships failed");
                Vec::new()
            }
        };
        schedule.retain(|td, _| relationships.iter().any(|r| r.trust_domain.as_str() == td));
        let now = state.clock.now();
        let due: Vec<&FederationRelationship> = relationships
            .iter()
            .filter(|r| {
                schedule
                    .get(r.trust_domain.as_str())
                    .is_none_or(|s| s.next <= now)
            })
            .collect();
        let results =
            futures::future::join_all(due.iter().map(|r| refresh_one(&state, r, roots.as_slice())))
                .await;
        for (rel, result) in due.iter().zip(results) {
            let s = schedule
                .entry(rel.trust_domain.as_str().to_string())
                .or_default();
            let wait = match result {
                Ok(hint) => {
                    s.failures = 0;
                    hint
                }
                Err(hint) => {
                    s.failures += 1;
                    retry_after(s.failures, hint)
                }
            };
            s.next = state.clock.now() + wait;
            let mut status = state.federation.status(&rel.trust_domain);
            status.next_refresh_at = unix_seconds(s.next);
            state.federation.set_status(&rel.trust_domain, status);
        }
        let now = state.clock.now();
        let sleep = schedule
            .values()
            .map(|s| s.next.duration_since(now).unwrap_or_default())
            .min()
            .unwrap_or(RELIST_EVERY)
            .min(RELIST_EVERY);
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(sleep) => {}
            // A relationship or bundle was created or changed: fetch every relationship now
            // (there are few; the one that changed may have been failing).
            _ = state.federation.woken() => schedule.clear(),
        }
    }
}

/// Fetches one relationship's bundle and stores it when it changed. Ok: the bounded hint of
/// the bundle fetched; Err: the hint of the bundle kept (for the retry schedule).
async fn refresh_one(
    state: &ServerState,
    rel: &FederationRelationship,
    web_roots: &[CertificateDer<'static>],
) -> Result<Duration, Duration> {
    let td = &rel.trust_domain;
    let current: Option<FederatedBundle> = match state.store.list_federated_bundles().await {
        Ok(all) => all.into_iter().find(|b| &b.bundle.trust_domain == td),
        Err(e) => {
            tracing::warn!(trust_domain = %td, error = %e, "reading the federated bundles failed");
            return Err(MAX_REFRESH);
        }
    };
    let kept_hint = current
        .as_ref()
        .map_or(MAX_REFRESH, |b| bounded_hint(b.bundle.refresh_hint));
    let attempted = unix_seconds(state.clock.now());
    let fail = |error: String, outcome: &'static str| {
        state.metrics.federation_fetched(td.as_str(), outcome);
        state.federation.set_status(
            td,
            RefreshStatus {
                last_attempt_at: attempted,
                last_error: Some(error),
                next_refresh_at: 0,
            },
        );
        Err(kept_hint)
    };
    let body = match fetch(rel, current.as_ref().map(|b| &b.bundle), web_roots).await {
        Ok(b) => b,
        Err(e) => {
            let outcome = if e.is_rejection() {
                "rejected"
            } else {
                "failed"
            };
            tracing::warn!(trust_domain = %td, url = %rel.bundle_endpoint_url, error = %e, "federated bundle fetch failed; the last good bundle stays");
            if matches!(e, FetchError::NoBundleToAuthenticate { .. }) {
                return fail(e.to_string(), "failed");
            }
            return fail(e.to_string(), outcome);
        }
    };
    let bundle = match parse_bundle(td, BundleFormat::Spiffe, &body) {
        Ok(b) => b,
        Err(rejected) => {
            tracing::warn!(trust_domain = %td, url = %rel.bundle_endpoint_url, reason = rejected.reason(), error = %rejected, "federated bundle refused; the last good bundle stays");
            return fail(format!("refused: {rejected}"), "rejected");
        }
    };
    let hint = bounded_hint(bundle.refresh_hint);
    let changed = current.as_ref().is_none_or(|c| c.bundle != bundle);
    if changed {
        let stored = FederatedBundle {
            bundle,
            source: BundleSource::Endpoint,
            updated_at: attempted,
        };
        if let Err(e) = state.store.put_federated_bundle(&stored).await {
            tracing::warn!(trust_domain = %td, error = %e, "storing the federated bundle failed");
            return fail(format!("storing it: {e}"), "failed");
        }
        // Every node agent syncs and hands the new bundle to the workloads that federate.
        state.changes.publish(ChangeScope::All, Default::default());
        let record = AuditRecord::new("federation.bundle_updated", Actor::Server)
            .field("trust_domain", td.as_str())
            .field("source", "endpoint")
            .field("url", rel.bundle_endpoint_url.as_str())
            .field("sequence", stored.bundle.sequence)
            .field("x509_authorities", stored.bundle.x509_authorities.len())
            .field("jwt_authorities", stored.bundle.jwt_authorities.len());
        if let Err(e) = state.audit.record(record).await {
            tracing::warn!(trust_domain = %td, error = %e, "auditing a federated bundle update failed");
        }
        tracing::info!(trust_domain = %td, sequence = stored.bundle.sequence, "federated bundle updated");
        state.metrics.federation_fetched(td.as_str(), "updated");
    } else {
        state.metrics.federation_fetched(td.as_str(), "unchanged");
    }
    state.federation.set_status(
        td,
        RefreshStatus {
            last_attempt_at: attempted,
            last_error: None,
            next_refresh_at: 0,
        },
    );
    Ok(hint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_are_bounded_and_retries_double_up_to_the_hint() {
        assert_eq!(bounded_hint(Duration::from_secs(1)), MIN_REFRESH);
        assert_eq!(bounded_hint(Duration::from_secs(86_400)), MAX_REFRESH);
        assert_eq!(
            bounded_hint(Duration::from_secs(60)),
            Duration::from_secs(60)
        );
        let hint = Duration::from_secs(300);
        assert_eq!(retry_after(1, hint), Duration::from_secs(10));
        assert_eq!(retry_after(2, hint), Duration::from_secs(20));
        assert_eq!(retry_after(3, hint), Duration::from_secs(40));
        assert_eq!(retry_after(9, hint), hint);
        assert_eq!(retry_after(40, hint), hint);
        assert_eq!(
            retry_after(3, Duration::from_secs(15)),
            Duration::from_secs(15)
        );
    }
}
