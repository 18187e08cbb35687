-- storage_cleanups lets routers take turns walking a storage for repositories the database
-- does not know. hello_world is the scratch table of the `check` subcommand's read/write
-- probe. repository_reference_write_locks backs serialized reference writes; deleting a lock
-- row announces the release to waiting routers.
CREATE TABLE storage_cleanups (
    virtual_storage text NOT NULL,
    storage text NOT NULL,
    last_run timestamp without time zone,
    triggered_at timestamp without time zone,
    PRIMARY KEY (virtual_storage, storage)
);

CREATE TABLE hello_world (
    id integer
);

CREATE TABLE repository_reference_write_locks (
    lock_id text PRIMARY KEY,
    holder_txn_id bigint,
    expired_at timestamp with time zone
);

CREATE INDEX repository_reference_write_locks_expired_at_idx
    ON repository_reference_write_locks (expired_at);

CREATE FUNCTION notify_on_write_lock_release() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('repository_reference_write_lock_releases', OLD.lock_id);
    RETURN NULL;
END;
$$;

CREATE TRIGGER notify_on_write_lock_release AFTER DELETE ON repository_reference_write_locks
    FOR EACH ROW EXECUTE FUNCTION notify_on_write_lock_release();
