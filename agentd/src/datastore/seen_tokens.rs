//! The claims attestor's used token ids in the sled store, so that a restart does not make
//! a captured platform token acceptable again (issue 12, item 7).
//!
//! Keys are the SHA-256 of the id (an id may be long; its digest is enough to match it),
//! values the unix second until which it is remembered (big-endian i64). At most
//! [`MAX_SEEN`] are kept: when full, expired ones are removed; if none has expired, new ids
//! are refused (`Full`, the token is refused as busy) rather than forgetting live ones.
//!
//! One lock serialises check, insert, prune and flush, so the bound is exact and a prune
//! never removes an id recorded again meanwhile. Called from a blocking thread (the node API
//! runs the claims attestor in `spawn_blocking`).

use std::sync::Mutex;

use agentd_attestor::node::{SeenError, SeenTokens};

/// Most token ids kept (same bound as the in-memory cache had).
pub const MAX_SEEN: usize = agentd_attestor::node::claims::MAX_SEEN_JTI;

#[derive(Debug)]
pub struct SledSeenTokens {
    db: sled::Db,
    tree: sled::Tree,
    max: usize,
    /// How many ids the tree holds; the lock also serialises every write (the store's
    /// directory lock keeps other processes out), so check-then-insert is atomic.
    count: Mutex<usize>,
}

fn store_err(e: impl std::fmt::Display) -> SeenError {
    SeenError::Store {
        reason: e.to_string(),
    }
}

fn until_of(v: &[u8]) -> i64 {
    <[u8; 8]>::try_from(v).map(i64::from_be_bytes).unwrap_or(0)
}

impl SledSeenTokens {
    pub fn new(db: sled::Db, tree: sled::Tree) -> Self {
        Self::with_max(db, tree, MAX_SEEN)
    }

    pub fn with_max(db: sled::Db, tree: sled::Tree, max: usize) -> Self {
        let count = Mutex::new(tree.len());
        Self {
            db,
            tree,
            max,
            count,
        }
    }

    /// Every id kept (digest) and until when.
    pub fn list(&self) -> Result<Vec<(Vec<u8>, i64)>, SeenError> {
        self.tree
            .iter()
            .map(|item| {
                let (k, v) = item.map_err(store_err)?;
                Ok((k.to_vec(), until_of(&v)))
            })
            .collect()
    }

    /// Removes the ids whose time has passed; returns how many are left.
    fn prune(&self, now: i64) -> Result<usize, SeenError> {
        let mut left = 0;
        for item in self.tree.iter() {
            let (k, v) = item.map_err(store_err)?;
            if until_of(&v) <= now {
                self.tree.remove(k).map_err(store_err)?;
            } else {
                left += 1;
            }
        }
        Ok(left)
    }
}

impl SeenTokens for SledSeenTokens {
    fn first_use(&self, id: &str, until: i64, now: i64) -> Result<(), SeenError> {
        let key = ring::digest::digest(&ring::digest::SHA256, id.as_bytes());
        let mut count = self.count.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.tree.get(key.as_ref()).map_err(store_err)?;
        if old.as_ref().is_some_and(|v| until_of(v) > now) {
            return Err(SeenError::Replayed);
        }
        if old.is_none() && *count >= self.max {
            *count = self.prune(now)?;
            if *count >= self.max {
                return Err(SeenError::Full);
            }
        }
        if self
            .tree
            .insert(key.as_ref(), &until.to_be_bytes())
            .map_err(store_err)?
            .is_none()
        {
            *count += 1;
        }
        // Durable before the token is accepted: a crash right after must not forget it.
        self.db.flush().map_err(store_err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &std::path::Path, max: usize) -> SledSeenTokens {
        let db = crate::datastore::sled_store::open_db(dir).unwrap();
        let tree = db.open_tree("seen_tokens").unwrap();
        SledSeenTokens::with_max(db, tree, max)
    }

    #[test]
    fn an_id_is_refused_until_it_expires_even_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = open(dir.path(), 10);
            s.first_use("jti-1", 1_000, 500).unwrap();
            assert_eq!(s.first_use("jti-1", 1_000, 600), Err(SeenError::Replayed));
        }
        let s = open(dir.path(), 10);
        assert_eq!(
            s.first_use("jti-1", 1_000, 700),
            Err(SeenError::Replayed),
            "forgotten across a reopen"
        );
        // Once its time has passed, the id may be used again (the token itself is expired
        // by then; the attestor refuses it for that).
        s.first_use("jti-1", 2_000, 1_000).unwrap();
    }

    #[test]
    fn the_store_is_bounded_and_pruned_at_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), 2);
        s.first_use("a", 100, 0).unwrap();
        s.first_use("b", 200, 0).unwrap();
        assert_eq!(s.first_use("c", 300, 50), Err(SeenError::Full));
        // At 150, "a" has expired and is pruned to make room.
        s.first_use("c", 300, 150).unwrap();
        assert_eq!(s.tree.len(), 2);
        assert_eq!(s.first_use("b", 300, 150), Err(SeenError::Replayed));
    }
}
