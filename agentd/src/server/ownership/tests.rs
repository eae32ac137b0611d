use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use super::*;
use crate::clock::{unix_seconds, Clock, ManualClock};
use crate::datastore::{EntrySpec, SledStore};
use crate::ttl::Ttl;

const DAY: u64 = 24 * 3600;

fn spec(id: &str, owner: Option<&str>) -> EntrySpec {
    EntrySpec {
        resources: vec![],
        spiffe_id: SpiffeId::new(id).unwrap(),
        parent_id: SpiffeId::new("spiffe://example.org/node/a").unwrap(),
        selectors: vec!["unix:uid:1".parse().unwrap()],
        x509_svid_ttl: Ttl::from_secs(3600).unwrap(),
        jwt_svid_ttl: Ttl::from_secs(300).unwrap(),
        dns_names: vec![],
        hint: String::new(),
        scopes: vec![],
        owner: owner.map(str::to_string),
        federates_with: vec![],
    }
}

fn paths(list: &[EntryStatus]) -> Vec<&str> {
    list.iter().map(|s| s.entry.spec.spiffe_id.path()).collect()
}

#[tokio::test]
async fn stale_and_orphaned_entries_follow_the_injected_clock() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let clock = Arc::new(ManualClock::new(
        UNIX_EPOCH + Duration::from_secs(1_700_000_000),
    ));
    let now = || unix_seconds(clock.now());
    let used = store
        .create_entry(
            spec("spiffe://example.org/used", Some("alice@example.com")),
            now(),
        )
        .await
        .unwrap();
    store
        .create_entry(
            spec("spiffe://example.org/idle", Some("bob@example.com")),
            now(),
        )
        .await
        .unwrap();
    store
        .create_entry(spec("spiffe://example.org/ownerless", None), now())
        .await
        .unwrap();

    clock.advance(Duration::from_secs(10 * DAY));
    store
        .note_fetched(vec![used.id.clone()], now())
        .await
        .unwrap();
    let stale = LifecycleFilter {
        stale: Some(Duration::from_secs(30 * DAY)),
        orphaned: false,
    };
    let list = |f: LifecycleFilter, at: i64| {
        let store = &store;
        async move {
            list_entries(store, &EntryFilter::default(), &f, true, at)
                .await
                .unwrap()
        }
    };
    // Day 10: nothing is 30 days old yet.
    assert!(list(stale.clone(), now()).await.is_empty());

    // Day 35: the entries never fetched are zombies; the one fetched on day 10 is not.
    clock.advance(Duration::from_secs(25 * DAY));
    assert_eq!(
        paths(&list(stale.clone(), now()).await),
        ["/idle", "/ownerless"]
    );

    // Day 41: 31 days after its last fetch, it is one too.
    clock.advance(Duration::from_secs(6 * DAY));
    let all = list(stale.clone(), now()).await;
    assert_eq!(paths(&all), ["/idle", "/ownerless", "/used"]);
    assert_eq!(
        all[2].activity.last_fetched,
        Some(1_700_000_000 + 10 * DAY as i64)
    );

    let orphaned = LifecycleFilter {
        stale: None,
        orphaned: true,
    };
    assert_eq!(paths(&list(orphaned.clone(), now()).await), ["/ownerless"]);
    store
        .set_owner_disabled("bob@example.com", true, now())
        .await
        .unwrap();
    let got = list(orphaned.clone(), now()).await;
    assert_eq!(paths(&got), ["/idle", "/ownerless"]);
    assert!(got[0].owner_disabled && got[0].suspended);
    assert!(!got[1].owner_disabled);
    store
        .set_owner_disabled("bob@example.com", false, now())
        .await
        .unwrap();
    assert_eq!(paths(&list(orphaned, now()).await), ["/ownerless"]);
}

#[tokio::test]
async fn suspension_needs_the_setting_and_a_disabled_owner() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let e = store
        .create_entry(spec("spiffe://example.org/a", Some("alice@example.com")), 0)
        .await
        .unwrap();
    assert!(!is_suspended(&store, &e, true).await.unwrap());
    store
        .set_owner_disabled("alice@example.com", true, 1)
        .await
        .unwrap();
    assert!(is_suspended(&store, &e, true).await.unwrap());
    assert!(!is_suspended(&store, &e, false).await.unwrap());
    let s = entry_status(&store, e, false).await.unwrap();
    assert!(s.owner_disabled && !s.suspended);
}

#[tokio::test]
async fn inventory_counts_by_owner_and_node() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let server_id = SpiffeId::new("spiffe://example.org/agentd/server").unwrap();
    let a = store
        .create_entry(spec("spiffe://example.org/a", Some("alice@example.com")), 0)
        .await
        .unwrap();
    store
        .create_entry(spec("spiffe://example.org/b", None), 0)
        .await
        .unwrap();
    store
        .upsert_node(crate::datastore::AttestedNode {
            spiffe_id: SpiffeId::new("spiffe://example.org/node/a").unwrap(),
            attestation_type: "join_token".into(),
            serial: "1".into(),
            svid_expires_at: 10_000,
            attested_at: 0,
            last_seen_at: 0,
            selectors: vec![],
            previous_serial: None,
            previous_svid_expires_at: None,
        })
        .await
        .unwrap();
    let svid = |serial: &str, expires_at| crate::model::revocation::IssuedSvid {
        kind: crate::model::revocation::SvidKind::X509,
        id: serial.into(),
        spiffe_id: a.spec.spiffe_id.to_string(),
        entry_id: Some(a.id.to_string()),
        node_id: Some(SpiffeId::new("spiffe://example.org/node/a").unwrap()),
        grant_chain: vec![],
        task_id: None,
        authority_id: "ca".into(),
        expires_at,
        derived_from: None,
    };
    store
        .append_issuance(
            &[svid("01", 100), svid("02", 1000)],
            vec![],
            50,
            &crate::audit::key::AuditKey::generate(),
        )
        .await
        .unwrap();
    store
        .set_owner_disabled("carol@example.com", true, 0)
        .await
        .unwrap();

    let inv = inventory(&store, &server_id, false, DEFAULT_STALE_WINDOW, 200)
        .await
        .unwrap();
    assert_eq!((inv.entries, inv.nodes, inv.live_svids), (2, 1, 1));
    assert_eq!((inv.live_grants, inv.revocations), (0, 0));
    assert_eq!(inv.orphaned_entries, 1);
    assert_eq!(inv.stale_entries, 0);
    assert_eq!(
        inv.by_owner,
        [
            OwnerInventory {
                owner: None,
                disabled: false,
                entries: 1,
                live_svids: 0
            },
            OwnerInventory {
                owner: Some("alice@example.com".into()),
                disabled: false,
                entries: 1,
                live_svids: 1
            },
            OwnerInventory {
                owner: Some("carol@example.com".into()),
                disabled: true,
                entries: 0,
                live_svids: 0
            },
        ]
    );
    assert_eq!(
        inv.by_node,
        [NodeInventory {
            spiffe_id: "spiffe://example.org/node/a".into(),
            entries: 2,
            live_svids: 1
        }]
    );
    let activity = store.entry_activity().await.unwrap();
    assert_eq!(activity[&a.id].last_issued, Some(50));
}

#[tokio::test]
async fn a_nodes_inventory_row_counts_its_node_set_aliases_entries() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let server_id = SpiffeId::new("spiffe://example.org/agentd/server").unwrap();
    let with_parent = |id: &str, parent: &SpiffeId, selector: &str| EntrySpec {
        parent_id: parent.clone(),
        selectors: vec![selector.parse().unwrap()],
        ..spec(id, None)
    };
    let alias = SpiffeId::new("spiffe://example.org/cluster/prod").unwrap();
    // The alias: nodes with the selector are in the set.
    store
        .create_entry(
            with_parent(alias.to_string().as_str(), &server_id, "join_token:prod"),
            0,
        )
        .await
        .unwrap();
    for i in 0..3 {
        store
            .create_entry(
                with_parent(
                    &format!("spiffe://example.org/prod/{i}"),
                    &alias,
                    &format!("unix:uid:{i}"),
                ),
                0,
            )
            .await
            .unwrap();
    }
    // One entry of the node's own.
    store
        .create_entry(spec("spiffe://example.org/own", None), 0)
        .await
        .unwrap();
    let node = |id: &str, selectors: &[&str]| crate::datastore::AttestedNode {
        spiffe_id: SpiffeId::new(id).unwrap(),
        attestation_type: "join_token".into(),
        serial: "1".into(),
        svid_expires_at: 10_000,
        attested_at: 0,
        last_seen_at: 0,
        selectors: selectors.iter().map(|s| s.parse().unwrap()).collect(),
        previous_serial: None,
        previous_svid_expires_at: None,
    };
    store
        .upsert_node(node("spiffe://example.org/node/a", &["join_token:prod"]))
        .await
        .unwrap();
    store
        .upsert_node(node("spiffe://example.org/node/b", &["join_token:dev"]))
        .await
        .unwrap();
    let inv = inventory(&store, &server_id, false, DEFAULT_STALE_WINDOW, 200)
        .await
        .unwrap();
    let counts: Vec<(&str, u64)> = inv
        .by_node
        .iter()
        .map(|n| (n.spiffe_id.as_str(), n.entries))
        .collect();
    // a: its own entry and the alias's three; b: in no set, nothing of its own.
    assert_eq!(
        counts,
        [
            ("spiffe://example.org/node/a", 4),
            ("spiffe://example.org/node/b", 0)
        ]
    );
}
