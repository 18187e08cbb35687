//! The pass-through: every RPC the router does not answer itself arrives here as a raw
//! HTTP/2 request. Only the first request message is read, to find the repository (or
//! storage) by the registry's field path and to rewrite it for the chosen node; then that
//! message, and every other byte of the call in both directions, is forwarded as it is,
//! with the node's backpressure reaching the client.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use http_body::Frame;
use http_body_util::{BodyStream, StreamBody};
use rand::seq::SliceRandom;
use tower::ServiceExt;

use super::error::ProxyError;
use super::{finalize, frame, intercept, praefect_info, removal, server_service, walk};
use crate::metrics;
use crate::wire::proto::{RepositoryExistsRequest, RepositoryExistsResponse};

const REPOSITORY_EXISTS: &str = "/gitaly.RepositoryService/RepositoryExists";
use super::registry::{MethodInfo, OpType, Registry, Scope};
use super::rewrite;
use crate::config::Config;
use crate::datastore::{ConsistentStorages, StorageCache};
use crate::health::HealthManager;
use crate::nodes::NodePool;
use crate::wire::backchannel::{PeerInfo, SessionRegistry};
use crate::wire::sidechannel as wire_sidechannel;

/// The client's sidechannel id, if the call uses one (the last value wins, as on nodes).
fn sidechannel_id(headers: &http::HeaderMap) -> Result<Option<u64>, ProxyError> {
    let Some(value) = headers
        .get_all(wire_sidechannel::METADATA_KEY)
        .iter()
        .next_back()
    else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<i64>().ok())
        .map(|id| Some(id as u64))
        .ok_or_else(|| ProxyError::Malformed("invalid gitaly-sidechannel-id".into()))
}

/// Metadata naming the virtual storage of a repository-scoped call, for the node's logs.
const VIRTUAL_STORAGE_NAME: http::HeaderName = http::HeaderName::from_static("virtual_storage");
/// GitLab's correlation id, kept from the client or generated.
pub const CORRELATION_HEADER: &str = "x-gitlab-correlation-id";
const CORRELATION_NAME: http::HeaderName = http::HeaderName::from_static(CORRELATION_HEADER);

/// A new correlation id: a random (v4) UUID without hyphens. The bytes come from the thread's
/// CSPRNG (seeded from the OS, reseeded periodically) rather than a `getrandom` system call
/// per call, as `Uuid::new_v4` makes.
fn new_correlation_id() -> http::HeaderValue {
    let uuid = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
    let mut text = [0u8; uuid::fmt::Simple::LENGTH];
    let text = uuid.simple().encode_lower(&mut text);
    http::HeaderValue::from_str(text).expect("hex digits are a valid header value")
}

/// The URI a forwarded call is sent with: the client's path, without its scheme and
/// authority (the node's channel sets its own). A clone of the parsed path, not a new parse.
fn outgoing_uri(uri: &http::Uri, path: &str) -> http::Uri {
    let mut parts = http::uri::Parts::default();
    parts.path_and_query = match uri.path_and_query() {
        Some(pq) if pq.query().is_none() => Some(pq.clone()),
        _ => http::uri::PathAndQuery::try_from(path).ok(),
    };
    http::Uri::from_parts(parts).unwrap_or_else(|_| http::Uri::from_static("/"))
}

/// Counts a routed call by its operation type (each type's counter looked up once, on its
/// first call, so that a type appears in the metrics only once counted, as before).
fn count_method_type(op_type: OpType) {
    static COUNTERS: [std::sync::OnceLock<prometheus::IntCounter>; 4] =
        [const { std::sync::OnceLock::new() }; 4];
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

/// Reads whose answer must come from the primary (sizes differ between replicas).
const FORCED_PRIMARY_METHODS: &[&str] = &[
    "/gitaly.RepositoryService/RepositorySize",
    "/gitaly.RepositoryService/GetObjectDirectorySize",
];
/// Metadata with which a client asks for a read from the primary.
const ACCESSOR_POLICY_NAME: http::HeaderName =
    http::HeaderName::from_static("gitaly-route-repository-accessor-policy");

/// An additional repository must be on the target's virtual storage and name a path.
pub(super) fn check_additional(
    target: &rewrite::RepositoryRef,
    other: &rewrite::RepositoryRef,
) -> Result<(), ProxyError> {
    if other.storage_name != target.storage_name {
        return Err(ProxyError::InvalidArgument(
            "resolve additional replica path: repository and additional repository are on different virtual storages".into(),
        ));
    }
    if other.relative_path.is_empty() {
        return Err(ProxyError::RelativePathNotSet);
    }
    Ok(())
}

/// Whether a read must go to the repository's primary.
fn forced_primary(method: &MethodInfo, headers: &http::HeaderMap) -> bool {
    FORCED_PRIMARY_METHODS.contains(&method.full_name.as_str())
        || headers
            .get(&ACCESSOR_POLICY_NAME)
            .is_some_and(|v| v.as_bytes() == b"primary-only")
}

/// Everything routing needs, shared by all calls.
pub struct Proxy {
    pub registry: &'static Registry,
    pub config: Arc<Config>,
    pub nodes: Arc<NodePool>,
    pub health: HealthManager,
    pub cache: Arc<StorageCache>,
    /// Backchannel sessions of the router's clients, to open sidechannels to them.
    pub sessions: SessionRegistry,
}

/// Where a call goes and what its first message becomes.
pub(super) struct Route {
    pub virtual_storage: String,
    pub storage: String,
    pub message: Vec<u8>,
    pub repository_scoped: bool,
}

impl Proxy {
    /// Serves one call; failures become gRPC statuses.
    pub async fn handle(
        &self,
        request: http::Request<tonic::body::Body>,
    ) -> http::Response<tonic::body::Body> {
        // A clone of the request's URI shares its bytes: no copy of the path per call.
        let uri = request.uri().clone();
        match self.forward(request).await {
            Ok(response) => response,
            Err(err) => {
                tracing::info!(grpc.method = %uri.path(), error = %err, "call not routed");
                err.to_status().into_http()
            }
        }
    }

    async fn forward(
        &self,
        request: http::Request<tonic::body::Body>,
    ) -> Result<http::Response<tonic::body::Body>, ProxyError> {
        let uri = request.uri().clone();
        let path = uri.path();
        let method = self
            .registry
            .lookup(path)
            .ok_or_else(|| ProxyError::UnknownMethod(path.to_string()))?;
        if method.intercepted {
            let request = request.map(axum::body::Body::new);
            return match path {
                server_service::SERVER_INFO => self.server_info().await,
                server_service::DISK_STATISTICS => self.disk_statistics().await,
                server_service::READINESS_CHECK => self.readiness_check().await,
                praefect_info::MARK_UNVERIFIED => self.mark_unverified(request).await,
                praefect_info::SET_REPLICATION_FACTOR => self.set_replication_factor(request).await,
                _ => Err(ProxyError::Unsupported(format!(
                    "{path} is answered by praefect itself and not implemented yet"
                ))),
            };
        }
        let (parts, body) = request.into_parts();
        let mut body = BodyStream::new(body);
        let first = frame::read_first(&mut body).await.map_err(|e| match e {
            frame::FrameError::Body(text) => ProxyError::ClientStream(text),
            other => ProxyError::Malformed(other.to_string()),
        })?;
        let mut headers = parts.headers;
        let has_correlation_id = headers
            .get(&CORRELATION_NAME)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|id| !id.is_empty());
        if !has_correlation_id {
            headers.insert(CORRELATION_NAME, new_correlation_id());
        }
        match path {
            REPOSITORY_EXISTS => return self.repository_exists(&first.message).await,
            removal::REMOVE_REPOSITORY => return self.remove_repository(&first.message).await,
            removal::DELETE_OBJECT_POOL => return self.delete_object_pool(&first.message).await,
            walk::WALK_REPOS => return self.walk_repos(&first.message).await,
            _ => {}
        }
        count_method_type(method.op_type);
        if method.scope == Scope::Repository && method.op_type == OpType::Maintenance {
            let routes = self.route_maintenance(method, &first.message).await?;
            return self.fan_out(path, &headers, routes).await;
        }
        let (route, after) =
            if method.scope == Scope::Repository && method.op_type == OpType::Mutator {
                let correlation_id = headers
                    .get(&CORRELATION_NAME)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                let write = self
                    .route_write(method, &first.message, &correlation_id, &mut headers)
                    .await?;
                let route = Route {
                    virtual_storage: write.virtual_storage,
                    storage: write.storage,
                    message: write.message,
                    repository_scoped: true,
                };
                (route, Some(write.after))
            } else {
                (self.route(method, &first.message, &headers).await?, None)
            };

        if let Some(client_id) = sidechannel_id(&headers)? {
            let peer = parts
                .extensions
                .get::<PeerInfo>()
                .cloned()
                .unwrap_or_default();
            if peer.backchannel_id.is_none() {
                return Err(ProxyError::Malformed(
                    "sidechannel requested without a backchannel connection".into(),
                ));
            }
            let waiter = self.nodes.sidechannels.register();
            let value = http::HeaderValue::from_str(&waiter.id().to_string())
                .map_err(|e| ProxyError::Malformed(e.to_string()))?;
            headers.append(wire_sidechannel::METADATA_KEY, value);
            super::sidechannel::spawn_bridge(waiter, self.sessions.clone(), peer, client_id);
        }

        let first_frame = frame::encode(&route.message);
        let outgoing_body = if method.client_streaming {
            let head =
                futures::stream::iter([Ok(Frame::data(first_frame)), Ok(Frame::data(first.rest))]);
            let rest = body.map(|frame| frame.map_err(|e| tonic::Status::cancelled(e.to_string())));
            tonic::body::Body::new(StreamBody::new(head.chain(rest)))
        } else {
            // One request message is all a unary or server-streaming call has: end the request
            // with it, rather than waiting for the client's end of stream. (A request still
            // open when the answer is complete gets reset, and a node counts resets.)
            tonic::body::Body::new(http_body_util::Full::new(first_frame))
        };
        let response = self
            .send_to(outgoing_uri(&uri, path), headers, &route, outgoing_body)
            .await?;
        let (parts, body) = response.into_parts();
        let Some(after) = after else {
            return Ok(http::Response::from_parts(parts, body));
        };
        let store = self.cache.store().clone();
        if parts.headers.contains_key("grpc-status") {
            // A trailers-only answer: the outcome is known now.
            if finalize::is_ok(&parts.headers) {
                after.record(&store).await?;
            }
            return Ok(http::Response::from_parts(parts, body));
        }
        let body = finalize::Finalizing::new(body, move |ok| async move {
            if !ok {
                // The primary failed: nothing is recorded (gitaly#3605).
                return Ok(());
            }
            after.record(&store).await.map_err(|err| {
                tracing::error!(error = %err, "recording a successful write failed");
                ProxyError::Database(err).to_status()
            })
        });
        Ok(http::Response::from_parts(
            parts,
            tonic::body::Body::new(body),
        ))
    }

    /// Sends one call to the node of `route`: the client's metadata minus its token (the
    /// node's channel signs with the node's), plus the virtual storage of repository calls.
    pub(super) async fn send(
        &self,
        path: &str,
        headers: http::HeaderMap,
        route: &Route,
        body: tonic::body::Body,
    ) -> Result<http::Response<tonic::body::Body>, ProxyError> {
        let uri = http::Uri::try_from(path).map_err(|e| ProxyError::Malformed(e.to_string()))?;
        self.send_to(uri, headers, route, body).await
    }

    /// [`Proxy::send`] with the request's URI already made.
    async fn send_to(
        &self,
        uri: http::Uri,
        mut headers: http::HeaderMap,
        route: &Route,
        body: tonic::body::Body,
    ) -> Result<http::Response<tonic::body::Body>, ProxyError> {
        let channel = self
            .nodes
            .channel(&route.virtual_storage, &route.storage)
            .cloned()
            .ok_or(ProxyError::NoSuitableNode)?;
        headers.remove(http::header::AUTHORIZATION);
        headers.remove(http::header::HOST);
        headers.remove(http::header::CONTENT_LENGTH);
        if route.repository_scoped {
            if let Ok(value) = http::HeaderValue::from_str(&route.virtual_storage) {
                headers.insert(VIRTUAL_STORAGE_NAME, value);
            }
        }
        let mut outgoing = http::Request::new(body);
        *outgoing.method_mut() = http::Method::POST;
        *outgoing.version_mut() = http::Version::HTTP_2;
        *outgoing.uri_mut() = uri;
        *outgoing.headers_mut() = headers;
        tracing::debug!(grpc.method = %outgoing.uri().path(), storage = %route.storage, "forwarding");
        let response = channel.oneshot(outgoing).await.map_err(|err| {
            ProxyError::NodeUnavailable(format!(
                "forwarding to {}: {}",
                route.storage,
                crate::wire::backchannel::error_chain(&err)
            ))
        })?;
        let (parts, body) = response.into_parts();
        Ok(http::Response::from_parts(
            parts,
            tonic::body::Body::new(body),
        ))
    }

    /// RepositoryExists is answered from the database.
    async fn repository_exists(
        &self,
        message: &Bytes,
    ) -> Result<http::Response<tonic::body::Body>, ProxyError> {
        let request: RepositoryExistsRequest = intercept::decode(message)?;
        let repo = request.repository.ok_or(ProxyError::RepositoryNotSet)?;
        self.check_repository(&repo.storage_name, &repo.relative_path)?;
        let exists = match self
            .cache
            .store()
            .repository_exists(&repo.storage_name, &repo.relative_path)
            .await
        {
            Ok(exists) => exists,
            // While the database is away, a repository the read cache holds exists (within
            // the cache's stale-read window); anything else cannot be answered.
            Err(err) if err.is_unavailable() => {
                match self
                    .cache
                    .get(&repo.storage_name, &repo.relative_path)
                    .await
                {
                    Ok(Some(_)) => true,
                    _ => return Err(err.into()),
                }
            }
            Err(err) => return Err(err.into()),
        };
        Ok(intercept::unary_ok(&RepositoryExistsResponse { exists }))
    }

    async fn route(
        &self,
        method: &MethodInfo,
        message: &Bytes,
        headers: &http::HeaderMap,
    ) -> Result<Route, ProxyError> {
        match method.scope {
            Scope::Repository if method.op_type == OpType::Accessor => {
                self.route_accessor(method, message, headers).await
            }
            Scope::Repository => Err(ProxyError::Unsupported(format!(
                "routing {:?} RPCs is not implemented yet",
                method.op_type
            ))),
            Scope::Storage if method.op_type == OpType::Accessor => {
                self.route_storage_accessor(method, message)
            }
            Scope::Storage => Err(ProxyError::NotRoutable(
                "storage-scoped mutators are not supported".into(),
            )),
            Scope::Partition => Err(ProxyError::NotRoutable(
                "rpc with undefined scope \"partition\"".into(),
            )),
            Scope::None => Err(ProxyError::NotRoutable("rpc without scope".into())),
        }
    }

    /// A repository must name a configured virtual storage and a relative path.
    pub(super) fn check_repository(
        &self,
        virtual_storage: &str,
        relative_path: &str,
    ) -> Result<(), ProxyError> {
        self.check_virtual_storage(virtual_storage)?;
        if relative_path.is_empty() {
            return Err(ProxyError::RelativePathNotSet);
        }
        Ok(())
    }

    pub(super) fn check_virtual_storage(&self, name: &str) -> Result<(), ProxyError> {
        if name.is_empty() {
            return Err(ProxyError::StorageNameNotSet);
        }
        self.config
            .virtual_storage(name)
            .map(|_| ())
            .ok_or(ProxyError::StorageNotFound)
    }

    /// The locally healthy storages of a virtual storage.
    pub(super) fn healthy(&self, virtual_storage: &str) -> Result<Vec<String>, ProxyError> {
        let healthy: Vec<String> = self
            .health
            .healthy()
            .get(virtual_storage)
            .map(|set| set.iter().cloned().collect())
            .unwrap_or_default();
        if healthy.is_empty() {
            return Err(ProxyError::NoHealthyNodes);
        }
        Ok(healthy)
    }

    /// Reads go to a random healthy replica that holds the latest generation.
    async fn route_accessor(
        &self,
        method: &MethodInfo,
        message: &[u8],
        headers: &http::HeaderMap,
    ) -> Result<Route, ProxyError> {
        let target = method
            .target_repository
            .as_deref()
            .ok_or(ProxyError::RepositoryNotSet)?;
        let repo = rewrite::read_repository(message, target)?;
        self.check_repository(&repo.storage_name, &repo.relative_path)?;
        let healthy = self.healthy(&repo.storage_name)?;
        let (storage, replica_path) = if forced_primary(method, headers) {
            let (entry, primary) = self
                .healthy_primary(
                    &repo.storage_name,
                    &repo.relative_path,
                    &healthy,
                    ProxyError::RepositoryNotFound,
                )
                .await?;
            (primary, entry.replica_path)
        } else {
            let entry = self
                .cache
                .get(&repo.storage_name, &repo.relative_path)
                .await?
                .ok_or(ProxyError::RepositoryNotFound)?;
            let candidates: Vec<&String> = entry
                .storages
                .iter()
                .filter(|s| healthy.contains(s))
                .collect();
            let storage = candidates
                .choose(&mut rand::thread_rng())
                .map(|s| s.to_string())
                .ok_or(ProxyError::NoSuitableNode)?;
            (storage, entry.replica_path.clone())
        };
        metrics::READ_DISTRIBUTION
            .with_label_values(&[repo.storage_name.as_str(), storage.as_str()])
            .inc();
        let mut rewritten = rewrite::rewrite_repository(message, target, &storage, &replica_path)?;
        if let Some(additional) = method.additional_repository.as_deref() {
            if let Some(other) = rewrite::read_optional_repository(&rewritten, additional)? {
                check_additional(&repo, &other)?;
                let other_entry = self
                    .cache
                    .get(&repo.storage_name, &other.relative_path)
                    .await?
                    .ok_or(ProxyError::AdditionalRepositoryNotFound)?;
                rewritten = rewrite::rewrite_repository(
                    &rewritten,
                    additional,
                    &storage,
                    &other_entry.replica_path,
                )?;
            }
        }
        Ok(Route {
            virtual_storage: repo.storage_name,
            storage,
            message: rewritten,
            repository_scoped: true,
        })
    }

    /// A repository's up-to-date storages and its primary, which must be locally healthy:
    /// elected if needed (the database is asked every time, never the read cache). `missing`
    /// is the error for an untracked repository.
    pub(super) async fn healthy_primary(
        &self,
        virtual_storage: &str,
        relative_path: &str,
        healthy: &[String],
        missing: ProxyError,
    ) -> Result<(ConsistentStorages, String), ProxyError> {
        let store = self.cache.store();
        let entry = store
            .consistent_storages(virtual_storage, relative_path)
            .await?
            .ok_or(missing)?;
        let primary = store
            .get_primary(entry.repository_id)
            .await?
            .storage
            .ok_or(ProxyError::NoPrimary)?;
        if !healthy.contains(&primary) {
            return Err(ProxyError::PrimaryUnhealthy);
        }
        Ok((entry, primary))
    }

    /// The storages assigned to host a repository: its assignments that are still configured,
    /// or every configured storage when it has none.
    pub(super) async fn assigned_storages(
        &self,
        virtual_storage: &str,
        repository_id: i64,
    ) -> Result<Vec<String>, ProxyError> {
        Ok(self.assignments(virtual_storage, repository_id).await?.0)
    }

    /// [`Proxy::assigned_storages`], and whether the repository has explicit assignments
    /// at all (configured or not), from one query.
    pub(super) async fn assignments(
        &self,
        virtual_storage: &str,
        repository_id: i64,
    ) -> Result<(Vec<String>, bool), ProxyError> {
        let configured: Vec<String> = self
            .config
            .virtual_storage(virtual_storage)
            .map(|vs| vs.node.iter().map(|n| n.storage.clone()).collect())
            .unwrap_or_default();
        let recorded = self.cache.store().assignments(repository_id).await?;
        let explicit = !recorded.is_empty();
        let assigned: Vec<String> = recorded
            .into_iter()
            .filter(|s| configured.contains(s))
            .collect();
        let storages = if assigned.is_empty() {
            configured
        } else {
            assigned
        };
        Ok((storages, explicit))
    }

    /// Storage-scoped reads go to any healthy node of the virtual storage.
    fn route_storage_accessor(
        &self,
        method: &MethodInfo,
        message: &[u8],
    ) -> Result<Route, ProxyError> {
        let path = method
            .storage
            .as_deref()
            .ok_or(ProxyError::StorageNameNotSet)?;
        let virtual_storage = rewrite::read_string(message, path).map_err(|e| match e {
            rewrite::RewriteError::NotFound => ProxyError::StorageNameNotSet,
            other => ProxyError::Malformed(other.to_string()),
        })?;
        self.check_virtual_storage(&virtual_storage)?;
        let healthy = self.healthy(&virtual_storage)?;
        let storage = healthy
            .choose(&mut rand::thread_rng())
            .cloned()
            .ok_or(ProxyError::NoHealthyNodes)?;
        let rewritten = rewrite::rewrite_string(message, path, &storage)?;
        Ok(Route {
            virtual_storage,
            storage,
            message: rewritten,
            repository_scoped: false,
        })
    }
}
