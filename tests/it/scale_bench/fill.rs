//! Fills a test database with `n` repositories x 3 replicas in a few set-based statements.
//!
//! The shape (repository id `i`, storages `gitaly-1..3`, primary `gitaly-(1 + i % 3)`):
//! - every repository has a GitLab-style hashed relative path (`@hashed/ab/cd/<sha256>.git`)
//!   and a replica path, at generation `5 + i % 3`;
//! - `i % 100 = 7`: no recorded primary (the first write elects one);
//! - `i % 20 = 3`: one secondary is one generation behind (outdated);
//! - `i % 1000 = 5`: one secondary has no replica at all;
//! - even `i`: explicit assignments of all three storages, except `i % 100 = 10`, where only
//!   two are assigned (the third replica is for the reconciler to delete); odd `i`: none (every
//!   configured storage counts as assigned);
//! - replicas: 80% verified at some time in the last 6 days, 20% never;
//! - the queue: a `ready` update job for half of the outdated replicas (`i % 40 = 3`), with
//!   their locks, and a `dead` job for every missing replica.
//!
//! Triggers and foreign-key checks are off while filling (`session_replication_role =
//! replica`): the NOTIFY triggers would otherwise build one payload naming every path.
// Seeding goes straight to the database, not through PgBouncer.
#![allow(clippy::disallowed_methods)]

use std::time::Instant;

use sqlx::PgConnection;

pub const VIRTUAL_STORAGE: &str = "default";
pub const STORAGES: [&str; 3] = ["gitaly-1", "gitaly-2", "gitaly-3"];

/// The fill, one statement per step, each bound to `$1` = the number of repositories.
const STEPS: [(&str, &str); 6] = [
    (
        "repositories",
        "INSERT INTO repositories
             (repository_id, virtual_storage, relative_path, generation, \"primary\", replica_path)
         SELECT i, 'default',
                '@hashed/' || substr(h, 1, 2) || '/' || substr(h, 3, 2) || '/' || h || '.git',
                5 + i % 3,
                CASE WHEN i % 100 = 7 THEN NULL ELSE 'gitaly-' || (1 + i % 3) END,
                '@cluster/repositories/' || substr(h, 1, 2) || '/' || substr(h, 3, 2) || '/' || i
         FROM (SELECT i, encode(sha256(i::text::bytea), 'hex') AS h
               FROM generate_series(1, $1::bigint) AS i) AS numbered",
    ),
    (
        "storage_repositories",
        "INSERT INTO storage_repositories
             (virtual_storage, relative_path, storage, generation, repository_id, verified_at)
         SELECT repo.virtual_storage, repo.relative_path, 'gitaly-' || s,
                CASE WHEN repo.repository_id % 20 = 3 AND s = 1 + (repo.repository_id + 1) % 3
                     THEN repo.generation - 1 ELSE repo.generation END,
                repo.repository_id,
                CASE WHEN (repo.repository_id + s) % 10 < 8
                     THEN now() - ((repo.repository_id * 7 + s) % 518400) * interval '1 second'
                END
         FROM repositories AS repo CROSS JOIN generate_series(1, 3) AS s
         WHERE repo.repository_id <= $1
           AND NOT (repo.repository_id % 1000 = 5 AND s = 1 + (repo.repository_id + 2) % 3)",
    ),
    (
        "repository_assignments",
        "INSERT INTO repository_assignments (virtual_storage, relative_path, storage, repository_id)
         SELECT repo.virtual_storage, repo.relative_path, 'gitaly-' || s, repo.repository_id
         FROM repositories AS repo CROSS JOIN generate_series(1, 3) AS s
         WHERE repo.repository_id <= $1 AND repo.repository_id % 2 = 0
           AND NOT (repo.repository_id % 100 = 10 AND s = 1 + (repo.repository_id + 2) % 3)",
    ),
    (
        "replication_queue (ready updates, dead jobs)",
        "INSERT INTO replication_queue (state, created_at, attempt, lock_id, job, meta)
         SELECT state::replication_job_state,
                now() AT TIME ZONE 'UTC' - (repo.repository_id % 3600) * interval '1 second',
                CASE WHEN state = 'dead' THEN 0 ELSE 3 END,
                'default|' || target || '|' || repo.relative_path,
                jsonb_build_object(
                    'change', 'update', 'repository_id', repo.repository_id,
                    'replica_path', repo.replica_path, 'relative_path', repo.relative_path,
                    'target_node_storage', target, 'source_node_storage', repo.\"primary\",
                    'virtual_storage', 'default', 'params', NULL),
                jsonb_build_object('correlation_id', 'scale-bench-' || repo.repository_id)
         FROM repositories AS repo,
              LATERAL (
                  SELECT 'ready' AS state, 'gitaly-' || (1 + (repo.repository_id + 1) % 3) AS target
                  WHERE repo.repository_id % 40 = 3
                  UNION ALL
                  SELECT 'dead', 'gitaly-' || (1 + (repo.repository_id + 2) % 3)
                  WHERE repo.repository_id % 1000 = 5
              ) AS job
         WHERE repo.repository_id <= $1 AND repo.\"primary\" IS NOT NULL",
    ),
    (
        "replication_queue_lock",
        "INSERT INTO replication_queue_lock (id)
         SELECT DISTINCT lock_id FROM replication_queue WHERE $1::bigint > 0",
    ),
    (
        "repositories_repository_id_seq",
        "SELECT setval('repositories_repository_id_seq', $1::bigint)",
    ),
];

/// Fills the database and runs `VACUUM ANALYZE` (statistics and the visibility map of a
/// database that has been running for a while). Prints the time of each step.
pub async fn fill(raw: &mut PgConnection, repositories: i64) {
    let started = Instant::now();
    sqlx::query("SET session_replication_role = replica")
        .execute(&mut *raw)
        .await
        .unwrap();
    for (table, statement) in STEPS {
        let step = Instant::now();
        let done = sqlx::query(statement)
            .bind(repositories)
            .execute(&mut *raw)
            .await
            .unwrap_or_else(|e| panic!("filling {table}: {e}"));
        println!(
            "  fill {table:<45} {:>9} rows {:>7.1} s",
            done.rows_affected(),
            step.elapsed().as_secs_f64()
        );
    }
    sqlx::query("SET session_replication_role = DEFAULT")
        .execute(&mut *raw)
        .await
        .unwrap();
    let step = Instant::now();
    sqlx::raw_sql(
        "VACUUM ANALYZE repositories, storage_repositories, repository_assignments, \
         replication_queue, replication_queue_lock",
    )
    .execute(&mut *raw)
    .await
    .unwrap();
    println!("  VACUUM ANALYZE {:>70.1} s", step.elapsed().as_secs_f64());
    let size: String =
        sqlx::query_scalar("SELECT pg_size_pretty(pg_database_size(current_database()))")
            .fetch_one(&mut *raw)
            .await
            .unwrap();
    println!(
        "  filled in {:.1} s; database size {size}",
        started.elapsed().as_secs_f64()
    );
}
