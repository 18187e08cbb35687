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

impl Datastore {
    /// How many repositories of each virtual storage have no valid primary: nothing can be
    /// written to them, and reads fail unless a replica is up to date and healthy.
    pub async fn unavailable_repositories(
        &self,
        timeout: Duration,
    ) -> Result<Vec<UnavailableCount>, DatastoreError> {
        self.run_with_timeout("unavailable_repositories", timeout, |conn| {
            Box::pin(async move {
                sql::query_as(
                    "SELECT virtual_storage, count(*) AS count FROM repositories AS repo
                     WHERE NOT EXISTS (SELECT 1 FROM valid_primaries AS valid
                                       WHERE valid.repository_id = repo.repository_id)
                     GROUP BY virtual_storage ORDER BY virtual_storage",
                )
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
