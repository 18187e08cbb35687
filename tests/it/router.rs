//! The router across processes: `praefect serve` with real gitnodes and a real database.
// Tests read and write the database directly (not through PgBouncer), so the
// datastore's rule about unnamed statements (clippy.toml) does not apply here.
#![allow(clippy::disallowed_methods)]

use crate::common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::gitnode::GitNode;
use common::pg::TestDb;
use common::router::{
    commit_and_push, router_git_env, seed_repository, virtual_repo, wait_for_health_round,
    write_config_with, NodeEntry, Router,
};
use common::wait::wait_until;
use praefect::config::DatabaseConnection;

fn write_config(dir: &Path, db: &DatabaseConnection, nodes: &[&GitNode]) -> PathBuf {
    let nodes: Vec<NodeEntry> = nodes.iter().map(|n| NodeEntry::from(*n)).collect();
    write_config_with(dir, db, &nodes, "")
}

#[derive(Debug, sqlx::FromRow)]
struct Status {
    praefect_name: String,
    node_name: String,
    /// Seconds since the last attempt and since the node was last seen healthy.
    since_attempt: f64,
    since_seen: Option<f64>,
}

async fn node_status(db: &TestDb) -> Vec<Status> {
    let mut conn = db.raw().await;
    sqlx::query_as(
        "SELECT praefect_name::text, node_name::text,
                extract(epoch FROM now() - last_contact_attempt_at)::float8 AS since_attempt,
                extract(epoch FROM now() - last_seen_active_at)::float8 AS since_seen
         FROM node_status ORDER BY node_name",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn health_rounds_are_recorded_and_follow_nodes_down_and_up() {
    let db = TestDb::new().await;
    let a = GitNode::start("gitaly-1");
    let mut b = GitNode::start("gitaly-2");
    let dir = tempfile::tempdir().unwrap();
    let config_path = write_config(dir.path(), &db.connection(), &[&a, &b]);
    let config = praefect::config::load_file(&config_path).unwrap();
    let name = praefect::health::praefect_name(&config);
    let mut router = Router::start(&config_path);

    // Startup waited for the first round: both rows exist, both nodes seen healthy.
    let rows = node_status(&db).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(
        (rows[0].node_name.as_str(), rows[1].node_name.as_str()),
        ("gitaly-1", "gitaly-2")
    );
    for row in &rows {
        assert_eq!(row.praefect_name, name);
    }
    wait_until(
        Duration::from_secs(20),
        "both nodes are seen healthy",
        || async {
            node_status(&db)
                .await
                .iter()
                .all(|r| r.since_seen.is_some_and(|s| s < 2.0))
        },
    )
    .await;
    let store = db.datastore().await;
    assert_eq!(store.healthy_storages().await.unwrap().len(), 2);

    // gitaly-2 goes down: still probed every second, no longer seen.
    b.kill();
    wait_until(
        Duration::from_secs(20),
        "gitaly-2 is still probed but not seen for 2 s",
        || async {
            let rows = node_status(&db).await;
            rows[1].since_attempt < 2.0 && rows[1].since_seen.is_some_and(|s| s >= 2.0)
        },
    )
    .await;
    let rows = node_status(&db).await;
    assert!(rows[0].since_seen.unwrap() < 2.0, "{rows:?}");
    assert!(rows[1].since_attempt < 2.0, "{rows:?}");
    assert!(rows[1].since_seen.unwrap() >= 2.0, "{rows:?}");

    // It comes back: recovery is seen too.
    b.restart();
    wait_until(
        Duration::from_secs(20),
        "gitaly-2 is seen healthy again",
        || async {
            node_status(&db).await[1]
                .since_seen
                .is_some_and(|s| s < 2.0)
        },
    )
    .await;

    // A restarted router keeps its name: the same rows are updated, none added.
    router.stop();
    let _router = Router::start(&config_path);
    let rows = node_status(&db).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(rows.iter().all(|r| r.praefect_name == name));
}

#[tokio::test(flavor = "multi_thread")]
async fn accessors_are_proxied_to_healthy_up_to_date_replicas() {
    use praefect::wire::proto::ref_service_client::RefServiceClient;
    use praefect::wire::proto::{FindDefaultBranchNameRequest, RefExistsRequest};
    use tonic::Code;

    let db = TestDb::new().await;
    let a = GitNode::start("gitaly-1");
    let mut b = GitNode::start("gitaly-2");
    let id = seed_repository(&db, &[&a, &b], "group/project.git").await;
    let dir = tempfile::tempdir().unwrap();
    let config_path = write_config(dir.path(), &db.connection(), &[&a, &b]);
    let router = Router::start(&config_path);
    let mut refs = RefServiceClient::new(router.channel());

    // Enough calls to trip a node's HTTP/2 reset-flood guard if the router reset streams.
    for _ in 0..200 {
        let name = refs
            .find_default_branch_name(FindDefaultBranchNameRequest {
                repository: Some(virtual_repo("group/project.git")),
                head_only: false,
            })
            .await
            .unwrap()
            .into_inner()
            .name;
        assert_eq!(name, b"refs/heads/main");
    }
    let exists = refs
        .ref_exists(RefExistsRequest {
            repository: Some(virtual_repo("group/project.git")),
            r#ref: b"refs/heads/main".to_vec(),
        })
        .await
        .unwrap()
        .into_inner()
        .value;
    assert!(exists);

    // git clone through the router: upload-pack on a replica, pack data on a sidechannel
    // that the router bridges between the node and the client.
    {
        use common::gitnode::{as_refs, git};
        let env = router_git_env(&router, "group/project.git");
        for protocol in ["2", "0"] {
            let clone = tempfile::tempdir().unwrap();
            git(
                clone.path(),
                &[
                    "-c",
                    &format!("protocol.version={protocol}"),
                    "clone",
                    "--quiet",
                    "--bare",
                    "ssh://gitaly/x",
                    ".",
                ],
                &as_refs(&env),
            );
            let log = git(clone.path(), &["log", "--format=%s", "main"], &[]);
            assert_eq!(log.trim(), "first", "protocol v{protocol}");
        }
    }

    // Errors of the node come back unchanged (its code and message).
    let err = refs
        .ref_exists(RefExistsRequest {
            repository: Some(virtual_repo("group/project.git")),
            r#ref: b"not-a-ref".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::InvalidArgument, "invalid refname")
    );

    // The router's own errors use Praefect's codes and messages.
    let request = |storage: &str, path: &str| FindDefaultBranchNameRequest {
        repository: Some(praefect::wire::proto::Repository {
            storage_name: storage.into(),
            relative_path: path.into(),
            ..Default::default()
        }),
        head_only: false,
    };
    for (storage, path, code, message) in [
        (
            "default",
            "untracked.git",
            Code::NotFound,
            "repository not found",
        ),
        (
            "nope",
            "group/project.git",
            Code::InvalidArgument,
            "storage name not found",
        ),
        (
            "",
            "group/project.git",
            Code::InvalidArgument,
            "storage name not set",
        ),
        (
            "default",
            "",
            Code::InvalidArgument,
            "repository path not set",
        ),
    ] {
        let err = refs
            .find_default_branch_name(request(storage, path))
            .await
            .unwrap_err();
        assert_eq!(
            (err.code(), err.message()),
            (code, message),
            "{storage:?} {path:?}"
        );
    }
    let err = refs
        .find_default_branch_name(FindDefaultBranchNameRequest {
            repository: None,
            head_only: false,
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::InvalidArgument, "repository not set")
    );

    // A client without the router's token is refused by the router itself.
    let plain = praefect::wire::backchannel::dial_lazy(
        &router.address,
        praefect::wire::backchannel::yamux_config(0, 256),
        Default::default(),
    )
    .unwrap();
    let err = RefServiceClient::new(plain)
        .find_default_branch_name(request("default", "group/project.git"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // One node down: reads keep working on the other once the health round saw it.
    let read = || FindDefaultBranchNameRequest {
        repository: Some(virtual_repo("group/project.git")),
        head_only: false,
    };
    b.kill();
    wait_for_health_round(&db, "gitaly-2", false).await;
    for _ in 0..10 {
        refs.find_default_branch_name(read()).await.unwrap();
    }

    // Reads never reach an outdated replica: gitaly-2 misses a write, gitaly-1 goes down,
    // and the repository is unavailable rather than served stale.
    b.restart();
    let store = db.datastore().await;
    store
        .increment_generation(id, std::slice::from_ref(&a.storage))
        .await
        .unwrap();
    wait_for_health_round(&db, "gitaly-2", true).await;
    let mut a = a;
    a.kill();
    wait_for_health_round(&db, "gitaly-1", false).await;
    let err = refs.find_default_branch_name(read()).await.unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::Internal, "no suitable node to serve the request")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn writes_go_to_the_primary_and_the_up_to_date_secondary_together() {
    use common::gitnode::{as_refs, git};
    use praefect::wire::proto::repository_service_client::RepositoryServiceClient;
    use praefect::wire::proto::*;
    use tonic::Code;

    let db = TestDb::new().await;
    let mut a = GitNode::start("gitaly-1");
    let mut b = GitNode::start("gitaly-2");
    let dir = tempfile::tempdir().unwrap();
    let config_path = write_config(dir.path(), &db.connection(), &[&a, &b]);
    let router = Router::start(&config_path);
    let mut repos = RepositoryServiceClient::new(router.channel());
    let path = "new/project.git";

    repos
        .create_repository(CreateRepositoryRequest {
            repository: Some(virtual_repo(path)),
            default_branch: b"main".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
    let err = repos
        .create_repository(CreateRepositoryRequest {
            repository: Some(virtual_repo(path)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);

    let mut raw = db.raw().await;
    let (id, primary, generation, replica_path): (i64, String, i64, String) = sqlx::query_as(
        "SELECT repository_id, \"primary\", generation, replica_path FROM repositories WHERE relative_path = $1",
    )
    .bind(path)
    .fetch_one(&mut raw)
    .await
    .unwrap();
    assert_eq!(generation, 0);
    assert_eq!(replica_path, praefect::routing::replica_path(id));
    let other = if primary == "gitaly-1" {
        "gitaly-2"
    } else {
        "gitaly-1"
    };
    let replicas: Vec<(String, i64)> = sqlx::query_as(
        "SELECT storage, generation FROM storage_repositories WHERE repository_id = $1",
    )
    .bind(id)
    .fetch_all(&mut raw)
    .await
    .unwrap();
    // Created on both nodes together (a reference transaction): no replication needed.
    let mut both = vec![(primary.clone(), 0), (other.to_string(), 0)];
    both.sort();
    let mut sorted = replicas;
    sorted.sort();
    assert_eq!(sorted, both);
    assert!(ready_jobs(&mut raw).await.is_empty());
    let exists = |path: &'static str| RepositoryExistsRequest {
        repository: Some(virtual_repo(path)),
    };
    assert!(
        repos
            .repository_exists(exists(path))
            .await
            .unwrap()
            .into_inner()
            .exists
    );
    assert!(
        !repos
            .repository_exists(exists("nothing.git"))
            .await
            .unwrap()
            .into_inner()
            .exists
    );

    // Push through the router: both nodes vote it in, both generations move on.
    let env = router_git_env(&router, path);
    let work = tempfile::tempdir().unwrap();
    git(
        work.path(),
        &["init", "--quiet", "--initial-branch=main", "."],
        &[],
    );
    std::fs::write(work.path().join("file"), "content").unwrap();
    git(work.path(), &["add", "."], &[]);
    git(
        work.path(),
        &["commit", "--quiet", "-m", "pushed through the router"],
        &[],
    );
    git(
        work.path(),
        &["push", "--quiet", "ssh://gitaly/x", "main"],
        &as_refs(&env),
    );
    let generation: i64 =
        sqlx::query_scalar("SELECT generation FROM repositories WHERE repository_id = $1")
            .bind(id)
            .fetch_one(&mut raw)
            .await
            .unwrap();
    assert_eq!(generation, 1);
    let replicas: Vec<(String, i64)> = sqlx::query_as(
        "SELECT storage, generation FROM storage_repositories WHERE repository_id = $1",
    )
    .bind(id)
    .fetch_all(&mut raw)
    .await
    .unwrap();
    let mut sorted = replicas;
    sorted.sort();
    assert_eq!(
        sorted,
        both.iter().map(|(s, _)| (s.clone(), 1)).collect::<Vec<_>>()
    );
    assert!(ready_jobs(&mut raw).await.is_empty());

    let clone = tempfile::tempdir().unwrap();
    git(
        clone.path(),
        &["clone", "--quiet", "--bare", "ssh://gitaly/x", "."],
        &as_refs(&env),
    );
    assert_eq!(
        git(clone.path(), &["log", "--format=%s", "main"], &[]).trim(),
        "pushed through the router"
    );

    // A failed write records nothing.
    let bad = WriteRefRequest {
        repository: Some(virtual_repo(path)),
        r#ref: b"refs/heads/x".to_vec(),
        revision: b"0000000000000000000000000000000000000001".to_vec(),
        old_revision: vec![],
    };
    repos.write_ref(bad.clone()).await.unwrap_err();
    let generation: i64 =
        sqlx::query_scalar("SELECT generation FROM repositories WHERE repository_id = $1")
            .bind(id)
            .fetch_one(&mut raw)
            .await
            .unwrap();
    assert_eq!(generation, 1, "a failed write must not bump the generation");

    // The primary down and no other up-to-date replica: writes and reads are refused clearly.
    db.datastore()
        .await
        .increment_generation(id, std::slice::from_ref(&primary))
        .await
        .unwrap();
    let (primary_node, _other_node) = if primary == "gitaly-1" {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    primary_node.kill();
    wait_for_health_round(&db, &primary, false).await;
    let err = repos.write_ref(bad).await.unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::Internal, "primary gitaly is not healthy")
    );
    primary_node.restart();
    wait_for_health_round(&db, &primary, true).await;

    // RemoveRepository: records first, then the replicas.
    repos
        .remove_repository(RemoveRepositoryRequest {
            repository: Some(virtual_repo(path)),
        })
        .await
        .unwrap();
    assert!(
        !repos
            .repository_exists(exists(path))
            .await
            .unwrap()
            .into_inner()
            .exists
    );
    let on_disk = RepositoryServiceClient::new(primary_node.channel())
        .repository_exists(RepositoryExistsRequest {
            repository: Some(primary_node.repository(&replica_path)),
        })
        .await
        .unwrap()
        .into_inner()
        .exists;
    assert!(!on_disk, "the replica is removed from the node");
    let err = repos
        .remove_repository(RemoveRepositoryRequest {
            repository: Some(virtual_repo(path)),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::NotFound, "repository does not exist")
    );
}

async fn ready_jobs(raw: &mut sqlx::PgConnection) -> Vec<(String, String, String)> {
    sqlx::query_as(
        "SELECT job->>'change', job->>'source_node_storage', job->>'target_node_storage'
         FROM replication_queue WHERE state = 'ready'",
    )
    .fetch_all(raw)
    .await
    .unwrap()
}

/// The `THP_enabled` line of a process's status: 0 once it has disabled transparent huge
/// pages for itself (`PR_SET_THP_DISABLE`).
fn thp_enabled(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("THP_enabled:"))
        .map(|value| value.trim().to_owned())
        .unwrap_or_else(|| panic!("no THP_enabled in /proc/{pid}/status:\n{status}"))
}

/// The router keeps its heap out of transparent huge pages (they multiplied its resident
/// memory), also where the system's THP mode is `always`, unless the operator sets mimalloc's
/// MIMALLOC_ALLOW_THP.
#[tokio::test(flavor = "multi_thread")]
async fn the_router_turns_transparent_huge_pages_off_unless_the_allocator_switch_is_set() {
    let db = TestDb::new().await;
    let node = GitNode::start("gitaly-1");
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &db.connection(), &[&node]);
    for (env, expected) in [(None, "0"), (Some(("MIMALLOC_ALLOW_THP", "1")), "1")] {
        let config = config.clone();
        let router =
            tokio::task::spawn_blocking(move || Router::start_with_env(&config, env.as_slice()))
                .await
                .unwrap();
        assert_eq!(
            thp_enabled(router.child.id()),
            expected,
            "environment {env:?}"
        );
        assert_eq!(
            router
                .startup_log
                .iter()
                .any(|line| line.contains("transparent huge pages left to the allocator")),
            env.is_some(),
            "{:?}",
            router.startup_log
        );
    }
}

/// The router's startup log line naming its async runtime's flavour.
fn runtime_flavour(router: &Router) -> String {
    router
        .startup_log
        .iter()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find_map(|entry| entry["flavour"].as_str().map(str::to_owned))
        .unwrap_or_else(|| panic!("no runtime flavour logged: {:?}", router.startup_log))
}

/// On one CPU the router runs its async runtime on one thread (a multi-threaded scheduler has
/// nothing to spread work over there and costs 3–4% CPU per call), and still does everything:
/// concurrent calls, a clone on a sidechannel, a push that both replicas vote in over the
/// backchannel. With more CPUs it keeps the multi-threaded scheduler.
#[tokio::test(flavor = "multi_thread")]
async fn the_router_on_one_cpu_runs_on_one_thread_and_serves_calls_clones_and_pushes() {
    use common::gitnode::{as_refs, git};
    use praefect::wire::proto::ref_service_client::RefServiceClient;
    use praefect::wire::proto::FindDefaultBranchNameRequest;

    let db = TestDb::new().await;
    let a = GitNode::start("gitaly-1");
    let b = GitNode::start("gitaly-2");
    let id = seed_repository(&db, &[&a, &b], "group/project.git").await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &db.connection(), &[&a, &b]);
    let pinned = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || Router::start_on_one_cpu(&config))
            .await
            .unwrap()
    };
    assert_eq!(runtime_flavour(&pinned), "current_thread");

    // 64 calls in flight at once, a few times over.
    let refs = RefServiceClient::new(pinned.channel());
    for _ in 0..4 {
        let calls = (0..64).map(|_| {
            let mut refs = refs.clone();
            async move {
                refs.find_default_branch_name(FindDefaultBranchNameRequest {
                    repository: Some(virtual_repo("group/project.git")),
                    head_only: false,
                })
                .await
                .map(|answer| answer.into_inner().name)
            }
        });
        for name in futures::future::join_all(calls).await {
            assert_eq!(name.unwrap(), b"refs/heads/main");
        }
    }

    // A push (a reference transaction: both replicas vote over the backchannel), then a
    // clone of what it pushed (the pack on a sidechannel the router bridges).
    let env = router_git_env(&pinned, "group/project.git");
    let source = tempfile::tempdir().unwrap();
    git(
        source.path(),
        &["clone", "--quiet", "ssh://gitaly/x", "."],
        &as_refs(&env),
    );
    commit_and_push(
        source.path(),
        &pinned,
        "group/project.git",
        "pushed-on-one-cpu",
    );
    let mut raw = db.raw().await;
    let generations: Vec<i64> = sqlx::query_scalar(
        "SELECT generation FROM storage_repositories WHERE repository_id = $1 ORDER BY storage",
    )
    .bind(id)
    .fetch_all(&mut raw)
    .await
    .unwrap();
    assert_eq!(generations, [1, 1], "both replicas took the push");
    let clone = tempfile::tempdir().unwrap();
    git(
        clone.path(),
        &["clone", "--quiet", "--bare", "ssh://gitaly/x", "."],
        &as_refs(&env),
    );
    let log = git(clone.path(), &["log", "--format=%s", "main"], &[]);
    assert_eq!(log.trim(), "pushed-on-one-cpu\nfirst");

    // With more CPUs, the multi-threaded scheduler.
    if std::thread::available_parallelism().map_or(1, usize::from) > 1 {
        let free = tokio::task::spawn_blocking(move || Router::start(&config))
            .await
            .unwrap();
        assert_eq!(runtime_flavour(&free), "multi_thread");
    }
}

/// Metadata HTTP/2 forbids or the router must not pass on (`content-length`, `host`, a `te`
/// other than `trailers`) is dropped on the way to the node: the router rewrites the first
/// message (the replica path is longer than the relative path), so a client's
/// `content-length` passed on would make the node refuse the stream.
#[tokio::test(flavor = "multi_thread")]
async fn a_clients_content_length_and_host_do_not_reach_the_node() {
    use common::raw::raw_call_answer;
    use praefect::wire::proto::FindDefaultBranchNameRequest;
    use prost::Message;

    const PATH: &str = "/gitaly.RefService/FindDefaultBranchName";
    let db = TestDb::new().await;
    let a = GitNode::start("gitaly-1");
    seed_repository(&db, &[&a], "group/project.git").await;
    let dir = tempfile::tempdir().unwrap();
    let router = Router::start(&write_config(dir.path(), &db.connection(), &[&a]));
    let message = FindDefaultBranchNameRequest {
        repository: Some(virtual_repo("group/project.git")),
        head_only: false,
    }
    .encode_to_vec();
    let (status, plain) = raw_call_answer(router.channel(), PATH, &message, &[]).await;
    assert_eq!(status.code(), tonic::Code::Ok, "{status:?}");
    assert!(!plain.is_empty());
    // What the client sent: the message framed (5 bytes of header), before the rewrite.
    let length = (message.len() + 5).to_string();
    let headers = [
        ("content-length", length.as_str()),
        ("host", "router.example.com"),
    ];
    let (status, with_headers) = raw_call_answer(router.channel(), PATH, &message, &headers).await;
    assert_eq!(
        status.code(),
        tonic::Code::Ok,
        "content-length and host: {status:?}"
    );
    assert_eq!(with_headers, plain);
}
