//! Dataloss and SetAuthoritativeStorage: finding the repositories whose primary was lost (or
//! that miss replicas), and accepting the loss by declaring the replica to keep.

use super::configured::{configured_pairs, known_virtual_storage};
use crate::datastore::RepositoryState;
use crate::proxy::error::{InvalidRequest, ProxyError};
use crate::proxy::state::Proxy;
use crate::wire::proto::dataloss_response::repository::Storage;
use crate::wire::proto::dataloss_response::Repository;
use crate::wire::proto::{DatalossRequest, DatalossResponse, SetAuthoritativeStorageRequest};

/// How many repositories one Dataloss response message carries: keeps messages far below
/// gRPC's 4 MiB limit whatever the cluster's size.
const REPOSITORIES_PER_MESSAGE: usize = 1000;

/// The answer to Dataloss, in messages: the repositories of the virtual storage that have an
/// assigned replica which may not be the primary; unless `include_partially_replicated`,
/// only those without any replica that may (unavailable ones).
pub async fn dataloss(
    proxy: &Proxy,
    request: DatalossRequest,
) -> Result<Vec<DatalossResponse>, ProxyError> {
    known_virtual_storage(proxy, &request.virtual_storage)?;
    let repositories = proxy
        .store()
        .degraded_repositories(
            &request.virtual_storage,
            !request.include_partially_replicated,
            &configured_pairs(proxy),
        )
        .await?;
    let repositories: Vec<Repository> = repositories.into_iter().map(to_proto).collect();
    if repositories.is_empty() {
        return Ok(vec![DatalossResponse::default()]);
    }
    Ok(repositories
        .chunks(REPOSITORIES_PER_MESSAGE)
        .map(|chunk| DatalossResponse {
            repositories: chunk.to_vec(),
        })
        .collect())
}

fn to_proto(repository: RepositoryState) -> Repository {
    let unavailable = repository.unavailable();
    let generation = repository.generation;
    Repository {
        relative_path: repository.relative_path,
        storages: repository
            .replicas
            .into_iter()
            .map(|replica| Storage {
                name: replica.storage,
                // A missing replica is at generation -1: one more change behind than one
                // created at generation 0.
                behind_by: generation.saturating_sub(replica.generation),
                assigned: replica.assigned,
                healthy: replica.healthy,
                valid_primary: replica.valid_primary,
            })
            .collect(),
        unavailable,
        primary: repository.primary.unwrap_or_default(),
    }
}

/// SetAuthoritativeStorage: the chosen replica becomes the only up-to-date one.
pub async fn set_authoritative_storage(
    proxy: &Proxy,
    request: SetAuthoritativeStorageRequest,
) -> Result<(), ProxyError> {
    let storages = known_virtual_storage(proxy, &request.virtual_storage)?;
    if !storages.contains(&request.authoritative_storage) {
        return Err(InvalidRequest::UnknownStorage {
            virtual_storage: request.virtual_storage,
            storage: request.authoritative_storage,
        }
        .into());
    }
    let tracked = proxy
        .store()
        .set_authoritative_replica(
            &request.virtual_storage,
            &request.relative_path,
            &request.authoritative_storage,
        )
        .await?;
    if !tracked {
        return Err(InvalidRequest::RepositoryNotOnVirtualStorage {
            virtual_storage: request.virtual_storage,
            relative_path: request.relative_path,
        }
        .into());
    }
    tracing::warn!(
        virtual_storage = %request.virtual_storage,
        relative_path = %request.relative_path,
        authoritative_storage = %request.authoritative_storage,
        "data loss accepted: the authoritative replica moved to a new generation"
    );
    Ok(())
}
