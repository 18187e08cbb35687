//! Pure routing decisions, no I/O.

mod replica_path;

pub use replica_path::{pool_replica_path, replica_path};
