//! What one status page collection costs the database at scale: fills a test database like
//! `scale_bench` (`STATUS_BENCH_REPOS` repositories x 3 replicas, default 100,000), records
//! health for three routers, then prints the `EXPLAIN (ANALYZE, BUFFERS)` of each statement
//! the status page runs and times the datastore calls themselves (wall clock, median of 5).
//! Times are printed, never asserted.
//!
//! ```sh
//! STATUS_BENCH_REPOS=100000 cargo test --test it -- --ignored --nocapture status_bench::
//! ```
// Tests read and write the database directly (not through PgBouncer).
#![allow(clippy::disallowed_methods)]

use crate::common;
use crate::scale_bench::fill::{fill, STORAGES, VIRTUAL_STORAGE};

use std::time::{Duration, Instant};

use common::pg::TestDb;
use praefect::datastore::db_metrics::UNAVAILABLE_REPOSITORIES_SQL;
use praefect::datastore::{
    HealthObservation, COUNTS_SETTINGS_SQL, NODE_OBSERVATIONS_SQL, QUEUE_GROUPS_SQL,
    REPOSITORY_COUNTS_SQL, REPOSITORY_JOBS_LIMIT, REPOSITORY_JOBS_SQL,
};

const TIMEOUT: Duration = Duration::from_secs(60);

/// Prints the plan of `sql`, its parameters bound by `bind`, and its sequential scans.
type Explain<'q> =
    sqlx::query::QueryScalar<'q, sqlx::Postgres, String, sqlx::postgres::PgArguments>;

async fn plan(
    raw: &mut sqlx::PgConnection,
    label: &str,
    sql: &str,
    bind: impl for<'q> FnOnce(Explain<'q>) -> Explain<'q>,
) {
    let text = format!("EXPLAIN (ANALYZE, BUFFERS) {sql}");
    let lines: Vec<String> = bind(sqlx::query_scalar(&text))
        .fetch_all(&mut *raw)
        .await
        .unwrap();
    println!("\n=== {label} ===");
    for line in &lines {
        println!("{line}");
    }
    let seq: Vec<&String> = lines.iter().filter(|l| l.contains("Seq Scan")).collect();
    println!(
        "--- sequential scans: {}",
        if seq.is_empty() {
            "none".to_string()
        } else {
            seq.iter()
                .map(|l| l.trim().to_string())
                .collect::<Vec<_>>()
                .join(" | ")
        }
    );
}

async fn median<F, Fut, T, E>(label: &str, mut call: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    E: std::fmt::Debug,
{
    let mut times = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        call().await.unwrap();
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "{label:<40} median {:>9.1} ms  (min {:.1}, max {:.1})",
        times[2], times[0], times[4]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; run by hand with --ignored --nocapture"]
async fn status_collection_at_scale() {
    let n: i64 = std::env::var("STATUS_BENCH_REPOS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let db = TestDb::new().await;
    let mut raw = db.raw().await;
    fill(&mut raw, n).await;
    let store = db.datastore().await;
    let observations: Vec<HealthObservation> = STORAGES
        .iter()
        .map(|s| HealthObservation {
            virtual_storage: VIRTUAL_STORAGE.into(),
            storage: s.to_string(),
            healthy: true,
        })
        .collect();
    // Three routers that keep seeing every node healthy while the bench runs.
    let keeper = {
        let store = store.clone();
        tokio::spawn(async move {
            loop {
                for router in ["router-a", "router-b", "router-c"] {
                    store.record_health(router, &observations).await.unwrap();
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let configured: Vec<(String, String)> = STORAGES
        .iter()
        .map(|s| (VIRTUAL_STORAGE.to_string(), s.to_string()))
        .collect();
    let (vs, st): (Vec<String>, Vec<String>) = configured.iter().cloned().unzip();
    let interval = 7.0 * 86400.0;
    println!("status collection, {n} repositories x 3 replicas");

    plan(&mut raw, "node observations", NODE_OBSERVATIONS_SQL, |q| q).await;
    plan(
        &mut raw,
        "healthy_storages",
        "SELECT virtual_storage, storage FROM healthy_storages ORDER BY 1, 2",
        |q| q,
    )
    .await;
    plan(&mut raw, "queue groups", QUEUE_GROUPS_SQL, |q| q).await;
    plan(
        &mut raw,
        "unavailable repositories (/db_metrics)",
        UNAVAILABLE_REPOSITORIES_SQL,
        |q| q,
    )
    .await;
    // In a transaction with the settings the datastore call uses.
    sqlx::raw_sql("BEGIN").execute(&mut raw).await.unwrap();
    sqlx::query(COUNTS_SETTINGS_SQL)
        .execute(&mut raw)
        .await
        .unwrap();
    // One slice of ids, as the datastore counts them.
    plan(
        &mut raw,
        "repository counts (ids 0 to 50,000)",
        REPOSITORY_COUNTS_SQL,
        |q| {
            q.bind(vs.clone())
                .bind(st.clone())
                .bind(interval)
                .bind(0_i64)
                .bind(50_000_i64)
        },
    )
    .await;
    sqlx::raw_sql("COMMIT").execute(&mut raw).await.unwrap();
    let path: String =
        sqlx::query_scalar("SELECT relative_path FROM repositories WHERE repository_id = 3")
            .fetch_one(&mut raw)
            .await
            .unwrap();
    plan(&mut raw, "repository jobs", REPOSITORY_JOBS_SQL, |q| {
        q.bind(VIRTUAL_STORAGE)
            .bind(path.clone())
            .bind(REPOSITORY_JOBS_LIMIT)
    })
    .await;

    println!();
    median("cluster_health (2 statements)", || {
        store.cluster_health(TIMEOUT)
    })
    .await;
    median("queue_groups", || store.queue_groups(TIMEOUT)).await;
    median("repository_counts", || {
        store.repository_counts(&configured, Duration::from_secs(7 * 86400), TIMEOUT)
    })
    .await;
    median("unavailable_repositories (/db_metrics)", || {
        store.unavailable_repositories(TIMEOUT)
    })
    .await;
    // The same count asked through the `valid_primaries` view, as `/db_metrics` asked it
    // until 2026-12-04: the same answer, for comparison of the time.
    let by_view = crate::datastore::UNAVAILABLE_BY_VIEW_SQL;
    let mut times = Vec::new();
    let mut through_view = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        through_view = sqlx::query_as::<_, (String, i64)>(by_view)
            .fetch_all(&mut raw)
            .await
            .unwrap();
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "{:<40} median {:>9.1} ms  (min {:.1}, max {:.1})",
        "the same through valid_primaries", times[2], times[0], times[4]
    );
    let direct = store.unavailable_repositories(TIMEOUT).await.unwrap();
    println!("unavailable: {direct:?}; through the view: {through_view:?}");
    assert_eq!(
        direct
            .into_iter()
            .map(|row| (row.virtual_storage, row.count))
            .collect::<Vec<_>>(),
        through_view
    );
    let by_path = praefect::datastore::RepositoryLookup::Path {
        virtual_storage: VIRTUAL_STORAGE.into(),
        relative_path: path.clone(),
    };
    median("repository_state by path", || {
        store.repository_state(&by_path, &configured)
    })
    .await;
    median("repository_state (view, by id)", || {
        store.repository_state(&praefect::datastore::RepositoryLookup::Id(3), &configured)
    })
    .await;
    median("repository_jobs", || {
        store.repository_jobs(VIRTUAL_STORAGE, &path, TIMEOUT)
    })
    .await;
    let counts = store
        .repository_counts(&configured, Duration::from_secs(7 * 86400), TIMEOUT)
        .await
        .unwrap();
    println!("{counts:?}");
    keeper.abort();
}
