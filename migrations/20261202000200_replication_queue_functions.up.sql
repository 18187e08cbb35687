-- The replication queue's two hot statements as functions, and its job locks without foreign
-- keys: together they take a drain of a 100,000-job backlog (4 workers, batches of 100) from
-- about 6,000 to about 12,000 jobs/s on two cores.
--
-- Functions: the router sends its statements unnamed (PgBouncer in transaction mode cannot
-- keep named ones), so PostgreSQL plans each one again on every call; these two plan in about
-- 1.4 and 1.0 ms, a tenth of a 100-job dequeue and most of a 10-job one. A PL/pgSQL function
-- keeps its statement's plan for the life of the server session, whoever pools it.
-- `#variable_conflict use_column`: the bodies name columns that the result columns are named
-- after too; they take their arguments as $1, $2, ...
--
-- Foreign keys: checking them was a third of both statements' time (one trigger query per job
-- lock inserted and per job deleted). The queue's statements keep what they guaranteed: a job
-- lock is inserted in the statement that marks its job in_progress and locks its lock row, and
-- deleted in the statement that deletes or settles its job, before it; nothing else deletes an
-- in_progress job or a lock that has job locks. A job lock left behind by a bug would stop
-- being refreshed and be released as stale after a minute, like one of a router that died.
ALTER TABLE replication_queue_job_lock
    DROP CONSTRAINT IF EXISTS replication_queue_job_lock_job_id_fkey,
    DROP CONSTRAINT IF EXISTS replication_queue_job_lock_lock_id_fkey;

-- Takes up to $3 jobs of target $2 of virtual storage $1 (see DEQUEUE_SQL in
-- src/datastore/queue.rs for how).
CREATE FUNCTION replication_queue_dequeue(text, text, bigint)
RETURNS TABLE (id bigint, state text, attempt integer, lock_id text, job jsonb, meta jsonb,
               created_at timestamp without time zone, updated_at timestamp without time zone)
LANGUAGE plpgsql AS $function$
#variable_conflict use_column
BEGIN
    RETURN QUERY
        WITH candidate AS (
                SELECT queue.id FROM replication_queue AS queue
                JOIN replication_queue_lock AS lock ON lock.id = queue.lock_id
                WHERE queue.state IN ('ready', 'failed')
                  AND queue.job ->> 'virtual_storage' = $1
                  AND queue.job ->> 'target_node_storage' = $2
                  AND NOT lock.acquired
                  AND NOT EXISTS (SELECT 1 FROM replication_queue_job_lock AS job_lock
                                  WHERE job_lock.lock_id = queue.lock_id)
                  AND NOT EXISTS (SELECT 1 FROM replication_queue AS older
                                  WHERE older.lock_id = queue.lock_id
                                    AND older.state IN ('ready', 'failed')
                                    AND older.job ->> 'change' = queue.job ->> 'change'
                                    AND (older.created_at, older.id)
                                        < (queue.created_at, queue.id))
                ORDER BY queue.created_at, queue.id
                LIMIT $3
                FOR UPDATE OF queue, lock SKIP LOCKED
            ),
            taken AS (
                UPDATE replication_queue AS queue
                SET state = 'in_progress',
                    updated_at = now() AT TIME ZONE 'UTC',
                    attempt = CASE WHEN queue.job ->> 'change' = 'delete_replica'
                                   THEN queue.attempt ELSE queue.attempt - 1 END
                FROM candidate WHERE queue.id = candidate.id
                RETURNING queue.id, queue.state::text, queue.attempt, queue.lock_id,
                          queue.job, queue.meta, queue.created_at, queue.updated_at
            ),
            job_lock AS (
                INSERT INTO replication_queue_job_lock (job_id, lock_id, triggered_at)
                SELECT taken.id, taken.lock_id, now() AT TIME ZONE 'UTC' FROM taken
                RETURNING lock_id
            ),
            acquired AS (
                UPDATE replication_queue_lock AS lock SET acquired = true
                WHERE lock.id = ANY(ARRAY(SELECT lock_id FROM job_lock))
            )
            SELECT * FROM taken ORDER BY created_at, id;
END
$function$;

-- Records outcome $2 of the in_progress jobs among $1 and returns their ids (see
-- ACKNOWLEDGE_SQL in src/datastore/queue.rs).
CREATE FUNCTION replication_queue_acknowledge(bigint[], text)
RETURNS TABLE (id bigint)
LANGUAGE plpgsql AS $function$
#variable_conflict use_column
BEGIN
    RETURN QUERY
        WITH acked AS (
                SELECT id, lock_id, updated_at, job FROM replication_queue
                WHERE id = ANY($1) AND state = 'in_progress'
                ORDER BY id
                FOR UPDATE
            ),
            dropped_job_lock AS (
                DELETE FROM replication_queue_job_lock AS job_lock
                USING acked WHERE job_lock.job_id = acked.id
            ),
            redundant AS (
                DELETE FROM replication_queue AS redundant
                USING acked AS done
                WHERE $2::text = 'completed'
                  AND redundant.state = 'ready'
                  AND redundant.lock_id = done.lock_id
                  AND redundant.job ->> 'change' = done.job ->> 'change'
                  AND COALESCE(redundant.job ->> 'source_node_storage', '')
                      = COALESCE(done.job ->> 'source_node_storage', '')
                  AND redundant.created_at < done.updated_at
            ),
            deleted AS (
                DELETE FROM replication_queue AS queue
                USING acked
                WHERE $2::text IN ('completed', 'dead') AND queue.id = acked.id
            ),
            updated AS (
                UPDATE replication_queue AS queue
                SET state = $2::text::replication_job_state,
                    updated_at = now() AT TIME ZONE 'UTC'
                FROM acked
                WHERE $2::text NOT IN ('completed', 'dead') AND queue.id = acked.id
            ),
            released AS (
                UPDATE replication_queue_lock AS lock SET acquired = false
                WHERE lock.id IN (SELECT lock_id FROM acked)
                  AND NOT EXISTS (SELECT 1 FROM replication_queue_job_lock AS job_lock
                                  WHERE job_lock.lock_id = lock.id
                                    AND job_lock.job_id NOT IN (SELECT id FROM acked))
            )
            SELECT id FROM acked ORDER BY id;
END
$function$;
