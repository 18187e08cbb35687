//! Routing writes. Until reference transactions exist, a write goes to the repository's
//! primary only; once it succeeded, the primary's generation is bumped and every other
//! assigned replica gets an `update` replication job (both persisted before the client sees
//! the success). Repository creation places the repository (replication factor), reserves
//! its id and replica path, and records it once the primary created it.

use rand::seq::SliceRandom;

use super::error::ProxyError;
use super::handler::{check_additional, Proxy};
use super::registry::MethodInfo;
use super::rewrite;
use crate::datastore::{DatastoreError, NewRepository, UpdateJob};
use crate::routing::{pool_replica_path, replica_path};

/// The RPCs that create a repository (change type "create").
const CREATE_METHODS: &[&str] = &[
    "/gitaly.RepositoryService/CreateRepository",
    "/gitaly.RepositoryService/CreateRepositoryFromURL",
    "/gitaly.RepositoryService/CreateRepositoryFromBundle",
    "/gitaly.RepositoryService/CreateRepositoryFromSnapshot",
    "/gitaly.RepositoryService/CreateFork",
    "/gitaly.RepositoryService/ReplicateRepository",
    "/gitaly.RepositoryService/RestoreRepository",
    "/gitaly.ObjectPoolService/CreateObjectPool",
];
const CREATE_FORK: &str = "/gitaly.RepositoryService/CreateFork";
/// CreateFork's `source_repository` (not annotated, so not in the registry).
const CREATE_FORK_SOURCE: &[u32] = &[2];
/// Metadata naming a repository whose partition a new repository should join.
const PARTITIONING_HINT_HEADER: &str = "gitaly-partitioning-hint";

/// Creations that update the repository instead when it exists already.
const UPSERT_METHODS: &[&str] = &[
    "/gitaly.RepositoryService/ReplicateRepository",
    "/gitaly.RepositoryService/RestoreRepository",
];

/// What to record once the write succeeded.
pub enum AfterWrite {
    Update {
        repository_id: i64,
        primary: String,
        jobs: Vec<UpdateJob>,
    },
    Create {
        repository: NewRepository,
        jobs: Vec<UpdateJob>,
    },
}

/// A routed write: the node, the rewritten first message, the bookkeeping to do after.
pub struct WriteRoute {
    pub virtual_storage: String,
    pub storage: String,
    pub message: Vec<u8>,
    pub after: AfterWrite,
}

fn jobs_for(
    targets: &[String],
    repository_id: i64,
    virtual_storage: &str,
    relative_path: &str,
    replica_path: &str,
    source: &str,
    correlation_id: &str,
) -> Vec<UpdateJob> {
    targets
        .iter()
        .map(|target| UpdateJob {
            repository_id,
            virtual_storage: virtual_storage.to_string(),
            relative_path: relative_path.to_string(),
            replica_path: replica_path.to_string(),
            source: source.to_string(),
            target: target.clone(),
            correlation_id: correlation_id.to_string(),
        })
        .collect()
}

impl Proxy {
    pub(super) async fn route_write(
        &self,
        method: &MethodInfo,
        message: &[u8],
        correlation_id: &str,
        headers: &mut http::HeaderMap,
    ) -> Result<WriteRoute, ProxyError> {
        let target = method
            .target_repository
            .as_deref()
            .ok_or(ProxyError::RepositoryNotSet)?;
        let repo = rewrite::read_repository(message, target)?;
        self.check_repository(&repo.storage_name, &repo.relative_path)?;
        let healthy = self.healthy(&repo.storage_name)?;
        if CREATE_METHODS.contains(&method.full_name.as_str()) {
            match self
                .route_create(method, message, &repo, &healthy, correlation_id, headers)
                .await
            {
                Err(ProxyError::RepositoryExists)
                    if UPSERT_METHODS.contains(&method.full_name.as_str()) => {}
                other => return other,
            }
        }
        self.route_update(method, message, &repo, &healthy, correlation_id)
            .await
    }

    async fn route_update(
        &self,
        method: &MethodInfo,
        message: &[u8],
        repo: &rewrite::RepositoryRef,
        healthy: &[String],
        correlation_id: &str,
    ) -> Result<WriteRoute, ProxyError> {
        let store = self.cache.store();
        let (entry, primary) = self
            .healthy_primary(
                &repo.storage_name,
                &repo.relative_path,
                healthy,
                ProxyError::RepositoryNotFound,
            )
            .await?;
        if !entry.storages.contains(&primary) {
            return Err(ProxyError::ReadOnly);
        }
        let assigned = self
            .assigned_storages(&repo.storage_name, entry.repository_id)
            .await?;
        if !assigned.contains(&primary) {
            return Err(ProxyError::PrimaryNotAssigned);
        }
        let targets: Vec<String> = assigned.into_iter().filter(|s| *s != primary).collect();
        let target_path = method
            .target_repository
            .as_deref()
            .expect("checked by caller");
        let mut rewritten =
            rewrite::rewrite_repository(message, target_path, &primary, &entry.replica_path)?;
        if let Some(additional) = method.additional_repository.as_deref() {
            if let Some(other) = rewrite::read_optional_repository(&rewritten, additional)? {
                check_additional(repo, &other)?;
                let other_entry = store
                    .consistent_storages(&repo.storage_name, &other.relative_path)
                    .await?
                    .ok_or(ProxyError::AdditionalRepositoryNotFound)?;
                rewritten = rewrite::rewrite_repository(
                    &rewritten,
                    additional,
                    &primary,
                    &other_entry.replica_path,
                )?;
            }
        }
        Ok(WriteRoute {
            virtual_storage: repo.storage_name.clone(),
            storage: primary.clone(),
            message: rewritten,
            after: AfterWrite::Update {
                repository_id: entry.repository_id,
                jobs: jobs_for(
                    &targets,
                    entry.repository_id,
                    &repo.storage_name,
                    &repo.relative_path,
                    &entry.replica_path,
                    &primary,
                    correlation_id,
                ),
                primary,
            },
        })
    }

    async fn route_create(
        &self,
        method: &MethodInfo,
        message: &[u8],
        repo: &rewrite::RepositoryRef,
        healthy: &[String],
        correlation_id: &str,
        headers: &mut http::HeaderMap,
    ) -> Result<WriteRoute, ProxyError> {
        let virtual_storage = self
            .config
            .virtual_storage(&repo.storage_name)
            .ok_or(ProxyError::StorageNotFound)?;
        let annotated = match method.additional_repository.as_deref() {
            Some(path) => rewrite::read_optional_repository(message, path)?,
            None => None,
        };
        // The repository the new one is placed next to: the annotated additional repository
        // (a pool's origin), CreateFork's unannotated source, or the partitioning hint.
        let hint = headers
            .get(PARTITIONING_HINT_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .map(str::to_string);
        let neighbour = match (&annotated, method.full_name.as_str()) {
            (Some(other), _) => Some(other.clone()),
            (None, CREATE_FORK) => rewrite::read_optional_repository(message, CREATE_FORK_SOURCE)?
                .filter(|source| !source.relative_path.is_empty()),
            _ => None,
        }
        .or_else(|| {
            hint.as_ref().map(|path| rewrite::RepositoryRef {
                storage_name: repo.storage_name.clone(),
                relative_path: path.clone(),
            })
        });
        let store = self.cache.store();
        let placement = match &neighbour {
            Some(other) => Some(self.place_next_to(repo, other, healthy).await?),
            None => None,
        };
        let repository_id = match store
            .reserve_repository_id(&repo.storage_name, &repo.relative_path)
            .await
        {
            Err(DatastoreError::RepositoryExists) => return Err(ProxyError::RepositoryExists),
            other => other?,
        };
        let (primary, targets, store_assignments) = match &placement {
            Some(next_to) => (
                next_to.primary.clone(),
                next_to.others.clone(),
                next_to.explicit,
            ),
            None => {
                let mut rng = rand::thread_rng();
                let primary = healthy
                    .choose(&mut rng)
                    .cloned()
                    .ok_or(ProxyError::NoHealthyNodes)?;
                let mut others: Vec<String> = virtual_storage
                    .node
                    .iter()
                    .map(|n| n.storage.clone())
                    .filter(|s| *s != primary)
                    .collect();
                let factor = virtual_storage.default_replication_factor;
                if factor > 0 {
                    others.shuffle(&mut rng);
                    others.truncate(usize::try_from(factor - 1).unwrap_or(0));
                }
                (primary, others, factor > 0)
            }
        };
        let replica = if super::removal::is_rails_pool_path(&repo.relative_path) {
            pool_replica_path(repository_id)
        } else {
            replica_path(repository_id)
        };
        let target_path = method
            .target_repository
            .as_deref()
            .expect("checked by caller");
        let mut rewritten = rewrite::rewrite_repository(message, target_path, &primary, &replica)?;
        if let (Some(path), Some(_), Some(next_to)) = (
            method.additional_repository.as_deref(),
            &annotated,
            &placement,
        ) {
            rewritten =
                rewrite::rewrite_repository(&rewritten, path, &primary, &next_to.replica_path)?;
        }
        if let (Some(_), Some(next_to)) = (&hint, &placement) {
            // The node partitions by replica path; the client only knows the virtual one.
            if let Ok(value) = http::HeaderValue::from_str(&next_to.replica_path) {
                headers.insert(PARTITIONING_HINT_HEADER, value);
            }
        }
        let jobs = jobs_for(
            &targets,
            repository_id,
            &repo.storage_name,
            &repo.relative_path,
            &replica,
            &primary,
            correlation_id,
        );
        Ok(WriteRoute {
            virtual_storage: repo.storage_name.clone(),
            storage: primary.clone(),
            message: rewritten,
            after: AfterWrite::Create {
                repository: NewRepository {
                    repository_id,
                    virtual_storage: repo.storage_name.clone(),
                    relative_path: repo.relative_path.clone(),
                    replica_path: replica,
                    primary,
                    updated_secondaries: Vec::new(),
                    outdated_secondaries: targets,
                    store_assignments,
                },
                jobs,
            },
        })
    }

    /// Placement of a repository created next to another one (a fork next to its source, a
    /// pool next to its origin): the same storages, the same primary, which must be healthy.
    async fn place_next_to(
        &self,
        repo: &rewrite::RepositoryRef,
        other: &rewrite::RepositoryRef,
        healthy: &[String],
    ) -> Result<Placement, ProxyError> {
        check_additional(repo, other)?;
        let (entry, primary) = self
            .healthy_primary(
                &other.storage_name,
                &other.relative_path,
                healthy,
                ProxyError::AdditionalRepositoryNotFound,
            )
            .await?;
        let (assigned, explicit) = self
            .assignments(&other.storage_name, entry.repository_id)
            .await?;
        Ok(Placement {
            others: assigned.into_iter().filter(|s| *s != primary).collect(),
            primary,
            replica_path: entry.replica_path,
            explicit,
        })
    }
}

/// Where a repository created next to another one goes.
struct Placement {
    primary: String,
    /// The other assigned storages: replication targets until transactions exist.
    others: Vec<String>,
    /// The neighbour's replica path.
    replica_path: String,
    /// Whether the neighbour has explicit assignments (then so does the new repository).
    explicit: bool,
}

impl AfterWrite {
    /// Records a successful write.
    pub async fn record(self, store: &crate::datastore::Datastore) -> Result<(), DatastoreError> {
        match self {
            AfterWrite::Update {
                repository_id,
                primary,
                jobs,
            } => store
                .record_write(repository_id, &[primary], &jobs)
                .await
                .map(|_| ()),
            AfterWrite::Create { repository, jobs } => {
                store.create_repository(&repository).await?;
                store.enqueue_updates(&jobs).await
            }
        }
    }
}
