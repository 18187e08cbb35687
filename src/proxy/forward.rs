//! The send step: a call to one node with the client's metadata (minus its token: the
//! node's channel signs with the node's), or a unary call to several nodes at once
//! (maintenance), answered once all have answered. A node's status message reaches the
//! client without paths or addresses on the node (`sanitize.rs`).

use bytes::Bytes;
use http_body::Frame;
use http_body_util::BodyExt;

use super::error::ProxyError;
use super::finalize::is_ok;
use super::route::Destination;
use super::sanitize;
use super::state::Proxy;
use crate::nodes::NodeChannel;

/// Metadata naming the virtual storage of a repository-scoped call, for the node's logs.
const VIRTUAL_STORAGE_NAME: http::HeaderName = http::HeaderName::from_static("virtual_storage");

/// Sends one call to `destination`.
pub async fn send(
    proxy: &Proxy,
    uri: http::Uri,
    headers: http::HeaderMap,
    destination: &Destination,
    body: tonic::body::Body,
) -> Result<http::Response<tonic::body::Body>, ProxyError> {
    let channel = channel(proxy, destination)?;
    send_on(channel, uri, headers, destination, body).await
}

/// The connection to `destination`'s node.
pub fn channel(proxy: &Proxy, destination: &Destination) -> Result<NodeChannel, ProxyError> {
    Ok(proxy
        .nodes
        .channel(&destination.virtual_storage, &destination.storage)
        .cloned()
        .ok_or(crate::routing::RoutingError::NoSuitableNode)?)
}

/// Sends one call to `destination` over `channel` (its node's connection).
pub async fn send_on(
    channel: NodeChannel,
    uri: http::Uri,
    headers: http::HeaderMap,
    destination: &Destination,
    body: tonic::body::Body,
) -> Result<http::Response<tonic::body::Body>, ProxyError> {
    try_send(&channel, uri, headers, destination, body)
        .await
        .map_err(|(err, _)| err)
}

/// Sends one call; if it never reached the node (no connection could be had), the failure
/// gives back its metadata, so that a read can go to another replica without the router
/// keeping a copy of every call's metadata in case of failure.
pub async fn try_send(
    channel: &NodeChannel,
    uri: http::Uri,
    mut headers: http::HeaderMap,
    destination: &Destination,
    body: tonic::body::Body,
) -> Result<http::Response<tonic::body::Body>, (ProxyError, Option<http::HeaderMap>)> {
    headers.remove(http::header::AUTHORIZATION);
    // Rarely sent over HTTP/2: one look at the few headers instead of a lookup for each.
    if headers
        .keys()
        .any(|name| name == http::header::HOST || name == http::header::CONTENT_LENGTH)
    {
        headers.remove(http::header::HOST);
        headers.remove(http::header::CONTENT_LENGTH);
    }
    if destination.repository_scoped {
        if let Ok(value) = http::HeaderValue::from_str(&destination.virtual_storage) {
            headers.insert(VIRTUAL_STORAGE_NAME, value);
        }
    }
    let mut outgoing = http::Request::new(body);
    *outgoing.method_mut() = http::Method::POST;
    *outgoing.version_mut() = http::Version::HTTP_2;
    *outgoing.uri_mut() = uri;
    *outgoing.headers_mut() = headers;
    tracing::debug!(grpc.method = %outgoing.uri().path(), storage = %destination.storage, "forwarding");
    match channel.send_or_return(outgoing).await {
        Ok(response) => {
            // The node's body, scrubbed, is boxed once (`sanitize::response`).
            Ok(sanitize::response(response, &destination.storage))
        }
        Err(unsent) => {
            let headers = unsent.request.map(|request| request.into_parts().0.headers);
            let err = ProxyError::Forward {
                storage: destination.storage.clone(),
                source: unsent.error.into(),
            };
            Err((err, headers))
        }
    }
}

/// One node's complete answer to a unary call.
struct Buffered {
    parts: http::response::Parts,
    data: Bytes,
    trailers: Option<http::HeaderMap>,
}

impl Buffered {
    fn succeeded(&self) -> bool {
        is_ok(&self.parts.headers) || self.trailers.as_ref().is_some_and(is_ok)
    }

    fn into_response(self) -> http::Response<tonic::body::Body> {
        let mut frames = Vec::new();
        if !self.data.is_empty() {
            frames.push(Ok::<_, tonic::Status>(Frame::data(self.data)));
        }
        if let Some(trailers) = self.trailers {
            frames.push(Ok(Frame::trailers(trailers)));
        }
        let body = http_body_util::StreamBody::new(futures::stream::iter(frames));
        http::Response::from_parts(self.parts, super::body::boxed(body))
    }
}

/// Sends a unary call to every destination at once and answers once all have answered. A
/// node's failure does not cancel the others; the first failure in destination order is the
/// answer, else the first node's.
pub async fn fan_out(
    proxy: &Proxy,
    uri: &http::Uri,
    headers: &http::HeaderMap,
    calls: Vec<(Destination, Vec<u8>)>,
) -> Result<http::Response<tonic::body::Body>, ProxyError> {
    let calls = calls.into_iter().map(|(destination, message)| async move {
        let body = super::request_body::one_message(&message);
        let response = send(proxy, uri.clone(), headers.clone(), &destination, body).await?;
        let (parts, body) = response.into_parts();
        let collected = body.collect().await.map_err(|status| ProxyError::Forward {
            storage: destination.storage.clone(),
            source: Box::new(status),
        })?;
        let trailers = collected.trailers().cloned();
        Ok::<_, ProxyError>(Buffered {
            parts,
            data: collected.to_bytes(),
            trailers,
        })
    });
    let answers = futures::future::join_all(calls).await;
    let chosen = answers
        .iter()
        .position(|answer| answer.as_ref().map_or(true, |b| !b.succeeded()))
        .unwrap_or(0);
    answers
        .into_iter()
        .nth(chosen)
        .ok_or(crate::routing::RoutingError::NoSuitableNode)?
        .map(Buffered::into_response)
}
