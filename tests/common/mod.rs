//! Test harness: a real PostgreSQL server for every test binary, a fresh database per test.
//!
//! Without PGHOST/PGPORT, the harness starts one private server from the system's
//! PostgreSQL binaries (initdb into `target/tmp/praefect-test-pg`, a free port on 127.0.0.1;
//! when run as root, as the unprivileged `postgres` user, because PostgreSQL refuses root, and
//! with its data under `/tmp/praefect-test-pg-<hash>` where that user can reach it). The server is
//! shared by every test binary of a run and reused by later runs; a file lock makes the
//! start-up safe when binaries start at once. Every test gets its own database, copied from a
//! template that has all migrations applied, and dropped when the test ends.
#![allow(dead_code)]

pub mod echo;
pub mod gitnode;
pub mod patroni;
pub mod pg;
pub mod pgbouncer;
pub mod router;
pub mod wait;
