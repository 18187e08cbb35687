//! The gRPC pass-through: the registry of RPCs, reading and rewriting the first request
//! message on the wire format, and forwarding calls to the chosen node.

pub mod error;
mod finalize;
pub mod frame;
pub mod handler;
mod intercept;
mod maintenance;
mod mutator;
mod praefect_info;
pub mod registry;
mod removal;
pub mod rewrite;
mod server_service;
mod sidechannel;
mod walk;

pub use error::ProxyError;
pub use handler::Proxy;
