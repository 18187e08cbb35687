//! What both binaries speak: the generated Gitaly protocol, v2 auth tokens, the backchannel
//! and the sidechannel.

pub mod auth;
pub mod backchannel;
pub mod header_names;
pub mod idle;
pub mod pktline;
pub mod sidechannel;
pub mod tls;
pub mod transaction;

/// The Gitaly protocol, generated from `proto/gitaly/*.proto`.
#[allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]
pub mod proto {
    tonic::include_proto!("gitaly");
}
