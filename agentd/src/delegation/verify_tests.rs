//! The relying party's [`Verifier`] refusing what it must: expired and not yet valid SVIDs,
//! another CA's, another trust domain's, and a delegation chain that does not end at the
//! SVID's subject. Each refusal is beside an acceptance of the same SVID where it is valid,
//! so a test cannot pass by refusing everything.

use std::path::Path;
use std::time::{Duration, SystemTime};

use spiffe::{SpiffeId, TrustDomain};

use super::x509ext::{svid_extensions, test_vectors, OidBase};
use super::{Verifier, VerifyError};
use crate::bundle::Bundle;
use crate::ca::{CaConfig, CertificateAuthority, IssuedX509Svid, JwtSvidParams, X509SvidParams};
use crate::clock::{from_unix_seconds, unix_seconds, ManualClock};
use crate::keys::PrivateKey;

const DAY: Duration = Duration::from_secs(86_400);

fn now() -> SystemTime {
    from_unix_seconds(unix_seconds(SystemTime::now()))
}

fn ca(dir: &Path, trust_domain: &str) -> CertificateAuthority {
    let cfg = CaConfig {
        trust_domain: TrustDomain::new(trust_domain).unwrap(),
        key_dir: dir.to_path_buf(),
        ca_ttl: DAY,
        upstream: None,
        organization: "verifier test".into(),
    };
    CertificateAuthority::load_or_create(&cfg, &ManualClock::new(now())).unwrap()
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::new(s).unwrap()
}

fn mint(
    ca: &CertificateAuthority,
    spiffe_id: &str,
    extensions: &[super::SvidExtension],
) -> IssuedX509Svid {
    let csr = PrivateKey::generate().unwrap().csr_der().unwrap();
    ca.sign_x509_svid(
        &X509SvidParams {
            csr_der: &csr,
            spiffe_id: &id(spiffe_id),
            ttl: Duration::from_secs(600),
            dns_names: &[],
            extensions,
        },
        now(),
    )
    .unwrap()
}

fn jwt(ca: &CertificateAuthority, spiffe_id: &str) -> String {
    ca.sign_jwt_svid(
        &JwtSvidParams {
            spiffe_id: &id(spiffe_id),
            audience: &["tool".to_string()],
            ttl: Duration::from_secs(600),
            claims: None,
        },
        now(),
    )
    .unwrap()
    .token
}

#[test]
fn an_x509_svid_is_refused_before_and_after_its_validity() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(dir.path(), "example.org");
    let svid = mint(&ca, "spiffe://example.org/agent/a", &[]);
    let verifier = Verifier::new(ca.bundle());
    let ok = verifier.verify_x509(&svid.cert_chain, now()).unwrap();
    assert_eq!(ok.spiffe_id, id("spiffe://example.org/agent/a"));

    let later = now() + Duration::from_secs(601);
    let err = verifier.verify_x509(&svid.cert_chain, later).unwrap_err();
    assert!(matches!(err, VerifyError::Expired { .. }), "{err}");

    // NotBefore is 10 s before the signing time.
    let earlier = now() - Duration::from_secs(60);
    let err = verifier.verify_x509(&svid.cert_chain, earlier).unwrap_err();
    assert!(matches!(err, VerifyError::NotYetValid { .. }), "{err}");
}

#[test]
fn another_cas_svids_are_untrusted_even_in_the_same_trust_domain() {
    let (ours, theirs) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (ours, theirs) = (
        ca(ours.path(), "example.org"),
        ca(theirs.path(), "example.org"),
    );
    let verifier = Verifier::new(ours.bundle());

    let svid = mint(&theirs, "spiffe://example.org/agent/a", &[]);
    let err = verifier.verify_x509(&svid.cert_chain, now()).unwrap_err();
    assert!(matches!(err, VerifyError::Untrusted { .. }), "{err}");

    let token = jwt(&theirs, "spiffe://example.org/agent/a");
    let err = verifier.verify_jwt(&token, "tool", now()).unwrap_err();
    assert!(matches!(err, VerifyError::Jwt(_)), "{err}");
    // The same token verifies against its own CA's bundle.
    Verifier::new(theirs.bundle())
        .verify_jwt(&token, "tool", now())
        .unwrap();
}

#[test]
fn an_svid_of_another_trust_domain_is_refused_though_its_chain_verifies() {
    // A bundle for example.org that (by an operator's mistake) holds other.org's roots: the
    // chain verifies, so only the trust domain check refuses the SVID.
    let dir = tempfile::tempdir().unwrap();
    let other = ca(dir.path(), "other.org");
    let misfiled = Bundle {
        trust_domain: TrustDomain::new("example.org").unwrap(),
        ..other.bundle()
    };
    let svid = mint(&other, "spiffe://other.org/agent/a", &[]);
    Verifier::new(other.bundle())
        .verify_x509(&svid.cert_chain, now())
        .unwrap();
    let err = Verifier::new(misfiled.clone())
        .verify_x509(&svid.cert_chain, now())
        .unwrap_err();
    assert!(
        matches!(&err, VerifyError::ForeignTrustDomain { spiffe_id, trust_domain }
            if spiffe_id == "spiffe://other.org/agent/a" && trust_domain == "example.org"),
        "{err}"
    );
    let token = jwt(&other, "spiffe://other.org/agent/a");
    let err = Verifier::new(misfiled)
        .verify_jwt(&token, "tool", now())
        .unwrap_err();
    // The JWT validation names the claim.
    assert!(
        matches!(err, VerifyError::Jwt(_))
            && err
                .to_string()
                .contains("spiffe://other.org/agent/a is not in trust domain example.org"),
        "{err}"
    );
}

#[test]
fn a_delegation_chain_must_end_at_the_svids_subject() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(dir.path(), "example.org");
    let (scopes, delegation) = test_vectors::identity();
    let extensions = svid_extensions(&OidBase::default(), &scopes, Some(&delegation));
    let verifier = Verifier::new(ca.bundle());

    // The chain's last hop is the scheduler: its SVID verifies and acts for alice.
    let last = mint(&ca, "spiffe://example.org/agent/scheduler", &extensions);
    let ok = verifier.verify_x509(&last.cert_chain, now()).unwrap();
    assert_eq!(
        ok.principal().map(ToString::to_string).as_deref(),
        Some("user:alice@example.com")
    );

    // The same extension on the orchestrator's (an earlier hop's) SVID is not ours.
    let earlier = mint(&ca, "spiffe://example.org/agent/orchestrator", &extensions);
    let err = verifier
        .verify_x509(&earlier.cert_chain, now())
        .unwrap_err();
    assert!(
        matches!(&err, VerifyError::Malformed { reason } if reason.contains("the delegation chain ends at spiffe://example.org/agent/scheduler")),
        "{err}"
    );
}

#[test]
fn an_empty_chain_and_garbage_are_malformed() {
    let dir = tempfile::tempdir().unwrap();
    let verifier = Verifier::new(ca(dir.path(), "example.org").bundle());
    let err = verifier.verify_x509(&[], now()).unwrap_err();
    assert!(matches!(err, VerifyError::Malformed { .. }), "{err}");
    let err = verifier
        .verify_x509(&[vec![0x30, 0x03, 1, 2, 3]], now())
        .unwrap_err();
    assert!(matches!(err, VerifyError::Malformed { .. }), "{err}");
}
