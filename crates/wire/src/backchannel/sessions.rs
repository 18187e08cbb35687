//! The server's record of its clients' backchannel sessions ([`SessionRegistry`]) and what a
//! call knows about the connection it came over ([`PeerInfo`]). Apart from the server's accept
//! loop because sidechannels need exactly these two to reach a caller, and nothing else of the
//! server.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio_yamux::{Control, StreamHandle};

/// The backchannel sessions of a server's connected clients, by id.
#[derive(Clone, Default)]
pub struct SessionRegistry {
    sessions: Arc<Mutex<HashMap<u64, Control>>>,
    next_id: Arc<AtomicU64>,
}

impl SessionRegistry {
    pub(crate) fn insert(&self, control: Control) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        self.lock().insert(id, control);
        id
    }

    pub(crate) fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Control>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens a new stream to the client of backchannel `id`.
    pub async fn open_stream(&self, id: u64) -> io::Result<StreamHandle> {
        let mut control = self.lock().get(&id).cloned().ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, "backchannel session is gone")
        })?;
        control.open_stream().await.map_err(|e| {
            io::Error::new(io::ErrorKind::BrokenPipe, format!("opening stream: {e:?}"))
        })
    }

    /// How many clients are connected with a backchannel.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a handler knows about the connection a call came over (a request extension).
#[derive(Clone, Debug, Default)]
pub struct PeerInfo {
    /// Shared, since the server copies the connection's `PeerInfo` into every call.
    pub remote_addr: Arc<str>,
    /// Set when the client connected with the backchannel handshake.
    pub backchannel_id: Option<u64>,
}
