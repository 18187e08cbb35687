//! See `abuse/mod.rs`.
