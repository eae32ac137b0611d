//! The node agent's link to the server: attestation on first start, then mTLS with the node
//! SVID for every call. The channel is rebuilt after transport errors and after the node SVID
//! is renewed.

use std::sync::Arc;

use agentd_attestor::node::agent::{self as attestor, AttestorConfig, PopKey};
use agentd_proto::node as pb;
use agentd_proto::node::node_client::NodeClient;
use spiffe::TrustDomain;
use tokio::sync::Mutex;
use tonic::transport::Channel;

use super::identity::{IdentityError, NodeIdentity};
use super::NodeError;
use crate::bundle::Bundle;
use crate::convert::bundle_from_proto;
use crate::keys::PrivateKey;
use crate::tls;

/// Largest response we accept from the server.
const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Attests with a join token; returns the new identity.
pub async fn attest_with_join_token(
    address: &str,
    bootstrap_roots: Option<&[Vec<u8>]>,
    expected_trust_domain: Option<&TrustDomain>,
    token: &str,
) -> Result<NodeIdentity, NodeError> {
    attest(
        address,
        bootstrap_roots,
        expected_trust_domain,
        &AttestorConfig::JoinToken(token.to_string()),
    )
    .await
}

/// Attests with the configured attestor (files are read now); returns the new identity.
pub async fn attest(
    address: &str,
    bootstrap_roots: Option<&[Vec<u8>]>,
    expected_trust_domain: Option<&TrustDomain>,
    attestor: &AttestorConfig,
) -> Result<NodeIdentity, NodeError> {
    attest_any(
        &tls::ServerAddresses::one(address),
        bootstrap_roots,
        expected_trust_domain,
        attestor,
    )
    .await
}

/// [`attest`] with whichever of the servers answers.
pub async fn attest_any(
    addresses: &tls::ServerAddresses,
    bootstrap_roots: Option<&[Vec<u8>]>,
    expected_trust_domain: Option<&TrustDomain>,
    attestor: &AttestorConfig,
) -> Result<NodeIdentity, NodeError> {
    let expected = expected_trust_domain.map(tls::server_spiffe_id);
    let cfg = tls::client_config(bootstrap_roots.unwrap_or(&[]), expected, None)?;
    let channel = tls::connect_any(addresses, cfg).await?;
    let mut client = NodeClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let refused = |s: tonic::Status| NodeError::Attestation(s.message().to_string());
    let attestation = match attestor {
        AttestorConfig::JoinToken(token) => {
            pb::attest_request::Attestation::JoinToken(pb::JoinTokenAttestation {
                token: token.clone(),
            })
        }
        AttestorConfig::Claims { token_file } => {
            pb::attest_request::Attestation::Claims(pb::ClaimsAttestation {
                token: attestor::read_token(token_file)?,
            })
        }
        AttestorConfig::X509Pop {
            cert_file,
            key_file,
        } => {
            let cert_chain = attestor::read_cert_chain(cert_file)?;
            let pop_key = PopKey::load(key_file)?;
            let challenge = client
                .x509_pop_challenge(pb::X509PopChallengeRequest {
                    cert_chain: cert_chain.clone(),
                })
                .await
                .map_err(refused)?
                .into_inner();
            let mut message = challenge.nonce.clone();
            message.extend_from_slice(challenge.context.as_bytes());
            pb::attest_request::Attestation::X509pop(pb::X509PopAttestation {
                cert_chain,
                nonce: challenge.nonce,
                signature: pop_key.sign(&message)?,
            })
        }
    };
    let key = PrivateKey::generate()?;
    let csr = key.csr_der()?;
    let resp = client
        .attest(pb::AttestRequest {
            attestation: Some(attestation),
            csr,
        })
        .await
        .map_err(refused)?
        .into_inner();
    let bundle = resp
        .bundle
        .as_ref()
        .ok_or_else(|| IdentityError::Response("no bundle in response".into()))
        .and_then(|b| bundle_from_proto(b).map_err(|e| IdentityError::Response(e.to_string())))?;
    Ok(NodeIdentity::from_response(resp.svid, key, bundle)?)
}

/// The authenticated link to the server: to one of the servers of the trust domain, the
/// next that answers when it goes away (see `tls::ServerAddresses`).
#[derive(Debug)]
pub struct ServerLink {
    addresses: tls::ServerAddresses,
    identity: std::sync::RwLock<Arc<NodeIdentity>>,
    channel: Mutex<Option<Channel>>,
}

impl ServerLink {
    pub fn new(address: String, identity: NodeIdentity) -> Self {
        Self::with_addresses(tls::ServerAddresses::new(vec![address]), identity)
    }

    pub fn with_addresses(addresses: tls::ServerAddresses, identity: NodeIdentity) -> Self {
        Self {
            addresses,
            identity: std::sync::RwLock::new(Arc::new(identity)),
            channel: Mutex::new(None),
        }
    }

    /// The server address in use (or to be tried first).
    pub fn current_address(&self) -> &str {
        self.addresses.current()
    }

    pub fn identity(&self) -> Arc<NodeIdentity> {
        self.identity
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A client over mTLS with the current node SVID, connecting if needed.
    pub async fn client(&self) -> Result<NodeClient<Channel>, NodeError> {
        let mut guard = self.channel.lock().await;
        if let Some(ch) = guard.as_ref() {
            return Ok(NodeClient::new(ch.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES));
        }
        let id = self.identity();
        let cfg = tls::client_config(
            &id.bundle.x509_authorities,
            Some(tls::server_spiffe_id(&id.bundle.trust_domain)),
            Some((&id.chain, &id.key)),
        )?;
        let ch = tls::connect_any(&self.addresses, cfg).await?;
        *guard = Some(ch.clone());
        Ok(NodeClient::new(ch).max_decoding_message_size(MAX_MESSAGE_BYTES))
    }

    /// Forgets the channel so that the next call reconnects.
    pub async fn reset(&self) {
        *self.channel.lock().await = None;
    }

    /// After a failed round with the server: forgets the channel, and with several
    /// addresses moves to the next one, so that a server that accepts connections but fails
    /// calls (its database unreachable, say) is left too. Whichever address the next
    /// connection reaches first still goes through the usual choice.
    /// `on` is [`Self::position`] when the failed call started: a failure seen after
    /// another one already moved the link changes nothing.
    pub async fn fail_over(&self, on: usize) {
        if self.addresses.all().len() < 2 {
            self.reset().await;
            return;
        }
        if self.addresses.advance(on) {
            let from = self.addresses.all().get(on).cloned().unwrap_or_default();
            tracing::warn!(%from, to = %self.addresses.current(), "the server failed a call; trying the next server address");
            self.reset().await;
        }
    }

    /// Which server address is in use, for [`Self::fail_over`].
    pub fn position(&self) -> usize {
        self.addresses.position()
    }

    /// Switches to a renewed node SVID (new connections present it).
    pub async fn replace_identity(&self, identity: NodeIdentity) {
        *self.identity.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(identity);
        self.reset().await;
    }

    /// Keeps the identity but trusts a new bundle (the server rotated its CA).
    pub async fn update_bundle(&self, bundle: Bundle) {
        let cur = self.identity();
        if cur.bundle == bundle {
            return;
        }
        let next = NodeIdentity {
            spiffe_id: cur.spiffe_id.clone(),
            chain: cur.chain.clone(),
            key: match PrivateKey::from_pkcs8_der(cur.key.pkcs8_der()) {
                Ok(k) => k,
                Err(e) => {
                    tracing::error!(error = %e, "copying the node key failed");
                    return;
                }
            },
            serial: cur.serial.clone(),
            expires_at: cur.expires_at,
            bundle,
        };
        self.replace_identity(next).await;
    }
}
