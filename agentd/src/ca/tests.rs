use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use spiffe::{SpiffeId, TrustDomain};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::X509Certificate;

use super::*;
use crate::clock::{unix_seconds, Clock, ManualClock};
use crate::keys::{pem_encode, PrivateKey};

const ORG: &str = "agentd test";

pub(super) fn now_whole() -> SystemTime {
    crate::clock::from_unix_seconds(unix_seconds(SystemTime::now()))
}

pub(super) fn cfg(dir: &Path, ca_ttl: Duration, upstream: Option<UpstreamCa>) -> CaConfig {
    CaConfig {
        trust_domain: TrustDomain::new("example.org").unwrap(),
        key_dir: dir.to_path_buf(),
        ca_ttl,
        upstream,
        organization: ORG.into(),
    }
}

fn new_ca(dir: &Path, ca_ttl: Duration) -> (CertificateAuthority, SystemTime) {
    let now = now_whole();
    let ca = CertificateAuthority::load_or_create(&cfg(dir, ca_ttl, None), &ManualClock::new(now))
        .unwrap();
    (ca, now)
}

pub(super) fn id(s: &str) -> SpiffeId {
    SpiffeId::new(s).unwrap()
}

pub(super) fn parse(der: &[u8]) -> X509Certificate<'_> {
    x509_parser::parse_x509_certificate(der).unwrap().1
}

pub(super) fn mint(
    ca: &CertificateAuthority,
    key: &PrivateKey,
    spiffe_id: &SpiffeId,
    ttl: Duration,
    now: SystemTime,
) -> Result<IssuedX509Svid, CaError> {
    let csr = key.csr_der().unwrap();
    ca.sign_x509_svid(
        &X509SvidParams {
            csr_der: &csr,
            spiffe_id,
            ttl,
            dns_names: &[],
            extensions: &[],
        },
        now,
    )
}

#[test]
fn ca_is_send_and_sync() {
    fn assert<T: Send + Sync>() {}
    assert::<CertificateAuthority>();
}

#[test]
fn root_certificate_has_the_ca_profile() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, now) = new_ca(dir.path(), Duration::from_secs(86_400));
    let bundle = ca.bundle();
    assert_eq!(bundle.x509_authorities.len(), 1);
    let root = parse(&bundle.x509_authorities[0]);
    let bc = root.basic_constraints().unwrap().unwrap();
    assert!(bc.value.ca);
    let ku = root.key_usage().unwrap().unwrap();
    assert!(ku.critical && ku.value.key_cert_sign() && ku.value.crl_sign());
    let san = root.subject_alternative_name().unwrap().unwrap();
    assert_eq!(
        san.value.general_names,
        vec![GeneralName::URI("spiffe://example.org")]
    );
    assert!(root
        .extensions()
        .iter()
        .any(|e| e.oid == x509_parser::oid_registry::OID_X509_EXT_SUBJECT_KEY_IDENTIFIER));
    let subject = root.subject().to_string();
    assert!(
        subject.contains("O=agentd test") && subject.contains("CN=example.org"),
        "{subject}"
    );
    assert_eq!(
        root.validity().not_before.timestamp(),
        unix_seconds(now) - 10
    );
    assert_eq!(
        root.validity().not_after.timestamp(),
        unix_seconds(now) + 86_400
    );
    assert_eq!(
        ca.not_after(),
        crate::clock::from_unix_seconds(unix_seconds(now) + 86_400)
    );
    root.verify_signature(None).unwrap();
}

#[test]
fn x509_svid_meets_the_spec() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, now) = new_ca(dir.path(), Duration::from_secs(86_400));
    let key = PrivateKey::generate().unwrap();
    let csr = key.csr_der().unwrap();
    let spiffe_id = id("spiffe://example.org/agent/planner");
    let dns = vec!["planner.example.org".to_string()];
    let svid = ca
        .sign_x509_svid(
            &X509SvidParams {
                csr_der: &csr,
                spiffe_id: &spiffe_id,
                ttl: Duration::from_secs(3600),
                dns_names: &dns,
                extensions: &[],
            },
            now,
        )
        .unwrap();
    assert_eq!(svid.cert_chain.len(), 1);
    assert_eq!(svid.spiffe_id, spiffe_id);
    let leaf = parse(&svid.cert_chain[0]);

    // Exactly one URI SAN, plus the DNS name; SAN non-critical since the subject is set.
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    let uris: Vec<_> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    assert_eq!(uris, vec!["spiffe://example.org/agent/planner"]);
    assert!(san
        .value
        .general_names
        .contains(&GeneralName::DNSName("planner.example.org")));
    assert!(!san.critical);
    assert_eq!(leaf.subject().to_string(), "O=agentd test");

    // CA=false, present.
    let bc = leaf.basic_constraints().unwrap().unwrap();
    assert!(!bc.value.ca);
    // KeyUsage critical, digitalSignature only.
    let ku = leaf.key_usage().unwrap().unwrap();
    assert!(ku.critical);
    assert!(ku.value.digital_signature());
    assert_eq!(ku.value.flags, 1, "only digitalSignature: {}", ku.value);
    // EKU serverAuth + clientAuth.
    let eku = leaf.extended_key_usage().unwrap().unwrap();
    assert!(eku.value.server_auth && eku.value.client_auth);

    // Serial: positive, at most 16 bytes, at least 64 bits, matches the reported hex.
    let serial = leaf.tbs_certificate.raw_serial();
    assert!(serial.len() <= 16 && serial[0] & 0x80 == 0);
    assert!(leaf.serial.bits() >= 64, "{} bits", leaf.serial.bits());
    assert_eq!(leaf.serial.to_str_radix(16), svid.serial);

    // Validity.
    let now_s = unix_seconds(now);
    assert_eq!(leaf.validity().not_before.timestamp(), now_s - 10);
    assert_eq!(leaf.validity().not_after.timestamp(), now_s + 3600);
    assert_eq!(unix_seconds(svid.not_before), now_s - 10);
    assert_eq!(unix_seconds(svid.not_after), now_s + 3600);

    // Key from the CSR; AKI = CA SKI; signed by the CA.
    assert_eq!(leaf.public_key().raw, &key.public_key_spki_der()[..]);
    let root_der = ca.bundle().x509_authorities[0].clone();
    let root = parse(&root_der);
    let ski = root
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0),
            _ => None,
        })
        .unwrap();
    let aki = leaf
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(a) => {
                a.key_identifier.as_ref().map(|k| k.0)
            }
            _ => None,
        })
        .unwrap();
    assert_eq!(aki, ski);
    assert_eq!(leaf.issuer().as_raw(), root.subject().as_raw());
    leaf.verify_signature(Some(root.public_key())).unwrap();

    // Serials differ between SVIDs.
    let other = mint(&ca, &key, &spiffe_id, Duration::from_secs(60), now).unwrap();
    assert_ne!(other.serial, svid.serial);
}

#[test]
fn empty_organization_gives_an_empty_subject_and_a_critical_san() {
    let dir = tempfile::tempdir().unwrap();
    let now = now_whole();
    let mut c = cfg(dir.path(), Duration::from_secs(3600), None);
    c.organization = String::new();
    let ca = CertificateAuthority::load_or_create(&c, &ManualClock::new(now)).unwrap();
    let key = PrivateKey::generate().unwrap();
    let svid = mint(
        &ca,
        &key,
        &id("spiffe://example.org/a"),
        Duration::from_secs(60),
        now,
    )
    .unwrap();
    let leaf = parse(&svid.cert_chain[0]);
    assert_eq!(leaf.subject().iter().count(), 0);
    assert!(leaf.subject_alternative_name().unwrap().unwrap().critical);
    spiffe_crate_accepts(&svid, &key);
}

#[test]
fn ttl_is_capped_at_the_ca_not_after_and_an_expired_ca_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, now) = new_ca(dir.path(), Duration::from_secs(120));
    let key = PrivateKey::generate().unwrap();
    let spiffe_id = id("spiffe://example.org/a");
    let svid = mint(&ca, &key, &spiffe_id, Duration::from_secs(3600), now).unwrap();
    assert_eq!(svid.not_after, ca.not_after());
    assert_eq!(
        parse(&svid.cert_chain[0]).validity().not_after.timestamp(),
        unix_seconds(now) + 120
    );
    let later = now + Duration::from_secs(121);
    match mint(&ca, &key, &spiffe_id, Duration::from_secs(60), later) {
        Err(CaError::Expired { not_after }) => assert_eq!(not_after, ca.not_after()),
        other => panic!("expected Expired, got {other:?}"),
    }
    let jwt = ca.sign_jwt_svid(
        &JwtSvidParams {
            spiffe_id: &spiffe_id,
            audience: &["a".into()],
            ttl: Duration::from_secs(60),
            claims: None,
        },
        later,
    );
    assert!(matches!(jwt, Err(CaError::Expired { .. })), "{jwt:?}");
}

#[test]
fn foreign_trust_domain_and_pathless_ids_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, now) = new_ca(dir.path(), Duration::from_secs(3600));
    let key = PrivateKey::generate().unwrap();
    let err = mint(
        &ca,
        &key,
        &id("spiffe://other.org/a"),
        Duration::from_secs(60),
        now,
    )
    .unwrap_err();
    assert!(
        matches!(&err, CaError::ForeignTrustDomain { spiffe_id, trust_domain }
            if spiffe_id == "spiffe://other.org/a" && trust_domain == "example.org"),
        "{err:?}"
    );
    let err = ca
        .sign_jwt_svid(
            &JwtSvidParams {
                spiffe_id: &id("spiffe://other.org/a"),
                audience: &["x".into()],
                ttl: Duration::from_secs(60),
                claims: None,
            },
            now,
        )
        .unwrap_err();
    assert!(matches!(err, CaError::ForeignTrustDomain { .. }), "{err:?}");
    let err = mint(
        &ca,
        &key,
        &id("spiffe://example.org"),
        Duration::from_secs(60),
        now,
    )
    .unwrap_err();
    assert!(err.to_string().contains("path"), "{err}");
}

#[test]
fn bad_csrs_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, now) = new_ca(dir.path(), Duration::from_secs(3600));
    let spiffe_id = id("spiffe://example.org/a");
    let sign = |csr: &[u8]| {
        ca.sign_x509_svid(
            &X509SvidParams {
                csr_der: csr,
                spiffe_id: &spiffe_id,
                ttl: Duration::from_secs(60),
                dns_names: &[],
                extensions: &[],
            },
            now,
        )
    };
    let csr_reason = |r: Result<IssuedX509Svid, CaError>| match r {
        Err(CaError::Csr { reason }) => reason,
        other => panic!("expected CaError::Csr, got {other:?}"),
    };

    // Flipped signature byte (the signature is the last thing in the DER).
    let mut csr = PrivateKey::generate().unwrap().csr_der().unwrap();
    let last = csr.len() - 1;
    csr[last] ^= 0x01;
    let reason = csr_reason(sign(&csr));
    assert!(reason.contains("signature"), "{reason}");

    // Ed25519 and P-384 keys.
    let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let ed_csr = rcgen::CertificateParams::default()
        .serialize_request(&ed)
        .unwrap();
    let reason = csr_reason(sign(ed_csr.der()));
    assert!(reason.contains("P-256"), "{reason}");
    let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let p384_csr = rcgen::CertificateParams::default()
        .serialize_request(&p384)
        .unwrap();
    let reason = csr_reason(sign(p384_csr.der()));
    assert!(reason.contains("P-256"), "{reason}");

    // Garbage, empty, oversized, trailing bytes.
    for bad in [
        Vec::new(),
        b"not a csr".to_vec(),
        vec![0x30; MAX_CSR_LEN + 1],
        [PrivateKey::generate().unwrap().csr_der().unwrap(), vec![0]].concat(),
    ] {
        csr_reason(sign(&bad));
    }

    // A bad DNS name is refused too.
    let good = PrivateKey::generate().unwrap().csr_der().unwrap();
    let err = ca
        .sign_x509_svid(
            &X509SvidParams {
                csr_der: &good,
                spiffe_id: &spiffe_id,
                ttl: Duration::from_secs(60),
                dns_names: &["bad name".into()],
                extensions: &[],
            },
            now,
        )
        .unwrap_err();
    assert!(err.to_string().contains("bad name"), "{err}");
}

#[test]
fn restart_gives_the_same_bundle_and_key_files_are_0600() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(now_whole());
    let c = cfg(dir.path(), Duration::from_secs(3600), None);
    let first = CertificateAuthority::load_or_create(&c, &clock).unwrap();
    clock.advance(Duration::from_secs(30));
    let second = CertificateAuthority::load_or_create(&c, &clock).unwrap();
    assert_eq!(first.bundle(), second.bundle());
    assert_eq!(first.jwt_key_id(), second.jwt_key_id());
    assert_eq!(first.jwt_key_id().len(), 32);
    assert_eq!(first.bundle().sequence, 1);
    let x509_id = first.authorities()[0].id.clone();
    let kid = first.jwt_key_id();
    for name in [format!("x509-{x509_id}.key"), format!("jwt-{kid}.key")] {
        let mode = std::fs::metadata(dir.path().join(&name))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{name}");
    }
    for name in [format!("x509-{x509_id}.pem"), "authorities.json".into()] {
        assert!(dir.path().join(&name).exists(), "{name}");
    }
    // An SVID from the reloaded CA chains to the first bundle.
    let key = PrivateKey::generate().unwrap();
    let svid = mint(
        &second,
        &key,
        &id("spiffe://example.org/a"),
        Duration::from_secs(60),
        clock.now(),
    )
    .unwrap();
    let first_root = first.bundle().x509_authorities[0].clone();
    let root = parse(&first_root);
    parse(&svid.cert_chain[0])
        .verify_signature(Some(root.public_key()))
        .unwrap();

    // Once the CA has expired, a restart makes a new CA and JWT key and bumps the sequence.
    clock.advance(Duration::from_secs(3600));
    let third = CertificateAuthority::load_or_create(&c, &clock).unwrap();
    assert_ne!(
        third.bundle().x509_authorities,
        first.bundle().x509_authorities
    );
    assert_ne!(third.jwt_key_id(), first.jwt_key_id());
    assert_eq!(third.bundle().sequence, 2);
}

#[test]
fn corrupt_store_files_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = new_ca(dir.path(), Duration::from_secs(3600));
    let cert_file = format!("x509-{}.pem", ca.authorities()[0].id);
    std::fs::write(dir.path().join(&cert_file), "garbage").unwrap();
    let err = CertificateAuthority::load_or_create(
        &cfg(dir.path(), Duration::from_secs(3600), None),
        &ManualClock::new(now_whole()),
    )
    .unwrap_err();
    assert!(err.to_string().contains(&cert_file), "{err}");

    // A key that does not belong to the certificate is caught.
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = new_ca(dir.path(), Duration::from_secs(3600));
    PrivateKey::generate()
        .unwrap()
        .save(
            &dir.path()
                .join(format!("x509-{}.key", ca.authorities()[0].id)),
        )
        .unwrap();
    let err = CertificateAuthority::load_or_create(
        &cfg(dir.path(), Duration::from_secs(3600), None),
        &ManualClock::new(now_whole()),
    )
    .unwrap_err();
    assert!(err.to_string().contains("does not belong"), "{err}");
}

#[test]
fn debug_output_shows_no_key_material() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = new_ca(dir.path(), Duration::from_secs(3600));
    let dbg = format!("{ca:?}");
    let x509_id = ca.authorities()[0].id.clone();
    for name in [
        format!("x509-{x509_id}.key"),
        format!("jwt-{}.key", ca.jwt_key_id()),
    ] {
        let key = PrivateKey::load(&dir.path().join(&name)).unwrap();
        let der = key.pkcs8_der();
        // ring's PKCS#8 layout puts the 32-byte private scalar at bytes 36..68 (after the
        // `04 20` OCTET STRING header); the rest (OIDs, public key) is public.
        assert_eq!(&der[34..36], &[0x04, 0x20]);
        let scalar = &der[36..68];
        for w in scalar.windows(6) {
            assert!(
                !dbg.contains(&hex::encode(w)),
                "{name} leaked in Debug (hex)"
            );
            let list = format!("{w:?}");
            assert!(
                !dbg.contains(&list[1..list.len() - 1]),
                "{name} leaked in Debug (bytes)"
            );
        }
    }
    assert!(dbg.contains("redacted") || dbg.contains("elided"), "{dbg}");
}

// ---- interop: OpenSSL and the `spiffe` crate ----

/// A `Command` for the `openssl` binary. The interop checks are part of the suite, not
/// optional: without openssl the test fails and says so (scripts/install-tools.sh, run by
/// `make test`, installs it).
pub(super) fn openssl() -> Command {
    match Command::new("openssl").arg("version").output() {
        Ok(o) if o.status.success() => Command::new("openssl"),
        Ok(o) => panic!(
            "`openssl version` failed ({}): this test checks agentd's output with OpenSSL; install it (scripts/install-tools.sh)",
            o.status
        ),
        Err(e) => panic!(
            "the openssl binary is missing ({e}): this test checks agentd's output with OpenSSL; install it (scripts/install-tools.sh)"
        ),
    }
}

pub(super) fn openssl_verify(dir: &Path, bundle: &Bundle, svid: &IssuedX509Svid) {
    let bundle_pem = dir.join("bundle.pem");
    let leaf_pem = dir.join("leaf.pem");
    let chain_pem = dir.join("chain.pem");
    std::fs::write(&bundle_pem, bundle.x509_pem()).unwrap();
    std::fs::write(&leaf_pem, pem_encode("CERTIFICATE", &svid.cert_chain[0])).unwrap();
    let chain: String = svid.cert_chain[1..]
        .iter()
        .map(|c| pem_encode("CERTIFICATE", c))
        .collect();
    for purpose in [None, Some("sslclient"), Some("sslserver")] {
        let mut cmd = openssl();
        cmd.arg("verify").arg("-CAfile").arg(&bundle_pem);
        if !chain.is_empty() {
            std::fs::write(&chain_pem, &chain).unwrap();
            cmd.arg("-untrusted").arg(&chain_pem);
        }
        if let Some(p) = purpose {
            cmd.args(["-purpose", p]);
        }
        let out = cmd.arg(&leaf_pem).output().unwrap();
        assert!(
            out.status.success(),
            "openssl verify {purpose:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

pub(super) fn spiffe_crate_accepts(svid: &IssuedX509Svid, key: &PrivateKey) {
    let parsed = spiffe::X509Svid::parse_from_der(&svid.cert_chain.concat(), key.pkcs8_der())
        .expect("the spiffe crate accepts the X.509-SVID");
    assert_eq!(parsed.spiffe_id(), &svid.spiffe_id);
    assert_eq!(parsed.cert_chain().len(), svid.cert_chain.len());
}

#[test]
fn self_signed_svid_is_accepted_by_openssl_and_the_spiffe_crate() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, now) = new_ca(&dir.path().join("keys"), Duration::from_secs(3600));
    let key = PrivateKey::generate().unwrap();
    let svid = mint(
        &ca,
        &key,
        &id("spiffe://example.org/agent"),
        Duration::from_secs(600),
        now,
    )
    .unwrap();
    spiffe_crate_accepts(&svid, &key);
    openssl_verify(dir.path(), &ca.bundle(), &svid);
}

/// An upstream root made by rcgen (P-256), written as PEM files.
pub(super) fn rcgen_upstream(dir: &Path) -> UpstreamCa {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "Upstream Root");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    p.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    p.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(30);
    let cert = p.self_signed(&key).unwrap();
    let cert_file = dir.join("upstream.pem");
    let key_file = dir.join("upstream.key");
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    UpstreamCa {
        cert_file,
        key_file,
        bundle_file: None,
    }
}

/// An upstream root made by OpenSSL (PrintableString country, UTF8 names), `newkey` e.g.
/// `ec -pkeyopt ec_paramgen_curve:P-256` or `rsa:2048`.
fn openssl_upstream(dir: &Path, newkey: &[&str]) -> UpstreamCa {
    let cert_file = dir.join("os-upstream.pem");
    let key_file = dir.join("os-upstream.key");
    let out = openssl()
        .args(["req", "-x509", "-nodes", "-days", "30", "-newkey"])
        .args(newkey)
        .args(["-subj", "/C=US/O=Upstream Org/CN=Upstream OpenSSL Root"])
        .args(["-addext", "basicConstraints=critical,CA:TRUE"])
        .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        .arg("-keyout")
        .arg(&key_file)
        .arg("-out")
        .arg(&cert_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    UpstreamCa {
        cert_file,
        key_file,
        bundle_file: None,
    }
}

fn check_upstream_mode(dir: &Path, upstream: UpstreamCa) {
    let up_der =
        Bundle::x509_authorities_from_pem(&std::fs::read_to_string(&upstream.cert_file).unwrap())
            .unwrap();
    let clock = ManualClock::new(now_whole());
    let c = cfg(&dir.join("keys"), Duration::from_secs(3600), Some(upstream));
    let ca = CertificateAuthority::load_or_create(&c, &clock).unwrap();
    let bundle = ca.bundle();
    assert_eq!(bundle.x509_authorities, up_der);

    let inter_der = ca.signing_cert_der();
    let inter = parse(&inter_der);
    assert!(inter.basic_constraints().unwrap().unwrap().value.ca);
    assert_eq!(
        inter.issuer().as_raw(),
        parse(&up_der[0]).subject().as_raw()
    );

    let key = PrivateKey::generate().unwrap();
    let svid = mint(
        &ca,
        &key,
        &id("spiffe://example.org/agent"),
        Duration::from_secs(600),
        clock.now(),
    )
    .unwrap();
    assert_eq!(svid.cert_chain.len(), 2);
    assert_eq!(svid.cert_chain[1], ca.signing_cert_der());
    spiffe_crate_accepts(&svid, &key);
    openssl_verify(dir, &bundle, &svid);

    // Restart: same intermediate, same bundle.
    let again = CertificateAuthority::load_or_create(&c, &clock).unwrap();
    assert_eq!(again.signing_cert_der(), ca.signing_cert_der());
    assert_eq!(again.bundle(), bundle);
}

#[test]
fn upstream_mode_svid_is_accepted_by_openssl_and_the_spiffe_crate() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = rcgen_upstream(dir.path());
    check_upstream_mode(dir.path(), upstream);
}

#[test]
fn upstream_made_by_openssl_works_with_ec_and_rsa_keys() {
    for newkey in [
        &["ec", "-pkeyopt", "ec_paramgen_curve:P-256"][..],
        &["rsa:2048"][..],
    ] {
        let dir = tempfile::tempdir().unwrap();
        let upstream = openssl_upstream(dir.path(), newkey);
        check_upstream_mode(dir.path(), upstream);
    }
}

#[test]
fn upstream_bundle_file_roots_are_added_and_bad_upstreams_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut upstream = rcgen_upstream(dir.path());
    let other = tempfile::tempdir().unwrap();
    let extra = rcgen_upstream(other.path());
    upstream.bundle_file = Some(extra.cert_file.clone());
    let ca = CertificateAuthority::load_or_create(
        &cfg(
            &dir.path().join("keys"),
            Duration::from_secs(3600),
            Some(upstream.clone()),
        ),
        &ManualClock::new(now_whole()),
    )
    .unwrap();
    assert_eq!(ca.bundle().x509_authorities.len(), 2);

    // A key that does not match the upstream certificate.
    let mut mismatched = upstream.clone();
    mismatched.key_file = extra.key_file.clone();
    let err = CertificateAuthority::load_or_create(
        &cfg(
            &dir.path().join("keys2"),
            Duration::from_secs(3600),
            Some(mismatched),
        ),
        &ManualClock::new(now_whole()),
    )
    .unwrap_err();
    assert!(matches!(err, CaError::Upstream { .. }), "{err:?}");

    // A missing file is named.
    let mut missing = upstream;
    missing.cert_file = dir.path().join("nope.pem");
    let err = CertificateAuthority::load_or_create(
        &cfg(
            &dir.path().join("keys3"),
            Duration::from_secs(3600),
            Some(missing),
        ),
        &ManualClock::new(now_whole()),
    )
    .unwrap_err();
    assert!(err.to_string().contains("nope.pem"), "{err}");
}

#[test]
fn jwt_svid_has_the_exact_header_and_claims() {
    use base64::Engine;
    let dir = tempfile::tempdir().unwrap();
    let (ca, now) = new_ca(dir.path(), Duration::from_secs(3600));
    let spiffe_id = id("spiffe://example.org/agent");
    let decode = |part: &str| -> serde_json::Value {
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(part)
                .unwrap(),
        )
        .unwrap()
    };
    let one = ca
        .sign_jwt_svid(
            &JwtSvidParams {
                spiffe_id: &spiffe_id,
                audience: &["svc-b".into()],
                ttl: Duration::from_secs(300),
                claims: None,
            },
            now,
        )
        .unwrap();
    let parts: Vec<&str> = one.token.split('.').collect();
    assert_eq!(parts.len(), 3);
    let header = decode(parts[0]);
    assert_eq!(
        header,
        serde_json::json!({"alg": "ES256", "kid": ca.jwt_key_id(), "typ": "JWT"})
    );
    let claims = decode(parts[1]);
    assert_eq!(claims["sub"], "spiffe://example.org/agent");
    assert_eq!(claims["aud"], "svc-b");
    assert_eq!(claims["exp"], unix_seconds(now) + 300);
    assert_eq!(claims["iat"], unix_seconds(now));
    assert_eq!(claims["jti"].as_str().unwrap().len(), 32);
    assert_eq!(unix_seconds(one.expires_at), unix_seconds(now) + 300);

    let two = ca
        .sign_jwt_svid(
            &JwtSvidParams {
                spiffe_id: &spiffe_id,
                audience: &["a".into(), "b".into()],
                ttl: Duration::from_secs(10 * 3600),
                claims: None,
            },
            now,
        )
        .unwrap();
    let claims = decode(two.token.split('.').nth(1).unwrap());
    assert_eq!(claims["aud"], serde_json::json!(["a", "b"]));
    // Capped at the key's expiry (the CA's notAfter).
    assert_eq!(two.expires_at, ca.not_after());

    assert!(ca
        .sign_jwt_svid(
            &JwtSvidParams {
                spiffe_id: &spiffe_id,
                audience: &[],
                ttl: Duration::from_secs(60),
                claims: None
            },
            now
        )
        .is_err());
}

#[test]
fn jwt_svid_is_accepted_by_the_spiffe_crate() {
    let dir = tempfile::tempdir().unwrap();
    // The spiffe crate checks expiry against the real clock.
    let now = SystemTime::now();
    let ca = CertificateAuthority::load_or_create(
        &cfg(dir.path(), Duration::from_secs(3600), None),
        &ManualClock::new(now),
    )
    .unwrap();
    let spiffe_id = id("spiffe://example.org/agent");
    let token = ca
        .sign_jwt_svid(
            &JwtSvidParams {
                spiffe_id: &spiffe_id,
                audience: &["svc-b".into()],
                ttl: Duration::from_secs(300),
                claims: None,
            },
            now,
        )
        .unwrap()
        .token;
    let bundle = ca.bundle();
    let jwt_bundle = spiffe::JwtBundle::from_jwt_authorities(
        bundle.trust_domain.clone(),
        bundle.jwt_jwks_json().as_bytes(),
    )
    .unwrap();
    let mut set = spiffe::JwtBundleSet::new();
    set.add_bundle(jwt_bundle);
    let svid = spiffe::JwtSvid::parse_and_validate(&token, &set, &["svc-b"]).unwrap();
    assert_eq!(svid.spiffe_id(), &spiffe_id);
    assert!(spiffe::JwtSvid::parse_and_validate(&token, &set, &["other"]).is_err());

    // The SPIFFE bundle document's jwt-svid keys work the same way.
    let doc: serde_json::Value = serde_json::from_str(&bundle.to_spiffe_json()).unwrap();
    let jwt_keys: Vec<_> = doc["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["use"] == "jwt-svid")
        .cloned()
        .collect();
    let jwks = serde_json::json!({ "keys": jwt_keys }).to_string();
    let mut set = spiffe::JwtBundleSet::new();
    set.add_bundle(
        spiffe::JwtBundle::from_jwt_authorities(bundle.trust_domain.clone(), jwks.as_bytes())
            .unwrap(),
    );
    spiffe::JwtSvid::parse_and_validate(&token, &set, &["svc-b"]).unwrap();
}

#[test]
fn check_csr_accepts_what_signing_accepts_and_refuses_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = new_ca(dir.path(), Duration::from_secs(3600));
    let key = crate::keys::PrivateKey::generate().unwrap();
    assert!(ca.check_csr(&key.csr_der().unwrap()).is_ok());
    assert!(matches!(ca.check_csr(b""), Err(CaError::Csr { .. })));
    assert!(matches!(
        ca.check_csr(b"not a csr"),
        Err(CaError::Csr { .. })
    ));
    let mut tampered = key.csr_der().unwrap();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    assert!(matches!(ca.check_csr(&tampered), Err(CaError::Csr { .. })));
}

/// Every key file in the CA key dir, with its bytes.
fn key_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "key"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

#[test]
fn a_restart_with_another_trust_domain_is_refused_and_keeps_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, now) = new_ca(dir.path(), Duration::from_secs(3600));
    let bundle = ca.bundle();
    drop(ca);
    let before = key_files(dir.path());
    assert!(!before.is_empty());

    let mut typo = cfg(dir.path(), Duration::from_secs(3600), None);
    typo.trust_domain = TrustDomain::new("exmaple.org").unwrap();
    let err = CertificateAuthority::load_or_create(&typo, &ManualClock::new(now)).unwrap_err();
    assert!(
        matches!(&err, CaError::StoredAuthorityMismatch { problem, .. }
            if problem.contains("spiffe://exmaple.org") && problem.contains("trust domain")),
        "{err}"
    );
    assert!(err.to_string().contains("the CA keys are kept"), "{err}");
    assert_eq!(
        key_files(dir.path()),
        before,
        "no key was deleted or replaced"
    );

    // With the right trust domain again, the same CA comes back.
    let again = CertificateAuthority::load_or_create(
        &cfg(dir.path(), Duration::from_secs(3600), None),
        &ManualClock::new(now),
    )
    .unwrap();
    assert_eq!(again.bundle().x509_authorities, bundle.x509_authorities);
}

#[test]
fn a_restart_without_the_upstream_ca_is_refused_and_keeps_the_intermediate() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let clock = ManualClock::new(now_whole());
    let upstream = rcgen_upstream(dir.path());
    let with = cfg(&keys, Duration::from_secs(3600), Some(upstream));
    let ca = CertificateAuthority::load_or_create(&with, &clock).unwrap();
    let inter = ca.signing_cert_der();
    drop(ca);
    let before = key_files(&keys);

    let without = cfg(&keys, Duration::from_secs(3600), None);
    let err = CertificateAuthority::load_or_create(&without, &clock).unwrap_err();
    assert!(
        matches!(&err, CaError::StoredAuthorityMismatch { problem, .. } if problem.contains("upstream")),
        "{err}"
    );
    assert_eq!(key_files(&keys), before, "no key was deleted or replaced");
    let again = CertificateAuthority::load_or_create(&with, &clock).unwrap();
    assert_eq!(again.signing_cert_der(), inter);
}

#[test]
fn an_authority_expired_at_startup_is_dropped_but_its_key_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, now) = new_ca(dir.path(), Duration::from_secs(120));
    let first = ca.bundle().x509_authorities.clone();
    drop(ca);
    let before = key_files(dir.path());
    // A clock jump (or a long outage) past the CA's notAfter: a new CA is made, and the old
    // keys stay on disk.
    let later = ManualClock::new(now + Duration::from_secs(600));
    let ca = CertificateAuthority::load_or_create(
        &cfg(dir.path(), Duration::from_secs(120), None),
        &later,
    )
    .unwrap();
    assert_ne!(ca.bundle().x509_authorities, first);
    let after = key_files(dir.path());
    for (name, bytes) in &before {
        assert!(
            after.iter().any(|(n, b)| n == name && b == bytes),
            "{name} was deleted"
        );
    }
}

/// Another server's authorities join the bundle (once each, after this server's own), the
/// bundle's sequence grows with them, subscribers hear of it, and the server's own part
/// (what it publishes) stays its own.
#[test]
fn peer_authorities_join_the_bundle_and_bump_its_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let other_dir = tempfile::tempdir().unwrap();
    let (ca, _) = new_ca(dir.path(), Duration::from_secs(86_400));
    let (other, _) = new_ca(other_dir.path(), Duration::from_secs(86_400));
    let before = ca.bundle();
    let mut changes = ca.subscribe();
    changes.mark_unchanged();
    let theirs = other.own_bundle();
    let mut peers = PeerAuthorities {
        x509_authorities: theirs.x509_authorities.clone(),
        jwt_authorities: theirs.jwt_authorities.clone(),
        sequence: theirs.sequence,
    };
    // Our own authorities among theirs are not listed twice.
    peers
        .x509_authorities
        .push(before.x509_authorities[0].clone());
    assert!(ca.set_peer_authorities(peers.clone()));
    assert!(changes.has_changed().unwrap());
    let merged = ca.bundle();
    assert_eq!(
        merged.x509_authorities,
        [
            before.x509_authorities.clone(),
            theirs.x509_authorities.clone()
        ]
        .concat()
    );
    assert_eq!(
        merged.jwt_authorities,
        [
            before.jwt_authorities.clone(),
            theirs.jwt_authorities.clone()
        ]
        .concat()
    );
    assert!(merged.sequence > before.sequence);
    assert_eq!(ca.own_bundle(), before, "the own part is unchanged");
    changes.mark_unchanged();
    assert!(!ca.set_peer_authorities(peers), "the same set is no change");
    assert!(!changes.has_changed().unwrap());
    // A peer gone: the bundle is our own again.
    assert!(ca.set_peer_authorities(PeerAuthorities::default()));
    let after = ca.bundle();
    assert_eq!(after.x509_authorities, before.x509_authorities);
    assert_eq!(after.sequence, before.sequence);
}

#[test]
fn an_access_token_is_at_jwt_and_validates_as_one_only_for_its_issuer() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, now) = new_ca(dir.path(), Duration::from_secs(3600));
    let mut claims = serde_json::Map::new();
    claims.insert("iss".into(), "https://agentd.example".into());
    claims.insert("aud".into(), "https://tools.example/mcp".into());
    claims.insert("sub".into(), "user:alice@example.com".into());
    claims.insert("client_id".into(), "spiffe://example.org/agent/a".into());
    let exp = unix_seconds(now) + 60;
    let token = ca.sign_access_token(claims, exp, now).unwrap();
    let header = crate::svid::jwt::decode_header_unverified(&token.token).unwrap();
    assert_eq!(header["typ"], "at+jwt");
    assert_eq!(header["kid"], token.key_id.as_str());
    let bundle = ca.bundle();
    let got = crate::svid::jwt::validate_access_token(
        &token.token,
        "https://agentd.example",
        &bundle,
        now,
    )
    .unwrap();
    assert_eq!(got["jti"], token.jti.as_str());
    assert_eq!(got["exp"], exp);
    assert_eq!(got["iat"], unix_seconds(now));
    let other = crate::svid::jwt::validate_access_token(
        &token.token,
        "https://other.example",
        &bundle,
        now,
    );
    assert!(other.unwrap_err().to_string().contains("iss"));
    let later = now + Duration::from_secs(61);
    assert!(matches!(
        crate::svid::jwt::validate_access_token(
            &token.token,
            "https://agentd.example",
            &bundle,
            later
        ),
        Err(crate::svid::jwt::JwtError::Expired { .. })
    ));
    // A JWT-SVID is not an access token, and an access token is not a JWT-SVID.
    let svid = ca
        .sign_jwt_svid(
            &JwtSvidParams {
                spiffe_id: &id("spiffe://example.org/agent/a"),
                audience: &["https://agentd.example".into()],
                ttl: Duration::from_secs(60),
                claims: None,
            },
            now,
        )
        .unwrap();
    let e = crate::svid::jwt::validate_access_token(
        &svid.token,
        "https://agentd.example",
        &bundle,
        now,
    );
    assert!(e.unwrap_err().to_string().contains("typ"));
    let e = crate::svid::jwt::validate(&token.token, "https://tools.example/mcp", &bundle, now);
    assert!(e.unwrap_err().to_string().contains("typ"));
    // Capped at the key's expiry, refused when already expired.
    assert!(ca
        .sign_access_token(serde_json::Map::new(), unix_seconds(now), now)
        .is_err());
}

#[test]
fn jwt_svids_carry_iss_once_an_issuer_is_set_and_ip_literals_are_ip_sans() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, now) = new_ca(dir.path(), Duration::from_secs(3600));
    let params = JwtSvidParams {
        spiffe_id: &id("spiffe://example.org/agent/a"),
        audience: &["x".into()],
        ttl: Duration::from_secs(60),
        claims: None,
    };
    let before = ca.sign_jwt_svid(&params, now).unwrap();
    assert!(!crate::svid::jwt::decode_unverified(&before.token)
        .unwrap()
        .contains_key("iss"));
    ca.set_jwt_issuer("https://agentd.example".into()).unwrap();
    assert!(ca.set_jwt_issuer("https://again.example".into()).is_err());
    let after = ca.sign_jwt_svid(&params, now).unwrap();
    assert_eq!(
        crate::svid::jwt::decode_unverified(&after.token).unwrap()["iss"],
        "https://agentd.example"
    );
    let key = PrivateKey::generate().unwrap();
    let csr = key.csr_der().unwrap();
    let svid = ca
        .sign_x509_svid(
            &X509SvidParams {
                csr_der: &csr,
                spiffe_id: &id("spiffe://example.org/agentd/server"),
                ttl: Duration::from_secs(60),
                dns_names: &["127.0.0.1".into(), "agentd.example".into()],
                extensions: &[],
            },
            now,
        )
        .unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&svid.cert_chain[0]).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert!(san
        .value
        .general_names
        .iter()
        .any(|n| matches!(n, GeneralName::IPAddress(b) if *b == [127, 0, 0, 1])));
    assert!(san
        .value
        .general_names
        .iter()
        .any(|n| matches!(n, GeneralName::DNSName("agentd.example"))));
}
