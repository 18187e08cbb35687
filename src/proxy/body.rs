//! Bodies as the router's service passes them around: tonic's `Body`, built so that a body
//! whose errors are already statuses is boxed once and polled through no mapping layer.
//!
//! `tonic::body::Body::new` maps a body's errors to statuses with a layer of its own and
//! boxes the result, unless it is handed a box of a body with status errors already; every
//! frame of every call is then polled through one dynamic call fewer, and each body costs
//! one allocation fewer.

use bytes::Bytes;
use http_body::Body;
use http_body_util::BodyExt;

/// `body` as tonic's body type: one box, no error mapping.
pub fn boxed<B>(body: B) -> tonic::body::Body
where
    B: Body<Data = Bytes, Error = tonic::Status> + Send + 'static,
{
    tonic::body::Body::new(body.boxed_unsync())
}

/// A body that never fails (a whole message, say) as tonic's body type.
pub fn infallible<B>(body: B) -> tonic::body::Body
where
    B: Body<Data = Bytes, Error = std::convert::Infallible> + Send + 'static,
{
    boxed(body.map_err(|never| match never {}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn boxed_bodies_keep_their_frames_and_errors() {
        let full = infallible(http_body_util::Full::new(Bytes::from_static(b"abc")));
        assert_eq!(full.collect().await.unwrap().to_bytes(), "abc");

        let frames = [
            Ok(http_body::Frame::data(Bytes::from_static(b"x"))),
            Err(tonic::Status::data_loss("gone")),
        ];
        let failing = boxed(http_body_util::StreamBody::new(futures::stream::iter(
            frames,
        )));
        let err = failing.collect().await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::DataLoss);
        assert_eq!(err.message(), "gone");
    }
}
