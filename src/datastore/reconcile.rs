//! The reconciler's one statement (spec §5, "Reconciler"): queue `update` jobs for assigned
//! replicas that are behind or missing, and `delete_replica` jobs for unassigned replicas
//! that are safe to drop. A transaction-scoped advisory lock lets one router schedule at a
//! time; the others' statements do nothing.

use super::{sql, Datastore, DatastoreError};

/// The advisory lock key the reconciler holds while scheduling.
pub const RECONCILIATION_LOCK: i64 = 1;

/// One job the reconciler queued.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
pub struct ScheduledJob {
    pub change: String,
    pub virtual_storage: String,
    pub relative_path: String,
    #[serde(default)]
    pub source_node_storage: String,
    pub target_node_storage: String,
}

/// A (virtual storage, storage) pair.
pub type StoragePair = (String, String);

impl Datastore {
    /// Schedules reconciliation jobs among `healthy` storages (this router's view; each
    /// virtual storage given should have at least two). `configured` lists every configured
    /// storage, so assignments to storages no longer configured are ignored. Returns None when
    /// another router holds the reconciliation lock.
    pub async fn schedule_reconciliation(
        &self,
        healthy: &[StoragePair],
        configured: &[StoragePair],
    ) -> Result<Option<Vec<ScheduledJob>>, DatastoreError> {
        let (healthy_vs, healthy_storage): (Vec<String>, Vec<String>) =
            healthy.iter().cloned().unzip();
        let (configured_vs, configured_storage): (Vec<String>, Vec<String>) =
            configured.iter().cloned().unzip();
        let row: (bool, sqlx::types::Json<Vec<ScheduledJob>>) = self
            .run("schedule_reconciliation", |conn| {
                Box::pin(async move {
                    sql::query_as(
                        "WITH reconciliation_lock AS (
                         SELECT pg_try_advisory_xact_lock($5) AS acquired
                     ),
                     healthy AS (
                         SELECT * FROM unnest($1::text[], $2::text[]) AS h(virtual_storage, storage)
                     ),
                     configured AS (
                         SELECT * FROM unnest($3::text[], $4::text[]) AS c(virtual_storage, storage)
                     ),
                     active_job AS (
                         SELECT job FROM replication_queue
                         WHERE state NOT IN ('completed', 'cancelled', 'dead')
                     ),
                     assignment AS (
                         SELECT assigned.repository_id, assigned.storage
                         FROM repository_assignments AS assigned
                         JOIN repositories AS repo USING (repository_id)
                         JOIN configured ON configured.virtual_storage = repo.virtual_storage
                                        AND configured.storage = assigned.storage
                     ),
                     update_job AS (
                         SELECT DISTINCT ON (repo.repository_id, target.storage)
                                'update' AS change, repo.repository_id, repo.virtual_storage,
                                repo.relative_path,
                                COALESCE(repo.replica_path, repo.relative_path) AS replica_path,
                                source.storage AS source_node_storage,
                                target.storage AS target_node_storage
                         FROM repositories AS repo
                         JOIN healthy AS target ON target.virtual_storage = repo.virtual_storage
                         LEFT JOIN storage_repositories AS target_replica
                                ON target_replica.repository_id = repo.repository_id
                               AND target_replica.storage = target.storage
                         JOIN storage_repositories AS source
                                ON source.repository_id = repo.repository_id
                               AND source.generation = repo.generation
                               AND source.storage <> target.storage
                         JOIN healthy AS source_healthy
                                ON source_healthy.virtual_storage = repo.virtual_storage
                               AND source_healthy.storage = source.storage
                         WHERE (target_replica.generation IS NULL
                                OR target_replica.generation <> repo.generation)
                           AND (EXISTS (SELECT 1 FROM assignment
                                        WHERE assignment.repository_id = repo.repository_id
                                          AND assignment.storage = target.storage)
                                OR NOT EXISTS (SELECT 1 FROM assignment
                                               WHERE assignment.repository_id = repo.repository_id))
                           AND NOT EXISTS (
                               SELECT 1 FROM active_job
                               WHERE job ->> 'change' = 'update'
                                 AND job ->> 'virtual_storage' = repo.virtual_storage
                                 AND job ->> 'relative_path' = repo.relative_path
                                 AND job ->> 'target_node_storage' = target.storage)
                           AND NOT EXISTS (
                               SELECT 1 FROM active_job
                               WHERE job ->> 'change' = 'delete_replica'
                                 AND job ->> 'virtual_storage' = repo.virtual_storage
                                 AND job ->> 'relative_path' = repo.relative_path
                                 AND job ->> 'target_node_storage' = source.storage)
                         ORDER BY repo.repository_id, target.storage, random()
                     ),
                     delete_job AS (
                         SELECT DISTINCT ON (repo.repository_id)
                                'delete_replica' AS change, repo.repository_id,
                                repo.virtual_storage, repo.relative_path,
                                COALESCE(repo.replica_path, repo.relative_path) AS replica_path,
                                '' AS source_node_storage,
                                replica.storage AS target_node_storage
                         FROM repositories AS repo
                         JOIN storage_repositories AS replica
                                ON replica.repository_id = repo.repository_id
                         JOIN healthy ON healthy.virtual_storage = repo.virtual_storage
                                     AND healthy.storage = replica.storage
                         WHERE EXISTS (SELECT 1 FROM assignment
                                       WHERE assignment.repository_id = repo.repository_id)
                           AND NOT EXISTS (SELECT 1 FROM assignment
                                           WHERE assignment.repository_id = repo.repository_id
                                             AND assignment.storage = replica.storage)
                           AND replica.generation <= (
                               SELECT MIN(COALESCE(assigned_replica.generation, -1))
                               FROM assignment
                               LEFT JOIN storage_repositories AS assigned_replica
                                      ON assigned_replica.repository_id = assignment.repository_id
                                     AND assigned_replica.storage = assignment.storage
                               WHERE assignment.repository_id = repo.repository_id)
                           AND NOT EXISTS (
                               SELECT 1 FROM active_job
                               WHERE job ->> 'virtual_storage' = repo.virtual_storage
                                 AND job ->> 'relative_path' = repo.relative_path
                                 AND (job ->> 'source_node_storage' = replica.storage
                                      OR job ->> 'target_node_storage' = replica.storage))
                           AND NOT EXISTS (
                               SELECT 1 FROM active_job
                               WHERE job ->> 'change' = 'delete_replica'
                                 AND job ->> 'virtual_storage' = repo.virtual_storage
                                 AND job ->> 'relative_path' = repo.relative_path)
                         ORDER BY repo.repository_id, random()
                     ),
                     new_job AS (
                         SELECT * FROM update_job
                         UNION ALL
                         SELECT * FROM delete_job
                     ),
                     chosen AS (
                         SELECT new_job.*,
                                new_job.virtual_storage || '|' || new_job.target_node_storage
                                    || '|' || new_job.relative_path AS lock_id
                         FROM new_job, reconciliation_lock
                         WHERE reconciliation_lock.acquired
                     ),
                     lock_row AS (
                         INSERT INTO replication_queue_lock (id)
                         SELECT DISTINCT lock_id FROM chosen
                         ON CONFLICT (id) DO UPDATE SET acquired = replication_queue_lock.acquired
                     ),
                     inserted AS (
                         INSERT INTO replication_queue (lock_id, job, meta)
                         SELECT lock_id,
                                jsonb_build_object(
                                    'change', change,
                                    'repository_id', repository_id,
                                    'virtual_storage', virtual_storage,
                                    'relative_path', relative_path,
                                    'replica_path', replica_path,
                                    'source_node_storage', source_node_storage,
                                    'target_node_storage', target_node_storage,
                                    'params', NULL),
                                jsonb_build_object('correlation_id', md5(random()::text))
                         FROM chosen
                         RETURNING job
                     )
                     SELECT (SELECT acquired FROM reconciliation_lock),
                            COALESCE((SELECT jsonb_agg(job) FROM inserted), '[]'::jsonb)",
                    )
                    .bind(&healthy_vs)
                    .bind(&healthy_storage)
                    .bind(&configured_vs)
                    .bind(&configured_storage)
                    .bind(RECONCILIATION_LOCK)
                    .fetch_one(&mut *conn)
                    .await
                })
            })
            .await?;
        Ok(row.0.then_some(row.1 .0))
    }
}
