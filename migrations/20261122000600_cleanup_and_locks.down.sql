DROP TRIGGER notify_on_write_lock_release ON repository_reference_write_locks;
DROP FUNCTION notify_on_write_lock_release();
DROP TABLE repository_reference_write_locks;
DROP TABLE hello_world;
DROP TABLE storage_cleanups;
