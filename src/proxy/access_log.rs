//! One log line and the go-grpc-prometheus metrics per finished call, as Gitaly and Praefect
//! give them: `grpc.method`, `grpc.code`, `grpc.time_ms`, `peer.address`, and, from the
//! call's span, `correlation_id` and what routing chose (`virtual_storage`, `relative_path`,
//! `storage`). A call ends with its trailers, or when the client goes away (Canceled). The
//! line's level follows its code as in go-grpc-middleware's logrus interceptor, which Gitaly
//! and Praefect log with (see [`level_of`]): what the client caused or gave up on is info,
//! what an operator may have to look at is warn, and what points to a fault is error (the
//! cause itself was logged where it happened, see `ProxyError::report`). Health checks are
//! logged only at debug, since load balancers send them every second. No header is logged,
//! so no token ever is.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tower::{Layer, Service};

use crate::metrics::grpc::{self, CallTimer, MessageCounter, MethodMetrics, Side};
use crate::wire::backchannel::PeerInfo;
use crate::wire::header_names::grpc_code;

type Request = http::Request<tonic::body::Body>;
type Response = http::Response<tonic::body::Body>;

#[derive(Clone, Copy, Default)]
pub struct AccessLogLayer;

impl<S> Layer<S> for AccessLogLayer {
    type Service = AccessLog<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AccessLog { inner }
    }
}

#[derive(Clone)]
pub struct AccessLog<S> {
    inner: S,
}

impl<S> Service<Request> for AccessLog<S>
where
    S: Service<Request, Response = Response>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let mut finish = Finish::start(&request);
        let received = finish.timer.metrics().msg_received.clone();
        let request = request.map(|body| super::body::boxed(Counted::new(body, received)));
        let future = self.inner.call(request);
        Box::pin(async move {
            // The request span is entered while this future runs (not when `call` runs).
            finish.span = tracing::Span::current();
            let response = future.await?;
            Ok(finish.watch(response))
        })
    }
}

/// What the line of one call needs once it ends.
struct Finish {
    span: tracing::Span,
    method: String,
    timer: CallTimer,
    peer: Option<Arc<str>>,
    health_check: bool,
}

impl Finish {
    fn start(request: &Request) -> Finish {
        let method = request.uri().path().to_string();
        let metrics = MethodMetrics::for_path(Side::Server, &method);
        Finish {
            span: tracing::Span::none(),
            health_check: metrics.service() == "grpc.health.v1.Health",
            method,
            timer: metrics.start(),
            peer: request
                .extensions()
                .get::<PeerInfo>()
                .map(|p| p.remote_addr.clone()),
        }
    }

    /// The response, watched for its end.
    fn watch(self, response: Response) -> Response {
        if let Some(code) = grpc_code(response.headers()) {
            // Trailers-only: over now.
            let message = failure_message(code, response.headers());
            self.done(code, &message);
            return response;
        }
        let (parts, body) = response.into_parts();
        let body = Watched {
            inner: Counted::new(body, self.timer.metrics().msg_sent.clone()),
            finish: Some(self),
        };
        http::Response::from_parts(parts, super::body::boxed(body))
    }

    fn done(self, code: tonic::Code, message: &str) {
        let elapsed = self.timer.done(code);
        let time_ms = elapsed.as_secs_f64() * 1000.0;
        let peer = self.peer.as_deref().unwrap_or("");
        let code_name = grpc::code_name(code);
        self.span.in_scope(|| {
            let level = if self.health_check {
                tracing::Level::DEBUG
            } else {
                level_of(code)
            };
            match level {
                // Health checks, whatever their code.
                tracing::Level::DEBUG => {
                    tracing::debug!(grpc.method = %self.method, grpc.code = code_name, grpc.time_ms = time_ms, peer.address = peer, "finished call")
                }
                // A call that succeeded has no message.
                _ if code == tonic::Code::Ok => {
                    tracing::info!(grpc.method = %self.method, grpc.code = code_name, grpc.time_ms = time_ms, peer.address = peer, "finished call")
                }
                tracing::Level::INFO => {
                    tracing::info!(grpc.method = %self.method, grpc.code = code_name, grpc.time_ms = time_ms, peer.address = peer, grpc.message = message, "finished call")
                }
                tracing::Level::WARN => {
                    tracing::warn!(grpc.method = %self.method, grpc.code = code_name, grpc.time_ms = time_ms, peer.address = peer, grpc.message = message, "finished call")
                }
                _ => {
                    tracing::error!(grpc.method = %self.method, grpc.code = code_name, grpc.time_ms = time_ms, peer.address = peer, grpc.message = message, "finished call")
                }
            }
        });
    }
}

/// The level of a finished call's line, by its code: go-grpc-middleware's default mapping,
/// so that alerts and searches written against Go Praefect's logs keep working. A client
/// that cancels, asks for a repository that does not exist or sends a bad argument is not
/// the cluster's problem (info); timeouts, refusals and an unavailable node may be (warn);
/// Unknown, Unimplemented, Internal and DataLoss are faults (error).
pub fn level_of(code: tonic::Code) -> tracing::Level {
    use tonic::Code::*;
    match code {
        Ok | Cancelled | InvalidArgument | NotFound | AlreadyExists | Unauthenticated => {
            tracing::Level::INFO
        }
        DeadlineExceeded | PermissionDenied | ResourceExhausted | FailedPrecondition | Aborted
        | OutOfRange | Unavailable => tracing::Level::WARN,
        Unknown | Unimplemented | Internal | DataLoss => tracing::Level::ERROR,
    }
}

/// The status message of a failed call's trailers (or trailers-only headers), decoded; empty
/// for a call that succeeded, whose line has no message (so that the decoding, and its
/// allocation, is not paid on every call).
fn failure_message(code: tonic::Code, headers: &http::HeaderMap) -> String {
    if code == tonic::Code::Ok {
        return String::new();
    }
    tonic::Status::from_header_map(headers)
        .map(|status| status.message().to_string())
        .unwrap_or_default()
}

/// A response body that counts its messages and reports the call's end.
struct Watched {
    inner: Counted,
    finish: Option<Finish>,
}

impl Body for Watched {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let ended = match &polled {
            Poll::Ready(Some(Ok(frame))) => frame.trailers_ref().map(|trailers| {
                let code = grpc_code(trailers).unwrap_or(tonic::Code::Unknown);
                (code, failure_message(code, trailers))
            }),
            Poll::Ready(Some(Err(status))) => Some((status.code(), status.message().to_string())),
            Poll::Ready(None) => Some((
                tonic::Code::Unknown,
                "the answer ended without trailers".to_string(),
            )),
            Poll::Pending => None,
        };
        if let Some((code, message)) = ended {
            if let Some(finish) = self.finish.take() {
                finish.done(code, &message);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        if let Some(finish) = self.finish.take() {
            finish.done(tonic::Code::Cancelled, "the client went away");
        }
    }
}

/// A body that counts the messages that pass (the client's, or the answer's).
struct Counted {
    inner: tonic::body::Body,
    counter: MessageCounter,
    messages: prometheus::IntCounter,
}

impl Counted {
    fn new(inner: tonic::body::Body, messages: prometheus::IntCounter) -> Self {
        Counted {
            inner,
            counter: MessageCounter::default(),
            messages,
        }
    }
}

impl Body for Counted {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                this.counter.count(data, &this.messages);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_mistakes_are_info_and_faults_are_errors() {
        use tonic::Code;
        for code in [
            Code::Ok,
            Code::Cancelled,
            Code::NotFound,
            Code::InvalidArgument,
        ] {
            assert_eq!(level_of(code), tracing::Level::INFO, "{code:?}");
        }
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::FailedPrecondition,
        ] {
            assert_eq!(level_of(code), tracing::Level::WARN, "{code:?}");
        }
        for code in [Code::Internal, Code::Unknown, Code::DataLoss] {
            assert_eq!(level_of(code), tracing::Level::ERROR, "{code:?}");
        }
    }
}
