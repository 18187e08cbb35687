//! An in-process "echo" storage node for the router's end-to-end tests: a gRPC server on a
//! loopback TCP port that the router can use as a Gitaly node. It accepts backchannel and
//! plain clients (the router dials nodes with the backchannel handshake), answers
//! `grpc.health.v1.Health/Check` with SERVING, and answers every other call with the raw bytes
//! of the first request message it received, as the single response message with status OK.
//! Every such call is recorded (node, path, headers, first message) in an [`EchoLog`] that
//! the test inspects, so a test can see exactly what the router sent for any RPC, whatever
//! its request and response types. A call that carries `gitaly-reference-transaction` is
//! voted on first, as Gitaly would, with the same hash on every echo node (prepared, then
//! committed), so the replicas the tests set up stay up to date through transactional writes.
#![allow(dead_code)]

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::{BufMut, Bytes, BytesMut};
use http_body::Frame;
use http_body_util::BodyExt;
use praefect::wire::backchannel::{
    incoming, yamux_config, CallbackChannels, Listener, PeerInfo, SessionRegistry,
};
use praefect::wire::proto::ref_transaction_client::RefTransactionClient;
use praefect::wire::proto::vote_transaction_request::Phase;
use praefect::wire::proto::VoteTransactionRequest;
use praefect::wire::transaction::TransactionMetadata;
use tokio::sync::oneshot;

/// One call that reached an echo node.
#[derive(Clone, Debug)]
pub struct Received {
    /// The storage of the node that received it.
    pub node: String,
    /// `/gitaly.Service/Method`.
    pub path: String,
    pub headers: http::HeaderMap,
    /// The first request message; None when the request held no complete uncompressed one.
    pub message: Option<Bytes>,
}

impl Received {
    /// The single value of a header, panicking when it is missing, repeated or not text.
    pub fn header(&self, name: &str) -> &str {
        let values: Vec<_> = self.headers.get_all(name).iter().collect();
        assert_eq!(values.len(), 1, "{}: header {name}: {values:?}", self.path);
        values[0].to_str().expect("header is text")
    }

    pub fn message(&self) -> &[u8] {
        self.message
            .as_deref()
            .unwrap_or_else(|| panic!("{}: no request message", self.path))
    }
}

/// The calls received by a set of echo nodes, in arrival order.
#[derive(Clone, Default)]
pub struct EchoLog(Arc<Mutex<Vec<Received>>>);

impl EchoLog {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Received>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, received: Received) {
        self.lock().push(received);
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The calls received after the first `start` ones.
    pub fn since(&self, start: usize) -> Vec<Received> {
        self.lock().get(start..).unwrap_or_default().to_vec()
    }

    pub fn all(&self) -> Vec<Received> {
        self.since(0)
    }
}

/// A running echo node; stopped when dropped.
pub struct EchoNode {
    pub storage: String,
    /// `tcp://127.0.0.1:PORT`.
    pub address: String,
    stop: Option<oneshot::Sender<()>>,
    _health: tonic_health::server::HealthReporter,
}

impl EchoNode {
    /// Starts a node for `storage` on a free loopback port, recording into `log`. It checks
    /// no token: the tests look at the `authorization` header the router sent instead.
    pub async fn start(storage: &str, log: EchoLog) -> EchoNode {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding a loopback port");
        let address = format!("tcp://{}", listener.local_addr().unwrap());
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        let node = storage.to_string();
        let sessions = SessionRegistry::default();
        let callbacks = CallbackChannels::new(sessions.clone());
        let fallback = tower::service_fn(move |request: http::Request<axum::body::Body>| {
            let node = node.clone();
            let log = log.clone();
            let callbacks = callbacks.clone();
            async move { Ok::<_, Infallible>(echo(&node, &log, &callbacks, request).await) }
        });
        let mut routes = tonic::service::Routes::new(health_service);
        let router = std::mem::take(routes.axum_router_mut()).fallback_service(fallback);
        *routes.axum_router_mut() = router;
        let stream = incoming(
            Listener::Tcp(listener),
            sessions,
            yamux_config(0, 256),
            None,
        );
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_routes(routes)
                .serve_with_incoming_shutdown(stream, async move {
                    let _ = stopped.await;
                }),
        );
        EchoNode {
            storage: storage.to_string(),
            address,
            stop: Some(stop),
            _health: health,
        }
    }
}

impl Drop for EchoNode {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The first complete, uncompressed gRPC message of `data`.
pub fn first_message(data: &[u8]) -> Option<Bytes> {
    let header = data.get(..5)?;
    if header[0] != 0 {
        return None;
    }
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    data.get(5..5 + len).map(Bytes::copy_from_slice)
}

/// Every complete gRPC message of `data`, in order.
pub fn messages(mut data: &[u8]) -> Vec<Bytes> {
    let mut out = Vec::new();
    while let Some(message) = first_message(data) {
        data = &data[5 + message.len()..];
        out.push(message);
    }
    out
}

/// `message` as one uncompressed gRPC frame.
pub fn frame(message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + message.len());
    out.put_u8(0);
    out.put_u32(message.len() as u32);
    out.extend_from_slice(message);
    out.freeze()
}

/// Votes on the call's reference transaction, if it has one: the same hash on every node.
async fn vote(
    callbacks: &CallbackChannels,
    parts: &http::request::Parts,
) -> Result<(), tonic::Status> {
    let Some(tx) = TransactionMetadata::from_headers(&parts.headers)
        .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?
    else {
        return Ok(());
    };
    let backchannel = parts
        .extensions
        .get::<PeerInfo>()
        .and_then(|peer| peer.backchannel_id)
        .ok_or_else(|| tonic::Status::failed_precondition("transaction without a backchannel"))?;
    let mut client = RefTransactionClient::new(callbacks.channel(backchannel));
    for phase in [Phase::PreparedPhase, Phase::CommittedPhase] {
        let answer = client
            .vote_transaction(VoteTransactionRequest {
                transaction_id: tx.id,
                node: tx.node.clone(),
                reference_updates_hash: vec![0x5a; 20],
                phase: phase.into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        if answer.state != 0 {
            return Err(tonic::Status::aborted("transaction was aborted"));
        }
    }
    Ok(())
}

async fn echo(
    node: &str,
    log: &EchoLog,
    callbacks: &CallbackChannels,
    request: http::Request<axum::body::Body>,
) -> http::Response<tonic::body::Body> {
    let (parts, body) = request.into_parts();
    if let Err(status) = vote(callbacks, &parts).await {
        return status.into_http();
    }
    // The whole request: the tests' clients send one message and end their stream.
    let data = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let message = first_message(&data);
    if let Some(response) = background_call(&parts).await {
        return response;
    }
    log.push(Received {
        node: node.to_string(),
        path: parts.uri.path().to_string(),
        headers: parts.headers,
        message: message.clone(),
    });
    let Some(message) = message else {
        return tonic::Status::internal("echo node: no complete request message").into_http();
    };
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let frames = futures::stream::iter([
        Ok::<_, tonic::Status>(Frame::data(frame(&message))),
        Ok(Frame::trailers(trailers)),
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

/// The router's own background work reaching a node (not a client's call, which always
/// carries the `virtual_storage` header): the verifier's RepositoryExists is answered "exists",
/// and the replicator's ReplicateRepository never answers, so that replication jobs stay
/// queued and the replicas the tests set up keep their generations. Neither is logged.
async fn background_call(
    parts: &http::request::Parts,
) -> Option<http::Response<tonic::body::Body>> {
    if parts.headers.contains_key("virtual_storage") {
        return None;
    }
    match parts.uri.path() {
        "/gitaly.RepositoryService/RepositoryExists" => {
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
            // RepositoryExistsResponse { exists: true }
            let frames = futures::stream::iter([
                Ok::<_, tonic::Status>(Frame::data(frame(&[0x08, 0x01]))),
                Ok(Frame::trailers(trailers)),
            ]);
            let mut response = http::Response::new(tonic::body::Body::new(
                http_body_util::StreamBody::new(frames),
            ));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
            Some(response)
        }
        "/gitaly.RepositoryService/ReplicateRepository" => {
            std::future::pending::<()>().await;
            None
        }
        _ => None,
    }
}
