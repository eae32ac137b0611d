//! Delegation commands: `grant create|list|show` (admin socket), `api fetch jwt --grant`,
//! `api delegate`, `api exchange` (Workload API socket), `svid inspect|check` (local).

use std::path::Path;

use agentd_proto::admin as pb;
use agentd_proto::agentd_workload as wpb;
use anyhow::{anyhow, Context};
use serde_json::json;
use spiffe::TrustDomain;

use super::connect::{admin_client, delegation_client, status};
use super::output::rfc3339;
use super::{GrantCommand, Output, SvidCommand, SvidInput};
use crate::bundle::Bundle;
use crate::delegation::verify::{decode_jwt_unverified, decode_x509_unverified};
use crate::delegation::{OidBase, Scope, VerifiedIdentity, Verifier};
use crate::ttl::Ttl;

pub fn grant_json(g: &pb::Grant) -> serde_json::Value {
    json!({
        "id": g.id,
        "principal": g.principal,
        "agent": g.agent,
        "scopes": g.scopes,
        "expires_at": g.expires_at,
        "task_id": if g.task_id.is_empty() { serde_json::Value::Null } else { json!(g.task_id) },
        "remaining_depth": g.remaining_depth,
        "parent_grant_id": if g.parent_grant_id.is_empty() { serde_json::Value::Null } else { json!(g.parent_grant_id) },
        "chain": g.chain.iter().map(|h| json!({"agent": h.agent, "grant_id": h.grant_id})).collect::<Vec<_>>(),
        "created_at": g.created_at,
        "resources": g.resources,
    })
}

fn grant_text(g: &pb::Grant) -> String {
    let mut s = format!(
        "Grant ID        : {}\nPrincipal       : {}\nAgent           : {}\nScopes          : {}\nExpires at      : {}\nRemaining depth : {}\n",
        g.id,
        g.principal,
        g.agent,
        g.scopes.join(" "),
        rfc3339(g.expires_at),
        g.remaining_depth
    );
    if !g.task_id.is_empty() {
        s += &format!("Task            : {}\n", g.task_id);
    }
    if !g.parent_grant_id.is_empty() {
        s += &format!("Parent grant    : {}\n", g.parent_grant_id);
    }
    for r in &g.resources {
        s += &format!("Resource        : {r}\n");
    }
    let chain: Vec<String> = g.chain.iter().map(|h| h.agent.clone()).collect();
    s += &format!(
        "Chain           : {} -> {}\n",
        g.principal,
        chain.join(" -> ")
    );
    s
}

pub async fn grant(cmd: GrantCommand, out: Output) -> anyhow::Result<()> {
    match cmd {
        GrantCommand::Create {
            principal,
            agent,
            scopes,
            ttl,
            task,
            max_depth,
            resources,
            admin,
        } => {
            let req = pb::CreateGrantRequest {
                principal,
                agent,
                scopes,
                ttl_seconds: super::admin::ttl_secs(ttl),
                task_id: task.unwrap_or_default(),
                max_depth,
                resources,
            };
            let g = admin_client(&admin.admin_socket)
                .await?
                .create_grant(req)
                .await
                .map_err(status)?
                .into_inner();
            out.print(&grant_json(&g), || g.id.clone());
        }
        GrantCommand::List { agent, all, admin } => {
            let client = admin_client(&admin.admin_socket).await?;
            let agent = agent.unwrap_or_default();
            let list = crate::cli::connect::all_pages(|page_token| {
                let mut client = client.clone();
                let agent = agent.clone();
                async move {
                    let page = client
                        .list_grants(pb::ListGrantsRequest {
                            agent,
                            include_expired: all,
                            page_size: 0,
                            page_token,
                        })
                        .await?
                        .into_inner();
                    Ok((page.grants, page.next_page_token))
                }
            })
            .await?;
            out.print_list("grants", &list, grant_json, grant_text);
        }
        GrantCommand::Show { id, admin } => {
            let g = admin_client(&admin.admin_socket)
                .await?
                .get_grant(pb::GetGrantRequest { id })
                .await
                .map_err(status)?
                .into_inner();
            out.print(&grant_json(&g), || grant_text(&g));
        }
    }
    Ok(())
}

pub async fn fetch_jwt(
    socket: &str,
    grant: String,
    audience: Vec<String>,
    out: Output,
) -> anyhow::Result<()> {
    let r = delegation_client(socket)
        .await?
        .fetch_jwtsvid(wpb::DelegatedJwtsvidRequest {
            grant_id: grant,
            audience,
        })
        .await
        .map_err(status)?
        .into_inner();
    out.print(
        &json!({"svids": [{"spiffe_id": r.spiffe_id, "svid": r.svid, "grant_id": r.grant_id}]}),
        || format!("token({}, grant {}):\n{}", r.spiffe_id, r.grant_id, r.svid),
    );
    Ok(())
}

pub async fn delegate(
    socket: &str,
    to: String,
    scopes: Vec<String>,
    ttl: Option<Ttl>,
    grant: Option<String>,
    out: Output,
) -> anyhow::Result<()> {
    let r = delegation_client(socket)
        .await?
        .delegate(wpb::DelegateRequest {
            to,
            scopes,
            ttl_seconds: super::admin::ttl_secs(ttl),
            grant_id: grant.unwrap_or_default(),
        })
        .await
        .map_err(status)?
        .into_inner();
    out.print(
        &json!({"token": r.token, "expires_at": r.expires_at, "grant_id": r.grant_id}),
        || r.token.clone(),
    );
    Ok(())
}

pub async fn exchange(socket: &str, token: String, out: Output) -> anyhow::Result<()> {
    let r = delegation_client(socket)
        .await?
        .exchange(wpb::ExchangeRequest { token })
        .await
        .map_err(status)?
        .into_inner();
    out.print(
        &json!({
            "grant_id": r.grant_id,
            "spiffe_id": r.spiffe_id,
            "principal": r.principal,
            "scopes": r.scopes,
            "expires_at": r.expires_at,
            "grant_chain": r.grant_chain,
            "task_id": if r.task_id.is_empty() { serde_json::Value::Null } else { json!(r.task_id) },
        }),
        || r.grant_id.clone(),
    );
    Ok(())
}

/// What `svid inspect|check` was given.
enum Document {
    X509(Vec<Vec<u8>>),
    Jwt(String),
}

fn read_document(input: &str) -> anyhow::Result<Document> {
    let path = Path::new(input);
    let text = if input.len() < 4096 && path.is_file() {
        std::fs::read_to_string(path).with_context(|| format!("reading {input}"))?
    } else {
        input.to_string()
    };
    if text.contains("-----BEGIN") {
        let certs =
            Bundle::x509_authorities_from_pem(&text).map_err(|e| anyhow!("{input}: {e}"))?;
        if certs.is_empty() {
            return Err(anyhow!("{input}: no certificate in the PEM"));
        }
        return Ok(Document::X509(certs));
    }
    let token = text.trim();
    if token.split('.').count() == 3 {
        return Ok(Document::Jwt(token.to_string()));
    }
    Err(anyhow!(
        "input: {:?} is neither a PEM file, a file holding a JWT-SVID, nor a JWT-SVID",
        input.chars().take(60).collect::<String>()
    ))
}

fn load_bundle(path: &Path, trust_domain: TrustDomain) -> anyhow::Result<Bundle> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("bundle: reading {}", path.display()))?;
    if text.trim_start().starts_with('{') {
        return Bundle::from_spiffe_json(trust_domain, &text).map_err(|e| anyhow!("bundle: {e}"));
    }
    let x509 = Bundle::x509_authorities_from_pem(&text).map_err(|e| anyhow!("bundle: {e}"))?;
    Ok(Bundle {
        trust_domain,
        x509_authorities: x509,
        jwt_authorities: Vec::new(),
        sequence: 0,
        refresh_hint: crate::bundle::DEFAULT_REFRESH_HINT,
    })
}

/// Verifies (with `--bundle`) or only decodes the SVID.
fn inspect(input: &SvidInput) -> anyhow::Result<(VerifiedIdentity, bool)> {
    let oid_base: OidBase = match &input.oid_base {
        Some(s) => s.parse().map_err(|e| anyhow!("oid_base: {e}"))?,
        None => OidBase::default(),
    };
    let doc = read_document(&input.input)?;
    let unverified = match &doc {
        Document::X509(chain) => decode_x509_unverified(&chain[0], &oid_base)?,
        Document::Jwt(t) => decode_jwt_unverified(t)?,
    };
    let Some(bundle_path) = &input.bundle else {
        return Ok((unverified, false));
    };
    let td: TrustDomain = unverified.spiffe_id.trust_domain().clone();
    let verifier = Verifier::new(load_bundle(bundle_path, td)?).with_oid_base(oid_base);
    let now = std::time::SystemTime::now();
    let verified = match &doc {
        Document::X509(chain) => verifier.verify_x509(chain, now)?,
        Document::Jwt(t) => {
            let aud = input
                .audience
                .as_deref()
                .ok_or_else(|| anyhow!("audience: required to verify a JWT-SVID (--audience)"))?;
            verifier.verify_jwt(t, aud, now)?
        }
    };
    Ok((verified, true))
}

fn identity_text(id: &VerifiedIdentity, verified: bool) -> String {
    let mut s = format!(
        "SPIFFE ID       : {}\nVerified        : {}\nExpires at      : {}\n",
        id.spiffe_id,
        if verified {
            "yes (chain/signature, expiry, trust domain)"
        } else {
            "NO (no --bundle given)"
        },
        rfc3339(id.expires_at)
    );
    if let Some(serial) = &id.serial {
        s += &format!("Serial          : {serial}\n");
    }
    s += &format!(
        "Scopes          : {}\n",
        if id.scopes.is_empty() {
            "none (authorizes no tool)".to_string()
        } else {
            id.scopes.to_space_separated()
        }
    );
    match &id.delegation {
        None => s += "Delegation      : none (acts as itself)\n",
        Some(d) => {
            s += &format!("On behalf of    : {}\n", d.principal);
            let chain: Vec<String> = d
                .chain
                .iter()
                .map(|h| format!("{} (grant {})", h.agent, h.grant_id))
                .collect();
            s += &format!("Chain           : {}\n", chain.join(" -> "));
            s += &format!("Remaining depth : {}\n", d.remaining_depth);
            if let Some(t) = &d.task_id {
                s += &format!("Task            : {t}\n");
            }
        }
    }
    s
}

pub fn svid(cmd: SvidCommand, out: Output) -> anyhow::Result<()> {
    match cmd {
        SvidCommand::Inspect(input) => {
            let (id, verified) = inspect(&input)?;
            let mut j = id.to_json();
            j["verified"] = json!(verified);
            out.print(&j, || identity_text(&id, verified));
        }
        SvidCommand::Check { svid, scopes } => {
            if svid.bundle.is_none() {
                return Err(anyhow!(
                    "bundle: `svid check` decides only on a verified SVID (--bundle)"
                ));
            }
            let wanted = scopes
                .iter()
                .map(|s| s.parse::<Scope>().map_err(|e| anyhow!("scope: {e}")))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let (id, _) = inspect(&svid)?;
            for scope in &wanted {
                id.authorize(scope)?;
            }
            let principal = id.principal().map(ToString::to_string);
            out.print(
                &json!({"allowed": true, "spiffe_id": id.spiffe_id.to_string(), "scopes": scopes, "principal": principal}),
                || match &principal {
                    Some(p) => format!("allowed: {} holds {} on behalf of {p}", id.spiffe_id, scopes.join(" ")),
                    None => format!("allowed: {} holds {}", id.spiffe_id, scopes.join(" ")),
                },
            );
        }
    }
    Ok(())
}
