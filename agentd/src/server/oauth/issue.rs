//! What the token endpoint issues, and to whom (docs/oauth.md, "Policy").
//!
//! A JWT-SVID is accepted as a subject token (RFC 8693), an assertion (RFC 7523 section
//! 2.1) or a client assertion (section 2.2) only when it verifies against the trust
//! domain's bundle, its `aud` names this issuer (or the endpoint it is presented to), it has
//! not expired, this trust domain's servers recorded issuing it, and no revocation stands
//! over it (its jti, entry, node, grants, task or key). It is not single-use: node agents
//! cache JWT-SVIDs. What it yields never outlives it.
//!
//! The access token (RFC 9068 section 2.2) carries `iss`, `aud` = the one resource (RFC
//! 8707), `sub`, `client_id` = the agent's SPIFFE ID, `scope` (within the entry's ceiling,
//! the grant's scopes when delegated, and the JWT-SVID's own), `exp`, `iat`, `jti`; for a
//! delegated identity `sub` is the principal and `act` names the agents, the presenting one
//! outermost (RFC 8693 section 4.1). It is recorded like a JWT-SVID before it is returned,
//! so every revocation handle covering its JWT-SVID covers it too.

use std::time::Duration;

use serde_json::{json, Map, Value};

use super::form::Form;
use super::OAuthError;
use crate::audit::{Actor, AuditRecord};
use crate::clock::unix_seconds;
use crate::datastore::{Entry, EntryId, Grant};
use crate::delegation::{claims as dclaims, Delegation, ScopeSet};
use crate::model::oauth::ResourceUrl;
use crate::revocation::{DerivedFrom, IssuedSvid, RevocationHandle, SvidKind};
use crate::server::ServerState;
use crate::svid::jwt::JwtError;

/// The front door's settings once it is bound.
#[derive(Debug, Clone)]
pub struct FrontDoor {
    pub issuer: String,
    pub max_token_ttl: Duration,
}

impl FrontDoor {
    pub fn token_endpoint(&self) -> String {
        format!("{}{}", self.issuer, super::TOKEN_PATH)
    }

    pub fn introspection_endpoint(&self) -> String {
        format!("{}{}", self.issuer, super::INTROSPECTION_PATH)
    }
}

/// A JWT-SVID that passed every check, with what it resolves to.
#[derive(Debug)]
pub struct VerifiedSvid {
    pub jti: String,
    pub expires_at: i64,
    pub record: IssuedSvid,
    pub entry: Entry,
    /// The scopes the JWT-SVID carries.
    pub scopes: ScopeSet,
    /// The delegation it carries, and its chain's grants (root first).
    pub delegation: Option<(Delegation, Vec<Grant>)>,
}

fn grant_err(what: &str, reason: impl std::fmt::Display) -> OAuthError {
    OAuthError::InvalidGrant(format!("{what}: {reason}"))
}

/// Verifies a JWT-SVID presented as `what` (a parameter name), for any of `audiences`.
pub async fn verify_svid(
    state: &ServerState,
    token: &str,
    audiences: &[String],
    what: &str,
) -> Result<VerifiedSvid, OAuthError> {
    let now_t = state.clock.now();
    let now = unix_seconds(now_t);
    let bundle = state.ca.bundle();
    let mut validated = None;
    let mut last_err = None;
    for aud in audiences {
        match crate::svid::jwt::validate(token, aud, &bundle, now_t) {
            Ok(v) => {
                validated = Some(v);
                break;
            }
            Err(e) => last_err = Some(e),
        }
    }
    let v = match (validated, last_err) {
        (Some(v), _) => v,
        (None, Some(JwtError::Audience { actual, .. })) => {
            return Err(grant_err(
                what,
                format!(
                    "its aud {actual:?} does not name this issuer ({}): a JWT-SVID meant for another relying party is not exchanged",
                    audiences.first().map(String::as_str).unwrap_or_default()
                ),
            ))
        }
        (None, Some(JwtError::UnknownKey { kid })) => {
            return Err(grant_err(
                what,
                format!(
                    "signed by key {kid:?}, which is not in trust domain {}'s bundle (a JWT-SVID of another trust domain, or of a retired key)",
                    state.config.trust_domain
                ),
            ))
        }
        (None, Some(e)) => return Err(grant_err(what, e)),
        (None, None) => return Err(grant_err(what, "no audience to check")),
    };
    // One audience only: every relying party a JWT-SVID names holds it, and could exchange
    // it here for tokens of the agent's.
    let named = crate::svid::jwt::audiences(&v.claims).map_err(|e| grant_err(what, e))?;
    if named.len() > 1 {
        return Err(grant_err(
            what,
            format!(
                "its aud names {} relying parties; a JWT-SVID exchanged here must be for this issuer alone (fetch one with --audience {})",
                named.len(),
                audiences.first().map(String::as_str).unwrap_or_default()
            ),
        ));
    }
    if v.claims.contains_key(dclaims::OFFER) {
        return Err(grant_err(
            what,
            "a delegation token is redeemed at a node agent, not exchanged",
        ));
    }
    let jti = v
        .claims
        .get("jti")
        .and_then(Value::as_str)
        .filter(|j| !j.is_empty())
        .ok_or_else(|| grant_err(what, "has no jti"))?
        .to_string();
    if state.revocations.is_jwt_revoked(&jti) {
        return Err(grant_err(what, format!("JWT-SVID {jti} is revoked")));
    }
    let handle =
        RevocationHandle::parse("svid", &jti).map_err(|e| grant_err(what, format!("jti: {e}")))?;
    let record = state
        .store
        .list_issued_covered(std::slice::from_ref(&handle), now)
        .await?
        .into_iter()
        .find(|s| s.kind == SvidKind::Jwt && s.id == jti)
        .ok_or_else(|| {
            grant_err(
                what,
                format!(
                    "JWT-SVID {jti} was not issued by trust domain {}'s servers",
                    state.config.trust_domain
                ),
            )
        })?;
    if let Some((h, seq)) = standing_over(state, &record) {
        return Err(grant_err(
            what,
            format!("{h} is revoked (revocation {seq})"),
        ));
    }
    let entry_id: EntryId = record
        .entry_id
        .as_deref()
        .unwrap_or_default()
        .parse()
        .map_err(|_| grant_err(what, "its record names no entry"))?;
    let entry = state
        .store
        .get_entry(&entry_id)
        .await?
        .ok_or_else(|| grant_err(what, format!("its entry {entry_id} no longer exists")))?;
    if entry.spec.spiffe_id != v.spiffe_id {
        return Err(grant_err(what, "its entry now names another SPIFFE ID"));
    }
    if crate::server::ownership::is_suspended(
        state.store.as_ref(),
        &entry,
        state.config.suspend_disabled_owners,
    )
    .await?
    {
        return Err(grant_err(
            what,
            format!(
                "entry {} is suspended (owner {} is disabled)",
                entry.id,
                entry.spec.owner.clone().unwrap_or_default()
            ),
        ));
    }
    let (scopes, delegation) = dclaims::from_claims(&v.claims).map_err(|e| grant_err(what, e))?;
    let delegation = match delegation {
        None => None,
        Some(d) => {
            let mut grants = Vec::with_capacity(d.chain.len());
            for hop in &d.chain {
                let g = state.store.get_grant(&hop.grant_id).await?.ok_or_else(|| {
                    grant_err(what, format!("grant {} no longer exists", hop.grant_id))
                })?;
                grants.push(g);
            }
            let last = grants
                .last()
                .ok_or_else(|| grant_err(what, "its delegation chain is empty"))?;
            crate::server::grants::check_not_revoked(&state.revocations, last)
                .map_err(|e| grant_err(what, e))?;
            crate::server::grants::authorize_grant_mint(last, &entry, now)
                .map_err(|e| grant_err(what, e))?;
            Some((d, grants))
        }
    };
    Ok(VerifiedSvid {
        jti,
        expires_at: v.expires_at,
        record,
        entry,
        scopes,
        delegation,
    })
}

/// The first standing revocation over an issued record, if any.
pub fn standing_over(state: &ServerState, record: &IssuedSvid) -> Option<(RevocationHandle, u64)> {
    let mut handles = Vec::new();
    if let Ok(h) = RevocationHandle::parse("svid", &record.id) {
        handles.push(h);
    }
    if let Some(e) = record.entry_id.as_deref().and_then(|e| e.parse().ok()) {
        handles.push(RevocationHandle::Entry(e));
    }
    if let Some(n) = &record.node_id {
        handles.push(RevocationHandle::Node(n.clone()));
    }
    handles.extend(
        record
            .grant_chain
            .iter()
            .cloned()
            .map(RevocationHandle::Grant),
    );
    if let Some(t) = &record.task_id {
        handles.push(RevocationHandle::Task(t.clone()));
    }
    handles.push(RevocationHandle::Authority(record.authority_id.clone()));
    if let Some(d) = &record.derived_from {
        if let Ok(h) = RevocationHandle::parse("svid", &d.jti) {
            handles.push(h);
        }
        handles.push(RevocationHandle::Authority(d.key_id.clone()));
    }
    handles
        .into_iter()
        .find_map(|h| state.revocations.standing(&h).map(|s| (h, s)))
}

/// The grant types the token endpoint serves.
enum GrantType {
    TokenExchange,
    JwtBearer,
}

/// The token endpoint (RFC 6749 section 3.2): a successful response's JSON, or a refusal.
pub async fn token(
    state: &ServerState,
    door: &FrontDoor,
    form: &Form,
) -> Result<Value, OAuthError> {
    let grant_type = match form.required("grant_type")? {
        super::GRANT_TOKEN_EXCHANGE => GrantType::TokenExchange,
        super::GRANT_JWT_BEARER => GrantType::JwtBearer,
        other => {
            return Err(OAuthError::UnsupportedGrantType(format!(
                "grant_type {:?} is not served; use {} or {}",
                other.chars().take(80).collect::<String>(),
                super::GRANT_TOKEN_EXCHANGE,
                super::GRANT_JWT_BEARER
            )))
        }
    };
    let mut issued_token_type = super::TOKEN_TYPE_ACCESS_TOKEN;
    let (subject_param, subject) = match grant_type {
        GrantType::TokenExchange => {
            let t = form.required("subject_token")?;
            match form.required("subject_token_type")? {
                super::TOKEN_TYPE_JWT => {}
                other => {
                    return Err(OAuthError::InvalidRequest(format!(
                        "subject_token_type {:?} is not accepted; a JWT-SVID is {}",
                        other.chars().take(80).collect::<String>(),
                        super::TOKEN_TYPE_JWT
                    )))
                }
            }
            if form.optional("actor_token")?.is_some() {
                return Err(OAuthError::InvalidRequest(
                    "actor_token is not accepted: a delegated JWT-SVID (agentd api fetch jwt --grant) carries the chain".into(),
                ));
            }
            match form.optional("requested_token_type")? {
                None | Some(super::TOKEN_TYPE_ACCESS_TOKEN) => {}
                // The access token is a JWT: asked for as one, it is answered as one.
                Some(super::TOKEN_TYPE_JWT) => issued_token_type = super::TOKEN_TYPE_JWT,
                Some(other) => {
                    return Err(OAuthError::InvalidRequest(format!(
                        "requested_token_type {:?} is not issued; only {}",
                        other.chars().take(80).collect::<String>(),
                        super::TOKEN_TYPE_ACCESS_TOKEN
                    )))
                }
            }
            ("subject_token", t)
        }
        GrantType::JwtBearer => ("assertion", form.required("assertion")?),
    };
    let resource = match form.all("resource") {
        [] => {
            return Err(OAuthError::InvalidTarget(
                "resource is required: the URL of the tool server the token is for (RFC 8707)"
                    .into(),
            ))
        }
        [one] => one
            .parse::<ResourceUrl>()
            .map_err(|e| OAuthError::InvalidTarget(e.to_string()))?,
        _ => {
            return Err(OAuthError::InvalidTarget(
                "more than one resource: a token is for one tool server".into(),
            ))
        }
    };
    // RFC 8693 section 2.1 lets `audience` name the target too; it is taken when it says
    // what `resource` says, since the token's `aud` is the resource (RFC 8707).
    if let Some(aud) = form.optional("audience")? {
        if aud != resource.as_str() {
            return Err(OAuthError::InvalidTarget(format!(
                "audience {:?} differs from resource {resource}: a token is for one tool server, named by resource (RFC 8707)",
                aud.chars().take(200).collect::<String>()
            )));
        }
    }
    let requested = match form.optional("scope")? {
        None => None,
        Some(s) => Some(
            ScopeSet::parse_space_separated(s)
                .map_err(|e| OAuthError::InvalidScope(format!("scope: {e}")))?,
        ),
    };
    let audiences = vec![door.issuer.clone(), door.token_endpoint()];
    // Taken before the checks, held until the token is on record: a revocation either
    // lands first (and is seen here) or lists this token.
    let issuing = state.revocations.issuing().await;
    let subject = verify_svid(state, subject, &audiences, subject_param).await?;
    authenticate_client(state, form, &audiences, &subject).await?;
    let entry = &subject.entry;

    // The resource: under one of the entry's prefixes and every grant's that has some.
    if !entry.spec.resources.iter().any(|p| p.allows(&resource)) {
        return Err(OAuthError::InvalidTarget(format!(
            "{} may not get tokens for {resource} (entry {} allows {})",
            entry.spec.spiffe_id,
            entry.id,
            if entry.spec.resources.is_empty() {
                "no resource".to_string()
            } else {
                entry
                    .spec
                    .resources
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        )));
    }
    if let Some((_, grants)) = &subject.delegation {
        if let Some(g) = grants
            .iter()
            .find(|g| !g.resources.is_empty() && !g.resources.iter().any(|p| p.allows(&resource)))
        {
            return Err(OAuthError::InvalidTarget(format!(
                "grant {} does not reach {resource} (it allows {})",
                g.id,
                g.resources
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }

    // The scopes: within the entry's ceiling, the grant's, and the JWT-SVID's own.
    let ceiling = crate::server::grants::entry_scopes(entry);
    // For a delegated identity, the stored grant's terms, not the JWT-SVID's copy of them.
    let granted = subject
        .delegation
        .as_ref()
        .and_then(|(_, grants)| grants.last())
        .map(|g| &g.delegation);
    let held: Vec<&ScopeSet> = match granted {
        Some(g) => vec![&ceiling, &g.scopes, &subject.scopes],
        None => vec![&ceiling, &subject.scopes],
    };
    let scopes = match requested {
        Some(req) => {
            for set in &held {
                if let Some(s) = req.first_not_allowed_by(set) {
                    return Err(OAuthError::InvalidScope(format!(
                        "{s} is beyond what {} holds ({})",
                        entry.spec.spiffe_id,
                        subject.scopes.to_space_separated()
                    )));
                }
            }
            req
        }
        None => {
            let mut s = subject.scopes.clone();
            for set in &held {
                s = s.intersection(set);
            }
            s
        }
    };

    let now_t = state.clock.now();
    let now = unix_seconds(now_t);
    let max = i64::try_from(door.max_token_ttl.as_secs()).unwrap_or(i64::MAX);
    let mut exp = now.saturating_add(max).min(subject.expires_at);
    if let Some(g) = granted {
        exp = exp.min(g.expires_at);
    }
    let agent = entry.spec.spiffe_id.to_string();
    let mut claims = Map::new();
    claims.insert("iss".into(), door.issuer.clone().into());
    claims.insert("aud".into(), resource.as_str().into());
    claims.insert("client_id".into(), agent.clone().into());
    match granted {
        None => {
            claims.insert("sub".into(), agent.clone().into());
        }
        Some(d) => {
            claims.insert("sub".into(), d.principal.to_string().into());
            // RFC 8693 section 4.1: the current actor outermost, earlier ones nested.
            let mut act: Option<Value> = None;
            for hop in &d.chain {
                let mut a = json!({"sub": hop.agent.to_string()});
                if let Some(prev) = act.take() {
                    a["act"] = prev;
                }
                act = Some(a);
            }
            if let Some(a) = act {
                claims.insert("act".into(), a);
            }
            if let Some(t) = &d.task_id {
                claims.insert(dclaims::TASK_ID.into(), t.to_string().into());
            }
        }
    }
    if !scopes.is_empty() {
        claims.insert("scope".into(), scopes.to_space_separated().into());
    }
    let token = state
        .ca
        .sign_access_token(claims, exp, now_t)
        .map_err(|e| OAuthError::Unavailable(format!("signing failed: {e}")))?;
    let record = IssuedSvid {
        kind: SvidKind::AccessToken,
        id: token.jti.clone(),
        spiffe_id: agent.clone(),
        entry_id: Some(entry.id.to_string()),
        node_id: subject.record.node_id.clone(),
        grant_chain: subject.record.grant_chain.clone(),
        task_id: subject.record.task_id.clone(),
        authority_id: token.key_id.clone(),
        expires_at: unix_seconds(token.expires_at),
        derived_from: Some(DerivedFrom {
            jti: subject.jti.clone(),
            key_id: subject.record.authority_id.clone(),
        }),
    };
    let expires_at = unix_seconds(token.expires_at);
    let principal = granted.map(|d| d.principal.to_string());
    let chain: Vec<String> = granted
        .map(|d| d.chain.iter().map(|h| h.agent.to_string()).collect())
        .unwrap_or_default();
    // The token's issuance record and its audit record, in one durable write, before it
    // is handed out.
    state
        .audit
        .record_issuance(
            std::slice::from_ref(&record),
            vec![AuditRecord::new(
                "oauth.token.issue",
                Actor::Spiffe(entry.spec.spiffe_id.clone()),
            )
            .subject(&entry.spec.spiffe_id)
            .field("entry", entry.id.as_str())
            .field("node", record.node_id.as_ref().map(ToString::to_string))
            .field(
                "grant_type",
                match grant_type {
                    GrantType::TokenExchange => super::GRANT_TOKEN_EXCHANGE,
                    GrantType::JwtBearer => super::GRANT_JWT_BEARER,
                },
            )
            .field("resource", resource.as_str())
            .field("scopes", scopes.to_strings())
            .field("jti", &token.jti)
            .field("subject_jti", &subject.jti)
            .field("principal", &principal)
            .field("chain", &chain)
            .field("grant_chain", &record.grant_chain)
            .field("task", &record.task_id)
            .field("expires_at", expires_at)],
        )
        .await
        .map_err(|e| {
            OAuthError::Unavailable(format!(
                "the issuance and audit records could not be written ({e}); the token is not handed out"
            ))
        })?;
    drop(issuing);
    let mut resp = json!({
        "access_token": token.token,
        "token_type": "Bearer",
        "expires_in": (expires_at - now).max(0),
    });
    if !scopes.is_empty() {
        resp["scope"] = json!(scopes.to_space_separated());
    }
    if matches!(grant_type, GrantType::TokenExchange) {
        resp["issued_token_type"] = json!(issued_token_type);
    }
    Ok(resp)
}

/// RFC 7523 section 2.2 client authentication, when the client uses it: the assertion is a
/// JWT-SVID of the same agent as the subject.
async fn authenticate_client(
    state: &ServerState,
    form: &Form,
    audiences: &[String],
    subject: &VerifiedSvid,
) -> Result<(), OAuthError> {
    let Some(client) = client_assertion(form)? else {
        return Ok(());
    };
    let client = verify_svid(state, client, audiences, "client_assertion")
        .await
        .map_err(OAuthError::into_client_error)?;
    if client.entry.spec.spiffe_id != subject.entry.spec.spiffe_id {
        return Err(OAuthError::InvalidClient(format!(
            "client_assertion is {}'s, the subject is {}: an agent exchanges its own JWT-SVIDs",
            client.entry.spec.spiffe_id, subject.entry.spec.spiffe_id
        )));
    }
    Ok(())
}

/// The `client_assertion`, when `client_assertion_type` says it is a JWT (RFC 7523 2.2).
pub fn client_assertion(form: &Form) -> Result<Option<&str>, OAuthError> {
    match (
        form.optional("client_assertion_type")?,
        form.optional("client_assertion")?,
    ) {
        (None, None) => Ok(None),
        (Some(super::CLIENT_ASSERTION_JWT_BEARER), Some(a)) => Ok(Some(a)),
        (Some(other), Some(_)) if other != super::CLIENT_ASSERTION_JWT_BEARER => {
            Err(OAuthError::InvalidClient(format!(
                "client_assertion_type {:?} is not accepted; use {}",
                other.chars().take(80).collect::<String>(),
                super::CLIENT_ASSERTION_JWT_BEARER
            )))
        }
        (None, Some(_)) => Err(OAuthError::InvalidRequest(
            "client_assertion without client_assertion_type".into(),
        )),
        _ => Err(OAuthError::InvalidRequest(
            "client_assertion_type without client_assertion".into(),
        )),
    }
}
