//! The JWT-SVID side of scope and delegation (docs/delegation.md, "JWT-SVID"):
//!
//! - `scope`: the scopes, space-separated (RFC 8693 section 4.2);
//! - `agentd_delegation`: `{"principal": ..., "chain": [{"agent": ..., "grant_id": ...}],
//!   "remaining_depth": n}`, chain root first, the last agent being `sub`;
//! - `agentd_task_id`: the task id, when the grant names one;
//! - `agentd_offer`: only in a delegation token (the single-use offer's id).
//!
//! `sub` stays the agent's SPIFFE ID and the header is untouched, as the JWT-SVID spec
//! requires; private claims are allowed by it (section 3).

use serde_json::{json, Map, Value};
use spiffe::SpiffeId;

use super::model::{Delegation, Hop};
use super::scope::ScopeSet;

pub const SCOPE: &str = "scope";
pub const DELEGATION: &str = "agentd_delegation";
pub const TASK_ID: &str = "agentd_task_id";
pub const OFFER: &str = "agentd_offer";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("claim {claim}: {reason}")]
pub struct ClaimError {
    pub claim: &'static str,
    pub reason: String,
}

fn err(claim: &'static str, reason: impl std::fmt::Display) -> ClaimError {
    ClaimError {
        claim,
        reason: reason.to_string(),
    }
}

/// The private claims of a JWT-SVID with these scopes and, if delegated, this delegation.
pub fn to_claims(scopes: &ScopeSet, delegation: Option<&Delegation>) -> Map<String, Value> {
    let mut m = Map::new();
    if !scopes.is_empty() {
        m.insert(SCOPE.into(), Value::String(scopes.to_space_separated()));
    }
    if let Some(d) = delegation {
        m.insert(
            DELEGATION.into(),
            json!({
                "principal": d.principal.to_string(),
                "chain": d.chain.iter().map(|h| json!({"agent": h.agent.to_string(), "grant_id": h.grant_id.as_str()})).collect::<Vec<_>>(),
                "remaining_depth": d.remaining_depth,
            }),
        );
        if let Some(t) = &d.task_id {
            m.insert(TASK_ID.into(), Value::String(t.to_string()));
        }
    }
    m
}

/// Reads the scopes and the delegation (if any) back from validated claims.
pub fn from_claims(
    claims: &Map<String, Value>,
) -> Result<(ScopeSet, Option<Delegation>), ClaimError> {
    let scopes = match claims.get(SCOPE) {
        None => ScopeSet::new(),
        Some(Value::String(s)) => ScopeSet::parse_space_separated(s).map_err(|e| err(SCOPE, e))?,
        Some(other) => return Err(err(SCOPE, format!("{other} is not a string"))),
    };
    let Some(d) = claims.get(DELEGATION) else {
        return Ok((scopes, None));
    };
    let principal = d
        .get("principal")
        .and_then(Value::as_str)
        .ok_or_else(|| err(DELEGATION, "principal missing or not a string"))?
        .parse()
        .map_err(|e| err(DELEGATION, e))?;
    let chain = d
        .get("chain")
        .and_then(Value::as_array)
        .filter(|c| !c.is_empty())
        .ok_or_else(|| err(DELEGATION, "chain missing, empty or not an array"))?
        .iter()
        .map(|h| {
            let agent = h
                .get("agent")
                .and_then(Value::as_str)
                .ok_or_else(|| err(DELEGATION, "a hop has no agent"))?;
            let grant = h
                .get("grant_id")
                .and_then(Value::as_str)
                .ok_or_else(|| err(DELEGATION, "a hop has no grant_id"))?;
            Ok(Hop {
                agent: SpiffeId::new(agent)
                    .map_err(|e| err(DELEGATION, format!("agent {agent:?}: {e}")))?,
                grant_id: grant.parse().map_err(|e| err(DELEGATION, e))?,
            })
        })
        .collect::<Result<Vec<_>, ClaimError>>()?;
    let remaining_depth = d
        .get("remaining_depth")
        .and_then(Value::as_u64)
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| err(DELEGATION, "remaining_depth missing or not a small integer"))?;
    let task_id = match claims.get(TASK_ID) {
        None => None,
        Some(Value::String(t)) => Some(t.parse().map_err(|e| err(TASK_ID, e))?),
        Some(other) => return Err(err(TASK_ID, format!("{other} is not a string"))),
    };
    let expires_at = claims.get("exp").and_then(Value::as_i64).unwrap_or(0);
    Ok((
        scopes.clone(),
        Some(Delegation {
            principal,
            chain,
            scopes,
            expires_at,
            remaining_depth,
            task_id,
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delegation::model::GrantId;

    #[test]
    fn the_claims_are_the_documented_json() {
        let doc: Value = serde_json::from_str(&crate::delegation::x509ext::test_vectors::block(
            "jwt-payload",
        ))
        .expect("the documented payload is JSON");
        let doc = doc.as_object().unwrap();
        let (scopes, mut d) = crate::delegation::x509ext::test_vectors::identity();
        let claims = to_claims(&scopes, Some(&d));
        // Exactly the documented private claims, with the documented types and values.
        let documented: Map<String, Value> = doc
            .iter()
            .filter(|(k, _)| [SCOPE, DELEGATION, TASK_ID, OFFER].contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert_eq!(Value::Object(claims), Value::Object(documented));
        // And the documented payload reads back as the identity, `exp` included.
        d.expires_at = 1_767_225_600;
        assert_eq!(from_claims(doc).unwrap(), (scopes.clone(), Some(d)));
        // A plain JWT-SVID: `scope` alone; no scopes: nothing.
        assert_eq!(
            Value::Object(to_claims(&scopes, None)),
            json!({"scope": "calendar:read crm:*"})
        );
        assert!(to_claims(&ScopeSet::new(), None).is_empty());
    }

    #[test]
    fn claims_round_trip() {
        let scopes = ScopeSet::parse(&["calendar:read", "crm:read"]).unwrap();
        let d = Delegation {
            principal: "user:alice".parse().unwrap(),
            chain: vec![Hop {
                agent: SpiffeId::new("spiffe://example.org/a").unwrap(),
                grant_id: GrantId::generate(),
            }],
            scopes: scopes.clone(),
            expires_at: 77,
            remaining_depth: 1,
            task_id: Some("t1".parse().unwrap()),
        };
        let mut m = to_claims(&scopes, Some(&d));
        assert_eq!(m[SCOPE], "calendar:read crm:read");
        m.insert("exp".into(), json!(77));
        let (s, back) = from_claims(&m).unwrap();
        assert_eq!(s, scopes);
        assert_eq!(back.unwrap(), d);
        m.insert(SCOPE.into(), json!(5));
        assert_eq!(from_claims(&m).unwrap_err().claim, SCOPE);
    }
}
