//! Health observations of the routers (`node_status`) and their cluster-wide verdict (the
//! `healthy_storages` view).

use super::{sql, Datastore, DatastoreError};

/// The result of one health check by this router.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthObservation {
    pub virtual_storage: String,
    pub storage: String,
    pub healthy: bool,
}

/// A storage that a quorum of the active routers sees as healthy.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HealthyStorage {
    pub virtual_storage: String,
    pub storage: String,
}

impl Datastore {
    /// Records one health round of router `praefect_name` in one statement: every node's
    /// contact attempt is now, and its last-seen-active time is now if it was healthy.
    pub async fn record_health(
        &self,
        praefect_name: &str,
        observations: &[HealthObservation],
    ) -> Result<(), DatastoreError> {
        let virtual_storages: Vec<&str> = observations
            .iter()
            .map(|o| o.virtual_storage.as_str())
            .collect();
        let storages: Vec<&str> = observations.iter().map(|o| o.storage.as_str()).collect();
        let healthy: Vec<bool> = observations.iter().map(|o| o.healthy).collect();
        self.run("record_health", |conn| Box::pin(async move {
            // Rows are written in a fixed order so that routers upserting at the same time
            // cannot deadlock on each other's rows.
            sql::query(
                "INSERT INTO node_status
                     (praefect_name, shard_name, node_name, last_contact_attempt_at, last_seen_active_at)
                 SELECT $1, observed.shard_name, observed.node_name, now(),
                        CASE WHEN observed.healthy THEN now() END
                 FROM unnest($2::text[], $3::text[], $4::boolean[])
                      AS observed (shard_name, node_name, healthy)
                 ORDER BY observed.shard_name, observed.node_name
                 ON CONFLICT (praefect_name, shard_name, node_name) DO UPDATE SET
                     last_contact_attempt_at = now(),
                     last_seen_active_at = COALESCE(EXCLUDED.last_seen_active_at,
                                                    node_status.last_seen_active_at)",
            )
            .bind(praefect_name)
            .bind(&virtual_storages)
            .bind(&storages)
            .bind(&healthy)
            .execute(&mut *conn)
            .await
            .map(|_| ())
        }))
        .await
    }

    /// The storages a quorum of active routers currently sees as healthy, sorted.
    pub async fn healthy_storages(&self) -> Result<Vec<HealthyStorage>, DatastoreError> {
        let rows: Vec<(String, String)> = self
            .run("healthy_storages", |conn| {
                Box::pin(async move {
                    sql::query_as(
                        "SELECT virtual_storage, storage FROM healthy_storages ORDER BY 1, 2",
                    )
                    .fetch_all(&mut *conn)
                    .await
                })
            })
            .await?;
        Ok(rows
            .into_iter()
            .map(|(virtual_storage, storage)| HealthyStorage {
                virtual_storage,
                storage,
            })
            .collect())
    }
}
