-- Back to matching a pending delete_replica job by path (the rule before 000800). The other
-- objects 000800 replaced are the same as before it on our own databases.
CREATE OR REPLACE VIEW valid_primaries AS
    SELECT repository_id, virtual_storage, relative_path, storage
    FROM (
        SELECT
            replica.repository_id,
            repo.virtual_storage,
            repo.relative_path,
            replica.storage,
            assignment.storage IS NOT NULL AS assigned,
            bool_or(assignment.storage IS NOT NULL)
                OVER (PARTITION BY replica.repository_id) AS any_assigned
        FROM repositories AS repo
        JOIN storage_repositories AS replica
            ON replica.repository_id = repo.repository_id
           AND replica.generation = repo.generation
        JOIN healthy_storages AS healthy
            ON healthy.virtual_storage = repo.virtual_storage
           AND healthy.storage = replica.storage
        LEFT JOIN repository_assignments AS assignment
            ON assignment.repository_id = replica.repository_id
           AND assignment.storage = replica.storage
        WHERE NOT EXISTS (
            SELECT 1
            FROM replication_queue AS queued
            WHERE queued.state NOT IN ('completed', 'dead', 'cancelled')
              AND queued.job ->> 'change' = 'delete_replica'
              AND queued.job ->> 'virtual_storage' = repo.virtual_storage
              AND queued.job ->> 'relative_path' = repo.relative_path
              AND queued.job ->> 'target_node_storage' = replica.storage
        )
    ) AS candidates
    WHERE assigned OR NOT any_assigned;

DROP INDEX replication_queue_pending_delete_replica_idx;
