//! Storage for the server, grouped by resource. The trait is free of any backend's types so
//! that another store (PostgreSQL, shared by several servers) can sit behind it. Every
//! operation is one transaction, durable when it returns.

mod model;
pub mod sled_store;

use std::fmt::Debug;

pub use model::{AttestedNode, Entry, EntryFilter, EntryId, EntryIdError, EntrySpec, JoinToken};
pub use model::{DelegationOffer, Grant};
pub use sled_store::SledStore;

use spiffe::SpiffeId;

#[derive(Debug, thiserror::Error)]
pub enum DataStoreError {
    #[error("entry {id} not found")]
    EntryNotFound { id: String },
    #[error("an entry with the same spiffe id, parent id and selectors exists: {id}")]
    DuplicateEntry { id: String },
    #[error("node {spiffe_id} not found")]
    NodeNotFound { spiffe_id: String },
    #[error("stored record {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("grant {id} exists")]
    DuplicateGrant { id: String },
    #[error("store backend: {reason}")]
    Backend { reason: String },
}

pub type Result<T> = std::result::Result<T, DataStoreError>;

#[async_trait::async_trait]
pub trait DataStore: Send + Sync + Debug + 'static {
    // Registration entries.
    async fn create_entry(&self, spec: EntrySpec, now: i64) -> Result<Entry>;
    async fn get_entry(&self, id: &EntryId) -> Result<Option<Entry>>;
    async fn list_entries(&self, filter: &EntryFilter) -> Result<Vec<Entry>>;
    async fn update_entry(&self, id: &EntryId, spec: EntrySpec) -> Result<Entry>;
    async fn delete_entry(&self, id: &EntryId) -> Result<Entry>;

    // Attested nodes.
    async fn upsert_node(&self, node: AttestedNode) -> Result<()>;
    async fn get_node(&self, spiffe_id: &SpiffeId) -> Result<Option<AttestedNode>>;
    async fn list_nodes(&self) -> Result<Vec<AttestedNode>>;
    async fn delete_node(&self, spiffe_id: &SpiffeId) -> Result<AttestedNode>;

    // Join tokens.
    async fn create_join_token(&self, token: JoinToken) -> Result<()>;
    /// Removes and returns the token in one step, so a token is used at most once even when
    /// two nodes present it at the same moment.
    async fn take_join_token(&self, token_sha256: &str) -> Result<Option<JoinToken>>;

    // Delegation grants and single-use delegation offers.
    async fn create_grant(&self, grant: Grant) -> Result<()>;
    async fn get_grant(&self, id: &crate::delegation::GrantId) -> Result<Option<Grant>>;
    /// Every grant, expired ones included, ordered by (agent, id).
    async fn list_grants(&self) -> Result<Vec<Grant>>;
    async fn create_delegation_offer(&self, offer: DelegationOffer) -> Result<()>;
    /// Removes and returns the offer in one step: a delegation token is honoured once.
    async fn take_delegation_offer(&self, id: &str) -> Result<Option<DelegationOffer>>;
}
