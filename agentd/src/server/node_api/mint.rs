//! SVID minting for the workloads a node serves: X.509 batches and JWT-SVIDs.

use std::time::Duration;

use agentd_proto::node as pb;
use spiffe::SpiffeId;
use tonic::{Request, Response, Status};

use super::MAX_BATCH;
use super::{NodeApi, NodeApiError};
use crate::audit::{Actor, AuditRecord};
use crate::ca::{IssuedX509Svid, JwtSvidParams, X509SvidParams};
use crate::clock::unix_seconds;
use crate::datastore::{AttestedNode, Entry, EntryId};
use crate::revocation::RevocationHandle;
use crate::server::issuance;
use crate::telemetry::SvidKind as MintedKind;
use crate::tls::PeerIdentity;

fn parse_entry_id(raw: &str) -> Result<EntryId, NodeApiError> {
    raw.parse().map_err(|e| NodeApiError::InvalidField {
        field: "entry_id",
        reason: format!("{e}"),
    })
}

pub fn svid_to_proto(s: &IssuedX509Svid) -> pb::X509Svid {
    pb::X509Svid {
        spiffe_id: s.spiffe_id.to_string(),
        cert_chain: s.cert_chain.clone(),
        expires_at: unix_seconds(s.not_after),
        serial: s.serial.clone(),
    }
}

impl NodeApi {
    pub(super) async fn entry_for_node(
        &self,
        node: &AttestedNode,
        raw_id: &str,
    ) -> Result<Entry, NodeApiError> {
        let id = parse_entry_id(raw_id)?;
        let entry = self.state.store.get_entry(&id).await?;
        self.served_entry(node, id, entry).await
    }

    /// `entry` (the record of `id`, if any) when `node` serves it and it is not revoked.
    async fn served_entry(
        &self,
        node: &AttestedNode,
        id: EntryId,
        entry: Option<Entry>,
    ) -> Result<Entry, NodeApiError> {
        let server_id = crate::tls::server_spiffe_id(&self.state.config.trust_domain);
        let entry = match entry {
            Some(e)
                if crate::server::membership::node_serves(
                    self.state.store.as_ref(),
                    &server_id,
                    node,
                    &e,
                    &self.state.revocations,
                )
                .await? =>
            {
                e
            }
            _ => return Err(NodeApiError::EntryNotAuthorized(id.to_string())),
        };
        // A revoked handle is never re-issued while it stands.
        if let Some(sequence) = self
            .state
            .revocations
            .standing(&RevocationHandle::Entry(entry.id.clone()))
        {
            return Err(NodeApiError::EntryRevoked {
                id: entry.id.to_string(),
                sequence,
            });
        }
        Ok(entry)
    }

    /// Refuses an entry whose owner is disabled when the server suspends such entries; the
    /// refusal is recorded.
    pub(super) async fn check_not_suspended(
        &self,
        node: &AttestedNode,
        entry: &Entry,
        kind: &str,
    ) -> Result<(), NodeApiError> {
        let suspend = self.state.config.suspend_disabled_owners;
        if !crate::server::ownership::is_suspended(self.state.store.as_ref(), entry, suspend)
            .await?
        {
            return Ok(());
        }
        let owner = entry.spec.owner.clone().unwrap_or_default();
        let err = NodeApiError::EntrySuspended {
            entry: entry.id.to_string(),
            owner: owner.clone(),
        };
        self.state
            .audit
            .record_or_log(
                AuditRecord::new(format!("{kind}.refuse"), Actor::from(&node.spiffe_id))
                    .subject(&entry.spec.spiffe_id)
                    .field("entry", entry.id.as_str())
                    .field("node", node.spiffe_id.to_string())
                    .field("owner", owner)
                    .field("reason", err.to_string()),
            )
            .await;
        Err(err)
    }

    pub(super) fn sign(
        &self,
        csr: &[u8],
        id: &SpiffeId,
        ttl: Duration,
        dns: &[String],
    ) -> Result<IssuedX509Svid, NodeApiError> {
        Ok(self.state.ca.sign_x509_svid(
            &X509SvidParams {
                csr_der: csr,
                spiffe_id: id,
                ttl,
                dns_names: dns,
                extensions: &[],
            },
            self.state.clock.now(),
        )?)
    }

    /// A plain workload SVID: it carries the entry's scopes (its ceiling) in the scope
    /// extension, and no delegation.
    fn sign_plain(&self, csr: &[u8], entry: &Entry) -> Result<IssuedX509Svid, NodeApiError> {
        let scopes = crate::server::grants::entry_scopes(entry);
        let ext = crate::delegation::x509ext::svid_extensions(
            &self.state.config.delegation.oid_base,
            &scopes,
            None,
        );
        Ok(self.state.ca.sign_x509_svid(
            &X509SvidParams {
                csr_der: csr,
                spiffe_id: &entry.spec.spiffe_id,
                ttl: entry.spec.x509_svid_ttl.as_duration(),
                dns_names: &entry.spec.dns_names,
                extensions: &ext,
            },
            self.state.clock.now(),
        )?)
    }

    /// A delegated SVID for `grant_id`, if `authorize_grant_mint` allows it.
    async fn sign_for_grant(
        &self,
        csr: &[u8],
        entry: &Entry,
        grant_id: &str,
    ) -> Result<(IssuedX509Svid, crate::datastore::Grant), NodeApiError> {
        let grant = self.grant_for_mint(entry, grant_id).await?;
        let svid = crate::server::grants::sign_delegated_x509(&self.state, &grant, entry, csr)?;
        Ok((svid, grant))
    }

    /// The grant `grant_id`, if `authorize_grant_mint` allows minting for it now and no
    /// grant of its chain, nor its task, is revoked.
    async fn grant_for_mint(
        &self,
        entry: &Entry,
        grant_id: &str,
    ) -> Result<crate::datastore::Grant, NodeApiError> {
        let grant = crate::server::grants::load_grant(
            self.state.store.as_ref(),
            &crate::server::grants::parse_grant_id(grant_id)?,
        )
        .await?;
        crate::server::grants::authorize_grant_mint(
            &grant,
            entry,
            unix_seconds(self.state.clock.now()),
        )?;
        crate::server::grants::check_not_revoked(&self.state.revocations, &grant)?;
        Ok(grant)
    }

    pub(super) async fn mint_x509(
        &self,
        request: Request<pb::MintX509SvidsRequest>,
    ) -> Result<Response<pb::MintX509SvidsResponse>, Status> {
        // From the first standing check (the caller's node) until the batch is on record:
        // a revocation waits for it, or it sees the revocation (see `RevocationLog::issuing`).
        let issuing = self.state.revocations.issuing().await;
        let node = self
            .caller(request.extensions().get::<PeerIdentity>())
            .await?;
        let params = request.into_inner().params;
        if params.len() > MAX_BATCH {
            return Err(NodeApiError::InvalidField {
                field: "params",
                reason: format!("{} CSRs in one call; at most {MAX_BATCH}", params.len()),
            }
            .into());
        }
        // Every entry of the batch in one read (one query on PostgreSQL, not one per CSR).
        let wanted: Vec<EntryId> = params
            .iter()
            .filter_map(|p| p.entry_id.parse().ok())
            .collect();
        let entries = self
            .state
            .store
            .get_entries(&wanted)
            .await
            .map_err(NodeApiError::from)?;
        let mut results = Vec::with_capacity(params.len());
        let mut records = Vec::new();
        let mut revocable = Vec::new();
        for p in params {
            let result: Result<pb::mint_result::Result, NodeApiError> = async {
                let id = parse_entry_id(&p.entry_id)?;
                let record = entries.get(&id).cloned();
                let entry = self.served_entry(&node, id, record).await?;
                self.check_not_suspended(&node, &entry, "x509svid").await?;
                let started = std::time::Instant::now();
                let (svid, grant) = if p.grant_id.is_empty() {
                    (self.sign_plain(&p.csr, &entry)?, None)
                } else {
                    let (svid, grant) = self.sign_for_grant(&p.csr, &entry, &p.grant_id).await?;
                    (svid, Some(grant))
                };
                self.state
                    .metrics
                    .svid_minted(MintedKind::X509, started.elapsed());
                let expires_at = unix_seconds(svid.not_after);
                let (grant_chain, task_id) = issuance::grant_lineage(grant.as_ref());
                tracing::debug!(spiffe_id = %svid.spiffe_id, serial = %svid.serial, entry = %entry.id, grant = ?grant.as_ref().map(|g| g.id.to_string()), node = %node.spiffe_id, "X.509-SVID issued");
                records.push(
                    issuance::audit_record("x509svid.issue", &node, &entry, expires_at)
                        .field("serial", &svid.serial)
                        .field("ttl", entry.spec.x509_svid_ttl.as_secs())
                        .field("dns_names", &entry.spec.dns_names)
                        .field("grant_chain", &grant_chain)
                        .field("task", &task_id),
                );
                revocable.push(issuance::x509_svid_record(
                    &svid, &entry, &node, grant_chain, task_id,
                ));
                Ok(pb::mint_result::Result::Svid(svid_to_proto(&svid)))
            }
            .await;
            results.push(pb::MintResult {
                result: Some(
                    result.unwrap_or_else(|e| pb::mint_result::Result::Error(e.to_string())),
                ),
            });
        }
        // Every SVID handed out is on record first, in one durable write with its audit
        // record (what revocation handles resolve to, and what entry activity derives from):
        // if it cannot be written, none is handed out (the node agent asks again).
        self.state
            .audit
            .record_issuance(&revocable, records)
            .await
            .map_err(NodeApiError::from)?;
        drop(issuing);
        Ok(Response::new(pb::MintX509SvidsResponse { results }))
    }

    pub(super) async fn mint_jwt(
        &self,
        request: Request<pb::MintJwtSvidRequest>,
    ) -> Result<Response<pb::MintJwtSvidResponse>, Status> {
        let issuing = self.state.revocations.issuing().await;
        let node = self
            .caller(request.extensions().get::<PeerIdentity>())
            .await?;
        let req = request.into_inner();
        let entry = self.entry_for_node(&node, &req.entry_id).await?;
        crate::svid::audience::validate_audience(&req.audience).map_err(NodeApiError::from)?;
        self.check_not_suspended(&node, &entry, "jwtsvid").await?;
        let started = std::time::Instant::now();
        let (jwt, grant) = if req.grant_id.is_empty() {
            // A plain JWT-SVID carries the entry's scopes (RFC 8693 `scope`).
            let extra = crate::delegation::claims::to_claims(
                &crate::server::grants::entry_scopes(&entry),
                None,
            );
            let jwt = self
                .state
                .ca
                .sign_jwt_svid(
                    &JwtSvidParams {
                        spiffe_id: &entry.spec.spiffe_id,
                        audience: &req.audience,
                        ttl: entry.spec.jwt_svid_ttl.as_duration(),
                        claims: Some(&extra),
                    },
                    self.state.clock.now(),
                )
                .map_err(NodeApiError::from)?;
            (jwt, None)
        } else {
            let grant = self.grant_for_mint(&entry, &req.grant_id).await?;
            let jwt = crate::server::grants::sign_delegated_jwt(
                &self.state,
                &grant,
                &entry,
                &req.audience,
            )
            .map_err(NodeApiError::from)?;
            (jwt, Some(grant))
        };
        let (grant_chain, task_id) = issuance::grant_lineage(grant.as_ref());
        self.state
            .metrics
            .svid_minted(MintedKind::Jwt, started.elapsed());
        tracing::debug!(spiffe_id = %entry.spec.spiffe_id, entry = %entry.id, "JWT-SVID issued");
        let expires_at = unix_seconds(jwt.expires_at);
        // The token's id, not the token: the log must not hold a usable credential.
        self.state
            .audit
            .record_issuance(
                &[issuance::jwt_svid_record(
                    &jwt,
                    &entry,
                    &node,
                    grant_chain.clone(),
                    task_id.clone(),
                )],
                vec![
                    issuance::audit_record("jwtsvid.issue", &node, &entry, expires_at)
                        .field("jti", &jwt.jti)
                        .field("audience", &req.audience)
                        .field("ttl", entry.spec.jwt_svid_ttl.as_secs())
                        .field("grant_chain", &grant_chain)
                        .field("task", &task_id),
                ],
            )
            .await
            .map_err(NodeApiError::from)?;
        drop(issuing);
        Ok(Response::new(pb::MintJwtSvidResponse {
            token: jwt.token,
            expires_at: unix_seconds(jwt.expires_at),
        }))
    }
}
