//! A per-workload limit on JWT-SVID mints: every `FetchJWTSVID` for an audience set not in
//! the cache makes the server sign, record and fsync an issuance, so a workload asking for
//! ever-new audiences must not turn into unbounded server work. Cached tokens are never
//! limited. A token bucket per entry (the identity a workload is served), on the injected
//! clock.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// Mints a workload may make at once.
pub const JWT_MINT_BURST: u32 = 50;
/// Mints per second it may make after that.
pub const JWT_MINT_PER_SECOND: u32 = 5;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: SystemTime,
}

/// Token buckets by entry id.
#[derive(Debug)]
pub struct MintLimiter {
    burst: u32,
    per_second: u32,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl Default for MintLimiter {
    fn default() -> Self {
        Self::new(JWT_MINT_BURST, JWT_MINT_PER_SECOND)
    }
}

impl MintLimiter {
    pub fn new(burst: u32, per_second: u32) -> Self {
        Self {
            burst: burst.max(1),
            per_second: per_second.max(1),
            buckets: Mutex::default(),
        }
    }

    /// Mints allowed at once.
    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// Mints allowed per second after the burst.
    pub fn per_second(&self) -> u32 {
        self.per_second
    }

    /// Takes one mint for `entry_id` at `now`; `Err` is how long until the next one is
    /// allowed.
    pub fn take(&self, entry_id: &str, now: SystemTime) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let burst = f64::from(self.burst);
        let rate = f64::from(self.per_second);
        // Full buckets carry no information: drop them so the map holds only entries that
        // minted within the last `burst / rate` seconds.
        if buckets.len() > 1024 {
            buckets.retain(|_, b| {
                let idle = now.duration_since(b.at).unwrap_or_default().as_secs_f64();
                b.tokens + idle * rate < burst
            });
        }
        let b = buckets.entry(entry_id.to_string()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        // A clock that went back refills nothing.
        let elapsed = now.duration_since(b.at).unwrap_or_default().as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(burst);
        b.at = b.at.max(now);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn a_burst_then_the_rate_per_workload() {
        let limiter = MintLimiter::new(3, 2);
        let t0 = UNIX_EPOCH + Duration::from_secs(1000);
        for _ in 0..3 {
            assert!(limiter.take("a", t0).is_ok());
        }
        let wait = limiter.take("a", t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        // Another workload has its own bucket.
        assert!(limiter.take("b", t0).is_ok());
        // Half a second refills one mint at 2/s.
        assert!(limiter.take("a", t0 + Duration::from_millis(500)).is_ok());
        assert!(limiter.take("a", t0 + Duration::from_millis(500)).is_err());
        // Idle for long: back to the burst, not beyond.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert!(limiter.take("a", later).is_ok());
        }
        assert!(limiter.take("a", later).is_err());
        // A clock that goes back refills nothing.
        assert!(limiter.take("a", t0).is_err());
    }
}
