//! (a) the CA on one thread, beside raw ECDSA.

use std::path::Path;
use std::time::{Duration, Instant};

use agentd::ca::{CaConfig, CertificateAuthority, X509SvidParams};
use agentd::clock::SystemClock;
use agentd::keys::PrivateKey;
use anyhow::{anyhow, bail};
use ring::rand::SystemRandom;
use ring::signature::{
    EcdsaKeyPair, KeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_ASN1,
    ECDSA_P256_SHA256_ASN1_SIGNING,
};
use spiffe::{SpiffeId, TrustDomain};

use crate::output::{per_sec, row};
use crate::{ROUNDS, RUN, TRUST_DOMAIN, WARMUP};

/// Distinct pre-generated CSRs, cycled through by (a).
const CSR_POOL: usize = 256;

// Target (docs/PERFORMANCE.md).
const TARGET_MINT_RATIO: f64 = 0.7;

/// Measures (a) and prints its rows.
pub fn run(dir: &Path) -> anyhow::Result<CaFigures> {
    let a = bench_ca(dir)?;
    print_ca(&a);
    Ok(a)
}

#[derive(Debug)]
pub struct CaFigures {
    sign: f64,
    verify: f64,
    pub mint: f64,
}

impl CaFigures {
    /// Sign-then-verify pairs per second: the least a mint costs (it checks the CSR
    /// signature and signs the certificate).
    fn combined(&self) -> f64 {
        1.0 / (1.0 / self.sign + 1.0 / self.verify)
    }

    fn ratio(&self) -> f64 {
        self.mint / self.combined()
    }
}

/// Measures several operations fairly on a noisy machine: each is warmed up for `WARMUP`,
/// then they take turns in `ROUNDS` slices until each has run for `RUN` in total, so that
/// a slow or fast spell of the machine touches all of them alike. Returns calls per second
/// of each.
fn interleaved_rates(
    ops: &mut [&mut dyn FnMut() -> anyhow::Result<()>],
) -> anyhow::Result<Vec<f64>> {
    for op in ops.iter_mut() {
        let warm_end = Instant::now() + WARMUP;
        while Instant::now() < warm_end {
            op()?;
        }
    }
    let slice = RUN / ROUNDS;
    let mut counts = vec![0u64; ops.len()];
    let mut times = vec![Duration::ZERO; ops.len()];
    for _ in 0..ROUNDS {
        for (k, op) in ops.iter_mut().enumerate() {
            let start = Instant::now();
            loop {
                op()?;
                counts[k] += 1;
                let elapsed = start.elapsed();
                if elapsed >= slice {
                    times[k] += elapsed;
                    break;
                }
            }
        }
    }
    Ok(counts
        .iter()
        .zip(&times)
        .map(|(n, t)| *n as f64 / t.as_secs_f64())
        .collect())
}

pub fn csrs(n: usize) -> anyhow::Result<Vec<Vec<u8>>> {
    (0..n)
        .map(|_| Ok(PrivateKey::generate()?.csr_der()?))
        .collect()
}

fn bench_ca(dir: &Path) -> anyhow::Result<CaFigures> {
    let trust_domain = TrustDomain::new(TRUST_DOMAIN)?;
    let ca = CertificateAuthority::load_or_create(
        &CaConfig {
            trust_domain,
            key_dir: dir.join("ca-keys"),
            ca_ttl: Duration::from_secs(24 * 3600),
            upstream: None,
            organization: "agentd".into(),
        },
        &SystemClock,
    )?;
    let pool = csrs(CSR_POOL)?;
    let spiffe_id = SpiffeId::new("spiffe://example.org/bench/mint")?;
    let now = std::time::SystemTime::now();
    let sign_one = |csr: &[u8]| {
        ca.sign_x509_svid(
            &X509SvidParams {
                csr_der: csr,
                spiffe_id: &spiffe_id,
                ttl: Duration::from_secs(3600),
                dns_names: &[],
                extensions: &[],
            },
            now,
        )
    };

    // Raw ECDSA over a message the size of a real SVID certificate.
    let sample = sign_one(&pool[0])?;
    let msg = sample.cert_chain[0].clone();
    let rng = SystemRandom::new();
    let key_pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
        .map_err(|_| anyhow!("generating a P-256 key"))?;
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, key_pkcs8.as_ref(), &rng)
        .map_err(|e| anyhow!("loading the P-256 key: {e}"))?;
    let public =
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key.public_key().as_ref().to_vec());
    let signature = key
        .sign(&rng, &msg)
        .map_err(|_| anyhow!("ECDSA signing failed"))?;

    let mut sign = || {
        let sig = key
            .sign(&rng, std::hint::black_box(&msg))
            .map_err(|_| anyhow!("ECDSA signing failed"))?;
        std::hint::black_box(sig);
        Ok(())
    };
    let mut verify = || {
        public
            .verify(std::hint::black_box(&msg), signature.as_ref())
            .map_err(|_| anyhow!("ECDSA verification failed"))
    };
    let mut i = 0usize;
    let mut mint = || {
        let svid = sign_one(std::hint::black_box(&pool[i % pool.len()]))?;
        std::hint::black_box(svid);
        i += 1;
        Ok(())
    };
    let rates = interleaved_rates(&mut [&mut sign, &mut verify, &mut mint])?;
    let [sign, verify, mint] = rates[..] else {
        bail!("three rates expected");
    };
    Ok(CaFigures { sign, verify, mint })
}

fn print_ca(a: &CaFigures) {
    row(
        "(a) ring ECDSA P-256 sign",
        per_sec(a.sign, "ops"),
        "",
        None,
    );
    row(
        "(a) ring ECDSA P-256 verify",
        per_sec(a.verify, "ops"),
        "",
        None,
    );
    row(
        "(a) sign+verify pairs, 1/(1/sign + 1/verify)",
        per_sec(a.combined(), "ops"),
        "",
        None,
    );
    row(
        "(a) CA mint: CSR in, sign_x509_svid, cert out",
        per_sec(a.mint, "SVIDs"),
        "",
        None,
    );
    row(
        "(a) ratio mint / sign+verify pairs",
        format!("{:.2}", a.ratio()),
        &format!(">= {TARGET_MINT_RATIO:.1}"),
        Some(a.ratio() >= TARGET_MINT_RATIO),
    );
}
