//! praefect-rs: a Rust re-implementation of Praefect, the router of a Gitaly Cluster.
//!
//! One module per concern: `config` (TOML keys and validation), `cli` (subcommands),
//! `datastore` (all SQL), `metrics`, `logging`, `routing` (pure decisions), and `periodic`
//! (the background workers' loop).

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
pub mod verification;
pub mod wire;

#[cfg(test)]
mod architecture_tests;
