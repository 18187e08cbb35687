//! The router's side of the test harness. The processes themselves (PostgreSQL, Patroni,
//! PgBouncer, gitnodes) and waiting come from the `testkit` crate, re-exported here under
//! their old paths; what needs the router's own types lives here: databases migrated with
//! the router's migrations ([`pg`]), `praefect serve` processes ([`router`]) and in-process
//! echo nodes for the proxy tests ([`echo`]).
#![allow(dead_code)]

pub mod cluster;
pub mod echo;
pub mod pg;
pub mod raw;
pub mod router;

pub use testkit::{gitnode, patroni, pgbouncer, wait};
