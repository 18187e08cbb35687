//! The reconciler's one statement (spec §5, "Reconciler"): queue `update` jobs for assigned
//! replicas that are behind or missing, and `delete_replica` jobs for unassigned replicas
//! that are safe to drop. A transaction-scoped advisory lock lets one router schedule at a
//! time; the others' statements do nothing.
//!
//! The statement is set-based, and at a million repositories that is the difference between
//! half a minute and never finishing: every check is a join over whole tables (a few passes,
//! each linear), never a subquery run per row against a common table expression (which
//! PostgreSQL materializes without indexes, so each row scanned it whole: quadratic). The
//! replicas that are behind (`outdated`) and the unassigned replicas that could go
//! (`unassigned_replica`) are computed first, on their own (`OFFSET 0` keeps the planner from
//! folding them into the joins after them, which it did, joining three million candidates
//! before dropping the 95% that are up to date); the checks against active jobs run on those
//! few only, as hash anti-joins. `scale_bench` measures it (README, "A million repositories").

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
                     configured_assignment AS (
                         SELECT assigned.repository_id, assigned.storage
                         FROM repository_assignments AS assigned
                         JOIN repositories AS repo USING (repository_id)
                         JOIN configured ON configured.virtual_storage = repo.virtual_storage
                                        AND configured.storage = assigned.storage
                     ),
                     assigned_repository AS (
                         SELECT assigned.repository_id,
                                MIN(COALESCE(assigned_replica.generation, -1)) AS min_generation
                         FROM configured_assignment AS assigned
                         LEFT JOIN storage_repositories AS assigned_replica
                                ON assigned_replica.repository_id = assigned.repository_id
                               AND assigned_replica.storage = assigned.storage
                         GROUP BY assigned.repository_id
                     ),
                     outdated AS (
                         SELECT repo.repository_id, repo.virtual_storage, repo.relative_path,
                                COALESCE(repo.replica_path, repo.relative_path) AS replica_path,
                                repo.generation, target.storage AS target_storage
                         FROM repositories AS repo
                         JOIN healthy AS target ON target.virtual_storage = repo.virtual_storage
                         LEFT JOIN storage_repositories AS target_replica
                                ON target_replica.repository_id = repo.repository_id
                               AND target_replica.storage = target.storage
                         WHERE target_replica.generation IS NULL
                            OR target_replica.generation <> repo.generation
                         OFFSET 0
                     ),
                     update_job AS (
                         SELECT DISTINCT ON (outdated.repository_id, outdated.target_storage)
                                'update' AS change, outdated.repository_id, outdated.virtual_storage,
                                outdated.relative_path, outdated.replica_path,
                                source.storage AS source_node_storage,
                                outdated.target_storage AS target_node_storage
                         FROM outdated
                         JOIN storage_repositories AS source
                                ON source.repository_id = outdated.repository_id
                               AND source.generation = outdated.generation
                               AND source.storage <> outdated.target_storage
                         JOIN healthy AS source_healthy
                                ON source_healthy.virtual_storage = outdated.virtual_storage
                               AND source_healthy.storage = source.storage
                         LEFT JOIN assigned_repository
                                ON assigned_repository.repository_id = outdated.repository_id
                         LEFT JOIN configured_assignment AS target_assigned
                                ON target_assigned.repository_id = outdated.repository_id
                               AND target_assigned.storage = outdated.target_storage
                         WHERE (target_assigned.repository_id IS NOT NULL
                                OR assigned_repository.repository_id IS NULL)
                           AND NOT EXISTS (
                               SELECT 1 FROM replication_queue AS active
                               WHERE active.state NOT IN ('completed', 'cancelled', 'dead')
                                 AND active.job ->> 'change' = 'update'
                                 AND active.job ->> 'virtual_storage' = outdated.virtual_storage
                                 AND active.job ->> 'relative_path' = outdated.relative_path
                                 AND active.job ->> 'target_node_storage' = outdated.target_storage)
                           AND NOT EXISTS (
                               SELECT 1 FROM replication_queue AS active
                               WHERE active.state NOT IN ('completed', 'cancelled', 'dead')
                                 AND active.job ->> 'change' = 'delete_replica'
                                 AND active.job ->> 'virtual_storage' = outdated.virtual_storage
                                 AND active.job ->> 'relative_path' = outdated.relative_path
                                 AND active.job ->> 'target_node_storage' = source.storage)
                         ORDER BY outdated.repository_id, outdated.target_storage, random()
                     ),
                     unassigned_replica AS (
                         SELECT replica.repository_id, replica.storage
                         FROM assigned_repository
                         JOIN storage_repositories AS replica
                                ON replica.repository_id = assigned_repository.repository_id
                               AND replica.generation <= assigned_repository.min_generation
                         LEFT JOIN configured_assignment AS replica_assigned
                                ON replica_assigned.repository_id = replica.repository_id
                               AND replica_assigned.storage = replica.storage
                         WHERE replica_assigned.repository_id IS NULL
                         OFFSET 0
                     ),
                     delete_job AS (
                         SELECT DISTINCT ON (repo.repository_id)
                                'delete_replica' AS change, repo.repository_id,
                                repo.virtual_storage, repo.relative_path,
                                COALESCE(repo.replica_path, repo.relative_path) AS replica_path,
                                '' AS source_node_storage,
                                replica.storage AS target_node_storage
                         FROM unassigned_replica AS replica
                         JOIN repositories AS repo ON repo.repository_id = replica.repository_id
                         JOIN healthy ON healthy.virtual_storage = repo.virtual_storage
                                     AND healthy.storage = replica.storage
                         WHERE NOT EXISTS (
                               SELECT 1 FROM replication_queue AS active
                               WHERE active.state NOT IN ('completed', 'cancelled', 'dead')
                                 AND active.job ->> 'virtual_storage' = repo.virtual_storage
                                 AND active.job ->> 'relative_path' = repo.relative_path
                                 AND active.job ->> 'source_node_storage' = replica.storage)
                           AND NOT EXISTS (
                               SELECT 1 FROM replication_queue AS active
                               WHERE active.state NOT IN ('completed', 'cancelled', 'dead')
                                 AND active.job ->> 'virtual_storage' = repo.virtual_storage
                                 AND active.job ->> 'relative_path' = repo.relative_path
                                 AND active.job ->> 'target_node_storage' = replica.storage)
                           AND NOT EXISTS (
                               SELECT 1 FROM replication_queue AS active
                               WHERE active.state NOT IN ('completed', 'cancelled', 'dead')
                                 AND active.job ->> 'change' = 'delete_replica'
                                 AND active.job ->> 'virtual_storage' = repo.virtual_storage
                                 AND active.job ->> 'relative_path' = repo.relative_path)
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
