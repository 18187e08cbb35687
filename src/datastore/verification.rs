//! Verification state of replicas: which replicas the background verifier checks next (and
//! the leases that keep two routers from checking the same replica at once), what it found,
//! and operators marking replicas for a new check.
//!
//! The columns live on `storage_repositories`: `verified_at` (NULL: never verified, or marked
//! unverified) and `verification_leased_until` (set while a router checks the replica). The
//! partial indexes `verification_queue` and `verification_leases` serve the two lookups
//! below. The NOTIFY trigger ignores updates of these columns, so verification bookkeeping
//! never flushes the routers' read caches; deleting a replica's row does notify.

use std::time::Duration;

use super::{sql, Datastore, DatastoreError, HealthyStorage};

/// A replica the verifier leased and is to check.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct VerificationJob {
    pub repository_id: i64,
    pub virtual_storage: String,
    pub relative_path: String,
    pub storage: String,
    /// Where the replica lives on the node.
    pub replica_path: String,
}

/// What checking one leased replica found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VerificationOutcome {
    /// The node answered: the replica exists (or does not).
    Checked { exists: bool },
    /// The node could not tell (error or timeout): the replica keeps its previous state.
    Failed,
}

/// The outcome for one replica of a leased batch, by its identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerificationResult {
    pub repository_id: i64,
    pub storage: String,
    pub outcome: VerificationOutcome,
}

/// A replica record the verifier deleted because the replica does not exist.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RemovedReplica {
    pub repository_id: i64,
    pub virtual_storage: String,
    pub relative_path: String,
    pub storage: String,
}

/// A verification lease that expired and was released.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ReleasedLease {
    pub repository_id: i64,
    pub virtual_storage: String,
    pub relative_path: String,
    pub storage: String,
}

/// Which replicas an operator marks unverified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplicaSelector {
    /// Every replica of one repository.
    Repository(i64),
    /// Every replica on every storage of a virtual storage.
    VirtualStorage(String),
    /// Every replica on one storage of a virtual storage.
    Storage {
        virtual_storage: String,
        storage: String,
    },
}

fn seconds(duration: Duration) -> f64 {
    duration.as_secs_f64()
}

impl Datastore {
    /// Leases up to `limit` replicas that are due for verification, in one statement: on the
    /// given (locally healthy) storages only, never verified or verified more than `interval`
    /// ago, not leased by anyone, least recently verified first (never verified before all).
    /// Rows another transaction holds are skipped, not waited for, so concurrent routers get
    /// disjoint batches. Each lease lasts `lease` from now.
    pub async fn dequeue_verification(
        &self,
        storages: &[HealthyStorage],
        interval: Duration,
        lease: Duration,
        limit: i64,
    ) -> Result<Vec<VerificationJob>, DatastoreError> {
        if storages.is_empty() || limit <= 0 {
            return Ok(Vec::new());
        }
        let virtual_storages: Vec<&str> = storages
            .iter()
            .map(|s| s.virtual_storage.as_str())
            .collect();
        let names: Vec<&str> = storages.iter().map(|s| s.storage.as_str()).collect();
        let rows: Vec<(i64, String, String, String, String)> = self
            .run("dequeue_verification", |conn| {
                Box::pin(async move {
                    sql::query_as(
                        "WITH due AS (
                         SELECT replica.repository_id, replica.storage
                         FROM storage_repositories AS replica
                         JOIN unnest($1::text[], $2::text[]) AS healthy (virtual_storage, storage)
                           ON healthy.virtual_storage = replica.virtual_storage
                          AND healthy.storage = replica.storage
                         WHERE replica.verification_leased_until IS NULL
                           AND (replica.verified_at IS NULL
                                OR replica.verified_at < now() - make_interval(secs => $3))
                         ORDER BY replica.verified_at NULLS FIRST
                         LIMIT $4
                         FOR NO KEY UPDATE OF replica SKIP LOCKED
                     )
                     UPDATE storage_repositories AS replica
                     SET verification_leased_until = now() + make_interval(secs => $5)
                     FROM due, repositories AS repo
                     WHERE replica.repository_id = due.repository_id
                       AND replica.storage = due.storage
                       AND repo.repository_id = replica.repository_id
                     RETURNING replica.repository_id, replica.virtual_storage,
                               replica.relative_path, replica.storage,
                               COALESCE(repo.replica_path, repo.relative_path)",
                    )
                    .bind(&virtual_storages)
                    .bind(&names)
                    .bind(seconds(interval))
                    .bind(limit)
                    .bind(seconds(lease))
                    .fetch_all(&mut *conn)
                    .await
                })
            })
            .await?;
        let mut jobs: Vec<VerificationJob> = rows
            .into_iter()
            .map(
                |(repository_id, virtual_storage, relative_path, storage, replica_path)| {
                    VerificationJob {
                        repository_id,
                        virtual_storage,
                        relative_path,
                        storage,
                        replica_path,
                    }
                },
            )
            .collect();
        jobs.sort();
        Ok(jobs)
    }

    /// Records what checking a leased batch found, in one statement with the repositories'
    /// rows locked (so no write to those repositories interleaves): every lease of the batch is
    /// cleared; replicas whose check succeeded are verified now, whether they exist or not;
    /// when `delete_invalid` is set, the records of replicas that were checked and do not
    /// exist are deleted (the repository's own record stays, so the loss stays visible).
    /// Returns the deleted records. Results whose lease is no longer held (it expired and was
    /// released) are ignored: the replica will be checked again.
    pub async fn record_verification(
        &self,
        results: &[VerificationResult],
        delete_invalid: bool,
    ) -> Result<Vec<RemovedReplica>, DatastoreError> {
        if results.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<i64> = results.iter().map(|r| r.repository_id).collect();
        let storages: Vec<&str> = results.iter().map(|r| r.storage.as_str()).collect();
        let checked: Vec<bool> = results
            .iter()
            .map(|r| matches!(r.outcome, VerificationOutcome::Checked { .. }))
            .collect();
        let exists: Vec<bool> = results
            .iter()
            .map(|r| matches!(r.outcome, VerificationOutcome::Checked { exists: true }))
            .collect();
        let rows: Vec<(i64, String, String, String)> = self
            .run("record_verification", |conn| {
                Box::pin(async move {
                    sql::query_as(
                        "WITH outcome AS (
                         SELECT *
                         FROM unnest($1::bigint[], $2::text[], $3::boolean[], $4::boolean[])
                              AS outcome (repository_id, storage, checked, present)
                     ),
                     locked AS (
                         SELECT repo.repository_id
                         FROM repositories AS repo
                         WHERE repo.repository_id IN (SELECT repository_id FROM outcome)
                         ORDER BY repo.repository_id
                         FOR NO KEY UPDATE
                     ),
                     target AS (
                         SELECT outcome.*,
                                $5::boolean AND outcome.checked AND NOT outcome.present AS remove
                         FROM outcome
                         JOIN locked ON locked.repository_id = outcome.repository_id
                     ),
                     released AS (
                         UPDATE storage_repositories AS replica
                         SET verification_leased_until = NULL,
                             verified_at = CASE WHEN target.checked THEN now()
                                                ELSE replica.verified_at END
                         FROM target
                         WHERE replica.repository_id = target.repository_id
                           AND replica.storage = target.storage
                           AND replica.verification_leased_until IS NOT NULL
                           AND NOT target.remove
                     )
                     DELETE FROM storage_repositories AS replica
                     USING target
                     WHERE replica.repository_id = target.repository_id
                       AND replica.storage = target.storage
                       AND replica.verification_leased_until IS NOT NULL
                       AND target.remove
                     RETURNING replica.repository_id, replica.virtual_storage,
                               replica.relative_path, replica.storage",
                    )
                    .bind(&ids)
                    .bind(&storages)
                    .bind(&checked)
                    .bind(&exists)
                    .bind(delete_invalid)
                    .fetch_all(&mut *conn)
                    .await
                })
            })
            .await?;
        let mut removed: Vec<RemovedReplica> = rows
            .into_iter()
            .map(
                |(repository_id, virtual_storage, relative_path, storage)| RemovedReplica {
                    repository_id,
                    virtual_storage,
                    relative_path,
                    storage,
                },
            )
            .collect();
        removed.sort();
        Ok(removed)
    }

    /// Releases up to `limit` verification leases that expired more than `grace` ago (their
    /// router died or lost the database mid-check), in one statement. Callers repeat while a
    /// full batch came back.
    pub async fn release_stale_verification_leases(
        &self,
        grace: Duration,
        limit: i64,
    ) -> Result<Vec<ReleasedLease>, DatastoreError> {
        let rows: Vec<(i64, String, String, String)> = self
            .run("release_stale_verification_leases", |conn| {
                Box::pin(async move {
                    sql::query_as(
                        "WITH stale AS (
                         SELECT repository_id, storage
                         FROM storage_repositories
                         WHERE verification_leased_until < now() - make_interval(secs => $1)
                         ORDER BY verification_leased_until
                         LIMIT $2
                         FOR NO KEY UPDATE SKIP LOCKED
                     )
                     UPDATE storage_repositories AS replica
                     SET verification_leased_until = NULL
                     FROM stale
                     WHERE replica.repository_id = stale.repository_id
                       AND replica.storage = stale.storage
                     RETURNING replica.repository_id, replica.virtual_storage,
                               replica.relative_path, replica.storage",
                    )
                    .bind(seconds(grace))
                    .bind(limit)
                    .fetch_all(&mut *conn)
                    .await
                })
            })
            .await?;
        let mut released: Vec<ReleasedLease> = rows
            .into_iter()
            .map(
                |(repository_id, virtual_storage, relative_path, storage)| ReleasedLease {
                    repository_id,
                    virtual_storage,
                    relative_path,
                    storage,
                },
            )
            .collect();
        released.sort();
        Ok(released)
    }

    /// Marks the selected replicas unverified (`verified_at` NULL), so the verifier checks
    /// them before any other; returns how many replicas matched.
    pub async fn mark_unverified(&self, selector: &ReplicaSelector) -> Result<u64, DatastoreError> {
        let result = match selector {
            ReplicaSelector::Repository(id) => {
                let id = *id;
                self.run("mark_unverified_repository", |conn| {
                    Box::pin(async move {
                        sql::query(
                            "UPDATE storage_repositories SET verified_at = NULL
                         WHERE repository_id = $1",
                        )
                        .bind(id)
                        .execute(&mut *conn)
                        .await
                    })
                })
                .await?
            }
            ReplicaSelector::VirtualStorage(virtual_storage) => {
                self.run("mark_unverified_virtual_storage", |conn| {
                    Box::pin(async move {
                        sql::query(
                            "UPDATE storage_repositories SET verified_at = NULL
                         WHERE virtual_storage = $1",
                        )
                        .bind(virtual_storage)
                        .execute(&mut *conn)
                        .await
                    })
                })
                .await?
            }
            ReplicaSelector::Storage {
                virtual_storage,
                storage,
            } => {
                self.run("mark_unverified_storage", |conn| {
                    Box::pin(async move {
                        sql::query(
                            "UPDATE storage_repositories SET verified_at = NULL
                         WHERE virtual_storage = $1 AND storage = $2",
                        )
                        .bind(virtual_storage)
                        .bind(storage)
                        .execute(&mut *conn)
                        .await
                    })
                })
                .await?
            }
        };
        Ok(result.rows_affected())
    }
}
