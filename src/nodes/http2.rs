//! HTTP/2 to a node with the `h2` crate directly.
//!
//! hyper's client puts two tasks between a call and the connection: a dispatch task that
//! receives each request over a channel, and a task per request that pipes its body. Each is
//! a task wake-up (often a thread wake-up) per call, which is most of what a small unary call
//! costs the router. Here the caller's own task opens the stream, writes the request body
//! (all of it, for unary and server-streaming calls, before the answer starts) and reads the
//! answer; only a body still being written when the answer arrives (client streaming) gets a
//! task of its own. The connection's task does the socket I/O and the keepalive pings.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};

use crate::metrics::grpc::{CallTimer, MessageCounter};
use crate::wire::backchannel::Io;
use http_body::{Body, Frame};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;
use tokio_yamux::Control;

/// The request body every node call has: the proxy's forwarded frames and tonic's encoded
/// messages are both `tonic::body::Body`.
pub(crate) type RequestBody = tonic::body::Body;

/// HTTP/2 pings every interval, idle or not, as the router always did: a node that vanished
/// without closing its socket is noticed within interval + timeout.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// The receive window of one call: enough for a pack stream to flow (hyper's client default).
/// It is also what one call whose client stopped reading can hold: the node's answer waits
/// in the router up to this much, then the node stops sending on that stream only.
pub(crate) const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
/// The connection's receive window: HTTP/2's largest. The h2 crate hands connection window
/// back only as a stream's data is read, so unread data holds it; with a window only a few
/// stream windows large (hyper's 5 MiB), three calls whose clients stopped reading froze the
/// node's connection for every other call. grpc-go returns connection window as data
/// arrives and so never stalls that way; here the window is made so large that only
/// `CONNECTION_WINDOW / STREAM_WINDOW` (1023) unread streams could fill it, and a connection
/// takes at most [`STREAMS_PER_CONNECTION`] calls before the subchannel opens another.
pub(crate) const CONNECTION_WINDOW: u32 = (1 << 31) - 1;
/// Calls one connection takes before the subchannel prefers a new connection: half of what
/// would fill the connection window with unread data, so that even a node connection whose
/// every call stalls keeps window for the others (see `Subchannel::ready`).
pub(crate) const STREAMS_PER_CONNECTION: usize = (CONNECTION_WINDOW / STREAM_WINDOW / 2) as usize;
const MAX_SEND_BUFFER: usize = 1024 * 1024;

/// Headers HTTP/2 forbids (they are about one HTTP/1 connection); h2 refuses a request
/// that has them, so they are dropped rather than failing the call.
const CONNECTION_HEADERS: [http::HeaderName; 5] = [
    http::header::CONNECTION,
    http::HeaderName::from_static("keep-alive"),
    http::HeaderName::from_static("proxy-connection"),
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
];

/// Drops the [`CONNECTION_HEADERS`], and a `te` other than `trailers`, from a request. Calls
/// almost never have them: one pass over the call's few headers finds that out for less than
/// a lookup per name (each hashes the name and probes the map).
fn strip_connection_headers(headers: &mut http::HeaderMap) {
    let forbidden = headers.iter().any(|(name, value)| {
        CONNECTION_HEADERS.contains(name) || (name == http::header::TE && value != "trailers")
    });
    if !forbidden {
        return;
    }
    for name in CONNECTION_HEADERS {
        headers.remove(name);
    }
    if headers
        .get(http::header::TE)
        .is_some_and(|te| te != "trailers")
    {
        headers.remove(http::header::TE);
    }
}

/// One established HTTP/2 connection: a handle to open streams on it, and whether it is gone.
#[derive(Clone)]
pub(crate) struct Http2Conn {
    send: h2::client::SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
    /// Calls open on the connection (sent, answer not yet dropped): how loaded it is.
    active: Arc<AtomicUsize>,
}

/// One open call's share of [`Http2Conn::active`], given back when dropped.
struct ActiveCall(Arc<AtomicUsize>);

impl ActiveCall {
    fn new(active: &Arc<AtomicUsize>) -> Self {
        active.fetch_add(1, Ordering::Relaxed);
        ActiveCall(active.clone())
    }
}

impl Drop for ActiveCall {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a call failed on an established connection.
#[derive(Debug)]
pub(crate) enum SendError {
    /// The stream was never opened (the connection is closing or failed); the request comes
    /// back when it is intact, for another connection.
    NotSent {
        error: h2::Error,
        request: Option<Box<http::Request<RequestBody>>>,
    },
    /// The stream failed after it was opened.
    Failed(h2::Error),
}

impl SendError {
    pub(crate) fn error(&self) -> &h2::Error {
        match self {
            SendError::NotSent { error, .. } | SendError::Failed(error) => error,
        }
    }
}

/// Why HTTP/2 could not be started on a connection.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StartError {
    #[error(transparent)]
    Handshake(#[from] h2::Error),
    /// The connection ended before the node sent anything (its SETTINGS come first).
    #[error("connection closed before the node's HTTP/2 settings")]
    Closed,
}

impl Http2Conn {
    /// Starts HTTP/2 on `stream` (the first stream of a backchannel session), spawns the
    /// connection's task and waits for the node's first bytes (its SETTINGS); when the
    /// connection ends, the session is closed with it (nothing else would close it while the
    /// node keeps the socket open).
    ///
    /// The client's side of the handshake needs nothing from the node, so without the wait a
    /// node that accepts the connection and then says nothing (wedged, or not speaking HTTP/2)
    /// would count as connected and get calls that wait for keepalive to notice (40 s). With
    /// it, such a node fails the connection attempt within the caller's connect timeout, as
    /// gRPC's own clients do. A caller that gives up waiting ends the connection.
    pub(crate) async fn start<T: Io>(
        stream: T,
        mut control: Option<Control>,
        label: String,
    ) -> Result<Http2Conn, StartError> {
        let (heard_tx, heard) = oneshot::channel();
        let received = Arc::new(AtomicU64::new(0));
        let stream = FirstRead {
            io: stream,
            heard: Some(heard_tx),
            received: received.clone(),
        };
        let handshake = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .enable_push(false)
            .handshake::<_, Bytes>(stream)
            .await;
        let (send, mut connection) = match handshake {
            Ok(pair) => pair,
            Err(err) => {
                if let Some(control) = control.as_mut() {
                    control.close().await;
                }
                return Err(err.into());
            }
        };
        let closed = Arc::new(AtomicBool::new(false));
        let closed_flag = closed.clone();
        let pings = connection.ping_pong();
        // Dropped unsent if this function is dropped (or fails) while waiting for the node:
        // the connection then ends instead of living on unused.
        let (keep_tx, keep) = oneshot::channel::<()>();
        let abandoned = async move {
            if keep.await.is_ok() {
                std::future::pending::<()>().await;
            }
        };
        tokio::spawn(async move {
            // Ends when the node closes the connection, keepalive fails, every handle is
            // gone (the address left DNS) and the last stream is done, or the node never
            // spoke and the caller gave up on it.
            tokio::select! {
                result = &mut connection => {
                    if let Err(err) = result {
                        tracing::debug!(target = %label, error = %err, "node connection ended");
                    }
                }
                failure = keepalive(pings, received) => {
                    tracing::warn!(target = %label, error = %failure, "node connection dropped");
                }
                () = abandoned => {}
            }
            closed_flag.store(true, Ordering::Release);
            drop(connection);
            if let Some(control) = control.as_mut() {
                control.close().await;
            }
        });
        // An error here: the connection task ended and dropped the stream before any byte.
        heard.await.map_err(|_| StartError::Closed)?;
        let _ = keep_tx.send(());
        Ok(Http2Conn {
            send,
            closed,
            active: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// How many calls are open on the connection now.
    pub(crate) fn active_calls(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Marks the connection as not to be used for new calls (it refused to open a stream).
    pub(crate) fn retire(&self) {
        self.closed.store(true, Ordering::Release);
    }

    /// [`Http2Conn::send_counted`] with the sent messages counted nowhere.
    #[cfg(test)]
    pub(crate) async fn send(
        &self,
        request: http::Request<RequestBody>,
    ) -> Result<http::Response<ResponseBody>, SendError> {
        self.send_counted(request, None).await
    }

    /// Sends `request` (its URI complete) and waits for the response head; the messages of
    /// its body are added to `sent` as they go.
    pub(crate) async fn send_counted(
        &self,
        request: http::Request<RequestBody>,
        sent: Option<&prometheus::IntCounter>,
    ) -> Result<http::Response<ResponseBody>, SendError> {
        let mut send = self.send.clone();
        let active = ActiveCall::new(&self.active);
        if let Err(error) = std::future::poll_fn(|cx| send.poll_ready(cx)).await {
            return Err(SendError::NotSent {
                error,
                request: Some(Box::new(request)),
            });
        }
        let (mut parts, body) = request.into_parts();
        strip_connection_headers(&mut parts.headers);
        let end_of_stream = body.is_end_stream();
        let (response, stream) = send
            .send_request(http::Request::from_parts(parts, ()), end_of_stream)
            .map_err(|error| SendError::NotSent {
                error,
                request: None,
            })?;
        let mut response = response;
        let mut pipe = (!end_of_stream).then(|| PipeBody::new(body, stream, sent.cloned()));
        let head = std::future::poll_fn(|cx| {
            if let Some(p) = pipe.as_mut() {
                if Pin::new(p).poll(cx).is_ready() {
                    pipe = None;
                }
            }
            Pin::new(&mut response).poll(cx)
        })
        .await
        .map_err(SendError::Failed)?;
        let (parts, recv) = head.into_parts();
        let mut body = ResponseBody::new(recv);
        body.active = Some(active);
        if let Some(mut pipe) = pipe {
            // The answer came while the request is still streaming: the rest goes on alone,
            // until the caller drops the answer (see `PipeBody::answer_dropped`).
            let (tx, rx) = oneshot::channel();
            pipe.answer_dropped = Some(rx);
            body.pipe_guard = Some(tx);
            tokio::spawn(pipe);
        }
        Ok(http::Response::from_parts(parts, body))
    }
}

/// Sends a ping every interval and waits for its pong; returns why it failed.
async fn keepalive(pings: Option<h2::PingPong>, received: Arc<AtomicU64>) -> String {
    let Some(mut pings) = pings else {
        return std::future::pending().await;
    };
    watch_pongs(&mut pings, &received, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT).await
}

/// What the keepalive loop pings: the connection's [`h2::PingPong`] (a trait so that the
/// loop can be tested with pongs that never come).
pub(crate) trait Pinger {
    /// Sends a ping; ready with its pong or why there will be none.
    fn ping(&mut self) -> impl Future<Output = Result<(), String>> + Send + '_;
}

impl Pinger for h2::PingPong {
    fn ping(&mut self) -> impl Future<Output = Result<(), String>> + Send + '_ {
        let pong = h2::PingPong::ping(self, h2::Ping::opaque());
        async move { pong.await.map(drop).map_err(|err| err.to_string()) }
    }
}

/// The keepalive loop: every `interval` a ping (`ping()`), whose pong must come within
/// `timeout`, unless the connection read something meanwhile (`received` moved). A node
/// that is sending is there, and its pong can be late for a reason that is not its absence:
/// the ping waits behind the call data the router is writing (over a backchannel session,
/// behind the yamux stream's flow control), or a loaded node answers it late. Without this,
/// a busy machine had a 130 MB push's connection, and the push, cut after 20 s. A node that
/// vanished sends nothing: one that was idle is given up within `interval + timeout`, one
/// that was sending within two timeouts of its last byte.
pub(crate) async fn watch_pongs(
    pinger: &mut impl Pinger,
    received: &AtomicU64,
    interval: Duration,
    timeout: Duration,
) -> String {
    loop {
        tokio::time::sleep(interval).await;
        let pong = pinger.ping();
        tokio::pin!(pong);
        loop {
            let seen = received.load(Ordering::Relaxed);
            match tokio::time::timeout(timeout, &mut pong).await {
                Ok(Ok(_)) => break,
                Ok(Err(err)) => return format!("keepalive ping: {err}"),
                Err(_) if received.load(Ordering::Relaxed) != seen => {
                    tracing::debug!("keepalive pong late, but the node is sending; waiting on");
                }
                Err(_) => return format!("no keepalive pong within {timeout:?}"),
            }
        }
    }
}

/// The largest first chunk of a request body handed to h2 before the stream has flow-control
/// capacity (one frame at h2's default frame size, and within any node's initial window but a
/// deliberately tiny one).
///
/// h2 assigns capacity only to a stream it has opened, and it opens one when the connection's
/// task next writes: a body that waits for capacity therefore goes out in a second write,
/// after a round through both tasks. A unary request's body, sent at once, leaves with its
/// HEADERS in one write instead (one system call, one segment and one wake-up of the node
/// fewer per call). h2 buffers data sent ahead of capacity; one chunk of this size per call
/// keeps that bounded, and every later chunk waits for capacity as before.
const EAGER_FIRST_CHUNK: usize = 16 * 1024;

/// Writes a body to its stream, within the stream's flow-control window (but for a small
/// first chunk, see [`EAGER_FIRST_CHUNK`]): a request's to a node, or (see
/// [`PipeBody::answer`]) an answer's to a client.
pub(crate) struct PipeBody {
    body: RequestBody,
    stream: h2::SendStream<Bytes>,
    /// Nothing was sent yet: a small first chunk goes without waiting for capacity.
    first_chunk: bool,
    /// Data read from the body and not yet sent (waiting for window).
    pending: Bytes,
    /// Where the body's messages are counted (`grpc_client_msg_sent_total`).
    sent: Option<(MessageCounter, prometheus::IntCounter)>,
    /// The body ended after `pending`.
    ended: bool,
    /// Ready when the caller dropped the call's [`ResponseBody`] (for a pipe that outlives
    /// the response head). Nobody will read the answer then, and the node might never open
    /// its window or end the call: without this, the pipe (the stream and the request body
    /// it holds) would wait for ever, so it resets the stream instead, as dropping the
    /// whole call before its head does.
    answer_dropped: Option<oneshot::Receiver<()>>,
    /// How the stream is reset when the body fails: CANCEL for a request (the client gave
    /// up), INTERNAL_ERROR for an answer (as hyper's server did).
    failed: h2::Reason,
}

impl PipeBody {
    fn new(
        body: RequestBody,
        stream: h2::SendStream<Bytes>,
        sent: Option<prometheus::IntCounter>,
    ) -> Self {
        PipeBody {
            body,
            stream,
            first_chunk: true,
            pending: Bytes::new(),
            sent: sent.map(|counter| (MessageCounter::default(), counter)),
            ended: false,
            answer_dropped: None,
            failed: h2::Reason::CANCEL,
        }
    }

    /// The pipe of an answer to a client's stream; it ends early when the client resets the
    /// stream, dropping the body (and with it the call to the node).
    pub(crate) fn answer(body: RequestBody, stream: h2::SendStream<Bytes>) -> Self {
        PipeBody {
            failed: h2::Reason::INTERNAL_ERROR,
            ..PipeBody::new(body, stream, None)
        }
    }

    fn poll_pipe(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), h2::Error>> {
        loop {
            if !self.pending.is_empty() {
                if std::mem::take(&mut self.first_chunk) && self.pending.len() <= EAGER_FIRST_CHUNK
                {
                    let last = self.ended;
                    self.stream
                        .send_data(std::mem::take(&mut self.pending), last)?;
                    if last {
                        return Poll::Ready(Ok(()));
                    }
                    continue;
                }
                self.stream.reserve_capacity(self.pending.len());
                let capacity = match ready!(self.stream.poll_capacity(cx)) {
                    Some(capacity) => capacity?,
                    // The stream is closed (reset by the node): nothing more to send.
                    None => return Poll::Ready(Ok(())),
                };
                if capacity == 0 {
                    continue;
                }
                let chunk = self.pending.split_to(capacity.min(self.pending.len()));
                let last = self.pending.is_empty() && self.ended;
                self.stream.send_data(chunk, last)?;
                if last {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            if self.ended {
                self.stream.send_data(Bytes::new(), true)?;
                return Poll::Ready(Ok(()));
            }
            if self.stream.poll_reset(cx).is_ready() {
                // The node reset the stream: it wants no more of the body.
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                None => {
                    self.stream.send_data(Bytes::new(), true)?;
                    return Poll::Ready(Ok(()));
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(mut data) => {
                        self.ended = self.body.is_end_stream();
                        self.pending = data.copy_to_bytes(data.remaining());
                        if let Some((counter, sent)) = self.sent.as_mut() {
                            counter.count(&self.pending, sent);
                        }
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            self.stream.send_trailers(trailers)?;
                        } else {
                            self.stream.send_data(Bytes::new(), true)?;
                        }
                        return Poll::Ready(Ok(()));
                    }
                },
                Some(Err(err)) => {
                    tracing::debug!(error = %err, "body failed; resetting the stream");
                    self.stream.send_reset(self.failed);
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

impl Future for PipeBody {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if let Some(dropped) = this.answer_dropped.as_mut() {
            if Pin::new(dropped).poll(cx).is_ready() {
                this.stream.send_reset(h2::Reason::CANCEL);
                return Poll::Ready(());
            }
        }
        match ready!(this.poll_pipe(cx)) {
            Ok(()) => Poll::Ready(()),
            Err(err) => {
                tracing::debug!(error = %err, "sending a request body failed");
                Poll::Ready(())
            }
        }
    }
}

/// A node's response body: data frames (their window handed back as they are read), then
/// the trailers.
pub struct ResponseBody {
    recv: h2::RecvStream,
    data_done: bool,
    done: bool,
    /// Tells the request body's pipe, if one still runs, that the answer is dropped.
    pipe_guard: Option<oneshot::Sender<()>>,
    /// The call's client metrics: its messages counted as they come, its end when it ends.
    call: Option<(CallTimer, MessageCounter)>,
    /// The call's place in its connection's count of open calls, until the answer is dropped.
    active: Option<ActiveCall>,
}

impl ResponseBody {
    fn new(recv: h2::RecvStream) -> Self {
        ResponseBody {
            recv,
            data_done: false,
            done: false,
            pipe_guard: None,
            call: None,
            active: None,
        }
    }

    /// Counts the call in the client metrics once the answer ends.
    pub(crate) fn count(&mut self, call: CallTimer) {
        self.call = Some((call, MessageCounter::default()));
    }

    fn ended(&mut self, code: tonic::Code) {
        self.active = None;
        if let Some((call, _)) = self.call.take() {
            call.done(code);
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        self.ended(tonic::Code::Cancelled);
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    if let Some((call, counter)) = this.call.as_mut() {
                        counter.count(&data, &call.metrics().msg_received);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(err)) => {
                    this.done = true;
                    this.ended(tonic::Code::Unavailable);
                    return Poll::Ready(Some(Err(err)));
                }
                None => this.data_done = true,
            }
        }
        let trailers = ready!(this.recv.poll_trailers(cx));
        this.done = true;
        match trailers {
            Ok(Some(trailers)) => {
                let code =
                    crate::wire::header_names::grpc_code(&trailers).unwrap_or(tonic::Code::Unknown);
                this.ended(code);
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
            Ok(None) => {
                this.ended(tonic::Code::Unknown);
                Poll::Ready(None)
            }
            Err(err) => {
                this.ended(tonic::Code::Unavailable);
                Poll::Ready(Some(Err(err)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody")
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

/// The connection to a node, reporting its first successful read: the node's first bytes.
/// Also a client's connection to the router, with no one to tell (`heard` empty), for its
/// keepalive's count of reads.
pub(crate) struct FirstRead<T> {
    io: T,
    heard: Option<oneshot::Sender<()>>,
    /// Reads that returned data, for the keepalive ([`watch_pongs`]).
    received: Arc<AtomicU64>,
}

impl<T> FirstRead<T> {
    /// `io`, counting its reads that returned data in `received`.
    pub(crate) fn counting(io: T, received: Arc<AtomicU64>) -> Self {
        FirstRead {
            io,
            heard: None,
            received,
        }
    }
}

impl<T: Io> AsyncRead for FirstRead<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = ready!(Pin::new(&mut self.io).poll_read(cx, buf));
        if result.is_ok() && buf.filled().len() > before {
            self.received.fetch_add(1, Ordering::Relaxed);
            if let Some(heard) = self.heard.take() {
                let _ = heard.send(());
            }
        }
        Poll::Ready(result)
    }
}

impl<T: Io> AsyncWrite for FirstRead<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests;
