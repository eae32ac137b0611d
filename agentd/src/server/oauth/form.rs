//! Form bodies (`application/x-www-form-urlencoded`, RFC 6749 appendix B): bounded,
//! each parameter at most once (RFC 6749 section 3.2), every refusal naming the parameter.

use std::collections::BTreeMap;

use super::OAuthError;

/// Largest body the front door reads.
pub const MAX_BODY: usize = 64 * 1024;
/// Largest value of one parameter (a JWT-SVID is well below this).
pub const MAX_VALUE: usize = 16 * 1024;
/// Most parameters in one body.
const MAX_PARAMS: usize = 32;

/// A parsed form: names to values, in the order received for repeated ones.
#[derive(Debug, Default)]
pub struct Form(BTreeMap<String, Vec<String>>);

impl Form {
    pub fn parse(body: &[u8]) -> Result<Self, OAuthError> {
        if body.len() > MAX_BODY {
            return Err(OAuthError::InvalidRequest(format!(
                "the body is larger than {MAX_BODY} bytes"
            )));
        }
        let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut count = 0;
        for (k, v) in url::form_urlencoded::parse(body) {
            count += 1;
            if count > MAX_PARAMS {
                return Err(OAuthError::InvalidRequest(format!(
                    "more than {MAX_PARAMS} parameters"
                )));
            }
            let name: String = k.chars().take(64).collect();
            if v.len() > MAX_VALUE {
                return Err(OAuthError::InvalidRequest(format!(
                    "{name}: {} bytes, more than the limit of {MAX_VALUE}",
                    v.len()
                )));
            }
            map.entry(k.into_owned()).or_default().push(v.into_owned());
        }
        Ok(Self(map))
    }

    /// A parameter given at most once; empty counts as absent (RFC 6749 section 3.1).
    pub fn optional(&self, name: &str) -> Result<Option<&str>, OAuthError> {
        match self.0.get(name).map(Vec::as_slice) {
            None | Some([]) => Ok(None),
            Some([one]) if one.is_empty() => Ok(None),
            Some([one]) => Ok(Some(one)),
            Some(_) => Err(OAuthError::InvalidRequest(format!(
                "{name} is given more than once (RFC 6749 section 3.2)"
            ))),
        }
    }

    pub fn required(&self, name: &str) -> Result<&str, OAuthError> {
        self.optional(name)?
            .ok_or_else(|| OAuthError::InvalidRequest(format!("{name} is required")))
    }

    /// Every value of a parameter that may repeat (RFC 8707 `resource`).
    pub fn all(&self, name: &str) -> &[String] {
        self.0.get(name).map(Vec::as_slice).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_decoded_once_each_and_bounded() {
        let f = Form::parse(b"grant_type=a%3Ab&scope=x+y&empty=").unwrap();
        assert_eq!(f.required("grant_type").unwrap(), "a:b");
        assert_eq!(f.optional("scope").unwrap(), Some("x y"));
        assert_eq!(f.optional("empty").unwrap(), None);
        assert!(f
            .required("missing")
            .unwrap_err()
            .to_string()
            .contains("missing is required"));
        let twice = Form::parse(b"scope=a&scope=b").unwrap();
        assert!(twice
            .optional("scope")
            .unwrap_err()
            .to_string()
            .contains("more than once"));
        assert_eq!(twice.all("scope").len(), 2);
        let huge = format!("subject_token={}", "a".repeat(MAX_VALUE + 1));
        let e = Form::parse(huge.as_bytes()).unwrap_err();
        assert_eq!(e.code(), "invalid_request");
        assert!(e.to_string().contains("subject_token"), "{e}");
        let many: String = (0..40).map(|i| format!("p{i}=1&")).collect();
        assert!(Form::parse(many.as_bytes()).is_err());
    }
}
