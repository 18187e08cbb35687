//! The million-repository benchmark: a database with 1,000,000 repositories x 3 replicas
//! (generations, assignments, outdated and missing replicas, a replication queue, verification
//! state; see `fill.rs`), against which it times the datastore's real calls over random
//! repositories and prints the EXPLAIN (ANALYZE, BUFFERS) of every statement each call runs
//! (see `explain.rs`: no SQL is copied here). It also fills the read cache with the whole
//! working set and reports the process's RSS growth per cached repository.
//!
//! ```sh
//! cargo test --release --test it -- --ignored --nocapture scale_bench::
//! ```
//!
//! `SCALE_BENCH_REPOS` (default 1,000,000) sets the size, `SCALE_BENCH_SAMPLES` (default 200)
//! the repositories per timed call, `SCALE_BENCH_CACHE_FILL` (default: every repository) how
//! many repositories are read through the cache for the RSS figure (0 skips it).
//!
//! What it asserts is only what must hold at any size: no request-path call reads a big table
//! (`repositories`, `storage_repositories`, `repository_assignments`, `replication_queue`)
//! with a sequential scan. Times are printed, never asserted.
// Tests read and write the database directly (not through PgBouncer).
#![allow(clippy::disallowed_methods)]

mod explain;
pub mod fill;

use crate::common;

use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pg::TestDb;
use praefect::datastore::{
    Datastore, HealthObservation, HealthyStorage, JobState, ListenerSettings, PoolSettings,
    RepositoryLookup, StorageCache, UpdateJob, VerificationOutcome, VerificationResult,
};
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use explain::Plans;
use fill::{STORAGES, VIRTUAL_STORAGE};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Who runs a call: the request path (must be index-backed and fast), a background worker,
/// or an operator / metrics scrape (whole-table aggregates by nature).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Request,
    Background,
    Operator,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Request => "request",
            Kind::Background => "background",
            Kind::Operator => "operator",
        }
    }
}

/// One repository of the filled database.
#[derive(Clone, Debug)]
struct Repo {
    id: i64,
    path: String,
    primary: Option<String>,
    generation: i64,
}

/// The relative path the fill gives repository `id`.
fn relative_path(id: i64) -> String {
    let hash: String = Sha256::digest(id.to_string().as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("@hashed/{}/{}/{hash}.git", &hash[..2], &hash[2..4])
}

/// One timed call: its samples and what its explained run showed.
struct Row {
    label: String,
    kind: Kind,
    samples: Vec<Duration>,
    statements: usize,
    server_ms: f64,
    seq_scans: Vec<String>,
}

fn quantile(sorted_ms: &[f64], q: f64) -> f64 {
    if sorted_ms.is_empty() {
        return f64::NAN;
    }
    sorted_ms[((sorted_ms.len() - 1) as f64 * q).round() as usize]
}

struct Bench {
    store: Datastore,
    explaining: Datastore,
    plans: Plans,
    rows: Vec<Row>,
}

impl Bench {
    /// Times `samples` calls of `call(store, i)` for i in 0..samples, then runs
    /// `call(explaining store, samples)` once and prints the plans of its statements.
    async fn time<F, Fut>(&mut self, label: &str, kind: Kind, samples: usize, mut call: F)
    where
        F: FnMut(Datastore, usize) -> Fut,
        Fut: Future<Output = ()>,
    {
        let mut durations = Vec::with_capacity(samples);
        for i in 0..samples {
            let started = Instant::now();
            call(self.store.clone(), i).await;
            durations.push(started.elapsed());
        }
        self.plans.take();
        call(self.explaining.clone(), samples).await;
        let plans = self.plans.take();
        println!(
            "\n=== {label} ({}): {} statement(s)",
            kind.name(),
            plans.len()
        );
        for plan in &plans {
            for line in plan.lines() {
                println!("    {line}");
            }
        }
        let row = Row {
            label: label.to_string(),
            kind,
            statements: plans.len(),
            server_ms: plans.iter().filter_map(|p| explain::duration_ms(p)).sum(),
            seq_scans: explain::big_table_scans(&plans),
            samples: durations,
        };
        println!("{}", Self::line(&row));
        self.rows.push(row);
    }

    fn line(row: &Row) -> String {
        let mut ms: Vec<f64> = row.samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        format!(
            "| {} | {} | {} | {:.3} | {:.3} | {:.3} | {} | {:.3} |",
            row.label,
            row.kind.name(),
            ms.len(),
            quantile(&ms, 0.5),
            quantile(&ms, 0.95),
            quantile(&ms, 1.0),
            row.statements,
            row.server_ms
        )
    }

    fn summary(&self) {
        println!("\nsummary (wall-clock per call in ms, through the datastore with its transaction; server ms = auto_explain's total for the statements of the explained call)");
        println!("| call | kind | n | median | p95 | max | statements | server ms |");
        println!("|---|---|---|---|---|---|---|---|");
        for row in &self.rows {
            println!("{}", Self::line(row));
        }
    }
}

/// Records this router's health of all three storages every 2 s, so that `healthy_storages`
/// (a 10 s window) sees them healthy for the whole run.
fn keep_healthy(store: Datastore, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let observations: Vec<HealthObservation> = STORAGES
            .iter()
            .map(|s| HealthObservation {
                virtual_storage: VIRTUAL_STORAGE.into(),
                storage: s.to_string(),
                healthy: true,
            })
            .collect();
        loop {
            store
                .record_health("scale-bench", &observations)
                .await
                .expect("record_health");
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                _ = stop.cancelled() => return,
            }
        }
    })
}

async fn repos(raw: &mut sqlx::PgConnection, ids: &[i64]) -> Vec<Repo> {
    let rows: Vec<(i64, String, Option<String>, Option<i64>)> = sqlx::query_as(
        "SELECT repository_id, relative_path, \"primary\", generation FROM repositories
         WHERE repository_id = ANY($1) ORDER BY array_position($1, repository_id)",
    )
    .bind(ids)
    .fetch_all(raw)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(id, path, primary, generation)| Repo {
            id,
            path,
            primary,
            generation: generation.unwrap_or(0),
        })
        .collect()
}

fn vm_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn healthy() -> Vec<HealthyStorage> {
    STORAGES
        .iter()
        .map(|s| HealthyStorage {
            virtual_storage: VIRTUAL_STORAGE.into(),
            storage: s.to_string(),
        })
        .collect()
}

fn pairs() -> Vec<(String, String)> {
    STORAGES
        .iter()
        .map(|s| (VIRTUAL_STORAGE.to_string(), s.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; run by hand in release with --ignored --nocapture"]
async fn a_million_repositories() {
    let n = env_usize("SCALE_BENCH_REPOS", 1_000_000) as i64;
    let samples = env_usize("SCALE_BENCH_SAMPLES", 200);
    assert!(n >= 10_000, "SCALE_BENCH_REPOS must be at least 10000");
    let plans = Plans::install();
    println!("scale benchmark: {n} repositories x 3 replicas, {samples} samples per call");

    let db = TestDb::new().await;
    let mut raw = db.raw().await;
    fill::fill(&mut raw, n).await;

    let store = Datastore::connect(
        &db.connection(),
        PoolSettings {
            max_connections: 12,
            query_timeout: Duration::from_secs(600),
            application_name: "scale_bench".into(),
            ..PoolSettings::default()
        },
    )
    .await
    .expect("connecting the datastore");
    let explaining = explain::explaining_datastore(&mut raw, &db.connection(), &db.name).await;
    let stop = CancellationToken::new();
    let health = keep_healthy(store.clone(), stop.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Random repositories with a recorded primary, and random ones without (i % 100 = 7).
    let mut rng = rand::rngs::StdRng::seed_from_u64(15);
    let mut ids: Vec<i64> = Vec::new();
    while ids.len() < 8 * (samples + 1) {
        let id = rng.gen_range(1..=n);
        if id % 100 != 7 && !ids.contains(&id) {
            ids.push(id);
        }
    }
    let sample = Arc::new(repos(&mut raw, &ids).await);
    let mut electing: Vec<i64> = Vec::new();
    while electing.len() < (samples + 1).min((n / 100) as usize) {
        let id = rng.gen_range(0..n / 100) * 100 + 7;
        if !electing.contains(&id) {
            electing.push(id);
        }
    }
    let electing = Arc::new(electing);
    // Disjoint slices of the sample for calls that change what they touch.
    let part = |k: usize| {
        let sample = sample.clone();
        move |i: usize| sample[k * (samples + 1) + i].clone()
    };

    let mut bench = Bench {
        store: store.clone(),
        explaining,
        plans,
        rows: Vec::new(),
    };

    // Request path.
    let repo = part(0);
    bench
        .time(
            "consistent_storages (read cache miss query)",
            Kind::Request,
            samples,
            |s, i| {
                let r = repo(i);
                async move {
                    let found = s.consistent_storages(VIRTUAL_STORAGE, &r.path).await;
                    assert!(found.unwrap().is_some(), "{} not found", r.path);
                }
            },
        )
        .await;
    bench
        .time(
            "get_primary, valid primary recorded",
            Kind::Request,
            samples,
            |s, i| {
                let r = repo(i);
                async move {
                    let primary = s.get_primary(r.id).await.unwrap();
                    assert!(!primary.changed && primary.storage == r.primary);
                }
            },
        )
        .await;
    let count = electing.len() - 1;
    let electing_at = electing.clone();
    bench
        .time(
            "get_primary, none recorded (elects)",
            Kind::Request,
            count,
            |s, i| {
                let id = electing_at[i];
                async move {
                    let primary = s.get_primary(id).await.unwrap();
                    assert!(
                        primary.changed && primary.storage.is_some(),
                        "{id}: {primary:?}"
                    );
                }
            },
        )
        .await;
    bench
        .time("assignments", Kind::Request, samples, |s, i| {
            let r = repo(i);
            async move {
                let assigned = s.assignments(r.id).await.unwrap();
                assert_eq!(assigned.is_empty(), r.id % 2 == 1, "{}", r.id);
            }
        })
        .await;
    bench
        .time("valid_primaries", Kind::Request, samples, |s, i| {
            let r = repo(i);
            async move {
                assert!(!s.valid_primaries(r.id).await.unwrap().is_empty());
            }
        })
        .await;
    bench
        .time(
            "healthy_storages",
            Kind::Request,
            samples,
            |s, _| async move {
                assert_eq!(s.healthy_storages().await.unwrap().len(), 3);
            },
        )
        .await;
    bench
        .time(
            "recorded_replicas (maintenance)",
            Kind::Request,
            samples,
            |s, i| {
                let r = repo(i);
                async move {
                    let found = s.recorded_replicas(VIRTUAL_STORAGE, &r.path).await;
                    assert!(found.unwrap().is_some());
                }
            },
        )
        .await;
    let created = AtomicI64::new(0);
    bench
        .time(
            "reserve_repository_id (creation)",
            Kind::Request,
            samples,
            |s, _| {
                let k = created.fetch_add(1, Ordering::Relaxed);
                async move {
                    let path = format!("@hashed/new/{k}.git");
                    s.reserve_repository_id(VIRTUAL_STORAGE, &path)
                        .await
                        .unwrap();
                }
            },
        )
        .await;
    let repo = part(1);
    bench
        .time(
            "mutator: consistent + primary + assignments + record_write",
            Kind::Request,
            samples,
            |s, i| {
                let r = repo(i);
                async move { mutator(&s, &r).await }
            },
        )
        .await;

    // Background workers.
    let repo = part(2);
    bench
        .time(
            "job_context (replicator)",
            Kind::Background,
            samples,
            |s, i| {
                let r = repo(i);
                async move {
                    let source = r.primary.clone().unwrap();
                    let context = s.job_context(r.id, &source, other(&source)).await.unwrap();
                    assert!(context.unwrap().source_generation.is_some());
                }
            },
        )
        .await;
    bench
        .time(
            "set_replica_generation (replicator)",
            Kind::Background,
            samples,
            |s, i| {
                let r = repo(i);
                async move {
                    let target = other(r.primary.as_deref().unwrap());
                    s.set_replica_generation(r.id, target, r.generation)
                        .await
                        .unwrap();
                }
            },
        )
        .await;
    bench
        .time(
            "replication dequeue (10)",
            Kind::Background,
            samples / 4,
            |s, i| async move {
                let jobs = s
                    .dequeue(VIRTUAL_STORAGE, STORAGES[i % 3], 10)
                    .await
                    .unwrap();
                let ids: Vec<i64> = jobs.iter().map(|j| j.id).collect();
                assert!(!ids.is_empty());
                s.acknowledge(JobState::Completed, &ids).await.unwrap();
            },
        )
        .await;
    bench
        .time(
            "dequeue_verification (25) + record_verification",
            Kind::Background,
            samples / 4,
            |s, _| async move {
                let leased = s
                    .dequeue_verification(
                        &healthy(),
                        Duration::from_secs(168 * 3600),
                        Duration::from_secs(30),
                        25,
                    )
                    .await
                    .unwrap();
                assert_eq!(leased.len(), 25);
                let results: Vec<VerificationResult> = leased
                    .into_iter()
                    .map(|job| VerificationResult {
                        repository_id: job.repository_id,
                        storage: job.storage,
                        outcome: VerificationOutcome::Checked { exists: true },
                    })
                    .collect();
                s.record_verification(&results, false).await.unwrap();
            },
        )
        .await;
    bench
        .time(
            "release_stale_verification_leases (25)",
            Kind::Background,
            samples / 4,
            |s, _| async move {
                s.release_stale_verification_leases(Duration::from_secs(30), 25)
                    .await
                    .unwrap();
            },
        )
        .await;
    bench
        .time(
            "schedule_reconciliation (first run)",
            Kind::Background,
            1,
            |s, _| async move {
                let scheduled = s.schedule_reconciliation(&pairs(), &pairs()).await.unwrap();
                println!(
                    "  reconciliation scheduled {} jobs",
                    scheduled.map_or(0, |j| j.len())
                );
            },
        )
        .await;
    bench
        .time(
            "schedule_reconciliation (steady)",
            Kind::Background,
            3,
            |s, _| async move {
                s.schedule_reconciliation(&pairs(), &pairs()).await.unwrap();
            },
        )
        .await;

    // Operators and metrics.
    let repo = part(3);
    bench
        .time(
            "repository_state by id (metadata)",
            Kind::Operator,
            samples / 4,
            |s, i| {
                let r = repo(i);
                async move {
                    let state = s
                        .repository_state(&RepositoryLookup::Id(r.id), &pairs())
                        .await
                        .unwrap();
                    assert_eq!(state.unwrap().repository_id, r.id);
                }
            },
        )
        .await;
    bench
        .time(
            "degraded_repositories, unavailable only (dataloss)",
            Kind::Operator,
            1,
            |s, _| async move {
                let found = s
                    .degraded_repositories(VIRTUAL_STORAGE, true, &pairs())
                    .await
                    .unwrap();
                println!("  {} unavailable repositories", found.len());
            },
        )
        .await;
    bench
        .time(
            "degraded_repositories, all (dataloss -p)",
            Kind::Operator,
            1,
            |s, _| async move {
                let found = s
                    .degraded_repositories(VIRTUAL_STORAGE, false, &pairs())
                    .await
                    .unwrap();
                println!("  {} degraded repositories", found.len());
            },
        )
        .await;
    let timeout = Duration::from_secs(600);
    bench
        .time(
            "unavailable_repositories (/db_metrics)",
            Kind::Operator,
            3,
            |s, _| async move {
                s.unavailable_repositories(timeout).await.unwrap();
            },
        )
        .await;
    bench
        .time(
            "replication_queue_depth (/db_metrics)",
            Kind::Operator,
            3,
            |s, _| async move {
                s.replication_queue_depth(timeout).await.unwrap();
            },
        )
        .await;
    bench
        .time(
            "verification_queue_depth (/db_metrics)",
            Kind::Operator,
            3,
            |s, _| async move {
                s.verification_queue_depth(Duration::from_secs(168 * 3600), timeout)
                    .await
                    .unwrap();
            },
        )
        .await;

    cache_bench(&db, &store, n, samples, &part(4)).await;
    bench.summary();

    let scans: Vec<String> = bench
        .rows
        .iter()
        .filter(|row| row.kind == Kind::Request)
        .flat_map(|row| {
            row.seq_scans
                .iter()
                .map(move |s| format!("{}: {s}", row.label))
        })
        .collect();
    let slow: Vec<&str> = bench
        .rows
        .iter()
        .filter(|row| row.kind == Kind::Request && row.server_ms > 2.0)
        .map(|row| row.label.as_str())
        .collect();
    println!("request-path calls whose statements took over 2 ms on the server: {slow:?}");
    stop.cancel();
    health.await.unwrap();
    assert!(
        scans.is_empty(),
        "request-path sequential scans: {scans:#?}"
    );
}

/// Another storage than `storage`.
fn other(storage: &str) -> &'static str {
    if storage == STORAGES[0] {
        STORAGES[1]
    } else {
        STORAGES[0]
    }
}

/// The database calls of one mutator RPC, in the order the router makes them: the route
/// (up-to-date storages, primary, assignments), then recording the write on the up-to-date
/// replicas with an `update` job for each assigned replica left behind.
async fn mutator(store: &Datastore, r: &Repo) {
    let entry = store
        .consistent_storages(VIRTUAL_STORAGE, &r.path)
        .await
        .unwrap()
        .unwrap();
    let primary = store.get_primary(entry.repository_id).await.unwrap();
    let primary = primary.storage.unwrap();
    let mut assigned = store.assignments(entry.repository_id).await.unwrap();
    if assigned.is_empty() {
        assigned = STORAGES.iter().map(|s| s.to_string()).collect();
    }
    let jobs: Vec<UpdateJob> = assigned
        .iter()
        .filter(|s| !entry.storages.contains(s))
        .map(|target| UpdateJob {
            repository_id: entry.repository_id,
            virtual_storage: VIRTUAL_STORAGE.into(),
            relative_path: r.path.clone(),
            replica_path: entry.replica_path.clone(),
            source: primary.clone(),
            target: target.clone(),
            correlation_id: "scale-bench".into(),
        })
        .collect();
    store
        .record_write(entry.repository_id, &entry.storages, &jobs)
        .await
        .unwrap();
}

/// The read cache: the miss path and the hit path over random repositories, then every
/// repository read through it, with the RSS before and after.
async fn cache_bench(
    db: &TestDb,
    store: &Datastore,
    n: i64,
    samples: usize,
    repo: &impl Fn(usize) -> Repo,
) {
    let cache = StorageCache::with_settings(
        store.clone(),
        &[VIRTUAL_STORAGE.to_string()],
        praefect::datastore::CACHE_BYTES,
        Duration::from_secs(300),
    );
    let stop = CancellationToken::new();
    let listener = tokio::spawn(cache.clone().listen(
        ListenerSettings {
            connection: db.connection(),
            retry: Duration::from_secs(1),
        },
        stop.clone(),
    ));
    while !cache.is_enabled() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut misses = Vec::new();
    let mut hits = Vec::new();
    for i in 0..samples {
        let r = repo(i);
        let started = Instant::now();
        cache.get(VIRTUAL_STORAGE, &r.path).await.unwrap().unwrap();
        misses.push(started.elapsed().as_secs_f64() * 1e3);
        let started = Instant::now();
        cache.get(VIRTUAL_STORAGE, &r.path).await.unwrap().unwrap();
        hits.push(started.elapsed().as_secs_f64() * 1e3);
    }
    for (label, ms) in [
        ("cache miss (get)", &mut misses),
        ("cache hit (get)", &mut hits),
    ] {
        ms.sort_by(f64::total_cmp);
        println!(
            "{label}: n={} median {:.3} ms, p95 {:.3} ms, max {:.3} ms",
            ms.len(),
            quantile(ms, 0.5),
            quantile(ms, 0.95),
            quantile(ms, 1.0)
        );
    }

    let fill = env_usize("SCALE_BENCH_CACHE_FILL", n as usize) as i64;
    if fill > 0 {
        let before = vm_rss_kib();
        let started = Instant::now();
        let next = Arc::new(AtomicI64::new(1));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (cache, next) = (cache.clone(), next.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let id = next.fetch_add(1, Ordering::Relaxed);
                    if id > fill {
                        return;
                    }
                    let found = cache.get(VIRTUAL_STORAGE, &relative_path(id)).await;
                    assert!(found.unwrap().is_some(), "repository {id}");
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let elapsed = started.elapsed().as_secs_f64();
        let after = vm_rss_kib();
        let misses = cache.stats.misses.load(Ordering::Relaxed);
        let per_entry = (after.saturating_sub(before) * 1024) as f64 / fill as f64;
        println!(
            "cache fill: {fill} repositories read through the cache in {elapsed:.1} s \
             ({:.0} misses/s, {misses} misses in all); RSS {} MiB before, {} MiB after: \
             {per_entry:.0} bytes per cached repository; 1,000,000 cached = {:.0} MiB; \
             the budget (CACHE_BYTES, {} MiB) holds about {:.0} such entries",
            fill as f64 / elapsed,
            before / 1024,
            after / 1024,
            per_entry * 1e6 / 1048576.0,
            praefect::datastore::CACHE_BYTES / 1048576,
            praefect::datastore::CACHE_BYTES as f64 / per_entry.max(1.0),
        );
    }
    stop.cancel();
    listener.await.unwrap();
}
