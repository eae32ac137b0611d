//! The limits and windows of issuance, each at its boundary: the task SVID cap, the offer
//! window, single-use join tokens, the CSR check before a token is spent, the batch cap, and
//! the reserved namespace on `entry update`.

use std::time::Duration;

use agentd_proto::node as pb;
use tokio_util::sync::CancellationToken;
use tonic::Request;

use super::issuance_tests::{
    attested, batch, csr, entry, fixture, from_node, minted, offer_req, root_grant, NODE,
};
use super::{NodeApi, MAX_BATCH};
use crate::clock::unix_seconds;
use crate::datastore::JoinToken;
use crate::server::grants::{DELEGATION_TOKEN_TTL, TASK_SVID_TTL};

const ORCH: &str = "spiffe://example.org/agent/orchestrator";
const SCHED: &str = "spiffe://example.org/agent/scheduler";

/// An X.509-SVID for a task grant lives at most five minutes, whatever the entry's TTL (an
/// hour here) and the grant's (an hour); without a task the entry's TTL applies.
#[tokio::test]
async fn a_task_svid_lives_at_most_five_minutes() {
    let dir = tempfile::tempdir().unwrap();
    let (state, _clock) = fixture(dir.path()).await;
    let api = NodeApi::new(state.clone(), CancellationToken::new());
    attested(&state, NODE, "a1", &[]).await;
    let e = entry(&state, ORCH, NODE, &["calendar:*"]).await;
    let task = root_grant(&state, ORCH, &["calendar:read"], "t-42").await;
    let plain = root_grant(&state, ORCH, &["calendar:read"], "").await;
    let now = unix_seconds(state.clock.now());
    let mut lifetimes = Vec::new();
    for grant in [&task, &plain] {
        let resp = api
            .mint_x509(from_node(
                pb::MintX509SvidsRequest {
                    params: vec![pb::X509SvidParams {
                        entry_id: e.id.to_string(),
                        csr: csr(),
                        grant_id: grant.id.to_string(),
                    }],
                },
                NODE,
                "a1",
            ))
            .await
            .unwrap();
        match &resp.get_ref().results[0].result {
            Some(pb::mint_result::Result::Svid(s)) => lifetimes.push(s.expires_at - now),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(TASK_SVID_TTL, Duration::from_secs(300));
    assert_eq!(lifetimes, [300, 3600]);
}

/// A delegation token waits at most five minutes to be redeemed, even when the offered
/// grant lives an hour: at 300 s it is refused (and the offer was not spent by trying).
#[tokio::test]
async fn a_delegation_token_expires_after_five_minutes() {
    let dir = tempfile::tempdir().unwrap();
    let (state, clock) = fixture(dir.path()).await;
    let api = NodeApi::new(state.clone(), CancellationToken::new());
    attested(&state, NODE, "a1", &[]).await;
    let orch = entry(&state, ORCH, NODE, &["calendar:*"]).await;
    let sched = entry(&state, SCHED, NODE, &["calendar:read"]).await;
    let root = root_grant(&state, ORCH, &["calendar:*"], "").await;
    let now = unix_seconds(state.clock.now());
    let offer = || {
        api.offer_delegation(from_node(
            offer_req(&orch, root.id.as_str(), 3600),
            NODE,
            "a1",
        ))
    };
    let exchange = |token: String| {
        api.exchange_delegation(from_node(
            pb::ExchangeDelegationTokenRequest {
                entry_id: sched.id.to_string(),
                token,
            },
            NODE,
            "a1",
        ))
    };
    assert_eq!(DELEGATION_TOKEN_TTL, Duration::from_secs(300));
    let late = offer().await.unwrap().into_inner();
    let in_time = offer().await.unwrap().into_inner();
    assert_eq!(late.expires_at - now, 300);
    clock.advance(Duration::from_secs(299));
    let child = exchange(in_time.token)
        .await
        .unwrap()
        .into_inner()
        .grant
        .unwrap();
    // The child grant keeps the offered hour: only the token's wait is short.
    assert_eq!(child.expires_at, now + 3600);
    clock.advance(Duration::from_secs(1));
    let err = exchange(late.token).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("expired"), "{err:?}");
}

fn join(token: &str, csr: Vec<u8>) -> Request<pb::AttestRequest> {
    Request::new(pb::AttestRequest {
        attestation: Some(pb::attest_request::Attestation::JoinToken(
            pb::JoinTokenAttestation {
                token: token.into(),
            },
        )),
        csr,
    })
}

async fn join_token(state: &crate::server::ServerState, token: &str) {
    state
        .store
        .create_join_token(JoinToken {
            token_sha256: crate::server::join_token::digest(token),
            spiffe_id: spiffe::SpiffeId::new("spiffe://example.org/node/joined").unwrap(),
            expires_at: unix_seconds(state.clock.now()) + 600,
        })
        .await
        .unwrap();
}

/// One join token presented by several nodes at the same moment attests exactly one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_join_token_presented_by_several_nodes_at_once_attests_one() {
    let dir = tempfile::tempdir().unwrap();
    let (state, _clock) = fixture(dir.path()).await;
    let api = NodeApi::new(state.clone(), CancellationToken::new());
    join_token(&state, "s3cret-token").await;
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(4));
    let mut nodes = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (api, start, csr) = (api.clone(), start.clone(), csr());
        nodes.spawn(async move {
            start.wait().await;
            api.attest_node(join("s3cret-token", csr)).await
        });
    }
    let mut ok = 0;
    let mut refused = Vec::new();
    while let Some(r) = nodes.join_next().await {
        match r.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => refused.push(e),
        }
    }
    assert_eq!(ok, 1, "{refused:?}");
    for e in refused {
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("already used"), "{e:?}");
    }
}

/// A bad CSR is refused before the join token is spent: the node can try again with a good
/// one.
#[tokio::test]
async fn the_csr_is_checked_before_a_join_token_is_spent() {
    let dir = tempfile::tempdir().unwrap();
    let (state, _clock) = fixture(dir.path()).await;
    let api = NodeApi::new(state.clone(), CancellationToken::new());
    join_token(&state, "s3cret-token").await;
    let mut bad = csr();
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    for csr in [b"not a csr".to_vec(), bad, Vec::new()] {
        let err = api
            .attest_node(join("s3cret-token", csr))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().to_lowercase().contains("csr"), "{err:?}");
    }
    api.attest_node(join("s3cret-token", csr())).await.unwrap();
}

/// At most MAX_BATCH (1000) CSRs in one call: 1000 are minted, 1001 are refused whole,
/// naming the field, with nothing signed or recorded.
#[tokio::test]
async fn a_mint_batch_holds_at_most_a_thousand_csrs() {
    let dir = tempfile::tempdir().unwrap();
    let (state, _clock) = fixture(dir.path()).await;
    let api = NodeApi::new(state.clone(), CancellationToken::new());
    attested(&state, NODE, "a1", &[]).await;
    let e = entry(&state, "spiffe://example.org/agent/x", NODE, &[]).await;
    let csr = csr();
    let now = unix_seconds(state.clock.now());
    assert_eq!(MAX_BATCH, 1000);
    let err = api
        .mint_x509(from_node(batch(&e, &csr, MAX_BATCH + 1), NODE, "a1"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("params: 1001 CSRs"), "{err:?}");
    assert!(state.store.list_issued(now).await.unwrap().is_empty());
    let resp = api
        .mint_x509(from_node(batch(&e, &csr, MAX_BATCH), NODE, "a1"))
        .await
        .unwrap();
    let (serials, errors) = minted(resp.get_ref());
    assert_eq!((serials.len(), errors.len()), (MAX_BATCH, 0));
}

/// `entry update` may not move an entry into the reserved `/agentd/` namespace (the server's
/// own identity, which node agents trust), and a refused update changes nothing.
#[tokio::test]
async fn entry_update_refuses_reserved_ids() {
    use agentd_proto::admin::admin_server::Admin as _;
    let dir = tempfile::tempdir().unwrap();
    let (state, _clock) = fixture(dir.path()).await;
    let admin = crate::server::admin::AdminApi::new(state.clone());
    let e = entry(&state, "spiffe://example.org/agent/x", NODE, &[]).await;
    for reserved in [
        "spiffe://example.org/agentd/server",
        "spiffe://example.org/agentd",
        "spiffe://example.org/agentd/anything",
    ] {
        let err = admin
            .update_entry(Request::new(agentd_proto::admin::UpdateEntryRequest {
                id: e.id.to_string(),
                spiffe_id: Some(reserved.into()),
                ..Default::default()
            }))
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            tonic::Code::InvalidArgument,
            "{reserved}: {err:?}"
        );
        assert!(
            err.message().starts_with("spiffe_id: ") && err.message().contains("reserved"),
            "{err:?}"
        );
    }
    let stored = state.store.get_entry(&e.id).await.unwrap().unwrap();
    assert_eq!(stored, e);
}

/// A node with more entries than fit one message syncs in pages: each page under the
/// budget, every entry exactly once in order, grants after the entries, the bundle on every
/// page; a token this server did not give out is refused naming the field.
#[tokio::test]
async fn a_node_with_more_entries_than_one_message_holds_syncs_in_pages() {
    let dir = tempfile::tempdir().unwrap();
    let (state, _clock) = fixture(dir.path()).await;
    let api = NodeApi::new(state.clone(), CancellationToken::new());
    attested(&state, NODE, "a1", &[]).await;
    const N: usize = 6_000;
    for i in 0..N {
        let mut spec = entry(
            &state,
            &format!("spiffe://example.org/w/{i:05}"),
            NODE,
            &["calendar:*"],
        )
        .await
        .spec;
        // Large entries, so the byte budget cuts pages as well as the item count.
        spec.hint = "h".repeat(400);
        let id = state
            .store
            .list_entries(&crate::datastore::EntryFilter {
                spiffe_id: Some(spec.spiffe_id.clone()),
                ..Default::default()
            })
            .await
            .unwrap()[0]
            .id
            .clone();
        state.store.update_entry(&id, spec).await.unwrap();
    }
    root_grant(
        &state,
        "spiffe://example.org/w/00007",
        &["calendar:read"],
        "",
    )
    .await;
    let mut token = String::new();
    let mut ids = Vec::new();
    let mut grants = Vec::new();
    let mut pages = 0;
    loop {
        let page = api
            .sync_node(from_node(
                pb::SyncEntriesRequest {
                    page_token: token.clone(),
                    ..Default::default()
                },
                NODE,
                "a1",
            ))
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(
            prost::Message::encoded_len(&page) < 3 << 20,
            "page {pages}: {} bytes",
            prost::Message::encoded_len(&page)
        );
        assert!(page.bundle.is_some(), "page {pages} without the bundle");
        assert!(
            grants.is_empty() || page.entries.is_empty(),
            "grants come after entries"
        );
        ids.extend(page.entries.into_iter().map(|e| e.spiffe_id));
        grants.extend(page.grants.into_iter().map(|g| g.agent));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert!(pages >= 2, "{pages} pages");
    let want: Vec<String> = (0..N)
        .map(|i| format!("spiffe://example.org/w/{i:05}"))
        .collect();
    assert_eq!(ids, want);
    assert_eq!(grants, ["spiffe://example.org/w/00007"]);

    let err = api
        .sync_node(from_node(
            pb::SyncEntriesRequest {
                page_token: "x\tnot-ours".into(),
                ..Default::default()
            },
            NODE,
            "a1",
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("page_token: "), "{err:?}");
}

/// A delta sync answers just the asked entries: the node's own, and as removed those of
/// another node, a deleted one and a revoked one; and the grants of an agent it serves.
#[tokio::test]
async fn a_delta_sync_answers_only_the_asked_entries_the_node_serves() {
    let dir = tempfile::tempdir().unwrap();
    let (state, _clock) = fixture(dir.path()).await;
    let api = NodeApi::new(state.clone(), CancellationToken::new());
    attested(&state, NODE, "a1", &[]).await;
    let own = entry(&state, ORCH, NODE, &["calendar:*"]).await;
    let other = entry(
        &state,
        SCHED,
        "spiffe://example.org/node/b",
        &["calendar:*"],
    )
    .await;
    let gone = entry(&state, "spiffe://example.org/agent/gone", NODE, &[]).await;
    state.store.delete_entry(&gone.id).await.unwrap();
    let revoked = entry(&state, "spiffe://example.org/agent/revoked", NODE, &[]).await;
    state
        .revocations
        .revoke(
            crate::revocation::RevocationHandle::Entry(revoked.id.clone()),
            "",
            unix_seconds(state.clock.now()),
        )
        .await
        .unwrap();
    let grant = root_grant(&state, ORCH, &["calendar:read"], "").await;
    root_grant(&state, SCHED, &["calendar:read"], "").await;
    let ids = [&own, &other, &gone, &revoked].map(|e| e.id.to_string());
    let resp = api
        .sync_node(from_node(
            pb::SyncEntriesRequest {
                entry_ids: ids.to_vec(),
                grant_agents: vec![ORCH.into(), SCHED.into()],
                ..Default::default()
            },
            NODE,
            "a1",
        ))
        .await
        .unwrap()
        .into_inner();
    let served: Vec<&str> = resp.entries.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(served, [ids[0].as_str()]);
    assert_eq!(resp.removed_entry_ids, ids[1..]);
    let grants: Vec<&str> = resp.grants.iter().map(|g| g.id.as_str()).collect();
    assert_eq!(
        grants,
        [grant.id.to_string().as_str()],
        "SCHED is not this node's"
    );
    assert!(resp.bundle.is_some() && resp.next_page_token.is_empty());
}

/// A delta whose entries would not fit one answer stops under the budget and leaves the
/// rest unanswered (neither sent nor removed), which sends the node to a whole sync.
#[tokio::test]
async fn a_delta_too_large_for_one_answer_leaves_the_rest_unanswered() {
    let dir = tempfile::tempdir().unwrap();
    let (state, _clock) = fixture(dir.path()).await;
    let api = NodeApi::new(state.clone(), CancellationToken::new());
    attested(&state, NODE, "a1", &[]).await;
    let mut ids = Vec::new();
    for i in 0..1_000 {
        let e = entry(
            &state,
            &format!("spiffe://example.org/big/{i:04}"),
            NODE,
            &[],
        )
        .await;
        let mut spec = e.spec.clone();
        spec.hint = "h".repeat(4_000);
        state.store.update_entry(&e.id, spec).await.unwrap();
        ids.push(e.id.to_string());
    }
    let resp = api
        .sync_node(from_node(
            pb::SyncEntriesRequest {
                entry_ids: ids.clone(),
                ..Default::default()
            },
            NODE,
            "a1",
        ))
        .await
        .unwrap()
        .into_inner();
    let size = prost::Message::encoded_len(&resp);
    assert!(size < 3 << 20, "{size} bytes");
    assert!(resp.removed_entry_ids.is_empty());
    assert!(
        !resp.entries.is_empty() && resp.entries.len() < ids.len(),
        "{} of {} answered",
        resp.entries.len(),
        ids.len()
    );
}
