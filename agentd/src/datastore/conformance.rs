//! The one conformance suite of the `DataStore` trait: every backend runs these same checks,
//! each on a fresh, empty store (the sled and PostgreSQL stores' test modules instantiate
//! them with [`datastore_conformance!`]). They assert what the trait promises a
//! caller, not how a backend keeps it: records round-trip, listings filter and order, a
//! single-use token is used once, sequence numbers are gap-free and never reused, and
//! concurrent writers of the revocation and audit logs still get one unbroken sequence
//! and hash chain. What only one backend has (sled's index rebuilds, its file lock) is
//! tested beside that backend.

use std::collections::BTreeSet;
use std::sync::Arc;

use spiffe::SpiffeId;

use super::{
    AttestedNode, DataStore, DataStoreError, DelegationOffer, EntryActivity, EntryFilter, EntryId,
    EntrySpec, Grant, JoinToken,
};
use crate::delegation::{Delegation, GrantId, Hop, ScopeSet};
use crate::model::audit::AuditRecord;
use crate::model::revocation::{
    DerivedFrom, IssuedSvid, RevocationAction, RevocationEvent, RevocationHandle, RevokedSerial,
    SvidKind,
};
use crate::ttl::Ttl;

pub(crate) type Store = Arc<dyn DataStore>;

/// Writers in the concurrency checks, and appends each.
const WRITERS: usize = 4;
const APPENDS: usize = 25;

fn id(s: &str) -> SpiffeId {
    SpiffeId::new(s).unwrap()
}

fn spec(spiffe_id: &str, parent: &str, selector: &str, owner: Option<&str>) -> EntrySpec {
    EntrySpec {
        resources: vec![],
        spiffe_id: id(spiffe_id),
        parent_id: id(parent),
        selectors: vec![selector.parse().unwrap()],
        x509_svid_ttl: Ttl::from_secs(3600).unwrap(),
        jwt_svid_ttl: Ttl::from_secs(300).unwrap(),
        dns_names: vec!["api.example.org".into()],
        hint: "primary".into(),
        scopes: vec!["crm:read".into()],
        owner: owner.map(str::to_string),
        federates_with: vec![spiffe::TrustDomain::new("partner.example").unwrap()],
    }
}

fn node(spiffe_id: &str, selectors: &[&str]) -> AttestedNode {
    AttestedNode {
        spiffe_id: id(spiffe_id),
        attestation_type: "join_token".into(),
        serial: "1a".into(),
        svid_expires_at: 10_000,
        attested_at: 5,
        last_seen_at: 6,
        selectors: selectors.iter().map(|s| s.parse().unwrap()).collect(),
        previous_serial: Some("19".into()),
        previous_svid_expires_at: Some(9_000),
    }
}

fn revocation(serial: &str) -> RevocationEvent {
    RevocationEvent {
        sequence: 0,
        action: RevocationAction::Revoke,
        handle: RevocationHandle::Svid(serial.into()),
        reason: "conformance".into(),
        at: 10,
        serials: vec![RevokedSerial {
            serial: serial.into(),
            authority_id: "ca1".into(),
            expires_at: 1_000,
        }],
        jwt_ids: vec![],
        expires_at: 1_000,
    }
}

fn grant(agent: &str, expires_at: i64) -> Grant {
    let grant_id = GrantId::generate();
    Grant {
        resources: vec![],
        id: grant_id.clone(),
        delegation: Delegation {
            principal: "user:alice@example.com".parse().unwrap(),
            chain: vec![Hop {
                agent: id(agent),
                grant_id,
            }],
            scopes: ScopeSet::parse(&["calendar:*"]).unwrap(),
            expires_at,
            remaining_depth: 1,
            task_id: None,
        },
        parent_grant_id: None,
        created_at: 0,
    }
}

fn paths(entries: &[super::Entry]) -> Vec<&str> {
    entries.iter().map(|e| e.spec.spiffe_id.path()).collect()
}

pub(crate) async fn entries_round_trip_with_revisions_and_duplicates(store: Store) {
    let a = store
        .create_entry(
            spec(
                "spiffe://example.org/a",
                "spiffe://example.org/node/1",
                "unix:uid:1",
                Some("alice@example.com"),
            ),
            10,
        )
        .await
        .unwrap();
    assert_eq!((a.revision, a.created_at), (1, 10));
    assert_eq!(store.get_entry(&a.id).await.unwrap().as_ref(), Some(&a));
    // A batch read: the entries that exist, each once, by id.
    let missing: EntryId = "00000000000000000000000000000000".parse().unwrap();
    let batch = store
        .get_entries(&[a.id.clone(), missing, a.id.clone()])
        .await
        .unwrap();
    assert_eq!(batch.len(), 1);
    assert_eq!(batch.get(&a.id), Some(&a));
    // The same SPIFFE ID, parent and selectors: a duplicate, however the rest differs.
    let mut same = a.spec.clone();
    same.hint = "other".into();
    match store.create_entry(same, 11).await {
        Err(DataStoreError::DuplicateEntry { id }) => assert_eq!(id, a.id.to_string()),
        other => panic!("expected DuplicateEntry, got {other:?}"),
    }
    let mut changed = a.spec.clone();
    changed.scopes = vec!["crm:write".into()];
    let updated = store.update_entry(&a.id, changed.clone()).await.unwrap();
    assert_eq!((updated.revision, updated.created_at), (2, 10));
    assert_eq!(updated.spec, changed);
    // An update may not take another entry's identity.
    let b = store
        .create_entry(
            spec(
                "spiffe://example.org/b",
                "spiffe://example.org/node/1",
                "unix:uid:2",
                None,
            ),
            12,
        )
        .await
        .unwrap();
    assert!(matches!(
        store.update_entry(&b.id, changed).await,
        Err(DataStoreError::DuplicateEntry { .. })
    ));
    let gone = store.delete_entry(&a.id).await.unwrap();
    assert_eq!(gone.id, a.id);
    assert_eq!(store.get_entry(&a.id).await.unwrap(), None);
    let missing = EntryId::generate();
    assert!(matches!(
        store.delete_entry(&missing).await,
        Err(DataStoreError::EntryNotFound { .. })
    ));
    assert!(matches!(
        store.update_entry(&missing, b.spec.clone()).await,
        Err(DataStoreError::EntryNotFound { .. })
    ));
    // Its identity is free again.
    store
        .create_entry(
            spec(
                "spiffe://example.org/a",
                "spiffe://example.org/node/1",
                "unix:uid:1",
                None,
            ),
            13,
        )
        .await
        .unwrap();
}

pub(crate) async fn entry_listings_filter_and_order_by_spiffe_id(store: Store) {
    let n1 = "spiffe://example.org/node/1";
    let n2 = "spiffe://example.org/node/2";
    for (path, parent, sel, owner) in [
        ("c", n1, "unix:uid:1", Some("alice@example.com")),
        ("a", n2, "unix:uid:1", None),
        ("b", n1, "unix:uid:2", Some("bob@example.com")),
        ("a", n1, "unix:uid:3", Some("alice@example.com")),
    ] {
        store
            .create_entry(
                spec(&format!("spiffe://example.org/{path}"), parent, sel, owner),
                0,
            )
            .await
            .unwrap();
    }
    let list = |f: EntryFilter| {
        let store = store.clone();
        async move { store.list_entries(&f).await.unwrap() }
    };
    let all = list(EntryFilter::default()).await;
    assert_eq!(
        paths(&all),
        ["/a", "/a", "/b", "/c"],
        "ordered by SPIFFE ID"
    );
    let by_parent = list(EntryFilter {
        parent_id: Some(id(n1)),
        ..Default::default()
    })
    .await;
    assert_eq!(paths(&by_parent), ["/a", "/b", "/c"]);
    let by_id = list(EntryFilter {
        spiffe_id: Some(id("spiffe://example.org/a")),
        ..Default::default()
    })
    .await;
    assert_eq!(by_id.len(), 2);
    let by_selector = list(EntryFilter {
        selector: Some("unix:uid:1".parse().unwrap()),
        ..Default::default()
    })
    .await;
    assert_eq!(paths(&by_selector), ["/a", "/c"]);
    let by_owner = list(EntryFilter {
        owner: Some("alice@example.com".into()),
        ..Default::default()
    })
    .await;
    assert_eq!(paths(&by_owner), ["/a", "/c"]);
    let combined = list(EntryFilter {
        parent_id: Some(id(n1)),
        spiffe_id: Some(id("spiffe://example.org/a")),
        owner: Some("alice@example.com".into()),
        ..Default::default()
    })
    .await;
    assert_eq!(combined.len(), 1);
    assert_eq!(combined[0].spec.parent_id, id(n1));
}

pub(crate) async fn nodes_and_join_tokens(store: Store) {
    let a = node("spiffe://example.org/node/a", &["join_token:fleet"]);
    store.upsert_node(a.clone()).await.unwrap();
    assert_eq!(store.get_node(&a.spiffe_id).await.unwrap(), Some(a.clone()));
    let mut seen = a.clone();
    seen.last_seen_at = 99;
    store.upsert_node(seen.clone()).await.unwrap();
    store
        .upsert_node(node("spiffe://example.org/node/b", &[]))
        .await
        .unwrap();
    let listed = store.list_nodes().await.unwrap();
    assert_eq!(listed.len(), 2);
    assert!(listed.contains(&seen));
    assert_eq!(store.delete_node(&a.spiffe_id).await.unwrap(), seen);
    assert!(matches!(
        store.delete_node(&a.spiffe_id).await,
        Err(DataStoreError::NodeNotFound { .. })
    ));

    // A join token is taken once, even by several takers at the same moment.
    let token = JoinToken {
        token_sha256: "ab".repeat(32),
        spiffe_id: id("spiffe://example.org/node/c"),
        expires_at: 500,
    };
    store.create_join_token(token.clone()).await.unwrap();
    let takers: Vec<_> = (0..WRITERS)
        .map(|_| {
            let store = store.clone();
            let digest = token.token_sha256.clone();
            tokio::spawn(async move { store.take_join_token(&digest).await.unwrap() })
        })
        .collect();
    let mut taken = Vec::new();
    for t in takers {
        taken.extend(t.await.unwrap());
    }
    assert_eq!(taken, [token]);
}

fn issued(kind: SvidKind, serial: &str) -> IssuedSvid {
    IssuedSvid {
        kind,
        id: serial.into(),
        spiffe_id: "spiffe://example.org/w".into(),
        entry_id: None,
        node_id: None,
        grant_chain: vec![],
        task_id: None,
        authority_id: "ca1".into(),
        expires_at: 1_000,
        derived_from: None,
    }
}

pub(crate) async fn issued_svids_are_found_by_every_handle_and_pruned(store: Store) {
    let entry = EntryId::generate();
    let node_id = id("spiffe://example.org/node/a");
    let mut delegated = issued(SvidKind::X509, "00beef");
    delegated.entry_id = Some(entry.to_string());
    delegated.node_id = Some(node_id.clone());
    delegated.grant_chain = vec!["g1".into(), "g2".into()];
    delegated.task_id = Some("t1".into());
    let mut jwt = issued(SvidKind::Jwt, "0a0a");
    jwt.entry_id = Some(entry.to_string());
    jwt.authority_id = "kid".into();
    // An access token exchanged for that JWT-SVID, signed by a newer key.
    let mut token = issued(SvidKind::AccessToken, "0b0b");
    token.authority_id = "kid2".into();
    token.derived_from = Some(DerivedFrom {
        jti: "0a0a".into(),
        key_id: "kid".into(),
    });
    let mut node_svid = issued(SvidKind::Node, "7");
    node_svid.node_id = Some(node_id.clone());
    let mut old = issued(SvidKind::X509, "99");
    old.expires_at = 50;
    old.entry_id = Some(entry.to_string());
    store
        .record_issued(&[delegated, jwt, token.clone(), node_svid, old])
        .await
        .unwrap();
    // Sorted lists, not sets: an SVID listed twice must show.
    let ids = |v: Vec<IssuedSvid>| -> Vec<String> {
        let mut ids: Vec<String> = v.into_iter().map(|s| s.id).collect();
        ids.sort();
        ids
    };
    assert_eq!(
        store.list_issued(100).await.unwrap().len(),
        4,
        "the expired one is not live"
    );
    let listed = store.list_issued(100).await.unwrap();
    assert_eq!(
        listed.iter().find(|s| s.id == "0b0b"),
        Some(&token),
        "an access token's record keeps what it was derived from"
    );
    let covered = |handles: Vec<RevocationHandle>| {
        let store = store.clone();
        async move { ids(store.list_issued_covered(&handles, 100).await.unwrap()) }
    };
    let set = |v: &[&str]| -> Vec<String> { v.iter().map(|s| s.to_string()).collect() };
    assert_eq!(
        covered(vec![RevocationHandle::Svid("beef".into())]).await,
        set(&["00beef"])
    );
    assert_eq!(
        covered(vec![RevocationHandle::Entry(entry.clone())]).await,
        set(&["00beef", "0a0a"])
    );
    assert_eq!(
        covered(vec![RevocationHandle::Node(node_id)]).await,
        set(&["00beef", "7"])
    );
    assert_eq!(
        covered(vec![RevocationHandle::Grant("g2".into())]).await,
        set(&["00beef"])
    );
    assert_eq!(
        covered(vec![RevocationHandle::Task("t1".into())]).await,
        set(&["00beef"])
    );
    assert_eq!(
        covered(vec![RevocationHandle::Authority("kid".into())]).await,
        set(&["0a0a", "0b0b"]),
        "a JWT-SVID's key covers the tokens made from it"
    );
    assert_eq!(
        covered(vec![RevocationHandle::Authority("kid2".into())]).await,
        set(&["0b0b"])
    );
    assert_eq!(
        covered(vec![RevocationHandle::Svid("a0a".into())]).await,
        set(&["0a0a", "0b0b"]),
        "a JWT-SVID's jti covers the tokens made from it"
    );
    assert_eq!(
        covered(vec![RevocationHandle::Svid("b0b".into())]).await,
        set(&["0b0b"]),
        "a token's own jti covers the token alone"
    );
    assert_eq!(
        covered(vec![
            RevocationHandle::Authority("ca1".into()),
            RevocationHandle::Entry(entry),
        ])
        .await,
        set(&["00beef", "0a0a", "7"]),
        "several handles: each SVID once"
    );
    assert_eq!(store.prune_issued(100).await.unwrap(), 1);
    assert_eq!(store.prune_issued(100).await.unwrap(), 0);
    assert_eq!(store.prune_issued(1_000).await.unwrap(), 4);
    assert!(store.list_issued(0).await.unwrap().is_empty());
}

pub(crate) async fn revocation_sequences_are_gap_free_under_concurrent_appends(store: Store) {
    revocation_appends_through(&[store]).await;
}

/// The revocation and audit checks with the writers spread over `handles`: handles of one
/// database (two servers' stores) must give one sequence and one chain as one handle does.
pub(crate) async fn appends_through_several_handles_form_one_log(handles: Vec<Store>) {
    revocation_appends_through(&handles).await;
    audit_appends_through(&handles).await;
}

async fn revocation_appends_through(handles: &[Store]) {
    let store = handles[0].clone();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = handles[w % handles.len()].clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                for i in 0..APPENDS {
                    let e = if i % 5 == 4 {
                        let batch = vec![
                            revocation(&format!("{w}b{i}")),
                            revocation(&format!("{w}c{i}")),
                        ];
                        let got = store.append_revocations(batch).await.unwrap();
                        // One batch: consecutive numbers, in the order given.
                        assert_eq!(got.len(), 2);
                        assert_eq!(got[1].sequence, got[0].sequence + 1);
                        assert_eq!(got[0].handle.id(), format!("{w}b{i}"));
                        got
                    } else {
                        vec![store
                            .append_revocation(revocation(&format!("{w}a{i}")))
                            .await
                            .unwrap()]
                    };
                    got.extend(e.into_iter().map(|e| e.sequence));
                }
                got
            })
        })
        .collect();
    let mut sequences = Vec::new();
    for w in writers {
        let got = w.await.unwrap();
        assert!(
            got.windows(2).all(|p| p[0] < p[1]),
            "one writer's appends in order"
        );
        sequences.extend(got);
    }
    sequences.sort_unstable();
    let n = sequences.len() as u64;
    assert_eq!(
        sequences,
        (1..=n).collect::<Vec<_>>(),
        "gap-free, each once"
    );
    assert_eq!(store.revocation_head().await.unwrap(), n);
    let kept = store.list_revocations().await.unwrap();
    assert_eq!(
        kept.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        (1..=n).collect::<Vec<_>>()
    );
    // Compaction removes events, never their numbers.
    store.compact_revocations(&[1, 2, n]).await.unwrap();
    assert_eq!(store.list_revocations().await.unwrap().len() as u64, n - 3);
    assert_eq!(store.revocation_head().await.unwrap(), n);
    let next = store.append_revocation(revocation("af7e5")).await.unwrap();
    assert_eq!(next.sequence, n + 1);
    assert_eq!(
        store.count_revocations().await.unwrap(),
        n - 3 + 1,
        "every kept event is a standing revocation"
    );
}

pub(crate) async fn audit_appends_from_concurrent_writers_form_one_chain(store: Store) {
    audit_appends_through(&[store]).await;
}

async fn audit_appends_through(handles: &[Store]) {
    let store = handles[0].clone();
    let key = Arc::new(crate::audit::key::AuditKey::generate());
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (store, key) = (handles[w % handles.len()].clone(), key.clone());
            tokio::spawn(async move {
                for i in 0..APPENDS {
                    let records = (0..1 + i % 3)
                        .map(|k| {
                            AuditRecord::new("conformance.write", format!("writer-{w}"))
                                .field("i", i)
                                .field("k", k)
                        })
                        .collect();
                    store
                        .append_audit(records, 100 + i as i64, key.as_ref())
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let expected: u64 = (0..APPENDS).map(|i| 1 + (i % 3) as u64).sum::<u64>() * WRITERS as u64;
    let mut records = Vec::new();
    loop {
        let after = records
            .last()
            .map_or(0, |r: &crate::model::audit::StoredAuditRecord| r.seq);
        let page = store.audit_records(after, 7).await.unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 7);
        records.extend(page);
    }
    assert_eq!(
        records.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (1..=expected).collect::<Vec<_>>(),
        "gap-free, each once"
    );
    let head = store.audit_head().await.unwrap();
    assert_eq!(head.as_ref().map(|h| h.seq), Some(expected));
    let report = crate::audit::verify_records(&records, head.as_ref(), key.as_ref());
    assert!(report.is_intact(), "{:?}", report.problem);
}

pub(crate) async fn grants_and_single_use_offers(store: Store) {
    let orchestrator = "spiffe://example.org/orchestrator";
    let live = grant(orchestrator, 1_000);
    let expired = grant(orchestrator, 10);
    let other = grant("spiffe://example.org/scheduler", 1_000);
    for g in [&live, &expired, &other] {
        store.create_grant(g.clone()).await.unwrap();
    }
    assert!(matches!(
        store.create_grant(live.clone()).await,
        Err(DataStoreError::DuplicateGrant { .. })
    ));
    assert_eq!(store.get_grant(&live.id).await.unwrap(), Some(live.clone()));
    assert_eq!(store.list_grants().await.unwrap().len(), 3);
    let mine: BTreeSet<GrantId> = store
        .list_grants_for_agent(&id(orchestrator))
        .await
        .unwrap()
        .into_iter()
        .map(|g| g.id)
        .collect();
    assert_eq!(mine, BTreeSet::from([live.id.clone(), expired.id.clone()]));
    assert_eq!(store.count_live_grants(100).await.unwrap(), 2);

    let offer = |n: u32, redeem_by| DelegationOffer {
        id: format!("{n:032x}"),
        parent_grant_id: live.id.clone(),
        from: id(orchestrator),
        to: id("spiffe://example.org/scheduler"),
        scopes: ScopeSet::parse(&["calendar:read"]).unwrap(),
        expires_at: 500,
        redeem_by,
    };
    assert!(store
        .create_delegation_offer(offer(1, 200), 2, 100)
        .await
        .unwrap());
    assert!(
        store
            .create_delegation_offer(offer(2, 50), 2, 100)
            .await
            .unwrap(),
        "an expired offer does not count"
    );
    assert!(store
        .create_delegation_offer(offer(3, 200), 2, 100)
        .await
        .unwrap());
    assert!(
        !store
            .create_delegation_offer(offer(4, 200), 2, 100)
            .await
            .unwrap(),
        "the bound"
    );
    // Taken once, even by several takers at the same moment.
    let takers: Vec<_> = (0..WRITERS)
        .map(|_| {
            let store = store.clone();
            let offer_id = offer(1, 0).id;
            tokio::spawn(async move { store.take_delegation_offer(&offer_id).await.unwrap() })
        })
        .collect();
    let mut taken = Vec::new();
    for t in takers {
        taken.extend(t.await.unwrap());
    }
    assert_eq!(taken, [offer(1, 200)]);
    let (offers, grants) = store.prune_delegation(100, 50).await.unwrap();
    assert_eq!(
        (offers, grants),
        (1, 1),
        "offer 2's token expired; the grant expired at 10"
    );
    assert_eq!(store.get_grant(&expired.id).await.unwrap(), None);
}

pub(crate) async fn owners_and_entry_activity(store: Store) {
    let e = store
        .create_entry(
            spec(
                "spiffe://example.org/a",
                "spiffe://example.org/node/1",
                "unix:uid:1",
                Some("alice@example.com"),
            ),
            0,
        )
        .await
        .unwrap();
    let key = crate::audit::key::AuditKey::generate();
    let minted = |serial: &str, expires_at| IssuedSvid {
        entry_id: Some(e.id.to_string()),
        node_id: Some(SpiffeId::new("spiffe://example.org/node/1").unwrap()),
        expires_at,
        ..issued(SvidKind::X509, serial)
    };
    // One write: the issuance records and their audit records, durable together.
    let sealed = store
        .append_issuance(
            &[minted("01", 100), minted("02", 1_000)],
            vec![
                AuditRecord::new("x509svid.issue", "node").field("serial", "01"),
                AuditRecord::new("x509svid.issue", "node").field("serial", "02"),
            ],
            50,
            &key,
        )
        .await
        .unwrap();
    assert_eq!(sealed.len(), 2);
    assert_eq!(
        store.audit_head().await.unwrap().unwrap().seq,
        sealed[1].seq
    );
    assert_eq!(
        store
            .list_issued_covered(&[RevocationHandle::Entry(e.id.clone())], 60)
            .await
            .unwrap()
            .len(),
        2,
        "what an entry revocation lists"
    );
    store.note_fetched(vec![e.id.clone()], 60).await.unwrap();
    let activity = store.entry_activity().await.unwrap();
    let a = &activity[&e.id];
    assert_eq!((a.last_issued, a.last_fetched), (Some(50), Some(60)));
    assert_eq!(
        a.live_at(200)
            .map(|l| l.serial.as_str())
            .collect::<Vec<_>>(),
        ["02"],
        "the SVID that expired at 100 is not live"
    );
    assert_eq!(a.live[1].node, "spiffe://example.org/node/1");
    assert_eq!(a.live[1].kind, "x509");
    // A delegation offer's token is on record (revocable) but is not an SVID of the entry's.
    store
        .record_issued(&[IssuedSvid {
            entry_id: Some(e.id.to_string()),
            ..issued(SvidKind::Jwt, "offer-token")
        }])
        .await
        .unwrap();
    // One entry's activity, through its handle index, is what the listing says.
    assert_eq!(&store.entry_activity_of(&e.id).await.unwrap(), a);
    assert_eq!(store.entry_activity().await.unwrap()[&e.id].live.len(), 2);
    // Records of a later mint move last_issued; pruning every record keeps it.
    store
        .append_issuance(&[minted("03", 1_500)], vec![], 70, &key)
        .await
        .unwrap();
    assert_eq!(
        store.entry_activity().await.unwrap()[&e.id].last_issued,
        Some(70)
    );
    assert_eq!(
        store.prune_issued(2_000).await.unwrap(),
        4,
        "three SVIDs and the offer token"
    );
    let a = &store.entry_activity().await.unwrap()[&e.id];
    assert_eq!((a.last_issued, a.last_fetched), (Some(70), Some(60)));
    assert_eq!(a.live.len(), 0);

    assert_eq!(store.get_owner("alice@example.com").await.unwrap(), None);
    let off = store
        .set_owner_disabled("alice@example.com", true, 70)
        .await
        .unwrap();
    assert!(off.disabled);
    assert_eq!(off.changed_at, 70);
    assert_eq!(
        store.get_owner("alice@example.com").await.unwrap(),
        Some(off.clone())
    );
    assert_eq!(store.list_owners().await.unwrap(), [off]);
    let on = store
        .set_owner_disabled("alice@example.com", false, 80)
        .await
        .unwrap();
    assert!(!on.disabled);
    // A deleted entry's activity goes with it, though its issuance records stay until
    // they expire.
    store
        .append_issuance(&[minted("04", 5_000)], vec![], 90, &key)
        .await
        .unwrap();
    store.delete_entry(&e.id).await.unwrap();
    assert!(!store.entry_activity().await.unwrap().contains_key(&e.id));
    assert_eq!(
        store.entry_activity_of(&e.id).await.unwrap(),
        EntryActivity::default()
    );
}

/// Each server's authorities: published under its id, replaced (not added to) by its next
/// publication, listed by server id with every byte and expiry kept.
pub(crate) async fn server_authorities_are_kept_per_server(store: Store) {
    use crate::bundle::JwtAuthority;
    let published = |server: &str, der: &[u8], kid: &str, at| super::ServerAuthorities {
        server_id: server.into(),
        x509_authorities: vec![der.to_vec(), vec![0, 1, 2]],
        jwt_authorities: vec![JwtAuthority {
            key_id: kid.into(),
            public_key_spki_der: vec![9; 91],
            expires_at: crate::clock::from_unix_seconds(2_000_000_000),
        }],
        sequence: u64::try_from(at).unwrap(),
        updated_at: at,
    };
    assert!(store.list_server_authorities().await.unwrap().is_empty());
    let b = published("b-server", b"b-ca", "kid-b", 10);
    let a = published("a-server", b"a-ca", "kid-a", 11);
    store.publish_server_authorities(b.clone()).await.unwrap();
    store.publish_server_authorities(a.clone()).await.unwrap();
    assert_eq!(
        store.list_server_authorities().await.unwrap(),
        [a.clone(), b.clone()]
    );
    let a2 = published("a-server", b"a-ca-rotated", "kid-a2", 12);
    store.publish_server_authorities(a2.clone()).await.unwrap();
    assert_eq!(store.list_server_authorities().await.unwrap(), [a2, b]);
}

/// The first audit key fingerprint claimed is the log's; a later claim gets it back.
pub(crate) async fn the_first_audit_key_claimed_is_kept(store: Store) {
    assert_eq!(store.claim_audit_key_id("first").await.unwrap(), "first");
    assert_eq!(store.claim_audit_key_id("second").await.unwrap(), "first");
    assert_eq!(store.claim_audit_key_id("first").await.unwrap(), "first");
}

/// A self-signed CA certificate, DER (a federated bundle's X.509 authority).
fn ca_der() -> Vec<u8> {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.self_signed(&key).unwrap().der().to_vec()
}

/// Federation relationships and federated bundles round-trip, list in trust domain order,
/// are replaced by trust domain, and deleted once.
pub(crate) async fn federations_and_federated_bundles(store: Store) {
    use crate::model::federation::{
        BundleSource, EndpointProfile, FederatedBundle, FederationRelationship,
    };
    let td = |s: &str| spiffe::TrustDomain::new(s).unwrap();
    assert!(store.list_federations().await.unwrap().is_empty());
    let web = FederationRelationship {
        trust_domain: td("web.example"),
        bundle_endpoint_url: "https://bundles.web.example/bundle".parse().unwrap(),
        profile: EndpointProfile::HttpsWeb,
        created_at: 1,
        updated_at: 1,
    };
    let mut spiffe_rel = FederationRelationship {
        trust_domain: td("partner.example"),
        bundle_endpoint_url: "https://127.0.0.1:8443".parse().unwrap(),
        profile: EndpointProfile::HttpsSpiffe {
            endpoint_spiffe_id: id("spiffe://partner.example/agentd/server"),
        },
        created_at: 2,
        updated_at: 2,
    };
    store.put_federation(&web).await.unwrap();
    store.put_federation(&spiffe_rel).await.unwrap();
    assert_eq!(
        store.list_federations().await.unwrap(),
        [spiffe_rel.clone(), web.clone()]
    );
    spiffe_rel.bundle_endpoint_url = "https://127.0.0.1:9443/b".parse().unwrap();
    spiffe_rel.updated_at = 3;
    store.put_federation(&spiffe_rel).await.unwrap();
    assert_eq!(
        store.list_federations().await.unwrap(),
        [spiffe_rel.clone(), web.clone()]
    );
    assert!(store.delete_federation(&td("web.example")).await.unwrap());
    assert!(!store.delete_federation(&td("web.example")).await.unwrap());
    assert_eq!(store.list_federations().await.unwrap(), [spiffe_rel]);

    let bundle = |name: &str, sequence: u64| FederatedBundle {
        bundle: crate::bundle::Bundle {
            trust_domain: td(name),
            x509_authorities: vec![ca_der()],
            jwt_authorities: vec![],
            sequence,
            refresh_hint: std::time::Duration::from_secs(60),
        },
        source: BundleSource::Endpoint,
        updated_at: 7,
    };
    assert!(store.list_federated_bundles().await.unwrap().is_empty());
    let z = bundle("z.example", 1);
    let a = bundle("a.example", 4);
    store.put_federated_bundle(&z).await.unwrap();
    store.put_federated_bundle(&a).await.unwrap();
    assert_eq!(
        store.list_federated_bundles().await.unwrap(),
        [a.clone(), z.clone()]
    );
    let mut a2 = bundle("a.example", 5);
    a2.source = BundleSource::Static;
    store.put_federated_bundle(&a2).await.unwrap();
    assert_eq!(
        store.list_federated_bundles().await.unwrap(),
        [a2, z.clone()]
    );
    assert!(store
        .delete_federated_bundle(&td("a.example"))
        .await
        .unwrap());
    assert!(!store
        .delete_federated_bundle(&td("a.example"))
        .await
        .unwrap());
    assert_eq!(store.list_federated_bundles().await.unwrap(), [z]);
}

/// Instantiates every check of the suite as a test, each with a fresh store from `$open`
/// (an expression giving `(guard, Store)`; the guard keeps whatever backs the store alive).
/// Multi-threaded, so the concurrent writers really run at once.
macro_rules! datastore_conformance {
    ($open:expr) => {
        $crate::datastore::conformance::datastore_conformance!(@cases $open;
            entries_round_trip_with_revisions_and_duplicates,
            entry_listings_filter_and_order_by_spiffe_id,
            nodes_and_join_tokens,
            issued_svids_are_found_by_every_handle_and_pruned,
            revocation_sequences_are_gap_free_under_concurrent_appends,
            audit_appends_from_concurrent_writers_form_one_chain,
            grants_and_single_use_offers,
            owners_and_entry_activity,
            server_authorities_are_kept_per_server,
            the_first_audit_key_claimed_is_kept,
            federations_and_federated_bundles,
        );
    };
    (@cases $open:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let (_guard, store) = $open;
                $crate::datastore::conformance::$case(store).await;
            }
        )*
    };
}
pub(crate) use datastore_conformance;
