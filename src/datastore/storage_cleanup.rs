//! Turns of the repositories cleanup (`storage_cleanups`): every router runs the cleanup
//! worker, and the rows decide which router walks which storage when, so that each storage is
//! walked once per run interval however many routers there are.
//!
//! A router takes a storage by setting `triggered_at` (one statement, `SKIP LOCKED`), keeps
//! it fresh while it walks, and sets `last_run` when done. A router that dies mid-walk stops
//! refreshing `triggered_at`, and once that is older than the liveness interval another
//! router may take the storage.

use std::time::Duration;

use super::{sql, Datastore, DatastoreError};

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

impl Datastore {
    /// Adds a row for every (virtual storage, storage) pair not there yet.
    pub async fn populate_storage_cleanups(
        &self,
        pairs: &[(String, String)],
    ) -> Result<(), DatastoreError> {
        let (virtual_storages, storages): (Vec<String>, Vec<String>) =
            pairs.iter().cloned().unzip();
        self.run("populate_storage_cleanups", |conn| {
            Box::pin(async move {
                sql::query(
                    "INSERT INTO storage_cleanups (virtual_storage, storage)
                     SELECT * FROM unnest($1::text[], $2::text[])
                     ON CONFLICT (virtual_storage, storage) DO NOTHING",
                )
                .bind(&virtual_storages)
                .bind(&storages)
                .execute(&mut *conn)
                .await?;
                Ok(())
            })
        })
        .await
    }

    /// Takes the storage walked longest ago, if its last walk is at least `run_interval` old
    /// and no live router (one that refreshed it within `liveness`) is walking it now.
    pub async fn acquire_cleanup_storage(
        &self,
        run_interval: Duration,
        liveness: Duration,
    ) -> Result<Option<(String, String)>, DatastoreError> {
        self.run("acquire_cleanup_storage", |conn| {
            Box::pin(async move {
                sql::query_as(
                    "UPDATE storage_cleanups SET triggered_at = now() AT TIME ZONE 'UTC'
                     WHERE (virtual_storage, storage) IN (
                         SELECT virtual_storage, storage FROM storage_cleanups
                         WHERE COALESCE(last_run, 'epoch')
                                   <= (now() AT TIME ZONE 'UTC') - $1::bigint * interval '1 millisecond'
                           AND COALESCE(triggered_at, 'epoch')
                                   <= (now() AT TIME ZONE 'UTC') - $2::bigint * interval '1 millisecond'
                         ORDER BY last_run NULLS FIRST, virtual_storage, storage
                         LIMIT 1
                         FOR UPDATE SKIP LOCKED)
                     RETURNING virtual_storage, storage",
                )
                .bind(millis(run_interval))
                .bind(millis(liveness))
                .fetch_optional(&mut *conn)
                .await
            })
        })
        .await
    }

    /// Says that this router is still walking the storage.
    pub async fn refresh_cleanup_storage(
        &self,
        virtual_storage: &str,
        storage: &str,
    ) -> Result<(), DatastoreError> {
        self.finish_or_refresh("refresh_cleanup_storage", virtual_storage, storage, false)
            .await
    }

    /// Records that the walk of the storage is done (or given up), so that it is next due one
    /// run interval from now.
    pub async fn release_cleanup_storage(
        &self,
        virtual_storage: &str,
        storage: &str,
    ) -> Result<(), DatastoreError> {
        self.finish_or_refresh("release_cleanup_storage", virtual_storage, storage, true)
            .await
    }

    async fn finish_or_refresh(
        &self,
        op: &'static str,
        virtual_storage: &str,
        storage: &str,
        finished: bool,
    ) -> Result<(), DatastoreError> {
        self.run(op, |conn| {
            Box::pin(async move {
                sql::query(
                    "UPDATE storage_cleanups
                     SET triggered_at = CASE WHEN $3 THEN NULL ELSE now() AT TIME ZONE 'UTC' END,
                         last_run = CASE WHEN $3 THEN now() AT TIME ZONE 'UTC' ELSE last_run END
                     WHERE virtual_storage = $1 AND storage = $2",
                )
                .bind(virtual_storage)
                .bind(storage)
                .bind(finished)
                .execute(&mut *conn)
                .await?;
                Ok(())
            })
        })
        .await
    }
}
