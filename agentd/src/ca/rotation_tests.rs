//! Several authorities: prepare, activate, revoke, prune, restart, upgrade of a single-CA
//! key dir, the rotation schedule (driven by a `ManualClock`), and CRLs.

use std::path::Path;
use std::time::Duration;

use super::tests::{
    cfg, id, mint, now_whole, openssl, openssl_verify, parse, rcgen_upstream, spiffe_crate_accepts,
};
use super::*;
use crate::clock::{unix_seconds, Clock, ManualClock};
use crate::keys::{pem_encode, PrivateKey};
use x509_parser::prelude::FromDer;

fn ca_at(dir: &Path, ttl: Duration, clock: &ManualClock) -> CertificateAuthority {
    CertificateAuthority::load_or_create(&cfg(dir, ttl, None), clock).unwrap()
}

fn state_of(ca: &CertificateAuthority, id: &str) -> Option<AuthorityState> {
    ca.authorities()
        .into_iter()
        .find(|a| a.id == id)
        .map(|a| a.state)
}

fn ids(ca: &CertificateAuthority, kind: AuthorityKind, state: AuthorityState) -> Vec<String> {
    ca.authorities()
        .into_iter()
        .filter(|a| a.kind == kind && a.state == state)
        .map(|a| a.id)
        .collect()
}

fn one(ca: &CertificateAuthority, kind: AuthorityKind, state: AuthorityState) -> String {
    let v = ids(ca, kind, state);
    assert_eq!(v.len(), 1, "{kind} {state}: {v:?}");
    v[0].clone()
}

/// The leaf's authority key identifier, as lowercase hex.
fn aki_hex(der: &[u8]) -> String {
    let cert = parse(der);
    for ext in cert.extensions() {
        if let x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(aki) =
            ext.parsed_extension()
        {
            return hex::encode(aki.key_identifier.as_ref().unwrap().0);
        }
    }
    panic!("no AKI");
}

fn ski_hex(der: &[u8]) -> String {
    let cert = parse(der);
    for ext in cert.extensions() {
        if let x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(ki) =
            ext.parsed_extension()
        {
            return hex::encode(ki.0);
        }
    }
    panic!("no SKI");
}

fn kid_of(token: &str) -> String {
    use base64::Engine;
    let header = token.split('.').next().unwrap();
    let v: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header)
            .unwrap(),
    )
    .unwrap();
    v["kid"].as_str().unwrap().to_owned()
}

fn verifies_under_bundle(bundle: &Bundle, leaf: &[u8]) -> bool {
    let leaf = parse(leaf);
    bundle.x509_authorities.iter().any(|root| {
        leaf.verify_signature(Some(parse(root).public_key()))
            .is_ok()
    })
}

#[test]
fn a_new_ca_has_one_active_authority_of_each_kind_named_by_ski_and_kid() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(now_whole());
    let ca = ca_at(dir.path(), Duration::from_secs(3600), &clock);
    let all = ca.authorities();
    assert_eq!(all.len(), 2, "{all:?}");
    let x = &all[0];
    assert_eq!(
        (x.kind, x.state),
        (AuthorityKind::X509, AuthorityState::Active)
    );
    assert_eq!(x.id, ski_hex(&ca.signing_cert_der()));
    assert_eq!(x.not_after, ca.not_after());
    let j = &all[1];
    assert_eq!(
        (j.kind, j.state),
        (AuthorityKind::Jwt, AuthorityState::Active)
    );
    assert_eq!(j.id, ca.jwt_key_id());
    assert_eq!(j.not_before, None);

    // Issued SVIDs name their authority.
    let key = PrivateKey::generate().unwrap();
    let svid = mint(
        &ca,
        &key,
        &id("spiffe://example.org/a"),
        Duration::from_secs(60),
        clock.now(),
    )
    .unwrap();
    assert_eq!(svid.authority_id, x.id);
    assert_eq!(aki_hex(&svid.cert_chain[0]), x.id);
    let jwt = ca
        .sign_jwt_svid(
            &JwtSvidParams {
                spiffe_id: &id("spiffe://example.org/a"),
                audience: &["aud".into()],
                ttl: Duration::from_secs(60),
                claims: None,
            },
            clock.now(),
        )
        .unwrap();
    assert_eq!(jwt.key_id, j.id);
    assert_eq!(kid_of(&jwt.token), j.id);
}

#[test]
fn prepare_publishes_without_signing_and_activate_switches_the_signer() {
    let dir = tempfile::tempdir().unwrap();
    // Start in the past: OpenSSL checks validity against the real time, and the steps below
    // move the clock forward.
    let clock = ManualClock::new(now_whole() - Duration::from_secs(300));
    let ca = ca_at(dir.path(), Duration::from_secs(3600), &clock);
    let old_x509 = one(&ca, AuthorityKind::X509, AuthorityState::Active);
    let old_jwt = ca.jwt_key_id();
    let seq = ca.bundle().sequence;
    let mut changes = ca.subscribe();
    let key = PrivateKey::generate().unwrap();
    let sid = id("spiffe://example.org/agent");
    let old_svid = mint(&ca, &key, &sid, Duration::from_secs(3600), clock.now()).unwrap();
    let old_token = ca
        .sign_jwt_svid(
            &JwtSvidParams {
                spiffe_id: &sid,
                audience: &["aud".into()],
                ttl: Duration::from_secs(300),
                claims: None,
            },
            clock.now(),
        )
        .unwrap();

    clock.advance(Duration::from_secs(60));
    let prepared = ca.prepare(clock.now()).unwrap();
    assert_eq!(prepared.len(), 2);
    assert!(prepared.iter().all(|a| a.state == AuthorityState::Prepared));
    let new_x509 = one(&ca, AuthorityKind::X509, AuthorityState::Prepared);
    let new_jwt = one(&ca, AuthorityKind::Jwt, AuthorityState::Prepared);
    assert_ne!(new_x509, old_x509);
    assert!(changes.has_changed().unwrap());
    changes.mark_unchanged();

    // Published: both X.509 CAs and both JWT keys are in the bundle, and the sequence bumped.
    let b = ca.bundle();
    assert_eq!(b.sequence, seq + 1);
    assert_eq!(b.x509_authorities.len(), 2);
    let jwt_ids: Vec<_> = b.jwt_authorities.iter().map(|a| a.key_id.clone()).collect();
    assert_eq!(jwt_ids, [old_jwt.clone(), new_jwt.clone()]);
    // ... but not signing: new SVIDs still come from the active authorities.
    let svid = mint(&ca, &key, &sid, Duration::from_secs(60), clock.now()).unwrap();
    assert_eq!(svid.authority_id, old_x509);
    let token = ca
        .sign_jwt_svid(
            &JwtSvidParams {
                spiffe_id: &sid,
                audience: &["aud".into()],
                ttl: Duration::from_secs(60),
                claims: None,
            },
            clock.now(),
        )
        .unwrap();
    assert_eq!(token.key_id, old_jwt);

    // A second prepare is refused, naming the prepared one.
    let err = ca.prepare(clock.now()).unwrap_err();
    assert!(
        matches!(err, CaError::AlreadyPrepared { ref id } if *id == new_x509),
        "{err}"
    );

    clock.advance(Duration::from_secs(60));
    let activated = ca.activate(clock.now()).unwrap();
    assert_eq!(activated.len(), 2);
    assert!(activated.iter().all(|a| a.state == AuthorityState::Active));
    assert!(changes.has_changed().unwrap());
    assert_eq!(state_of(&ca, &old_x509), Some(AuthorityState::Old));
    assert_eq!(state_of(&ca, &old_jwt), Some(AuthorityState::Old));
    assert_eq!(ca.jwt_key_id(), new_jwt);
    // Activation changes no bundle content, so no sequence bump.
    assert_eq!(ca.bundle().sequence, seq + 1);
    assert_eq!(ca.bundle().x509_authorities, b.x509_authorities);

    let new_svid = mint(&ca, &key, &sid, Duration::from_secs(7200), clock.now()).unwrap();
    assert_eq!(new_svid.authority_id, new_x509);
    assert_eq!(aki_hex(&new_svid.cert_chain[0]), new_x509);
    // TTL capped at the *signing* CA's notAfter, which is the new, later one.
    assert_eq!(new_svid.not_after, ca.not_after());
    assert!(new_svid.not_after > old_svid.not_after);
    let new_token = ca
        .sign_jwt_svid(
            &JwtSvidParams {
                spiffe_id: &sid,
                audience: &["aud".into()],
                ttl: Duration::from_secs(60),
                claims: None,
            },
            clock.now(),
        )
        .unwrap();
    assert_eq!(kid_of(&new_token.token), new_jwt);

    // Both generations verify under the one bundle: old ones keep working.
    let bundle = ca.bundle();
    assert!(verifies_under_bundle(&bundle, &old_svid.cert_chain[0]));
    assert!(verifies_under_bundle(&bundle, &new_svid.cert_chain[0]));
    for t in [&old_token.token, &new_token.token] {
        crate::svid::jwt::validate(t, "aud", &bundle, clock.now()).unwrap();
    }
    spiffe_crate_accepts(&new_svid, &key);
    let d = tempfile::tempdir().unwrap();
    openssl_verify(d.path(), &bundle, &old_svid);
    openssl_verify(d.path(), &bundle, &new_svid);

    // Nothing prepared any more.
    assert!(matches!(
        ca.activate(clock.now()),
        Err(CaError::NothingPrepared)
    ));
}

#[test]
fn revoke_removes_old_or_prepared_authorities_and_refuses_the_active_one() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(now_whole());
    let ca = ca_at(dir.path(), Duration::from_secs(3600), &clock);
    ca.prepare(clock.now()).unwrap();
    ca.activate(clock.now()).unwrap();
    let old_x509 = one(&ca, AuthorityKind::X509, AuthorityState::Old);
    let old_jwt = one(&ca, AuthorityKind::Jwt, AuthorityState::Old);
    let active_x509 = one(&ca, AuthorityKind::X509, AuthorityState::Active);
    let active_jwt = one(&ca, AuthorityKind::Jwt, AuthorityState::Active);
    let seq = ca.bundle().sequence;

    for active in [&active_x509, &active_jwt] {
        let err = ca.revoke_authority(active, clock.now()).unwrap_err();
        assert!(matches!(err, CaError::ActiveAuthority { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains(active.as_str()) && msg.contains("prepare"),
            "{msg}"
        );
    }
    let err = ca.revoke_authority("00ff", clock.now()).unwrap_err();
    assert!(matches!(err, CaError::UnknownAuthority { .. }), "{err:?}");
    assert!(err.to_string().contains("00ff"), "{err}");
    assert_eq!(ca.bundle().sequence, seq, "refusals change nothing");

    let old_cert = ca.bundle().x509_authorities[0].clone();
    assert_eq!(ski_hex(&old_cert), old_x509);
    let info = ca.revoke_authority(&old_x509, clock.now()).unwrap();
    assert_eq!(
        (info.kind, info.state),
        (AuthorityKind::X509, AuthorityState::Old)
    );
    let b = ca.bundle();
    assert_eq!(b.sequence, seq + 1);
    assert!(!b.x509_authorities.contains(&old_cert));
    assert_eq!(b.x509_authorities.len(), 1);
    assert!(!dir.path().join(format!("x509-{old_x509}.key")).exists());
    assert!(!dir.path().join(format!("x509-{old_x509}.pem")).exists());
    assert_eq!(state_of(&ca, &old_x509), None);
    // Revoked once, unknown after.
    assert!(matches!(
        ca.revoke_authority(&old_x509, clock.now()),
        Err(CaError::UnknownAuthority { .. })
    ));

    ca.revoke_authority(&old_jwt, clock.now()).unwrap();
    assert_eq!(ca.bundle().jwt_authorities.len(), 1);
    assert!(!dir.path().join(format!("jwt-{old_jwt}.key")).exists());

    // A prepared authority can be withdrawn too, and then another prepared.
    ca.prepare(clock.now()).unwrap();
    let prepared = one(&ca, AuthorityKind::X509, AuthorityState::Prepared);
    ca.revoke_authority(&prepared, clock.now()).unwrap();
    assert!(ids(&ca, AuthorityKind::X509, AuthorityState::Prepared).is_empty());
    assert!(matches!(
        ca.activate(clock.now()),
        Err(CaError::NothingPrepared)
    ));
    ca.prepare(clock.now()).unwrap();

    // The revocations survive a restart.
    let again = ca_at(dir.path(), Duration::from_secs(3600), &clock);
    assert_eq!(again.bundle(), ca.bundle());
    assert_eq!(state_of(&again, &old_x509), None);
    assert_eq!(state_of(&again, &old_jwt), None);
}

#[test]
fn restart_restores_the_same_authorities_and_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(now_whole());
    let ttl = Duration::from_secs(3600);
    let ca = ca_at(dir.path(), ttl, &clock);
    ca.prepare(clock.now()).unwrap();
    let after_prepare = ca_at(dir.path(), ttl, &clock);
    assert_eq!(after_prepare.authorities(), ca.authorities());
    assert_eq!(after_prepare.bundle(), ca.bundle());

    ca.activate(clock.now()).unwrap();
    clock.advance(Duration::from_secs(10));
    let after_activate = ca_at(dir.path(), ttl, &clock);
    assert_eq!(after_activate.authorities(), ca.authorities());
    assert_eq!(after_activate.bundle(), ca.bundle());
    assert_eq!(after_activate.signing_cert_der(), ca.signing_cert_der());
    assert_eq!(after_activate.jwt_key_id(), ca.jwt_key_id());

    // Every key file is private, and the manifest names every authority.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("authorities.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["authorities"].as_array().unwrap().len(), 4);
    for a in ca.authorities() {
        let name = match a.kind {
            AuthorityKind::X509 => format!("x509-{}.key", a.id),
            AuthorityKind::Jwt => format!("jwt-{}.key", a.id),
        };
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(&name))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{name}");
    }
}

#[test]
fn a_missing_key_file_named_by_the_manifest_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(now_whole());
    let ca = ca_at(dir.path(), Duration::from_secs(3600), &clock);
    let kid = ca.jwt_key_id();
    std::fs::remove_file(dir.path().join(format!("jwt-{kid}.key"))).unwrap();
    let err = CertificateAuthority::load_or_create(
        &cfg(dir.path(), Duration::from_secs(3600), None),
        &clock,
    )
    .unwrap_err();
    assert!(err.to_string().contains(&format!("jwt-{kid}.key")), "{err}");

    std::fs::write(dir.path().join("authorities.json"), "{").unwrap();
    let err = CertificateAuthority::load_or_create(
        &cfg(dir.path(), Duration::from_secs(3600), None),
        &clock,
    )
    .unwrap_err();
    assert!(err.to_string().contains("authorities.json"), "{err}");
}

#[test]
fn a_single_ca_key_dir_is_upgraded_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(now_whole());
    let ttl = Duration::from_secs(3600);
    // Write the former layout: x509-ca.{key,pem}, jwt.{key,json}, bundle.json.
    let key = PrivateKey::generate().unwrap();
    let cert = x509::new_ca_cert(
        &cfg(dir.path(), ttl, None).trust_domain,
        "agentd test",
        &key,
        None,
        clock.now(),
        ttl,
    )
    .unwrap();
    key.save(&dir.path().join("x509-ca.key")).unwrap();
    std::fs::write(
        dir.path().join("x509-ca.pem"),
        pem_encode("CERTIFICATE", &cert),
    )
    .unwrap();
    let jwt_key = PrivateKey::generate().unwrap();
    jwt_key.save(&dir.path().join("jwt.key")).unwrap();
    let kid = "0123456789abcdef0123456789abcdef";
    let not_after = unix_seconds(clock.now()) + 3600;
    std::fs::write(
        dir.path().join("jwt.json"),
        format!(r#"{{"kid":"{kid}","not_after":{not_after}}}"#),
    )
    .unwrap();
    std::fs::write(dir.path().join("bundle.json"), r#"{"sequence":7}"#).unwrap();

    let ca = ca_at(dir.path(), ttl, &clock);
    // The same CA and JWT key, now the active authorities; the bundle is unchanged, so is
    // its sequence.
    let b = ca.bundle();
    assert_eq!(b.x509_authorities, vec![cert.clone()]);
    assert_eq!(b.sequence, 7);
    assert_eq!(ca.jwt_key_id(), kid);
    assert_eq!(
        b.jwt_authorities[0].public_key_spki_der,
        jwt_key.public_key_spki_der()
    );
    let x509_id = one(&ca, AuthorityKind::X509, AuthorityState::Active);
    assert_eq!(x509_id, ski_hex(&cert));
    for gone in [
        "x509-ca.key",
        "x509-ca.pem",
        "jwt.key",
        "jwt.json",
        "bundle.json",
    ] {
        assert!(!dir.path().join(gone).exists(), "{gone} left behind");
    }
    assert_eq!(
        PrivateKey::load(&dir.path().join(format!("x509-{x509_id}.key")))
            .unwrap()
            .pkcs8_der(),
        key.pkcs8_der()
    );
    let svid = mint(
        &ca,
        &PrivateKey::generate().unwrap(),
        &id("spiffe://example.org/a"),
        Duration::from_secs(60),
        clock.now(),
    )
    .unwrap();
    assert!(verifies_under_bundle(&b, &svid.cert_chain[0]));

    // And a restart reads the new layout back to the same thing.
    let again = ca_at(dir.path(), ttl, &clock);
    assert_eq!(again.bundle(), b);
    assert_eq!(again.authorities(), ca.authorities());
}

#[test]
fn schedule_prepares_at_half_life_activates_at_five_sixths_and_prunes_at_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let start = now_whole();
    let clock = ManualClock::new(start);
    let ttl = Duration::from_secs(600);
    let ca = ca_at(dir.path(), ttl, &clock);
    let first = one(&ca, AuthorityKind::X509, AuthorityState::Active);
    let first_not_after = ca.not_after();
    // notBefore is backdated 10 s: lifetime 610 s from start - 10 s.
    let (prepare_at, activate_at) = ca.rotation_times();
    let nb = start - BACKDATE;
    assert_eq!(prepare_at, nb + Duration::from_secs(305));
    assert_eq!(activate_at, nb + Duration::from_secs(610) * 5 / 6);

    assert_eq!(ca.rotate_if_due(clock.now()).unwrap(), vec![]);
    clock.set(prepare_at - Duration::from_secs(1));
    assert_eq!(ca.rotate_if_due(clock.now()).unwrap(), vec![]);
    let seq = ca.bundle().sequence;

    clock.set(prepare_at);
    let ev = ca.rotate_if_due(clock.now()).unwrap();
    let next = one(&ca, AuthorityKind::X509, AuthorityState::Prepared);
    let next_jwt = one(&ca, AuthorityKind::Jwt, AuthorityState::Prepared);
    assert_eq!(
        ev,
        vec![RotationEvent::Prepared {
            x509_id: next.clone(),
            jwt_id: next_jwt.clone()
        }]
    );
    assert_eq!(ca.bundle().sequence, seq + 1);
    // Steps in between change nothing.
    clock.set(activate_at - Duration::from_secs(1));
    assert_eq!(ca.rotate_if_due(clock.now()).unwrap(), vec![]);
    assert_eq!(one(&ca, AuthorityKind::X509, AuthorityState::Active), first);

    clock.set(activate_at);
    let ev = ca.rotate_if_due(clock.now()).unwrap();
    assert_eq!(
        ev,
        vec![RotationEvent::Activated {
            x509_id: next.clone(),
            jwt_id: next_jwt.clone()
        }]
    );
    assert_eq!(one(&ca, AuthorityKind::X509, AuthorityState::Active), next);
    assert_eq!(state_of(&ca, &first), Some(AuthorityState::Old));
    assert_eq!(ca.bundle().x509_authorities.len(), 2);

    // The old one stays published until it expires, then leaves the bundle. (The new CA
    // passes its own half-life just before: in the steady state the next key is prepared
    // as the one before the active expires.)
    let first_jwt = ids(&ca, AuthorityKind::Jwt, AuthorityState::Old);
    clock.set(first_not_after - Duration::from_secs(1));
    let ev = ca.rotate_if_due(clock.now()).unwrap();
    assert!(
        ev.iter()
            .all(|e| matches!(e, RotationEvent::Prepared { .. })),
        "{ev:?}"
    );
    assert_eq!(state_of(&ca, &first), Some(AuthorityState::Old));
    let first_cert_count = ca.bundle().x509_authorities.len();
    let seq = ca.bundle().sequence;
    clock.set(first_not_after);
    let ev = ca.rotate_if_due(clock.now()).unwrap();
    assert_eq!(ev.len(), 1, "{ev:?}");
    let RotationEvent::Pruned { ids: pruned } = &ev[0] else {
        panic!("{ev:?}")
    };
    let mut want = vec![first.clone()];
    want.extend(first_jwt);
    assert_eq!(pruned, &want, "the old X.509 CA and the old JWT key");
    assert_eq!(ca.bundle().sequence, seq + 1);
    assert_eq!(ca.bundle().x509_authorities.len(), first_cert_count - 1);
    assert_eq!(state_of(&ca, &first), None);
    assert!(!dir.path().join(format!("x509-{first}.key")).exists());
}

#[test]
fn a_restart_after_the_active_ca_expired_activates_the_prepared_one() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(now_whole());
    let ttl = Duration::from_secs(600);
    let ca = ca_at(dir.path(), ttl, &clock);
    clock.advance(Duration::from_secs(300));
    ca.prepare(clock.now()).unwrap();
    let prepared = one(&ca, AuthorityKind::X509, AuthorityState::Prepared);
    let prepared_jwt = one(&ca, AuthorityKind::Jwt, AuthorityState::Prepared);
    let seq = ca.bundle().sequence;
    drop(ca);
    // Down past the active CA's expiry.
    clock.advance(Duration::from_secs(400));
    let ca = ca_at(dir.path(), ttl, &clock);
    assert_eq!(
        one(&ca, AuthorityKind::X509, AuthorityState::Active),
        prepared
    );
    assert_eq!(
        one(&ca, AuthorityKind::Jwt, AuthorityState::Active),
        prepared_jwt
    );
    assert_eq!(ca.authorities().len(), 2);
    assert_eq!(ca.bundle().sequence, seq + 1);
}

#[test]
fn upstream_mode_prepares_intermediates_and_keeps_the_upstream_roots_as_the_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = rcgen_upstream(dir.path());
    let clock = ManualClock::new(now_whole());
    let ca = CertificateAuthority::load_or_create(
        &cfg(
            &dir.path().join("keys"),
            Duration::from_secs(3600),
            Some(upstream),
        ),
        &clock,
    )
    .unwrap();
    let roots = ca.bundle().x509_authorities.clone();
    let seq = ca.bundle().sequence;
    let old = ca.signing_cert_der();
    ca.prepare(clock.now()).unwrap();
    // The X.509 part of the bundle stays the upstream roots; the new JWT key is published.
    assert_eq!(ca.bundle().x509_authorities, roots);
    assert_eq!(ca.bundle().jwt_authorities.len(), 2);
    assert_eq!(ca.bundle().sequence, seq + 1);
    ca.activate(clock.now()).unwrap();
    let new = ca.signing_cert_der();
    assert_ne!(new, old);
    let new_cert = parse(&new);
    new_cert
        .verify_signature(Some(parse(&roots[0]).public_key()))
        .expect("the new intermediate is signed by the upstream root");
    let key = PrivateKey::generate().unwrap();
    let svid = mint(
        &ca,
        &key,
        &id("spiffe://example.org/a"),
        Duration::from_secs(60),
        clock.now(),
    )
    .unwrap();
    assert_eq!(svid.cert_chain.len(), 2);
    assert_eq!(svid.cert_chain[1], new);
    assert_eq!(svid.authority_id, ski_hex(&new));
    spiffe_crate_accepts(&svid, &key);
    let d = tempfile::tempdir().unwrap();
    openssl_verify(d.path(), &ca.bundle(), &svid);
}

// ---- CRL (RFC 5280 section 5) ----

fn openssl_crl_check(
    dir: &Path,
    root_pem: &str,
    crl_der: &[u8],
    leaf_der: &[u8],
) -> (bool, String) {
    let root = dir.join("root.pem");
    let crl = dir.join("crl.pem");
    let leaf = dir.join("leaf.pem");
    std::fs::write(&root, root_pem).unwrap();
    std::fs::write(&crl, pem_encode("X509 CRL", crl_der)).unwrap();
    std::fs::write(&leaf, pem_encode("CERTIFICATE", leaf_der)).unwrap();
    let out = openssl()
        .arg("verify")
        .arg("-crl_check")
        .arg("-CAfile")
        .arg(&root)
        .arg("-CRLfile")
        .arg(&crl)
        .arg(&leaf)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn crl_has_the_rfc5280_fields_and_openssl_rejects_a_listed_leaf() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(now_whole());
    let ca = ca_at(&dir.path().join("keys"), Duration::from_secs(3600), &clock);
    let authority = one(&ca, AuthorityKind::X509, AuthorityState::Active);
    let key = PrivateKey::generate().unwrap();
    let revoked = mint(
        &ca,
        &key,
        &id("spiffe://example.org/bad"),
        Duration::from_secs(600),
        clock.now(),
    )
    .unwrap();
    let live = mint(
        &ca,
        &key,
        &id("spiffe://example.org/good"),
        Duration::from_secs(600),
        clock.now(),
    )
    .unwrap();
    let revoked_at = clock.now() - Duration::from_secs(5);
    let list = [RevokedSerial {
        serial_hex: revoked.serial.clone(),
        revoked_at,
    }];
    let crl = ca.crl_der(&authority, &list, 42, clock.now()).unwrap();

    let (rest, parsed) = x509_parser::revocation_list::CertificateRevocationList::from_der(&crl)
        .map(|(r, c)| (r.len(), c))
        .unwrap();
    assert_eq!(rest, 0);
    assert_eq!(parsed.version(), Some(x509_parser::x509::X509Version::V2));
    assert_eq!(parsed.last_update().timestamp(), unix_seconds(clock.now()));
    assert_eq!(
        parsed.next_update().unwrap().timestamp(),
        unix_seconds(clock.now()) + CRL_NEXT_UPDATE.as_secs() as i64
    );
    assert_eq!(
        parsed.crl_number().map(|n| n.to_string()),
        Some("42".to_string())
    );
    let aki = parsed
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(a) => {
                a.key_identifier.as_ref().map(|k| hex::encode(k.0))
            }
            _ => None,
        })
        .expect("an authority key identifier");
    assert_eq!(aki, authority);
    let serials: Vec<String> = parsed
        .iter_revoked_certificates()
        .map(|r| r.raw_serial_as_string().replace(':', ""))
        .collect();
    assert_eq!(serials.len(), 1);
    assert_eq!(
        serials[0].trim_start_matches('0'),
        revoked.serial.trim_start_matches('0')
    );
    assert_eq!(
        parsed
            .iter_revoked_certificates()
            .next()
            .unwrap()
            .revocation_date
            .timestamp(),
        unix_seconds(revoked_at)
    );
    assert_eq!(parsed.issuer(), parse(&ca.signing_cert_der()).subject());
    parsed
        .verify_signature(parse(&ca.signing_cert_der()).public_key())
        .expect("signed by the authority's key");

    let root_pem = ca.bundle().x509_pem();
    let (ok, out) = openssl_crl_check(dir.path(), &root_pem, &crl, &revoked.cert_chain[0]);
    assert!(!ok, "a revoked leaf must be rejected: {out}");
    assert!(out.contains("revoked"), "{out}");
    let (ok, out) = openssl_crl_check(dir.path(), &root_pem, &crl, &live.cert_chain[0]);
    assert!(ok, "a live leaf is accepted: {out}");
    let empty = ca.crl_der(&authority, &[], 43, clock.now()).unwrap();
    let (ok, out) = openssl_crl_check(dir.path(), &root_pem, &empty, &revoked.cert_chain[0]);
    assert!(ok, "a CRL without the serial accepts the leaf: {out}");
}

#[test]
fn crl_for_an_old_authority_and_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(now_whole());
    let ca = ca_at(&dir.path().join("keys"), Duration::from_secs(3600), &clock);
    let key = PrivateKey::generate().unwrap();
    let old_svid = mint(
        &ca,
        &key,
        &id("spiffe://example.org/a"),
        Duration::from_secs(600),
        clock.now(),
    )
    .unwrap();
    ca.prepare(clock.now()).unwrap();
    ca.activate(clock.now()).unwrap();
    let old = one(&ca, AuthorityKind::X509, AuthorityState::Old);
    assert_eq!(old_svid.authority_id, old);
    let crl = ca
        .crl_der(
            &old,
            &[RevokedSerial {
                serial_hex: old_svid.serial.clone(),
                revoked_at: clock.now(),
            }],
            1,
            clock.now(),
        )
        .unwrap();
    let (ok, out) = openssl_crl_check(
        dir.path(),
        &ca.bundle().x509_pem(),
        &crl,
        &old_svid.cert_chain[0],
    );
    assert!(!ok && out.contains("revoked"), "{out}");

    let err = ca.crl_der("abcd", &[], 1, clock.now()).unwrap_err();
    assert!(matches!(err, CaError::UnknownAuthority { .. }) && err.to_string().contains("abcd"));
    for (bad, reason) in [
        ("", "empty"),
        ("xyz", "hexadecimal"),
        (&"f".repeat(41)[..], "20 octets"),
    ] {
        let err = ca
            .crl_der(
                &old,
                &[RevokedSerial {
                    serial_hex: bad.to_owned(),
                    revoked_at: clock.now(),
                }],
                1,
                clock.now(),
            )
            .unwrap_err();
        assert!(matches!(err, CaError::InvalidSerial { .. }), "{err:?}");
        assert!(err.to_string().contains(reason), "{err}");
    }
    // A serial with the top bit set stays a positive INTEGER (openssl would otherwise not
    // match it); uppercase is accepted.
    assert_eq!(x509::parse_serial_hex("FF").unwrap(), vec![0, 0xff]);
    assert_eq!(x509::parse_serial_hex("abc").unwrap(), vec![0x0a, 0xbc]);
}

#[test]
fn signing_takes_a_snapshot_so_rotation_under_load_never_fails_a_signature() {
    let dir = tempfile::tempdir().unwrap();
    let clock = std::sync::Arc::new(ManualClock::new(now_whole()));
    let ca = std::sync::Arc::new(ca_at(dir.path(), Duration::from_secs(3600), &clock));
    let key = PrivateKey::generate().unwrap();
    let csr = key.csr_der().unwrap();
    let signer = {
        let ca = ca.clone();
        let clock = clock.clone();
        std::thread::spawn(move || {
            let sid = id("spiffe://example.org/a");
            let mut authorities = std::collections::BTreeSet::new();
            for _ in 0..200 {
                let svid = ca
                    .sign_x509_svid(
                        &X509SvidParams {
                            csr_der: &csr,
                            spiffe_id: &sid,
                            ttl: Duration::from_secs(60),
                            dns_names: &[],
                            extensions: &[],
                        },
                        clock.now(),
                    )
                    .unwrap();
                assert_eq!(aki_hex(&svid.cert_chain[0]), svid.authority_id);
                authorities.insert(svid.authority_id);
            }
            authorities
        })
    };
    for _ in 0..5 {
        ca.prepare(clock.now()).unwrap();
        ca.activate(clock.now()).unwrap();
    }
    let seen = signer.join().unwrap();
    assert!(!seen.is_empty());
}
