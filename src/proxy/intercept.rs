//! Calls the router answers itself instead of forwarding.

use bytes::Bytes;
use http_body::Frame;
use prost::Message;

use super::finalize::status_trailers;

/// A successful unary gRPC response carrying `message`.
pub fn unary_ok(message: &impl Message) -> http::Response<tonic::body::Body> {
    let framed = super::frame::encode(&message.encode_to_vec());
    let frames = futures::stream::iter([
        Ok::<_, tonic::Status>(Frame::data(framed)),
        Ok(Frame::trailers(status_trailers(tonic::Status::ok("")))),
    ]);
    let mut response = http::Response::new(tonic::body::Body::new(
        http_body_util::StreamBody::new(frames),
    ));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    response
}

/// Decodes the first request message of an intercepted call.
/// A message that does not decode is reported like one the pass-through cannot read.
pub fn decode<M: Message + Default>(message: &Bytes) -> Result<M, super::ProxyError> {
    M::decode(message.as_ref()).map_err(|err| {
        tracing::debug!(error = %err, "undecodable request message");
        super::ProxyError::Malformed("malformed protobuf message".into())
    })
}
