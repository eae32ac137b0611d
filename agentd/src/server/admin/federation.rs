//! Federation relationships and federated bundles (`agentd federation ...`, `agentd bundle
//! set|list|delete`). Every field is checked before anything is written; every change is
//! audited, wakes the refresh loop and makes every node agent sync.

use agentd_proto::admin as pb;
use spiffe::{SpiffeId, TrustDomain};
use tonic::{Request, Response, Status};

use super::{caller_uid, invalid, AdminApi, AdminError};
use crate::audit::{Actor, AuditRecord};
use crate::bundle::Bundle;
use crate::model::federation::{
    BundleSource, EndpointProfile, EndpointUrl, FederatedBundle, FederationRelationship,
};
use crate::server::federation::{parse_bundle, BundleFormat};

/// Most trust domains one entry may federate with.
const MAX_FEDERATES_WITH: usize = 32;

/// A trust domain name (`partner.example`, or `spiffe://partner.example` as SPIRE's CLI
/// takes it) other than our own.
pub(super) fn foreign_trust_domain(
    field: &str,
    raw: &str,
    own: &TrustDomain,
) -> Result<TrustDomain, AdminError> {
    if raw.is_empty() {
        return Err(invalid(field, "is required"));
    }
    let name = raw.strip_prefix("spiffe://").unwrap_or(raw);
    if name.contains('/') {
        return Err(invalid(
            field,
            format!("{raw:?} is a SPIFFE ID with a path, not a trust domain"),
        ));
    }
    let td = TrustDomain::new(name).map_err(|e| invalid(field, format!("{raw:?}: {e}")))?;
    if &td == own {
        return Err(invalid(
            field,
            format!(
                "{td} is this server's own trust domain; federation is with other trust domains"
            ),
        ));
    }
    Ok(td)
}

/// An entry's `federates_with`: sorted, without duplicates, never our own.
pub(super) fn parse_federates_with(
    raw: &[String],
    own: &TrustDomain,
) -> Result<Vec<TrustDomain>, AdminError> {
    if raw.len() > MAX_FEDERATES_WITH {
        return Err(invalid(
            "federates_with",
            format!("{} trust domains; at most {MAX_FEDERATES_WITH}", raw.len()),
        ));
    }
    let mut out = raw
        .iter()
        .map(|r| foreign_trust_domain("federates_with", r, own))
        .collect::<Result<Vec<_>, _>>()?;
    out.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    out.dedup();
    Ok(out)
}

impl AdminApi {
    /// Each trust domain an entry federates with must be known (a relationship or a bundle):
    /// a typo would otherwise leave workloads silently without the bundle.
    pub(super) async fn check_federates_with(
        &self,
        federates_with: &[TrustDomain],
    ) -> Result<(), AdminError> {
        if federates_with.is_empty() {
            return Ok(());
        }
        let store = self.state.store.as_ref();
        let relationships = store.list_federations().await?;
        let bundles = store.list_federated_bundles().await?;
        for td in federates_with {
            let known = relationships.iter().any(|r| &r.trust_domain == td)
                || bundles.iter().any(|b| &b.bundle.trust_domain == td);
            if !known {
                return Err(invalid(
                    "federates_with",
                    format!("no federation relationship or bundle for {td}: create one first (`agentd federation create` or `agentd bundle set`)"),
                ));
            }
        }
        Ok(())
    }

    /// After a committed change: its audit records, then every node agent syncs and the
    /// refresh loop looks again.
    async fn federation_changed(&self, records: Vec<AuditRecord>) -> Result<(), AdminError> {
        let audited = self.state.audit.record_all(records).await;
        // Relationships and bundles are all a node holds of federation; an entry's
        // `federates_with` travels with the entry.
        self.state.changes.publish_bundles();
        self.state.federation.wake();
        audited.map(|_| ()).map_err(AdminError::from)
    }

    async fn federated_bundle(
        &self,
        td: &TrustDomain,
    ) -> Result<Option<FederatedBundle>, AdminError> {
        Ok(self
            .state
            .store
            .list_federated_bundles()
            .await?
            .into_iter()
            .find(|b| &b.bundle.trust_domain == td))
    }

    async fn federation(&self, td: &TrustDomain) -> Result<FederationRelationship, AdminError> {
        self.state
            .store
            .list_federations()
            .await?
            .into_iter()
            .find(|r| &r.trust_domain == td)
            .ok_or_else(|| {
                AdminError::FederationNotFound(format!("no federation relationship with {td}"))
            })
    }

    /// A relationship as shown: with its held bundle (read here unless the caller has the
    /// list already) and this server's fetch status.
    async fn federation_to_proto(
        &self,
        r: &FederationRelationship,
        held: Option<&[FederatedBundle]>,
    ) -> Result<pb::Federation, AdminError> {
        let bundle = match held {
            Some(all) => all
                .iter()
                .find(|b| b.bundle.trust_domain == r.trust_domain)
                .cloned(),
            None => self.federated_bundle(&r.trust_domain).await?,
        };
        let status = self.state.federation.status(&r.trust_domain);
        Ok(pb::Federation {
            trust_domain: r.trust_domain.as_str().to_string(),
            bundle_endpoint_url: r.bundle_endpoint_url.to_string(),
            bundle_endpoint_profile: r.profile.name().to_string(),
            endpoint_spiffe_id: r
                .profile
                .endpoint_spiffe_id()
                .map(ToString::to_string)
                .unwrap_or_default(),
            created_at: r.created_at,
            updated_at: r.updated_at,
            bundle: bundle.as_ref().map(federated_bundle_to_proto),
            last_attempt_at: status.last_attempt_at,
            last_error: status.last_error.unwrap_or_default(),
            next_refresh_at: status.next_refresh_at,
        })
    }
}

pub(super) fn federated_bundle_to_proto(b: &FederatedBundle) -> pb::FederatedBundle {
    pb::FederatedBundle {
        trust_domain: b.bundle.trust_domain.as_str().to_string(),
        x509_authorities: b.bundle.x509_authorities.clone(),
        jwt_authorities: u32::try_from(b.bundle.jwt_authorities.len()).unwrap_or(u32::MAX),
        sequence: b.bundle.sequence,
        refresh_hint_seconds: i64::try_from(b.bundle.refresh_hint.as_secs()).unwrap_or(i64::MAX),
        updated_at: b.updated_at,
        source: b.source.name().to_string(),
        spiffe_json: b.bundle.to_spiffe_json(),
        pem: b.bundle.x509_pem(),
    }
}

fn parse_url(raw: &str) -> Result<EndpointUrl, AdminError> {
    if raw.is_empty() {
        return Err(invalid("bundle_endpoint_url", "is required"));
    }
    raw.parse()
        .map_err(|e: crate::model::federation::EndpointUrlError| {
            invalid("bundle_endpoint_url", e.reason)
        })
}

/// The profile and its SPIFFE ID: https_spiffe's defaults to `spiffe://<td>/agentd/server`
/// (what an agentd server presents) and must be in the federated trust domain, whose bundle
/// authenticates it; https_web takes none.
fn parse_profile(
    td: &TrustDomain,
    profile: &str,
    endpoint_spiffe_id: &str,
) -> Result<EndpointProfile, AdminError> {
    match profile {
        "https_web" => {
            if !endpoint_spiffe_id.is_empty() {
                return Err(invalid(
                    "endpoint_spiffe_id",
                    "applies to https_spiffe only (https_web authenticates the endpoint by web PKI)",
                ));
            }
            Ok(EndpointProfile::HttpsWeb)
        }
        "https_spiffe" => {
            let id = if endpoint_spiffe_id.is_empty() {
                crate::tls::server_spiffe_id(td)
            } else {
                SpiffeId::new(endpoint_spiffe_id).map_err(|e| {
                    invalid("endpoint_spiffe_id", format!("{endpoint_spiffe_id:?}: {e}"))
                })?
            };
            if !id.is_member_of(td) {
                return Err(invalid(
                    "endpoint_spiffe_id",
                    format!("{id} is not in {td}, whose bundle authenticates the endpoint"),
                ));
            }
            Ok(EndpointProfile::HttpsSpiffe {
                endpoint_spiffe_id: id,
            })
        }
        "" => Err(invalid(
            "bundle_endpoint_profile",
            "is required (https_spiffe or https_web)",
        )),
        other => Err(invalid(
            "bundle_endpoint_profile",
            format!("{other:?} is not a profile (https_spiffe or https_web)"),
        )),
    }
}

/// An operator-supplied bundle of `td` (`--trust-bundle`, `bundle set`).
fn parse_supplied_bundle(
    td: &TrustDomain,
    format_field: &str,
    format: &str,
    data_field: &str,
    data: &[u8],
) -> Result<Bundle, AdminError> {
    let format: BundleFormat = match format {
        "" => return Err(invalid(format_field, "is required (pem or spiffe)")),
        f => f.parse().map_err(|e: String| invalid(format_field, e))?,
    };
    if data.is_empty() {
        return Err(invalid(data_field, "is empty"));
    }
    parse_bundle(td, format, data).map_err(|e| invalid(data_field, e))
}

/// `--trust-bundle` of `federation create|update`: none, or a bundle of `td` to start from.
fn trust_bundle(td: &TrustDomain, data: &[u8], format: &str) -> Result<Option<Bundle>, AdminError> {
    if data.is_empty() {
        if !format.is_empty() {
            return Err(invalid(
                "trust_bundle",
                "is required with trust_bundle_format",
            ));
        }
        return Ok(None);
    }
    parse_supplied_bundle(td, "trust_bundle_format", format, "trust_bundle", data).map(Some)
}

fn federation_audit(record: AuditRecord, r: &FederationRelationship) -> AuditRecord {
    record
        .field("trust_domain", r.trust_domain.as_str())
        .field("bundle_endpoint_url", r.bundle_endpoint_url.as_str())
        .field("profile", r.profile.name())
        .field(
            "endpoint_spiffe_id",
            r.profile.endpoint_spiffe_id().map(ToString::to_string),
        )
}

fn bundle_audit(record: AuditRecord, b: &Bundle) -> AuditRecord {
    record
        .field("trust_domain", b.trust_domain.as_str())
        .field("x509_authorities", b.x509_authorities.len())
        .field("jwt_authorities", b.jwt_authorities.len())
        .field("sequence", b.sequence)
}

pub(super) async fn create(
    api: &AdminApi,
    request: Request<pb::FederationSpec>,
) -> Result<Response<pb::Federation>, Status> {
    let uid = caller_uid(&request);
    let req = request.into_inner();
    let own = &api.state.config.trust_domain;
    let td = foreign_trust_domain("trust_domain", &req.trust_domain, own)?;
    let url = parse_url(&req.bundle_endpoint_url)?;
    let profile = parse_profile(&td, &req.bundle_endpoint_profile, &req.endpoint_spiffe_id)?;
    let bootstrap = trust_bundle(&td, &req.trust_bundle, &req.trust_bundle_format)?;
    if api
        .state
        .store
        .list_federations()
        .await
        .map_err(AdminError::from)?
        .iter()
        .any(|r| r.trust_domain == td)
    {
        return Err(AdminError::FederationExists(format!(
            "a federation relationship with {td} exists: change it with `agentd federation update`"
        ))
        .into());
    }
    let now = api.now();
    let relationship = FederationRelationship {
        trust_domain: td.clone(),
        bundle_endpoint_url: url,
        profile,
        created_at: now,
        updated_at: now,
    };
    let actor = Actor::admin(uid);
    let mut records = Vec::new();
    // The relationship first; should the bundle not be stored, the relationship goes
    // again, so that a failed create leaves nothing behind.
    api.state
        .store
        .put_federation(&relationship)
        .await
        .map_err(AdminError::from)?;
    if let Some(bundle) = bootstrap {
        records.push(bundle_audit(
            AuditRecord::new("bundle.set", &actor).field("source", "federation create"),
            &bundle,
        ));
        if let Err(e) = api
            .state
            .store
            .put_federated_bundle(&FederatedBundle {
                bundle,
                source: BundleSource::Static,
                updated_at: now,
            })
            .await
        {
            let _ = api.state.store.delete_federation(&td).await;
            return Err(AdminError::from(e).into());
        }
    }
    records.insert(
        0,
        federation_audit(AuditRecord::new("federation.create", &actor), &relationship),
    );
    api.federation_changed(records).await?;
    tracing::info!(?uid, trust_domain = %td, url = %relationship.bundle_endpoint_url, "federation relationship created");
    Ok(Response::new(
        api.federation_to_proto(&relationship, None).await?,
    ))
}

pub(super) async fn get(
    api: &AdminApi,
    request: Request<pb::GetFederationRequest>,
) -> Result<Response<pb::Federation>, Status> {
    let own = &api.state.config.trust_domain;
    let td = foreign_trust_domain("trust_domain", &request.get_ref().trust_domain, own)?;
    let r = api.federation(&td).await?;
    Ok(Response::new(api.federation_to_proto(&r, None).await?))
}

pub(super) async fn list(
    api: &AdminApi,
    _request: Request<pb::ListFederationsRequest>,
) -> Result<Response<pb::ListFederationsResponse>, Status> {
    let store = api.state.store.as_ref();
    let held = store
        .list_federated_bundles()
        .await
        .map_err(AdminError::from)?;
    let mut federations = Vec::new();
    for r in store.list_federations().await.map_err(AdminError::from)? {
        federations.push(api.federation_to_proto(&r, Some(&held)).await?);
    }
    Ok(Response::new(pb::ListFederationsResponse { federations }))
}

pub(super) async fn update(
    api: &AdminApi,
    request: Request<pb::UpdateFederationRequest>,
) -> Result<Response<pb::Federation>, Status> {
    let uid = caller_uid(&request);
    let req = request.into_inner();
    let own = &api.state.config.trust_domain;
    let td = foreign_trust_domain("trust_domain", &req.trust_domain, own)?;
    let mut r = api.federation(&td).await?;
    if let Some(url) = &req.bundle_endpoint_url {
        r.bundle_endpoint_url = parse_url(url)?;
    }
    if req.bundle_endpoint_profile.is_some() || req.endpoint_spiffe_id.is_some() {
        let profile = req
            .bundle_endpoint_profile
            .as_deref()
            .unwrap_or(r.profile.name());
        // A new profile without an ID takes the default; the same profile keeps its ID.
        let id = match (&req.endpoint_spiffe_id, &r.profile) {
            (Some(id), _) => id.clone(),
            (None, EndpointProfile::HttpsSpiffe { endpoint_spiffe_id })
                if profile == "https_spiffe" =>
            {
                endpoint_spiffe_id.to_string()
            }
            (None, _) => String::new(),
        };
        r.profile = parse_profile(&td, profile, &id)?;
    }
    let bootstrap = trust_bundle(&td, &req.trust_bundle, &req.trust_bundle_format)?;
    r.updated_at = api.now();
    let actor = Actor::admin(uid);
    let mut records = vec![federation_audit(
        AuditRecord::new("federation.update", &actor),
        &r,
    )];
    api.state
        .store
        .put_federation(&r)
        .await
        .map_err(AdminError::from)?;
    if let Some(bundle) = bootstrap {
        let stored = api
            .state
            .store
            .put_federated_bundle(&FederatedBundle {
                bundle: bundle.clone(),
                source: BundleSource::Static,
                updated_at: r.updated_at,
            })
            .await;
        if let Err(e) = stored {
            // The relationship changed; say so, then why the bundle did not.
            api.federation_changed(records).await?;
            return Err(AdminError::from(e).into());
        }
        records.push(bundle_audit(
            AuditRecord::new("bundle.set", &actor).field("source", "federation update"),
            &bundle,
        ));
    }
    api.federation_changed(records).await?;
    tracing::info!(?uid, trust_domain = %td, "federation relationship updated");
    Ok(Response::new(api.federation_to_proto(&r, None).await?))
}

pub(super) async fn delete(
    api: &AdminApi,
    request: Request<pb::DeleteFederationRequest>,
) -> Result<Response<pb::Federation>, Status> {
    let uid = caller_uid(&request);
    let own = &api.state.config.trust_domain;
    let td = foreign_trust_domain("trust_domain", &request.get_ref().trust_domain, own)?;
    let r = api.federation(&td).await?;
    let shown = api.federation_to_proto(&r, None).await?;
    api.state
        .store
        .delete_federation(&td)
        .await
        .map_err(AdminError::from)?;
    api.state.federation.forget(&td);
    api.federation_changed(vec![federation_audit(
        AuditRecord::new("federation.delete", Actor::admin(uid)),
        &r,
    )])
    .await?;
    tracing::info!(?uid, trust_domain = %td, "federation relationship deleted (its last bundle is kept)");
    Ok(Response::new(shown))
}

pub(super) async fn set_bundle(
    api: &AdminApi,
    request: Request<pb::SetFederatedBundleRequest>,
) -> Result<Response<pb::FederatedBundle>, Status> {
    let uid = caller_uid(&request);
    let req = request.into_inner();
    let own = &api.state.config.trust_domain;
    let td = foreign_trust_domain("trust_domain", &req.trust_domain, own)?;
    let bundle = parse_supplied_bundle(&td, "format", &req.format, "data", &req.data)?;
    let stored = FederatedBundle {
        bundle,
        source: BundleSource::Static,
        updated_at: api.now(),
    };
    api.state
        .store
        .put_federated_bundle(&stored)
        .await
        .map_err(AdminError::from)?;
    api.federation_changed(vec![bundle_audit(
        AuditRecord::new("bundle.set", Actor::admin(uid)),
        &stored.bundle,
    )])
    .await?;
    tracing::info!(?uid, trust_domain = %td, "federated bundle set");
    Ok(Response::new(federated_bundle_to_proto(&stored)))
}

pub(super) async fn list_bundles(
    api: &AdminApi,
    _request: Request<pb::ListFederatedBundlesRequest>,
) -> Result<Response<pb::ListFederatedBundlesResponse>, Status> {
    let bundles = api
        .state
        .store
        .list_federated_bundles()
        .await
        .map_err(AdminError::from)?;
    Ok(Response::new(pb::ListFederatedBundlesResponse {
        bundles: bundles.iter().map(federated_bundle_to_proto).collect(),
    }))
}

/// Refused while a relationship would fetch it again or entries federate with it (SPIRE's
/// `bundle delete` default, "restrict").
pub(super) async fn delete_bundle(
    api: &AdminApi,
    request: Request<pb::DeleteFederatedBundleRequest>,
) -> Result<Response<pb::FederatedBundle>, Status> {
    let uid = caller_uid(&request);
    let own = &api.state.config.trust_domain;
    let td = foreign_trust_domain("trust_domain", &request.get_ref().trust_domain, own)?;
    let bundle = api
        .federated_bundle(&td)
        .await?
        .ok_or_else(|| AdminError::FederationNotFound(format!("no bundle of {td} is held")))?;
    if api.federation(&td).await.is_ok() {
        return Err(AdminError::InUse(format!(
            "a federation relationship with {td} would fetch the bundle again: `agentd federation delete --trust-domain {td}` first"
        ))
        .into());
    }
    let users = api
        .state
        .store
        .list_entries(&Default::default())
        .await
        .map_err(AdminError::from)?
        .into_iter()
        .filter(|e| e.spec.federates_with.contains(&td))
        .count();
    if users > 0 {
        return Err(AdminError::InUse(format!(
            "entries federating with {td}: {users}; take it out of their --federates-with first (`agentd entry update --federates-with ...`)"
        ))
        .into());
    }
    api.state
        .store
        .delete_federated_bundle(&td)
        .await
        .map_err(AdminError::from)?;
    api.federation_changed(vec![bundle_audit(
        AuditRecord::new("bundle.delete", Actor::admin(uid)),
        &bundle.bundle,
    )])
    .await?;
    tracing::info!(?uid, trust_domain = %td, "federated bundle deleted");
    Ok(Response::new(federated_bundle_to_proto(&bundle)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trust_domains_are_parsed_and_our_own_is_refused() {
        let own = TrustDomain::new("example.org").unwrap();
        assert_eq!(
            foreign_trust_domain("f", "spiffe://partner.example", &own)
                .unwrap()
                .as_str(),
            "partner.example"
        );
        for bad in [
            "",
            "example.org",
            "spiffe://example.org",
            "spiffe://p.example/x",
            "UP PER",
        ] {
            let err = foreign_trust_domain("f", bad, &own).unwrap_err();
            assert!(err.to_string().starts_with("f: "), "{bad:?}: {err}");
        }
        let list = parse_federates_with(
            &[
                "b.example".into(),
                "a.example".into(),
                "spiffe://b.example".into(),
            ],
            &own,
        )
        .unwrap();
        assert_eq!(
            list.iter().map(|t| t.as_str()).collect::<Vec<_>>(),
            ["a.example", "b.example"]
        );
    }

    #[test]
    fn profiles_take_their_ids_and_refuse_others() {
        let td = TrustDomain::new("partner.example").unwrap();
        assert_eq!(
            parse_profile(&td, "https_spiffe", "").unwrap(),
            EndpointProfile::HttpsSpiffe {
                endpoint_spiffe_id: SpiffeId::new("spiffe://partner.example/agentd/server")
                    .unwrap()
            }
        );
        assert!(parse_profile(&td, "https_spiffe", "spiffe://other.example/s").is_err());
        assert!(parse_profile(&td, "https_web", "spiffe://partner.example/s").is_err());
        assert!(parse_profile(&td, "http", "").is_err());
        assert_eq!(
            parse_profile(&td, "https_web", "").unwrap(),
            EndpointProfile::HttpsWeb
        );
    }
}
