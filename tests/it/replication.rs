//! The cluster converging on its own, across processes: real gitnodes, real routers running
//! the replicator, one database. Writes reach the secondaries, a returning node catches up,
//! a dead primary is replaced by an up-to-date replica, a job a dead router left behind is
//! finished by another router, and a thousand writes against a stopped secondary cost a
//! handful of replications.
// Tests read and write the database directly (not through PgBouncer), so the
// datastore's rule about unnamed statements (clippy.toml) does not apply here.
#![allow(clippy::disallowed_methods)]

use crate::common;

use std::time::Duration;

use common::cluster::{
    checksum, converged, create, generations, metrics, primary_of, replica_path, start_router,
};
use common::gitnode::{as_refs, git, GitNode};
use common::pg::TestDb;
use common::router::{
    commit_and_push, praefect_cli, router_git_env, sample, seed_repository, virtual_repo,
    wait_for_health_round, work_tree,
};
use common::wait::wait_until;
use praefect::wire::proto::repository_service_client::RepositoryServiceClient;
use praefect::wire::proto::*;

#[tokio::test(flavor = "multi_thread")]
async fn writes_reach_every_replica_and_a_returning_node_catches_up() {
    let db = TestDb::new().await;
    let nodes = [
        GitNode::start("gitaly-1"),
        GitNode::start("gitaly-2"),
        GitNode::start("gitaly-3"),
    ];
    let mut nodes = nodes;
    let dir = tempfile::tempdir().unwrap();
    let refs: Vec<&GitNode> = nodes.iter().collect();
    let router = start_router(&db, dir.path(), &refs, "").await;
    let path = "group/replicated.git";
    let all = ["gitaly-1", "gitaly-2", "gitaly-3"];

    create(&router, path).await;
    let work = work_tree(&["a", "b"], 100_000);
    let env = router_git_env(&router, path);
    git(
        work.path(),
        &["push", "--quiet", "ssh://gitaly/x", "main"],
        &as_refs(&env),
    );
    wait_until(
        Duration::from_secs(30),
        "every replica holds the push",
        || converged(&db, path, &all),
    )
    .await;
    let replica = replica_path(&db, path).await;
    let sums: Vec<String> =
        futures::future::join_all(nodes.iter().map(|n| checksum(n, &replica))).await;
    assert!(sums.iter().all(|s| *s == sums[0]), "{sums:?}");
    assert_ne!(sums[0], "0000000000000000000000000000000000000000");

    // All three are up to date now: reads spread over all of them.
    let before = metrics(&router).await;
    let mut client =
        praefect::wire::proto::ref_service_client::RefServiceClient::new(router.channel());
    for _ in 0..60 {
        client
            .find_default_branch_name(FindDefaultBranchNameRequest {
                repository: Some(virtual_repo(path)),
                head_only: false,
            })
            .await
            .unwrap();
    }
    let after = metrics(&router).await;
    for storage in all {
        let labels = [("virtual_storage", "default"), ("storage", storage)];
        let served = sample(&after, "gitaly_praefect_read_distribution", &labels)
            - sample(&before, "gitaly_praefect_read_distribution", &labels);
        assert!(served > 0.0, "no read reached {storage}");
    }

    // A secondary stops; writes carry on; it comes back and catches up by itself.
    let primary = primary_of(&db, path).await;
    let secondary = nodes
        .iter_mut()
        .find(|n| n.storage != primary)
        .expect("a secondary");
    let secondary_name = secondary.storage.clone();
    secondary.kill();
    wait_for_health_round(&db, &secondary_name, false).await;
    for name in ["c", "d", "e"] {
        commit_and_push(work.path(), &router, path, name);
    }
    let (latest, replicas) = generations(&db, path).await;
    assert!(
        replicas
            .iter()
            .any(|(s, g)| *s == secondary_name && *g < latest),
        "the stopped secondary is behind: {replicas:?}"
    );
    nodes
        .iter_mut()
        .find(|n| n.storage == secondary_name)
        .unwrap()
        .restart();
    wait_until(
        Duration::from_secs(40),
        "the returning secondary caught up",
        || converged(&db, path, &all),
    )
    .await;
    let sums: Vec<String> =
        futures::future::join_all(nodes.iter().map(|n| checksum(n, &replica))).await;
    assert!(sums.iter().all(|s| *s == sums[0]), "{sums:?}");
    let pushed = git(work.path(), &["rev-parse", "main"], &[]);
    let on_secondary = git(
        &nodes
            .iter()
            .find(|n| n.storage == secondary_name)
            .unwrap()
            .root
            .join(&replica),
        &["rev-parse", "main"],
        &[],
    );
    assert_eq!(on_secondary, pushed);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_primary_is_replaced_without_losing_acknowledged_writes() {
    let db = TestDb::new().await;
    let mut nodes = [
        GitNode::start("gitaly-1"),
        GitNode::start("gitaly-2"),
        GitNode::start("gitaly-3"),
    ];
    let dir = tempfile::tempdir().unwrap();
    let refs: Vec<&GitNode> = nodes.iter().collect();
    let router = start_router(&db, dir.path(), &refs, "").await;
    let path = "group/failover.git";
    let all = ["gitaly-1", "gitaly-2", "gitaly-3"];
    create(&router, path).await;
    let work = work_tree(&["a"], 50_000);
    for name in ["b", "c"] {
        commit_and_push(work.path(), &router, path, name);
    }
    wait_until(
        Duration::from_secs(30),
        "every replica holds the pushes",
        || converged(&db, path, &all),
    )
    .await;
    let acknowledged = git(work.path(), &["rev-parse", "main"], &[]);

    let old_primary = primary_of(&db, path).await;
    nodes
        .iter_mut()
        .find(|n| n.storage == old_primary)
        .unwrap()
        .kill();
    // Within the 10 s health window plus a round, a push succeeds on a new primary.
    std::fs::write(work.path().join("after"), "after the failover").unwrap();
    git(work.path(), &["add", "."], &[]);
    git(work.path(), &["commit", "--quiet", "-m", "after"], &[]);
    let env = router_git_env(&router, path);
    wait_until(
        Duration::from_secs(15),
        "a push succeeds after the primary's death",
        async || {
            let pushed = std::process::Command::new("git")
                .args(["push", "--quiet", "ssh://gitaly/x", "main"])
                .current_dir(work.path())
                .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .stderr(std::process::Stdio::null())
                .status()
                .unwrap()
                .success();
            if !pushed {
                // Paced: a failed push is a git and an ssh process; no need for 50 a second.
                tokio::time::sleep(Duration::from_millis(230)).await;
            }
            pushed
        },
    )
    .await;
    let new_primary = primary_of(&db, path).await;
    assert_ne!(new_primary, old_primary);

    // Nothing acknowledged before the kill is missing on the new primary.
    let replica = replica_path(&db, path).await;
    let new_node = nodes.iter().find(|n| n.storage == new_primary).unwrap();
    let repo_dir = new_node.root.join(&replica);
    git(
        &repo_dir,
        &["merge-base", "--is-ancestor", acknowledged.trim(), "main"],
        &[],
    );
    let head = git(&repo_dir, &["rev-parse", "main"], &[]);
    assert_eq!(head, git(work.path(), &["rev-parse", "main"], &[]));
}

#[tokio::test(flavor = "multi_thread")]
async fn another_router_finishes_the_job_of_a_killed_router() {
    let db = TestDb::new().await;
    let a = GitNode::start("gitaly-1");
    let b = GitNode::start("gitaly-2");
    let path = "group/heavy.git";
    // Only gitaly-1 has the repository; gitaly-2 is behind and gets an update job.
    seed_repository(&db, &[&a], path).await;
    let replica = replica_path(&db, path).await;
    let work = work_tree(&["big-1", "big-2", "big-3", "big-4"], 10_000_000);
    let env = common::gitnode::ssh_env(&a.address, &a.storage, &replica);
    git(
        work.path(),
        &["push", "--quiet", "--force", "ssh://gitaly/x", "main"],
        &as_refs(&env),
    );
    let store = db.datastore().await;
    let id: i64 =
        sqlx::query_scalar("SELECT repository_id FROM repositories WHERE relative_path = $1")
            .bind(path)
            .fetch_one(&mut db.raw().await)
            .await
            .unwrap();
    store
        .enqueue(
            &praefect::datastore::ReplicationJob {
                repository_id: id,
                replica_path: replica.clone(),
                change: praefect::datastore::ChangeType::Update,
                relative_path: path.into(),
                target_node_storage: "gitaly-2".into(),
                source_node_storage: "gitaly-1".into(),
                virtual_storage: "default".into(),
                params: None,
            },
            "kill-test",
        )
        .await
        .unwrap();

    // Router A takes the job; it is killed while the job runs.
    let dir_a = tempfile::tempdir().unwrap();
    let mut router_a = start_router(&db, dir_a.path(), &[&a, &b], "").await;
    let mut raw = db.raw().await;
    wait_until(
        Duration::from_secs(20),
        "router A takes the job",
        async || {
            let running: i64 =
                sqlx::query_scalar("SELECT count(*) FROM replication_queue_job_lock")
                    .fetch_one(&mut raw)
                    .await
                    .unwrap();
            running > 0
        },
    )
    .await;
    router_a.child.kill().unwrap();
    router_a.child.wait().unwrap();
    let state: String = sqlx::query_scalar("SELECT state::text FROM replication_queue")
        .fetch_one(&mut raw)
        .await
        .unwrap();
    assert_eq!(state, "in_progress", "the job was cut mid-way");

    // Its heartbeat stops; a minute later the job counts as stale. (Time is moved forward
    // in the database instead of waiting: the job lock is aged by two minutes.)
    sqlx::query(
        "UPDATE replication_queue_job_lock SET triggered_at = triggered_at - interval '2 minutes'",
    )
    .execute(&mut raw)
    .await
    .unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let _router_b = start_router(&db, dir_b.path(), &[&a, &b], "").await;
    wait_until(Duration::from_secs(60), "router B finished the job", || {
        converged(&db, path, &["gitaly-1", "gitaly-2"])
    })
    .await;
    wait_until(Duration::from_secs(10), "the queue is empty", || {
        let db = &db;
        async move {
            let left: i64 = sqlx::query_scalar("SELECT count(*) FROM replication_queue")
                .fetch_one(&mut db.raw().await)
                .await
                .unwrap();
            left == 0
        }
    })
    .await;
    assert_eq!(checksum(&a, &replica).await, checksum(&b, &replica).await);
    git(&b.root.join(&replica), &["fsck", "--strict"], &[]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_writes_against_a_stopped_secondary_collapse_to_a_few_replications() {
    let db = TestDb::new().await;
    let a = GitNode::start("gitaly-1");
    let mut b = GitNode::start("gitaly-2");
    let path = "group/busy.git";
    seed_repository(&db, &[&a, &b], path).await;
    let dir = tempfile::tempdir().unwrap();
    let router = start_router(&db, dir.path(), &[&a, &b], "").await;
    b.kill();
    wait_for_health_round(&db, &b.storage, false).await;

    let writes = futures::stream::iter(0..1000).map(|i| {
        let mut client = RepositoryServiceClient::new(router.channel());
        async move {
            client
                .write_ref(WriteRefRequest {
                    repository: Some(virtual_repo(path)),
                    r#ref: format!("refs/heads/w{i}").into_bytes(),
                    revision: b"refs/heads/main".to_vec(),
                    old_revision: vec![],
                })
                .await
                .unwrap();
        }
    });
    use futures::StreamExt;
    writes.buffer_unordered(8).collect::<Vec<()>>().await;
    let (latest, _) = generations(&db, path).await;
    assert_eq!(latest, 1000);
    let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM replication_queue")
        .fetch_one(&mut db.raw().await)
        .await
        .unwrap();
    assert_eq!(queued, 1, "the writes share one ready job");

    let before = metrics(&router).await;
    b.restart();
    wait_until(Duration::from_secs(40), "gitaly-2 caught up", || {
        converged(&db, path, &["gitaly-1", "gitaly-2"])
    })
    .await;
    let after = metrics(&router).await;
    let runs = sample(
        &after,
        "gitaly_praefect_replication_latency_count",
        &[("type", "update")],
    ) - sample(
        &before,
        "gitaly_praefect_replication_latency_count",
        &[("type", "update")],
    );
    assert!((1.0..=3.0).contains(&runs), "{runs} replications ran");
    let replica = replica_path(&db, path).await;
    assert_eq!(checksum(&a, &replica).await, checksum(&b, &replica).await);
}

async fn replica_storages(db: &TestDb, relative_path: &str) -> Vec<String> {
    generations(db, relative_path)
        .await
        .1
        .into_iter()
        .map(|(storage, _)| storage)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn replication_factor_changes_are_carried_out_by_the_reconciler() {
    let db = TestDb::new().await;
    let nodes = [
        GitNode::start("gitaly-1"),
        GitNode::start("gitaly-2"),
        GitNode::start("gitaly-3"),
    ];
    let dir = tempfile::tempdir().unwrap();
    let refs: Vec<&GitNode> = nodes.iter().collect();
    let router = start_router(
        &db,
        dir.path(),
        &refs,
        "[reconciliation]\nscheduling_interval = \"1s\"",
    )
    .await;
    let path = "group/factor.git";
    let all = ["gitaly-1", "gitaly-2", "gitaly-3"];
    create(&router, path).await;
    let work = work_tree(&["a"], 20_000);
    commit_and_push(work.path(), &router, path, "b");
    wait_until(Duration::from_secs(30), "three replicas", || {
        converged(&db, path, &all)
    })
    .await;
    let primary = primary_of(&db, path).await;
    let replica = replica_path(&db, path).await;
    let set = |factor: &'static str| {
        let dir = dir.path().to_path_buf();
        async move {
            praefect_cli(
                &dir,
                &[
                    "set-replication-factor",
                    "-virtual-storage",
                    "default",
                    "-relative-path",
                    path,
                    "-replication-factor",
                    factor,
                ],
            )
            .await
        }
    };

    // 3 -> 2: the primary stays assigned; the reconciler removes the third replica.
    let (code, out, err) = set("2").await;
    assert_eq!(code, 0, "{err}");
    let assigned: Vec<String> = out
        .trim()
        .strip_prefix("current assignments: ")
        .unwrap_or_else(|| panic!("unexpected output {out:?}"))
        .split(", ")
        .map(str::to_string)
        .collect();
    assert_eq!(assigned.len(), 2, "{out}");
    assert!(
        assigned.contains(&primary),
        "the primary stays assigned: {out}"
    );
    let dropped = all
        .iter()
        .find(|s| !assigned.contains(&s.to_string()))
        .unwrap()
        .to_string();
    wait_until(
        Duration::from_secs(30),
        "the unassigned replica is removed",
        || async { replica_storages(&db, path).await == assigned },
    )
    .await;
    let dropped_node = nodes.iter().find(|n| n.storage == dropped).unwrap();
    wait_until(Duration::from_secs(10), "its directory is gone", || async {
        !dropped_node.root.join(&replica).exists()
    })
    .await;
    assert_eq!(primary_of(&db, path).await, primary);

    // 2 -> 3: the reconciler creates it again, up to date.
    let (code, out, err) = set("3").await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        "current assignments: gitaly-1, gitaly-2, gitaly-3"
    );
    wait_until(Duration::from_secs(30), "the replica is back", || {
        converged(&db, path, &all)
    })
    .await;
    assert_eq!(
        checksum(dropped_node, &replica).await,
        checksum(
            nodes.iter().find(|n| n.storage == primary).unwrap(),
            &replica
        )
        .await
    );
    assert_eq!(primary_of(&db, path).await, primary);

    // Out of range and unknown repositories are refused with a clear message.
    for (factor, message) in [("0", "minimum is 1"), ("4", "only contains 3 storages")] {
        let (code, _, err) = set(factor).await;
        assert_eq!(code, 1);
        assert!(err.contains(message), "{err}");
    }
    let (code, _, err) = praefect_cli(
        dir.path(),
        &[
            "set-replication-factor",
            "-virtual-storage",
            "default",
            "-relative-path",
            "nope.git",
            "-replication-factor",
            "2",
        ],
    )
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("not found"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_replica_is_found_by_the_verifier_and_recreated_by_the_reconciler() {
    let db = TestDb::new().await;
    let a = GitNode::start("gitaly-1");
    let b = GitNode::start("gitaly-2");
    let dir = tempfile::tempdir().unwrap();
    let router = start_router(
        &db,
        dir.path(),
        &[&a, &b],
        "[reconciliation]\nscheduling_interval = \"1s\"",
    )
    .await;
    let path = "group/lost.git";
    let both = ["gitaly-1", "gitaly-2"];
    create(&router, path).await;
    let work = work_tree(&["a"], 20_000);
    commit_and_push(work.path(), &router, path, "b");
    wait_until(Duration::from_secs(30), "both replicas", || {
        converged(&db, path, &both)
    })
    .await;
    let verified = || async {
        let count: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM storage_repositories WHERE verified_at IS NOT NULL",
        )
        .fetch_one(&mut db.raw().await)
        .await
        .unwrap();
        count
    };
    wait_until(
        Duration::from_secs(20),
        "the verifier checked both replicas",
        || async { verified().await == 2 },
    )
    .await;

    // The replica on gitaly-2 disappears behind the router's back.
    let replica = replica_path(&db, path).await;
    std::fs::remove_dir_all(b.root.join(&replica)).unwrap();
    let id: i64 =
        sqlx::query_scalar("SELECT repository_id FROM repositories WHERE relative_path = $1")
            .bind(path)
            .fetch_one(&mut db.raw().await)
            .await
            .unwrap();
    let (code, out, err) =
        praefect_cli(dir.path(), &["verify", "-repository-id", &id.to_string()]).await;
    assert_eq!(
        (code, out.trim()),
        (0, "2 replicas marked unverified"),
        "{err}"
    );

    // The verifier drops its record; the reconciler schedules it again; it comes back.
    // (Polled closely: the reconciler and replicator take well over 20 ms to bring it back.)
    wait_until(
        Duration::from_secs(20),
        "the verifier removes the record",
        async || {
            !replica_storages(&db, path)
                .await
                .contains(&"gitaly-2".to_string())
        },
    )
    .await;
    wait_until(Duration::from_secs(30), "the replica is recreated", || {
        converged(&db, path, &both)
    })
    .await;
    assert!(b.root.join(&replica).exists());
    assert_eq!(checksum(&a, &replica).await, checksum(&b, &replica).await);
}
