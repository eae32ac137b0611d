//! The audiences a JWT-SVID may be minted for: the rule the node agent and the server share.

/// A refused `aud` list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audience: {reason}")]
#[non_exhaustive]
pub struct AudienceError {
    /// What is wrong with it.
    pub reason: String,
}

/// JWT-SVID spec, section 3: `aud` holds one or more audiences; we accept 1 to 32 non-empty
/// printable strings of at most 1024 bytes.
pub fn validate_audience(audience: &[String]) -> Result<(), AudienceError> {
    let bad = |reason: String| AudienceError { reason };
    if audience.is_empty() || audience.len() > 32 {
        return Err(bad(format!(
            "{} audiences; 1 to 32 required",
            audience.len()
        )));
    }
    // Bounds what one cached JWT-SVID can cost the node agent.
    let total: usize = audience.iter().map(String::len).sum();
    if total > 4096 {
        return Err(bad(format!(
            "{total} bytes of audiences; at most 4096 in all"
        )));
    }
    for a in audience {
        if a.is_empty() || a.len() > 1024 || a.chars().any(char::is_control) {
            return Err(bad(format!(
                "{:?} must be 1 to 1024 printable bytes",
                a.chars().take(40).collect::<String>()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audiences_are_bounded_in_number_and_in_bytes() {
        assert!(validate_audience(&["a".into()]).is_ok());
        assert!(validate_audience(&[]).is_err());
        assert!(validate_audience(&vec!["a".to_string(); 33]).is_err());
        assert!(validate_audience(&["".into()]).is_err());
        let big = vec!["x".repeat(1000); 5];
        let err = validate_audience(&big).unwrap_err().to_string();
        assert!(err.contains("at most 4096"), "{err}");
    }
}
