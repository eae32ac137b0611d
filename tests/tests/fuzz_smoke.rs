//! A short, stable-toolchain run of every `cargo fuzz` target in fuzz/: each target's body
//! (fuzz/bodies.rs, the same code libFuzzer drives) gets well-formed seeds and a few thousand
//! deterministic mutations of them (bit flips, truncations, insertions, splices). It finds
//! the shallow crashes in CI; the coverage-guided runs (`make fuzz`) go deeper.
//!
//! `AGENTD_FUZZ_WRITE_CORPUS=DIR` also writes the seeds to DIR/<target>/ (fuzz/make-corpus.sh),
//! so the fuzzers start from the same inputs.

#[path = "../../fuzz/bodies.rs"]
mod bodies;

use agentd::delegation::claims::to_claims;
use agentd::delegation::model::{Delegation, Hop};
use agentd::delegation::scope::ScopeSet;
use agentd::delegation::x509ext::{encode_delegation, encode_scopes, svid_extensions, OidBase};
use agentd::keys::PrivateKey;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

/// Mutations per seed; `AGENTD_FUZZ_SMOKE_ROUNDS` raises it for a longer local run.
fn rounds() -> usize {
    std::env::var("AGENTD_FUZZ_SMOKE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400)
}

fn delegation() -> Delegation {
    Delegation {
        principal: "user:alice@example.com".parse().unwrap(),
        chain: vec![Hop {
            agent: spiffe::SpiffeId::new("spiffe://example.org/agent/orchestrator").unwrap(),
            grant_id: "0123456789abcdef0123456789abcdef".parse().unwrap(),
        }],
        scopes: scopes(),
        expires_at: 1_900_000_000,
        remaining_depth: 1,
        task_id: Some("task-7".parse().unwrap()),
    }
}

fn scopes() -> ScopeSet {
    ScopeSet::parse(&["calendar:read", "crm:*"]).unwrap()
}

fn jwt_seed(claims: serde_json::Map<String, serde_json::Value>) -> Vec<u8> {
    let header = r#"{"alg":"ES256","kid":"k1","typ":"JWT"}"#;
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(serde_json::Value::Object(claims).to_string()),
        URL_SAFE_NO_PAD.encode([7u8; 64]),
    )
    .into_bytes()
}

/// A self-signed leaf carrying a SPIFFE ID and both agentd extensions.
fn leaf_seed() -> Vec<u8> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://example.org/agent/orchestrator"
            .try_into()
            .unwrap(),
    )];
    let d = delegation();
    for ext in svid_extensions(&OidBase::default(), &d.scopes, Some(&d)) {
        params
            .custom_extensions
            .push(rcgen::CustomExtension::from_oid_content(
                &ext.oid, ext.value,
            ));
    }
    params.self_signed(&key).unwrap().der().to_vec()
}

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let text = |items: &[&str]| items.iter().map(|s| s.as_bytes().to_vec()).collect();
    match target {
        "csr" => vec![PrivateKey::generate().unwrap().csr_der().unwrap()],
        "jwt" => {
            let mut claims = to_claims(&scopes(), Some(&delegation()));
            claims.insert("sub".into(), "spiffe://example.org/agent/a".into());
            claims.insert(
                "aud".into(),
                serde_json::json!(["spiffe://example.org/tool"]),
            );
            claims.insert("exp".into(), 1_900_000_000.into());
            claims.insert("iat".into(), 1_700_000_000.into());
            claims.insert("jti".into(), "0f".into());
            vec![jwt_seed(claims), jwt_seed(serde_json::Map::new())]
        }
        "selector" => text(&[
            "unix:uid:1000",
            "unix:path:/usr/bin/python3",
            "container:label:app=web",
            "systemd:unit:agent.service",
            "x509pop:subject:cn:node-1",
        ]),
        "spiffe_id" => text(&[
            "spiffe://example.org/agent/a",
            "spiffe://example.org",
            "example.org",
            "calendar:read",
            "crm:* payments:execute",
            "user:alice@example.com",
        ]),
        "bundle" => {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let mut params = rcgen::CertificateParams::default();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let root = params.self_signed(&key).unwrap();
            let bundle = agentd::bundle::Bundle {
                trust_domain: spiffe::TrustDomain::new("example.org").unwrap(),
                x509_authorities: vec![root.der().to_vec()],
                jwt_authorities: Vec::new(),
                sequence: 3,
                refresh_hint: std::time::Duration::from_secs(300),
            };
            vec![
                bundle.to_spiffe_json().into_bytes(),
                bundle.x509_pem().into_bytes(),
            ]
        }
        "extension" => vec![
            encode_scopes(&scopes()),
            encode_delegation(&delegation()),
            leaf_seed(),
        ],
        other => panic!("no seeds for fuzz target {other}"),
    }
}

/// xorshift64*: deterministic, so a failure names a reproducible case.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: &[u8] = &[
    0x00, 0x01, 0x7f, 0x80, 0x81, 0x82, 0xff, b':', b'/', b'.', b'%', b'"',
];

fn mutate(rng: &mut Rng, seed: &[u8], other: &[u8]) -> Vec<u8> {
    let mut out = seed.to_vec();
    for _ in 0..=rng.below(4) {
        let at = rng.below(out.len() + 1);
        match rng.below(7) {
            0 if !out.is_empty() => {
                let i = at.min(out.len() - 1);
                out[i] ^= 1 << rng.below(8);
            }
            1 => out.truncate(at),
            2 => out.insert(at, INTERESTING[rng.below(INTERESTING.len())]),
            3 if at < out.len() => {
                out.remove(at);
            }
            4 if !out.is_empty() => {
                let i = at.min(out.len() - 1);
                out[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            5 => {
                // Splice: the head of this input, the tail of another.
                let from = rng.below(other.len() + 1);
                out.truncate(at);
                out.extend_from_slice(&other[from..]);
            }
            _ => {
                // Repeat a slice (length fields and nesting run past their end).
                let start = rng.below(out.len() + 1);
                let end = (start + rng.below(32)).min(out.len());
                let piece = out[start..end].to_vec();
                for _ in 0..=rng.below(8) {
                    out.splice(at.min(out.len())..at.min(out.len()), piece.iter().copied());
                }
            }
        }
    }
    out
}

#[test]
fn every_fuzz_target_survives_its_seeds_and_their_mutations() {
    let write_to = std::env::var_os("AGENTD_FUZZ_WRITE_CORPUS").map(std::path::PathBuf::from);
    let mut ran: Vec<(&str, usize, usize)> = Vec::new();
    for (name, body) in bodies::TARGETS {
        let seeds = seeds(name);
        assert!(!seeds.is_empty(), "{name}: no seeds");
        if let Some(dir) = &write_to {
            let dir = dir.join(name);
            std::fs::create_dir_all(&dir).unwrap();
            for (i, seed) in seeds.iter().enumerate() {
                std::fs::write(dir.join(format!("seed-{i}")), seed).unwrap();
            }
        }
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ name.len() as u64);
        let (mut accepted, mut refused) = (0usize, 0usize);
        for (i, seed) in seeds.iter().enumerate() {
            assert!(body(seed), "{name}: seed {i} is refused: {seed:02x?}");
            for round in 0..rounds() {
                let other = &seeds[round % seeds.len()];
                let input = mutate(&mut rng, seed, other);
                match std::panic::catch_unwind(|| body(&input)) {
                    Ok(true) => accepted += 1,
                    Ok(false) => refused += 1,
                    Err(_) => {
                        panic!("fuzz target {name} panicked on {input:02x?} (mutation {round})")
                    }
                }
            }
        }
        // Mutations that all pass or all fail would exercise one path only.
        assert!(
            refused > 0 || rounds() == 0,
            "{name}: no mutation was refused ({accepted} accepted)"
        );
        ran.push((*name, accepted, refused));
    }
    assert_eq!(ran.len(), 6, "{ran:?}");
    println!("(target, accepted mutations, refused mutations): {ran:?}");
}
