-- A replica with a pending delete_replica job is no primary candidate. The job is matched by
-- the repository's id, not its path: a path can be given to another repository (deleted and
-- created again) or changed while the job waits, and matching by path then offered a replica
-- that is about to be removed as the primary. Go Praefect matches by id too. A partial index
-- keeps the check cheap however long the queue is.
--
-- The other objects here are the ones derived from the tables (views, the NOTIFY function and
-- triggers, the write-lock table) in their current form, each created or replaced so that
-- this migration also brings a database adopted from Go Praefect (see
-- src/datastore/adopt.rs), whose objects of the same names differ, to exactly our schema.
-- On a database created by our migrations they are the same as before.

CREATE INDEX IF NOT EXISTS replication_queue_pending_delete_replica_idx
    ON replication_queue ((job ->> 'repository_id'), (job ->> 'target_node_storage'))
    WHERE state NOT IN ('completed', 'cancelled', 'dead')
      AND job ->> 'change' = 'delete_replica';

CREATE OR REPLACE VIEW repository_generations AS
    SELECT virtual_storage, relative_path, max(generation) AS generation
    FROM storage_repositories
    GROUP BY virtual_storage, relative_path;

CREATE OR REPLACE VIEW healthy_storages AS
    SELECT seen.shard_name AS virtual_storage, seen.node_name AS storage
    FROM node_status AS seen
    WHERE seen.last_seen_active_at >= now() - interval '10 seconds'
    GROUP BY seen.shard_name, seen.node_name
    HAVING count(DISTINCT seen.praefect_name) >= (
        SELECT ceil(count(DISTINCT active.praefect_name) / 2.0)
        FROM node_status AS active
        WHERE active.shard_name = seen.shard_name
          AND active.last_contact_attempt_at >= now() - interval '60 seconds'
    );

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
              AND queued.job ->> 'repository_id' = replica.repository_id::text
              AND queued.job ->> 'target_node_storage' = replica.storage
        )
    ) AS candidates
    WHERE assigned OR NOT any_assigned;

CREATE OR REPLACE FUNCTION notify_on_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    payload json;
BEGIN
    IF TG_OP = 'INSERT' THEN
        SELECT json_agg(per_vs.entry) INTO payload
        FROM (
            SELECT json_build_object(
                       'virtual_storage', changed.virtual_storage,
                       'relative_paths', json_agg(DISTINCT changed.relative_path)) AS entry
            FROM new_rows AS changed
            GROUP BY changed.virtual_storage
        ) AS per_vs;
    ELSIF TG_OP = 'DELETE' THEN
        SELECT json_agg(per_vs.entry) INTO payload
        FROM (
            SELECT json_build_object(
                       'virtual_storage', changed.virtual_storage,
                       'relative_paths', json_agg(DISTINCT changed.relative_path)) AS entry
            FROM old_rows AS changed
            GROUP BY changed.virtual_storage
        ) AS per_vs;
    ELSE
        -- Only storage_repositories has an UPDATE trigger; its rows are matched by their stable
        -- identity (repository_id, storage), since the relative path itself may change.
        SELECT json_agg(per_vs.entry) INTO payload
        FROM (
            SELECT json_build_object(
                       'virtual_storage', changed.virtual_storage,
                       'relative_paths', json_agg(DISTINCT changed.relative_path)) AS entry
            FROM (
                SELECT old_row.virtual_storage, path.relative_path
                FROM old_rows AS old_row
                JOIN new_rows AS new_row
                    ON new_row.repository_id = old_row.repository_id
                   AND new_row.storage = old_row.storage
                CROSS JOIN LATERAL (
                    VALUES (old_row.relative_path), (new_row.relative_path)
                ) AS path (relative_path)
                WHERE COALESCE(old_row.generation, -1) <> COALESCE(new_row.generation, -1)
                   OR old_row.relative_path <> new_row.relative_path
            ) AS changed
            GROUP BY changed.virtual_storage
        ) AS per_vs;
    END IF;

    IF payload IS NOT NULL THEN
        PERFORM pg_notify(TG_ARGV[0], payload::text);
    END IF;
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS notify_on_insert ON storage_repositories;
DROP TRIGGER IF EXISTS notify_on_update ON storage_repositories;
DROP TRIGGER IF EXISTS notify_on_delete ON storage_repositories;
DROP TRIGGER IF EXISTS notify_on_delete ON repositories;

CREATE TRIGGER notify_on_insert AFTER INSERT ON storage_repositories
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION notify_on_change('storage_repositories_updates');

CREATE TRIGGER notify_on_update AFTER UPDATE ON storage_repositories
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION notify_on_change('storage_repositories_updates');

CREATE TRIGGER notify_on_delete AFTER DELETE ON storage_repositories
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION notify_on_change('storage_repositories_updates');

CREATE TRIGGER notify_on_delete AFTER DELETE ON repositories
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION notify_on_change('repositories_updates');

CREATE TABLE IF NOT EXISTS repository_reference_write_locks (
    lock_id text PRIMARY KEY,
    holder_txn_id bigint,
    expired_at timestamp with time zone
);

CREATE INDEX IF NOT EXISTS repository_reference_write_locks_expired_at_idx
    ON repository_reference_write_locks (expired_at);

CREATE OR REPLACE FUNCTION notify_on_write_lock_release() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('repository_reference_write_lock_releases', OLD.lock_id);
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS notify_on_write_lock_release ON repository_reference_write_locks;

CREATE TRIGGER notify_on_write_lock_release AFTER DELETE ON repository_reference_write_locks
    FOR EACH ROW EXECUTE FUNCTION notify_on_write_lock_release();
