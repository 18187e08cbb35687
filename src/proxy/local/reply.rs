//! Answers of the single methods the router answers inside forwarded services: decoding
//! their first message and framing their reply, where no generated service does it.

use bytes::Bytes;
use http_body::Frame;
use prost::Message;

use crate::proxy::error::{Malformed, ProxyError};
use crate::proxy::finalize::status_trailers;
use crate::proxy::frame;

/// A successful unary gRPC response carrying `message`.
pub fn unary_ok(message: &impl Message) -> http::Response<tonic::body::Body> {
    let framed = frame::encode(&message.encode_to_vec());
    let frames = futures::stream::iter([
        Ok::<_, tonic::Status>(Frame::data(framed)),
        Ok(Frame::trailers(status_trailers(tonic::Status::ok("")))),
    ]);
    grpc_response(tonic::body::Body::new(http_body_util::StreamBody::new(
        frames,
    )))
}

/// A gRPC response with `body`.
pub fn grpc_response(body: tonic::body::Body) -> http::Response<tonic::body::Body> {
    let mut response = http::Response::new(body);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    response
}

/// Decodes the first request message. A message that does not decode is reported like one
/// the pass-through cannot read.
pub fn decode<M: Message + Default>(message: &Bytes) -> Result<M, ProxyError> {
    M::decode(message.as_ref()).map_err(|err| Malformed::Message(err).into())
}
