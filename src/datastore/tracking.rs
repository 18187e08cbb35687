//! What the operator's tracking subcommands ask of the database: which repositories are
//! tracked already (by relative path, or by replica path for what a node has on disk), and
//! dropping the queued jobs of a repository that is being removed.

use super::{sql, Datastore, DatastoreError};

impl Datastore {
    /// The id of a tracked repository; None if it is not tracked.
    pub async fn repository_id(
        &self,
        virtual_storage: &str,
        relative_path: &str,
    ) -> Result<Option<i64>, DatastoreError> {
        self.run("repository_id", |conn| {
            Box::pin(async move {
                sql::query_scalar(
                    "SELECT repository_id FROM repositories
                     WHERE virtual_storage = $1 AND relative_path = $2",
                )
                .bind(virtual_storage)
                .bind(relative_path)
                .fetch_optional(&mut *conn)
                .await
            })
        })
        .await
    }

    /// Which of `relative_paths` are tracked in `virtual_storage`: one statement for a whole
    /// input file, so validating thousands of lines costs one round trip.
    pub async fn tracked_relative_paths(
        &self,
        virtual_storage: &str,
        relative_paths: &[String],
    ) -> Result<Vec<String>, DatastoreError> {
        self.run("tracked_relative_paths", |conn| {
            Box::pin(async move {
                sql::query_scalar(
                    "SELECT relative_path FROM repositories
                     WHERE virtual_storage = $1 AND relative_path = ANY($2)",
                )
                .bind(virtual_storage)
                .bind(relative_paths)
                .fetch_all(&mut *conn)
                .await
            })
        })
        .await
    }

    /// Which of `replica_paths` (as found on a node's disk) no repository of
    /// `virtual_storage` lives at. Repositories from before replica paths existed live at
    /// their relative path.
    pub async fn untracked_replica_paths(
        &self,
        virtual_storage: &str,
        replica_paths: &[String],
    ) -> Result<Vec<String>, DatastoreError> {
        self.run("untracked_replica_paths", |conn| {
            Box::pin(async move {
                sql::query_scalar(
                    "SELECT path FROM unnest($2::text[]) WITH ORDINALITY AS found(path, n)
                     WHERE NOT EXISTS (
                         SELECT 1 FROM repositories
                         WHERE virtual_storage = $1
                           AND COALESCE(replica_path, relative_path) = found.path)
                     ORDER BY n",
                )
                .bind(virtual_storage)
                .bind(replica_paths)
                .fetch_all(&mut *conn)
                .await
            })
        })
        .await
    }

    /// Deletes the queued replication jobs of a repository, except those running now (their
    /// job locks must be released by whoever runs them); returns whether any is still
    /// running, so that the caller can wait for it and delete again.
    pub async fn delete_repository_jobs(
        &self,
        virtual_storage: &str,
        relative_path: &str,
    ) -> Result<bool, DatastoreError> {
        self.run("delete_repository_jobs", |conn| {
            Box::pin(async move {
                sql::query(
                    "DELETE FROM replication_queue
                     WHERE job ->> 'virtual_storage' = $1
                       AND job ->> 'relative_path' = $2
                       AND state <> 'in_progress'",
                )
                .bind(virtual_storage)
                .bind(relative_path)
                .execute(&mut *conn)
                .await?;
                sql::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM replication_queue
                                    WHERE job ->> 'virtual_storage' = $1
                                      AND job ->> 'relative_path' = $2
                                      AND state = 'in_progress')",
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
