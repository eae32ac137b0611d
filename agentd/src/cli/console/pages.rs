//! The console's pages, rendered on the server from admin API answers. maud escapes every
//! value it interpolates, so nothing an entry, grant or audit record holds becomes markup.

use std::collections::{HashMap, VecDeque};

use agentd_proto::admin as pb;
use agentd_proto::admin::admin_client::AdminClient;
use agentd_proto::revocation as rpb;
use hyper::StatusCode;
use maud::{html, Markup, DOCTYPE};
use tonic::transport::Channel;

use super::PageError;
use crate::cli::output::rfc3339;

type Admin = AdminClient<Channel>;

/// Entries listed at most (the inventory says when there are more).
const MAX_ENTRIES: usize = 20_000;
/// Rows a table shows at most.
const MAX_ROWS: usize = 2_000;
/// Audit records per page.
const AUDIT_PAGE: usize = 50;
/// Pages back the timeline goes (10,000 records); older ones: `agentd audit show --since`.
const MAX_AUDIT_PAGES: usize = 200;
/// The inventory's stale window, as `agentd inventory` counts it.
const STALE_SECONDS: i64 = 30 * 24 * 3600;
/// The revocation handles the kill switch offers.
const KILL_KINDS: [&str; 4] = ["entry", "node", "grant", "task"];

fn now() -> i64 {
    crate::clock::unix_seconds(std::time::SystemTime::now())
}

fn when(secs: i64) -> String {
    if secs <= 0 {
        "never".into()
    } else {
        rfc3339(secs)
    }
}

fn bad(field: &'static str, reason: impl Into<String>) -> PageError {
    PageError::BadRequest {
        field,
        reason: reason.into(),
    }
}

fn layout(title: &str, nav: &str, body: Markup) -> String {
    let link = |href: &str, name: &str, key: &str| {
        html! { a href=(href) class=[(nav == key).then_some("current")] { (name) } }
    };
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · agentd console" }
                link rel="icon" href="/static/icon.svg" type="image/svg+xml";
                link rel="stylesheet" href="/static/console.css";
                script src="/static/console.js" defer {}
            }
            body {
                header {
                    span.brand { "agentd console" }
                    nav {
                        (link("/", "Inventory", "inventory"))
                        (link("/graph", "Delegation graph", "graph"))
                        (link("/audit", "Audit timeline", "audit"))
                    }
                }
                main { h1 { (title) } (body) }
            }
        }
    }
    .into_string()
}

pub fn refusal(status: StatusCode, why: &str) -> String {
    layout(
        status.canonical_reason().unwrap_or("Refused"),
        "",
        html! { p.refusal { (status.as_u16()) ": " (why) } },
    )
}

/// What the inventory calls an entry's state, most serious first (stale as the server's
/// `is_stale` counts it). An entry whose node is revoked counts as revoked too: nothing of
/// it is served there; [`inventory`] sets `revoked_by` for those.
pub fn entry_status(e: &pb::Entry, now: i64) -> &'static str {
    let seen = if e.last_fetched > 0 {
        e.last_fetched
    } else {
        e.created_at
    };
    if e.revoked_by > 0 {
        "revoked"
    } else if e.suspended {
        "suspended"
    } else if e.owner.is_empty() || e.owner_disabled {
        "orphaned"
    } else if now.saturating_sub(seen) >= STALE_SECONDS {
        "stale"
    } else {
        "live"
    }
}

async fn all_entries(
    admin: &mut Admin,
    mut filter: pb::ListEntriesRequest,
) -> Result<(Vec<pb::Entry>, bool), PageError> {
    let mut out = Vec::new();
    loop {
        let page = admin.list_entries(filter.clone()).await?.into_inner();
        out.extend(page.entries);
        if page.next_page_token.is_empty() {
            return Ok((out, false));
        }
        if out.len() >= MAX_ENTRIES {
            return Ok((out, true));
        }
        filter.page_token = page.next_page_token;
    }
}

async fn all_grants(admin: &mut Admin, agent: &str) -> Result<Vec<pb::Grant>, PageError> {
    let mut out = Vec::new();
    let mut req = pb::ListGrantsRequest {
        agent: agent.to_string(),
        ..Default::default()
    };
    loop {
        let page = admin.list_grants(req.clone()).await?.into_inner();
        out.extend(page.grants);
        if page.next_page_token.is_empty() || out.len() >= MAX_ENTRIES {
            return Ok(out);
        }
        req.page_token = page.next_page_token;
    }
}

fn status_badge(status: &str) -> Markup {
    html! { span class={"status " (status)} { (status) } }
}

fn scopes(list: &[String]) -> Markup {
    html! {
        @if list.is_empty() { span.none { "none" } }
        @for s in list { code.scope { (s) } " " }
    }
}

pub async fn inventory(
    admin: &mut Admin,
    query: &HashMap<String, String>,
) -> Result<String, PageError> {
    let owner = query.get("owner").cloned().unwrap_or_default();
    let wanted = query.get("status").cloned().unwrap_or_default();
    if !wanted.is_empty()
        && !["live", "stale", "orphaned", "suspended", "revoked"].contains(&wanted.as_str())
    {
        return Err(bad(
            "status",
            format!("{wanted:?} is not live, stale, orphaned, suspended or revoked"),
        ));
    }
    let inv = admin
        .get_inventory(pb::GetInventoryRequest {
            page_size: 1,
            ..Default::default()
        })
        .await?
        .into_inner();
    let (entries, truncated) = all_entries(
        admin,
        pb::ListEntriesRequest {
            owner: owner.clone(),
            ..Default::default()
        },
    )
    .await?;
    let revoked_nodes: HashMap<String, u64> = standing_revocations(admin)
        .await?
        .into_iter()
        .filter_map(|ev| {
            ev.handle
                .filter(|h| h.kind == "node")
                .map(|h| (h.id, ev.sequence))
        })
        .collect();
    let entries: Vec<pb::Entry> = entries
        .into_iter()
        .map(|mut e| {
            if e.revoked_by == 0 {
                e.revoked_by = revoked_nodes.get(&e.parent_id).copied().unwrap_or(0);
            }
            e
        })
        .collect();
    let now = now();
    let mut by_status: HashMap<&str, usize> = HashMap::new();
    let mut owners: Vec<&str> = entries
        .iter()
        .map(|e| e.owner.as_str())
        .filter(|o| !o.is_empty())
        .collect();
    owners.sort_unstable();
    owners.dedup();
    let rows: Vec<(&pb::Entry, &str)> = entries
        .iter()
        .map(|e| (e, entry_status(e, now)))
        .inspect(|(_, s)| *by_status.entry(s).or_default() += 1)
        .filter(|(_, s)| wanted.is_empty() || *s == wanted)
        .collect();
    let body = html! {
        section.counts {
            div { b { (inv.entries) } " agents" }
            div { b { (inv.nodes) } " nodes" }
            div { b { (inv.live_svids) } " live SVIDs" }
            div { b { (inv.live_grants) } " live grants" }
            div { b { (inv.revocations) } " revocations" }
            div { b { (inv.stale_entries) } " stale" }
            div { b { (inv.orphaned_entries) } " orphaned" }
        }
        form.filters method="get" action="/" {
            label { "Owner "
                select name="owner" data-autosubmit {
                    option value="" { "any" }
                    @for o in &owners { option value=(o) selected[*o == owner] { (o) } }
                    @if !owner.is_empty() && !owners.contains(&owner.as_str()) {
                        option value=(owner) selected { (owner) }
                    }
                }
            }
            label { "Status "
                select name="status" data-autosubmit {
                    option value="" { "any" }
                    @for s in ["live", "stale", "orphaned", "suspended", "revoked"] {
                        option value=(s) selected[s == wanted] {
                            (s) " (" (by_status.get(s).copied().unwrap_or(0)) ")"
                        }
                    }
                }
            }
            button type="submit" { "Filter" }
            input type="search" placeholder="find in table" data-filter="agents";
        }
        @if truncated { p.note { "Only the first " (entries.len()) " entries are listed." } }
        p.note { (rows.len()) " of " (entries.len()) " agents shown. The counts above are the server's: an agent may be both stale and orphaned there, while its row shows its most serious state." }
        table #agents {
            thead { tr {
                th { "Agent" } th { "Owner" } th { "Scopes" } th { "Node" }
                th { "Last issued" } th { "Last fetched" } th { "Status" }
            } }
            tbody {
                @for (e, status) in rows.iter().take(MAX_ROWS) {
                    tr data-status=(status) {
                        td { a href={"/agent/" (e.id)} { (e.spiffe_id) } }
                        td { @if e.owner.is_empty() { span.none { "none" } } @else { (e.owner) } }
                        td { (scopes(&e.scopes)) }
                        td.mono { (e.parent_id) }
                        td { (when(e.last_issued)) }
                        td { (when(e.last_fetched)) }
                        td { (status_badge(status)) }
                    }
                }
            }
        }
    };
    Ok(layout("Inventory", "inventory", body))
}

fn handle_matches(h: &rpb::RevocationHandle, kind: &str, id: &str) -> bool {
    h.kind == kind && h.id == id
}

fn kill_link(kind: &str, id: &str, label: &str) -> Markup {
    html! {
        a.kill href={"/revoke?kind=" (kind) "&id=" (urlencode(id))} { (label) }
    }
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn chain_text(g: &pb::Grant) -> String {
    let mut parts = vec![g.principal.clone()];
    parts.extend(g.chain.iter().map(|h| h.agent.clone()));
    parts.join(" → ")
}

/// The server's inventory row for one node (what it serves, counted as `agentd inventory`
/// does, node sets included).
async fn node_inventory(
    admin: &mut Admin,
    node: &str,
) -> Result<Option<pb::NodeInventory>, PageError> {
    let mut req = pb::GetInventoryRequest {
        page_size: 5_000,
        ..Default::default()
    };
    loop {
        let page = admin.get_inventory(req.clone()).await?.into_inner();
        if let Some(row) = page.by_node.into_iter().find(|n| n.spiffe_id == node) {
            return Ok(Some(row));
        }
        if page.next_page_token.is_empty() {
            return Ok(None);
        }
        req.page_token = page.next_page_token;
    }
}

async fn standing_revocations(admin: &mut Admin) -> Result<Vec<rpb::RevocationEvent>, PageError> {
    let mut out = Vec::new();
    let mut req = pb::ListRevocationsRequest::default();
    loop {
        let page = admin.list_revocations(req.clone()).await?.into_inner();
        out.extend(page.events);
        if page.next_page_token.is_empty() || out.len() >= MAX_ENTRIES {
            return Ok(out);
        }
        req.page_token = page.next_page_token;
    }
}

/// The newest `keep` records matching `filter`, newest first, and how many match in all.
async fn newest_audit(
    admin: &mut Admin,
    mut filter: pb::ListAuditRecordsRequest,
    keep: usize,
) -> Result<(Vec<pb::AuditRecord>, usize), PageError> {
    let mut ring = VecDeque::with_capacity(keep.min(AUDIT_PAGE) + 1);
    let mut total = 0usize;
    filter.page_size = 5_000;
    loop {
        let page = admin.list_audit_records(filter.clone()).await?.into_inner();
        for r in page.records {
            total += 1;
            ring.push_back(r);
            if ring.len() > keep {
                ring.pop_front();
            }
        }
        if page.next_page_token.is_empty() {
            break;
        }
        filter.page_token = page.next_page_token;
    }
    Ok((ring.into_iter().rev().collect(), total))
}

fn audit_table(records: &[pb::AuditRecord]) -> Markup {
    html! {
        table.audit {
            thead { tr { th { "#" } th { "Time" } th { "Action" } th { "Actor" } th { "Subject" } th { "Details" } } }
            tbody {
                @for r in records {
                    tr {
                        td { (r.seq) }
                        td { (rfc3339(r.time)) }
                        td { code { (r.action) } }
                        td.mono { (r.actor) }
                        td.mono { (r.subject) }
                        td.details { (r.fields_json.chars().take(400).collect::<String>()) }
                    }
                }
            }
        }
    }
}

pub async fn agent(admin: &mut Admin, entry_id: &str) -> Result<String, PageError> {
    if entry_id.is_empty() || entry_id.len() > 128 {
        return Err(bad("entry id", "missing or too long"));
    }
    let e = admin
        .get_entry(pb::GetEntryRequest {
            id: entry_id.to_string(),
        })
        .await?
        .into_inner();
    let grants = all_grants(admin, &e.spiffe_id).await?;
    let revocations = standing_revocations(admin).await?;
    let relevant: Vec<&rpb::RevocationEvent> = revocations
        .iter()
        .filter(|ev| {
            ev.handle.as_ref().is_some_and(|h| {
                handle_matches(h, "entry", &e.id)
                    || handle_matches(h, "node", &e.parent_id)
                    || grants.iter().any(|g| {
                        handle_matches(h, "grant", &g.id)
                            || g.chain
                                .iter()
                                .any(|hop| handle_matches(h, "grant", &hop.grant_id))
                            || (!g.task_id.is_empty() && handle_matches(h, "task", &g.task_id))
                    })
            })
        })
        .collect();
    let (records, total) = newest_audit(
        admin,
        pb::ListAuditRecordsRequest {
            spiffe_id: e.spiffe_id.clone(),
            ..Default::default()
        },
        AUDIT_PAGE,
    )
    .await?;
    // Offered only when the parent is an attested node (not the server, not a node set).
    let parent_is_node = match admin
        .get_node(pb::GetNodeRequest {
            spiffe_id: e.parent_id.clone(),
        })
        .await
    {
        Ok(_) => true,
        Err(s)
            if matches!(
                s.code(),
                tonic::Code::NotFound | tonic::Code::InvalidArgument
            ) =>
        {
            false
        }
        Err(s) => return Err(s.into()),
    };
    let now = now();
    let status = entry_status(&e, now);
    let body = html! {
        section.card {
            dl {
                dt { "SPIFFE ID" } dd.mono { (e.spiffe_id) }
                dt { "Entry" } dd.mono { (e.id) }
                dt { "Status" } dd { (status_badge(status))
                    @if e.revoked_by > 0 { " by revocation #" (e.revoked_by) } }
                dt { "Owner" } dd { @if e.owner.is_empty() { span.none { "none" } } @else { (e.owner) }
                    @if e.owner_disabled { " (disabled)" } }
                dt { "Node (parent)" } dd.mono { (e.parent_id) }
                dt { "Selectors" } dd { @for s in &e.selectors { code { (s.r#type) ":" (s.value) } " " } }
                dt { "Scope ceiling" } dd { (scopes(&e.scopes)) }
                dt { "Resources" } dd { @if e.resources.is_empty() { span.none { "none" } }
                    @for r in &e.resources { code { (r) } " " } }
                dt { "Last issued" } dd { (when(e.last_issued)) }
                dt { "Last fetched" } dd { (when(e.last_fetched)) }
            }
        }
        section.killswitch {
            h2 { "Kill switch" }
            p { "Each asks for confirmation and a reason first." }
            (kill_link("entry", &e.id, "Revoke this agent's entry"))
            @if parent_is_node { " " (kill_link("node", &e.parent_id, "Revoke its node")) }
        }
        h2 { "Live SVIDs and tokens (" (e.live.len()) ")" }
        @if e.live.is_empty() { p.none { "None live." } } @else {
            table { thead { tr { th { "Kind" } th { "Serial / jti" } th { "Node" } th { "Expires" } } }
                tbody { @for d in &e.live { tr {
                    td { (d.kind) } td.mono { (d.id) } td.mono { (d.node) } td { (rfc3339(d.expires_at)) }
                } } } }
        }
        h2 { "Grants to this agent (" (grants.len()) ")" }
        @if grants.is_empty() { p.none { "No live grants." } } @else {
            table.grants { thead { tr { th { "Grant" } th { "Principal" } th { "Chain" } th { "Scopes" }
                th { "Expires" } th { "Task" } th { "" } } }
                tbody { @for g in &grants { tr {
                    td.mono { (g.id) }
                    td.principal { (g.principal) }
                    td { (chain_text(g)) }
                    td { (scopes(&g.scopes)) }
                    td { (rfc3339(g.expires_at)) }
                    td.mono { (g.task_id) }
                    td { (kill_link("grant", &g.id, "Revoke grant"))
                        @if !g.task_id.is_empty() { " " (kill_link("task", &g.task_id, "Revoke task")) } }
                } } } }
        }
        h2 { "Revocations standing over it (" (relevant.len()) ")" }
        @if relevant.is_empty() { p.none { "None." } } @else {
            table { thead { tr { th { "#" } th { "Handle" } th { "Reason" } th { "At" } } }
                tbody { @for ev in &relevant { tr {
                    td { (ev.sequence) }
                    td.mono { @if let Some(h) = &ev.handle { (h.kind) " " (h.id) } }
                    td { (ev.reason) }
                    td { (rfc3339(ev.at)) }
                } } } }
        }
        h2 { "Audit records about it (newest " (records.len()) " of " (total) ")" }
        p { a href={"/audit?spiffe_id=" (urlencode(&e.spiffe_id))} { "All of them in the audit timeline" } }
        (audit_table(&records))
    };
    Ok(layout(&e.spiffe_id, "", body))
}

pub async fn graph(admin: &mut Admin) -> Result<String, PageError> {
    let grants = all_grants(admin, "").await?;
    let (entries, _) = all_entries(admin, pb::ListEntriesRequest::default()).await?;
    let entry_of: HashMap<&str, &str> = entries
        .iter()
        .map(|e| (e.spiffe_id.as_str(), e.id.as_str()))
        .collect();
    let drawn = super::graph::draw(&grants, &entry_of, now());
    let body = html! {
        p { (grants.len()) " live grants. Each arrow is a grant: who authorized which agent, with what scopes, until when. Click an agent to open it." }
        div.graph { (drawn) }
    };
    Ok(layout("Delegation graph", "graph", body))
}

pub async fn audit(
    admin: &mut Admin,
    query: &HashMap<String, String>,
) -> Result<String, PageError> {
    let action = query.get("action").cloned().unwrap_or_default();
    let spiffe_id = query.get("spiffe_id").cloned().unwrap_or_default();
    let page: usize = match query.get("page").map(String::as_str) {
        None | Some("") => 0,
        Some(p) => p
            .parse()
            .ok()
            .filter(|p: &usize| *p < MAX_AUDIT_PAGES)
            .ok_or_else(|| {
                bad(
                    "page",
                    format!("{p:?} is not a page number below {MAX_AUDIT_PAGES}"),
                )
            })?,
    };
    let verify = admin
        .verify_audit_log(pb::VerifyAuditLogRequest {})
        .await?
        .into_inner();
    let (records, total) = newest_audit(
        admin,
        pb::ListAuditRecordsRequest {
            action: action.clone(),
            spiffe_id: spiffe_id.clone(),
            ..Default::default()
        },
        (page + 1) * AUDIT_PAGE,
    )
    .await?;
    let shown: Vec<pb::AuditRecord> = records.into_iter().skip(page * AUDIT_PAGE).collect();
    let more = total > (page + 1) * AUDIT_PAGE && page + 1 < MAX_AUDIT_PAGES;
    let link = |p: usize| {
        format!(
            "/audit?action={}&spiffe_id={}&page={p}",
            urlencode(&action),
            urlencode(&spiffe_id)
        )
    };
    let body = html! {
        @if verify.intact {
            p.verify.ok { "audit verify: intact — " (verify.records) " records, head #" (verify.head_seq) }
        } @else {
            p.verify.broken { "audit verify: FAILED at record #" (verify.first_bad_seq) ": " (verify.reason) }
        }
        form.filters method="get" action="/audit" {
            label { "Action " input type="text" name="action" value=(action) placeholder="revocation.* or entry.create"; }
            label { "SPIFFE ID " input type="text" name="spiffe_id" value=(spiffe_id) placeholder="spiffe://…"; }
            button type="submit" { "Filter" }
        }
        p.note { (total) " matching records, newest first; page " (page + 1) }
        (audit_table(&shown))
        nav.pager {
            @if page > 0 { a href=(link(page - 1)) { "← newer" } " " }
            @if more { a href=(link(page + 1)) { "older →" } }
        }
    };
    Ok(layout("Audit timeline", "audit", body))
}

fn kill_kind(kind: &str) -> Result<&'static str, PageError> {
    KILL_KINDS
        .iter()
        .find(|k| **k == kind)
        .copied()
        .ok_or_else(|| {
            bad(
                "kind",
                format!("{kind:?} is not entry, node, grant or task"),
            )
        })
}

/// What stops working when `kind id` is revoked, in words, for the confirmation.
async fn impact(admin: &mut Admin, kind: &str, id: &str) -> Result<Markup, PageError> {
    Ok(match kind {
        "entry" => {
            let e = admin
                .get_entry(pb::GetEntryRequest { id: id.to_string() })
                .await?
                .into_inner();
            html! {
                p { "Agent " code { (e.spiffe_id) } " stops working everywhere: its "
                    (e.live.len()) " live SVIDs and tokens are revoked, node agents withdraw its identity from its workloads at once, and no new SVID, JWT-SVID or access token is issued for it until the revocation is lifted." }
            }
        }
        "node" => {
            let node = admin
                .get_node(pb::GetNodeRequest {
                    spiffe_id: id.to_string(),
                })
                .await?
                .into_inner();
            let row = node_inventory(admin, id).await?;
            let (direct, _) = all_entries(
                admin,
                pb::ListEntriesRequest {
                    parent_id: id.to_string(),
                    ..Default::default()
                },
            )
            .await?;
            html! {
                p { "Node " code { (node.spiffe_id) } " is cut off: its own SVID and every SVID issued through it ("
                    (row.as_ref().map_or(0, |r| r.live_svids)) " live) are revoked, and the "
                    (row.as_ref().map_or(direct.len() as u64, |r| r.entries))
                    " agents it serves (directly, or through node sets it belongs to) lose their identities on it. Registered directly under it:" }
                ul { @for e in direct.iter().take(100) { li.mono { (e.spiffe_id) } } }
            }
        }
        "grant" => {
            let g = admin
                .get_grant(pb::GetGrantRequest { id: id.to_string() })
                .await?
                .into_inner();
            let all = all_grants(admin, "").await?;
            let children: Vec<&pb::Grant> = all
                .iter()
                .filter(|c| c.id != g.id && c.chain.iter().any(|h| h.grant_id == g.id))
                .collect();
            html! {
                p { "Grant " code { (g.id) } " (" (chain_text(&g)) ", scopes " (g.scopes.join(" ")) ") ends: "
                    code { (g.agent) } " can no longer act for " b.principal { (g.principal) }
                    ", and the " (children.len()) " grants delegated from it end with it:" }
                ul { @for c in &children { li { (chain_text(c)) } } }
            }
        }
        _ => {
            let all = all_grants(admin, "").await?;
            let under: Vec<&pb::Grant> = all.iter().filter(|g| g.task_id == id).collect();
            html! {
                p { "Task " code { (id) } " ends: the " (under.len()) " grants made for it, and every SVID minted under them, are revoked:" }
                ul { @for g in &under { li { (chain_text(g)) } } }
            }
        }
    })
}

pub async fn confirm_revoke(
    admin: &mut Admin,
    query: &HashMap<String, String>,
    csrf: &str,
) -> Result<String, PageError> {
    let kind = kill_kind(query.get("kind").map(String::as_str).unwrap_or_default())?;
    let id = query.get("id").cloned().unwrap_or_default();
    if id.is_empty() {
        return Err(bad("id", "missing"));
    }
    let what = impact(admin, kind, &id).await?;
    let body = html! {
        section.confirm {
            h2 { "Revoke " (kind) " " code { (id) } "?" }
            (what)
            form method="post" action="/revoke" {
                input type="hidden" name="csrf" value=(csrf);
                input type="hidden" name="kind" value=(kind);
                input type="hidden" name="id" value=(id);
                label { "Reason (recorded in the audit log) "
                    textarea name="reason" required maxlength="1024" rows="2" {} }
                button.danger type="submit" { "Revoke " (kind) " now" }
                " "
                a href="/" { "Cancel" }
            }
        }
    };
    Ok(layout("Confirm revocation", "", body))
}

/// Revokes what the confirmed form names; the revocation's sequence number.
pub async fn revoke(admin: &mut Admin, form: &HashMap<String, String>) -> Result<u64, PageError> {
    let kind = kill_kind(form.get("kind").map(String::as_str).unwrap_or_default())?;
    let id = form.get("id").cloned().unwrap_or_default();
    if id.is_empty() {
        return Err(bad("id", "missing"));
    }
    let reason = form
        .get("reason")
        .map(|r| r.trim().to_string())
        .unwrap_or_default();
    if reason.is_empty() {
        return Err(bad("reason", "a revocation needs a reason"));
    }
    let ev = admin
        .revoke(pb::RevokeRequest {
            handle: Some(rpb::RevocationHandle {
                kind: kind.to_string(),
                id,
            }),
            reason,
        })
        .await?
        .into_inner();
    Ok(ev.sequence)
}

/// The result of a revocation: what it covered.
pub async fn revoked(
    admin: &mut Admin,
    query: &HashMap<String, String>,
) -> Result<String, PageError> {
    let raw = query
        .get("sequence")
        .map(String::as_str)
        .unwrap_or_default();
    let sequence: u64 = raw
        .parse()
        .map_err(|_| bad("sequence", format!("{raw:?} is not a revocation number")))?;
    let mut req = pb::ListRevocationsRequest {
        all: true,
        ..Default::default()
    };
    let ev = loop {
        let page = admin.list_revocations(req.clone()).await?.into_inner();
        if let Some(ev) = page.events.into_iter().find(|e| e.sequence == sequence) {
            break ev;
        }
        if page.next_page_token.is_empty() {
            return Err(bad("sequence", format!("no revocation #{sequence}")));
        }
        req.page_token = page.next_page_token;
    };
    let (kind, id) = ev
        .handle
        .as_ref()
        .map(|h| (h.kind.clone(), h.id.clone()))
        .unwrap_or_default();
    let x509 = ev.serials.len() as u64 + ev.serials_omitted;
    let jwts = ev.jwt_ids.len() as u64 + ev.jwt_ids_omitted;
    let body = html! {
        section.done {
            @if ev.lifts > 0 {
                p.result { "Revocation #" (ev.sequence) " lifted revocation #" (ev.lifts) "." }
            } @else {
                p.result { "Revoked " (kind) " " code { (id) } " — revocation #" (ev.sequence) "." }
                p { "It covered " b.covered { (x509 + jwts) } " SVIDs and tokens: " (x509) " X.509-SVIDs and " (jwts) " JWT-SVIDs and access tokens. Node agents have been told; relying parties watching revocations see it now." }
            }
            p { "Reason: " (ev.reason) " · at " (rfc3339(ev.at)) }
            p { a href={"/audit?action=revocation.*"} { "See it in the audit timeline" } " · " a href="/" { "Back to the inventory" } }
        }
    };
    Ok(layout("Revoked", "", body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(owner: &str, last_fetched: i64, created_at: i64) -> pb::Entry {
        pb::Entry {
            owner: owner.into(),
            last_fetched,
            created_at,
            ..Default::default()
        }
    }

    #[test]
    fn the_most_serious_state_wins() {
        let now = 100 * 24 * 3600;
        assert_eq!(entry_status(&entry("team", now - 10, 0), now), "live");
        assert_eq!(entry_status(&entry("team", 1, 0), now), "stale");
        assert_eq!(
            entry_status(&entry("team", 0, now - 5), now),
            "live",
            "young, never fetched"
        );
        assert_eq!(entry_status(&entry("", now, 0), now), "orphaned");
        let mut e = entry("team", now, 0);
        e.owner_disabled = true;
        assert_eq!(entry_status(&e, now), "orphaned");
        e.suspended = true;
        assert_eq!(entry_status(&e, now), "suspended");
        e.revoked_by = 3;
        assert_eq!(entry_status(&e, now), "revoked");
    }

    #[test]
    fn values_are_escaped_not_markup() {
        let page = refusal(StatusCode::BAD_REQUEST, "<script>alert(1)</script>");
        assert!(!page.contains("<script>alert"), "{page}");
        assert!(page.contains("&lt;script&gt;"), "{page}");
    }

    #[test]
    fn the_kill_switch_offers_four_handles() {
        for k in KILL_KINDS {
            assert_eq!(kill_kind(k).ok(), Some(k));
        }
        assert!(kill_kind("authority").is_err());
    }
}
