//! What each fuzz target does with its input, shared by the `cargo fuzz` targets
//! (fuzz_targets/*.rs, libFuzzer on nightly) and by the stable smoke run in `make test`
//! (tests/tests/fuzz_smoke.rs), which feeds the checked-in seeds and their mutations through
//! the same functions. A body panics only when a parser breaks one of its own promises: it
//! must never panic on input, and what it accepts must survive its own round trip. Each returns
//! whether its main parser accepted the input, so the smoke run can tell that its seeds are
//! well formed and that its mutations reach past the first check.

use std::str::FromStr;
use std::time::{Duration, UNIX_EPOCH};

use agentd::bundle::Bundle;
use agentd::delegation::scope::{Scope, ScopeSet};
use agentd::delegation::verify::{decode_jwt_unverified, decode_x509_unverified};
use agentd::delegation::x509ext::{decode_delegation, decode_scopes, OidBase};
use agentd::svid::jwt;
use agentd_attestor::selector::Selector;
use spiffe::{SpiffeId, TrustDomain};

/// Network input is bytes; the text parsers see what a lossy decoding makes of them, as the
/// gRPC string fields they sit behind would after UTF-8 validation.
fn text(data: &[u8]) -> Option<&str> {
    std::str::from_utf8(data).ok()
}

/// PKCS#10 CSRs as node agents send them in `MintX509SVIDs` and attestation.
pub fn csr(data: &[u8]) -> bool {
    agentd::ca::check_csr_der(data).is_ok()
}

/// JWT-SVIDs as `ValidateJWTSVID`, `api validate jwt` and `svid inspect` read them.
pub fn jwt(data: &[u8]) -> bool {
    let Some(token) = text(data) else {
        return false;
    };
    let accepted = jwt::decode_unverified(token).is_ok();
    let _ = jwt::decode_header_unverified(token);
    let _ = decode_jwt_unverified(token);
    let bundle = Bundle::from_spiffe_json(trust_domain(), r#"{"keys":[]}"#)
        .expect("an empty SPIFFE bundle parses");
    let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    if jwt::validate(token, "spiffe://example.org/tool", &bundle, now).is_ok() {
        panic!("a token validated against a bundle with no keys: {token:?}");
    }
    accepted
}

/// Selectors as entries and attestors carry them (`TYPE:VALUE`).
pub fn selector(data: &[u8]) -> bool {
    let Some(raw) = text(data) else {
        return false;
    };
    let Ok(selector) = Selector::from_str(raw) else {
        return false;
    };
    let again = Selector::from_str(&selector.to_string())
        .unwrap_or_else(|e| panic!("{selector} does not parse back: {e}"));
    assert_eq!(selector, again, "selector round trip of {raw:?}");
    true
}

/// SPIFFE IDs, trust domains, scopes and principals: the identifiers every API takes.
pub fn spiffe_id(data: &[u8]) -> bool {
    let Some(raw) = text(data) else {
        return false;
    };
    let mut accepted = false;
    if let Ok(id) = SpiffeId::new(raw) {
        accepted = true;
        let again = SpiffeId::new(id.to_string())
            .unwrap_or_else(|e| panic!("{id} does not parse back: {e}"));
        assert_eq!(id, again, "SPIFFE ID round trip of {raw:?}");
    }
    accepted |= TrustDomain::new(raw).is_ok();
    if let Ok(scope) = Scope::from_str(raw) {
        accepted = true;
        let again = Scope::from_str(&scope.to_string())
            .unwrap_or_else(|e| panic!("scope {scope} does not parse back: {e}"));
        assert_eq!(scope, again, "scope round trip of {raw:?}");
    }
    if let Ok(set) = ScopeSet::parse_space_separated(raw) {
        accepted |= !set.is_empty();
        let again = ScopeSet::parse_space_separated(&set.to_string())
            .unwrap_or_else(|e| panic!("scope set {set} does not parse back: {e}"));
        assert_eq!(set, again, "scope set round trip of {raw:?}");
    }
    accepted | raw.parse::<agentd::delegation::model::Principal>().is_ok()
}

/// SPIFFE bundle documents (federation, `--trust-bundle`) and PEM bundles.
pub fn bundle(data: &[u8]) -> bool {
    let Some(raw) = text(data) else {
        return false;
    };
    let parsed = Bundle::from_spiffe_json(trust_domain(), raw);
    let accepted = parsed.is_ok();
    if let Ok(bundle) = parsed {
        let again = Bundle::from_spiffe_json(trust_domain(), &bundle.to_spiffe_json())
            .unwrap_or_else(|e| panic!("a parsed bundle does not parse back: {e}"));
        assert_eq!(
            bundle.x509_authorities, again.x509_authorities,
            "bundle round trip of {raw:?}"
        );
    }
    let _ = Bundle::x509_authorities_from_pem(raw);
    accepted
}

/// The scope and delegation X.509 extensions, and whole leaf certificates carrying them.
pub fn extension(data: &[u8]) -> bool {
    let scopes = decode_scopes(data).is_ok();
    let delegation = decode_delegation(data, ScopeSet::new()).is_ok();
    let leaf = decode_x509_unverified(data, &OidBase::default()).is_ok();
    scopes || delegation || leaf
}

fn trust_domain() -> TrustDomain {
    TrustDomain::new("example.org").expect("a valid trust domain")
}

/// A target's body: true when its main parser accepted the input.
pub type Body = fn(&[u8]) -> bool;

/// Every target by name, for the smoke run.
pub const TARGETS: &[(&str, Body)] = &[
    ("csr", csr),
    ("jwt", jwt),
    ("selector", selector),
    ("spiffe_id", spiffe_id),
    ("bundle", bundle),
    ("extension", extension),
];
