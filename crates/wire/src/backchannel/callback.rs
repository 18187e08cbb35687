//! gRPC channels from a server to its callers, over their backchannel sessions: a caller that
//! serves gRPC on the streams the server opens (Praefect serves RefTransaction to its nodes
//! that way) is reached on the very connection its call came in on; a router has no address
//! of its own to dial.
//!
//! One tonic channel per session, whose "connector" opens a yamux stream back to the caller;
//! kept while it is used, so the votes of one call, and of the calls that follow, share one
//! HTTP/2 connection. A channel is dropped when a call on it fails (the next call builds a new
//! one, and a session that is gone fails that at once), and when it has not been used for
//! [`IDLE`] (sessions end without telling us; the map must not grow with every session).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

use super::sessions::SessionRegistry;

/// A channel unused this long is dropped.
pub const IDLE: Duration = Duration::from_secs(600);
/// Bound on opening the stream and the HTTP/2 handshake over it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The channels to the callers of one server's backchannel sessions.
#[derive(Clone)]
pub struct CallbackChannels {
    sessions: SessionRegistry,
    channels: Arc<Mutex<HashMap<u64, Cached>>>,
}

struct Cached {
    channel: Channel,
    last_used: Instant,
}

impl CallbackChannels {
    pub fn new(sessions: SessionRegistry) -> Self {
        CallbackChannels {
            sessions,
            channels: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Cached>> {
        self.channels.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A channel to the caller of backchannel session `id`. Connects lazily: a session that
    /// is gone shows as an error of the first call.
    pub fn channel(&self, id: u64) -> Channel {
        let now = Instant::now();
        let mut channels = self.lock();
        channels.retain(|_, cached| now.duration_since(cached.last_used) < IDLE);
        let cached = channels.entry(id).or_insert_with(|| Cached {
            channel: self.connect(id),
            last_used: now,
        });
        cached.last_used = now;
        cached.channel.clone()
    }

    /// Drops the channel of session `id` (after a failed call).
    pub fn forget(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// How many channels are kept (for tests).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn connect(&self, id: u64) -> Channel {
        let sessions = self.sessions.clone();
        let connector = tower::service_fn(move |_: tonic::codegen::http::Uri| {
            let sessions = sessions.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(sessions.open_stream(id).await?)) }
        });
        Endpoint::from_static("http://backchannel.invalid")
            .connect_timeout(CONNECT_TIMEOUT)
            .connect_with_connector_lazy(connector)
    }
}
