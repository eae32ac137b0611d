//! The set of authorities the CA holds at one moment, and what is derived from it: the
//! manifest that is persisted, the authority list the admin API reports, and the bundle.

use std::sync::Arc;

use spiffe::TrustDomain;

use super::{jwt, keystore, x509, AuthorityInfo, AuthorityKind, AuthorityState};
use crate::bundle::{Bundle, DEFAULT_REFRESH_HINT};
use crate::clock::unix_seconds;

/// One consistent set of authorities: exactly one active X.509 CA and one active JWT key
/// (by construction), at most one prepared of each, any number of old ones.
#[derive(Debug, Clone)]
pub(super) struct Authorities {
    pub(super) x509_active: Arc<x509::SigningCa>,
    pub(super) x509_prepared: Option<Arc<x509::SigningCa>>,
    pub(super) x509_old: Vec<Arc<x509::SigningCa>>,
    pub(super) jwt_active: Arc<jwt::JwtSigner>,
    pub(super) jwt_prepared: Option<Arc<jwt::JwtSigner>>,
    pub(super) jwt_old: Vec<Arc<jwt::JwtSigner>>,
    pub(super) sequence: u64,
    pub(super) bundle: Bundle,
}

impl Authorities {
    pub(super) fn x509_all(&self) -> impl Iterator<Item = (AuthorityState, &Arc<x509::SigningCa>)> {
        std::iter::once((AuthorityState::Active, &self.x509_active))
            .chain(
                self.x509_prepared
                    .iter()
                    .map(|a| (AuthorityState::Prepared, a)),
            )
            .chain(self.x509_old.iter().map(|a| (AuthorityState::Old, a)))
    }

    pub(super) fn jwt_all(&self) -> impl Iterator<Item = (AuthorityState, &Arc<jwt::JwtSigner>)> {
        std::iter::once((AuthorityState::Active, &self.jwt_active))
            .chain(
                self.jwt_prepared
                    .iter()
                    .map(|a| (AuthorityState::Prepared, a)),
            )
            .chain(self.jwt_old.iter().map(|a| (AuthorityState::Old, a)))
    }

    pub(super) fn manifest(&self) -> keystore::Manifest {
        let mut authorities = Vec::new();
        for (state, a) in self.x509_all() {
            authorities.push(keystore::StoredAuthority {
                kind: keystore::StoredKind::X509,
                id: a.authority_id.clone(),
                state,
                not_after: unix_seconds(a.not_after),
            });
        }
        for (state, a) in self.jwt_all() {
            authorities.push(keystore::StoredAuthority {
                kind: keystore::StoredKind::Jwt,
                id: a.kid().to_owned(),
                state,
                not_after: unix_seconds(a.not_after()),
            });
        }
        keystore::Manifest {
            sequence: self.sequence,
            authorities,
        }
    }

    pub(super) fn infos(&self) -> Vec<AuthorityInfo> {
        let mut out: Vec<AuthorityInfo> = self
            .x509_all()
            .map(|(state, a)| AuthorityInfo {
                id: a.authority_id.clone(),
                kind: AuthorityKind::X509,
                state,
                not_before: Some(a.not_before),
                not_after: a.not_after,
            })
            .collect();
        out.extend(self.jwt_all().map(|(state, a)| AuthorityInfo {
            id: a.kid().to_owned(),
            kind: AuthorityKind::Jwt,
            state,
            not_before: None,
            not_after: a.not_after(),
        }));
        out
    }

    /// The bundle: every X.509 authority (old ones first, then the active, then the
    /// prepared one) or, under an upstream CA, the upstream roots; and every JWT key.
    pub(super) fn build_bundle(
        &mut self,
        trust_domain: &TrustDomain,
        upstream: Option<&x509::Upstream>,
    ) {
        let x509_authorities = match upstream {
            // The intermediates chain to the upstream roots, which stay the bundle across
            // rotations; SVID chains carry the intermediate.
            Some(up) => up.roots.clone(),
            None => self
                .x509_old
                .iter()
                .chain(std::iter::once(&self.x509_active))
                .chain(self.x509_prepared.iter())
                .map(|a| a.cert_der.clone())
                .collect(),
        };
        let jwt_authorities = self
            .jwt_old
            .iter()
            .chain(std::iter::once(&self.jwt_active))
            .chain(self.jwt_prepared.iter())
            .map(|a| a.authority())
            .collect();
        self.bundle = Bundle {
            trust_domain: trust_domain.clone(),
            x509_authorities,
            jwt_authorities,
            sequence: self.sequence,
            refresh_hint: DEFAULT_REFRESH_HINT,
        };
    }
}
