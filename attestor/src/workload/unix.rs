//! The `unix` workload attestor: `unix:uid:N`, `unix:gid:N` from the socket's peer
//! credentials, plus `unix:user:NAME` and `unix:group:NAME` when the ids resolve in
//! /etc/passwd and /etc/group.

use std::path::PathBuf;

use super::{AttestError, PeerCredentials, WorkloadAttestor};
use crate::Selector;

/// The unix attestor. The account files are configurable for tests.
#[derive(Debug, Clone)]
pub struct UnixAttestor {
    passwd: PathBuf,
    group: PathBuf,
}

impl Default for UnixAttestor {
    fn default() -> Self {
        Self {
            passwd: PathBuf::from("/etc/passwd"),
            group: PathBuf::from("/etc/group"),
        }
    }
}

impl UnixAttestor {
    pub fn with_account_files(passwd: PathBuf, group: PathBuf) -> Self {
        Self { passwd, group }
    }
}

/// The name for `id` in a passwd/group style file (`name:x:id:...`), if any.
fn name_for_id(path: &std::path::Path, id: u32) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let _password = fields.next()?;
            let field_id: u32 = fields.next()?.parse().ok()?;
            (field_id == id && !name.is_empty()).then(|| name.to_string())
        })
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
        if let Some(user) = name_for_id(&self.passwd, peer.uid) {
            push(format!("user:{user}"));
        }
        push(format!("gid:{}", peer.gid));
        if let Some(group) = name_for_id(&self.group, peer.gid) {
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
