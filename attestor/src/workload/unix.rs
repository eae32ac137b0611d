//! The `unix` workload attestor: `unix:uid:N`, `unix:gid:N` from the socket's peer
//! credentials, plus `unix:user:NAME` and `unix:group:NAME` when the ids resolve in
//! /etc/passwd and /etc/group.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{AttestError, PeerCredentials, WorkloadAttestor};
use crate::Selector;

/// The unix attestor. The account files are configurable for tests.
#[derive(Debug)]
pub struct UnixAttestor {
    passwd: AccountFile,
    group: AccountFile,
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
        }
    }
}

/// What identifies one version of a file: a change of any of these means a re-read.
type FileVersion = (u64, u64, i64, i64, u64);
/// id -> name.
type Names = Arc<HashMap<u32, String>>;

/// A passwd/group style file (`name:x:id:...`), parsed once per version of the file: every
/// Workload API call attests its caller, and re-reading the file each time costs more than
/// the rest of the call.
#[derive(Debug)]
struct AccountFile {
    path: PathBuf,
    cache: Mutex<Option<(FileVersion, Names)>>,
}

impl AccountFile {
    fn new(path: PathBuf) -> Self {
        Self {
            path,
            cache: Mutex::new(None),
        }
    }

    fn version(path: &Path) -> Option<FileVersion> {
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

    fn attest(&self, peer: &PeerCredentials) -> Result<Vec<Selector>, AttestError> {
        let mut out = Vec::with_capacity(4);
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
        if let Some(group) = self.group.name_for_id(peer.gid) {
            push(format!("group:{group}"));
        }
        Ok(out)
    }
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
                pid: Some(1),
                uid: 4242,
                gid: 4343,
            })
            .unwrap();
        let got: Vec<String> = got.iter().map(ToString::to_string).collect();
        assert_eq!(got, ["unix:uid:4242", "unix:gid:4343"]);
    }
}
