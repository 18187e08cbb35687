//! The server's record of its clients' backchannel sessions ([`SessionRegistry`]) and what a
//! call knows about the connection it came over ([`PeerInfo`]). Apart from the server's accept
//! loop because sidechannels need exactly these two to reach a caller, and nothing else of the
//! server.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio_yamux::{Control, StreamHandle};

/// The backchannel sessions of a server's connected clients, by id.
#[derive(Clone, Default)]
pub struct SessionRegistry {
    sessions: Arc<Mutex<HashMap<u64, Entry>>>,
    next_id: Arc<AtomicU64>,
}

struct Entry {
    control: Control,
    /// How many [`HeldStream`]s of the session are open.
    held: Arc<watch::Sender<usize>>,
}

impl SessionRegistry {
    /// Records a session; the receiver tells how many of its [`HeldStream`]s are open.
    pub(crate) fn insert(&self, control: Control) -> (u64, watch::Receiver<usize>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (held, open) = watch::channel(0);
        self.lock().insert(
            id,
            Entry {
                control,
                held: Arc::new(held),
            },
        );
        (id, open)
    }

    pub(crate) fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens a new stream to the client of backchannel `id`, for as long as the session
    /// lives (the callback channel: it ends with the session).
    pub async fn open_stream(&self, id: u64) -> io::Result<StreamHandle> {
        let mut control = self
            .lock()
            .get(&id)
            .map(|entry| entry.control.clone())
            .ok_or_else(gone)?;
        open(&mut control).await
    }

    /// Opens a new stream to the client of backchannel `id` that keeps the session up until
    /// it is dropped, even after the client's gRPC connection ended: a sidechannel, whose
    /// bridge may still be writing the end of a pack when the call's answer is complete.
    pub async fn open_held_stream(&self, id: u64) -> io::Result<HeldStream> {
        let (mut control, held) = self
            .lock()
            .get(&id)
            .map(|entry| (entry.control.clone(), entry.held.clone()))
            .ok_or_else(gone)?;
        held.send_modify(|open| *open += 1);
        let hold = Hold(held);
        Ok(HeldStream {
            stream: open(&mut control).await?,
            _hold: hold,
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

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, "backchannel session is gone")
}

async fn open(control: &mut Control) -> io::Result<StreamHandle> {
    control
        .open_stream()
        .await
        .map_err(|e| io::Error::new(io::ErrorKind::BrokenPipe, format!("opening stream: {e:?}")))
}

/// Counts a [`HeldStream`] as open until dropped.
struct Hold(Arc<watch::Sender<usize>>);

impl Drop for Hold {
    fn drop(&mut self) {
        self.0.send_modify(|open| *open -= 1);
    }
}

/// A stream to a client that keeps its session up while open (see
/// [`SessionRegistry::open_held_stream`]).
pub struct HeldStream {
    stream: StreamHandle,
    _hold: Hold,
}

impl AsyncRead for HeldStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for HeldStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
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
