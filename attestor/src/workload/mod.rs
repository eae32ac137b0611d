//! Workload attestors: given the peer credentials of a Workload API caller, return the
//! selectors that describe it. Selectors come only from the kernel (peer credentials, /proc),
//! never from anything the caller says about itself.
//!
//! The node agent builds a [`WorkloadAttestors`] from its config
//! ([`WorkloadAttestors::from_config`]) and calls [`WorkloadAttestors::attest`] (or
//! [`WorkloadAttestors::attest_connection`]) once per request. That reads the caller's /proc
//! facts once, into a [`ProcessSnapshot`] shared by every attestor, and refuses the whole
//! call ([`AttestError::ProcessGone`]) when the pid no longer names the same process by the
//! end (see [`process`] for how). A connection's accept time and the binary its process ran
//! then ([`ConnectionFacts`], recorded by [`WorkloadAttestors::observe_connection`]) are
//! checked against the process at call time: a process that started later, or that has
//! `exec`ed another binary since it connected, is refused.

pub mod cgroup;
pub mod config;
pub mod container;
pub mod process;
pub mod systemd;
pub mod unix;

use std::sync::{Arc, LazyLock};

pub use config::{ByteSize, WorkloadAttestorsConfig};
pub use container::ContainerAttestor;
pub use process::{FileVersion, ProcFs, ProcSource, ProcessSnapshot};
pub use systemd::SystemdAttestor;
pub use unix::UnixAttestor;

use crate::Selector;

/// The caller as the kernel reports it on the Unix socket (SO_PEERCRED).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCredentials {
    pub pid: Option<i32>,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    /// The pid no longer names the process that connected (it exited, or was reused).
    #[error("process {pid} exited while it was being attested")]
    ProcessGone { pid: i32 },
    /// The process is stopped (state `T`, e.g. by SIGSTOP): a stopped process cannot be
    /// making the call, so someone else holds its connection.
    #[error("process {pid} is stopped: a stopped process cannot be the caller")]
    Stopped { pid: i32 },
    /// The process runs another binary than when it connected: it `exec`ed since, and the
    /// connection belongs to the binary that made it, not to the one running now.
    #[error(
        "process {pid} runs another binary than when it connected ({now}, was {then}): \
         it exec'ed after connecting"
    )]
    ExeChanged {
        pid: i32,
        then: ExeIdentity,
        now: ExeIdentity,
    },
    /// A /proc file could not be read.
    #[error("reading {path}: {source}")]
    Proc {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A /proc file does not parse.
    #[error("{path} is malformed")]
    Malformed { path: String },
    /// Attesting this caller needs slow work (hashing a binary not seen before) and the
    /// snapshot was taken where that must not happen
    /// ([`WorkloadAttestors::attest_connection_without_blocking`]): attest again where it may.
    #[error("process {pid}: its binary must be hashed first, which is slow work")]
    WouldBlock { pid: i32 },
    /// The effective uid or gid differs from the peer credentials of the connection.
    #[error(
        "process {pid} now runs as uid {uid} gid {gid}, not as uid {peer_uid} gid {peer_gid} \
         that connected: its pid was reused or it changed credentials"
    )]
    CredentialsChanged {
        pid: i32,
        peer_uid: u32,
        peer_gid: u32,
        uid: u32,
        gid: u32,
    },
}

/// Which binary a process runs: the device and inode behind /proc/<pid>/exe (the file the
/// kernel executes, whatever is at its path now), or that it could not be read (another
/// user's process when the node agent is not root, a non-dumpable process).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExeIdentity {
    Inode { dev: u64, ino: u64 },
    Unreadable,
}

impl ExeIdentity {
    fn of(version: Result<FileVersion, impl std::fmt::Display>) -> Self {
        match version {
            Ok(v) => Self::Inode {
                dev: v.dev,
                ino: v.ino,
            },
            Err(_) => Self::Unreadable,
        }
    }
}

impl std::fmt::Display for ExeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Inode { dev, ino } => write!(f, "device {dev} inode {ino}"),
            Self::Unreadable => f.write_str("unreadable"),
        }
    }
}

/// What the node agent records about a caller when it accepts its connection, before it
/// reads anything from it; checked again at every call on that connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectionFacts {
    /// Clock ticks since boot ([`boot_time_ticks`]) at accept: a process that started later
    /// is not the one that connected (its pid was reused).
    pub connected_at: Option<u64>,
    /// The binary the process ran at accept. A process keeps its pid and start time across
    /// `exec`, so without this a process could connect, `exec` a binary registered for
    /// another identity (same uid), and let another process call on the connection as it.
    pub exe: Option<ExeIdentity>,
}

/// Selectors, and why the attestors left out some that they give other callers (e.g. no
/// `unix:sha256` for a binary above `max_binary_size`): what `agentd api selectors` shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attestation {
    pub selectors: Vec<Selector>,
    /// One sentence each, naming the selector left out and why.
    pub notes: Vec<String>,
}

/// A workload attestor.
pub trait WorkloadAttestor: Send + Sync + std::fmt::Debug {
    /// The attestor's name, e.g. `unix` (the selector type of most of what it produces).
    fn kind(&self) -> &'static str;

    /// Selectors for the caller, from its peer credentials and, when its pid is known, the
    /// snapshot of its /proc facts. The caller of this method must
    /// [`ProcessSnapshot::verify`] the snapshot before it uses the selectors.
    fn attest_process(
        &self,
        peer: &PeerCredentials,
        process: Option<&ProcessSnapshot>,
    ) -> Result<Vec<Selector>, AttestError>;

    /// As [`Self::attest_process`], with notes on the selectors left out. The default has
    /// no notes.
    fn attest_process_explained(
        &self,
        peer: &PeerCredentials,
        process: Option<&ProcessSnapshot>,
    ) -> Result<Attestation, AttestError> {
        Ok(Attestation {
            selectors: self.attest_process(peer, process)?,
            notes: Vec::new(),
        })
    }

    /// Selectors for the caller, read from the real /proc with the same checks as
    /// [`WorkloadAttestors::attest`]. When several attestors run on one call, use
    /// [`WorkloadAttestors`] instead, so that /proc is read once for all of them.
    fn attest(&self, peer: &PeerCredentials) -> Result<Vec<Selector>, AttestError> {
        attest_checked(peer, None, &REAL_PROC, true, |p| {
            self.attest_process(peer, p)
        })
    }
}

static REAL_PROC: LazyLock<Arc<dyn ProcSource>> = LazyLock::new(|| Arc::new(ProcFs::default()));

/// Takes the snapshot, checks the credentials and what was recorded at connect, runs
/// `attest`, checks the start time again.
fn attest_checked<T>(
    peer: &PeerCredentials,
    connection: Option<&ConnectionFacts>,
    source: &Arc<dyn ProcSource>,
    may_block: bool,
    attest: impl FnOnce(Option<&ProcessSnapshot>) -> Result<T, AttestError>,
) -> Result<T, AttestError> {
    // No pid (or 0: the caller is in a pid namespace we cannot see into): only the peer
    // credentials are known, and only selectors from them are given.
    let snapshot = match peer.pid {
        Some(pid) if pid > 0 => {
            let snapshot = ProcessSnapshot::take_from(source.clone(), pid)?;
            Some(if may_block {
                snapshot
            } else {
                snapshot.without_blocking()
            })
        }
        _ => None,
    };
    if let Some(process) = &snapshot {
        let connection = connection.copied().unwrap_or_default();
        if connection
            .connected_at
            .is_some_and(|at| process.start_time() > at)
        {
            // Started after the connection was made: not the process that made it.
            return Err(AttestError::ProcessGone { pid: process.pid() });
        }
        check_credentials(peer, process)?;
        if let Some(then) = connection.exe {
            // The snapshot caches this read, so the attestors' unix:path and unix:sha256
            // describe the very inode compared here.
            let now = ExeIdentity::of(process.exe_version());
            if now != then {
                process.verify()?;
                return Err(AttestError::ExeChanged {
                    pid: process.pid(),
                    then,
                    now,
                });
            }
        }
    }
    let selectors = attest(snapshot.as_ref())?;
    if let Some(process) = &snapshot {
        process.verify()?;
    }
    Ok(selectors)
}

/// The process must still run with the effective uid and gid the kernel saw at connect
/// time; anything else is another process on a reused pid, or one that changed identity.
fn check_credentials(peer: &PeerCredentials, process: &ProcessSnapshot) -> Result<(), AttestError> {
    let status = match process.status() {
        Ok(s) => s,
        Err(reason) => {
            process.verify()?;
            return Err(AttestError::Proc {
                path: format!("/proc/{}/status", process.pid()),
                source: std::io::Error::other(reason.to_string()),
            });
        }
    };
    let (Some(uids), Some(gids)) = (status.uids, status.gids) else {
        process.verify()?;
        return Err(AttestError::Malformed {
            path: format!("/proc/{}/status", process.pid()),
        });
    };
    if uids[1] != peer.uid || gids[1] != peer.gid {
        process.verify()?;
        return Err(AttestError::CredentialsChanged {
            pid: process.pid(),
            peer_uid: peer.uid,
            peer_gid: peer.gid,
            uid: uids[1],
            gid: gids[1],
        });
    }
    Ok(())
}

/// Clock ticks (1/100 s, the kernel's USER_HZ) since boot, from /proc/uptime: the clock
/// of the start times in /proc/<pid>/stat. Record it when a connection is accepted and pass
/// it to [`WorkloadAttestors::attest_connection`].
pub fn boot_time_ticks() -> Result<u64, AttestError> {
    let path = "/proc/uptime";
    let text = std::fs::read_to_string(path).map_err(|source| AttestError::Proc {
        path: path.into(),
        source,
    })?;
    parse_uptime_ticks(&text).ok_or_else(|| AttestError::Malformed { path: path.into() })
}

/// `12345.67 54321.00` -> 1234567.
fn parse_uptime_ticks(text: &str) -> Option<u64> {
    let first = text.split_ascii_whitespace().next()?;
    let (secs, frac) = first.split_once('.').unwrap_or((first, "0"));
    let secs: u64 = secs.parse().ok()?;
    if frac.is_empty() || frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let hundredths: u64 = format!("{frac:0<2}")[..2].parse().ok()?;
    secs.checked_mul(100)?.checked_add(hundredths)
}

/// The enabled workload attestors, run together on one snapshot of the caller.
#[derive(Debug)]
pub struct WorkloadAttestors {
    attestors: Vec<Box<dyn WorkloadAttestor>>,
    source: Arc<dyn ProcSource>,
}

impl Default for WorkloadAttestors {
    /// Every attestor, with its default settings.
    fn default() -> Self {
        Self::from_config(&WorkloadAttestorsConfig::default())
    }
}

impl WorkloadAttestors {
    /// The attestors the config enables, in the order unix, container, systemd.
    pub fn from_config(config: &WorkloadAttestorsConfig) -> Self {
        let mut attestors: Vec<Box<dyn WorkloadAttestor>> = Vec::new();
        if config.unix.enabled {
            attestors.push(Box::new(
                UnixAttestor::default().with_max_binary_size(config.unix.max_binary_size.bytes()),
            ));
        }
        if config.container.enabled {
            attestors.push(Box::new(
                ContainerAttestor::default().with_user_trees(config.container.rootless_containers),
            ));
        }
        if config.systemd.enabled {
            attestors.push(Box::new(SystemdAttestor));
        }
        Self::new(attestors)
    }

    pub fn new(attestors: Vec<Box<dyn WorkloadAttestor>>) -> Self {
        Self {
            attestors,
            source: REAL_PROC.clone(),
        }
    }

    /// Reads process facts from `source` instead of /proc (tests).
    pub fn with_proc_source(mut self, source: Arc<dyn ProcSource>) -> Self {
        self.source = source;
        self
    }

    /// The names of the enabled attestors.
    pub fn kinds(&self) -> Vec<&'static str> {
        self.attestors.iter().map(|a| a.kind()).collect()
    }

    /// Selectors for the caller from every enabled attestor, or an error and none at all.
    pub fn attest(&self, peer: &PeerCredentials) -> Result<Vec<Selector>, AttestError> {
        attest_checked(peer, None, &self.source, true, |process| {
            let mut selectors = Vec::new();
            for a in &self.attestors {
                selectors.extend(a.attest_process(peer, process)?);
            }
            Ok(selectors)
        })
    }

    /// What to record about a connection as it is accepted: the time, and the binary its
    /// process runs (read through this set's /proc source). Call it before reading anything
    /// from the connection, and pass the result to [`Self::attest_connection`].
    pub fn observe_connection(&self, peer: &PeerCredentials) -> ConnectionFacts {
        ConnectionFacts {
            connected_at: boot_time_ticks().ok(),
            exe: match peer.pid {
                Some(pid) if pid > 0 => Some(ExeIdentity::of(self.source.exe_version(pid))),
                _ => None,
            },
        }
    }

    /// As [`Self::attest`], and also refuses a process that started after the connection
    /// was accepted (the pid was reused between the connection and this call) or that runs
    /// another binary than it did then (it `exec`ed since).
    pub fn attest_connection(
        &self,
        peer: &PeerCredentials,
        connection: &ConnectionFacts,
    ) -> Result<Vec<Selector>, AttestError> {
        attest_checked(peer, Some(connection), &self.source, true, |process| {
            let mut selectors = Vec::new();
            for a in &self.attestors {
                selectors.extend(a.attest_process(peer, process)?);
            }
            Ok(selectors)
        })
    }

    /// As [`Self::attest_connection`], with each attestor's notes on the selectors it left
    /// out.
    pub fn attest_connection_explained(
        &self,
        peer: &PeerCredentials,
        connection: &ConnectionFacts,
    ) -> Result<Attestation, AttestError> {
        self.attest_connection_with(peer, connection, true)
    }

    /// As [`Self::attest_connection_explained`], but fit to run on an async runtime: a few
    /// small /proc and /etc reads, and [`AttestError::WouldBlock`] instead of hashing a
    /// binary whose hash is not cached yet (attest again with
    /// [`Self::attest_connection_explained`] on a thread that may block; the hash is cached
    /// from then on).
    pub fn attest_connection_without_blocking(
        &self,
        peer: &PeerCredentials,
        connection: &ConnectionFacts,
    ) -> Result<Attestation, AttestError> {
        self.attest_connection_with(peer, connection, false)
    }

    fn attest_connection_with(
        &self,
        peer: &PeerCredentials,
        connection: &ConnectionFacts,
        may_block: bool,
    ) -> Result<Attestation, AttestError> {
        attest_checked(peer, Some(connection), &self.source, may_block, |process| {
            let mut all = Attestation::default();
            for a in &self.attestors {
                let one = a.attest_process_explained(peer, process)?;
                all.selectors.extend(one.selectors);
                all.notes.extend(one.notes);
            }
            Ok(all)
        })
    }
}

#[cfg(test)]
mod tests;
