//! Tests of the attestors together: the snapshot checks (PID reuse, credentials), real child
//! processes, and a fake /proc.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::process::{parse_status, FileVersion};
use super::*;

fn stat_line(start: u64, state: char) -> String {
    format!(
        "4242 (a (b) c) {state} 1 4242 4242 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 {start} \
         8634368 200 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n"
    )
}

/// A /proc with one process. `stat` answers come from a queue (the last one repeats), so a
/// test can change the start time between the first and the second read.
#[derive(Debug)]
struct FakeProc {
    stats: Mutex<VecDeque<io::Result<String>>>,
    files: HashMap<&'static str, String>,
    exe: PathBuf,
    exe_opens: AtomicUsize,
}

impl FakeProc {
    fn new(stats: Vec<io::Result<String>>, exe: PathBuf) -> Self {
        let mut files = HashMap::new();
        files.insert(
            "status",
            "Name:\tx\nUid:\t1000\t1000\t1000\t1000\nGid:\t1000\t1000\t1000\t1000\nGroups:\t4 27 1000\n"
                .to_string(),
        );
        files.insert(
            "cgroup",
            "0::/system.slice/docker-4a3c0b1f9e2d8c7b6a5f4e3d2c1b0a99887766554433221100ffeeddccbbaa00.scope\n"
                .to_string(),
        );
        Self {
            stats: Mutex::new(stats.into()),
            files,
            exe,
            exe_opens: AtomicUsize::new(0),
        }
    }
}

impl ProcSource for FakeProc {
    fn read(&self, _pid: i32, name: &str) -> io::Result<String> {
        if name == "stat" {
            let mut q = self.stats.lock().unwrap();
            return match q.len() {
                0 => Err(io::ErrorKind::NotFound.into()),
                1 => match &q[0] {
                    Ok(s) => Ok(s.clone()),
                    Err(e) => Err(match e.raw_os_error() {
                        Some(code) => io::Error::from_raw_os_error(code),
                        None => io::Error::new(e.kind(), e.to_string()),
                    }),
                },
                _ => q.pop_front().unwrap(),
            };
        }
        self.files
            .get(name)
            .cloned()
            .ok_or_else(|| io::ErrorKind::NotFound.into())
    }

    fn exe_path(&self, _pid: i32) -> io::Result<PathBuf> {
        Ok(self.exe.clone())
    }

    fn exe_version(&self, _pid: i32) -> io::Result<FileVersion> {
        std::fs::metadata(&self.exe).map(|m| FileVersion::of(&m))
    }

    fn open_exe(&self, _pid: i32) -> io::Result<File> {
        self.exe_opens.fetch_add(1, Ordering::SeqCst);
        File::open(&self.exe)
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    exe: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("agent-bin");
    std::fs::write(&exe, b"hello").unwrap();
    std::fs::write(dir.path().join("passwd"), "alice:x:1000:1000::/h:/bin/sh\n").unwrap();
    std::fs::write(
        dir.path().join("group"),
        "adm:x:4:\nsudo:x:27:alice\nalice:x:1000:\n",
    )
    .unwrap();
    Fixture { dir, exe }
}

impl Fixture {
    fn unix(&self) -> UnixAttestor {
        UnixAttestor::with_account_files(
            self.dir.path().join("passwd"),
            self.dir.path().join("group"),
        )
    }

    fn all(&self, proc_: Arc<FakeProc>) -> WorkloadAttestors {
        WorkloadAttestors::new(vec![
            Box::new(self.unix()),
            Box::new(ContainerAttestor::default()),
            Box::new(SystemdAttestor),
        ])
        .with_proc_source(proc_)
    }
}

const PEER: PeerCredentials = PeerCredentials {
    pid: Some(4242),
    uid: 1000,
    gid: 1000,
};

fn strings(s: &[Selector]) -> Vec<String> {
    s.iter().map(ToString::to_string).collect()
}

// "hello"
const HELLO_SHA256: &str = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

#[test]
fn every_attestor_on_one_snapshot() {
    let f = fixture();
    let fake = Arc::new(FakeProc::new(vec![Ok(stat_line(100, 'S'))], f.exe.clone()));
    let got = strings(&f.all(fake).attest(&PEER).unwrap());
    assert_eq!(
        got,
        [
            "unix:uid:1000".to_string(),
            "unix:user:alice".into(),
            "unix:gid:1000".into(),
            "unix:group:alice".into(),
            "unix:supplementary_gid:4".into(),
            "unix:supplementary_gid:27".into(),
            "unix:supplementary_gid:1000".into(),
            "unix:supplementary_group:adm".into(),
            "unix:supplementary_group:sudo".into(),
            "unix:supplementary_group:alice".into(),
            format!("unix:path:{}", f.exe.display()),
            format!("unix:sha256:{HELLO_SHA256}"),
            "container:id:4a3c0b1f9e2d8c7b6a5f4e3d2c1b0a99887766554433221100ffeeddccbbaa00".into(),
            "systemd:id:docker-4a3c0b1f9e2d8c7b6a5f4e3d2c1b0a99887766554433221100ffeeddccbbaa00.scope"
                .into(),
            "systemd:manager:system".into(),
        ]
    );
}

#[test]
fn start_time_changed_between_reads_is_process_gone() {
    let f = fixture();
    let fake = Arc::new(FakeProc::new(
        vec![Ok(stat_line(100, 'S')), Ok(stat_line(101, 'S'))],
        f.exe.clone(),
    ));
    let err = f.all(fake.clone()).attest(&PEER).unwrap_err();
    assert!(
        matches!(err, AttestError::ProcessGone { pid: 4242 }),
        "{err}"
    );
    // The single-attestor path makes the same check.
    let fake = Arc::new(FakeProc::new(
        vec![Ok(stat_line(100, 'S')), Ok(stat_line(101, 'S'))],
        f.exe.clone(),
    ));
    let one = WorkloadAttestors::new(vec![Box::new(SystemdAttestor)]).with_proc_source(fake);
    assert!(matches!(
        one.attest(&PEER),
        Err(AttestError::ProcessGone { .. })
    ));
}

#[test]
fn exited_zombie_or_vanished_at_second_read_is_process_gone() {
    let f = fixture();
    for second in [
        Ok(stat_line(100, 'Z')),
        Err(io::ErrorKind::NotFound.into()),
        Err(io::Error::from_raw_os_error(3)),
    ] {
        let fake = Arc::new(FakeProc::new(
            vec![Ok(stat_line(100, 'S')), second],
            f.exe.clone(),
        ));
        let err = f.all(fake).attest(&PEER).unwrap_err();
        assert!(matches!(err, AttestError::ProcessGone { .. }), "{err}");
    }
    // Gone before the first read.
    let fake = Arc::new(FakeProc::new(vec![Ok(stat_line(100, 'Z'))], f.exe.clone()));
    assert!(matches!(
        f.all(fake).attest(&PEER),
        Err(AttestError::ProcessGone { .. })
    ));
}

#[test]
fn process_started_after_the_connection_is_process_gone() {
    let f = fixture();
    let fake = Arc::new(FakeProc::new(vec![Ok(stat_line(100, 'S'))], f.exe.clone()));
    let all = f.all(fake);
    let at = |t| ConnectionFacts {
        connected_at: Some(t),
        exe: None,
    };
    assert!(matches!(
        all.attest_connection(&PEER, &at(99)),
        Err(AttestError::ProcessGone { .. })
    ));
    assert!(all.attest_connection(&PEER, &at(100)).is_ok());
    assert!(all.attest_connection(&PEER, &at(5000)).is_ok());
}

#[test]
fn another_binary_than_at_connect_is_refused() {
    let f = fixture();
    let fake = Arc::new(FakeProc::new(vec![Ok(stat_line(100, 'S'))], f.exe.clone()));
    let all = f.all(fake);
    let facts = all.observe_connection(&PEER);
    assert!(
        matches!(facts.exe, Some(ExeIdentity::Inode { .. })),
        "{facts:?}"
    );
    assert!(all.attest_connection(&PEER, &facts).is_ok());
    // The process exec'ed another file since it connected (a new inode behind its exe).
    let other = f.dir.path().join("other-bin");
    std::fs::write(&other, b"hello").unwrap();
    std::fs::rename(&other, &f.exe).unwrap();
    let err = all.attest_connection(&PEER, &facts).unwrap_err();
    assert!(
        matches!(err, AttestError::ExeChanged { pid: 4242, then, now } if then != now),
        "{err}"
    );
    // Unreadable at connect and readable now is a change too; never checked is none.
    let unreadable = ConnectionFacts {
        exe: Some(ExeIdentity::Unreadable),
        ..facts
    };
    assert!(matches!(
        all.attest_connection(&PEER, &unreadable),
        Err(AttestError::ExeChanged { .. })
    ));
    assert!(all.attest(&PEER).is_ok());
}

#[test]
fn a_stopped_process_is_refused() {
    let f = fixture();
    for (stats, refused) in [
        (vec![Ok(stat_line(100, 'T'))], true),
        (vec![Ok(stat_line(100, 'S')), Ok(stat_line(100, 'T'))], true),
        // A tracing stop may be one thread's while another makes the call.
        (vec![Ok(stat_line(100, 't'))], false),
    ] {
        let fake = Arc::new(FakeProc::new(stats, f.exe.clone()));
        let got = f.all(fake).attest(&PEER);
        assert_eq!(
            matches!(got, Err(AttestError::Stopped { pid: 4242 })),
            refused,
            "{got:?}"
        );
        if !refused {
            assert!(got.is_ok(), "{got:?}");
        }
    }
}

#[test]
fn other_credentials_than_at_connect_are_refused() {
    let f = fixture();
    let fake = Arc::new(FakeProc::new(vec![Ok(stat_line(100, 'S'))], f.exe.clone()));
    let err = f
        .all(fake)
        .attest(&PeerCredentials {
            pid: Some(4242),
            uid: 0,
            gid: 1000,
        })
        .unwrap_err();
    assert!(
        matches!(
            err,
            AttestError::CredentialsChanged {
                uid: 1000,
                peer_uid: 0,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn disabled_attestors_contribute_nothing() {
    let f = fixture();
    let mut config = WorkloadAttestorsConfig::default();
    config.container.enabled = false;
    config.systemd.enabled = false;
    let fake = Arc::new(FakeProc::new(vec![Ok(stat_line(100, 'S'))], f.exe.clone()));
    let attestors = WorkloadAttestors::from_config(&config).with_proc_source(fake);
    assert_eq!(attestors.kinds(), ["unix"]);
    let got = attestors.attest(&PEER).unwrap();
    assert!(got.iter().all(|s| s.kind() == "unix"), "{got:?}");

    config.unix.enabled = false;
    let fake = Arc::new(FakeProc::new(vec![Ok(stat_line(100, 'S'))], f.exe.clone()));
    let none = WorkloadAttestors::from_config(&config).with_proc_source(fake);
    assert!(none.kinds().is_empty());
    assert!(none.attest(&PEER).unwrap().is_empty());
    assert_eq!(
        WorkloadAttestors::default().kinds(),
        ["unix", "container", "systemd"]
    );
}

#[test]
fn binary_hash_is_cached_by_file_version_and_redone_when_it_changes() {
    let f = fixture();
    let fake = Arc::new(FakeProc::new(vec![Ok(stat_line(100, 'S'))], f.exe.clone()));
    let attestors = WorkloadAttestors::new(vec![Box::new(f.unix())]).with_proc_source(fake.clone());
    let sha = |a: &WorkloadAttestors| {
        strings(&a.attest(&PEER).unwrap())
            .into_iter()
            .find(|s| s.starts_with("unix:sha256:"))
    };
    let first = sha(&attestors);
    assert_eq!(first, Some(format!("unix:sha256:{HELLO_SHA256}")));
    assert_eq!(sha(&attestors), first);
    assert_eq!(fake.exe_opens.load(Ordering::SeqCst), 1);
    // Same size, new content, same inode: ctime (and mtime) change, so it is hashed again.
    // Timestamps may be as coarse as a clock tick: rewrite until the version differs.
    let version = |p: &PathBuf| FileVersion::of(&std::fs::metadata(p).unwrap());
    let before = version(&f.exe);
    for _ in 0..100 {
        std::fs::write(&f.exe, b"HELLO").unwrap();
        if version(&f.exe) != before {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_ne!(version(&f.exe), before);
    let second = sha(&attestors).unwrap();
    assert_ne!(Some(second), first);
    assert_eq!(fake.exe_opens.load(Ordering::SeqCst), 2);
}

/// Attestation fit for an async runtime does no slow work: a binary whose hash is not cached
/// is `WouldBlock` (nothing opened), and once a blocking attestation cached it, the same
/// call answers with the hash and opens nothing.
#[test]
fn attesting_without_blocking_never_hashes_a_binary() {
    let f = fixture();
    let fake = Arc::new(FakeProc::new(vec![Ok(stat_line(100, 'S'))], f.exe.clone()));
    let attestors = f.all(fake.clone());
    let facts = ConnectionFacts::default();
    let err = attestors
        .attest_connection_without_blocking(&PEER, &facts)
        .unwrap_err();
    assert!(
        matches!(err, AttestError::WouldBlock { pid: 4242 }),
        "{err}"
    );
    assert_eq!(fake.exe_opens.load(Ordering::SeqCst), 0);
    let blocking = attestors
        .attest_connection_explained(&PEER, &facts)
        .unwrap();
    assert_eq!(fake.exe_opens.load(Ordering::SeqCst), 1);
    let quick = attestors
        .attest_connection_without_blocking(&PEER, &facts)
        .unwrap();
    assert_eq!(quick, blocking);
    assert!(strings(&quick.selectors).contains(&format!("unix:sha256:{HELLO_SHA256}")));
    assert_eq!(fake.exe_opens.load(Ordering::SeqCst), 1);
    // With hashing off there is nothing slow to do.
    let off = WorkloadAttestors::new(vec![Box::new(f.unix().with_max_binary_size(0))])
        .with_proc_source(fake.clone());
    assert!(off
        .attest_connection_without_blocking(&PEER, &facts)
        .is_ok());
    // Nor for a binary over the size limit: its stat says so, and nothing is opened.
    let too_large = WorkloadAttestors::new(vec![Box::new(f.unix().with_max_binary_size(4))])
        .with_proc_source(fake.clone());
    let got = too_large
        .attest_connection_without_blocking(&PEER, &facts)
        .unwrap();
    assert!(
        got.notes
            .iter()
            .any(|n| n.contains("more than max_binary_size")),
        "{:?}",
        got.notes
    );
    assert_eq!(fake.exe_opens.load(Ordering::SeqCst), 1);
}

#[test]
fn binaries_over_the_size_limit_get_no_hash() {
    let f = fixture();
    let fake = Arc::new(FakeProc::new(vec![Ok(stat_line(100, 'S'))], f.exe.clone()));
    for max in [0, 4] {
        let attestors = WorkloadAttestors::new(vec![Box::new(f.unix().with_max_binary_size(max))])
            .with_proc_source(fake.clone());
        let got = strings(&attestors.attest(&PEER).unwrap());
        assert!(
            got.iter().all(|s| !s.starts_with("unix:sha256:")),
            "{got:?}"
        );
        assert!(got.iter().any(|s| s.starts_with("unix:path:")), "{got:?}");
    }
    assert_eq!(fake.exe_opens.load(Ordering::SeqCst), 0);
    let attestors = WorkloadAttestors::new(vec![Box::new(f.unix().with_max_binary_size(5))])
        .with_proc_source(fake);
    let got = strings(&attestors.attest(&PEER).unwrap());
    assert!(
        got.contains(&format!("unix:sha256:{HELLO_SHA256}")),
        "{got:?}"
    );
}

#[test]
fn a_binary_left_unhashed_is_explained_in_a_note() {
    let f = fixture();
    let fake = Arc::new(FakeProc::new(vec![Ok(stat_line(100, 'S'))], f.exe.clone()));
    let explained = |max: u64| {
        WorkloadAttestors::new(vec![Box::new(f.unix().with_max_binary_size(max))])
            .with_proc_source(fake.clone())
            .attest_connection_explained(&PEER, &ConnectionFacts::default())
            .unwrap()
    };
    // The fixture's binary is 5 bytes ("hello").
    let over = explained(4);
    assert!(strings(&over.selectors)
        .iter()
        .all(|s| !s.starts_with("unix:sha256:")));
    assert_eq!(over.notes.len(), 1, "{:?}", over.notes);
    assert!(
        over.notes[0].contains("unix:sha256")
            && over.notes[0].contains("5 bytes")
            && over.notes[0].contains("max_binary_size (4 bytes)"),
        "{:?}",
        over.notes
    );
    let off = explained(0);
    assert!(
        off.notes[0].contains("max_binary_size = 0"),
        "{:?}",
        off.notes
    );
    let hashed = explained(5);
    assert!(hashed.notes.is_empty(), "{:?}", hashed.notes);
    assert!(strings(&hashed.selectors).contains(&format!("unix:sha256:{HELLO_SHA256}")));
}

#[test]
fn deleted_binary_gets_no_path() {
    let f = fixture();
    let mut fake = FakeProc::new(vec![Ok(stat_line(100, 'S'))], f.exe.clone());
    // exe_path reports what readlink would: the old path with " (deleted)".
    #[derive(Debug)]
    struct Deleted(FakeProc);
    impl ProcSource for Deleted {
        fn read(&self, pid: i32, name: &str) -> io::Result<String> {
            self.0.read(pid, name)
        }
        fn exe_path(&self, _pid: i32) -> io::Result<PathBuf> {
            Ok(PathBuf::from("/usr/bin/agent (deleted)"))
        }
        fn exe_version(&self, pid: i32) -> io::Result<FileVersion> {
            self.0.exe_version(pid)
        }
        fn open_exe(&self, pid: i32) -> io::Result<File> {
            self.0.open_exe(pid)
        }
    }
    fake.files.remove("cgroup");
    let attestors =
        WorkloadAttestors::new(vec![Box::new(f.unix())]).with_proc_source(Arc::new(Deleted(fake)));
    let got = strings(&attestors.attest(&PEER).unwrap());
    assert!(got.iter().all(|s| !s.starts_with("unix:path:")), "{got:?}");
    assert!(
        got.contains(&format!("unix:sha256:{HELLO_SHA256}")),
        "{got:?}"
    );
}

#[test]
fn no_pid_gives_peer_credential_selectors_only() {
    let f = fixture();
    let fake = Arc::new(FakeProc::new(vec![], f.exe.clone()));
    for pid in [None, Some(0)] {
        let got = strings(
            &f.all(fake.clone())
                .attest(&PeerCredentials { pid, ..PEER })
                .unwrap(),
        );
        assert_eq!(
            got,
            [
                "unix:uid:1000",
                "unix:user:alice",
                "unix:gid:1000",
                "unix:group:alice"
            ]
        );
    }
}

#[test]
fn garbage_proc_files_never_panic() {
    let f = fixture();
    let garbage = [
        "",
        "\u{0}\u{0}",
        "Uid:\t1000\t1000\t1000\t1000\nGid:\t1000\t1000\t1000\t1000\nGroups:\tx -1 99999999999\n",
        "0::/docker-\n1:\n:::\n",
        "Uid:\nGid:\n",
    ];
    for stat in ["", "(", "1 (x)", &stat_line(1, 'S')[..40]] {
        let fake = Arc::new(FakeProc::new(vec![Ok(stat.to_string())], f.exe.clone()));
        assert!(f.all(fake).attest(&PEER).is_err());
    }
    for text in garbage {
        let mut fake = FakeProc::new(vec![Ok(stat_line(100, 'S'))], f.exe.clone());
        fake.files.insert("cgroup", text.to_string());
        let _ = f.all(Arc::new(fake)).attest(&PEER);
        let mut fake = FakeProc::new(vec![Ok(stat_line(100, 'S'))], f.exe.clone());
        fake.files.insert("status", text.to_string());
        let _ = f.all(Arc::new(fake)).attest(&PEER);
    }
}

#[test]
fn uptime_ticks() {
    assert_eq!(parse_uptime_ticks("12345.67 54321.00\n"), Some(1234567));
    assert_eq!(parse_uptime_ticks("5.1 1"), Some(510));
    assert_eq!(parse_uptime_ticks("5 1"), Some(500));
    for bad in ["", "x", "1.x", "-1.00", "1.", "99999999999999999999.00"] {
        assert_eq!(parse_uptime_ticks(bad), None, "{bad}");
    }
    assert!(boot_time_ticks().unwrap() > 0);
}

// --- Real processes -------------------------------------------------------------------

/// This process's effective uid and gid, from /proc (no libc here).
fn own_ids() -> (u32, u32) {
    let s = parse_status(&std::fs::read_to_string("/proc/self/status").unwrap());
    (s.uids.unwrap()[1], s.gids.unwrap()[1])
}

struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sleeper(uid: Option<u32>) -> Reaped {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new("sleep");
    cmd.arg("30");
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    Reaped(cmd.spawn().expect("spawning sleep"))
}

#[test]
fn an_exited_and_reaped_child_is_process_gone() {
    let (uid, gid) = own_ids();
    let mut child = sleeper(None);
    let pid = child.0.id() as i32;
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    let peer = PeerCredentials {
        pid: Some(pid),
        uid,
        gid,
    };
    let err = WorkloadAttestors::default().attest(&peer).unwrap_err();
    assert!(
        matches!(err, AttestError::ProcessGone { pid: p } if p == pid),
        "{err}"
    );
    // The compatible single-attestor path too.
    let err = UnixAttestor::default().attest(&peer).unwrap_err();
    assert!(matches!(err, AttestError::ProcessGone { .. }), "{err}");
}

/// A process's directory, once open, stays bound to that process: what it reads is what
/// the path-based reads give while the process lives, and once it is reaped every read
/// through it fails (ESRCH), so a pid reused later can never be read through it.
#[test]
fn a_process_directory_reads_its_own_process_only() {
    let mut child = sleeper(None);
    let pid = child.0.id() as i32;
    let procfs = ProcFs::default();
    let dir = procfs.open_dir(pid).unwrap().unwrap();
    for name in ["stat", "cgroup"] {
        assert_eq!(
            dir.read(name).unwrap(),
            procfs.read(pid, name).unwrap(),
            "{name}"
        );
    }
    assert_eq!(
        parse_status(&dir.read("status").unwrap()).uids,
        parse_status(&procfs.read(pid, "status").unwrap()).uids
    );
    assert_eq!(dir.exe_path().unwrap(), procfs.exe_path(pid).unwrap());
    assert_eq!(dir.exe_version().unwrap(), procfs.exe_version(pid).unwrap());
    let mut opened = Vec::new();
    std::io::Read::read_to_end(&mut dir.open_exe().unwrap(), &mut opened).unwrap();
    assert_eq!(
        opened,
        std::fs::read(procfs.exe_path(pid).unwrap()).unwrap()
    );
    // `stat` is read again through the fd kept from its first read: afresh, not from then.
    assert!(Command::new("kill")
        .args(["-STOP", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    wait_for("the child to stop", || proc_state(pid) == Some('T'));
    let again = super::process::parse_stat(&dir.read("stat").unwrap()).unwrap();
    assert_eq!(again.state, 'T');
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    let err = dir.read("stat").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(3), "ESRCH, got {err}");
    assert!(dir.exe_version().is_err());
    let err = procfs.open_dir(pid).unwrap().unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
}

/// Polls (bounded) until `f` holds; panics naming `what` otherwise.
fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn proc_state(pid: i32) -> Option<char> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    super::process::parse_stat(&text).map(|s| s.state)
}

#[test]
fn a_process_that_execs_after_connecting_is_refused() {
    use std::io::Write;
    let (uid, gid) = own_ids();
    // A shell that "connects" (is observed), then execs sleep in the same process: same pid,
    // same start time, same uid, another binary.
    let child = Command::new("sh")
        .args(["-c", "read line; exec sleep 30"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("spawning sh");
    let mut child = Reaped(child);
    let pid = child.0.id() as i32;
    let peer = PeerCredentials {
        pid: Some(pid),
        uid,
        gid,
    };
    let attestors = WorkloadAttestors::default();
    let shell = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    let facts = attestors.observe_connection(&peer);
    let before = strings(&attestors.attest_connection(&peer, &facts).unwrap());
    assert!(
        before.contains(&format!("unix:path:{}", shell.display())),
        "{before:?}"
    );

    writeln!(child.0.stdin.as_mut().unwrap()).unwrap();
    wait_for("the shell to exec sleep", || {
        std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| p != shell)
    });
    let err = attestors.attest_connection(&peer, &facts).unwrap_err();
    assert!(
        matches!(err, AttestError::ExeChanged { pid: p, .. } if p == pid),
        "{err}"
    );
    // A connection made after the exec is the new binary's own.
    let fresh = attestors.observe_connection(&peer);
    let after = strings(&attestors.attest_connection(&peer, &fresh).unwrap());
    assert!(
        after
            .iter()
            .any(|s| s.starts_with("unix:path:") && s.ends_with("sleep")),
        "{after:?}"
    );
}

#[test]
fn a_stopped_child_is_refused_until_it_continues() {
    let (uid, gid) = own_ids();
    let child = sleeper(None);
    let pid = child.0.id() as i32;
    let peer = PeerCredentials {
        pid: Some(pid),
        uid,
        gid,
    };
    let attestors = WorkloadAttestors::default();
    let facts = attestors.observe_connection(&peer);
    assert!(attestors.attest_connection(&peer, &facts).is_ok());
    let kill = |sig: &str| {
        assert!(Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .expect("running kill")
            .success())
    };
    kill("-STOP");
    wait_for("the child to stop", || proc_state(pid) == Some('T'));
    let err = attestors.attest_connection(&peer, &facts).unwrap_err();
    assert!(
        matches!(err, AttestError::Stopped { pid: p } if p == pid),
        "{err}"
    );
    kill("-CONT");
    wait_for("the child to continue", || proc_state(pid) != Some('T'));
    assert!(attestors.attest_connection(&peer, &facts).is_ok());
}

#[test]
fn own_process_gets_its_binary_path_and_hash() {
    let (uid, gid) = own_ids();
    let peer = PeerCredentials {
        pid: Some(std::process::id() as i32),
        uid,
        gid,
    };
    let got = strings(&WorkloadAttestors::default().attest(&peer).unwrap());
    let exe = std::fs::read_link("/proc/self/exe").unwrap();
    assert!(
        got.contains(&format!("unix:path:{}", exe.display())),
        "{got:?}"
    );
    assert!(got.iter().any(|s| s.starts_with("unix:sha256:")), "{got:?}");
    assert!(got.contains(&format!("unix:uid:{uid}")), "{got:?}");
    // Someone else's uid on our pid: refused.
    let err = WorkloadAttestors::default()
        .attest(&PeerCredentials {
            uid: uid.wrapping_add(1),
            ..peer
        })
        .unwrap_err();
    assert!(
        matches!(err, AttestError::CredentialsChanged { .. }),
        "{err}"
    );
}

/// These tests start children under other uids, which needs root (CAP_SETUID): `make test`
/// and CI run as root. Without it they fail and say so instead of passing untested.
fn require_root(what: &str) {
    assert_eq!(
        own_ids().0,
        0,
        "{what} needs root (CAP_SETUID to start children under other uids): run the tests as root"
    );
}

fn sha256_hex(path: &std::path::Path) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, &std::fs::read(path).unwrap()).as_ref())
}

#[test]
fn child_as_nobody_gets_its_own_selectors() {
    require_root("spawning a child as uid 65534");
    let child = sleeper(Some(65534));
    let pid = child.0.id() as i32;
    let peer = PeerCredentials {
        pid: Some(pid),
        uid: 65534,
        gid: 65534,
    };
    let got = strings(&WorkloadAttestors::default().attest(&peer).unwrap());
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert!(
        exe.file_name().unwrap().to_str().unwrap().contains("sleep") || exe.ends_with("coreutils")
    );
    let mut want = vec!["unix:uid:65534".to_string()];
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    if let Some(line) = passwd
        .lines()
        .find(|l| l.split(':').nth(2) == Some("65534"))
    {
        want.push(format!("unix:user:{}", line.split(':').next().unwrap()));
    }
    want.push("unix:gid:65534".into());
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    if let Some(line) = group.lines().find(|l| l.split(':').nth(2) == Some("65534")) {
        want.push(format!("unix:group:{}", line.split(':').next().unwrap()));
    }
    // std drops the supplementary groups of a child whose uid it sets: none here.
    want.push(format!("unix:path:{}", exe.display()));
    want.push(format!("unix:sha256:{}", sha256_hex(&exe)));
    let unix: Vec<String> = got
        .iter()
        .filter(|s| s.starts_with("unix:"))
        .cloned()
        .collect();
    assert_eq!(unix, want);
    // Run as the test's uid, the same binary: same path and hash, other uid.
    let (uid, gid) = own_ids();
    let mine = sleeper(None);
    let got_mine = strings(
        &WorkloadAttestors::default()
            .attest(&PeerCredentials {
                pid: Some(mine.0.id() as i32),
                uid,
                gid,
            })
            .unwrap(),
    );
    assert!(got_mine.contains(&format!("unix:sha256:{}", sha256_hex(&exe))));
    assert!(!got_mine.contains(&"unix:uid:65534".to_string()));
    // Claiming the child's pid with our own uid: refused.
    assert!(matches!(
        WorkloadAttestors::default().attest(&PeerCredentials { uid, gid, ..peer }),
        Err(AttestError::CredentialsChanged { .. })
    ));
}

#[test]
fn concurrent_callers_each_get_their_own_selectors() {
    // Each child under its own uid: a mix-up between concurrent callers shows as a wrong uid.
    require_root("starting eight children under distinct uids");
    let attestors = Arc::new(WorkloadAttestors::default());
    let children: Vec<(Reaped, u32, u32)> = (0..8u32)
        .map(|i| {
            let uid = 60000 + i;
            (sleeper(Some(uid)), uid, uid)
        })
        .collect();
    std::thread::scope(|s| {
        for (child, uid, gid) in &children {
            let attestors = attestors.clone();
            let peer = PeerCredentials {
                pid: Some(child.0.id() as i32),
                uid: *uid,
                gid: *gid,
            };
            s.spawn(move || {
                for _ in 0..20 {
                    let got = strings(&attestors.attest(&peer).unwrap());
                    assert_eq!(
                        got.iter()
                            .filter(|s| s.starts_with("unix:uid:"))
                            .collect::<Vec<_>>(),
                        [&format!("unix:uid:{}", peer.uid)]
                    );
                }
            });
        }
    });
}
