//! The replication queue and the reconciler's scheduling on a real PostgreSQL: enqueue
//! deduplication, dequeue rules, acknowledgement, stale jobs, orphan locks, several routers
//! dequeuing at once, and which jobs reconciliation queues.
// Tests read and write the database directly (not through PgBouncer), so the
// datastore's rule about unnamed statements (clippy.toml) does not apply here.
#![allow(clippy::disallowed_methods)]

use crate::common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::pg::TestDb;
use praefect::datastore::{
    ChangeType, Datastore, HealthObservation, JobState, NewRepository, ReplicationJob,
};

fn job(change: ChangeType, path: &str, source: &str, target: &str) -> ReplicationJob {
    ReplicationJob {
        repository_id: 1,
        replica_path: format!("@cluster/{path}"),
        change,
        relative_path: path.to_string(),
        target_node_storage: target.to_string(),
        source_node_storage: source.to_string(),
        virtual_storage: "vs".to_string(),
        params: None,
    }
}

fn update(path: &str, source: &str, target: &str) -> ReplicationJob {
    job(ChangeType::Update, path, source, target)
}

async fn rows(raw: &mut sqlx::PgConnection) -> Vec<(i64, String, i32)> {
    sqlx::query_as("SELECT id, state::text, attempt FROM replication_queue ORDER BY id")
        .fetch_all(raw)
        .await
        .unwrap()
}

async fn lock_acquired(raw: &mut sqlx::PgConnection, id: &str) -> bool {
    sqlx::query_scalar("SELECT acquired FROM replication_queue_lock WHERE id = $1")
        .bind(id)
        .fetch_one(raw)
        .await
        .unwrap()
}

/// Every running job's heartbeat two minutes old, as if its router had died.
async fn stop_heartbeats(raw: &mut sqlx::PgConnection) {
    sqlx::query(
        "UPDATE replication_queue_job_lock SET triggered_at = triggered_at - interval '2 minutes'",
    )
    .execute(raw)
    .await
    .unwrap();
}

/// Releases the jobs whose heartbeat is older than a minute; how many.
async fn release_stale(store: &Datastore) -> u64 {
    store
        .release_stale_jobs(Duration::from_secs(60))
        .await
        .unwrap()
}

#[tokio::test]
async fn a_ready_duplicate_is_not_queued_twice() {
    let db = TestDb::new().await;
    let store = db.datastore().await;
    let first = store
        .enqueue(&update("a.git", "g1", "g2"), "c1")
        .await
        .unwrap();
    assert!(first.is_some());
    // Same replica and change, another source: still a duplicate.
    assert_eq!(
        store
            .enqueue(&update("a.git", "g3", "g2"), "c2")
            .await
            .unwrap(),
        None
    );
    // Another change, another target, another repository: new jobs.
    for other in [
        job(ChangeType::DeleteReplica, "a.git", "", "g2"),
        update("a.git", "g1", "g3"),
        update("b.git", "g1", "g2"),
    ] {
        assert!(
            store.enqueue(&other, "c").await.unwrap().is_some(),
            "{other:?}"
        );
    }
    let mut raw = db.raw().await;
    assert_eq!(rows(&mut raw).await.len(), 4);
    let meta: serde_json::Value =
        sqlx::query_scalar("SELECT meta FROM replication_queue WHERE id = $1")
            .bind(first.unwrap())
            .fetch_one(&mut raw)
            .await
            .unwrap();
    assert_eq!(meta["correlation_id"], "c1");
}

#[tokio::test]
async fn dequeue_takes_the_oldest_job_per_replica_and_change_and_locks_the_replica() {
    let db = TestDb::new().await;
    let store = db.datastore().await;
    let mut raw = db.raw().await;
    let first = store
        .enqueue(&update("a.git", "g1", "g2"), "")
        .await
        .unwrap()
        .unwrap();
    // A second update for the same replica can only be queued once the first left `ready`.
    let delete = store
        .enqueue(&job(ChangeType::DeleteReplica, "a.git", "", "g2"), "")
        .await
        .unwrap()
        .unwrap();
    let other_target = store
        .enqueue(&update("a.git", "g1", "g3"), "")
        .await
        .unwrap()
        .unwrap();
    let _ = store
        .enqueue(&update("b.git", "g1", "g2"), "")
        .await
        .unwrap()
        .unwrap();

    let taken = store.dequeue("vs", "g2", 10).await.unwrap();
    let ids: Vec<i64> = taken.iter().map(|j| j.id).collect();
    assert_eq!(ids.len(), 3, "{taken:?}");
    assert!(ids.contains(&first) && ids.contains(&delete) && !ids.contains(&other_target));
    for queued in &taken {
        assert_eq!(queued.state, JobState::InProgress);
        let expected = if queued.job.change == ChangeType::DeleteReplica {
            3
        } else {
            2
        };
        assert_eq!(queued.attempt, expected, "{queued:?}");
    }
    assert!(lock_acquired(&mut raw, "vs|g2|a.git").await);
    assert!(!lock_acquired(&mut raw, "vs|g3|a.git").await);

    // While they run, a new job for a locked replica waits.
    let waiting = store
        .enqueue(&update("a.git", "g1", "g2"), "")
        .await
        .unwrap()
        .unwrap();
    assert!(store.dequeue("vs", "g2", 10).await.unwrap().is_empty());

    // Acknowledged: the lock is free again and the waiting job can be taken.
    let acked = store.acknowledge(JobState::Completed, &ids).await.unwrap();
    assert_eq!(acked.len(), 3);
    assert!(!lock_acquired(&mut raw, "vs|g2|a.git").await);
    let next = store.dequeue("vs", "g2", 10).await.unwrap();
    assert_eq!(next.iter().map(|j| j.id).collect::<Vec<_>>(), [waiting]);

    // The limit holds; a storage name with LIKE wildcards matches only itself.
    assert_eq!(store.dequeue("vs", "g3", 0).await.unwrap().len(), 0);
    store
        .enqueue(&update("c.git", "g1", "g_x"), "")
        .await
        .unwrap()
        .unwrap();
    assert!(store.dequeue("vs", "gyx", 10).await.unwrap().is_empty());
    assert_eq!(store.dequeue("vs", "g_x", 10).await.unwrap().len(), 1);
}

#[tokio::test]
async fn acknowledgement_by_outcome() {
    let db = TestDb::new().await;
    let store = db.datastore().await;
    let mut raw = db.raw().await;
    let id = store
        .enqueue(&update("a.git", "g1", "g2"), "")
        .await
        .unwrap()
        .unwrap();

    // Three attempts: failed twice, then the last attempt dies.
    for expected_attempt in [2, 1, 0] {
        let taken = store.dequeue("vs", "g2", 10).await.unwrap();
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].attempt, expected_attempt);
        let state = if expected_attempt > 0 {
            JobState::Failed
        } else {
            JobState::Dead
        };
        assert_eq!(store.acknowledge(state, &[id]).await.unwrap(), [id]);
    }
    assert!(rows(&mut raw).await.is_empty(), "dead jobs are deleted");

    // Only in_progress jobs are acknowledged.
    let ready = store
        .enqueue(&update("a.git", "g1", "g2"), "")
        .await
        .unwrap()
        .unwrap();
    assert!(store
        .acknowledge(JobState::Completed, &[ready])
        .await
        .unwrap()
        .is_empty());
    assert_eq!(rows(&mut raw).await.len(), 1);

    // A completed job also removes the older ready jobs it made redundant (same replica,
    // change and source), not those from another source.
    let taken = store.dequeue("vs", "g2", 10).await.unwrap();
    let same_source = store
        .enqueue(&update("a.git", "g1", "g2"), "")
        .await
        .unwrap()
        .unwrap();
    sqlx::query(
        "UPDATE replication_queue SET created_at = created_at - interval '1 minute' WHERE id = $1",
    )
    .bind(same_source)
    .execute(&mut raw)
    .await
    .unwrap();
    store
        .acknowledge(JobState::Completed, &[taken[0].id])
        .await
        .unwrap();
    assert!(rows(&mut raw).await.is_empty());

    let taken = store.dequeue("vs", "g2", 10).await;
    assert!(taken.unwrap().is_empty());
    let first = store
        .enqueue(&update("a.git", "g1", "g2"), "")
        .await
        .unwrap()
        .unwrap();
    let taken = store.dequeue("vs", "g2", 10).await.unwrap();
    assert_eq!(taken[0].id, first);
    let other_source = store
        .enqueue(&update("a.git", "g3", "g2"), "")
        .await
        .unwrap()
        .unwrap();
    sqlx::query(
        "UPDATE replication_queue SET created_at = created_at - interval '1 minute' WHERE id = $1",
    )
    .bind(other_source)
    .execute(&mut raw)
    .await
    .unwrap();
    store
        .acknowledge(JobState::Completed, &[first])
        .await
        .unwrap();
    assert_eq!(
        rows(&mut raw).await,
        [(other_source, "ready".to_string(), 3)]
    );
}

#[tokio::test]
async fn jobs_of_a_dead_router_are_handed_out_again_and_unused_locks_dropped() {
    let db = TestDb::new().await;
    let store = db.datastore().await;
    let mut raw = db.raw().await;
    let retried = store
        .enqueue(&update("a.git", "g1", "g2"), "")
        .await
        .unwrap()
        .unwrap();
    let exhausted = store
        .enqueue(&update("b.git", "g1", "g2"), "")
        .await
        .unwrap()
        .unwrap();
    sqlx::query("UPDATE replication_queue SET attempt = 1 WHERE id = $1")
        .bind(exhausted)
        .execute(&mut raw)
        .await
        .unwrap();
    let taken = store.dequeue("vs", "g2", 10).await.unwrap();
    assert_eq!(taken.len(), 2);

    // A heartbeat keeps them; fresh ones are not stale.
    let ids: Vec<i64> = taken.iter().map(|j| j.id).collect();
    assert_eq!(store.refresh_job_locks(&ids).await.unwrap(), 2);
    assert_eq!(release_stale(&store).await, 0);
    // The router died: no heartbeat for two minutes.
    stop_heartbeats(&mut raw).await;
    assert_eq!(release_stale(&store).await, 2);
    // The one with attempts left is failed (and can run again); the other is gone.
    assert_eq!(rows(&mut raw).await, [(retried, "failed".to_string(), 2)]);
    assert!(!lock_acquired(&mut raw, "vs|g2|a.git").await);
    let again = store.dequeue("vs", "g2", 10).await.unwrap();
    assert_eq!(again.iter().map(|j| j.id).collect::<Vec<_>>(), [retried]);
    store
        .acknowledge(JobState::Completed, &[retried])
        .await
        .unwrap();

    // Both locks are unused now.
    assert_eq!(store.delete_orphan_locks(1000).await.unwrap(), 2);
    let locks: i64 = sqlx::query_scalar("SELECT count(*) FROM replication_queue_lock")
        .fetch_one(&mut raw)
        .await
        .unwrap();
    assert_eq!(locks, 0);
}

/// The job locks have no foreign keys (they cost a third of the queue's time): a job lock
/// whose job was deleted under it, which only a bug could leave, must still not hold its
/// replica's lock for ever. Once its heartbeat stops it is released as stale, and the replica
/// gets its next job.
#[tokio::test]
async fn a_job_lock_without_its_job_is_released_as_stale() {
    let db = TestDb::new().await;
    let store = db.datastore().await;
    let mut raw = db.raw().await;
    store
        .enqueue(&update("a.git", "g1", "g2"), "")
        .await
        .unwrap()
        .unwrap();
    let taken = store.dequeue("vs", "g2", 10).await.unwrap();
    assert_eq!(taken.len(), 1);
    // The bug: the running job's row goes, its job lock stays.
    sqlx::query("DELETE FROM replication_queue WHERE id = $1")
        .bind(taken[0].id)
        .execute(&mut raw)
        .await
        .unwrap();
    let next = store
        .enqueue(&update("a.git", "g1", "g2"), "")
        .await
        .unwrap()
        .unwrap();
    // Acknowledging the lost job does nothing, and the replica stays locked meanwhile.
    let acked = store
        .acknowledge(JobState::Completed, &[taken[0].id])
        .await
        .unwrap();
    assert!(acked.is_empty());
    assert!(lock_acquired(&mut raw, "vs|g2|a.git").await);
    assert!(store.dequeue("vs", "g2", 10).await.unwrap().is_empty());
    stop_heartbeats(&mut raw).await;
    assert_eq!(release_stale(&store).await, 1);
    assert!(!lock_acquired(&mut raw, "vs|g2|a.git").await);
    let again = store.dequeue("vs", "g2", 10).await.unwrap();
    assert_eq!(again.iter().map(|j| j.id).collect::<Vec<_>>(), [next]);
}

/// Several routers dequeue from one database at once: no replica is worked on by two jobs at
/// the same time, no job runs twice, none is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_routers_never_run_two_jobs_for_one_replica() {
    let db = TestDb::new().await;
    let seed = db.datastore().await;
    let targets = ["g1", "g2"];
    let mut expected = HashSet::new();
    for repo in 0..40 {
        for target in targets {
            let path = format!("r{repo}.git");
            let id = seed
                .enqueue(&update(&path, "g0", target), "")
                .await
                .unwrap()
                .unwrap();
            expected.insert(id);
            // A second change for the same replica competes for the same lock (one active
            // delete_replica per repository at most).
            if repo % 4 == 0 && target == "g1" {
                let delete = seed
                    .enqueue(&job(ChangeType::DeleteReplica, &path, "", target), "")
                    .await
                    .unwrap()
                    .unwrap();
                expected.insert(delete);
            }
        }
    }
    // Which router works on which replica lock right now.
    let running: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let done: Arc<Mutex<HashMap<i64, usize>>> = Arc::default();
    let violations: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut routers = Vec::new();
    for router in 0..4 {
        let store: Datastore = db.datastore().await;
        let (running, done, violations) = (running.clone(), done.clone(), violations.clone());
        routers.push(tokio::spawn(async move {
            let mut idle_rounds = 0;
            while idle_rounds < 5 {
                let target = targets[router % 2];
                let jobs = store.dequeue("vs", target, 3).await.unwrap();
                if jobs.is_empty() {
                    idle_rounds += 1;
                    // A worker's idle pause; five empty rounds in a row end it.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                idle_rounds = 0;
                for queued in &jobs {
                    let mut running = running.lock().unwrap();
                    let holder = *running.entry(queued.lock_id.clone()).or_insert(router);
                    if holder != router {
                        violations.lock().unwrap().push(format!(
                            "{} taken by router {router} while router {holder} works on it",
                            queued.lock_id
                        ));
                    }
                }
                // The "work": the locks are held a moment, for another router to collide.
                tokio::time::sleep(Duration::from_millis(5)).await;
                for queued in &jobs {
                    running.lock().unwrap().remove(&queued.lock_id);
                    *done.lock().unwrap().entry(queued.id).or_default() += 1;
                }
                let ids: Vec<i64> = jobs.iter().map(|j| j.id).collect();
                store.acknowledge(JobState::Completed, &ids).await.unwrap();
            }
        }));
    }
    for router in routers {
        router.await.unwrap();
    }
    // Two jobs of one batch may share a lock (update and delete_replica of one replica run
    // one after the other in one worker); two routers never do.
    let violations = violations.lock().unwrap().clone();
    assert!(violations.is_empty(), "{violations:#?}");
    let done = done.lock().unwrap().clone();
    assert!(
        done.values().all(|runs| *runs == 1),
        "a job ran twice: {done:?}"
    );
    assert_eq!(done.keys().copied().collect::<HashSet<_>>(), expected);
    let mut raw = db.raw().await;
    assert!(rows(&mut raw).await.is_empty());
}

async fn healthy(store: &Datastore, storages: &[&str]) {
    let observations: Vec<_> = ["g1", "g2", "g3"]
        .iter()
        .map(|s| HealthObservation {
            virtual_storage: "vs".into(),
            storage: s.to_string(),
            healthy: storages.contains(s),
        })
        .collect();
    store.record_health("p1", &observations).await.unwrap();
}

fn pairs(storages: &[&str]) -> Vec<(String, String)> {
    storages
        .iter()
        .map(|s| ("vs".to_string(), s.to_string()))
        .collect()
}

#[tokio::test]
async fn reconciliation_repairs_outdated_replicas_and_drops_unassigned_ones() {
    let db = TestDb::new().await;
    let store = db.datastore().await;
    let mut raw = db.raw().await;
    healthy(&store, &["g1", "g2", "g3"]).await;
    let all = pairs(&["g1", "g2", "g3"]);

    // r1: only on g1 (no assignments = every storage is assigned): updates for g2 and g3.
    let r1 = store.reserve_repository_id("vs", "r1.git").await.unwrap();
    store
        .create_repository(
            &NewRepository {
                repository_id: r1,
                virtual_storage: "vs".into(),
                relative_path: "r1.git".into(),
                replica_path: praefect::routing::replica_path(r1),
                primary: "g1".into(),
                updated_secondaries: vec![],
                outdated_secondaries: vec!["g2".into(), "g3".into()],
                store_assignments: false,
            },
            &[],
        )
        .await
        .unwrap();
    // r2: assigned to g1 and g2, replicas on all three at the same generation: g3 goes.
    let r2 = store.reserve_repository_id("vs", "r2.git").await.unwrap();
    store
        .create_repository(
            &NewRepository {
                repository_id: r2,
                virtual_storage: "vs".into(),
                relative_path: "r2.git".into(),
                replica_path: praefect::routing::replica_path(r2),
                primary: "g1".into(),
                updated_secondaries: vec!["g2".into()],
                outdated_secondaries: vec![],
                store_assignments: true,
            },
            &[],
        )
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO storage_repositories (repository_id, virtual_storage, relative_path, storage, generation)
         VALUES ($1, 'vs', 'r2.git', 'g3', 0)",
    )
    .bind(r2)
    .execute(&mut raw)
    .await
    .unwrap();

    let jobs = store
        .schedule_reconciliation(&all, &all)
        .await
        .unwrap()
        .expect("the lock is free");
    let mut summary: Vec<(String, String, String, String)> = jobs
        .iter()
        .map(|j| {
            (
                j.relative_path.clone(),
                j.change.clone(),
                j.source_node_storage.clone(),
                j.target_node_storage.clone(),
            )
        })
        .collect();
    summary.sort();
    let row = |p: &str, c: &str, s: &str, t: &str| (p.into(), c.into(), s.into(), t.into());
    assert_eq!(
        summary,
        [
            row("r1.git", "update", "g1", "g2"),
            row("r1.git", "update", "g1", "g3"),
            row("r2.git", "delete_replica", "", "g3"),
        ]
    );
    // Nothing is scheduled twice while those jobs are active.
    assert!(store
        .schedule_reconciliation(&all, &all)
        .await
        .unwrap()
        .unwrap()
        .is_empty());

    // Only locally healthy storages take part: with g3 out of the view, nothing for it.
    sqlx::query("DELETE FROM replication_queue")
        .execute(&mut raw)
        .await
        .unwrap();
    let jobs = store
        .schedule_reconciliation(&pairs(&["g1", "g2"]), &all)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0].target_node_storage, "g2");

    // Another router holding the lock: this one schedules nothing.
    let mut holder = db.raw().await;
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock(1)")
        .execute(&mut holder)
        .await
        .unwrap();
    sqlx::query("DELETE FROM replication_queue")
        .execute(&mut raw)
        .await
        .unwrap();
    assert_eq!(
        store.schedule_reconciliation(&all, &all).await.unwrap(),
        None
    );
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    assert_eq!(
        store
            .schedule_reconciliation(&all, &all)
            .await
            .unwrap()
            .unwrap()
            .len(),
        3
    );
}

/// Inserts a repository at `generation` with the given replicas (storage, generation) and
/// explicit assignments, straight into the tables.
async fn seed_repository(
    raw: &mut sqlx::PgConnection,
    path: &str,
    generation: i64,
    replicas: &[(&str, i64)],
    assigned: &[&str],
) {
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO repositories (virtual_storage, relative_path, generation, replica_path)
         VALUES ('vs', $1, $2, $1) RETURNING repository_id",
    )
    .bind(path)
    .bind(generation)
    .fetch_one(&mut *raw)
    .await
    .unwrap();
    for (storage, replica_generation) in replicas {
        sqlx::query(
            "INSERT INTO storage_repositories
                 (repository_id, virtual_storage, relative_path, storage, generation)
             VALUES ($1, 'vs', $2, $3, $4)",
        )
        .bind(id)
        .bind(path)
        .bind(storage)
        .bind(replica_generation)
        .execute(&mut *raw)
        .await
        .unwrap();
    }
    for storage in assigned {
        sqlx::query(
            "INSERT INTO repository_assignments (repository_id, virtual_storage, relative_path, storage)
             VALUES ($1, 'vs', $2, $3)",
        )
        .bind(id)
        .bind(path)
        .bind(storage)
        .execute(&mut *raw)
        .await
        .unwrap();
    }
}

#[tokio::test]
async fn reconciliation_keeps_replicas_assigned_ones_still_need_and_ignores_unconfigured_assignments(
) {
    let db = TestDb::new().await;
    let store = db.datastore().await;
    let mut raw = db.raw().await;
    healthy(&store, &["g1", "g2", "g3"]).await;
    let all = pairs(&["g1", "g2", "g3"]);
    // behind.git: assigned g1 and g2, g2 behind; g3 (unassigned) is at the repository's
    // generation, newer than g2: it stays, and g2 is brought up to date (from g1 or g3).
    seed_repository(
        &mut raw,
        "behind.git",
        5,
        &[("g1", 5), ("g2", 3), ("g3", 5)],
        &["g1", "g2"],
    )
    .await;
    // gone.git: assigned g1 and a storage no longer configured; that assignment does not
    // count, so g1 alone is assigned: g2 and g3 are unassigned and one of them goes (one
    // deletion per repository at a time), and nothing is queued for the unconfigured one.
    seed_repository(
        &mut raw,
        "gone.git",
        2,
        &[("g1", 2), ("g2", 2), ("g3", 2)],
        &["g1", "old"],
    )
    .await;
    // unassigned.git: no assignments, so every storage is assigned: g3 is missing and gets an
    // update, nothing is deleted.
    seed_repository(&mut raw, "unassigned.git", 1, &[("g1", 1), ("g2", 1)], &[]).await;

    let jobs = store
        .schedule_reconciliation(&all, &all)
        .await
        .unwrap()
        .expect("the lock is free");
    let mut summary: Vec<(String, String, String)> = jobs
        .iter()
        .map(|j| {
            (
                j.relative_path.clone(),
                j.change.clone(),
                j.target_node_storage.clone(),
            )
        })
        .collect();
    summary.sort();
    let deleted_from_gone = summary
        .iter()
        .find(|(p, c, _)| p == "gone.git" && c == "delete_replica")
        .map(|(_, _, t)| t.clone())
        .expect("a deletion for gone.git");
    assert!(
        deleted_from_gone == "g2" || deleted_from_gone == "g3",
        "{deleted_from_gone}"
    );
    let row = |p: &str, c: &str, t: &str| (p.to_string(), c.to_string(), t.to_string());
    assert_eq!(
        summary,
        [
            row("behind.git", "update", "g2"),
            row("gone.git", "delete_replica", &deleted_from_gone),
            row("unassigned.git", "update", "g3"),
        ]
    );
    let behind = jobs
        .iter()
        .find(|j| j.relative_path == "behind.git")
        .unwrap();
    assert!(
        ["g1", "g3"].contains(&behind.source_node_storage.as_str()),
        "{behind:?}"
    );
}
