//! The Workload API served on a real Unix socket to this test process: what is recorded at
//! accept reaches attestation (PID reuse, exec), the readiness gates, the attested-caller
//! rule of `Revocations.Watch` and the JWT-SVID mint limit.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use agentd_attestor::workload::{FileVersion, ProcFs, ProcSource, WorkloadAttestors};
use agentd_proto::agentd_workload as apb;
use agentd_proto::workload as pb;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::bundle::Bundle;
use crate::cli::connect::{add_header, HeaderFn};
use crate::keys::PrivateKey;
use crate::node::cache::{CachedX509Svid, NodeEntry};
use crate::node::identity::NodeIdentity;

/// The real /proc, with the start time of every process moved to `start_time` (when not
/// 0) and `ino_shift` added to the inode of every binary: a process that "started later" or
/// "exec'ed" on demand.
#[derive(Debug, Default)]
struct Shifted {
    real: ProcFs,
    start_time: AtomicU64,
    ino_shift: AtomicU64,
    /// Times a binary was opened (to be hashed).
    exe_opens: AtomicU64,
}

impl ProcSource for Shifted {
    fn read(&self, pid: i32, name: &str) -> io::Result<String> {
        let text = self.real.read(pid, name)?;
        let start = self.start_time.load(Ordering::SeqCst);
        if name != "stat" || start == 0 {
            return Ok(text);
        }
        let close = text.rfind(')').ok_or(io::ErrorKind::InvalidData)?;
        let mut fields: Vec<String> = text[close + 1..]
            .split_ascii_whitespace()
            .map(str::to_string)
            .collect();
        // After ')' the first field is field 3 (state): field 22 is the 20th.
        *fields.get_mut(19).ok_or(io::ErrorKind::InvalidData)? = start.to_string();
        Ok(format!("{} {}", &text[..=close], fields.join(" ")))
    }

    fn exe_path(&self, pid: i32) -> io::Result<PathBuf> {
        self.real.exe_path(pid)
    }

    fn exe_version(&self, pid: i32) -> io::Result<FileVersion> {
        let mut v = self.real.exe_version(pid)?;
        v.ino += self.ino_shift.load(Ordering::SeqCst);
        Ok(v)
    }

    fn open_exe(&self, pid: i32) -> io::Result<std::fs::File> {
        self.exe_opens.fetch_add(1, Ordering::SeqCst);
        self.real.open_exe(pid)
    }
}

fn own_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").unwrap().uid()
}

fn bundle() -> Bundle {
    Bundle {
        trust_domain: spiffe::TrustDomain::new("example.org").unwrap(),
        x509_authorities: vec![vec![1, 2, 3]],
        jwt_authorities: vec![],
        sequence: 1,
        refresh_hint: Duration::from_secs(300),
    }
}

const ENTRY: &str = "0123456789abcdef0123456789abcdef";
const ID: &str = "spiffe://example.org/me";

struct Harness {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    cache: Arc<Cache>,
    revocations: Arc<NodeRevocations>,
    proc_: Arc<Shifted>,
    stop: CancellationToken,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Harness {
    /// A Workload API whose cache serves this process (by uid) one SVID; `synced` and
    /// `caught_up` set the two readiness conditions.
    async fn start(synced: bool, caught_up: bool, limit: Option<limit::MintLimiter>) -> Self {
        let proc_ = Arc::new(Shifted::default());
        let attestors = WorkloadAttestors::default().with_proc_source(proc_.clone() as _);
        Self::start_with(synced, caught_up, limit, proc_, attestors).await
    }

    /// As [`Self::start`], with these attestors reading `proc_`.
    async fn start_with(
        synced: bool,
        caught_up: bool,
        limit: Option<limit::MintLimiter>,
        proc_: Arc<Shifted>,
        attestors: WorkloadAttestors,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("api.sock");
        let cache = Arc::new(Cache::new());
        let now = SystemTime::now();
        if synced {
            cache.set_entries(
                vec![NodeEntry {
                    id: ENTRY.into(),
                    spiffe_id: spiffe::SpiffeId::new(ID).unwrap(),
                    selectors: vec![format!("unix:uid:{}", own_uid()).parse().unwrap()],
                    x509_svid_ttl: Duration::from_secs(3600),
                    jwt_svid_ttl: Duration::from_secs(300),
                    dns_names: vec![],
                    hint: String::new(),
                    revision: 1,
                    federates_with: vec![],
                }],
                bundle(),
            );
            cache.put_x509(vec![CachedX509Svid {
                entry_id: ENTRY.into(),
                entry_revision: 1,
                spiffe_id: spiffe::SpiffeId::new(ID).unwrap(),
                hint: String::new(),
                chain: vec![vec![0]],
                key: PrivateKey::generate().unwrap(),
                serial: "1".into(),
                expires_at: now + Duration::from_secs(3600),
                rotate_at: now + Duration::from_secs(1800),
                grant_chain: vec![],
                task_id: None,
            }]);
        }
        let own = spiffe::SpiffeId::new("spiffe://example.org/node/test").unwrap();
        let revocations = Arc::new(NodeRevocations::new(Duration::from_secs(30), false));
        if caught_up {
            revocations.apply_message(
                agentd_proto::revocation::RevocationFeed::default(),
                &cache,
                &own,
                std::time::Instant::now(),
                crate::clock::unix_seconds(now),
            );
        }
        // Nothing listens on port 1: every call to the server fails at once.
        let link = Arc::new(ServerLink::new(
            "127.0.0.1:1".into(),
            NodeIdentity {
                spiffe_id: own,
                chain: vec![vec![0]],
                key: PrivateKey::generate().unwrap(),
                serial: "1".into(),
                expires_at: now + Duration::from_secs(3600),
                bundle: bundle(),
            },
        ));
        let attestors = Arc::new(attestors);
        let mut api = WorkloadApi::new(
            cache.clone(),
            link,
            Arc::new(crate::clock::SystemClock),
            attestors,
            revocations.clone(),
        );
        if let Some(limit) = limit {
            api = api.with_jwt_mint_limit(limit);
        }
        let listener = bind_socket(&socket).unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(api.serve(listener, stop.clone()));
        Self {
            _dir: dir,
            socket,
            cache,
            revocations,
            proc_,
            stop,
        }
    }

    async fn channel(
        &self,
    ) -> tonic::service::interceptor::InterceptedService<tonic::transport::Channel, HeaderFn> {
        let ch = crate::net::unix_channel(&self.socket).await.unwrap();
        tonic::service::interceptor::InterceptedService::new(ch, add_header as HeaderFn)
    }

    async fn selectors(&self) -> Result<apb::GetSelectorsResponse, Status> {
        let mut c = apb::selectors_client::SelectorsClient::new(self.channel().await);
        c.get_selectors(apb::GetSelectorsRequest {})
            .await
            .map(|r| r.into_inner())
    }
}

#[tokio::test]
async fn a_process_that_started_after_the_accept_is_refused() {
    let h = Harness::start(true, true, None).await;
    let got = h.selectors().await.unwrap();
    assert_eq!(got.spiffe_ids, [ID]);
    // Every process now "started" long after any accept (the uptime clock is far below
    // this): the accept time recorded on the connection must reach attestation.
    h.proc_.start_time.store(u64::MAX / 4, Ordering::SeqCst);
    let err = h.selectors().await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert_eq!(err.message(), NO_IDENTITY);
}

#[tokio::test]
async fn a_process_that_execed_after_the_accept_is_refused() {
    let h = Harness::start(true, true, None).await;
    let mut c = apb::selectors_client::SelectorsClient::new(h.channel().await);
    assert!(c.get_selectors(apb::GetSelectorsRequest {}).await.is_ok());
    // Another binary behind /proc/<pid>/exe, on the same connection: refused.
    h.proc_.ino_shift.store(1, Ordering::SeqCst);
    let err = c
        .get_selectors(apb::GetSelectorsRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    // A new connection records the binary as it is now.
    assert!(h.selectors().await.is_ok());
}

async fn fetch_x509(h: &Harness) -> Result<pb::X509svidResponse, Status> {
    let mut c = pb::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(h.channel().await);
    let mut stream = c.fetch_x509svid(pb::X509svidRequest {}).await?.into_inner();
    stream
        .message()
        .await?
        .ok_or_else(|| Status::internal("stream ended"))
}

#[tokio::test]
async fn nothing_is_served_before_the_revocation_set_is_caught_up() {
    let h = Harness::start(true, false, None).await;
    let err = fetch_x509(&h).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("revocation feed"), "{err:?}");
    // The watch is refused as well: the node would show a partial set.
    let mut w = apb::revocations_client::RevocationsClient::new(h.channel().await);
    let err = w
        .watch(agentd_proto::revocation::WatchRevocationsRequest { after_sequence: 0 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    // Caught up: served.
    h.revocations.apply_message(
        agentd_proto::revocation::RevocationFeed::default(),
        &h.cache,
        &spiffe::SpiffeId::new("spiffe://example.org/node/test").unwrap(),
        std::time::Instant::now(),
        crate::clock::unix_seconds(SystemTime::now()),
    );
    let got = fetch_x509(&h).await.unwrap();
    assert_eq!(got.svids[0].spiffe_id, ID);
}

#[tokio::test]
async fn nothing_is_served_before_the_first_sync() {
    let h = Harness::start(false, true, None).await;
    let err = fetch_x509(&h).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("not yet synced"), "{err:?}");
}

#[tokio::test]
async fn watching_revocations_needs_an_identity() {
    let h = Harness::start(true, true, None).await;
    let mut w = apb::revocations_client::RevocationsClient::new(h.channel().await);
    let mut stream = w
        .watch(agentd_proto::revocation::WatchRevocationsRequest { after_sequence: 0 })
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());
    // The caller's entry goes: no identity, no watch.
    h.cache.set_entries(vec![], bundle());
    let err = w
        .watch(agentd_proto::revocation::WatchRevocationsRequest { after_sequence: 0 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().starts_with(NO_IDENTITY), "{err:?}");
}

#[tokio::test]
async fn new_jwt_audiences_are_limited_per_workload() {
    let h = Harness::start(true, true, Some(limit::MintLimiter::new(2, 1))).await;
    let c = pb::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(h.channel().await);
    let fetch = |aud: &str| {
        let req = pb::JwtsvidRequest {
            audience: vec![aud.to_string()],
            spiffe_id: String::new(),
        };
        let mut c = c.clone();
        async move { c.fetch_jwtsvid(req).await }
    };
    // Two mints go to the server (which is not there), the third is not attempted.
    for aud in ["a", "b"] {
        let err = fetch(aud).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    }
    let err = fetch("c").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains(ID), "{err:?}");
    // A cached audience is served without a mint, whatever the limit says.
    h.cache.put_jwt(
        ENTRY,
        &["cached".to_string()],
        crate::node::cache::CachedJwtSvid {
            token: "tok".into(),
            issued_at: SystemTime::now(),
            expires_at: SystemTime::now() + Duration::from_secs(300),
        },
    );
    let ok = fetch("cached").await.unwrap().into_inner();
    assert_eq!(ok.svids[0].svid, "tok");
    drop(c);
}

/// Every line a Workload API call logs carries the span's fields: the method, and the pid
/// and uid of the calling process (docs/operations.md, "Logs").
#[test]
fn the_rpc_span_names_the_method_and_the_calling_process() {
    #[derive(Clone, Default)]
    struct Lines(Arc<std::sync::Mutex<Vec<u8>>>);
    impl io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let lines = Lines::default();
    let writer = lines.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let request = |peer: Option<PeerCredentials>| {
        let mut req = tonic::codegen::http::Request::builder()
            .uri("/SpiffeWorkloadAPI/FetchX509SVID")
            .body(())
            .unwrap();
        req.extensions_mut().insert(WorkloadConnInfo {
            peer,
            connection: Default::default(),
        });
        req
    };
    tracing::subscriber::with_default(subscriber, || {
        for peer in [
            Some(PeerCredentials {
                pid: Some(4242),
                uid: 1001,
                gid: 1002,
            }),
            Some(PeerCredentials {
                pid: None,
                uid: 1003,
                gid: 1004,
            }),
            None,
        ] {
            rpc_span(&request(peer)).in_scope(|| tracing::warn!("inside the call"));
        }
    });
    let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
    let got: Vec<&str> = text.lines().collect();
    assert_eq!(got.len(), 3, "{text}");
    let rpc = "rpc=\"/SpiffeWorkloadAPI/FetchX509SVID\"";
    assert!(
        got[0].contains(&format!("rpc{{api=\"workload\" {rpc} pid=4242 uid=1001}}")),
        "{text}"
    );
    assert!(
        got[1].contains(&format!("rpc{{api=\"workload\" {rpc} uid=1003}}")),
        "{text}"
    );
    assert!(
        got[2].contains(&format!("rpc{{api=\"workload\" {rpc}}}")),
        "{text}"
    );
}

/// Twenty first calls at once from one binary not seen before: it is hashed by at most
/// `HASHES_AT_ONCE` of them, and every caller gets its `unix:sha256` selector.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_calls_from_a_new_binary_hash_it_once_or_twice() {
    let proc_ = Arc::new(Shifted::default());
    let attestors = WorkloadAttestors::new(vec![Box::new(
        agentd_attestor::workload::UnixAttestor::default().with_max_binary_size(u64::MAX),
    )])
    .with_proc_source(proc_.clone() as _);
    let h = Harness::start_with(true, true, None, proc_, attestors).await;
    let results = futures::future::join_all((0..20).map(|_| h.selectors())).await;
    for r in results {
        let got = r.unwrap();
        assert!(
            got.selectors
                .iter()
                .any(|s| s.r#type == "unix" && s.value.starts_with("sha256:")),
            "{got:?}"
        );
    }
    let opens = h.proc_.exe_opens.load(Ordering::SeqCst);
    assert!(
        (1..=HASHES_AT_ONCE as u64).contains(&opens),
        "the binary was opened {opens} times"
    );
}
