//! The route and rewrite steps of the pipeline: read what the first request message names
//! (repositories, a storage) into routing's terms, ask the router for a plan, and rewrite the
//! message for each node of the plan.

use crate::metrics;
use crate::routing::methods::{self, CallKind, CREATE_FORK};
use crate::routing::registry::MethodInfo;
use crate::routing::{NeighbourSource, RepositoryRef, RoutingError, WriteRequest, WriteRoute};

use super::error::{Malformed, ProxyError};
use super::rewrite;
use super::state::Proxy;

/// CreateFork's `source_repository` (not annotated, so not in the registry).
const CREATE_FORK_SOURCE: &[u32] = &[2];
/// Metadata naming a repository whose partition a new repository should join.
const PARTITIONING_HINT: http::HeaderName =
    http::HeaderName::from_static("gitaly-partitioning-hint");
/// Metadata with which a client asks for a read from the primary.
const ACCESSOR_POLICY: http::HeaderName =
    http::HeaderName::from_static("gitaly-route-repository-accessor-policy");

/// A node a call goes to.
#[derive(Clone, Debug)]
pub struct Destination {
    pub virtual_storage: String,
    pub storage: String,
    /// Repository-scoped calls carry the virtual storage's name in their metadata.
    pub repository_scoped: bool,
}

/// A call ready to be sent: where, with which first message, and what to record after.
pub enum Forwarding {
    /// One node answers a read.
    One {
        destination: Destination,
        message: Vec<u8>,
    },
    /// A write: the primary answers the client; secondaries take part in its transaction.
    Write(Box<PlannedWrite>),
    /// Every node gets the call; the client gets one combined answer (maintenance).
    FanOut(Vec<(Destination, Vec<u8>)>),
}

/// A write ready to be sent.
pub struct PlannedWrite {
    /// Whether the nodes vote on it (reference transactions); if not, the primary alone
    /// gets it.
    pub transactional: bool,
    /// The primary first, then the secondaries, each with its first message.
    pub participants: Vec<(Destination, Vec<u8>)>,
    /// The plan, recorded once the write is over.
    pub route: WriteRoute,
}

/// Routes a call by its registry entry and first message. May rewrite `headers` (the
/// partitioning hint of a creation names a replica path for the node).
pub async fn plan(
    proxy: &Proxy,
    method: &MethodInfo,
    message: &[u8],
    headers: &mut http::HeaderMap,
) -> Result<Forwarding, ProxyError> {
    match methods::call_kind(method)? {
        CallKind::StorageAccessor => storage_accessor(proxy, method, message),
        CallKind::Accessor => accessor(proxy, method, message, headers).await,
        // Boxed: their futures are several times a read's, and every call's future would
        // otherwise be as large as the largest (copied whole whenever it is moved).
        CallKind::Mutator => Box::pin(mutator(proxy, method, message, headers)).await,
        CallKind::Maintenance => Box::pin(maintenance(proxy, method, message)).await,
    }
}

/// The target repository of a repository-scoped call.
fn target<'a>(
    method: &'a MethodInfo,
    message: &[u8],
) -> Result<(&'a [u32], RepositoryRef), ProxyError> {
    let path = method
        .target_repository
        .as_deref()
        .ok_or(ProxyError::RepositoryNotSet)?;
    let repository = rewrite::read_repository(message, path)?;
    tracing::Span::current().record("relative_path", repository.relative_path.as_str());
    Ok((path, repository))
}

/// The additional repository a call names, if its method has one and the message sets it.
fn additional<'a>(
    method: &'a MethodInfo,
    message: &[u8],
) -> Result<Option<(&'a [u32], RepositoryRef)>, ProxyError> {
    let Some(path) = method.additional_repository.as_deref() else {
        return Ok(None);
    };
    Ok(rewrite::read_optional_repository(message, path)?.map(|repo| (path, repo)))
}

fn repository_destination(repo: &RepositoryRef, storage: &str) -> Destination {
    Destination {
        virtual_storage: repo.storage_name.clone(),
        storage: storage.to_string(),
        repository_scoped: true,
    }
}

fn storage_accessor(
    proxy: &Proxy,
    method: &MethodInfo,
    message: &[u8],
) -> Result<Forwarding, ProxyError> {
    let path = method
        .storage
        .as_deref()
        .ok_or(RoutingError::StorageNameNotSet)?;
    let virtual_storage = rewrite::read_string(message, path).map_err(|e| match e {
        rewrite::RewriteError::NotFound => ProxyError::Routing(RoutingError::StorageNameNotSet),
        other => ProxyError::Malformed(Malformed::Field(other)),
    })?;
    let route = proxy.router.route_storage_accessor(&virtual_storage)?;
    let message = rewrite::rewrite_string(message, path, &route.storage)?;
    Ok(Forwarding::One {
        destination: Destination {
            virtual_storage,
            storage: route.storage,
            repository_scoped: false,
        },
        message,
    })
}

async fn accessor(
    proxy: &Proxy,
    method: &MethodInfo,
    message: &[u8],
    headers: &http::HeaderMap,
) -> Result<Forwarding, ProxyError> {
    read_avoiding(proxy, method, message, headers, None).await
}

/// Routes a repository read again, to another replica than `unreachable` (whose node could
/// not be reached); `None` if the method is not such a read or only `unreachable` can serve
/// it.
pub async fn reroute_read(
    proxy: &Proxy,
    method: &MethodInfo,
    message: &[u8],
    headers: &http::HeaderMap,
    unreachable: &str,
) -> Option<(Destination, Vec<u8>)> {
    if methods::call_kind(method).ok()? != CallKind::Accessor || method.client_streaming {
        return None;
    }
    match read_avoiding(proxy, method, message, headers, Some(unreachable)).await {
        Ok(Forwarding::One {
            destination,
            message,
        }) if destination.storage != unreachable => Some((destination, message)),
        _ => None,
    }
}

async fn read_avoiding(
    proxy: &Proxy,
    method: &MethodInfo,
    message: &[u8],
    headers: &http::HeaderMap,
    avoid: Option<&str>,
) -> Result<Forwarding, ProxyError> {
    let (target_path, repo) = target(method, message)?;
    let force_primary =
        methods::forces_primary(method, headers.get(&ACCESSOR_POLICY).map(|v| v.as_bytes()));
    let other = additional(method, message)?;
    let route = proxy
        .router
        .route_accessor_avoiding(&repo, other.as_ref().map(|(_, r)| r), force_primary, avoid)
        .await?;
    metrics::READ_DISTRIBUTION
        .with_label_values(&[repo.storage_name.as_str(), route.storage.as_str()])
        .inc();
    let mut rewritten =
        rewrite::rewrite_repository(message, target_path, &route.storage, &route.replica_path)?;
    if let (Some((path, _)), Some(replica_path)) = (other, &route.additional_replica_path) {
        rewritten = rewrite::rewrite_repository(&rewritten, path, &route.storage, replica_path)?;
    }
    Ok(Forwarding::One {
        destination: repository_destination(&repo, &route.storage),
        message: rewritten,
    })
}

async fn mutator(
    proxy: &Proxy,
    method: &MethodInfo,
    message: &[u8],
    headers: &mut http::HeaderMap,
) -> Result<Forwarding, ProxyError> {
    let (target_path, repo) = target(method, message)?;
    let other = additional(method, message)?;
    let creates = methods::creates_repository(method);
    let fork_source = if creates && method.full_name == CREATE_FORK {
        rewrite::read_optional_repository(message, CREATE_FORK_SOURCE)?
    } else {
        None
    };
    let partitioning_hint = headers
        .get(&PARTITIONING_HINT)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(str::to_string);
    let request = WriteRequest {
        repository: repo.clone(),
        additional: other.as_ref().map(|(_, r)| r.clone()),
        creates,
        upserts: methods::upserts(method),
        fork_source,
        partitioning_hint: if creates { partitioning_hint } else { None },
    };
    let hinted = request.partitioning_hint.is_some();
    let route = proxy.router.route_write(&request).await?;
    let (replica_path, additional_replica_path) = match &route {
        WriteRoute::Update(update) => (
            &update.replica_path,
            update.additional_replica_path.as_ref(),
        ),
        WriteRoute::Create(create) => {
            let neighbour = create.neighbour.as_ref();
            if let (true, Some(next_to)) = (hinted, neighbour) {
                // The node partitions by replica path; the client only knows the virtual one.
                if let Ok(value) = http::HeaderValue::from_str(&next_to.replica_path) {
                    headers.insert(PARTITIONING_HINT, value);
                }
            }
            // The additional repository (a pool's origin) is the neighbour when it is set.
            let additional = neighbour
                .filter(|n| n.named_by == NeighbourSource::AdditionalRepository)
                .map(|n| &n.replica_path);
            (&create.replica_path, additional)
        }
    };
    let transactional = methods::is_transactional(method);
    let secondaries = if transactional {
        route.secondaries()
    } else {
        &[]
    };
    let participants = std::iter::once(route.primary())
        .chain(secondaries.iter().map(String::as_str))
        .map(|storage| {
            let mut rewritten =
                rewrite::rewrite_repository(message, target_path, storage, replica_path)?;
            if let (Some((path, _)), Some(replica_path)) = (&other, additional_replica_path) {
                rewritten = rewrite::rewrite_repository(&rewritten, path, storage, replica_path)?;
            }
            Ok((repository_destination(&repo, storage), rewritten))
        })
        .collect::<Result<Vec<_>, ProxyError>>()?;
    Ok(Forwarding::Write(Box::new(PlannedWrite {
        transactional,
        participants,
        route,
    })))
}

async fn maintenance(
    proxy: &Proxy,
    method: &MethodInfo,
    message: &[u8],
) -> Result<Forwarding, ProxyError> {
    let (target_path, repo) = target(method, message)?;
    let route = proxy.router.route_maintenance(&repo).await?;
    let calls = route
        .storages
        .iter()
        .map(|storage| {
            let message =
                rewrite::rewrite_repository(message, target_path, storage, &route.replica_path)?;
            Ok((repository_destination(&repo, storage), message))
        })
        .collect::<Result<Vec<_>, ProxyError>>()?;
    Ok(Forwarding::FanOut(calls))
}
