//! The trust of issuance, through the real handlers with a real store, CA and revocation
//! log on a temp dir: what a node is handed out, and what a revocation lists.

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
pub(super) async fn fixture(dir: &std::path::Path) -> (Arc<ServerState>, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(
        std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
    ));
    let config = crate::server::ServerConfig::try_from(crate::server::RawServerConfig {
        data_dir: Some(dir.to_path_buf()),
        ..Default::default()
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
                spiffe_id: SpiffeId::new(id).unwrap(),
                parent_id: SpiffeId::new(parent).unwrap(),
                selectors: vec![format!("unix:uid:{}", id.len()).parse().unwrap()],
                x509_svid_ttl: Ttl::from_secs(3600).unwrap(),
                jwt_svid_ttl: Ttl::from_secs(300).unwrap(),
                dns_names: vec![],
                hint: String::new(),
                scopes: scopes.iter().map(|s| s.to_string()).collect(),
                owner: None,
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
    assert!(all.is_ok(), "minting did not stop after the node was revoked");
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
