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

use super::coalesce::{finish_writes, next_stream, Coalesced};
use super::io::{sniff, BoxIo, BACKCHANNEL_MAGIC, SNIFF_TIMEOUT};
use super::limits::{HandshakeDeadline, ServerLimits, MAX_SESSION_STREAMS};
use super::listener::{Accepted, Listener};
use super::measured::Measured;
use super::sessions::{PeerInfo, SessionRegistry};

/// One HTTP/2 connection for the gRPC server: a plain socket or one yamux stream.
pub struct ServerConn {
    io: BoxIo,
    info: PeerInfo,
    /// What ends with the connection: its place under the connection cap (a plain
    /// connection), or what tells its backchannel session that its gRPC stream is done.
    _held: Held,
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
        Pin::new(&mut self.io).poll_shutdown(cx)
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
/// (tonic's, with a shutdown signal) thus serves every connection it accepted.
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
/// session ends with that connection, so a client that vanished, whose connection the
/// HTTP/2 keepalive closes, leaves no session behind.
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
    let (io, writer) = Coalesced::new(Measured::new(io));
    let mut session = Session::new_server(io, yamux);
    let id = registry.insert(session.control());
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
    loop {
        let stream = tokio::select! {
            stream = next_stream(&mut session, &writer) => stream,
            _ = &mut done, if done_tx.is_none() => {
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
                    io: Box::new(HandshakeDeadline::new(stream, deadline)),
                    info: PeerInfo {
                        remote_addr: remote_addr.clone(),
                        backchannel_id: Some(id),
                    },
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
