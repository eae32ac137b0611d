//! The `unix` workload attestor.
//!
//! - `unix:uid:N`, `unix:gid:N` from the socket's peer credentials (what the kernel saw at
//!   connect time), `unix:user:NAME` and `unix:group:NAME` when the ids resolve in
//!   /etc/passwd and /etc/group;
//! - `unix:supplementary_gid:N` and `unix:supplementary_group:NAME` from the `Groups:` line
//!   of /proc/<pid>/status;
//! - `unix:path:/usr/bin/x` where /proc/<pid>/exe points (none when that file was deleted
//!   or replaced since the process started: the path names another file now);
//! - `unix:sha256:<hex>` of the binary, read through /proc/<pid>/exe (the inode the process
//!   runs, whatever now sits at its path), up to a configurable size, cached by the file's
//!   (device, inode, size, mtime, ctime).

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::process::{FileVersion, ProcessSnapshot};
use super::{AttestError, Attestation, PeerCredentials, WorkloadAttestor};
use crate::Selector;

/// Binaries larger than this get no `unix:sha256` selector unless configured otherwise.
pub const DEFAULT_MAX_BINARY_SIZE: u64 = 128 * 1024 * 1024;

/// Binary hashes kept; the cache is emptied when it would grow past this.
const MAX_CACHED_HASHES: usize = 4096;

/// The unix attestor. The account files are configurable for tests.
#[derive(Debug)]
pub struct UnixAttestor {
    passwd: AccountFile,
    group: AccountFile,
    max_binary_size: u64,
    /// Binary version -> its SHA-256 in hex, or `None` when it is too large to hash (so
    /// the warning is logged once per binary, not once per call).
    hashes: Mutex<HashMap<FileVersion, Option<Arc<str>>>>,
}

impl Default for UnixAttestor {
    fn default() -> Self {
        Self::with_account_files(PathBuf::from("/etc/passwd"), PathBuf::from("/etc/group"))
    }
}

impl UnixAttestor {
    pub fn with_account_files(passwd: PathBuf, group: PathBuf) -> Self {
        Self {
            passwd: AccountFile::new(passwd),
            group: AccountFile::new(group),
            max_binary_size: DEFAULT_MAX_BINARY_SIZE,
            hashes: Mutex::new(HashMap::new()),
        }
    }

    /// Binaries larger than `bytes` get no `unix:sha256` selector; 0 turns it off.
    pub fn with_max_binary_size(mut self, bytes: u64) -> Self {
        self.max_binary_size = bytes;
        self
    }

    pub fn max_binary_size(&self) -> u64 {
        self.max_binary_size
    }

    /// The SHA-256 (hex) of the binary `process` runs, from the cache when that version of
    /// the file was hashed before; or why there is none, as a note for the caller.
    fn binary_sha256(&self, process: &ProcessSnapshot) -> Result<Arc<str>, NoHash> {
        if self.max_binary_size == 0 {
            return Err(NoHash::Note(
                "no unix:sha256 selector: binary hashing is off (max_binary_size = 0)".into(),
            ));
        }
        let version = match process.exe_version() {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!(pid = process.pid(), reason = e, "no unix:sha256 selector");
                return Err(NoHash::Note(format!("no unix:sha256 selector: {e}")));
            }
        };
        let too_large = |size: u64| {
            format!(
                "no unix:sha256 selector: the binary is {size} bytes, more than max_binary_size \
                 ({} bytes) in the node agent's [workload_attestors.unix] config",
                self.max_binary_size
            )
        };
        if let Some(hit) = self.lock_hashes().get(&version) {
            return hit
                .clone()
                .ok_or_else(|| NoHash::Note(too_large(version.size)));
        }
        // Too large is known from the stat alone: decided (and cached) in place, without a
        // hop to the blocking pool.
        if version.size <= self.max_binary_size && !process.may_block() {
            return Err(NoHash::WouldBlock);
        }
        let hash = if version.size > self.max_binary_size {
            tracing::warn!(
                pid = process.pid(),
                size = version.size,
                max_binary_size = self.max_binary_size,
                "binary is larger than max_binary_size: no unix:sha256 selector"
            );
            None
        } else {
            match hash_binary(process, version, self.max_binary_size) {
                Ok(h) => Some(Arc::<str>::from(h)),
                Err(reason) => {
                    // Not cached: the file may be readable next time.
                    tracing::warn!(pid = process.pid(), %reason, "no unix:sha256 selector");
                    return Err(NoHash::Note(format!("no unix:sha256 selector: {reason}")));
                }
            }
        };
        let mut hashes = self.lock_hashes();
        if hashes.len() >= MAX_CACHED_HASHES {
            hashes.clear();
        }
        hashes.insert(version, hash.clone());
        hash.ok_or_else(|| NoHash::Note(too_large(version.size)))
    }

    fn lock_hashes(&self) -> std::sync::MutexGuard<'_, HashMap<FileVersion, Option<Arc<str>>>> {
        self.hashes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Why there is no `unix:sha256` selector.
enum NoHash {
    /// For the caller to read (`agentd api selectors`).
    Note(String),
    /// The hash is not cached and the snapshot may not do the slow work of hashing.
    WouldBlock,
}

/// Hashes the binary through /proc/<pid>/exe, making sure that what was read is the
/// version `expected` from start to end (a file rewritten meanwhile is not hashed).
fn hash_binary(
    process: &ProcessSnapshot,
    expected: FileVersion,
    max: u64,
) -> Result<String, String> {
    let file = process
        .open_exe()
        .map_err(|e| format!("opening the binary: {e}"))?;
    let version_now = |f: &std::fs::File| {
        f.metadata()
            .map(|m| FileVersion::of(&m))
            .map_err(|e| format!("reading the binary's metadata: {e}"))
    };
    if version_now(&file)? != expected {
        return Err("the binary changed while it was being read".into());
    }
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    let mut total: u64 = 0;
    let mut reader = (&file).take(max.saturating_add(1));
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("reading the binary: {e}")),
        };
        ctx.update(&buf[..n]);
        total += n as u64;
    }
    if total != expected.size || version_now(&file)? != expected {
        return Err("the binary changed while it was being read".into());
    }
    Ok(hex::encode(ctx.finish().as_ref()))
}

/// What identifies one version of an account file: a change of any of these means a re-read.
type AccountVersion = (u64, u64, i64, i64, u64);
/// id -> name.
type Names = Arc<HashMap<u32, String>>;

/// A passwd/group style file (`name:x:id:...`), parsed once per version of the file: every
/// Workload API call attests its caller, and re-reading the file each time costs more than
/// the rest of the call.
#[derive(Debug)]
struct AccountFile {
    path: PathBuf,
    cache: Mutex<Option<(AccountVersion, Names)>>,
}

impl AccountFile {
    fn new(path: PathBuf) -> Self {
        Self {
            path,
            cache: Mutex::new(None),
        }
    }

    fn version(path: &Path) -> Option<AccountVersion> {
        let m = std::fs::metadata(path).ok()?;
        Some((m.dev(), m.ino(), m.mtime(), m.mtime_nsec(), m.len()))
    }

    fn names(&self) -> Option<Names> {
        let version = Self::version(&self.path)?;
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((v, names)) = cache.as_ref() {
            if *v == version {
                return Some(names.clone());
            }
        }
        let names = Arc::new(parse_account_file(
            &std::fs::read_to_string(&self.path).ok()?,
        ));
        *cache = Some((version, names.clone()));
        Some(names)
    }

    fn name_for_id(&self, id: u32) -> Option<String> {
        self.names()?.get(&id).cloned()
    }
}

/// id -> name; the first line naming an id wins, as with getpwuid.
fn parse_account_file(text: &str) -> HashMap<u32, String> {
    let mut out = HashMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let mut fields = line.split(':');
        let (Some(name), Some(_password), Some(id)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if let Ok(id) = id.parse::<u32>() {
            if !name.is_empty() {
                out.entry(id).or_insert_with(|| name.to_string());
            }
        }
    }
    out
}

impl WorkloadAttestor for UnixAttestor {
    fn kind(&self) -> &'static str {
        "unix"
    }

    fn attest_process(
        &self,
        peer: &PeerCredentials,
        process: Option<&ProcessSnapshot>,
    ) -> Result<Vec<Selector>, AttestError> {
        Ok(self.attest_process_explained(peer, process)?.selectors)
    }

    fn attest_process_explained(
        &self,
        peer: &PeerCredentials,
        process: Option<&ProcessSnapshot>,
    ) -> Result<Attestation, AttestError> {
        let mut notes = Vec::new();
        let mut out = Vec::with_capacity(8);
        let mut push = |value: String| {
            // Values built here are always valid; an invalid account name is skipped.
            if let Ok(s) = Selector::new("unix", value) {
                out.push(s);
            }
        };
        push(format!("uid:{}", peer.uid));
        if let Some(user) = self.passwd.name_for_id(peer.uid) {
            push(format!("user:{user}"));
        }
        push(format!("gid:{}", peer.gid));
        // Looked up once per call: each lookup checks the file's version.
        let groups = self.group.names();
        let group_name = |gid: u32| groups.as_ref().and_then(|g| g.get(&gid));
        if let Some(group) = group_name(peer.gid) {
            push(format!("group:{group}"));
        }
        let Some(process) = process else {
            return Ok(Attestation {
                selectors: out,
                notes,
            });
        };
        match process.status() {
            Ok(status) => {
                for gid in &status.groups {
                    push(format!("supplementary_gid:{gid}"));
                }
                for gid in &status.groups {
                    if let Some(group) = group_name(*gid) {
                        push(format!("supplementary_group:{group}"));
                    }
                }
            }
            Err(reason) => {
                tracing::debug!(
                    pid = process.pid(),
                    reason,
                    "no supplementary group selectors"
                )
            }
        }
        match process.exe_path() {
            // The kernel appends " (deleted)" when the file is gone from its path; the
            // path would then name another file (or none).
            Ok(path) if is_usable_path(path) => push(format!("path:{}", path.display())),
            Ok(path) => tracing::debug!(
                pid = process.pid(),
                path = %path.display(),
                "binary no longer at its path: no unix:path selector"
            ),
            Err(reason) => tracing::debug!(pid = process.pid(), reason, "no unix:path selector"),
        }
        match self.binary_sha256(process) {
            Ok(hash) => push(format!("sha256:{hash}")),
            Err(NoHash::Note(note)) => notes.push(note),
            Err(NoHash::WouldBlock) => return Err(AttestError::WouldBlock { pid: process.pid() }),
        }
        Ok(Attestation {
            selectors: out,
            notes,
        })
    }
}

fn is_usable_path(path: &Path) -> bool {
    path.is_absolute()
        && path
            .to_str()
            .is_some_and(|p| !p.ends_with(" (deleted)") && !p.chars().any(char::is_control))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_gid_and_names_from_account_files() {
        let dir = tempfile::tempdir().unwrap();
        let passwd = dir.path().join("passwd");
        let group = dir.path().join("group");
        std::fs::write(
            &passwd,
            "root:x:0:0::/root:/bin/sh\nalice:x:1000:1000::/h:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(&group, "root:x:0:\nstaff:x:1000:alice\n").unwrap();
        let attestor = UnixAttestor::with_account_files(passwd, group);
        let got = attestor
            .attest(&PeerCredentials {
                pid: None,
                uid: 1000,
                gid: 1000,
            })
            .unwrap();
        let got: Vec<String> = got.iter().map(ToString::to_string).collect();
        assert_eq!(
            got,
            [
                "unix:uid:1000",
                "unix:user:alice",
                "unix:gid:1000",
                "unix:group:staff"
            ]
        );
    }

    #[test]
    fn a_changed_account_file_is_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let passwd = dir.path().join("passwd");
        let group = dir.path().join("group");
        std::fs::write(&passwd, "alice:x:1000:1000::/h:/bin/sh\n").unwrap();
        std::fs::write(&group, "").unwrap();
        let attestor = UnixAttestor::with_account_files(passwd.clone(), group);
        let peer = PeerCredentials {
            pid: None,
            uid: 1000,
            gid: 1000,
        };
        let names = |a: &UnixAttestor| {
            a.attest(&peer)
                .unwrap()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        };
        assert!(names(&attestor).contains(&"unix:user:alice".to_string()));
        // Renamed account: a different length is enough to notice, whatever the mtime.
        std::fs::write(&passwd, "alicia:x:1000:1000::/h:/bin/sh\n").unwrap();
        assert!(names(&attestor).contains(&"unix:user:alicia".to_string()));
    }

    #[test]
    fn unknown_ids_give_numeric_selectors_only() {
        let dir = tempfile::tempdir().unwrap();
        let attestor = UnixAttestor::with_account_files(
            dir.path().join("missing-passwd"),
            dir.path().join("missing-group"),
        );
        let got = attestor
            .attest(&PeerCredentials {
                pid: None,
                uid: 4242,
                gid: 4343,
            })
            .unwrap();
        let got: Vec<String> = got.iter().map(ToString::to_string).collect();
        assert_eq!(got, ["unix:uid:4242", "unix:gid:4343"]);
    }
}
