//! The replication queue (spec §5): jobs that bring a replica up to date or remove it.
//!
//! Several routers dequeue from one database at once. Two things keep them apart: a job is
//! taken in one statement that locks its rows `FOR UPDATE SKIP LOCKED`, and every target
//! replica has a lock row (`<virtual_storage>|<target>|<relative_path>`) that is marked
//! acquired, with a job-lock row per running job, so no two jobs for the same replica run at
//! once. The job-lock rows' `triggered_at` is the running job's heartbeat: a router that died
//! mid-job stops refreshing it, and after a minute the job is failed (or dropped) and its lock
//! released, so another router can take it.

use serde::{Deserialize, Serialize};

use super::{sql, Datastore, DatastoreError};

/// What a job does to its target replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeType {
    /// Bring the target up to date from the source.
    Update,
    /// Legacy: created by old versions, executed like `update`.
    Create,
    /// Legacy: remove the target replica.
    Delete,
    /// Remove an unassigned replica (the reconciler's).
    DeleteReplica,
}

impl ChangeType {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeType::Update => "update",
            ChangeType::Create => "create",
            ChangeType::Delete => "delete",
            ChangeType::DeleteReplica => "delete_replica",
        }
    }
}

/// The `job` column: the same JSON keys as Praefect's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicationJob {
    #[serde(default)]
    pub repository_id: i64,
    #[serde(default)]
    pub replica_path: String,
    pub change: ChangeType,
    pub relative_path: String,
    pub target_node_storage: String,
    /// Empty (or null) for deletions.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub source_node_storage: String,
    pub virtual_storage: String,
    #[serde(default)]
    pub params: Option<serde_json::Value>,
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_default())
}

impl ReplicationJob {
    /// The lock row this job takes while it runs.
    pub fn lock_id(&self) -> String {
        format!(
            "{}|{}|{}",
            self.virtual_storage, self.target_node_storage, self.relative_path
        )
    }
}

/// A job's state (`replication_job_state`). The datastore passes and reads it as text (see
/// `sql.rs`); the sqlx derive is for tests that read the table directly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, sqlx::Type)]
#[sqlx(type_name = "replication_job_state", rename_all = "snake_case")]
pub enum JobState {
    Ready,
    InProgress,
    Completed,
    Cancelled,
    Failed,
    Dead,
}

impl JobState {
    /// The enum label in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Ready => "ready",
            JobState::InProgress => "in_progress",
            JobState::Completed => "completed",
            JobState::Cancelled => "cancelled",
            JobState::Failed => "failed",
            JobState::Dead => "dead",
        }
    }

    /// The state of a database label.
    pub fn from_label(label: &str) -> Option<Self> {
        [
            JobState::Ready,
            JobState::InProgress,
            JobState::Completed,
            JobState::Cancelled,
            JobState::Failed,
            JobState::Dead,
        ]
        .into_iter()
        .find(|state| state.as_str() == label)
    }
}

/// A job as dequeued.
#[derive(Clone, Debug)]
pub struct QueuedJob {
    pub id: i64,
    pub state: JobState,
    /// Attempts left after this one.
    pub attempt: i32,
    pub lock_id: String,
    pub job: ReplicationJob,
    pub correlation_id: String,
    pub created_at: chrono::NaiveDateTime,
    pub updated_at: Option<chrono::NaiveDateTime>,
}

type JobRow = (
    i64,
    String,
    i32,
    Option<String>,
    Option<sqlx::types::Json<serde_json::Value>>,
    Option<sqlx::types::Json<serde_json::Value>>,
    chrono::NaiveDateTime,
    Option<chrono::NaiveDateTime>,
);

/// A row whose job JSON we cannot read is skipped (logged) rather than failing the batch.
fn to_queued(row: JobRow) -> Option<QueuedJob> {
    let (id, state, attempt, lock_id, job, meta, created_at, updated_at) = row;
    let Some(state) = JobState::from_label(&state) else {
        tracing::error!(job_id = id, state, "replication job in an unknown state");
        return None;
    };
    let job = match job.map(|j| serde_json::from_value::<ReplicationJob>(j.0)) {
        Some(Ok(job)) => job,
        other => {
            tracing::error!(job_id = id, error = ?other.map(|r| r.err()), "unreadable replication job");
            return None;
        }
    };
    let correlation_id = meta
        .and_then(|m| {
            m.0.get("correlation_id")
                .and_then(|c| c.as_str().map(str::to_string))
        })
        .unwrap_or_default();
    Some(QueuedJob {
        id,
        state,
        attempt,
        lock_id: lock_id.unwrap_or_else(|| job.lock_id()),
        job,
        correlation_id,
        created_at,
        updated_at,
    })
}

/// Inserts a job unless a `ready` job for the same replica and change is queued already (the
/// source does not matter: whichever runs brings the target up to date). Returns the new
/// job's id, None for such a duplicate.
///
/// The lock row is upserted with a row lock (not `DO NOTHING`), so the orphan-lock cleaner,
/// which skips locked rows, cannot delete it between this insert and our commit.
pub(super) async fn enqueue_in(
    conn: &mut sqlx::PgConnection,
    job: &ReplicationJob,
    correlation_id: &str,
) -> Result<Option<i64>, sqlx::Error> {
    let payload = serde_json::to_value(job).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    let meta = serde_json::json!({ "correlation_id": correlation_id });
    sql::query_scalar(
        "WITH lock AS (
             INSERT INTO replication_queue_lock (id) VALUES ($1)
             ON CONFLICT (id) DO UPDATE SET acquired = replication_queue_lock.acquired
         )
         INSERT INTO replication_queue (lock_id, job, meta)
         SELECT $1, $2, $3
         WHERE NOT EXISTS (
             SELECT 1 FROM replication_queue
             WHERE state = 'ready'
               AND job ->> 'virtual_storage' = $2 ->> 'virtual_storage'
               AND job ->> 'relative_path' = $2 ->> 'relative_path'
               AND job ->> 'target_node_storage' = $2 ->> 'target_node_storage'
               AND job ->> 'change' = $2 ->> 'change')
         RETURNING id",
    )
    .bind(job.lock_id())
    .bind(&payload)
    .bind(&meta)
    .fetch_optional(&mut *conn)
    .await
}

/// The dequeue: $1 and $2 are the virtual storage and the target, $3 the batch size. The
/// statement is the body of the function `replication_queue_dequeue` (migration
/// `20261202000200_replication_queue_functions`), whose plan the server keeps for the session
/// instead of planning it again on every call. Public for the queue benchmark.
///
/// It walks the target's `ready` and `failed` jobs oldest first along the partial index
/// `replication_queue_dequeue_idx` and stops as soon as it has `$3` jobs it can take, so its
/// cost follows the batch, not the backlog. A job can be taken when its lock row is free (not
/// acquired, no job lock) and no older `ready`/`failed` job of the same replica and change is
/// queued (only the oldest per replica and change runs). The target is matched on the job's
/// `virtual_storage` and `target_node_storage`, from which its lock id
/// `<virtual_storage>|<target>|<relative_path>` is made: a filter on the lock id's prefix as
/// well would say the same, and only make the planner misjudge how many jobs the target has.
/// Only the rows of the jobs taken and
/// of their locks are locked, `SKIP LOCKED`: a lock or job that another router is taking at
/// this moment is passed over. Locking the lock row (not only the job) is what keeps two
/// routers from starting two jobs for one replica: the second one either skips the row or,
/// when the first committed meanwhile, re-reads it as acquired and drops the job.
/// The locks are acquired by `= ANY(ARRAY(...))` rather than `IN (SELECT ...)`: the planner
/// weighs a semi-join of the batch against the whole lock table and, with a few thousand
/// locks, reads that table whole (half of a 100-job dequeue's time at 30,000 locks); an array
/// makes it an index lookup per lock.
pub const DEQUEUE_SQL: &str = "SELECT * FROM replication_queue_dequeue($1, $2, $3)";

/// The acknowledgement, one statement: $1 the job ids, $2 the outcome's label. It is the
/// body of the function `replication_queue_acknowledge` (same migration as [`DEQUEUE_SQL`]).
///
/// Of the jobs $1 only those `in_progress` count (`acked`, row-locked). Their job locks go.
/// `completed` deletes them and the `ready` jobs they made redundant (same replica, change
/// and source, queued before the completed job started); `dead` deletes them; any other
/// outcome sets their state. A lock is released when no job lock is left on it but those
/// deleted here: all the common table expressions see the same snapshot, so the job locks
/// this statement deletes are discounted by hand. A lock's job locks all belong to one batch
/// of one worker (the lock is acquired while any exists), which acknowledges its outcomes one
/// after the other, so no other acknowledgement deletes them meanwhile.
const ACKNOWLEDGE_SQL: &str = "SELECT id FROM replication_queue_acknowledge($1, $2)";

impl Datastore {
    /// Queues one job; None if an equivalent `ready` job was queued already.
    pub async fn enqueue(
        &self,
        job: &ReplicationJob,
        correlation_id: &str,
    ) -> Result<Option<i64>, DatastoreError> {
        self.run("enqueue", |conn| {
            Box::pin(async move { enqueue_in(conn, job, correlation_id).await })
        })
        .await
    }

    /// Takes up to `count` jobs for `target` of `virtual_storage`, in one statement: only
    /// jobs whose replica lock is free, only the oldest per (replica, change), oldest first.
    /// They become `in_progress` with one attempt used (`delete_replica` never uses attempts,
    /// so it never dies), and their locks are acquired.
    pub async fn dequeue(
        &self,
        virtual_storage: &str,
        target: &str,
        count: i64,
    ) -> Result<Vec<QueuedJob>, DatastoreError> {
        let rows: Vec<JobRow> = self
            .run("dequeue", |conn| {
                Box::pin(async move {
                    sql::query_as(DEQUEUE_SQL)
                        .bind(virtual_storage)
                        .bind(target)
                        .bind(count)
                        .fetch_all(&mut *conn)
                        .await
                })
            })
            .await?;
        Ok(rows.into_iter().filter_map(to_queued).collect())
    }

    /// Records the outcome of jobs that are `in_progress` (others are ignored) and returns the
    /// ids acknowledged. `completed` deletes the job and the older `ready` jobs for the same
    /// replica, change and source that it made redundant; `dead` deletes it; `failed` keeps it
    /// for another attempt. Their job locks go, and a lock with none left is released.
    pub async fn acknowledge(
        &self,
        state: JobState,
        ids: &[i64],
    ) -> Result<Vec<i64>, DatastoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        self.run("acknowledge", |conn| {
            Box::pin(async move {
                sql::query_scalar(ACKNOWLEDGE_SQL)
                    .bind(ids)
                    .bind(state.as_str())
                    .fetch_all(&mut *conn)
                    .await
            })
        })
        .await
    }

    /// Refreshes the heartbeat of running jobs.
    pub async fn refresh_job_locks(&self, ids: &[i64]) -> Result<u64, DatastoreError> {
        self.run("refresh_job_locks", |conn| {
            Box::pin(async move {
                sql::query(
                    "UPDATE replication_queue_job_lock SET triggered_at = now() AT TIME ZONE 'UTC'
                 WHERE job_id = ANY($1)",
                )
                .bind(ids)
                .execute(&mut *conn)
                .await
                .map(|done| done.rows_affected())
            })
        })
        .await
    }

    /// Jobs whose heartbeat stopped for longer than `stale_after` (their router died): failed
    /// when attempts remain, deleted otherwise; their locks released. Returns how many.
    pub async fn release_stale_jobs(
        &self,
        stale_after: std::time::Duration,
    ) -> Result<u64, DatastoreError> {
        let seconds = stale_after.as_secs_f64();
        self.run("release_stale_jobs", |conn| Box::pin(async move {
            let stale: Vec<(i64, String)> = sql::query_as(
                "DELETE FROM replication_queue_job_lock
                 WHERE triggered_at < now() AT TIME ZONE 'UTC' - make_interval(secs => $1)
                 RETURNING job_id, lock_id",
            )
            .bind(seconds)
            .fetch_all(&mut *conn)
            .await?;
            if stale.is_empty() {
                return Ok(0);
            }
            let job_ids: Vec<i64> = stale.iter().map(|(id, _)| *id).collect();
            let lock_ids: Vec<String> = stale.iter().map(|(_, lock)| lock.clone()).collect();
            sql::query(
                "UPDATE replication_queue SET state = 'failed', updated_at = now() AT TIME ZONE 'UTC'
                 WHERE id = ANY($1) AND state = 'in_progress' AND attempt >= 1",
            )
            .bind(&job_ids)
            .execute(&mut *conn)
            .await?;
            sql::query(
                "DELETE FROM replication_queue
                 WHERE id = ANY($1) AND state = 'in_progress' AND attempt < 1",
            )
            .bind(&job_ids)
            .execute(&mut *conn)
            .await?;
            release_locks(&mut *conn, &lock_ids).await?;

            Ok(stale.len() as u64)
        }))
        .await
    }

    /// Deletes up to `limit` lock rows nothing uses any more (not acquired, no job, no job
    /// lock). Returns how many.
    pub async fn delete_orphan_locks(&self, limit: i64) -> Result<u64, DatastoreError> {
        self.run("delete_orphan_locks", |conn| {
            Box::pin(async move {
                sql::query(
                    "DELETE FROM replication_queue_lock WHERE id IN (
                     SELECT lock.id FROM replication_queue_lock AS lock
                     WHERE NOT lock.acquired
                       AND NOT EXISTS (SELECT 1 FROM replication_queue AS queue
                                       WHERE queue.lock_id = lock.id)
                       AND NOT EXISTS (SELECT 1 FROM replication_queue_job_lock AS job_lock
                                       WHERE job_lock.lock_id = lock.id)
                     LIMIT $1
                     FOR UPDATE SKIP LOCKED)",
                )
                .bind(limit)
                .execute(&mut *conn)
                .await
                .map(|done| done.rows_affected())
            })
        })
        .await
    }
}

/// Releases the locks among `lock_ids` that no running job holds any more.
async fn release_locks(
    conn: &mut sqlx::PgConnection,
    lock_ids: &[String],
) -> Result<(), sqlx::Error> {
    sql::query(
        "UPDATE replication_queue_lock AS lock SET acquired = false
         WHERE lock.id = ANY($1)
           AND NOT EXISTS (SELECT 1 FROM replication_queue_job_lock AS job_lock
                           WHERE job_lock.lock_id = lock.id)",
    )
    .bind(lock_ids)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_json_uses_praefect_keys() {
        let job = ReplicationJob {
            repository_id: 7,
            replica_path: "@cluster/repositories/7c/12/7".into(),
            change: ChangeType::DeleteReplica,
            relative_path: "a/b.git".into(),
            target_node_storage: "gitaly-2".into(),
            source_node_storage: String::new(),
            virtual_storage: "default".into(),
            params: None,
        };
        let value = serde_json::to_value(&job).unwrap();
        assert_eq!(value["change"], "delete_replica");
        assert_eq!(value["target_node_storage"], "gitaly-2");
        assert_eq!(job.lock_id(), "default|gitaly-2|a/b.git");
        // Old rows carry a null source and no repository id.
        let old: ReplicationJob = serde_json::from_value(serde_json::json!({
            "change": "update", "relative_path": "x", "target_node_storage": "t",
            "source_node_storage": null, "virtual_storage": "vs"
        }))
        .unwrap();
        assert_eq!(
            (old.source_node_storage.as_str(), old.repository_id),
            ("", 0)
        );
    }
}
