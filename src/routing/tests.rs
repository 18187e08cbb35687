//! The routing rules, table-driven, against an in-memory store and a fixed health view.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use super::*;

/// One tracked repository: the generation of each replica, the primary, the assignments.
#[derive(Clone, Default)]
struct Repo {
    id: i64,
    replica_path: String,
    generation: i64,
    replicas: BTreeMap<String, i64>,
    primary: Option<String>,
    assignments: Vec<String>,
}

#[derive(Default)]
struct MemoryStore {
    repos: Mutex<BTreeMap<(String, String), Repo>>,
    next_id: AtomicI64,
}

impl MemoryStore {
    fn find(&self, vs: &str, path: &str) -> Option<Repo> {
        let repos = self.repos.lock().unwrap();
        repos.get(&(vs.to_string(), path.to_string())).cloned()
    }

    fn by_id(&self, id: i64) -> Option<Repo> {
        let repos = self.repos.lock().unwrap();
        repos.values().find(|r| r.id == id).cloned()
    }

    fn set(&self, vs: &str, path: &str, repo: Repo) {
        let mut repos = self.repos.lock().unwrap();
        repos.insert((vs.to_string(), path.to_string()), repo);
    }
}

impl Repo {
    fn consistent(&self) -> ReplicaSet {
        ReplicaSet {
            repository_id: self.id,
            replica_path: self.replica_path.clone(),
            storages: self
                .replicas
                .iter()
                .filter(|(_, g)| **g == self.generation)
                .map(|(s, _)| s.clone())
                .collect(),
        }
    }
}

impl RoutingStore for MemoryStore {
    async fn cached_consistent(
        &self,
        vs: &str,
        path: &str,
    ) -> Result<Option<Arc<ReplicaSet>>, StoreError> {
        Ok(self.find(vs, path).map(|r| Arc::new(r.consistent())))
    }

    async fn consistent(&self, vs: &str, path: &str) -> Result<Option<ReplicaSet>, StoreError> {
        Ok(self.find(vs, path).map(|r| r.consistent()))
    }

    async fn recorded(&self, vs: &str, path: &str) -> Result<Option<ReplicaSet>, StoreError> {
        Ok(self.find(vs, path).map(|r| ReplicaSet {
            repository_id: r.id,
            replica_path: r.replica_path.clone(),
            storages: r.replicas.keys().cloned().collect(),
        }))
    }

    async fn primary(&self, id: i64) -> Result<Option<String>, StoreError> {
        Ok(self.by_id(id).and_then(|r| r.primary))
    }

    async fn assignments(&self, id: i64) -> Result<Vec<String>, StoreError> {
        Ok(self.by_id(id).map(|r| r.assignments).unwrap_or_default())
    }

    async fn reserve_repository_id(&self, vs: &str, path: &str) -> Result<Option<i64>, StoreError> {
        if self.find(vs, path).is_some() {
            return Ok(None);
        }
        Ok(Some(100 + self.next_id.fetch_add(1, Ordering::SeqCst)))
    }
}

struct FixedHealth(Arc<HealthySet>);

impl HealthView for FixedHealth {
    fn healthy(&self) -> Arc<HealthySet> {
        self.0.clone()
    }
}

const VS: &str = "default";

/// A router over storages a, b, c of virtual storage "default" with the given replication
/// factor and healthy storages, and the repositories the test adds.
fn router(factor: i64, healthy: &[&str], store: MemoryStore) -> Router<MemoryStore, FixedHealth> {
    let topology = Topology::new(vec![VirtualStorage {
        name: VS.into(),
        storages: vec!["a".into(), "b".into(), "c".into()],
        default_replication_factor: factor,
    }]);
    let mut set = HealthySet::new();
    set.insert(
        VS.to_string(),
        healthy
            .iter()
            .map(|s| s.to_string())
            .collect::<BTreeSet<_>>(),
    );
    Router::new(topology, store, FixedHealth(Arc::new(set)))
}

/// A store with "repo" (id 1, generation 1): `replicas` as (storage, generation), primary,
/// assignments; and "other" (id 2) on a and b, primary a, assigned a and b.
fn store(replicas: &[(&str, i64)], primary: Option<&str>, assignments: &[&str]) -> MemoryStore {
    let store = MemoryStore::default();
    store.set(
        VS,
        "repo",
        Repo {
            id: 1,
            replica_path: "@cluster/repositories/6b/86/1".into(),
            generation: 1,
            replicas: replicas.iter().map(|(s, g)| (s.to_string(), *g)).collect(),
            primary: primary.map(str::to_string),
            assignments: assignments.iter().map(|s| s.to_string()).collect(),
        },
    );
    store.set(
        VS,
        "other",
        Repo {
            id: 2,
            replica_path: "@cluster/repositories/d4/73/2".into(),
            generation: 0,
            replicas: [("a".to_string(), 0), ("b".to_string(), 0)].into(),
            primary: Some("a".into()),
            assignments: vec!["a".into(), "b".into()],
        },
    );
    store
}

fn repo(vs: &str, path: &str) -> RepositoryRef {
    RepositoryRef {
        storage_name: vs.into(),
        relative_path: path.into(),
    }
}

/// Runs `f` often enough that a random choice would show every option it has.
async fn choices<F, Fut>(f: F) -> Result<BTreeSet<String>, String>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<String, RoutingError>>,
{
    let mut seen = BTreeSet::new();
    for _ in 0..64 {
        seen.insert(f().await.map_err(|e| e.to_string())?);
    }
    Ok(seen)
}

fn set(items: &[&str]) -> Result<BTreeSet<String>, String> {
    Ok(items.iter().map(|s| s.to_string()).collect())
}

#[tokio::test]
async fn reads_go_to_up_to_date_healthy_replicas_only() {
    type Case<'a> = (
        &'a str,
        &'a [(&'a str, i64)],
        &'a [&'a str],
        bool,
        Result<BTreeSet<String>, String>,
    );
    let all: &[(&str, i64)] = &[("a", 1), ("b", 1), ("c", 1)];
    let c_outdated: &[(&str, i64)] = &[("a", 1), ("b", 1), ("c", 0)];
    let only_c: &[(&str, i64)] = &[("a", 0), ("b", 0), ("c", 1)];
    let cases: Vec<Case> = vec![
        (
            "every replica up to date and healthy",
            all,
            &["a", "b", "c"],
            false,
            set(&["a", "b", "c"]),
        ),
        (
            "an outdated replica is never chosen",
            c_outdated,
            &["a", "b", "c"],
            false,
            set(&["a", "b"]),
        ),
        (
            "an unhealthy replica is never chosen",
            all,
            &["a", "c"],
            false,
            set(&["a", "c"]),
        ),
        (
            "the only up-to-date replica is unhealthy",
            only_c,
            &["a", "b"],
            false,
            Err("no suitable node to serve the request".into()),
        ),
        (
            "no healthy node at all",
            all,
            &[],
            false,
            Err("no healthy nodes".into()),
        ),
        (
            "forced: the primary",
            all,
            &["a", "b", "c"],
            true,
            set(&["b"]),
        ),
        (
            "forced: an unhealthy primary fails",
            all,
            &["a", "c"],
            true,
            Err("primary gitaly is not healthy".into()),
        ),
    ];
    for (name, replicas, healthy, forced, want) in cases {
        let router = router(0, healthy, store(replicas, Some("b"), &[]));
        let got = choices(|| async {
            router
                .route_accessor(&repo(VS, "repo"), None, forced)
                .await
                .map(|r| r.storage)
        })
        .await;
        assert_eq!(got, want, "{name}");
    }
}

#[tokio::test]
async fn requests_naming_bad_repositories_are_refused() {
    let cases = [
        (repo("", "repo"), "storage name not set"),
        (repo("nope", "repo"), "storage name not found"),
        (repo(VS, ""), "repository path not set"),
        (repo(VS, "missing"), "repository not found"),
    ];
    let router = router(0, &["a", "b", "c"], store(&[("a", 1)], Some("a"), &[]));
    for (request, want) in cases {
        let read = router.route_accessor(&request, None, false).await;
        assert_eq!(
            read.err().map(|e| e.to_string()).as_deref(),
            Some(want),
            "read {request:?}"
        );
        let write = router
            .route_write(&WriteRequest {
                repository: request.clone(),
                ..Default::default()
            })
            .await;
        assert_eq!(
            write.err().map(|e| e.to_string()).as_deref(),
            Some(want),
            "write {request:?}"
        );
        let maintenance = router.route_maintenance(&request).await;
        assert_eq!(
            maintenance.err().map(|e| e.to_string()).as_deref(),
            Some(want),
            "maintenance {request:?}"
        );
    }
}

#[tokio::test]
async fn additional_repositories_must_be_on_the_same_virtual_storage() {
    let router = router(0, &["a", "b"], store(&[("a", 1), ("b", 1)], Some("a"), &[]));
    let cases = [
        (repo("elsewhere", "other"), Err("resolve additional replica path: repository and additional repository are on different virtual storages".to_string())),
        (repo(VS, ""), Err("repository path not set".to_string())),
        (repo(VS, "missing"), Err("additional repository not found".to_string())),
        (repo(VS, "other"), Ok(Some("@cluster/repositories/d4/73/2".to_string()))),
    ];
    for (additional, want) in cases {
        let read = router
            .route_accessor(&repo(VS, "repo"), Some(&additional), false)
            .await
            .map(|r| r.additional_replica_path)
            .map_err(|e| e.to_string());
        assert_eq!(read, want, "read with {additional:?}");
        let write = router
            .route_write(&WriteRequest {
                repository: repo(VS, "repo"),
                additional: Some(additional.clone()),
                ..Default::default()
            })
            .await
            .map(|r| match r {
                WriteRoute::Update(u) => u.additional_replica_path,
                WriteRoute::Create(_) => None,
            })
            .map_err(|e| e.to_string());
        assert_eq!(write, want, "write with {additional:?}");
    }
}

#[tokio::test]
async fn writes_go_to_the_primary_with_up_to_date_healthy_secondaries() {
    type Case<'a> = (
        &'a str,
        &'a [(&'a str, i64)],
        Option<&'a str>,
        &'a [&'a str],
        &'a [&'a str],
        Result<(&'a str, Vec<&'a str>, Vec<&'a str>), &'a str>,
    );
    let all: &[(&str, i64)] = &[("a", 1), ("b", 1), ("c", 1)];
    let c_outdated: &[(&str, i64)] = &[("a", 1), ("b", 1), ("c", 0)];
    let a_outdated: &[(&str, i64)] = &[("a", 0), ("b", 1), ("c", 1)];
    let cases: Vec<Case> = vec![
        (
            "all up to date",
            all,
            Some("a"),
            &[],
            &["a", "b", "c"],
            Ok(("a", vec!["b", "c"], vec![])),
        ),
        (
            "an outdated secondary is a replication target",
            c_outdated,
            Some("a"),
            &[],
            &["a", "b", "c"],
            Ok(("a", vec!["b"], vec!["c"])),
        ),
        (
            "an unhealthy secondary is a replication target",
            all,
            Some("a"),
            &[],
            &["a", "c"],
            Ok(("a", vec!["c"], vec!["b"])),
        ),
        (
            "unassigned storages get nothing",
            all,
            Some("a"),
            &["a", "b"],
            &["a", "b", "c"],
            Ok(("a", vec!["b"], vec![])),
        ),
        (
            "assignments to unconfigured storages are ignored",
            all,
            Some("a"),
            &["a", "gone"],
            &["a", "b", "c"],
            Ok(("a", vec![], vec![])),
        ),
        (
            "an outdated primary means read-only",
            a_outdated,
            Some("a"),
            &[],
            &["a", "b", "c"],
            Err("repository is in read-only mode"),
        ),
        (
            "an unassigned primary",
            all,
            Some("a"),
            &["b", "c"],
            &["a", "b", "c"],
            Err("primary node is not assigned"),
        ),
        (
            "an unhealthy primary",
            all,
            Some("a"),
            &[],
            &["b", "c"],
            Err("primary gitaly is not healthy"),
        ),
        (
            "no primary",
            all,
            None,
            &[],
            &["a", "b", "c"],
            Err("no primary"),
        ),
    ];
    for (name, replicas, primary, assignments, healthy, want) in cases {
        let router = router(0, healthy, store(replicas, primary, assignments));
        let got = router
            .route_write(&WriteRequest {
                repository: repo(VS, "repo"),
                ..Default::default()
            })
            .await;
        let got = match got {
            Ok(WriteRoute::Update(route)) => {
                Ok((route.primary, route.secondaries, route.replication_targets))
            }
            Ok(other) => panic!("{name}: not an update: {other:?}"),
            Err(err) => Err(err.to_string()),
        };
        let want = want
            .map(|(p, s, t)| {
                (
                    p.to_string(),
                    s.iter().map(|x| x.to_string()).collect(),
                    t.iter().map(|x| x.to_string()).collect(),
                )
            })
            .map_err(str::to_string);
        assert_eq!(got, want, "{name}");
    }
}

#[tokio::test]
async fn a_write_records_the_primary_and_queues_the_others() {
    let router = router(
        0,
        &["a", "b", "c"],
        store(&[("a", 1), ("b", 1), ("c", 0)], Some("a"), &[]),
    );
    let route = router
        .route_write(&WriteRequest {
            repository: repo(VS, "repo"),
            ..Default::default()
        })
        .await
        .unwrap();
    let record = route.record(&[]);
    assert_eq!(record.primary, "a");
    assert_eq!(record.outdated, vec!["b".to_string(), "c".to_string()]);
    assert_eq!(record.created, None);
    let record = route.record(&["b".to_string()]);
    assert_eq!(record.updated_secondaries, vec!["b".to_string()]);
    assert_eq!(record.outdated, vec!["c".to_string()]);
}

fn creation(path: &str) -> WriteRequest {
    WriteRequest {
        repository: repo(VS, path),
        creates: true,
        ..Default::default()
    }
}

#[tokio::test]
async fn creations_follow_the_replication_factor() {
    // (factor, healthy, how many secondaries and targets, assignments recorded)
    type Case = (i64, &'static [&'static str], (usize, usize), bool);
    let cases: [Case; 4] = [
        (0, &["a", "b", "c"], (2, 0), false),
        (0, &["b"], (0, 2), false),
        (2, &["a", "b", "c"], (1, 0), true),
        (1, &["a", "c"], (0, 0), true),
    ];
    for (factor, healthy, (secondaries, targets), recorded) in cases {
        let router = router(factor, healthy, store(&[], None, &[]));
        for _ in 0..16 {
            let route = match router.route_write(&creation("new")).await.unwrap() {
                WriteRoute::Create(route) => route,
                other => panic!("not a creation: {other:?}"),
            };
            assert!(
                healthy.contains(&route.primary.as_str()),
                "factor {factor}: primary {}",
                route.primary
            );
            assert_eq!(route.secondaries.len(), secondaries, "factor {factor}");
            assert_eq!(route.replication_targets.len(), targets, "factor {factor}");
            assert!(!route.replication_targets.contains(&route.primary));
            assert!(!route.secondaries.contains(&route.primary));
            assert!(route
                .secondaries
                .iter()
                .all(|s| healthy.contains(&s.as_str())));
            assert_eq!(route.store_assignments, recorded);
            assert!(route.replica_path.starts_with("@cluster/repositories/"));
            assert_eq!(route.neighbour, None);
            let record = WriteRoute::Create(route.clone()).record(&[]);
            let left_behind: Vec<String> = route
                .secondaries
                .iter()
                .chain(&route.replication_targets)
                .cloned()
                .collect();
            assert_eq!(record.outdated, left_behind);
            let record = WriteRoute::Create(route.clone()).record(&route.secondaries);
            assert_eq!(record.outdated, route.replication_targets);
            assert_eq!(
                record.created,
                Some(Creation {
                    store_assignments: recorded
                })
            );
        }
    }
}

#[tokio::test]
async fn creations_next_to_a_repository_share_its_placement() {
    // "other" lives on a and b with primary a and explicit assignments.
    let fork = WriteRequest {
        fork_source: Some(repo(VS, "other")),
        ..creation("fork")
    };
    let pool = WriteRequest {
        additional: Some(repo(VS, "other")),
        fork_source: Some(repo(VS, "repo")),
        ..creation("pool")
    };
    let hinted = WriteRequest {
        partitioning_hint: Some("other".into()),
        ..creation("hinted")
    };
    let cases = [
        (fork, NeighbourSource::ForkSource),
        (pool, NeighbourSource::AdditionalRepository),
        (hinted, NeighbourSource::PartitioningHint),
    ];
    for (request, named_by) in cases {
        let router = router(0, &["a", "b", "c"], store(&[("a", 1)], Some("a"), &[]));
        let route = match router.route_write(&request).await.unwrap() {
            WriteRoute::Create(route) => route,
            other => panic!("not a creation: {other:?}"),
        };
        assert_eq!(route.primary, "a", "{named_by:?}");
        // b holds "other" at its latest generation and is healthy: it takes part.
        assert_eq!(route.secondaries, vec!["b".to_string()], "{named_by:?}");
        assert!(route.replication_targets.is_empty(), "{named_by:?}");
        assert!(route.store_assignments, "{named_by:?}");
        assert_eq!(
            route.neighbour,
            Some(Neighbour {
                replica_path: "@cluster/repositories/d4/73/2".into(),
                named_by
            })
        );
    }
    // An unhealthy neighbour replica catches up by replication instead.
    let fork = WriteRequest {
        fork_source: Some(repo(VS, "other")),
        ..creation("fork")
    };
    let router = router(0, &["a", "c"], store(&[("a", 1)], Some("a"), &[]));
    match router.route_write(&fork).await.unwrap() {
        WriteRoute::Create(route) => {
            assert!(route.secondaries.is_empty());
            assert_eq!(route.replication_targets, vec!["b".to_string()]);
        }
        other => panic!("not a creation: {other:?}"),
    }
}

#[tokio::test]
async fn creation_refusals_and_upserts() {
    let unhealthy_neighbour = router(0, &["b", "c"], store(&[("a", 1)], Some("a"), &[]));
    let fork = WriteRequest {
        fork_source: Some(repo(VS, "other")),
        ..creation("fork")
    };
    let got = unhealthy_neighbour
        .route_write(&fork)
        .await
        .err()
        .map(|e| e.to_string());
    assert_eq!(got.as_deref(), Some("primary gitaly is not healthy"));

    let router = router(0, &["a", "b", "c"], store(&[("a", 1)], Some("a"), &[]));
    let missing = WriteRequest {
        fork_source: Some(repo(VS, "missing")),
        ..creation("fork")
    };
    let got = router
        .route_write(&missing)
        .await
        .err()
        .map(|e| e.to_string());
    assert_eq!(got.as_deref(), Some("additional repository not found"));
    // An empty fork source is no neighbour.
    let empty = WriteRequest {
        fork_source: Some(repo(VS, "")),
        ..creation("fork")
    };
    assert!(matches!(
        router.route_write(&empty).await,
        Ok(WriteRoute::Create(_))
    ));

    let exists = router
        .route_write(&creation("repo"))
        .await
        .err()
        .map(|e| e.to_string());
    assert_eq!(exists.as_deref(), Some("repository already exists"));
    let upsert = WriteRequest {
        upserts: true,
        ..creation("repo")
    };
    assert!(
        matches!(router.route_write(&upsert).await, Ok(WriteRoute::Update(u)) if u.primary == "a")
    );

    let hash = format!("ab12{}", "0".repeat(60));
    let pool = creation(&format!("@pools/ab/12/{hash}.git"));
    match router.route_write(&pool).await.unwrap() {
        WriteRoute::Create(route) => assert!(route.replica_path.starts_with("@cluster/pools/")),
        other => panic!("not a creation: {other:?}"),
    }
}

#[tokio::test]
async fn maintenance_goes_to_every_healthy_assigned_replica() {
    type Case<'a> = (
        &'a [(&'a str, i64)],
        &'a [&'a str],
        &'a [&'a str],
        Result<Vec<&'a str>, &'a str>,
    );
    let cases: Vec<Case> = vec![
        (
            &[("a", 1), ("b", 0), ("c", 1)],
            &[],
            &["a", "b", "c"],
            Ok(vec!["a", "b", "c"]),
        ),
        (
            &[("a", 1), ("b", 0)],
            &[],
            &["a", "b", "c"],
            Ok(vec!["a", "b"]),
        ),
        (
            &[("a", 1), ("b", 1), ("c", 1)],
            &["a", "c"],
            &["a", "b", "c"],
            Ok(vec!["a", "c"]),
        ),
        (&[("a", 1), ("b", 1), ("c", 1)], &[], &["b"], Ok(vec!["b"])),
        (
            &[("a", 1)],
            &[],
            &["b", "c"],
            Err("no suitable node to serve the request"),
        ),
    ];
    for (replicas, assignments, healthy, want) in cases {
        let router = router(0, healthy, store(replicas, Some("a"), assignments));
        let got = router
            .route_maintenance(&repo(VS, "repo"))
            .await
            .map(|r| r.storages)
            .map_err(|e| e.to_string());
        let want = want
            .map(|v| v.iter().map(|s| s.to_string()).collect())
            .map_err(str::to_string);
        assert_eq!(got, want, "{replicas:?} {assignments:?} {healthy:?}");
    }
}

#[tokio::test]
async fn storage_scoped_reads_go_to_any_healthy_node() {
    let router = router(0, &["a", "c"], store(&[], None, &[]));
    let got = choices(|| async { router.route_storage_accessor(VS).map(|r| r.storage) }).await;
    assert_eq!(got, set(&["a", "c"]));
    for (vs, want) in [
        ("", "storage name not set"),
        ("x", "storage name not found"),
    ] {
        let err = router
            .route_storage_accessor(vs)
            .err()
            .map(|e| e.to_string());
        assert_eq!(err.as_deref(), Some(want));
    }
    let none = router_without_health();
    let err = none.route_storage_accessor(VS).err().map(|e| e.to_string());
    assert_eq!(err.as_deref(), Some("no healthy nodes"));
}

fn router_without_health() -> Router<MemoryStore, FixedHealth> {
    router(0, &[], MemoryStore::default())
}
