//! The router's gRPC listeners, served on the h2 crate's HTTP/2 server directly, as the
//! router's node connections are served on its client (`nodes::http2`).
//!
//! tonic's `Server`, and then hyper's, sat between h2 and the router's service: a boxed,
//! cloned service per call, `grpc-timeout` parsing, error recovery, a body type of their own
//! each way, a `date` header, a clock read per frame for the keepalive. Counted with
//! `scripts/bench`'s `BENCH_INSTRUCTIONS`, leaving tonic's server saved 1.3% of a unary call's
//! instructions and leaving hyper's another 1.4%. What is left is what the router needs:
//!
//! - one task per connection, which accepts its streams, pings the client
//!   ([`LimitSettings::keepalive_interval`](crate::wire::backchannel::LimitSettings)) and,
//!   when the listeners stop, tells it to finish gracefully;
//! - one task per call, which runs the service (dropping it if the client resets the stream
//!   first) and writes the answer within the stream's window ([`PipeBody::answer`]).
//!
//! The limits (concurrent streams, header list size, reset caps, windows) are the h2
//! builder's, set by [`ServerLimits::h2_builder`]; each call gets its connection's
//! [`PeerInfo`](crate::wire::backchannel::PeerInfo).
//!
//! Shutdown: once the stream of accepted connections ends (the router stops, or hands its
//! listeners over), every connection gets GOAWAY (no new calls, the calls in flight run to
//! their end) and [`serve`] returns when all are closed.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::StreamExt;
use http_body::{Body, Frame, SizeHint};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::Connected;
use tower::{Service, ServiceExt};

use crate::nodes::http2::{watch_pongs, FirstRead, PipeBody};
use crate::wire::backchannel::{Incoming, PeerInfo, ServerConn, ServerLimits};

type Request = http::Request<tonic::body::Body>;
type Response = http::Response<tonic::body::Body>;

/// Serves every connection `incoming` yields with `service`, until `incoming` ends and the
/// connections it yielded have closed.
pub async fn serve<S>(mut incoming: Incoming, service: S, limits: ServerLimits)
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let connections = TaskTracker::new();
    let closing = CancellationToken::new();
    while let Some(accepted) = incoming.next().await {
        let conn = match accepted {
            Ok(conn) => conn,
            Err(err) => {
                tracing::debug!(error = %err, "a connection failed before serving");
                continue;
            }
        };
        connections.spawn(serve_connection(
            conn,
            service.clone(),
            limits.clone(),
            closing.clone(),
        ));
    }
    closing.cancel();
    connections.close();
    connections.wait().await;
}

/// Serves one client connection until it closes: after GOAWAY (`closing`), an error, or a
/// keepalive ping left unanswered.
async fn serve_connection<S>(
    conn: ServerConn,
    service: S,
    limits: ServerLimits,
    closing: CancellationToken,
) where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let peer = conn.connect_info();
    let received = Arc::new(AtomicU64::new(0));
    let io = FirstRead::counting(conn, received.clone());
    let handshake = limits.h2_builder().handshake::<_, Bytes>(io);
    let mut connection = tokio::select! {
        handshaken = handshake => match handshaken {
            Ok(connection) => connection,
            Err(err) => {
                tracing::debug!(error = %err, "HTTP/2 handshake failed");
                return;
            }
        },
        () = closing.cancelled() => return,
    };
    let settings = limits.settings();
    let Some(mut pings) = connection.ping_pong() else {
        return;
    };
    let keepalive = watch_pongs(
        &mut pings,
        &received,
        settings.keepalive_interval,
        settings.keepalive_timeout,
    );
    tokio::pin!(keepalive);
    let mut going_away = false;
    let mut given_up = false;
    loop {
        tokio::select! {
            accepted = connection.accept() => match accepted {
                Some(Ok((request, respond))) => {
                    tokio::spawn(answer(service.clone(), request, respond, peer.clone()));
                }
                Some(Err(err)) => {
                    tracing::debug!(error = %err, "connection ended with an error");
                    break;
                }
                None => break,
            },
            () = closing.cancelled(), if !going_away => {
                going_away = true;
                connection.graceful_shutdown();
            }
            reason = &mut keepalive, if !given_up => {
                given_up = true;
                tracing::debug!(%reason, "closing a client connection");
                connection.abrupt_shutdown(h2::Reason::NO_ERROR);
            }
        }
    }
}

/// Runs one call and writes its answer to the client's stream. A client that resets the
/// stream before the answer's head drops the call; after it, the pipe stops and drops the
/// body.
async fn answer<S>(
    service: S,
    request: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    peer: PeerInfo,
) where
    S: Service<Request, Response = Response, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    let (parts, recv) = request.into_parts();
    let mut request = http::Request::from_parts(parts, crate::proxy::body::boxed(ClientBody(recv)));
    request.extensions_mut().insert(peer);
    let call = service.oneshot(request);
    let response = tokio::select! {
        biased;
        response = call => match response {
            Ok(response) => response,
            Err(never) => match never {},
        },
        _ = std::future::poll_fn(|cx| respond.poll_reset(cx)) => return,
    };
    let (parts, body) = response.into_parts();
    let end = body.is_end_stream();
    let stream = match respond.send_response(http::Response::from_parts(parts, ()), end) {
        Ok(stream) => stream,
        Err(err) => {
            tracing::debug!(error = %err, "could not send an answer's head");
            return;
        }
    };
    if !end {
        PipeBody::answer(body, stream).await;
    }
}

/// A client's request body: its data frames, their window handed back as they are read.
/// Its errors are statuses already (as tonic maps h2's), so it is boxed once.
struct ClientBody(h2::RecvStream);

impl Body for ClientBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let recv = &mut self.0;
        match std::task::ready!(recv.poll_data(cx)) {
            Some(Ok(data)) => {
                let _ = recv.flow_control().release_capacity(data.len());
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Some(Err(err)) => Poll::Ready(Some(Err(err.into()))),
            None => match std::task::ready!(recv.poll_trailers(cx)) {
                Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
                Ok(None) => Poll::Ready(None),
                Err(err) => Poll::Ready(Some(Err(err.into()))),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
