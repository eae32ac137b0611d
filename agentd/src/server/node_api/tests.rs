//! Handlers' policy, with a real store and CA on a temp dir.

use super::*;
use crate::datastore::{AttestedNode, Entry};
use crate::datastore::{DataStore, EntrySpec, SledStore};
use crate::server::membership::{entries_for_node, node_serves};
use crate::server::ServerState;
use crate::ttl::Ttl;
use spiffe::SpiffeId;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

fn spec(id: &str, parent: &str, selectors: &[&str]) -> EntrySpec {
    EntrySpec {
        resources: vec![],
        spiffe_id: SpiffeId::new(id).unwrap(),
        parent_id: SpiffeId::new(parent).unwrap(),
        selectors: selectors.iter().map(|s| s.parse().unwrap()).collect(),
        x509_svid_ttl: Ttl::from_secs(3600).unwrap(),
        jwt_svid_ttl: Ttl::from_secs(300).unwrap(),
        dns_names: vec![],
        hint: String::new(),
        scopes: vec![],
        owner: None,
        federates_with: vec![],
    }
}

fn node(id: &str, selectors: &[&str]) -> AttestedNode {
    AttestedNode {
        spiffe_id: SpiffeId::new(id).unwrap(),
        attestation_type: "x509pop".into(),
        serial: "1".into(),
        svid_expires_at: 0,
        attested_at: 0,
        last_seen_at: 0,
        selectors: selectors.iter().map(|s| s.parse().unwrap()).collect(),
        previous_serial: None,
        previous_svid_expires_at: None,
    }
}

/// A server state on a temp dir, with `suspend_disabled_owners` as given.
async fn state(dir: &std::path::Path, suspend: bool) -> Arc<ServerState> {
    let raw = crate::server::RawServerConfig {
        suspend_disabled_owners: Some(suspend),
        ..Default::default()
    };
    super::issuance_tests::fixture_with(dir, raw).await.0
}

#[tokio::test]
async fn a_suspended_entry_is_refused_and_the_refusal_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let st = state(dir.path(), true).await;
    let api = NodeApi::new(st.clone(), CancellationToken::new());
    let n = node("spiffe://example.org/node/a", &[]);
    let mut s = spec(
        "spiffe://example.org/agent/x",
        "spiffe://example.org/node/a",
        &["unix:uid:1"],
    );
    s.owner = Some("alice@example.com".into());
    let entry = st.store.create_entry(s, 0).await.unwrap();
    api.check_not_suspended(&n, &entry, "x509svid")
        .await
        .unwrap();

    st.store
        .set_owner_disabled("alice@example.com", true, 1)
        .await
        .unwrap();
    let err = api
        .check_not_suspended(&n, &entry, "x509svid")
        .await
        .unwrap_err();
    assert!(matches!(err, NodeApiError::EntrySuspended { .. }), "{err}");
    assert_eq!(Status::from(err).code(), tonic::Code::PermissionDenied);
    let records = st
        .audit
        .query(&crate::audit::AuditQuery {
            action: Some("x509svid.refuse".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].actor, "spiffe://example.org/node/a");
    assert_eq!(
        records[0].subject.as_deref(),
        Some("spiffe://example.org/agent/x")
    );
    assert_eq!(records[0].fields["owner"], "alice@example.com");

    // Without the setting, a disabled owner's entry is only flagged.
    let dir = tempfile::tempdir().unwrap();
    let st = state(dir.path(), false).await;
    let api = NodeApi::new(st.clone(), CancellationToken::new());
    let entry = st.store.create_entry(entry.spec.clone(), 0).await.unwrap();
    st.store
        .set_owner_disabled("alice@example.com", true, 1)
        .await
        .unwrap();
    api.check_not_suspended(&n, &entry, "jwtsvid")
        .await
        .unwrap();
}

#[tokio::test]
async fn node_set_aliases_give_entries_to_every_matching_node() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SledStore::open(dir.path()).unwrap());
    let log = crate::revocation::log::RevocationLog::open(store.clone())
        .await
        .unwrap();
    let server = "spiffe://example.org/agentd/server";
    let server_id = SpiffeId::new(server).unwrap();
    let ca = "x509pop:ca:fingerprint:aa";
    // Alias: every node whose certificate comes from CA aa.
    store
        .create_entry(spec("spiffe://example.org/nodes/fleet", server, &[ca]), 0)
        .await
        .unwrap();
    // Alias: only node a, by its CN, and CA.
    store
        .create_entry(
            spec(
                "spiffe://example.org/nodes/a-only",
                server,
                &[ca, "x509pop:subject:cn:a"],
            ),
            0,
        )
        .await
        .unwrap();
    let fleet_wide = store
        .create_entry(
            spec(
                "spiffe://example.org/agent/everywhere",
                "spiffe://example.org/nodes/fleet",
                &["unix:uid:1"],
            ),
            0,
        )
        .await
        .unwrap();
    let a_only = store
        .create_entry(
            spec(
                "spiffe://example.org/agent/on-a",
                "spiffe://example.org/nodes/a-only",
                &["unix:uid:1"],
            ),
            0,
        )
        .await
        .unwrap();
    let direct = store
        .create_entry(
            spec(
                "spiffe://example.org/agent/direct-b",
                "spiffe://example.org/node/b",
                &["unix:uid:1"],
            ),
            0,
        )
        .await
        .unwrap();

    let a = node("spiffe://example.org/node/a", &[ca, "x509pop:subject:cn:a"]);
    let b = node("spiffe://example.org/node/b", &[ca, "x509pop:subject:cn:b"]);
    let joined = node("spiffe://example.org/node/j", &[]);
    let ids = |v: Vec<Entry>| {
        let mut v: Vec<String> = v
            .iter()
            .map(|e| e.spec.spiffe_id.path().to_string())
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        ids(entries_for_node(&*store, &server_id, &a, None)
            .await
            .unwrap()),
        ["/agent/everywhere", "/agent/on-a"]
    );
    assert_eq!(
        ids(entries_for_node(&*store, &server_id, &b, None)
            .await
            .unwrap()),
        ["/agent/direct-b", "/agent/everywhere"]
    );
    assert!(entries_for_node(&*store, &server_id, &joined, None)
        .await
        .unwrap()
        .is_empty());
    // Minting follows the same rule.
    assert!(node_serves(&*store, &server_id, &a, &a_only, &log)
        .await
        .unwrap());
    assert!(!node_serves(&*store, &server_id, &b, &a_only, &log)
        .await
        .unwrap());
    assert!(node_serves(&*store, &server_id, &b, &fleet_wide, &log)
        .await
        .unwrap());
    assert!(node_serves(&*store, &server_id, &b, &direct, &log)
        .await
        .unwrap());
    assert!(!node_serves(&*store, &server_id, &a, &direct, &log)
        .await
        .unwrap());
    assert!(
        !node_serves(&*store, &server_id, &joined, &fleet_wide, &log)
            .await
            .unwrap()
    );
}
