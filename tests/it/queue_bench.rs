//! A benchmark of the replication queue alone (spec §5), on the real PostgreSQL of the test
//! harness: enqueue rate, the latency of one dequeue with a large backlog, whether that
//! latency follows the batch or the backlog, and the rate at which several workers drain the
//! backlog through dequeue + acknowledge. It prints figures and asserts only correctness (the
//! queue ends empty, every lock released, no job taken twice). Run it by hand, in release:
//!
//! ```sh
//! cargo test --release --test it -- --ignored --nocapture queue_bench::
//! ```
//!
//! `QUEUE_BENCH_REPOS` (default 1000) and `QUEUE_BENCH_TARGETS` (default 100) set the shape:
//! one `update` job per (repository, target). `QUEUE_BENCH_BATCH` (default 10, the
//! replicator's default `batch_size`) is the batch of the single dequeues and of the drain.
//! The plans of one dequeue and of one acknowledgement are printed (`EXPLAIN (ANALYZE,
//! BUFFERS)`, rolled back).
//! To try a schema change without a migration, `QUEUE_BENCH_SQL` is run against the fresh
//! database before anything is queued (e.g. `CREATE INDEX ON replication_queue (lock_id)`).
//! Once a backlog is queued the benchmark runs `ANALYZE` (what autovacuum does to a backlog
//! that stays for a minute), so that the plans are those of a steady state rather than a
//! matter of whether autovacuum got there first; `QUEUE_BENCH_ANALYZE=0` skips it (the plans
//! of a sudden burst, with the statistics of a small queue).
// Tests read and write the database directly (not through PgBouncer), so the
// datastore's rule about unnamed statements (clippy.toml) does not apply here.
#![allow(clippy::disallowed_methods)]

use crate::common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::Row;

use common::pg::TestDb;
use praefect::datastore::{
    ChangeType, Datastore, JobState, PoolSettings, ReplicationJob, DEQUEUE_SQL,
};

const VIRTUAL_STORAGE: &str = "default";
const ENQUEUE_TASKS: usize = 16;
const DRAIN_WORKERS: usize = 4;
const DEQUEUE_SAMPLES: usize = 20;
/// The batches of the batch-versus-backlog table, measured at a tenth of the backlog and at
/// all of it.
const EVIDENCE_BATCHES: [i64; 2] = [10, 100];

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn target_name(target: usize) -> String {
    format!("gitaly-{target:03}")
}

fn bench_job(repo: usize, target: usize, targets: usize) -> ReplicationJob {
    ReplicationJob {
        repository_id: repo as i64 + 1,
        replica_path: format!("@cluster/repositories/bench/{}", repo + 1),
        change: ChangeType::Update,
        relative_path: format!("bench/repo-{repo:05}.git"),
        target_node_storage: target_name(target),
        source_node_storage: target_name((target + 1) % targets),
        virtual_storage: VIRTUAL_STORAGE.to_string(),
        params: None,
    }
}

/// min / median / p95 / max in milliseconds.
struct Stats {
    count: usize,
    min: f64,
    median: f64,
    p95: f64,
    max: f64,
}

fn stats(samples: &[Duration]) -> Stats {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| {
        if ms.is_empty() {
            return f64::NAN;
        }
        ms[((ms.len() - 1) as f64 * q).round() as usize]
    };
    Stats {
        count: ms.len(),
        min: at(0.0),
        median: at(0.5),
        p95: at(0.95),
        max: at(1.0),
    }
}

fn stats_line(label: &str, samples: &[Duration]) -> String {
    let s = stats(samples);
    format!(
        "{label:<34} n={:<6} min {:>8.2}  median {:>8.2}  p95 {:>8.2}  max {:>8.2} ms",
        s.count, s.min, s.median, s.p95, s.max
    )
}

fn print_plan(title: &str, plan: &[String]) {
    println!("\n{title}:");
    for line in plan {
        println!("  {line}");
    }
    println!();
}

/// The dequeue statement for `target`, bound as the datastore binds it.
fn dequeue_statement<'q>(
    sql: &'q str,
    target: &str,
    batch: i64,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(sql)
        .bind(VIRTUAL_STORAGE)
        .bind(target.to_string())
        .bind(batch)
}

/// Runs the dequeue statement for `target` in a transaction that is rolled back (the queue is
/// left as it was) and returns its latency and the number of jobs it took.
async fn dequeue_rolled_back(
    raw: &mut sqlx::PgConnection,
    target: &str,
    batch: i64,
) -> (Duration, usize) {
    sqlx::query("BEGIN").execute(&mut *raw).await.unwrap();
    let started = Instant::now();
    let rows = dequeue_statement(DEQUEUE_SQL, target, batch)
        .fetch_all(&mut *raw)
        .await
        .unwrap();
    let elapsed = started.elapsed();
    sqlx::query("ROLLBACK").execute(&mut *raw).await.unwrap();
    (elapsed, rows.len())
}

/// The statement a queue function runs (`RETURN QUERY ...;` in its PL/pgSQL body), with its
/// arguments as $1, $2, ...
async fn function_statement(raw: &mut sqlx::PgConnection, function: &str) -> String {
    let source: String = sqlx::query_scalar("SELECT prosrc FROM pg_proc WHERE proname = $1")
        .bind(function)
        .fetch_one(&mut *raw)
        .await
        .unwrap();
    let start = source.find("RETURN QUERY").expect("RETURN QUERY") + "RETURN QUERY".len();
    let end = source.rfind(';').expect("statement end");
    source[start..end].trim().to_string()
}

/// `EXPLAIN (ANALYZE, BUFFERS)` of prepared statement `name` executed with `arguments` (SQL
/// literals), after five executions that are rolled back: the server then plans it as it
/// plans the statement inside the function after as many calls (a generic plan, when it
/// judges that one as good as planning each call anew).
async fn explain_prepared(
    raw: &mut sqlx::PgConnection,
    name: &str,
    arguments: &str,
) -> Vec<String> {
    for _ in 0..5 {
        sqlx::raw_sql("SAVEPOINT warm")
            .execute(&mut *raw)
            .await
            .unwrap();
        let execute = format!("EXECUTE {name}({arguments})");
        sqlx::raw_sql(&execute).execute(&mut *raw).await.unwrap();
        sqlx::raw_sql("ROLLBACK TO SAVEPOINT warm")
            .execute(&mut *raw)
            .await
            .unwrap();
    }
    let explain = format!("EXPLAIN (ANALYZE, BUFFERS) EXECUTE {name}({arguments})");
    sqlx::raw_sql(&explain)
        .fetch_all(&mut *raw)
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// Prints the plans of one dequeue of `batch` for `target` and of acknowledging the jobs it
/// took `completed`: the statements of the two queue functions, prepared and explained as
/// [`explain_prepared`] does, in a transaction that is rolled back.
async fn explain_dequeue_and_acknowledge(raw: &mut sqlx::PgConnection, target: &str, batch: i64) {
    let dequeue = function_statement(raw, "replication_queue_dequeue").await;
    let acknowledge = function_statement(raw, "replication_queue_acknowledge").await;
    sqlx::raw_sql(&format!(
        "PREPARE bench_dequeue (text, text, bigint) AS {dequeue}"
    ))
    .execute(&mut *raw)
    .await
    .unwrap();
    sqlx::raw_sql(&format!(
        "PREPARE bench_acknowledge (bigint[], text) AS {acknowledge}"
    ))
    .execute(&mut *raw)
    .await
    .unwrap();
    sqlx::query("BEGIN").execute(&mut *raw).await.unwrap();
    let plan = explain_prepared(
        raw,
        "bench_dequeue",
        &format!("'{VIRTUAL_STORAGE}', '{target}', {batch}"),
    )
    .await;
    print_plan(
        &format!("EXPLAIN (ANALYZE, BUFFERS) of one dequeue of {batch} for {target}"),
        &plan,
    );
    let taken: Vec<i64> = sqlx::query_scalar(
        "SELECT job_id FROM replication_queue_job_lock WHERE lock_id LIKE $1 ORDER BY job_id",
    )
    .bind(format!("{VIRTUAL_STORAGE}|{target}|%"))
    .fetch_all(&mut *raw)
    .await
    .unwrap();
    let ids: Vec<String> = taken.iter().map(i64::to_string).collect();
    let plan = explain_prepared(
        raw,
        "bench_acknowledge",
        &format!(
            "'{{{}}}', '{}'",
            ids.join(","),
            JobState::Completed.as_str()
        ),
    )
    .await;
    print_plan(
        &format!(
            "EXPLAIN (ANALYZE, BUFFERS) of acknowledging those {} jobs completed",
            taken.len()
        ),
        &plan,
    );
    sqlx::query("ROLLBACK").execute(&mut *raw).await.unwrap();
    sqlx::raw_sql("DEALLOCATE ALL")
        .execute(&mut *raw)
        .await
        .unwrap();
}

/// The batch-versus-backlog evidence at the current backlog: for each of
/// [`EVIDENCE_BATCHES`], the dequeue statement alone (rolled back) for [`DEQUEUE_SAMPLES`]
/// targets, each of which has `per_target` jobs queued.
async fn dequeue_by_batch(
    raw: &mut sqlx::PgConnection,
    targets: usize,
    per_target: usize,
) -> Vec<Stats> {
    let mut by_batch = Vec::new();
    for batch in EVIDENCE_BATCHES {
        let mut samples = Vec::new();
        for sample in 0..DEQUEUE_SAMPLES {
            let target = target_name(targets - 1 - sample);
            let (elapsed, taken) = dequeue_rolled_back(raw, &target, batch).await;
            assert_eq!(taken, per_target.min(batch as usize), "{target}");
            samples.push(elapsed);
        }
        by_batch.push(stats(&samples));
    }
    by_batch
}

/// Queues jobs `from..to` (repository-major: the order mutators and the reconciler produce)
/// from [`ENQUEUE_TASKS`] tasks at once; returns each call's latency and the wall time.
async fn enqueue_range(
    store: &Datastore,
    from: usize,
    to: usize,
    targets: usize,
) -> (Vec<Duration>, Duration) {
    let next = Arc::new(AtomicUsize::new(from));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..ENQUEUE_TASKS {
        let (store, next) = (store.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= to {
                    return latencies;
                }
                let job = bench_job(i / targets, i % targets, targets);
                let call = Instant::now();
                let id = store.enqueue(&job, "bench").await.expect("enqueue");
                latencies.push(call.elapsed());
                assert!(id.is_some(), "job {i} reported as a duplicate");
            }
        }));
    }
    let mut latencies = Vec::with_capacity(to - from);
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    (latencies, started.elapsed())
}

/// `ANALYZE`s the queue unless `QUEUE_BENCH_ANALYZE=0`.
async fn analyze(raw: &mut sqlx::PgConnection) {
    if std::env::var("QUEUE_BENCH_ANALYZE").as_deref() != Ok("0") {
        sqlx::query("ANALYZE replication_queue, replication_queue_lock")
            .execute(raw)
            .await
            .unwrap();
    }
}

async fn count(raw: &mut sqlx::PgConnection, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(raw).await.unwrap()
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; run by hand in release with --ignored --nocapture"]
async fn replication_queue_throughput_and_dequeue_latency() {
    let repos = env_usize("QUEUE_BENCH_REPOS", 1000);
    let targets = env_usize("QUEUE_BENCH_TARGETS", 100);
    let batch = env_usize("QUEUE_BENCH_BATCH", 10) as i64;
    let total = repos * targets;
    assert!(targets > DEQUEUE_SAMPLES, "need more targets than samples");
    println!(
        "replication queue benchmark: {total} update jobs = {repos} repositories x {targets} \
         targets, virtual storage {VIRTUAL_STORAGE:?}, batch {batch}; load average at start {}",
        load_average()
    );

    let db = TestDb::new().await;
    // A longer statement timeout than the router's 5 s, so that a slow statement is measured
    // rather than failed.
    let store = Datastore::connect(
        &db.connection(),
        PoolSettings {
            max_connections: ENQUEUE_TASKS as u32 + 4,
            query_timeout: Duration::from_secs(300),
            application_name: "queue_bench".into(),
            ..PoolSettings::default()
        },
    )
    .await
    .expect("connecting the datastore");
    let mut raw = db.raw().await;
    let mut summary: Vec<(String, String)> = Vec::new();
    if let Ok(sql) = std::env::var("QUEUE_BENCH_SQL") {
        println!("running QUEUE_BENCH_SQL first: {sql}");
        sqlx::raw_sql(&sql)
            .execute(&mut raw)
            .await
            .expect("QUEUE_BENCH_SQL");
        summary.push(("QUEUE_BENCH_SQL".into(), sql));
    }
    if std::env::var("QUEUE_BENCH_ANALYZE").as_deref() == Ok("0") {
        summary.push((
            "QUEUE_BENCH_ANALYZE=0".into(),
            "no ANALYZE after the enqueue".into(),
        ));
    }

    // 1. Enqueue a tenth of the backlog, measure the dequeue statement by batch, enqueue the
    // rest and measure again: a dequeue that follows the batch costs the same at both.
    let small_repos = (repos / 10).max(1);
    let small = small_repos * targets;
    let (mut enqueue_latencies, mut enqueue_time) = enqueue_range(&store, 0, small, targets).await;
    analyze(&mut raw).await;
    let small_backlog = dequeue_by_batch(&mut raw, targets, small_repos).await;
    let (rest, rest_time) = enqueue_range(&store, small, total, targets).await;
    enqueue_latencies.extend(rest);
    enqueue_time += rest_time;
    let enqueue_rate = total as f64 / enqueue_time.as_secs_f64();
    println!(
        "enqueue: {total} jobs in {:.1} s = {enqueue_rate:.0} jobs/s ({ENQUEUE_TASKS} tasks)",
        enqueue_time.as_secs_f64()
    );
    println!("{}", stats_line("  enqueue latency", &enqueue_latencies));
    assert_eq!(
        count(
            &mut raw,
            "SELECT count(*) FROM replication_queue WHERE state = 'ready'"
        )
        .await,
        total as i64
    );
    summary.push((
        format!("enqueue {total} ({ENQUEUE_TASKS} tasks)"),
        format!(
            "{enqueue_rate:.0} jobs/s, {:.1} s total, median {:.2} ms",
            enqueue_time.as_secs_f64(),
            stats(&enqueue_latencies).median
        ),
    ));
    analyze(&mut raw).await;
    let analyzed: Option<chrono::NaiveDateTime> = sqlx::query_scalar(
        "SELECT GREATEST(last_analyze, last_autoanalyze)::timestamp FROM pg_stat_user_tables
         WHERE relname = 'replication_queue'",
    )
    .fetch_one(&mut raw)
    .await
    .unwrap();
    println!(
        "  replication_queue statistics: {}",
        analyzed.map_or("never analyzed".to_string(), |t| format!(
            "last analyzed {t} UTC"
        ))
    );
    let full_backlog = dequeue_by_batch(&mut raw, targets, repos).await;
    println!(
        "\ndequeue statement alone (rolled back), {DEQUEUE_SAMPLES} targets each, median / p95 ms:"
    );
    println!(
        "  {:>9}  {:>17}  {:>17}",
        "backlog", "batch 10", "batch 100"
    );
    for (backlog, by_batch) in [(small, &small_backlog), (total, &full_backlog)] {
        let cells: Vec<String> = by_batch
            .iter()
            .map(|s| format!("{:.2} / {:.2}", s.median, s.p95))
            .collect();
        println!("  {backlog:>9}  {:>17}  {:>17}", cells[0], cells[1]);
        summary.push((
            format!("dequeue statement, {backlog} queued, batch 10 | 100"),
            format!(
                "median {:.2} | {:.2} ms",
                by_batch[0].median, by_batch[1].median
            ),
        ));
    }
    // 2. Single dequeues with the whole backlog in place, one per target, each batch then
    // acknowledged completed.
    let mut dequeue_latencies = Vec::new();
    let mut ack_latencies = Vec::new();
    let mut taken_in_samples = 0;
    for target in 0..DEQUEUE_SAMPLES {
        let call = Instant::now();
        let jobs = store
            .dequeue(VIRTUAL_STORAGE, &target_name(target), batch)
            .await
            .expect("dequeue");
        dequeue_latencies.push(call.elapsed());
        assert_eq!(jobs.len(), batch as usize, "a full batch for every target");
        let ids: Vec<i64> = jobs.iter().map(|j| j.id).collect();
        let call = Instant::now();
        let acked = store
            .acknowledge(JobState::Completed, &ids)
            .await
            .expect("acknowledge");
        ack_latencies.push(call.elapsed());
        assert_eq!(acked.len(), ids.len());
        taken_in_samples += ids.len();
    }
    let dequeue_stats = stats(&dequeue_latencies);
    println!(
        "single dequeue({VIRTUAL_STORAGE:?}, target, {batch}) with {total} jobs queued, \
         one per target:"
    );
    println!("{}", stats_line("  dequeue", &dequeue_latencies));
    println!("{}", stats_line("  acknowledge completed", &ack_latencies));
    summary.push((
        format!("one dequeue of {batch}, {total} queued"),
        format!(
            "median {:.2} ms, p95 {:.2} ms, max {:.2} ms",
            dequeue_stats.median, dequeue_stats.p95, dequeue_stats.max
        ),
    ));
    let ack_stats = stats(&ack_latencies);
    summary.push((
        format!("one acknowledge of {batch}, {total} queued"),
        format!(
            "median {:.2} ms, p95 {:.2} ms, max {:.2} ms",
            ack_stats.median, ack_stats.p95, ack_stats.max
        ),
    ));
    explain_dequeue_and_acknowledge(&mut raw, &target_name(DEQUEUE_SAMPLES), batch).await;

    // 3. Drain: workers that each own a share of the targets dequeue and acknowledge, round
    // robin over their targets, until a whole round finds nothing.
    let remaining = Arc::new(AtomicUsize::new(total - taken_in_samples));
    let progress = {
        let remaining = remaining.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_secs(15)).await;
                println!(
                    "  draining: {} jobs left after {:.0} s (load {})",
                    remaining.load(Ordering::Relaxed),
                    started.elapsed().as_secs_f64(),
                    load_average()
                );
            }
        })
    };
    let started = Instant::now();
    let mut workers = Vec::new();
    for worker in 0..DRAIN_WORKERS {
        let (store, remaining) = (store.clone(), remaining.clone());
        let owned: Vec<String> = (worker..targets)
            .step_by(DRAIN_WORKERS)
            .map(target_name)
            .collect();
        workers.push(tokio::spawn(async move {
            let mut dequeues = Vec::new();
            let mut acks = Vec::new();
            let mut ids = Vec::new();
            loop {
                let mut found = false;
                for target in &owned {
                    let call = Instant::now();
                    let jobs = store
                        .dequeue(VIRTUAL_STORAGE, target, batch)
                        .await
                        .expect("dequeue");
                    dequeues.push(call.elapsed());
                    if jobs.is_empty() {
                        continue;
                    }
                    found = true;
                    let taken: Vec<i64> = jobs.iter().map(|j| j.id).collect();
                    let call = Instant::now();
                    let acked = store
                        .acknowledge(JobState::Completed, &taken)
                        .await
                        .expect("acknowledge");
                    acks.push(call.elapsed());
                    assert_eq!(acked.len(), taken.len());
                    remaining.fetch_sub(taken.len(), Ordering::Relaxed);
                    ids.extend(taken);
                }
                if !found {
                    return (dequeues, acks, ids);
                }
            }
        }));
    }
    let mut drain_dequeues = Vec::new();
    let mut drain_acks = Vec::new();
    let mut drained_ids = Vec::new();
    for worker in workers {
        let (dequeues, acks, ids) = worker.await.unwrap();
        drain_dequeues.extend(dequeues);
        drain_acks.extend(acks);
        drained_ids.extend(ids);
    }
    let drain_time = started.elapsed();
    progress.abort();
    let secs = drain_time.as_secs_f64();
    let dequeue_rate = drain_dequeues.len() as f64 / secs;
    let job_rate = drained_ids.len() as f64 / secs;
    println!(
        "drain: {} jobs in {secs:.1} s by {DRAIN_WORKERS} workers ({} targets each, batch \
         {batch}): {} dequeue calls = {dequeue_rate:.0} dequeues/s, {} acknowledge calls, \
         {job_rate:.0} jobs acknowledged/s",
        drained_ids.len(),
        targets / DRAIN_WORKERS,
        drain_dequeues.len(),
        drain_acks.len(),
    );
    println!(
        "{}",
        stats_line("  dequeue (drain, all calls)", &drain_dequeues)
    );
    println!("{}", stats_line("  acknowledge (drain)", &drain_acks));
    summary.push((
        format!(
            "drain, {DRAIN_WORKERS} workers x {} targets",
            targets / DRAIN_WORKERS
        ),
        format!("{dequeue_rate:.0} dequeues/s, {job_rate:.0} jobs acknowledged/s, {secs:.1} s"),
    ));
    let drain_deq = stats(&drain_dequeues);
    summary.push((
        "  dequeue latency while draining".into(),
        format!(
            "median {:.2} ms, p95 {:.2} ms, max {:.2} ms",
            drain_deq.median, drain_deq.p95, drain_deq.max
        ),
    ));
    let drain_ack = stats(&drain_acks);
    summary.push((
        "  acknowledge latency while draining".into(),
        format!(
            "median {:.2} ms, p95 {:.2} ms, max {:.2} ms",
            drain_ack.median, drain_ack.p95, drain_ack.max
        ),
    ));

    // Correctness: every job taken exactly once, nothing left, every lock released.
    let unique: HashSet<i64> = drained_ids.iter().copied().collect();
    assert_eq!(unique.len(), drained_ids.len(), "a job was dequeued twice");
    assert_eq!(drained_ids.len() + taken_in_samples, total);
    let left = count(&mut raw, "SELECT count(*) FROM replication_queue").await;
    let job_locks = count(&mut raw, "SELECT count(*) FROM replication_queue_job_lock").await;
    let acquired = count(
        &mut raw,
        "SELECT count(*) FROM replication_queue_lock WHERE acquired",
    )
    .await;
    println!(
        "after the drain: {left} rows in replication_queue, {job_locks} job locks, \
         {acquired} acquired locks"
    );
    assert_eq!(left, 0, "replication_queue is not empty");
    assert_eq!(job_locks, 0, "job locks remain");
    assert_eq!(acquired, 0, "locks remain acquired");

    let load = load_average();
    summary.push(("load average at the end (1/5/15 min)".into(), load));
    let width = summary.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    println!("\nsummary");
    for (key, value) in &summary {
        println!("  {key:<width$}  {value}");
    }
    store.close().await;
}
