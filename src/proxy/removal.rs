//! Removing repositories and object pools, answered by the router: the records go first (so
//! the repository disappears for every router at once, and the NOTIFY evicts the read
//! caches), then each replica is removed from its node, in parallel and best effort (10 s);
//! a replica left behind is only disk space, never served.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;

use super::error::ProxyError;
use super::handler::Proxy;
use super::intercept;
use crate::nodes::NodeChannel;
use crate::wire::proto::object_pool_service_client::ObjectPoolServiceClient;
use crate::wire::proto::repository_service_client::RepositoryServiceClient;
use crate::wire::proto::{
    DeleteObjectPoolRequest, DeleteObjectPoolResponse, ObjectPool, RemoveRepositoryRequest,
    RemoveRepositoryResponse, Repository,
};

pub const REMOVE_REPOSITORY: &str = "/gitaly.RepositoryService/RemoveRepository";
pub const DELETE_OBJECT_POOL: &str = "/gitaly.ObjectPoolService/DeleteObjectPool";

/// How long removing one replica may take.
const NODE_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether `path` is a pool path as Rails creates them: `@pools/xx/yy/<64 hex>.git`, where xx
/// and yy are the hash's first two bytes.
pub fn is_rails_pool_path(path: &str) -> bool {
    let Some(rest) = path
        .strip_prefix("@pools/")
        .and_then(|p| p.strip_suffix(".git"))
    else {
        return false;
    };
    let parts: Vec<&str> = rest.split('/').collect();
    let [first, second, hash] = parts.as_slice() else {
        return false;
    };
    hash.len() == 64
        && hash
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        && hash.starts_with(first)
        && first.len() == 2
        && second.len() == 2
        && hash[2..].starts_with(second)
}

impl Proxy {
    /// Deletes the records of `relative_path`, then calls `remove` on every storage that held
    /// a replica; false when the repository was not tracked.
    async fn remove_everywhere<F, Fut>(
        &self,
        virtual_storage: &str,
        relative_path: &str,
        remove: F,
    ) -> Result<bool, ProxyError>
    where
        F: Fn(NodeChannel, Repository) -> Fut,
        Fut: Future<Output = Result<(), tonic::Status>>,
    {
        let Some((replica_path, storages)) = self
            .cache
            .store()
            .delete_repository(virtual_storage, relative_path)
            .await?
        else {
            return Ok(false);
        };
        let removals = storages.iter().filter_map(|storage| {
            let channel = self.nodes.channel(virtual_storage, storage)?.clone();
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
    pub(super) async fn remove_repository(
        &self,
        message: &Bytes,
    ) -> Result<http::Response<tonic::body::Body>, ProxyError> {
        let request: RemoveRepositoryRequest = intercept::decode(message)?;
        let repo = request.repository.ok_or(ProxyError::RepositoryNotSet)?;
        self.check_repository(&repo.storage_name, &repo.relative_path)?;
        let removed = self
            .remove_everywhere(
                &repo.storage_name,
                &repo.relative_path,
                |channel, replica| {
                    let request = RemoveRepositoryRequest {
                        repository: Some(replica),
                    };
                    async move {
                        RepositoryServiceClient::new(channel)
                            .remove_repository(request)
                            .await
                            .map(|_| ())
                    }
                },
            )
            .await?;
        if !removed {
            return Err(ProxyError::RepositoryDoesNotExist);
        }
        Ok(intercept::unary_ok(&RemoveRepositoryResponse {}))
    }

    /// DeleteObjectPool: only Rails pool paths; an untracked pool is an empty success.
    pub(super) async fn delete_object_pool(
        &self,
        message: &Bytes,
    ) -> Result<http::Response<tonic::body::Body>, ProxyError> {
        let request: DeleteObjectPoolRequest = intercept::decode(message)?;
        let repo = request
            .object_pool
            .and_then(|pool| pool.repository)
            .ok_or(ProxyError::RepositoryNotSet)?;
        self.check_repository(&repo.storage_name, &repo.relative_path)?;
        if !is_rails_pool_path(&repo.relative_path) {
            return Err(ProxyError::InvalidArgument(
                "delete object pool: invalid object pool path".into(),
            ));
        }
        self.remove_everywhere(
            &repo.storage_name,
            &repo.relative_path,
            |channel, replica| {
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
            },
        )
        .await?;
        Ok(intercept::unary_ok(&DeleteObjectPoolResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rails_pool_paths_are_recognised() {
        let hash = format!("ab12{}", "0".repeat(60));
        assert!(is_rails_pool_path(&format!("@pools/ab/12/{hash}.git")));
        for bad in [
            format!("@pools/ab/13/{hash}.git"),
            format!("@pools/ab/12/{hash}"),
            format!("@hashed/ab/12/{hash}.git"),
            "@pools/ab/12/ab12.git".to_string(),
            format!("@pools/ab/12/{}.git", hash.to_uppercase()),
            format!("@pools/ab/12/../{hash}.git"),
        ] {
            assert!(!is_rails_pool_path(&bad), "{bad}");
        }
    }
}
