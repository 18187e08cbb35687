DROP TABLE replication_queue_job_lock;
DROP TABLE replication_queue;
DROP TABLE replication_queue_lock;
DROP TYPE replication_job_state;
