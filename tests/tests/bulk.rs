//! Bulk registration: `entry create --data` takes SPIRE's `{"entries": [...]}` JSON (and what
//! `entry show --output json` prints), creates the good entries, reports each bad one naming
//! the field, and exits 1 if any failed; `entry delete --data` likewise.

use agentd_e2e::{current_uid, Env, Node, Server};
use agentd_proto::admin;
use serde_json::{json, Value};

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_spire_data_file_with_good_and_bad_entries_reports_each() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let node = Node::start(&env, &server, "n1")?;
    let uid = current_uid();
    let data = json!({"entries": [
        // SPIRE's own shape, as `spire-server entry show -output json` writes it.
        {"spiffe_id": {"trust_domain": "example.org", "path": "/bulk/a"},
         "parent_id": {"trust_domain": "example.org", "path": node.spiffe_id.trim_start_matches("spiffe://example.org")},
         "selectors": [{"type": "unix", "value": format!("uid:{uid}")}],
         "x509_svid_ttl": 3600, "jwt_svid_ttl": 300, "admin": false, "downstream": false,
         "federates_with": [], "revision_number": "0", "created_at": "1700000000"},
        {"spiffe_id": "spiffe://example.org/bulk/b", "parent_id": node.spiffe_id,
         "selectors": ["unix:uid:4242"], "scopes": ["crm:read"], "owner": "alice@example.com"},
        // The first again: a duplicate.
        {"spiffe_id": "spiffe://example.org/bulk/a", "parent_id": node.spiffe_id,
         "selectors": [format!("unix:uid:{uid}")]},
        {"spiffe_id": "spiffe://example.org/bulk/c", "parent_id": node.spiffe_id,
         "selectors": ["no-colon"]},
        {"spiffe_id": "spiffe://example.org/bulk/d", "parent_id": node.spiffe_id,
         "selectors": ["unix:uid:1"], "downstream": true},
        {"spiffe_id": "spiffe://other.org/bulk/e", "parent_id": node.spiffe_id,
         "selectors": ["unix:uid:1"]},
        {"spiffe_id": "spiffe://example.org/bulk/f", "parent_id": node.spiffe_id,
         "selector": ["unix:uid:1"]},
    ]});
    let file = env.path().join("entries.json");
    std::fs::write(&file, data.to_string())?;
    let file = file.display().to_string();

    let out = server.cli(&["entry", "create", "--data", &file, "--output", "json"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(&stdout(&out))?;
    let statuses: Vec<&str> = report["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        [
            "created",
            "created",
            "duplicate",
            "error",
            "error",
            "error",
            "error"
        ],
        "{report:#}"
    );
    for (i, needle) in [
        (3, "selector"),
        (4, "entries[4].downstream: not supported"),
        (5, "spiffe_id"),
        (6, "entries[6].selector: unknown field"),
    ] {
        let why = report["results"][i]["error"].as_str().unwrap();
        assert!(why.contains(needle), "entry {i}: {why}");
    }
    assert_eq!(
        (report["created"].as_u64(), report["failed"].as_u64()),
        (Some(2), Some(5))
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("5 of 7 entries were not created"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Only the good ones exist, with their fields, and the first is served to this process.
    let shown: Value =
        serde_json::from_str(&server.cli_ok(&["entry", "show", "--output", "json"])?)?;
    let ids: Vec<&str> = shown
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["spiffe_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "{shown:#}");
    assert!(
        ids.contains(&"spiffe://example.org/bulk/a")
            && ids.contains(&"spiffe://example.org/bulk/b")
    );
    let b = shown
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["spiffe_id"] == "spiffe://example.org/bulk/b")
        .unwrap();
    assert_eq!(b["scopes"], json!(["crm:read"]));
    assert_eq!(b["owner"], "alice@example.com");
    node.wait_for_svid("spiffe://example.org/bulk/a")?;

    // `entry show --output json` feeds `entry delete --data` and then `entry create --data`.
    let saved = env.path().join("shown.json");
    std::fs::write(&saved, shown.to_string())?;
    let saved = saved.display().to_string();
    let deleted = server.cli_ok(&["entry", "delete", "--data", &saved])?;
    assert!(deleted.contains("2 of 2 entries deleted"), "{deleted}");
    assert_eq!(
        server
            .cli_ok(&["entry", "show", "--output", "json"])?
            .trim(),
        "[]"
    );
    let again = server.cli_ok(&["entry", "create", "--data", &saved])?;
    assert!(again.contains("2 of 2 entries created"), "{again}");
    // The saved ids are gone (the entries were made again with new ids): each is reported,
    // and the command fails.
    let out = server.cli(&["entry", "delete", "--data", &saved]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("0 of 2 entries deleted"),
        "{}",
        stdout(&out)
    );

    // Every create is in the audit log on its own.
    let audit = server.cli_ok(&[
        "audit",
        "show",
        "--action",
        "entry.create",
        "--output",
        "json",
    ])?;
    let records: Value = serde_json::from_str(&audit)?;
    assert_eq!(records.as_array().map(Vec::len), Some(4), "{records:#}");
    Ok(())
}

#[test]
fn data_that_is_not_entries_creates_nothing_and_says_why() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    for (text, needle) in [
        ("{not json", "--data: the data is not JSON"),
        (r#"{"entries": 3}"#, "--data: entries: not an array"),
        ("[1, 2]", "--data: [0]: not an object"),
    ] {
        let file = env.path().join("bad.json");
        std::fs::write(&file, text)?;
        let out = server.cli(&["entry", "create", "--data", &file.display().to_string()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{text}: {stderr}");
        assert!(stderr.contains(needle), "{text}: {stderr}");
    }
    let out = server.cli(&["entry", "create", "--data", "/nonexistent/entries.json"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--data /nonexistent/entries.json"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        server
            .cli_ok(&["entry", "show", "--output", "json"])?
            .trim(),
        "[]"
    );
    Ok(())
}

#[tokio::test]
async fn a_batch_over_the_limit_is_refused_whole() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let mut client = agentd::cli::connect::admin_client(&server.admin_socket).await?;
    let spec = |i: usize| admin::EntrySpec {
        spiffe_id: format!("spiffe://example.org/bulk/{i}"),
        parent_id: "spiffe://example.org/node/n1".into(),
        selectors: vec![format!("unix:uid:{i}")],
        ..Default::default()
    };
    let err = client
        .batch_create_entries(admin::BatchCreateEntriesRequest {
            entries: (0..1001).map(spec).collect(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message()
            .contains("entries: 1001 in one call; at most 1000"),
        "{err}"
    );
    let listed = client
        .list_entries(admin::ListEntriesRequest::default())
        .await?
        .into_inner();
    assert!(listed.entries.is_empty(), "nothing written");
    Ok(())
}

/// `ListEntries` answers in pages (1000 by default) with a token for the next, and
/// `entry list` follows them: a store with more entries than a page lists them all, once.
#[tokio::test]
async fn listing_more_entries_than_a_page_follows_the_pages() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let mut client = agentd::cli::connect::admin_client(&server.admin_socket).await?;
    let spec = |i: usize| admin::EntrySpec {
        spiffe_id: format!("spiffe://example.org/paged/{i:05}"),
        parent_id: "spiffe://example.org/node/n1".into(),
        selectors: vec![format!("unix:uid:{i}")],
        ..Default::default()
    };
    for chunk in (0..2500).collect::<Vec<_>>().chunks(1000) {
        let done = client
            .batch_create_entries(admin::BatchCreateEntriesRequest {
                entries: chunk.iter().map(|i| spec(*i)).collect(),
            })
            .await?
            .into_inner();
        assert!(done.results.iter().all(|r| r.code == 0));
    }
    let first = client
        .list_entries(admin::ListEntriesRequest::default())
        .await?
        .into_inner();
    assert_eq!(first.entries.len(), 1000);
    assert!(!first.next_page_token.is_empty());
    let mut seen: Vec<String> = first.entries.iter().map(|e| e.spiffe_id.clone()).collect();
    let mut token = first.next_page_token;
    while !token.is_empty() {
        let page = client
            .list_entries(admin::ListEntriesRequest {
                page_size: 700,
                page_token: token,
                ..Default::default()
            })
            .await?
            .into_inner();
        assert!(page.entries.len() <= 700);
        seen.extend(page.entries.iter().map(|e| e.spiffe_id.clone()));
        token = page.next_page_token;
    }
    let expected: Vec<String> = (0..2500).map(|i| spec(i).spiffe_id).collect();
    assert_eq!(seen, expected, "every entry once, in order");

    let err = client
        .list_entries(admin::ListEntriesRequest {
            page_token: "not a token".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("page_token"), "{err}");
    let err = client
        .list_entries(admin::ListEntriesRequest {
            page_size: 5001,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("page_size"), "{err}");

    // The CLI follows the pages.
    let listed: Value =
        serde_json::from_str(&server.cli_ok(&["entry", "list", "--output", "json"])?)?;
    assert_eq!(listed.as_array().map(Vec::len), Some(2500));
    Ok(())
}

/// `GetInventory` pages its by-node and by-owner rows (1,000 by default) and repeats the
/// counts on every page; `inventory` follows the pages: 1,500 owners are each listed once.
#[tokio::test]
async fn the_inventory_rows_are_paged_and_the_cli_follows_them() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let mut client = agentd::cli::connect::admin_client(&server.admin_socket).await?;
    let owners = 1500;
    let spec = |i: usize| admin::EntrySpec {
        spiffe_id: format!("spiffe://example.org/owned/{i:05}"),
        parent_id: "spiffe://example.org/node/n1".into(),
        selectors: vec![format!("unix:uid:{i}")],
        owner: format!("owner-{i:05}@example.com"),
        ..Default::default()
    };
    for chunk in (0..owners).collect::<Vec<_>>().chunks(1000) {
        let done = client
            .batch_create_entries(admin::BatchCreateEntriesRequest {
                entries: chunk.iter().map(|i| spec(*i)).collect(),
            })
            .await?
            .into_inner();
        assert!(done.results.iter().all(|r| r.code == 0));
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = client
            .get_inventory(admin::GetInventoryRequest {
                page_size: 400,
                page_token: token,
                ..Default::default()
            })
            .await?
            .into_inner();
        pages += 1;
        assert!(page.by_owner.len() + page.by_node.len() <= 400);
        assert_eq!(page.entries, owners as u64, "the counts are on every page");
        seen.extend(page.by_owner.into_iter().map(|o| o.owner));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(pages, 4);
    let expected: Vec<String> = (0..owners).map(|i| spec(i).owner).collect();
    assert_eq!(seen, expected, "every owner once, in order");
    let err = client
        .get_inventory(admin::GetInventoryRequest {
            page_size: 5001,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("page_size"), "{err}");

    let inv: Value = serde_json::from_str(&server.cli_ok(&["inventory", "--output", "json"])?)?;
    let listed = inv["by_owner"].as_array().map_or(0, Vec::len);
    assert_eq!(
        listed, owners,
        "inventory lists every owner across the pages"
    );
    assert_eq!(inv["entries"], owners);
    Ok(())
}
