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

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures::StreamExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_yamux::{Config as YamuxConfig, Control, Session, StreamHandle};
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint};

use super::sidechannel::SidechannelRegistry;

/// What a backchannel client writes first.
pub const BACKCHANNEL_MAGIC: &[u8; 11] = b"backchannel";
/// What the server writes first on a sidechannel stream.
pub const SIDECHANNEL_MAGIC: &[u8; 11] = b"sidechannel";

/// How long a new connection may take to send its first bytes.
const SNIFF_TIMEOUT: Duration = Duration::from_secs(10);

/// Anything a connection can be carried over.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A boxed connection.
pub type BoxIo = Box<dyn Io>;

/// yamux settings from `[yamux]`; keepalive is off, as in Gitaly (gRPC has its own).
pub fn yamux_config(window: u32, accept_backlog: usize) -> YamuxConfig {
    YamuxConfig {
        enable_keepalive: false,
        max_stream_window_size: window.max(tokio_yamux::config::INITIAL_STREAM_WINDOW),
        accept_backlog: accept_backlog.max(1),
        ..YamuxConfig::default()
    }
}

/// A stream whose first bytes were already read (to look for a magic); they are replayed
/// before the rest.
pub struct Prefixed<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Prefixed<T> {
    pub fn new(prefix: Bytes, inner: T) -> Self {
        Prefixed { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

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
            ready!(state.poll_drain(cx))?;
        }
        if large {
            // Bulk data: no copy, and the connection's own backpressure.
            return Pin::new(&mut state.io).poll_write(cx, data);
        }
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

/// Writes out what a session that ended left buffered (its go-away), for at most a second.
pub async fn finish_writes<T: AsyncWrite + Unpin>(writer: &CoalescedWriter<T>) {
    let drain = futures::future::poll_fn(|cx| writer.poll_drain(cx));
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

/// Reads up to `magic.len()` bytes: whether the stream starts with `magic`, and the stream
/// with any bytes read that were not the magic put back.
pub async fn sniff<T: AsyncRead + Unpin>(
    mut io: T,
    magic: &[u8],
) -> io::Result<(bool, Prefixed<T>)> {
    let mut buf = vec![0u8; magic.len()];
    let mut filled = 0;
    while filled < magic.len() {
        let n = io.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
        if buf[..filled] != magic[..filled] {
            break;
        }
    }
    buf.truncate(filled);
    if buf == magic {
        Ok((true, Prefixed::new(Bytes::new(), io)))
    } else {
        Ok((false, Prefixed::new(Bytes::from(buf), io)))
    }
}

/// The backchannel sessions of a server's connected clients, by id.
#[derive(Clone, Default)]
pub struct SessionRegistry {
    sessions: Arc<Mutex<HashMap<u64, Control>>>,
    next_id: Arc<AtomicU64>,
}

impl SessionRegistry {
    fn insert(&self, control: Control) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        self.lock().insert(id, control);
        id
    }

    fn remove(&self, id: u64) {
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

/// One HTTP/2 connection for the gRPC server: a plain socket or one yamux stream.
pub struct ServerConn {
    io: BoxIo,
    info: PeerInfo,
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

/// A listening socket. TLS listeners do the handshake per connection, before the backchannel
/// magic is looked for (the backchannel runs inside TLS).
pub enum Listener {
    Tcp(TcpListener),
    Tls(TcpListener, tokio_rustls::TlsAcceptor),
    Unix(UnixListener),
}

/// An accepted connection, before any handshake.
enum Accepted {
    Ready(BoxIo),
    NeedsTls(TcpStream, tokio_rustls::TlsAcceptor),
}

impl Accepted {
    async fn into_io(self) -> io::Result<BoxIo> {
        match self {
            Accepted::Ready(io) => Ok(io),
            Accepted::NeedsTls(tcp, acceptor) => Ok(Box::new(acceptor.accept(tcp).await?)),
        }
    }
}

impl Listener {
    async fn accept(&self) -> io::Result<(Accepted, String)> {
        match self {
            Listener::Tcp(l) => {
                let (s, addr) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok((Accepted::Ready(Box::new(s)), addr.to_string()))
            }
            Listener::Tls(l, acceptor) => {
                let (s, addr) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok((Accepted::NeedsTls(s, acceptor.clone()), addr.to_string()))
            }
            Listener::Unix(l) => {
                let (s, _) = l.accept().await?;
                Ok((Accepted::Ready(Box::new(s)), "unix".to_string()))
            }
        }
    }
}

/// Accepts connections on `listener` and yields one [`ServerConn`] per plain connection and
/// per yamux stream of each backchannel session, ready for
/// `tonic::transport::Server::serve_with_incoming`.
pub fn incoming(
    listener: Listener,
    registry: SessionRegistry,
    yamux: YamuxConfig,
) -> ReceiverStream<io::Result<ServerConn>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (accepted, remote_addr) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(error = %err, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            tokio::spawn(handle_connection(
                accepted,
                remote_addr,
                tx.clone(),
                registry.clone(),
                yamux,
            ));
        }
    });
    ReceiverStream::new(rx)
}

async fn handle_connection(
    accepted: Accepted,
    remote_addr: String,
    tx: mpsc::Sender<io::Result<ServerConn>>,
    registry: SessionRegistry,
    yamux: YamuxConfig,
) {
    let handshake = async {
        let io = accepted.into_io().await?;
        sniff(io, BACKCHANNEL_MAGIC).await
    };
    let sniffed = tokio::time::timeout(SNIFF_TIMEOUT, handshake).await;
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
            io: Box::new(io),
            info: PeerInfo {
                remote_addr: remote_addr.into(),
                backchannel_id: None,
            },
        };
        let _ = tx.send(Ok(conn)).await;
        return;
    }
    let (io, writer) = Coalesced::new(io);
    let mut session = Session::new_server(io, yamux);
    let id = registry.insert(session.control());
    let remote_addr: Arc<str> = remote_addr.into();
    tracing::debug!(
        remote_addr = %remote_addr,
        backchannel_id = id,
        "backchannel session started"
    );
    while let Some(stream) = next_stream(&mut session, &writer).await {
        match stream {
            Ok(stream) => {
                let conn = ServerConn {
                    io: Box::new(stream),
                    info: PeerInfo {
                        remote_addr: remote_addr.clone(),
                        backchannel_id: Some(id),
                    },
                };
                if tx.send(Ok(conn)).await.is_err() {
                    break;
                }
            }
            Err(err) => {
                tracing::debug!(backchannel_id = id, error = ?err, "backchannel session ended");
                break;
            }
        }
    }
    registry.remove(id);
    finish_writes(&writer).await;
}

/// What a backchannel client offers the server on streams the server opens.
#[derive(Clone, Default)]
pub struct ClientHandler {
    /// Waiting sidechannels of calls in flight.
    pub sidechannels: SidechannelRegistry,
    /// gRPC services the server may call back (Praefect's RefTransaction); none by default.
    pub routes: Option<tonic::service::Routes>,
}

/// Opens the raw connection for an address: `tcp://host:port`, `host:port`, `tls://host:port`
/// or `unix:/path`.
pub async fn connect_raw(address: &str) -> io::Result<BoxIo> {
    if let Some(path) = address
        .strip_prefix("unix://")
        .or_else(|| address.strip_prefix("unix:"))
    {
        Ok(Box::new(UnixStream::connect(path).await?))
    } else if let Some(target) = address.strip_prefix("tls://") {
        Ok(Box::new(super::tls::connect(target).await?))
    } else {
        let target = address.strip_prefix("tcp://").unwrap_or(address);
        let stream = TcpStream::connect(target).await?;
        let _ = stream.set_nodelay(true);
        Ok(Box::new(stream))
    }
}

/// Dials `address` with the backchannel handshake. Each (re)connection of the returned
/// channel is a new yamux session whose first stream carries our gRPC calls; streams the
/// server opens are handed to `handler`. The channel connects lazily, so a server that is
/// down now does not fail the caller.
pub fn dial_lazy(address: &str, yamux: YamuxConfig, handler: ClientHandler) -> io::Result<Channel> {
    let (endpoint, connector) =
        endpoint_and_connector(address, yamux, handler, Duration::from_secs(10))?;
    Ok(endpoint.connect_with_connector_lazy(connector))
}

/// Like [`dial_lazy`], but connects now, within `timeout`.
pub async fn dial(
    address: &str,
    yamux: YamuxConfig,
    handler: ClientHandler,
    timeout: Duration,
) -> io::Result<Channel> {
    let (endpoint, connector) = endpoint_and_connector(address, yamux, handler, timeout)?;
    endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|err| io::Error::other(error_chain(&err)))
}

/// An error with all its causes, "a: b: c" (tonic's transport errors say little on their own).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        // A tonic Status displays as "code: '...', message: \"...\"": its message says it all.
        let cause_text = match cause.downcast_ref::<tonic::Status>() {
            Some(status) => status.message().to_string(),
            None => cause.to_string(),
        };
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

type Connector = tower::util::BoxCloneSyncService<http::Uri, TokioIo<StreamHandle>, io::Error>;

fn endpoint_and_connector(
    address: &str,
    yamux: YamuxConfig,
    handler: ClientHandler,
    timeout: Duration,
) -> io::Result<(Endpoint, Connector)> {
    let endpoint = Endpoint::from_shared("http://backchannel.invalid".to_string())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?
        .connect_timeout(timeout)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    let address = address.to_string();
    let connector = tower::service_fn(move |_uri: http::Uri| {
        let address = address.clone();
        let handler = handler.clone();
        async move {
            let stream = open_session(&address, yamux, handler).await?;
            Ok::<_, io::Error>(TokioIo::new(stream))
        }
    });
    Ok((endpoint, tower::util::BoxCloneSyncService::new(connector)))
}

async fn open_session(
    address: &str,
    yamux: YamuxConfig,
    handler: ClientHandler,
) -> io::Result<StreamHandle> {
    let io = connect_raw(address).await?;
    Ok(start_client_session(io, yamux, handler).await?.stream)
}

/// Where a client's connection goes: an address as [`connect_raw`] takes it, or one socket
/// address that a name resolved to. A resolved address over TLS keeps the name, because the
/// certificate is for the name, not for the IP.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum DialTarget {
    Address(String),
    Resolved {
        addr: SocketAddr,
        tls_server_name: Option<String>,
    },
}

impl fmt::Display for DialTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DialTarget::Address(address) => f.write_str(address),
            DialTarget::Resolved {
                addr,
                tls_server_name: None,
            } => write!(f, "{addr}"),
            DialTarget::Resolved {
                addr,
                tls_server_name: Some(name),
            } => write!(f, "{addr} (TLS as {name})"),
        }
    }
}

/// Opens the raw connection to `target`.
pub async fn connect_target(target: &DialTarget) -> io::Result<BoxIo> {
    match target {
        DialTarget::Address(address) => connect_raw(address).await,
        DialTarget::Resolved {
            addr,
            tls_server_name,
        } => {
            let tcp = TcpStream::connect(addr).await?;
            let _ = tcp.set_nodelay(true);
            match tls_server_name {
                None => Ok(Box::new(tcp)),
                Some(name) => {
                    let name =
                        rustls::pki_types::ServerName::try_from(name.clone()).map_err(|e| {
                            io::Error::new(io::ErrorKind::InvalidInput, format!("server name: {e}"))
                        })?;
                    Ok(Box::new(super::tls::connector()?.connect(name, tcp).await?))
                }
            }
        }
    }
}

/// A client's backchannel session: the stream that carries our HTTP/2 connection, and the
/// session's control. Closing the control ends the session, and with it the connection and
/// every stream the server opened on it; the session otherwise lives as long as the socket.
pub struct ClientSession {
    pub stream: StreamHandle,
    pub control: Control,
}

/// Starts a backchannel client session on a connected `io`: sends the magic, runs the yamux
/// client (streams the server opens go to `handler`) and opens the stream for our HTTP/2.
pub async fn start_client_session(
    mut io: BoxIo,
    yamux: YamuxConfig,
    handler: ClientHandler,
) -> io::Result<ClientSession> {
    io.write_all(BACKCHANNEL_MAGIC).await?;
    io.flush().await?;
    let mut session = Session::new_client(io, yamux);
    let mut control = session.control();
    tokio::spawn(async move {
        while let Some(Ok(stream)) = session.next().await {
            tokio::spawn(handle_inbound(stream, handler.clone()));
        }
    });
    let stream = control
        .open_stream()
        .await
        .map_err(|e| io::Error::new(io::ErrorKind::BrokenPipe, format!("opening stream: {e:?}")))?;
    Ok(ClientSession { stream, control })
}

/// A stream the server opened to us: a sidechannel, or a gRPC connection to our services.
async fn handle_inbound(stream: StreamHandle, handler: ClientHandler) {
    let sniffed = tokio::time::timeout(SNIFF_TIMEOUT, sniff(stream, SIDECHANNEL_MAGIC)).await;
    let Ok(Ok((is_sidechannel, mut stream))) = sniffed else {
        return;
    };
    if is_sidechannel {
        let mut id = [0u8; 8];
        if stream.read_exact(&mut id).await.is_err() {
            return;
        }
        handler
            .sidechannels
            .deliver(u64::from_be_bytes(id), Box::new(stream))
            .await;
        return;
    }
    let Some(routes) = handler.routes else {
        return;
    };
    let service = hyper_util::service::TowerToHyperService::new(routes);
    let result = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(err) = result {
        tracing::debug!(error = %err, "backchannel gRPC connection ended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// Bulk data on a stream the server opened, with the other direction idle but read.
    #[tokio::test]
    async fn server_opened_streams_carry_more_than_one_window() {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let mut server = Session::new_server(server_io, yamux_config(0, 256));
        let mut control = server.control();
        tokio::spawn(async move { while let Some(Ok(_)) = server.next().await {} });
        let mut client = Session::new_client(client_io, yamux_config(0, 256));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut tx = Some(tx);
        tokio::spawn(async move {
            while let Some(Ok(stream)) = client.next().await {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(stream);
                }
            }
        });
        let stream = control.open_stream().await.unwrap();
        let (mut server_read, mut server_write) = tokio::io::split(stream);
        let idle_reader = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let _ = server_read.read(&mut buf).await;
        });
        let writer = tokio::spawn(async move {
            let data = vec![7u8; 3_000_000];
            server_write.write_all(&data).await.unwrap();
            server_write.shutdown().await.unwrap();
        });
        let mut client_stream = rx.await.unwrap();
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
        idle_reader.abort();
    }
}
