//! The RFC 5280 CRLs the server publishes, one per authority, for relying parties that only
//! know CRLs (CLI `bundle crl`, node agents' `FetchCrls`).
//!
//! Signing a CRL per authority on every `FetchCrls` would let any local user on any node make
//! the server sign without bound (the node agent passes its workloads' calls on), so node
//! agents are served from a [`CrlCache`]: the CRLs are signed again only when the revocation
//! log's head or the set of authorities moves, or when they are a quarter of their validity
//! old (so a relying party always holds one with most of its `nextUpdate` ahead).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use agentd_proto::revocation as rpb;

use super::ServerState;
use crate::clock::unix_seconds;

/// One RFC 5280 CRL per X.509 authority in the bundle, listing its unexpired revoked
/// serials; the CRL number is the revocation log's head, so it grows with every change.
pub fn current_crls(state: &ServerState) -> Result<Vec<rpb::Crl>, crate::ca::CaError> {
    let now = state.clock.now();
    let now_secs = unix_seconds(now);
    let head = state.revocations.head();
    state
        .ca
        .authorities()
        .into_iter()
        .filter(|a| a.kind == crate::ca::AuthorityKind::X509)
        .map(|a| {
            let revoked: Vec<crate::ca::RevokedSerial> = state
                .revocations
                .revoked_serials_of(&a.id, now_secs)
                .into_iter()
                .map(|(serial_hex, at)| crate::ca::RevokedSerial {
                    serial_hex,
                    revoked_at: crate::clock::from_unix_seconds(at),
                })
                .collect();
            let der = state.ca.crl_der(&a.id, &revoked, head, now)?;
            Ok(rpb::Crl {
                authority_id: a.id,
                der,
            })
        })
        .collect()
}

/// CRLs older than this are signed again although nothing changed.
pub const CRL_REFRESH: Duration = Duration::from_secs(crate::ca::CRL_NEXT_UPDATE.as_secs() / 4);

#[derive(Debug)]
struct CachedCrls {
    /// The revocation log's head and the CA's change counter they were made at.
    head: u64,
    authorities: u64,
    made_at: SystemTime,
    crls: Vec<rpb::Crl>,
}

/// The current CRLs, signed once per revocation head (and authority set).
#[derive(Debug, Default)]
pub struct CrlCache {
    cached: Mutex<Option<CachedCrls>>,
    signings: AtomicU64,
}

impl CrlCache {
    /// The current CRLs: the cached ones while the revocation head and authorities are
    /// those they were made at, else newly signed ones.
    pub fn get(&self, state: &ServerState) -> Result<Vec<rpb::Crl>, crate::ca::CaError> {
        // Read before signing: if either moves meanwhile, the next call signs again.
        let head = state.revocations.head();
        let authorities = *state.ca.subscribe().borrow();
        self.get_with(head, authorities, state.clock.now(), || current_crls(state))
    }

    /// How many times CRLs were signed (one per call that missed the cache).
    pub fn signings(&self) -> u64 {
        self.signings.load(Ordering::Relaxed)
    }

    fn get_with(
        &self,
        head: u64,
        authorities: u64,
        now: SystemTime,
        make: impl FnOnce() -> Result<Vec<rpb::Crl>, crate::ca::CaError>,
    ) -> Result<Vec<rpb::Crl>, crate::ca::CaError> {
        // Held while signing: concurrent callers wait for one signing instead of each
        // making their own.
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cached.as_ref() {
            let fresh = now
                .duration_since(c.made_at)
                .is_ok_and(|age| age < CRL_REFRESH);
            if c.head == head && c.authorities == authorities && fresh {
                return Ok(c.crls.clone());
            }
        }
        self.signings.fetch_add(1, Ordering::Relaxed);
        let crls = make()?;
        *cached = Some(CachedCrls {
            head,
            authorities,
            made_at: now,
            crls: crls.clone(),
        });
        Ok(crls)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crls_are_signed_once_per_head_and_authority_set() {
        let cache = CrlCache::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let made = std::cell::Cell::new(0u8);
        let make = || {
            made.set(made.get() + 1);
            Ok(vec![rpb::Crl {
                authority_id: "a".into(),
                der: vec![made.get()],
            }])
        };
        let der = |r: Result<Vec<rpb::Crl>, _>| r.unwrap()[0].der.clone();
        assert_eq!(der(cache.get_with(1, 1, t0, make)), [1]);
        for _ in 0..100 {
            assert_eq!(der(cache.get_with(1, 1, t0, make)), [1]);
        }
        assert_eq!(cache.signings(), 1);
        // A new revocation, a changed authority set, age, or a clock that went back: signed
        // again.
        assert_eq!(der(cache.get_with(2, 1, t0, make)), [2]);
        assert_eq!(der(cache.get_with(2, 2, t0, make)), [3]);
        assert_eq!(der(cache.get_with(2, 2, t0 + CRL_REFRESH, make)), [4]);
        assert_eq!(der(cache.get_with(2, 2, t0, make)), [5]);
        assert_eq!(cache.signings(), 5);
        // A failed signing leaves nothing cached that could be wrong.
        let err = cache.get_with(3, 2, t0, || {
            Err(crate::ca::CaError::UnknownAuthority { id: "x".into() })
        });
        assert!(err.is_err());
        assert_eq!(der(cache.get_with(3, 2, t0, make)), [6]);
    }
}
