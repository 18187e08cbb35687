//! praefect-rs: a Rust re-implementation of Praefect, the router of a Gitaly Cluster.
//!
//! One module per concern: `config` (TOML keys and validation), `cli` (subcommands),
//! `datastore` (all SQL), `metrics`, `logging`, `routing` (pure decisions), `status` (the
//! status page) and `periodic` (the background workers' loop).

pub mod cleanup;
pub mod cli;
pub mod config;
pub mod datastore;
pub mod health;
pub mod logging;
pub mod metrics;
pub mod nodes;
pub mod periodic;
pub mod proxy;
pub mod replication;
pub mod routing;
pub mod status;
pub mod transactions;
pub mod verification;

/// What router and gitnode both speak (the `praefect-wire` crate), at its old path so that
/// `crate::wire::...` and `praefect::wire::...` keep working.
pub use praefect_wire as wire;

#[cfg(test)]
mod architecture_tests;
