//! The `DataStore` on PostgreSQL, for several servers on one database. The documents are
//! the same JSON records the sled store keeps (`records.rs`), in a `record` column beside
//! the columns a query selects by (parent, SPIFFE ID, owner, expiry); every operation is one
//! transaction, committed before it returns.
//!
//! What several servers writing at once need, and how it is kept:
//! - gap-free, never reused revocation and audit sequence numbers, and one audit hash
//!   chain: each append locks its log's head row (`SELECT ... FOR UPDATE`), numbers after
//!   it and moves it in the same transaction;
//! - one entry per identity: a unique column on the identity hash;
//! - single-use join tokens and delegation offers: `DELETE ... RETURNING`;
//! - the per-grant offer bound: a transaction-scoped advisory lock on the grant.
//!
//! Migrations are numbered; `open` applies the missing ones under a session advisory lock,
//! so servers starting together migrate once, and refuses a database whose schema is newer
//! than this binary's.
//!
//! Over 600 lines: one implementation of the whole trait, as sled_store.rs is.

use std::collections::BTreeSet;

mod import;

use deadpool_postgres::{GenericClient, Pool};
use spiffe::SpiffeId;
use tokio_postgres::error::SqlState;

use super::records::{
    decode, encode, identity_key, ActivityRecord, EntryRecord, FederatedBundleRecord,
    FederationRecord, GrantRecord, JoinTokenRecord, NodeRecord, OfferRecord, OwnerRecord,
    ServerAuthoritiesRecord,
};
use super::revocation_records::{
    handle_prefix, issued_index_keys, issued_key, EventRecord, IssuedRecord,
};
use super::{
    AttestedNode, DataStore, DataStoreError, DelegationOffer, Entry, EntryActivity, EntryFilter,
    EntryId, EntrySpec, Grant, JoinToken, OwnerState, Result, ServerAuthorities,
};
use crate::delegation::GrantId;
use crate::model::audit::{
    AuditHead, AuditRecord, ChainSigner, SealedAuditRecord, StoredAuditRecord,
};
use crate::model::federation::{FederatedBundle, FederationRelationship};
use crate::model::revocation::{IssuedSvid, RevocationEvent, RevocationHandle};
use spiffe::TrustDomain;

/// The session advisory lock `open` migrates under (any constant; "agentd" in ASCII).
const MIGRATION_LOCK: i64 = 0x6167_656e_7464;

/// The schema, one migration per version; a database at version N has run the first N.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE entries (
    id text PRIMARY KEY,
    identity bytea NOT NULL UNIQUE,
    spiffe_id text NOT NULL,
    parent_id text NOT NULL,
    owner text,
    record text NOT NULL
);
CREATE INDEX entries_by_parent ON entries (parent_id);
CREATE INDEX entries_by_spiffe_id ON entries (spiffe_id);
CREATE INDEX entries_by_owner ON entries (owner) WHERE owner IS NOT NULL;
CREATE TABLE nodes (spiffe_id text PRIMARY KEY, record text NOT NULL);
CREATE TABLE join_tokens (token_sha256 text PRIMARY KEY, record text NOT NULL);
CREATE TABLE issued (key text PRIMARY KEY, expires_at bigint NOT NULL, record text NOT NULL);
CREATE INDEX issued_by_expiry ON issued (expires_at);
CREATE TABLE issued_by_handle (
    handle bytea NOT NULL,
    key text NOT NULL REFERENCES issued (key) ON DELETE CASCADE,
    PRIMARY KEY (handle, key)
);
CREATE INDEX issued_by_handle_key ON issued_by_handle (key);
CREATE TABLE revocations (sequence bigint PRIMARY KEY, record text NOT NULL);
CREATE TABLE log_heads (name text PRIMARY KEY, sequence bigint NOT NULL, record text);
INSERT INTO log_heads (name, sequence) VALUES ('revocations', 0), ('audit', 0);
CREATE TABLE audit (seq bigint PRIMARY KEY, body bytea NOT NULL);
CREATE TABLE entry_activity (entry_id text PRIMARY KEY, record text NOT NULL);
CREATE TABLE owners (owner text PRIMARY KEY, record text NOT NULL);
CREATE TABLE grants (id text PRIMARY KEY, agent text, expires_at bigint NOT NULL, record text NOT NULL);
CREATE INDEX grants_by_agent ON grants (agent);
CREATE TABLE delegation_offers (
    id text PRIMARY KEY,
    parent_grant_id text NOT NULL,
    redeem_by bigint NOT NULL,
    record text NOT NULL
);
CREATE INDEX offers_by_grant ON delegation_offers (parent_grant_id);
"#,
    r#"
CREATE TABLE seen_tokens (digest bytea PRIMARY KEY, until bigint NOT NULL);
"#,
    r#"
CREATE TABLE server_authorities (server_id text PRIMARY KEY, record text NOT NULL);
"#,
    r#"
CREATE TABLE federations (trust_domain text PRIMARY KEY, record text NOT NULL);
CREATE TABLE federated_bundles (trust_domain text PRIMARY KEY, record text NOT NULL);
"#,
];

/// A PostgreSQL error with what the server said (the driver's own text is often only
/// "db error").
fn pg(e: tokio_postgres::Error) -> DataStoreError {
    let reason = match e.as_db_error() {
        Some(db) => format!("postgres: {} ({})", db.message(), db.code().code()),
        None => format!("postgres: {e}"),
    };
    DataStoreError::Backend { reason }
}

/// No connection to be had: the database is down or unreachable (nothing was done).
fn pool_error(e: deadpool_postgres::PoolError) -> DataStoreError {
    let reason = match e {
        deadpool_postgres::PoolError::Backend(e) => match e.as_db_error() {
            Some(db) => db.message().to_string(),
            None => e.to_string(),
        },
        other => other.to_string(),
    };
    DataStoreError::Unavailable { reason }
}

/// How long a call waits for a connection (and a new connection for its handshake) before
/// the store reports itself unreachable.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

fn is_unique_violation(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

fn text(bytes: Vec<u8>) -> Result<String> {
    String::from_utf8(bytes).map_err(|e| DataStoreError::Backend {
        reason: format!("a record is not UTF-8: {e}"),
    })
}

/// A u64 sequence or count as PostgreSQL's bigint.
fn int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn uint(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    /// The URL without its password, for messages.
    shown: String,
    /// The URL itself, for the listener's own connection (see `revocation_signal`).
    url: std::sync::Arc<zeroize::Zeroizing<String>>,
    /// Woken by `NOTIFY agentd_revocations` (started on first use).
    revocation_signal: std::sync::Arc<std::sync::OnceLock<std::sync::Arc<tokio::sync::Notify>>>,
    /// Fed by `LISTEN agentd_notices` (started on first use); an empty notice means "some
    /// may have been missed" (the listener reconnected).
    notices: std::sync::Arc<std::sync::OnceLock<tokio::sync::broadcast::Sender<String>>>,
}

/// The channel each revocation append notifies (on commit) for the other servers.
const REVOCATIONS_CHANNEL: &str = "agentd_revocations";
/// The channel of `notify_servers` (entry and grant changes, for the servers' node streams).
const NOTICES_CHANNEL: &str = "agentd_notices";
/// Notices a slow reader may fall behind before it is told it missed some.
const NOTICE_BUFFER: usize = 1024;

/// Listens on `channel` over a connection of its own, handing each notification's payload
/// to `deliver`, and `None` once LISTEN is in place (after a start or a reconnect: anything
/// sent meanwhile was missed); reconnects after a second when the connection goes. A
/// notification lost costs latency only: every user also reads the store itself.
async fn listen(
    url: std::sync::Arc<zeroize::Zeroizing<String>>,
    shown: String,
    channel: &'static str,
    deliver: impl Fn(Option<String>) + Send + 'static,
) {
    loop {
        match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
            Ok((client, mut connection)) => {
                let listening = async {
                    client.batch_execute(&format!("LISTEN {channel}")).await?;
                    // Something may have been committed before LISTEN took effect.
                    deliver(None);
                    std::future::pending::<std::result::Result<(), tokio_postgres::Error>>().await
                };
                let messages = async {
                    while let Some(message) =
                        std::future::poll_fn(|cx| connection.poll_message(cx)).await
                    {
                        match message {
                            Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                                deliver(Some(n.payload().to_owned()))
                            }
                            Ok(_) => {}
                            Err(e) => return e.to_string(),
                        }
                    }
                    "closed".to_string()
                };
                tokio::select! {
                    r = listening => if let Err(e) = r {
                        tracing::warn!(database = %shown, error = %pg(e), "LISTEN failed; retrying");
                    },
                    why = messages => {
                        tracing::warn!(database = %shown, reason = %why, "the notification connection ended; reconnecting");
                    }
                }
            }
            Err(e) => {
                tracing::debug!(database = %shown, error = %pg(e), "no notification connection; retrying");
            }
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").field("url", &self.shown).finish()
    }
}

/// `postgres://user:secret@host/db` as `postgres://user@host/db`.
pub(crate) fn without_password(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let mut shown = match (base.find("://"), base.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &base[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}{}", &base[..scheme + 3], &base[at..])
        }
        _ => base.to_string(),
    };
    if let Some(query) = query {
        // `?password=...` is a password too.
        let kept: Vec<&str> = query
            .split('&')
            .filter(|p| !p.to_ascii_lowercase().starts_with("password="))
            .collect();
        if !kept.is_empty() {
            shown.push('?');
            shown.push_str(&kept.join("&"));
        }
    }
    shown
}

impl PgStore {
    /// Connects to `url` (`postgres://user@host:port/db`), migrates the schema under the
    /// migration lock, and checks the database answers.
    pub async fn open(url: &str) -> Result<Self> {
        let shown = without_password(url);
        let mut cfg = deadpool_postgres::Config::new();
        cfg.url = Some(url.to_string());
        cfg.manager = Some(deadpool_postgres::ManagerConfig {
            // Verified before reuse: a connection the database dropped (a restart) is
            // replaced, so the store recovers by itself when the database is back.
            recycling_method: deadpool_postgres::RecyclingMethod::Verified,
        });
        cfg.connect_timeout = Some(CONNECT_TIMEOUT);
        cfg.pool = Some(deadpool_postgres::PoolConfig {
            timeouts: deadpool_postgres::Timeouts {
                wait: Some(CONNECT_TIMEOUT),
                create: Some(CONNECT_TIMEOUT),
                recycle: Some(CONNECT_TIMEOUT),
            },
            ..Default::default()
        });
        let pool = cfg
            .create_pool(
                Some(deadpool_postgres::Runtime::Tokio1),
                tokio_postgres::NoTls,
            )
            .map_err(|e| DataStoreError::Backend {
                reason: format!("datastore url {shown}: {e}"),
            })?;
        let store = Self {
            pool,
            shown,
            url: std::sync::Arc::new(zeroize::Zeroizing::new(url.to_string())),
            revocation_signal: Default::default(),
            notices: Default::default(),
        };
        store.migrate().await?;
        Ok(store)
    }

    /// The database's URL without its password, for messages.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// Creates or replaces `(key, record)` in a two-column table keyed by `trust_domain`
    /// (the federation tables; `table` is one of ours, never input).
    async fn put_keyed(&self, table: &'static str, key: &str, record: &str) -> Result<()> {
        self.client()
            .await?
            .execute(
                &format!(
                    "INSERT INTO {table} (trust_domain, record) VALUES ($1, $2)
                     ON CONFLICT (trust_domain) DO UPDATE SET record = EXCLUDED.record"
                ),
                &[&key, &record],
            )
            .await
            .map_err(pg)?;
        Ok(())
    }

    async fn list_keyed(&self, table: &'static str) -> Result<Vec<(String, String)>> {
        let rows = self
            .client()
            .await?
            .query(
                &format!(
                    "SELECT trust_domain, record FROM {table} ORDER BY trust_domain COLLATE \"C\""
                ),
                &[],
            )
            .await
            .map_err(pg)?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    async fn delete_keyed(&self, table: &'static str, key: &str) -> Result<bool> {
        let n = self
            .client()
            .await?
            .execute(
                &format!("DELETE FROM {table} WHERE trust_domain = $1"),
                &[&key],
            )
            .await
            .map_err(pg)?;
        Ok(n > 0)
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.pool.get().await.map_err(|e| match pool_error(e) {
            DataStoreError::Unavailable { reason } => DataStoreError::Unavailable {
                reason: format!("{}: {reason}", self.shown),
            },
            other => other,
        })
    }

    /// Every missing migration, in one transaction on one connection, under a
    /// transaction-scoped advisory lock: servers starting together migrate once, and a
    /// start cancelled halfway leaves neither a half-applied schema nor a held lock.
    async fn migrate(&self) -> Result<()> {
        let mut conn = self.client().await?;
        let tx = conn.transaction().await.map_err(pg)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(pg)?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS agentd_schema (version integer NOT NULL)")
            .await
            .map_err(pg)?;
        let version: i32 = match tx
            .query_opt("SELECT version FROM agentd_schema", &[])
            .await
            .map_err(pg)?
        {
            Some(row) => row.get(0),
            None => 0,
        };
        let known = i32::try_from(MIGRATIONS.len()).unwrap_or(i32::MAX);
        if version > known {
            return Err(DataStoreError::Backend {
                reason: format!(
                    "the database {} has schema version {version}, newer than this agentd's {known}: upgrade agentd, or point it at another database",
                    self.shown
                ),
            });
        }
        for (n, sql) in (1..)
            .zip(MIGRATIONS)
            .skip(usize::try_from(version).unwrap_or(0))
        {
            tx.batch_execute(sql).await.map_err(pg)?;
            tracing::info!(version = n, database = %self.shown, "datastore schema migrated");
        }
        if version < known {
            tx.execute("DELETE FROM agentd_schema", &[])
                .await
                .map_err(pg)?;
            tx.execute("INSERT INTO agentd_schema (version) VALUES ($1)", &[&known])
                .await
                .map_err(pg)?;
        }
        tx.commit().await.map_err(pg)
    }

    /// The entry id that holds `spec`'s identity, if any.
    async fn entry_with_identity(
        &self,
        client: &impl GenericClient,
        spec: &EntrySpec,
    ) -> Result<Option<String>> {
        Ok(client
            .query_opt(
                "SELECT id FROM entries WHERE identity = $1",
                &[&identity_key(spec).as_slice()],
            )
            .await
            .map_err(pg)?
            .map(|r| r.get(0)))
    }

    async fn get_entry_in(
        &self,
        client: &impl GenericClient,
        id: &EntryId,
    ) -> Result<Option<Entry>> {
        match client
            .query_opt(
                "SELECT record FROM entries WHERE id = $1 FOR UPDATE",
                &[&id.as_str()],
            )
            .await
            .map_err(pg)?
        {
            None => Ok(None),
            Some(row) => {
                let record: String = row.get(0);
                let key = id.as_str().as_bytes();
                Ok(Some(
                    decode::<EntryRecord>(key, record.as_bytes())?.into_entry(key)?,
                ))
            }
        }
    }

    async fn note_activity(&self, updates: Vec<(String, ActivityUpdate)>) -> Result<()> {
        // A handful of statements for the whole batch (not four per entry): the minting
        // path notes a batch of up to 100 entries at once.
        let mut ids: Vec<String> = updates.iter().map(|(id, _)| id.clone()).collect();
        ids.sort();
        ids.dedup();
        let mut conn = self.client().await?;
        let tx = conn.transaction().await.map_err(pg)?;
        // An entry deleted meanwhile keeps no activity. Rows are locked in id order, one
        // order for every server, so two never deadlock.
        let live: Vec<String> = tx
            .query(
                "SELECT id FROM entries WHERE id = ANY($1) ORDER BY id COLLATE \"C\" FOR SHARE",
                &[&ids],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if live.is_empty() {
            return tx.commit().await.map_err(pg);
        }
        // The rows first, so that the lock below holds even for an entry's first activity
        // (two servers' first notes would otherwise both start empty).
        let empty = text(encode(&ActivityRecord::default())?)?;
        tx.execute(
            "INSERT INTO entry_activity (entry_id, record) SELECT unnest($1::text[]), $2
             ON CONFLICT (entry_id) DO NOTHING",
            &[&live, &empty],
        )
        .await
        .map_err(pg)?;
        let mut records = std::collections::BTreeMap::new();
        for row in tx
            .query(
                "SELECT entry_id, record FROM entry_activity WHERE entry_id = ANY($1)
                 ORDER BY entry_id COLLATE \"C\" FOR UPDATE",
                &[&live],
            )
            .await
            .map_err(pg)?
        {
            let id: String = row.get(0);
            let r: String = row.get(1);
            let record: ActivityRecord = decode(id.as_bytes(), r.as_bytes())?;
            records.insert(id, record);
        }
        for (id, update) in updates {
            if let Some(record) = records.get_mut(&id) {
                update(record);
            }
        }
        let mut written_ids = Vec::with_capacity(records.len());
        let mut written = Vec::with_capacity(records.len());
        for (id, record) in &records {
            written_ids.push(id.clone());
            written.push(text(encode(record)?)?);
        }
        tx.execute(
            "UPDATE entry_activity AS a SET record = u.record
             FROM unnest($1::text[], $2::text[]) AS u(entry_id, record)
             WHERE a.entry_id = u.entry_id",
            &[&written_ids, &written],
        )
        .await
        .map_err(pg)?;
        tx.commit().await.map_err(pg)
    }
}

/// The issuance records of `svids` (with `issued_at` for workload mints) and their handle
/// index rows, in `tx`.
async fn insert_issued(
    tx: &deadpool_postgres::Transaction<'_>,
    svids: &[IssuedSvid],
    issued_at: Option<i64>,
) -> Result<()> {
    if svids.is_empty() {
        return Ok(());
    }
    // Two statements for the batch; one row per key (the last record of a key given
    // twice), since one statement may not update a row twice.
    let mut rows = std::collections::BTreeMap::new();
    let mut handles = Vec::new();
    let mut handle_keys = Vec::new();
    for svid in svids {
        let key = issued_key(svid.kind, &svid.id);
        let key_text = text(key.clone())?;
        let record = match issued_at {
            Some(at) => IssuedRecord::issued_at(svid, at),
            None => IssuedRecord::from_issued(svid),
        };
        let record = text(encode(&record)?)?;
        for index_key in issued_index_keys(svid, &key) {
            handles.push(index_key[..index_key.len() - key.len()].to_vec());
            handle_keys.push(key_text.clone());
        }
        rows.insert(key_text, (svid.expires_at, record));
    }
    let mut keys = Vec::with_capacity(rows.len());
    let mut expiries = Vec::with_capacity(rows.len());
    let mut records = Vec::with_capacity(rows.len());
    for (key, (expires_at, record)) in rows {
        keys.push(key);
        expiries.push(expires_at);
        records.push(record);
    }
    tx.execute(
        "INSERT INTO issued (key, expires_at, record)
             SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[])
             ON CONFLICT (key) DO UPDATE SET expires_at = EXCLUDED.expires_at,
             record = EXCLUDED.record",
        &[&keys, &expiries, &records],
    )
    .await
    .map_err(pg)?;
    tx.execute(
        "INSERT INTO issued_by_handle (handle, key)
             SELECT * FROM unnest($1::bytea[], $2::text[]) ON CONFLICT DO NOTHING",
        &[&handles, &handle_keys],
    )
    .await
    .map_err(pg)?;
    Ok(())
}

/// Seals `records` after the audit head and stores them with the new head, in `tx`.
async fn seal_audit(
    tx: &deadpool_postgres::Transaction<'_>,
    records: &[AuditRecord],
    time: i64,
    signer: &dyn ChainSigner,
) -> Result<Vec<SealedAuditRecord>> {
    // The head row's lock orders appends from every server: one chain.
    let row = tx
        .query_one(
            "SELECT record FROM log_heads WHERE name = 'audit' FOR UPDATE",
            &[],
        )
        .await
        .map_err(pg)?;
    let head: Option<AuditHead> = match row.get::<_, Option<String>>(0) {
        None => None,
        Some(r) => Some(decode(b"audit head", r.as_bytes())?),
    };
    let (sealed, head) = crate::model::audit::seal_after(head.as_ref(), records, time, signer);
    // One statement for the batch.
    let seqs: Vec<i64> = sealed.iter().map(|s| int(s.seq)).collect();
    let bodies = sealed.iter().map(encode).collect::<Result<Vec<_>>>()?;
    tx.execute(
        "INSERT INTO audit (seq, body) SELECT * FROM unnest($1::bigint[], $2::bytea[])",
        &[&seqs, &bodies],
    )
    .await
    .map_err(pg)?;
    tx.execute(
        "UPDATE log_heads SET sequence = $1, record = $2 WHERE name = 'audit'",
        &[&int(head.seq), &text(encode(&head)?)?],
    )
    .await
    .map_err(pg)?;
    Ok(sealed)
}

fn decode_entry(id: &str, record: &str) -> Result<Entry> {
    decode::<EntryRecord>(id.as_bytes(), record.as_bytes())?.into_entry(id.as_bytes())
}

fn decode_grant(id: &str, record: &str) -> Result<Grant> {
    decode::<GrantRecord>(id.as_bytes(), record.as_bytes())?.into_grant(id.as_bytes())
}

fn decode_node(id: &str, record: &str) -> Result<AttestedNode> {
    decode::<NodeRecord>(id.as_bytes(), record.as_bytes())?.into_node(id.as_bytes())
}

fn decode_issued(key: &str, record: &str) -> Result<IssuedSvid> {
    decode::<IssuedRecord>(key.as_bytes(), record.as_bytes())?.into_issued(key.as_bytes())
}

/// An entry's columns: id, identity hash, SPIFFE ID, parent, owner, record.
struct EntryRow {
    id: String,
    identity: Vec<u8>,
    spiffe_id: String,
    parent_id: String,
    owner: Option<String>,
    record: String,
}

fn event_of_row(row: &tokio_postgres::Row) -> Result<RevocationEvent> {
    let seq: i64 = row.get(0);
    let key = seq.to_string();
    let record: &str = row.get(1);
    decode::<EventRecord>(key.as_bytes(), record.as_bytes())?.into_event(key.as_bytes())
}

fn entry_row(entry: &Entry) -> Result<EntryRow> {
    Ok(EntryRow {
        id: entry.id.to_string(),
        identity: identity_key(&entry.spec).to_vec(),
        spiffe_id: entry.spec.spiffe_id.to_string(),
        parent_id: entry.spec.parent_id.to_string(),
        owner: entry.spec.owner.clone(),
        record: text(encode(&EntryRecord::from_entry(entry))?)?,
    })
}

/// A change to one entry's activity record, made under its row lock.
type ActivityUpdate = Box<dyn FnOnce(&mut ActivityRecord) + Send>;

/// The claims attestor's used token ids in the database, shared by every server: a platform
/// token one server accepted is refused by all, across restarts. The node API runs the
/// attestor on the blocking pool, so this waits for the database on the runtime it came from.
#[derive(Debug)]
struct PgSeenTokens {
    store: PgStore,
    runtime: tokio::runtime::Handle,
}

impl PgSeenTokens {
    async fn first_use_async(
        &self,
        digest: Vec<u8>,
        until: i64,
        now: i64,
    ) -> std::result::Result<(), agentd_attestor::node::SeenError> {
        use agentd_attestor::node::SeenError;
        let store_err = |e: DataStoreError| SeenError::Store {
            reason: e.to_string(),
        };
        let client = self.store.client().await.map_err(store_err)?;
        let live: i64 = client
            .query_one("SELECT count(*) FROM seen_tokens WHERE until > $1", &[&now])
            .await
            .map_err(|e| store_err(pg(e)))?
            .get(0);
        if uint(live) >= super::seen_tokens::MAX_SEEN as u64 {
            client
                .execute("DELETE FROM seen_tokens WHERE until <= $1", &[&now])
                .await
                .map_err(|e| store_err(pg(e)))?;
            return Err(SeenError::Full);
        }
        // Inserted, or an expired id taken again: a row back. A live one: none.
        let first = client
            .query_opt(
                "INSERT INTO seen_tokens (digest, until) VALUES ($1, $2)
                 ON CONFLICT (digest) DO UPDATE SET until = EXCLUDED.until
                 WHERE seen_tokens.until <= $3
                 RETURNING 1",
                &[&digest, &until, &now],
            )
            .await
            .map_err(|e| store_err(pg(e)))?;
        match first {
            Some(_) => Ok(()),
            None => Err(SeenError::Replayed),
        }
    }
}

impl agentd_attestor::node::SeenTokens for PgSeenTokens {
    fn first_use(
        &self,
        id: &str,
        until: i64,
        now: i64,
    ) -> std::result::Result<(), agentd_attestor::node::SeenError> {
        let digest = ring::digest::digest(&ring::digest::SHA256, id.as_bytes())
            .as_ref()
            .to_vec();
        let wait = || {
            self.runtime
                .block_on(self.first_use_async(digest, until, now))
        };
        match tokio::runtime::Handle::try_current() {
            // A worker thread (or a blocking one, where this is a plain call).
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(wait)
            }
            Ok(_) => Err(agentd_attestor::node::SeenError::Store {
                reason: "the PostgreSQL token id store needs a multi-threaded runtime".into(),
            }),
            Err(_) => wait(),
        }
    }
}

#[async_trait::async_trait]
impl DataStore for PgStore {
    fn revocation_signal(&self) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        Some(
            self.revocation_signal
                .get_or_init(|| {
                    let signal = std::sync::Arc::new(tokio::sync::Notify::new());
                    let wake = signal.clone();
                    runtime.spawn(listen(
                        self.url.clone(),
                        self.shown.clone(),
                        REVOCATIONS_CHANNEL,
                        move |_| wake.notify_one(),
                    ));
                    signal
                })
                .clone(),
        )
    }

    async fn notify_servers(&self, notice: &str) -> Result<()> {
        if notice.is_empty() || notice.len() > super::MAX_SERVER_NOTICE {
            return Err(DataStoreError::Backend {
                reason: format!(
                    "a server notice is 1 to {} bytes, not {}",
                    super::MAX_SERVER_NOTICE,
                    notice.len()
                ),
            });
        }
        self.client()
            .await?
            .execute("SELECT pg_notify($1, $2)", &[&NOTICES_CHANNEL, &notice])
            .await
            .map_err(pg)?;
        Ok(())
    }

    fn server_notices(&self) -> Option<tokio::sync::broadcast::Receiver<String>> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        Some(
            self.notices
                .get_or_init(|| {
                    let (tx, _) = tokio::sync::broadcast::channel(NOTICE_BUFFER);
                    let feed = tx.clone();
                    runtime.spawn(listen(
                        self.url.clone(),
                        self.shown.clone(),
                        NOTICES_CHANNEL,
                        move |payload| {
                            // No reader yet is not an error.
                            let _ = feed.send(payload.unwrap_or_default());
                        },
                    ));
                    tx
                })
                .subscribe(),
        )
    }

    async fn publish_server_authorities(&self, published: ServerAuthorities) -> Result<()> {
        let record = text(encode(&ServerAuthoritiesRecord::from_published(
            &published,
        ))?)?;
        self.client()
            .await?
            .execute(
                "INSERT INTO server_authorities (server_id, record) VALUES ($1, $2)
                 ON CONFLICT (server_id) DO UPDATE SET record = EXCLUDED.record",
                &[&published.server_id, &record],
            )
            .await
            .map_err(pg)?;
        Ok(())
    }

    async fn list_server_authorities(&self) -> Result<Vec<ServerAuthorities>> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT server_id, record FROM server_authorities ORDER BY server_id COLLATE \"C\"",
                &[],
            )
            .await
            .map_err(pg)?;
        rows.iter()
            .map(|row| {
                let id: String = row.get(0);
                let record: &str = row.get(1);
                let parsed: ServerAuthoritiesRecord = decode(id.as_bytes(), record.as_bytes())?;
                let key = id.clone();
                parsed.into_published(key.as_bytes(), id)
            })
            .collect()
    }

    async fn put_federation(&self, relationship: &FederationRelationship) -> Result<()> {
        let record = text(encode(&FederationRecord::from_relationship(relationship))?)?;
        self.put_keyed("federations", relationship.trust_domain.as_str(), &record)
            .await
    }

    async fn list_federations(&self) -> Result<Vec<FederationRelationship>> {
        self.list_keyed("federations")
            .await?
            .into_iter()
            .map(|(key, record)| {
                decode::<FederationRecord>(key.as_bytes(), record.as_bytes())?
                    .into_relationship(key.as_bytes())
            })
            .collect()
    }

    async fn delete_federation(&self, trust_domain: &TrustDomain) -> Result<bool> {
        self.delete_keyed("federations", trust_domain.as_str())
            .await
    }

    async fn put_federated_bundle(&self, bundle: &FederatedBundle) -> Result<()> {
        let record = text(encode(&FederatedBundleRecord::from_bundle(bundle))?)?;
        self.put_keyed(
            "federated_bundles",
            bundle.bundle.trust_domain.as_str(),
            &record,
        )
        .await
    }

    async fn list_federated_bundles(&self) -> Result<Vec<FederatedBundle>> {
        self.list_keyed("federated_bundles")
            .await?
            .into_iter()
            .map(|(key, record)| {
                decode::<FederatedBundleRecord>(key.as_bytes(), record.as_bytes())?
                    .into_bundle(key.as_bytes())
            })
            .collect()
    }

    async fn delete_federated_bundle(&self, trust_domain: &TrustDomain) -> Result<bool> {
        self.delete_keyed("federated_bundles", trust_domain.as_str())
            .await
    }

    async fn ping(&self) -> Result<()> {
        let client = self.client().await?;
        client
            .execute("SELECT 1", &[])
            .await
            .map(|_| ())
            .map_err(|e| DataStoreError::Unavailable {
                reason: format!("{}: {}", self.shown, pg(e)),
            })
    }

    fn seen_tokens(&self) -> Option<std::sync::Arc<dyn agentd_attestor::node::SeenTokens>> {
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => Some(std::sync::Arc::new(PgSeenTokens {
                store: self.clone(),
                runtime,
            })),
            Err(_) => {
                tracing::warn!("no runtime: used platform token ids are kept in memory only");
                None
            }
        }
    }

    async fn create_entry(&self, spec: EntrySpec, now: i64) -> Result<Entry> {
        let entry = Entry {
            id: EntryId::generate(),
            spec,
            revision: 1,
            created_at: now,
        };
        let EntryRow {
            id,
            identity,
            spiffe_id,
            parent_id,
            owner,
            record,
        } = entry_row(&entry)?;
        let client = self.client().await?;
        match client
            .execute(
                "INSERT INTO entries (id, identity, spiffe_id, parent_id, owner, record)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[&id, &identity, &spiffe_id, &parent_id, &owner, &record],
            )
            .await
        {
            Ok(_) => Ok(entry),
            Err(e) if is_unique_violation(&e) => Err(DataStoreError::DuplicateEntry {
                id: self
                    .entry_with_identity(&client, &entry.spec)
                    .await?
                    .unwrap_or_default(),
            }),
            Err(e) => Err(pg(e)),
        }
    }

    async fn get_entry(&self, id: &EntryId) -> Result<Option<Entry>> {
        let client = self.client().await?;
        match client
            .query_opt("SELECT record FROM entries WHERE id = $1", &[&id.as_str()])
            .await
            .map_err(pg)?
        {
            None => Ok(None),
            Some(row) => Ok(Some(decode_entry(id.as_str(), row.get(0))?)),
        }
    }

    async fn get_entries(
        &self,
        ids: &[EntryId],
    ) -> Result<std::collections::HashMap<EntryId, Entry>> {
        let wanted: Vec<&str> = ids.iter().map(EntryId::as_str).collect();
        let rows = self
            .client()
            .await?
            .query(
                "SELECT id, record FROM entries WHERE id = ANY($1)",
                &[&wanted],
            )
            .await
            .map_err(pg)?;
        rows.iter()
            .map(|row| {
                let entry = decode_entry(row.get(0), row.get(1))?;
                Ok((entry.id.clone(), entry))
            })
            .collect()
    }

    async fn list_entries(&self, filter: &EntryFilter) -> Result<Vec<Entry>> {
        let client = self.client().await?;
        let parent = filter.parent_id.as_ref().map(ToString::to_string);
        let spiffe_id = filter.spiffe_id.as_ref().map(ToString::to_string);
        // The columns narrow through their indexes; `matches` decides (the selector too).
        let rows = client
            .query(
                "SELECT id, record FROM entries
                 WHERE ($1::text IS NULL OR parent_id = $1)
                   AND ($2::text IS NULL OR spiffe_id = $2)
                   AND ($3::text IS NULL OR owner = $3)",
                &[&parent, &spiffe_id, &filter.owner],
            )
            .await
            .map_err(pg)?;
        let mut entries = Vec::with_capacity(rows.len());
        for row in rows {
            let e = decode_entry(row.get(0), row.get(1))?;
            if filter.matches(&e) {
                entries.push(e);
            }
        }
        entries.sort_by(|a, b| (&a.spec.spiffe_id, &a.id).cmp(&(&b.spec.spiffe_id, &b.id)));
        Ok(entries)
    }

    async fn update_entry(&self, id: &EntryId, spec: EntrySpec) -> Result<Entry> {
        let mut conn = self.client().await?;
        let tx = conn.transaction().await.map_err(pg)?;
        let current = self
            .get_entry_in(&tx, id)
            .await?
            .ok_or_else(|| DataStoreError::EntryNotFound { id: id.to_string() })?;
        if let Some(other) = self.entry_with_identity(&tx, &spec).await? {
            if other != id.as_str() {
                return Err(DataStoreError::DuplicateEntry { id: other });
            }
        }
        let updated = Entry {
            id: current.id,
            spec,
            revision: current.revision + 1,
            created_at: current.created_at,
        };
        let EntryRow {
            id: id_s,
            identity,
            spiffe_id,
            parent_id,
            owner,
            record,
        } = entry_row(&updated)?;
        match tx
            .execute(
                "UPDATE entries SET identity = $2, spiffe_id = $3, parent_id = $4, owner = $5,
                 record = $6 WHERE id = $1",
                &[&id_s, &identity, &spiffe_id, &parent_id, &owner, &record],
            )
            .await
        {
            Ok(_) => {}
            // Another server took the identity since the check above.
            Err(e) if is_unique_violation(&e) => {
                drop(tx);
                let holder = self
                    .entry_with_identity(&conn, &updated.spec)
                    .await?
                    .unwrap_or_default();
                return Err(DataStoreError::DuplicateEntry { id: holder });
            }
            Err(e) => return Err(pg(e)),
        }
        tx.commit().await.map_err(pg)?;
        Ok(updated)
    }

    async fn delete_entry(&self, id: &EntryId) -> Result<Entry> {
        let mut conn = self.client().await?;
        let tx = conn.transaction().await.map_err(pg)?;
        let row = tx
            .query_opt(
                "DELETE FROM entries WHERE id = $1 RETURNING record",
                &[&id.as_str()],
            )
            .await
            .map_err(pg)?
            .ok_or_else(|| DataStoreError::EntryNotFound { id: id.to_string() })?;
        tx.execute(
            "DELETE FROM entry_activity WHERE entry_id = $1",
            &[&id.as_str()],
        )
        .await
        .map_err(pg)?;
        tx.commit().await.map_err(pg)?;
        decode_entry(id.as_str(), row.get(0))
    }

    async fn upsert_node(&self, node: AttestedNode) -> Result<()> {
        let key = node.spiffe_id.to_string();
        let record = text(encode(&NodeRecord::from_node(&node))?)?;
        self.client()
            .await?
            .execute(
                "INSERT INTO nodes (spiffe_id, record) VALUES ($1, $2)
                 ON CONFLICT (spiffe_id) DO UPDATE SET record = EXCLUDED.record",
                &[&key, &record],
            )
            .await
            .map_err(pg)?;
        Ok(())
    }

    async fn get_node(&self, spiffe_id: &SpiffeId) -> Result<Option<AttestedNode>> {
        let key = spiffe_id.to_string();
        match self
            .client()
            .await?
            .query_opt("SELECT record FROM nodes WHERE spiffe_id = $1", &[&key])
            .await
            .map_err(pg)?
        {
            None => Ok(None),
            Some(row) => Ok(Some(decode_node(&key, row.get(0))?)),
        }
    }

    async fn list_nodes(&self) -> Result<Vec<AttestedNode>> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT spiffe_id, record FROM nodes ORDER BY spiffe_id COLLATE \"C\"",
                &[],
            )
            .await
            .map_err(pg)?;
        rows.iter()
            .map(|r| decode_node(r.get(0), r.get(1)))
            .collect()
    }

    async fn delete_node(&self, spiffe_id: &SpiffeId) -> Result<AttestedNode> {
        let key = spiffe_id.to_string();
        let row = self
            .client()
            .await?
            .query_opt(
                "DELETE FROM nodes WHERE spiffe_id = $1 RETURNING record",
                &[&key],
            )
            .await
            .map_err(pg)?
            .ok_or_else(|| DataStoreError::NodeNotFound {
                spiffe_id: key.clone(),
            })?;
        decode_node(&key, row.get(0))
    }

    async fn create_join_token(&self, token: JoinToken) -> Result<()> {
        let record = text(encode(&JoinTokenRecord {
            spiffe_id: token.spiffe_id.to_string(),
            expires_at: token.expires_at,
        })?)?;
        self.client()
            .await?
            .execute(
                "INSERT INTO join_tokens (token_sha256, record) VALUES ($1, $2)
                 ON CONFLICT (token_sha256) DO UPDATE SET record = EXCLUDED.record",
                &[&token.token_sha256, &record],
            )
            .await
            .map_err(pg)?;
        Ok(())
    }

    async fn take_join_token(&self, token_sha256: &str) -> Result<Option<JoinToken>> {
        let Some(row) = self
            .client()
            .await?
            .query_opt(
                "DELETE FROM join_tokens WHERE token_sha256 = $1 RETURNING record",
                &[&token_sha256],
            )
            .await
            .map_err(pg)?
        else {
            return Ok(None);
        };
        let key = token_sha256.as_bytes();
        let record: String = row.get(0);
        let r: JoinTokenRecord = decode(key, record.as_bytes())?;
        Ok(Some(JoinToken {
            token_sha256: token_sha256.to_string(),
            spiffe_id: SpiffeId::new(&r.spiffe_id)
                .map_err(|e| super::records::corrupt(key, "spiffe_id", e))?,
            expires_at: r.expires_at,
        }))
    }

    async fn record_issued(&self, svids: &[IssuedSvid]) -> Result<()> {
        if svids.is_empty() {
            return Ok(());
        }
        let mut conn = self.client().await?;
        let tx = conn.transaction().await.map_err(pg)?;
        insert_issued(&tx, svids, None).await?;
        tx.commit().await.map_err(pg)
    }

    async fn list_issued(&self, now: i64) -> Result<Vec<IssuedSvid>> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT key, record FROM issued WHERE expires_at > $1",
                &[&now],
            )
            .await
            .map_err(pg)?;
        rows.iter()
            .map(|r| decode_issued(r.get(0), r.get(1)))
            .collect()
    }

    async fn list_issued_covered(
        &self,
        handles: &[RevocationHandle],
        now: i64,
    ) -> Result<Vec<IssuedSvid>> {
        let client = self.client().await?;
        let query = client
            .prepare(
                "SELECT i.key, i.record FROM issued_by_handle h JOIN issued i ON i.key = h.key
                 WHERE h.handle = $1 AND i.expires_at > $2",
            )
            .await
            .map_err(pg)?;
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for handle in handles {
            let prefix = handle_prefix(handle);
            for row in client.query(&query, &[&prefix, &now]).await.map_err(pg)? {
                let key: String = row.get(0);
                if seen.contains(&key) {
                    continue;
                }
                let svid = decode_issued(&key, row.get(1))?;
                // The index narrows, `covers` decides.
                if handle.covers(&svid) {
                    seen.insert(key);
                    out.push(svid);
                }
            }
        }
        Ok(out)
    }

    async fn prune_issued(&self, now: i64) -> Result<usize> {
        // What `last_issued` derived from the records that go stays in the activity
        // records, written first: a crash in between keeps both, never neither.
        let rows = self
            .client()
            .await?
            .query(
                "SELECT key, record FROM issued WHERE expires_at <= $1",
                &[&now],
            )
            .await
            .map_err(pg)?;
        let mut last_issued = std::collections::BTreeMap::<String, i64>::new();
        for row in &rows {
            let key: &str = row.get(0);
            let record: &str = row.get(1);
            // An unreadable record still goes; it leaves nothing behind.
            let Ok(record) = decode::<IssuedRecord>(key.as_bytes(), record.as_bytes()) else {
                continue;
            };
            if let Some((entry, at)) = record.activity().map(|a| (a.entry_id, a.issued_at)) {
                let t = last_issued.entry(entry).or_insert(at);
                *t = (*t).max(at);
            }
        }
        if !last_issued.is_empty() {
            let updates = last_issued
                .into_iter()
                .map(|(id, at)| {
                    let update: ActivityUpdate = Box::new(move |r| r.note_issued_at(at));
                    (id, update)
                })
                .collect();
            self.note_activity(updates).await?;
        }
        // The index rows go with their records (ON DELETE CASCADE).
        let n = self
            .client()
            .await?
            .execute("DELETE FROM issued WHERE expires_at <= $1", &[&now])
            .await
            .map_err(pg)?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    async fn append_revocation(&self, event: RevocationEvent) -> Result<RevocationEvent> {
        self.append_revocations(vec![event])
            .await?
            .pop()
            .ok_or_else(|| DataStoreError::Backend {
                reason: "a batch of one revocation appended none".into(),
            })
    }

    async fn append_revocations(
        &self,
        mut events: Vec<RevocationEvent>,
    ) -> Result<Vec<RevocationEvent>> {
        if events.is_empty() {
            return Ok(events);
        }
        let mut conn = self.client().await?;
        let tx = conn.transaction().await.map_err(pg)?;
        // The head row's lock orders appends from every server.
        let head: i64 = tx
            .query_one(
                "SELECT sequence FROM log_heads WHERE name = 'revocations' FOR UPDATE",
                &[],
            )
            .await
            .map_err(pg)?
            .get(0);
        let insert = tx
            .prepare("INSERT INTO revocations (sequence, record) VALUES ($1, $2)")
            .await
            .map_err(pg)?;
        let mut last = uint(head);
        for event in &mut events {
            last += 1;
            event.sequence = last;
            let record = text(encode(&EventRecord::from_event(event))?)?;
            tx.execute(&insert, &[&int(last), &record])
                .await
                .map_err(pg)?;
        }
        tx.execute(
            "UPDATE log_heads SET sequence = $1 WHERE name = 'revocations'",
            &[&int(last)],
        )
        .await
        .map_err(pg)?;
        // Delivered to every listening server when (and only if) this commits.
        tx.batch_execute(&format!("NOTIFY {REVOCATIONS_CHANNEL}"))
            .await
            .map_err(pg)?;
        tx.commit().await.map_err(pg)?;
        Ok(events)
    }

    async fn list_revocations(&self) -> Result<Vec<RevocationEvent>> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT sequence, record FROM revocations ORDER BY sequence",
                &[],
            )
            .await
            .map_err(pg)?;
        rows.iter().map(event_of_row).collect()
    }

    async fn list_revocations_after(&self, after: u64) -> Result<Vec<RevocationEvent>> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT sequence, record FROM revocations WHERE sequence > $1 ORDER BY sequence",
                &[&int(after)],
            )
            .await
            .map_err(pg)?;
        rows.iter().map(event_of_row).collect()
    }

    async fn revocation_head(&self) -> Result<u64> {
        let head: i64 = self
            .client()
            .await?
            .query_one(
                "SELECT sequence FROM log_heads WHERE name = 'revocations'",
                &[],
            )
            .await
            .map_err(pg)?
            .get(0);
        Ok(uint(head))
    }

    async fn compact_revocations(&self, sequences: &[u64]) -> Result<()> {
        let sequences: Vec<i64> = sequences.iter().map(|s| int(*s)).collect();
        self.client()
            .await?
            .execute(
                "DELETE FROM revocations WHERE sequence = ANY($1)",
                &[&sequences],
            )
            .await
            .map_err(pg)?;
        Ok(())
    }

    async fn append_audit(
        &self,
        records: Vec<AuditRecord>,
        time: i64,
        signer: &dyn ChainSigner,
    ) -> Result<Vec<SealedAuditRecord>> {
        let mut conn = self.client().await?;
        let tx = conn.transaction().await.map_err(pg)?;
        let sealed = seal_audit(&tx, &records, time, signer).await?;
        tx.commit().await.map_err(pg)?;
        Ok(sealed)
    }

    async fn append_issuance(
        &self,
        svids: &[IssuedSvid],
        records: Vec<AuditRecord>,
        time: i64,
        signer: &dyn ChainSigner,
    ) -> Result<Vec<SealedAuditRecord>> {
        // One transaction, so one commit (one WAL flush) for the mint. The issuance rows
        // lock nothing another mint waits for; the audit head is locked last, and held
        // only until the commit.
        let mut conn = self.client().await?;
        let tx = conn.transaction().await.map_err(pg)?;
        insert_issued(&tx, svids, Some(time)).await?;
        let sealed = seal_audit(&tx, &records, time, signer).await?;
        tx.commit().await.map_err(pg)?;
        Ok(sealed)
    }

    async fn audit_records(&self, after_seq: u64, limit: usize) -> Result<Vec<StoredAuditRecord>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .client()
            .await?
            .query(
                "SELECT seq, body FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2",
                &[&int(after_seq), &limit],
            )
            .await
            .map_err(pg)?;
        Ok(rows
            .iter()
            .map(|r| StoredAuditRecord {
                seq: uint(r.get(0)),
                body: r.get(1),
            })
            .collect())
    }

    async fn audit_head(&self) -> Result<Option<AuditHead>> {
        let row = self
            .client()
            .await?
            .query_one("SELECT record FROM log_heads WHERE name = 'audit'", &[])
            .await
            .map_err(pg)?;
        match row.get::<_, Option<String>>(0) {
            None => Ok(None),
            Some(r) => Ok(Some(decode(b"audit head", r.as_bytes())?)),
        }
    }

    async fn claim_audit_key_id(&self, key_id: &str) -> Result<String> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO log_heads (name, sequence, record) VALUES ('audit_key', 0, $1)
                 ON CONFLICT (name) DO NOTHING",
                &[&key_id],
            )
            .await
            .map_err(pg)?;
        let row = client
            .query_one("SELECT record FROM log_heads WHERE name = 'audit_key'", &[])
            .await
            .map_err(pg)?;
        Ok(row.get::<_, Option<String>>(0).unwrap_or_default())
    }

    async fn list_seen_tokens(&self) -> Result<Vec<(Vec<u8>, i64)>> {
        let rows = self
            .client()
            .await?
            .query("SELECT digest, until FROM seen_tokens ORDER BY digest", &[])
            .await
            .map_err(pg)?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    async fn note_fetched(&self, entries: Vec<EntryId>, now: i64) -> Result<()> {
        let updates = entries
            .into_iter()
            .map(|id| {
                let update: ActivityUpdate = Box::new(move |r| r.note_fetched(now));
                (id.to_string(), update)
            })
            .collect();
        self.note_activity(updates).await
    }

    async fn entry_activity(&self) -> Result<std::collections::HashMap<EntryId, EntryActivity>> {
        let client = self.client().await?;
        // The issuance records of entries that exist (records outlive a deleted entry),
        // first: a prune moves `last_issued` into the activity record before it deletes,
        // so one of the two reads sees it.
        let issued = client
            .query(
                "SELECT i.key, i.record FROM issued i
                 JOIN entries e ON e.id = i.record::jsonb->>'entry_id'",
                &[],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(|r| {
                let key: &str = r.get(0);
                let record: &str = r.get(1);
                Ok(decode::<IssuedRecord>(key.as_bytes(), record.as_bytes())?.activity())
            })
            .filter_map(Result::transpose)
            .collect::<Result<Vec<_>>>()?;
        let rows = client
            .query("SELECT entry_id, record FROM entry_activity", &[])
            .await
            .map_err(pg)?;
        let stored = rows
            .iter()
            .map(|r| {
                let id: &str = r.get(0);
                let record: &str = r.get(1);
                let entry: EntryId = id
                    .parse()
                    .map_err(|e| super::records::corrupt(id.as_bytes(), "entry_id", e))?;
                Ok((
                    entry,
                    decode::<ActivityRecord>(id.as_bytes(), record.as_bytes())?.into_activity(),
                ))
            })
            .collect::<Result<_>>()?;
        Ok(super::lifecycle::with_issued(stored, issued, |_| true))
    }

    async fn entry_activity_of(&self, id: &EntryId) -> Result<EntryActivity> {
        let client = self.client().await?;
        // Through the entry's handle index, not a scan of every record.
        let handle = handle_prefix(&RevocationHandle::Entry(id.clone()));
        let issued = client
            .query(
                "SELECT i.key, i.record FROM issued_by_handle h JOIN issued i ON i.key = h.key
                 WHERE h.handle = $1",
                &[&handle],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(|r| {
                let key: &str = r.get(0);
                let record: &str = r.get(1);
                Ok(decode::<IssuedRecord>(key.as_bytes(), record.as_bytes())?.activity())
            })
            .filter_map(Result::transpose)
            .collect::<Result<Vec<_>>>()?;
        let row = client
            .query_opt(
                "SELECT e.id, a.record FROM entries e
                 LEFT JOIN entry_activity a ON a.entry_id = e.id WHERE e.id = $1",
                &[&id.as_str()],
            )
            .await
            .map_err(pg)?;
        // A deleted entry keeps no activity.
        let Some(row) = row else {
            return Ok(EntryActivity::default());
        };
        let stored = match row.get::<_, Option<&str>>(1) {
            Some(r) => {
                decode::<ActivityRecord>(id.as_str().as_bytes(), r.as_bytes())?.into_activity()
            }
            None => EntryActivity::default(),
        };
        Ok(super::lifecycle::with_issued(
            std::collections::HashMap::from([(id.clone(), stored)]),
            issued,
            |_| true,
        )
        .remove(id)
        .unwrap_or_default())
    }

    async fn set_owner_disabled(
        &self,
        owner: &str,
        disabled: bool,
        now: i64,
    ) -> Result<OwnerState> {
        let record = text(encode(&OwnerRecord {
            disabled,
            changed_at: now,
        })?)?;
        self.client()
            .await?
            .execute(
                "INSERT INTO owners (owner, record) VALUES ($1, $2)
                 ON CONFLICT (owner) DO UPDATE SET record = EXCLUDED.record",
                &[&owner, &record],
            )
            .await
            .map_err(pg)?;
        Ok(OwnerState {
            owner: owner.to_string(),
            disabled,
            changed_at: now,
        })
    }

    async fn get_owner(&self, owner: &str) -> Result<Option<OwnerState>> {
        match self
            .client()
            .await?
            .query_opt("SELECT record FROM owners WHERE owner = $1", &[&owner])
            .await
            .map_err(pg)?
        {
            None => Ok(None),
            Some(row) => {
                let record: &str = row.get(0);
                let r: OwnerRecord = decode(owner.as_bytes(), record.as_bytes())?;
                Ok(Some(OwnerState {
                    owner: owner.to_string(),
                    disabled: r.disabled,
                    changed_at: r.changed_at,
                }))
            }
        }
    }

    async fn list_owners(&self) -> Result<Vec<OwnerState>> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT owner, record FROM owners ORDER BY owner COLLATE \"C\"",
                &[],
            )
            .await
            .map_err(pg)?;
        rows.iter()
            .map(|row| {
                let owner: &str = row.get(0);
                let record: &str = row.get(1);
                let r: OwnerRecord = decode(owner.as_bytes(), record.as_bytes())?;
                Ok(OwnerState {
                    owner: owner.to_string(),
                    disabled: r.disabled,
                    changed_at: r.changed_at,
                })
            })
            .collect()
    }

    async fn count_live_grants(&self, now: i64) -> Result<u64> {
        let n: i64 = self
            .client()
            .await?
            .query_one("SELECT count(*) FROM grants WHERE expires_at > $1", &[&now])
            .await
            .map_err(pg)?
            .get(0);
        Ok(uint(n))
    }

    async fn create_grant(&self, grant: Grant) -> Result<()> {
        let record = GrantRecord::from_grant(&grant);
        let agent = grant.agent().map(ToString::to_string);
        match self
            .client()
            .await?
            .execute(
                "INSERT INTO grants (id, agent, expires_at, record) VALUES ($1, $2, $3, $4)",
                &[
                    &grant.id.as_str(),
                    &agent,
                    &grant.delegation.expires_at,
                    &text(encode(&record)?)?,
                ],
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => Err(DataStoreError::DuplicateGrant {
                id: grant.id.to_string(),
            }),
            Err(e) => Err(pg(e)),
        }
    }

    async fn get_grant(&self, id: &GrantId) -> Result<Option<Grant>> {
        match self
            .client()
            .await?
            .query_opt("SELECT record FROM grants WHERE id = $1", &[&id.as_str()])
            .await
            .map_err(pg)?
        {
            None => Ok(None),
            Some(row) => Ok(Some(decode_grant(id.as_str(), row.get(0))?)),
        }
    }

    async fn list_grants(&self) -> Result<Vec<Grant>> {
        let rows = self
            .client()
            .await?
            .query("SELECT id, record FROM grants", &[])
            .await
            .map_err(pg)?;
        let mut grants = rows
            .iter()
            .map(|r| decode_grant(r.get(0), r.get(1)))
            .collect::<Result<Vec<_>>>()?;
        grants.sort_by(|a, b| (a.agent(), &a.id).cmp(&(b.agent(), &b.id)));
        Ok(grants)
    }

    async fn list_grants_for_agent(&self, agent: &SpiffeId) -> Result<Vec<Grant>> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT id, record FROM grants WHERE agent = $1 ORDER BY id COLLATE \"C\"",
                &[&agent.to_string()],
            )
            .await
            .map_err(pg)?;
        rows.iter()
            .map(|r| decode_grant(r.get(0), r.get(1)))
            .collect()
    }

    async fn create_delegation_offer(
        &self,
        offer: DelegationOffer,
        max_per_grant: usize,
        now: i64,
    ) -> Result<bool> {
        let parent = offer.parent_grant_id.to_string();
        let record = text(encode(&OfferRecord::from_offer(&offer))?)?;
        let mut conn = self.client().await?;
        let tx = conn.transaction().await.map_err(pg)?;
        // The count and the insert are one step for every server.
        tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&parent])
            .await
            .map_err(pg)?;
        let live: i64 = tx
            .query_one(
                "SELECT count(*) FROM delegation_offers WHERE parent_grant_id = $1 AND redeem_by > $2",
                &[&parent, &now],
            )
            .await
            .map_err(pg)?
            .get(0);
        if uint(live) >= max_per_grant as u64 {
            return Ok(false);
        }
        tx.execute(
            "INSERT INTO delegation_offers (id, parent_grant_id, redeem_by, record)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (id) DO UPDATE SET parent_grant_id = EXCLUDED.parent_grant_id,
             redeem_by = EXCLUDED.redeem_by, record = EXCLUDED.record",
            &[&offer.id, &parent, &offer.redeem_by, &record],
        )
        .await
        .map_err(pg)?;
        tx.commit().await.map_err(pg)?;
        Ok(true)
    }

    async fn take_delegation_offer(&self, id: &str) -> Result<Option<DelegationOffer>> {
        match self
            .client()
            .await?
            .query_opt(
                "DELETE FROM delegation_offers WHERE id = $1 RETURNING record",
                &[&id],
            )
            .await
            .map_err(pg)?
        {
            None => Ok(None),
            Some(row) => {
                let record: &str = row.get(0);
                Ok(Some(
                    decode::<OfferRecord>(id.as_bytes(), record.as_bytes())?.into_offer(id)?,
                ))
            }
        }
    }

    async fn prune_delegation(
        &self,
        now: i64,
        grants_expired_before: i64,
    ) -> Result<(usize, usize)> {
        let mut conn = self.client().await?;
        let tx = conn.transaction().await.map_err(pg)?;
        let offers = tx
            .execute(
                "DELETE FROM delegation_offers WHERE redeem_by <= $1",
                &[&now],
            )
            .await
            .map_err(pg)?;
        let grants = tx
            .execute(
                "DELETE FROM grants WHERE expires_at < $1",
                &[&grants_expired_before],
            )
            .await
            .map_err(pg)?;
        tx.commit().await.map_err(pg)?;
        Ok((
            usize::try_from(offers).unwrap_or(usize::MAX),
            usize::try_from(grants).unwrap_or(usize::MAX),
        ))
    }
}

/// Each test's own database on the PostgreSQL this machine runs, dropped afterwards.
#[cfg(test)]
pub(crate) mod testing {
    /// Where the tests find PostgreSQL: `AGENTD_TEST_POSTGRES`, else the local server with
    /// trust auth (as `make test` and `.ci/run` start it).
    pub(crate) fn admin_url() -> String {
        std::env::var("AGENTD_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
    }

    /// Drops its database when the test ends (after the store, which the test drops first).
    pub(crate) struct TestDatabase {
        pub(crate) url: String,
        name: String,
    }

    impl Drop for TestDatabase {
        fn drop(&mut self) {
            let (admin, name) = (admin_url(), self.name.clone());
            // Drop cannot await: a thread of its own with its own runtime.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .ok()?;
                rt.block_on(async {
                    let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
                        .await
                        .ok()?;
                    tokio::spawn(conn);
                    client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await
                        .ok()
                })
            })
            .join();
        }
    }

    /// A new, empty database; fails the test, saying what to do, when PostgreSQL is not
    /// reachable (never a silent skip).
    pub(crate) async fn database() -> TestDatabase {
        let admin = admin_url();
        let (client, conn) = match tokio_postgres::connect(&admin, tokio_postgres::NoTls).await {
            Ok(c) => c,
            Err(e) => panic!(
                "no test connection to PostgreSQL at {admin} ({}): the PostgreSQL store's tests need a running server that lets postgres in from 127.0.0.1; scripts/install-tools.sh (run by make test and .ci/run) installs and starts one, or set AGENTD_TEST_POSTGRES",
                super::pg(e)
            ),
        };
        tokio::spawn(conn);
        let name = format!("agentd_test_{:016x}", rand::random::<u64>());
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("creating the test database");
        let url = match admin.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => panic!("AGENTD_TEST_POSTGRES must end in /DATABASE: {admin}"),
        };
        TestDatabase { url, name }
    }
}

/// The store conformance suite (`datastore::conformance`) on PostgreSQL.
#[cfg(test)]
mod conformance_suite {
    async fn open() -> (
        super::testing::TestDatabase,
        crate::datastore::conformance::Store,
    ) {
        let db = super::testing::database().await;
        let store = super::PgStore::open(&db.url).await.unwrap();
        (db, std::sync::Arc::new(store))
    }

    crate::datastore::conformance::datastore_conformance!(open().await);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::revocation::log::RevocationLog;

    /// Two servers' revocation logs on one database; the second follows the store (its
    /// poll every `poll`, besides NOTIFY).
    struct TwoServers {
        a: RevocationLog,
        b: std::sync::Arc<RevocationLog>,
        stop: tokio_util::sync::CancellationToken,
        follower: tokio::task::JoinHandle<()>,
    }

    impl TwoServers {
        async fn on(db: &testing::TestDatabase, poll: std::time::Duration) -> Self {
            let open = || async {
                let store: std::sync::Arc<dyn DataStore> =
                    std::sync::Arc::new(PgStore::open(&db.url).await.unwrap());
                RevocationLog::open(store).await.unwrap()
            };
            let a = open().await;
            let b = std::sync::Arc::new(open().await);
            let stop = tokio_util::sync::CancellationToken::new();
            let follower = tokio::spawn(b.clone().follow_store(poll, stop.clone()));
            Self {
                a,
                b,
                stop,
                follower,
            }
        }

        async fn stop(self) {
            self.stop.cancel();
            self.follower.await.unwrap();
        }
    }

    /// Waits (up to 3 s) until `log` holds `handle` standing as revocation `sequence`.
    async fn wait_standing(
        log: &RevocationLog,
        handle: &RevocationHandle,
        sequence: u64,
        what: &str,
    ) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        while log.standing(handle) != Some(sequence) {
            assert!(
                std::time::Instant::now() < deadline,
                "{what} did not reach the other server"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Two servers' stores on one database: their revocation and audit appends, at once,
    /// still make one gap-free sequence and one hash chain.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_handles_on_one_database_append_one_log() {
        let db = testing::database().await;
        let a: crate::datastore::conformance::Store =
            std::sync::Arc::new(PgStore::open(&db.url).await.unwrap());
        let b: crate::datastore::conformance::Store =
            std::sync::Arc::new(PgStore::open(&db.url).await.unwrap());
        crate::datastore::conformance::appends_through_several_handles_form_one_log(vec![a, b])
            .await;
    }

    /// A revocation committed through one server is in force on another server of the same
    /// database within its poll, and that server's feed carries it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_revocation_through_one_server_is_in_force_on_the_other() {
        let db = testing::database().await;
        let servers = TwoServers::on(&db, std::time::Duration::from_millis(50)).await;
        let (log_a, log_b) = (&servers.a, &servers.b);
        let handle = RevocationHandle::Entry(EntryId::generate());
        let event = log_a
            .revoke(handle.clone(), "elsewhere", 100)
            .await
            .unwrap();
        wait_standing(log_b, &handle, event.sequence, "the revocation").await;
        assert_eq!(
            log_b.events_after(0).events.len(),
            1,
            "on the other server's feed"
        );
        // Its own next append numbers after it.
        let next = log_b
            .revoke(RevocationHandle::Task("t1".into()), "here", 100)
            .await
            .unwrap();
        assert_eq!(next.sequence, event.sequence + 1);
        servers.stop().await;
    }

    /// A platform token id used through one server is refused by another, and again after
    /// it expires is accepted; called from the blocking pool, as the node API calls it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn used_token_ids_are_shared_by_every_server_on_the_database() {
        use agentd_attestor::node::SeenError;
        let db = testing::database().await;
        let a = PgStore::open(&db.url).await.unwrap().seen_tokens().unwrap();
        let b = PgStore::open(&db.url).await.unwrap().seen_tokens().unwrap();
        let (first, again, other, later) = tokio::task::spawn_blocking(move || {
            (
                a.first_use("jti-1", 100, 10),
                b.first_use("jti-1", 100, 20),
                b.first_use("jti-2", 100, 20),
                a.first_use("jti-1", 300, 150),
            )
        })
        .await
        .unwrap();
        assert!(first.is_ok(), "{first:?}");
        assert!(matches!(again, Err(SeenError::Replayed)), "{again:?}");
        assert!(other.is_ok(), "{other:?}");
        assert!(
            later.is_ok(),
            "expired at 100, used again at 150: {later:?}"
        );
    }

    /// The other server hears of the revocation through NOTIFY, not its poll: with the
    /// poll a minute away, the revocation is in force there within moments.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_revocation_is_pushed_to_the_other_server_by_notify() {
        let db = testing::database().await;
        let servers = TwoServers::on(&db, std::time::Duration::from_secs(60)).await;
        let (log_a, log_b) = (&servers.a, &servers.b);
        for n in 0..3 {
            // Each after the listener may have (re)connected: none is missed.
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            let handle = RevocationHandle::Task(format!("task-{n}"));
            let event = log_a.revoke(handle.clone(), "notified", 100).await.unwrap();
            wait_standing(log_b, &handle, event.sequence, &format!("revocation {n}")).await;
        }
        servers.stop().await;
    }

    #[tokio::test]
    async fn migrations_run_once_and_a_newer_schema_is_refused() {
        let db = testing::database().await;
        let first = PgStore::open(&db.url).await.unwrap();
        // Opening again (another server) finds the schema current.
        let second = PgStore::open(&db.url).await.unwrap();
        let client = second.client().await.unwrap();
        let version: i32 = client
            .query_one("SELECT version FROM agentd_schema", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(version as usize, MIGRATIONS.len());
        client
            .execute("UPDATE agentd_schema SET version = version + 1", &[])
            .await
            .unwrap();
        drop(client);
        let err = PgStore::open(&db.url).await.unwrap_err();
        assert!(err.to_string().contains("newer than this agentd"), "{err}");
        drop((first, second));
    }

    #[test]
    fn passwords_are_not_shown() {
        assert_eq!(
            without_password("postgres://agentd:s3cret@db.example.org:5432/agentd"),
            "postgres://agentd@db.example.org:5432/agentd"
        );
        assert_eq!(
            without_password("postgres://postgres@127.0.0.1/x"),
            "postgres://postgres@127.0.0.1/x"
        );
        assert_eq!(
            without_password("postgres://u@h/d?sslmode=disable&password=s3cret"),
            "postgres://u@h/d?sslmode=disable"
        );
        assert_eq!(
            without_password("postgres://u@h/d?PASSWORD=s3cret"),
            "postgres://u@h/d"
        );
    }
}
