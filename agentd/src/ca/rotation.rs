//! Changing the authority set at run time: prepare, activate, revoke and prune, and the
//! rotation schedule that drives prepare and activate (docs/ca.md, "Rotation model"). Every
//! change is serialized by `CertificateAuthority::lock_changes`, persisted, then published
//! (`CertificateAuthority::commit`).

use std::sync::Arc;
use std::time::SystemTime;

use super::{
    jwt, keystore, new_jwt, x509, AuthorityInfo, AuthorityKind, AuthorityState, CaError,
    CertificateAuthority, RotationEvent,
};
use crate::clock::unix_seconds;
use crate::keys::PrivateKey;

impl CertificateAuthority {
    /// Prepares the next authorities: a new X.509 CA (self-signed, or an intermediate under
    /// the upstream CA, whose roots stay the bundle) and a new JWT key expiring with it. Both
    /// enter the bundle at once (the sequence bumps) but sign nothing until
    /// [`activate`](Self::activate). Refused while another authority is prepared.
    pub fn prepare(&self, now: SystemTime) -> Result<Vec<AuthorityInfo>, CaError> {
        let _guard = self.lock_changes();
        let cur = self.snapshot();
        if let Some(p) = &cur.x509_prepared {
            return Err(CaError::AlreadyPrepared {
                id: p.authority_id.clone(),
            });
        }
        let key = PrivateKey::generate()?;
        let cert = x509::new_ca_cert(
            &self.trust_domain,
            &self.organization,
            &key,
            self.upstream.as_ref(),
            now,
            self.ca_ttl,
        )?;
        let ca = x509::SigningCa::new(
            cert.clone(),
            &key,
            &self.organization,
            self.upstream.is_some(),
        )
        .map_err(|e| CaError::Sign { reason: e })?;
        let (signer, jwt_key) = new_jwt(ca.not_after)?;
        let x509_id = ca.authority_id.clone();
        let jwt_id = signer.kid().to_owned();

        let result = (|| {
            self.store.save_x509_authority(&x509_id, &cert, &key)?;
            self.store.save_jwt_authority(&jwt_id, &jwt_key)?;
            let mut next = (*cur).clone();
            next.x509_prepared = Some(Arc::new(ca));
            // A prepared JWT key left without its X.509 pair (say, after a restart dropped
            // an unusable CA) is replaced along with it.
            if let Some(stale) = next.jwt_prepared.replace(Arc::new(signer)) {
                next.jwt_old.push(stale);
            }
            next.sequence += 1;
            self.commit(next)
        })();
        if let Err(e) = result {
            self.store
                .remove_authority_files(keystore::StoredKind::X509, &x509_id);
            self.store
                .remove_authority_files(keystore::StoredKind::Jwt, &jwt_id);
            return Err(e);
        }
        tracing::info!(authority_id = %x509_id, kid = %jwt_id, "prepared new authorities: published, not signing yet");
        Ok(self
            .authorities()
            .into_iter()
            .filter(|a| a.id == x509_id || a.id == jwt_id)
            .collect())
    }

    /// Activates the prepared authorities: they sign every SVID from `now` on, and the
    /// previously active ones become old (still in the bundle until they expire, so SVIDs
    /// they signed keep verifying). The bundle's contents do not change, nor its sequence.
    pub fn activate(&self, now: SystemTime) -> Result<Vec<AuthorityInfo>, CaError> {
        let _guard = self.lock_changes();
        let cur = self.snapshot();
        let Some(prepared) = cur.x509_prepared.clone() else {
            return Err(CaError::NothingPrepared);
        };
        if now >= prepared.not_after {
            return Err(CaError::Expired {
                not_after: prepared.not_after,
            });
        }
        let mut next = (*cur).clone();
        next.x509_prepared = None;
        let previous = std::mem::replace(&mut next.x509_active, prepared);
        next.x509_old.push(previous);
        let mut ids = vec![next.x509_active.authority_id.clone()];
        if let Some(jwt) = next.jwt_prepared.take() {
            let previous = std::mem::replace(&mut next.jwt_active, jwt);
            next.jwt_old.push(previous);
            ids.push(next.jwt_active.kid().to_owned());
        }
        self.commit(next)?;
        tracing::info!(ids = ?ids, "activated the prepared authorities");
        Ok(self
            .authorities()
            .into_iter()
            .filter(|a| ids.contains(&a.id))
            .collect())
    }

    /// Removes an old or prepared authority (X.509 SKI hex or JWT kid) from the set and the
    /// bundle (the sequence bumps) and deletes its key. Refuses the active authorities: a
    /// new one must be prepared and activated first. What the revoked authority signed must
    /// be re-issued by the caller (the revocation log does that).
    pub fn revoke_authority(&self, id: &str, now: SystemTime) -> Result<AuthorityInfo, CaError> {
        let _guard = self.lock_changes();
        let cur = self.snapshot();
        let info = cur
            .infos()
            .into_iter()
            .find(|a| a.id == id)
            .ok_or_else(|| CaError::UnknownAuthority { id: id.to_owned() })?;
        if info.state == AuthorityState::Active {
            return Err(CaError::ActiveAuthority { id: id.to_owned() });
        }
        let mut next = (*cur).clone();
        let kind = match info.kind {
            AuthorityKind::X509 => {
                if next
                    .x509_prepared
                    .as_ref()
                    .is_some_and(|a| a.authority_id == id)
                {
                    next.x509_prepared = None;
                }
                next.x509_old.retain(|a| a.authority_id != id);
                keystore::StoredKind::X509
            }
            AuthorityKind::Jwt => {
                if next.jwt_prepared.as_ref().is_some_and(|a| a.kid() == id) {
                    next.jwt_prepared = None;
                }
                next.jwt_old.retain(|a| a.kid() != id);
                keystore::StoredKind::Jwt
            }
        };
        next.sequence += 1;
        self.commit(next)?;
        self.store.remove_authority_files(kind, id);
        tracing::warn!(authority_id = %id, kind = %info.kind, state = %info.state, at = unix_seconds(now), "authority revoked: removed from the bundle");
        Ok(info)
    }

    /// Drops old and prepared authorities that have expired from the set and the bundle
    /// (the sequence bumps when any goes). Returns their ids.
    pub fn prune_expired(&self, now: SystemTime) -> Result<Vec<String>, CaError> {
        let _guard = self.lock_changes();
        let cur = self.snapshot();
        let mut gone: Vec<(keystore::StoredKind, String)> = Vec::new();
        let mut next = (*cur).clone();
        let expired_x509 = |a: &Arc<x509::SigningCa>| a.not_after <= now;
        let expired_jwt = |a: &Arc<jwt::JwtSigner>| a.not_after() <= now;
        if next.x509_prepared.as_ref().is_some_and(expired_x509) {
            if let Some(a) = next.x509_prepared.take() {
                gone.push((keystore::StoredKind::X509, a.authority_id.clone()));
            }
        }
        if next.jwt_prepared.as_ref().is_some_and(expired_jwt) {
            if let Some(a) = next.jwt_prepared.take() {
                gone.push((keystore::StoredKind::Jwt, a.kid().to_owned()));
            }
        }
        for a in next.x509_old.iter().filter(|a| expired_x509(a)) {
            gone.push((keystore::StoredKind::X509, a.authority_id.clone()));
        }
        next.x509_old.retain(|a| !expired_x509(a));
        for a in next.jwt_old.iter().filter(|a| expired_jwt(a)) {
            gone.push((keystore::StoredKind::Jwt, a.kid().to_owned()));
        }
        next.jwt_old.retain(|a| !expired_jwt(a));
        if gone.is_empty() {
            return Ok(Vec::new());
        }
        next.sequence += 1;
        self.commit(next)?;
        for (kind, id) in &gone {
            self.store.remove_authority_files(*kind, id);
        }
        let ids: Vec<String> = gone.into_iter().map(|(_, id)| id).collect();
        tracing::info!(ids = ?ids, "expired authorities left the bundle");
        Ok(ids)
    }

    /// When the rotation schedule prepares and activates, for the active X.509 CA of
    /// lifetime L from notBefore: prepare at L/2, activate at 5/6 L (SPIRE's schedule: the
    /// next key is published for a third of the lifetime before it signs, and the old one
    /// still has 1/6 L to run when it retires).
    pub fn rotation_times(&self) -> (SystemTime, SystemTime) {
        let cur = self.snapshot();
        let a = &cur.x509_active;
        let lifetime = a.not_after.duration_since(a.not_before).unwrap_or_default();
        (a.not_before + lifetime / 2, a.not_before + lifetime * 5 / 6)
    }

    /// One step of the rotation schedule at `now`: drop expired authorities, then prepare
    /// (past half the active CA's lifetime, when nothing is prepared) or activate (past 5/6
    /// of it, when something is prepared). At most one of prepare/activate per call, so a
    /// prepared key is always published for at least one step before it signs.
    pub fn rotate_if_due(&self, now: SystemTime) -> Result<Vec<RotationEvent>, CaError> {
        let mut events = Vec::new();
        let ids = self.prune_expired(now)?;
        if !ids.is_empty() {
            events.push(RotationEvent::Pruned { ids });
        }
        let (prepare_at, activate_at) = self.rotation_times();
        let prepared = self.snapshot().x509_prepared.is_some();
        if !prepared && now >= prepare_at {
            match self.prepare(now) {
                Ok(new) => events.push(RotationEvent::Prepared {
                    x509_id: pick(&new, AuthorityKind::X509),
                    jwt_id: pick(&new, AuthorityKind::Jwt),
                }),
                // Someone prepared by hand in the meantime: nothing to do.
                Err(CaError::AlreadyPrepared { .. }) => {}
                Err(e) => return Err(e),
            }
        } else if prepared && now >= activate_at {
            match self.activate(now) {
                Ok(new) => events.push(RotationEvent::Activated {
                    x509_id: pick(&new, AuthorityKind::X509),
                    jwt_id: pick(&new, AuthorityKind::Jwt),
                }),
                Err(CaError::NothingPrepared) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(events)
    }
}

fn pick(infos: &[AuthorityInfo], kind: AuthorityKind) -> String {
    infos
        .iter()
        .find(|a| a.kind == kind)
        .map(|a| a.id.clone())
        .unwrap_or_default()
}
