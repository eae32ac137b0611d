//! Parsing /proc/<pid>/cgroup: container id, Kubernetes pod uid and QoS class, systemd unit.
//!
//! Each line is `hierarchy-id:controllers:path`. Under cgroup v2 there is one line,
//! `0::/path`; under v1 one line per hierarchy (`4:memory:/docker/<id>`,
//! `1:name=systemd:/...`); in hybrid mode both.
//!
//! What a process can forge: a process may create cgroups below its own one when that
//! cgroup is delegated to it (a `Delegate=yes` unit such as a container scope, or a user's
//! whole `user@<uid>.service` tree) and move itself there, naming them as it likes. So:
//! - the container id is the **outermost** one on the path (placed by the runtime that
//!   started the container; anything below may be the container's own choice), and ids in a
//!   user's delegated tree (`user@<uid>.service/...`, rootless containers) are ignored
//!   unless asked for;
//! - the systemd unit is found by walking the path as systemd lays it out (slices, then one
//!   unit; inside `user@<uid>.service` again slices then one unit) and stopping at the first
//!   unit: cgroups created inside a unit's delegated tree are not units.

/// Kubernetes pod QoS class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl QosClass {
    pub fn as_str(self) -> &'static str {
        match self {
            QosClass::Guaranteed => "guaranteed",
            QosClass::Burstable => "burstable",
            QosClass::BestEffort => "besteffort",
        }
    }
}

/// The container facts of one cgroup file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerInfo {
    /// 64 lowercase hex digits.
    pub container_id: Option<String>,
    /// Lowercase, dashed: `2c9d4a4a-0d5d-4f5b-9f1e-3b5c1c6f7a10`.
    pub pod_uid: Option<String>,
    pub qos: Option<QosClass>,
}

/// The systemd facts of one cgroup file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemdUnit {
    /// The innermost unit, e.g. `foo.service`, `session-3.scope`.
    pub unit: String,
    /// `system`, or the user manager's unit, e.g. `user@1000.service`.
    pub manager: String,
}

/// The cgroup paths of one /proc/<pid>/cgroup file: (controllers, path) per line.
/// Malformed lines are skipped.
fn lines(text: &str) -> impl Iterator<Item = (&str, &str)> {
    text.lines().filter_map(|line| {
        let mut parts = line.splitn(3, ':');
        let id = parts.next()?;
        let controllers = parts.next()?;
        let path = parts.next()?;
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) || !path.starts_with('/') {
            return None;
        }
        Some((controllers, path))
    })
}

/// The path systemd manages: the v2 line (`0::`) when it says more than `/`, else the v1
/// `name=systemd` line.
fn systemd_path(text: &str) -> Option<&str> {
    let mut v1 = None;
    for (controllers, path) in lines(text) {
        if controllers.is_empty() && path != "/" {
            return Some(path);
        }
        if controllers == "name=systemd" {
            v1 = Some(path);
        }
    }
    v1
}

fn segments(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter(|s| !s.is_empty())
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The container id named by one path segment.
fn container_id_of(segment: &str) -> Option<&str> {
    if is_hex64(segment) {
        return Some(segment);
    }
    let name = segment.strip_suffix(".scope").unwrap_or(segment);
    // `crio-conmon-<id>` and `libpod-conmon-<id>` are the runtime's monitor, not the
    // container: their rest is not 64 hex, so they fall through.
    ["docker-", "cri-containerd-", "crio-", "libpod-"]
        .iter()
        .find_map(|prefix| name.strip_prefix(prefix))
        .filter(|id| is_hex64(id))
}

/// A user's delegated tree starts at `user@<uid>.service`.
fn is_user_manager(segment: &str) -> bool {
    segment
        .strip_prefix("user@")
        .and_then(|s| s.strip_suffix(".service"))
        .is_some_and(|uid| !uid.is_empty() && uid.bytes().all(|b| b.is_ascii_digit()))
}

/// `pod<uid>` (cgroupfs driver, dashes) or `...-pod<uid>.slice` (systemd driver,
/// underscores), normalized to lowercase with dashes.
fn pod_uid_of(segment: &str) -> Option<String> {
    let name = segment.strip_suffix(".slice").unwrap_or(segment);
    let uid = match name.strip_prefix("pod") {
        Some(uid) => uid,
        None => &name[name.rfind("-pod")? + 4..],
    };
    let uid: String = uid
        .chars()
        .map(|c| {
            if c == '_' {
                '-'
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect();
    is_uuid(&uid).then_some(uid)
}

fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Container facts of one path: the outermost container id, and the pod uid and QoS
/// class when the path is under `kubepods`. Stops at a user's delegated tree unless
/// `user_trees` is set.
fn container_info_of_path(path: &str, user_trees: bool) -> ContainerInfo {
    let mut info = ContainerInfo::default();
    let mut kubepods = false;
    let mut qos = QosClass::Guaranteed;
    for segment in segments(path) {
        if !user_trees && is_user_manager(segment) {
            break;
        }
        if let Some(id) = container_id_of(segment) {
            info.container_id = Some(id.to_string());
            break;
        }
        if segment.contains("kubepods") {
            kubepods = true;
        }
        if kubepods {
            if segment == "burstable" || segment.contains("kubepods-burstable") {
                qos = QosClass::Burstable;
            } else if segment == "besteffort" || segment.contains("kubepods-besteffort") {
                qos = QosClass::BestEffort;
            }
            if info.pod_uid.is_none() {
                info.pod_uid = pod_uid_of(segment);
            }
        }
    }
    if info.pod_uid.is_some() {
        info.qos = Some(qos);
    }
    info
}

/// Why a cgroup file gave no container facts although it named some.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cgroup lines disagree: {first:?} and {second:?}")]
pub struct Disagreement {
    pub first: String,
    pub second: String,
}

/// Container facts of a /proc/<pid>/cgroup file. Every line that names a container must
/// name the same one (under v1 all hierarchies normally agree); when they do not, nothing
/// is claimed.
pub fn container_info(text: &str, user_trees: bool) -> Result<ContainerInfo, Disagreement> {
    let mut found: Option<ContainerInfo> = None;
    for (_, path) in lines(text) {
        let info = container_info_of_path(path, user_trees);
        if info == ContainerInfo::default() {
            continue;
        }
        match &found {
            None => found = Some(info),
            Some(f) if *f == info => {}
            Some(f) => {
                return Err(Disagreement {
                    first: format!("{f:?}"),
                    second: format!("{info:?}"),
                })
            }
        }
    }
    Ok(found.unwrap_or_default())
}

fn is_unit(segment: &str) -> bool {
    let Some((name, suffix)) = segment.rsplit_once('.') else {
        return false;
    };
    matches!(suffix, "service" | "scope")
        && !name.is_empty()
        && name.len() <= 255
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:@\\".contains(&b))
}

fn is_slice(segment: &str) -> bool {
    segment.strip_suffix(".slice").is_some_and(|n| {
        !n.is_empty()
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:@\\".contains(&b))
    })
}

/// The systemd unit of a /proc/<pid>/cgroup file: slices, then a unit; inside
/// `user@<uid>.service`, again slices then a unit. `None` when the path does not follow that
/// layout (e.g. a container runtime's cgroupfs tree).
pub fn systemd_unit(text: &str) -> Option<SystemdUnit> {
    let path = systemd_path(text)?;
    let mut manager = "system".to_string();
    let mut unit: Option<String> = None;
    for segment in segments(path) {
        if is_slice(segment) {
            continue;
        }
        if !is_unit(segment) {
            break;
        }
        if is_user_manager(segment) && manager == "system" {
            // The user's own service manager: its units lie below.
            unit = Some(segment.to_string());
            manager = segment.to_string();
            continue;
        }
        unit = Some(segment.to_string());
        break;
    }
    let unit = unit?;
    if unit == manager {
        // The user manager process itself, not one of its units.
        return Some(SystemdUnit {
            unit,
            manager: "system".to_string(),
        });
    }
    Some(SystemdUnit { unit, manager })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4a3c0b1f9e2d8c7b6a5f4e3d2c1b0a99887766554433221100ffeeddccbbaa00";

    #[test]
    fn container_ids_by_segment() {
        for seg in [
            ID.to_string(),
            format!("docker-{ID}.scope"),
            format!("cri-containerd-{ID}.scope"),
            format!("crio-{ID}.scope"),
            format!("crio-{ID}"),
            format!("libpod-{ID}.scope"),
        ] {
            assert_eq!(container_id_of(&seg), Some(ID), "{seg}");
        }
        for seg in [
            format!("crio-conmon-{ID}.scope"),
            format!("libpod-conmon-{ID}.scope"),
            format!("docker-{}.scope", &ID[..63]),
            format!("docker-{}.scope", ID.to_uppercase()),
            "docker.service".to_string(),
            format!("other-{ID}.scope"),
        ] {
            assert_eq!(container_id_of(&seg), None, "{seg}");
        }
    }

    #[test]
    fn outermost_container_wins_over_one_nested_inside_it() {
        let inner = "1".repeat(64);
        let text = format!("0::/system.slice/docker-{ID}.scope/docker-{inner}.scope\n");
        assert_eq!(
            container_info(&text, false)
                .unwrap()
                .container_id
                .as_deref(),
            Some(ID)
        );
    }

    #[test]
    fn lines_that_disagree_claim_nothing() {
        let other = "2".repeat(64);
        let text = format!("4:memory:/docker/{ID}\n3:cpu:/docker/{other}\n");
        assert!(container_info(&text, false).is_err());
    }

    #[test]
    fn pod_uids() {
        let uid = "2c9d4a4a-0d5d-4f5b-9f1e-3b5c1c6f7a10";
        assert_eq!(pod_uid_of(&format!("pod{uid}")).as_deref(), Some(uid));
        assert_eq!(
            pod_uid_of(&format!(
                "kubepods-burstable-pod{}.slice",
                uid.replace('-', "_")
            ))
            .as_deref(),
            Some(uid)
        );
        assert_eq!(pod_uid_of("pod1234"), None);
        assert_eq!(pod_uid_of("kubepods-pod.slice"), None);
    }

    #[test]
    fn systemd_units() {
        let unit = |t: &str| systemd_unit(t).map(|u| (u.unit, u.manager));
        assert_eq!(
            unit("0::/system.slice/foo.service\n"),
            Some(("foo.service".into(), "system".into()))
        );
        assert_eq!(
            unit("0::/user.slice/user-1000.slice/session-3.scope\n"),
            Some(("session-3.scope".into(), "system".into()))
        );
        assert_eq!(
            unit("0::/user.slice/user-1000.slice/user@1000.service/app.slice/x.service\n"),
            Some(("x.service".into(), "user@1000.service".into()))
        );
        assert_eq!(
            unit("0::/user.slice/user-1000.slice/user@1000.service/init.scope\n"),
            Some(("init.scope".into(), "user@1000.service".into()))
        );
        // A delegated service naming a sub-cgroup like another unit stays itself.
        assert_eq!(
            unit("0::/system.slice/runner.service/sshd.service\n"),
            Some(("runner.service".into(), "system".into()))
        );
        assert_eq!(unit("0::/\n"), None);
        assert_eq!(unit("0::/docker/abc\n"), None);
        assert_eq!(
            unit("12:memory:/x\n1:name=systemd:/system.slice/cron.service\n0::/\n"),
            Some(("cron.service".into(), "system".into()))
        );
    }

    #[test]
    fn garbage_never_panics() {
        let long = "a/".repeat(5000);
        let texts = [
            "",
            "\n\n",
            "0",
            "0:",
            "0::",
            "x::/docker/abc",
            "0::relative/path",
            ":::::",
            "0::/kubepods/pod/",
            "0::/kubepods-pod\u{e9}\u{e9}\u{e9}.slice",
            "0::/-pod",
            "0::/.scope/.service/.slice",
            "0::/user@.service/x.service",
            "0::/\u{0}docker-\u{0}.scope",
            long.as_str(),
        ];
        for text in texts {
            let _ = container_info(text, false);
            let _ = container_info(text, true);
            let _ = systemd_unit(text);
        }
    }
}
