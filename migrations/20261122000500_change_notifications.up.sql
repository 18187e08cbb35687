-- Routers cache which storages hold the latest generation of a repository. These triggers
-- tell every router, through NOTIFY, which repositories' entries are stale. The payload is a
-- JSON array with one object per virtual storage:
--   [{"virtual_storage": "vs", "relative_paths": ["a.git", "b.git"]}]
-- Updates notify only when a generation or a relative path changed, so verification
-- bookkeeping (verified_at, leases) does not flush caches.
CREATE FUNCTION notify_on_change() RETURNS trigger
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
