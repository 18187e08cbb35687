//! What the status page (`crate::status`) asks the database: every router's health
//! observations, the replication queue by target and state, repository counts by state, and
//! one repository's queued jobs.
//!
//! The page is served by every router and may be reloaded by many people at once, so each
//! statement here is bounded twice: by `statement_timeout` inside its transaction (the server
//! cancels a statement that runs too long, which is a query error and leaves the router's
//! writer tracker alone), and by the operation's own timeout as a backstop. Which of them read
//! the repository tables in full, and how the page keeps that rare, is in `crate::status`.

use std::time::Duration;

use super::{sql, Datastore, DatastoreError, Tx};

/// One router's latest observation of one node (`node_status`), for routers active in the
/// last minute.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct NodeObservation {
    pub praefect_name: String,
    pub virtual_storage: String,
    pub storage: String,
    /// Seen healthy in the last 10 seconds, the window the quorum counts.
    pub healthy: bool,
    /// Seconds since this router last saw the node healthy; None if it never did.
    pub seen_seconds_ago: Option<f64>,
}

/// The routers' health observations and their quorum verdict.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterHealth {
    pub observations: Vec<NodeObservation>,
    /// (virtual storage, storage) pairs the `healthy_storages` view lists.
    pub quorum_healthy: Vec<(String, String)>,
}

/// Replication jobs of one target in one state.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct QueueGroup {
    pub virtual_storage: String,
    pub target_node: String,
    pub state: String,
    pub count: i64,
    /// Age of the oldest job of the group, in seconds.
    pub oldest_seconds: f64,
}

/// Repositories of one virtual storage by state (each repository in exactly one: the worst
/// that applies), and its replicas by verification state.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow, serde::Serialize)]
pub struct RepositoryCounts {
    pub virtual_storage: String,
    pub repositories: i64,
    /// Every assigned storage holds the latest generation.
    pub healthy: i64,
    /// Available, but an assigned storage lacks the latest generation (or the replica).
    pub outdated: i64,
    /// No valid primary: no replica at the latest generation on a storage the routers agree
    /// is healthy (what `praefect dataloss` lists).
    pub unavailable: i64,
    /// Readable, but no valid primary is on an assigned storage: writes are refused
    /// (`primary node is not assigned`) until one is.
    pub read_only: i64,
    pub replicas: i64,
    /// Replicas verified within the verification interval.
    pub verified: i64,
    /// Replicas verified longer ago than the interval.
    pub expired: i64,
    /// Replicas never verified.
    pub unverified: i64,
}

/// A queued job of one repository.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow, serde::Serialize)]
pub struct RepositoryJob {
    pub id: i64,
    pub state: String,
    pub change: Option<String>,
    pub source: Option<String>,
    pub target: Option<String>,
    pub attempts_left: i32,
    pub age_seconds: f64,
}

/// The most jobs listed for one repository.
pub const REPOSITORY_JOBS_LIMIT: i64 = 100;

/// Makes the server cancel any statement of this transaction that runs longer than `timeout`.
async fn bound(conn: &mut Tx<'_>, timeout: Duration) -> Result<(), sqlx::Error> {
    let millis = timeout.as_millis().max(1).to_string();
    sql::query("SELECT set_config('statement_timeout', $1, true)")
        .bind(millis)
        .execute(&mut *conn)
        .await
        .map(|_| ())
}

/// The backstop around an operation bounded by `timeout` on the server.
fn backstop(timeout: Duration) -> Duration {
    timeout + Duration::from_secs(1)
}

impl Datastore {
    /// Every active router's view of every node, and the quorum's verdict. `node_status`
    /// has one row per router and node: a few dozen rows.
    pub async fn cluster_health(&self, timeout: Duration) -> Result<ClusterHealth, DatastoreError> {
        self.run_with_timeout("status_cluster_health", backstop(timeout), move |conn| {
            Box::pin(async move {
                bound(conn, timeout).await?;
                let observations = sql::query_as(NODE_OBSERVATIONS_SQL)
                    .fetch_all(&mut *conn)
                    .await?;
                let quorum_healthy = sql::query_as(
                    "SELECT virtual_storage, storage FROM healthy_storages ORDER BY 1, 2",
                )
                .fetch_all(&mut *conn)
                .await?;
                Ok(ClusterHealth {
                    observations,
                    quorum_healthy,
                })
            })
        })
        .await
    }

    /// The replication queue by virtual storage, target and state, with each group's oldest
    /// job. Completed and dead jobs are deleted on acknowledgement, so this reads the
    /// backlog, not the history.
    pub async fn queue_groups(&self, timeout: Duration) -> Result<Vec<QueueGroup>, DatastoreError> {
        self.run_with_timeout("status_queue", backstop(timeout), move |conn| {
            Box::pin(async move {
                bound(conn, timeout).await?;
                sql::query_as(QUEUE_GROUPS_SQL).fetch_all(&mut *conn).await
            })
        })
        .await
    }

    /// Repositories by state and replicas by verification state, per virtual storage.
    /// `configured` lists every configured (virtual storage, storage); `interval` is the
    /// verification interval (zero: the verification columns count nothing meaningful).
    ///
    /// One pass over `storage_repositories`, `repositories` and `repository_assignments`, in
    /// slices of [`COUNTS_SLICE`] repository ids, each its own statement within `timeout`:
    /// the whole pass grows with the number of repositories (about 2.5 s per 100,000 on a
    /// loaded 2-core machine), which no single statement under `scrape_timeout` could do at
    /// a million; a slice reads its ids' rows through the tables' primary keys. The status
    /// page counts in the background and shows the last counts meanwhile (see
    /// `crate::status`).
    ///
    /// The rules are those of the `valid_primaries` view: a replica is a primary candidate
    /// when it holds the latest generation, its storage is healthy by quorum and no
    /// `delete_replica` job is pending for it; a repository has a valid primary exactly when
    /// it has a candidate (an assigned one, or any when none is assigned).
    pub async fn repository_counts(
        &self,
        configured: &[(String, String)],
        interval: Duration,
        timeout: Duration,
    ) -> Result<Vec<RepositoryCounts>, DatastoreError> {
        let (virtual_storages, storages): (Vec<String>, Vec<String>) =
            configured.iter().cloned().unzip();
        let seconds = interval.as_secs_f64();
        let last: i64 = self
            .run_with_timeout("status_repository_id_max", backstop(timeout), move |conn| {
                Box::pin(async move {
                    bound(conn, timeout).await?;
                    sql::query_scalar("SELECT COALESCE(max(repository_id), 0) FROM repositories")
                        .fetch_one(&mut *conn)
                        .await
                })
            })
            .await?;
        let mut totals: Vec<RepositoryCounts> = Vec::new();
        let mut low = 0;
        while low < last {
            let high = low.saturating_add(COUNTS_SLICE);
            let (vs, st) = (&virtual_storages, &storages);
            let slice: Vec<RepositoryCounts> = self
                .run_with_timeout("status_repository_counts", backstop(timeout), move |conn| {
                    Box::pin(async move {
                        bound(conn, timeout).await?;
                        // JIT compilation costs more than it saves on this one-pass
                        // aggregate, and its per-repository aggregate and hash joins would
                        // spill to disk with the default work_mem.
                        sql::query(COUNTS_SETTINGS_SQL).execute(&mut *conn).await?;
                        sql::query_as(REPOSITORY_COUNTS_SQL)
                            .bind(vs)
                            .bind(st)
                            .bind(seconds)
                            .bind(low)
                            .bind(high)
                            .fetch_all(&mut *conn)
                            .await
                    })
                })
                .await?;
            add_counts(&mut totals, slice);
            low = high;
        }
        Ok(totals)
    }

    /// A repository's jobs that are not done yet (oldest first, at most
    /// [`REPOSITORY_JOBS_LIMIT`]), found through the queue's target index.
    pub async fn repository_jobs(
        &self,
        virtual_storage: &str,
        relative_path: &str,
        timeout: Duration,
    ) -> Result<Vec<RepositoryJob>, DatastoreError> {
        self.run_with_timeout("status_repository_jobs", backstop(timeout), move |conn| {
            Box::pin(async move {
                bound(conn, timeout).await?;
                sql::query_as(REPOSITORY_JOBS_SQL)
                    .bind(virtual_storage)
                    .bind(relative_path)
                    .bind(REPOSITORY_JOBS_LIMIT)
                    .fetch_all(&mut *conn)
                    .await
            })
        })
        .await
    }
}

/// Every active router's latest observation of every node (see
/// [`Datastore::cluster_health`]).
pub const NODE_OBSERVATIONS_SQL: &str = "
SELECT praefect_name, shard_name AS virtual_storage, node_name AS storage,
       COALESCE(last_seen_active_at >= now() - interval '10 seconds', false) AS healthy,
       EXTRACT(EPOCH FROM now() - last_seen_active_at)::float8 AS seen_seconds_ago
FROM node_status
WHERE last_contact_attempt_at >= now() - interval '60 seconds'
ORDER BY shard_name, node_name, praefect_name";

/// See [`Datastore::queue_groups`].
pub const QUEUE_GROUPS_SQL: &str = "
SELECT COALESCE(job ->> 'virtual_storage', '') AS virtual_storage,
       COALESCE(job ->> 'target_node_storage', '') AS target_node,
       state::text AS state, count(*) AS count,
       EXTRACT(EPOCH FROM (now() AT TIME ZONE 'UTC') - min(created_at))::float8 AS oldest_seconds
FROM replication_queue GROUP BY 1, 2, 3 ORDER BY 1, 2, 3";

/// See [`Datastore::repository_jobs`]. `$1`: virtual storage, `$2`: relative path, `$3`:
/// the limit.
pub const REPOSITORY_JOBS_SQL: &str = "
SELECT id, state::text AS state, job ->> 'change' AS change,
       job ->> 'source_node_storage' AS source, job ->> 'target_node_storage' AS target,
       attempt AS attempts_left,
       EXTRACT(EPOCH FROM (now() AT TIME ZONE 'UTC') - created_at)::float8 AS age_seconds
FROM replication_queue
WHERE job ->> 'virtual_storage' = $1 AND job ->> 'relative_path' = $2
  AND state NOT IN ('completed', 'cancelled', 'dead')
ORDER BY id LIMIT $3";

/// Repository ids per statement of the repository counts.
pub const COUNTS_SLICE: i64 = 50_000;

/// Adds the counts of one slice to the totals, by virtual storage.
fn add_counts(totals: &mut Vec<RepositoryCounts>, slice: Vec<RepositoryCounts>) {
    for counts in slice {
        match totals
            .iter_mut()
            .find(|total| total.virtual_storage == counts.virtual_storage)
        {
            Some(total) => {
                total.repositories += counts.repositories;
                total.healthy += counts.healthy;
                total.outdated += counts.outdated;
                total.unavailable += counts.unavailable;
                total.read_only += counts.read_only;
                total.replicas += counts.replicas;
                total.verified += counts.verified;
                total.expired += counts.expired;
                total.unverified += counts.unverified;
            }
            None => totals.push(counts),
        }
    }
    totals.sort_by(|a, b| a.virtual_storage.cmp(&b.virtual_storage));
}

/// The settings of the repository counts' transaction.
pub const COUNTS_SETTINGS_SQL: &str =
    "SELECT set_config('jit', 'off', true), set_config('work_mem', '64MB', true)";

/// See [`Datastore::repository_counts`]. `$1`, `$2`: configured (virtual storage, storage)
/// as parallel arrays; `$3`: the verification interval in seconds; `$4` < repository id <=
/// `$5`: the slice of repositories counted.
pub const REPOSITORY_COUNTS_SQL: &str = "
WITH configured AS MATERIALIZED (
    SELECT * FROM unnest($1::text[], $2::text[]) AS c (virtual_storage, storage)
),
storages AS (
    SELECT virtual_storage, count(*) AS storages FROM configured GROUP BY virtual_storage
),
healthy AS MATERIALIZED (
    SELECT virtual_storage::text, storage::text FROM healthy_storages
),
pending_delete AS MATERIALIZED (
    SELECT COALESCE(job ->> 'repository_id', '') AS repository_id,
           COALESCE(job ->> 'target_node_storage', '') AS storage
    FROM replication_queue
    WHERE state NOT IN ('completed', 'cancelled', 'dead')
      AND job ->> 'change' = 'delete_replica'
),
cutoff AS MATERIALIZED (
    SELECT now() - make_interval(secs => $3) AS verified_since
),
replica AS (
    -- OFFSET 0 keeps this a subquery of its own: each membership test runs once per
    -- replica, instead of once per aggregate that uses its column.
    SELECT replica.repository_id,
           CASE WHEN replica.verified_at IS NULL THEN 0
                WHEN replica.verified_at >= (SELECT verified_since FROM cutoff) THEN 1
                ELSE 2 END AS verification,
           current AND (replica.virtual_storage, replica.storage)
               IN (SELECT virtual_storage, storage FROM healthy)
               AND NOT COALESCE((replica.repository_id::text, replica.storage)
                   IN (SELECT repository_id, storage FROM pending_delete), false) AS candidate,
           current AND (replica.virtual_storage, replica.storage)
               IN (SELECT virtual_storage, storage FROM configured) AS current_configured,
           assigned.storage IS NOT NULL AS assigned
    FROM storage_repositories AS replica
    -- The slice's bounds on every table: PostgreSQL carries equalities across a join, not
    -- ranges, and without them it read the other two tables whole for each slice.
    JOIN repositories AS repo ON repo.repository_id = replica.repository_id
                             AND repo.repository_id > $4 AND repo.repository_id <= $5
    CROSS JOIN LATERAL (
        SELECT COALESCE(replica.generation = repo.generation, false) AS current
    ) AS generation
    LEFT JOIN repository_assignments AS assigned
           ON assigned.repository_id = replica.repository_id AND assigned.storage = replica.storage
          AND assigned.repository_id > $4 AND assigned.repository_id <= $5
    WHERE replica.repository_id > $4 AND replica.repository_id <= $5
    OFFSET 0
),
per_repository AS (
    SELECT repository_id,
           bool_or(candidate) AS available,
           bool_or(candidate AND assigned) AS assigned_candidate,
           count(*) FILTER (WHERE current_configured) AS current,
           count(*) FILTER (WHERE current_configured AND assigned) AS current_assigned,
           count(*) AS replicas,
           count(*) FILTER (WHERE verification = 1) AS verified,
           count(*) FILTER (WHERE verification = 2) AS expired,
           count(*) FILTER (WHERE verification = 0) AS unverified
    FROM replica GROUP BY repository_id
),
explicit AS (
    SELECT assigned.repository_id, count(*) AS assigned
    FROM repository_assignments AS assigned
    WHERE (assigned.virtual_storage, assigned.storage)
          IN (SELECT virtual_storage, storage FROM configured)
      AND assigned.repository_id > $4 AND assigned.repository_id <= $5
    GROUP BY assigned.repository_id
),
judged AS (
    SELECT repo.virtual_storage,
           CASE WHEN NOT COALESCE(r.available, false) THEN 'unavailable'
                WHEN explicit.assigned IS NOT NULL AND NOT r.assigned_candidate THEN 'read_only'
                WHEN explicit.assigned IS NOT NULL AND r.current_assigned < explicit.assigned
                    THEN 'outdated'
                WHEN explicit.assigned IS NULL AND r.current < COALESCE(storages.storages, 0)
                    THEN 'outdated'
                ELSE 'healthy' END AS state,
           COALESCE(r.replicas, 0) AS replicas, COALESCE(r.verified, 0) AS verified,
           COALESCE(r.expired, 0) AS expired, COALESCE(r.unverified, 0) AS unverified
    FROM repositories AS repo
    LEFT JOIN per_repository AS r ON r.repository_id = repo.repository_id
    LEFT JOIN explicit ON explicit.repository_id = repo.repository_id
    LEFT JOIN storages ON storages.virtual_storage = repo.virtual_storage
    WHERE repo.repository_id > $4 AND repo.repository_id <= $5
)
SELECT virtual_storage,
       count(*) AS repositories,
       count(*) FILTER (WHERE state = 'healthy') AS healthy,
       count(*) FILTER (WHERE state = 'outdated') AS outdated,
       count(*) FILTER (WHERE state = 'unavailable') AS unavailable,
       count(*) FILTER (WHERE state = 'read_only') AS read_only,
       sum(replicas)::bigint AS replicas, sum(verified)::bigint AS verified,
       sum(expired)::bigint AS expired, sum(unverified)::bigint AS unverified
FROM judged GROUP BY virtual_storage ORDER BY virtual_storage";
