//! Replication factor: which storages are assigned to host a repository. Changing the
//! factor only changes the assignments; the reconciler then creates the replicas of new
//! assignments and removes the unassigned ones.

use super::{sql, Datastore, DatastoreError};

impl Datastore {
    /// Sets a repository's assignments to `factor` storages among `configured` and returns
    /// them, sorted. Assignments to storages no longer configured are dropped. Raising adds
    /// unassigned storages, the primary first, the rest at random; lowering removes random
    /// assignments other than the primary, which is never unassigned. None if the repository
    /// is not tracked. The caller checks `1 <= factor <= configured.len()`.
    pub async fn set_replication_factor(
        &self,
        virtual_storage: &str,
        relative_path: &str,
        factor: i64,
        configured: &[String],
    ) -> Result<Option<Vec<String>>, DatastoreError> {
        self.run("set_replication_factor", |conn| {
            Box::pin(async move {
                // Lock first, in its own statement, so the assignments read next are those the
                // previous holder of the lock left.
                let repo: Option<(i64, Option<String>)> = sql::query_as(
                    "SELECT repository_id, \"primary\" FROM repositories
                 WHERE virtual_storage = $1 AND relative_path = $2
                 FOR UPDATE",
                )
                .bind(virtual_storage)
                .bind(relative_path)
                .fetch_optional(&mut *conn)
                .await?;
                let Some((repository_id, primary)) = repo else {
                    return Ok(None);
                };
                let assigned: Vec<String> = sql::query_scalar(
                    "WITH existing AS (
                     SELECT storage FROM repository_assignments
                     WHERE repository_id = $1 AND storage = ANY($2)
                 ),
                 unconfigured AS (
                     DELETE FROM repository_assignments
                     WHERE repository_id = $1 AND NOT (storage = ANY($2))
                 ),
                 to_add AS (
                     SELECT candidate.storage
                     FROM unnest($2::text[]) AS candidate(storage)
                     WHERE candidate.storage NOT IN (SELECT storage FROM existing)
                     ORDER BY candidate.storage IS NOT DISTINCT FROM $4 DESC, random()
                     LIMIT GREATEST($3 - (SELECT count(*) FROM existing), 0)
                 ),
                 to_remove AS (
                     SELECT storage FROM existing
                     WHERE storage IS DISTINCT FROM $4
                     ORDER BY random()
                     LIMIT GREATEST((SELECT count(*) FROM existing) - $3, 0)
                 ),
                 removed AS (
                     DELETE FROM repository_assignments
                     WHERE repository_id = $1 AND storage IN (SELECT storage FROM to_remove)
                     RETURNING storage
                 ),
                 added AS (
                     INSERT INTO repository_assignments
                         (repository_id, virtual_storage, relative_path, storage)
                     SELECT repo.repository_id, repo.virtual_storage, repo.relative_path,
                            to_add.storage
                     FROM repositories AS repo, to_add
                     WHERE repo.repository_id = $1
                     RETURNING storage
                 )
                 SELECT storage FROM existing
                 WHERE storage NOT IN (SELECT storage FROM removed)
                 UNION
                 SELECT storage FROM added
                 ORDER BY 1",
                )
                .bind(repository_id)
                .bind(configured)
                .bind(factor)
                .bind(primary)
                .fetch_all(&mut *conn)
                .await?;

                Ok(Some(assigned))
            })
        })
        .await
    }
}
