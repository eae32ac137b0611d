//! Selectors and attestors for agentd.
//!
//! A *selector* is a `type:value` fact about a workload or node that the caller cannot forge,
//! such as `unix:uid:1000`. Registration entries name selectors; a workload receives an
//! entry's identity when all of the entry's selectors are among its own.
//!
//! - [`selector`]: the `Selector` type and its parsing.
//! - [`registry`]: every known selector type and key, to check an entry's selectors.
//! - [`node`]: node attestors (x509pop, platform claims): the server's verifiers and the node
//!   agent's half that gathers and signs the evidence.
//! - [`workload`]: workload attestors, run by the node agent on each Workload API caller.
#![forbid(unsafe_code)]

pub mod node;
pub mod registry;
pub mod selector;
pub mod workload;

pub use registry::{validate_selector, SELECTOR_TYPES};
pub use selector::{Selector, SelectorError};
