//! What a server lets one client hold: connections, streams, time to finish the handshake,
//! header sizes, resets. Both the router and gitnode serve through [`ServerLimits`]: the
//! accept loop ([`super::incoming_until`]) enforces the connection cap and the handshake
//! deadline, and [`ServerLimits::server`] gives tonic's server builder (gitnode's) the HTTP/2
//! limits, [`ServerLimits::h2_builder`] the h2 crate's (the router's).
//!
//! tonic leaves most of these unset: unlimited streams per connection, no keepalive, and it
//! passes "no limit" for h2's count of streams the server resets because of the client's
//! errors (hyper's own default is 1024), which leaves the "MadeYouReset" attack open.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// The limits as numbers; [`Default`] is what both servers use unless configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitSettings {
    /// Client connections open at once (a backchannel session counts once), over all the
    /// listeners that share the limits. Beyond it, new connections are closed at once.
    pub max_connections: usize,
    /// From accepting a connection (or a backchannel stream) to the end of the client's
    /// HTTP/2 preface and first SETTINGS frame, TLS and backchannel magic included.
    pub handshake_timeout: Duration,
    /// HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS: calls open at once on one connection.
    /// grpc-go's clients queue calls beyond it rather than fail them.
    pub max_concurrent_streams: u32,
    /// The server pings an HTTP/2 connection this often and closes it when no answer comes
    /// within `keepalive_timeout`: how a vanished client's connection (and backchannel
    /// session) is cleaned up.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// HTTP/2 SETTINGS_MAX_HEADER_LIST_SIZE: the request headers of one call, HPACK-decoded,
    /// 32 bytes per header included.
    pub max_header_list_size: u32,
    /// Streams a client opened and reset before the server took them up (the "rapid reset"
    /// attack); beyond it, the connection gets GOAWAY.
    pub max_pending_accept_reset_streams: usize,
    /// Streams the server had to reset because of the client's protocol errors (the
    /// "MadeYouReset" attack); beyond it, the connection gets GOAWAY.
    pub max_local_error_reset_streams: usize,
}

impl Default for LimitSettings {
    fn default() -> Self {
        LimitSettings {
            max_connections: 10_000,
            handshake_timeout: Duration::from_secs(10),
            max_concurrent_streams: 1000,
            keepalive_interval: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(20),
            max_header_list_size: 64 * 1024,
            max_pending_accept_reset_streams: 20,
            max_local_error_reset_streams: 1024,
        }
    }
}

/// [`LimitSettings`] and the count of open connections they govern; clones share the count.
#[derive(Clone)]
pub struct ServerLimits {
    settings: LimitSettings,
    connections: Arc<Semaphore>,
    refused: Arc<Refused>,
}

/// Connections refused for the cap since it was last logged, and when that was.
#[derive(Default)]
struct Refused {
    count: AtomicU64,
    logged: Mutex<Option<Instant>>,
}

/// At most one "connection limit reached" line per this long (an attack would flood the log).
const REFUSED_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Client streams one backchannel session may open: Gitaly serves gRPC on the first and
/// accepts no other, and no client opens more.
pub const MAX_SESSION_STREAMS: usize = 1;

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits::new(LimitSettings::default())
    }
}

impl ServerLimits {
    pub fn new(settings: LimitSettings) -> Self {
        ServerLimits {
            connections: Arc::new(Semaphore::new(
                settings.max_connections.clamp(1, Semaphore::MAX_PERMITS),
            )),
            settings,
            refused: Arc::default(),
        }
    }

    pub fn settings(&self) -> &LimitSettings {
        &self.settings
    }

    /// tonic's server builder with the HTTP/2 limits set.
    pub fn server(&self) -> tonic::transport::Server {
        let s = &self.settings;
        tonic::transport::Server::builder()
            .max_concurrent_streams(s.max_concurrent_streams)
            .http2_keepalive_interval(Some(s.keepalive_interval))
            .http2_keepalive_timeout(Some(s.keepalive_timeout))
            .http2_max_header_list_size(s.max_header_list_size)
            .http2_max_pending_accept_reset_streams(Some(s.max_pending_accept_reset_streams))
            .http2_max_local_error_reset_streams(Some(s.max_local_error_reset_streams))
    }

    /// The h2 crate's server builder with the same limits as [`ServerLimits::server`] (keep
    /// the two alike: a limit set on one only leaves the other server open). Keepalive is not
    /// a setting of the connection: the router's server runs it with
    /// [`LimitSettings::keepalive_interval`] and [`LimitSettings::keepalive_timeout`]. The
    /// windows and buffers are hyper's server defaults, which the router's listeners used
    /// before they served HTTP/2 on h2 directly.
    pub fn h2_builder(&self) -> h2::server::Builder {
        /// A megabyte of window per connection and per stream: the spec's 64 KiB would hold a
        /// clone or push to one window per round trip.
        const WINDOW: u32 = 1024 * 1024;
        /// What a connection may buffer for sending beyond the peer's window, per stream.
        const MAX_SEND_BUFFER: usize = 400 * 1024;
        let s = &self.settings;
        let mut builder = h2::server::Builder::new();
        builder
            .initial_window_size(WINDOW)
            .initial_connection_window_size(WINDOW)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .max_concurrent_streams(s.max_concurrent_streams)
            .max_header_list_size(s.max_header_list_size)
            .max_pending_accept_reset_streams(s.max_pending_accept_reset_streams)
            .max_local_error_reset_streams(Some(s.max_local_error_reset_streams));
        builder
    }

    /// A place for one more connection, or `None` (and a log line, at most one per
    /// [`REFUSED_LOG_INTERVAL`]) when `max_connections` are open.
    pub(crate) fn admit(&self, remote_addr: &str) -> Option<OwnedSemaphorePermit> {
        if let Ok(permit) = self.connections.clone().try_acquire_owned() {
            return Some(permit);
        }
        let refused = self.refused.count.fetch_add(1, Ordering::Relaxed) + 1;
        let mut logged = self
            .refused
            .logged
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if logged.is_none_or(|at| at.elapsed() >= REFUSED_LOG_INTERVAL) {
            *logged = Some(Instant::now());
            self.refused.count.store(0, Ordering::Relaxed);
            tracing::warn!(
                max_connections = self.settings.max_connections,
                refused,
                remote_addr,
                "connection limit reached: closing new connections until others close"
            );
        }
        None
    }
}

/// The HTTP/2 client preface: what a connection must send before its first SETTINGS frame.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The preface and a frame header.
const HEAD: usize = PREFACE.len() + 9;

/// A server connection that must complete the client's side of the HTTP/2 handshake (the
/// preface and the first frame after it) before a deadline; after it, reads fail with
/// `TimedOut` and the HTTP/2 server closes the connection. hyper has no such deadline: a
/// client that sent the preface and nothing more held its connection (and its task) for ever.
pub(crate) struct HandshakeDeadline<T> {
    io: T,
    /// Until the handshake is complete.
    deadline: Option<Pin<Box<Sleep>>>,
    head: [u8; HEAD],
    seen: usize,
    /// Bytes the handshake has: the preface, a frame header, then that frame's payload.
    needed: usize,
}

impl<T> HandshakeDeadline<T> {
    pub(crate) fn new(io: T, deadline: Instant) -> Self {
        HandshakeDeadline {
            io,
            deadline: Some(Box::pin(tokio::time::sleep_until(deadline))),
            head: [0; HEAD],
            seen: 0,
            needed: HEAD,
        }
    }

    /// Takes note of bytes read; the deadline goes once the handshake is in.
    fn saw(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            if self.seen < HEAD {
                self.head[self.seen] = byte;
            }
            self.seen += 1;
            if self.seen == HEAD {
                let frame = &self.head[PREFACE.len()..];
                let length = u32::from_be_bytes([0, frame[0], frame[1], frame[2]]);
                self.needed = HEAD + length as usize;
            }
            if self.seen >= self.needed {
                self.deadline = None;
                return;
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for HandshakeDeadline<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(deadline) = this.deadline.as_mut() {
            if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no HTTP/2 handshake within the handshake timeout",
                )));
            }
        }
        let before = buf.filled().len();
        let result = std::task::ready!(Pin::new(&mut this.io).poll_read(cx, buf));
        if this.deadline.is_some() {
            this.saw(&buf.filled()[before..]);
        }
        Poll::Ready(result)
    }
}

super::io::forward_async_write!(HandshakeDeadline, io);

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn settings_frame(payload: usize) -> Vec<u8> {
        let mut frame = vec![0, 0, payload as u8, 4, 0, 0, 0, 0, 0];
        frame.extend(std::iter::repeat_n(0u8, payload));
        frame
    }

    #[tokio::test]
    async fn a_complete_handshake_lifts_the_deadline() {
        let (mut client, server) = tokio::io::duplex(4096);
        let deadline = Instant::now() + Duration::from_millis(300);
        let mut conn = HandshakeDeadline::new(server, deadline);
        let mut hello = PREFACE.to_vec();
        hello.extend(settings_frame(6));
        // In pieces, as a slow client would send it.
        for piece in hello.chunks(5) {
            client.write_all(piece).await.unwrap();
        }
        let mut buf = vec![0u8; hello.len()];
        conn.read_exact(&mut buf).await.unwrap();
        assert_eq!(buf, hello);
        tokio::time::sleep_until(deadline + Duration::from_millis(100)).await;
        client.write_all(b"later").await.unwrap();
        let mut later = [0u8; 5];
        conn.read_exact(&mut later).await.unwrap();
        assert_eq!(&later, b"later");
    }

    #[tokio::test]
    async fn a_preface_without_settings_times_out() {
        let (mut client, server) = tokio::io::duplex(4096);
        let mut conn = HandshakeDeadline::new(server, Instant::now() + Duration::from_millis(200));
        client.write_all(PREFACE).await.unwrap();
        // The frame header says 6 bytes of payload; only 3 come.
        client.write_all(&settings_frame(6)[..12]).await.unwrap();
        let mut buf = vec![0u8; 1024];
        let mut read = 0;
        let err = loop {
            match conn.read(&mut buf).await {
                Ok(n) => read += n,
                Err(err) => break err,
            }
        };
        assert_eq!(read, PREFACE.len() + 12);
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
