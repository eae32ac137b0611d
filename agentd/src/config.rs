//! Shared pieces of config parsing: `RawConfig` (serde) is turned into `Config` by
//! `TryFrom`, which reports every bad field with its path at once.

use std::fmt;
use std::path::{Path, PathBuf};

/// One bad field: where it is and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub reason: String,
}

/// Every bad field of a config, reported together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub errors: Vec<FieldError>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .errors
            .iter()
            .map(|e| format!("{}: {}", e.path, e.reason))
            .collect();
        write!(f, "invalid configuration: {}", parts.join("; "))
    }
}

impl std::error::Error for ConfigError {}

/// Collects field errors while a config is converted.
#[derive(Debug, Default)]
pub struct Errors(Vec<FieldError>);

impl Errors {
    pub fn push(&mut self, path: &str, reason: impl fmt::Display) {
        self.0.push(FieldError {
            path: path.to_string(),
            reason: reason.to_string(),
        });
    }

    /// Parses `value` with `parse`, recording an error under `path` on failure.
    pub fn parse<T, E: fmt::Display>(&mut self, path: &str, value: Result<T, E>) -> Option<T> {
        match value {
            Ok(v) => Some(v),
            Err(e) => {
                self.push(path, e);
                None
            }
        }
    }

    pub fn finish(self) -> Result<(), ConfigError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { errors: self.0 })
        }
    }
}

/// Reads a TOML config file into `T`, naming the file and the TOML error's location.
pub fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        errors: vec![FieldError {
            path: path.display().to_string(),
            reason: e.to_string(),
        }],
    })?;
    toml::from_str(&text).map_err(|e| ConfigError {
        errors: vec![FieldError {
            path: path.display().to_string(),
            reason: e.to_string().trim().replace('\n', " "),
        }],
    })
}

/// The default data directory for a daemon: `/var/lib/agentd/<name>` for root, else
/// `$HOME/.local/share/agentd/<name>` (or `./.agentd/<name>` with no home).
pub fn default_data_dir(name: &str) -> PathBuf {
    if crate::net::own_uid() == 0 {
        return PathBuf::from("/var/lib/agentd").join(name);
    }
    match std::env::var_os("HOME") {
        Some(home) if !home.is_empty() => {
            PathBuf::from(home).join(".local/share/agentd").join(name)
        }
        _ => PathBuf::from(".agentd").join(name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_reported_together_with_paths() {
        let mut errs = Errors::default();
        errs.push("trust_domain", "bad character");
        let _: Option<u32> = errs.parse("ca_ttl", "x".parse::<u32>());
        let err = errs.finish().unwrap_err();
        assert_eq!(err.errors.len(), 2);
        let text = err.to_string();
        assert!(text.contains("trust_domain: bad character"), "{text}");
        assert!(text.contains("ca_ttl: invalid digit"), "{text}");
    }
}
