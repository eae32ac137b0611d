//! Agent-to-agent delegation: offers (delegation tokens) and their exchange.

use agentd_proto::node as pb;
use tonic::{Request, Response, Status};

use super::{NodeApi, NodeApiError};
use crate::audit::{Actor, AuditRecord};
use crate::clock::unix_seconds;
use crate::tls::PeerIdentity;

impl NodeApi {
    pub(super) async fn offer_delegation(
        &self,
        request: Request<pb::MintDelegationTokenRequest>,
    ) -> Result<Response<pb::MintDelegationTokenResponse>, Status> {
        // The token is a JWT-SVID: ordered with revocations as every mint is.
        let issuing = self.state.revocations.issuing().await;
        let node = self
            .caller(request.extensions().get::<PeerIdentity>())
            .await?;
        let req = request.into_inner();
        let entry = self.entry_for_node(&node, &req.entry_id).await?;
        let token = crate::server::grants::mint_delegation_token(&self.state, &entry, &node, &req)
            .await
            .map_err(|e| {
                tracing::warn!(from = %entry.spec.spiffe_id, to = %req.to, reason = %e, "delegation refused");
                e
            })?;
        drop(issuing);
        tracing::info!(from = %entry.spec.spiffe_id, to = %req.to, grant = %req.grant_id, "delegation token issued");
        self.state
            .audit
            .record(
                AuditRecord::new("delegation.offer", Actor::from(&entry.spec.spiffe_id))
                    .subject(&entry.spec.spiffe_id)
                    .field("node", node.spiffe_id.to_string())
                    .field("grant", &req.grant_id)
                    .field("to", &req.to)
                    .field("scopes", &req.scopes)
                    .field("jti", &token.jti)
                    .field("expires_at", unix_seconds(token.expires_at)),
            )
            .await
            .map_err(NodeApiError::from)?;
        Ok(Response::new(pb::MintDelegationTokenResponse {
            token: token.token,
            expires_at: unix_seconds(token.expires_at),
        }))
    }

    pub(super) async fn exchange_delegation(
        &self,
        request: Request<pb::ExchangeDelegationTokenRequest>,
    ) -> Result<Response<pb::ExchangeDelegationTokenResponse>, Status> {
        let node = self
            .caller(request.extensions().get::<PeerIdentity>())
            .await?;
        let req = request.into_inner();
        let entry = self.entry_for_node(&node, &req.entry_id).await?;
        let grant = crate::server::grants::exchange_delegation_token(&self.state, &entry, &req.token)
            .await
            .map_err(|e| {
                tracing::warn!(agent = %entry.spec.spiffe_id, reason = %e, "delegation token exchange refused");
                e
            })?;
        tracing::info!(agent = %entry.spec.spiffe_id, grant = %grant.id, parent = ?grant.parent_grant_id.as_ref().map(ToString::to_string), "delegated grant created by exchange");
        self.state
            .audit
            .record(
                crate::server::grants::grant_audit(
                    AuditRecord::new("delegation.exchange", Actor::from(&entry.spec.spiffe_id)),
                    &grant,
                )
                .field("node", node.spiffe_id.to_string()),
            )
            .await
            .map_err(NodeApiError::from)?;
        Ok(Response::new(pb::ExchangeDelegationTokenResponse {
            grant: Some(crate::server::grants::grant_to_node_proto(&grant)),
        }))
    }
}
