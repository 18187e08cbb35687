//! The router's gRPC listeners, served with hyper's HTTP/2 server directly.
//!
//! tonic's `Server` wraps every call in layers the router does not use: a boxed, cloned
//! service per call, `grpc-timeout` parsing (the node enforces the deadline, which the router
//! forwards), error recovery (the router's services never fail; failures are answers), and a
//! request extension map for its connection info. Counted with `scripts/bench`'s
//! `BENCH_INSTRUCTIONS`, that was about 5% of the instructions of a unary call. Here each
//! connection gets hyper's HTTP/2 server with the same limits as before
//! ([`ServerLimits::http2_builder`])
//! and the call goes straight to the router's service, with the connection's
//! [`PeerInfo`](crate::wire::backchannel::PeerInfo).
//!
//! Shutdown is what it was: once the stream of accepted connections ends (the router stops,
//! or hands its listeners over), every connection is told to finish gracefully (GOAWAY: no new
//! calls, the calls in flight run to their end) and [`serve`] returns when all are closed.

use std::convert::Infallible;

use futures::StreamExt;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::Connected;
use tower::{Service, ServiceExt};

use crate::wire::backchannel::{Incoming, ServerLimits};

type Request = http::Request<tonic::body::Body>;
type Response = http::Response<tonic::body::Body>;

/// Serves every connection `incoming` yields with `service`, until `incoming` ends and the
/// connections it yielded have closed.
pub async fn serve<S>(mut incoming: Incoming, service: S, limits: ServerLimits)
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let builder = limits.http2_builder();
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
