//! The gRPC pass-through: the router's service (`service.rs`: what the router answers itself
//! and what it forwards), the forwarding pipeline (`pipeline.rs`: look up, read the first
//! message, route, rewrite, send, finalize; writes in `write.rs`, with the client's stream
//! copied to every node of a transaction by `request_body.rs`), reading and rewriting the first request message
//! on the wire format, and the one error model (`error.rs`) that maps every failure to a
//! gRPC status.

mod access_log;
pub mod body;
pub mod error;
mod finalize;
mod forward;
pub mod frame;
pub mod layers;
pub mod local;
mod object_pool;
mod pipeline;
mod request_body;
pub mod rewrite;
mod route;
mod sanitize;
mod service;
mod sidechannel;
mod state;
mod store;
mod write;

pub use error::ProxyError;
pub use service::{router_service, RouterService};
pub use state::Proxy;
pub use store::CachedStore;
