//! `agentd revoke ...`: revocations through the server's admin socket.

use agentd_proto::admin as pb;
use agentd_proto::revocation as rpb;
use serde_json::json;

use super::connect::{admin_client, status};
use super::output::rfc3339;
use super::{Output, RevokeArgs, RevokeCommand};

pub fn event_json(e: &rpb::RevocationEvent) -> serde_json::Value {
    let handle = e.handle.clone().unwrap_or_default();
    json!({
        "sequence": e.sequence,
        "action": if e.lifts == 0 { "revoke" } else { "lift" },
        "lifts": if e.lifts == 0 { serde_json::Value::Null } else { json!(e.lifts) },
        "kind": handle.kind,
        "id": handle.id,
        "reason": e.reason,
        "at": e.at,
        "serials": e.serials.iter().map(|s| json!({
            "serial": s.serial,
            "authority_id": s.authority_id,
            "expires_at": s.expires_at,
        })).collect::<Vec<_>>(),
        "jwt_ids": e.jwt_ids,
        // Serials and JWT ids the event covers beyond those listed (the server lists at
        // most 1,000 of each; CRLs and the feed carry every one).
        "serials_omitted": e.serials_omitted,
        "jwt_ids_omitted": e.jwt_ids_omitted,
        "expires_at": e.expires_at,
    })
}

pub fn event_line(e: &rpb::RevocationEvent) -> String {
    let handle = e.handle.clone().unwrap_or_default();
    let what = if e.lifts == 0 {
        format!(
            "revoked {} {} ({} X.509-SVIDs, {} JWT-SVIDs)",
            handle.kind,
            handle.id,
            e.serials.len() as u64 + e.serials_omitted,
            e.jwt_ids.len() as u64 + e.jwt_ids_omitted
        )
    } else {
        format!(
            "lifted revocation {} of {} {}",
            e.lifts, handle.kind, handle.id
        )
    };
    let reason = if e.reason.is_empty() {
        String::new()
    } else {
        format!(": {}", e.reason)
    };
    format!("{:>6}  {}  {what}{reason}", e.sequence, rfc3339(e.at))
}

pub async fn revoke(cmd: RevokeCommand, out: Output) -> anyhow::Result<()> {
    let (kind, id, args) = match cmd {
        RevokeCommand::Entry { id, args } => ("entry", id, args),
        RevokeCommand::Svid { serial, args } => ("svid", serial, args),
        RevokeCommand::Node { spiffe_id, args } => ("node", spiffe_id, args),
        RevokeCommand::Grant { id, args } => ("grant", id, args),
        RevokeCommand::Task { id, args } => ("task", id, args),
        RevokeCommand::Authority { id, args } => ("authority", id, args),
        RevokeCommand::List { all, admin } => {
            // Every page, in order.
            let mut client = admin_client(&admin.admin_socket).await?;
            let mut resp = pb::ListRevocationsResponse::default();
            let mut page_token = String::new();
            loop {
                let page = client
                    .list_revocations(pb::ListRevocationsRequest {
                        all,
                        page_token,
                        ..Default::default()
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                resp.events.extend(page.events);
                resp.head_sequence = page.head_sequence;
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            out.print(
                &json!({
                    "head_sequence": resp.head_sequence,
                    "events": resp.events.iter().map(event_json).collect::<Vec<_>>(),
                }),
                || {
                    if resp.events.is_empty() {
                        return "no revocations".into();
                    }
                    resp.events
                        .iter()
                        .map(|e| event_line(e) + "\n")
                        .collect::<String>()
                },
            );
            return Ok(());
        }
        RevokeCommand::Lift {
            sequence,
            reason,
            admin,
        } => {
            let e = admin_client(&admin.admin_socket)
                .await?
                .lift_revocation(pb::LiftRevocationRequest { sequence, reason })
                .await
                .map_err(status)?
                .into_inner();
            out.print(&event_json(&e), || event_line(&e));
            return Ok(());
        }
    };
    let RevokeArgs { reason, admin } = args;
    let e = admin_client(&admin.admin_socket)
        .await?
        .revoke(pb::RevokeRequest {
            handle: Some(rpb::RevocationHandle {
                kind: kind.into(),
                id,
            }),
            reason,
        })
        .await
        .map_err(status)?
        .into_inner();
    out.print(&event_json(&e), || event_line(&e));
    Ok(())
}
