//! The CA rotation schedule (docs/ca.md, "Schedule"): a long-running task that, every few
//! seconds, asks the CA to take the step that is due at the injected clock's time: prepare
//! the next authorities once the active X.509 CA has passed half its lifetime, activate them
//! at 5/6 of it (SPIRE's schedule), and drop expired old authorities from the bundle.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::ServerError;
use crate::ca::{CertificateAuthority, RotationEvent};
use crate::clock::Clock;

/// How often the schedule is checked. The steps are hours apart with the default CA TTL;
/// checking often keeps short test TTLs (and a clock that jumps) on schedule.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct CaRotation {
    ca: Arc<CertificateAuthority>,
    clock: Arc<dyn Clock>,
    check_every: Duration,
}

impl CaRotation {
    pub fn new(ca: Arc<CertificateAuthority>, clock: Arc<dyn Clock>) -> Self {
        Self {
            ca,
            clock,
            check_every: CHECK_INTERVAL,
        }
    }

    /// Checks the schedule every `every` instead of [`CHECK_INTERVAL`].
    pub fn check_every(mut self, every: Duration) -> Self {
        self.check_every = every;
        self
    }

    /// One check: takes the step due now, if any. A failure is logged and retried at the
    /// next check (the active CA keeps signing meanwhile); it never stops the server.
    pub fn step(&self) -> Vec<RotationEvent> {
        match self.ca.rotate_if_due(self.clock.now()) {
            Ok(events) => {
                for e in &events {
                    match e {
                        RotationEvent::Pruned { ids } => {
                            tracing::info!(?ids, "expired authorities left the bundle")
                        }
                        RotationEvent::Prepared { x509_id, jwt_id } => tracing::info!(
                            authority_id = %x509_id,
                            kid = %jwt_id,
                            "CA rotation: next authorities prepared (published, not signing)"
                        ),
                        RotationEvent::Activated { x509_id, jwt_id } => tracing::info!(
                            authority_id = %x509_id,
                            kid = %jwt_id,
                            "CA rotation: prepared authorities activated"
                        ),
                    }
                }
                events
            }
            Err(e) => {
                tracing::error!(error = %e, "CA rotation step failed; retrying at the next check");
                Vec::new()
            }
        }
    }

    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ServerError> {
        loop {
            self.step();
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(self.check_every) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use spiffe::TrustDomain;

    use super::*;
    use crate::ca::{AuthorityKind, AuthorityState, CaConfig};
    use crate::clock::{from_unix_seconds, unix_seconds, ManualClock};

    fn states(ca: &CertificateAuthority) -> Vec<(AuthorityKind, AuthorityState)> {
        ca.authorities()
            .into_iter()
            .map(|a| (a.kind, a.state))
            .collect()
    }

    async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for: {what}");
    }

    #[tokio::test]
    async fn the_task_follows_the_injected_clock() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(from_unix_seconds(unix_seconds(
            SystemTime::now(),
        ))));
        let ca = Arc::new(
            CertificateAuthority::load_or_create(
                &CaConfig {
                    trust_domain: TrustDomain::new("example.org").unwrap(),
                    key_dir: dir.path().to_path_buf(),
                    // A day: nothing would happen in real time during this test.
                    ca_ttl: Duration::from_secs(86_400),
                    upstream: None,
                    organization: String::new(),
                },
                clock.as_ref(),
            )
            .unwrap(),
        );
        let (prepare_at, activate_at) = ca.rotation_times();
        let first_not_after = ca.not_after();
        let first_id = ca.authorities()[0].id.clone();
        let stop = CancellationToken::new();
        let task = tokio::spawn(
            CaRotation::new(ca.clone(), clock.clone())
                .check_every(Duration::from_millis(5))
                .run(stop.clone()),
        );

        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(ca.authorities().len(), 2, "nothing due yet");

        clock.set(prepare_at);
        eventually("prepared", || {
            states(&ca).contains(&(AuthorityKind::X509, AuthorityState::Prepared))
        })
        .await;
        assert!(states(&ca).contains(&(AuthorityKind::Jwt, AuthorityState::Prepared)));

        clock.set(activate_at);
        eventually("activated", || {
            states(&ca).contains(&(AuthorityKind::X509, AuthorityState::Old))
        })
        .await;
        assert_eq!(
            states(&ca),
            [
                (AuthorityKind::X509, AuthorityState::Active),
                (AuthorityKind::X509, AuthorityState::Old),
                (AuthorityKind::Jwt, AuthorityState::Active),
                (AuthorityKind::Jwt, AuthorityState::Old),
            ]
        );

        clock.set(first_not_after);
        eventually("the old ones pruned", || {
            !states(&ca).contains(&(AuthorityKind::X509, AuthorityState::Old))
        })
        .await;
        assert!(ca.authorities().iter().all(|a| a.id != first_id));

        stop.cancel();
        task.await.unwrap().unwrap();
    }
}
