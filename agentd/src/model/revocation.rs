//! Revocation records: the handles, the issued-SVID records they resolve to, and the numbered
//! events of the log. The datastore, the server's log and the node agents all use these.

use std::fmt;

use spiffe::SpiffeId;

use crate::model::ids::EntryId;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RevocationError {
    #[error("{field}: {reason}")]
    InvalidField { field: &'static str, reason: String },
    #[error("revocation {sequence} not found, or not a standing revocation")]
    NotStanding { sequence: u64 },
    #[error("{handle} is already revoked (revocation {sequence})")]
    AlreadyRevoked { handle: String, sequence: u64 },
    #[error("no unexpired SVID with serial {serial} was issued by this server")]
    UnknownSerial { serial: String },
    #[error("entry {id} not found")]
    UnknownEntry { id: String },
    #[error("{0}")]
    Refused(String),
}

/// What a revocation names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RevocationHandle {
    /// One X.509-SVID, by serial (lowercase hex, no leading zeros); or a JWT-SVID by `jti`.
    Svid(String),
    Entry(EntryId),
    /// A node: its node SVID stops working and every SVID it obtained is revoked.
    Node(SpiffeId),
    /// A grant, and everything derived from it.
    Grant(String),
    Task(String),
    /// A CA authority (X.509: subject key identifier, hex; JWT: key id).
    Authority(String),
}

/// The kinds, as they appear on the wire, in the CLI and in docs.
pub const HANDLE_KINDS: &[&str] = &["svid", "entry", "node", "grant", "task", "authority"];

/// Normalises a certificate serial as people paste it (`0x0A:BC`, `0abc`, `ABC`) to the form
/// the server prints: lowercase hex without separators or leading zeros.
pub fn normalize_serial(input: &str) -> Result<String, RevocationError> {
    let bad = |reason: &str| RevocationError::InvalidField {
        field: "serial",
        reason: format!("{:?} {reason}", input.chars().take(80).collect::<String>()),
    };
    let s = input.trim();
    let s = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    let hex: String = s.chars().filter(|c| *c != ':').collect();
    if hex.is_empty() {
        return Err(bad("is empty"));
    }
    if !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(bad("is not hexadecimal"));
    }
    // RFC 5280 4.1.2.2: at most 20 octets.
    let trimmed = hex.trim_start_matches('0').to_ascii_lowercase();
    if trimmed.len() > 40 {
        return Err(bad("is longer than 20 octets (RFC 5280 4.1.2.2)"));
    }
    if trimmed.is_empty() {
        return Err(bad("is zero, which no certificate has"));
    }
    Ok(trimmed)
}

/// Grant, task and authority ids: 1 to 128 printable characters from a safe set.
fn check_token_id(field: &'static str, id: &str) -> Result<String, RevocationError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    if ok {
        Ok(id.to_string())
    } else {
        Err(RevocationError::InvalidField {
            field,
            reason: format!(
                "{:?} must be 1 to 128 characters of A-Z a-z 0-9 - _ . :",
                id.chars().take(80).collect::<String>()
            ),
        })
    }
}

impl RevocationHandle {
    /// Parses a handle from its kind and id, as the CLI and the APIs receive them.
    pub fn parse(kind: &str, id: &str) -> Result<Self, RevocationError> {
        match kind {
            "svid" => {
                // A JWT-SVID's jti is 32 hex digits as well; both are stored normalised.
                Ok(Self::Svid(normalize_serial(id)?))
            }
            "entry" => id
                .parse()
                .map(Self::Entry)
                .map_err(
                    |e: crate::datastore::EntryIdError| RevocationError::InvalidField {
                        field: "id",
                        reason: e.to_string(),
                    },
                ),
            "node" => {
                SpiffeId::new(id)
                    .map(Self::Node)
                    .map_err(|e| RevocationError::InvalidField {
                        field: "spiffe_id",
                        reason: format!("{id:?}: {e}"),
                    })
            }
            "grant" => check_token_id("id", id).map(Self::Grant),
            "task" => check_token_id("id", id).map(Self::Task),
            "authority" => check_token_id("id", &id.to_ascii_lowercase()).map(Self::Authority),
            other => Err(RevocationError::InvalidField {
                field: "kind",
                reason: format!(
                    "{:?} is not a revocation handle; one of: {}",
                    other.chars().take(40).collect::<String>(),
                    HANDLE_KINDS.join(", ")
                ),
            }),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Self::Svid(_) => "svid",
            Self::Entry(_) => "entry",
            Self::Node(_) => "node",
            Self::Grant(_) => "grant",
            Self::Task(_) => "task",
            Self::Authority(_) => "authority",
        }
    }

    pub fn id(&self) -> String {
        match self {
            Self::Svid(s) | Self::Grant(s) | Self::Task(s) | Self::Authority(s) => s.clone(),
            Self::Entry(e) => e.to_string(),
            Self::Node(n) => n.to_string(),
        }
    }

    /// Whether an issued SVID falls under this handle.
    pub fn covers(&self, svid: &IssuedSvid) -> bool {
        match self {
            // A jti is hex too, but keeps its leading zeros.
            Self::Svid(serial) => {
                svid.id.trim_start_matches('0') == serial
                    || svid
                        .derived_from
                        .as_ref()
                        .is_some_and(|d| d.jti.trim_start_matches('0') == serial)
            }
            Self::Entry(id) => svid.entry_id.as_deref() == Some(id.as_str()),
            Self::Node(node) => svid.node_id.as_ref() == Some(node),
            Self::Grant(g) => svid.grant_chain.iter().any(|x| x == g),
            Self::Task(t) => svid.task_id.as_deref() == Some(t.as_str()),
            Self::Authority(a) => {
                svid.authority_id == *a
                    || svid.derived_from.as_ref().is_some_and(|d| d.key_id == *a)
            }
        }
    }
}

impl fmt::Display for RevocationHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind(), self.id())
    }
}

/// Which kind of document an issuance record is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SvidKind {
    /// A workload X.509-SVID (id: serial).
    X509,
    /// A workload JWT-SVID (id: jti).
    Jwt,
    /// A node agent's own X.509-SVID (id: serial).
    Node,
    /// An OAuth access token (RFC 9068) the token endpoint issued (id: jti).
    AccessToken,
}

impl SvidKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::X509 => "x509",
            Self::Jwt => "jwt",
            Self::Node => "node",
            Self::AccessToken => "access_token",
        }
    }

    /// Whether the document is a JWT (revoked by `jti`, listed in `jwt_ids`), not a
    /// certificate (revoked by serial, listed in CRLs).
    pub fn is_jwt(self) -> bool {
        matches!(self, Self::Jwt | Self::AccessToken)
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "x509" => Some(Self::X509),
            "jwt" => Some(Self::Jwt),
            "node" => Some(Self::Node),
            "access_token" => Some(Self::AccessToken),
            _ => None,
        }
    }
}

/// What the server records of every SVID it issues, so that each revocation handle can find
/// the SVIDs it covers (DESIGN.md section 3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedSvid {
    pub kind: SvidKind,
    /// X.509: serial, lowercase hex; JWT: jti.
    pub id: String,
    pub spiffe_id: String,
    pub entry_id: Option<String>,
    /// The node it was issued to (for a node SVID, the node itself).
    pub node_id: Option<SpiffeId>,
    /// Grant ids of every hop, root first; empty for a plain SVID.
    pub grant_chain: Vec<String>,
    pub task_id: Option<String>,
    /// X.509: the signing CA's authority id; JWT: the key id.
    pub authority_id: String,
    pub expires_at: i64,
    /// For an access token: the JWT-SVID it was exchanged for, so that revoking that
    /// JWT-SVID (by jti) or its signing key covers the token too.
    pub derived_from: Option<DerivedFrom>,
}

/// The JWT-SVID an access token was made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DerivedFrom {
    pub jti: String,
    /// The key id that signed it.
    pub key_id: String,
}

/// An X.509-SVID a revocation covers, with what a CRL needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedSerial {
    pub serial: String,
    pub authority_id: String,
    pub expires_at: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevocationAction {
    Revoke,
    /// Ends the standing revocation with this sequence number.
    Lift {
        revocation: u64,
    },
}

/// One entry of the revocation log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationEvent {
    /// Gap-free, from 1; assigned by the store when the event is appended.
    pub sequence: u64,
    pub action: RevocationAction,
    pub handle: RevocationHandle,
    pub reason: String,
    /// Unix seconds.
    pub at: i64,
    /// Unexpired X.509-SVIDs (workload and node) the handle covered when it was revoked.
    pub serials: Vec<RevokedSerial>,
    /// Unexpired JWT-SVIDs (`jti`) the handle covered when it was revoked.
    pub jwt_ids: Vec<String>,
    /// After this (unix seconds) nothing the event covered is valid any more.
    pub expires_at: i64,
}

impl RevocationEvent {
    pub fn is_revoke(&self) -> bool {
        self.action == RevocationAction::Revoke
    }
}

/// Longest accepted reason text.
pub const MAX_REASON_LEN: usize = 1024;

pub fn check_reason(reason: &str) -> Result<(), RevocationError> {
    if reason.len() > MAX_REASON_LEN || reason.chars().any(|c| c.is_control() && c != '\t') {
        return Err(RevocationError::InvalidField {
            field: "reason",
            reason: format!("must be at most {MAX_REASON_LEN} bytes of printable text"),
        });
    }
    Ok(())
}
