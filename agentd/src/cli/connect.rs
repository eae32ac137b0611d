//! How the CLI reaches the daemons: where the sockets are (defaults, environment variables,
//! the `unix:` forms of SPIFFE_ENDPOINT_SOCKET), gRPC channels over them, the admin and
//! Workload API clients, and a failed call as a CLI error.

use std::path::{Path, PathBuf};

use agentd_proto::admin::admin_client::AdminClient;
use agentd_proto::agentd_workload::delegation_client::DelegationClient;
use agentd_proto::agentd_workload::revocations_client::RevocationsClient;
use agentd_proto::agentd_workload::selectors_client::SelectorsClient;
use agentd_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use anyhow::{anyhow, Context};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;

pub use crate::node::config::DEFAULT_SOCKET_PATH;
pub use crate::server::config::DEFAULT_ADMIN_SOCKET;

/// The environment variable naming the server's admin socket.
pub const ADMIN_SOCKET_ENV: &str = "AGENTD_ADMIN_SOCKET";
/// The environment variable naming the Workload API socket (SPIFFE's own).
pub const WORKLOAD_SOCKET_ENV: &str = "SPIFFE_ENDPOINT_SOCKET";

/// The interceptor of every Workload API call: [`add_header`].
pub type HeaderFn = fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>;
/// A channel to the node agent whose calls carry the `workload.spiffe.io` header.
pub type WorkloadChannel = InterceptedService<Channel, HeaderFn>;
/// The SPIFFE Workload API client.
pub type WorkloadClient = SpiffeWorkloadApiClient<WorkloadChannel>;

/// `unix:///path`, `unix:/path` or a plain path, as in SPIFFE_ENDPOINT_SOCKET.
pub fn socket_path(raw: &str) -> anyhow::Result<PathBuf> {
    let path = if let Some(rest) = raw.strip_prefix("unix://") {
        rest
    } else if let Some(rest) = raw.strip_prefix("unix:") {
        rest
    } else if raw.starts_with("tcp:") {
        return Err(anyhow!(
            "socket_path: tcp endpoints are not supported by this CLI; use a unix socket"
        ));
    } else {
        raw
    };
    if !path.starts_with('/') {
        return Err(anyhow!(
            "socket_path: {raw:?} must be an absolute path or unix:///path"
        ));
    }
    Ok(PathBuf::from(path))
}

/// Adds the `workload.spiffe.io: true` header the Workload API requires on every call.
pub fn add_header(mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    req.metadata_mut().insert(
        agentd_proto::WORKLOAD_HEADER,
        tonic::metadata::MetadataValue::from_static("true"),
    );
    Ok(req)
}

/// A gRPC channel over a Unix socket, as a CLI error.
pub async fn unix_channel(path: &Path) -> anyhow::Result<Channel> {
    Ok(crate::net::unix_channel(path).await?)
}

/// The admin API on the server's admin socket.
pub async fn admin_client(path: &Path) -> anyhow::Result<AdminClient<Channel>> {
    Ok(AdminClient::new(
        unix_channel(path)
            .await
            .context("is the server running? (--admin-socket)")?,
    ))
}

/// A channel to the node agent on a Workload API socket given as in SPIFFE_ENDPOINT_SOCKET.
async fn node_agent_channel(raw: &str) -> anyhow::Result<Channel> {
    let path = socket_path(raw)?;
    unix_channel(&path)
        .await
        .context("is the node agent running? (--socket-path)")
}

/// The SPIFFE Workload API of the node agent.
pub async fn workload_client(raw: &str) -> anyhow::Result<WorkloadClient> {
    Ok(SpiffeWorkloadApiClient::with_interceptor(
        node_agent_channel(raw).await?,
        add_header as HeaderFn,
    ))
}

/// The node agent's `agentd.workload.v1.Delegation` service.
pub async fn delegation_client(raw: &str) -> anyhow::Result<DelegationClient<WorkloadChannel>> {
    Ok(DelegationClient::with_interceptor(
        node_agent_channel(raw).await?,
        add_header as HeaderFn,
    ))
}

/// The node agent's `agentd.workload.v1.Revocations` service.
pub async fn revocations_client(raw: &str) -> anyhow::Result<RevocationsClient<WorkloadChannel>> {
    Ok(RevocationsClient::with_interceptor(
        node_agent_channel(raw).await?,
        add_header as HeaderFn,
    ))
}

/// The node agent's `agentd.workload.v1.Selectors` service.
pub async fn selectors_client(raw: &str) -> anyhow::Result<SelectorsClient<WorkloadChannel>> {
    Ok(SelectorsClient::with_interceptor(
        node_agent_channel(raw).await?,
        add_header as HeaderFn,
    ))
}

/// The gRPC health service of the node agent (no Workload API header).
pub async fn health_client(raw: &str) -> anyhow::Result<HealthClient<Channel>> {
    Ok(HealthClient::new(node_agent_channel(raw).await?))
}

/// A failed call as one clear line: the daemon's message says which field and why.
pub fn status(s: tonic::Status) -> anyhow::Error {
    anyhow!("{}", s.message())
}

/// Every item of a paged admin listing. `fetch` asks for the page after a token (empty for
/// the first) and answers its items and the next token (empty after the last page); a token
/// the server gives twice in a row ends the listing with an error instead of a loop.
pub async fn all_pages<T, Fut>(mut fetch: impl FnMut(String) -> Fut) -> anyhow::Result<Vec<T>>
where
    Fut: std::future::Future<Output = Result<(Vec<T>, String), tonic::Status>>,
{
    let mut items = Vec::new();
    let mut token = String::new();
    loop {
        let (page, next) = fetch(token.clone()).await.map_err(status)?;
        items.extend(page);
        if next.is_empty() {
            return Ok(items);
        }
        if next == token {
            return Err(anyhow!(
                "the server answered the same page token twice: {next:?}"
            ));
        }
        token = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_path_forms() {
        assert_eq!(
            socket_path("unix:///tmp/a.sock").unwrap(),
            PathBuf::from("/tmp/a.sock")
        );
        assert_eq!(
            socket_path("unix:/tmp/a.sock").unwrap(),
            PathBuf::from("/tmp/a.sock")
        );
        assert_eq!(
            socket_path("/tmp/a.sock").unwrap(),
            PathBuf::from("/tmp/a.sock")
        );
        assert!(socket_path("relative.sock").is_err());
        assert!(socket_path("tcp://127.0.0.1:1").is_err());
    }
}
