//! The server's identity and trust bundle.

use agentd_proto::admin as pb;
use tonic::{Request, Response, Status};

use super::AdminApi;

pub(super) async fn server_info(
    api: &AdminApi,
    _request: Request<pb::GetServerInfoRequest>,
) -> Result<Response<pb::ServerInfo>, Status> {
    Ok(Response::new(pb::ServerInfo {
        trust_domain: api.state.config.trust_domain.to_string(),
        node_api_address: api.state.node_api_address.to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        bundle_sequence: api.state.ca.bundle().sequence,
        datastore: match &api.state.config.datastore {
            crate::server::config::Datastore::Sled => "sled".into(),
            crate::server::config::Datastore::Postgres(url) => {
                crate::datastore::pg_store::without_password(url)
            }
        },
        not_ready: api
            .state
            .readiness
            .unmet()
            .into_iter()
            .map(str::to_string)
            .collect(),
    }))
}

pub(super) async fn get(
    api: &AdminApi,
    _request: Request<pb::GetBundleRequest>,
) -> Result<Response<pb::Bundle>, Status> {
    let b = api.state.ca.bundle();
    Ok(Response::new(pb::Bundle {
        trust_domain: b.trust_domain.to_string(),
        x509_authorities: b.x509_authorities.clone(),
        sequence: b.sequence,
        spiffe_json: b.to_spiffe_json(),
        pem: b.x509_pem(),
    }))
}
