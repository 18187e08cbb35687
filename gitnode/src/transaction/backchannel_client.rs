//! gRPC clients to the callers themselves, over their backchannel sessions: the router serves
//! RefTransaction on streams the node opens back to it, so a node votes on the very
//! connection the transactional call came in on (a router has no address of its own to dial).
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
use praefect_wire::backchannel::SessionRegistry;
use praefect_wire::proto::ref_transaction_client::RefTransactionClient;
use tonic::transport::{Channel, Endpoint};

/// A channel unused this long is dropped.
pub const IDLE: Duration = Duration::from_secs(600);
/// Bound on opening the stream and the HTTP/2 handshake over it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct BackchannelClients {
    sessions: SessionRegistry,
    channels: Arc<Mutex<HashMap<u64, Cached>>>,
}

struct Cached {
    channel: Channel,
    last_used: Instant,
}

impl BackchannelClients {
    pub fn new(sessions: SessionRegistry) -> Self {
        BackchannelClients {
            sessions,
            channels: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Cached>> {
        self.channels.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A RefTransaction client to the caller of backchannel session `id`. Connects lazily:
    /// a session that is gone shows as an error of the first call.
    pub fn client(&self, id: u64) -> RefTransactionClient<Channel> {
        let now = Instant::now();
        let mut channels = self.lock();
        channels.retain(|_, cached| now.duration_since(cached.last_used) < IDLE);
        let cached = channels.entry(id).or_insert_with(|| Cached {
            channel: self.channel(id),
            last_used: now,
        });
        cached.last_used = now;
        RefTransactionClient::new(cached.channel.clone())
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

    fn channel(&self, id: u64) -> Channel {
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
