//! What mutator routing reads and writes: the per-repository primary (elected lazily, inside
//! one statement with a row lock, so that two routers electing at once agree), assignments,
//! and the `update` jobs of replicas a write left behind.

use super::{sql, Datastore, DatastoreError};

/// The outcome of resolving a repository's primary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Primary {
    /// The primary now recorded; None when the repository never had one and none is valid.
    pub storage: Option<String>,
    /// Whether this call elected a new one.
    pub changed: bool,
}

/// One replication job to record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpdateJob {
    pub repository_id: i64,
    pub virtual_storage: String,
    pub relative_path: String,
    pub replica_path: String,
    pub source: String,
    pub target: String,
    pub correlation_id: String,
}

impl Datastore {
    /// The repository's primary: the recorded one if it is still a valid primary; otherwise a
    /// random valid one, chosen under the repository row's lock; otherwise the recorded one
    /// unchanged (possibly invalid, for the caller to report).
    ///
    /// The election's validity check names the repository by `$1`, not by the locked row's
    /// column: the planner turns that NOT EXISTS into an anti-join, and a join column is not
    /// pushed into the view's window, so it computed `valid_primaries` for every repository
    /// (94 s at a million repositories; 0.5 ms with the constant, see README, "A million
    /// repositories").
    pub async fn get_primary(&self, repository_id: i64) -> Result<Primary, DatastoreError> {
        let current: Option<(Option<String>, bool)> = self
            .run("get_primary", |conn| {
                Box::pin(async move {
                    sql::query_as(
                        "SELECT repo.\"primary\",
                            EXISTS (SELECT 1 FROM valid_primaries AS valid
                                    WHERE valid.repository_id = repo.repository_id
                                      AND valid.storage = repo.\"primary\")
                     FROM repositories AS repo WHERE repo.repository_id = $1",
                    )
                    .bind(repository_id)
                    .fetch_optional(&mut *conn)
                    .await
                })
            })
            .await?;
        let (stored, valid) = current.ok_or(DatastoreError::RepositoryNotFound)?;
        if valid {
            return Ok(Primary {
                storage: stored,
                changed: false,
            });
        }
        let elected: (Option<String>, bool) = self
            .run("elect_primary", |conn| Box::pin(async move {
                sql::query_as(
                    "WITH locked AS (
                         SELECT repository_id, \"primary\" FROM repositories
                         WHERE repository_id = $1
                         FOR NO KEY UPDATE
                     ),
                     candidate AS (
                         SELECT storage FROM valid_primaries
                         WHERE repository_id = $1
                         ORDER BY random() LIMIT 1
                     ),
                     elected AS (
                         UPDATE repositories SET \"primary\" = (SELECT storage FROM candidate)
                         FROM locked
                         WHERE repositories.repository_id = locked.repository_id
                           AND EXISTS (SELECT 1 FROM candidate)
                           AND NOT EXISTS (
                               SELECT 1 FROM valid_primaries AS valid
                               WHERE valid.repository_id = $1
                                 AND valid.storage = locked.\"primary\")
                         RETURNING repositories.\"primary\"
                     )
                     SELECT COALESCE((SELECT \"primary\" FROM elected), (SELECT \"primary\" FROM locked)),
                            EXISTS (SELECT 1 FROM elected)",
                )
                .bind(repository_id)
                .fetch_one(&mut *conn)
                .await
            }))
            .await?;
        if elected.1 {
            tracing::info!(
                repository_id,
                previous = ?stored,
                current = ?elected.0,
                "primary node changed"
            );
        }
        Ok(Primary {
            storage: elected.0,
            changed: elected.1,
        })
    }

    /// The explicitly assigned storages of a repository (empty: every configured storage).
    pub async fn assignments(&self, repository_id: i64) -> Result<Vec<String>, DatastoreError> {
        self.run("assignments", |conn| Box::pin(async move {
            sql::query_scalar(
                "SELECT storage FROM repository_assignments WHERE repository_id = $1 ORDER BY storage",
            )
            .bind(repository_id)
            .fetch_all(&mut *conn)
            .await
        }))
        .await
    }

    /// Records a successful write on `updated` (at the latest generation) and queues `update`
    /// jobs for the replicas left behind, in one transaction: the call only succeeds once its
    /// follow-up work is persisted (gitaly#2672). A `ready` job for the same target and change
    /// is not duplicated.
    pub async fn record_write(
        &self,
        repository_id: i64,
        updated: &[String],
        jobs: &[UpdateJob],
    ) -> Result<i64, DatastoreError> {
        let result: Option<Option<i64>> = self
            .run("record_write", |conn| {
                Box::pin(async move {
                    // The row lock first, in its own statement: under READ COMMITTED the next
                    // statement then reads the generations as the previous writer left them.
                    // (Locking inside the same statement would compare the replicas' old
                    // generations with the repository's new one and miss the bump.)
                    let locked: Option<i64> = sql::query_scalar(
                    "SELECT repository_id FROM repositories WHERE repository_id = $1 FOR UPDATE",
                )
                .bind(repository_id)
                .fetch_optional(&mut *conn)
                .await?;
                    if locked.is_none() {
                        return Ok(None);
                    }
                    let generation: Option<Option<i64>> = sql::query_scalar(
                        "WITH repo AS (
                         SELECT repository_id, generation FROM repositories
                         WHERE repository_id = $1
                     ),
                     bumped AS (
                         UPDATE storage_repositories AS replica
                         SET generation = replica.generation + 1
                         FROM repo
                         WHERE replica.repository_id = repo.repository_id
                           AND replica.storage = ANY($2)
                           AND replica.generation = repo.generation
                         RETURNING replica.generation
                     ),
                     repo_bumped AS (
                         UPDATE repositories SET generation = repositories.generation + 1
                         FROM repo
                         WHERE repositories.repository_id = repo.repository_id
                           AND EXISTS (SELECT 1 FROM bumped)
                         RETURNING repositories.generation
                     )
                     SELECT (SELECT generation FROM repo_bumped) FROM repo",
                    )
                    .bind(repository_id)
                    .bind(updated)
                    .fetch_optional(&mut *conn)
                    .await?;
                    if matches!(generation, Some(Some(_))) {
                        for job in jobs {
                            enqueue_update(&mut *conn, job).await?;
                        }
                    }

                    Ok(generation)
                })
            })
            .await?;
        match result {
            None => Err(DatastoreError::RepositoryNotFound),
            Some(None) => Err(DatastoreError::WriteToOutdatedNodes),
            Some(Some(generation)) => Ok(generation),
        }
    }
}

/// Inserts one `update` job unless a `ready` one for the same target is queued already.
pub(super) async fn enqueue_update(
    conn: &mut sqlx::PgConnection,
    job: &UpdateJob,
) -> Result<(), sqlx::Error> {
    let queued = super::queue::ReplicationJob {
        repository_id: job.repository_id,
        replica_path: job.replica_path.clone(),
        change: super::queue::ChangeType::Update,
        relative_path: job.relative_path.clone(),
        target_node_storage: job.target.clone(),
        source_node_storage: job.source.clone(),
        virtual_storage: job.virtual_storage.clone(),
        params: None,
    };
    super::queue::enqueue_in(conn, &queued, &job.correlation_id).await?;
    Ok(())
}
