//! The audit key: an HMAC-SHA256 key kept in a file of its own in the data dir, outside the
//! store. The store holds every record and hash, so whoever can write it can rewrite a record
//! and recompute the chain and the head; the MACs made with this key (one per record, one
//! over the head; see [`ChainSigner`]) cannot be recomputed without it.
//!
//! The file is 32 random bytes, mode 0600, written once at the first start (atomically, never
//! over an existing file) and never deleted or replaced by the server: losing it makes every
//! record written since unverifiable, so a server whose log is signed refuses to start
//! without it (see [`super::Audit::open`]).

use std::io::Read as _;
use std::path::Path;

use ring::hmac;
use zeroize::Zeroizing;

use super::{AuditError, ChainSigner};

/// The key file's name in the data dir.
pub const KEY_FILE: &str = "audit.key";
const KEY_LEN: usize = 32;
/// Domains of the two MACs: a record's cannot be presented as a head's.
const RECORD_DOMAIN: &[u8] = b"agentd-audit-record-mac-v1\n";
const HEAD_DOMAIN: &[u8] = b"agentd-audit-head-mac-v1\n";
/// Domain of the key's fingerprint (recorded in the store to tell one key from another).
const KEY_ID_DOMAIN: &[u8] = b"agentd-audit-key-id-v1\n";

/// The HMAC key. Its bytes live in zeroizing memory and never appear in Debug output.
pub struct AuditKey {
    secret: Zeroizing<[u8; KEY_LEN]>,
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditKey(<redacted>)")
    }
}

fn key_error(path: &Path, reason: impl Into<String>) -> AuditError {
    AuditError::Key {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

impl AuditKey {
    /// A fresh random key (not saved).
    pub fn generate() -> Self {
        let mut secret = Zeroizing::new([0u8; KEY_LEN]);
        rand::fill(&mut secret[..]);
        Self { secret }
    }

    /// Reads the key file; `Ok(None)` when there is none.
    pub fn load(path: &Path) -> Result<Option<Self>, AuditError> {
        let mut file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(key_error(path, e.to_string())),
        };
        let mut bytes = Zeroizing::new(Vec::with_capacity(KEY_LEN + 1));
        // One byte more than a key, to tell a long file from a key.
        (&mut file)
            .take(KEY_LEN as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| key_error(path, e.to_string()))?;
        if bytes.len() != KEY_LEN {
            return Err(key_error(
                path,
                format!(
                    "holds {} bytes, expected exactly {KEY_LEN}",
                    if bytes.len() > KEY_LEN {
                        format!("more than {KEY_LEN}")
                    } else {
                        bytes.len().to_string()
                    }
                ),
            ));
        }
        let mut secret = Zeroizing::new([0u8; KEY_LEN]);
        secret.copy_from_slice(&bytes);
        Ok(Some(Self { secret }))
    }

    /// Writes a new key to `path` with mode 0600, fsynced, and fails if a file is already
    /// there: the temp file is hard-linked into place, which never replaces one.
    pub fn create(path: &Path) -> Result<Self, AuditError> {
        use std::io::Write as _;
        use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
        let key = Self::generate();
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        };
        let tmp = dir.join(format!(
            ".{KEY_FILE}.tmp.{}.{}",
            std::process::id(),
            hex::encode(rand::random::<[u8; 6]>())
        ));
        let result = (|| -> std::io::Result<()> {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            // The umask may have narrowed the mode; set it exactly.
            file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            file.write_all(&key.secret[..])?;
            file.sync_all()?;
            std::fs::hard_link(&tmp, path)?;
            if let Ok(d) = std::fs::File::open(&dir) {
                // Best effort: persist the new name itself.
                let _ = d.sync_all();
            }
            Ok(())
        })();
        let _ = std::fs::remove_file(&tmp);
        result.map_err(|e| key_error(path, e.to_string()))?;
        Ok(key)
    }

    fn mac(&self, domain: &[u8], parts: &[&[u8]]) -> String {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.secret[..]);
        let mut ctx = hmac::Context::with_key(&key);
        ctx.update(domain);
        for p in parts {
            ctx.update(p);
        }
        hex::encode(ctx.sign())
    }

    /// The key's fingerprint: an HMAC of a fixed string, which tells keys apart and gives
    /// nothing of the key away.
    pub fn key_id(&self) -> String {
        self.mac(KEY_ID_DOMAIN, &[])
    }

    /// Whether `mac` is the record MAC of `hash` (compared in constant time).
    pub fn verify_record(&self, hash: &str, mac: &str) -> bool {
        constant_time_eq(&self.record_mac(hash), mac)
    }

    /// Whether `mac` is the head MAC of (`seq`, `hash`) (compared in constant time).
    pub fn verify_head(&self, seq: u64, hash: &str, mac: &str) -> bool {
        constant_time_eq(&self.head_mac(seq, hash), mac)
    }
}

/// Compares secrets without an early exit on the first differing byte.
pub(crate) fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl ChainSigner for AuditKey {
    fn record_mac(&self, hash: &str) -> String {
        self.mac(RECORD_DOMAIN, &[hash.as_bytes()])
    }

    fn head_mac(&self, seq: u64, hash: &str) -> String {
        self.mac(
            HEAD_DOMAIN,
            &[seq.to_string().as_bytes(), b"\n", hash.as_bytes()],
        )
    }
}
