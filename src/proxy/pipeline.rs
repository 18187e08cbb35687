//! The pass-through, as a pipeline of named steps: every RPC the router does not answer
//! itself arrives here as a raw HTTP/2 request and goes through
//!
//! 1. **look up** the method in the registry;
//! 2. **read** the first request message (nothing else is read or decoded);
//! 3. hand it to a **local** answer if the router answers this method itself;
//! 4. **route**: ask the router for a plan, and **rewrite** the message for each node;
//! 5. **send** it, with the rest of the client's stream behind it, and the node's answer
//!    back, byte for byte, with the node's backpressure reaching the client;
//! 6. **finalize** a write (`write.rs`): a transactional one goes to the primary and the
//!    secondaries, which vote; what it did is recorded before the client sees the primary's
//!    trailers.
//!
//! Correlation id, the request span and method metrics are tower layers around this
//! (`layers.rs`), as authentication is.

use http_body_util::BodyStream;

use super::error::{Malformed, ProxyError};
use super::frame::{self, FirstMessage, FrameError};
use super::local::{self, AnsweredBy};
use super::route::{self, Destination, Forwarding};
use super::state::Proxy;
use super::write::WriteCall;
use super::{forward, object_pool, request_body, sidechannel};
use crate::routing::registry::MethodInfo;
use crate::wire::backchannel::PeerInfo;

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
        // A sidechannel id the router cannot use is refused before anything is read or sent.
        let client_sidechannel = sidechannel::client_id(&parts.headers)?;
        let mut body = BodyStream::new(body);
        let first = self.read_first(&mut body).await?;
        if let Some(AnsweredBy::Method(local)) = local::answered_by(&method.full_name) {
            return local.answer(self, &first.message).await;
        }
        let mut headers = parts.headers;
        let forwarding = route::plan(self, method, &first.message, &mut headers).await?;
        let uri = outgoing_uri(&parts.uri);
        match forwarding {
            Forwarding::FanOut(calls) => {
                if let Some((destination, _)) = calls.first() {
                    record_virtual_storage(destination);
                }
                // Several nodes cannot share the client's one sidechannel, and none may open
                // one to the client under its id: maintenance calls never use one anyway.
                headers.remove(crate::wire::header_names::SIDECHANNEL_ID);
                forward::fan_out(self, &uri, &headers, calls).await
            }
            Forwarding::One {
                destination,
                message,
            } => {
                record_virtual_storage(&destination);
                let bridged =
                    self.bridge_sidechannel(client_sidechannel, &mut headers, &parts.extensions)?;
                let outgoing =
                    request_body::single(method.client_streaming, &message, first.rest, body);
                let channel = forward::channel(self, &destination)?;
                match forward::try_send(&channel, uri, headers, &destination, outgoing).await {
                    Ok(response) if method.full_name == object_pool::GET_OBJECT_POOL => {
                        object_pool::translate(self, response).await
                    }
                    Ok(response) => Ok(response),
                    // The node could not be reached and the call never left: a read goes
                    // to another up-to-date replica (the health checks have not noticed yet).
                    Err((err, Some(headers))) if !bridged => {
                        let rerouted = route::reroute_read(
                            self,
                            method,
                            &first.message,
                            &headers,
                            &destination.storage,
                        );
                        let Some((next, message)) = rerouted.await else {
                            return Err(err);
                        };
                        tracing::info!(
                            unreachable = %destination.storage,
                            storage = %next.storage,
                            "read sent to another replica"
                        );
                        let body = request_body::one_message(&message);
                        forward::send(self, outgoing_uri(&parts.uri), headers, &next, body).await
                    }
                    Err((err, _)) => Err(err),
                }
            }
            Forwarding::Write(write) => {
                if let Some((destination, _)) = write.participants.first() {
                    record_virtual_storage(destination);
                }
                let call = WriteCall {
                    method,
                    uri,
                    headers,
                    extensions: &parts.extensions,
                    sidechannel: client_sidechannel,
                    rest: first.rest,
                    body,
                };
                self.forward_write(call, *write).await
            }
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

    /// A client that asked its node for a sidechannel (`client_id`, from its metadata) gets
    /// one bridged through the router: the node connects back to the router under the
    /// router's own id (appended, nodes use the last value), and the router opens the
    /// client's under the client's id. Whether it bridged one.
    pub(super) fn bridge_sidechannel(
        &self,
        client_id: Option<u64>,
        headers: &mut http::HeaderMap,
        extensions: &http::Extensions,
    ) -> Result<bool, ProxyError> {
        let Some(client_id) = client_id else {
            return Ok(false);
        };
        let peer = extensions.get::<PeerInfo>().cloned().unwrap_or_default();
        if peer.backchannel_id.is_none() {
            return Err(Malformed::NoBackchannel.into());
        }
        let waiter = self.nodes.sidechannels.register();
        let value = http::HeaderValue::from(waiter.id());
        headers.append(crate::wire::header_names::SIDECHANNEL_ID, value);
        sidechannel::spawn_bridge(
            &self.bridges,
            waiter,
            self.sessions.clone(),
            peer,
            client_id,
            self.config.proxy.sidechannel_idle_timeout.to_std(),
        );
        Ok(true)
    }
}

impl Proxy {
    /// Step 2: the first request message, and what followed it in the same chunk; within
    /// `[proxy] first_message_timeout` and `max_first_message_bytes`, so that a client that
    /// trickles its message or announces a huge one holds neither a task nor memory for long.
    async fn read_first(
        &self,
        body: &mut BodyStream<tonic::body::Body>,
    ) -> Result<FirstMessage, ProxyError> {
        let limits = &self.config.proxy;
        let timeout = limits.first_message_timeout.to_std();
        let read = frame::read_first(body, limits.max_first_message());
        match tokio::time::timeout(timeout, read).await {
            Err(_) => Err(ProxyError::FirstMessageTimeout(timeout)),
            Ok(Ok(first)) => Ok(first),
            Ok(Err(FrameError::Body(source))) => Err(ProxyError::ClientStream(source)),
            Ok(Err(other)) => Err(ProxyError::Malformed(Malformed::Frame(other))),
        }
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

/// Names the call's virtual storage and chosen storage in the request span.
fn record_virtual_storage(destination: &Destination) {
    let span = tracing::Span::current();
    span.record("virtual_storage", destination.virtual_storage.as_str());
    span.record("storage", destination.storage.as_str());
}
