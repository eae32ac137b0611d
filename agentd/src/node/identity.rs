//! The node agent's own identity: its node SVID, key and the trust bundle, persisted in the
//! data dir so that a restart does not need a new join token.

use std::path::Path;
use std::time::SystemTime;

use agentd_proto::node as pb;
use prost::Message;
use spiffe::SpiffeId;

use crate::bundle::Bundle;
use crate::clock::from_unix_seconds;
use crate::convert::{bundle_from_proto, bundle_to_proto};
use crate::keys::{write_secret_file, KeyError, PrivateKey};

const SVID_FILE: &str = "node-svid.pb";
const KEY_FILE: &str = "node-svid.key";
const BUNDLE_FILE: &str = "bundle.pb";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("server response: {0}")]
    Response(String),
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// The node's SVID, key and the bundle it trusts.
#[derive(Debug)]
pub struct NodeIdentity {
    pub spiffe_id: SpiffeId,
    /// DER, leaf first.
    pub chain: Vec<Vec<u8>>,
    pub key: PrivateKey,
    pub serial: String,
    pub expires_at: SystemTime,
    pub bundle: Bundle,
}

impl NodeIdentity {
    /// Builds the identity from the server's answer to Attest or RenewNodeSvid.
    pub fn from_response(
        svid: Option<pb::X509Svid>,
        key: PrivateKey,
        bundle: Bundle,
    ) -> Result<Self, IdentityError> {
        let svid = svid.ok_or_else(|| IdentityError::Response("no SVID in response".into()))?;
        let spiffe_id = SpiffeId::new(&svid.spiffe_id)
            .map_err(|e| IdentityError::Response(format!("spiffe_id: {e}")))?;
        if svid.cert_chain.is_empty() {
            return Err(IdentityError::Response("empty certificate chain".into()));
        }
        Ok(Self {
            spiffe_id,
            chain: svid.cert_chain,
            key,
            serial: svid.serial,
            expires_at: from_unix_seconds(svid.expires_at),
            bundle,
        })
    }

    /// Loads a persisted identity; `Ok(None)` when there is none.
    pub fn load(dir: &Path) -> Result<Option<Self>, IdentityError> {
        let svid_path = dir.join(SVID_FILE);
        if !svid_path.exists() {
            return Ok(None);
        }
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read(&p).map_err(|e| IdentityError::File {
                path: p.display().to_string(),
                reason: e.to_string(),
            })
        };
        let corrupt = |name: &str, e: &dyn std::fmt::Display| IdentityError::File {
            path: dir.join(name).display().to_string(),
            reason: e.to_string(),
        };
        let svid = pb::X509Svid::decode(read(SVID_FILE)?.as_slice())
            .map_err(|e| corrupt(SVID_FILE, &e))?;
        let bundle = pb::Bundle::decode(read(BUNDLE_FILE)?.as_slice())
            .map_err(|e| corrupt(BUNDLE_FILE, &e))?;
        let bundle = bundle_from_proto(&bundle).map_err(|e| corrupt(BUNDLE_FILE, &e))?;
        let key = PrivateKey::load(&dir.join(KEY_FILE))?;
        Self::from_response(Some(svid), key, bundle)
            .map(Some)
            .map_err(|e| corrupt(SVID_FILE, &e))
    }

    /// Persists the identity (every file 0600, written atomically).
    pub fn save(&self, dir: &Path) -> Result<(), IdentityError> {
        let svid = pb::X509Svid {
            spiffe_id: self.spiffe_id.to_string(),
            cert_chain: self.chain.clone(),
            expires_at: crate::clock::unix_seconds(self.expires_at),
            serial: self.serial.clone(),
        };
        self.key.save(&dir.join(KEY_FILE))?;
        write_secret_file(&dir.join(SVID_FILE), &svid.encode_to_vec())?;
        write_secret_file(
            &dir.join(BUNDLE_FILE),
            &bundle_to_proto(&self.bundle).encode_to_vec(),
        )?;
        Ok(())
    }

    /// Persists only a new bundle.
    pub fn save_bundle(dir: &Path, bundle: &Bundle) -> Result<(), IdentityError> {
        write_secret_file(
            &dir.join(BUNDLE_FILE),
            &bundle_to_proto(bundle).encode_to_vec(),
        )?;
        Ok(())
    }
}
