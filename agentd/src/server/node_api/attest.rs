//! Node attestation (join token, x509pop, claims) and node SVID renewal.

use agentd_attestor::node::NodeAttestation;
use agentd_proto::node as pb;
use spiffe::SpiffeId;
use tonic::{Request, Response, Status};

use super::svid_to_proto;
use super::{NodeApi, NodeApiError};
use crate::audit::{Actor, AuditRecord};
use crate::clock::unix_seconds;
use crate::convert::bundle_to_proto;
use crate::datastore::{AttestedNode, EntryFilter};
use crate::server::issuance;
use crate::tls::PeerIdentity;

impl NodeApi {
    /// A refused attestation, at any stage: counted by its fixed reason, and logged (the
    /// peer's text cut short). A refusal for being over the request budget is only logged
    /// at debug level: the interval's audit summary counts those.
    fn note_refused(&self, kind: &str, remote: Option<std::net::SocketAddr>, e: &NodeApiError) {
        self.state
            .metrics
            .attestation_failed(kind, super::status::attestation_failure(e));
        let reason = super::failures::truncate_reason(&e.to_string());
        if matches!(e, NodeApiError::RateLimited { .. }) {
            tracing::debug!(?remote, attestation = kind, %reason, "node attestation refused");
        } else {
            tracing::warn!(?remote, attestation = kind, %reason, "node attestation refused");
        }
    }

    /// Whether `remote` is within its budget of unauthenticated calls.
    fn admit(&self, remote: Option<std::net::SocketAddr>) -> Result<(), NodeApiError> {
        if self.failures.admit(remote) {
            return Ok(());
        }
        Err(NodeApiError::RateLimited {
            address: remote
                .map(|r| crate::tls::source_of(r.ip()).to_string())
                .unwrap_or_default(),
        })
    }

    /// A refusal before the caller proved anything: counted, and written to the audit log
    /// only when it is the first of its kind from its source in this interval.
    async fn record_anonymous_refusal(
        &self,
        kind: &'static str,
        stage: &'static str,
        remote: Option<std::net::SocketAddr>,
        e: &NodeApiError,
    ) {
        let detail = e.to_string();
        let refusal = super::failures::Refusal {
            remote,
            attestation_type: kind,
            stage,
            reason: super::status::attestation_failure(e).as_str(),
            detail: &detail,
        };
        if let Some(record) = self.failures.note(&refusal) {
            self.state.audit.record_or_log(record).await;
        }
    }

    /// Takes a join token (single use) and checks its expiry.
    async fn check_join_token(
        &self,
        token: &str,
        now: std::time::SystemTime,
    ) -> Result<NodeAttestation, NodeApiError> {
        if token.is_empty() || token.len() > 256 {
            return Err(NodeApiError::InvalidField {
                field: "join_token",
                reason: "must be 1 to 256 bytes".into(),
            });
        }
        let record = self
            .state
            .store
            .take_join_token(&crate::server::join_token::digest(token))
            .await?
            .ok_or(NodeApiError::UnknownJoinToken)?;
        if record.expires_at <= unix_seconds(now) {
            return Err(NodeApiError::ExpiredJoinToken);
        }
        Ok(NodeAttestation {
            spiffe_id: record.spiffe_id,
            attestation_type: "join_token",
            selectors: Vec::new(),
        })
    }

    pub(super) async fn attest_node(
        &self,
        request: Request<pb::AttestRequest>,
    ) -> Result<Response<pb::AttestResponse>, Status> {
        let remote = request
            .extensions()
            .get::<PeerIdentity>()
            .and_then(|p| p.remote_addr);
        let req = request.into_inner();
        let now = self.state.clock.now();
        let kind = match &req.attestation {
            Some(pb::attest_request::Attestation::JoinToken(_)) => "join_token",
            Some(pb::attest_request::Attestation::X509pop(_)) => "x509pop",
            Some(pb::attest_request::Attestation::Claims(_)) => "claims",
            None => "none",
        };
        // What attestation established before a later check failed, for the audit record.
        let mut attested_as: Option<(SpiffeId, Vec<String>)> = None;
        let result: Result<_, NodeApiError> = async {
            self.admit(remote)?;
            // A bad CSR is refused before any single-use credential (join token, nonce,
            // token jti) is spent on it.
            self.state.ca.check_csr(&req.csr)?;
            let attested = match req.attestation {
                Some(pb::attest_request::Attestation::JoinToken(t)) => {
                    self.check_join_token(&t.token, now).await?
                }
                Some(pb::attest_request::Attestation::X509pop(x)) => self
                    .attestors
                    .x509pop
                    .as_ref()
                    .ok_or(NodeApiError::AttestorNotEnabled("x509pop"))?
                    .attest(&x.cert_chain, &x.nonce, &x.signature, now)?,
                Some(pb::attest_request::Attestation::Claims(c)) => {
                    if self.attestors.claims.is_none() {
                        return Err(NodeApiError::AttestorNotEnabled("claims"));
                    }
                    // The attestor records the token's jti durably (a flush): off the async
                    // workers, so a slow disk does not stall every other call.
                    let attestors = self.attestors.clone();
                    tokio::task::spawn_blocking(move || {
                        attestors.claims.as_ref().map(|a| a.attest(&c.token, now))
                    })
                    .await
                    .map_err(|e| agentd_attestor::node::ClaimsError::Store {
                        reason: format!("attestation task: {e}"),
                    })?
                    .ok_or(NodeApiError::AttestorNotEnabled("claims"))??
                }
                None => {
                    return Err(NodeApiError::InvalidField {
                        field: "attestation",
                        reason: "missing: a join token, x509pop or claims attestation is required"
                            .into(),
                    })
                }
            };
            attested_as = Some((
                attested.spiffe_id.clone(),
                attested.selectors.iter().map(ToString::to_string).collect(),
            ));
            // A node ID that is also an entry's SPIFFE ID (a node-set alias, a workload) would
            // receive every entry parented to it: refuse it (a template fed by a certificate
            // CN or a claim must not be able to pick such an ID).
            if !self
                .state
                .store
                .list_entries(&EntryFilter {
                    spiffe_id: Some(attested.spiffe_id.clone()),
                    ..Default::default()
                })
                .await?
                .is_empty()
            {
                return Err(NodeApiError::InvalidField {
                    field: "spiffe_id",
                    reason: format!(
                        "{} is the SPIFFE ID of a registration entry, not a node",
                        attested.spiffe_id
                    ),
                });
            }
            if attested.attestation_type != "join_token" {
                // A derived ID never takes over a node attested another way.
                if let Some(existing) = self.state.store.get_node(&attested.spiffe_id).await? {
                    if existing.attestation_type != attested.attestation_type {
                        return Err(NodeApiError::AttestationTypeMismatch {
                            spiffe_id: attested.spiffe_id.to_string(),
                            existing: existing.attestation_type,
                            presented: attested.attestation_type,
                        });
                    }
                }
            }
            // Held through the node record: a `revoke node` waits for it (and lists this
            // SVID, then deletes the record), or this sees the revocation.
            let _issuing = self.state.revocations.issuing().await;
            self.check_node_not_revoked(&attested.spiffe_id)?;
            let svid = self.sign(
                &req.csr,
                &attested.spiffe_id,
                self.state.config.node_svid_ttl.as_duration(),
                &[],
            )?;
            issuance::record_issued(
                self.state.store.as_ref(),
                &[issuance::node_svid_record(&svid)],
            )
            .await
            .map_err(NodeApiError::from)?;
            self.state
                .store
                .upsert_node(AttestedNode {
                    spiffe_id: attested.spiffe_id.clone(),
                    attestation_type: attested.attestation_type.into(),
                    serial: svid.serial.clone(),
                    svid_expires_at: unix_seconds(svid.not_after),
                    attested_at: unix_seconds(now),
                    last_seen_at: unix_seconds(now),
                    selectors: attested.selectors,
                    previous_serial: None,
                    previous_svid_expires_at: None,
                })
                .await?;
            Ok(svid)
        }
        .await;
        let remote_text = remote.map(|r| r.to_string());
        let selectors = attested_as
            .as_ref()
            .map(|(_, s)| s.clone())
            .unwrap_or_default();
        let result = match result {
            Ok(svid) => self
                .state
                .audit
                .record(
                    AuditRecord::new("node.attest", Actor::from(&svid.spiffe_id))
                        .subject(&svid.spiffe_id)
                        .field("attestation_type", kind)
                        .field("selectors", &selectors)
                        .field("serial", &svid.serial)
                        .field("expires_at", unix_seconds(svid.not_after))
                        .field("remote", &remote_text),
                )
                .await
                .map(|_| svid)
                .map_err(NodeApiError::from),
            Err(e) => {
                match &attested_as {
                    // The credential verified: not anonymous, recorded individually.
                    Some((id, _)) => {
                        let record = AuditRecord::new("node.attest.fail", Actor::Remote(remote))
                            .subject(id)
                            .field("attestation_type", kind)
                            .field("selectors", &selectors)
                            .field("reason", super::failures::truncate_reason(&e.to_string()))
                            .field("remote", &remote_text);
                        self.state.audit.record_or_log(record).await;
                    }
                    None => {
                        self.record_anonymous_refusal(kind, "attest", remote, &e)
                            .await
                    }
                }
                Err(e)
            }
        };
        match result {
            Ok(svid) => {
                self.state.metrics.node_attested(kind);
                tracing::info!(node = %svid.spiffe_id, serial = %svid.serial, attestation = kind, ?remote, "node attested");
                Ok(Response::new(pb::AttestResponse {
                    svid: Some(svid_to_proto(&svid)),
                    bundle: Some(bundle_to_proto(&self.state.ca.bundle())),
                }))
            }
            Err(e) => {
                self.note_refused(kind, remote, &e);
                Err(e.into())
            }
        }
    }

    pub(super) async fn issue_x509_pop_challenge(
        &self,
        request: Request<pb::X509PopChallengeRequest>,
    ) -> Result<Response<pb::X509PopChallengeResponse>, Status> {
        let remote = request
            .extensions()
            .get::<PeerIdentity>()
            .and_then(|p| p.remote_addr);
        let result = self
            .admit(remote)
            .and_then(|()| {
                self.attestors
                    .x509pop
                    .as_ref()
                    .ok_or(NodeApiError::AttestorNotEnabled("x509pop"))
            })
            .and_then(|a| {
                a.challenge(&request.get_ref().cert_chain, self.state.clock.now())
                    .map_err(NodeApiError::from)
            });
        match result {
            Ok(c) => Ok(Response::new(pb::X509PopChallengeResponse {
                nonce: c.nonce,
                context: c.context,
                expires_at: c.expires_at,
            })),
            Err(e) => {
                self.note_refused("x509pop", remote, &e);
                self.record_anonymous_refusal("x509pop", "challenge", remote, &e)
                    .await;
                Err(e.into())
            }
        }
    }

    pub(super) async fn renew_node(
        &self,
        request: Request<pb::RenewNodeSvidRequest>,
    ) -> Result<Response<pb::RenewNodeSvidResponse>, Status> {
        let presented = request
            .extensions()
            .get::<PeerIdentity>()
            .and_then(|p| p.serial.clone());
        let issuing = self.state.revocations.issuing().await;
        let mut node = self
            .caller(request.extensions().get::<PeerIdentity>())
            .await?;
        let svid = self.sign(
            &request.get_ref().csr,
            &node.spiffe_id,
            self.state.config.node_svid_ttl.as_duration(),
            &[],
        )?;
        issuance::record_issued(
            self.state.store.as_ref(),
            &[issuance::node_svid_record(&svid)],
        )
        .await
        .map_err(NodeApiError::from)?;
        // Keep accepting the SVID the node holds now until its next renewal: if this answer
        // is lost, the node can still call (and renew) with it. A node that renews with its
        // previous SVID never received the current one, so that one is dropped.
        if presented.as_deref() == Some(node.serial.as_str()) {
            node.previous_serial = Some(std::mem::take(&mut node.serial));
            node.previous_svid_expires_at = Some(node.svid_expires_at);
        }
        node.serial = svid.serial.clone();
        node.svid_expires_at = unix_seconds(svid.not_after);
        node.last_seen_at = unix_seconds(self.state.clock.now());
        self.state
            .audit
            .record(
                AuditRecord::new("node.svid.renew", Actor::from(&node.spiffe_id))
                    .subject(&node.spiffe_id)
                    .field("serial", &svid.serial)
                    .field("previous_serial", &presented)
                    .field("expires_at", unix_seconds(svid.not_after)),
            )
            .await
            .map_err(NodeApiError::from)?;
        self.state
            .store
            .upsert_node(node)
            .await
            .map_err(NodeApiError::from)?;
        drop(issuing);
        tracing::info!(node = %svid.spiffe_id, serial = %svid.serial, "node SVID renewed");
        Ok(Response::new(pb::RenewNodeSvidResponse {
            svid: Some(svid_to_proto(&svid)),
        }))
    }
}
