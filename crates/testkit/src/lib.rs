//! The test harness shared by the router's end-to-end tests (`tests/it`) and gitnode's
//! (`gitnode/tests`): real processes on loopback, started from their binaries, and one way
//! to wait for a condition.
//!
//! - [`pg`]: one private PostgreSQL server per checkout (initdb into `target/tmp`), a fresh
//!   database per test copied from a migrated template, and servers of a test's own.
//! - [`patroni`], [`pgbouncer`]: a three-member Patroni cluster with etcd, and PgBouncer.
//! - [`gitnode`]: gitnode processes, git, and the environment for git over gitnode-ssh.
//! - [`dns`]: a DNS server on loopback whose answers a test changes (service discovery).
//! - [`wait`]: [`wait::wait_until`], polling a condition until a deadline.
//! - [`ports`]: loopback ports for the processes a test starts.
//!
//! Nothing here knows the router's own types (its configuration or datastore): the tests
//! translate [`pg::Conn`] into those, and migrate databases through a function they pass.
//! That keeps this crate usable from gitnode's tests, which do not link the router library.

// Test-only harness code: when a precondition breaks (PostgreSQL does not start, a port cannot
// be read) panicking fails the test that needed it, with the message; there is no caller that
// could recover.
#![allow(clippy::unwrap_used, clippy::expect_used)]

/// The Gitaly protocol: client stubs, the backchannel dialer and the token interceptor.
pub use praefect_wire as wire;

pub mod dns;
pub mod gitnode;
pub mod patroni;
pub mod pg;
pub mod pgbouncer;
pub mod ports;
pub mod wait;
