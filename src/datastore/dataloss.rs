//! The lost-primary tooling's view of repositories: every replica a repository has or should
//! have, with its generation, assignment, health and whether it may be the primary (what
//! `dataloss` and `metadata` print), and accepting a data loss by declaring one replica
//! authoritative.

use chrono::{DateTime, Utc};

use super::{sql, Datastore, DatastoreError};

/// One replica of a repository as the operator sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaState {
    pub storage: String,
    /// The generation the replica holds; -1 when it does not exist yet.
    pub generation: i64,
    /// Explicitly assigned, or every configured storage when the repository has no
    /// assignments.
    pub assigned: bool,
    /// Healthy by the quorum of routers (`healthy_storages`).
    pub healthy: bool,
    /// Listed in `valid_primaries`: up to date, healthy, may serve as the primary.
    pub valid_primary: bool,
    pub verified_at: Option<DateTime<Utc>>,
}

/// A repository's record with all of its replicas, sorted by storage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepositoryState {
    pub repository_id: i64,
    pub virtual_storage: String,
    pub relative_path: String,
    pub replica_path: String,
    /// The recorded primary (possibly one that is no longer valid); None if never elected.
    pub primary: Option<String>,
    /// The repository's latest generation; -1 when unknown.
    pub generation: i64,
    pub replicas: Vec<ReplicaState>,
}

impl RepositoryState {
    /// Whether no replica may serve as the primary: reads and writes fail until one does.
    pub fn unavailable(&self) -> bool {
        !self.replicas.iter().any(|r| r.valid_primary)
    }
}

/// How [`Datastore::repository_state`] finds a repository.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RepositoryLookup {
    Id(i64),
    Path {
        virtual_storage: String,
        relative_path: String,
    },
}

/// The statement of both lookups: `replica` has one row per (repository, storage) among the
/// repositories `repo` selects, for every storage that holds a replica or is assigned. The
/// configured storages come as the parallel arrays `$2` (virtual storages) and `$3`
/// (storages), so that assignments to storages no longer configured are ignored, as routing
/// ignores them.
macro_rules! replica_states {
    ($repo_filter:literal, $valid_primaries:literal) => {
        concat!(
            "WITH configured AS (
                 SELECT * FROM unnest($2::text[], $3::text[]) AS c(virtual_storage, storage)
             ),
             repo AS (
                 SELECT repository_id, virtual_storage, relative_path, replica_path,
                        \"primary\", COALESCE(generation, -1) AS generation
                 FROM repositories WHERE ",
            $repo_filter,
            "),
             explicit AS (
                 SELECT assigned.repository_id, assigned.storage
                 FROM repository_assignments AS assigned
                 JOIN repo ON repo.repository_id = assigned.repository_id
                 JOIN configured ON configured.virtual_storage = repo.virtual_storage
                                AND configured.storage = assigned.storage
             ),
             assignment AS (
                 SELECT repository_id, storage FROM explicit
                 UNION ALL
                 SELECT repo.repository_id, configured.storage
                 FROM repo JOIN configured ON configured.virtual_storage = repo.virtual_storage
                 WHERE NOT EXISTS (SELECT 1 FROM explicit
                                   WHERE explicit.repository_id = repo.repository_id)
             ),
             candidate AS (
                 SELECT repository_id, storage FROM assignment
                 UNION
                 SELECT recorded.repository_id, recorded.storage
                 FROM storage_repositories AS recorded
                 JOIN repo ON repo.repository_id = recorded.repository_id
             ),
             replica AS (
                 SELECT repo.repository_id, repo.virtual_storage, repo.relative_path,
                        repo.replica_path, repo.\"primary\", repo.generation,
                        candidate.storage,
                        COALESCE(recorded.generation, -1) AS replica_generation,
                        recorded.verified_at,
                        EXISTS (SELECT 1 FROM assignment
                                WHERE assignment.repository_id = candidate.repository_id
                                  AND assignment.storage = candidate.storage) AS assigned,
                        healthy.storage IS NOT NULL AS healthy,
                        valid.storage IS NOT NULL AS valid_primary
                 FROM repo
                 LEFT JOIN candidate ON candidate.repository_id = repo.repository_id
                 LEFT JOIN storage_repositories AS recorded
                        ON recorded.repository_id = candidate.repository_id
                       AND recorded.storage = candidate.storage
                 LEFT JOIN healthy_storages AS healthy
                        ON healthy.virtual_storage = repo.virtual_storage
                       AND healthy.storage = candidate.storage
                 LEFT JOIN ",
            $valid_primaries,
            " AS valid
                        ON valid.repository_id = candidate.repository_id
                       AND valid.storage = candidate.storage
             ) "
        )
    };
}

/// The columns every lookup selects from `replica`.
macro_rules! replica_columns {
    () => {
        "SELECT repository_id, virtual_storage, relative_path, replica_path, \"primary\",
                generation, storage, replica_generation, verified_at,
                COALESCE(assigned, false) AS assigned, COALESCE(healthy, false) AS healthy,
                COALESCE(valid_primary, false) AS valid_primary "
    };
}

/// One repository with its replicas, by id (`$1`). `valid_primaries` is filtered by `$1`
/// itself: a join column is not pushed into the view's window, so joining the whole view
/// computed it for every repository (169 ms at 10,000 repositories, linear in their number;
/// see `tests/it/status_bench.rs`); a constant is.
const BY_ID: &str = concat!(
    replica_states!(
        "repository_id = $1",
        "(SELECT * FROM valid_primaries WHERE repository_id = $1)"
    ),
    replica_columns!(),
    "FROM replica ORDER BY storage"
);

/// One row of the `replica` relation.
#[derive(sqlx::FromRow)]
struct ReplicaRow {
    repository_id: i64,
    virtual_storage: String,
    relative_path: String,
    replica_path: Option<String>,
    primary: Option<String>,
    generation: i64,
    storage: Option<String>,
    replica_generation: i64,
    verified_at: Option<DateTime<Utc>>,
    assigned: bool,
    healthy: bool,
    valid_primary: bool,
}

/// Groups rows sorted by repository into repositories.
fn group(rows: Vec<ReplicaRow>) -> Vec<RepositoryState> {
    let mut repositories: Vec<RepositoryState> = Vec::new();
    for row in rows {
        let same = repositories
            .last()
            .is_some_and(|last| last.repository_id == row.repository_id);
        if !same {
            repositories.push(RepositoryState {
                repository_id: row.repository_id,
                virtual_storage: row.virtual_storage,
                // Repositories from before replica paths existed live at their relative path.
                replica_path: row
                    .replica_path
                    .unwrap_or_else(|| row.relative_path.clone()),
                relative_path: row.relative_path,
                primary: row.primary,
                generation: row.generation,
                replicas: Vec::new(),
            });
        }
        let (Some(repository), Some(storage)) = (repositories.last_mut(), row.storage) else {
            continue;
        };
        repository.replicas.push(ReplicaState {
            storage,
            generation: row.replica_generation,
            assigned: row.assigned,
            healthy: row.healthy,
            valid_primary: row.valid_primary,
            verified_at: row.verified_at,
        });
    }
    repositories
}

/// `configured` as the parallel arrays the statements take.
fn unzip(configured: &[(String, String)]) -> (Vec<String>, Vec<String>) {
    configured.iter().cloned().unzip()
}

impl Datastore {
    /// The repositories of `virtual_storage` that have an assigned replica which may not be
    /// the primary (outdated, missing or unhealthy), by relative path; with
    /// `only_unavailable`, only those where no replica may be the primary. `configured` lists
    /// every configured (virtual storage, storage).
    pub async fn degraded_repositories(
        &self,
        virtual_storage: &str,
        only_unavailable: bool,
        configured: &[(String, String)],
    ) -> Result<Vec<RepositoryState>, DatastoreError> {
        let (configured_vs, configured_storage) = unzip(configured);
        let rows: Vec<ReplicaRow> = self
            .run("degraded_repositories", |conn| {
                Box::pin(async move {
                    sql::query_as(concat!(
                        replica_states!("virtual_storage = $1", "valid_primaries"),
                        replica_columns!(),
                        "FROM (
                             SELECT replica.*,
                                    bool_or(assigned AND NOT valid_primary)
                                        OVER per_repository AS degraded,
                                    bool_or(valid_primary) OVER per_repository AS available
                             FROM replica
                             WINDOW per_repository AS (PARTITION BY repository_id)
                         ) AS judged
                         WHERE degraded AND NOT (available AND $4)
                         ORDER BY relative_path, repository_id, storage"
                    ))
                    .bind(virtual_storage)
                    .bind(&configured_vs)
                    .bind(&configured_storage)
                    .bind(only_unavailable)
                    .fetch_all(&mut *conn)
                    .await
                })
            })
            .await?;
        Ok(group(rows))
    }

    /// One repository with all of its replicas; None if it is not tracked.
    pub async fn repository_state(
        &self,
        lookup: &RepositoryLookup,
        configured: &[(String, String)],
    ) -> Result<Option<RepositoryState>, DatastoreError> {
        let (configured_vs, configured_storage) = unzip(configured);
        let rows: Vec<ReplicaRow> = match lookup {
            RepositoryLookup::Id(id) => {
                let id = *id;
                self.run("repository_state_by_id", |conn| {
                    Box::pin(async move {
                        sql::query_as(BY_ID)
                            .bind(id)
                            .bind(&configured_vs)
                            .bind(&configured_storage)
                            .fetch_all(&mut *conn)
                            .await
                    })
                })
                .await?
            }
            RepositoryLookup::Path {
                virtual_storage,
                relative_path,
            } => {
                self.run("repository_state_by_path", |conn| {
                    Box::pin(async move {
                        // The id first: the statement then names the repository by a
                        // constant, which is what lets the view be computed for it alone.
                        let id: Option<i64> = sql::query_scalar(
                            "SELECT repository_id FROM repositories
                             WHERE virtual_storage = $1 AND relative_path = $2",
                        )
                        .bind(virtual_storage)
                        .bind(relative_path)
                        .fetch_optional(&mut *conn)
                        .await?;
                        let Some(id) = id else {
                            return Ok(Vec::new());
                        };
                        sql::query_as(BY_ID)
                            .bind(id)
                            .bind(&configured_vs)
                            .bind(&configured_storage)
                            .fetch_all(&mut *conn)
                            .await
                    })
                })
                .await?
            }
        };
        Ok(group(rows).into_iter().next())
    }

    /// Accepts the loss of whatever the other replicas have that `storage` lacks: the
    /// repository moves to the next generation and `storage`'s replica to that generation,
    /// in one statement, so every other replica is outdated and the reconciler overwrites it
    /// from `storage`. Returns false if the repository is not tracked.
    pub async fn set_authoritative_replica(
        &self,
        virtual_storage: &str,
        relative_path: &str,
        storage: &str,
    ) -> Result<bool, DatastoreError> {
        let result = self
            .run("set_authoritative_replica", |conn| {
                Box::pin(async move {
                    sql::query(
                        "WITH bumped AS (
                             UPDATE repositories
                             SET generation = COALESCE(generation, -1) + 1
                             WHERE virtual_storage = $1 AND relative_path = $2
                             RETURNING repository_id, virtual_storage, relative_path, generation
                         )
                         INSERT INTO storage_repositories
                             (repository_id, virtual_storage, relative_path, storage, generation)
                         SELECT repository_id, virtual_storage, relative_path, $3, generation
                         FROM bumped
                         ON CONFLICT (virtual_storage, relative_path, storage) DO UPDATE
                             SET generation = EXCLUDED.generation",
                    )
                    .bind(virtual_storage)
                    .bind(relative_path)
                    .bind(storage)
                    .execute(&mut *conn)
                    .await
                })
            })
            .await?;
        Ok(result.rows_affected() > 0)
    }
}
