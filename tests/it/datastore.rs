//! Datastore tests against a real PostgreSQL: migrations, NOTIFY payloads, the health quorum
//! view, valid primaries, and surviving a server that turns read-only.
// Tests read and write the database directly (not through PgBouncer), so the
// datastore's rule about unnamed statements (clippy.toml) does not apply here.
#![allow(clippy::disallowed_methods)]

use crate::common;

use std::time::Duration;

use serde_json::json;
use sqlx::postgres::PgListener;
use sqlx::Executor;

use common::pg::TestDb;
use common::wait::wait_until;
use praefect::config::DatabaseConnection;
use praefect::datastore::{
    migrations::known_migrations, Datastore, DatastoreError, HealthObservation, HealthyStorage,
    MigrationState, NewRepository, PoolSettings,
};

fn observation(vs: &str, storage: &str, healthy: bool) -> HealthObservation {
    HealthObservation {
        virtual_storage: vs.to_string(),
        storage: storage.to_string(),
        healthy,
    }
}

fn healthy(vs: &str, storage: &str) -> HealthyStorage {
    HealthyStorage {
        virtual_storage: vs.to_string(),
        storage: storage.to_string(),
    }
}

#[tokio::test]
async fn migrations_apply_roll_back_and_reapply() {
    let db = TestDb::empty().await;
    let store = db.datastore().await;
    let known = known_migrations();
    assert!(known.len() >= 6);
    assert!(
        known.iter().all(|m| m.down.is_some()),
        "every migration has a down"
    );

    assert_eq!(store.pending_migrations().await.unwrap(), known.len());
    assert!(matches!(
        store.check_migrations_up_to_date().await,
        Err(DatastoreError::PendingMigrations(n)) if n == known.len()
    ));
    let mut events = 0;
    let applied = store
        .migrate_up(false, false, |_| events += 1)
        .await
        .unwrap();
    assert_eq!(applied, known.len());
    assert_eq!(
        events,
        1 + 2 * known.len(),
        "planned + migrating/applied per migration"
    );
    store.check_migrations_up_to_date().await.unwrap();
    assert_eq!(store.migrate_up(false, false, |_| {}).await.unwrap(), 0);

    // Roll everything back, one by one, then forward again: every down undoes its up.
    let newest = known.last().unwrap().id.clone();
    assert_eq!(
        store.migrations_to_roll_back(1).await.unwrap(),
        vec![newest.clone()]
    );
    assert_eq!(store.migrate_down(1).await.unwrap(), 1);
    let status = store.migration_status().await.unwrap();
    let last = status.iter().find(|s| s.id == newest).unwrap();
    assert_eq!(last.state, MigrationState::NotApplied);
    assert_eq!(
        store.migrate_down(known.len()).await.unwrap(),
        known.len() - 1
    );
    let mut raw = db.raw().await;
    let leftover: Vec<String> = sqlx::query_scalar(
        "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'schema_migrations'",
    )
    .fetch_all(&mut raw)
    .await
    .unwrap();
    assert!(
        leftover.is_empty(),
        "down migrations left tables: {leftover:?}"
    );
    assert_eq!(
        store.migrate_up(false, false, |_| {}).await.unwrap(),
        known.len()
    );
    store.check_migrations_up_to_date().await.unwrap();
}

#[tokio::test]
async fn unknown_migrations_are_refused_unless_ignored() {
    let db = TestDb::new().await;
    let store = db.datastore().await;
    let mut raw = db.raw().await;
    raw.execute("INSERT INTO schema_migrations VALUES ('20990101000000_from_the_future', now())")
        .await
        .unwrap();
    let err = store.migrate_up(false, false, |_| {}).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("unknown migration in database: 20990101000000_from_the_future"),
        "{err}"
    );
    assert_eq!(store.migrate_up(true, false, |_| {}).await.unwrap(), 0);
    let status = store.migration_status().await.unwrap();
    assert_eq!(status.last().unwrap().state, MigrationState::Unknown);
}

#[tokio::test]
async fn the_runbook_queries_work() {
    let db = TestDb::new().await;
    let mut raw = db.raw().await;
    // Queries from operators' runbooks must run unchanged.
    for query in [
        "SELECT state, count(*) FROM replication_queue GROUP BY 1",
        "SELECT job->>'virtual_storage', job->>'target_node_storage', count(*) FROM replication_queue WHERE state = 'ready' GROUP BY 1, 2",
        "SELECT * FROM valid_primaries",
        "SELECT * FROM healthy_storages",
        "SELECT * FROM repository_generations",
        "SELECT repository_id, virtual_storage, relative_path, generation, \"primary\", replica_path FROM repositories",
        "SELECT virtual_storage, relative_path, storage, generation, repository_id, verified_at, verification_leased_until FROM storage_repositories",
        "SELECT praefect_name, shard_name, node_name, last_contact_attempt_at, last_seen_active_at FROM node_status",
        "SELECT id, acquired FROM replication_queue_lock",
        "SELECT job_id, lock_id, triggered_at FROM replication_queue_job_lock",
        "SELECT virtual_storage, storage, last_run, triggered_at FROM storage_cleanups",
        "SELECT id, applied_at FROM schema_migrations",
    ] {
        sqlx::query(query).fetch_all(&mut raw).await.unwrap_or_else(|e| panic!("{query}: {e}"));
    }
    let states: Vec<String> =
        sqlx::query_scalar("SELECT unnest(enum_range(NULL::replication_job_state))::text")
            .fetch_all(&mut raw)
            .await
            .unwrap();
    assert_eq!(
        states,
        [
            "ready",
            "in_progress",
            "completed",
            "cancelled",
            "failed",
            "dead"
        ]
    );
}

fn new_repository(
    id: i64,
    vs: &str,
    path: &str,
    primary: &str,
    secondaries: &[&str],
) -> NewRepository {
    NewRepository {
        repository_id: id,
        virtual_storage: vs.to_string(),
        relative_path: path.to_string(),
        replica_path: praefect::routing::replica_path(id),
        primary: primary.to_string(),
        updated_secondaries: secondaries.iter().map(|s| s.to_string()).collect(),
        outdated_secondaries: Vec::new(),
        store_assignments: false,
    }
}

async fn next_payload(listener: &mut PgListener) -> (String, serde_json::Value) {
    let notification = tokio::time::timeout(Duration::from_secs(5), listener.recv())
        .await
        .expect("a notification within 5s")
        .expect("listener error");
    let payload: serde_json::Value =
        serde_json::from_str(notification.payload()).expect("payload is JSON");
    (notification.channel().to_string(), payload)
}

async fn assert_silent(listener: &mut PgListener) {
    if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(300), listener.recv()).await {
        panic!(
            "unexpected notification on {}: {}",
            n.channel(),
            n.payload()
        );
    }
}

#[tokio::test]
async fn changes_notify_with_the_json_array_payload() {
    let db = TestDb::new().await;
    let store = db.datastore().await;
    let mut listener = PgListener::connect(&db.url()).await.unwrap();
    listener
        .listen_all(["storage_repositories_updates", "repositories_updates"])
        .await
        .unwrap();

    let id = store.reserve_repository_id("vs", "a.git").await.unwrap();
    store
        .create_repository(&new_repository(id, "vs", "a.git", "g1", &["g2"]), &[])
        .await
        .unwrap();
    let (channel, payload) = next_payload(&mut listener).await;
    assert_eq!(channel, "storage_repositories_updates");
    assert_eq!(
        payload,
        json!([{"virtual_storage": "vs", "relative_paths": ["a.git"]}])
    );

    assert!(matches!(
        store.reserve_repository_id("vs", "a.git").await,
        Err(DatastoreError::RepositoryExists)
    ));

    store
        .increment_generation(id, &["g1".to_string()])
        .await
        .unwrap();
    let (channel, payload) = next_payload(&mut listener).await;
    assert_eq!(channel, "storage_repositories_updates");
    assert_eq!(
        payload,
        json!([{"virtual_storage": "vs", "relative_paths": ["a.git"]}])
    );

    // Verification bookkeeping must not flush the routers' caches.
    let mut raw = db.raw().await;
    raw.execute(
        "UPDATE storage_repositories SET verified_at = now(), verification_leased_until = now()",
    )
    .await
    .unwrap();
    assert_silent(&mut listener).await;

    // One statement touching two virtual storages: one entry per virtual storage, distinct paths.
    raw.execute(
        "INSERT INTO repositories (repository_id, virtual_storage, relative_path, generation) VALUES
             (100, 'vs', 'b.git', 0), (101, 'other', 'c.git', 0);
         INSERT INTO storage_repositories (repository_id, virtual_storage, relative_path, storage, generation) VALUES
             (100, 'vs', 'b.git', 'g1', 0), (100, 'vs', 'b.git', 'g2', 0), (101, 'other', 'c.git', 'g1', 0);",
    )
    .await
    .unwrap();
    let (_, payload) = next_payload(&mut listener).await;
    let mut entries = payload.as_array().unwrap().clone();
    entries.sort_by_key(|e| e["virtual_storage"].as_str().unwrap().to_string());
    assert_eq!(
        entries,
        vec![
            json!({"virtual_storage": "other", "relative_paths": ["c.git"]}),
            json!({"virtual_storage": "vs", "relative_paths": ["b.git"]}),
        ]
    );

    // Deleting a repository notifies on both channels (the replicas go by cascade).
    raw.execute("DELETE FROM repositories WHERE repository_id = 100")
        .await
        .unwrap();
    let mut seen = vec![
        next_payload(&mut listener).await,
        next_payload(&mut listener).await,
    ];
    seen.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(seen[0].0, "repositories_updates");
    assert_eq!(seen[1].0, "storage_repositories_updates");
    for (_, payload) in seen {
        assert_eq!(
            payload,
            json!([{"virtual_storage": "vs", "relative_paths": ["b.git"]}])
        );
    }

    // An update that changes nothing relevant stays silent.
    raw.execute(
        "UPDATE storage_repositories SET generation = generation WHERE repository_id = 101",
    )
    .await
    .unwrap();
    assert_silent(&mut listener).await;
}

/// Records `healthy_count` healthy and the rest unhealthy observations of g1 by distinct routers.
async fn routers_observe(store: &Datastore, routers: usize, healthy_count: usize) {
    for i in 0..routers {
        store
            .record_health(
                &format!("praefect-{i}"),
                &[observation("vs", "g1", i < healthy_count)],
            )
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn healthy_storages_needs_a_quorum_of_active_routers() {
    for (routers, healthy_count, expect_healthy) in [
        (1, 1, true),
        (1, 0, false),
        (2, 1, true),
        (3, 1, false),
        (3, 2, true),
        (4, 1, false),
        (4, 2, true),
        (5, 2, false),
        (5, 3, true),
    ] {
        let db = TestDb::new().await;
        let store = db.datastore().await;
        routers_observe(&store, routers, healthy_count).await;
        let expected = if expect_healthy {
            vec![healthy("vs", "g1")]
        } else {
            vec![]
        };
        assert_eq!(
            store.healthy_storages().await.unwrap(),
            expected,
            "{healthy_count} of {routers} routers see it healthy"
        );
    }
}

#[tokio::test]
async fn health_observations_expire() {
    let db = TestDb::new().await;
    let store = db.datastore().await;
    let mut raw = db.raw().await;

    // An unhealthy observation keeps the previous last-seen time.
    store
        .record_health("p1", &[observation("vs", "g1", true)])
        .await
        .unwrap();
    store
        .record_health("p1", &[observation("vs", "g1", false)])
        .await
        .unwrap();
    assert_eq!(
        store.healthy_storages().await.unwrap(),
        vec![healthy("vs", "g1")]
    );

    // Seen healthy more than 10 s ago no longer counts.
    raw.execute("UPDATE node_status SET last_seen_active_at = now() - interval '11 seconds'")
        .await
        .unwrap();
    assert!(store.healthy_storages().await.unwrap().is_empty());

    // Two routers see g1 healthy, a third does not: 2 of 3 is a quorum.
    let db = TestDb::new().await;
    let store = db.datastore().await;
    let mut raw = db.raw().await;
    routers_observe(&store, 4, 1).await;
    assert!(
        store.healthy_storages().await.unwrap().is_empty(),
        "1 of 4 is no quorum"
    );
    // Two routers stop probing for over a minute: they leave the denominator; 1 of 2 is.
    raw.execute(
        "UPDATE node_status SET last_contact_attempt_at = now() - interval '61 seconds',
                                last_seen_active_at = NULL
         WHERE praefect_name IN ('praefect-2', 'praefect-3')",
    )
    .await
    .unwrap();
    assert_eq!(
        store.healthy_storages().await.unwrap(),
        vec![healthy("vs", "g1")]
    );

    // Quorums are per virtual storage: routers active only elsewhere do not count.
    store
        .record_health("p-elsewhere", &[observation("other", "x", false)])
        .await
        .unwrap();
    assert_eq!(
        store.healthy_storages().await.unwrap(),
        vec![healthy("vs", "g1")]
    );
}

async fn mark_healthy(store: &Datastore, storages: &[&str]) {
    let observations: Vec<_> = ["g1", "g2", "g3"]
        .iter()
        .map(|s| observation("vs", s, storages.contains(s)))
        .collect();
    store.record_health("p1", &observations).await.unwrap();
}

/// Queues a ready `delete_replica` job for repository `id` (`path` in `vs`) on `storage`.
async fn queue_delete_replica(raw: &mut sqlx::PgConnection, id: i64, path: &str, storage: &str) {
    let job = json!({
        "change": "delete_replica",
        "virtual_storage": "vs",
        "repository_id": id,
        "relative_path": path,
        "target_node_storage": storage,
        "source_node_storage": "",
    });
    sqlx::query("INSERT INTO replication_queue (state, lock_id, job) VALUES ('ready', $1, $2)")
        .bind(format!("vs|{storage}|{path}"))
        .bind(job)
        .execute(raw)
        .await
        .unwrap();
}

async fn valid_primaries(store: &Datastore, id: i64) -> Vec<String> {
    store
        .valid_primaries(id)
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.storage)
        .collect()
}

#[tokio::test]
async fn valid_primaries_are_up_to_date_healthy_assigned_and_not_being_deleted() {
    let db = TestDb::new().await;
    let store = db.datastore().await;
    let mut raw = db.raw().await;
    mark_healthy(&store, &["g1", "g2", "g3"]).await;

    let id = store.reserve_repository_id("vs", "r.git").await.unwrap();
    store
        .create_repository(&new_repository(id, "vs", "r.git", "g1", &["g2", "g3"]), &[])
        .await
        .unwrap();
    assert_eq!(valid_primaries(&store, id).await, ["g1", "g2", "g3"]);

    // Outdated: g3 missed a write.
    store
        .increment_generation(id, &["g1".to_string(), "g2".to_string()])
        .await
        .unwrap();
    assert_eq!(valid_primaries(&store, id).await, ["g1", "g2"]);
    // A write to only outdated replicas is refused.
    assert!(matches!(
        store.increment_generation(id, &["g3".to_string()]).await,
        Err(DatastoreError::WriteToOutdatedNodes)
    ));
    assert!(matches!(
        store.increment_generation(9999, &["g1".to_string()]).await,
        Err(DatastoreError::RepositoryNotFound)
    ));

    // Unhealthy: no quorum sees g2.
    mark_healthy(&store, &["g1", "g3"]).await;
    raw.execute("UPDATE node_status SET last_seen_active_at = now() - interval '1 minute' WHERE node_name = 'g2'")
        .await
        .unwrap();
    assert_eq!(valid_primaries(&store, id).await, ["g1"]);
    mark_healthy(&store, &["g1", "g2", "g3"]).await;
    assert_eq!(valid_primaries(&store, id).await, ["g1", "g2"]);

    // Unassigned: with explicit assignments only assigned replicas qualify...
    raw.execute(
        format!(
        "INSERT INTO repository_assignments (repository_id, virtual_storage, relative_path, storage)
         VALUES ({id}, 'vs', 'r.git', 'g2'), ({id}, 'vs', 'r.git', 'g3')"
    )
        .as_str(),
    )
    .await
    .unwrap();
    assert_eq!(valid_primaries(&store, id).await, ["g2"]);
    // ...unless no candidate is assigned: then any up-to-date healthy replica will do.
    raw.execute(
        format!("DELETE FROM repository_assignments WHERE repository_id = {id} AND storage = 'g2'")
            .as_str(),
    )
    .await
    .unwrap();
    assert_eq!(valid_primaries(&store, id).await, ["g1", "g2"]);

    // Pending delete_replica: a replica about to be removed cannot become primary (the job
    // is matched by repository id).
    queue_delete_replica(&mut raw, id, "r.git", "g1").await;
    assert_eq!(valid_primaries(&store, id).await, ["g2"]);
    // A finished one no longer counts, and a second active one is refused by the unique index.
    raw.execute("UPDATE replication_queue SET state = 'dead'")
        .await
        .unwrap();
    assert_eq!(valid_primaries(&store, id).await, ["g1", "g2"]);
}

/// The definition of an unavailable repository, asked as it is written: no row in the
/// `valid_primaries` view (how `/db_metrics` asked until 2026-12-04; `status_bench` times it).
pub(crate) const UNAVAILABLE_BY_VIEW_SQL: &str =
    "SELECT virtual_storage, count(*) FROM repositories AS repo
     WHERE NOT EXISTS (SELECT 1 FROM valid_primaries AS valid
                       WHERE valid.repository_id = repo.repository_id)
     GROUP BY virtual_storage ORDER BY virtual_storage";

/// `/db_metrics`' and `check`'s count of repositories without a valid primary, against its
/// definition (no row in the `valid_primaries` view), over every way a repository can lose
/// its candidates, and one that keeps them only through the assignment rule.
#[tokio::test]
async fn unavailable_repositories_are_those_the_valid_primaries_view_has_no_row_for() {
    let db = TestDb::new().await;
    let store = db.datastore().await;
    let mut raw = db.raw().await;
    mark_healthy(&store, &["g1", "g2", "g3"]).await;
    let create = |path: &'static str, vs: &'static str, primary, secondaries| {
        let store = store.clone();
        async move {
            let id = store.reserve_repository_id(vs, path).await.unwrap();
            store
                .create_repository(&new_repository(id, vs, path, primary, secondaries), &[])
                .await
                .unwrap();
            id
        }
    };
    // Fine: three up-to-date replicas.
    create("fine.git", "vs", "g1", &["g2", "g3"]).await;
    // Up to date only on g3, which no router will see as healthy below.
    let on_g3 = create("only-g3.git", "vs", "g3", &["g1", "g2"]).await;
    store
        .increment_generation(on_g3, &["g3".to_string()])
        .await
        .unwrap();
    // Assigned only to an outdated replica: the unassigned up-to-date ones still qualify.
    let assigned = create("assigned-outdated.git", "vs", "g1", &["g2", "g3"]).await;
    store
        .increment_generation(assigned, &["g1".to_string(), "g3".to_string()])
        .await
        .unwrap();
    raw.execute(
        format!(
            "INSERT INTO repository_assignments (repository_id, virtual_storage, relative_path, storage)
             VALUES ({assigned}, 'vs', 'assigned-outdated.git', 'g2')"
        )
        .as_str(),
    )
    .await
    .unwrap();
    // One replica, about to be deleted.
    let deleting = create("deleting.git", "vs", "g1", &[]).await;
    queue_delete_replica(&mut raw, deleting, "deleting.git", "g1").await;
    // Another virtual storage, whose storages no router has seen.
    create("elsewhere.git", "vs2", "g1", &["g2"]).await;

    // g3 down: the one router sees g1 and g2 only, and its last sight of g3 is too old.
    mark_healthy(&store, &["g1", "g2"]).await;
    raw.execute("UPDATE node_status SET last_seen_active_at = now() - interval '1 minute' WHERE node_name = 'g3'")
        .await
        .unwrap();
    let counts = |rows: Vec<praefect::datastore::db_metrics::UnavailableCount>| {
        rows.into_iter()
            .map(|row| (row.virtual_storage, row.count))
            .collect::<Vec<_>>()
    };
    let found = counts(
        store
            .unavailable_repositories(Duration::from_secs(10))
            .await
            .unwrap(),
    );
    assert_eq!(
        found,
        [("vs".to_string(), 2), ("vs2".to_string(), 1)],
        "only-g3.git and deleting.git in vs, elsewhere.git in vs2"
    );
    let by_view: Vec<(String, i64)> = sqlx::query_as(UNAVAILABLE_BY_VIEW_SQL)
        .fetch_all(&mut raw)
        .await
        .unwrap();
    assert_eq!(found, by_view);

    // The job finished and g3 is back: only the other virtual storage is left.
    raw.execute("UPDATE replication_queue SET state = 'completed'")
        .await
        .unwrap();
    mark_healthy(&store, &["g1", "g2", "g3"]).await;
    let found = counts(
        store
            .unavailable_repositories(Duration::from_secs(10))
            .await
            .unwrap(),
    );
    assert_eq!(found, [("vs2".to_string(), 1)]);
}

#[tokio::test]
async fn only_one_active_delete_replica_job_per_repository() {
    let db = TestDb::new().await;
    let mut raw = db.raw().await;
    let insert = "INSERT INTO replication_queue (job) VALUES
        ('{\"change\": \"delete_replica\", \"virtual_storage\": \"vs\", \"relative_path\": \"r.git\", \"target_node_storage\": \"g1\"}')";
    raw.execute(insert).await.unwrap();
    let err = raw.execute(insert).await.unwrap_err();
    assert!(
        err.to_string().contains("delete_replica_unique_index"),
        "{err}"
    );
}

#[tokio::test]
async fn connects_to_the_first_host_that_accepts_writes() {
    let db = TestDb::new().await;
    let live = db.connection();
    // A dead host first, the live server second: libpq-style host and port lists.
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let multi = DatabaseConnection {
        host: format!("127.0.0.1,{}", live.host),
        port: format!("{dead_port},{}", live.port),
        ..live.clone()
    };
    let store = Datastore::connect(&multi, PoolSettings::default())
        .await
        .unwrap();
    assert!(store.check_server().await.unwrap() >= 110_000);

    // A server that only allows reads is never used for writes.
    let mut admin = db.server.admin().await;
    admin
        .execute(
            format!(
                "ALTER DATABASE \"{}\" SET default_transaction_read_only = on",
                db.name
            )
            .as_str(),
        )
        .await
        .unwrap();
    let err = Datastore::connect(&live, PoolSettings::default())
        .await
        .err()
        .unwrap();
    assert!(matches!(err, DatastoreError::NoWritableHost(_)), "{err}");
    assert!(err.to_string().contains("read-only"), "{err}");
}

#[tokio::test]
async fn a_demoted_server_is_left_and_the_pool_recovers() {
    let db = TestDb::new().await;
    let store = db.datastore().await;
    store
        .record_health("p1", &[observation("vs", "g1", true)])
        .await
        .unwrap();
    let mut admin = db.server.admin().await;

    // Simulate a switchover: the server turns read-only and drops every session (57P01).
    admin
        .execute(
            format!(
                "ALTER DATABASE \"{}\" SET default_transaction_read_only = on",
                db.name
            )
            .as_str(),
        )
        .await
        .unwrap();
    admin
        .execute(format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{}' AND pid <> pg_backend_pid()",
            db.name
        ).as_str())
        .await
        .unwrap();
    let err = store
        .record_health("p1", &[observation("vs", "g1", true)])
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    // New connections to a read-only server are refused by the role check.
    // Kept: what is checked is an absence (no write gets through while the server stays
    // read-only), so the server is left read-only for over a second first: several probe
    // rounds and two watchdog checks of the datastore's writer.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let err = store
        .record_health("p1", &[observation("vs", "g1", true)])
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err}");

    // The server accepts writes again (a new primary took over the address): the same
    // Datastore recovers without a restart.
    admin
        .execute(
            format!(
                "ALTER DATABASE \"{}\" SET default_transaction_read_only = off",
                db.name
            )
            .as_str(),
        )
        .await
        .unwrap();
    wait_until(
        Duration::from_secs(10),
        "the datastore recovers after the server became writable",
        async || {
            store
                .record_health("p1", &[observation("vs", "g1", true)])
                .await
        },
    )
    .await;
    assert_eq!(
        store.healthy_storages().await.unwrap(),
        vec![healthy("vs", "g1")]
    );
}

mod cache {
    use super::*;

    /// How long the cache tests wait for the listener or a notification.
    const WAIT: Duration = Duration::from_secs(5);
    use praefect::datastore::{ListenerSettings, StorageCache};
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    /// Starts the listener; it stops when the returned guard is dropped.
    fn listen(cache: &Arc<StorageCache>, db: &TestDb) -> tokio_util::sync::DropGuard {
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(cache.clone().listen(
            ListenerSettings {
                connection: db.connection(),
                retry: Duration::from_millis(200),
            },
            stop.clone(),
        ));
        stop.drop_guard()
    }

    /// Reads until a read is served by a fresh query (the entry was evicted).
    async fn until_miss(cache: &StorageCache, path: &str) -> Vec<String> {
        wait_until(
            WAIT,
            &format!("the entry of {path} is evicted"),
            async || {
                let before = cache.stats.misses.load(Ordering::Relaxed);
                let found = cache.get("vs", path).await.unwrap().unwrap();
                (cache.stats.misses.load(Ordering::Relaxed) > before)
                    .then(|| found.storages.clone())
            },
        )
        .await
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn reads_hit_the_cache_and_notifications_evict() {
        let db = TestDb::new().await;
        let store = db.datastore().await;
        let id = store.reserve_repository_id("vs", "r.git").await.unwrap();
        store
            .create_repository(&new_repository(id, "vs", "r.git", "g1", &["g2", "g3"]), &[])
            .await
            .unwrap();
        let cache = StorageCache::new(store.clone(), &["vs".to_string()]);
        // Disabled until the listener runs: every read is a query.
        cache.get("vs", "r.git").await.unwrap().unwrap();
        assert_eq!(cache.stats.bypassed.load(Ordering::Relaxed), 1);
        let _stop = listen(&cache, &db);
        wait_until(WAIT, "the listener connects", async || cache.is_enabled()).await;

        let first = cache.get("vs", "r.git").await.unwrap().unwrap();
        assert_eq!(first.storages, ["g1", "g2", "g3"]);
        assert_eq!(first.replica_path, praefect::routing::replica_path(id));
        for _ in 0..100 {
            cache.get("vs", "r.git").await.unwrap().unwrap();
        }
        assert_eq!(
            cache.stats.misses.load(Ordering::Relaxed),
            1,
            "one query, then hits"
        );
        assert_eq!(cache.stats.hits.load(Ordering::Relaxed), 100);
        assert!(cache.get("vs", "missing.git").await.unwrap().is_none());
        assert!(
            cache.get("vs", "missing.git").await.unwrap().is_none(),
            "misses are not cached"
        );

        // A write makes g3 outdated: the NOTIFY evicts the entry and the next read sees it.
        store
            .increment_generation(id, &["g1".to_string(), "g2".to_string()])
            .await
            .unwrap();
        assert_eq!(until_miss(&cache, "r.git").await, ["g1", "g2"]);

        // Deleting the repository evicts it as well.
        let mut raw = db.raw().await;
        raw.execute("DELETE FROM repositories").await.unwrap();
        wait_until(WAIT, "the deletion is seen", async || {
            cache.stats.evictions.load(Ordering::Relaxed) >= 2
        })
        .await;
        assert!(cache.get("vs", "r.git").await.unwrap().is_none());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_lost_listener_disables_the_cache_until_it_is_back() {
        let db = TestDb::new().await;
        let store = db.datastore().await;
        let id = store.reserve_repository_id("vs", "r.git").await.unwrap();
        store
            .create_repository(&new_repository(id, "vs", "r.git", "g1", &["g2"]), &[])
            .await
            .unwrap();
        let cache = StorageCache::new(store.clone(), &["vs".to_string()]);
        let _stop = listen(&cache, &db);
        wait_until(WAIT, "the listener connects", async || cache.is_enabled()).await;
        cache.get("vs", "r.git").await.unwrap();
        cache.get("vs", "r.git").await.unwrap();
        assert_eq!(cache.stats.hits.load(Ordering::Relaxed), 1);

        // Kill the listener's session: the cache must not serve entries it can no longer
        // keep fresh.
        let mut admin = db.server.admin().await;
        admin
            .execute(
                format!(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = '{}' AND application_name = 'praefect-listener'",
                    db.name
                )
                .as_str(),
            )
            .await
            .unwrap();
        wait_until(WAIT, "the cache is disabled", async || !cache.is_enabled()).await;
        // A change made while nobody listens...
        store
            .increment_generation(id, &["g1".to_string()])
            .await
            .unwrap();
        // ...is seen: after the reconnect the cache starts empty.
        wait_until(WAIT, "the listener reconnects", async || cache.is_enabled()).await;
        let found = cache.get("vs", "r.git").await.unwrap().unwrap();
        assert_eq!(found.storages, ["g1"]);
    }

    /// With the database stopped, a cached entry answers reads within the stale-read
    /// window and not after it; operations fail fast with Unavailable meanwhile; once the
    /// database is back the listener reconnects and the cache is trusted again.
    #[tokio::test(flavor = "multi_thread")]
    async fn cached_reads_survive_an_outage_within_the_stale_read_window() {
        let server = common::pg::OwnServer::start().await;
        let store = Datastore::connect(&server.connection(), PoolSettings::default())
            .await
            .unwrap();
        let id = store.reserve_repository_id("vs", "r.git").await.unwrap();
        store
            .create_repository(&new_repository(id, "vs", "r.git", "g1", &["g2"]), &[])
            .await
            .unwrap();
        let window = Duration::from_secs(3);
        let cache =
            StorageCache::with_settings(store.clone(), &["vs".to_string()], 1 << 20, window);
        let stop = tokio_util::sync::CancellationToken::new();
        let _stop = stop.clone().drop_guard();
        tokio::spawn(cache.clone().listen(
            ListenerSettings {
                connection: server.connection(),
                retry: Duration::from_millis(200),
            },
            stop,
        ));
        wait_until(WAIT, "the listener connects", async || cache.is_enabled()).await;
        cache.get("vs", "r.git").await.unwrap().unwrap();

        tokio::task::block_in_place(|| server.stop());
        wait_until(WAIT, "the listener is lost", async || !cache.is_enabled()).await;
        // The window counts from the moment the listener was lost, at or before now.
        let lost_by = std::time::Instant::now();
        let found = cache.get("vs", "r.git").await.unwrap().unwrap();
        assert_eq!(found.storages, ["g1", "g2"]);
        assert!(cache.stats.stale.load(Ordering::Relaxed) >= 1);
        // An uncached repository cannot be answered; the error says why, quickly.
        let started = std::time::Instant::now();
        let err = cache.get("vs", "other.git").await.unwrap_err();
        assert!(err.is_unavailable(), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        let err = store
            .increment_generation(id, &["g1".to_string()])
            .await
            .unwrap_err();
        assert!(err.is_unavailable(), "{err}");

        // Past the window, the entry is no longer trusted.
        tokio::time::sleep(
            (lost_by + window + Duration::from_millis(500))
                .saturating_duration_since(std::time::Instant::now()),
        )
        .await;
        let err = cache.get("vs", "r.git").await.unwrap_err();
        assert!(err.is_unavailable(), "{err}");

        tokio::task::block_in_place(|| server.start_again());
        wait_until(WAIT, "the listener is back", async || cache.is_enabled()).await;
        assert!(cache.stats.listener_connects.load(Ordering::Relaxed) >= 2);
        assert!(store.is_writable());
        let found = cache.get("vs", "r.git").await.unwrap().unwrap();
        assert_eq!(found.storages, ["g1", "g2"]);
    }

    #[tokio::test]
    async fn an_undecodable_payload_purges_everything() {
        let db = TestDb::new().await;
        let store = db.datastore().await;
        let id = store.reserve_repository_id("vs", "r.git").await.unwrap();
        store
            .create_repository(&new_repository(id, "vs", "r.git", "g1", &[]), &[])
            .await
            .unwrap();
        let cache = StorageCache::new(store.clone(), &["vs".to_string()]);
        let _stop = listen(&cache, &db);
        wait_until(WAIT, "the listener connects", async || cache.is_enabled()).await;
        cache.get("vs", "r.git").await.unwrap();
        cache.on_notification("not json").await;
        let before = cache.stats.misses.load(Ordering::Relaxed);
        cache.get("vs", "r.git").await.unwrap();
        assert_eq!(cache.stats.misses.load(Ordering::Relaxed), before + 1);
    }
}

/// A creation and the jobs that complete it are one transaction: a creation that fails
/// leaves no job behind, one that succeeds leaves all of them.
#[tokio::test]
async fn a_creation_records_its_jobs_in_the_same_transaction() {
    use praefect::datastore::UpdateJob;
    let db = TestDb::new().await;
    let store = db.datastore().await;
    let id = store.reserve_repository_id("vs", "c.git").await.unwrap();
    let job = |target: &str| UpdateJob {
        repository_id: id,
        virtual_storage: "vs".into(),
        relative_path: "c.git".into(),
        replica_path: praefect::routing::replica_path(id),
        source: "g1".into(),
        target: target.into(),
        correlation_id: "c1".into(),
    };
    let mut repo = new_repository(id, "vs", "c.git", "g1", &[]);
    repo.outdated_secondaries = vec!["g2".into(), "g3".into()];
    let mut raw = db.raw().await;
    let targets = "SELECT job->>'target_node_storage' FROM replication_queue
                   WHERE job->>'relative_path' = 'c.git' ORDER BY 1";
    store
        .create_repository(&repo, &[job("g2"), job("g3")])
        .await
        .unwrap();
    let queued: Vec<String> = sqlx::query_scalar(targets)
        .fetch_all(&mut raw)
        .await
        .unwrap();
    assert_eq!(queued, ["g2", "g3"]);
    // The same creation again fails on the repository's row: its job is not queued.
    let again = store.create_repository(&repo, &[job("g4")]).await;
    assert!(again.is_err(), "{again:?}");
    let queued: Vec<String> = sqlx::query_scalar(targets)
        .fetch_all(&mut raw)
        .await
        .unwrap();
    assert_eq!(queued, ["g2", "g3"]);
}

mod elections {
    use super::*;
    use praefect::datastore::UpdateJob;

    async fn setup(db: &TestDb) -> (Datastore, i64) {
        let store = db.datastore().await;
        mark_healthy(&store, &["g1", "g2", "g3"]).await;
        let id = store.reserve_repository_id("vs", "r.git").await.unwrap();
        store
            .create_repository(&new_repository(id, "vs", "r.git", "g1", &["g2", "g3"]), &[])
            .await
            .unwrap();
        (store, id)
    }

    #[tokio::test]
    async fn a_valid_primary_is_kept_and_an_invalid_one_replaced() {
        let db = TestDb::new().await;
        let (store, id) = setup(&db).await;
        let primary = store.get_primary(id).await.unwrap();
        assert_eq!(
            (primary.storage.as_deref(), primary.changed),
            (Some("g1"), false)
        );

        // g1 misses a write: it is no longer up to date, so another replica takes over.
        store
            .increment_generation(id, &["g2".to_string(), "g3".to_string()])
            .await
            .unwrap();
        let elected = store.get_primary(id).await.unwrap();
        assert!(elected.changed);
        let new = elected.storage.unwrap();
        assert!(new == "g2" || new == "g3", "{new}");
        let again = store.get_primary(id).await.unwrap();
        assert_eq!(
            (again.storage.as_deref(), again.changed),
            (Some(new.as_str()), false)
        );

        // Nobody valid (all unhealthy): the recorded primary is returned as it is.
        let mut raw = db.raw().await;
        raw.execute("UPDATE node_status SET last_seen_active_at = now() - interval '1 minute'")
            .await
            .unwrap();
        let stale = store.get_primary(id).await.unwrap();
        assert_eq!(
            (stale.storage.as_deref(), stale.changed),
            (Some(new.as_str()), false)
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn concurrent_elections_agree_on_one_primary() {
        let db = TestDb::new().await;
        let (store, id) = setup(&db).await;
        store
            .increment_generation(id, &["g2".to_string(), "g3".to_string()])
            .await
            .unwrap();
        // Ten routers (separate pools) elect at once.
        let mut stores = Vec::new();
        for _ in 0..10 {
            stores.push(db.datastore().await);
        }
        let results = futures::future::join_all(stores.iter().map(|s| s.get_primary(id))).await;
        let results: Vec<_> = results.into_iter().map(Result::unwrap).collect();
        let chosen: std::collections::BTreeSet<_> =
            results.iter().map(|r| r.storage.clone().unwrap()).collect();
        assert_eq!(chosen.len(), 1, "{results:?}");
        assert_eq!(
            results.iter().filter(|r| r.changed).count(),
            1,
            "{results:?}"
        );
        assert!(!chosen.contains("g1"), "an outdated replica was elected");
    }

    #[tokio::test]
    async fn a_write_bumps_the_generation_and_queues_jobs_once() {
        let db = TestDb::new().await;
        let (store, id) = setup(&db).await;
        let job = |target: &str| UpdateJob {
            repository_id: id,
            virtual_storage: "vs".into(),
            relative_path: "r.git".into(),
            replica_path: praefect::routing::replica_path(id),
            source: "g1".into(),
            target: target.into(),
            correlation_id: "c1".into(),
        };
        let generation = store
            .record_write(id, &["g1".to_string()], &[job("g2"), job("g3")])
            .await
            .unwrap();
        assert_eq!(generation, 1);
        store
            .record_write(id, &["g1".to_string()], &[job("g2"), job("g3")])
            .await
            .unwrap();
        let mut raw = db.raw().await;
        let queued: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT state::text, lock_id, job->>'target_node_storage' FROM replication_queue ORDER BY id",
        )
        .fetch_all(&mut raw)
        .await
        .unwrap();
        assert_eq!(
            queued,
            vec![
                (
                    "ready".to_string(),
                    "vs|g2|r.git".to_string(),
                    "g2".to_string()
                ),
                (
                    "ready".to_string(),
                    "vs|g3|r.git".to_string(),
                    "g3".to_string()
                ),
            ],
            "a ready duplicate is not queued twice"
        );
        let locks: i64 = sqlx::query_scalar("SELECT count(*) FROM replication_queue_lock")
            .fetch_one(&mut raw)
            .await
            .unwrap();
        assert_eq!(locks, 2);
        let meta: serde_json::Value =
            sqlx::query_scalar("SELECT meta FROM replication_queue LIMIT 1")
                .fetch_one(&mut raw)
                .await
                .unwrap();
        assert_eq!(meta, json!({"correlation_id": "c1"}));
        // Only g1 moved on.
        assert_eq!(valid_primaries(&store, id).await, ["g1"]);
    }
}

/// Writes acknowledged at the same time each bump the generation once: none of them is
/// mistaken for a write to an outdated replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_each_bump_the_generation() {
    let db = TestDb::new().await;
    let store = db.datastore().await;
    let id = store.reserve_repository_id("vs", "busy.git").await.unwrap();
    store
        .create_repository(&new_repository(id, "vs", "busy.git", "g1", &["g2"]), &[])
        .await
        .unwrap();
    let writes = (0..20).map(|_| {
        let store = store.clone();
        tokio::spawn(async move { store.record_write(id, &["g1".to_string()], &[]).await })
    });
    let mut generations: Vec<i64> = futures::future::join_all(writes)
        .await
        .into_iter()
        .map(|r| r.unwrap().unwrap())
        .collect();
    generations.sort();
    assert_eq!(generations, (1..=20).collect::<Vec<_>>());
}
