//! Audit, owner and inventory commands (admin socket).

use std::time::SystemTime;

use agentd_proto::admin as pb;
use anyhow::{anyhow, bail};
use serde_json::json;

use super::admin::{entry_json, ttl_secs};
use super::connect::{admin_client, status};
use super::output::rfc3339;
use super::{AdminSocketArg, AuditCommand, Output, OwnerCommand};
use crate::clock::unix_seconds;
use crate::ttl::Ttl;

/// `--since`: an RFC 3339 time, or a duration before now.
pub fn parse_since(raw: &str, now: SystemTime) -> anyhow::Result<i64> {
    if let Ok(t) = humantime::parse_rfc3339_weak(raw) {
        return Ok(unix_seconds(t));
    }
    let ago = raw.parse::<Ttl>().map_err(|e| {
        anyhow!("since: {raw:?} is neither an RFC 3339 time (2026-01-31T12:00:00Z) nor a duration ago: {e}")
    })?;
    Ok(unix_seconds(now) - ago.as_secs() as i64)
}

fn fields_of(r: &pb::AuditRecord) -> serde_json::Value {
    serde_json::from_str(&r.fields_json).unwrap_or_else(|_| json!({}))
}

fn record_json(r: &pb::AuditRecord) -> serde_json::Value {
    json!({
        "seq": r.seq,
        "time": r.time,
        "action": r.action,
        "actor": r.actor,
        "subject": (!r.subject.is_empty()).then_some(&r.subject),
        "fields": fields_of(r),
        "prev_hash": r.prev_hash,
        "hash": r.hash,
    })
}

fn record_text(r: &pb::AuditRecord) -> String {
    let subject = if r.subject.is_empty() {
        String::new()
    } else {
        format!(" {}", r.subject)
    };
    format!(
        "#{} {} {} by {}{} {}\n",
        r.seq,
        rfc3339(r.time),
        r.action,
        r.actor,
        subject,
        fields_of(r)
    )
}

pub async fn audit(cmd: AuditCommand, out: Output) -> anyhow::Result<()> {
    match cmd {
        AuditCommand::Show {
            since,
            spiffe_id,
            action,
            admin,
        } => {
            let since = since
                .as_deref()
                .map(|s| parse_since(s, SystemTime::now()))
                .transpose()?
                .unwrap_or(0);
            // Every page, oldest first.
            let client = admin_client(&admin.admin_socket).await?;
            let request = pb::ListAuditRecordsRequest {
                since,
                spiffe_id: spiffe_id.unwrap_or_default(),
                action: action.unwrap_or_default(),
                page_size: 0,
                page_token: String::new(),
            };
            let records = crate::cli::connect::all_pages(|page_token| {
                let mut client = client.clone();
                let request = pb::ListAuditRecordsRequest {
                    page_token,
                    ..request.clone()
                };
                async move {
                    let page = client.list_audit_records(request).await?.into_inner();
                    Ok((page.records, page.next_page_token))
                }
            })
            .await?;
            out.print(
                &json!(records.iter().map(record_json).collect::<Vec<_>>()),
                || records.iter().map(record_text).collect(),
            );
        }
        AuditCommand::Verify(admin) => {
            let r = admin_client(&admin.admin_socket)
                .await?
                .verify_audit_log(pb::VerifyAuditLogRequest {})
                .await
                .map_err(status)?
                .into_inner();
            if !r.intact {
                // The finding is the error: one line on stderr, non-zero exit.
                bail!(
                    "audit log verification failed at record {}: {}",
                    r.first_bad_seq,
                    r.reason
                );
            }
            out.print(
                &json!({
                    "intact": true,
                    "records": r.records,
                    "head_seq": r.head_seq,
                    "head_hash": r.head_hash,
                }),
                || {
                    format!(
                        "Audit log intact: {} records, head {} {}",
                        r.records, r.head_seq, r.head_hash
                    )
                },
            );
        }
    }
    Ok(())
}

pub async fn owner(cmd: OwnerCommand, out: Output) -> anyhow::Result<()> {
    let (owner, disabled, admin) = match cmd {
        OwnerCommand::Disable { owner, admin } => (owner, true, admin),
        OwnerCommand::Enable { owner, admin } => (owner, false, admin),
    };
    let r = admin_client(&admin.admin_socket)
        .await?
        .set_owner_disabled(pb::SetOwnerDisabledRequest { owner, disabled })
        .await
        .map_err(status)?
        .into_inner();
    out.print(
        &json!({
            "owner": r.owner,
            "disabled": r.disabled,
            "suspended": r.suspended,
            "entries": r.entries.iter().map(entry_json).collect::<Vec<_>>(),
        }),
        || {
            let state = match (r.disabled, r.suspended) {
                (false, _) => "enabled",
                (true, true) => "disabled; entries suspended",
                (true, false) => "disabled; entries flagged",
            };
            let mut s = format!("Owner {} {state} ({} entries)\n", r.owner, r.entries.len());
            for e in &r.entries {
                s += &format!("  {} {}\n", e.id, e.spiffe_id);
            }
            s
        },
    );
    Ok(())
}

pub async fn inventory(
    stale: Option<Ttl>,
    admin: &AdminSocketArg,
    out: Output,
) -> anyhow::Result<()> {
    let stale_seconds = ttl_secs(stale);
    let mut client = admin_client(&admin.admin_socket).await?;
    // The counts come on every page (the first page's are shown); the by-node and by-owner
    // rows are paged.
    let request = |page_token| pb::GetInventoryRequest {
        stale_seconds,
        page_size: 0,
        page_token,
    };
    let mut inv = client
        .get_inventory(request(String::new()))
        .await
        .map_err(status)?
        .into_inner();
    let mut next = std::mem::take(&mut inv.next_page_token);
    while !next.is_empty() {
        let page = client
            .get_inventory(request(next.clone()))
            .await
            .map_err(status)?
            .into_inner();
        inv.by_node.extend(page.by_node);
        inv.by_owner.extend(page.by_owner);
        if page.next_page_token == next {
            anyhow::bail!("the server answered the same inventory page token twice: {next:?}");
        }
        next = page.next_page_token;
    }
    out.print(
        &json!({
            "generated_at": inv.generated_at,
            "entries": inv.entries,
            "nodes": inv.nodes,
            "live_svids": inv.live_svids,
            "live_grants": inv.live_grants,
            "revocations": inv.revocations,
            "stale_entries": inv.stale_entries,
            "orphaned_entries": inv.orphaned_entries,
            "by_owner": inv.by_owner.iter().map(|o| json!({
                "owner": (!o.owner.is_empty()).then_some(&o.owner),
                "disabled": o.disabled,
                "entries": o.entries,
                "live_svids": o.live_svids,
            })).collect::<Vec<_>>(),
            "by_node": inv.by_node.iter().map(|n| json!({
                "spiffe_id": n.spiffe_id,
                "entries": n.entries,
                "live_svids": n.live_svids,
            })).collect::<Vec<_>>(),
        }),
        || {
            let mut s = format!(
                "Entries          : {}\nNodes            : {}\nLive SVIDs       : {}\nLive grants      : {}\nRevocations      : {}\nStale entries    : {}\nOrphaned entries : {}\n",
                inv.entries,
                inv.nodes,
                inv.live_svids,
                inv.live_grants,
                inv.revocations,
                inv.stale_entries,
                inv.orphaned_entries
            );
            s += "\nBy owner:\n";
            for o in &inv.by_owner {
                let name = if o.owner.is_empty() { "(no owner)" } else { o.owner.as_str() };
                let flag = if o.disabled { " [disabled]" } else { "" };
                s += &format!(
                    "  {name}{flag}: {} entries, {} live SVIDs\n",
                    o.entries, o.live_svids
                );
            }
            s += "\nBy node:\n";
            for n in &inv.by_node {
                s += &format!(
                    "  {}: {} entries, {} live SVIDs\n",
                    n.spiffe_id, n.entries, n.live_svids
                );
            }
            s
        },
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_a_time_or_a_duration_ago() {
        let now = crate::clock::from_unix_seconds(1_800_000_000);
        assert_eq!(parse_since("1h", now).unwrap(), 1_800_000_000 - 3600);
        assert_eq!(
            parse_since("2026-01-31T12:00:00Z", now).unwrap(),
            1_769_860_800
        );
        let err = parse_since("yesterday", now).unwrap_err().to_string();
        assert!(err.starts_with("since: "), "{err}");
    }
}
