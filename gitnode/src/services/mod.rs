//! The gRPC services gitnode implements. RPCs not listed in a service's impl answer
//! Unimplemented, as Gitaly does for a method it does not know.

pub mod commit;
pub mod internal;
mod pack;
pub mod refs;
mod replicate;
pub mod repository;
pub mod server;
pub mod smarthttp;
pub mod ssh;
mod stream;

use std::sync::Arc;

use crate::Node;

/// The services, sharing one node state.
#[derive(Clone)]
pub struct Services(pub Arc<Node>);
