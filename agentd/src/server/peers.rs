//! Servers sharing one store (several servers on one PostgreSQL database, one trust domain):
//! what each tells the others.
//!
//! - **Authorities.** Each server keeps its own CA and JWT keys on its own disk, never in the
//!   store; it publishes its current authorities (public parts) under its id, and merges
//!   every other server's into its bundle (SPIRE's model: the bundle is the union of all
//!   servers' authorities), so an SVID from any server verifies at every server, node and
//!   workload. Rotation, pruning and authority revocation on one server show in everyone's
//!   bundle within [`SHARE_EVERY`]. Authorities that have expired are left out, so a server
//!   taken away for good leaves the bundle when its CA would have.
//! - **Entry and grant changes.** A change committed through one server is a notice to the
//!   others ([`DataStore::notify_servers`]: PostgreSQL NOTIFY), which push it to their own
//!   node agents. The notice is a nudge: the node then reads the store through its server,
//!   and its periodic sync remains the backstop, so a lost notice costs latency only.
//!
//! On the embedded store the server is alone: it publishes to itself and hears nothing.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use spiffe::SpiffeId;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::changes::{ChangeScope, Changed};
use super::{ServerError, ServerState};
use crate::ca::PeerAuthorities;
use crate::clock::unix_seconds;
use crate::datastore::{EntryId, ServerAuthorities, MAX_SERVER_NOTICE};

/// The file in the data dir that names this server among the servers of a store.
pub const SERVER_ID_FILE: &str = "server.id";
/// How often a server publishes its authorities (when they changed) and reads its peers'.
pub const SHARE_EVERY: Duration = Duration::from_secs(1);

/// This server's id: read from `server.id` in the data dir, made (16 random bytes, hex) on
/// the first start. It is not secret; it names the server's authorities in the store and
/// its audit records.
pub fn server_id(data_dir: &Path) -> Result<String, ServerError> {
    let path = data_dir.join(SERVER_ID_FILE);
    let bad = |reason: String| ServerError::ServerId {
        path: path.display().to_string(),
        reason,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let id = text.trim();
            if id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
                Ok(id.to_ascii_lowercase())
            } else {
                Err(bad(format!(
                    "holds {:?}, expected 32 hexadecimal characters (remove the file to get a new id)",
                    id.chars().take(40).collect::<String>()
                )))
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = hex::encode(rand::random::<[u8; 16]>());
            let tmp = data_dir.join(format!(".{SERVER_ID_FILE}.tmp.{}", std::process::id()));
            (|| -> std::io::Result<()> {
                use std::io::Write as _;
                let mut file = std::fs::File::create(&tmp)?;
                file.write_all(format!("{id}\n").as_bytes())?;
                // Durable before it is in place: a crash never leaves an empty id file.
                file.sync_all()?;
                std::fs::rename(&tmp, &path)?;
                if let Ok(dir) = std::fs::File::open(data_dir) {
                    let _ = dir.sync_all();
                }
                Ok(())
            })()
            .map_err(|e| bad(e.to_string()))?;
            Ok(id)
        }
        Err(e) => Err(bad(e.to_string())),
    }
}

/// Publishes this server's authorities whenever they change (and at start), and reads the
/// other servers' into the CA every [`SHARE_EVERY`]. A store that does not answer is
/// retried at the next round: the bundle keeps what it had meanwhile.
pub async fn share_authorities(
    state: Arc<ServerState>,
    stop: CancellationToken,
) -> Result<(), ServerError> {
    let mut published: Option<u64> = None;
    let mut own_changes = state.ca.subscribe();
    loop {
        let own = state.ca.own_bundle();
        if published != Some(own.sequence) {
            let record = ServerAuthorities {
                server_id: state.server_id.clone(),
                x509_authorities: own.x509_authorities.clone(),
                jwt_authorities: own.jwt_authorities.clone(),
                sequence: own.sequence,
                updated_at: unix_seconds(state.clock.now()),
            };
            match state.store.publish_server_authorities(record).await {
                Ok(()) => published = Some(own.sequence),
                Err(e) => {
                    tracing::warn!(error = %e, "publishing this server's authorities failed; retrying")
                }
            }
        }
        match state.store.list_server_authorities().await {
            Ok(all) => {
                let peers = peer_authorities(&state.server_id, &own, all, state.clock.now());
                if state.ca.set_peer_authorities(peers) {
                    tracing::info!(
                        bundle_sequence = state.ca.bundle().sequence,
                        "the other servers' authorities changed; the bundle follows"
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading the other servers' authorities failed"),
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(SHARE_EVERY) => {}
            // Our own rotation is published at once (the peer set changing wakes this too,
            // harmlessly: the own sequence tells the two apart).
            _ = own_changes.changed() => {}
        }
    }
}

/// The authorities of every server but `me`, without those expired at `now`, each once. A
/// row that holds one of this server's own X.509 authorities is this server under an id it
/// had before (its `server.id` was replaced) and is left out too, so that an authority this
/// server revoked does not stay in its bundle through its old row.
fn peer_authorities(
    me: &str,
    own: &crate::bundle::Bundle,
    all: Vec<ServerAuthorities>,
    now: std::time::SystemTime,
) -> PeerAuthorities {
    let mut out = PeerAuthorities::default();
    for server in all.into_iter().filter(|s| {
        s.server_id != me
            && !s
                .x509_authorities
                .iter()
                .any(|der| own.x509_authorities.contains(der))
    }) {
        out.sequence += server.sequence;
        for der in server.x509_authorities {
            let live = x509_parser::parse_x509_certificate(&der)
                .map(|(_, cert)| cert.validity().not_after.timestamp() > unix_seconds(now))
                // Unparseable: left out (a relying party could not use it either).
                .unwrap_or(false);
            if live && !out.x509_authorities.contains(&der) {
                out.x509_authorities.push(der);
            }
        }
        for jwt in server.jwt_authorities {
            if jwt.expires_at > now && !out.jwt_authorities.iter().any(|j| j.key_id == jwt.key_id) {
                out.jwt_authorities.push(jwt);
            }
        }
    }
    out
}

/// A change as one server tells the others (JSON, under [`MAX_SERVER_NOTICE`] bytes).
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct ChangeNotice {
    /// The server that committed it: it ignores its own notices.
    origin: String,
    /// The parents it touches; absent: every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    parents: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    entries: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    grant_agents: Vec<String>,
    /// Only bundles changed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    bundles: bool,
}

impl ChangeNotice {
    fn of(origin: &str, scope: &ChangeScope, what: &Changed) -> Self {
        Self {
            origin: origin.to_owned(),
            parents: match scope {
                ChangeScope::All => None,
                ChangeScope::Parents(p) => Some(p.iter().map(ToString::to_string).collect()),
            },
            entries: what.entries.iter().map(ToString::to_string).collect(),
            grant_agents: what.grant_agents.iter().map(ToString::to_string).collect(),
            bundles: what.bundles,
        }
    }

    /// The notice as sent: the change itself, or, when that is too large for one
    /// notification, "every node" (a whole sync says everything a delta would).
    fn encode(&self) -> String {
        let text = serde_json::to_string(self).unwrap_or_default();
        if !text.is_empty() && text.len() <= MAX_SERVER_NOTICE {
            return text;
        }
        serde_json::to_string(&Self {
            origin: self.origin.clone(),
            parents: None,
            entries: Vec::new(),
            grant_agents: Vec::new(),
            bundles: false,
        })
        .unwrap_or_default()
    }

    /// What the notice says, checked: a notice this server cannot read means "sync
    /// everything" (it is a nudge, never the data).
    fn decode(text: &str) -> Option<(String, ChangeScope, Changed)> {
        let notice: Self = serde_json::from_str(text).ok()?;
        let scope = match notice.parents {
            None => ChangeScope::All,
            Some(p) => ChangeScope::Parents(
                p.iter()
                    .map(|s| SpiffeId::new(s).ok())
                    .collect::<Option<BTreeSet<_>>>()?,
            ),
        };
        let what = Changed {
            entries: notice
                .entries
                .iter()
                .map(|e| e.parse::<EntryId>().ok())
                .collect::<Option<Vec<_>>>()?,
            grant_agents: notice
                .grant_agents
                .iter()
                .map(|a| SpiffeId::new(a).ok())
                .collect::<Option<Vec<_>>>()?,
            bundles: notice.bundles,
        };
        Some((notice.origin, scope, what))
    }
}

/// Tells the other servers of every change committed through this one.
pub async fn forward_changes(
    state: Arc<ServerState>,
    stop: CancellationToken,
) -> Result<(), ServerError> {
    let mut changes = state.changes.subscribe();
    loop {
        let notice = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            change = changes.recv() => match change {
                Ok(c) if c.forward => ChangeNotice::of(&state.server_id, &c.scope, &c.what),
                Ok(_) => continue,
                // Fell behind: the peers' nodes sync everything.
                Err(RecvError::Lagged(_)) => {
                    ChangeNotice::of(&state.server_id, &ChangeScope::All, &Changed::default())
                }
                Err(RecvError::Closed) => return Ok(()),
            },
        };
        if let Err(e) = state.store.notify_servers(&notice.encode()).await {
            // The change is committed; the peers' nodes get it at their next sync.
            tracing::warn!(error = %e, "telling the other servers of a change failed");
        }
    }
}

/// Pushes the changes other servers committed to this server's node agents.
pub async fn follow_peer_changes(
    state: Arc<ServerState>,
    stop: CancellationToken,
) -> Result<(), ServerError> {
    let Some(mut notices) = state.store.server_notices() else {
        return Ok(());
    };
    loop {
        let text = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            notice = notices.recv() => match notice {
                Ok(text) => text,
                Err(RecvError::Lagged(_)) => String::new(),
                Err(RecvError::Closed) => return Ok(()),
            },
        };
        if text.is_empty() {
            // The listener (re)connected or this reader fell behind: notices may be lost.
            state
                .changes
                .publish_here(ChangeScope::All, Changed::default());
            continue;
        }
        match ChangeNotice::decode(&text) {
            Some((origin, _, _)) if origin == state.server_id => {}
            Some((_, scope, what)) => state.changes.publish_here(scope, what),
            None => {
                tracing::warn!(
                    notice = %text.chars().take(200).collect::<String>(),
                    "a notice from another server is unreadable; every node syncs"
                );
                state
                    .changes
                    .publish_here(ChangeScope::All, Changed::default());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::new(s).unwrap()
    }

    #[test]
    fn a_change_notice_says_the_change_and_falls_back_to_every_node_when_too_large() {
        let entry: EntryId = "ab".repeat(16).parse().unwrap();
        let scope = ChangeScope::Parents([id("spiffe://example.org/node/a")].into());
        let what = Changed {
            entries: vec![entry],
            grant_agents: vec![id("spiffe://example.org/agent")],
            bundles: false,
        };
        let text = ChangeNotice::of("s1", &scope, &what).encode();
        assert_eq!(
            ChangeNotice::decode(&text),
            Some(("s1".to_owned(), scope.clone(), what))
        );
        let many = Changed {
            entries: (0..1000)
                .map(|n| format!("{n:032x}").parse().unwrap())
                .collect(),
            grant_agents: Vec::new(),
            bundles: false,
        };
        let text = ChangeNotice::of("s1", &scope, &many).encode();
        assert!(text.len() <= MAX_SERVER_NOTICE);
        assert_eq!(
            ChangeNotice::decode(&text),
            Some(("s1".to_owned(), ChangeScope::All, Changed::default()))
        );
        // "Only the bundles" crosses to the other servers as it is.
        let bundles = Changed {
            bundles: true,
            ..Changed::default()
        };
        let text = ChangeNotice::of("s1", &ChangeScope::All, &bundles).encode();
        assert_eq!(
            ChangeNotice::decode(&text),
            Some(("s1".to_owned(), ChangeScope::All, bundles))
        );
        for bad in [
            "",
            "{}",
            r#"{"origin":"s","parents":["not an id"]}"#,
            r#"{"origin":"s","entries":["zz"]}"#,
        ] {
            assert_eq!(ChangeNotice::decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_server_keeps_its_id_and_a_bad_id_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let first = server_id(dir.path()).unwrap();
        assert_eq!(first.len(), 32);
        assert_eq!(server_id(dir.path()).unwrap(), first);
        std::fs::write(dir.path().join(SERVER_ID_FILE), "oops").unwrap();
        let err = server_id(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains(SERVER_ID_FILE) && err.contains("32 hexadecimal"),
            "{err}"
        );
    }

    fn ca_in(dir: &Path, now: std::time::SystemTime) -> crate::ca::CertificateAuthority {
        crate::ca::CertificateAuthority::load_or_create(
            &crate::ca::CaConfig {
                trust_domain: spiffe::TrustDomain::new("example.org").unwrap(),
                key_dir: dir.to_path_buf(),
                ca_ttl: Duration::from_secs(3600),
                upstream: None,
                organization: "test".into(),
            },
            &crate::clock::ManualClock::new(now),
        )
        .unwrap()
    }

    #[test]
    fn peers_are_every_other_server_without_what_expired_or_what_is_our_own() {
        use crate::bundle::JwtAuthority;
        let (theirs, ours) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let now = std::time::SystemTime::now();
        let der = ca_in(theirs.path(), now).own_bundle().x509_authorities[0].clone();
        let own = ca_in(ours.path(), now).own_bundle();
        let jwt = |kid: &str, expires_at| JwtAuthority {
            key_id: kid.into(),
            public_key_spki_der: vec![1],
            expires_at,
        };
        let server = |id: &str, x509: Vec<Vec<u8>>, jwts, sequence| ServerAuthorities {
            server_id: id.into(),
            x509_authorities: x509,
            jwt_authorities: jwts,
            sequence,
            updated_at: 0,
        };
        let later = now + Duration::from_secs(60);
        let all = vec![
            server("me", vec![b"mine".to_vec()], vec![jwt("mine", later)], 1),
            server(
                "b",
                vec![der.clone(), b"not a certificate".to_vec()],
                vec![jwt("b", later), jwt("b-old", now - Duration::from_secs(1))],
                3,
            ),
            server("c", vec![der.clone()], vec![jwt("b", later)], 4),
            // This server under an id it had before: not a peer.
            server(
                "old-me",
                own.x509_authorities.clone(),
                vec![jwt("old", later)],
                9,
            ),
        ];
        let peers = peer_authorities("me", &own, all.clone(), now);
        assert_eq!(peers.x509_authorities, [der]);
        assert_eq!(peers.jwt_authorities, [jwt("b", later)]);
        assert_eq!(peers.sequence, 3 + 4, "the peers' sequences add up");
        // Two hours on, the peer's CA (one hour) has expired.
        let peers = peer_authorities("me", &own, all, now + Duration::from_secs(7200));
        assert!(peers.x509_authorities.is_empty());
    }
}
