//! Who is calling: every node API call but `Attest` comes over mTLS with a node SVID, and
//! is checked here once (the node still known, the SVID its current one, not revoked).

use spiffe::SpiffeId;

use super::{NodeApi, NodeApiError};
use crate::clock::unix_seconds;
use crate::datastore::AttestedNode;
use crate::revocation::RevocationHandle;
use crate::tls::PeerIdentity;

impl NodeApi {
    /// The calling node, from its client certificate: the server must still know the node,
    /// and the certificate must be the node SVID it issued last. A workload SVID that
    /// happens to carry a node's SPIFFE ID, or the old SVID of an evicted node, is refused.
    pub(super) async fn caller(
        &self,
        peer: Option<&PeerIdentity>,
    ) -> Result<AttestedNode, NodeApiError> {
        let (id, serial) = peer
            .and_then(|p| Some((p.spiffe_id.clone()?, p.serial.clone()?)))
            .ok_or(NodeApiError::NoClientCertificate)?;
        self.check_node_not_revoked(&id)?;
        if self.state.revocations.is_serial_revoked(&serial) {
            return Err(NodeApiError::SvidRevoked { serial });
        }
        let node = self
            .state
            .store
            .get_node(&id)
            .await?
            .ok_or_else(|| NodeApiError::UnknownNode(id.to_string()))?;
        // The current node SVID, or the one before the last renewal (see `previous_serial`).
        if node.serial != serial && node.previous_serial.as_deref() != Some(serial.as_str()) {
            tracing::warn!(node = %id, presented = %serial, "node API call with a certificate that is not the node's current SVID");
            return Err(NodeApiError::StaleNodeSvid {
                spiffe_id: id.to_string(),
                presented: serial,
            });
        }
        let expires_at = if serial == node.serial {
            node.svid_expires_at
        } else {
            // A record written before the previous SVID's expiry was kept has none: that
            // SVID was issued before the current one, so it expires no later (same TTL).
            node.previous_svid_expires_at
                .unwrap_or(node.svid_expires_at)
        };
        if expires_at <= unix_seconds(self.state.clock.now()) {
            // rustls checks expiry at the handshake only; a long-lived connection must not
            // outlive the SVID it was opened with, the current one or the one before.
            return Err(NodeApiError::NodeSvidExpired {
                spiffe_id: id.to_string(),
                presented: serial,
                expired_at: expires_at,
            });
        }
        Ok(node)
    }

    /// The kill switch: a revoked node may not call, nor attest again, while the revocation
    /// stands.
    pub(super) fn check_node_not_revoked(&self, id: &SpiffeId) -> Result<(), NodeApiError> {
        match self
            .state
            .revocations
            .standing(&RevocationHandle::Node(id.clone()))
        {
            Some(sequence) => Err(NodeApiError::NodeRevoked {
                spiffe_id: id.to_string(),
                sequence,
            }),
            None => Ok(()),
        }
    }
}
