//! Write coalescing for yamux sessions (a server's and a client's): the session flushes after
//! every frame, and this turns the frames of one poll of the session into one write to the
//! socket. Kept apart from the server and the client because it is an I/O adapter with its own
//! invariants (order, a bound on what waits, backpressure) and its own tests.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_yamux::{Session, StreamHandle};

/// At most this many bytes wait in a [`Coalesced`] connection's buffer.
const COALESCE_LIMIT: usize = 64 * 1024;
/// A write at least this large, with nothing buffered, goes to the connection directly.
const COALESCE_DIRECT: usize = 16 * 1024;

/// A connection for a yamux session whose writes are gathered and written out once per poll
/// of the session ([`CoalescedWriter::poll_drain`]), instead of once per yamux frame: the
/// session flushes after every frame it sends, which is a system call per frame, while a poll
/// of the session often sends several (the answers of several calls, window updates).
///
/// A flush returns at once; the bytes are written by `poll_drain`, which the task polling the
/// session calls after each poll of it, so nothing waits longer than that poll. At most
/// [`COALESCE_LIMIT`] bytes wait: a write that does not fit waits (Pending) until they are
/// written, which keeps the session's backpressure; bulk writes go to the connection directly,
/// after what waits. Reads go straight to the connection.
pub struct Coalesced<T> {
    shared: Arc<Mutex<CoalescedState<T>>>,
}

/// The handle with which the task polling a session writes out what the session wrote.
pub struct CoalescedWriter<T> {
    shared: Arc<Mutex<CoalescedState<T>>>,
}

struct CoalescedState<T> {
    io: T,
    buf: Vec<u8>,
    /// How much of `buf` is written.
    written: usize,
    /// A write failure, reported by every later write.
    failed: Option<io::ErrorKind>,
    /// The last bulk write went to the connection directly and was not taken (Pending): the
    /// session still holds those bytes, so the connection is not drained.
    blocked: bool,
}

impl<T: AsyncWrite + Unpin> CoalescedState<T> {
    /// Writes buffered bytes until none are left or the connection is not ready.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(kind) = self.failed {
            return Poll::Ready(Err(kind.into()));
        }
        while self.written < self.buf.len() {
            match Pin::new(&mut self.io).poll_write(cx, &self.buf[self.written..]) {
                Poll::Ready(Ok(0)) => {
                    self.failed = Some(io::ErrorKind::WriteZero);
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => self.written += n,
                Poll::Ready(Err(err)) => {
                    self.failed = Some(err.kind());
                    return Poll::Ready(Err(err));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
        self.buf.clear();
        self.written = 0;
        Pin::new(&mut self.io).poll_flush(cx)
    }
}

impl<T> Coalesced<T> {
    pub fn new(io: T) -> (Coalesced<T>, CoalescedWriter<T>) {
        let shared = Arc::new(Mutex::new(CoalescedState {
            io,
            buf: Vec::new(),
            written: 0,
            failed: None,
            blocked: false,
        }));
        (
            Coalesced {
                shared: shared.clone(),
            },
            CoalescedWriter { shared },
        )
    }
}

fn lock_state<T>(
    shared: &Mutex<CoalescedState<T>>,
) -> std::sync::MutexGuard<'_, CoalescedState<T>> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

impl<T: AsyncWrite + Unpin> CoalescedWriter<T> {
    /// Writes out what the session wrote; Pending while the connection is not ready for it
    /// (the task is woken when it is).
    pub fn poll_drain(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        lock_state(&self.shared).poll_drain(cx)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesced<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut lock_state(&self.shared).io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesced<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut state = lock_state(&self.shared);
        if let Some(kind) = state.failed {
            return Poll::Ready(Err(kind.into()));
        }
        let large = data.len() >= COALESCE_DIRECT;
        if !state.buf.is_empty() && (large || state.buf.len() + data.len() > COALESCE_LIMIT) {
            // Room first (or, for bulk data, order): what waits goes out now.
            if let Poll::Ready(drained) = state.poll_drain(cx) {
                drained?;
            } else {
                state.blocked = true;
                return Poll::Pending;
            }
        }
        if large {
            // Bulk data: no copy, and the connection's own backpressure.
            let written = Pin::new(&mut state.io).poll_write(cx, data);
            state.blocked = written.is_pending();
            return written;
        }
        state.blocked = false;
        state.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Written by the session's task after its poll (`CoalescedWriter::poll_drain`).
        match lock_state(&self.shared).failed {
            Some(kind) => Poll::Ready(Err(kind.into())),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut state = lock_state(&self.shared);
        ready!(state.poll_drain(cx))?;
        Pin::new(&mut state.io).poll_shutdown(cx)
    }
}

/// Polls a session for its next stream, then writes out what it wrote meanwhile. A failed
/// write ends the session, as it does when the session writes itself.
pub async fn next_stream<T>(
    session: &mut Session<Coalesced<T>>,
    writer: &CoalescedWriter<T>,
) -> Option<Result<StreamHandle, io::Error>>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    futures::future::poll_fn(|cx| {
        let next = session.poll_next_unpin(cx);
        match writer.poll_drain(cx) {
            Poll::Ready(Err(err)) => Poll::Ready(Some(Err(err))),
            _ => next,
        }
    })
    .await
}

/// Drives `session` until what its streams wrote so far is on the connection, and returns;
/// new streams opened meanwhile are refused. A stream handle hands its frames, its close
/// included, to the session through a channel that the session reads a few at a time when
/// polled; the task that ends a session must first let it read that channel empty, or the
/// end of the last answer is lost (the peer sees its stream cut). The session is idle once
/// a poll of it neither returns something nor wakes its own task (as it does when it stopped
/// with events left), and nothing waits here or in the session for the connection.
pub async fn drain_session<T>(
    session: &mut Session<Coalesced<T>>,
    writer: &CoalescedWriter<T>,
) -> io::Result<()>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    /// A poll's waker that notes whether the session woke itself.
    struct Noting {
        woken: AtomicBool,
        task: std::task::Waker,
    }
    impl futures::task::ArcWake for Noting {
        fn wake_by_ref(arc_self: &Arc<Self>) {
            arc_self.woken.store(true, Ordering::Release);
            arc_self.task.wake_by_ref();
        }
    }
    futures::future::poll_fn(|cx| {
        // Bounded, so that a peer that keeps sending cannot hold this loop: the task is
        // woken again and continues at its next poll.
        for _ in 0..64 {
            let noting = Arc::new(Noting {
                woken: AtomicBool::new(false),
                task: cx.waker().clone(),
            });
            let waker = futures::task::waker(noting.clone());
            let ended = match session.poll_next_unpin(&mut Context::from_waker(&waker)) {
                Poll::Ready(Some(Ok(stream))) => {
                    drop(stream);
                    continue;
                }
                Poll::Ready(Some(Err(err))) => return Poll::Ready(Err(err)),
                Poll::Ready(None) => true,
                Poll::Pending => false,
            };
            ready!(writer.poll_drain(cx))?;
            if ended {
                return Poll::Ready(Ok(()));
            }
            if noting.woken.load(Ordering::Acquire) {
                continue;
            }
            if lock_state(&writer.shared).blocked {
                // Woken by the connection when it takes more.
                return Poll::Pending;
            }
            return Poll::Ready(Ok(()));
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}

/// Writes out what a session that ended left buffered (its go-away), for at most a second.
pub async fn finish_writes<T: AsyncWrite + Unpin>(writer: &CoalescedWriter<T>) {
    let drain = futures::future::poll_fn(|cx| writer.poll_drain(cx));
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::mpsc;

    use crate::backchannel::yamux::yamux_config;

    /// Reads what is there now, without waiting.
    async fn read_now(io: &mut tokio::io::DuplexStream) -> Vec<u8> {
        let mut buf = vec![0u8; 1 << 20];
        match tokio::time::timeout(Duration::from_millis(50), io.read(&mut buf)).await {
            Ok(Ok(n)) => buf[..n].to_vec(),
            _ => Vec::new(),
        }
    }

    #[tokio::test]
    async fn coalesced_writes_go_out_at_the_drain_in_order() {
        let (ours, mut theirs) = tokio::io::duplex(1 << 20);
        let (mut io, writer) = Coalesced::new(ours);
        io.write_all(b"ab").await.unwrap();
        io.write_all(b"cd").await.unwrap();
        io.flush().await.unwrap();
        assert!(read_now(&mut theirs).await.is_empty());
        futures::future::poll_fn(|cx| writer.poll_drain(cx))
            .await
            .unwrap();
        assert_eq!(read_now(&mut theirs).await, b"abcd");
        // Bulk data goes out directly, after what waits.
        io.write_all(b"ef").await.unwrap();
        let bulk = vec![b'x'; COALESCE_DIRECT];
        io.write_all(&bulk).await.unwrap();
        let mut expected = b"ef".to_vec();
        expected.extend_from_slice(&bulk);
        let mut received = Vec::new();
        while received.len() < expected.len() {
            let more = read_now(&mut theirs).await;
            assert!(!more.is_empty(), "stalled at {}", received.len());
            received.extend(more);
        }
        assert_eq!(received, expected);
        // No more than the limit waits: a write that does not fit drains first.
        for _ in 0..(2 * COALESCE_LIMIT / 1000) {
            io.write_all(&[b'y'; 1000]).await.unwrap();
        }
        assert!(read_now(&mut theirs).await.len() >= COALESCE_LIMIT / 2);
        // A shutdown writes out what waits.
        io.shutdown().await.unwrap();
        let mut rest = Vec::new();
        theirs.read_to_end(&mut rest).await.unwrap();
        assert!(!rest.is_empty());
    }

    /// Bulk data both ways through a server session that coalesces its writes, over a small
    /// pipe (so writes wait for the peer).
    #[tokio::test]
    async fn coalesced_sessions_carry_bulk_data() {
        let (client_io, server_io) = tokio::io::duplex(16 * 1024);
        let (server_io, writer) = Coalesced::new(server_io);
        let mut server = Session::new_server(server_io, yamux_config(0, 256));
        let mut control = server.control();
        let (accepted_tx, mut accepted) = mpsc::channel(4);
        tokio::spawn(async move {
            while let Some(Ok(stream)) = next_stream(&mut server, &writer).await {
                let _ = accepted_tx.send(stream).await;
            }
            finish_writes(&writer).await;
        });
        let mut client = Session::new_client(client_io, yamux_config(0, 256));
        let mut client_control = client.control();
        let (opened_tx, opened) = tokio::sync::oneshot::channel();
        let mut opened_tx = Some(opened_tx);
        tokio::spawn(async move {
            while let Some(Ok(stream)) = client.next().await {
                if let Some(tx) = opened_tx.take() {
                    let _ = tx.send(stream);
                }
            }
        });
        // Client to server: the server's window updates go through the coalescing writer.
        let to_server = client_control.open_stream().await.unwrap();
        let at_server = accepted.recv().await.unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let expected = data.clone();
        let (mut client_read, mut client_write) = tokio::io::split(to_server);
        // yamux streams take their window updates in when read.
        let client_reader = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let _ = client_read.read(&mut buf).await;
        });
        let sender = tokio::spawn(async move {
            client_write.write_all(&data).await.unwrap();
            client_write.shutdown().await.unwrap();
        });
        let (mut server_read, _server_write) = tokio::io::split(at_server);
        let mut received = Vec::new();
        tokio::time::timeout(
            Duration::from_secs(20),
            server_read.read_to_end(&mut received),
        )
        .await
        .expect("upload stalled")
        .unwrap();
        assert_eq!(received, expected);
        sender.await.unwrap();
        client_reader.abort();
        // Server to client, on a stream the server opens.
        let stream = control.open_stream().await.unwrap();
        let (mut server_read, mut server_write) = tokio::io::split(stream);
        let server_reader = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let _ = server_read.read(&mut buf).await;
        });
        let writer = tokio::spawn(async move {
            server_write.write_all(&vec![7u8; 3_000_000]).await.unwrap();
            server_write.shutdown().await.unwrap();
        });
        let mut client_stream = opened.await.unwrap();
        let mut received = Vec::new();
        tokio::time::timeout(
            Duration::from_secs(20),
            client_stream.read_to_end(&mut received),
        )
        .await
        .expect("transfer stalled")
        .unwrap();
        assert_eq!(received.len(), 3_000_000);
        writer.await.unwrap();
        server_reader.abort();
    }
}
