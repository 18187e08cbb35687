//! Reference transactions end to end: a router in front of three real gitnodes whose git runs
//! the reference-transaction hook and votes back through the router over the backchannel.
//! Writes land on every up-to-date node together (no replication job), a node that votes
//! otherwise is left behind and repaired, a primary that votes otherwise or refuses fails the
//! write everywhere, a dead primary leaves up-to-date secondaries to serve reads and take the
//! next write, concurrent pushes are all kept, and a write the client abandoned is recorded.
// Tests read the database directly (not through PgBouncer), so the datastore's rule about
// unnamed statements (clippy.toml) does not apply here.
#![allow(clippy::disallowed_methods)]

use crate::common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::{
    checksum, clone_replica, converged, create, generations, metrics, primary_of, replica_path,
    start_router,
};
use common::gitnode::{as_refs, git, GitNode};
use common::pg::TestDb;
use common::router::{
    commit_and_push, router_git_env, sample, seed_repository, virtual_repo, work_tree, Router,
};
use common::wait::wait_until;
use praefect::wire::proto::ref_service_client::RefServiceClient;
use praefect::wire::proto::repository_service_client::RepositoryServiceClient;
use praefect::wire::proto::*;

const ALL: [&str; 3] = ["gitaly-1", "gitaly-2", "gitaly-3"];
/// Makes a gitnode vote differently from its peers (gitnode's test knob).
const SALT: (&str, &str) = ("GITNODE_TEST_VOTE_SALT", "dissent");
/// Makes a gitnode's hook fail the prepared phase without voting.
const REFUSE: (&str, &str) = ("GITNODE_TEST_HOOK_REFUSE", "1");

/// Three gitnodes gitaly-1..3, each with its extra environment.
fn nodes_with(env: [&[(&str, &str)]; 3]) -> [GitNode; 3] {
    let [a, b, c] = env;
    [
        GitNode::start_with_env(ALL[0], a),
        GitNode::start_with_env(ALL[1], b),
        GitNode::start_with_env(ALL[2], c),
    ]
}

async fn router_over(db: &TestDb, dir: &Path, nodes: &[GitNode]) -> Router {
    let refs: Vec<&GitNode> = nodes.iter().collect();
    start_router(db, dir, &refs, "").await
}

/// Every ref of a replica (`git for-each-ref`), as text.
fn refs_of(node: &GitNode, replica_path: &str) -> String {
    git(&node.root.join(replica_path), &["for-each-ref"], &[])
}

/// The replication jobs not yet done for a repository: (target, change).
async fn pending_jobs(db: &TestDb, relative_path: &str) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT job->>'target_node_storage', job->>'change' FROM replication_queue
         WHERE job->>'relative_path' = $1 AND state IN ('ready', 'in_progress')
         ORDER BY 1",
    )
    .bind(relative_path)
    .fetch_all(&mut db.raw().await)
    .await
    .unwrap()
}

/// Sum of `gitaly_praefect_tx_replications_total` over `reasons`.
fn tx_replications(scrape: &str, reasons: &[&str]) -> f64 {
    reasons
        .iter()
        .map(|r| {
            sample(
                scrape,
                "gitaly_praefect_tx_replications_total",
                &[("reason", r)],
            )
        })
        .sum()
}

const REASONS: [&str; 5] = [
    "outdated",
    "no-votes",
    "primary-not-committed",
    "node-not-committed",
    "node-error-status",
];

/// Commits a file in `work` and pushes `refspec` through the router; whether git succeeded.
fn try_commit_and_push(
    work: &Path,
    router: &Router,
    path: &str,
    name: &str,
    refspec: &str,
) -> bool {
    std::fs::write(work.join(name), name).unwrap();
    git(work, &["add", "."], &[]);
    git(work, &["commit", "--quiet", "-m", name], &[]);
    let env = router_git_env(router, path);
    let output = Command::new("git")
        .current_dir(work)
        .args(["push", "--quiet", "ssh://gitaly/x", refspec])
        .envs(as_refs(&env))
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .output()
        .unwrap();
    output.status.success()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_push_lands_on_every_node_by_votes_alone() {
    let db = TestDb::new().await;
    let nodes = nodes_with([&[], &[], &[]]);
    let dir = tempfile::tempdir().unwrap();
    let router = router_over(&db, dir.path(), &nodes).await;
    let path = "group/voted.git";
    create(&router, path).await;
    assert_eq!(
        generations(&db, path).await,
        (0, ALL.iter().map(|s| (s.to_string(), 0)).collect()),
        "created on all three together"
    );

    let work = work_tree(&["one", "two", "three"], 64 * 1024);
    let env = router_git_env(&router, path);
    git(
        work.path(),
        &["push", "--quiet", "ssh://gitaly/x", "main"],
        &as_refs(&env),
    );
    commit_and_push(work.path(), &router, path, "four");

    let (latest, replicas) = generations(&db, path).await;
    assert_eq!(latest, 2, "creation, then two pushes");
    assert_eq!(
        replicas,
        ALL.iter().map(|s| (s.to_string(), 2)).collect::<Vec<_>>()
    );
    assert!(
        pending_jobs(&db, path).await.is_empty(),
        "no replication was needed"
    );
    let scrape = metrics(&router).await;
    assert_eq!(tx_replications(&scrape, &REASONS), 0.0);
    assert!(
        sample(
            &scrape,
            "gitaly_praefect_transactions_total",
            &[("action", "committed")]
        ) >= 18.0,
        "3 nodes voted twice in each of 3 writes:\n{scrape}"
    );
    let replica = replica_path(&db, path).await;
    let sums: Vec<String> =
        futures::future::join_all(nodes.iter().map(|n| checksum(n, &replica))).await;
    assert!(!sums[0].is_empty() && sums[0] != "0".repeat(40));
    assert!(sums.iter().all(|s| *s == sums[0]), "{sums:?}");
    let head = git(work.path(), &["rev-parse", "main"], &[]);
    for node in &nodes {
        assert!(
            refs_of(node, &replica).contains(head.trim()),
            "{} has the push",
            node.storage
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_secondary_voting_otherwise_is_left_behind_and_repaired() {
    let db = TestDb::new().await;
    let nodes = nodes_with([&[], &[], &[SALT]]);
    let path = "group/dissent.git";
    seed_repository(&db, &[&nodes[0], &nodes[1], &nodes[2]], path).await;
    let dir = tempfile::tempdir().unwrap();
    let router = router_over(&db, dir.path(), &nodes).await;
    let replica = replica_path(&db, path).await;
    let before = refs_of(&nodes[2], &replica);

    let work = clone_replica(&nodes[0], &replica);
    commit_and_push(work.path(), &router, path, "second");

    let scrape = metrics(&router).await;
    assert_eq!(
        tx_replications(&scrape, &["node-not-committed"]),
        1.0,
        "{scrape}"
    );
    assert_eq!(tx_replications(&scrape, &REASONS), 1.0);
    let (latest, replicas) = generations(&db, path).await;
    assert_eq!(latest, 1);
    for (storage, generation) in &replicas {
        if storage != "gitaly-3" {
            assert_eq!(*generation, 1, "{storage} committed with the primary");
        }
    }
    // gitaly-3 aborted its update (its hook was told ABORT)... unless the replicator was
    // even faster, in which case it has the primary's refs already.
    let after = refs_of(&nodes[2], &replica);
    assert!(
        after == before || after == refs_of(&nodes[0], &replica),
        "{after}"
    );

    // The replicator repairs it.
    wait_until(Duration::from_secs(30), "gitaly-3 repaired", || async {
        converged(&db, path, &ALL).await
    })
    .await;
    assert_eq!(refs_of(&nodes[2], &replica), refs_of(&nodes[0], &replica));
    assert_eq!(
        checksum(&nodes[2], &replica).await,
        checksum(&nodes[0], &replica).await
    );
}

/// Pushes through a router whose primary (gitaly-1) votes otherwise or refuses: the push
/// fails for the client, and no node changed any ref.
async fn a_primary_that_will_not_commit(
    primary_env: (&str, &str),
) -> (TestDb, Router, [GitNode; 3], String) {
    let db = TestDb::new().await;
    let nodes = nodes_with([&[primary_env], &[], &[]]);
    let path = "group/stubborn.git";
    seed_repository(&db, &[&nodes[0], &nodes[1], &nodes[2]], path).await;
    let dir = tempfile::tempdir().unwrap();
    let router = router_over(&db, dir.path(), &nodes).await;
    std::mem::forget(dir); // the router's configuration lives as long as the router
    let replica = replica_path(&db, path).await;
    let before: Vec<String> = nodes.iter().map(|n| refs_of(n, &replica)).collect();

    let work = clone_replica(&nodes[1], &replica);
    assert!(
        !try_commit_and_push(work.path(), &router, path, "refused", "main"),
        "the push must fail when the primary does not commit"
    );
    let after: Vec<String> = nodes.iter().map(|n| refs_of(n, &replica)).collect();
    assert_eq!(after, before, "no node changed any ref");
    (db, router, nodes, path.to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_primary_voting_otherwise_fails_the_push_everywhere() {
    let (_db, router, _nodes, _) = a_primary_that_will_not_commit(SALT).await;
    // The primary voted, so it may have changed something: Praefect's rule is to replicate
    // from it rather than trust the secondaries.
    let scrape = metrics(&router).await;
    assert_eq!(
        tx_replications(&scrape, &["primary-not-committed"]),
        2.0,
        "{scrape}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_primary_refusing_before_its_vote_fails_the_push_and_records_nothing() {
    let (db, router, _nodes, path) = a_primary_that_will_not_commit(REFUSE).await;
    // The primary never voted: nothing changed, nothing is recorded.
    assert_eq!(
        generations(&db, &path).await,
        (0, ALL.iter().map(|s| (s.to_string(), 0)).collect())
    );
    assert!(pending_jobs(&db, &path).await.is_empty());
    assert_eq!(tx_replications(&metrics(&router).await, &REASONS), 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_primary_leaves_reads_and_the_next_push_to_the_secondaries() {
    let db = TestDb::new().await;
    let mut nodes = nodes_with([&[], &[], &[]]);
    let path = "group/survivor.git";
    seed_repository(&db, &[&nodes[0], &nodes[1], &nodes[2]], path).await;
    let dir = tempfile::tempdir().unwrap();
    let router = router_over(&db, dir.path(), &nodes).await;
    let replica = replica_path(&db, path).await;
    let work = clone_replica(&nodes[1], &replica);
    commit_and_push(work.path(), &router, path, "acknowledged");
    let acknowledged = git(work.path(), &["rev-parse", "HEAD"], &[])
        .trim()
        .to_string();

    nodes[0].kill();
    // Reads go on from the secondaries that voted the push in, while the cluster notices.
    let mut refs = RefServiceClient::new(router.channel());
    let started = Instant::now();
    let (mut reads, mut failed) = (0, Vec::new());
    while started.elapsed() < Duration::from_secs(12) {
        let answer = refs
            .find_branch(FindBranchRequest {
                repository: Some(virtual_repo(path)),
                name: b"main".to_vec(),
            })
            .await;
        reads += 1;
        match answer {
            Ok(found) => {
                let commit = found
                    .into_inner()
                    .branch
                    .and_then(|b| b.target_commit)
                    .map(|c| c.id);
                assert_eq!(
                    commit.as_deref(),
                    Some(acknowledged.as_str()),
                    "read {reads}"
                );
            }
            Err(status) => failed.push(status.to_string()),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        failed.is_empty(),
        "{} of {reads} reads failed: {failed:?}",
        failed.len()
    );

    // The next push succeeds once a new primary is elected, and it has the acknowledged one.
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut attempt = 0;
    loop {
        attempt += 1;
        if try_commit_and_push(
            work.path(),
            &router,
            path,
            &format!("next-{attempt}"),
            "main",
        ) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no push succeeded after the primary died"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        git(work.path(), &["reset", "--quiet", "--hard", "HEAD~1"], &[]);
    }
    let primary = primary_of(&db, path).await;
    assert_ne!(primary, "gitaly-1");
    let new_primary = nodes.iter().find(|n| n.storage == primary).unwrap();
    let head = git(work.path(), &["rev-parse", "HEAD"], &[])
        .trim()
        .to_string();
    let repo = new_primary.root.join(&replica);
    assert_eq!(git(&repo, &["rev-parse", "main"], &[]).trim(), head);
    git(
        &repo,
        &["merge-base", "--is-ancestor", &acknowledged, "main"],
        &[],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_pushes_are_all_kept_on_every_up_to_date_replica() {
    const PUSHES: usize = 20;
    let db = TestDb::new().await;
    let nodes = nodes_with([&[], &[], &[]]);
    let dir = tempfile::tempdir().unwrap();
    let router = std::sync::Arc::new(router_over(&db, dir.path(), &nodes).await);
    let shared = "group/shared.git";
    create(&router, shared).await;
    let own: Vec<String> = (0..PUSHES).map(|i| format!("group/own-{i}.git")).collect();
    for path in &own {
        create(&router, path).await;
    }
    let base = work_tree(&["base"], 1024);

    // 20 pushes to one repository (a branch each), then 20 to 20 repositories, at once.
    let rounds: [Vec<(String, String)>; 2] = [
        (0..PUSHES)
            .map(|i| (shared.to_string(), format!("branch-{i}")))
            .collect(),
        own.iter()
            .map(|p| (p.clone(), "main".to_string()))
            .collect(),
    ];
    let mut acknowledged = Vec::new();
    for round in rounds {
        let pushes = round.into_iter().enumerate().map(|(i, (path, branch))| {
            let router = router.clone();
            let base = base.path().to_path_buf();
            tokio::task::spawn_blocking(move || {
                let work = tempfile::tempdir().unwrap();
                git(
                    work.path(),
                    &["clone", "--quiet", &base.display().to_string(), "."],
                    &[],
                );
                git(work.path(), &["checkout", "--quiet", "-B", &branch], &[]);
                let ok =
                    try_commit_and_push(work.path(), &router, &path, &format!("file-{i}"), &branch);
                let head = git(work.path(), &["rev-parse", "HEAD"], &[])
                    .trim()
                    .to_string();
                (path, branch, head, ok)
            })
        });
        for push in futures::future::join_all(pushes).await {
            acknowledged.push(push.unwrap());
        }
    }
    let failed: Vec<_> = acknowledged.iter().filter(|p| !p.3).collect();
    assert!(failed.is_empty(), "pushes failed: {failed:?}");

    // Every acknowledged push is on every replica the database calls up to date, and each
    // acknowledged write bumped the generation exactly once.
    for path in std::iter::once(shared).chain(own.iter().map(String::as_str)) {
        let (latest, replicas) = generations(&db, path).await;
        let writes = acknowledged.iter().filter(|p| p.0 == path).count() as i64;
        assert_eq!(
            latest, writes,
            "{path}: one generation per acknowledged push"
        );
        let replica = replica_path(&db, path).await;
        for (storage, generation) in replicas.iter().filter(|(_, g)| *g == latest) {
            let node = nodes.iter().find(|n| n.storage == *storage).unwrap();
            let refs = refs_of(node, &replica);
            for (_, branch, head, _) in acknowledged.iter().filter(|p| p.0 == path) {
                assert!(
                    refs.contains(&format!("{head} commit\trefs/heads/{branch}")),
                    "{path} on {storage} (generation {generation}) lacks {branch} at {head}:\n{refs}"
                );
            }
        }
        let up_to_date = replicas.iter().filter(|(_, g)| *g == latest).count();
        assert_eq!(
            up_to_date, 3,
            "{path}: every node voted every push in: {replicas:?}"
        );
    }
    assert_eq!(tx_replications(&metrics(&router).await, &REASONS), 0.0);
    // The repositories are readable through the router too.
    let exists = RepositoryServiceClient::new(router.channel())
        .repository_exists(RepositoryExistsRequest {
            repository: Some(virtual_repo(shared)),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(exists.exists);
}

/// Makes a gitnode's hook wait before its `committed` vote (its references are updated by
/// then).
const DELAY: &str = "GITNODE_TEST_HOOK_DELAY_MS";

#[tokio::test(flavor = "multi_thread")]
async fn a_secondary_killed_mid_push_is_left_behind_with_a_job() {
    let db = TestDb::new().await;
    let mut nodes = nodes_with([&[], &[], &[(DELAY, "5000")]]);
    let path = "group/interrupted.git";
    seed_repository(&db, &[&nodes[0], &nodes[1], &nodes[2]], path).await;
    let dir = tempfile::tempdir().unwrap();
    let router = std::sync::Arc::new(router_over(&db, dir.path(), &nodes).await);
    let replica = replica_path(&db, path).await;
    let work = clone_replica(&nodes[0], &replica);

    let push = {
        let router = router.clone();
        let work = work.path().to_path_buf();
        tokio::task::spawn_blocking(move || {
            try_commit_and_push(&work, &router, path, "mid", "main")
        })
    };
    // gitaly-3 is in its hook, between updating its references and voting on them.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    nodes[2].kill();
    assert!(
        push.await.unwrap(),
        "the push succeeds without the dead secondary"
    );

    let scrape = metrics(&router).await;
    assert_eq!(
        tx_replications(&scrape, &["node-not-committed"]),
        1.0,
        "{scrape}"
    );
    let (latest, replicas) = generations(&db, path).await;
    assert_eq!(latest, 1);
    assert_eq!(
        replicas,
        vec![
            ("gitaly-1".to_string(), 1),
            ("gitaly-2".to_string(), 1),
            ("gitaly-3".to_string(), 0)
        ]
    );
    // gitaly-3 is down, so its job waits for it.
    assert_eq!(
        pending_jobs(&db, path).await,
        vec![("gitaly-3".to_string(), "update".to_string())]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_the_client_abandoned_is_recorded_as_if_it_had_finished() {
    let db = TestDb::new().await;
    let slow: &[(&str, &str)] = &[(DELAY, "1500")];
    let nodes = nodes_with([slow, slow, slow]);
    let path = "group/abandoned.git";
    seed_repository(&db, &[&nodes[0], &nodes[1], &nodes[2]], path).await;
    let dir = tempfile::tempdir().unwrap();
    let router = router_over(&db, dir.path(), &nodes).await;
    let replica = replica_path(&db, path).await;
    let main = git(&nodes[0].root.join(&replica), &["rev-parse", "main"], &[])
        .trim()
        .to_string();
    let write_ref = |name: &str| WriteRefRequest {
        repository: Some(virtual_repo(path)),
        r#ref: format!("refs/heads/{name}").into_bytes(),
        revision: main.clone().into_bytes(),
        ..Default::default()
    };
    let mut client = RepositoryServiceClient::new(router.channel());

    // The client resets the stream while the nodes are between updating and confirming.
    let abandoned = tokio::time::timeout(
        Duration::from_millis(400),
        client.write_ref(write_ref("reset")),
    )
    .await;
    assert!(
        abandoned.is_err(),
        "the write takes longer than the client waited"
    );
    // The client's deadline passes while the nodes are in the same place.
    let mut request = tonic::Request::new(write_ref("deadline"));
    request.set_timeout(Duration::from_millis(400));
    let status = client.write_ref(request).await.unwrap_err();
    assert!(
        matches!(
            status.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{status:?}"
    );

    // Both writes are recorded within seconds: every node applied them, and every node is
    // at the generation of two writes.
    wait_until(
        Duration::from_secs(5),
        "both abandoned writes recorded",
        || async {
            generations(&db, path).await == (2, ALL.iter().map(|s| (s.to_string(), 2)).collect())
        },
    )
    .await;
    for node in &nodes {
        let refs = refs_of(node, &replica);
        for name in ["reset", "deadline"] {
            assert!(
                refs.contains(&format!("refs/heads/{name}")),
                "{} lacks {name}:\n{refs}",
                node.storage
            );
        }
    }
    assert!(pending_jobs(&db, path).await.is_empty());
}
