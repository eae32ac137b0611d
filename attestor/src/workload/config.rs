//! The node agent's `[workload_attestors]` config:
//!
//! ```toml
//! [workload_attestors.unix]
//! enabled = true
//! max_binary_size = "128MiB"   # or plain bytes: 134217728; 0: no unix:sha256
//!
//! [workload_attestors.container]
//! enabled = true
//! rootless_containers = false
//!
//! [workload_attestors.systemd]
//! enabled = true
//! ```
//!
//! Every attestor is enabled by default; a disabled one contributes no selector.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::unix::DEFAULT_MAX_BINARY_SIZE;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkloadAttestorsConfig {
    pub unix: UnixConfig,
    pub container: ContainerConfig,
    pub systemd: SystemdConfig,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UnixConfig {
    pub enabled: bool,
    /// Binaries larger than this get no `unix:sha256` selector (and a warning); 0 turns
    /// `unix:sha256` off.
    pub max_binary_size: ByteSize,
}

impl Default for UnixConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_binary_size: ByteSize(DEFAULT_MAX_BINARY_SIZE),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ContainerConfig {
    pub enabled: bool,
    /// Also report containers in a user's own cgroup tree (rootless podman or docker). The
    /// user chooses those names: entries must then pair `container:id` with `unix:uid`.
    pub rootless_containers: bool,
}

impl Default for ContainerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            rootless_containers: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SystemdConfig {
    pub enabled: bool,
}

impl Default for SystemdConfig {
    fn default() -> Self {
        Self { enabled: true }
    }
}

/// A size in bytes, written as a number of bytes or a string: `"128MiB"`, `"1 GiB"`,
/// `"512KiB"`, `"10MB"` (decimal), `"4096"`, `"4096B"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl std::str::FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let digits = t.bytes().take_while(u8::is_ascii_digit).count();
        let (number, unit) = t.split_at(digits);
        let unit = unit.trim_start();
        let bad = || {
            format!(
                "{s:?} is not a size: use bytes (134217728) or a number with B, KiB, MiB, GiB, \
                 KB, MB or GB (\"128MiB\")"
            )
        };
        let number: u64 = number.parse().map_err(|_| bad())?;
        let factor: u64 = match unit {
            "" | "B" => 1,
            "KiB" | "K" | "k" => 1 << 10,
            "MiB" | "M" => 1 << 20,
            "GiB" | "G" => 1 << 30,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            _ => return Err(bad()),
        };
        number
            .checked_mul(factor)
            .map(ByteSize)
            .ok_or_else(|| format!("{s:?} is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size: a number of bytes or a string such as \"128MiB\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("size {v} is negative")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_enables_everything_with_defaults() {
        let c: WorkloadAttestorsConfig = toml::from_str("").unwrap();
        assert_eq!(c, WorkloadAttestorsConfig::default());
        assert!(c.unix.enabled && c.container.enabled && c.systemd.enabled);
        assert_eq!(c.unix.max_binary_size.bytes(), 128 * 1024 * 1024);
        assert!(!c.container.rootless_containers);
    }

    #[test]
    fn full_config() {
        let c: WorkloadAttestorsConfig = toml::from_str(
            r#"
            [unix]
            enabled = true
            max_binary_size = "64MiB"
            [container]
            enabled = false
            rootless_containers = true
            [systemd]
            enabled = false
            "#,
        )
        .unwrap();
        assert_eq!(c.unix.max_binary_size, ByteSize(64 << 20));
        assert!(!c.container.enabled && c.container.rootless_containers && !c.systemd.enabled);
        let c: WorkloadAttestorsConfig =
            toml::from_str("[unix]\nmax_binary_size = 1000\n").unwrap();
        assert_eq!(c.unix.max_binary_size, ByteSize(1000));
    }

    #[test]
    fn unknown_fields_and_bad_sizes_are_refused_by_name() {
        for (text, needle) in [
            ("[unix]\nenable = true\n", "enable"),
            ("[docker]\nenabled = true\n", "docker"),
            ("[unix]\nmax_binary_size = -1\n", "negative"),
            ("[unix]\nmax_binary_size = \"12 parsecs\"\n", "not a size"),
            (
                "[unix]\nmax_binary_size = \"99999999999GiB\"\n",
                "too large",
            ),
            ("[unix]\nmax_binary_size = true\n", "a size"),
            ("[systemd]\nenabled = \"yes\"\n", "bool"),
        ] {
            let err = toml::from_str::<WorkloadAttestorsConfig>(text)
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn byte_sizes() {
        for (s, n) in [
            ("0", 0),
            ("4096", 4096),
            ("4096B", 4096),
            ("1KiB", 1024),
            ("1 GiB", 1 << 30),
            ("128MiB", 128 << 20),
            ("10MB", 10_000_000),
            ("2kB", 2000),
        ] {
            assert_eq!(s.parse::<ByteSize>().unwrap(), ByteSize(n), "{s}");
        }
        for s in ["", "MiB", "1.5MiB", "-1", "1 TiB", "1MiBs"] {
            assert!(s.parse::<ByteSize>().is_err(), "{s}");
        }
    }
}
