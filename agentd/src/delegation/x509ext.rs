//! The two X.509 extensions agentd puts in SVIDs (docs/extensions.md has the ASN.1 module):
//!
//! ```text
//! id-agentd-scope      OBJECT IDENTIFIER ::= { base 1 }
//! id-agentd-delegation OBJECT IDENTIFIER ::= { base 2 }
//!
//! AgentdScopes ::= SEQUENCE OF UTF8String           -- "resource:action", sorted
//!
//! AgentdDelegation ::= SEQUENCE {
//!     version         INTEGER (1),
//!     principal       UTF8String,                   -- "user:NAME" or a SPIFFE ID
//!     chain           SEQUENCE SIZE (1..MAX) OF Hop, -- root first; last = the subject
//!     remainingDepth  INTEGER (0..MAX),
//!     taskId          UTF8String OPTIONAL }
//!
//! Hop ::= SEQUENCE { agent UTF8String, grantId UTF8String }
//! ```
//!
//! Both are non-critical (RFC 5280 4.2: a relying party that does not know them ignores
//! them, so rustls, OpenSSL and go-spiffe still accept the SVID), and every OID arc is
//! below 2^31 (Go, pyca and RustCrypto refuse larger arcs).

use std::fmt;
use std::str::FromStr;

use spiffe::SpiffeId;

use super::model::{Delegation, Hop};
use super::scope::ScopeSet;

/// The default OID base, in the IETF experimental arc (RFC 1155, `internet.3`).
/// Deployments that own an IANA Private Enterprise Number should configure their own.
pub const DEFAULT_OID_BASE: &str = "1.3.6.1.3.8473.1";

/// Version of the `AgentdDelegation` structure.
const DELEGATION_VERSION: u32 = 1;

/// Largest extension value we decode.
const MAX_EXTENSION_LEN: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtensionError {
    #[error("oid base {input:?}: {reason}")]
    OidBase { input: String, reason: String },
    #[error("{extension} extension: {reason}")]
    Decode {
        extension: &'static str,
        reason: String,
    },
}

/// An OID prefix under which the scope (`.1`) and delegation (`.2`) extensions live.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OidBase(Vec<u64>);

impl Default for OidBase {
    fn default() -> Self {
        // The constant is checked by the tests below.
        DEFAULT_OID_BASE
            .parse()
            .unwrap_or_else(|_| Self(vec![1, 3, 6, 1, 3, 8473, 1]))
    }
}

impl FromStr for OidBase {
    type Err = ExtensionError;

    fn from_str(s: &str) -> Result<Self, ExtensionError> {
        let bad = |reason: &str| ExtensionError::OidBase {
            input: s.chars().take(80).collect(),
            reason: reason.into(),
        };
        let arcs = s
            .split('.')
            .map(|a| {
                if a.is_empty()
                    || !a.bytes().all(|b| b.is_ascii_digit())
                    || (a.len() > 1 && a.starts_with('0'))
                {
                    return Err(bad("arcs must be decimal numbers without leading zeros"));
                }
                a.parse::<u64>().map_err(|_| bad("arc too large"))
            })
            .collect::<Result<Vec<u64>, _>>()?;
        if arcs.len() < 2 || arcs.len() > 20 {
            return Err(bad("must have 2 to 20 arcs"));
        }
        if arcs[0] > 2 || (arcs[0] < 2 && arcs[1] >= 40) {
            return Err(bad(
                "the first arc must be 0, 1 or 2, and the second below 40 under 0 and 1",
            ));
        }
        if arcs.iter().any(|a| *a >= 1 << 31) {
            return Err(bad(
                "every arc must be below 2^31 (Go, pyca and RustCrypto refuse larger ones)",
            ));
        }
        Ok(Self(arcs))
    }
}

impl fmt::Display for OidBase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&parts.join("."))
    }
}

impl OidBase {
    fn child(&self, arc: u64) -> Vec<u64> {
        let mut v = self.0.clone();
        v.push(arc);
        v
    }

    pub fn scope_oid(&self) -> Vec<u64> {
        self.child(1)
    }

    pub fn delegation_oid(&self) -> Vec<u64> {
        self.child(2)
    }

    pub fn scope_oid_string(&self) -> String {
        format!("{self}.1")
    }

    pub fn delegation_oid_string(&self) -> String {
        format!("{self}.2")
    }
}

/// An extension to add to an X.509-SVID: OID arcs and the DER value (always non-critical).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvidExtension {
    pub oid: Vec<u64>,
    pub value: Vec<u8>,
}

/// DER of `AgentdScopes`.
pub fn encode_scopes(scopes: &ScopeSet) -> Vec<u8> {
    yasna::construct_der(|w| {
        w.write_sequence_of(|w| {
            for s in scopes.iter() {
                w.next().write_utf8_string(s.as_str());
            }
        })
    })
}

/// DER of `AgentdDelegation`.
pub fn encode_delegation(d: &Delegation) -> Vec<u8> {
    yasna::construct_der(|w| {
        w.write_sequence(|w| {
            w.next().write_u32(DELEGATION_VERSION);
            w.next().write_utf8_string(&d.principal.to_string());
            w.next().write_sequence_of(|w| {
                for hop in &d.chain {
                    w.next().write_sequence(|w| {
                        w.next().write_utf8_string(&hop.agent.to_string());
                        w.next().write_utf8_string(hop.grant_id.as_str());
                    });
                }
            });
            w.next().write_u32(d.remaining_depth);
            if let Some(t) = &d.task_id {
                w.next().write_utf8_string(t.as_str());
            }
        })
    })
}

/// The extensions of an SVID with these scopes and (for a delegated SVID) this delegation.
pub fn svid_extensions(
    base: &OidBase,
    scopes: &ScopeSet,
    delegation: Option<&Delegation>,
) -> Vec<SvidExtension> {
    let mut out = Vec::new();
    if !scopes.is_empty() {
        out.push(SvidExtension {
            oid: base.scope_oid(),
            value: encode_scopes(scopes),
        });
    }
    if let Some(d) = delegation {
        out.push(SvidExtension {
            oid: base.delegation_oid(),
            value: encode_delegation(d),
        });
    }
    out
}

fn decode_err(extension: &'static str, reason: impl fmt::Display) -> ExtensionError {
    ExtensionError::Decode {
        extension,
        reason: reason.to_string(),
    }
}

/// Parses `AgentdScopes`.
pub fn decode_scopes(der: &[u8]) -> Result<ScopeSet, ExtensionError> {
    if der.len() > MAX_EXTENSION_LEN {
        return Err(decode_err("scope", "too large"));
    }
    let raw = yasna::parse_der(der, |r| r.collect_sequence_of(|r| r.read_utf8string()))
        .map_err(|e| decode_err("scope", format!("not valid DER: {e}")))?;
    ScopeSet::parse(&raw).map_err(|e| decode_err("scope", e))
}

/// The delegation fields as written in the extension, before the ids are parsed.
type RawDelegation = (u32, String, Vec<(String, String)>, u32, Option<String>);

/// Parses `AgentdDelegation`; `scopes` are those of the scope extension (the top-level
/// scopes the delegation grants).
pub fn decode_delegation(der: &[u8], scopes: ScopeSet) -> Result<Delegation, ExtensionError> {
    if der.len() > MAX_EXTENSION_LEN {
        return Err(decode_err("delegation", "too large"));
    }
    let parsed: RawDelegation = yasna::parse_der(der, |r| {
        r.read_sequence(|r| {
            let version = r.next().read_u32()?;
            let principal = r.next().read_utf8string()?;
            let chain = r.next().collect_sequence_of(|r| {
                r.read_sequence(|r| Ok((r.next().read_utf8string()?, r.next().read_utf8string()?)))
            })?;
            let depth = r.next().read_u32()?;
            let task = r.read_optional(|r| r.read_utf8string())?;
            Ok((version, principal, chain, depth, task))
        })
    })
    .map_err(|e| decode_err("delegation", format!("not valid DER: {e}")))?;
    let (version, principal, chain, remaining_depth, task) = parsed;
    if version != DELEGATION_VERSION {
        return Err(decode_err(
            "delegation",
            format!("unknown version {version}"),
        ));
    }
    if chain.is_empty() {
        return Err(decode_err("delegation", "empty chain"));
    }
    let chain = chain
        .into_iter()
        .map(|(agent, grant)| {
            Ok(Hop {
                agent: SpiffeId::new(&agent)
                    .map_err(|e| decode_err("delegation", format!("agent {agent:?}: {e}")))?,
                grant_id: grant.parse().map_err(|e| decode_err("delegation", e))?,
            })
        })
        .collect::<Result<Vec<_>, ExtensionError>>()?;
    Ok(Delegation {
        principal: principal.parse().map_err(|e| decode_err("delegation", e))?,
        chain,
        scopes,
        expires_at: 0,
        remaining_depth,
        task_id: task
            .map(|t| t.parse())
            .transpose()
            .map_err(|e| decode_err("delegation", e))?,
    })
}

/// The test vectors of docs/extensions.md ("Test vectors"), read from the document itself so
/// that the document and the code cannot drift apart.
#[cfg(test)]
pub(crate) mod test_vectors {
    use super::*;

    const DOC: &str = include_str!("../../../docs/extensions.md");

    /// The text of the fenced block after `<!-- test vector: NAME -->`.
    pub fn block(name: &str) -> String {
        let marker = format!("<!-- test vector: {name} -->");
        let after = DOC
            .split_once(&marker)
            .unwrap_or_else(|| panic!("docs/extensions.md has no {marker}"))
            .1;
        let mut lines = after.lines().skip_while(|l| !l.starts_with("```"));
        lines.next().expect("a fenced block after the marker");
        let body: Vec<&str> = lines.take_while(|l| !l.starts_with("```")).collect();
        body.join("\n")
    }

    /// A hex block as bytes.
    pub fn hex_block(name: &str) -> Vec<u8> {
        let text: String = block(name).split_whitespace().collect();
        hex::decode(&text).unwrap_or_else(|e| panic!("vector {name} is not hex: {e}"))
    }

    /// The identity every vector encodes.
    pub fn identity() -> (ScopeSet, Delegation) {
        let scopes = ScopeSet::parse(&["crm:*", "calendar:read"]).unwrap();
        let d = Delegation {
            principal: "user:alice@example.com".parse().unwrap(),
            chain: vec![
                Hop {
                    agent: SpiffeId::new("spiffe://example.org/agent/orchestrator").unwrap(),
                    grant_id: "5c0e9a3b7d214f6e8c1a2b3c4d5e6f70".parse().unwrap(),
                },
                Hop {
                    agent: SpiffeId::new("spiffe://example.org/agent/scheduler").unwrap(),
                    grant_id: "a41b2c3d4e5f60718293a4b5c6d7e8f9".parse().unwrap(),
                },
            ],
            scopes: scopes.clone(),
            expires_at: 0,
            remaining_depth: 0,
            task_id: Some("task-42".parse().unwrap()),
        };
        (scopes, d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delegation::model::GrantId;

    #[test]
    fn the_encodings_are_the_documented_bytes() {
        let (scopes, d) = test_vectors::identity();
        let scopes_der = test_vectors::hex_block("scopes-der");
        let delegation_der = test_vectors::hex_block("delegation-der");
        assert_eq!(
            hex::encode(encode_scopes(&scopes)),
            hex::encode(&scopes_der)
        );
        assert_eq!(
            hex::encode(encode_delegation(&d)),
            hex::encode(&delegation_der)
        );
        assert_eq!(decode_scopes(&scopes_der).unwrap(), scopes);
        assert_eq!(
            decode_delegation(&delegation_der, scopes.clone()).unwrap(),
            d
        );
        // Without a task: the element is absent and the outer length 9 bytes shorter.
        let mut no_task = d.clone();
        no_task.task_id = None;
        let mut want = delegation_der[..delegation_der.len() - 9].to_vec();
        want[2] -= 9;
        assert_eq!(hex::encode(encode_delegation(&no_task)), hex::encode(&want));
        assert_eq!(decode_delegation(&want, scopes.clone()).unwrap(), no_task);
        // A remaining depth of 128 is `02 02 00 80` (minimal two's complement), in place of
        // `02 01 00`: one byte longer at both levels.
        let mut deep = d.clone();
        deep.remaining_depth = 128;
        let at = delegation_der.len() - 9 - 3;
        assert_eq!(&delegation_der[at..at + 3], [0x02, 0x01, 0x00]);
        let mut want = delegation_der[..at].to_vec();
        want.extend([0x02, 0x02, 0x00, 0x80]);
        want.extend(&delegation_der[at + 3..]);
        want[2] += 1;
        assert_eq!(hex::encode(encode_delegation(&deep)), hex::encode(&want));
        assert_eq!(decode_delegation(&want, scopes.clone()).unwrap(), deep);
        // Both extensions under the default base, scope first, each non-critical by
        // construction (SvidExtension has no critical flag).
        let exts = svid_extensions(&OidBase::default(), &scopes, Some(&d));
        assert_eq!(
            exts,
            [
                SvidExtension {
                    oid: vec![1, 3, 6, 1, 3, 8473, 1, 1],
                    value: scopes_der,
                },
                SvidExtension {
                    oid: vec![1, 3, 6, 1, 3, 8473, 1, 2],
                    value: delegation_der,
                },
            ]
        );
        assert!(svid_extensions(&OidBase::default(), &ScopeSet::new(), None).is_empty());
    }

    #[test]
    fn malformed_documented_values_are_refused() {
        let (scopes, _) = test_vectors::identity();
        let der = test_vectors::hex_block("delegation-der");
        // Version 2 in place of 1.
        let mut v2 = der.clone();
        assert_eq!(&v2[3..6], [0x02, 0x01, 0x01]);
        v2[5] = 2;
        let e = decode_delegation(&v2, scopes.clone()).unwrap_err();
        assert!(e.to_string().contains("unknown version 2"), "{e}");
        // A non-minimal length (DER forbids `81 16` for 22).
        let scopes_der = test_vectors::hex_block("scopes-der");
        let mut long = vec![0x30, 0x81];
        long.extend(&scopes_der[1..]);
        assert!(decode_scopes(&long).is_err());
        // A PrintableString in place of a UTF8String.
        let mut printable = scopes_der.clone();
        printable[2] = 0x13;
        assert!(decode_scopes(&printable).is_err());
    }

    #[test]
    fn oid_base_rules() {
        let d = OidBase::default();
        assert_eq!(d.to_string(), DEFAULT_OID_BASE);
        assert_eq!(d.scope_oid_string(), format!("{DEFAULT_OID_BASE}.1"));
        assert!("1.3.6.1.4.1.2147483647".parse::<OidBase>().is_ok());
        for bad in [
            "",
            "1",
            "1.3.6.1.4.1.2147483648",
            "2.25.329800735698586629295641978511506172918",
            "3.1",
            "1.40",
            "1..2",
            "1.03",
            "a.b",
        ] {
            assert!(bad.parse::<OidBase>().is_err(), "{bad}");
        }
    }

    #[test]
    fn delegation_round_trips() {
        let scopes = ScopeSet::parse(&["calendar:read"]).unwrap();
        let d = Delegation {
            principal: "user:alice@example.com".parse().unwrap(),
            chain: vec![
                Hop {
                    agent: SpiffeId::new("spiffe://example.org/orchestrator").unwrap(),
                    grant_id: GrantId::generate(),
                },
                Hop {
                    agent: SpiffeId::new("spiffe://example.org/scheduler").unwrap(),
                    grant_id: GrantId::generate(),
                },
            ],
            scopes: scopes.clone(),
            expires_at: 0,
            remaining_depth: 2,
            task_id: Some("t-1".parse().unwrap()),
        };
        let der = encode_delegation(&d);
        assert_eq!(decode_delegation(&der, scopes.clone()).unwrap(), d);
        let mut no_task = d.clone();
        no_task.task_id = None;
        assert_eq!(
            decode_delegation(&encode_delegation(&no_task), scopes.clone()).unwrap(),
            no_task
        );
        assert_eq!(decode_scopes(&encode_scopes(&scopes)).unwrap(), scopes);
        // Garbage and trailing bytes are errors, not panics.
        assert!(decode_delegation(&der[..der.len() - 1], scopes.clone()).is_err());
        let mut extra = der.clone();
        extra.push(0);
        assert!(decode_delegation(&extra, scopes).is_err());
        assert!(decode_scopes(b"\x30\x03\x0c\x01!").is_err());
    }
}
