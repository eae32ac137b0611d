//! Delegation on the server: root grants from the admin API, the decision whether a
//! delegated SVID may be minted now, and agent-to-agent delegation (single-use offers and
//! their exchange). Every rule is enforced here, never by the caller (DESIGN section 3).
//!
//! Over 600 lines: the narrowing rules, the mint decision, the offer and its exchange share
//! their checks and are read together (about 630 lines of code, then their unit tests).

use std::collections::BTreeSet;
use std::time::Duration;

use agentd_proto::admin as apb;
use agentd_proto::node as npb;
use serde_json::Value;
use spiffe::SpiffeId;
use tonic::Status;

use super::ServerState;
use crate::ca::{CaError, IssuedJwtSvid, IssuedX509Svid, JwtSvidParams, X509SvidParams};
use crate::clock::unix_seconds;
use crate::datastore::{DataStore, DataStoreError, DelegationOffer, Entry, EntryFilter, Grant};
use crate::delegation::{
    claims, derive_child, root_grant, x509ext, ChildRequest, GrantId, Principal, RootRequest,
    RuleError, ScopeSet, TaskId,
};
use crate::svid::jwt::JwtError;
use crate::ttl::Ttl;

/// A grant's lifetime when `--ttl` is not given.
pub const DEFAULT_GRANT_TTL: Duration = Duration::from_secs(8 * 3600);
/// A task grant's lifetime when `--ttl` is not given: task identities are short-lived.
pub const DEFAULT_TASK_GRANT_TTL: Duration = Duration::from_secs(10 * 60);
/// Longest lifetime of an X.509-SVID that carries a task id.
pub const TASK_SVID_TTL: Duration = Duration::from_secs(5 * 60);
/// Longest time a delegation token may wait to be exchanged.
pub const DELEGATION_TOKEN_TTL: Duration = Duration::from_secs(5 * 60);
/// How long an expired grant is kept (for `grant list --include-expired` and `grant get`)
/// before it is pruned. Nothing else needs it: an expired grant mints nothing, and a child
/// names its ancestors in its own chain.
pub const EXPIRED_GRANT_RETENTION: Duration = Duration::from_secs(24 * 3600);
/// Most offers of one grant waiting to be redeemed at once: each is a stored record until
/// its token expires, and a holder could otherwise offer without bound.
pub const MAX_OFFERS_PER_GRANT: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    #[error("{field}: {reason}")]
    InvalidField { field: &'static str, reason: String },
    #[error(transparent)]
    Rule(#[from] RuleError),
    #[error("grant {0} not found")]
    NotFound(String),
    #[error("grant {grant} expired at {expires_at}")]
    Expired { grant: String, expires_at: i64 },
    #[error("grant {grant} is for {agent}, not {caller}")]
    WrongAgent {
        grant: String,
        agent: String,
        caller: String,
    },
    #[error("agent: {0} has no registration entry, so no scope ceiling; create its entry first")]
    NoEntry(String),
    #[error("delegation token: {reason}")]
    Token { reason: String },
    #[error("{handle} is revoked (revocation {sequence})")]
    Revoked { handle: String, sequence: u64 },
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Store(#[from] DataStoreError),
}

impl From<GrantError> for Status {
    fn from(e: GrantError) -> Self {
        let msg = e.to_string();
        match e {
            GrantError::InvalidField { .. } | GrantError::Rule(_) | GrantError::NoEntry(_) => {
                Status::invalid_argument(msg)
            }
            GrantError::NotFound(_) => Status::not_found(msg),
            GrantError::Expired { .. }
            | GrantError::WrongAgent { .. }
            | GrantError::Token { .. }
            | GrantError::Revoked { .. } => Status::permission_denied(msg),
            GrantError::Ca(CaError::Csr { .. }) => Status::invalid_argument(msg),
            GrantError::Ca(_) | GrantError::Store(_) => {
                tracing::error!(error = %msg, "delegation internal error");
                Status::internal(msg)
            }
        }
    }
}

fn invalid(field: &'static str, reason: impl std::fmt::Display) -> GrantError {
    GrantError::InvalidField {
        field,
        reason: reason.to_string(),
    }
}

/// An agent's entry ceiling: the union of the scopes of every entry with its SPIFFE ID.
/// None when it has no entry.
pub async fn ceiling_of(
    store: &dyn DataStore,
    agent: &SpiffeId,
) -> Result<Option<ScopeSet>, GrantError> {
    let entries = store
        .list_entries(&EntryFilter {
            spiffe_id: Some(agent.clone()),
            ..Default::default()
        })
        .await?;
    if entries.is_empty() {
        return Ok(None);
    }
    let all: BTreeSet<String> = entries
        .iter()
        .flat_map(|e| e.spec.scopes.iter().cloned())
        .collect();
    let all: Vec<String> = all.into_iter().collect();
    Ok(Some(ScopeSet::parse(&all).map_err(|e| {
        invalid("scope", format!("stored entry scope: {e}"))
    })?))
}

/// A grant may narrow the resources of its agent, never widen them: each of its prefixes
/// must lie under one of some entry of the agent's.
async fn check_grant_resources(
    store: &dyn DataStore,
    agent: &SpiffeId,
    resources: &[crate::model::oauth::ResourcePrefix],
) -> Result<(), GrantError> {
    if resources.is_empty() {
        return Ok(());
    }
    let entries = store
        .list_entries(&EntryFilter {
            spiffe_id: Some(agent.clone()),
            ..Default::default()
        })
        .await?;
    for r in resources {
        let as_url: crate::model::oauth::ResourceUrl =
            r.as_str().parse().map_err(|e| invalid("resource", e))?;
        if !entries
            .iter()
            .any(|e| e.spec.resources.iter().any(|p| p.allows(&as_url)))
        {
            return Err(invalid(
                "resource",
                format!("{r} is not under a resource of {agent}'s entry (entry --resource)"),
            ));
        }
    }
    Ok(())
}

fn parse_agent(
    state: &ServerState,
    field: &'static str,
    raw: &str,
) -> Result<SpiffeId, GrantError> {
    if raw.is_empty() {
        return Err(invalid(field, "is required"));
    }
    let id = SpiffeId::new(raw).map_err(|e| invalid(field, format!("{raw:?}: {e}")))?;
    if !id.is_member_of(&state.config.trust_domain) {
        return Err(invalid(
            field,
            format!("{id} is not in trust domain {}", state.config.trust_domain),
        ));
    }
    Ok(id)
}

/// Creates a root grant from the admin API. Nothing is written unless every rule holds.
pub async fn create_root_grant(
    state: &ServerState,
    req: apb::CreateGrantRequest,
) -> Result<Grant, GrantError> {
    let principal: Principal = req.principal.parse().map_err(|e| invalid("principal", e))?;
    let agent = parse_agent(state, "agent", &req.agent)?;
    let scopes = ScopeSet::parse(&req.scopes).map_err(|e| invalid("scope", e))?;
    let task_id: Option<TaskId> = if req.task_id.is_empty() {
        None
    } else {
        Some(req.task_id.parse().map_err(|e| invalid("task", e))?)
    };
    let default_ttl = if task_id.is_some() {
        DEFAULT_TASK_GRANT_TTL
    } else {
        DEFAULT_GRANT_TTL
    };
    let ttl = Ttl::from_proto_secs(req.ttl_seconds)
        .map_err(|e| invalid("ttl", e))?
        .map_or(default_ttl, |t| t.as_duration());
    let resources =
        crate::model::oauth::parse_prefixes(&req.resources).map_err(|e| invalid("resource", e))?;
    let ceiling = ceiling_of(state.store.as_ref(), &agent)
        .await?
        .ok_or_else(|| GrantError::NoEntry(agent.to_string()))?;
    check_grant_resources(state.store.as_ref(), &agent, &resources).await?;
    let now = unix_seconds(state.clock.now());
    let id = GrantId::generate();
    let delegation = root_grant(
        RootRequest {
            principal,
            agent,
            grant_id: id.clone(),
            scopes,
            expires_at: now.saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX)),
            max_depth: req.max_depth.unwrap_or(0),
            task_id,
            ceiling: &ceiling,
            depth_limit: state.config.delegation.max_depth,
        },
        now,
    )?;
    let grant = Grant {
        id,
        delegation,
        parent_grant_id: None,
        created_at: now,
        resources,
    };
    state.store.create_grant(grant.clone()).await?;
    publish_grant(state, &grant).await;
    Ok(grant)
}

pub fn parse_grant_id(raw: &str) -> Result<GrantId, GrantError> {
    raw.parse().map_err(|e| invalid("grant_id", e))
}

pub async fn load_grant(store: &dyn DataStore, id: &GrantId) -> Result<Grant, GrantError> {
    store
        .get_grant(id)
        .await?
        .ok_or_else(|| GrantError::NotFound(id.to_string()))
}

/// The one decision "may a delegated SVID for `grant` be minted for `entry` now": the
/// entry's SPIFFE ID is the grant's agent, the grant is live, and its scopes are still
/// within the ceiling of `entry`, the entry serving this workload (an entry narrowed after
/// the grant narrows what is minted). Not the union over every entry with that SPIFFE ID:
/// a workload matched by a narrow entry must not reach a wide entry's scopes through a
/// grant, as it cannot through a plain SVID (which carries its own entry's scopes).
pub fn authorize_grant_mint(grant: &Grant, entry: &Entry, now: i64) -> Result<(), GrantError> {
    let agent = grant
        .agent()
        .ok_or_else(|| invalid("grant", "stored grant has an empty chain"))?;
    if *agent != entry.spec.spiffe_id {
        return Err(GrantError::WrongAgent {
            grant: grant.id.to_string(),
            agent: agent.to_string(),
            caller: entry.spec.spiffe_id.to_string(),
        });
    }
    if grant.delegation.expires_at <= now {
        return Err(GrantError::Expired {
            grant: grant.id.to_string(),
            expires_at: grant.delegation.expires_at,
        });
    }
    let ceiling = entry_scopes(entry);
    if let Some(s) = grant.delegation.scopes.first_not_allowed_by(&ceiling) {
        return Err(RuleError::ScopeAboveCeiling {
            scope: s.to_string(),
            agent: agent.to_string(),
            ceiling: ceiling.to_space_separated(),
        }
        .into());
    }
    Ok(())
}

/// A revoked handle is never re-issued while it stands: a grant whose chain holds a revoked
/// grant (a revocation cascades to everything derived from it), or whose task is revoked,
/// mints nothing and delegates nothing.
pub fn check_not_revoked(
    revocations: &crate::revocation::log::RevocationLog,
    grant: &Grant,
) -> Result<(), GrantError> {
    use crate::revocation::RevocationHandle;
    let mut handles: Vec<RevocationHandle> = grant
        .delegation
        .chain
        .iter()
        .map(|h| RevocationHandle::Grant(h.grant_id.to_string()))
        .collect();
    if let Some(t) = &grant.delegation.task_id {
        handles.push(RevocationHandle::Task(t.to_string()));
    }
    for h in handles {
        if let Some(sequence) = revocations.standing(&h) {
            return Err(GrantError::Revoked {
                handle: h.to_string(),
                sequence,
            });
        }
    }
    Ok(())
}

/// The audit fields describing a grant.
pub fn grant_audit(record: crate::audit::AuditRecord, g: &Grant) -> crate::audit::AuditRecord {
    let record = match g.agent() {
        Some(agent) => record.subject(agent),
        None => record,
    };
    record
        .field("grant", g.id.to_string())
        .field("principal", g.delegation.principal.to_string())
        .field(
            "grant_chain",
            g.delegation
                .chain
                .iter()
                .map(|h| h.grant_id.to_string())
                .collect::<Vec<_>>(),
        )
        .field(
            "agents",
            g.delegation
                .chain
                .iter()
                .map(|h| h.agent.to_string())
                .collect::<Vec<_>>(),
        )
        .field("scopes", g.delegation.scopes.to_space_separated())
        .field("expires_at", g.delegation.expires_at)
        .field("remaining_depth", g.delegation.remaining_depth)
        .field(
            "task",
            g.delegation.task_id.as_ref().map(ToString::to_string),
        )
        .field(
            "parent_grant",
            g.parent_grant_id.as_ref().map(ToString::to_string),
        )
}

/// The lifetime of an SVID for `grant`: the entry's, never past the grant, and short for
/// a task.
fn delegated_ttl(grant: &Grant, entry_ttl: Duration, now: i64) -> Duration {
    let left = u64::try_from(grant.delegation.expires_at.saturating_sub(now)).unwrap_or(0);
    let mut ttl = entry_ttl.min(Duration::from_secs(left));
    if grant.delegation.task_id.is_some() {
        ttl = ttl.min(TASK_SVID_TTL);
    }
    ttl
}

/// Mints a delegated X.509-SVID (after `authorize_grant_mint`).
pub fn sign_delegated_x509(
    state: &ServerState,
    grant: &Grant,
    entry: &Entry,
    csr: &[u8],
) -> Result<IssuedX509Svid, GrantError> {
    let now = state.clock.now();
    let ttl = delegated_ttl(
        grant,
        entry.spec.x509_svid_ttl.as_duration(),
        unix_seconds(now),
    );
    let ext = x509ext::svid_extensions(
        &state.config.delegation.oid_base,
        &grant.delegation.scopes,
        Some(&grant.delegation),
    );
    Ok(state.ca.sign_x509_svid(
        &X509SvidParams {
            csr_der: csr,
            spiffe_id: &entry.spec.spiffe_id,
            ttl,
            dns_names: &entry.spec.dns_names,
            extensions: &ext,
        },
        now,
    )?)
}

/// Mints a delegated JWT-SVID (after `authorize_grant_mint`).
pub fn sign_delegated_jwt(
    state: &ServerState,
    grant: &Grant,
    entry: &Entry,
    audience: &[String],
) -> Result<IssuedJwtSvid, GrantError> {
    let now = state.clock.now();
    let ttl = delegated_ttl(
        grant,
        entry.spec.jwt_svid_ttl.as_duration(),
        unix_seconds(now),
    );
    let extra = claims::to_claims(&grant.delegation.scopes, Some(&grant.delegation));
    Ok(state.ca.sign_jwt_svid(
        &JwtSvidParams {
            spiffe_id: &entry.spec.spiffe_id,
            audience,
            ttl,
            claims: Some(&extra),
        },
        now,
    )?)
}

/// The entry's scopes as a set (validated when the entry was written).
pub fn entry_scopes(entry: &Entry) -> ScopeSet {
    ScopeSet::parse(&entry.spec.scopes).unwrap_or_default()
}

/// Agent-to-agent, first half: the holder of `grant_id` (through `entry`, served by `node`)
/// offers part of it to `req.to`. Returns the single-use delegation token, recorded as issued
/// first (a JWT-SVID of the delegator: revoking its entry, node or grant lists its `jti`, and
/// the exchange refuses a listed token). The caller holds the issuance lock
/// (`RevocationLog::issuing`) from its standing checks through this.
pub async fn mint_delegation_token(
    state: &ServerState,
    entry: &Entry,
    node: &crate::datastore::AttestedNode,
    req: &npb::MintDelegationTokenRequest,
) -> Result<IssuedJwtSvid, GrantError> {
    let now = unix_seconds(state.clock.now());
    let grant = load_grant(state.store.as_ref(), &parse_grant_id(&req.grant_id)?).await?;
    authorize_grant_mint(&grant, entry, now)?;
    check_not_revoked(&state.revocations, &grant)?;
    let to = parse_agent(state, "to", &req.to)?;
    if to == entry.spec.spiffe_id {
        return Err(invalid("to", "an agent cannot delegate to itself"));
    }
    let scopes = ScopeSet::parse(&req.scopes).map_err(|e| invalid("scope", e))?;
    let d = &grant.delegation;
    // The same checks the exchange makes, so that a token that can never be redeemed is
    // not issued; the exchange checks again (and the receiver's ceiling).
    if d.remaining_depth == 0 {
        return Err(RuleError::DepthExhausted.into());
    }
    if scopes.is_empty() {
        return Err(RuleError::NoScopes.into());
    }
    if let Some(s) = scopes.first_not_allowed_by(&d.scopes) {
        return Err(RuleError::ScopeNotInParent {
            scope: s.to_string(),
            held: d.scopes.to_space_separated(),
        }
        .into());
    }
    let expires_at = match Ttl::from_proto_secs(req.ttl_seconds).map_err(|e| invalid("ttl", e))? {
        None => d.expires_at,
        Some(t) => now.saturating_add(i64::try_from(t.as_secs()).unwrap_or(i64::MAX)),
    };
    if expires_at > d.expires_at {
        return Err(RuleError::ExpiryExtended {
            requested: expires_at,
            parent: d.expires_at,
        }
        .into());
    }
    let offer_id = hex::encode(rand::random::<[u8; 16]>());
    let token_ttl = Duration::from_secs(u64::try_from(expires_at - now).unwrap_or(1).max(1))
        .min(DELEGATION_TOKEN_TTL);
    let mut shown = d.clone();
    shown.scopes = scopes.clone();
    let mut extra = claims::to_claims(&scopes, Some(&shown));
    extra.insert(claims::OFFER.into(), Value::String(offer_id.clone()));
    let token = state.ca.sign_jwt_svid(
        &JwtSvidParams {
            spiffe_id: &entry.spec.spiffe_id,
            audience: &[to.to_string()],
            ttl: token_ttl,
            claims: Some(&extra),
        },
        state.clock.now(),
    )?;
    let (grant_chain, task_id) = crate::server::issuance::grant_lineage(Some(&grant));
    crate::server::issuance::record_issued(
        state.store.as_ref(),
        &[crate::server::issuance::jwt_svid_record(
            &token,
            entry,
            node,
            grant_chain,
            task_id,
        )],
    )
    .await?;
    let created = state
        .store
        .create_delegation_offer(
            DelegationOffer {
                id: offer_id,
                parent_grant_id: grant.id.clone(),
                from: entry.spec.spiffe_id.clone(),
                to,
                scopes,
                expires_at,
                redeem_by: unix_seconds(token.expires_at),
            },
            MAX_OFFERS_PER_GRANT,
            now,
        )
        .await?;
    if !created {
        return Err(token_err(format!(
            "grant {} already has {MAX_OFFERS_PER_GRANT} unredeemed offers; redeem them or let them expire (at most {} s)",
            grant.id,
            DELEGATION_TOKEN_TTL.as_secs()
        )));
    }
    Ok(token)
}

fn token_err(reason: impl std::fmt::Display) -> GrantError {
    GrantError::Token {
        reason: reason.to_string(),
    }
}

/// Agent-to-agent, second half: `entry` (the receiver, attested by its node agent) redeems
/// a delegation token. The token must be signed by this server, addressed to the entry's
/// SPIFFE ID, and unused; the child grant must obey every narrowing rule.
pub async fn exchange_delegation_token(
    state: &ServerState,
    entry: &Entry,
    token: &str,
) -> Result<Grant, GrantError> {
    let now_t = state.clock.now();
    let now = unix_seconds(now_t);
    let me = entry.spec.spiffe_id.to_string();
    let validated =
        crate::svid::jwt::validate(token, &me, &state.ca.bundle(), now_t).map_err(|e| match e {
            JwtError::Audience { actual, .. } => token_err(format!(
                "addressed to {}, not to {me}: a token is bound to the agent it names",
                actual.join(", ")
            )),
            other => token_err(other),
        })?;
    let offer_id = validated
        .claims
        .get(claims::OFFER)
        .and_then(Value::as_str)
        .ok_or_else(|| token_err("not a delegation token (no agentd_offer claim)"))?;
    // The delegator's standing: revoking its entry, its node or the token itself lists the
    // token's jti (it was recorded as issued). Checked before the offer is spent.
    let jti = validated
        .claims
        .get("jti")
        .and_then(Value::as_str)
        .ok_or_else(|| token_err("no jti claim"))?;
    if state.revocations.is_jwt_revoked(jti) {
        return Err(token_err(format!(
            "revoked: the delegator's entry, node or this token (jti {jti}) was revoked after it was offered"
        )));
    }
    // Taken before anything else is decided: a token is honoured at most once, even when
    // presented twice at the same moment.
    let offer = state
        .store
        .take_delegation_offer(offer_id)
        .await?
        .ok_or_else(|| token_err("already used or unknown (a delegation token is single-use)"))?;
    if offer.to != entry.spec.spiffe_id || offer.from != validated.spiffe_id {
        return Err(token_err("the offer does not match the token"));
    }
    let parent = load_grant(state.store.as_ref(), &offer.parent_grant_id).await?;
    // Revoked between the offer and its redemption: nothing derives from it any more.
    check_not_revoked(&state.revocations, &parent)?;
    if parent.agent() != Some(&offer.from) {
        return Err(token_err("the offer's parent grant is not the delegator's"));
    }
    // The redeeming entry's own ceiling, as every mint for the child grant checks it.
    let ceiling = entry_scopes(entry);
    let id = GrantId::generate();
    let delegation = derive_child(
        &parent.delegation,
        ChildRequest {
            agent: entry.spec.spiffe_id.clone(),
            grant_id: id.clone(),
            scopes: offer.scopes,
            expires_at: offer.expires_at,
            max_depth: None,
            principal: None,
            task_id: None,
            ceiling: &ceiling,
        },
        now,
    )?;
    let grant = Grant {
        id,
        delegation,
        parent_grant_id: Some(parent.id),
        created_at: now,
        // A child reaches no resource its parent does not: every grant of the chain is
        // checked when a token is issued (server/oauth/issue.rs).
        resources: vec![],
    };
    state.store.create_grant(grant.clone()).await?;
    publish_grant(state, &grant).await;
    Ok(grant)
}

/// Tells the nodes serving the grant's agent that it has a new grant (through the parents
/// of the agent's entries, by the store's SPIFFE ID index). A lookup that fails costs the
/// push, not the grant: the node's regular sync still brings it.
async fn publish_grant(state: &ServerState, grant: &Grant) {
    let Some(agent) = grant.agent() else { return };
    let filter = crate::datastore::EntryFilter {
        spiffe_id: Some(agent.clone()),
        ..Default::default()
    };
    match state.store.list_entries(&filter).await {
        Ok(entries) => state.changes.publish_under(
            &crate::tls::server_spiffe_id(&state.config.trust_domain),
            entries.iter().map(|e| &e.spec.parent_id),
            crate::server::changes::Changed {
                grant_agents: vec![agent.clone()],
                ..Default::default()
            },
        ),
        Err(e) => {
            tracing::warn!(grant = %grant.id, error = %e, "finding the nodes to tell of a grant failed")
        }
    }
}

pub fn grant_to_node_proto(g: &Grant) -> npb::Grant {
    let d = &g.delegation;
    npb::Grant {
        id: g.id.to_string(),
        agent: g.agent().map(ToString::to_string).unwrap_or_default(),
        scopes: d.scopes.to_strings(),
        expires_at: d.expires_at,
        task_id: d
            .task_id
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        grant_chain: d.grant_chain(),
        principal: d.principal.to_string(),
        remaining_depth: d.remaining_depth,
    }
}

pub fn grant_to_admin_proto(g: &Grant) -> apb::Grant {
    let d = &g.delegation;
    apb::Grant {
        id: g.id.to_string(),
        principal: d.principal.to_string(),
        agent: g.agent().map(ToString::to_string).unwrap_or_default(),
        scopes: d.scopes.to_strings(),
        expires_at: d.expires_at,
        task_id: d
            .task_id
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        remaining_depth: d.remaining_depth,
        parent_grant_id: g
            .parent_grant_id
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        chain: d
            .chain
            .iter()
            .map(|h| apb::GrantHop {
                agent: h.agent.to_string(),
                grant_id: h.grant_id.to_string(),
            })
            .collect(),
        created_at: g.created_at,
        resources: g.resources.iter().map(ToString::to_string).collect(),
    }
}

/// Removes offers whose token has expired, and grants expired for longer than
/// [`EXPIRED_GRANT_RETENTION`]; returns how many of each.
pub async fn prune(store: &dyn DataStore, now: i64) -> Result<(usize, usize), DataStoreError> {
    let retention = i64::try_from(EXPIRED_GRANT_RETENTION.as_secs()).unwrap_or(i64::MAX);
    store
        .prune_delegation(now, now.saturating_sub(retention))
        .await
}

/// Up to this many agents, `live_grants_for` looks each one up in the store's index.
const AGENTS_LOOKED_UP: usize = 256;

/// Live grants to any of `agents`.
pub async fn live_grants_for(
    store: &dyn DataStore,
    agents: &BTreeSet<&SpiffeId>,
    now: i64,
) -> Result<Vec<Grant>, GrantError> {
    // A few agents (a delta, a small node): one index lookup each; many (a large node's
    // whole sync): one pass over every grant is cheaper than thousands of lookups.
    let candidates = if agents.len() <= AGENTS_LOOKED_UP {
        let mut out = Vec::new();
        for agent in agents {
            out.extend(store.list_grants_for_agent(agent).await?);
        }
        out
    } else {
        store.list_grants().await?
    };
    Ok(candidates
        .into_iter()
        .filter(|g| g.delegation.expires_at > now && g.agent().is_some_and(|a| agents.contains(a)))
        .collect())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::SystemTime;

    use super::*;
    use crate::ca::{CaConfig, CertificateAuthority};
    use crate::clock::{from_unix_seconds, Clock, ManualClock};
    use crate::datastore::{EntrySpec, SledStore};
    use crate::delegation::Verifier;
    use crate::server::config::{RawServerConfig, ServerConfig};

    const ORCH: &str = "spiffe://example.org/agent/orchestrator";
    const SCHED: &str = "spiffe://example.org/agent/scheduler";

    fn fixture() -> (tempfile::TempDir, ServerState, Arc<ManualClock>) {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(from_unix_seconds(unix_seconds(
            SystemTime::now(),
        ))));
        let mut config = ServerConfig::try_from(RawServerConfig::default()).unwrap();
        config.data_dir = dir.path().to_path_buf();
        let ca = CertificateAuthority::load_or_create(
            &CaConfig {
                trust_domain: config.trust_domain.clone(),
                key_dir: dir.path().join("keys"),
                ca_ttl: Duration::from_secs(86400),
                upstream: None,
                organization: "agentd test".into(),
            },
            clock.as_ref(),
        )
        .unwrap();
        let store: Arc<dyn crate::datastore::DataStore> =
            Arc::new(SledStore::open(&dir.path().join("db")).unwrap());
        // Opening the log reads the store on tokio's blocking pool: this runs inside the
        // calling #[tokio::test], whose runtime it finds.
        let revocations = Arc::new(
            futures::executor::block_on(crate::revocation::log::RevocationLog::open(store.clone()))
                .unwrap(),
        );
        let audit = Arc::new(crate::audit::Audit::new(store.clone(), clock.clone(), None).unwrap());
        let state = ServerState {
            config,
            store,
            ca: Arc::new(ca),
            clock: clock.clone(),
            node_api_address: "127.0.0.1:0".parse().unwrap(),
            revocations,
            audit,
            metrics: Arc::new(crate::telemetry::ServerMetrics::new()),
            readiness: crate::telemetry::Readiness::new(&[]),
            changes: Default::default(),
            server_id: "test".into(),
            federation: Default::default(),
        };
        (dir, state, clock)
    }

    async fn entry(state: &ServerState, id: &str, scopes: &[&str]) -> Entry {
        state
            .store
            .create_entry(
                EntrySpec {
                    resources: vec![],
                    spiffe_id: SpiffeId::new(id).unwrap(),
                    parent_id: SpiffeId::new("spiffe://example.org/node/a").unwrap(),
                    selectors: vec![format!("unix:uid:{}", id.len()).parse().unwrap()],
                    x509_svid_ttl: Ttl::from_secs(3600).unwrap(),
                    jwt_svid_ttl: Ttl::from_secs(300).unwrap(),
                    dns_names: vec![],
                    hint: String::new(),
                    scopes: scopes.iter().map(|s| s.to_string()).collect(),
                    owner: None,
                    federates_with: vec![],
                },
                0,
            )
            .await
            .unwrap()
    }

    fn node() -> crate::datastore::AttestedNode {
        crate::datastore::AttestedNode {
            spiffe_id: SpiffeId::new("spiffe://example.org/node/a").unwrap(),
            attestation_type: "join_token".into(),
            serial: "1".into(),
            svid_expires_at: i64::MAX,
            attested_at: 0,
            last_seen_at: 0,
            selectors: vec![],
            previous_serial: None,
            previous_svid_expires_at: None,
        }
    }

    fn grant_req(agent: &str, scopes: &[&str], ttl: i64, depth: u32) -> apb::CreateGrantRequest {
        apb::CreateGrantRequest {
            resources: vec![],
            principal: "user:alice@example.com".into(),
            agent: agent.into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            ttl_seconds: ttl,
            task_id: String::new(),
            max_depth: Some(depth),
        }
    }

    #[tokio::test]
    async fn refused_grants_name_the_field_and_write_nothing() {
        let (_dir, state, _clock) = fixture();
        entry(&state, ORCH, &["calendar:read"]).await;
        let cases = [
            (grant_req(ORCH, &["calendar:*"], 60, 0), "scope: calendar:*"),
            (grant_req(SCHED, &["calendar:read"], 60, 0), "agent: "),
            (grant_req(ORCH, &["calendar:read"], 60, 9), "max_depth: 9"),
            (grant_req(ORCH, &["calendar"], 60, 0), "scope: "),
            (grant_req(ORCH, &["calendar:read"], -5, 0), "ttl: "),
        ];
        for (req, prefix) in cases {
            let err = create_root_grant(&state, req)
                .await
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(prefix), "{err}");
        }
        let mut bad = grant_req(ORCH, &["calendar:read"], 60, 0);
        bad.principal = "alice".into();
        let err = create_root_grant(&state, bad)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("principal: "), "{err}");
        assert!(state.store.list_grants().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn delegation_tokens_are_bound_single_use_and_narrowing() {
        let (_dir, state, clock) = fixture();
        let orch = entry(&state, ORCH, &["calendar:*", "crm:read"]).await;
        let sched = entry(&state, SCHED, &["calendar:read", "crm:read"]).await;
        let root = create_root_grant(
            &state,
            grant_req(ORCH, &["calendar:*", "crm:read"], 3600, 1),
        )
        .await
        .unwrap();
        let offer = |scopes: &[&str], ttl: i64| npb::MintDelegationTokenRequest {
            entry_id: orch.id.to_string(),
            grant_id: root.id.to_string(),
            to: SCHED.into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            ttl_seconds: ttl,
        };
        // Widening and outliving the parent are refused before any token exists.
        let e = mint_delegation_token(&state, &orch, &node(), &offer(&["payments:execute"], 60))
            .await
            .unwrap_err();
        assert!(
            matches!(e, GrantError::Rule(RuleError::ScopeNotInParent { .. })),
            "{e}"
        );
        let e = mint_delegation_token(&state, &orch, &node(), &offer(&["calendar:read"], 7200))
            .await
            .unwrap_err();
        assert!(
            matches!(e, GrantError::Rule(RuleError::ExpiryExtended { .. })),
            "{e}"
        );
        // A grant is held only by its agent.
        let e = mint_delegation_token(&state, &sched, &node(), &offer(&["calendar:read"], 60))
            .await
            .unwrap_err();
        assert!(matches!(e, GrantError::WrongAgent { .. }), "{e}");

        let token = mint_delegation_token(&state, &orch, &node(), &offer(&["calendar:read"], 600))
            .await
            .unwrap()
            .token;
        // Another agent presenting it: refused, and the offer stays unspent.
        let e = exchange_delegation_token(&state, &orch, &token)
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("not to spiffe://example.org/agent/orchestrator"),
            "{e}"
        );
        let child = exchange_delegation_token(&state, &sched, &token)
            .await
            .unwrap();
        assert_eq!(child.parent_grant_id.as_ref(), Some(&root.id));
        assert_eq!(child.delegation.chain.len(), 2);
        assert_eq!(child.delegation.remaining_depth, 0);
        assert_eq!(child.delegation.principal, root.delegation.principal);
        // Replayed: refused, and no second grant.
        let e = exchange_delegation_token(&state, &sched, &token)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("single-use"), "{e}");
        assert_eq!(state.store.list_grants().await.unwrap().len(), 2);

        // The delegated SVID carries the chain and verifies.
        let key = crate::keys::PrivateKey::generate().unwrap();
        let now = unix_seconds(clock.now());
        authorize_grant_mint(&child, &sched, now).unwrap();
        let svid = sign_delegated_x509(&state, &child, &sched, &key.csr_der().unwrap()).unwrap();
        assert!(unix_seconds(svid.not_after) <= child.delegation.expires_at);
        let id = Verifier::new(state.ca.bundle())
            .verify_x509(&svid.cert_chain, clock.now())
            .unwrap();
        assert_eq!(
            id.delegation.unwrap().grant_chain(),
            child.delegation.grant_chain()
        );

        // Revoking the root grant cascades: the child mints nothing more, and a relying
        // party fed the event refuses the child's SVID.
        let event = state
            .revocations
            .revoke(
                crate::revocation::RevocationHandle::Grant(root.id.to_string()),
                "alice left",
                now,
            )
            .await
            .unwrap();
        let e = check_not_revoked(&state.revocations, &child).unwrap_err();
        assert!(matches!(e, GrantError::Revoked { .. }), "{e}");
        assert!(check_not_revoked(&state.revocations, &root).is_err());
        let mut set = crate::revocation::RevocationSet::new();
        set.apply(&event);
        let relying = Verifier::new(state.ca.bundle())
            .with_revocations(Arc::new(std::sync::RwLock::new(set)));
        let e = relying
            .verify_x509(&svid.cert_chain, clock.now())
            .unwrap_err();
        assert!(e.to_string().contains("revoked"), "{e}");

        // A JWT-SVID is refused by its jti once an event lists it, and accepted before.
        let jwt = state
            .ca
            .sign_jwt_svid(
                &crate::ca::JwtSvidParams {
                    spiffe_id: &sched.spec.spiffe_id,
                    audience: &["tool".to_string()],
                    ttl: Duration::from_secs(300),
                    claims: None,
                },
                clock.now(),
            )
            .unwrap();
        let mut set = crate::revocation::RevocationSet::new();
        let verified = Verifier::new(state.ca.bundle())
            .with_revocations(Arc::new(std::sync::RwLock::new(set.clone())))
            .verify_jwt(&jwt.token, "tool", clock.now())
            .unwrap();
        assert_eq!(verified.jti.as_deref(), Some(jwt.jti.as_str()));
        let mut by_entry = event.clone();
        by_entry.sequence += 1;
        by_entry.handle = crate::revocation::RevocationHandle::Entry(sched.id.clone());
        by_entry.serials.clear();
        by_entry.jwt_ids = vec![jwt.jti.clone()];
        set.apply(&by_entry);
        let e = Verifier::new(state.ca.bundle())
            .with_revocations(Arc::new(std::sync::RwLock::new(set)))
            .verify_jwt(&jwt.token, "tool", clock.now())
            .unwrap_err();
        assert!(e.to_string().contains(&jwt.jti), "{e}");

        // Narrowing the entry below the grant stops minting; so does expiry.
        let mut spec = sched.spec.clone();
        spec.scopes = vec!["crm:read".into()];
        let narrowed = state.store.update_entry(&sched.id, spec).await.unwrap();
        let e = authorize_grant_mint(&child, &narrowed, now).unwrap_err();
        assert!(
            matches!(e, GrantError::Rule(RuleError::ScopeAboveCeiling { .. })),
            "{e}"
        );
        clock.advance(Duration::from_secs(601));
        let e = authorize_grant_mint(&child, &sched, unix_seconds(clock.now())).unwrap_err();
        assert!(matches!(e, GrantError::Expired { .. }), "{e}");
    }
}
