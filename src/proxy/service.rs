//! The router's gRPC service: calls of the services it answers itself (see
//! [`local::ANSWERED_HERE`]) go to them, every other call to the proxy pipeline, without a
//! routing table in between (the pipeline looks methods up itself).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::util::MapRequest;
use tower::{Service, ServiceBuilder};

use super::access_log::{AccessLog, AccessLogLayer};
use super::layers::{
    count_method_type, ensure_correlation_id, RequestSpan, RequestStep, SpanLayer,
};
use super::local::{self, AnsweredBy, PraefectInfo, ServerServiceHere};
use super::state::Proxy;
use crate::wire::proto::praefect_info_service_server::PraefectInfoServiceServer;
use crate::wire::proto::server_service_server::ServerServiceServer;

type Request = http::Request<tonic::body::Body>;
type Response = http::Response<tonic::body::Body>;
type BoxFuture = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

/// Dispatches a call to the service that answers it.
#[derive(Clone)]
pub struct RouterService<H> {
    health: H,
    server: ServerServiceServer<ServerServiceHere>,
    info: PraefectInfoServiceServer<PraefectInfo>,
    proxy: Arc<Proxy>,
}

/// The router's service with its layers (correlation id, request span, access log and gRPC
/// server metrics, method metrics);
/// `health` is the gRPC health service.
pub fn router_service<H>(proxy: Arc<Proxy>, health: H) -> Layered<RouterService<H>> {
    let service = RouterService {
        health,
        server: ServerServiceServer::new(ServerServiceHere {
            proxy: proxy.clone(),
        }),
        info: PraefectInfoServiceServer::new(PraefectInfo {
            proxy: proxy.clone(),
        }),
        proxy,
    };
    ServiceBuilder::new()
        .map_request(ensure_correlation_id as RequestStep)
        .layer(SpanLayer)
        .layer(AccessLogLayer)
        .map_request(count_method_type as RequestStep)
        .service(service)
}

/// The layered service type [`router_service`] returns.
pub type Layered<S> = MapRequest<RequestSpan<AccessLog<MapRequest<S, RequestStep>>>, RequestStep>;

impl<H> Service<Request> for RouterService<H>
where
    H: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    H::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = futures::future::Either<H::Future, BoxFuture>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The generated services are always ready, and the proxy has no queue of its own.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        use futures::future::Either;
        match local::answered_by(request.uri().path()) {
            // A clone that is ready, as tower wants (generated services always are).
            Some(AnsweredBy::GrpcHealth) => Either::Left(self.health.clone().call(request)),
            Some(AnsweredBy::ServerService) => {
                Either::Right(Box::pin(self.server.clone().call(request)))
            }
            Some(AnsweredBy::PraefectInfoService) => {
                Either::Right(Box::pin(self.info.clone().call(request)))
            }
            Some(AnsweredBy::Method(_)) | None => {
                let proxy = self.proxy.clone();
                Either::Right(Box::pin(async move { Ok(proxy.handle(request).await) }))
            }
        }
    }
}
