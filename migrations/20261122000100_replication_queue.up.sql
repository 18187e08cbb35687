-- The replication queue: jobs that bring a replica up to date or remove it, the per-target
-- locks that keep two jobs for the same replica from running at once, and the job locks whose
-- triggered_at is the liveness heartbeat of a running job.
CREATE TYPE replication_job_state AS ENUM (
    'ready', 'in_progress', 'completed', 'cancelled', 'failed', 'dead'
);

CREATE TABLE replication_queue_lock (
    id text PRIMARY KEY,
    acquired boolean NOT NULL DEFAULT false
);

CREATE TABLE replication_queue (
    id bigserial PRIMARY KEY,
    state replication_job_state NOT NULL DEFAULT 'ready',
    created_at timestamp without time zone NOT NULL DEFAULT (now() AT TIME ZONE 'UTC'),
    updated_at timestamp without time zone,
    attempt integer NOT NULL DEFAULT 3,
    lock_id text,
    job jsonb,
    meta jsonb
);

CREATE TABLE replication_queue_job_lock (
    job_id bigint NOT NULL REFERENCES replication_queue (id),
    lock_id text NOT NULL REFERENCES replication_queue_lock (id),
    triggered_at timestamp without time zone NOT NULL DEFAULT (now() AT TIME ZONE 'UTC'),
    PRIMARY KEY (job_id, lock_id)
);

CREATE INDEX virtual_target_on_replication_queue_idx
    ON replication_queue ((job ->> 'virtual_storage'), (job ->> 'target_node_storage'));

CREATE INDEX replication_queue_target_index
    ON replication_queue (
        (job ->> 'virtual_storage'), (job ->> 'relative_path'),
        (job ->> 'target_node_storage'), (job ->> 'change')
    )
    WHERE state NOT IN ('completed', 'cancelled', 'dead');

-- At most one active delete_replica job per repository.
CREATE UNIQUE INDEX delete_replica_unique_index
    ON replication_queue ((job ->> 'virtual_storage'), (job ->> 'relative_path'))
    WHERE state NOT IN ('completed', 'cancelled', 'dead')
      AND job ->> 'change' = 'delete_replica';
