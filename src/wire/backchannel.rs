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
use std::task::{Context, Poll};
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
    pub remote_addr: String,
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
                remote_addr,
                backchannel_id: None,
            },
        };
        let _ = tx.send(Ok(conn)).await;
        return;
    }
    let mut session = Session::new_server(io, yamux);
    let id = registry.insert(session.control());
    tracing::debug!(
        remote_addr,
        backchannel_id = id,
        "backchannel session started"
    );
    while let Some(stream) = session.next().await {
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
