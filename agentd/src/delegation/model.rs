//! Grants and delegation chains, and the narrowing rules every new link must obey
//! (DESIGN section 3, "Grant"): child scopes ⊆ parent scopes ∩ the child's entry ceiling,
//! child expiry ≤ parent expiry, depth strictly decreases, the principal never changes,
//! the chain is append-only. These are pure functions: the server calls them before it
//! writes anything, so a refused step leaves no record.

use std::fmt;
use std::str::FromStr;

use spiffe::SpiffeId;

use super::scope::{Scope, ScopeSet};

/// The deepest chain a root grant may allow unless the server is configured otherwise.
pub const DEFAULT_MAX_DEPTH: u32 = 4;

/// On whose behalf an agent acts: a user (`user:alice@example.com`) or another workload
/// (a SPIFFE ID).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Principal {
    User(String),
    Workload(SpiffeId),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("principal {input:?} must be user:NAME (printable, no spaces, at most 256 bytes) or a SPIFFE ID")]
    Principal { input: String },
    #[error("grant id {input:?} must be 32 lowercase hex characters")]
    Grant { input: String },
    #[error("task id {input:?} must be 1 to 128 letters, digits, '.', '_' or '-'")]
    Task { input: String },
}

fn clip(s: &str) -> String {
    s.chars().take(80).collect()
}

impl FromStr for Principal {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, IdError> {
        let bad = || IdError::Principal { input: clip(s) };
        if let Some(name) = s.strip_prefix("user:") {
            if name.is_empty()
                || s.len() > 256
                || name.chars().any(|c| c.is_control() || c.is_whitespace())
            {
                return Err(bad());
            }
            return Ok(Self::User(name.to_string()));
        }
        if s.starts_with("spiffe://") {
            return SpiffeId::new(s).map(Self::Workload).map_err(|_| bad());
        }
        Err(bad())
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::User(n) => write!(f, "user:{n}"),
            Self::Workload(id) => write!(f, "{id}"),
        }
    }
}

/// A grant's id: 32 lowercase hex characters (128 random bits).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GrantId(String);

impl GrantId {
    pub fn generate() -> Self {
        Self(hex::encode(rand::random::<[u8; 16]>()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for GrantId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, IdError> {
        if s.len() == 32
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            Ok(Self(s.to_string()))
        } else {
            Err(IdError::Grant { input: clip(s) })
        }
    }
}

impl fmt::Display for GrantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A task id chosen by the operator (`--task`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TaskId(String);

impl TaskId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for TaskId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, IdError> {
        if !s.is_empty()
            && s.len() <= 128
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            Ok(Self(s.to_string()))
        } else {
            Err(IdError::Task { input: clip(s) })
        }
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One link of a chain: the agent that received authority, and the grant that gave it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Hop {
    pub agent: SpiffeId,
    pub grant_id: GrantId,
}

/// What a grant (and every SVID minted for it) carries: who authorized whom, through which
/// agents, for what, until when, and how many more hops are allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delegation {
    pub principal: Principal,
    /// Root first; the last hop is the agent that holds this delegation. Never empty.
    pub chain: Vec<Hop>,
    pub scopes: ScopeSet,
    /// Unix seconds.
    pub expires_at: i64,
    /// How many further delegations are allowed from here (0: none).
    pub remaining_depth: u32,
    pub task_id: Option<TaskId>,
}

impl Delegation {
    /// The agent holding this delegation (the last hop).
    pub fn agent(&self) -> Option<&SpiffeId> {
        self.chain.last().map(|h| &h.agent)
    }

    pub fn grant_id(&self) -> Option<&GrantId> {
        self.chain.last().map(|h| &h.grant_id)
    }

    /// Grant ids root first: every revocation handle of the chain.
    pub fn grant_chain(&self) -> Vec<String> {
        self.chain.iter().map(|h| h.grant_id.to_string()).collect()
    }
}

/// Why a grant or a delegation step was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("scope: at least one scope is required")]
    NoScopes,
    #[error("scope: {scope} is not held by the parent grant (it holds: {held})")]
    ScopeNotInParent { scope: String, held: String },
    #[error("scope: {scope} exceeds the entry ceiling of {agent} (ceiling: {ceiling})")]
    ScopeAboveCeiling {
        scope: String,
        agent: String,
        ceiling: String,
    },
    #[error(
        "ttl: the delegation would expire at {requested}, after its parent (expires at {parent})"
    )]
    ExpiryExtended { requested: i64, parent: i64 },
    #[error("ttl: the expiry {expires_at} is not in the future (now {now})")]
    NotInFuture { expires_at: i64, now: i64 },
    #[error("the parent grant expired at {expires_at}")]
    ParentExpired { expires_at: i64 },
    #[error("max_depth: the parent grant allows no further delegation (remaining depth 0)")]
    DepthExhausted,
    #[error("max_depth: {requested} must be less than the parent's remaining depth {parent}")]
    DepthNotDecreasing { requested: u32, parent: u32 },
    #[error("max_depth: {requested} is above the server's limit of {limit}")]
    DepthAboveLimit { requested: u32, limit: u32 },
    #[error("principal: {requested} differs from the chain's principal {principal}; the principal never changes")]
    PrincipalChanged {
        requested: String,
        principal: String,
    },
    #[error("task: {requested} differs from the chain's task {task}")]
    TaskChanged { requested: String, task: String },
}

/// A root grant: `principal` authorizes `agent`.
#[derive(Debug, Clone)]
pub struct RootRequest<'a> {
    pub principal: Principal,
    pub agent: SpiffeId,
    pub grant_id: GrantId,
    pub scopes: ScopeSet,
    pub expires_at: i64,
    pub max_depth: u32,
    pub task_id: Option<TaskId>,
    /// The agent's entry ceiling (the union of the scopes of its entries).
    pub ceiling: &'a ScopeSet,
    /// The server's depth limit.
    pub depth_limit: u32,
}

fn check_ceiling(scopes: &ScopeSet, agent: &SpiffeId, ceiling: &ScopeSet) -> Result<(), RuleError> {
    if let Some(s) = scopes.first_not_allowed_by(ceiling) {
        return Err(RuleError::ScopeAboveCeiling {
            scope: s.to_string(),
            agent: agent.to_string(),
            ceiling: if ceiling.is_empty() {
                "none".into()
            } else {
                ceiling.to_space_separated()
            },
        });
    }
    Ok(())
}

/// Checks a root grant and returns the delegation it creates.
pub fn root_grant(req: RootRequest<'_>, now: i64) -> Result<Delegation, RuleError> {
    if req.scopes.is_empty() {
        return Err(RuleError::NoScopes);
    }
    check_ceiling(&req.scopes, &req.agent, req.ceiling)?;
    if req.expires_at <= now {
        return Err(RuleError::NotInFuture {
            expires_at: req.expires_at,
            now,
        });
    }
    if req.max_depth > req.depth_limit {
        return Err(RuleError::DepthAboveLimit {
            requested: req.max_depth,
            limit: req.depth_limit,
        });
    }
    Ok(Delegation {
        principal: req.principal,
        chain: vec![Hop {
            agent: req.agent,
            grant_id: req.grant_id,
        }],
        scopes: req.scopes,
        expires_at: req.expires_at,
        remaining_depth: req.max_depth,
        task_id: req.task_id,
    })
}

/// One delegation step: the holder of `parent` hands part of it to `agent`.
#[derive(Debug, Clone)]
pub struct ChildRequest<'a> {
    pub agent: SpiffeId,
    pub grant_id: GrantId,
    pub scopes: ScopeSet,
    pub expires_at: i64,
    /// None: one less than the parent's.
    pub max_depth: Option<u32>,
    /// A principal the caller claims; refused unless it is the chain's own.
    pub principal: Option<Principal>,
    pub task_id: Option<TaskId>,
    /// The child agent's entry ceiling.
    pub ceiling: &'a ScopeSet,
}

/// Checks one delegation step against every rule and returns the child delegation. The
/// child's chain is the parent's with one hop appended: nothing before it can change.
pub fn derive_child(
    parent: &Delegation,
    req: ChildRequest<'_>,
    now: i64,
) -> Result<Delegation, RuleError> {
    if parent.expires_at <= now {
        return Err(RuleError::ParentExpired {
            expires_at: parent.expires_at,
        });
    }
    if let Some(p) = &req.principal {
        if *p != parent.principal {
            return Err(RuleError::PrincipalChanged {
                requested: p.to_string(),
                principal: parent.principal.to_string(),
            });
        }
    }
    if let Some(t) = &req.task_id {
        if parent.task_id.as_ref() != Some(t) {
            return Err(RuleError::TaskChanged {
                requested: t.to_string(),
                task: parent
                    .task_id
                    .as_ref()
                    .map_or_else(|| "none".into(), ToString::to_string),
            });
        }
    }
    if parent.remaining_depth == 0 {
        return Err(RuleError::DepthExhausted);
    }
    let remaining_depth = match req.max_depth {
        None => parent.remaining_depth - 1,
        Some(d) if d < parent.remaining_depth => d,
        Some(d) => {
            return Err(RuleError::DepthNotDecreasing {
                requested: d,
                parent: parent.remaining_depth,
            })
        }
    };
    if req.scopes.is_empty() {
        return Err(RuleError::NoScopes);
    }
    if let Some(s) = req.scopes.first_not_allowed_by(&parent.scopes) {
        return Err(RuleError::ScopeNotInParent {
            scope: s.to_string(),
            held: parent.scopes.to_space_separated(),
        });
    }
    check_ceiling(&req.scopes, &req.agent, req.ceiling)?;
    if req.expires_at > parent.expires_at {
        return Err(RuleError::ExpiryExtended {
            requested: req.expires_at,
            parent: parent.expires_at,
        });
    }
    if req.expires_at <= now {
        return Err(RuleError::NotInFuture {
            expires_at: req.expires_at,
            now,
        });
    }
    let mut chain = parent.chain.clone();
    chain.push(Hop {
        agent: req.agent,
        grant_id: req.grant_id,
    });
    Ok(Delegation {
        principal: parent.principal.clone(),
        chain,
        scopes: req.scopes,
        expires_at: req.expires_at,
        remaining_depth,
        task_id: parent.task_id.clone(),
    })
}

/// Whether holding `d` allows `scope` (the top-level scopes decide; see docs/delegation.md).
pub fn allows(d: &Delegation, scope: &Scope) -> bool {
    d.scopes.allows(scope)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delegation::scope::oracle;
    use proptest::prelude::*;

    fn id(p: &str) -> SpiffeId {
        SpiffeId::new(format!("spiffe://example.org/{p}")).unwrap()
    }

    fn set(xs: &[&str]) -> ScopeSet {
        ScopeSet::parse(xs).unwrap()
    }

    fn root(scopes: &[&str], depth: u32) -> Delegation {
        let ceiling = set(&["calendar:*", "crm:*", "payments:*"]);
        root_grant(
            RootRequest {
                principal: "user:alice@example.com".parse().unwrap(),
                agent: id("orchestrator"),
                grant_id: GrantId::generate(),
                scopes: set(scopes),
                expires_at: 1000,
                max_depth: depth,
                task_id: None,
                ceiling: &ceiling,
                depth_limit: DEFAULT_MAX_DEPTH,
            },
            0,
        )
        .unwrap()
    }

    fn child<'a>(scopes: &[&str], exp: i64, ceiling: &'a ScopeSet) -> ChildRequest<'a> {
        ChildRequest {
            agent: id("scheduler"),
            grant_id: GrantId::generate(),
            scopes: set(scopes),
            expires_at: exp,
            max_depth: None,
            principal: None,
            task_id: None,
            ceiling,
        }
    }

    #[test]
    fn ids_parse() {
        assert_eq!(
            "user:alice@example.com".parse::<Principal>().unwrap(),
            Principal::User("alice@example.com".into())
        );
        assert!(matches!(
            "spiffe://example.org/a".parse::<Principal>().unwrap(),
            Principal::Workload(_)
        ));
        for bad in ["alice", "user:", "user:a b", "spiffe://", "group:x"] {
            assert!(bad.parse::<Principal>().is_err(), "{bad}");
        }
        assert!("0123456789abcdef0123456789abcdef"
            .parse::<GrantId>()
            .is_ok());
        assert!("XYZ".parse::<GrantId>().is_err());
        assert!("task-42".parse::<TaskId>().is_ok());
        assert!("task 42".parse::<TaskId>().is_err());
    }

    #[test]
    fn a_root_grant_beyond_the_ceiling_is_refused() {
        let ceiling = set(&["calendar:read"]);
        let err = root_grant(
            RootRequest {
                principal: "user:alice".parse().unwrap(),
                agent: id("a"),
                grant_id: GrantId::generate(),
                scopes: set(&["calendar:*"]),
                expires_at: 100,
                max_depth: 1,
                task_id: None,
                ceiling: &ceiling,
                depth_limit: 4,
            },
            0,
        )
        .unwrap_err();
        assert!(matches!(err, RuleError::ScopeAboveCeiling { .. }), "{err}");
        assert!(err.to_string().starts_with("scope: calendar:*"), "{err}");
    }

    #[test]
    fn each_rule_is_enforced_with_a_clear_error() {
        let r = root(&["calendar:*", "crm:read"], 2);
        let wide = set(&["calendar:*", "crm:*"]);
        let c = derive_child(&r, child(&["calendar:read"], 500, &wide), 0).unwrap();
        assert_eq!(c.chain.len(), 2);
        assert_eq!(c.chain[0], r.chain[0]);
        assert_eq!(c.remaining_depth, 1);
        assert_eq!(c.principal, r.principal);

        let e = derive_child(&r, child(&["crm:write"], 500, &wide), 0).unwrap_err();
        assert!(matches!(e, RuleError::ScopeNotInParent { .. }), "{e}");
        let narrow = set(&["calendar:read"]);
        let e = derive_child(&r, child(&["crm:read"], 500, &narrow), 0).unwrap_err();
        assert!(matches!(e, RuleError::ScopeAboveCeiling { .. }), "{e}");
        let e = derive_child(&r, child(&["calendar:read"], 1001, &wide), 0).unwrap_err();
        assert!(matches!(e, RuleError::ExpiryExtended { .. }), "{e}");
        let e = derive_child(&r, child(&["calendar:read"], 500, &wide), 1000).unwrap_err();
        assert!(matches!(e, RuleError::ParentExpired { .. }), "{e}");
        let mut req = child(&["calendar:read"], 500, &wide);
        req.max_depth = Some(2);
        let e = derive_child(&r, req, 0).unwrap_err();
        assert!(matches!(e, RuleError::DepthNotDecreasing { .. }), "{e}");
        let mut req = child(&["calendar:read"], 500, &wide);
        req.principal = Some("user:mallory".parse().unwrap());
        let e = derive_child(&r, req, 0).unwrap_err();
        assert!(matches!(e, RuleError::PrincipalChanged { .. }), "{e}");
        let leaf = derive_child(&c, child(&["calendar:read"], 400, &wide), 0).unwrap();
        assert_eq!(leaf.remaining_depth, 0);
        let e = derive_child(&leaf, child(&["calendar:read"], 300, &wide), 0).unwrap_err();
        assert_eq!(e, RuleError::DepthExhausted);
    }

    /// Attenuation with wildcards, answers worked out by hand.
    #[test]
    fn a_wildcard_is_not_attenuated_from_a_list_of_actions() {
        let wide = set(&["calendar:*", "crm:*", "payments:*"]);
        // Parent holds two calendar actions: the child may not ask for calendar:*.
        let listed = root(&["calendar:read", "calendar:write"], 2);
        let e = derive_child(&listed, child(&["calendar:*"], 500, &wide), 0).unwrap_err();
        assert_eq!(
            e,
            RuleError::ScopeNotInParent {
                scope: "calendar:*".into(),
                held: "calendar:read calendar:write".into()
            }
        );
        // Nor a third action, nor the same action on another resource.
        for scopes in [
            &["calendar:delete"][..],
            &["crm:read"],
            &["calendar:read", "crm:read"],
        ] {
            let e = derive_child(&listed, child(scopes, 500, &wide), 0).unwrap_err();
            assert!(
                matches!(e, RuleError::ScopeNotInParent { .. }),
                "{scopes:?}: {e}"
            );
        }
        // Parent holds calendar:*: listing actions narrows it, and the child may narrow again.
        let wild = root(&["calendar:*"], 2);
        let c = derive_child(
            &wild,
            child(&["calendar:read", "calendar:write"], 500, &wide),
            0,
        )
        .unwrap();
        assert_eq!(c.scopes, set(&["calendar:read", "calendar:write"]));
        let e = derive_child(&c, child(&["calendar:*"], 400, &wide), 0).unwrap_err();
        assert!(matches!(e, RuleError::ScopeNotInParent { .. }), "{e}");
        let leaf = derive_child(&c, child(&["calendar:read"], 400, &wide), 0).unwrap();
        assert_eq!(leaf.scopes, set(&["calendar:read"]));
        // The parent's wildcard does not lift the child's entry ceiling.
        let narrow = set(&["calendar:read"]);
        let e = derive_child(&wild, child(&["calendar:*"], 500, &narrow), 0).unwrap_err();
        assert!(matches!(e, RuleError::ScopeAboveCeiling { .. }), "{e}");
        let e = derive_child(&wild, child(&["calendar:write"], 500, &narrow), 0).unwrap_err();
        assert!(matches!(e, RuleError::ScopeAboveCeiling { .. }), "{e}");
    }

    fn scope_strategy() -> impl Strategy<Value = String> {
        (
            prop::sample::select(vec!["calendar", "crm", "payments"]),
            prop::sample::select(vec!["read", "write", "execute", "*"]),
        )
            .prop_map(|(r, a)| format!("{r}:{a}"))
    }

    #[derive(Debug, Clone)]
    struct Attempt {
        scopes: Vec<String>,
        ceiling: Vec<String>,
        expires_at: i64,
        max_depth: Option<u32>,
        other_principal: bool,
        now: i64,
    }

    fn attempt_strategy() -> impl Strategy<Value = Attempt> {
        (
            prop::collection::vec(scope_strategy(), 0..4),
            prop::collection::vec(scope_strategy(), 0..6),
            0i64..1200,
            prop::option::of(0u32..6),
            prop::bool::weighted(0.2),
            0i64..200,
        )
            .prop_map(
                |(scopes, ceiling, expires_at, max_depth, other_principal, now)| Attempt {
                    scopes,
                    ceiling,
                    expires_at,
                    max_depth,
                    other_principal,
                    now,
                },
            )
    }

    proptest! {
        /// No sequence of delegations ever widens scope, extends expiry, keeps or raises
        /// depth, changes the principal or rewrites the chain: every attempt to do so is
        /// refused, and every accepted step narrows.
        #[test]
        fn no_sequence_of_delegations_widens_anything(
            root_scopes in prop::collection::vec(scope_strategy(), 1..5),
            root_depth in 0u32..5,
            attempts in prop::collection::vec(attempt_strategy(), 1..12),
        ) {
            let root_scopes = ScopeSet::parse(&root_scopes).unwrap();
            let ceiling = root_scopes.clone();
            let root = root_grant(RootRequest {
                principal: "user:alice".parse().unwrap(),
                agent: id("a0"),
                grant_id: GrantId::generate(),
                scopes: root_scopes.clone(),
                expires_at: 1000,
                max_depth: root_depth.min(DEFAULT_MAX_DEPTH),
                task_id: None,
                ceiling: &ceiling,
                depth_limit: DEFAULT_MAX_DEPTH,
            }, 0).unwrap();
            let mut current = root.clone();
            for (i, a) in attempts.into_iter().enumerate() {
                let scopes = ScopeSet::parse(&a.scopes).unwrap();
                let ceiling = ScopeSet::parse(&a.ceiling).unwrap();
                // The oracle, not the subset test under test, decides what widens.
                let asked = oracle::granted(&a.scopes);
                let widens = !oracle::within(&asked, &oracle::granted(&current.scopes.to_strings()))
                    || !oracle::within(&asked, &oracle::granted(&a.ceiling));
                let extends = a.expires_at > current.expires_at;
                let depth_bad = current.remaining_depth == 0
                    || a.max_depth.is_some_and(|d| d >= current.remaining_depth);
                let req = ChildRequest {
                    agent: id(&format!("a{}", i + 1)),
                    grant_id: GrantId::generate(),
                    scopes: scopes.clone(),
                    expires_at: a.expires_at,
                    max_depth: a.max_depth,
                    principal: a.other_principal.then(|| "user:mallory".parse().unwrap()),
                    task_id: None,
                    ceiling: &ceiling,
                };
                match derive_child(&current, req, a.now) {
                    Ok(next) => {
                        prop_assert!(!widens && !extends && !depth_bad && !a.other_principal);
                        let got = oracle::granted(&next.scopes.to_strings());
                        prop_assert!(oracle::within(&got, &oracle::granted(&current.scopes.to_strings())));
                        prop_assert!(oracle::within(&got, &oracle::granted(&root.scopes.to_strings())));
                        prop_assert!(oracle::within(&got, &oracle::granted(&a.ceiling)));
                        prop_assert!(next.expires_at <= current.expires_at);
                        prop_assert!(next.expires_at > a.now);
                        prop_assert!(next.remaining_depth < current.remaining_depth);
                        prop_assert_eq!(&next.principal, &root.principal);
                        prop_assert_eq!(&next.chain[..current.chain.len()], &current.chain[..]);
                        prop_assert_eq!(next.chain.len(), current.chain.len() + 1);
                        current = next;
                    }
                    Err(e) => {
                        // Refused only for a reason, and the message names the field.
                        prop_assert!(
                            widens || extends || depth_bad || a.other_principal
                                || scopes.is_empty() || a.expires_at <= a.now
                                || current.expires_at <= a.now,
                            "refused without cause: {}", e
                        );
                        let msg = e.to_string();
                        prop_assert!(
                            ["scope:", "ttl:", "max_depth:", "principal:", "the parent grant expired"]
                                .iter().any(|p| msg.starts_with(p)),
                            "unclear error: {}", msg
                        );
                    }
                }
            }
        }
    }
}
