//! The router's gRPC listeners, served with hyper's HTTP/2 server directly.
//!
//! tonic's `Server` wraps every call in layers the router does not use: a boxed, cloned
//! service per call, `grpc-timeout` parsing (the node enforces the deadline, which the router
//! forwards), error recovery (the router's services never fail; failures are answers), and a
//! request extension map for its connection info. Counted with `scripts/bench`'s
//! `BENCH_INSTRUCTIONS`, that was about 5% of the instructions of a unary call. Here each
//! connection gets hyper's HTTP/2 server with the same limits as before ([`LimitSettings`])
//! and the call goes straight to the router's service, with the connection's
//! [`PeerInfo`](crate::wire::backchannel::PeerInfo).
//!
//! Shutdown is what it was: once the stream of accepted connections ends (the router stops,
//! or hands its listeners over), every connection is told to finish gracefully (GOAWAY: no new
//! calls, the calls in flight run to their end) and [`serve`] returns when all are closed.

use std::convert::Infallible;

use futures::StreamExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::Connected;
use tower::{Service, ServiceExt};

use crate::wire::backchannel::{Incoming, LimitSettings};

type Request = http::Request<tonic::body::Body>;
type Response = http::Response<tonic::body::Body>;

/// Serves every connection `incoming` yields with `service`, until `incoming` ends and the
/// connections it yielded have closed.
pub async fn serve<S>(mut incoming: Incoming, service: S, settings: LimitSettings)
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let builder = builder(&settings);
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
        let peer = conn.connect_info();
        let service = service.clone();
        let call = hyper::service::service_fn(move |request: http::Request<_>| {
            let mut request = request.map(tonic::body::Body::new);
            request.extensions_mut().insert(peer.clone());
            service.clone().oneshot(request)
        });
        let connection = builder.serve_connection(TokioIo::new(conn), call);
        let closing = closing.clone();
        connections.spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = closing.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(err) = result {
                tracing::debug!(error = %err, "connection ended with an error");
            }
        });
    }
    closing.cancel();
    connections.close();
    connections.wait().await;
}

/// hyper's HTTP/2 server with the listeners' limits.
fn builder(s: &LimitSettings) -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(s.max_concurrent_streams)
        .keep_alive_interval(Some(s.keepalive_interval))
        .keep_alive_timeout(s.keepalive_timeout)
        .max_header_list_size(s.max_header_list_size)
        .max_pending_accept_reset_streams(Some(s.max_pending_accept_reset_streams))
        .max_local_error_reset_streams(Some(s.max_local_error_reset_streams));
    builder
}
