//! The figures operators watch that only the database knows, read on demand (`/db_metrics`,
//! `praefect check`): unavailable repositories, the replication queue's depth, and the
//! verification backlog. Each is one aggregate query; the caller bounds it in time.

use std::time::Duration;

use super::{sql, Datastore, DatastoreError};

/// Repositories with no valid primary, by virtual storage.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct UnavailableCount {
    pub virtual_storage: String,
    pub count: i64,
}

/// Replication jobs by virtual storage, target storage and state.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct QueueDepth {
    pub virtual_storage: String,
    pub target_node: String,
    pub state: String,
    pub count: i64,
}

/// Replicas waiting for verification by virtual storage, storage and status (`unverified`:
/// never verified; `expired`: verified longer ago than the interval).
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct VerificationDepth {
    pub virtual_storage: String,
    pub storage: String,
    pub status: String,
    pub count: i64,
}

/// Repositories without a valid primary, counted by virtual storage.
///
/// A repository has a valid primary exactly when it has a *candidate*: a replica at the
/// repository's generation, on a storage healthy by quorum, with no `delete_replica` job
/// pending for it. The `valid_primaries` view narrows the candidates to the assigned ones
/// when any candidate is assigned, which never empties the set; so no candidate, no valid
/// primary. Counting through the view instead computed its window over every replica of
/// every repository before the anti-join: 18 s at a million repositories, longer than the
/// default scrape timeout. Asked directly, the question is one anti-join of `repositories`
/// against the up-to-date replicas on healthy storages; the healthy storages (a quorum
/// aggregate over `node_status`) are worked out once, not once per repository.
pub const UNAVAILABLE_REPOSITORIES_SQL: &str = "
WITH healthy AS MATERIALIZED (
    SELECT virtual_storage::text, storage::text FROM healthy_storages
)
SELECT repo.virtual_storage, count(*) AS count
FROM repositories AS repo
WHERE NOT EXISTS (
    SELECT 1
    FROM storage_repositories AS replica
    JOIN healthy ON healthy.storage = replica.storage
    WHERE replica.repository_id = repo.repository_id
      AND replica.generation = repo.generation
      AND healthy.virtual_storage = repo.virtual_storage
      AND NOT EXISTS (
          SELECT 1
          FROM replication_queue AS queued
          WHERE queued.state NOT IN ('completed', 'dead', 'cancelled')
            AND queued.job ->> 'change' = 'delete_replica'
            AND queued.job ->> 'repository_id' = replica.repository_id::text
            AND queued.job ->> 'target_node_storage' = replica.storage
      )
)
GROUP BY repo.virtual_storage
ORDER BY repo.virtual_storage";

impl Datastore {
    /// How many repositories of each virtual storage have no valid primary: nothing can be
    /// written to them, and reads fail unless a replica is up to date and healthy.
    pub async fn unavailable_repositories(
        &self,
        timeout: Duration,
    ) -> Result<Vec<UnavailableCount>, DatastoreError> {
        self.run_with_timeout("unavailable_repositories", timeout, |conn| {
            Box::pin(async move {
                sql::query_as(UNAVAILABLE_REPOSITORIES_SQL)
                    .fetch_all(&mut *conn)
                    .await
            })
        })
        .await
    }

    /// The replication queue's depth by virtual storage, target and state.
    pub async fn replication_queue_depth(
        &self,
        timeout: Duration,
    ) -> Result<Vec<QueueDepth>, DatastoreError> {
        self.run_with_timeout("replication_queue_depth", timeout, |conn| {
            Box::pin(async move {
                sql::query_as(
                    "SELECT job->>'virtual_storage' AS virtual_storage,
                            job->>'target_node_storage' AS target_node,
                            state::text AS state, count(*) AS count
                     FROM replication_queue GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
                )
                .fetch_all(&mut *conn)
                .await
            })
        })
        .await
    }

    /// Replicas due for verification: never verified, or verified before `interval` ago.
    pub async fn verification_queue_depth(
        &self,
        interval: Duration,
        timeout: Duration,
    ) -> Result<Vec<VerificationDepth>, DatastoreError> {
        let seconds = interval.as_secs_f64();
        self.run_with_timeout("verification_queue_depth", timeout, move |conn| {
            Box::pin(async move {
                sql::query_as(
                    "SELECT repo.virtual_storage, replica.storage,
                            CASE WHEN replica.verified_at IS NULL THEN 'unverified'
                                 ELSE 'expired' END AS status,
                            count(*) AS count
                     FROM storage_repositories AS replica
                     JOIN repositories AS repo USING (repository_id)
                     WHERE replica.verified_at IS NULL
                        OR replica.verified_at < now() - make_interval(secs => $1)
                     GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
                )
                .bind(seconds)
                .fetch_all(&mut *conn)
                .await
            })
        })
        .await
    }

    /// Writes a row to `hello_world` and removes it again in one transaction: the database
    /// accepts reads and writes (`praefect check`).
    pub async fn check_read_write(&self, timeout: Duration) -> Result<(), DatastoreError> {
        self.run_with_timeout("check_read_write", timeout, |conn| {
            Box::pin(async move {
                let id: i32 =
                    sql::query_scalar("INSERT INTO hello_world (id) VALUES (1) RETURNING id")
                        .fetch_one(&mut *conn)
                        .await?;
                sql::query("DELETE FROM hello_world WHERE id = $1")
                    .bind(id)
                    .execute(&mut *conn)
                    .await?;
                Ok(())
            })
        })
        .await
    }
}
