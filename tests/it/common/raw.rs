//! One gRPC call made by hand: a framed message and chosen metadata, over any channel to the
//! router, for the tests that send what a generated client never would (bad tokens, odd
//! paths, HTTP/1 headers).

use bytes::Bytes;
use http_body_util::BodyExt;
use tower::ServiceExt;

/// Sends one raw request (`message`, framed) to `path` over `channel` with `headers`, and
/// returns the call's status and the answer's data.
pub async fn raw_call_answer<S, B>(
    channel: S,
    path: &str,
    message: &[u8],
    headers: &[(&str, &str)],
) -> (tonic::Status, Bytes)
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let mut request = http::Request::builder()
        .method(http::Method::POST)
        .uri(format!("http://router{path}"))
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header("te", "trailers");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let body = tonic::body::Body::new(http_body_util::Full::new(super::echo::frame(message)));
    let response = channel
        .oneshot(request.body(body).unwrap())
        .await
        .unwrap_or_else(|e| panic!("{path}: transport error: {e:?}"));
    let (parts, body) = response.into_parts();
    if let Some(status) = tonic::Status::from_header_map(&parts.headers) {
        return (status, Bytes::new());
    }
    let http_status = parts.status;
    let collected = body.collect().await.unwrap();
    let status = collected
        .trailers()
        .and_then(tonic::Status::from_header_map)
        .unwrap_or_else(|| tonic::Status::unknown(format!("no grpc-status: HTTP {http_status}")));
    (status, collected.to_bytes())
}

/// [`raw_call_answer`]'s status alone.
pub async fn raw_call<S, B>(
    channel: S,
    path: &str,
    message: &[u8],
    headers: &[(&str, &str)],
) -> tonic::Status
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    raw_call_answer(channel, path, message, headers).await.0
}
