//! Selectors and attestors for agentd.
//!
//! A *selector* is a `type:value` fact about a workload or node that the caller cannot forge,
//! such as `unix:uid:1000`. Registration entries name selectors; a workload receives an
//! entry's identity when all of the entry's selectors are among its own.
//!
//! - [`selector`]: the `Selector` type and its parsing.
//! - [`workload`]: workload attestors, run by the node agent on each Workload API caller.
#![forbid(unsafe_code)]

pub mod selector;
pub mod workload;

pub use selector::{Selector, SelectorError};
