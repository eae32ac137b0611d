//! Reading the facts of one process from /proc, once per attestation, between two reads of
//! its start time.
//!
//! The Workload API knows its caller by pid (from the socket's peer credentials). A pid can
//! be reused once its process has exited, so every fact read from /proc/<pid>/... could
//! belong to another process. [`ProcessSnapshot`] reads the start time (field 22 of
//! /proc/<pid>/stat) when it is taken, each fact at most once when an attestor first asks
//! for it, and [`ProcessSnapshot::verify`] reads the start time again: when the two differ,
//! or the process is gone or a zombie, the whole attestation fails with
//! [`AttestError::ProcessGone`] and no selector from it is used. A stopped process (state
//! `T`) is refused with [`AttestError::Stopped`] at either read.
//!
//! From the real /proc, a snapshot opens the process's directory once ([`ProcDir`]) and reads
//! every file relative to it (`openat(2)`): the path to the process is resolved once per call
//! rather than once per file, and a directory fd stays bound to the process it was opened
//! for: once that process is reaped, its files fail with ESRCH, even if the pid is reused.
//! The start-time check stays all the same. None of these files takes the process's memory
//! lock (unlike `cmdline` or `environ`), so reading them does not wait on the process.

use std::cell::OnceCell;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fd::OwnedFd;
use rustix::fs::{AtFlags, Mode, OFlags};

use super::AttestError;

/// What identifies one version of a file: device, inode, size, mtime and ctime. The ctime
/// cannot be set by a user, so rewriting a file in place and restoring its mtime still
/// changes the version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileVersion {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
}

impl FileVersion {
    pub fn of(m: &std::fs::Metadata) -> Self {
        Self {
            dev: m.dev(),
            ino: m.ino(),
            size: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }

    fn of_stat(st: &rustix::fs::Stat) -> Self {
        Self {
            dev: st.st_dev,
            ino: st.st_ino,
            size: u64::try_from(st.st_size).unwrap_or(0),
            mtime: (st.st_mtime, i64::try_from(st.st_mtime_nsec).unwrap_or(0)),
            ctime: (st.st_ctime, i64::try_from(st.st_ctime_nsec).unwrap_or(0)),
        }
    }
}

/// Where process facts come from: the real /proc, or a fake in tests.
pub trait ProcSource: Send + Sync + fmt::Debug {
    /// The text of `/proc/<pid>/<name>` (`stat`, `status`, `cgroup`).
    fn read(&self, pid: i32, name: &str) -> io::Result<String>;
    /// The target of `/proc/<pid>/exe`.
    fn exe_path(&self, pid: i32) -> io::Result<PathBuf>;
    /// The version of the file `/proc/<pid>/exe` points to (the inode the process runs,
    /// even when its path was since replaced or deleted).
    fn exe_version(&self, pid: i32) -> io::Result<FileVersion>;
    /// The binary itself, opened through `/proc/<pid>/exe`.
    fn open_exe(&self, pid: i32) -> io::Result<File>;
    /// The process's directory, for a snapshot to read every fact through it; `None` (the
    /// default, for sources that are not a procfs) has each fact read by the methods above.
    fn open_dir(&self, _pid: i32) -> Option<io::Result<ProcDir>> {
        None
    }
}

/// The real /proc (or another procfs mount).
#[derive(Debug, Clone)]
pub struct ProcFs {
    root: PathBuf,
}

impl Default for ProcFs {
    fn default() -> Self {
        Self::new("/proc")
    }
}

impl ProcFs {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    fn path(&self, pid: i32, name: &str) -> PathBuf {
        let mut p = self.root.join(pid.to_string());
        p.push(name);
        p
    }
}

/// Longest /proc text file we read; a larger one is an error, not an allocation.
const MAX_PROC_FILE: u64 = 256 * 1024;

impl ProcSource for ProcFs {
    fn read(&self, pid: i32, name: &str) -> io::Result<String> {
        use std::io::Read;
        let mut text = String::new();
        File::open(self.path(pid, name))?
            .take(MAX_PROC_FILE)
            .read_to_string(&mut text)?;
        Ok(text)
    }

    fn exe_path(&self, pid: i32) -> io::Result<PathBuf> {
        std::fs::read_link(self.path(pid, "exe"))
    }

    fn exe_version(&self, pid: i32) -> io::Result<FileVersion> {
        std::fs::metadata(self.path(pid, "exe")).map(|m| FileVersion::of(&m))
    }

    fn open_exe(&self, pid: i32) -> io::Result<File> {
        File::open(self.path(pid, "exe"))
    }

    fn open_dir(&self, pid: i32) -> Option<io::Result<ProcDir>> {
        Some(ProcDir::open(&self.root.join(pid.to_string())))
    }
}

/// One process's directory in a procfs, open: its files are read relative to it.
#[derive(Debug)]
pub struct ProcDir {
    dir: OwnedFd,
    /// `stat`, kept open after its first read: the snapshot reads it again at the end, and
    /// a procfs file read again from offset 0 is generated afresh.
    stat: std::cell::OnceCell<OwnedFd>,
}

/// The whole text of an open procfs file, read from offset 0 (so from a fresh generation of
/// it), at most [`MAX_PROC_FILE`] bytes.
fn read_whole(fd: &OwnedFd, name: &str) -> io::Result<String> {
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    loop {
        // These files are generated whole by the first read (seq_file `single_open`), so a
        // read that fills less than it was given has reached the end: no second read just
        // to see 0.
        if len > 0 && len < buf.len() {
            break;
        }
        if len == buf.len() {
            if buf.len() as u64 >= MAX_PROC_FILE {
                return Err(io::Error::other(format!(
                    "{name} is longer than {MAX_PROC_FILE} bytes"
                )));
            }
            buf.resize(buf.len() * 2, 0);
        }
        match rustix::io::pread(fd, &mut buf[len..], len as u64) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    buf.truncate(len);
    String::from_utf8(buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

impl ProcDir {
    /// Opens `/proc/<pid>` (ENOENT when there is no such process).
    pub fn open(path: &Path) -> io::Result<Self> {
        let dir = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Self {
            dir,
            stat: std::cell::OnceCell::new(),
        })
    }

    /// The text of one file (`stat`, `status`, `cgroup`), at most [`MAX_PROC_FILE`] bytes,
    /// as it is now.
    pub fn read(&self, name: &str) -> io::Result<String> {
        if name == "stat" {
            if let Some(fd) = self.stat.get() {
                return read_whole(fd, name);
            }
        }
        let fd = rustix::fs::openat(
            &self.dir,
            name,
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let text = read_whole(&fd, name)?;
        if name == "stat" {
            let _ = self.stat.set(fd);
        }
        Ok(text)
    }

    /// Where `exe` points.
    pub fn exe_path(&self) -> io::Result<PathBuf> {
        let target = rustix::fs::readlinkat(&self.dir, "exe", Vec::new())?;
        Ok(PathBuf::from(std::ffi::OsString::from_vec(
            target.into_bytes(),
        )))
    }

    /// The version of the file `exe` points to.
    pub fn exe_version(&self) -> io::Result<FileVersion> {
        let st = rustix::fs::statat(&self.dir, "exe", AtFlags::empty())?;
        Ok(FileVersion::of_stat(&st))
    }

    /// The binary, opened through `exe`.
    pub fn open_exe(&self) -> io::Result<File> {
        let fd = rustix::fs::openat(
            &self.dir,
            "exe",
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(File::from(fd))
    }
}

/// The fields of /proc/<pid>/stat we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// Field 3: `R`, `S`, `Z`...
    pub state: char,
    /// Field 22: start time in clock ticks after boot.
    pub start_time: u64,
}

/// Parses /proc/<pid>/stat. The command name (field 2) is in parentheses and may itself
/// contain spaces and parentheses, so fields are counted from after the last `)`.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    // After ')' come fields 3 (state) to 52; start time is field 22.
    let state = fields.next()?;
    let mut state_chars = state.chars();
    let state_char = state_chars.next()?;
    if state_chars.next().is_some() {
        return None;
    }
    let start_time = fields.nth(22 - 4)?.parse().ok()?;
    Some(Stat {
        state: state_char,
        start_time,
    })
}

/// The lines of /proc/<pid>/status we use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// `Uid:` real, effective, saved, filesystem.
    pub uids: Option<[u32; 4]>,
    /// `Gid:` real, effective, saved, filesystem.
    pub gids: Option<[u32; 4]>,
    /// `Groups:` supplementary group ids, in the kernel's order, without repeats.
    pub groups: Vec<u32>,
}

/// Parses /proc/<pid>/status; unknown or malformed lines are ignored, a malformed `Uid:` or
/// `Gid:` line is left `None`, a malformed id in `Groups:` is skipped.
pub fn parse_status(text: &str) -> Status {
    fn four(v: &str) -> Option<[u32; 4]> {
        let mut it = v.split_ascii_whitespace().map(|s| s.parse::<u32>().ok());
        let out = [it.next()??, it.next()??, it.next()??, it.next()??];
        it.next().is_none().then_some(out)
    }
    let mut status = Status::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        match key {
            "Uid" => status.uids = four(value),
            "Gid" => status.gids = four(value),
            "Groups" => {
                for g in value.split_ascii_whitespace() {
                    if let Ok(g) = g.parse::<u32>() {
                        if !status.groups.contains(&g) {
                            status.groups.push(g);
                        }
                    }
                }
            }
            _ => {}
        }
    }
    status
}

/// A fact read once: the value, or why it could not be read.
type Fact<T> = OnceCell<Result<T, String>>;

/// The facts of one process, each read at most once, all covered by one start-time check.
///
/// Take one per attestation ([`ProcessSnapshot::take`]), hand it to every attestor, then call
/// [`ProcessSnapshot::verify`] before using any selector.
pub struct ProcessSnapshot {
    pid: i32,
    source: Arc<dyn ProcSource>,
    /// The process's directory, when the source is a procfs.
    dir: Option<ProcDir>,
    /// Whether an attestor may do slow work (hash a binary) on this call; see
    /// [`AttestError::WouldBlock`].
    may_block: bool,
    start_time: u64,
    status: Fact<Status>,
    cgroup: Fact<String>,
    exe_path: Fact<PathBuf>,
    exe_version: Fact<FileVersion>,
}

impl fmt::Debug for ProcessSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProcessSnapshot")
            .field("pid", &self.pid)
            .field("start_time", &self.start_time)
            .finish_non_exhaustive()
    }
}

fn read_stat(
    source: &dyn ProcSource,
    dir: Option<&ProcDir>,
    pid: i32,
) -> Result<Stat, AttestError> {
    let text = match dir {
        Some(dir) => dir.read("stat"),
        None => source.read(pid, "stat"),
    }
    .map_err(|e| gone_or(pid, "stat", e))?;
    let stat = parse_stat(&text).ok_or_else(|| AttestError::Malformed {
        path: format!("/proc/{pid}/stat"),
    })?;
    // A zombie has exited: whoever holds its connection now, it is not that process.
    if matches!(stat.state, 'Z' | 'X' | 'x') {
        return Err(AttestError::ProcessGone { pid });
    }
    // Stopped (SIGSTOP and friends; a group stop halts every thread): it cannot be making
    // a call, so another process holds its connection. A tracing stop (`t`) can be one
    // thread's, with others running, and is not refused.
    if stat.state == 'T' {
        return Err(AttestError::Stopped { pid });
    }
    Ok(stat)
}

fn gone_or(pid: i32, name: &str, e: io::Error) -> AttestError {
    // ESRCH: the process went away while the file was open.
    if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(3) {
        AttestError::ProcessGone { pid }
    } else {
        AttestError::Proc {
            path: format!("/proc/{pid}/{name}"),
            source: e,
        }
    }
}

impl ProcessSnapshot {
    /// Starts a snapshot of `pid` from the real /proc: reads its start time.
    pub fn take(pid: i32) -> Result<Self, AttestError> {
        Self::take_from(Arc::new(ProcFs::default()), pid)
    }

    /// Starts a snapshot of `pid` from `source`.
    pub fn take_from(source: Arc<dyn ProcSource>, pid: i32) -> Result<Self, AttestError> {
        if pid <= 0 {
            return Err(AttestError::ProcessGone { pid });
        }
        let dir = match source.open_dir(pid) {
            Some(opened) => Some(opened.map_err(|e| gone_or(pid, "", e))?),
            None => None,
        };
        let start_time = read_stat(source.as_ref(), dir.as_ref(), pid)?.start_time;
        Ok(Self {
            pid,
            source,
            dir,
            may_block: true,
            start_time,
            status: OnceCell::new(),
            cgroup: OnceCell::new(),
            exe_path: OnceCell::new(),
            exe_version: OnceCell::new(),
        })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Marks the snapshot as taken where slow work must not be done (an async runtime):
    /// an attestor that would have to hash a binary answers [`AttestError::WouldBlock`].
    pub fn without_blocking(mut self) -> Self {
        self.may_block = false;
        self
    }

    /// False when attestors must not do slow work on this call (see
    /// [`Self::without_blocking`]).
    pub fn may_block(&self) -> bool {
        self.may_block
    }

    /// Start time (clock ticks after boot) read when the snapshot was taken.
    pub fn start_time(&self) -> u64 {
        self.start_time
    }

    fn fact<'a, T>(
        &self,
        cell: &'a Fact<T>,
        what: &str,
        read: impl FnOnce() -> io::Result<T>,
    ) -> Result<&'a T, &'a str> {
        cell.get_or_init(|| read().map_err(|e| format!("/proc/{}/{what}: {e}", self.pid)))
            .as_ref()
            .map_err(String::as_str)
    }

    /// /proc/<pid>/status, parsed.
    pub fn status(&self) -> Result<&Status, &str> {
        self.fact(&self.status, "status", || {
            self.read("status").map(|t| parse_status(&t))
        })
    }

    /// /proc/<pid>/cgroup, as text.
    pub fn cgroup(&self) -> Result<&str, &str> {
        self.fact(&self.cgroup, "cgroup", || self.read("cgroup"))
            .map(String::as_str)
    }

    /// Where /proc/<pid>/exe points.
    pub fn exe_path(&self) -> Result<&Path, &str> {
        self.fact(&self.exe_path, "exe", || match &self.dir {
            Some(dir) => dir.exe_path(),
            None => self.source.exe_path(self.pid),
        })
        .map(PathBuf::as_path)
    }

    /// The version of the binary the process runs.
    pub fn exe_version(&self) -> Result<FileVersion, &str> {
        self.fact(&self.exe_version, "exe", || match &self.dir {
            Some(dir) => dir.exe_version(),
            None => self.source.exe_version(self.pid),
        })
        .copied()
    }

    /// The binary the process runs, opened through /proc/<pid>/exe.
    pub fn open_exe(&self) -> io::Result<File> {
        match &self.dir {
            Some(dir) => dir.open_exe(),
            None => self.source.open_exe(self.pid),
        }
    }

    fn read(&self, name: &str) -> io::Result<String> {
        match &self.dir {
            Some(dir) => dir.read(name),
            None => self.source.read(self.pid, name),
        }
    }

    /// Reads the start time again: `Ok` when the process is still the one the snapshot
    /// started with, so every fact read in between is its own.
    pub fn verify(&self) -> Result<(), AttestError> {
        let now = read_stat(self.source.as_ref(), self.dir.as_ref(), self.pid)?;
        if now.start_time != self.start_time {
            return Err(AttestError::ProcessGone { pid: self.pid });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "1234 (sleep) S 1 1234 1234 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 \
                        987654 8634368 200 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";

    #[test]
    fn stat_start_time_is_field_22() {
        let s = parse_stat(STAT).unwrap();
        assert_eq!(s.state, 'S');
        assert_eq!(s.start_time, 987654);
    }

    #[test]
    fn stat_command_name_may_hold_spaces_and_parentheses() {
        let evil = STAT.replace(
            "(sleep)",
            "(a) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 (b)",
        );
        assert_eq!(parse_stat(&evil).unwrap().start_time, 987654);
        let evil = STAT.replace("(sleep)", "(() ) (()");
        assert_eq!(parse_stat(&evil).unwrap().start_time, 987654);
    }

    #[test]
    fn stat_garbage_is_none_never_a_panic() {
        for text in [
            "",
            ")",
            "(",
            "1 (x)",
            "1 (x) S",
            "1 (x) SS 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
            "1 (x) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 -5",
            "1 (x) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 99999999999999999999999",
            "\u{0}\u{ffff})é",
            "1 (x)é S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
        ] {
            let _ = parse_stat(text);
        }
        assert!(parse_stat("1 (x) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18").is_none());
        assert_eq!(
            parse_stat("1 (x) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 42")
                .unwrap()
                .start_time,
            42
        );
    }

    #[test]
    fn status_uids_gids_and_groups() {
        let s = parse_status(
            "Name:\tsleep\nUid:\t1000\t1001\t1002\t1003\nGid:\t10\t11\t12\t13\n\
             Groups:\t4 24 27 24 \nVmRSS:\t1 kB\n",
        );
        assert_eq!(s.uids, Some([1000, 1001, 1002, 1003]));
        assert_eq!(s.gids, Some([10, 11, 12, 13]));
        assert_eq!(s.groups, [4, 24, 27]);
        assert_eq!(parse_status("Groups:\n").groups, Vec::<u32>::new());
    }

    #[test]
    fn status_garbage_never_panics() {
        for text in [
            "",
            ":",
            "Uid:",
            "Uid:\t1 2 3",
            "Uid:\t1 2 3 4 5",
            "Uid:\ta b c d",
            "Groups:\t-1 x 4294967296 7",
            "Gid\n\n\n::::",
            "\u{0}Groups:\u{0}",
        ] {
            let s = parse_status(text);
            assert!(s.uids.is_none() && s.gids.is_none());
        }
        assert_eq!(parse_status("Groups:\t-1 x 4294967296 7").groups, [7]);
    }
}
