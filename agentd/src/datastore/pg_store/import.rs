//! Filling an empty database with a copy of another store (`agentd server migrate`): every
//! record keeps its key (entry and grant ids, revocation sequence numbers, audit records with
//! their hashes and MACs, so the chain still verifies with the same audit key), in one
//! transaction, so a failed copy leaves the database as it was.

use deadpool_postgres::GenericClient as _;

use super::super::migrate::StoreCopy;
use super::{
    entry_row, int, issued_index_keys, issued_key, pg, text, ActivityRecord, DataStoreError,
    EntryRow, EventRecord, GrantRecord, IssuedRecord, NodeRecord, OwnerRecord, PgStore, Result,
};
use crate::datastore::records::{encode, FederatedBundleRecord, FederationRecord};

impl PgStore {
    /// Whether the database holds any entry, node, grant, revocation or audit record.
    pub async fn is_empty(&self) -> Result<bool> {
        let row = self
            .client()
            .await?
            .query_one(
                "SELECT (SELECT count(*) FROM entries) + (SELECT count(*) FROM nodes)
                      + (SELECT count(*) FROM grants) + (SELECT count(*) FROM revocations)
                      + (SELECT count(*) FROM audit)",
                &[],
            )
            .await
            .map_err(pg)?;
        Ok(row.get::<_, i64>(0) == 0)
    }

    /// Writes `copy` into this (empty) database in one transaction; refused, writing nothing,
    /// when the database already holds records.
    pub async fn import(&self, copy: &StoreCopy) -> Result<()> {
        let mut conn = self.client().await?;
        let tx = conn.transaction().await.map_err(pg)?;
        // The same lock as every append: nobody writes meanwhile.
        tx.query_one(
            "SELECT sequence FROM log_heads WHERE name = 'revocations' FOR UPDATE",
            &[],
        )
        .await
        .map_err(pg)?;
        tx.query_one(
            "SELECT sequence FROM log_heads WHERE name = 'audit' FOR UPDATE",
            &[],
        )
        .await
        .map_err(pg)?;
        let held: i64 = tx
            .query_one(
                "SELECT (SELECT count(*) FROM entries) + (SELECT count(*) FROM nodes)
                      + (SELECT count(*) FROM grants) + (SELECT count(*) FROM revocations)
                      + (SELECT count(*) FROM audit)",
                &[],
            )
            .await
            .map_err(pg)?
            .get(0);
        if held != 0 {
            return Err(DataStoreError::Backend {
                reason: format!(
                    "the database {} already holds {held} records: a migration fills an empty database only",
                    self.shown
                ),
            });
        }
        let entry = tx
            .prepare(
                "INSERT INTO entries (id, identity, spiffe_id, parent_id, owner, record)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .await
            .map_err(pg)?;
        for e in &copy.entries {
            let EntryRow {
                id,
                identity,
                spiffe_id,
                parent_id,
                owner,
                record,
            } = entry_row(e)?;
            tx.execute(
                &entry,
                &[&id, &identity, &spiffe_id, &parent_id, &owner, &record],
            )
            .await
            .map_err(pg)?;
        }
        let node = tx
            .prepare("INSERT INTO nodes (spiffe_id, record) VALUES ($1, $2)")
            .await
            .map_err(pg)?;
        for n in &copy.nodes {
            let record = text(encode(&NodeRecord::from_node(n))?)?;
            tx.execute(&node, &[&n.spiffe_id.to_string(), &record])
                .await
                .map_err(pg)?;
        }
        let issued = tx
            .prepare("INSERT INTO issued (key, expires_at, record) VALUES ($1, $2, $3)")
            .await
            .map_err(pg)?;
        let index = tx
            .prepare(
                "INSERT INTO issued_by_handle (handle, key) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            )
            .await
            .map_err(pg)?;
        for svid in &copy.issued {
            let key = issued_key(svid.kind, &svid.id);
            let key_text = text(key.clone())?;
            let record = text(encode(&IssuedRecord::from_issued(svid))?)?;
            tx.execute(&issued, &[&key_text, &svid.expires_at, &record])
                .await
                .map_err(pg)?;
            for index_key in issued_index_keys(svid, &key) {
                let handle = &index_key[..index_key.len() - key.len()];
                tx.execute(&index, &[&handle, &key_text])
                    .await
                    .map_err(pg)?;
            }
        }
        let event = tx
            .prepare("INSERT INTO revocations (sequence, record) VALUES ($1, $2)")
            .await
            .map_err(pg)?;
        for e in &copy.revocations {
            let record = text(encode(&EventRecord::from_event(e))?)?;
            tx.execute(&event, &[&int(e.sequence), &record])
                .await
                .map_err(pg)?;
        }
        tx.execute(
            "UPDATE log_heads SET sequence = $1 WHERE name = 'revocations'",
            &[&int(copy.revocation_head)],
        )
        .await
        .map_err(pg)?;
        let audit = tx
            .prepare("INSERT INTO audit (seq, body) VALUES ($1, $2)")
            .await
            .map_err(pg)?;
        for r in &copy.audit {
            tx.execute(&audit, &[&int(r.seq), &r.body])
                .await
                .map_err(pg)?;
        }
        if let Some(head) = &copy.audit_head {
            tx.execute(
                "UPDATE log_heads SET sequence = $1, record = $2 WHERE name = 'audit'",
                &[&int(head.seq), &text(encode(head)?)?],
            )
            .await
            .map_err(pg)?;
        }
        let grant = tx
            .prepare("INSERT INTO grants (id, agent, expires_at, record) VALUES ($1, $2, $3, $4)")
            .await
            .map_err(pg)?;
        for g in &copy.grants {
            let agent = g.agent().map(ToString::to_string);
            tx.execute(
                &grant,
                &[
                    &g.id.as_str(),
                    &agent,
                    &g.delegation.expires_at,
                    &text(encode(&GrantRecord::from_grant(g))?)?,
                ],
            )
            .await
            .map_err(pg)?;
        }
        let owner = tx
            .prepare("INSERT INTO owners (owner, record) VALUES ($1, $2)")
            .await
            .map_err(pg)?;
        for o in &copy.owners {
            let record = text(encode(&OwnerRecord {
                disabled: o.disabled,
                changed_at: o.changed_at,
            })?)?;
            tx.execute(&owner, &[&o.owner, &record]).await.map_err(pg)?;
        }
        let federation = tx
            .prepare("INSERT INTO federations (trust_domain, record) VALUES ($1, $2)")
            .await
            .map_err(pg)?;
        for f in &copy.federations {
            let record = text(encode(&FederationRecord::from_relationship(f))?)?;
            tx.execute(&federation, &[&f.trust_domain.as_str(), &record])
                .await
                .map_err(pg)?;
        }
        let bundle = tx
            .prepare("INSERT INTO federated_bundles (trust_domain, record) VALUES ($1, $2)")
            .await
            .map_err(pg)?;
        for b in &copy.federated_bundles {
            let record = text(encode(&FederatedBundleRecord::from_bundle(b))?)?;
            tx.execute(&bundle, &[&b.bundle.trust_domain.as_str(), &record])
                .await
                .map_err(pg)?;
        }
        let activity = tx
            .prepare("INSERT INTO entry_activity (entry_id, record) VALUES ($1, $2)")
            .await
            .map_err(pg)?;
        for (id, a) in &copy.activity {
            let record = text(encode(&ActivityRecord::from_activity(a))?)?;
            tx.execute(&activity, &[&id.as_str(), &record])
                .await
                .map_err(pg)?;
        }
        let seen = tx
            .prepare("INSERT INTO seen_tokens (digest, until) VALUES ($1, $2)")
            .await
            .map_err(pg)?;
        for (digest, until) in &copy.seen_tokens {
            tx.execute(&seen, &[digest, until]).await.map_err(pg)?;
        }
        tx.commit().await.map_err(pg)
    }
}
