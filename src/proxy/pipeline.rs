//! The pass-through, as a pipeline of named steps: every RPC the router does not answer
//! itself arrives here as a raw HTTP/2 request and goes through
//!
//! 1. **look up** the method in the registry;
//! 2. **read** the first request message (nothing else is read or decoded);
//! 3. hand it to a **local** answer if the router answers this method itself;
//! 4. **route**: ask the router for a plan, and **rewrite** the message for each node;
//! 5. **send** it, with the rest of the client's stream behind it, and the node's answer
//!    back, byte for byte, with the node's backpressure reaching the client;
//! 6. **finalize** a write: record it before the client sees the node's trailers.
//!
//! Correlation id, the request span and method metrics are tower layers around this
//! (`layers.rs`), as authentication is.

use bytes::Bytes;
use futures::StreamExt;
use http_body::Frame;
use http_body_util::{BodyStream, StreamBody};

use super::error::{Malformed, ProxyError};
use super::frame::{self, FirstMessage, FrameError};
use super::layers::correlation_id;
use super::local::{self, AnsweredBy};
use super::route::{self, Destination, Forwarding};
use super::state::Proxy;
use super::{finalize, forward, sidechannel};
use crate::routing::registry::MethodInfo;
use crate::routing::WriteRoute;
use crate::wire::backchannel::PeerInfo;
use crate::wire::sidechannel as wire_sidechannel;

type Response = http::Response<tonic::body::Body>;

impl Proxy {
    /// Serves one call; failures become gRPC statuses (and log lines).
    pub async fn handle(&self, request: http::Request<tonic::body::Body>) -> Response {
        match self.forward(request).await {
            Ok(response) => response,
            Err(err) => err.report().into_http(),
        }
    }

    async fn forward(
        &self,
        request: http::Request<tonic::body::Body>,
    ) -> Result<Response, ProxyError> {
        let (parts, body) = request.into_parts();
        let method = self.look_up(parts.uri.path())?;
        let mut body = BodyStream::new(body);
        let first = read_first(&mut body).await?;
        if let Some(AnsweredBy::Method(local)) = local::answered_by(&method.full_name) {
            return local.answer(self, &first.message).await;
        }
        let mut headers = parts.headers;
        let forwarding = route::plan(self, method, &first.message, &mut headers).await?;
        let uri = outgoing_uri(&parts.uri);
        let (destination, message, write) = match forwarding {
            Forwarding::FanOut(calls) => {
                if let Some((destination, _)) = calls.first() {
                    record_virtual_storage(destination);
                }
                return forward::fan_out(self, &uri, &headers, calls).await;
            }
            Forwarding::One {
                destination,
                message,
                write,
            } => (destination, message, write),
        };
        record_virtual_storage(&destination);
        self.bridge_sidechannel(&mut headers, &parts.extensions)?;
        let outgoing = outgoing_body(method, message, first.rest, body);
        // Only a write needs the correlation id after sending (for its replication jobs).
        let write = write.map(|write| (write, correlation_id(&headers)));
        let response = forward::send(self, uri, headers, &destination, outgoing).await?;
        match write {
            None => Ok(response),
            Some((write, correlation_id)) => self.finalize(response, write, correlation_id).await,
        }
    }

    /// Step 1: the method's registry entry.
    fn look_up(&self, path: &str) -> Result<&'static MethodInfo, ProxyError> {
        let method = self
            .registry
            .lookup(path)
            .ok_or_else(|| ProxyError::UnknownMethod(path.to_string()))?;
        if method.intercepted {
            // Services the router answers are mounted beside the proxy; what reaches the
            // pass-through of them is not implemented yet.
            return Err(ProxyError::NotImplemented(path.to_string()));
        }
        Ok(method)
    }

    /// A client that asked its node for a sidechannel gets one bridged through the router:
    /// the node connects back to the router under the router's own id (appended, nodes use
    /// the last value), and the router opens the client's under the client's id.
    fn bridge_sidechannel(
        &self,
        headers: &mut http::HeaderMap,
        extensions: &http::Extensions,
    ) -> Result<(), ProxyError> {
        let Some(client_id) = sidechannel::client_id(headers)? else {
            return Ok(());
        };
        let peer = extensions.get::<PeerInfo>().cloned().unwrap_or_default();
        if peer.backchannel_id.is_none() {
            return Err(Malformed::NoBackchannel.into());
        }
        let waiter = self.nodes.sidechannels.register();
        let value = http::HeaderValue::from(waiter.id());
        headers.append(wire_sidechannel::METADATA_KEY, value);
        sidechannel::spawn_bridge(waiter, self.sessions.clone(), peer, client_id);
        Ok(())
    }

    /// Step 6: a write is recorded once the primary's trailers say it succeeded, before the
    /// client sees them; a failed write records nothing (gitaly#3605).
    async fn finalize(
        &self,
        response: Response,
        write: Box<WriteRoute>,
        correlation_id: String,
    ) -> Result<Response, ProxyError> {
        let store = self.store().clone();
        let record = write.record(&[]);
        let (parts, body) = response.into_parts();
        if parts.headers.contains_key("grpc-status") {
            // A trailers-only answer: the outcome is known now. Recorded in a task of its
            // own, so that a client going away does not cancel it.
            let ok = finalize::is_ok(&parts.headers);
            let recorded = finalize::detached(async move {
                record_if_ok(ok, &store, record, &correlation_id).await
            })
            .await;
            return Ok(match recorded {
                Ok(()) => http::Response::from_parts(parts, body),
                Err(status) => status.into_http(),
            });
        }
        let body = finalize::Finalizing::new(body, move |ok| async move {
            record_if_ok(ok, &store, record, &correlation_id).await
        });
        Ok(http::Response::from_parts(
            parts,
            tonic::body::Body::new(body),
        ))
    }
}

async fn record_if_ok(
    ok: bool,
    store: &crate::datastore::Datastore,
    record: crate::routing::WriteRecord,
    correlation_id: &str,
) -> Result<(), tonic::Status> {
    if !ok {
        return Ok(());
    }
    finalize::record(store, record, correlation_id)
        .await
        .map_err(|err| {
            tracing::error!(error = %err, "recording a successful write failed");
            ProxyError::Database(err).to_status()
        })
}

/// Step 2: the first request message, and what followed it in the same chunk.
async fn read_first(body: &mut BodyStream<tonic::body::Body>) -> Result<FirstMessage, ProxyError> {
    frame::read_first(body).await.map_err(|err| match err {
        FrameError::Body(source) => ProxyError::ClientStream(source),
        other => ProxyError::Malformed(Malformed::Frame(other)),
    })
}

/// The request body sent to the node: the rewritten first message, then for a client-streaming
/// call the rest of the client's stream as it comes.
fn outgoing_body(
    method: &MethodInfo,
    message: Vec<u8>,
    rest: Bytes,
    body: BodyStream<tonic::body::Body>,
) -> tonic::body::Body {
    let first_frame = frame::encode(&message);
    if method.client_streaming {
        let head = futures::stream::iter([Ok(Frame::data(first_frame)), Ok(Frame::data(rest))]);
        let rest = body.map(|frame| frame.map_err(|e| tonic::Status::cancelled(e.to_string())));
        tonic::body::Body::new(StreamBody::new(head.chain(rest)))
    } else {
        // One request message is all a unary or server-streaming call has: end the request
        // with it, rather than waiting for the client's end of stream. (A request still
        // open when the answer is complete gets reset, and a node counts resets.)
        tonic::body::Body::new(http_body_util::Full::new(first_frame))
    }
}

/// The URI a forwarded call is sent with: the client's path, without its scheme and
/// authority (the node's channel sets its own). A clone of the parsed path, not a new parse.
fn outgoing_uri(uri: &http::Uri) -> http::Uri {
    let mut parts = http::uri::Parts::default();
    parts.path_and_query = match uri.path_and_query() {
        Some(pq) if pq.query().is_none() => Some(pq.clone()),
        _ => http::uri::PathAndQuery::try_from(uri.path()).ok(),
    };
    http::Uri::from_parts(parts).unwrap_or_else(|_| http::Uri::from_static("/"))
}

/// Names the call's virtual storage in the request span.
fn record_virtual_storage(destination: &Destination) {
    tracing::Span::current().record("virtual_storage", destination.virtual_storage.as_str());
}
