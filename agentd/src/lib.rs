//! agentd: a SPIFFE workload identity issuer for AI agents.
//!
//! - [`ca`]: the server's certificate authority (X.509-SVIDs, JWT-SVIDs).
//! - [`datastore`]: registration entries, attested nodes, join tokens.
//! - [`audit`]: the hash-chained audit trail.
//! - [`delegation`]: scopes, grants, delegation chains, their encodings and the verifier.
//! - [`server`]: the central server (admin API, node API).
//! - [`node`]: the node agent (attestation to the server, SVID cache, rotation).
//! - [`revocation`]: revocation handles, the server's log and push feed, the node side.
//! - [`workload_api`]: the SPIFFE Workload API served by the node agent.
//! - [`cli`]: the `agentd` command line.
//! - [`telemetry`]: metrics, health and per-RPC logging of both daemons.
#![forbid(unsafe_code)]

pub mod audit;
pub mod bundle;
pub mod ca;
pub mod cli;
pub mod clock;
pub mod config;
pub mod convert;
pub mod datastore;
pub mod delegation;
pub mod keys;
pub mod model;
pub mod net;
pub mod node;
pub mod revocation;
pub mod runtime;
pub mod server;
pub mod svid;
pub mod telemetry;
pub mod tls;
pub mod ttl;
