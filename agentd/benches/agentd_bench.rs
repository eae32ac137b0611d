//! `make bench` (`cargo bench -p agentd --bench agentd_bench`): the figures of
//! docs/PERFORMANCE.md, printed as one table.
//!
//! - (a) X.509-SVIDs minted per second by the CA on one thread (CSR in, signed certificate
//!   out), beside ring's raw ECDSA P-256 sign and verify rates measured in the same run.
//! - (b) X.509-SVIDs per second through the node API (mTLS on loopback, `MintX509Svids`
//!   with batches of 100 CSRs, one batch in flight), against an in-process server.
//! - (c) FetchX509SVID latency (time to the first stream message) with 100 concurrent
//!   Workload API clients on a warm cache, against a real `agentd node run` child process.
//! - (d) The resident memory of that node agent process once it holds 100 SVIDs and serves
//!   100 open FetchX509SVID streams.
//!
//! - (e) Revocation latency: time from an `agentd revoke` (the admin `Revoke` call)
//!   returning to the workload's FetchX509SVID stream sending the update, over 100
//!   revocations, with 1 node agent; then again with 200 simulated node agents also
//!   subscribed to the revocation feed (the load harness `FeedLoad` below).
//!
//! Temp dirs are removed and the child process is killed on every exit path (Drop guards).
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentd::ca::{CaConfig, CertificateAuthority, X509SvidRequest};
use agentd::clock::SystemClock;
use agentd::keys::PrivateKey;
use agentd::node::client::{attest_with_join_token, ServerLink};
use agentd::server::{RawServerConfig, Server, ServerConfig};
use agentd_proto::admin as apb;
use agentd_proto::admin::admin_client::AdminClient;
use agentd_proto::node as npb;
use agentd_proto::node::node_client::NodeClient;
use agentd_proto::workload as wpb;
use agentd_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use anyhow::{anyhow, bail, Context};
use ring::rand::SystemRandom;
use ring::signature::{
    EcdsaKeyPair, KeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_ASN1,
    ECDSA_P256_SHA256_ASN1_SIGNING,
};
use spiffe::{SpiffeId, TrustDomain};
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Every rate is measured for `RUN` after `WARMUP`.
const WARMUP: Duration = Duration::from_millis(500);
const RUN: Duration = Duration::from_secs(2);
/// Slices the (a) measurements are interleaved in.
const ROUNDS: u32 = 20;
/// Distinct pre-generated CSRs, cycled through by (a).
const CSR_POOL: usize = 256;
/// CSRs per `MintX509Svids` call in (b) (the node agent's own batch size).
const MINT_BATCH: usize = 100;
/// Concurrent Workload API clients in (c) and (d).
const CLIENTS: usize = 100;
/// FetchX509SVID calls per client in (c): warm-up, then timed samples.
const WARMUP_CALLS: usize = 5;
const SAMPLES_PER_CLIENT: usize = 200;
/// Samples of the single-client baseline in (c).
const SAMPLES_ONE_CLIENT: usize = 500;
/// Entries (hence SVIDs) the node agent holds in (d).
const NODE_ENTRIES: usize = 100;

const TRUST_DOMAIN: &str = "example.org";
const MINT_NODE_ID: &str = "spiffe://example.org/node/bench-mint";
const LATENCY_NODE: &str = "bench-latency";
const RSS_NODE: &str = "bench-rss";
const REVOCATION_NODE: &str = "bench-revocation";
/// Revocations timed in (e), and the simulated node agents of its loaded run.
const REVOCATIONS: usize = 100;
const FEED_SUBSCRIBERS: usize = 200;
const TARGET_REVOCATION_P99_MS: f64 = 250.0;

// Targets (docs/PERFORMANCE.md).
const TARGET_MINT_RATIO: f64 = 0.7;
const TARGET_P99_MS: f64 = 5.0;
const TARGET_RSS_MB: f64 = 30.0;

fn main() -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("agentd-bench-")
        .tempdir()
        .context("creating a temp dir")?;
    print_header();

    let a = bench_ca(dir.path())?;
    print_ca(&a);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    rt.block_on(run_online(dir.path(), &a))?;
    drop(rt);
    dir.close().context("removing the temp dir")?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Output

fn print_header() {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let date = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "unknown".into());
    println!("agentd benchmarks (cargo bench -p agentd --bench agentd_bench)");
    println!("machine : {model}, {cpus} CPUs (nproc)");
    println!("date    : {date}");
    println!(
        "rates   : {:.1} s warm-up, then {:.1} s measured ((a): interleaved in {ROUNDS} slices)",
        WARMUP.as_secs_f64(),
        RUN.as_secs_f64()
    );
    println!();
    println!("{:<58} {:>16}  {:<10} met", "figure", "measured", "target");
    println!("{}", "-".repeat(92));
}

fn row(figure: &str, measured: String, target: &str, met: Option<bool>) {
    let met = match met {
        Some(true) => "yes",
        Some(false) => "NO",
        None => "",
    };
    println!("{figure:<58} {measured:>16}  {target:<10} {met}");
}

fn per_sec(rate: f64, unit: &str) -> String {
    format!("{rate:.0} {unit}/s")
}

// ---------------------------------------------------------------------------------------
// (a) the CA on one thread, beside raw ECDSA

#[derive(Debug)]
struct CaFigures {
    sign: f64,
    verify: f64,
    mint: f64,
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

fn csrs(n: usize) -> anyhow::Result<Vec<Vec<u8>>> {
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
            &X509SvidRequest {
                csr_der: csr,
                spiffe_id: &spiffe_id,
                ttl: Duration::from_secs(3600),
                dns_names: &[],
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

// ---------------------------------------------------------------------------------------
// The server in-process, the node agent as a child process

/// Kills and reaps the child process when dropped, whatever the exit path.
#[derive(Debug)]
struct ChildGuard {
    child: Child,
    log: PathBuf,
}

impl ChildGuard {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails (with the end of its log) if the process has exited.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "the node agent exited ({status}); its log ends with:\n{}",
                tail.join("\n")
            );
        }
        Ok(())
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The in-process server; cancelled when dropped.
#[derive(Debug)]
struct ServerGuard {
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<(), agentd::server::ServerError>>>,
}

impl ServerGuard {
    async fn shutdown(mut self) -> anyhow::Result<()> {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            task.await??;
        }
        Ok(())
    }
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A gRPC channel over a Unix socket.
async fn unix_channel(path: &Path) -> anyhow::Result<Channel> {
    Ok(agentd::net::unix_channel(path).await?)
}

async fn start_server(dir: &Path) -> anyhow::Result<(ServerGuard, AdminClient<Channel>)> {
    let admin_socket = dir.join("admin").join("admin.sock");
    let config = ServerConfig::try_from(RawServerConfig {
        trust_domain: Some(TRUST_DOMAIN.into()),
        data_dir: Some(dir.join("server")),
        bind_address: Some("127.0.0.1:0".into()),
        admin_socket: Some(admin_socket.clone()),
        ..Default::default()
    })?;
    let stop = CancellationToken::new();
    let mut guard = ServerGuard {
        stop: stop.clone(),
        task: Some(tokio::spawn(
            Server::new(config, Arc::new(SystemClock)).run(stop),
        )),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if guard.task.as_ref().is_some_and(|t| t.is_finished()) {
            if let Some(task) = guard.task.take() {
                task.await??;
            }
            bail!("the server stopped before it was ready");
        }
        if admin_socket.exists() {
            if let Ok(ch) = unix_channel(&admin_socket).await {
                let mut admin = AdminClient::new(ch);
                if admin
                    .get_server_info(apb::GetServerInfoRequest {})
                    .await
                    .is_ok()
                {
                    return Ok((guard, admin));
                }
            }
        }
        if Instant::now() > deadline {
            bail!("the server did not answer on its admin socket within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn create_entries(
    admin: &mut AdminClient<Channel>,
    parent_id: &str,
    prefix: &str,
    range: std::ops::Range<usize>,
    selector: &str,
) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::with_capacity(range.len());
    for i in range {
        let entry = admin
            .create_entry(apb::EntrySpec {
                spiffe_id: format!("spiffe://{TRUST_DOMAIN}/{prefix}/{i}"),
                parent_id: parent_id.into(),
                selectors: vec![selector.into()],
                ..Default::default()
            })
            .await
            .map_err(|s| anyhow!("creating an entry: {}", s.message()))?
            .into_inner();
        ids.push(entry.id);
    }
    Ok(ids)
}

async fn join_token(admin: &mut AdminClient<Channel>, spiffe_id: &str) -> anyhow::Result<String> {
    Ok(admin
        .create_join_token(apb::CreateJoinTokenRequest {
            spiffe_id: spiffe_id.into(),
            ttl_seconds: 0,
        })
        .await
        .map_err(|s| anyhow!("creating a join token: {}", s.message()))?
        .into_inner()
        .token)
}

async fn run_online(dir: &Path, a: &CaFigures) -> anyhow::Result<()> {
    let (server, mut admin) = start_server(dir).await?;
    let info = admin
        .get_server_info(apb::GetServerInfoRequest {})
        .await?
        .into_inner();
    let bundle = admin
        .get_bundle(apb::GetBundleRequest {})
        .await?
        .into_inner();
    let address = info.node_api_address;

    let mint = bench_node_api(&mut admin, &address, &bundle.x509_authorities).await?;
    row(
        "(b) node API MintX509Svids, batch 100, mTLS loopback",
        per_sec(mint, "SVIDs"),
        "",
        None,
    );
    row(
        "(b) ratio node API / CA mint (a)",
        format!("{:.2}", mint / a.mint),
        "",
        None,
    );

    let bundle_file = dir.join("bundle.pem");
    std::fs::write(&bundle_file, &bundle.pem)?;
    let uid = agentd::net::own_uid();
    let selector = format!("unix:uid:{uid}");
    let env = NodeEnv {
        dir,
        address: &address,
        bundle_file: &bundle_file,
    };

    // (c): a node agent serving one entry that matches this process.
    let (mut node, socket) = env.start_node(&mut admin, LATENCY_NODE).await?;
    let parent = format!("spiffe://{TRUST_DOMAIN}/node/{LATENCY_NODE}");
    create_entries(&mut admin, &parent, "bench/latency", 0..1, &selector).await?;
    wait_for_svids(&mut node, &socket, 1).await?;
    let one = bench_fetch_latency(&socket, 1, SAMPLES_ONE_CLIENT).await?;
    let lat = bench_fetch_latency(&socket, CLIENTS, SAMPLES_PER_CLIENT).await?;
    node.check_alive()?;
    drop(node);
    row(
        "(c) FetchX509SVID to first message, 1 client: p50",
        format!("{:.2} ms", one.p50),
        "",
        None,
    );
    row(
        "(c) FetchX509SVID, 1 client: p99",
        format!("{:.2} ms", one.p99),
        "",
        None,
    );
    row(
        "(c) FetchX509SVID, 100 concurrent clients: p50",
        format!("{:.2} ms", lat.p50),
        "",
        None,
    );
    row(
        "(c) FetchX509SVID, 100 concurrent clients: p99",
        format!("{:.2} ms", lat.p99),
        &format!("<= {TARGET_P99_MS:.0} ms"),
        Some(lat.p99 <= TARGET_P99_MS),
    );
    row(
        &format!("(c) FetchX509SVID, 100 clients: max of {}", lat.samples),
        format!("{:.2} ms", lat.max),
        "",
        None,
    );
    row(
        "(c) FetchX509SVID, 100 clients: calls completed",
        per_sec(lat.throughput, "calls"),
        "",
        None,
    );

    // (d): a fresh node agent serving 100 workloads. As root (as in CI), the workloads are
    // 100 real processes (`agentd api watch`), each under its own uid with its own entry, so
    // each holds one open stream with its own SVID, as 100 agent runtimes on a host would.
    // Otherwise, one process opens 100 streams that all match every entry (a worst case).
    let (mut node, socket) = env.start_node(&mut admin, RSS_NODE).await?;
    let parent = format!("spiffe://{TRUST_DOMAIN}/node/{RSS_NODE}");
    let distinct = is_root();
    let (serving, idle, label) = if distinct {
        let ready = Instant::now() + Duration::from_secs(20);
        while !socket.exists() && Instant::now() < ready {
            node.check_alive()?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let idle = proc_status(&mut node)?;
        let serving = node_rss_distinct_workloads(&mut node, &socket, &mut admin, &parent).await?;
        (serving, idle, "100 workload processes, 1 SVID each")
    } else {
        create_entries(&mut admin, &parent, "bench/rss", 0..NODE_ENTRIES, &selector).await?;
        wait_for_svids(&mut node, &socket, NODE_ENTRIES).await?;
        let idle = proc_status(&mut node)?;
        let (serving, _) = node_rss(&mut node, &socket).await?;
        (serving, idle, "1 process, 100 streams x 100 SVIDs")
    };
    drop(node);
    row(
        &format!("(d) node agent VmRSS serving 100 workloads ({label})"),
        format!("{:.1} MB", serving.rss_mb),
        &format!("<= {TARGET_RSS_MB:.0} MB"),
        Some(serving.rss_mb <= TARGET_RSS_MB),
    );
    row(
        "(d) node agent VmHWM (peak RSS) at that point",
        format!("{:.1} MB", serving.hwm_mb),
        "",
        None,
    );
    row(
        "(d) node agent threads at that point",
        serving.threads.to_string(),
        "",
        None,
    );
    row(
        "(d) node agent VmRSS before the workloads connect",
        format!("{:.1} MB", idle.rss_mb),
        "",
        None,
    );
    // (e): revocation latency, alone and with 200 more feed subscribers.
    let (mut node, socket) = env.start_node(&mut admin, REVOCATION_NODE).await?;
    let parent = format!("spiffe://{TRUST_DOMAIN}/node/{REVOCATION_NODE}");
    let alone = bench_revocation(&mut node, &socket, &mut admin, &parent, "bench/revoke-a").await?;
    let load = FeedLoad::start(
        &mut admin,
        &address,
        &bundle.x509_authorities,
        FEED_SUBSCRIBERS,
    )
    .await?;
    let loaded =
        bench_revocation(&mut node, &socket, &mut admin, &parent, "bench/revoke-b").await?;
    let delivered = load.stop().await?;
    node.check_alive()?;
    drop(node);
    for (label, (l, whole50, whole99)) in
        [("1 node agent", &alone), ("+200 feed subscribers", &loaded)]
    {
        row(
            &format!("(e) revoke -> stream update, {label}: p50"),
            format!("{:.1} ms", l.p50),
            "",
            None,
        );
        let target = format!("<= {TARGET_REVOCATION_P99_MS:.0} ms");
        let (target, met) = if label.starts_with('+') {
            (target.as_str(), Some(l.p99 <= TARGET_REVOCATION_P99_MS))
        } else {
            ("", None)
        };
        row(
            &format!("(e) revoke -> stream update, {label}: p99"),
            format!("{:.1} ms", l.p99),
            target,
            met,
        );
        row(
            &format!("(e) revoke call start -> update (commit incl.), {label}: p50"),
            format!("{whole50:.1} ms"),
            "",
            None,
        );
        row(
            &format!("(e) revoke call start -> update (commit incl.), {label}: p99"),
            format!("{whole99:.1} ms"),
            "",
            None,
        );
    }
    row(
        "(e) events delivered to the 200 simulated node agents",
        delivered.to_string(),
        &format!("= {}", FEED_SUBSCRIBERS * REVOCATIONS),
        Some(delivered == (FEED_SUBSCRIBERS * REVOCATIONS) as u64),
    );

    println!();
    println!("MB = 10^6 bytes. (b) has one batch in flight. (c) and (d) each run a fresh");
    println!("`agentd node run` process on the same machine as the clients and the in-process");
    println!(
        "server; (c) clients are closed-loop (each sends its next call when the last returns)."
    );

    server.shutdown().await
}

/// What starting a node agent child process needs.
#[derive(Debug)]
struct NodeEnv<'a> {
    dir: &'a Path,
    address: &'a str,
    bundle_file: &'a Path,
}

impl NodeEnv<'_> {
    /// Starts `agentd node run` (release binary) attesting as `spiffe://<td>/node/<name>`;
    /// returns it and its Workload API socket.
    async fn start_node(
        &self,
        admin: &mut AdminClient<Channel>,
        name: &str,
    ) -> anyhow::Result<(ChildGuard, PathBuf)> {
        let token = join_token(admin, &format!("spiffe://{TRUST_DOMAIN}/node/{name}")).await?;
        let node_dir = self.dir.join(name);
        std::fs::create_dir_all(&node_dir)?;
        let log = node_dir.join("node.log");
        let socket = node_dir.join("api.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_agentd"))
            .args(["node", "run", "--server-address", self.address])
            .args(["--join-token", &token])
            .arg("--trust-bundle")
            .arg(self.bundle_file)
            .arg("--data-dir")
            .arg(node_dir.join("data"))
            .arg("--socket-path")
            .arg(&socket)
            .args(["--sync-interval", "1s"])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting `agentd node run`")?;
        Ok((ChildGuard { child, log }, socket))
    }
}

// ---------------------------------------------------------------------------------------
// (b) the node API

async fn bench_node_api(
    admin: &mut AdminClient<Channel>,
    address: &str,
    roots: &[Vec<u8>],
) -> anyhow::Result<f64> {
    let token = join_token(admin, MINT_NODE_ID).await?;
    let trust_domain = TrustDomain::new(TRUST_DOMAIN)?;
    let identity = attest_with_join_token(address, Some(roots), Some(&trust_domain), &token)
        .await
        .context("attesting the bench node")?;
    let entries = create_entries(
        admin,
        MINT_NODE_ID,
        "bench/mint",
        0..MINT_BATCH,
        "unix:uid:0",
    )
    .await?;
    let request = npb::MintX509SvidsRequest {
        params: entries
            .into_iter()
            .zip(csrs(MINT_BATCH)?)
            .map(|(entry_id, csr)| npb::X509SvidParams {
                entry_id,
                csr,
                grant_id: String::new(),
            })
            .collect(),
    };
    let link = ServerLink::new(address.to_string(), identity);
    let mut client = link.client().await?;

    let warm_end = Instant::now() + WARMUP;
    while Instant::now() < warm_end {
        mint_batch(&mut client, &request).await?;
    }
    let start = Instant::now();
    let mut batches = 0u64;
    loop {
        mint_batch(&mut client, &request).await?;
        batches += 1;
        let elapsed = start.elapsed();
        if elapsed >= RUN {
            return Ok((batches * MINT_BATCH as u64) as f64 / elapsed.as_secs_f64());
        }
    }
}

/// One `MintX509Svids` call; every CSR must come back signed.
async fn mint_batch(
    client: &mut NodeClient<Channel>,
    request: &npb::MintX509SvidsRequest,
) -> anyhow::Result<()> {
    let results = client
        .mint_x509_svids(request.clone())
        .await
        .map_err(|s| anyhow!("MintX509Svids: {}", s.message()))?
        .into_inner()
        .results;
    if results.len() != request.params.len() {
        bail!(
            "MintX509Svids: {} results for {} CSRs",
            results.len(),
            request.params.len()
        );
    }
    for r in results {
        match r.result {
            Some(npb::mint_result::Result::Svid(_)) => {}
            Some(npb::mint_result::Result::Error(e)) => bail!("MintX509Svids refused: {e}"),
            None => bail!("MintX509Svids: empty result"),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// (c) and (d): the Workload API of a real node agent

type HeaderFn = fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>;
type WorkloadClient = SpiffeWorkloadApiClient<InterceptedService<Channel, HeaderFn>>;

fn add_header(mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    req.metadata_mut().insert(
        agentd_proto::WORKLOAD_HEADER,
        tonic::metadata::MetadataValue::from_static("true"),
    );
    Ok(req)
}

/// A client on its own connection, as each workload has.
async fn workload_client(socket: &Path) -> anyhow::Result<WorkloadClient> {
    Ok(SpiffeWorkloadApiClient::with_interceptor(
        unix_channel(socket).await?,
        add_header as HeaderFn,
    ))
}

/// Opens a FetchX509SVID stream and reads its first message.
async fn fetch_x509(
    client: &mut WorkloadClient,
) -> anyhow::Result<(
    wpb::X509svidResponse,
    tonic::Streaming<wpb::X509svidResponse>,
)> {
    let mut stream = client
        .fetch_x509svid(wpb::X509svidRequest {})
        .await
        .map_err(|s| anyhow!("FetchX509SVID: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    let first = stream
        .message()
        .await
        .map_err(|s| anyhow!("FetchX509SVID stream: {:?}: {}", s.code(), s.message()))?
        .ok_or_else(|| anyhow!("FetchX509SVID: the stream ended without a message"))?;
    Ok((first, stream))
}

/// Waits until the node agent serves `n` SVIDs to this process.
async fn wait_for_svids(node: &mut ChildGuard, socket: &Path, n: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = String::from("the socket is not there yet");
    loop {
        node.check_alive()?;
        if socket.exists() {
            match workload_client(socket).await {
                Ok(mut client) => match fetch_x509(&mut client).await {
                    Ok((msg, _)) if msg.svids.len() >= n => return Ok(()),
                    Ok((msg, _)) => last = format!("{} of {n} SVIDs served", msg.svids.len()),
                    Err(e) => last = e.to_string(),
                },
                Err(e) => last = e.to_string(),
            }
        }
        if Instant::now() > deadline {
            bail!("the node agent did not serve {n} SVIDs within 30 s: {last}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[derive(Debug)]
struct Latency {
    samples: usize,
    /// Calls completed per second over the timed phase.
    throughput: f64,
    p50: f64,
    p99: f64,
    max: f64,
}

/// Nearest-rank percentile of sorted milliseconds.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// `clients` concurrent clients, each on its own connection, each timing `samples` calls
/// after a warm-up; all start timing together.
async fn bench_fetch_latency(
    socket: &Path,
    clients: usize,
    samples: usize,
) -> anyhow::Result<Latency> {
    let start = Arc::new(tokio::sync::Barrier::new(clients + 1));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let socket = socket.to_path_buf();
        let start = start.clone();
        tasks.spawn(async move {
            let mut client = workload_client(&socket).await?;
            for _ in 0..WARMUP_CALLS {
                fetch_x509(&mut client).await?;
            }
            start.wait().await;
            let mut times = Vec::with_capacity(samples);
            for _ in 0..samples {
                let t = Instant::now();
                let (msg, stream) = fetch_x509(&mut client).await?;
                times.push(t.elapsed().as_secs_f64() * 1e3);
                if msg.svids.is_empty() {
                    bail!("FetchX509SVID: no SVID in the first message");
                }
                drop(stream);
            }
            Ok::<_, anyhow::Error>(times)
        });
    }
    start.wait().await;
    let began = Instant::now();
    let mut all = Vec::with_capacity(clients * samples);
    while let Some(r) = tasks.join_next().await {
        all.extend(r??);
    }
    let wall = began.elapsed();
    all.sort_by(f64::total_cmp);
    Ok(Latency {
        samples: all.len(),
        throughput: all.len() as f64 / wall.as_secs_f64(),
        p50: percentile(&all, 0.50),
        p99: percentile(&all, 0.99),
        max: all.last().copied().unwrap_or(f64::NAN),
    })
}

#[derive(Debug)]
struct ProcStatus {
    rss_mb: f64,
    hwm_mb: f64,
    threads: u64,
}

/// VmRSS, VmHWM and Threads of the (live) child process.
fn proc_status(node: &mut ChildGuard) -> anyhow::Result<ProcStatus> {
    node.check_alive()?;
    let status = std::fs::read_to_string(format!("/proc/{}/status", node.pid()))?;
    Ok(ProcStatus {
        rss_mb: status_mb(&status, "VmRSS")?,
        hwm_mb: status_mb(&status, "VmHWM")?,
        threads: status_field(&status, "Threads")?.parse()?,
    })
}

fn status_field<'a>(status: &'a str, field: &str) -> anyhow::Result<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(str::trim)
        .ok_or_else(|| anyhow!("no {field} in /proc/<pid>/status"))
}

/// A `kB` field of /proc/<pid>/status, in MB (10^6 bytes).
fn status_mb(status: &str, field: &str) -> anyhow::Result<f64> {
    let kb: f64 = status_field(status, field)?
        .strip_suffix("kB")
        .ok_or_else(|| anyhow!("{field} is not in kB"))?
        .trim()
        .parse()?;
    Ok(kb * 1024.0 / 1e6)
}

/// Opens `CLIENTS` FetchX509SVID streams (each on its own connection, each first message
/// carrying all `NODE_ENTRIES` SVIDs), keeps them open and reads the node agent's RSS.
/// Also returns the encoded size of the first stream message.
/// Whether the bench runs as root (and so can start workloads under other uids).
fn is_root() -> bool {
    agentd::net::own_uid() == 0
}

/// First uid of the simulated workloads; chosen far from real accounts.
const WORKLOAD_UID_BASE: u32 = 61_000;

/// Registers 100 entries, one per uid, starts 100 `agentd api watch` processes under those
/// uids, waits until each has received its SVID, and reads the node agent's memory.
async fn node_rss_distinct_workloads(
    node: &mut ChildGuard,
    socket: &Path,
    admin: &mut AdminClient<Channel>,
    parent: &str,
) -> anyhow::Result<ProcStatus> {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    // The workloads run as other users: they must be able to reach the socket.
    let mut dir = socket.parent();
    while let Some(d) = dir {
        if d == Path::new("/tmp") || d == Path::new("/") {
            break;
        }
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
        dir = d.parent();
    }
    for i in 0..NODE_ENTRIES {
        let uid = WORKLOAD_UID_BASE + i as u32;
        create_entries(
            admin,
            parent,
            &format!("bench/rss/{i}"),
            0..1,
            &format!("unix:uid:{uid}"),
        )
        .await?;
    }
    let out_dir = socket
        .parent()
        .unwrap_or(Path::new("/tmp"))
        .join("workloads");
    std::fs::create_dir_all(&out_dir)?;
    std::fs::set_permissions(&out_dir, std::fs::Permissions::from_mode(0o777))?;
    let spawn = |i: usize| -> anyhow::Result<ChildGuard> {
        let uid = WORKLOAD_UID_BASE + i as u32;
        let out = out_dir.join(format!("w{i}.out"));
        let child = Command::new(env!("CARGO_BIN_EXE_agentd"))
            .args(["api", "watch", "--output", "json", "--socket-path"])
            .arg(socket)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out)?)
            .stderr(Stdio::null())
            .uid(uid)
            .gid(uid)
            .spawn()
            .context("starting a workload process")?;
        Ok(ChildGuard { child, log: out })
    };
    let mut workloads: Vec<ChildGuard> = (0..NODE_ENTRIES).map(spawn).collect::<Result<_, _>>()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        node.check_alive()?;
        let mut served = 0;
        for (i, w) in workloads.iter_mut().enumerate() {
            if std::fs::metadata(&w.log).is_ok_and(|m| m.len() > 0) {
                served += 1;
            } else if w.child.try_wait()?.is_some() {
                // Its entry was not synced yet (no identity): start it again.
                *w = spawn(i)?;
            }
        }
        if served == NODE_ENTRIES {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {served} of {NODE_ENTRIES} workloads received an SVID within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Let allocations settle after the burst.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let status = proc_status(node)?;
    drop(workloads);
    Ok(status)
}

async fn node_rss(node: &mut ChildGuard, socket: &Path) -> anyhow::Result<(ProcStatus, usize)> {
    let mut open = Vec::with_capacity(CLIENTS);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CLIENTS {
        let socket = socket.to_path_buf();
        tasks.spawn(async move {
            let mut client = workload_client(&socket).await?;
            let (msg, stream) = fetch_x509(&mut client).await?;
            if msg.svids.len() != NODE_ENTRIES {
                bail!(
                    "{} SVIDs in a stream, expected {NODE_ENTRIES}",
                    msg.svids.len()
                );
            }
            Ok::<_, anyhow::Error>((client, stream, prost::Message::encoded_len(&msg)))
        });
    }
    let mut message_bytes = 0;
    while let Some(r) = tasks.join_next().await {
        let (client, stream, len) = r??;
        message_bytes = message_bytes.max(len);
        open.push((client, stream));
    }
    // Let allocations settle after the burst.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let status = proc_status(node)?;
    drop(open);
    Ok((status, message_bytes))
}

// ---------------------------------------------------------------------------------------
// (e) revocation latency

/// One workload stream holding `REVOCATIONS` SVIDs (one entry each); each entry is revoked
/// in turn, and the time from the `Revoke` call returning to the stream's next snapshot
/// (one SVID fewer) is recorded. The update can reach the stream before the admin call's
/// answer reaches this process; such a sample counts as 0.
async fn bench_revocation(
    node: &mut ChildGuard,
    socket: &Path,
    admin: &mut AdminClient<Channel>,
    parent: &str,
    prefix: &str,
) -> anyhow::Result<(Latency, f64, f64)> {
    let selector = format!("unix:uid:{}", agentd::net::own_uid());
    let entries = create_entries(admin, parent, prefix, 0..REVOCATIONS, &selector).await?;
    // Earlier runs' entries are revoked, so this process holds exactly these SVIDs.
    wait_for_svids(node, socket, REVOCATIONS).await?;
    let mut client = workload_client(socket).await?;
    let (first, mut stream) = fetch_x509(&mut client).await?;
    if first.svids.len() != REVOCATIONS {
        bail!(
            "(e) expected {REVOCATIONS} SVIDs, got {}",
            first.svids.len()
        );
    }
    // Arrival times of stream messages (or of the stream's end), by SVID count.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Instant)>();
    let reader = tokio::spawn(async move {
        loop {
            match stream.message().await {
                Ok(Some(msg)) => {
                    if tx.send((msg.svids.len(), Instant::now())).is_err() {
                        return;
                    }
                }
                // The last revocation leaves nothing: PermissionDenied ends the stream.
                _ => {
                    let _ = tx.send((0, Instant::now()));
                    return;
                }
            }
        }
    });
    let mut samples = Vec::with_capacity(REVOCATIONS);
    let mut whole = Vec::with_capacity(REVOCATIONS);
    let start = Instant::now();
    for (i, id) in entries.iter().enumerate() {
        let called = Instant::now();
        admin
            .revoke(apb::RevokeRequest {
                handle: Some(agentd_proto::revocation::RevocationHandle {
                    kind: "entry".into(),
                    id: id.clone(),
                }),
                reason: "bench".into(),
            })
            .await
            .map_err(|s| anyhow!("Revoke: {}", s.message()))?;
        let returned = Instant::now();
        let want = REVOCATIONS - i - 1;
        loop {
            let (count, at) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .map_err(|_| anyhow!("(e) no stream update within 10 s of revocation {i}"))?
                .ok_or_else(|| anyhow!("(e) the stream reader stopped"))?;
            if count == want {
                samples.push(at.saturating_duration_since(returned).as_secs_f64() * 1e3);
                whole.push(at.saturating_duration_since(called).as_secs_f64() * 1e3);
                break;
            }
        }
    }
    let elapsed = start.elapsed();
    reader.abort();
    samples.sort_by(f64::total_cmp);
    whole.sort_by(f64::total_cmp);
    Ok((
        Latency {
            samples: samples.len(),
            throughput: samples.len() as f64 / elapsed.as_secs_f64(),
            p50: percentile(&samples, 0.50),
            p99: percentile(&samples, 0.99),
            max: samples.last().copied().unwrap_or(0.0),
        },
        // From the `Revoke` call (durable commit included) to the stream update.
        percentile(&whole, 0.50),
        percentile(&whole, 0.99),
    ))
}

/// The load harness of (e): `n` simulated node agents, each attested with its own join
/// token and holding its own mTLS connection to the node API, subscribed to the revocation
/// feed and counting the events they receive.
#[derive(Debug)]
struct FeedLoad {
    stop: CancellationToken,
    tasks: tokio::task::JoinSet<anyhow::Result<u64>>,
}

impl FeedLoad {
    async fn start(
        admin: &mut AdminClient<Channel>,
        address: &str,
        roots: &[Vec<u8>],
        n: usize,
    ) -> anyhow::Result<Self> {
        let trust_domain = TrustDomain::new(TRUST_DOMAIN)?;
        let stop = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(n);
        for i in 0..n {
            let token = join_token(admin, &format!("spiffe://{TRUST_DOMAIN}/node/sim-{i}")).await?;
            let identity =
                attest_with_join_token(address, Some(roots), Some(&trust_domain), &token)
                    .await
                    .context("attesting a simulated node agent")?;
            let link = ServerLink::new(address.to_string(), identity);
            let mut client = link.client().await?;
            let head = admin
                .list_revocations(apb::ListRevocationsRequest { all: false })
                .await?
                .into_inner()
                .head_sequence;
            let mut feed = client
                .watch_revocations(agentd_proto::revocation::WatchRevocationsRequest {
                    after_sequence: head,
                })
                .await
                .map_err(|s| anyhow!("WatchRevocations: {}", s.message()))?
                .into_inner();
            let stop = stop.clone();
            let ready = ready_tx.clone();
            tasks.spawn(async move {
                let _link = link;
                let mut events = 0u64;
                let mut first = true;
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return Ok(events),
                        msg = feed.message() => match msg {
                            Ok(Some(m)) => {
                                events += m.events.len() as u64;
                                if first {
                                    first = false;
                                    let _ = ready.send(()).await;
                                }
                            }
                            Ok(None) => bail!("a simulated node agent's feed ended"),
                            Err(s) => bail!("a simulated node agent's feed failed: {}", s.message()),
                        },
                    }
                }
            });
        }
        for _ in 0..n {
            ready_rx
                .recv()
                .await
                .ok_or_else(|| anyhow!("a simulated node agent stopped before subscribing"))?;
        }
        Ok(Self { stop, tasks })
    }

    /// Stops every subscriber; returns the events they received in all.
    async fn stop(mut self) -> anyhow::Result<u64> {
        // Let the last event reach everyone.
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.stop.cancel();
        let mut total = 0;
        while let Some(r) = self.tasks.join_next().await {
            total += r??;
        }
        Ok(total)
    }
}
