//! The trust of issuance, through the real handlers with a real store, CA and revocation
//! log on a temp dir: what a node is handed out, and what a revocation lists. Just over 600
//! lines: the fixture here is shared with `limits_tests`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use agentd_proto::node as pb;
use spiffe::SpiffeId;
use tokio_util::sync::CancellationToken;
use tonic::Request;

use super::NodeApi;
use crate::clock::{unix_seconds, ManualClock};
use crate::datastore::{AttestedNode, Entry, EntrySpec, SledStore};
use crate::revocation::RevocationHandle;
use crate::server::ServerState;
use crate::tls::PeerIdentity;
use crate::ttl::Ttl;

pub(super) const NODE: &str = "spiffe://example.org/node/a";

/// A server state on a temp dir, and its clock.
pub(crate) async fn fixture(dir: &std::path::Path) -> (Arc<ServerState>, Arc<ManualClock>) {
    fixture_with(dir, crate::server::RawServerConfig::default()).await
}

/// [`fixture`] with other server settings (`data_dir` is the temp dir's).
pub(super) async fn fixture_with(
    dir: &std::path::Path,
    raw: crate::server::RawServerConfig,
) -> (Arc<ServerState>, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(
        std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
    ));
    let config = crate::server::ServerConfig::try_from(crate::server::RawServerConfig {
        data_dir: Some(dir.to_path_buf()),
        ..raw
    })
    .unwrap();
    let store: Arc<dyn crate::datastore::DataStore> =
        Arc::new(SledStore::open(&dir.join("datastore")).unwrap());
    let ca = crate::ca::CertificateAuthority::load_or_create(
        &crate::ca::CaConfig {
            trust_domain: config.trust_domain.clone(),
            key_dir: dir.join("keys"),
            ca_ttl: config.ca_ttl,
            upstream: None,
            organization: config.organization.clone(),
        },
        clock.as_ref(),
    )
    .unwrap();
    let audit = Arc::new(crate::audit::Audit::new(store.clone(), clock.clone(), None).unwrap());
    let revocations = Arc::new(
        crate::revocation::log::RevocationLog::open(store.clone())
            .await
            .unwrap(),
    );
    let state = Arc::new(ServerState {
        revocations,
        config,
        store,
        ca: Arc::new(ca),
        clock: clock.clone(),
        node_api_address: "127.0.0.1:0".parse().unwrap(),
        audit,
        metrics: Arc::new(crate::telemetry::ServerMetrics::new()),
        readiness: crate::telemetry::Readiness::new(&[]),
        changes: Default::default(),
        server_id: "test".into(),
        federation: Default::default(),
    });
    (state, clock)
}

/// An attested node with a current node SVID (serial `serial`) valid for an hour.
pub(super) async fn attested(
    state: &ServerState,
    id: &str,
    serial: &str,
    selectors: &[&str],
) -> AttestedNode {
    let now = unix_seconds(state.clock.now());
    let node = AttestedNode {
        spiffe_id: SpiffeId::new(id).unwrap(),
        attestation_type: "x509pop".into(),
        serial: serial.into(),
        svid_expires_at: now + 3600,
        attested_at: now,
        last_seen_at: now,
        selectors: selectors.iter().map(|s| s.parse().unwrap()).collect(),
        previous_serial: None,
        previous_svid_expires_at: None,
    };
    state.store.upsert_node(node.clone()).await.unwrap();
    node
}

pub(super) async fn entry(state: &ServerState, id: &str, parent: &str, scopes: &[&str]) -> Entry {
    state
        .store
        .create_entry(
            EntrySpec {
                resources: vec![],
                spiffe_id: SpiffeId::new(id).unwrap(),
                parent_id: SpiffeId::new(parent).unwrap(),
                selectors: vec![format!("unix:uid:{}", id.len()).parse().unwrap()],
                x509_svid_ttl: Ttl::from_secs(3600).unwrap(),
                jwt_svid_ttl: Ttl::from_secs(300).unwrap(),
                dns_names: vec![],
                hint: String::new(),
                scopes: scopes.iter().map(|s| s.to_string()).collect(),
                owner: None,
                federates_with: vec![],
            },
            0,
        )
        .await
        .unwrap()
}

/// A request as it reaches a handler over mTLS from `node` presenting serial `serial`.
pub(super) fn from_node<T>(msg: T, node: &str, serial: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.extensions_mut().insert(PeerIdentity {
        spiffe_id: Some(SpiffeId::new(node).unwrap()),
        serial: Some(serial.into()),
        ..Default::default()
    });
    r
}

pub(super) fn csr() -> Vec<u8> {
    crate::keys::PrivateKey::generate()
        .unwrap()
        .csr_der()
        .unwrap()
}

pub(super) fn batch(entry: &Entry, csr: &[u8], n: usize) -> pb::MintX509SvidsRequest {
    pb::MintX509SvidsRequest {
        params: (0..n)
            .map(|_| pb::X509SvidParams {
                entry_id: entry.id.to_string(),
                csr: csr.to_vec(),
                grant_id: String::new(),
            })
            .collect(),
    }
}

pub(super) fn jti_of(token: &str) -> String {
    crate::svid::jwt::decode_unverified(token).unwrap()["jti"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Serials of the SVIDs in a mint answer, and its per-CSR errors.
pub(super) fn minted(resp: &pb::MintX509SvidsResponse) -> (Vec<String>, Vec<String>) {
    let mut serials = Vec::new();
    let mut errors = Vec::new();
    for r in &resp.results {
        match &r.result {
            Some(pb::mint_result::Result::Svid(s)) => serials.push(s.serial.clone()),
            Some(pb::mint_result::Result::Error(e)) => errors.push(e.clone()),
            None => errors.push("empty result".into()),
        }
    }
    (serials, errors)
}

/// Mints and a `revoke node` race: batches of X.509-SVIDs and JWT-SVIDs are minted without
/// pause on several threads while the node is revoked. Every SVID handed out must be in the
/// revocation event: one signed between its standing check and its issuance record, while
/// the revocation resolved what it covers, would be valid and unlisted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_svid_minted_around_a_node_revocation_escapes_it() {
    let dir = tempfile::tempdir().unwrap();
    let (state, _clock) = fixture(dir.path()).await;
    let api = NodeApi::new(state.clone(), CancellationToken::new());
    attested(&state, NODE, "5e1", &[]).await;
    let e = entry(&state, "spiffe://example.org/agent/x", NODE, &[]).await;
    let csr = csr();
    let (first_tx, mut first_rx) = tokio::sync::mpsc::channel::<()>(8);

    let mut minters = tokio::task::JoinSet::new();
    for _ in 0..3 {
        let (api, e, csr, first) = (api.clone(), e.clone(), csr.clone(), first_tx.clone());
        minters.spawn(async move {
            let mut handed_out = Vec::new();
            // Until the node is refused: the revocation has landed.
            while let Ok(resp) = api
                .mint_x509(from_node(batch(&e, &csr, 25), NODE, "5e1"))
                .await
            {
                let (serials, errors) = minted(resp.get_ref());
                assert!(errors.is_empty(), "{errors:?}");
                handed_out.extend(serials);
                let _ = first.try_send(());
            }
            (handed_out, Vec::<String>::new())
        });
    }
    {
        let (api, e) = (api.clone(), e.clone());
        minters.spawn(async move {
            let mut jtis = Vec::new();
            while let Ok(resp) = api
                .mint_jwt(from_node(
                    pb::MintJwtSvidRequest {
                        entry_id: e.id.to_string(),
                        audience: vec!["db".into()],
                        grant_id: String::new(),
                    },
                    NODE,
                    "5e1",
                ))
                .await
            {
                jtis.push(jti_of(&resp.get_ref().token));
            }
            (Vec::new(), jtis)
        });
    }
    drop(first_tx);
    // Revoke while batches are in flight (after the first one has come back).
    first_rx.recv().await.expect("no mint batch succeeded");
    let event = state
        .revocations
        .revoke(
            RevocationHandle::Node(SpiffeId::new(NODE).unwrap()),
            "compromised",
            unix_seconds(state.clock.now()),
        )
        .await
        .unwrap();
    let listed: HashSet<&str> = event.serials.iter().map(|s| s.serial.as_str()).collect();
    let listed_jwts: HashSet<&str> = event.jwt_ids.iter().map(String::as_str).collect();
    let (mut serials, mut jtis) = (Vec::new(), Vec::new());
    let all = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(r) = minters.join_next().await {
            let (s, j) = r.unwrap();
            serials.extend(s);
            jtis.extend(j);
        }
    })
    .await;
    assert!(
        all.is_ok(),
        "minting did not stop after the node was revoked"
    );
    assert!(!serials.is_empty());
    let escaped: Vec<&String> = serials
        .iter()
        .filter(|s| !listed.contains(s.as_str()))
        .collect();
    assert!(
        escaped.is_empty(),
        "{} of {} X.509-SVIDs handed out are in no revocation event: {escaped:?}",
        escaped.len(),
        serials.len()
    );
    let escaped: Vec<&String> = jtis
        .iter()
        .filter(|j| !listed_jwts.contains(j.as_str()))
        .collect();
    assert!(escaped.is_empty(), "JWT-SVIDs not listed: {escaped:?}");
}

pub(super) const NODE_B: &str = "spiffe://example.org/node/b";
const ORCH: &str = "spiffe://example.org/agent/orchestrator";
const SCHED: &str = "spiffe://example.org/agent/scheduler";
const SERVER: &str = "spiffe://example.org/agentd/server";

pub(super) async fn root_grant(
    state: &ServerState,
    agent: &str,
    scopes: &[&str],
    task: &str,
) -> crate::datastore::Grant {
    crate::server::grants::create_root_grant(
        state,
        agentd_proto::admin::CreateGrantRequest {
            resources: vec![],
            principal: "user:alice@example.com".into(),
            agent: agent.into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            ttl_seconds: 3600,
            task_id: task.into(),
            max_depth: Some(1),
        },
    )
    .await
    .unwrap()
}

pub(super) fn offer_req(from: &Entry, grant: &str, ttl: i64) -> pb::MintDelegationTokenRequest {
    pb::MintDelegationTokenRequest {
        entry_id: from.id.to_string(),
        grant_id: grant.into(),
        to: SCHED.into(),
        scopes: vec!["calendar:read".into()],
        ttl_seconds: ttl,
    }
}

fn exchange_req(to: &Entry, token: &str) -> pb::ExchangeDelegationTokenRequest {
    pb::ExchangeDelegationTokenRequest {
        entry_id: to.id.to_string(),
        token: token.into(),
    }
}

/// A delegation token is a JWT-SVID of the delegator: revoking the delegator's entry or its
/// node lists the token, and the receiver (on another node) cannot redeem a listed token.
#[tokio::test]
async fn delegation_tokens_are_listed_by_revocations_and_refused_once_listed() {
    let dir = tempfile::tempdir().unwrap();
    let (state, _clock) = fixture(dir.path()).await;
    let api = NodeApi::new(state.clone(), CancellationToken::new());
    attested(&state, NODE, "a1", &[]).await;
    attested(&state, NODE_B, "b1", &[]).await;
    let orch = entry(&state, ORCH, NODE, &["calendar:*"]).await;
    let sched = entry(&state, SCHED, NODE_B, &["calendar:read"]).await;
    let root = root_grant(&state, ORCH, &["calendar:*"], "").await;
    let now = unix_seconds(state.clock.now());

    let handles = [
        RevocationHandle::Entry(orch.id.clone()),
        RevocationHandle::Node(SpiffeId::new(NODE).unwrap()),
    ];
    for handle in handles {
        let token = api
            .offer_delegation(from_node(
                offer_req(&orch, root.id.as_str(), 600),
                NODE,
                "a1",
            ))
            .await
            .unwrap()
            .into_inner()
            .token;
        let event = state
            .revocations
            .revoke(handle.clone(), "compromised", now)
            .await
            .unwrap();
        assert!(
            event.jwt_ids.contains(&jti_of(&token)),
            "revoking {handle} does not list the delegation token: {:?}",
            event.jwt_ids
        );
        let err = api
            .exchange_delegation(from_node(exchange_req(&sched, &token), NODE_B, "b1"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
        assert!(err.message().contains("revoked"), "{err:?}");
        // Lifted: the token is good again (it was not spent by the refusal).
        state
            .revocations
            .lift(event.sequence, "cleared", now)
            .await
            .unwrap();
        api.exchange_delegation(from_node(exchange_req(&sched, &token), NODE_B, "b1"))
            .await
            .unwrap();
    }
}

/// Two entries with one SPIFFE ID, on two nodes: a narrow one and a wide one. A grant within
/// the wide entry's scopes mints through the wide entry only; through the narrow one it is
/// refused, as a plain SVID there carries only the narrow entry's scopes.
#[tokio::test]
async fn delegated_svids_take_the_serving_entrys_ceiling() {
    let dir = tempfile::tempdir().unwrap();
    let (state, _clock) = fixture(dir.path()).await;
    let api = NodeApi::new(state.clone(), CancellationToken::new());
    attested(&state, NODE, "a1", &[]).await;
    attested(&state, NODE_B, "b1", &[]).await;
    let narrow = entry(&state, ORCH, NODE, &["calendar:read"]).await;
    let wide = entry(&state, ORCH, NODE_B, &["calendar:*"]).await;
    let grant = root_grant(&state, ORCH, &["calendar:write"], "").await;
    let csr = csr();
    let mint = |e: &Entry| pb::MintX509SvidsRequest {
        params: vec![pb::X509SvidParams {
            entry_id: e.id.to_string(),
            csr: csr.clone(),
            grant_id: grant.id.to_string(),
        }],
    };

    let resp = api
        .mint_x509(from_node(mint(&narrow), NODE, "a1"))
        .await
        .unwrap();
    let (serials, errors) = minted(resp.get_ref());
    assert!(serials.is_empty(), "minted through the narrow entry");
    assert!(
        errors[0].contains("calendar:write") && errors[0].contains("calendar:read"),
        "{errors:?}"
    );
    let resp = api
        .mint_x509(from_node(mint(&wide), NODE_B, "b1"))
        .await
        .unwrap();
    let (serials, errors) = minted(resp.get_ref());
    assert_eq!(serials.len(), 1, "{errors:?}");
    // The same for a JWT-SVID and for offering the grant on.
    let err = api
        .mint_jwt(from_node(
            pb::MintJwtSvidRequest {
                entry_id: narrow.id.to_string(),
                audience: vec!["db".into()],
                grant_id: grant.id.to_string(),
            },
            NODE,
            "a1",
        ))
        .await
        .unwrap_err();
    assert!(err.message().contains("calendar:write"), "{err:?}");
}

/// Revoking a node-set alias, by its entry or by its ID as a node: the entries parented to it
/// are withdrawn from every node in the set, are not minted while it stands, and the event
/// lists the SVIDs already minted for them.
#[tokio::test]
async fn revoking_a_node_set_alias_cascades_to_its_entries() {
    use agentd_proto::admin::admin_server::Admin as _;
    let dir = tempfile::tempdir().unwrap();
    let (state, _clock) = fixture(dir.path()).await;
    let api = NodeApi::new(state.clone(), CancellationToken::new());
    let admin = crate::server::admin::AdminApi::new(state.clone());
    let ca = "x509pop:ca:fingerprint:aa";
    attested(&state, NODE, "a1", &[ca]).await;
    let mut alias_spec = entry(&state, "spiffe://example.org/nodes/fleet", SERVER, &[])
        .await
        .spec;
    alias_spec.selectors = vec![ca.parse().unwrap()];
    let alias = state.store.create_entry(alias_spec, 0).await.unwrap();
    let workload = entry(
        &state,
        "spiffe://example.org/agent/w",
        "spiffe://example.org/nodes/fleet",
        &[],
    )
    .await;
    let csr = csr();
    let synced = |api: NodeApi| async move {
        api.sync_node(from_node(pb::SyncEntriesRequest::default(), NODE, "a1"))
            .await
            .unwrap()
            .into_inner()
            .entries
            .into_iter()
            .map(|e| e.spiffe_id)
            .collect::<Vec<_>>()
    };

    let handles = [
        ("entry", alias.id.to_string()),
        ("node", alias.spec.spiffe_id.to_string()),
    ];
    for (kind, id) in handles {
        assert!(synced(api.clone())
            .await
            .contains(&workload.spec.spiffe_id.to_string()));
        let resp = api
            .mint_x509(from_node(batch(&workload, &csr, 1), NODE, "a1"))
            .await
            .unwrap();
        let (serials, errors) = minted(resp.get_ref());
        assert_eq!(serials.len(), 1, "{errors:?}");

        let event = admin
            .revoke(Request::new(agentd_proto::admin::RevokeRequest {
                handle: Some(agentd_proto::revocation::RevocationHandle {
                    kind: kind.into(),
                    id: id.clone(),
                }),
                reason: "fleet CA compromised".into(),
            }))
            .await
            .unwrap()
            .into_inner();
        let listed: Vec<&str> = event.serials.iter().map(|s| s.serial.as_str()).collect();
        assert!(
            listed.contains(&serials[0].as_str()),
            "revoke {kind} {id} does not list the SVID minted through the alias: {listed:?}"
        );
        assert!(
            !synced(api.clone())
                .await
                .contains(&workload.spec.spiffe_id.to_string()),
            "a node still syncs an entry of the revoked alias ({kind})"
        );
        let resp = api
            .mint_x509(from_node(batch(&workload, &csr, 1), NODE, "a1"))
            .await
            .unwrap();
        let (serials, errors) = minted(resp.get_ref());
        assert!(serials.is_empty(), "minted under a revoked alias ({kind})");
        assert!(
            errors[0].contains("not authorized") || errors[0].contains("not served"),
            "{errors:?}"
        );
        state
            .revocations
            .lift(event.sequence, "rotated", unix_seconds(state.clock.now()))
            .await
            .unwrap();
    }
}

/// The server refuses to mint for a revoked entry itself, whatever the node asks: a node
/// agent that does not filter revoked entries (or a hostile one) gets no SVID and nothing is
/// recorded as issued.
#[tokio::test]
async fn a_node_asking_for_a_revoked_entry_gets_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (state, _clock) = fixture(dir.path()).await;
    let api = NodeApi::new(state.clone(), CancellationToken::new());
    attested(&state, NODE, "a1", &[]).await;
    let e = entry(&state, "spiffe://example.org/agent/x", NODE, &[]).await;
    let now = unix_seconds(state.clock.now());
    let event = state
        .revocations
        .revoke(RevocationHandle::Entry(e.id.clone()), "compromised", now)
        .await
        .unwrap();
    let resp = api
        .mint_x509(from_node(batch(&e, &csr(), 2), NODE, "a1"))
        .await
        .unwrap();
    let (serials, errors) = minted(resp.get_ref());
    assert!(serials.is_empty(), "the server minted for a revoked entry");
    assert_eq!(errors.len(), 2);
    assert!(
        errors[0].contains("revoked") && errors[0].contains(&event.sequence.to_string()),
        "{errors:?}"
    );
    let err = api
        .mint_jwt(from_node(
            pb::MintJwtSvidRequest {
                entry_id: e.id.to_string(),
                audience: vec!["db".into()],
                grant_id: String::new(),
            },
            NODE,
            "a1",
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(state.store.list_issued(now).await.unwrap().is_empty());
}

/// After a renewal the node's previous SVID is still accepted, but only until it expires: a
/// connection opened with it must not outlive it.
#[tokio::test]
async fn the_previous_node_svid_is_refused_after_it_expires() {
    let dir = tempfile::tempdir().unwrap();
    let (state, clock) = fixture(dir.path()).await;
    let api = NodeApi::new(state.clone(), CancellationToken::new());
    let mut node = attested(&state, NODE, "01d", &[]).await;
    let now = unix_seconds(state.clock.now());
    node.svid_expires_at = now + 100;
    state.store.upsert_node(node).await.unwrap();
    let renewed = api
        .renew_node(from_node(
            pb::RenewNodeSvidRequest { csr: csr() },
            NODE,
            "01d",
        ))
        .await
        .unwrap()
        .into_inner()
        .svid
        .unwrap();
    assert!(renewed.expires_at > now + 100);
    let sync =
        |serial: &str| api.sync_node(from_node(pb::SyncEntriesRequest::default(), NODE, serial));
    // Before the old SVID expires, both work.
    sync("01d").await.unwrap();
    sync(&renewed.serial).await.unwrap();
    clock.advance(Duration::from_secs(101));
    let err = sync("01d").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("01d"), "{err:?}");
    sync(&renewed.serial).await.unwrap();
}

/// A grant's unredeemed offers are bounded; they stop counting, and are pruned, when their
/// token expires (five minutes at most).
#[tokio::test]
async fn offers_per_grant_are_bounded_and_pruned_when_their_tokens_expire() {
    use crate::server::grants::{prune, DELEGATION_TOKEN_TTL, MAX_OFFERS_PER_GRANT};
    let dir = tempfile::tempdir().unwrap();
    let (state, clock) = fixture(dir.path()).await;
    let api = NodeApi::new(state.clone(), CancellationToken::new());
    attested(&state, NODE, "a1", &[]).await;
    let orch = entry(&state, ORCH, NODE, &["calendar:*"]).await;
    entry(&state, SCHED, NODE, &["calendar:read"]).await;
    let root = root_grant(&state, ORCH, &["calendar:*"], "").await;
    let offer = || {
        api.offer_delegation(from_node(
            offer_req(&orch, root.id.as_str(), 600),
            NODE,
            "a1",
        ))
    };
    for _ in 0..MAX_OFFERS_PER_GRANT {
        offer().await.unwrap();
    }
    let err = offer().await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("unredeemed offers"), "{err:?}");
    clock.advance(DELEGATION_TOKEN_TTL + Duration::from_secs(1));
    let now = unix_seconds(state.clock.now());
    assert_eq!(
        prune(state.store.as_ref(), now).await.unwrap(),
        (MAX_OFFERS_PER_GRANT, 0)
    );
    offer().await.unwrap();
    // The grant itself goes a day after it expires, not before.
    clock.advance(Duration::from_secs(3600));
    let now = unix_seconds(state.clock.now());
    assert_eq!(prune(state.store.as_ref(), now).await.unwrap(), (1, 0));
    clock.advance(crate::server::grants::EXPIRED_GRANT_RETENTION);
    let now = unix_seconds(state.clock.now());
    assert_eq!(prune(state.store.as_ref(), now).await.unwrap(), (0, 1));
    assert!(state.store.get_grant(&root.id).await.unwrap().is_none());
}
