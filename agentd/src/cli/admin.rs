//! Admin commands: talk to the server over its admin Unix socket.

use std::path::Path;

use agentd_proto::admin as pb;
use agentd_proto::admin::admin_client::AdminClient;
use anyhow::anyhow;
use serde_json::json;
use tonic::transport::Channel;

use super::connect::{admin_client, status};
use super::output::rfc3339;
use super::{
    AuthorityCommand, BundleCommand, BundleFormat, EntryCommand, EntryCreateArgs, EntryFilterArgs,
    NodeCommand, Output, TokenCommand,
};
use crate::ttl::Ttl;

/// A TTL flag as proto seconds, where 0 means "the server's default". Clap parsed it: it is
/// within [1 s, 366 d].
pub(super) fn ttl_secs(ttl: Option<Ttl>) -> i64 {
    ttl.map_or(0, |t| i64::try_from(t.as_secs()).unwrap_or(i64::MAX))
}

pub fn entry_json(e: &pb::Entry) -> serde_json::Value {
    json!({
        "id": e.id,
        "spiffe_id": e.spiffe_id,
        "parent_id": e.parent_id,
        "selectors": e.selectors.iter().map(|s| format!("{}:{}", s.r#type, s.value)).collect::<Vec<_>>(),
        "x509_svid_ttl": e.x509_svid_ttl_seconds,
        "jwt_svid_ttl": e.jwt_svid_ttl_seconds,
        "dns_names": e.dns_names,
        "hint": e.hint,
        "scopes": e.scopes,
        "owner": if e.owner.is_empty() { serde_json::Value::Null } else { json!(e.owner) },
        "revision": e.revision,
        "created_at": e.created_at,
        "revoked_by": if e.revoked_by == 0 { serde_json::Value::Null } else { json!(e.revoked_by) },
        "last_issued": (e.last_issued != 0).then_some(e.last_issued),
        "last_fetched": (e.last_fetched != 0).then_some(e.last_fetched),
        "owner_disabled": e.owner_disabled,
        "suspended": e.suspended,
        "federates_with": e.federates_with,
        "resources": e.resources,
    })
}

fn entry_text(e: &pb::Entry) -> String {
    let mut s = format!(
        "Entry ID      : {}\nSPIFFE ID     : {}\nParent ID     : {}\n",
        e.id, e.spiffe_id, e.parent_id
    );
    for sel in &e.selectors {
        s += &format!("Selector      : {}:{}\n", sel.r#type, sel.value);
    }
    s += &format!(
        "X509-SVID TTL : {}\nJWT-SVID TTL  : {}\n",
        e.x509_svid_ttl_seconds, e.jwt_svid_ttl_seconds
    );
    for d in &e.dns_names {
        s += &format!("DNS name      : {d}\n");
    }
    for sc in &e.scopes {
        s += &format!("Scope         : {sc}\n");
    }
    for td in &e.federates_with {
        s += &format!("FederatesWith : {td}\n");
    }
    for r in &e.resources {
        s += &format!("Resource      : {r}\n");
    }
    if e.revoked_by != 0 {
        s += &format!("Revoked       : yes (revocation {})\n", e.revoked_by);
    }
    if !e.owner.is_empty() {
        s += &format!("Owner         : {}\n", e.owner);
    }
    if e.suspended {
        s += "Status        : suspended (owner disabled)\n";
    } else if e.owner_disabled {
        s += "Status        : orphaned (owner disabled)\n";
    }
    if e.last_issued != 0 {
        s += &format!("Last issued   : {}\n", rfc3339(e.last_issued));
    }
    if e.last_fetched != 0 {
        s += &format!("Last fetched  : {}\n", rfc3339(e.last_fetched));
    }
    if !e.hint.is_empty() {
        s += &format!("Hint          : {}\n", e.hint);
    }
    s += &format!("Revision      : {}\n", e.revision);
    s
}

fn node_json(n: &pb::Node) -> serde_json::Value {
    json!({
        "spiffe_id": n.spiffe_id,
        "attestation_type": n.attestation_type,
        "serial": n.serial,
        "svid_expires_at": n.svid_expires_at,
        "attested_at": n.attested_at,
        "last_seen_at": n.last_seen_at,
        "selectors": n.selectors,
    })
}

fn node_text(n: &pb::Node) -> String {
    let mut s = format!(
        "SPIFFE ID        : {}\nAttestation type : {}\nSerial           : {}\nSVID expires at  : {}\nAttested at      : {}\n",
        n.spiffe_id,
        n.attestation_type,
        n.serial,
        rfc3339(n.svid_expires_at),
        rfc3339(n.attested_at)
    );
    for sel in &n.selectors {
        s += &format!("Selector         : {sel}\n");
    }
    s
}

pub async fn token(cmd: TokenCommand, out: Output) -> anyhow::Result<()> {
    let TokenCommand::Generate {
        spiffe_id,
        ttl,
        admin,
    } = cmd;
    let ttl_seconds = ttl_secs(ttl);
    let t = admin_client(&admin.admin_socket)
        .await?
        .create_join_token(pb::CreateJoinTokenRequest {
            spiffe_id,
            ttl_seconds,
        })
        .await
        .map_err(status)?
        .into_inner();
    out.print(
        &json!({"token": t.token, "spiffe_id": t.spiffe_id, "expires_at": t.expires_at}),
        || t.token.clone(),
    );
    Ok(())
}

fn spec_from_args(a: EntryCreateArgs) -> pb::EntrySpec {
    pb::EntrySpec {
        spiffe_id: a.spiffe_id.unwrap_or_default(),
        parent_id: a.parent_id.unwrap_or_default(),
        selectors: a.selectors,
        x509_svid_ttl_seconds: ttl_secs(a.x509_svid_ttl),
        jwt_svid_ttl_seconds: ttl_secs(a.jwt_svid_ttl),
        dns_names: a.options.dns_names,
        hint: a.options.hint.unwrap_or_default(),
        scopes: a.options.scopes,
        owner: a.options.owner.unwrap_or_default(),
        federates_with: a.options.federates_with,
        resources: a.options.resources,
    }
}

fn list_request(f: EntryFilterArgs) -> pb::ListEntriesRequest {
    pb::ListEntriesRequest {
        spiffe_id: f.spiffe_id.unwrap_or_default(),
        parent_id: f.parent_id.unwrap_or_default(),
        selector: f.selector.unwrap_or_default(),
        owner: f.owner.unwrap_or_default(),
        stale_seconds: ttl_secs(f.stale),
        orphaned: f.orphaned,
        ..Default::default()
    }
}

async fn list_entries(
    c: &mut AdminClient<Channel>,
    filter: EntryFilterArgs,
    out: Output,
) -> anyhow::Result<()> {
    // The server answers in pages; follow them all.
    let request = list_request(filter);
    let list = crate::cli::connect::all_pages(|page_token| {
        let mut c = c.clone();
        let request = pb::ListEntriesRequest {
            page_token,
            ..request.clone()
        };
        async move {
            let page = c.list_entries(request).await?.into_inner();
            Ok((page.entries, page.next_page_token))
        }
    })
    .await?;
    out.print_list("entries", &list, entry_json, entry_text);
    Ok(())
}

/// Whether a node agent can serve entries under `parent_id` today: an attested node has
/// that ID, or it is the server's own ID (a node-set alias is parented to it), or a
/// node-set alias (an entry parented to the server) has that ID.
async fn parent_is_known(c: &mut AdminClient<Channel>, parent_id: &str) -> anyhow::Result<bool> {
    let info = c
        .get_server_info(pb::GetServerInfoRequest {})
        .await
        .map_err(status)?
        .into_inner();
    let server_id = spiffe::TrustDomain::new(&info.trust_domain)
        .map(|td| crate::tls::server_spiffe_id(&td).to_string())
        .map_err(|e| anyhow!("the server's trust domain {:?}: {e}", info.trust_domain))?;
    if parent_id == server_id {
        return Ok(true);
    }
    match c
        .get_node(pb::GetNodeRequest {
            spiffe_id: parent_id.to_string(),
        })
        .await
    {
        Ok(_) => return Ok(true),
        Err(s) if s.code() == tonic::Code::NotFound => {}
        Err(s) => return Err(status(s)),
    }
    let aliases = c
        .list_entries(pb::ListEntriesRequest {
            spiffe_id: parent_id.to_string(),
            parent_id: server_id,
            ..Default::default()
        })
        .await
        .map_err(status)?
        .into_inner()
        .entries;
    Ok(!aliases.is_empty())
}

/// A warning on stderr (stdout keeps the command's output alone) when an entry's parent is
/// neither an attested node nor a node-set alias: the entry is kept, as a pre-registration,
/// but no node agent serves it until a node attests with that ID.
async fn warn_unknown_parent(c: &mut AdminClient<Channel>, parent_id: &str) {
    match parent_is_known(c, parent_id).await {
        Ok(true) => {}
        Ok(false) => eprintln!(
            "warning: parent_id: no attested node or node-set alias is {parent_id}: the entry \
             is stored, and served once a node agent attests with that SPIFFE ID"
        ),
        Err(e) => eprintln!("warning: parent_id: could not check {parent_id}: {e:#}"),
    }
}

/// Entries per batch call: well under the server's 1000 and the message limit.
const BULK_PAGE: usize = 500;

/// A `--data` argument's text: a file, or stdin for `-`.
fn read_data(path: &str) -> anyhow::Result<String> {
    if path == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .map_err(|e| anyhow!("--data -: reading stdin: {e}"))?;
        Ok(s)
    } else {
        std::fs::read_to_string(path).map_err(|e| anyhow!("--data {path}: {e}"))
    }
}

/// One line (text) and one object (JSON) per entry of a bulk command, printed in input
/// order (entries refused before sending are known before the server answers the others).
struct BulkReport {
    verb: &'static str,
    rows: Vec<(usize, serde_json::Value, String)>,
    failed: usize,
}

impl BulkReport {
    fn new(verb: &'static str) -> Self {
        Self {
            verb,
            rows: Vec::new(),
            failed: 0,
        }
    }

    fn refused(&mut self, i: usize, path: &str, label: &str, status: &str, why: &str) {
        self.failed += 1;
        let what = if label.is_empty() {
            path.to_string()
        } else {
            format!("{path} {label}")
        };
        self.rows.push((
            i,
            json!({"entry": path, "status": status, "error": why}),
            format!("{status:<9} {what}: {why}"),
        ));
    }

    fn result(&mut self, i: usize, path: &str, label: &str, r: pb::EntryResult) {
        match r.entry {
            Some(e) if r.code == 0 => self.rows.push((
                i,
                json!({"entry": path, "status": self.verb, "result": entry_json(&e)}),
                format!("{:<9} {path} {} {}", self.verb, e.id, e.spiffe_id),
            )),
            _ => {
                let status = if r.code == tonic::Code::AlreadyExists as i32 {
                    "duplicate"
                } else {
                    "error"
                };
                self.refused(i, path, label, status, &r.message);
            }
        }
    }

    /// Prints the report; an error (exit 1) when any entry failed.
    fn finish(mut self, out: Output) -> anyhow::Result<()> {
        self.rows.sort_by_key(|(i, _, _)| *i);
        let total = self.rows.len();
        let done = total - self.failed;
        let (json_rows, lines): (Vec<_>, Vec<_>) =
            self.rows.into_iter().map(|(_, j, l)| (j, l)).unzip();
        out.print(
            &json!({"results": json_rows, self.verb: done, "failed": self.failed}),
            || {
                let mut t = lines.join("\n");
                t += &format!("\n{done} of {total} entries {}\n", self.verb);
                t
            },
        );
        if self.failed > 0 {
            return Err(anyhow!(
                "{} of {total} entries were not {}",
                self.failed,
                self.verb
            ));
        }
        Ok(())
    }
}

/// What a bulk command does with each entry of its data.
#[derive(Clone, Copy)]
enum Bulk {
    Create,
    Delete,
}

/// `entry create --data` and `entry delete --data`: every entry is parsed first (a bad one is
/// reported and not sent), the rest go in pages of [`BULK_PAGE`], and each is reported.
async fn bulk(
    c: &mut AdminClient<Channel>,
    kind: Bulk,
    data: &str,
    out: Output,
) -> anyhow::Result<()> {
    let items = super::bulk::entries(data).map_err(|e| anyhow!("--data: {e}"))?;
    let mut report = BulkReport::new(match kind {
        Bulk::Create => "created",
        Bulk::Delete => "deleted",
    });
    /// What is sent for one entry.
    enum Item {
        Spec(Box<pb::EntrySpec>),
        Id(String),
    }
    // (input index, path, label, item).
    let mut good: Vec<(usize, String, String, Item)> = Vec::new();
    for (i, (path, o)) in items.into_iter().enumerate() {
        let parsed = match kind {
            Bulk::Create => super::bulk::spec(&path, &o).map(|s| Item::Spec(Box::new(s))),
            Bulk::Delete => super::bulk::entry_id(&path, &o).map(Item::Id),
        };
        let label = match (&parsed, kind) {
            (Ok(Item::Id(id)), _) => id.clone(),
            (_, Bulk::Create) => o
                .get("spiffe_id")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("")
                .to_string(),
            (_, Bulk::Delete) => String::new(),
        };
        match parsed {
            Ok(item) => good.push((i, path, label, item)),
            Err(why) => report.refused(i, &path, &label, "error", &why),
        }
    }
    let mut parents = std::collections::BTreeSet::new();
    for page in good.chunks(BULK_PAGE) {
        let results = match kind {
            Bulk::Create => {
                c.batch_create_entries(pb::BatchCreateEntriesRequest {
                    entries: page
                        .iter()
                        .filter_map(|(.., item)| match item {
                            Item::Spec(s) => Some((**s).clone()),
                            Item::Id(_) => None,
                        })
                        .collect(),
                })
                .await
            }
            Bulk::Delete => {
                c.batch_delete_entries(pb::BatchDeleteEntriesRequest {
                    ids: page
                        .iter()
                        .filter_map(|(.., item)| match item {
                            Item::Id(id) => Some(id.clone()),
                            Item::Spec(_) => None,
                        })
                        .collect(),
                })
                .await
            }
        }
        .map_err(status)?
        .into_inner()
        .results;
        anyhow::ensure!(
            results.len() == page.len(),
            "the server answered {} results for {} entries",
            results.len(),
            page.len()
        );
        for ((i, path, label, item), r) in page.iter().zip(results) {
            if let (Item::Spec(spec), 0) = (item, r.code) {
                parents.insert(spec.parent_id.clone());
            }
            report.result(*i, path, label, r);
        }
    }
    for parent in &parents {
        warn_unknown_parent(c, parent).await;
    }
    report.finish(out)
}

pub async fn entry(cmd: EntryCommand, out: Output) -> anyhow::Result<()> {
    match cmd {
        EntryCommand::Create { args, admin } if args.data.is_some() => {
            let data = read_data(args.data.as_deref().unwrap_or("-"))?;
            let mut c = admin_client(&admin.admin_socket).await?;
            bulk(&mut c, Bulk::Create, &data, out).await?;
        }
        EntryCommand::Delete {
            data: Some(data),
            admin,
            ..
        } => {
            let data = read_data(&data)?;
            let mut c = admin_client(&admin.admin_socket).await?;
            bulk(&mut c, Bulk::Delete, &data, out).await?;
        }
        EntryCommand::Create { args, admin } => {
            let spec = spec_from_args(args);
            let parent_id = spec.parent_id.clone();
            let mut c = admin_client(&admin.admin_socket).await?;
            let e = c.create_entry(spec).await.map_err(status)?.into_inner();
            warn_unknown_parent(&mut c, &parent_id).await;
            out.print(&entry_json(&e), || e.id.clone());
        }
        EntryCommand::Show { id, filter, admin } => {
            let mut c = admin_client(&admin.admin_socket).await?;
            match id {
                Some(id) => {
                    let e = c
                        .get_entry(pb::GetEntryRequest { id })
                        .await
                        .map_err(status)?
                        .into_inner();
                    out.print(&entry_json(&e), || entry_text(&e));
                }
                None => list_entries(&mut c, filter, out).await?,
            }
        }
        EntryCommand::List { filter, admin } => {
            let mut c = admin_client(&admin.admin_socket).await?;
            list_entries(&mut c, filter, out).await?;
        }
        EntryCommand::Update { args, admin } => {
            let list = |v: Vec<String>| (!v.is_empty()).then_some(pb::StringList { values: v });
            let new_parent = args.parent_id.clone();
            let req = pb::UpdateEntryRequest {
                id: args.id,
                x509_svid_ttl_seconds: args.x509_svid_ttl.map(|t| ttl_secs(Some(t))),
                jwt_svid_ttl_seconds: args.jwt_svid_ttl.map(|t| ttl_secs(Some(t))),
                spiffe_id: args.spiffe_id,
                parent_id: args.parent_id,
                selectors: list(args.selectors),
                dns_names: list(args.options.dns_names),
                hint: args.options.hint,
                scopes: list(args.options.scopes),
                owner: args.options.owner,
                // `--federates-with ""` clears the list.
                federates_with: if args.options.federates_with == [String::new()] {
                    Some(pb::StringList { values: vec![] })
                } else {
                    list(args.options.federates_with)
                },
                // `--resource ""` clears the list.
                resources: if args.options.resources == [String::new()] {
                    Some(pb::StringList { values: vec![] })
                } else {
                    list(args.options.resources)
                },
            };
            let mut c = admin_client(&admin.admin_socket).await?;
            let e = c.update_entry(req).await.map_err(status)?.into_inner();
            if let Some(parent_id) = new_parent {
                warn_unknown_parent(&mut c, &parent_id).await;
            }
            out.print(&entry_json(&e), || entry_text(&e));
        }
        EntryCommand::Delete { id, admin, .. } => {
            let e = admin_client(&admin.admin_socket)
                .await?
                .delete_entry(pb::DeleteEntryRequest {
                    id: id.unwrap_or_default(),
                })
                .await
                .map_err(status)?
                .into_inner();
            out.print(&entry_json(&e), || format!("Deleted entry {}", e.id));
        }
    }
    Ok(())
}

pub async fn node(cmd: NodeCommand, out: Output) -> anyhow::Result<()> {
    match cmd {
        NodeCommand::Run(_) => unreachable!("dispatched to the daemon"),
        NodeCommand::List(admin) => {
            let client = admin_client(&admin.admin_socket).await?;
            let nodes = crate::cli::connect::all_pages(|page_token| {
                let mut client = client.clone();
                async move {
                    let page = client
                        .list_nodes(pb::ListNodesRequest {
                            page_size: 0,
                            page_token,
                        })
                        .await?
                        .into_inner();
                    Ok((page.nodes, page.next_page_token))
                }
            })
            .await?;
            out.print_list("attested nodes", &nodes, node_json, node_text);
        }
        NodeCommand::Show { spiffe_id, admin } => {
            let n = admin_client(&admin.admin_socket)
                .await?
                .get_node(pb::GetNodeRequest { spiffe_id })
                .await
                .map_err(status)?
                .into_inner();
            out.print(&node_json(&n), || node_text(&n));
        }
        NodeCommand::Evict { spiffe_id, admin } => {
            let n = admin_client(&admin.admin_socket)
                .await?
                .evict_node(pb::EvictNodeRequest { spiffe_id })
                .await
                .map_err(status)?
                .into_inner();
            out.print(&node_json(&n), || format!("Evicted node {}", n.spiffe_id));
        }
        NodeCommand::Ban { spiffe_id, args } => {
            return super::revoke::revoke(super::RevokeCommand::Node { spiffe_id, args }, out)
                .await;
        }
    }
    Ok(())
}

pub async fn bundle(cmd: BundleCommand, out: Output) -> anyhow::Result<()> {
    let (format, admin) = match cmd {
        BundleCommand::Show { format, admin } => (format, admin),
        BundleCommand::Crl { admin } => {
            let crls = admin_client(&admin.admin_socket)
                .await?
                .get_crls(agentd_proto::revocation::FetchCrlsRequest {})
                .await
                .map_err(status)?
                .into_inner()
                .crls;
            let pems: Vec<(String, String)> = crls
                .iter()
                .map(|c| {
                    (
                        c.authority_id.clone(),
                        crate::keys::pem_encode("X509 CRL", &c.der),
                    )
                })
                .collect();
            out.print(
                &json!(pems
                    .iter()
                    .map(|(id, pem)| json!({"authority_id": id, "pem": pem}))
                    .collect::<Vec<_>>()),
                || pems.iter().map(|(_, pem)| pem.as_str()).collect(),
            );
            return Ok(());
        }
        // Other trust domains' bundles.
        other => return super::federation::bundle(other, out).await,
    };
    let b = admin_client(&admin.admin_socket)
        .await?
        .get_bundle(pb::GetBundleRequest {})
        .await
        .map_err(status)?
        .into_inner();
    match (out, format) {
        (Output::Json, BundleFormat::Spiffe) | (Output::Text, BundleFormat::Spiffe) => {
            // The SPIFFE format is JSON already: print it as the one value.
            println!("{}", b.spiffe_json);
        }
        (Output::Json, BundleFormat::Pem) => {
            println!(
                "{}",
                json!({"trust_domain": b.trust_domain, "sequence": b.sequence, "pem": b.pem})
            );
        }
        (Output::Text, BundleFormat::Pem) => print!("{}", b.pem),
    }
    Ok(())
}

pub async fn healthcheck(path: &Path, out: Output) -> anyhow::Result<()> {
    let info = admin_client(path)
        .await?
        .get_server_info(pb::GetServerInfoRequest {})
        .await
        .map_err(status)?
        .into_inner();
    if !info.not_ready.is_empty() {
        anyhow::bail!(
            "not ready: waiting for {} (datastore {})",
            info.not_ready.join(", "),
            info.datastore
        );
    }
    out.print(
        &json!({
            "healthy": true,
            "trust_domain": info.trust_domain,
            "node_api_address": info.node_api_address,
            "version": info.version,
            "bundle_sequence": info.bundle_sequence,
            "datastore": info.datastore,
        }),
        || {
            format!(
                "Server is healthy (trust domain {}, node API {}, datastore {})",
                info.trust_domain, info.node_api_address, info.datastore
            )
        },
    );
    Ok(())
}

pub fn authority_json(a: &pb::Authority) -> serde_json::Value {
    json!({
        "id": a.id,
        "kind": a.kind,
        "state": a.state,
        "not_before": if a.not_before == 0 { serde_json::Value::Null } else { json!(a.not_before) },
        "not_after": a.not_after,
    })
}

fn authority_text(a: &pb::Authority) -> String {
    format!(
        "{:<4}  {:<8}  {}  not after {}\n",
        a.kind,
        a.state,
        a.id,
        rfc3339(a.not_after)
    )
}

pub async fn authority(cmd: AuthorityCommand, out: Output) -> anyhow::Result<()> {
    match cmd {
        AuthorityCommand::List(admin) => {
            let r = admin_client(&admin.admin_socket)
                .await?
                .list_authorities(pb::ListAuthoritiesRequest {})
                .await
                .map_err(status)?
                .into_inner();
            out.print(
                &json!(r.authorities.iter().map(authority_json).collect::<Vec<_>>()),
                || {
                    let mut s = format!(
                        "{} authorities (bundle sequence {})\n",
                        r.authorities.len(),
                        r.bundle_sequence
                    );
                    for a in &r.authorities {
                        s += &authority_text(a);
                    }
                    s
                },
            );
        }
        AuthorityCommand::Prepare(admin) => {
            let r = admin_client(&admin.admin_socket)
                .await?
                .prepare_authority(pb::PrepareAuthorityRequest {})
                .await
                .map_err(status)?
                .into_inner();
            print_change(out, "Prepared (published, not signing yet)", &r);
        }
        AuthorityCommand::Activate(admin) => {
            let r = admin_client(&admin.admin_socket)
                .await?
                .activate_authority(pb::ActivateAuthorityRequest {})
                .await
                .map_err(status)?
                .into_inner();
            print_change(out, "Activated (signing from now on)", &r);
        }
    }
    Ok(())
}

fn print_change(out: Output, what: &str, r: &pb::Authorities) {
    out.print(
        &json!({
            "authorities": r.authorities.iter().map(authority_json).collect::<Vec<_>>(),
            "bundle_sequence": r.bundle_sequence,
        }),
        || {
            let mut s = format!("{what}; bundle sequence {}\n", r.bundle_sequence);
            for a in &r.authorities {
                s += &authority_text(a);
            }
            s
        },
    );
}
