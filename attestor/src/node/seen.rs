//! Single-use token ids (a platform token's `jti`), remembered until the token expires.
//!
//! Why a trait: in memory, a server restart forgot every id, and a captured platform token
//! could be presented again as long as it was valid. The server keeps them in its datastore
//! instead ([`SeenTokens`] is implemented there); [`MemorySeenTokens`] is for tests and for
//! embedding without a store.

use std::collections::HashMap;
use std::sync::Mutex;

/// Why a token id could not be recorded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SeenError {
    /// The id was recorded before and has not expired.
    #[error("already used")]
    Replayed,
    /// The store holds as many unexpired ids as it may.
    #[error("too many remembered token ids")]
    Full,
    /// The backing store failed.
    #[error("token id store: {reason}")]
    Store { reason: String },
}

/// Where accepted token ids are remembered.
pub trait SeenTokens: Send + Sync + std::fmt::Debug {
    /// Records `id` as used until `until` (unix seconds), in one atomic step: refuses an id
    /// recorded before whose `until` is still after `now`. Durable when it returns.
    fn first_use(&self, id: &str, until: i64, now: i64) -> Result<(), SeenError>;
}

/// Token ids in memory, at most `max` unexpired ones.
#[derive(Debug)]
pub struct MemorySeenTokens {
    seen: Mutex<HashMap<String, i64>>,
    max: usize,
}

impl MemorySeenTokens {
    pub fn new(max: usize) -> Self {
        Self {
            seen: Mutex::default(),
            max,
        }
    }
}

impl SeenTokens for MemorySeenTokens {
    fn first_use(&self, id: &str, until: i64, now: i64) -> Result<(), SeenError> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.get(id).is_some_and(|u| *u > now) {
            return Err(SeenError::Replayed);
        }
        if seen.len() >= self.max {
            seen.retain(|_, u| *u > now);
        }
        if seen.len() >= self.max {
            return Err(SeenError::Full);
        }
        seen.insert(id.to_string(), until);
        Ok(())
    }
}
