//! SPIFFE ID templates for node attestors: `spiffe://{trust_domain}/node/x509pop/{sha256}`.
//!
//! A template is literal text with `{name}` placeholders. The allowed names are fixed per
//! attestor and checked when the config is loaded; the rendered ID must be a valid SPIFFE ID
//! of the server's trust domain outside the path prefix the server reserves for itself (given
//! to [`IdTemplate::parse`]; agentd's is `/agentd/`), so the same node always gets the same ID
//! and no attestation can claim the server's own identity.

use spiffe::{SpiffeId, TrustDomain};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Var(String),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdTemplate {
    raw: String,
    parts: Vec<Part>,
    /// The path prefix no rendered ID may fall under.
    reserved: &'static str,
}

/// Why a template is refused, or the ID it rendered is not a usable node ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TemplateError {
    /// A `{` with no `}` after it.
    #[error("unclosed '{{' at byte {at}")]
    Unclosed { at: usize },
    /// A `}` with no `{` before it.
    #[error("'}}' without '{{' at byte {at}")]
    UnopenedBrace { at: usize },
    /// A placeholder this attestor does not fill in.
    #[error("unknown variable {{{name}}}; known: {known}")]
    UnknownVariable { name: String, known: String },
    /// The node's evidence has no value for a placeholder (e.g. a certificate without a CN).
    #[error("variable {{{name}}} has no value for this node: {reason}")]
    Missing { name: String, reason: String },
    /// The rendered text is not a SPIFFE ID.
    #[error("{id:?} is not a valid SPIFFE ID: {reason}")]
    InvalidId { id: String, reason: String },
    /// The rendered ID belongs to another trust domain.
    #[error("{id} is not in the server's trust domain {trust_domain}")]
    ForeignTrustDomain { id: String, trust_domain: String },
    /// The rendered ID is under the reserved path prefix.
    #[error("{id} is in the reserved {prefix} namespace")]
    Reserved { id: String, prefix: &'static str },
    /// The rendered ID is a bare trust domain.
    #[error("{id} has no path")]
    NoPath { id: String },
}

/// Whether `name` is allowed by `known`: exact names, or a `prefix:` entry (`claim:`)
/// followed by a non-empty rest.
fn is_known(name: &str, known: &[&str]) -> bool {
    known.iter().any(|k| match k.strip_suffix(':') {
        Some(prefix) => name
            .strip_prefix(prefix)
            .and_then(|r| r.strip_prefix(':'))
            .is_some_and(|rest| !rest.is_empty()),
        None => name == *k,
    })
}

impl IdTemplate {
    /// Parses `raw`, accepting only the variables in `known` (an entry ending in `:` accepts
    /// any `prefix:NAME`). `reserved` is a path prefix ending in `/` (agentd's is
    /// `/agentd/`): an ID rendered under it, or at it without the slash, is refused.
    pub fn parse(raw: &str, known: &[&str], reserved: &'static str) -> Result<Self, TemplateError> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut rest = raw;
        let mut offset = 0;
        while let Some(i) = rest.find(['{', '}']) {
            if rest.as_bytes()[i] == b'}' {
                return Err(TemplateError::UnopenedBrace { at: offset + i });
            }
            literal.push_str(&rest[..i]);
            let after = &rest[i + 1..];
            let end = after
                .find('}')
                .ok_or(TemplateError::Unclosed { at: offset + i })?;
            let name = &after[..end];
            if name.contains('{') || !is_known(name, known) {
                return Err(TemplateError::UnknownVariable {
                    name: name.to_string(),
                    known: known
                        .iter()
                        .map(|k| {
                            if k.ends_with(':') {
                                format!("{{{k}NAME}}")
                            } else {
                                format!("{{{k}}}")
                            }
                        })
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
            if !literal.is_empty() {
                parts.push(Part::Literal(std::mem::take(&mut literal)));
            }
            parts.push(Part::Var(name.to_string()));
            offset += i + 1 + end + 1;
            rest = &after[end + 1..];
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(Self {
            raw: raw.to_string(),
            parts,
            reserved,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// Renders the template with `lookup` and checks the result is a node ID of
    /// `trust_domain`. `{trust_domain}` is filled in here.
    pub fn render(
        &self,
        trust_domain: &TrustDomain,
        lookup: impl Fn(&str) -> Result<String, String>,
    ) -> Result<SpiffeId, TemplateError> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Literal(l) => out.push_str(l),
                Part::Var(name) if name == "trust_domain" => out.push_str(trust_domain.as_str()),
                Part::Var(name) => {
                    out.push_str(&lookup(name).map_err(|reason| TemplateError::Missing {
                        name: name.clone(),
                        reason,
                    })?)
                }
            }
        }
        node_id(&out, trust_domain, self.reserved)
    }

    /// Checks at config time that the template can yield a valid ID: every variable is
    /// replaced by a plain sample value.
    pub fn check(&self, trust_domain: &TrustDomain) -> Result<SpiffeId, TemplateError> {
        self.render(trust_domain, |_| Ok("sample".to_string()))
    }
}

/// `raw` as a node SPIFFE ID: valid, in `trust_domain`, with a path, not under `reserved` (a
/// path prefix ending in `/`, see [`IdTemplate::parse`]).
pub fn node_id(
    raw: &str,
    trust_domain: &TrustDomain,
    reserved: &'static str,
) -> Result<SpiffeId, TemplateError> {
    let id = SpiffeId::new(raw).map_err(|e| TemplateError::InvalidId {
        id: raw.chars().take(200).collect(),
        reason: e.to_string(),
    })?;
    if !id.is_member_of(trust_domain) {
        return Err(TemplateError::ForeignTrustDomain {
            id: id.to_string(),
            trust_domain: trust_domain.to_string(),
        });
    }
    if id.path().is_empty() {
        return Err(TemplateError::NoPath { id: id.to_string() });
    }
    if id.path() == reserved.trim_end_matches('/') || id.path().starts_with(reserved) {
        return Err(TemplateError::Reserved {
            id: id.to_string(),
            prefix: reserved,
        });
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::test_support::RESERVED;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    #[test]
    fn renders_variables() {
        let t = IdTemplate::parse(
            "spiffe://{trust_domain}/node/{common_name}/{sha256}",
            &["trust_domain", "common_name", "sha256"],
            RESERVED,
        )
        .unwrap();
        let id = t
            .render(&td(), |n| match n {
                "common_name" => Ok("host-1".into()),
                "sha256" => Ok("abcd".into()),
                _ => Err("none".into()),
            })
            .unwrap();
        assert_eq!(id.to_string(), "spiffe://example.org/node/host-1/abcd");
    }

    #[test]
    fn prefixed_variables() {
        let known = ["trust_domain", "sub", "claim:"];
        let t = IdTemplate::parse(
            "spiffe://{trust_domain}/ci/{claim:repository}",
            &known,
            RESERVED,
        )
        .unwrap();
        let id = t
            .render(&td(), |n| {
                assert_eq!(n, "claim:repository");
                Ok("org/repo".into())
            })
            .unwrap();
        assert_eq!(id.to_string(), "spiffe://example.org/ci/org/repo");
        assert!(matches!(
            IdTemplate::parse("spiffe://{trust_domain}/{claim:}", &known, RESERVED),
            Err(TemplateError::UnknownVariable { .. })
        ));
    }

    #[test]
    fn refuses_bad_templates() {
        let known = ["trust_domain", "sha256"];
        assert!(matches!(
            IdTemplate::parse("spiffe://{trust_domain}/{nope}", &known, RESERVED),
            Err(TemplateError::UnknownVariable { .. })
        ));
        assert!(matches!(
            IdTemplate::parse("spiffe://{trust_domain/x", &known, RESERVED),
            Err(TemplateError::Unclosed { .. })
        ));
        assert!(matches!(
            IdTemplate::parse("spiffe://x}/", &known, RESERVED),
            Err(TemplateError::UnopenedBrace { .. })
        ));
        let reserved =
            IdTemplate::parse("spiffe://{trust_domain}/agentd/{sha256}", &known, RESERVED).unwrap();
        let err = reserved.check(&td()).unwrap_err();
        assert!(matches!(err, TemplateError::Reserved { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            "spiffe://example.org/agentd/sample is in the reserved /agentd/ namespace"
        );
        let foreign = IdTemplate::parse("spiffe://other.org/{sha256}", &known, RESERVED).unwrap();
        assert!(matches!(
            foreign.check(&td()),
            Err(TemplateError::ForeignTrustDomain { .. })
        ));
    }

    #[test]
    fn a_value_that_breaks_the_id_is_refused() {
        let t = IdTemplate::parse(
            "spiffe://{trust_domain}/node/{sub}",
            &["trust_domain", "sub"],
            RESERVED,
        )
        .unwrap();
        let err = t
            .render(&td(), |_| Ok("system:serviceaccount:ns:sa".into()))
            .unwrap_err();
        assert!(matches!(err, TemplateError::InvalidId { .. }), "{err}");
        let err = t.render(&td(), |_| Ok("../x".into())).unwrap_err();
        assert!(matches!(err, TemplateError::InvalidId { .. }), "{err}");
    }
}
