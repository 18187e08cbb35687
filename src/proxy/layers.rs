//! The steps every call to the router goes through, after authentication, as tower layers: a
//! correlation id (kept from the client, or made), the request span whose fields every log
//! line of the call carries, and the method-type metric of routed calls.

use std::sync::OnceLock;
use std::task::{Context, Poll};

use tower::{Layer, Service};
use tracing::instrument::{Instrument, Instrumented};

use super::local;
use crate::metrics;
use crate::routing::registry::{OpType, Registry};

/// GitLab's correlation id, kept from the client or generated.
pub const CORRELATION_HEADER: &str = "x-gitlab-correlation-id";
const CORRELATION_NAME: http::HeaderName = http::HeaderName::from_static(CORRELATION_HEADER);

/// The call's correlation id (set by [`ensure_correlation_id`]).
pub fn correlation_id(headers: &http::HeaderMap) -> String {
    headers
        .get(&CORRELATION_NAME)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// A new correlation id: a random (v4) UUID without hyphens. The bytes come from the thread's
/// CSPRNG (seeded from the OS, reseeded periodically) rather than a `getrandom` system call
/// per call, as `Uuid::new_v4` makes.
fn new_correlation_id() -> http::HeaderValue {
    let uuid = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
    let mut text = [0u8; uuid::fmt::Simple::LENGTH];
    let text = uuid.simple().encode_lower(&mut text);
    http::HeaderValue::from_str(text).unwrap_or(http::HeaderValue::from_static("0"))
}

/// The request type every step sees.
pub type Request = http::Request<tonic::body::Body>;

/// A step that only looks at (or adds to) the request, as `tower::util::MapRequest` runs it.
pub type RequestStep = fn(Request) -> Request;

/// Gives every call a correlation id: the client's, or a new one when it sent none.
///
/// The id is marked sensitive, which only tells HPACK to send it as a literal that is never
/// indexed (the HTTP/2 header compression of the call to the node). Every call has a new id:
/// indexing it would insert an entry into the connection's header table on every call,
/// evicting the headers that do repeat (content type, the node's token), and search the table
/// for it first; that was about 3% of the instructions of a unary call.
pub fn ensure_correlation_id(mut request: Request) -> Request {
    match request.headers_mut().get_mut(&CORRELATION_NAME) {
        Some(id) if !id.is_empty() && id.to_str().is_ok() => id.set_sensitive(true),
        _ => {
            let mut id = new_correlation_id();
            id.set_sensitive(true);
            request.headers_mut().insert(CORRELATION_NAME, id);
        }
    }
    request
}

/// Runs every call inside a span with `grpc.method`, `correlation_id` and (once routed)
/// `virtual_storage`, `relative_path` and the chosen `storage`, so that each log line of the
/// call can be traced back to it.
#[derive(Clone, Copy, Default)]
pub struct SpanLayer;

impl<S> Layer<S> for SpanLayer {
    type Service = RequestSpan<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RequestSpan { inner }
    }
}

#[derive(Clone)]
pub struct RequestSpan<S> {
    inner: S,
}

impl<S, B> Service<http::Request<B>> for RequestSpan<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Instrumented<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let span = tracing::info_span!(
            "grpc",
            grpc.method = %request.uri().path(),
            correlation_id = %correlation_id(request.headers()),
            virtual_storage = tracing::field::Empty,
            relative_path = tracing::field::Empty,
            storage = tracing::field::Empty,
        );
        self.inner.call(request).instrument(span)
    }
}

/// Counts routed calls by operation type (`gitaly_praefect_method_types`); calls the router
/// answers itself are not routed and not counted.
pub fn count_method_type(request: Request) -> Request {
    let path = request.uri().path();
    if let Some(method) = Registry::global().lookup(path) {
        if !method.intercepted && local::answered_by(path).is_none() {
            count_op_type(method.op_type);
        }
    }
    request
}

/// Counts a routed call by its operation type (each type's counter looked up once, on its
/// first call, so that a type appears in the metrics only once counted).
fn count_op_type(op_type: OpType) {
    static COUNTERS: [OnceLock<prometheus::IntCounter>; 4] = [const { OnceLock::new() }; 4];
    let index = match op_type {
        OpType::Accessor => 0,
        OpType::Mutator => 1,
        OpType::Maintenance => 2,
        OpType::Unknown => 3,
    };
    COUNTERS[index]
        .get_or_init(|| metrics::METHOD_TYPES.with_label_values(&[op_type.metric_label()]))
        .inc();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn correlation_ids_are_kept_or_made() {
        let cases = [(Some("abc"), Some("abc")), (Some(""), None), (None, None)];
        for (sent, kept) in cases {
            let mut request = Request::new(tonic::body::Body::empty());
            if let Some(id) = sent {
                request
                    .headers_mut()
                    .insert(CORRELATION_NAME, http::HeaderValue::from_static(id));
            }
            let request = ensure_correlation_id(request);
            let value = request.headers().get(&CORRELATION_NAME).unwrap();
            // Never indexed by HPACK (see ensure_correlation_id), whoever made it.
            assert!(value.is_sensitive(), "{sent:?}");
            let id = correlation_id(request.headers());
            match kept {
                Some(kept) => assert_eq!(id, kept),
                None => {
                    assert_eq!(id.len(), 32, "{id}");
                    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
                }
            }
        }
    }
}
