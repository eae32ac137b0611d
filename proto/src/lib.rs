//! Generated protocol types and gRPC stubs.
//!
//! - [`workload`]: the SPIFFE Workload API (`SpiffeWorkloadAPI`, no proto package).
//! - [`node`]: node agent <-> server (`agentd.node.v1`).
//! - [`admin`]: CLI <-> server (`agentd.admin.v1`).
//! - [`revocation`]: revocation events, shared by the others (`agentd.revocation.v1`).
//! - [`agentd_workload`]: agentd's additions on the Workload API socket (`agentd.workload.v1`).
#![forbid(unsafe_code)]
#![allow(missing_debug_implementations)] // generated clients and servers

/// The SPIFFE Workload API. The proto has no package, so the generated file is `_.rs`.
pub mod workload {
    tonic::include_proto!("_");
}

/// Node agent <-> server protocol.
pub mod node {
    tonic::include_proto!("agentd.node.v1");
}

/// agentd's own services on the Workload API socket (`agentd.workload.v1`).
pub mod agentd_workload {
    tonic::include_proto!("agentd.workload.v1");
}

/// Revocation events, shared by the node, admin and agentd workload protocols.
pub mod revocation {
    tonic::include_proto!("agentd.revocation.v1");
}

/// CLI <-> server admin protocol.
pub mod admin {
    tonic::include_proto!("agentd.admin.v1");
}

/// The metadata key every Workload API request must carry with the value `true`
/// (SPIFFE Workload API, section "Transport").
pub const WORKLOAD_HEADER: &str = "workload.spiffe.io";
