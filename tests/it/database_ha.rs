//! The router under its database's failures, against the real thing: a three-member Patroni
//! cluster (planned switchover, leader SIGKILLed), a PostgreSQL server stopped for 30 s, and
//! PgBouncer in transaction mode. Real gitnodes, a real `praefect serve`, a real client load:
//! a repository created every 50 ms and reads of warm repositories every 50 ms.
//!
//! Each scenario prints its figures (Patroni's own write outage measured by a plain write
//! probe in the same run, the router's longest gap between acknowledged writes, failed
//! reads, lost writes, LISTEN recovery).
//!
//! The Patroni and PgBouncer tests need the Debian packages `patroni`, `etcd-server` and
//! `pgbouncer`; without them they are skipped with a message, unless
//! `PRAEFECT_REQUIRE_HA_TESTS` is set (as `.ci/run` does), in which case they fail.
// Tests read and write the database directly (not through PgBouncer), so the
// datastore's rule about unnamed statements (clippy.toml) does not apply here.
#![allow(clippy::disallowed_methods)]

use crate::common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::gitnode::GitNode;
use common::patroni::Patroni;
use common::pg::{database_connection, OwnServer};
use common::router::{start_router_on, virtual_repo, NodeEntry, Router};
use common::wait::wait_until;
use praefect::config::DatabaseConnection;
use praefect::datastore::{find_writable, targets, Datastore, PoolSettings};
use praefect::wire::proto::ref_service_client::RefServiceClient;
use praefect::wire::proto::repository_service_client::RepositoryServiceClient;
use praefect::wire::proto::*;
use sqlx::{Connection, Executor};

/// The scenarios measure timings on a 2-core machine: they run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Whether a test that needs `what` must run (CI) or may be skipped (a developer machine).
fn required(what: &str, present: bool) -> bool {
    if present {
        return true;
    }
    assert!(
        std::env::var_os("PRAEFECT_REQUIRE_HA_TESTS").is_none(),
        "{what} is not installed but PRAEFECT_REQUIRE_HA_TESTS is set"
    );
    eprintln!("skipping: {what} is not installed (apt-get install {what})");
    false
}

fn start_nodes() -> Vec<GitNode> {
    ["gitaly-1", "gitaly-2", "gitaly-3"]
        .iter()
        .map(|s| GitNode::start(s))
        .collect()
}

async fn start_router(
    dir: &std::path::Path,
    db: &DatabaseConnection,
    session: Option<&DatabaseConnection>,
    nodes: &[GitNode],
    extra: &str,
) -> Router {
    let entries: Vec<NodeEntry> = nodes.iter().map(NodeEntry::from).collect();
    start_router_on(dir, db, session, &entries, extra).await
}

async fn create(router: &Router, path: &str) -> Result<(), tonic::Status> {
    let mut client = RepositoryServiceClient::new(router.channel());
    let call = client.create_repository(CreateRepositoryRequest {
        repository: Some(virtual_repo(path)),
        default_branch: b"main".to_vec(),
        ..Default::default()
    });
    match tokio::time::timeout(Duration::from_secs(15), call).await {
        Ok(result) => result.map(|_| ()),
        Err(_) => Err(tonic::Status::deadline_exceeded("client timeout")),
    }
}

/// One read of each kind the issue names: forwarded to a node (FindDefaultBranchName) and
/// answered by the router (RepositoryExists).
async fn read(router: &Router, path: &str) -> Result<(), String> {
    let channel = router.channel();
    let mut refs = RefServiceClient::new(channel.clone());
    let forwarded = refs.find_default_branch_name(FindDefaultBranchNameRequest {
        repository: Some(virtual_repo(path)),
        ..Default::default()
    });
    match tokio::time::timeout(Duration::from_secs(15), forwarded).await {
        Ok(Ok(_)) => {}
        Ok(Err(status)) => return Err(format!("FindDefaultBranchName: {status:?}")),
        Err(_) => return Err("FindDefaultBranchName: client timeout".into()),
    }
    let mut repositories = RepositoryServiceClient::new(channel);
    let answered = repositories.repository_exists(RepositoryExistsRequest {
        repository: Some(virtual_repo(path)),
    });
    match tokio::time::timeout(Duration::from_secs(15), answered).await {
        Ok(Ok(reply)) if reply.get_ref().exists => Ok(()),
        Ok(Ok(_)) => Err("RepositoryExists: false".into()),
        Ok(Err(status)) => Err(format!("RepositoryExists: {status:?}")),
        Err(_) => Err("RepositoryExists: client timeout".into()),
    }
}

/// What a load run saw.
#[derive(Default)]
struct LoadLog {
    acknowledged: Vec<(String, Instant)>,
    write_errors: Vec<(Instant, Duration, tonic::Code, String)>,
    reads_ok: u64,
    read_errors: Vec<(Instant, String)>,
    /// Successful writes of the plain database probe.
    probe_ok: Vec<Instant>,
    /// Readiness samples: (when, whether the change listener check failed).
    listener_down: Vec<(Instant, bool)>,
}

/// A client creating a repository every 50 ms and reading `warm` repositories every 50 ms,
/// plus (when `probe` is given) a plain write probe on the database, until stopped.
struct Load {
    log: Arc<Mutex<LoadLog>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(
        router: Arc<Router>,
        prefix: &str,
        warm: Vec<String>,
        probe: Option<DatabaseConnection>,
    ) -> Load {
        let log = Arc::new(Mutex::new(LoadLog::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        {
            let (log, stop, router) = (log.clone(), stop.clone(), router.clone());
            let prefix = prefix.to_string();
            tasks.push(tokio::spawn(async move {
                let mut n: u64 = 0;
                while !stop.load(Ordering::Relaxed) {
                    let path = format!("{prefix}/{n:05}.git");
                    n += 1;
                    let started = Instant::now();
                    match create(&router, &path).await {
                        Ok(()) => log
                            .lock()
                            .unwrap()
                            .acknowledged
                            .push((path, Instant::now())),
                        Err(status) => log.lock().unwrap().write_errors.push((
                            started,
                            started.elapsed(),
                            status.code(),
                            status.message().to_string(),
                        )),
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }));
        }
        {
            let (log, stop, router) = (log.clone(), stop.clone(), router.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    for path in &warm {
                        match read(&router, path).await {
                            Ok(()) => log.lock().unwrap().reads_ok += 1,
                            Err(err) => log.lock().unwrap().read_errors.push((Instant::now(), err)),
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }));
        }
        {
            let (log, stop, router) = (log.clone(), stop.clone(), router.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let router = router.clone();
                    let (_, body) =
                        tokio::task::spawn_blocking(move || router.http_get("/readiness"))
                            .await
                            .unwrap();
                    let down = body.contains("database change listener");
                    log.lock()
                        .unwrap()
                        .listener_down
                        .push((Instant::now(), down));
                    // A readiness sample every 100 ms: the resolution of the listener figures.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }));
        }
        if let Some(conn) = probe {
            let (log, stop) = (log.clone(), stop.clone());
            tasks.push(tokio::spawn(
                async move { write_probe(conn, log, stop).await },
            ));
        }
        Load { log, stop, tasks }
    }

    async fn finish(self) -> LoadLog {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        Arc::try_unwrap(self.log)
            .ok()
            .expect("load tasks ended")
            .into_inner()
            .unwrap()
    }
}

/// The plain client an operator would use to measure the database's own write outage: a
/// reconnect-on-error loop inserting a row every 50 ms through the multi-host settings (the
/// first host that accepts writes, like libpq's `target_session_attrs=read-write`).
async fn write_probe(conn: DatabaseConnection, log: Arc<Mutex<LoadLog>>, stop: Arc<AtomicBool>) {
    let candidates = targets(&conn).unwrap();
    let mut session: Option<sqlx::PgConnection> = None;
    while !stop.load(Ordering::Relaxed) {
        if session.is_none() {
            if let Ok(target) = find_writable(&candidates, Duration::from_secs(2)).await {
                if let Ok(Ok(c)) = tokio::time::timeout(
                    Duration::from_secs(2),
                    sqlx::PgConnection::connect_with(&target.options),
                )
                .await
                {
                    session = Some(c);
                }
            }
        }
        if let Some(c) = session.as_mut() {
            let insert = c.execute("INSERT INTO ha_probe (at) VALUES (now())");
            match tokio::time::timeout(Duration::from_secs(2), insert).await {
                Ok(Ok(_)) => log.lock().unwrap().probe_ok.push(Instant::now()),
                _ => session = None,
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The longest time between two consecutive instants within [from, to] (counting from
/// `from`).
fn longest_gap(times: &[Instant], from: Instant, to: Instant) -> Duration {
    longest_gap_ending(times, from, to).0
}

/// [`longest_gap`] and the instant that ended it.
fn longest_gap_ending(times: &[Instant], from: Instant, to: Instant) -> (Duration, Instant) {
    let mut sorted: Vec<Instant> = times
        .iter()
        .copied()
        .filter(|t| *t >= from && *t <= to)
        .collect();
    sorted.sort();
    let mut previous = from;
    let mut longest = (Duration::ZERO, from);
    for t in sorted.into_iter().chain([to]) {
        if t.duration_since(previous) > longest.0 {
            longest = (t.duration_since(previous), t);
        }
        previous = t;
    }
    longest
}

/// The longest stretch in which the readiness samples said the listener was down.
fn listener_outage(samples: &[(Instant, bool)]) -> Duration {
    let mut longest = Duration::ZERO;
    let mut since: Option<Instant> = None;
    for (at, down) in samples {
        match (down, since) {
            (true, None) => since = Some(*at),
            (false, Some(start)) => {
                longest = longest.max(at.duration_since(start));
                since = None;
            }
            _ => {}
        }
    }
    if let (Some(start), Some((last, _))) = (since, samples.last()) {
        longest = longest.max(last.duration_since(start));
    }
    longest
}

/// Every acknowledged repository is recorded and exists on its primary's disk.
async fn assert_nothing_lost(
    raw: &mut sqlx::PgConnection,
    nodes: &[GitNode],
    acknowledged: &[(String, Instant)],
) -> usize {
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT relative_path, replica_path, \"primary\" FROM repositories WHERE virtual_storage = 'default'",
    )
    .fetch_all(&mut *raw)
    .await
    .unwrap();
    let mut missing = Vec::new();
    for (path, _) in acknowledged {
        match rows.iter().find(|(p, _, _)| p == path) {
            None => missing.push(format!("{path}: not in the database")),
            Some((_, replica_path, primary)) => {
                let node = nodes.iter().find(|n| &n.storage == primary).unwrap();
                if !node.root.join(replica_path).join("HEAD").exists() {
                    missing.push(format!("{path}: not on {primary} at {replica_path}"));
                }
            }
        }
    }
    assert!(missing.is_empty(), "acknowledged writes lost: {missing:?}");
    acknowledged.len()
}

async fn warm_up(
    router: &Router,
    db: &DatabaseConnection,
    count: usize,
    prefix: &str,
) -> Vec<String> {
    let mut warm = Vec::new();
    for i in 0..count {
        let path = format!("{prefix}/warm-{i}.git");
        create(router, &path).await.unwrap();
        warm.push(path);
    }
    // Each creation queued replication to the other nodes; a replica recorded later evicts
    // its repository from the read cache (NOTIFY), and an evicted entry cannot be served
    // while the database is away. So the cache is filled only once replication is done.
    let store = Datastore::connect(db, PoolSettings::default())
        .await
        .unwrap();
    wait_until(Duration::from_secs(30), "the warm repositories are replicated", || async {
        store
            .run("pending_jobs", |conn| {
                Box::pin(async move {
                    sqlx::query_scalar::<_, i64>(
                        "SELECT count(*) FROM replication_queue WHERE state IN ('ready', 'in_progress')",
                    )
                    .persistent(false)
                    .fetch_one(&mut *conn)
                    .await
                })
            })
            .await
            .is_ok_and(|pending| pending == 0)
    })
    .await;
    store.close().await;
    for path in &warm {
        // The first read populates the cache; the second is a hit.
        read(router, path).await.unwrap();
        read(router, path).await.unwrap();
    }
    warm
}

struct Figures {
    name: &'static str,
    database_outage: Duration,
    router_gap: Duration,
    reads_ok: u64,
    reads_failed: usize,
    writes_acknowledged: usize,
    writes_failed: usize,
    listener_outage: Duration,
    /// From the database taking writes again (the probe) to the router's LISTEN being back.
    listener_recovery: Option<Duration>,
}

impl Figures {
    fn print(&self) {
        eprintln!(
            "FIGURES {}: database's own write outage {:.2}s, router's longest gap between acknowledged writes {:.2}s (difference {:+.2}s); reads ok {}, reads failed {}; writes acknowledged {}, writes failed {}, writes lost 0; LISTEN down {:.2}s, back {} after the database took writes again",
            self.name,
            self.database_outage.as_secs_f64(),
            self.router_gap.as_secs_f64(),
            self.router_gap.as_secs_f64() - self.database_outage.as_secs_f64(),
            self.reads_ok,
            self.reads_failed,
            self.writes_acknowledged,
            self.writes_failed,
            self.listener_outage.as_secs_f64(),
            self.listener_recovery
                .map(|d| format!("{:.2}s", d.as_secs_f64()))
                .unwrap_or_else(|| "(not down)".into()),
        );
    }
}

/// When the listener came back after its last outage, relative to `database_back`.
fn listener_recovery(samples: &[(Instant, bool)], database_back: Instant) -> Option<Duration> {
    let last_down = samples.iter().rposition(|(_, down)| *down)?;
    let (back_at, _) = samples.get(last_down + 1)?;
    Some(back_at.saturating_duration_since(database_back))
}

/// Runs the load around `fault` (called after 3 s of steady load) until the probe has
/// written again and 8 more seconds passed; checks and returns the figures.
async fn under_load<F, Fut>(
    name: &'static str,
    router: &Arc<Router>,
    warm: &[String],
    probe: DatabaseConnection,
    fault: F,
) -> (Figures, LoadLog)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let load = Load::start(router.clone(), name, warm.to_vec(), Some(probe));
    // Kept: the scenario, steady load before the fault (the figures' window starts 1 s
    // before it).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let fault_at = Instant::now();
    fault().await;
    // Until the database took a write again (the probe), then some steady state.
    wait_until(
        Duration::from_secs(90),
        &format!("{name}: the probe writes to the database again"),
        async || {
            load.log
                .lock()
                .unwrap()
                .probe_ok
                .iter()
                .any(|t| *t > fault_at + Duration::from_millis(200))
        },
    )
    .await;
    // Kept: the scenario, 8 s of load after the recovery, in which the router must have
    // caught up (the figures measure gaps up to the end of this window).
    tokio::time::sleep(Duration::from_secs(8)).await;
    let end = Instant::now();
    let log = load.finish().await;
    let window_start = fault_at - Duration::from_secs(1);
    let acked: Vec<Instant> = log.acknowledged.iter().map(|(_, t)| *t).collect();
    let figures = Figures {
        name,
        database_outage: longest_gap(&log.probe_ok, window_start, end),
        router_gap: longest_gap(&acked, window_start, end),
        reads_ok: log.reads_ok,
        reads_failed: log.read_errors.len(),
        writes_acknowledged: log.acknowledged.len(),
        writes_failed: log.write_errors.len(),
        listener_outage: listener_outage(&log.listener_down),
        listener_recovery: listener_recovery(
            &log.listener_down,
            longest_gap_ending(&log.probe_ok, window_start, end).1,
        ),
    };
    figures.print();
    (figures, log)
}

/// Planned switchover, then the leader SIGKILLed, under load, on a real Patroni cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn patroni_switchover_and_failover_under_load() {
    if !required("patroni", common::patroni::available()) {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut cluster = tokio::task::spawn_blocking(Patroni::start).await.unwrap();
    let leader = cluster.leader().unwrap();
    assert!(cluster
        .psql(leader, "postgres", "CREATE DATABASE praefect")
        .is_empty());
    let connection = database_connection(cluster.connection("praefect"));
    let store = Datastore::connect(&connection, PoolSettings::default())
        .await
        .unwrap();
    store.migrate_up(false, false, |_| {}).await.unwrap();
    store
        .run("create_probe_table", |conn| {
            Box::pin(async move {
                conn.execute("CREATE TABLE ha_probe (at timestamptz)")
                    .await
                    .map(|_| ())
            })
        })
        .await
        .unwrap();

    let nodes = start_nodes();
    let dir = tempfile::tempdir().unwrap();
    let router = Arc::new(start_router(dir.path(), &connection, None, &nodes, "").await);
    let pid = router.child.id();
    let warm = warm_up(&router, &connection, 3, "warm").await;

    // 1. Planned switchover.
    let (switched, switch_log) = under_load(
        "patroni-switchover",
        &router,
        &warm,
        connection.clone(),
        || async {
            let started = Instant::now();
            let (from, to) = tokio::task::block_in_place(|| cluster.switchover());
            eprintln!(
                "switchover pg{} -> pg{}: patronictl returned after {:.2}s",
                from + 1,
                to + 1,
                started.elapsed().as_secs_f64()
            );
        },
    )
    .await;
    check_scenario(&switched, &switch_log, &router, pid, &cluster);

    // 2. The leader dies.
    let (failed_over, kill_log) = under_load(
        "patroni-leader-sigkill",
        &router,
        &warm,
        connection.clone(),
        || async {
            let killed = tokio::task::block_in_place(|| cluster.kill_leader());
            eprintln!("SIGKILLed leader pg{}", killed + 1);
        },
    )
    .await;
    check_scenario(&failed_over, &kill_log, &router, pid, &cluster);

    // Every acknowledged write of both runs is recorded and on disk.
    let leader = cluster.leader().expect("a leader after the failover");
    let mut raw = sqlx::PgConnection::connect(&format!(
        "postgres://postgres:{}@127.0.0.1:{}/praefect?sslmode=disable",
        common::patroni::PASSWORD,
        cluster.pg_ports[leader]
    ))
    .await
    .unwrap();
    let mut acknowledged = switch_log.acknowledged.clone();
    acknowledged.extend(kill_log.acknowledged.iter().cloned());
    let checked = assert_nothing_lost(&mut raw, &nodes, &acknowledged).await;
    eprintln!("FIGURES patroni: {checked} acknowledged writes checked in the database and on disk, none lost");
}

fn check_scenario(figures: &Figures, log: &LoadLog, router: &Router, pid: u32, cluster: &Patroni) {
    assert_eq!(router.child.id(), pid);
    assert!(
        std::fs::metadata(format!("/proc/{pid}")).is_ok(),
        "the router process is gone"
    );
    assert!(
        figures.database_outage > Duration::ZERO && figures.writes_acknowledged > 0,
        "the scenario did not run: {}",
        cluster.logs_tail()
    );
    assert!(
        log.read_errors.is_empty(),
        "{}: reads failed: {:?}",
        figures.name,
        &log.read_errors[..log.read_errors.len().min(10)]
    );
    assert!(
        figures.router_gap <= figures.database_outage + Duration::from_secs(1),
        "{}: the router's write gap {:?} exceeds the database's own outage {:?} + 1s; write errors: {:?}",
        figures.name,
        figures.router_gap,
        figures.database_outage,
        &log.write_errors[..log.write_errors.len().min(10)]
    );
}

/// The worker kinds that must log exactly one line when the database goes away and one when
/// it is back (the ones that touch the database within 30 s with default settings).
const BUSY_WORKERS: [&str; 3] = ["health recorder", "replicator", "verifier"];

/// PostgreSQL stopped for 30 s under three healthy gitnodes: cached reads keep working,
/// writes fail fast with Unavailable, readiness says why while grpc health stays SERVING,
/// and everything recovers without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgresql_stopped_for_30_seconds() {
    let _serial = SERIAL.lock().await;
    let server = OwnServer::start().await;
    let nodes = start_nodes();
    let dir = tempfile::tempdir().unwrap();
    let router = start_router(dir.path(), &server.connection(), None, &nodes, "").await;
    let pid = router.child.id();
    let warm = warm_up(&router, &server.connection(), 3, "warm").await;
    wait_until(Duration::from_secs(20), "the router is ready", || async {
        router.http_get("/readiness").0 == 200
    })
    .await;

    tokio::task::block_in_place(|| server.stop());
    let stopped_at = Instant::now();
    let mut reads_ok = 0u64;
    let mut read_errors = Vec::new();
    let mut writes = Vec::new();
    let mut readiness = Vec::new();
    let mut health = Vec::new();
    let mut last_write = Instant::now() - Duration::from_secs(2);
    let mut n = 0;
    // The scenario: 30 s of outage under reads (every 200 ms) and writes (every second).
    while stopped_at.elapsed() < Duration::from_secs(30) {
        for path in &warm {
            match read(&router, path).await {
                Ok(()) => reads_ok += 1,
                Err(err) => read_errors.push((stopped_at.elapsed(), err)),
            }
        }
        if last_write.elapsed() >= Duration::from_secs(1) {
            last_write = Instant::now();
            n += 1;
            let outcome = create(&router, &format!("outage/{n}.git")).await;
            writes.push((stopped_at.elapsed(), last_write.elapsed(), outcome));
            let (code, body) = router.http_get("/readiness");
            readiness.push((stopped_at.elapsed(), code, body));
            let mut client = tonic_health::pb::health_client::HealthClient::new(router.channel());
            let status = client
                .check(tonic_health::pb::HealthCheckRequest::default())
                .await
                .map(|r| r.into_inner().status);
            health.push(status.ok());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    tokio::task::block_in_place(|| server.start_again());
    let restarted = Instant::now();
    let recovered_after = wait_until(
        Duration::from_secs(30),
        "writes succeed again after the restart",
        async || {
            create(
                &router,
                &format!("after/{}.git", restarted.elapsed().as_millis()),
            )
            .await
            .map(|()| restarted.elapsed())
        },
    )
    .await;
    wait_until(
        Duration::from_secs(20),
        "the router is ready again",
        || async { router.http_get("/readiness").0 == 200 },
    )
    .await;
    let ready_after = restarted.elapsed();
    // Reads of the warm repositories still work, from a fresh cache.
    for path in &warm {
        read(&router, path).await.unwrap();
    }

    let slowest_write = writes.iter().map(|(_, took, _)| *took).max().unwrap();
    eprintln!(
        "FIGURES postgresql-stopped-30s: reads ok {reads_ok}, reads failed {}; {} writes during the outage, all failed, slowest {:.3}s, codes {:?}; writes succeed {:.2}s after the restart, ready {:.2}s after",
        read_errors.len(),
        writes.len(),
        slowest_write.as_secs_f64(),
        writes
            .iter()
            .map(|(_, _, o)| format!("{:?}", o.as_ref().err().map(|s| s.code())))
            .collect::<std::collections::BTreeSet<_>>(),
        recovered_after.as_secs_f64(),
        ready_after.as_secs_f64(),
    );
    assert!(read_errors.is_empty(), "reads failed: {read_errors:?}");
    assert!(reads_ok > 100, "{reads_ok}");
    for (at, took, outcome) in &writes {
        let status = outcome
            .as_ref()
            .expect_err("a write succeeded without a database");
        assert_eq!(
            status.code(),
            tonic::Code::Unavailable,
            "at {at:?}: {status:?}"
        );
        assert!(
            status.message().contains("database unavailable"),
            "{status:?}"
        );
        assert!(
            *took < Duration::from_secs(1),
            "a write took {took:?} to fail at {at:?}"
        );
    }
    for (at, code, body) in &readiness {
        if *at >= Duration::from_secs(2) {
            assert_eq!(*code, 503, "readiness at {at:?}: {body}");
            assert!(body.contains("database not writable"), "{body}");
        }
    }
    assert!(
        health
            .iter()
            .all(|s| *s
                == Some(tonic_health::pb::health_check_response::ServingStatus::Serving as i32)),
        "grpc health: {health:?}"
    );
    assert_eq!(router.child.id(), pid);
    assert!(std::fs::metadata(format!("/proc/{pid}")).is_ok());

    // One line per worker kind when the database went away, one when it came back (the
    // replicator's idle back-off may take up to 5 s to try again).
    wait_until(Duration::from_secs(20), "every worker resumed", || async {
        BUSY_WORKERS
            .iter()
            .all(|w| !router.log_lines(&format!("{w} resumed after")).is_empty())
    })
    .await;
    for worker in BUSY_WORKERS {
        let paused = router.log_lines(&format!("{worker} paused until it is back"));
        let resumed = router.log_lines(&format!("{worker} resumed after"));
        assert_eq!(
            (paused.len(), resumed.len()),
            (1, 1),
            "{worker}: paused {paused:?}, resumed {resumed:?}"
        );
    }
    for other in [
        "replication queue cleaner",
        "reconciler",
        "verification lease releaser",
    ] {
        let paused = router.log_lines(&format!("{other} paused until it is back"));
        assert!(paused.len() <= 1, "{other}: {paused:?}");
    }
    assert_eq!(router.log_lines("database writer lost").len(), 1);
    assert_eq!(router.log_lines("database writer found").len(), 1);
    assert_eq!(router.log_lines("change listener disconnected").len(), 1);
    assert_eq!(router.log_lines("change listener reconnected").len(), 1);
}

/// The router's whole path through PgBouncer in transaction mode: creation (also 40 at once
/// over a 2-connection server pool), push, clone, replication, verification,
/// set-replication-factor, and cache invalidation by LISTEN/NOTIFY, with LISTEN either
/// direct or through a session-mode PgBouncer database.
async fn through_pgbouncer(listen_through_pgbouncer: bool) {
    use common::gitnode::{as_refs, git};
    use common::pgbouncer::{PgBouncer, SESSION_DB, TRANSACTION_DB};
    use common::router::{commit_and_push, praefect_cli, router_git_env, sample, work_tree};
    if !required("pgbouncer", common::pgbouncer::available()) {
        return;
    }
    let _serial = SERIAL.lock().await;
    let db = common::pg::TestDb::new().await;
    let user = db.server.user.clone();
    let bouncer = PgBouncer::start(db.server.port, &db.name, &user);
    let main = database_connection(bouncer.connection(TRANSACTION_DB, &user));
    let session = if listen_through_pgbouncer {
        database_connection(bouncer.connection(SESSION_DB, &user))
    } else {
        db.connection()
    };
    let nodes = start_nodes();
    let dir = tempfile::tempdir().unwrap();
    let router = start_router(
        dir.path(),
        &main,
        Some(&session),
        &nodes,
        "[reconciliation]\nscheduling_interval = \"1s\"\n[background_verification]\nverification_interval = \"1s\"\n",
    )
    .await;
    wait_until(Duration::from_secs(20), "the router is ready", || async {
        router.http_get("/readiness").0 == 200
    })
    .await;

    // Create and push, then clone back.
    let path = "group/bounced.git";
    create(&router, path).await.unwrap();
    let work = work_tree(&["a", "b"], 50_000);
    tokio::task::block_in_place(|| commit_and_push(work.path(), &router, path, "c"));
    let clone = tempfile::tempdir().unwrap();
    let env = router_git_env(&router, path);
    tokio::task::block_in_place(|| {
        git(
            clone.path(),
            &["clone", "--quiet", "--mirror", "ssh://gitaly/x", "copy.git"],
            &as_refs(&env),
        )
    });
    let head = |dir: &std::path::Path| git(dir, &["rev-parse", "main"], &[]);
    assert_eq!(head(&clone.path().join("copy.git")), head(work.path()));

    // Many transactions at once over two server connections.
    let creations = (0..40).map(|i| {
        let router = &router;
        async move { create(router, &format!("many/{i}.git")).await }
    });
    for outcome in futures::future::join_all(creations).await {
        outcome.unwrap();
    }

    // Replication brings every node up to date.
    let mut raw = db.raw().await;
    let id: i64 =
        sqlx::query_scalar("SELECT repository_id FROM repositories WHERE relative_path = $1")
            .bind(path)
            .fetch_one(&mut raw)
            .await
            .unwrap();
    let up_to_date = || async {
        let mut raw = db.raw().await;
        let behind: i64 = sqlx::query_scalar(
            "SELECT 3 - count(*) FROM storage_repositories s JOIN repositories r USING (repository_id)
             WHERE s.repository_id = $1 AND s.generation = r.generation",
        )
        .bind(id)
        .fetch_one(&mut raw)
        .await
        .unwrap();
        behind == 0
    };
    wait_until(
        Duration::from_secs(30),
        "three up-to-date replicas",
        up_to_date,
    )
    .await;

    // Cache invalidation: a read populates the cache, a push evicts the entry by NOTIFY.
    read(&router, path).await.unwrap();
    read(&router, path).await.unwrap();
    let evictions = |router: &Router| {
        let (_, body) = router.http_get("/metrics");
        sample(
            &body,
            "gitaly_praefect_uptodate_storages_cache_access_total",
            &[("type", "evict")],
        )
    };
    let before = evictions(&router);
    tokio::task::block_in_place(|| commit_and_push(work.path(), &router, path, "d"));
    wait_until(
        Duration::from_secs(10),
        "the write's NOTIFY evicts the entry",
        || async { evictions(&router) > before },
    )
    .await;

    // Background verification records its results.
    wait_until(Duration::from_secs(30), "the verifier verified the replicas", || async {
        let mut raw = db.raw().await;
        let verified: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM storage_repositories WHERE repository_id = $1 AND verified_at IS NOT NULL",
        )
        .bind(id)
        .fetch_one(&mut raw)
        .await
        .unwrap();
        verified >= 1
    })
    .await;

    // set-replication-factor through the router, carried out by the reconciler.
    let (code, out, err) = praefect_cli(
        dir.path(),
        &[
            "set-replication-factor",
            "-virtual-storage",
            "default",
            "-relative-path",
            path,
            "-replication-factor",
            "2",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("current assignments: "), "{out}");
    wait_until(
        Duration::from_secs(30),
        "the third replica is removed",
        || async {
            let mut raw = db.raw().await;
            let replicas: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM storage_repositories WHERE repository_id = $1",
            )
            .bind(id)
            .fetch_one(&mut raw)
            .await
            .unwrap();
            replicas == 2
        },
    )
    .await;

    // Nothing went wrong on the way: no database errors in the router's log, no protocol
    // complaints in PgBouncer's.
    let failures: Vec<_> = router
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| {
            l.contains("prepared statement")
                || l.contains("database error")
                || l.contains("startup parameter")
        })
        .cloned()
        .collect();
    assert!(failures.is_empty(), "{failures:?}");
    let bouncer_log = bouncer.log();
    assert!(
        !bouncer_log.contains("unsupported startup parameter")
            && !bouncer_log.contains("prepared statement"),
        "{bouncer_log}"
    );
    eprintln!(
        "FIGURES pgbouncer (LISTEN {}): create, push, clone, 40 concurrent creations, replication, verification, set-replication-factor and NOTIFY evictions all through pool_mode=transaction with 2 server connections",
        if listen_through_pgbouncer { "through a session-mode PgBouncer database" } else { "direct" }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pgbouncer_transaction_mode_with_direct_listen() {
    through_pgbouncer(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pgbouncer_transaction_mode_with_session_mode_listen() {
    through_pgbouncer(true).await;
}
