-- Dequeue and acknowledgement find a replica's jobs by lock id; without this index every
-- dequeue read the whole queue (100,000 queued jobs: ~26-88 ms per dequeue, ~15 ms with it).
CREATE INDEX replication_queue_lock_id_idx ON replication_queue (lock_id);

-- Dequeue finds a target's locks by the prefix '<virtual_storage>|<target>|'; a pattern index
-- makes that prefix search indexable whatever the database's collation is.
CREATE INDEX replication_queue_lock_id_pattern_idx
    ON replication_queue_lock (id text_pattern_ops);
