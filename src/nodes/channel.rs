//! [`NodeChannel`]: the router's connection to one configured node, as a tower service that
//! both the proxy (raw HTTP/2 requests) and tonic's generated clients call.
//!
//! A node address stands for one or more socket addresses: `tcp://`, `tls://` and `unix:`
//! for exactly one, `dns:` and `dns+tls:` for whatever the name resolves to (with the system
//! resolver, or the DNS server a `dns://SERVER/` address names), re-resolved every
//! [`RERESOLVE_INTERVAL`] and after a failed connection attempt. Each address gets its own
//! [`Subchannel`]; calls go round-robin to the ones that are connected, and only when none is
//! does a call wait for connection attempts (to all of them at once, the first one up wins).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use hickory_resolver::TokioResolver;
use http::uri::{Authority, Scheme};
use tokio::sync::{Notify, OnceCell};
use tokio::time::Instant;

use super::address::{AddressError, Resolution};
use super::balancer::AddressSet;
use super::http2::{RequestBody, ResponseBody, SendError};
use super::resolve::{self, ResolveError};
use super::subchannel::{ConnectSettings, Lane, Sender, Subchannel};
use crate::metrics::grpc::{MethodMetrics, Side};
use crate::wire::auth::TokenCache;
use crate::wire::backchannel::DialTarget;

/// How often a `dns:` name is resolved again while its channel is in use.
pub const RERESOLVE_INTERVAL: Duration = Duration::from_secs(30);
/// Re-resolution after failures is not more frequent than this.
const MIN_RESOLVE_GAP: Duration = Duration::from_secs(1);

/// Why a call through a [`NodeChannel`] failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// No connection could be had: refused, timed out, unresolvable, or backing off after
    /// such a failure. The source is an Unavailable status, which tonic's clients report as is.
    #[error("{message}")]
    Unavailable {
        message: String,
        #[source]
        status: tonic::Status,
    },
    /// The call failed on an established connection; the status is what gRPC makes of the
    /// HTTP/2 error.
    #[error("calling node {address}: {}", status.message())]
    Call {
        address: String,
        #[source]
        status: tonic::Status,
    },
    #[error("request for node {address} is not valid: {reason}")]
    InvalidRequest { address: String, reason: String },
}

impl NodeError {
    fn unavailable(address: &str, reason: impl std::fmt::Display) -> NodeError {
        let message = format!("node {address} is unavailable: {reason}");
        NodeError::Unavailable {
            status: tonic::Status::unavailable(message.clone()),
            message,
        }
    }
}

/// A connection to a node: cheap to clone (clones share the connections), and a
/// `tower::Service` for `http::Request<tonic::body::Body>`, so `oneshot` and tonic's
/// generated clients both work with it. Every request gets the node's `authorization` token
/// and an `http://` URI with the node's authority.
#[derive(Clone)]
pub struct NodeChannel {
    shared: Arc<ChannelShared>,
    /// The lane every call takes; `None`: the one its headers need ([`Lane::for_headers`]).
    lane: Option<Lane>,
}

struct ChannelShared {
    /// The address as configured, for messages.
    address: String,
    authority: Authority,
    token: Option<TokenCache>,
    settings: Arc<ConnectSettings>,
    set: RwLock<AddressSet<DialTarget, Arc<Subchannel>>>,
    dns: Option<DnsState>,
}

struct DnsState {
    host: String,
    port: u16,
    tls: bool,
    /// The DNS server of a `dns://SERVER/` address; `None` for the system resolver.
    server: Option<std::net::SocketAddr>,
    resolver: OnceCell<Result<TokioResolver, ResolveError>>,
    /// Serializes resolutions; holds when the last one failed, and why.
    last: tokio::sync::Mutex<Option<(Instant, ResolveError)>>,
    /// Wakes the periodic re-resolver early (a connection attempt failed).
    wake: Arc<Notify>,
    refresher_started: AtomicBool,
}

impl NodeChannel {
    /// A channel that connects on first use: nothing is dialed or resolved now, so a node that
    /// is down does not keep the router from starting.
    pub(crate) fn new(
        address: &str,
        resolution: Resolution,
        token: &str,
        settings: ConnectSettings,
    ) -> Result<NodeChannel, AddressError> {
        let unsupported = || AddressError::Unsupported(address.to_string());
        let settings = Arc::new(settings);
        let mut set = AddressSet::new();
        let (authority, dns) = match resolution {
            Resolution::Fixed(target) => {
                let authority = match target.split_once("://") {
                    Some((_, host_port)) => host_port.to_string(),
                    // unix:/path has no host; the node does not look at it anyway.
                    None => "localhost".to_string(),
                };
                let sub = Arc::new(Subchannel::new(
                    DialTarget::Address(target.clone()),
                    settings.clone(),
                ));
                set.update([DialTarget::Address(target)], |_| sub.clone());
                (authority, None)
            }
            Resolution::Dns {
                host,
                port,
                tls,
                server,
            } => {
                let authority = if host.contains(':') {
                    format!("[{host}]:{port}")
                } else {
                    format!("{host}:{port}")
                };
                let dns = DnsState {
                    host,
                    port,
                    tls,
                    server,
                    resolver: OnceCell::new(),
                    last: tokio::sync::Mutex::new(None),
                    wake: Arc::new(Notify::new()),
                    refresher_started: AtomicBool::new(false),
                };
                (authority, Some(dns))
            }
        };
        let authority = Authority::try_from(authority).map_err(|_| unsupported())?;
        Ok(NodeChannel {
            lane: None,
            shared: Arc::new(ChannelShared {
                address: address.to_string(),
                authority,
                token: TokenCache::new(token),
                settings,
                set: RwLock::new(set),
                dns,
            }),
        })
    }

    /// The same connections, with every call over the backchannel lane. The health checker
    /// uses it: its calls carry no transaction, so on their own they would take the plain
    /// lane and never show that a node's backchannel connections, which writes need, fail.
    pub fn over_backchannel(&self) -> NodeChannel {
        NodeChannel {
            shared: self.shared.clone(),
            lane: Some(Lane::Backchannel),
        }
    }

    /// The address as configured.
    pub fn address(&self) -> &str {
        &self.shared.address
    }

    /// Connects now (resolving first if needed), within `timeout`: a connection with a
    /// backchannel session, which is what writes need (and what proves the node speaks it).
    pub async fn connect(&self, timeout: Duration) -> Result<(), NodeError> {
        match tokio::time::timeout(timeout, self.shared.wait_ready(Lane::Backchannel)).await {
            Ok(result) => result.map(drop),
            Err(_) => Err(NodeError::unavailable(
                &self.shared.address,
                format!("no connection within {timeout:?}"),
            )),
        }
    }

    /// The socket addresses (or the configured address) the channel has connections for,
    /// and whether each is connected now (in either lane).
    pub fn endpoints(&self) -> Vec<(String, bool)> {
        let set = self.shared.read_set();
        set.values()
            .map(|sub| {
                let ready = sub.is_ready(Lane::Backchannel) || sub.is_ready(Lane::Plain);
                (sub.target().to_string(), ready)
            })
            .collect()
    }

    /// Resolves a `dns:` name again now (no-op for other addresses).
    pub async fn resolve_now(&self) -> Result<(), NodeError> {
        if self.shared.dns.is_none() {
            return Ok(());
        }
        self.shared
            .resolve(true)
            .await
            .map_err(|e| NodeError::unavailable(&self.shared.address, e))
    }
}

impl ChannelShared {
    fn read_set(&self) -> std::sync::RwLockReadGuard<'_, AddressSet<DialTarget, Arc<Subchannel>>> {
        self.set.read().unwrap_or_else(|p| p.into_inner())
    }

    /// A connected sender, in turn, without waiting. Unconnected addresses passed over on the
    /// way get a connection attempt in the background (within their back-off), so an address
    /// that comes back is used again even while others carry the calls.
    fn pick_ready(&self, lane: Lane) -> Option<Sender> {
        self.read_set().pick(|sub| {
            let sender = sub.ready(lane);
            if sender.is_none() {
                sub.kick(lane);
            }
            sender
        })
    }

    /// A connected sender in `lane`, connecting (and resolving) as needed.
    async fn wait_ready(self: &Arc<Self>, lane: Lane) -> Result<Sender, NodeError> {
        if self.dns.is_some() {
            self.start_refresher();
            if self.read_set().is_empty() {
                self.resolve(false)
                    .await
                    .map_err(|e| NodeError::unavailable(&self.address, e))?;
            }
        }
        if let Some(sender) = self.pick_ready(lane) {
            return Ok(sender);
        }
        let subs: Vec<Arc<Subchannel>> = self.read_set().values().cloned().collect();
        // Every address not backing off gets an attempt (or joins the one under way); the
        // first connection up serves the call, the other attempts go on in their tasks.
        let mut attempts = FuturesUnordered::new();
        let mut failures: Vec<String> = Vec::new();
        for sub in &subs {
            match sub.connect(lane) {
                Ok(attempt) => attempts.push(attempt),
                Err(backing_off) => failures.push(backing_off.0),
            }
        }
        if subs.is_empty() {
            failures.push("no addresses".to_string());
        }
        while let Some(result) = attempts.next().await {
            match result {
                Ok(sender) => return Ok(sender),
                Err(failure) => failures.push(failure.0),
            }
        }
        if let Some(dns) = &self.dns {
            dns.wake.notify_one();
        }
        Err(NodeError::unavailable(&self.address, failures.join("; ")))
    }

    /// Resolves the name and brings the address set up to date. Concurrent callers share one
    /// lookup; unless `force`, a lookup that failed less than [`MIN_RESOLVE_GAP`] ago is not
    /// repeated (its error is returned). A failed lookup keeps the addresses known so far.
    async fn resolve(&self, force: bool) -> Result<(), ResolveError> {
        let Some(dns) = &self.dns else {
            return Ok(());
        };
        let had_addresses = !self.read_set().is_empty();
        let mut last = dns.last.lock().await;
        if !force {
            if !had_addresses && !self.read_set().is_empty() {
                // Someone else resolved while we waited for the lock.
                return Ok(());
            }
            if let Some((at, err)) = last.as_ref() {
                if at.elapsed() < MIN_RESOLVE_GAP {
                    return Err(err.clone());
                }
            }
        }
        let resolver = dns
            .resolver
            .get_or_init(|| async {
                match dns.server {
                    Some(server) => resolve::server_resolver(server),
                    None => resolve::system_resolver(),
                }
            })
            .await
            .as_ref()
            .map_err(Clone::clone)?;
        match resolve::lookup(resolver, dns.server, &dns.host, dns.port).await {
            Ok(addrs) => {
                *last = None;
                self.apply(dns, addrs);
                Ok(())
            }
            Err(err) => {
                tracing::warn!(node = %self.address, error = %err, "resolving node address failed");
                *last = Some((Instant::now(), err.clone()));
                Err(err)
            }
        }
    }

    /// Makes the address set the resolved `addrs`: known addresses keep their connection,
    /// new ones get a subchannel (connected on use), vanished ones are dropped.
    fn apply(&self, dns: &DnsState, addrs: Vec<std::net::SocketAddr>) {
        let targets = addrs.into_iter().map(|addr| DialTarget::Resolved {
            addr,
            tls_server_name: dns.tls.then(|| dns.host.clone()),
        });
        let settings = &self.settings;
        let changes = self
            .set
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .update(targets, |target| {
                Arc::new(Subchannel::new(target.clone(), settings.clone()))
            });
        if !changes.added.is_empty() || !changes.removed.is_empty() {
            let text = |targets: &[DialTarget]| {
                targets
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            tracing::info!(
                node = %self.address,
                added = %text(&changes.added),
                removed = %text(&changes.removed),
                "node addresses changed"
            );
        }
    }

    /// Starts the task that re-resolves the name periodically and when woken; it holds the
    /// channel only while resolving and ends once every clone of the channel is gone.
    fn start_refresher(self: &Arc<Self>) {
        let Some(dns) = &self.dns else {
            return;
        };
        if dns.refresher_started.load(Ordering::Relaxed)
            || dns.refresher_started.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let weak = Arc::downgrade(self);
        let wake = dns.wake.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(RERESOLVE_INTERVAL) => {}
                    _ = wake.notified() => {}
                }
                let Some(shared) = weak.upgrade() else {
                    return;
                };
                let _ = shared.resolve(true).await;
                drop(shared);
                tokio::time::sleep(MIN_RESOLVE_GAP).await;
            }
        });
    }

    /// Sets the URI's scheme and authority (HTTP/2 needs both; callers give a path) and the
    /// node's token.
    fn prepare(&self, request: &mut http::Request<RequestBody>) -> Result<(), NodeError> {
        let mut parts = std::mem::take(request.uri_mut()).into_parts();
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = Some(self.authority.clone());
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        *request.uri_mut() =
            http::Uri::from_parts(parts).map_err(|e| NodeError::InvalidRequest {
                address: self.address.clone(),
                reason: e.to_string(),
            })?;
        if let Some(token) = &self.token {
            if let Some(value) = token.header() {
                request
                    .headers_mut()
                    .insert(http::header::AUTHORIZATION, value);
            }
        }
        Ok(())
    }

    fn call_error(&self, err: SendError) -> NodeError {
        let error = err.error();
        // The stream was never opened, or the connection went away under it (closed, reset,
        // refused, keepalive failed): the node is unavailable, as gRPC calls it. Anything
        // else is the call's own failure, with the code gRPC gives that HTTP/2 error.
        let connection_gone = error.is_io()
            || error.is_go_away()
            || error.reason() == Some(h2::Reason::REFUSED_STREAM);
        if matches!(err, SendError::NotSent { .. }) || connection_gone {
            return NodeError::unavailable(&self.address, error);
        }
        let SendError::Failed(error) = err else {
            return NodeError::unavailable(&self.address, "stream not opened");
        };
        NodeError::Call {
            address: self.address.clone(),
            status: tonic::Status::from_error(Box::new(error)),
        }
    }

    async fn call(
        self: Arc<Self>,
        request: http::Request<RequestBody>,
        lane: Option<Lane>,
    ) -> Result<http::Response<ResponseBody>, NodeError> {
        self.send_or_return(request, lane)
            .await
            .map_err(|unsent| unsent.error)
    }

    /// Sends `request`; if it was never sent (no connection could be had, or none would
    /// open a stream), the failure gives it back, so a caller can send it elsewhere.
    async fn send_or_return(
        self: Arc<Self>,
        mut request: http::Request<RequestBody>,
        lane: Option<Lane>,
    ) -> Result<http::Response<ResponseBody>, Unsent> {
        if let Err(error) = self.prepare(&mut request) {
            return Err(Unsent::returned(error, request));
        }
        let call = MethodMetrics::for_path(Side::Client, request.uri().path()).start();
        let lane = lane.unwrap_or_else(|| Lane::for_headers(request.headers()));
        let result = self
            .send_prepared(request, &call.metrics().msg_sent, lane)
            .await;
        match result {
            Ok(mut response) => {
                match crate::wire::header_names::grpc_code(response.headers()) {
                    // Trailers-only: the call is over.
                    Some(code) => {
                        call.done(code);
                    }
                    None => response.body_mut().count(call),
                }
                Ok(response)
            }
            Err(unsent) => {
                let _ = call.done(tonic::Code::Unavailable);
                Err(unsent)
            }
        }
    }

    /// [`ChannelShared::send_or_return`] of a prepared request. A connection that would not
    /// open a stream (closing, failed) leaves the request intact, so it goes to another
    /// connection, once.
    async fn send_prepared(
        self: &Arc<Self>,
        mut request: http::Request<RequestBody>,
        sent: &prometheus::IntCounter,
        lane: Lane,
    ) -> Result<http::Response<ResponseBody>, Unsent> {
        let mut conn = self.pick_ready(lane);
        let mut retried = false;
        loop {
            // The wait for a connection is boxed: it is rare, and its future would otherwise
            // make every call's future larger (see `StorageCache::get`).
            let ready = match conn.take() {
                Some(ready) => ready,
                None => match Box::pin(self.wait_ready(lane)).await {
                    Ok(ready) => ready,
                    Err(error) => return Err(Unsent::returned(error, request)),
                },
            };
            match ready.send_counted(request, Some(sent)).await {
                Ok(response) => return Ok(response),
                Err(SendError::NotSent {
                    request: Some(returned),
                    error,
                }) if !retried => {
                    tracing::debug!(node = %self.address, error = %error, "connection refused a new stream; retrying");
                    ready.retire();
                    retried = true;
                    request = *returned;
                }
                Err(SendError::NotSent {
                    request: Some(returned),
                    error,
                }) => {
                    let error = self.call_error(SendError::NotSent {
                        request: None,
                        error,
                    });
                    return Err(Unsent::returned(error, *returned));
                }
                Err(err) => return Err(Unsent::sent(self.call_error(err))),
            }
        }
    }
}

/// A call that failed; `request` is set when it never reached the node.
pub struct Unsent {
    pub error: NodeError,
    pub request: Option<Box<http::Request<RequestBody>>>,
}

impl Unsent {
    /// A call that never reached the node: the request comes back with the error.
    fn returned(error: NodeError, request: http::Request<RequestBody>) -> Unsent {
        Unsent {
            error,
            request: Some(Box::new(request)),
        }
    }

    /// A call that reached the node, or may have.
    fn sent(error: NodeError) -> Unsent {
        Unsent {
            error,
            request: None,
        }
    }
}

impl NodeChannel {
    /// Sends `request` to the node; a request that never left is given back with the error
    /// (the proxy sends a read elsewhere then, see `proxy::pipeline`).
    pub async fn send_or_return(
        &self,
        request: http::Request<RequestBody>,
    ) -> Result<http::Response<ResponseBody>, Unsent> {
        self.shared.clone().send_or_return(request, self.lane).await
    }
}

impl tower::Service<http::Request<RequestBody>> for NodeChannel {
    type Response = http::Response<ResponseBody>;
    type Error = NodeError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, NodeError>> + Send>>;

    /// Always ready: a call that finds no connection waits for one (or fails) in its future.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), NodeError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<RequestBody>) -> Self::Future {
        Box::pin(self.shared.clone().call(request, self.lane))
    }
}

impl std::fmt::Debug for NodeChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeChannel")
            .field("address", &self.shared.address)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::backchannel::{yamux_config, ClientHandler};

    fn dns_channel(tls: bool) -> NodeChannel {
        let settings = ConnectSettings::new(
            yamux_config(0, 256),
            ClientHandler::default(),
            Duration::from_secs(1),
        );
        let resolution = Resolution::Dns {
            host: "gitaly.example".into(),
            port: 8075,
            tls,
            server: None,
        };
        NodeChannel::new("dns:gitaly.example:8075", resolution, "secret", settings).unwrap()
    }

    fn addrs(list: &[&str]) -> Vec<std::net::SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    fn subchannels(channel: &NodeChannel) -> Vec<Arc<Subchannel>> {
        channel.shared.read_set().values().cloned().collect()
    }

    #[test]
    fn resolved_addresses_replace_the_set_and_keep_known_connections() {
        let channel = dns_channel(false);
        let shared = &channel.shared;
        let dns = shared.dns.as_ref().unwrap();
        shared.apply(dns, addrs(&["10.0.0.1:8075", "10.0.0.2:8075"]));
        let before = subchannels(&channel);
        assert_eq!(
            channel.endpoints(),
            [
                ("10.0.0.1:8075".to_string(), false),
                ("10.0.0.2:8075".to_string(), false)
            ]
        );
        shared.apply(dns, addrs(&["10.0.0.2:8075", "[fd00::3]:8075"]));
        let after = subchannels(&channel);
        let names: Vec<String> = channel.endpoints().into_iter().map(|(a, _)| a).collect();
        assert_eq!(names, ["10.0.0.2:8075", "[fd00::3]:8075"]);
        assert!(
            Arc::ptr_eq(&before[1], &after[0]),
            "10.0.0.2 kept its subchannel"
        );
    }

    #[test]
    fn tls_names_go_with_every_resolved_address() {
        let channel = dns_channel(true);
        let shared = &channel.shared;
        shared.apply(shared.dns.as_ref().unwrap(), addrs(&["10.0.0.1:8075"]));
        let target = subchannels(&channel)[0].target().clone();
        assert_eq!(
            target,
            DialTarget::Resolved {
                addr: "10.0.0.1:8075".parse().unwrap(),
                tls_server_name: Some("gitaly.example".into()),
            }
        );
    }

    #[test]
    fn requests_get_the_node_authority_and_a_token() {
        let channel = dns_channel(false);
        let mut request = http::Request::builder()
            .uri("/gitaly.RefService/RefExists")
            .body(tonic::body::Body::empty())
            .unwrap();
        channel.shared.prepare(&mut request).unwrap();
        assert_eq!(
            request.uri().to_string(),
            "http://gitaly.example:8075/gitaly.RefService/RefExists"
        );
        let token = request.headers()[http::header::AUTHORIZATION]
            .to_str()
            .unwrap();
        let config = crate::wire::auth::AuthConfig::new("secret", false);
        assert!(config
            .authorize("/gitaly.RefService/RefExists", Some(token))
            .is_ok());
    }
}
