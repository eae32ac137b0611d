//! agentd: a SPIFFE workload identity issuer for AI agents.
//!
//! - [`ca`]: the server's certificate authority (X.509-SVIDs, JWT-SVIDs).
//! - [`datastore`]: registration entries, attested nodes, join tokens.
//! - [`delegation`]: scopes, grants, delegation chains, their encodings and the verifier.
//! - [`server`]: the central server (admin API, node API).
//! - [`node`]: the node agent (attestation to the server, SVID cache, rotation).
//! - [`workload_api`]: the SPIFFE Workload API served by the node agent.
//! - [`cli`]: the `agentd` command line.
#![forbid(unsafe_code)]

pub mod bundle;
pub mod ca;
pub mod cli;
pub mod clock;
pub mod config;
pub mod convert;
pub mod datastore;
pub mod delegation;
pub mod keys;
pub mod net;
pub mod node;
pub mod runtime;
pub mod server;
pub mod svid;
pub mod tls;
pub mod ttl;
pub mod workload_api;
