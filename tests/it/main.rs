//! The router's end-to-end and integration tests, one module per area, in one test binary so
//! that the library and the harness are linked once rather than once per file. Run one area
//! with a filter on its module path, e.g. `cargo test --test it -- replication::`.

// Test code: a test (or the harness under it) that panics on a broken precondition reports
// the failure where it happened, which is what a test should do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

mod abuse;
mod adopt_go;
mod cli;
mod cluster;
mod config_compat;
mod dashboard;
mod database_ha;
mod datastore;
mod dns_discovery;
mod nodes;
mod proxy_walk;
mod queue;
mod queue_bench;
mod replication;
mod router;
mod scale_bench;
mod sighup;
mod status_bench;
mod status_page;
mod toolkit_check;
mod toolkit_dataloss;
mod toolkit_tracking;
mod transactions;
mod verification;
