-- Dequeue walks a target's runnable jobs oldest first and stops once it has a batch: this
-- partial index holds exactly those jobs (`ready` or `failed`), by virtual storage and target,
-- in the order they are taken, so a dequeue reads about as many entries as it takes instead
-- of every free lock of the target (1,000 per target with a 100,000-job backlog).
CREATE INDEX replication_queue_dequeue_idx
    ON replication_queue (
        (job ->> 'virtual_storage'), (job ->> 'target_node_storage'), created_at, id
    )
    WHERE state IN ('ready', 'failed');

-- Dequeue and acknowledgement ask whether a lock has job locks; the primary key
-- (job_id, lock_id) cannot answer that by lock id, so each question read the whole index,
-- dead entries of every job since the last vacuum included.
CREATE INDEX replication_queue_job_lock_lock_id_idx ON replication_queue_job_lock (lock_id);
