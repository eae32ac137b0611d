//! agentd: a SPIFFE workload identity issuer for AI agents.
//!
//! - [`ca`]: the server's certificate authority (X.509-SVIDs, JWT-SVIDs).
//! - [`datastore`]: registration entries, attested nodes, join tokens.
//! - [`server`]: the central server (admin API, node API).
//! - [`node`]: the node agent (attestation to the server, SVID cache, rotation).
//! - [`workload_api`]: the SPIFFE Workload API served by the node agent.
//! - [`cli`]: the `agentd` command line.
#![forbid(unsafe_code)]

pub mod bundle;
pub mod ca;
pub mod clock;
pub mod keys;
pub mod svid;
pub mod ttl;
pub mod datastore;
pub mod config;
pub mod convert;
pub mod runtime;
pub mod server;
pub mod tls;
pub mod node;
pub mod workload_api;
pub mod cli;
