//! The server's side: every accepted connection is sniffed for the backchannel magic and
//! becomes either one plain gRPC connection or a yamux session whose streams are each one.
//! Both come out of [`incoming`] as [`ServerConn`]s for tonic's server, within the
//! [`ServerLimits`] given.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tokio_yamux::{Config as YamuxConfig, Session};
use tonic::transport::server::Connected;

use super::coalesce::{drain_session, finish_writes, next_stream, Coalesced};
use super::io::{sniff, BoxIo, BACKCHANNEL_MAGIC, SNIFF_TIMEOUT};
use super::limits::{HandshakeDeadline, ServerLimits, MAX_SESSION_STREAMS};
use super::listener::{Accepted, Listener};
use super::measured::Measured;
use super::readahead::ReadAhead;
use super::sessions::{PeerInfo, SessionRegistry};
use super::yamux::grpc_stream;

/// One HTTP/2 connection for the gRPC server: a plain socket or one yamux stream.
pub struct ServerConn {
    io: BoxIo,
    info: PeerInfo,
    /// How a shutdown of a backchannel stream waits until its session wrote the stream's
    /// last frames out (nothing to wait for on a plain socket).
    closing: Closing,
    /// What ends with the connection: its place under the connection cap (a plain
    /// connection), or what tells its backchannel session that its gRPC stream is done.
    _held: Held,
}

/// A request to a session: write out what its stream wrote, then answer.
type DrainRequest = oneshot::Sender<()>;

/// Where a [`ServerConn`]'s shutdown is. The server shuts a connection down after its last
/// answer and ends it right after: the stream's last frames then still wait for the session's
/// task (see [`drain_session`]), which would otherwise end the session without them, or be
/// cut by the process exiting after a graceful stop.
enum Closing {
    /// Not shut down yet; the session to ask, if any.
    Open(Option<mpsc::UnboundedSender<DrainRequest>>),
    Draining(oneshot::Receiver<()>),
    Closed,
}

enum Held {
    Permit(#[allow(dead_code)] tokio::sync::OwnedSemaphorePermit),
    /// Dropped with the connection, which ends the session (see `serve_session`).
    SessionStream(#[allow(dead_code)] tokio::sync::oneshot::Sender<()>),
}

impl Connected for ServerConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for ServerConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for ServerConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            match &mut this.closing {
                Closing::Open(session) => {
                    // The session is asked only once the stream's close is queued; a shutdown
                    // that is not done yet keeps it for the next poll.
                    std::task::ready!(Pin::new(&mut this.io).poll_shutdown(cx))?;
                    let (ack, drained) = oneshot::channel();
                    this.closing = match session.take() {
                        Some(session) if session.send(ack).is_ok() => Closing::Draining(drained),
                        // A plain socket, or a session that has ended.
                        _ => Closing::Closed,
                    };
                }
                Closing::Draining(drained) => {
                    // An error means the session ended: nothing more will be written.
                    let _ = std::task::ready!(Pin::new(drained).poll(cx));
                    this.closing = Closing::Closed;
                }
                Closing::Closed => return Poll::Ready(Ok(())),
            }
        }
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Told of each accepted connection, with its listener's [`Listener::scheme`] (the server's
/// metrics live with the server).
pub type AcceptObserver = Arc<dyn Fn(&'static str) + Send + Sync>;

/// [`incoming_until`] with the default [`ServerLimits`] and no stop (tests and tools):
/// accepting stops when the stream is dropped.
pub fn incoming(
    listener: Listener,
    registry: SessionRegistry,
    yamux: YamuxConfig,
    on_accept: Option<AcceptObserver>,
) -> Incoming {
    incoming_until(
        listener,
        registry,
        yamux,
        on_accept,
        ServerLimits::default(),
        std::future::pending(),
    )
}

/// Accepts connections on `listener` and yields one [`ServerConn`] per plain connection and
/// per backchannel session (its one gRPC stream), ready for
/// `tonic::transport::Server::serve_with_incoming`. `on_accept` hears of every connection.
/// Beyond `limits`' connection cap, new connections are closed at once; each connection and
/// stream must finish its handshake within the handshake timeout.
///
/// A stop loses no connection: once `stop` completes, accepting stops (the listener is
/// closed, so that another process sharing the socket, a SIGHUP hand-over's successor, gets
/// the next connections) and the stream ends as soon as the connections accepted before are
/// yielded, each after its handshake. A server that stops gracefully when its stream ends
/// (tonic's with a shutdown signal, or the router's own hyper server) thus serves every
/// connection it accepted.
pub fn incoming_until(
    listener: Listener,
    registry: SessionRegistry,
    yamux: YamuxConfig,
    on_accept: Option<AcceptObserver>,
    limits: ServerLimits,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Incoming {
    let (tx, rx) = mpsc::channel(64);
    let (end, ended) = oneshot::channel();
    tokio::spawn(async move {
        let mut stop = std::pin::pin!(stop);
        // Each connection holds a clone until it is yielded; nothing is ever sent.
        let (handshaking, mut handshakes) = mpsc::channel::<()>(1);
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = &mut stop => break,
                () = tx.closed() => return,
            };
            let (accepted, remote_addr) = match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(error = %err, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if let Some(observe) = &on_accept {
                observe(listener.scheme());
            }
            let Some(permit) = limits.admit(&remote_addr) else {
                drop(accepted);
                continue;
            };
            tokio::spawn(handle_connection(
                accepted,
                remote_addr,
                tx.clone(),
                registry.clone(),
                yamux,
                (permit, limits.settings().handshake_timeout),
                handshaking.clone(),
            ));
        }
        drop(listener);
        drop(handshaking);
        // `recv` answers None once every connection has dropped its clone.
        let _ = tokio::time::timeout(SNIFF_TIMEOUT, handshakes.recv()).await;
        let _ = end.send(());
    });
    Incoming {
        rx,
        ended: Some(ended),
    }
}

/// The connections [`incoming`] yields, as a stream for tonic's server.
pub struct Incoming {
    rx: mpsc::Receiver<io::Result<ServerConn>>,
    /// Completes once accepting has stopped and the connections accepted before were sent:
    /// the stream then ends after what is queued.
    ended: Option<oneshot::Receiver<()>>,
}

impl Stream for Incoming {
    type Item = io::Result<ServerConn>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(ended) = self.ended.as_mut() {
            if Pin::new(ended).poll(cx).is_ready() {
                self.ended = None;
                // Queued connections are still received; nothing more can be sent.
                self.rx.close();
            }
        }
        self.rx.poll_recv(cx)
    }
}

async fn handle_connection(
    accepted: Accepted,
    remote_addr: String,
    tx: mpsc::Sender<io::Result<ServerConn>>,
    registry: SessionRegistry,
    yamux: YamuxConfig,
    (permit, handshake_timeout): (tokio::sync::OwnedSemaphorePermit, Duration),
    handshaking: mpsc::Sender<()>,
) {
    let deadline = tokio::time::Instant::now() + handshake_timeout;
    let handshake = async {
        let io = accepted.into_io().await?;
        sniff(io, BACKCHANNEL_MAGIC).await
    };
    let sniffed = tokio::time::timeout_at(deadline, handshake).await;
    let (is_backchannel, io) = match sniffed {
        Ok(Ok(result)) => result,
        Ok(Err(err)) => {
            tracing::debug!(error = %err, remote_addr, "connection failed before its first bytes");
            return;
        }
        Err(_) => {
            tracing::debug!(remote_addr, "connection sent nothing; closed");
            return;
        }
    };
    if !is_backchannel {
        let conn = ServerConn {
            io: Box::new(HandshakeDeadline::new(io, deadline)),
            info: PeerInfo {
                remote_addr: remote_addr.into(),
                backchannel_id: None,
            },
            closing: Closing::Open(None),
            _held: Held::Permit(permit),
        };
        let _ = tx.send(Ok(conn)).await;
        return;
    }
    serve_session(
        Box::new(io),
        remote_addr,
        tx,
        registry,
        yamux,
        handshake_timeout,
        handshaking,
    )
    .await;
    drop(permit);
}

/// Runs a backchannel session: its first stream (opened within the handshake timeout) is
/// the client's gRPC connection; further streams are refused (Gitaly accepts one); the
/// session ends with that connection and the sidechannels still open then
/// ([`SessionRegistry::open_held_stream`]), so a client that vanished, whose connection the
/// HTTP/2 keepalive closes, leaves no session behind. Before it ends, what its streams wrote
/// is written out.
async fn serve_session(
    io: BoxIo,
    remote_addr: String,
    tx: mpsc::Sender<io::Result<ServerConn>>,
    registry: SessionRegistry,
    yamux: YamuxConfig,
    handshake_timeout: Duration,
    handshaking: mpsc::Sender<()>,
) {
    let mut handshaking = Some(handshaking);
    let (io, writer) = Coalesced::new(ReadAhead::new(Measured::new(io)));
    let mut session = Session::new_server(io, yamux);
    let (id, mut held_streams) = registry.insert(session.control());
    let remote_addr: Arc<str> = remote_addr.into();
    tracing::debug!(
        remote_addr = %remote_addr,
        backchannel_id = id,
        "backchannel session started"
    );
    let first_stream_by = tokio::time::sleep(handshake_timeout);
    tokio::pin!(first_stream_by);
    let mut opened = 0usize;
    // Ready (with an error) once every stream handed out is closed.
    let (done_tx, mut done) = tokio::sync::oneshot::channel::<()>();
    let mut done_tx = Some(done_tx);
    let (drain_tx, mut drain_requests) = mpsc::unbounded_channel::<DrainRequest>();
    let mut connection_closed = false;
    loop {
        let stream = tokio::select! {
            stream = next_stream(&mut session, &writer) => stream,
            Some(ack) = drain_requests.recv() => {
                drain_within(&mut session, &writer, id).await;
                let _ = ack.send(());
                continue;
            }
            _ = &mut done, if done_tx.is_none() && !connection_closed => {
                connection_closed = true;
                continue;
            }
            // Once the sidechannels still writing the end of an answer are done too.
            () = none_open(&mut held_streams), if connection_closed => {
                // A connection dropped without a shutdown may have left frames too.
                drain_within(&mut session, &writer, id).await;
                tracing::debug!(backchannel_id = id, "backchannel connection closed; ending the session");
                break;
            }
            () = &mut first_stream_by, if opened == 0 => {
                tracing::debug!(backchannel_id = id, "backchannel session opened no stream in time; closed");
                break;
            }
        };
        match stream {
            Some(Ok(stream)) => {
                if opened >= MAX_SESSION_STREAMS {
                    tracing::debug!(
                        backchannel_id = id,
                        "backchannel client opened one stream too many; refused"
                    );
                    drop(stream);
                    continue;
                }
                opened += 1;
                let held = match done_tx.take() {
                    Some(tx) => tx,
                    None => continue,
                };
                let deadline = tokio::time::Instant::now() + handshake_timeout;
                let conn = ServerConn {
                    io: Box::new(HandshakeDeadline::new(grpc_stream(stream), deadline)),
                    info: PeerInfo {
                        remote_addr: remote_addr.clone(),
                        backchannel_id: Some(id),
                    },
                    closing: Closing::Open(Some(drain_tx.clone())),
                    _held: Held::SessionStream(held),
                };
                // Refused when the server has stopped: the connection is dropped with its
                // `held`, which ends the session below.
                let _ = tx.send(Ok(conn)).await;
                // The first stream (the client's HTTP/2) ends the connection's handshake.
                drop(handshaking.take());
            }
            Some(Err(err)) => {
                tracing::debug!(backchannel_id = id, error = ?err, "backchannel session ended");
                break;
            }
            None => break,
        }
    }
    registry.remove(id);
    finish_writes(&writer).await;
}

/// Completes once no held stream is open (or the registry's count is gone).
async fn none_open(held_streams: &mut tokio::sync::watch::Receiver<usize>) {
    let _ = held_streams.wait_for(|open| *open == 0).await;
}

/// How long a session may take to write out its stream's last frames: as long as a peer
/// that reads may need, and bounded for one that does not (the graceful stop bounds the
/// wait for the whole server anyway).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

async fn drain_within<T>(
    session: &mut Session<Coalesced<T>>,
    writer: &super::coalesce::CoalescedWriter<T>,
    id: u64,
) where
    T: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::time::timeout(DRAIN_TIMEOUT, drain_session(session, writer)).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => {
            tracing::debug!(backchannel_id = id, error = %err, "backchannel session failed while writing its last frames")
        }
        Err(_) => {
            tracing::debug!(
                backchannel_id = id,
                "backchannel peer did not take the last frames in time"
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After the stream is dropped, a connection attempt is refused: nothing in this process
    /// accepts it (and closes it unserved) while another process could serve it.
    #[tokio::test]
    async fn the_listener_closes_when_the_stream_is_dropped() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let stream = incoming(
            Listener::Tcp(listener),
            SessionRegistry::default(),
            super::super::yamux_config(0, 256),
            None,
        );
        drop(stream);
        // On this single-threaded runtime, yielding lets the accept loop (woken by the drop)
        // run to its end before the connection attempt.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(
            tokio::net::TcpStream::connect(address).await.is_err(),
            "the listener still accepts after the stream was dropped"
        );
    }

    const ANSWER: usize = 4 << 20;

    fn answer() -> Vec<u8> {
        (0..ANSWER).map(|i| (i % 253) as u8).collect()
    }

    /// Writes `data` in small writes (many frames: more events than one poll of the session
    /// takes), reading beside: a yamux stream takes the peer's window updates in when it is
    /// read, as an HTTP/2 server always does.
    async fn write_reading<S>(io: S, data: &[u8]) -> S
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut reader, mut writer) = tokio::io::split(io);
        let (stop, stopped) = oneshot::channel::<()>();
        let reading = tokio::spawn(async move {
            let mut stopped = std::pin::pin!(stopped);
            let mut buf = [0u8; 64];
            loop {
                tokio::select! {
                    _ = &mut stopped => return reader,
                    read = reader.read(&mut buf) => {
                        if read.unwrap_or(0) == 0 {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                }
            }
        });
        for chunk in data.chunks(1000) {
            writer.write_all(chunk).await.unwrap();
        }
        stop.send(()).unwrap();
        reading.await.unwrap().unsplit(writer)
    }

    /// A client session on a new connection to `address`, its gRPC stream opened and its
    /// first bytes sent; streams the server opens come out of the receiver.
    async fn client_session(
        address: std::net::SocketAddr,
    ) -> (
        tokio_yamux::StreamHandle,
        mpsc::Receiver<tokio_yamux::StreamHandle>,
    ) {
        use futures::StreamExt;
        use tokio::io::AsyncWriteExt;
        let mut tcp = tokio::net::TcpStream::connect(address).await.unwrap();
        tcp.write_all(BACKCHANNEL_MAGIC).await.unwrap();
        let mut session = Session::new_client(tcp, super::super::yamux_config(0, 256));
        let mut control = session.control();
        let (opened_tx, opened) = mpsc::channel(4);
        tokio::spawn(async move {
            while let Some(Ok(stream)) = session.next().await {
                let _ = opened_tx.send(stream).await;
            }
        });
        let mut stream = control.open_stream().await.unwrap();
        stream.write_all(b"ping").await.unwrap();
        (stream, opened)
    }

    async fn read_answer(mut stream: tokio_yamux::StreamHandle) {
        use tokio::io::AsyncReadExt;
        let mut received = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut received))
            .await
            .expect("the answer stalled")
            .expect("the stream was cut before the end of the answer");
        assert_eq!(received.len(), ANSWER, "the answer was cut");
        assert!(received == answer());
    }

    async fn serve_one(registry: SessionRegistry) -> (std::net::SocketAddr, Incoming) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let incoming = incoming(
            Listener::Tcp(listener),
            registry,
            super::super::yamux_config(0, 256),
            None,
        );
        (address, incoming)
    }

    /// The last answer on a backchannel stream reaches the client in full when the server
    /// shuts the connection down and drops it at once, as a server does after its last call:
    /// the session writes out what the stream wrote before it ends.
    #[tokio::test]
    async fn a_stream_shut_down_and_dropped_at_once_delivers_everything() {
        use futures::StreamExt;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (address, mut incoming) = serve_one(SessionRegistry::default()).await;
        let server = tokio::spawn(async move {
            let mut conn = incoming.next().await.unwrap().unwrap();
            let mut first = [0u8; 4];
            conn.read_exact(&mut first).await.unwrap();
            let mut conn = write_reading(conn, &answer()).await;
            conn.shutdown().await.unwrap();
            drop(conn);
            incoming
        });
        let (stream, _opened) = client_session(address).await;
        read_answer(stream).await;
        drop(server.await.unwrap());
    }

    /// A sidechannel (a held stream the server opened) still writing when the client's gRPC
    /// connection ends keeps the session up until it is done.
    #[tokio::test]
    async fn a_held_stream_outlives_the_grpc_connection() {
        use futures::StreamExt;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let registry = SessionRegistry::default();
        let (address, mut incoming) = serve_one(registry.clone()).await;
        let server = tokio::spawn(async move {
            let mut conn = incoming.next().await.unwrap().unwrap();
            let mut first = [0u8; 4];
            conn.read_exact(&mut first).await.unwrap();
            let session = conn.connect_info().backchannel_id.unwrap();
            let held = registry.open_held_stream(session).await.unwrap();
            conn.shutdown().await.unwrap();
            drop(conn);
            let mut held = write_reading(held, &answer()).await;
            held.shutdown().await.unwrap();
            drop(held);
            incoming
        });
        let (_grpc, mut opened) = client_session(address).await;
        read_answer(opened.recv().await.unwrap()).await;
        drop(server.await.unwrap());
    }

    /// A connection accepted before the stop but still in its handshake is yielded once it
    /// is done, then the stream ends; the listener is closed at the stop.
    #[tokio::test]
    async fn the_stream_ends_after_the_connections_accepted_before_the_stop() {
        use tokio::io::AsyncWriteExt;
        use tokio_stream::StreamExt;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let accepted = Arc::new(tokio::sync::Notify::new());
        let observer: AcceptObserver = {
            let accepted = accepted.clone();
            Arc::new(move |_| accepted.notify_one())
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let mut stream = incoming_until(
            Listener::Tcp(listener),
            SessionRegistry::default(),
            super::super::yamux_config(0, 256),
            Some(observer),
            ServerLimits::default(),
            async {
                let _ = stopped.await;
            },
        );
        let mut client = tokio::net::TcpStream::connect(address).await.unwrap();
        accepted.notified().await;
        stop.send(()).unwrap();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(
            tokio::net::TcpStream::connect(address).await.is_err(),
            "the listener still accepts after the stop"
        );
        // The handshake completes after the stop: a plain HTTP/2 client's preface.
        client
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        assert!(matches!(stream.next().await, Some(Ok(_))));
        assert!(stream.next().await.is_none());
    }
}
