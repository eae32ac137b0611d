//! Every selector type agentd's attestors produce, and every key within a type, so that an
//! entry's selectors can be checked when it is written (`agentd entry create --selector`)
//! rather than found never to match.
//!
//! Workload selectors have the form `type:key:value` (`unix:uid:1000`); node selectors
//! (`join_token`, `x509pop`, `claims`) are free-form `type:key:value` with any key.

use crate::{Selector, SelectorError};

/// What a value must look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    /// A decimal u32 without sign or leading zeros: `1000`.
    Id,
    /// An account or group name: no `:` and no whitespace.
    Name,
    /// An absolute, canonical path: `/usr/bin/python3.12`.
    AbsolutePath,
    /// 64 lowercase hex digits.
    Sha256,
    /// A full container id: 64 lowercase hex digits.
    ContainerId,
    /// A lowercase, dashed UUID.
    Uuid,
    /// One of the listed words.
    OneOf(&'static [&'static str]),
    /// A systemd unit name ending in `.service` or `.scope`.
    SystemdUnit,
    /// `system` or `user@<uid>.service`.
    SystemdManager,
}

/// One key of a selector type.
#[derive(Debug, Clone, Copy)]
pub struct SelectorKey {
    pub name: &'static str,
    pub value: ValueKind,
    pub example: &'static str,
}

/// One selector type.
#[derive(Debug, Clone, Copy)]
pub struct SelectorType {
    pub name: &'static str,
    /// Who produces it.
    pub about: &'static str,
    /// The keys; `None` for a free-form `key:value` type.
    pub keys: Option<&'static [SelectorKey]>,
}

const fn key(name: &'static str, value: ValueKind, example: &'static str) -> SelectorKey {
    SelectorKey {
        name,
        value,
        example,
    }
}

/// Every known selector type.
pub const SELECTOR_TYPES: &[SelectorType] = &[
    SelectorType {
        name: "unix",
        about: "workload attestor: the calling process's credentials and binary",
        keys: Some(&[
            key("uid", ValueKind::Id, "unix:uid:1000"),
            key("user", ValueKind::Name, "unix:user:alice"),
            key("gid", ValueKind::Id, "unix:gid:1000"),
            key("group", ValueKind::Name, "unix:group:staff"),
            key(
                "supplementary_gid",
                ValueKind::Id,
                "unix:supplementary_gid:27",
            ),
            key(
                "supplementary_group",
                ValueKind::Name,
                "unix:supplementary_group:docker",
            ),
            key(
                "path",
                ValueKind::AbsolutePath,
                "unix:path:/usr/bin/python3.12",
            ),
            key(
                "sha256",
                ValueKind::Sha256,
                "unix:sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
            ),
        ]),
    },
    SelectorType {
        name: "container",
        about: "workload attestor: the container the process runs in",
        keys: Some(&[key(
            "id",
            ValueKind::ContainerId,
            "container:id:3f4a9c2e8b7d6a5f4e3d2c1b0a998877665544332211ffeeddccbbaa00991122",
        )]),
    },
    SelectorType {
        name: "k8s",
        about: "workload attestor (container): the Kubernetes pod the process runs in",
        keys: Some(&[
            key(
                "pod-uid",
                ValueKind::Uuid,
                "k8s:pod-uid:2c9d4a4a-0d5d-4f5b-9f1e-3b5c1c6f7a10",
            ),
            key(
                "qos",
                ValueKind::OneOf(&["guaranteed", "burstable", "besteffort"]),
                "k8s:qos:burstable",
            ),
        ]),
    },
    SelectorType {
        name: "systemd",
        about: "workload attestor: the systemd unit the process runs in",
        keys: Some(&[
            key("id", ValueKind::SystemdUnit, "systemd:id:agent.service"),
            key(
                "manager",
                ValueKind::SystemdManager,
                "systemd:manager:system",
            ),
        ]),
    },
    SelectorType {
        name: "join_token",
        about: "node attestor: the join token a node used",
        keys: None,
    },
    SelectorType {
        name: "x509pop",
        about: "node attestor: facts of the node's certificate",
        keys: None,
    },
    SelectorType {
        name: "claims",
        about: "node attestor: claims of the node's platform token",
        keys: None,
    },
];

fn type_names() -> String {
    SELECTOR_TYPES
        .iter()
        .map(|t| t.name)
        .collect::<Vec<_>>()
        .join(", ")
}

fn key_names(keys: &[SelectorKey]) -> String {
    keys.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
}

/// The known selector type named `name`.
pub fn selector_type(name: &str) -> Option<&'static SelectorType> {
    SELECTOR_TYPES.iter().find(|t| t.name == name)
}

/// Checks that `selector` names a known type, a known key of that type, and a value of the
/// right form, so that it can match what the attestors produce.
pub fn validate_selector(selector: &Selector) -> Result<(), SelectorError> {
    let kind = selector.kind();
    let Some(t) = selector_type(kind) else {
        return Err(SelectorError::UnknownType {
            kind: kind.to_string(),
            valid: type_names(),
        });
    };
    let (k, value) = match selector.value().split_once(':') {
        Some((k, v)) if !k.is_empty() && !v.is_empty() => (k, v),
        _ => {
            return Err(SelectorError::MissingKey {
                kind: kind.to_string(),
                valid: t.keys.map(key_names).unwrap_or_else(|| "any key".into()),
            })
        }
    };
    let Some(keys) = t.keys else {
        return Ok(());
    };
    let Some(key) = keys.iter().find(|x| x.name == k) else {
        return Err(SelectorError::UnknownKey {
            kind: kind.to_string(),
            key: k.to_string(),
            valid: key_names(keys),
        });
    };
    check_value(key.value, value).map_err(|reason| SelectorError::BadValue {
        kind: kind.to_string(),
        key: k.to_string(),
        reason: format!("{reason} (e.g. {})", key.example),
    })
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn check_value(kind: ValueKind, v: &str) -> Result<(), String> {
    match kind {
        ValueKind::Id => {
            let canonical = v.parse::<u32>().is_ok_and(|n| n.to_string() == v);
            if !canonical {
                return Err(format!(
                    "{v:?} must be a number from 0 to 4294967295, without sign or leading zeros"
                ));
            }
        }
        ValueKind::Name => {
            if v.contains(':') || v.chars().any(char::is_whitespace) {
                return Err(format!("{v:?} must be a name without ':' or whitespace"));
            }
        }
        ValueKind::AbsolutePath => {
            if !v.starts_with('/') {
                return Err(format!("{v:?} must be an absolute path"));
            }
            if v.contains("//") || v.split('/').any(|c| c == "." || c == "..") || v.ends_with('/') {
                return Err(format!(
                    "{v:?} must be the binary's canonical path (no '.', '..', '//' or trailing \
                     '/'; symlinks resolved, as in /proc/<pid>/exe)"
                ));
            }
        }
        ValueKind::Sha256 => {
            if !is_lower_hex(v, 64) {
                return Err(format!(
                    "{v:?} must be 64 lowercase hex digits (sha256sum FILE)"
                ));
            }
        }
        ValueKind::ContainerId => {
            if !is_lower_hex(v, 64) {
                return Err(format!(
                    "{v:?} must be the full container id, 64 lowercase hex digits (docker ps \
                     --no-trunc, crictl inspect)"
                ));
            }
        }
        ValueKind::Uuid => {
            let groups: Vec<&str> = v.split('-').collect();
            let ok = groups.len() == 5
                && groups
                    .iter()
                    .zip([8, 4, 4, 4, 12])
                    .all(|(g, n)| is_lower_hex(g, n));
            if !ok {
                return Err(format!(
                    "{v:?} must be a lowercase UUID with dashes (kubectl get pod NAME -o \
                     jsonpath='{{.metadata.uid}}')"
                ));
            }
        }
        ValueKind::OneOf(words) => {
            if !words.contains(&v) {
                return Err(format!("{v:?} must be one of {}", words.join(", ")));
            }
        }
        ValueKind::SystemdUnit => {
            let ok = v.rsplit_once('.').is_some_and(|(name, suffix)| {
                matches!(suffix, "service" | "scope")
                    && !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.:@\\".contains(&b))
            });
            if !ok {
                return Err(format!(
                    "{v:?} must be a unit name ending in .service or .scope"
                ));
            }
        }
        ValueKind::SystemdManager => {
            let user = v
                .strip_prefix("user@")
                .and_then(|s| s.strip_suffix(".service"))
                .is_some_and(|uid| check_value(ValueKind::Id, uid).is_ok());
            if v != "system" && !user {
                return Err(format!("{v:?} must be system or user@<uid>.service"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(s: &str) -> Result<(), SelectorError> {
        validate_selector(&s.parse().unwrap())
    }

    #[test]
    fn every_example_is_valid() {
        for t in SELECTOR_TYPES {
            for k in t.keys.unwrap_or_default() {
                assert!(k.example.starts_with(&format!("{}:{}:", t.name, k.name)));
                check(k.example).unwrap_or_else(|e| panic!("{}: {e}", k.example));
            }
        }
    }

    #[test]
    fn valid_selectors() {
        for s in [
            "unix:uid:0",
            "unix:gid:4294967295",
            "unix:user:www-data",
            "unix:supplementary_group:docker",
            "unix:path:/usr/bin/sleep",
            "k8s:qos:guaranteed",
            "systemd:id:session-3.scope",
            "systemd:id:user@1000.service",
            "systemd:manager:user@1000.service",
            "join_token:token:5f0c",
            "x509pop:subject:cn:node-1",
            "claims:repository:acme/agents",
        ] {
            check(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        }
    }

    #[test]
    fn unknown_type_lists_the_valid_types() {
        let err = check("docker:id:abc").unwrap_err();
        assert!(matches!(err, SelectorError::UnknownType { .. }));
        let msg = err.to_string();
        for t in [
            "unix",
            "container",
            "k8s",
            "systemd",
            "join_token",
            "x509pop",
            "claims",
        ] {
            assert!(msg.contains(t), "{msg}");
        }
    }

    #[test]
    fn unknown_key_lists_the_valid_keys() {
        let err = check("unix:pid:1").unwrap_err();
        assert!(matches!(err, SelectorError::UnknownKey { .. }));
        let msg = err.to_string();
        assert!(msg.contains("\"pid\""), "{msg}");
        for k in [
            "uid",
            "user",
            "gid",
            "group",
            "supplementary_gid",
            "path",
            "sha256",
        ] {
            assert!(msg.contains(k), "{msg}");
        }
        let msg = check("k8s:pod-name:x").unwrap_err().to_string();
        assert!(msg.contains("pod-uid") && msg.contains("qos"), "{msg}");
        let err = check("unix:1000").unwrap_err();
        assert!(matches!(err, SelectorError::MissingKey { .. }), "{err}");
        assert!(err.to_string().contains("uid"), "{err}");
        assert!(matches!(
            check("claims:sub"),
            Err(SelectorError::MissingKey { .. })
        ));
        assert!(matches!(
            check("claims::x"),
            Err(SelectorError::MissingKey { .. })
        ));
        assert!(matches!(
            check("claims:sub:"),
            Err(SelectorError::MissingKey { .. })
        ));
    }

    #[test]
    fn bad_values_say_what_is_expected() {
        for (s, needle) in [
            ("unix:uid:alice", "number"),
            ("unix:uid:-1", "number"),
            ("unix:uid:+1", "number"),
            ("unix:uid:01", "leading zeros"),
            ("unix:uid:4294967296", "number"),
            ("unix:gid: 1", "number"),
            ("unix:supplementary_gid:x", "number"),
            ("unix:user:a b", "name"),
            ("unix:group:a:b", "name"),
            ("unix:path:usr/bin/x", "absolute"),
            ("unix:path:/usr/bin/../x", "canonical"),
            ("unix:path:/usr//bin/x", "canonical"),
            ("unix:path:/usr/bin/", "canonical"),
            ("unix:sha256:ABCDEF", "64 lowercase hex"),
            (
                &format!("unix:sha256:{}", "A".repeat(64)),
                "64 lowercase hex",
            ),
            ("container:id:3f4a9c2e8b7d", "full container id"),
            (
                &format!("container:id:{}", "g".repeat(64)),
                "full container id",
            ),
            ("k8s:pod-uid:2C9D4A4A-0D5D-4F5B-9F1E-3B5C1C6F7A10", "UUID"),
            ("k8s:pod-uid:2c9d4a4a_0d5d_4f5b_9f1e_3b5c1c6f7a10", "UUID"),
            ("k8s:qos:Burstable", "guaranteed, burstable, besteffort"),
            ("systemd:id:nginx", ".service or .scope"),
            ("systemd:id:.service", ".service or .scope"),
            ("systemd:manager:user", "user@<uid>.service"),
            ("systemd:manager:user@x.service", "user@<uid>.service"),
        ] {
            let err = check(s).unwrap_err();
            assert!(matches!(err, SelectorError::BadValue { .. }), "{s}: {err}");
            let msg = err.to_string();
            assert!(msg.contains(needle), "{s}: {msg}");
            assert!(msg.contains("e.g."), "{s}: {msg}");
        }
    }

    #[test]
    fn what_the_attestors_produce_is_valid() {
        // Keep the registry and the attestors in step.
        for s in [
            "unix:supplementary_gid:27",
            "container:id:3f4a9c2e8b7d6a5f4e3d2c1b0a998877665544332211ffeeddccbbaa00991122",
            "k8s:pod-uid:2c9d4a4a-0d5d-4f5b-9f1e-3b5c1c6f7a10",
            "k8s:qos:besteffort",
            "systemd:id:cri-containerd-3f4a9c2e8b7d6a5f4e3d2c1b0a998877665544332211ffeeddccbbaa00991122.scope",
            "systemd:manager:system",
        ] {
            check(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        }
    }
}
