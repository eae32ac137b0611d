//! Refused attestations from callers who proved nothing, counted instead of written one by
//! one, and a per-source rate limit on the calls anyone may make.
//!
//! Why: `Attest` and `X509PopChallenge` need no client certificate. Each refusal used to
//! append (and fsync, under the single audit lock) one audit record carrying the error text,
//! which quotes what the peer sent (a certificate subject, an issuer): a flood of bad
//! requests filled the audit log and stalled every other audited write. Now, per interval:
//!
//! - the first refusal of each (source, attestor, stage, reason) is recorded as
//!   `node.attest.fail`, with its text cut to [`MAX_REASON_CHARS`];
//! - later ones are only counted, and one `node.attest.fail.summary` record per interval
//!   lists the counts; at most [`MAX_GROUPS`] groups are kept, the rest are summed;
//! - a source over its request budget is refused before any work, and that refusal is
//!   counted the same way.
//!
//! Refusals after the caller's credential verified (a revoked node, an ID conflict) are not
//! anonymous and stay individual records; see `attest`.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio_util::sync::CancellationToken;

use crate::audit::{Actor, Audit, AuditRecord};
use crate::clock::{unix_seconds, Clock};
use crate::server::config::NodeApiLimits;

/// Longest error text written to the audit log or the log for a refused attestation.
pub const MAX_REASON_CHARS: usize = 256;
/// Most (source, attestor, stage, reason) groups counted in one interval.
pub const MAX_GROUPS: usize = 1024;
/// Most sources whose request budget is tracked; idle full buckets are dropped first.
const MAX_BUCKETS: usize = 65_536;

/// `text` cut to [`MAX_REASON_CHARS`] characters, control characters replaced.
pub fn truncate_reason(text: &str) -> String {
    let mut out: String = text
        .chars()
        .take(MAX_REASON_CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().nth(MAX_REASON_CHARS).is_some() {
        out.push_str("...");
    }
    out
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct GroupKey {
    source: Option<IpAddr>,
    attestation_type: &'static str,
    stage: &'static str,
    reason: &'static str,
}

#[derive(Debug, Default)]
struct Window {
    started_at: i64,
    counts: BTreeMap<GroupKey, u64>,
    /// Refusals beyond [`MAX_GROUPS`].
    ungrouped: u64,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: SystemTime,
}

/// One refusal, as noted.
#[derive(Debug, Clone)]
pub struct Refusal<'a> {
    pub remote: Option<SocketAddr>,
    pub attestation_type: &'static str,
    /// `attest` or `challenge`.
    pub stage: &'static str,
    /// The fixed reason (the metric label).
    pub reason: &'static str,
    /// The error text (truncated before it is written).
    pub detail: &'a str,
}

/// The failure counts and request budgets of the node API.
#[derive(Debug)]
pub struct AttestFailures {
    clock: Arc<dyn Clock>,
    per_minute: u32,
    window: Mutex<Window>,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl AttestFailures {
    pub fn new(limits: &NodeApiLimits, clock: Arc<dyn Clock>) -> Self {
        let started_at = unix_seconds(clock.now());
        Self {
            clock,
            per_minute: limits.attest_requests_per_source_per_minute.max(1),
            window: Mutex::new(Window {
                started_at,
                ..Default::default()
            }),
            buckets: Mutex::default(),
        }
    }

    /// Whether `remote` may make another unauthenticated call now (a token bucket of
    /// `per_minute` tokens, refilled evenly). A caller without an address is not limited
    /// here (only in-process callers have none).
    pub fn admit(&self, remote: Option<SocketAddr>) -> bool {
        let Some(remote) = remote else { return true };
        let source = crate::tls::source_of(remote.ip());
        let now = self.clock.now();
        let capacity = f64::from(self.per_minute);
        let per_sec = capacity / 60.0;
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(&source) {
            // Drop the buckets that have refilled: they hold no state worth keeping.
            buckets.retain(|_, b| {
                let elapsed = now.duration_since(b.at).unwrap_or_default().as_secs_f64();
                b.tokens + elapsed * per_sec < capacity
            });
            if buckets.len() >= MAX_BUCKETS {
                return false;
            }
        }
        let b = buckets.entry(source).or_insert(Bucket {
            tokens: capacity,
            at: now,
        });
        let elapsed = now.duration_since(b.at).unwrap_or_default().as_secs_f64();
        b.tokens = (b.tokens + elapsed * per_sec).min(capacity);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Counts a refusal. Returns the audit record to write when it is the first of its
    /// group in this interval (or the group table is full and it is summed).
    pub fn note(&self, r: &Refusal<'_>) -> Option<AuditRecord> {
        let key = GroupKey {
            source: r.remote.map(|a| crate::tls::source_of(a.ip())),
            attestation_type: r.attestation_type,
            stage: r.stage,
            reason: r.reason,
        };
        let first = {
            let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
            let groups = w.counts.len();
            match w.counts.get_mut(&key) {
                Some(n) => {
                    *n += 1;
                    false
                }
                None if groups < MAX_GROUPS => {
                    w.counts.insert(key, 1);
                    true
                }
                None => {
                    w.ungrouped += 1;
                    false
                }
            }
        };
        first.then(|| {
            let mut record = AuditRecord::new("node.attest.fail", Actor::Remote(r.remote))
                .field("attestation_type", r.attestation_type)
                .field("selectors", Vec::<String>::new())
                .field("reason", truncate_reason(r.detail))
                .field("remote", r.remote.map(|a| a.to_string()));
            if r.stage == "challenge" {
                record = record.field("stage", "challenge");
            }
            record
        })
    }

    /// Closes the interval: the summary record of what was counted but not written, if
    /// anything was.
    pub fn take_summary(&self) -> Option<AuditRecord> {
        let now = unix_seconds(self.clock.now());
        let w = {
            let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::replace(
                &mut *w,
                Window {
                    started_at: now,
                    ..Default::default()
                },
            )
        };
        let unwritten: u64 = w.counts.values().map(|n| n - 1).sum::<u64>() + w.ungrouped;
        if unwritten == 0 {
            return None;
        }
        let groups: Vec<serde_json::Value> = w
            .counts
            .iter()
            .map(|(k, n)| {
                serde_json::json!({
                    "source": k.source.map(|s| s.to_string()),
                    "attestation_type": k.attestation_type,
                    "stage": k.stage,
                    "reason": k.reason,
                    "count": n,
                })
            })
            .collect();
        let total: u64 = w.counts.values().sum::<u64>() + w.ungrouped;
        Some(
            AuditRecord::new("node.attest.fail.summary", Actor::Server)
                .field("from", w.started_at)
                .field("to", now)
                .field("refused", total)
                .field("groups", groups)
                .field("ungrouped", w.ungrouped),
        )
    }

    /// Writes the summary every `interval` until `stop`, and once more when stopping.
    pub async fn run(
        self: Arc<Self>,
        audit: Arc<Audit>,
        interval: std::time::Duration,
        stop: CancellationToken,
    ) {
        loop {
            let stopping = tokio::select! {
                _ = stop.cancelled() => true,
                _ = tokio::time::sleep(interval) => false,
            };
            if let Some(summary) = self.take_summary() {
                tracing::warn!(
                    refused = summary.fields.get("refused").and_then(|v| v.as_u64()),
                    "node attestations refused in the last interval (see the audit record node.attest.fail.summary)"
                );
                audit.record_or_log(summary).await;
            }
            if stopping {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use std::time::Duration;

    fn failures(per_minute: u32) -> (AttestFailures, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::new(
            std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        ));
        let limits = NodeApiLimits {
            attest_requests_per_source_per_minute: per_minute,
            ..Default::default()
        };
        (AttestFailures::new(&limits, clock.clone()), clock)
    }

    #[test]
    fn one_record_per_group_and_interval_then_a_summary() {
        let (f, clock) = failures(60);
        let long = "x".repeat(64 * 1024);
        let mut written = Vec::new();
        for i in 0..1000 {
            let remote = format!("198.51.100.7:{}", 1000 + i).parse().ok();
            written.extend(f.note(&Refusal {
                remote,
                attestation_type: "join_token",
                stage: "attest",
                reason: "unknown_join_token",
                detail: &long,
            }));
        }
        // Another source gets its own first record.
        written.extend(f.note(&Refusal {
            remote: Some("203.0.113.9:5".parse().unwrap()),
            attestation_type: "join_token",
            stage: "attest",
            reason: "unknown_join_token",
            detail: "join token not found or already used",
        }));
        assert_eq!(written.len(), 2, "one record per (source, reason)");
        let reason = written[0].fields["reason"].as_str().unwrap();
        assert!(
            reason.chars().count() <= MAX_REASON_CHARS + 3,
            "{}",
            reason.len()
        );
        assert_eq!(
            written[1].fields["reason"],
            "join token not found or already used"
        );

        clock.advance(Duration::from_secs(60));
        let summary = f.take_summary().expect("999 refusals were not written");
        assert_eq!(summary.action, "node.attest.fail.summary");
        assert_eq!(summary.fields["refused"], 1001);
        let groups = summary.fields["groups"].as_array().unwrap();
        assert_eq!(groups.len(), 2);
        assert!(groups
            .iter()
            .any(|g| g["source"] == "198.51.100.7" && g["count"] == 1000));
        // A new interval starts empty: the next refusal is written again, and an interval
        // whose refusals were all written has no summary.
        assert!(f.take_summary().is_none());
        assert!(f
            .note(&Refusal {
                remote: Some("198.51.100.7:1".parse().unwrap()),
                attestation_type: "join_token",
                stage: "attest",
                reason: "unknown_join_token",
                detail: "again",
            })
            .is_some());
        assert!(f.take_summary().is_none());
    }

    #[test]
    fn groups_beyond_the_cap_are_summed() {
        let (f, _) = failures(60);
        let mut written = 0;
        for i in 0..(MAX_GROUPS as u32 + 10) {
            let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i);
            written += f
                .note(&Refusal {
                    remote: Some(SocketAddr::new(ip.into(), 1)),
                    attestation_type: "claims",
                    stage: "attest",
                    reason: "evidence_rejected",
                    detail: "bad",
                })
                .into_iter()
                .count();
        }
        assert_eq!(written, MAX_GROUPS);
        let summary = f.take_summary().unwrap();
        assert_eq!(summary.fields["ungrouped"], 10);
    }

    #[test]
    fn each_source_has_a_request_budget() {
        let (f, clock) = failures(6);
        let a: SocketAddr = "192.0.2.1:1".parse().unwrap();
        let b: SocketAddr = "192.0.2.2:1".parse().unwrap();
        for _ in 0..6 {
            assert!(f.admit(Some(a)));
        }
        assert!(!f.admit(Some(a)), "the burst is spent");
        assert!(f.admit(Some(b)), "another source has its own budget");
        // 6 per minute: one more every 10 s.
        clock.advance(Duration::from_secs(10));
        assert!(f.admit(Some(a)));
        assert!(!f.admit(Some(a)));
    }

    #[test]
    fn peer_text_is_truncated_and_control_characters_removed() {
        let t = truncate_reason(&format!("a\nb{}", "c".repeat(1000)));
        assert!(t.starts_with("a b"));
        assert_eq!(t.chars().count(), MAX_REASON_CHARS + 3);
        assert_eq!(truncate_reason("short"), "short");
    }
}
