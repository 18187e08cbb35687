//! The background verifier: leasing due replicas (against a real PostgreSQL, with concurrent
//! pickers), recording outcomes, releasing stale leases, marking replicas unverified, the
//! worker against a scripted cluster, and end to end across processes: real gitnodes, a real
//! `praefect serve` and the `praefect verify` command find and drop a replica lost on disk.
// Tests read and write the database directly (not through PgBouncer), so the
// datastore's rule about unnamed statements (clippy.toml) does not apply here.
#![allow(clippy::disallowed_methods)]

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use sqlx::postgres::PgListener;
use sqlx::{Connection, Executor, PgConnection};
use tokio_util::sync::CancellationToken;

use common::gitnode::GitNode;
use common::pg::TestDb;
use common::router::{
    free_port, sample, seed_repository, virtual_repo, write_config_on, write_config_with,
    NodeEntry, Router, BIN,
};
use common::wait::wait_until;
use praefect::config::{BackgroundVerification, GoDuration};
use praefect::datastore::{
    Datastore, HealthyStorage, NewRepository, RemovedReplica, ReplicaSelector, VerificationJob,
    VerificationOutcome, VerificationResult,
};
use praefect::verification::{self, Cluster, Verifier, BATCH_SIZE, LEASE_DURATION};

const HOUR: Duration = Duration::from_secs(3600);

fn healthy(pairs: &[(&str, &str)]) -> Vec<HealthyStorage> {
    pairs
        .iter()
        .map(|(vs, s)| HealthyStorage {
            virtual_storage: vs.to_string(),
            storage: s.to_string(),
        })
        .collect()
}

/// Records a repository `path` of `vs` with a replica (generation 0) on each of `storages`.
async fn seed(store: &Datastore, vs: &str, path: &str, storages: &[&str]) -> i64 {
    let id = store.reserve_repository_id(vs, path).await.unwrap();
    store
        .create_repository(
            &NewRepository {
                repository_id: id,
                virtual_storage: vs.into(),
                relative_path: path.into(),
                replica_path: praefect::routing::replica_path(id),
                primary: storages[0].into(),
                updated_secondaries: storages[1..].iter().map(|s| s.to_string()).collect(),
                outdated_secondaries: vec![],
                store_assignments: false,
            },
            &[],
        )
        .await
        .unwrap();
    id
}

/// Sets a replica's verified_at to `ago` before now (None: never verified).
async fn set_verified(raw: &mut PgConnection, id: i64, storage: &str, ago: Option<Duration>) {
    sqlx::query(
        "UPDATE storage_repositories
         SET verified_at = now() - make_interval(secs => $3)
         WHERE repository_id = $1 AND storage = $2",
    )
    .bind(id)
    .bind(storage)
    .bind(ago.map(|d| d.as_secs_f64()))
    .execute(raw)
    .await
    .unwrap();
}

/// Sets a replica's lease to end `offset_secs` from now (negative: in the past).
async fn set_lease(raw: &mut PgConnection, id: i64, storage: &str, offset_secs: f64) {
    sqlx::query(
        "UPDATE storage_repositories
         SET verification_leased_until = now() + make_interval(secs => $3)
         WHERE repository_id = $1 AND storage = $2",
    )
    .bind(id)
    .bind(storage)
    .bind(offset_secs)
    .execute(raw)
    .await
    .unwrap();
}

/// A replica's verification columns: seconds since verified_at and seconds until its lease
/// ends; None for the row itself when it does not exist.
#[derive(Debug, PartialEq)]
struct ReplicaState {
    verified_secs_ago: Option<f64>,
    lease_secs_left: Option<f64>,
}

async fn replica_state(raw: &mut PgConnection, id: i64, storage: &str) -> Option<ReplicaState> {
    let row: Option<(Option<f64>, Option<f64>)> = sqlx::query_as(
        "SELECT EXTRACT(EPOCH FROM now() - verified_at)::float8,
                EXTRACT(EPOCH FROM verification_leased_until - now())::float8
         FROM storage_repositories WHERE repository_id = $1 AND storage = $2",
    )
    .bind(id)
    .bind(storage)
    .fetch_optional(raw)
    .await
    .unwrap();
    row.map(|(verified_secs_ago, lease_secs_left)| ReplicaState {
        verified_secs_ago,
        lease_secs_left,
    })
}

async fn repository_recorded(raw: &mut PgConnection, id: i64) -> bool {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM repositories WHERE repository_id = $1)")
        .bind(id)
        .fetch_one(raw)
        .await
        .unwrap()
}

fn key(job: &VerificationJob) -> (i64, String) {
    (job.repository_id, job.storage.clone())
}

#[tokio::test]
async fn due_replicas_on_healthy_storages_are_leased_oldest_first() {
    let db = TestDb::new().await;
    let store = db.datastore().await;
    let mut raw = db.raw().await;
    let r1 = seed(&store, "default", "r1.git", &["a", "b", "c"]).await;
    let r2 = seed(&store, "default", "r2.git", &["a", "b"]).await;
    let r3 = seed(&store, "other", "r3.git", &["a"]).await;
    set_verified(&mut raw, r1, "a", Some(2 * HOUR)).await;
    set_verified(&mut raw, r1, "b", Some(Duration::from_secs(600))).await; // not due yet
    set_verified(&mut raw, r2, "b", Some(3 * HOUR)).await;
    // r1/c: never verified, but c is not healthy here; r2/a: never verified; r3: other vs.
    let here = healthy(&[("default", "a"), ("default", "b")]);

    assert!(store
        .dequeue_verification(&[], HOUR, LEASE_DURATION, BATCH_SIZE)
        .await
        .unwrap()
        .is_empty());

    // One at a time: never verified first, then the least recently verified.
    let mut order = Vec::new();
    for _ in 0..3 {
        let jobs = store
            .dequeue_verification(&here, HOUR, LEASE_DURATION, 1)
            .await
            .unwrap();
        assert_eq!(jobs.len(), 1, "{jobs:?}");
        order.push(key(&jobs[0]));
    }
    assert_eq!(
        order,
        [(r2, "a".into()), (r2, "b".into()), (r1, "a".into())]
    );
    // Everything due is leased now, and r1/b is not due.
    assert!(store
        .dequeue_verification(&here, HOUR, LEASE_DURATION, BATCH_SIZE)
        .await
        .unwrap()
        .is_empty());

    for (id, storage) in [(r2, "a"), (r2, "b"), (r1, "a")] {
        let lease = replica_state(&mut raw, id, storage)
            .await
            .unwrap()
            .lease_secs_left
            .expect("leased");
        assert!((25.0..=30.5).contains(&lease), "{lease}");
    }
    for (id, storage) in [(r1, "b"), (r1, "c"), (r3, "a")] {
        assert_eq!(
            replica_state(&mut raw, id, storage)
                .await
                .unwrap()
                .lease_secs_left,
            None
        );
    }

    // A shorter interval makes r1/b due; another virtual storage's healthy storage adds r3.
    let jobs = store
        .dequeue_verification(
            &healthy(&[("default", "b"), ("other", "a")]),
            Duration::from_secs(60),
            LEASE_DURATION,
            BATCH_SIZE,
        )
        .await
        .unwrap();
    assert_eq!(
        jobs,
        [
            VerificationJob {
                repository_id: r1,
                virtual_storage: "default".into(),
                relative_path: "r1.git".into(),
                storage: "b".into(),
                replica_path: praefect::routing::replica_path(r1),
            },
            VerificationJob {
                repository_id: r3,
                virtual_storage: "other".into(),
                relative_path: "r3.git".into(),
                storage: "a".into(),
                replica_path: praefect::routing::replica_path(r3),
            },
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_pickers_never_get_the_same_replica() {
    let db = TestDb::new().await;
    let store = db.datastore().await;
    let mut ids = Vec::new();
    for i in 0..40 {
        ids.push(seed(&store, "default", &format!("r{i}.git"), &["a", "b"]).await);
    }
    let here = healthy(&[("default", "a"), ("default", "b")]);

    // A replica another transaction holds is skipped, not waited for.
    let mut holder = db.raw().await;
    let mut tx = holder.begin().await.unwrap();
    sqlx::query(
        "SELECT 1 FROM storage_repositories WHERE repository_id = $1 AND storage = 'a'
         FOR NO KEY UPDATE",
    )
    .bind(ids[0])
    .execute(&mut *tx)
    .await
    .unwrap();
    let jobs = tokio::time::timeout(
        Duration::from_secs(3),
        store.dequeue_verification(&here, HOUR, LEASE_DURATION, 100),
    )
    .await
    .expect("a locked row does not block the picker")
    .unwrap();
    assert_eq!(jobs.len(), 79);
    assert!(!jobs.iter().any(|j| key(j) == (ids[0], "a".to_string())));
    tx.rollback().await.unwrap();
    let mut raw = db.raw().await;
    raw.execute("UPDATE storage_repositories SET verification_leased_until = NULL")
        .await
        .unwrap();

    // Eight routers (pools of their own) pick batches of five at once until nothing is left.
    let mut pickers = Vec::new();
    for _ in 0..8 {
        let store = db.datastore().await;
        let here = here.clone();
        pickers.push(tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let jobs = store
                    .dequeue_verification(&here, HOUR, LEASE_DURATION, 5)
                    .await
                    .unwrap();
                if jobs.is_empty() {
                    return got;
                }
                got.extend(jobs.iter().map(key));
            }
        }));
    }
    let mut all = Vec::new();
    let mut busy = 0;
    for picker in pickers {
        let got = picker.await.unwrap();
        busy += usize::from(!got.is_empty());
        all.extend(got);
    }
    let distinct: BTreeSet<_> = all.iter().cloned().collect();
    assert_eq!(distinct.len(), all.len(), "a replica was leased twice");
    assert_eq!(all.len(), 80);
    assert!(busy > 1, "the pickers ran concurrently");
    assert!(store
        .dequeue_verification(&here, HOUR, LEASE_DURATION, 100)
        .await
        .unwrap()
        .is_empty());
}

async fn next_payload(listener: &mut PgListener) -> serde_json::Value {
    let notification = tokio::time::timeout(Duration::from_secs(5), listener.recv())
        .await
        .expect("a notification within 5s")
        .unwrap();
    serde_json::from_str(notification.payload()).unwrap()
}

async fn assert_silent(listener: &mut PgListener) {
    if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(500), listener.recv()).await {
        panic!("unexpected notification: {}", n.payload());
    }
}

fn result(id: i64, storage: &str, outcome: VerificationOutcome) -> VerificationResult {
    VerificationResult {
        repository_id: id,
        storage: storage.into(),
        outcome,
    }
}

const VALID: VerificationOutcome = VerificationOutcome::Checked { exists: true };
const INVALID: VerificationOutcome = VerificationOutcome::Checked { exists: false };
const FAILED: VerificationOutcome = VerificationOutcome::Failed;

#[tokio::test]
async fn outcomes_verify_replicas_and_delete_the_records_of_missing_ones() {
    let db = TestDb::new().await;
    let store = db.datastore().await;
    let mut raw = db.raw().await;
    let r1 = seed(&store, "default", "r1.git", &["a", "b", "c"]).await;
    let r2 = seed(&store, "default", "r2.git", &["a", "b"]).await;
    let r3 = seed(&store, "default", "r3.git", &["a"]).await;
    let here = healthy(&[("default", "a"), ("default", "b"), ("default", "c")]);
    let jobs = store
        .dequeue_verification(&here, HOUR, LEASE_DURATION, BATCH_SIZE)
        .await
        .unwrap();
    assert_eq!(jobs.len(), 6);

    let mut listener = PgListener::connect(&db.url()).await.unwrap();
    listener
        .listen_all(["storage_repositories_updates", "repositories_updates"])
        .await
        .unwrap();

    // Deletions on.
    let removed = store
        .record_verification(
            &[
                result(r1, "a", VALID),
                result(r1, "b", INVALID),
                result(r1, "c", FAILED),
            ],
            true,
        )
        .await
        .unwrap();
    assert_eq!(
        removed,
        [RemovedReplica {
            repository_id: r1,
            virtual_storage: "default".into(),
            relative_path: "r1.git".into(),
            storage: "b".into(),
        }]
    );
    let a = replica_state(&mut raw, r1, "a").await.unwrap();
    assert!(a.verified_secs_ago.unwrap() < 5.0, "{a:?}");
    assert_eq!(a.lease_secs_left, None);
    assert_eq!(replica_state(&mut raw, r1, "b").await, None);
    assert_eq!(
        replica_state(&mut raw, r1, "c").await,
        Some(ReplicaState {
            verified_secs_ago: None,
            lease_secs_left: None
        }),
        "a failed check leaves the replica unverified, without lease"
    );
    assert!(
        repository_recorded(&mut raw, r1).await,
        "the repository stays"
    );
    // The deletion evicts the routers' cache entry; the bookkeeping alone does not notify.
    assert_eq!(
        next_payload(&mut listener).await,
        json!([{"virtual_storage": "default", "relative_paths": ["r1.git"]}])
    );
    assert_silent(&mut listener).await;

    // Deletions off: the missing replica is verified and kept.
    let removed = store
        .record_verification(&[result(r2, "a", INVALID), result(r2, "b", VALID)], false)
        .await
        .unwrap();
    assert!(removed.is_empty());
    for storage in ["a", "b"] {
        let state = replica_state(&mut raw, r2, storage).await.unwrap();
        assert!(state.verified_secs_ago.unwrap() < 5.0, "{state:?}");
        assert_eq!(state.lease_secs_left, None);
    }
    assert_silent(&mut listener).await;

    // An outcome whose lease was released meanwhile is not recorded: it is checked again.
    sqlx::query(
        "UPDATE storage_repositories SET verification_leased_until = NULL WHERE repository_id = $1",
    )
    .bind(r3)
    .execute(&mut raw)
    .await
    .unwrap();
    let removed = store
        .record_verification(&[result(r3, "a", INVALID)], true)
        .await
        .unwrap();
    assert!(removed.is_empty());
    assert_eq!(
        replica_state(&mut raw, r3, "a").await,
        Some(ReplicaState {
            verified_secs_ago: None,
            lease_secs_left: None
        })
    );
}

#[tokio::test]
async fn stale_leases_are_released_in_batches() {
    let db = TestDb::new().await;
    let store = db.datastore().await;
    let mut raw = db.raw().await;
    let mut ids = Vec::new();
    for i in 0..60 {
        ids.push(seed(&store, "default", &format!("r{i}.git"), &["a"]).await);
    }
    for (i, id) in ids.iter().enumerate() {
        let offset = match i {
            0..55 => -31.0 - i as f64, // expired more than 30 s ago: stale
            55..58 => -10.0,           // expired, but recently
            _ => 20.0,                 // held
        };
        set_lease(&mut raw, *id, "a", offset).await;
    }

    let first = store
        .release_stale_verification_leases(verification::STALE_LEASE_GRACE, BATCH_SIZE)
        .await
        .unwrap();
    assert_eq!(first.len(), 25);
    assert!(first
        .iter()
        .all(|lease| ids[..55].contains(&lease.repository_id)));

    let before = praefect::metrics::STALE_VERIFICATION_LEASES_RELEASED.get();
    assert_eq!(
        verification::release_stale_leases(&store).await.unwrap(),
        30
    );
    assert!(praefect::metrics::STALE_VERIFICATION_LEASES_RELEASED.get() >= before + 30);
    assert_eq!(verification::release_stale_leases(&store).await.unwrap(), 0);

    let leased: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM storage_repositories WHERE verification_leased_until IS NOT NULL",
    )
    .fetch_one(&mut raw)
    .await
    .unwrap();
    assert_eq!(leased, 5);
    for id in &ids[..55] {
        assert_eq!(
            replica_state(&mut raw, *id, "a")
                .await
                .unwrap()
                .lease_secs_left,
            None
        );
    }
}

async fn verify_all(raw: &mut PgConnection) {
    raw.execute("UPDATE storage_repositories SET verified_at = now()")
        .await
        .unwrap();
}

async fn unverified(raw: &mut PgConnection) -> Vec<(i64, String)> {
    sqlx::query_as(
        "SELECT repository_id, storage FROM storage_repositories
         WHERE verified_at IS NULL ORDER BY 1, 2",
    )
    .fetch_all(raw)
    .await
    .unwrap()
}

#[tokio::test]
async fn operators_mark_replicas_unverified() {
    let db = TestDb::new().await;
    let store = db.datastore().await;
    let mut raw = db.raw().await;
    let r1 = seed(&store, "default", "r1.git", &["a", "b"]).await;
    let r2 = seed(&store, "default", "r2.git", &["a"]).await;
    let r3 = seed(&store, "other", "r3.git", &["a"]).await;
    verify_all(&mut raw).await;
    assert_eq!(
        store
            .mark_unverified(&ReplicaSelector::Repository(r1))
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        unverified(&mut raw).await,
        [(r1, "a".into()), (r1, "b".into())]
    );

    verify_all(&mut raw).await;
    let on_a = ReplicaSelector::Storage {
        virtual_storage: "default".into(),
        storage: "a".into(),
    };
    assert_eq!(store.mark_unverified(&on_a).await.unwrap(), 2);
    assert_eq!(
        unverified(&mut raw).await,
        [(r1, "a".into()), (r2, "a".into())]
    );

    verify_all(&mut raw).await;
    assert_eq!(
        store
            .mark_unverified(&ReplicaSelector::VirtualStorage("other".into()))
            .await
            .unwrap(),
        1
    );
    assert_eq!(unverified(&mut raw).await, [(r3, "a".into())]);
    assert_eq!(
        store
            .mark_unverified(&ReplicaSelector::Repository(r3 + 1000))
            .await
            .unwrap(),
        0
    );
}

/// A cluster whose answers the test scripts: per (repository, storage), exists, missing,
/// failing, or hanging; everything else exists.
#[derive(Clone, Default)]
struct ScriptedCluster {
    healthy: Vec<HealthyStorage>,
    answers: BTreeMap<(i64, String), Answer>,
    calls: Arc<AtomicUsize>,
}

#[derive(Clone, Copy)]
enum Answer {
    Missing,
    Fails,
    Hangs,
}

impl Cluster for ScriptedCluster {
    fn healthy_storages(&self) -> Vec<HealthyStorage> {
        self.healthy.clone()
    }

    fn replica_exists(
        &self,
        job: &VerificationJob,
    ) -> impl std::future::Future<Output = Result<bool, String>> + Send {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let answer = self.answers.get(&key(job)).copied();
        async move {
            match answer {
                None => Ok(true),
                Some(Answer::Missing) => Ok(false),
                Some(Answer::Fails) => Err("node says no".to_string()),
                Some(Answer::Hangs) => std::future::pending().await,
            }
        }
    }
}

#[tokio::test]
async fn the_worker_checks_a_batch_and_records_it() {
    let db = TestDb::new().await;
    let store = db.datastore().await;
    let mut raw = db.raw().await;
    let r1 = seed(&store, "default", "r1.git", &["a", "b"]).await;
    let r2 = seed(&store, "default", "r2.git", &["a", "b"]).await;
    let mut cluster = ScriptedCluster {
        healthy: healthy(&[("default", "a"), ("default", "b")]),
        ..Default::default()
    };
    cluster.answers.insert((r1, "b".into()), Answer::Missing);
    cluster.answers.insert((r2, "a".into()), Answer::Fails);

    let settings = |interval: &str| BackgroundVerification {
        verification_interval: GoDuration::parse(interval).unwrap(),
        delete_invalid_records: true,
    };
    assert!(Verifier::from_config(store.clone(), cluster.clone(), &settings("0s")).is_none());
    let verifier = Verifier::from_config(store.clone(), cluster.clone(), &settings("1h")).unwrap();
    let stop = CancellationToken::new();

    let invalid_before = praefect::metrics::VERIFICATION_JOBS_COMPLETED
        .with_label_values(&["default", "b", "invalid"])
        .get();
    let summary = verifier.run_once(&stop).await.unwrap();
    assert_eq!(
        (
            summary.dequeued,
            summary.valid,
            summary.invalid,
            summary.errors
        ),
        (4, 2, 1, 1)
    );
    assert_eq!(
        summary.removed,
        [RemovedReplica {
            repository_id: r1,
            virtual_storage: "default".into(),
            relative_path: "r1.git".into(),
            storage: "b".into(),
        }]
    );
    assert!(
        praefect::metrics::VERIFICATION_JOBS_COMPLETED
            .with_label_values(&["default", "b", "invalid"])
            .get()
            > invalid_before
    );
    assert_eq!(replica_state(&mut raw, r1, "b").await, None);
    assert!(repository_recorded(&mut raw, r1).await);

    // The failed check is due again; the others are verified for an hour.
    let summary = verifier.run_once(&stop).await.unwrap();
    assert_eq!((summary.dequeued, summary.errors), (1, 1));
    assert_eq!(cluster.calls.load(Ordering::SeqCst), 5);

    // A check that hangs ends with the stop signal; its lease is cleared.
    let mut hanging = cluster.clone();
    hanging.answers.insert((r2, "a".into()), Answer::Hangs);
    let verifier = Verifier::new(store.clone(), hanging, HOUR, true);
    let stop = CancellationToken::new();
    let started = Instant::now();
    let run = tokio::spawn({
        let stop = stop.clone();
        async move { verifier.run_once(&stop).await }
    });
    wait_until(
        Duration::from_secs(10),
        "the hanging check is under way",
        async || cluster.calls.load(Ordering::SeqCst) == 6,
    )
    .await;
    stop.cancel();
    let summary = run.await.unwrap().unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!((summary.dequeued, summary.errors), (1, 1));
    assert_eq!(
        replica_state(&mut raw, r2, "a").await,
        Some(ReplicaState {
            verified_secs_ago: None,
            lease_secs_left: None
        })
    );
}

/// Runs `praefect` with `args`; (exit code, stdout, stderr).
async fn praefect(args: &[&str]) -> (i32, String, String) {
    let output = tokio::process::Command::new(BIN)
        .args(args)
        .output()
        .await
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

async fn scrape(router: &Router) -> String {
    let address = router.metrics_address.clone().expect("metrics configured");
    tokio::task::spawn_blocking(move || common::router::scrape_metrics(&address))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_lost_on_disk_is_found_and_dropped() {
    use praefect::wire::proto::praefect_info_service_client::PraefectInfoServiceClient;
    use praefect::wire::proto::ref_service_client::RefServiceClient;
    use praefect::wire::proto::{
        mark_unverified_request::Selector, FindDefaultBranchNameRequest, MarkUnverifiedRequest,
    };

    let db = TestDb::new().await;
    let n1 = GitNode::start("gitaly-1");
    let n2 = GitNode::start("gitaly-2");
    let id = seed_repository(&db, &[&n1, &n2], "lost.git").await;
    let replica_path = praefect::routing::replica_path(id);
    let dir = tempfile::tempdir().unwrap();
    // The verify command dials the configured listen address: a fixed port, not port 0.
    let config = write_config_on(
        dir.path(),
        &db.connection(),
        &[(&n1).into(), (&n2).into()],
        &format!("127.0.0.1:{}", free_port()),
        "prometheus_listen_addr = \"127.0.0.1:0\"\n[background_verification]\nverification_interval = \"1h\"\n",
    );
    let config_arg = config.to_str().unwrap().to_string();
    let router = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || Router::start(&config))
            .await
            .unwrap()
    };
    let mut raw = db.raw().await;

    // The worker verifies both replicas soon after the start.
    wait_until(
        Duration::from_secs(30),
        "both replicas are verified",
        async || {
            let verified: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM storage_repositories
             WHERE repository_id = $1 AND verified_at IS NOT NULL",
            )
            .bind(id)
            .fetch_one(&mut raw)
            .await
            .unwrap();
            verified == 2
        },
    )
    .await;
    let metrics = scrape(&router).await;
    for storage in ["gitaly-1", "gitaly-2"] {
        let labels = [("virtual_storage", "default"), ("storage", storage)];
        assert!(
            sample(
                &metrics,
                "gitaly_praefect_verification_jobs_dequeued_total",
                &labels
            ) >= 1.0
        );
        let valid = [labels[0], labels[1], ("result", "valid")];
        assert!(
            sample(
                &metrics,
                "gitaly_praefect_verification_jobs_completed_total",
                &valid
            ) >= 1.0
        );
    }

    // The replica on gitaly-2 disappears behind the router's back; verified for an hour, it
    // would not be looked at again soon. The operator asks for a new check.
    std::fs::remove_dir_all(n2.root.join(&replica_path)).unwrap();
    let id_arg = id.to_string();
    let (code, stdout, stderr) =
        praefect(&["-config", &config_arg, "verify", "-repository-id", &id_arg]).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout, "2 replicas marked unverified\n");

    let marked = Instant::now();
    wait_until(
        Duration::from_secs(30),
        "the lost replica's record is removed",
        async || replica_state(&mut raw, id, "gitaly-2").await.is_none(),
    )
    .await;
    assert!(
        marked.elapsed() < Duration::from_secs(15),
        "took {:?}",
        marked.elapsed()
    );
    assert!(
        repository_recorded(&mut raw, id).await,
        "the repository record stays"
    );
    let kept = replica_state(&mut raw, id, "gitaly-1").await.unwrap();
    assert!(kept.verified_secs_ago.unwrap() < 30.0, "{kept:?}");
    assert_eq!(kept.lease_secs_left, None);
    let metrics = scrape(&router).await;
    let invalid = [
        ("virtual_storage", "default"),
        ("storage", "gitaly-2"),
        ("result", "invalid"),
    ];
    assert!(
        sample(
            &metrics,
            "gitaly_praefect_verification_jobs_completed_total",
            &invalid
        ) >= 1.0
    );

    // Reads now go to the remaining replica only (and all succeed).
    let reads_before = |storage: &str| {
        sample(
            &metrics,
            "gitaly_praefect_read_distribution",
            &[("virtual_storage", "default"), ("storage", storage)],
        )
    };
    let (n1_before, n2_before) = (reads_before("gitaly-1"), reads_before("gitaly-2"));
    let mut refs = RefServiceClient::new(router.channel());
    for _ in 0..20 {
        let branch = refs
            .find_default_branch_name(FindDefaultBranchNameRequest {
                repository: Some(virtual_repo("lost.git")),
                head_only: false,
            })
            .await
            .expect("reads are served by the remaining replica")
            .into_inner()
            .name;
        assert_eq!(branch, b"refs/heads/main");
    }
    let metrics = scrape(&router).await;
    let reads = |storage: &str| {
        sample(
            &metrics,
            "gitaly_praefect_read_distribution",
            &[("virtual_storage", "default"), ("storage", storage)],
        )
    };
    assert_eq!(reads("gitaly-1") - n1_before, 20.0);
    assert_eq!(reads("gitaly-2"), n2_before);

    // The other selectors, and their errors.
    let (code, stdout, stderr) = praefect(&[
        "verify",
        "-config",
        &config_arg,
        "-virtual-storage",
        "default",
        "-storage",
        "gitaly-1",
    ])
    .await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout, "1 replicas marked unverified\n");
    let (code, stdout, _) = praefect(&[
        "-config",
        &config_arg,
        "verify",
        "-virtual-storage",
        "default",
    ])
    .await;
    assert_eq!(
        (code, stdout.as_str()),
        (0, "1 replicas marked unverified\n")
    );
    let (code, _, stderr) =
        praefect(&["-config", &config_arg, "verify", "-virtual-storage", "nope"]).await;
    assert_eq!(code, 1);
    assert!(
        stderr.contains("unknown virtual storage \"nope\""),
        "{stderr}"
    );
    let (code, _, stderr) = praefect(&[
        "-config",
        &config_arg,
        "verify",
        "-virtual-storage",
        "default",
        "-storage",
        "gitaly-9",
    ])
    .await;
    assert_eq!(code, 1);
    assert!(stderr.contains("unknown storage \"gitaly-9\""), "{stderr}");

    let mut info = PraefectInfoServiceClient::new(router.channel());
    let status = info
        .mark_unverified(MarkUnverifiedRequest {
            selector: Some(Selector::VirtualStorage("nope".into())),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let status = info
        .mark_unverified(MarkUnverifiedRequest { selector: None })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let marked = info
        .mark_unverified(MarkUnverifiedRequest {
            selector: Some(Selector::RepositoryId(id + 1000)),
        })
        .await
        .unwrap()
        .into_inner()
        .replicas_marked;
    assert_eq!(marked, 0);
}

#[tokio::test]
async fn verify_flags_are_checked_before_dialing() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on this router's address: flag errors must come first.
    let config = write_config_with(
        dir.path(),
        &db.connection(),
        &[NodeEntry::new("gitaly-1", "tcp://127.0.0.1:1")],
        "",
    );
    let config = config.to_str().unwrap();
    for (args, wanted) in [
        (
            vec!["-repository-id", "1", "-virtual-storage", "default"],
            "cannot be used with",
        ),
        (vec!["-storage", "gitaly-1"], "required"),
        (vec![], "required"),
        (vec!["-repository-id", "0"], "invalid value"),
    ] {
        let mut argv = vec!["-config", config, "verify"];
        argv.extend(args.iter().copied());
        let (code, stdout, stderr) = praefect(&argv).await;
        assert_eq!(code, 2, "{args:?}: {stdout}{stderr}");
        assert!(stderr.contains(wanted), "{args:?}: {stderr}");
    }
}
