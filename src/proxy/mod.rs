//! The gRPC pass-through. So far: the registry of RPCs and the in-place rewriting of the first
//! request message; the stream director and the listeners come with the router core.

pub mod registry;
pub mod rewrite;
