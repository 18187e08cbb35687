//! The backchannel: one TCP (or Unix, or TLS) connection that carries the client's gRPC calls
//! to the server *and* lets the server open streams back to the client.
//!
//! A backchannel-aware client writes the 11 bytes `backchannel`, then runs a yamux client
//! session over the connection and speaks HTTP/2 (gRPC) on the first stream it opens. The
//! server looks at the first 11 bytes of every accepted connection: with the magic it runs a
//! yamux server session and serves gRPC on each stream the client opens; without it, the
//! connection is plain gRPC and is served unchanged. The server keeps each session's control
//! handle in a [`SessionRegistry`] so a handler can open a stream back to its caller (that is
//! how sidechannels reach the client). On the client, streams the server opens are either
//! sidechannels (they start with `sidechannel`) or gRPC calls to the client's own services.
//!
//! One file per concern: `io` (boxed connections, sniffing a magic), `yamux` (settings),
//! `sessions` (the server's registry of sessions, [`PeerInfo`]), `listener` and `server`
//! (accepting), `limits` (what one client may hold), `coalesce` (a session's batched writes),
//! `measured` (read and write sizes for metrics), `readahead` (small reads served from one
//! larger read), `connect` (a client's raw connection), `client` (the client's session),
//! `dial` (tonic channels over it) and `callback` (a server's channels back to its callers).
//! Everything public is re-exported here, at the paths it always had; sidechannels use `io`
//! and `sessions` directly, so that they do not depend on the client that depends on them.

mod callback;
mod client;
mod coalesce;
mod connect;
mod dial;
pub(crate) mod io;
mod limits;
mod listener;
mod measured;
mod readahead;
mod server;
pub(crate) mod sessions;
mod yamux;

pub use callback::CallbackChannels;
pub use client::{start_client_session, ClientHandler, ClientSession};
pub use coalesce::{finish_writes, next_stream, Coalesced, CoalescedWriter};
pub use connect::{connect_raw, connect_target, DialTarget};
pub use dial::{dial, dial_lazy, error_chain};
pub use io::{sniff, BoxIo, Io, Prefixed, BACKCHANNEL_MAGIC};
pub use limits::{LimitSettings, ServerLimits, MAX_SESSION_STREAMS};
pub use listener::Listener;
pub use measured::{observe_sizes, Direction, Measured};
pub use server::{incoming, incoming_until, AcceptObserver, Incoming, ServerConn};
pub use sessions::{HeldStream, PeerInfo, SessionRegistry};
pub use yamux::{grpc_stream, yamux_config, GrpcStream};

/// What the server writes first on a sidechannel stream (defined with the sidechannel).
pub use crate::sidechannel::SIDECHANNEL_MAGIC;
