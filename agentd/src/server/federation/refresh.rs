//! Keeps each federated trust domain's bundle current (SPIFFE Federation spec, section 4.2):
//! fetch at the bundle's `spiffe_refresh_hint` (bounded to 10 s .. 5 min), store it when it
//! changed and tell every node agent; on a failed or refused fetch keep the last good bundle,
//! log, count, and try again sooner (10 s, doubling up to the hint).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use rustls::pki_types::CertificateDer;
use tokio_util::sync::CancellationToken;

use super::fetch::fetch;
use super::validate::{parse_bundle, BundleFormat};
use super::RefreshStatus;
use crate::audit::{Actor, AuditRecord};
use crate::clock::unix_seconds;
use crate::model::federation::{BundleSource, FederatedBundle, FederationRelationship};
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

/// When a trust domain is fetched next. Monotonic time: a wall clock stepped back must not
/// stop the fetching.
#[derive(Debug)]
struct Schedule {
    next: Instant,
    failures: u32,
    /// The relationship's `updated_at` when scheduled: another server of a shared store
    /// may change it, and a changed relationship is fetched at once.
    updated_at: i64,
}

/// Whether two bundles hold the same keys (in any order): what a change is. Another
/// sequence number or hint alone is not one, so that peers serving one bundle from several
/// servers do not make every fetch an update.
pub fn same_keys(a: &crate::bundle::Bundle, b: &crate::bundle::Bundle) -> bool {
    use std::collections::BTreeSet;
    let x509 = |x: &crate::bundle::Bundle| -> BTreeSet<Vec<u8>> {
        x.x509_authorities.iter().cloned().collect()
    };
    let jwt = |x: &crate::bundle::Bundle| -> BTreeSet<(String, Vec<u8>)> {
        x.jwt_authorities
            .iter()
            .map(|j| (j.key_id.clone(), j.public_key_spki_der.clone()))
            .collect()
    };
    x509(a) == x509(b) && jwt(a) == jwt(b)
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
                // The schedule stays as it is: a store outage must not turn into a burst of
                // fetches once it is over.
                tracing::warn!(error = %e, "reading the federation relationships failed");
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(RELIST_EVERY) => continue,
                }
            }
        };
        schedule.retain(|td, s| {
            relationships
                .iter()
                .any(|r| r.trust_domain.as_str() == td && r.updated_at == s.updated_at)
        });
        let now = Instant::now();
        let due: Vec<&FederationRelationship> = relationships
            .iter()
            .filter(|r| {
                schedule
                    .get(r.trust_domain.as_str())
                    .is_none_or(|s| s.next <= now)
            })
            .collect();
        let fetches =
            futures::future::join_all(due.iter().map(|r| refresh_one(&state, r, roots.as_slice())));
        let results = tokio::select! {
            // Shutdown does not wait for fetches in flight (each may take 10 s).
            _ = stop.cancelled() => return Ok(()),
            r = fetches => r,
        };
        for (rel, result) in due.iter().zip(results) {
            let s = schedule
                .entry(rel.trust_domain.as_str().to_string())
                .or_insert(Schedule {
                    next: Instant::now(),
                    failures: 0,
                    updated_at: rel.updated_at,
                });
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
            s.next = Instant::now() + wait;
            let mut status = state.federation.status(&rel.trust_domain);
            status.next_refresh_at = unix_seconds(state.clock.now() + wait);
            state.federation.set_status(&rel.trust_domain, status);
        }
        let now = Instant::now();
        let sleep = schedule
            .values()
            .map(|s| s.next.saturating_duration_since(now))
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
    let changed = current
        .as_ref()
        .is_none_or(|c| c.source != BundleSource::Endpoint || !same_keys(&c.bundle, &bundle));
    if changed {
        // The fetch took a while: if meanwhile an operator set a bundle, or changed or
        // deleted the relationship, theirs stands and this answer is dropped.
        match still_current(state, rel, current.as_ref()).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(trust_domain = %td, "the relationship or bundle changed during the fetch; its answer is dropped");
                return Ok(MIN_REFRESH);
            }
            Err(e) => return fail(format!("re-reading the relationship: {e}"), "failed"),
        }
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
        state.changes.publish_bundles();
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

/// Whether `rel` and the bundle read before the fetch (`before`) are still what the store
/// holds.
async fn still_current(
    state: &ServerState,
    rel: &FederationRelationship,
    before: Option<&FederatedBundle>,
) -> Result<bool, crate::datastore::DataStoreError> {
    let td = &rel.trust_domain;
    let rel_now = state
        .store
        .list_federations()
        .await?
        .into_iter()
        .find(|r| &r.trust_domain == td);
    if rel_now.as_ref() != Some(rel) {
        return Ok(false);
    }
    let bundle_now = state
        .store
        .list_federated_bundles()
        .await?
        .into_iter()
        .find(|b| &b.bundle.trust_domain == td);
    Ok(bundle_now.as_ref() == before)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::federation::EndpointProfile;
    use crate::telemetry::Encode as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// A CA of `domain` (URI SAN spiffe://domain) and its key.
    fn ca(domain: &str) -> (rcgen::CertificateParams, rcgen::KeyPair, Vec<u8>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        p.subject_alt_names = vec![rcgen::SanType::URI(
            format!("spiffe://{domain}").try_into().unwrap(),
        )];
        let der = p.self_signed(&key).unwrap().der().to_vec();
        (p, key, der)
    }

    /// A bundle endpoint presenting an SVID for `id` under the CA, answering every request
    /// with the current `body`.
    async fn endpoint(
        ca_params: &rcgen::CertificateParams,
        ca_key: &rcgen::KeyPair,
        id: &str,
        body: Arc<std::sync::Mutex<String>>,
    ) -> std::net::SocketAddr {
        endpoint_with(
            ca_params,
            ca_key,
            vec![rcgen::SanType::URI(id.try_into().unwrap())],
            body,
        )
        .await
    }

    async fn endpoint_with(
        ca_params: &rcgen::CertificateParams,
        ca_key: &rcgen::KeyPair,
        sans: Vec<rcgen::SanType>,
        body: Arc<std::sync::Mutex<String>>,
    ) -> std::net::SocketAddr {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names = sans;
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let issuer = rcgen::Issuer::from_params(ca_params, ca_key);
        let leaf = p.signed_by(&key, &issuer).unwrap().der().to_vec();
        let cfg = crate::tls::bundle_endpoint_server_config(
            &[leaf],
            &crate::keys::PrivateKey::from_pkcs8_der(&key.serialize_der()).unwrap(),
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let body = body.lock().unwrap().clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut req = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = tls.write_all(head.as_bytes()).await;
                    let _ = tls.write_all(body.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        addr
    }

    fn counted(state: &ServerState, outcome: &str) -> bool {
        let mut text = String::new();
        state.metrics.encode(&mut text).unwrap();
        text.contains(&format!(
            "agentd_server_federated_bundle_fetches_total{{trust_domain=\"partner.example\",outcome=\"{outcome}\"}} 1"
        ))
    }

    /// What an endpoint serves is checked as a bundle set by hand is: a document with no
    /// keys, for another trust domain, or over the size limit is refused, counted as
    /// `rejected`, and the last good bundle stays; a good one replaces it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_fetch_keeps_the_last_good_bundle_and_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let (state, _clock) = crate::server::node_api::issuance_tests::fixture(dir.path()).await;
        let td = spiffe::TrustDomain::new("partner.example").unwrap();
        let (ca_params, ca_key, ca_der) = ca("partner.example");
        let body = Arc::new(std::sync::Mutex::new(String::new()));
        let addr = endpoint(
            &ca_params,
            &ca_key,
            "spiffe://partner.example/agentd/server",
            body.clone(),
        )
        .await;
        let good = crate::bundle::Bundle {
            trust_domain: td.clone(),
            x509_authorities: vec![ca_der.clone()],
            jwt_authorities: vec![],
            sequence: 1,
            refresh_hint: Duration::from_secs(30),
        };
        let held = FederatedBundle {
            bundle: good.clone(),
            source: BundleSource::Static,
            updated_at: 1,
        };
        state.store.put_federated_bundle(&held).await.unwrap();
        let rel = FederationRelationship {
            trust_domain: td.clone(),
            bundle_endpoint_url: format!("https://{addr}/bundle").parse().unwrap(),
            profile: EndpointProfile::HttpsSpiffe {
                endpoint_spiffe_id: spiffe::SpiffeId::new("spiffe://partner.example/agentd/server")
                    .unwrap(),
            },
            created_at: 1,
            updated_at: 1,
        };
        state.store.put_federation(&rel).await.unwrap();
        let stored = || async {
            state
                .store
                .list_federated_bundles()
                .await
                .unwrap()
                .into_iter()
                .find(|b| b.bundle.trust_domain == td)
        };

        let (_, _, evil_der) = ca("evil.example");
        let evil = crate::bundle::Bundle {
            trust_domain: td.clone(),
            x509_authorities: vec![evil_der],
            ..good.clone()
        };
        for (what, doc) in [
            ("no keys", r#"{"keys":[],"spiffe_sequence":9}"#.to_string()),
            ("another trust domain's CA", evil.to_spiffe_json()),
            (
                "oversized",
                " ".repeat(super::super::validate::MAX_FEDERATED_BUNDLE_BYTES + 10),
            ),
            ("not JSON", "<html>hello</html>".to_string()),
        ] {
            *body.lock().unwrap() = doc;
            assert!(
                refresh_one(&state, &rel, &[]).await.is_err(),
                "{what} was taken"
            );
            assert_eq!(
                stored().await.as_ref(),
                Some(&held),
                "{what} replaced the bundle"
            );
            let status = state.federation.status(&td);
            assert!(status.last_error.is_some(), "{what}: no error recorded");
        }
        let mut text = String::new();
        state.metrics.encode(&mut text).unwrap();
        assert!(
            text.contains("agentd_server_federated_bundle_fetches_total{trust_domain=\"partner.example\",outcome=\"rejected\"} 4"),
            "{text}"
        );

        // A good answer with a new authority replaces it, marked as fetched.
        let (_, _, next_der) = ca("partner.example");
        let mut next = good.clone();
        next.x509_authorities.push(next_der);
        next.sequence = 2;
        *body.lock().unwrap() = next.to_spiffe_json();
        assert_eq!(
            refresh_one(&state, &rel, &[]).await,
            Ok(Duration::from_secs(30))
        );
        let now = stored().await.unwrap();
        assert_eq!(now.source, BundleSource::Endpoint);
        assert_eq!(now.bundle.x509_authorities.len(), 2);
        assert!(counted(&state, "updated"));
        // The same keys again (another sequence) is no update.
        next.sequence = 3;
        *body.lock().unwrap() = next.to_spiffe_json();
        assert!(refresh_one(&state, &rel, &[]).await.is_ok());
        assert!(counted(&state, "unchanged"));
        assert_eq!(stored().await.unwrap().bundle.sequence, 2);

        // An endpoint that presents another SPIFFE ID is refused before anything is read.
        let other = FederationRelationship {
            profile: EndpointProfile::HttpsSpiffe {
                endpoint_spiffe_id: spiffe::SpiffeId::new("spiffe://partner.example/other")
                    .unwrap(),
            },
            ..rel.clone()
        };
        state.store.put_federation(&other).await.unwrap();
        assert!(refresh_one(&state, &other, &[]).await.is_err());
        let status = state.federation.status(&td);
        assert!(
            status
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("spiffe://partner.example/other")),
            "{status:?}"
        );
        assert_eq!(stored().await.unwrap().bundle.sequence, 2);
    }

    /// https_web: web PKI against the given roots and the URL's host; another host or an
    /// unknown root is refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_https_web_endpoint_is_checked_by_web_pki() {
        let dir = tempfile::tempdir().unwrap();
        let (state, _clock) = crate::server::node_api::issuance_tests::fixture(dir.path()).await;
        let td = spiffe::TrustDomain::new("partner.example").unwrap();
        let (web_params, web_key, web_root) = ca("web-root.example");
        let (_, _, partner_der) = ca("partner.example");
        let doc = crate::bundle::Bundle {
            trust_domain: td.clone(),
            x509_authorities: vec![partner_der],
            jwt_authorities: vec![],
            sequence: 1,
            refresh_hint: Duration::from_secs(60),
        }
        .to_spiffe_json();
        let body = Arc::new(std::sync::Mutex::new(doc));
        let addr = endpoint_with(
            &web_params,
            &web_key,
            vec![rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap())],
            body,
        )
        .await;
        let rel = |host: &str| FederationRelationship {
            trust_domain: td.clone(),
            bundle_endpoint_url: format!("https://{host}:{}/", addr.port()).parse().unwrap(),
            profile: EndpointProfile::HttpsWeb,
            created_at: 1,
            updated_at: 1,
        };
        let roots = [rustls::pki_types::CertificateDer::from(web_root)];
        // No roots that vouch for it: refused.
        let (_, _, stranger) = ca("stranger.example");
        let other_roots = [rustls::pki_types::CertificateDer::from(stranger)];
        let r = rel("127.0.0.1");
        state.store.put_federation(&r).await.unwrap();
        assert!(refresh_one(&state, &r, &other_roots).await.is_err());
        assert!(counted(&state, "rejected"));
        assert!(state
            .store
            .list_federated_bundles()
            .await
            .unwrap()
            .is_empty());
        // The name in the URL must be the certificate's: localhost is not 127.0.0.1 here.
        let named = rel("localhost");
        state.store.put_federation(&named).await.unwrap();
        assert!(refresh_one(&state, &named, &roots).await.is_err());
        // The right root and host: fetched.
        state.store.put_federation(&r).await.unwrap();
        assert_eq!(
            refresh_one(&state, &r, &roots).await,
            Ok(Duration::from_secs(60))
        );
        let held = state.store.list_federated_bundles().await.unwrap();
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].source, BundleSource::Endpoint);
    }

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
