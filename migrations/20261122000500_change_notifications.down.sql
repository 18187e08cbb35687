DROP TRIGGER notify_on_delete ON repositories;
DROP TRIGGER notify_on_delete ON storage_repositories;
DROP TRIGGER notify_on_update ON storage_repositories;
DROP TRIGGER notify_on_insert ON storage_repositories;
DROP FUNCTION notify_on_change();
