//! Repository RPCs answered by the router: whether a repository exists (from the database),
//! and removing repositories and object pools: the records go first (so the repository
//! disappears for every router at once, and the NOTIFY evicts the read caches), then each
//! replica is removed from its node, in parallel and best effort (10 s); a replica left
//! behind is only disk space, never served.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;

use super::reply::{decode, unary_ok};
use crate::nodes::NodeChannel;
use crate::proxy::error::ProxyError;
use crate::proxy::state::Proxy;
use crate::routing::{is_rails_pool_path, RepositoryRef};
use crate::wire::proto::object_pool_service_client::ObjectPoolServiceClient;
use crate::wire::proto::repository_service_client::RepositoryServiceClient;
use crate::wire::proto::{
    DeleteObjectPoolRequest, DeleteObjectPoolResponse, ObjectPool, RemoveRepositoryRequest,
    RemoveRepositoryResponse, Repository, RepositoryExistsRequest, RepositoryExistsResponse,
};

/// How long removing one replica may take.
const NODE_TIMEOUT: Duration = Duration::from_secs(10);

/// The repository a request names, checked against the configuration.
fn named(proxy: &Proxy, repository: Option<Repository>) -> Result<RepositoryRef, ProxyError> {
    let repository = repository.ok_or(ProxyError::RepositoryNotSet)?;
    let named = RepositoryRef {
        storage_name: repository.storage_name,
        relative_path: repository.relative_path,
    };
    proxy.router.check_repository(&named)?;
    Ok(named)
}

/// RepositoryExists is answered from the database.
pub async fn repository_exists(
    proxy: &Proxy,
    message: &Bytes,
) -> Result<http::Response<tonic::body::Body>, ProxyError> {
    let request: RepositoryExistsRequest = decode(message)?;
    let repo = named(proxy, request.repository)?;
    let exists = match proxy
        .store()
        .repository_exists(&repo.storage_name, &repo.relative_path)
        .await
    {
        Ok(exists) => exists,
        // While the database is away, a repository the read cache holds exists (within
        // the cache's stale-read window); anything else cannot be answered.
        Err(err) if err.is_unavailable() => {
            match proxy
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
    Ok(unary_ok(&RepositoryExistsResponse { exists }))
}

/// Deletes the records of `repo`, then calls `remove` on every storage that held a replica;
/// false when the repository was not tracked.
async fn remove_everywhere<F, Fut>(
    proxy: &Proxy,
    repo: &RepositoryRef,
    remove: F,
) -> Result<bool, ProxyError>
where
    F: Fn(NodeChannel, Repository) -> Fut,
    Fut: Future<Output = Result<(), tonic::Status>>,
{
    let virtual_storage = repo.storage_name.as_str();
    let Some((replica_path, storages)) = proxy
        .store()
        .delete_repository(virtual_storage, &repo.relative_path)
        .await?
    else {
        return Ok(false);
    };
    let removals = storages.iter().filter_map(|storage| {
        let channel = proxy.nodes.channel(virtual_storage, storage)?.clone();
        let replica = Repository {
            storage_name: storage.clone(),
            relative_path: replica_path.clone(),
            ..Default::default()
        };
        let call = remove(channel, replica);
        Some(async move {
            match tokio::time::timeout(NODE_TIMEOUT, call).await {
                Ok(Ok(())) => {}
                Ok(Err(status)) => {
                    tracing::warn!(storage = %storage, error = %status.message(), "removing a replica failed")
                }
                Err(_) => tracing::warn!(storage = %storage, "removing a replica timed out"),
            }
        })
    });
    futures::future::join_all(removals).await;
    Ok(true)
}

/// RemoveRepository: NotFound "repository does not exist" when it was not tracked.
pub async fn remove_repository(
    proxy: &Proxy,
    message: &Bytes,
) -> Result<http::Response<tonic::body::Body>, ProxyError> {
    let request: RemoveRepositoryRequest = decode(message)?;
    let repo = named(proxy, request.repository)?;
    let removed = remove_everywhere(proxy, &repo, |channel, replica| {
        let request = RemoveRepositoryRequest {
            repository: Some(replica),
        };
        async move {
            RepositoryServiceClient::new(channel)
                .remove_repository(request)
                .await
                .map(|_| ())
        }
    })
    .await?;
    if !removed {
        return Err(ProxyError::RepositoryDoesNotExist);
    }
    Ok(unary_ok(&RemoveRepositoryResponse {}))
}

/// DeleteObjectPool: only Rails pool paths; an untracked pool is an empty success.
pub async fn delete_object_pool(
    proxy: &Proxy,
    message: &Bytes,
) -> Result<http::Response<tonic::body::Body>, ProxyError> {
    let request: DeleteObjectPoolRequest = decode(message)?;
    let repo = named(proxy, request.object_pool.and_then(|pool| pool.repository))?;
    if !is_rails_pool_path(&repo.relative_path) {
        return Err(ProxyError::InvalidPoolPath);
    }
    remove_everywhere(proxy, &repo, |channel, replica| {
        let request = DeleteObjectPoolRequest {
            object_pool: Some(ObjectPool {
                repository: Some(replica),
            }),
        };
        async move {
            ObjectPoolServiceClient::new(channel)
                .delete_object_pool(request)
                .await
                .map(|_| ())
        }
    })
    .await?;
    Ok(unary_ok(&DeleteObjectPoolResponse {}))
}
