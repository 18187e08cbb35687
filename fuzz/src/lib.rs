//! Fuzz targets for the code that reads what clients, nodes and operators send: the first
//! request message and its rewriting, gRPC message counting, `authorization` headers, pkt-lines,
//! Go durations and the configuration file.
//!
//! cargo-fuzz needs a nightly compiler, which this project's machines and CI do not have, so
//! the targets run in a small engine of our own ([`engine`]) on stable Rust: it replays the
//! committed corpus (`fuzz/corpus/<target>/`), then mutates it (bit flips, interesting
//! integers, dictionary tokens, splices) for a time or an execution budget. Without coverage
//! feedback it keeps the inputs that reach a new *outcome* (each target names the result class
//! of an input, e.g. which error), so the pool spreads over the parsers' branches. Each target
//! checks properties, not only the absence of panics: round trips, agreement with a simple
//! model written independently here, and invariance under how the input is split into chunks.
//!
//! A panic is a finding, so this crate asserts freely.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod engine;
pub mod seeds;
pub mod targets;

pub use engine::{Budget, Report, Target};
