//! Entry sync: what a node serves, with bundle and grants.

use agentd_proto::node as pb;
use spiffe::SpiffeId;
use tonic::{Request, Response, Status};

use super::{NodeApi, NodeApiError};
use crate::clock::unix_seconds;
use crate::convert::bundle_to_proto;
use crate::datastore::{Entry, EntryId};
use crate::revocation::RevocationHandle;
use crate::tls::PeerIdentity;

pub fn entry_to_proto(e: &Entry) -> pb::Entry {
    pb::Entry {
        id: e.id.to_string(),
        spiffe_id: e.spec.spiffe_id.to_string(),
        parent_id: e.spec.parent_id.to_string(),
        selectors: e
            .spec
            .selectors
            .iter()
            .map(|s| pb::Selector {
                r#type: s.kind().to_string(),
                value: s.value().to_string(),
            })
            .collect(),
        x509_svid_ttl_seconds: e.spec.x509_svid_ttl.as_secs() as i64,
        jwt_svid_ttl_seconds: e.spec.jwt_svid_ttl.as_secs() as i64,
        dns_names: e.spec.dns_names.clone(),
        hint: e.spec.hint.clone(),
        scopes: e.spec.scopes.clone(),
        owner: e.spec.owner.clone().unwrap_or_default(),
        revision: e.revision,
    }
}

/// Most fetched entry ids taken from one sync request.
const MAX_FETCHED_IDS: usize = 10_000;

impl NodeApi {
    pub(super) async fn sync_node(
        &self,
        request: Request<pb::SyncEntriesRequest>,
    ) -> Result<Response<pb::SyncEntriesResponse>, Status> {
        let node = self
            .caller(request.extensions().get::<PeerIdentity>())
            .await?;
        let fetched = request.into_inner().fetched_entry_ids;
        let server_id = crate::tls::server_spiffe_id(&self.state.config.trust_domain);
        let mut entries = crate::server::membership::entries_for_node(
            self.state.store.as_ref(),
            &server_id,
            &node,
            Some(&self.state.revocations),
        )
        .await
        .map_err(NodeApiError::from)?;
        self.note_fetched(&entries, fetched).await?;
        if self.state.config.suspend_disabled_owners {
            // A suspended entry is withdrawn from the node: it drops the entry's SVIDs and its
            // workloads get no identity until the owner is enabled again.
            let disabled: std::collections::HashSet<String> = self
                .state
                .store
                .list_owners()
                .await
                .map_err(NodeApiError::from)?
                .into_iter()
                .filter(|o| o.disabled)
                .map(|o| o.owner)
                .collect();
            entries.retain(|e| e.spec.owner.as_ref().is_none_or(|o| !disabled.contains(o)));
        }
        let agents: std::collections::BTreeSet<&SpiffeId> =
            entries.iter().map(|e| &e.spec.spiffe_id).collect();
        let grants = crate::server::grants::live_grants_for(
            self.state.store.as_ref(),
            &agents,
            unix_seconds(self.state.clock.now()),
        )
        .await
        .map_err(NodeApiError::from)?
        .into_iter()
        .filter(|g| crate::server::grants::check_not_revoked(&self.state.revocations, g).is_ok())
        .collect::<Vec<_>>();
        let revocations = &self.state.revocations;
        Ok(Response::new(pb::SyncEntriesResponse {
            entries: entries
                .iter()
                .filter(|e| {
                    revocations
                        .standing(&RevocationHandle::Entry(e.id.clone()))
                        .is_none()
                })
                .map(entry_to_proto)
                .collect(),
            bundle: Some(bundle_to_proto(&self.state.ca.bundle())),
            grants: grants
                .iter()
                .map(crate::server::grants::grant_to_node_proto)
                .collect(),
        }))
    }

    /// Records `last_fetched` for the entries the node reports, among those it serves (a node
    /// cannot vouch for another node's workloads).
    async fn note_fetched(
        &self,
        served: &[Entry],
        reported: Vec<String>,
    ) -> Result<(), NodeApiError> {
        if reported.len() > MAX_FETCHED_IDS {
            return Err(NodeApiError::InvalidField {
                field: "fetched_entry_ids",
                reason: format!("{} ids; at most {MAX_FETCHED_IDS}", reported.len()),
            });
        }
        let reported: std::collections::HashSet<String> = reported.into_iter().collect();
        let ids: Vec<EntryId> = served
            .iter()
            .filter(|e| reported.contains(e.id.as_str()))
            .map(|e| e.id.clone())
            .collect();
        let now = unix_seconds(self.state.clock.now());
        if let Err(e) = self.state.store.note_fetched(ids, now).await {
            tracing::warn!(error = %e, "recording entry fetches failed");
        }
        Ok(())
    }
}
