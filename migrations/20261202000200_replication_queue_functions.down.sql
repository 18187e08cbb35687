DROP FUNCTION replication_queue_acknowledge(bigint[], text);
DROP FUNCTION replication_queue_dequeue(text, text, bigint);
DELETE FROM replication_queue_job_lock AS job_lock
WHERE NOT EXISTS (SELECT 1 FROM replication_queue AS queue WHERE queue.id = job_lock.job_id)
   OR NOT EXISTS (SELECT 1 FROM replication_queue_lock AS lock WHERE lock.id = job_lock.lock_id);
ALTER TABLE replication_queue_job_lock
    ADD CONSTRAINT replication_queue_job_lock_job_id_fkey
        FOREIGN KEY (job_id) REFERENCES replication_queue (id),
    ADD CONSTRAINT replication_queue_job_lock_lock_id_fkey
        FOREIGN KEY (lock_id) REFERENCES replication_queue_lock (id);
