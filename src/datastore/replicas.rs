//! What the replicator reads and writes about one replica: its generation before a job, the
//! generation it reached after one, and its record once it is gone.

use super::{sql, Datastore, DatastoreError};

/// The state a replication job starts from, re-read from the database when the job runs
/// (a queued job's copy of the replica path may be stale).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobContext {
    pub replica_path: String,
    /// The source replica's generation; None when it has no record.
    pub source_generation: Option<i64>,
    /// The target replica's generation; None when it has no record.
    pub target_generation: Option<i64>,
}

/// replica_path, relative_path, source generation, target generation.
type ContextRow = (Option<String>, String, Option<i64>, Option<i64>);

impl Datastore {
    /// The replica path and the generations of `source` and `target`; None when the
    /// repository is gone.
    pub async fn job_context(
        &self,
        repository_id: i64,
        source: &str,
        target: &str,
    ) -> Result<Option<JobContext>, DatastoreError> {
        let row: Option<ContextRow> = self
            .run("job_context", |conn| {
                Box::pin(async move {
                    sql::query_as(
                        "SELECT repo.replica_path, repo.relative_path,
                            (SELECT generation FROM storage_repositories
                             WHERE repository_id = repo.repository_id AND storage = $2),
                            (SELECT generation FROM storage_repositories
                             WHERE repository_id = repo.repository_id AND storage = $3)
                     FROM repositories AS repo WHERE repo.repository_id = $1",
                    )
                    .bind(repository_id)
                    .bind(source)
                    .bind(target)
                    .fetch_optional(&mut *conn)
                    .await
                })
            })
            .await?;
        Ok(row.map(
            |(replica_path, relative_path, source_generation, target_generation)| JobContext {
                replica_path: replica_path.unwrap_or(relative_path),
                source_generation,
                target_generation,
            },
        ))
    }

    /// Records that `storage` holds `generation` of the repository (after a replication),
    /// raising the repository's generation if it was lower. Never lowers a replica's
    /// generation: a write that reached the replica meanwhile stays recorded.
    pub async fn set_replica_generation(
        &self,
        repository_id: i64,
        storage: &str,
        generation: i64,
    ) -> Result<(), DatastoreError> {
        self.run("set_replica_generation", |conn| {
            Box::pin(async move {
                let found: Option<i64> = sql::query_scalar(
                    "SELECT repository_id FROM repositories WHERE repository_id = $1 FOR UPDATE",
                )
                .bind(repository_id)
                .fetch_optional(&mut *conn)
                .await?;
                if found.is_none() {
                    // Deleted meanwhile: nothing to record.
                    return Ok(());
                }
                sql::query(
                    "INSERT INTO storage_repositories
                     (repository_id, virtual_storage, relative_path, storage, generation)
                 SELECT repository_id, virtual_storage, relative_path, $2, $3
                 FROM repositories WHERE repository_id = $1
                 ON CONFLICT (virtual_storage, relative_path, storage) DO UPDATE
                 SET generation = GREATEST(storage_repositories.generation, EXCLUDED.generation)",
                )
                .bind(repository_id)
                .bind(storage)
                .bind(generation)
                .execute(&mut *conn)
                .await?;
                sql::query(
                    "UPDATE repositories SET generation = $2
                 WHERE repository_id = $1 AND COALESCE(generation, -1) < $2",
                )
                .bind(repository_id)
                .bind(generation)
                .execute(&mut *conn)
                .await?;
                Ok(())
            })
        })
        .await
    }

    /// Forgets `storage`'s replica (it was removed, or is not there). Returns whether a record
    /// existed.
    pub async fn delete_replica_record(
        &self,
        repository_id: i64,
        storage: &str,
    ) -> Result<bool, DatastoreError> {
        self.run("delete_replica_record", |conn| {
            Box::pin(async move {
                sql::query(
                    "DELETE FROM storage_repositories WHERE repository_id = $1 AND storage = $2",
                )
                .bind(repository_id)
                .bind(storage)
                .execute(&mut *conn)
                .await
                .map(|done| done.rows_affected() > 0)
            })
        })
        .await
    }

    /// Forgets `storage`'s replica, and the repository too when that was its last replica (a
    /// replication source that turned out not to have the repository).
    pub async fn delete_invalid_source(
        &self,
        repository_id: i64,
        storage: &str,
    ) -> Result<(), DatastoreError> {
        self.run("delete_invalid_source", |conn| {
            Box::pin(async move {
                sql::query(
                    "WITH gone AS (
                     DELETE FROM storage_repositories
                     WHERE repository_id = $1 AND storage = $2
                     RETURNING repository_id
                 )
                 DELETE FROM repositories AS repo
                 WHERE repo.repository_id IN (SELECT repository_id FROM gone)
                   AND NOT EXISTS (SELECT 1 FROM storage_repositories AS other
                                   WHERE other.repository_id = repo.repository_id
                                     AND other.storage <> $2)",
                )
                .bind(repository_id)
                .bind(storage)
                .execute(&mut *conn)
                .await
                .map(|_| ())
            })
        })
        .await
    }
}
