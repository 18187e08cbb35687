//! The HTTP/2 client against nodes that misbehave, over real loopback sockets and real
//! backchannel sessions: each case is a node the router could meet (one that goes away in the
//! middle of a call, resets a stream, never opens its window, never says anything), and each
//! test bounds how long the client may take to notice, so a hang fails the test instead of
//! stalling it.

use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;

use futures::StreamExt;
use http_body_util::BodyExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};

use super::*;
use crate::nodes::subchannel::{ConnectSettings, Lane, Subchannel};
use crate::wire::backchannel::{
    self, incoming, yamux_config, ClientHandler, DialTarget, Listener, ServerConn, SessionRegistry,
};

/// How long any one thing a test waits for may take before the test calls it a hang.
const BOUND: Duration = Duration::from_secs(5);

/// A node that speaks the backchannel: the HTTP/2 connection of its first client (the first
/// stream of the session) goes to `serve`.
async fn node<F, Fut>(serve: F) -> SocketAddr
where
    F: FnOnce(ServerConn) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut conns = incoming(
        Listener::Tcp(listener),
        SessionRegistry::default(),
        yamux_config(0, 256),
        None,
    );
    tokio::spawn(async move {
        if let Some(Ok(conn)) = conns.next().await {
            serve(conn).await;
        }
    });
    addr
}

/// The client's connection to `addr`, as a subchannel makes it.
async fn connect(addr: SocketAddr) -> Http2Conn {
    let io = TcpStream::connect(addr).await.unwrap();
    let session = backchannel::start_client_session(
        Box::new(io),
        yamux_config(0, 256),
        ClientHandler::default(),
    )
    .await
    .unwrap();
    tokio::time::timeout(
        BOUND,
        Http2Conn::start(session.stream, Some(session.control), addr.to_string()),
    )
    .await
    .expect("HTTP/2 start hung")
    .expect("HTTP/2 start failed")
}

fn request(body: RequestBody) -> http::Request<RequestBody> {
    http::Request::builder()
        .method("POST")
        .uri("http://node/gitaly.RefService/RefExists")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .unwrap()
}

/// A request body that never ends: a chunk whenever the pipe asks, counted.
fn endless_body(pulled: Arc<AtomicUsize>) -> RequestBody {
    let chunks = futures::stream::repeat_with(move || {
        pulled.fetch_add(1, Ordering::SeqCst);
        Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(vec![0u8; 16 * 1024])))
    });
    RequestBody::new(http_body_util::StreamBody::new(chunks))
}

/// A request body fed by the test; the sender's `closed()` says when the client dropped it.
fn fed_body() -> (mpsc::Sender<Bytes>, RequestBody) {
    let (tx, rx) = mpsc::channel::<Bytes>(1);
    let frames = tokio_stream::wrappers::ReceiverStream::new(rx)
        .map(|data| Ok::<_, std::convert::Infallible>(Frame::data(data)));
    (
        tx,
        RequestBody::new(http_body_util::StreamBody::new(frames)),
    )
}

/// A 200 gRPC response head, without end of stream.
fn grpc_head() -> http::Response<()> {
    http::Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .body(())
        .unwrap()
}

/// Serves every request on `conn` with `answer`, until the connection ends.
async fn serve_each<F>(conn: ServerConn, mut answer: F)
where
    F: FnMut(
            usize,
            http::Request<h2::RecvStream>,
            h2::server::SendResponse<Bytes>,
        ) -> futures::future::BoxFuture<'static, ()>
        + Send
        + 'static,
{
    let mut connection = h2::server::handshake(conn).await.unwrap();
    let mut n = 0;
    while let Some(Ok((request, respond))) = connection.accept().await {
        tokio::spawn(answer(n, request, respond));
        n += 1;
    }
}

/// An answer that completes the call with OK.
async fn answer_ok(mut respond: h2::server::SendResponse<Bytes>) {
    let mut stream = respond.send_response(grpc_head(), false).unwrap();
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", "0".parse().unwrap());
    stream.send_trailers(trailers).unwrap();
}

#[tokio::test]
async fn a_goaway_in_the_middle_of_a_call_fails_the_call_and_closes_the_connection() {
    // Signalled once the client has the head: the GOAWAY then comes in the middle of the
    // answer, not before it.
    let head_seen = Arc::new(Notify::new());
    let go = head_seen.clone();
    let addr = node(|conn| async move {
        let mut connection = h2::server::handshake(conn).await.unwrap();
        let (_request, mut respond) = connection.accept().await.unwrap().unwrap();
        let mut stream = respond.send_response(grpc_head(), false).unwrap();
        stream
            .send_data(Bytes::from_static(b"\0\0\0\0\0"), false)
            .unwrap();
        // The connection must be driven (to write the head) while the client reads it.
        tokio::select! {
            () = go.notified() => {}
            _ = connection.accept() => {}
        }
        // Away, with the call half answered.
        connection.abrupt_shutdown(h2::Reason::INTERNAL_ERROR);
        let _ = std::future::poll_fn(|cx| connection.poll_closed(cx)).await;
    })
    .await;
    let conn = connect(addr).await;
    let response = tokio::time::timeout(BOUND, conn.send(request(RequestBody::empty())))
        .await
        .expect("response head hung")
        .expect("the head came before the GOAWAY");
    head_seen.notify_one();
    let mut body = response.into_body();
    let error = tokio::time::timeout(BOUND, async {
        loop {
            match body.frame().await {
                Some(Ok(_)) => continue,
                Some(Err(err)) => return err,
                None => panic!("the body ended cleanly after a GOAWAY"),
            }
        }
    })
    .await
    .expect("reading the body hung after a GOAWAY");
    assert!(error.is_go_away() || error.is_io(), "{error:?}");
    // The connection is gone for new calls, and says so at once.
    tokio::time::timeout(BOUND, async {
        while !conn.is_closed() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the connection was not marked closed");
    let again = tokio::time::timeout(BOUND, conn.send(request(RequestBody::empty())))
        .await
        .expect("a call on a gone connection hung");
    assert!(matches!(again, Err(SendError::NotSent { .. })), "{again:?}");
}

#[tokio::test]
async fn a_reset_stream_fails_its_call_only() {
    let head_seen = Arc::new(Notify::new());
    let go = head_seen.clone();
    let addr = node(|conn| {
        serve_each(conn, move |n, _request, mut respond| {
            let go = go.clone();
            Box::pin(async move {
                match n {
                    // Reset before any answer.
                    0 => respond.send_reset(h2::Reason::INTERNAL_ERROR),
                    // Reset in the middle of the answer.
                    1 => {
                        let mut stream = respond.send_response(grpc_head(), false).unwrap();
                        go.notified().await;
                        stream.send_reset(h2::Reason::CANCEL);
                    }
                    _ => answer_ok(respond).await,
                }
            })
        })
    })
    .await;
    let conn = connect(addr).await;
    let first = tokio::time::timeout(BOUND, conn.send(request(RequestBody::empty())))
        .await
        .expect("a reset call hung");
    match first {
        Err(SendError::Failed(error)) => {
            assert_eq!(
                error.reason(),
                Some(h2::Reason::INTERNAL_ERROR),
                "{error:?}"
            );
            assert!(!error.is_go_away());
        }
        other => panic!("expected the stream's failure, got {other:?}"),
    }
    let second = tokio::time::timeout(BOUND, conn.send(request(RequestBody::empty())))
        .await
        .expect("response head hung")
        .expect("the head came before the reset");
    head_seen.notify_one();
    let error = tokio::time::timeout(BOUND, async {
        let mut body = second.into_body();
        loop {
            match body.frame().await {
                Some(Ok(_)) => continue,
                Some(Err(err)) => return Some(err),
                None => return None,
            }
        }
    })
    .await
    .expect("reading a reset body hung")
    .expect("a reset body ended cleanly");
    assert_eq!(error.reason(), Some(h2::Reason::CANCEL), "{error:?}");
    // The connection carries on.
    assert!(!conn.is_closed());
    let third = tokio::time::timeout(BOUND, conn.send(request(RequestBody::empty())))
        .await
        .expect("a call after the resets hung")
        .expect("a call after the resets failed");
    let trailers = third
        .into_body()
        .collect()
        .await
        .unwrap()
        .trailers()
        .cloned();
    assert_eq!(trailers.unwrap()["grpc-status"], "0");
}

/// A node whose stream windows are zero and that never opens them: `respond_first` says
/// whether it answers with a head (as a streaming call's server would) or says nothing.
async fn zero_window_node(respond_first: bool) -> (SocketAddr, mpsc::Receiver<h2::Reason>) {
    let (resets_tx, resets) = mpsc::channel(4);
    let addr = node(move |conn| async move {
        let mut connection = h2::server::Builder::new()
            .initial_window_size(0)
            .handshake::<_, Bytes>(conn)
            .await
            .unwrap();
        while let Some(Ok((request, mut respond))) = connection.accept().await {
            let resets_tx = resets_tx.clone();
            tokio::spawn(async move {
                // Never read (the window stays shut); report how the client ends the stream
                // (after a head, the reset is the head's stream's to see).
                let body = request.into_body();
                let reason = if respond_first {
                    let mut stream = respond.send_response(grpc_head(), false).unwrap();
                    std::future::poll_fn(|cx| stream.poll_reset(cx)).await
                } else {
                    std::future::poll_fn(|cx| respond.poll_reset(cx)).await
                };
                drop(body);
                if let Ok(reason) = reason {
                    let _ = resets_tx.send(reason).await;
                }
            });
        }
    })
    .await;
    (addr, resets)
}

#[tokio::test]
async fn a_zero_window_call_buffers_a_bounded_amount_and_ends_at_its_deadline() {
    let (addr, mut resets) = zero_window_node(false).await;
    let conn = connect(addr).await;
    let pulled = Arc::new(AtomicUsize::new(0));
    // The caller's deadline: the node never answers, so the call must end here.
    let call = tokio::time::timeout(
        Duration::from_millis(500),
        conn.send(request(endless_body(pulled.clone()))),
    )
    .await;
    assert!(
        call.is_err(),
        "a call to a node that never answers returned"
    );
    // The pipe waited for window instead of reading the body on: one chunk at most in hand.
    assert!(pulled.load(Ordering::SeqCst) <= 2, "{pulled:?} chunks read");
    // Dropping the call cancelled its stream at the node.
    let reason = tokio::time::timeout(BOUND, resets.recv())
        .await
        .expect("the node never saw the dropped call end");
    assert_eq!(reason, Some(h2::Reason::CANCEL));
    assert!(!conn.is_closed());
}

#[tokio::test]
async fn a_zero_window_call_whose_answer_is_dropped_releases_its_stream_and_body() {
    let (addr, mut resets) = zero_window_node(true).await;
    let conn = connect(addr).await;
    let (feed, body) = fed_body();
    feed.send(Bytes::from_static(b"first message"))
        .await
        .unwrap();
    let response = tokio::time::timeout(BOUND, conn.send(request(body)))
        .await
        .expect("response head hung")
        .expect("the node answered with a head");
    // The request body is still being written (no window) when the caller gives up.
    drop(response);
    tokio::time::timeout(BOUND, feed.closed())
        .await
        .expect("the client kept the request body of a dropped call");
    let reason = tokio::time::timeout(BOUND, resets.recv())
        .await
        .expect("the node never saw the dropped call end");
    assert_eq!(reason, Some(h2::Reason::CANCEL));
}

#[tokio::test]
async fn a_node_that_never_sends_its_settings_fails_the_connection_attempt() {
    // The backchannel session comes up; HTTP/2 on it never says a word.
    let addr = node(|conn| async move {
        let _held = conn;
        std::future::pending::<()>().await;
    })
    .await;
    let settings = Arc::new(ConnectSettings::new(
        yamux_config(0, 256),
        ClientHandler::default(),
        Duration::from_millis(500),
    ));
    let target = DialTarget::Resolved {
        addr,
        tls_server_name: None,
    };
    let sub = Arc::new(Subchannel::new(target, settings));
    let attempt = sub.connect(Lane::Backchannel).unwrap();
    let result = tokio::time::timeout(BOUND, attempt)
        .await
        .expect("the connection attempt hung");
    let Err(failure) = result else {
        panic!("a node that never sent its SETTINGS counts as connected");
    };
    assert!(failure.0.contains("no connection within"), "{failure}");
    assert!(!sub.is_ready(Lane::Backchannel));
}

#[tokio::test]
async fn a_socket_that_never_answers_fails_the_connection_attempt() {
    // Accepts TCP, then neither reads nor writes.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _held = listener.accept().await;
        std::future::pending::<()>().await;
    });
    let settings = Arc::new(ConnectSettings::new(
        yamux_config(0, 256),
        ClientHandler::default(),
        Duration::from_millis(500),
    ));
    let target = DialTarget::Resolved {
        addr,
        tls_server_name: None,
    };
    let sub = Arc::new(Subchannel::new(target, settings));
    let result = tokio::time::timeout(BOUND, sub.connect(Lane::Backchannel).unwrap())
        .await
        .expect("the connection attempt hung");
    assert!(result.is_err(), "a silent socket counts as connected");
}

/// A node that serves every connection (each its own backchannel session), answering each
/// call with a head and then nothing; how many connections it got.
async fn holding_node() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut conns = incoming(
        Listener::Tcp(listener),
        SessionRegistry::default(),
        yamux_config(0, 256),
        None,
    );
    let count = Arc::new(AtomicUsize::new(0));
    let counted = count.clone();
    tokio::spawn(async move {
        while let Some(Ok(conn)) = conns.next().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve_each(conn, |_, _request, mut respond| {
                Box::pin(async move {
                    let _stream = respond.send_response(grpc_head(), false).unwrap();
                    std::future::pending::<()>().await;
                })
            }));
        }
    });
    (addr, count)
}

#[tokio::test]
async fn a_loaded_connection_gets_a_sibling_and_calls_go_to_the_least_loaded() {
    let (addr, connections) = holding_node().await;
    let mut settings = ConnectSettings::new(yamux_config(0, 256), ClientHandler::default(), BOUND);
    settings.streams_per_connection = 2;
    let target = DialTarget::Resolved {
        addr,
        tls_server_name: None,
    };
    let sub = Arc::new(Subchannel::new(target, Arc::new(settings)));
    let first = tokio::time::timeout(BOUND, sub.connect(Lane::Backchannel).unwrap())
        .await
        .unwrap()
        .unwrap();
    let mut open = Vec::new();
    for _ in 0..2 {
        let conn = sub.ready(Lane::Backchannel).unwrap();
        open.push(conn.send(request(RequestBody::empty())).await.unwrap());
    }
    assert_eq!(first.active_calls(), 2);
    // The next pick finds the connection full: it still serves (no waiting), and another
    // connection is opened behind it.
    assert_eq!(sub.ready(Lane::Backchannel).unwrap().active_calls(), 2);
    let deadline = tokio::time::Instant::now() + BOUND;
    let second = loop {
        let conn = sub.ready(Lane::Backchannel).unwrap();
        if conn.active_calls() == 0 {
            break conn;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no second connection"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(connections.load(Ordering::SeqCst), 2);
    open.push(second.send(request(RequestBody::empty())).await.unwrap());
    assert_eq!(second.active_calls(), 1);
    // The answers dropped, the calls no longer count.
    open.clear();
    assert_eq!(first.active_calls() + second.active_calls(), 0);
}

/// A node that serves plain and backchannel connections alike, answering every call with an
/// OK status at once; what kind each connection it got was (`true`: a backchannel session).
async fn both_kinds_node() -> (SocketAddr, Arc<std::sync::Mutex<Vec<bool>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut conns = incoming(
        Listener::Tcp(listener),
        SessionRegistry::default(),
        yamux_config(0, 256),
        None,
    );
    let kinds = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = kinds.clone();
    tokio::spawn(async move {
        while let Some(Ok(conn)) = conns.next().await {
            let info = tonic::transport::server::Connected::connect_info(&conn);
            seen.lock().unwrap().push(info.backchannel_id.is_some());
            tokio::spawn(serve_each(conn, |_, _request, mut respond| {
                Box::pin(async move {
                    let head = http::Response::builder()
                        .status(200)
                        .header("content-type", "application/grpc")
                        .header("grpc-status", "0")
                        .body(())
                        .unwrap();
                    let _ = respond.send_response(head, true);
                })
            }));
        }
    });
    (addr, kinds)
}

#[tokio::test]
async fn calls_that_vote_or_use_a_sidechannel_go_over_a_backchannel_session_others_plain() {
    let (addr, kinds) = both_kinds_node().await;
    let settings = ConnectSettings::new(yamux_config(0, 256), ClientHandler::default(), BOUND);
    let channel = crate::nodes::NodeChannel::new(
        &addr.to_string(),
        crate::nodes::address::Resolution::Fixed(format!("tcp://{addr}")),
        "",
        settings,
    )
    .unwrap();
    let call = |header: Option<&'static str>| {
        let channel = channel.clone();
        async move {
            let mut request = request(RequestBody::empty());
            if let Some(name) = header {
                request
                    .headers_mut()
                    .insert(name, http::HeaderValue::from_static("1"));
            }
            let response = tokio::time::timeout(BOUND, channel.send_or_return(request))
                .await
                .expect("call hung");
            assert!(response.is_ok(), "call failed");
        }
    };
    call(None).await;
    call(None).await;
    assert_eq!(
        *kinds.lock().unwrap(),
        [false],
        "plain calls share one plain connection"
    );
    call(Some(crate::wire::transaction::METADATA_KEY)).await;
    call(Some(crate::wire::sidechannel::METADATA_KEY)).await;
    call(None).await;
    assert_eq!(
        *kinds.lock().unwrap(),
        [false, true],
        "voting and sidechannel calls share one backchannel session"
    );
}

/// Pongs that never come.
struct Silent;

impl super::Pinger for Silent {
    fn ping(&mut self) -> impl Future<Output = Result<(), String>> + Send + '_ {
        std::future::pending()
    }
}

#[tokio::test(start_paused = true)]
async fn a_late_pong_is_forgiven_while_the_node_sends_and_not_after() {
    let interval = Duration::from_secs(20);
    let timeout = Duration::from_secs(20);
    let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
    // The node sends something every second for the first 100 s, then falls silent.
    let sending = received.clone();
    tokio::spawn(async move {
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            sending.fetch_add(1, Ordering::Relaxed);
        }
    });
    let started = tokio::time::Instant::now();
    let failure = super::watch_pongs(&mut Silent, &received, interval, timeout).await;
    let lasted = started.elapsed();
    assert!(failure.contains("no keepalive pong"), "{failure}");
    assert!(
        lasted >= Duration::from_secs(100),
        "given up after {lasted:?} while the node was sending"
    );
    // The window in which the silence began still saw data: given up one window later.
    assert!(
        lasted <= Duration::from_secs(100) + 2 * timeout,
        "not given up within two timeouts of the silence: {lasted:?}"
    );

    // A silent node from the start: given up after one interval and one timeout.
    let started = tokio::time::Instant::now();
    let idle = std::sync::atomic::AtomicU64::new(0);
    super::watch_pongs(&mut Silent, &idle, interval, timeout).await;
    assert_eq!(started.elapsed(), interval + timeout);
}

/// The client's side of an in-memory connection, counting the batches it writes: the writes
/// between two flushes are one batch (one system call on a socket that takes vectored writes).
struct CountedBatches {
    io: tokio::io::DuplexStream,
    written_since_flush: bool,
    batches: Arc<AtomicUsize>,
}

impl AsyncRead for CountedBatches {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for CountedBatches {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let written = ready!(Pin::new(&mut self.io).poll_write(cx, buf))?;
        self.written_since_flush |= written > 0;
        Poll::Ready(Ok(written))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        ready!(Pin::new(&mut self.io).poll_flush(cx))?;
        if std::mem::take(&mut self.written_since_flush) {
            self.batches.fetch_add(1, Ordering::SeqCst);
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A unary call with a 10-byte message, answered OK.
async fn small_call(conn: &Http2Conn) {
    let message = Bytes::from_static(b"\0\0\0\0\x05hello");
    let body = RequestBody::new(http_body_util::Full::new(message));
    let response = tokio::time::timeout(BOUND, conn.send(request(body)))
        .await
        .unwrap()
        .unwrap();
    let collected = tokio::time::timeout(BOUND, response.into_body().collect())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
}

#[tokio::test]
async fn a_small_request_leaves_with_its_headers_in_one_write() {
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move {
        let mut connection = h2::server::handshake(server_io).await.unwrap();
        while let Some(Ok((request, respond))) = connection.accept().await {
            tokio::spawn(async move {
                let mut body = request.into_body();
                while let Some(data) = body.data().await {
                    let data = data.unwrap();
                    let _ = body.flow_control().release_capacity(data.len());
                }
                answer_ok(respond).await;
            });
        }
    });
    let batches = Arc::new(AtomicUsize::new(0));
    let io = CountedBatches {
        io: client_io,
        written_since_flush: false,
        batches: batches.clone(),
    };
    let conn = tokio::time::timeout(BOUND, Http2Conn::start(io, None, "duplex".into()))
        .await
        .expect("HTTP/2 start hung")
        .expect("HTTP/2 start failed");
    // The first call also carries what is left of the handshake (the SETTINGS ack).
    small_call(&conn).await;
    batches.store(0, Ordering::SeqCst);
    small_call(&conn).await;
    assert_eq!(
        batches.load(Ordering::SeqCst),
        1,
        "HEADERS and the body's only DATA frame should leave in one batch"
    );
}

#[test]
fn connection_headers_and_a_te_other_than_trailers_are_dropped_and_nothing_else() {
    let header = |name: &'static str, value: &'static str| {
        (
            http::HeaderName::from_static(name),
            http::HeaderValue::from_static(value),
        )
    };
    let kept = [
        header("content-type", "application/grpc"),
        header("te", "trailers"),
        header("x-gitlab-correlation-id", "abc"),
    ];
    let mut plain: http::HeaderMap = kept.iter().cloned().collect();
    strip_connection_headers(&mut plain);
    assert_eq!(plain, kept.iter().cloned().collect::<http::HeaderMap>());

    let mut forbidden: http::HeaderMap = kept.iter().cloned().collect();
    for (name, value) in [
        ("connection", "close"),
        ("keep-alive", "timeout=5"),
        ("proxy-connection", "keep-alive"),
        ("transfer-encoding", "chunked"),
        ("upgrade", "h2c"),
    ] {
        let mut headers = forbidden.clone();
        headers.insert(name, http::HeaderValue::from_static(value));
        strip_connection_headers(&mut headers);
        assert_eq!(headers, forbidden, "{name}");
    }
    forbidden.insert(http::header::TE, http::HeaderValue::from_static("gzip"));
    strip_connection_headers(&mut forbidden);
    assert!(!forbidden.contains_key(http::header::TE));
    assert_eq!(forbidden.len(), 2);
}
