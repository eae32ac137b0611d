//! The shared model at the bottom of the crate: ids and the records that the datastore,
//! the audit log and the revocation log exchange. It imports none of them.

pub mod audit;
pub mod federation;
pub mod ids;
pub mod oauth;
pub mod revocation;
