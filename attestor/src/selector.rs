//! `Selector`: `type:value`, e.g. `unix:uid:1000` has type `unix` and value `uid:1000`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest selector value we accept; longer input is an error rather than a silent cut.
pub const MAX_VALUE_LEN: usize = 1024;

/// A selector: a type (the attestor that produces it) and a value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Selector {
    kind: String,
    value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("{input:?} is not of the form type:value")]
    MissingSeparator { input: String },
    #[error("selector type {kind:?} must be lowercase letters, digits, '_' or '-'")]
    BadType { kind: String },
    #[error("selector {kind}: value is empty")]
    EmptyValue { kind: String },
    #[error("selector {kind}: value is longer than {max} bytes")]
    ValueTooLong { kind: String, max: usize },
    #[error("selector {kind}: value contains a control character")]
    ControlCharacter { kind: String },
    #[error("unknown selector type {kind:?}: valid types are {valid}")]
    UnknownType { kind: String, valid: String },
    #[error("selector {kind}: value must be key:value; valid keys are {valid}")]
    MissingKey { kind: String, valid: String },
    #[error("unknown key {key:?} for selector type {kind}: valid keys are {valid}")]
    UnknownKey {
        kind: String,
        key: String,
        valid: String,
    },
    #[error("selector {kind}:{key}: {reason}")]
    BadValue {
        kind: String,
        key: String,
        reason: String,
    },
}

impl Selector {
    pub fn new(kind: impl Into<String>, value: impl Into<String>) -> Result<Self, SelectorError> {
        let kind = kind.into();
        let value = value.into();
        if kind.is_empty()
            || !kind
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        {
            return Err(SelectorError::BadType { kind });
        }
        if value.is_empty() {
            return Err(SelectorError::EmptyValue { kind });
        }
        if value.len() > MAX_VALUE_LEN {
            return Err(SelectorError::ValueTooLong {
                kind,
                max: MAX_VALUE_LEN,
            });
        }
        if value.chars().any(char::is_control) {
            return Err(SelectorError::ControlCharacter { kind });
        }
        Ok(Self { kind, value })
    }

    /// The selector type, e.g. `unix`.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The value, e.g. `uid:1000`.
    pub fn value(&self) -> &str {
        &self.value
    }
}

impl FromStr for Selector {
    type Err = SelectorError;

    fn from_str(s: &str) -> Result<Self, SelectorError> {
        let (kind, value) = s
            .split_once(':')
            .ok_or_else(|| SelectorError::MissingSeparator {
                input: s.to_string(),
            })?;
        Self::new(kind, value)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

/// True when every selector in `required` is among `held` (an entry applies to a workload
/// when all of the entry's selectors are among the workload's).
pub fn all_present(required: &[Selector], held: &[Selector]) -> bool {
    !required.is_empty() && required.iter().all(|r| held.contains(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_type_and_value_at_first_colon() {
        let s: Selector = "unix:uid:1000".parse().unwrap();
        assert_eq!(s.kind(), "unix");
        assert_eq!(s.value(), "uid:1000");
        assert_eq!(s.to_string(), "unix:uid:1000");
    }

    #[test]
    fn refuses_malformed() {
        assert!(matches!(
            "unix".parse::<Selector>(),
            Err(SelectorError::MissingSeparator { .. })
        ));
        assert!(matches!(
            "unix:".parse::<Selector>(),
            Err(SelectorError::EmptyValue { .. })
        ));
        assert!(matches!(
            ":uid:1".parse::<Selector>(),
            Err(SelectorError::BadType { .. })
        ));
        assert!(matches!(
            "Unix:uid:1".parse::<Selector>(),
            Err(SelectorError::BadType { .. })
        ));
        assert!(matches!(
            "unix:uid:\n1".parse::<Selector>(),
            Err(SelectorError::ControlCharacter { .. })
        ));
        let long = format!("unix:{}", "a".repeat(MAX_VALUE_LEN + 1));
        assert!(matches!(
            long.parse::<Selector>(),
            Err(SelectorError::ValueTooLong { .. })
        ));
    }

    #[test]
    fn all_present_needs_every_selector_and_at_least_one() {
        let uid: Selector = "unix:uid:1000".parse().unwrap();
        let gid: Selector = "unix:gid:1000".parse().unwrap();
        let other: Selector = "unix:uid:0".parse().unwrap();
        assert!(all_present(
            std::slice::from_ref(&uid),
            &[uid.clone(), gid.clone()]
        ));
        assert!(all_present(
            &[uid.clone(), gid.clone()],
            &[gid.clone(), uid.clone()]
        ));
        assert!(!all_present(&[uid.clone(), other], &[uid.clone(), gid]));
        assert!(!all_present(&[], &[uid]));
    }
}
