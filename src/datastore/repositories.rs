//! Repository records: ids, replica paths, generations, assignments and primaries.

use super::{sql, Datastore, DatastoreError};

/// Everything needed to record a repository that was just created on its replicas.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewRepository {
    pub repository_id: i64,
    pub virtual_storage: String,
    pub relative_path: String,
    pub replica_path: String,
    /// The storage that created it; it becomes the repository's primary.
    pub primary: String,
    /// Secondaries that created it too, at generation 0 like the primary.
    pub updated_secondaries: Vec<String>,
    /// Assigned storages that do not have it yet (replication targets).
    pub outdated_secondaries: Vec<String>,
    /// Whether to store explicit assignments (primary + all secondaries). Without them, every
    /// configured storage counts as assigned.
    pub store_assignments: bool,
}

/// A replica that may serve as the repository's primary.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ValidPrimary {
    pub repository_id: i64,
    pub storage: String,
}

impl Datastore {
    /// Reserves a repository id for a repository about to be created; fails with
    /// [`DatastoreError::RepositoryExists`] when (virtual_storage, relative_path) is taken.
    pub async fn reserve_repository_id(
        &self,
        virtual_storage: &str,
        relative_path: &str,
    ) -> Result<i64, DatastoreError> {
        let id: Option<i64> = self
            .run("reserve_repository_id", |conn| {
                Box::pin(async move {
                    sql::query_scalar(
                        "SELECT nextval('repositories_repository_id_seq')
                     WHERE NOT EXISTS (
                         SELECT 1 FROM repositories
                         WHERE virtual_storage = $1 AND relative_path = $2)",
                    )
                    .bind(virtual_storage)
                    .bind(relative_path)
                    .fetch_optional(&mut *conn)
                    .await
                })
            })
            .await?;
        id.ok_or(DatastoreError::RepositoryExists)
    }

    /// Records a created repository, its replicas at generation 0, if asked its assignments,
    /// and the `update` jobs of the replicas it still lacks, in one transaction: a creation is
    /// never recorded without the jobs that complete it.
    pub async fn create_repository(
        &self,
        repo: &NewRepository,
        jobs: &[super::UpdateJob],
    ) -> Result<(), DatastoreError> {
        let mut with_replica = vec![repo.primary.clone()];
        with_replica.extend(repo.updated_secondaries.iter().cloned());
        let mut assigned = with_replica.clone();
        if repo.store_assignments {
            assigned.extend(repo.outdated_secondaries.iter().cloned());
        } else {
            assigned.clear();
        }
        let result = self
            .run("create_repository", |conn| Box::pin(async move {
                sql::query(
                    "INSERT INTO repositories
                         (repository_id, virtual_storage, relative_path, generation, \"primary\", replica_path)
                     VALUES ($1, $2, $3, 0, $4, $5)",
                )
                .bind(repo.repository_id)
                .bind(&repo.virtual_storage)
                .bind(&repo.relative_path)
                .bind(&repo.primary)
                .bind(&repo.replica_path)
                .execute(&mut *conn)
                .await?;
                sql::query(
                    "INSERT INTO storage_repositories
                         (repository_id, virtual_storage, relative_path, storage, generation)
                     SELECT $1, $2, $3, storage, 0 FROM unnest($4::text[]) AS storage",
                )
                .bind(repo.repository_id)
                .bind(&repo.virtual_storage)
                .bind(&repo.relative_path)
                .bind(&with_replica)
                .execute(&mut *conn)
                .await?;
                if !assigned.is_empty() {
                    sql::query(
                        "INSERT INTO repository_assignments
                             (repository_id, virtual_storage, relative_path, storage)
                         SELECT $1, $2, $3, storage FROM unnest($4::text[]) AS storage",
                    )
                    .bind(repo.repository_id)
                    .bind(&repo.virtual_storage)
                    .bind(&repo.relative_path)
                    .bind(&assigned)
                    .execute(&mut *conn)
                    .await?;
                }
                for job in jobs {
                    super::routing::enqueue_update(&mut *conn, job).await?;
                }
                Ok(())
            }))
            .await;
        match result {
            Err(DatastoreError::Query {
                source: sqlx::Error::Database(db),
                ..
            }) if db.is_unique_violation() => Err(DatastoreError::RepositoryExists),
            other => other,
        }
    }

    /// Records a successful write: the given storages that held the latest generation move to
    /// the next one, and so does the repository. Storages that were behind stay behind.
    /// (A write without replication jobs; see [`Datastore::record_write`].)
    pub async fn increment_generation(
        &self,
        repository_id: i64,
        storages: &[String],
    ) -> Result<i64, DatastoreError> {
        self.record_write(repository_id, storages, &[]).await
    }

    /// The replicas of a repository that may be its primary, sorted by storage.
    pub async fn valid_primaries(
        &self,
        repository_id: i64,
    ) -> Result<Vec<ValidPrimary>, DatastoreError> {
        let rows: Vec<(i64, String)> = self
            .run("valid_primaries", |conn| {
                Box::pin(async move {
                    sql::query_as(
                        "SELECT repository_id, storage FROM valid_primaries
                     WHERE repository_id = $1 ORDER BY storage",
                    )
                    .bind(repository_id)
                    .fetch_all(&mut *conn)
                    .await
                })
            })
            .await?;
        Ok(rows
            .into_iter()
            .map(|(repository_id, storage)| ValidPrimary {
                repository_id,
                storage,
            })
            .collect())
    }
}

/// Where a repository lives and which storages hold its latest generation (routing's type:
/// the read cache holds these, and routing reads them without a copy).
pub type ConsistentStorages = crate::routing::ReplicaSet;

impl Datastore {
    /// The replica path and up-to-date storages of a repository; None if it is not tracked.
    pub async fn consistent_storages(
        &self,
        virtual_storage: &str,
        relative_path: &str,
    ) -> Result<Option<ConsistentStorages>, DatastoreError> {
        let row: Option<(i64, Option<String>, Vec<String>)> = self
            .run("consistent_storages", |conn| {
                Box::pin(async move {
                    sql::query_as(
                        "SELECT repo.repository_id, repo.replica_path,
                            COALESCE(array_agg(replica.storage ORDER BY replica.storage)
                                     FILTER (WHERE replica.storage IS NOT NULL), '{}')
                     FROM repositories AS repo
                     LEFT JOIN storage_repositories AS replica
                            ON replica.repository_id = repo.repository_id
                           AND replica.generation = repo.generation
                     WHERE repo.virtual_storage = $1 AND repo.relative_path = $2
                     GROUP BY repo.repository_id, repo.replica_path",
                    )
                    .bind(virtual_storage)
                    .bind(relative_path)
                    .fetch_optional(&mut *conn)
                    .await
                })
            })
            .await?;
        Ok(row.map(
            |(repository_id, replica_path, storages)| ConsistentStorages {
                repository_id,
                // Repositories from before replica paths existed live at their relative path.
                replica_path: replica_path.unwrap_or_else(|| relative_path.to_string()),
                storages,
            },
        ))
    }
}

impl Datastore {
    /// Deletes a repository's records (replicas and assignments go by cascade) and returns its
    /// replica path and the storages that held a replica; None if it was not tracked.
    pub async fn delete_repository(
        &self,
        virtual_storage: &str,
        relative_path: &str,
    ) -> Result<Option<(String, Vec<String>)>, DatastoreError> {
        let row: Option<(Option<String>, Vec<String>)> = self
            .run("delete_repository", |conn| {
                Box::pin(async move {
                    sql::query_as(
                        "DELETE FROM repositories AS repo
                     WHERE repo.virtual_storage = $1 AND repo.relative_path = $2
                     RETURNING repo.replica_path,
                               ARRAY(SELECT replica.storage FROM storage_repositories AS replica
                                     WHERE replica.repository_id = repo.repository_id
                                     ORDER BY replica.storage)",
                    )
                    .bind(virtual_storage)
                    .bind(relative_path)
                    .fetch_optional(&mut *conn)
                    .await
                })
            })
            .await?;
        Ok(row.map(|(replica_path, storages)| {
            (
                replica_path.unwrap_or_else(|| relative_path.to_string()),
                storages,
            )
        }))
    }

    /// Whether a repository is tracked.
    pub async fn repository_exists(
        &self,
        virtual_storage: &str,
        relative_path: &str,
    ) -> Result<bool, DatastoreError> {
        self.run("repository_exists", |conn| {
            Box::pin(async move {
                sql::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM repositories
                                WHERE virtual_storage = $1 AND relative_path = $2)",
                )
                .bind(virtual_storage)
                .bind(relative_path)
                .fetch_one(&mut *conn)
                .await
            })
        })
        .await
    }
}

/// The storages that hold a replica of a repository, whatever its generation.
pub type RecordedReplicas = crate::routing::ReplicaSet;

impl Datastore {
    /// The replica path and the storages that hold a replica of a repository (maintenance
    /// goes to every existing replica); None if it is not tracked.
    pub async fn recorded_replicas(
        &self,
        virtual_storage: &str,
        relative_path: &str,
    ) -> Result<Option<RecordedReplicas>, DatastoreError> {
        let row: Option<(i64, Option<String>, Vec<String>)> = self
            .run("recorded_replicas", |conn| {
                Box::pin(async move {
                    sql::query_as(
                        "SELECT repo.repository_id, repo.replica_path,
                            ARRAY(SELECT replica.storage FROM storage_repositories AS replica
                                  WHERE replica.repository_id = repo.repository_id
                                    AND replica.generation >= 0
                                  ORDER BY replica.storage)
                     FROM repositories AS repo
                     WHERE repo.virtual_storage = $1 AND repo.relative_path = $2",
                    )
                    .bind(virtual_storage)
                    .bind(relative_path)
                    .fetch_optional(&mut *conn)
                    .await
                })
            })
            .await?;
        Ok(
            row.map(|(repository_id, replica_path, storages)| RecordedReplicas {
                repository_id,
                replica_path: replica_path.unwrap_or_else(|| relative_path.to_string()),
                storages,
            }),
        )
    }
}

impl Datastore {
    /// Up to `limit` repositories of a virtual storage with an id above `after`, by id:
    /// (repository_id, relative_path). Keyset pages keep a walk over millions of repositories
    /// in bounded memory.
    pub async fn relative_paths_page(
        &self,
        virtual_storage: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<(i64, String)>, DatastoreError> {
        self.run("relative_paths_page", |conn| {
            Box::pin(async move {
                sql::query_as(
                    "SELECT repository_id, relative_path FROM repositories
                 WHERE virtual_storage = $1 AND repository_id > $2
                 ORDER BY repository_id LIMIT $3",
                )
                .bind(virtual_storage)
                .bind(after)
                .bind(limit)
                .fetch_all(&mut *conn)
                .await
            })
        })
        .await
    }
}

impl Datastore {
    /// The virtual storage and relative path of repository `repository_id`, if tracked.
    pub async fn repository_path(
        &self,
        repository_id: i64,
    ) -> Result<Option<(String, String)>, DatastoreError> {
        self.run("repository_path", move |conn| {
            Box::pin(async move {
                sql::query_as(
                    "SELECT virtual_storage, relative_path FROM repositories
                     WHERE repository_id = $1",
                )
                .bind(repository_id)
                .fetch_optional(&mut *conn)
                .await
            })
        })
        .await
    }
}
