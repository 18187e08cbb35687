//! Several routers on one database in front of real gitnodes, as operators run them behind a
//! load balancer: writes through one router are read back through another (and replicated by
//! the routers' replicators), a dead primary is replaced, health is decided
//! by a quorum of routers, maintenance reaches every replica, and routers stop gracefully.
// Tests read and write the database directly (not through PgBouncer), so the
// datastore's rule about unnamed statements (clippy.toml) does not apply here.
#![allow(clippy::disallowed_methods)]

use crate::common;

use std::time::Duration;

use common::gitnode::{as_refs, git, GitNode};
use common::pg::TestDb;
use common::router::{
    free_port, router_git_env, sample, seed_repository, virtual_repo, wait_for_health_round,
    write_config_on, write_config_with, NodeEntry, Router,
};
use common::wait::wait_until;
use praefect::wire::proto::ref_service_client::RefServiceClient;
use praefect::wire::proto::repository_service_client::RepositoryServiceClient;
use praefect::wire::proto::*;
use tonic::Code;

/// Starts a router in a blocking thread (startup reads its log synchronously).
async fn start_router(config: std::path::PathBuf) -> Router {
    tokio::task::spawn_blocking(move || Router::start(&config))
        .await
        .unwrap()
}

async fn scrape(router: &Router) -> String {
    let address = router.metrics_address.clone();
    tokio::task::spawn_blocking(move || {
        common::router::scrape_metrics(address.as_deref().expect("metrics configured"))
    })
    .await
    .unwrap()
}

fn read_count(scrape: &str, storage: &str) -> f64 {
    sample(
        scrape,
        "gitaly_praefect_read_distribution",
        &[("virtual_storage", "default"), ("storage", storage)],
    )
}

async fn primary_of(db: &TestDb, relative_path: &str) -> String {
    let mut raw = db.raw().await;
    sqlx::query_scalar("SELECT \"primary\" FROM repositories WHERE relative_path = $1")
        .bind(relative_path)
        .fetch_one(&mut raw)
        .await
        .unwrap()
}

fn find_default_branch(path: &str) -> FindDefaultBranchNameRequest {
    FindDefaultBranchNameRequest {
        repository: Some(virtual_repo(path)),
        head_only: false,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_routers_serve_one_cluster() {
    let db = TestDb::new().await;
    let mut nodes = vec![
        GitNode::start("gitaly-1"),
        GitNode::start("gitaly-2"),
        GitNode::start("gitaly-3"),
    ];
    let entries: Vec<NodeEntry> = nodes.iter().map(NodeEntry::from).collect();
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let router_a = start_router(write_config_on(
        dir_a.path(),
        &db.connection(),
        &entries,
        &format!("127.0.0.1:{}", free_port()),
        "",
    ))
    .await;
    let router_b = start_router(write_config_on(
        dir_b.path(),
        &db.connection(),
        &entries,
        &format!("127.0.0.1:{}", free_port()),
        "prometheus_listen_addr = \"127.0.0.1:0\"",
    ))
    .await;
    let path = "group/shared.git";

    // Create through router A, push a real history through A.
    RepositoryServiceClient::new(router_a.channel())
        .create_repository(CreateRepositoryRequest {
            repository: Some(virtual_repo(path)),
            default_branch: b"main".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
    let work = tempfile::tempdir().unwrap();
    git(
        work.path(),
        &["init", "--quiet", "--initial-branch=main", "."],
        &[],
    );
    for (i, name) in ["one", "two", "three"].iter().enumerate() {
        std::fs::write(
            work.path().join(name),
            common::gitnode::noise(i as u64, 200_000),
        )
        .unwrap();
        git(work.path(), &["add", "."], &[]);
        git(work.path(), &["commit", "--quiet", "-m", name], &[]);
    }
    git(work.path(), &["branch", "feature", "HEAD~1"], &[]);
    git(work.path(), &["tag", "v1", "HEAD~2"], &[]);
    let env_a = router_git_env(&router_a, path);
    git(
        work.path(),
        &["push", "--quiet", "ssh://gitaly/x", "main", "feature", "v1"],
        &as_refs(&env_a),
    );

    // Clone it back through router B: every ref and object arrives.
    let env_b = router_git_env(&router_b, path);
    let clone = tempfile::tempdir().unwrap();
    git(
        clone.path(),
        &["clone", "--quiet", "--mirror", "ssh://gitaly/x", "."],
        &as_refs(&env_b),
    );
    let refs = |dir: &std::path::Path| {
        git(
            dir,
            &["for-each-ref", "--format=%(objectname) %(refname)"],
            &[],
        )
    };
    assert_eq!(refs(clone.path()), refs(work.path()));
    git(clone.path(), &["fsck", "--strict"], &[]);

    // The replicators bring the secondaries up to date; then router B spreads reads over
    // all three. (That reads never reach an outdated replica is tests/router.rs's business.)
    let primary = primary_of(&db, path).await;
    wait_until(
        Duration::from_secs(30),
        "every replica holds the push",
        || async {
            let mut raw = db.raw().await;
            let behind: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM repositories AS repo
             JOIN storage_repositories AS replica USING (repository_id)
             WHERE repo.relative_path = $1 AND replica.generation = repo.generation",
            )
            .bind(path)
            .fetch_one(&mut raw)
            .await
            .unwrap();
            behind == 3
        },
    )
    .await;
    let mut refs_b = RefServiceClient::new(router_b.channel());
    let before = scrape(&router_b).await;
    for _ in 0..60 {
        let name = refs_b
            .find_default_branch_name(find_default_branch(path))
            .await
            .unwrap()
            .into_inner()
            .name;
        assert_eq!(name, b"refs/heads/main");
    }
    let after = scrape(&router_b).await;
    let mut total = 0.0;
    for node in &nodes {
        let served = read_count(&after, &node.storage) - read_count(&before, &node.storage);
        assert!(served > 0.0, "no read reached {}", node.storage);
        total += served;
    }
    assert_eq!(total, 60.0);

    // ServerInfo shows the virtual storage; DiskStatistics every physical one.
    let mut server =
        praefect::wire::proto::server_service_client::ServerServiceClient::new(router_a.channel());
    let info = server
        .server_info(ServerInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.storage_statuses.len(), 1, "{info:?}");
    let status = &info.storage_statuses[0];
    assert_eq!(status.storage_name, "default");
    assert_eq!(status.replication_factor, 3);
    assert_eq!(
        status.filesystem_id,
        uuid::Uuid::new_v5(
            &uuid::uuid!("1ef1a8c6-cf52-4d0a-92a6-ca643e8bc7c5"),
            b"default"
        )
        .to_string()
    );
    assert!(status.readable && status.writeable, "{status:?}");
    assert!(!info.server_version.is_empty());
    let disks = server
        .disk_statistics(DiskStatisticsRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut names: Vec<&str> = disks
        .storage_statuses
        .iter()
        .map(|s| s.storage_name.as_str())
        .collect();
    names.sort();
    assert_eq!(names, ["gitaly-1", "gitaly-2", "gitaly-3"]);

    // A client with a wrong token is refused by the router.
    let wrong = tonic::service::interceptor::InterceptedService::new(
        praefect::wire::backchannel::dial_lazy(
            &router_b.address,
            praefect::wire::backchannel::yamux_config(0, 256),
            Default::default(),
        )
        .unwrap(),
        praefect::wire::auth::TokenInterceptor::new("not-the-router-token"),
    );
    let err = RefServiceClient::new(wrong)
        .find_default_branch_name(find_default_branch(path))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // The primary's node dies: reads carry on from the other replicas through router B, and
    // a write through router A goes to a newly elected primary.
    let primary_node = nodes
        .iter_mut()
        .find(|n| n.storage == primary)
        .expect("the primary is one of the nodes");
    primary_node.kill();
    wait_for_health_round(&db, &primary, false).await;
    for _ in 0..10 {
        refs_b
            .find_default_branch_name(find_default_branch(path))
            .await
            .unwrap();
    }
    wait_until(
        Duration::from_secs(15),
        "a write succeeds after the primary died",
        async || {
            let written = RepositoryServiceClient::new(router_a.channel())
                .write_ref(WriteRefRequest {
                    repository: Some(virtual_repo(path)),
                    r#ref: b"refs/heads/copy".to_vec(),
                    revision: b"refs/heads/main".to_vec(),
                    old_revision: vec![],
                })
                .await;
            if let Err(err) = &written {
                // Until the quorum forgets the dead primary (10 s), it stays elected.
                assert_eq!(err.message(), "primary gitaly is not healthy");
            }
            written
        },
    )
    .await;
    assert_ne!(primary_of(&db, path).await, primary);
}

#[tokio::test(flavor = "multi_thread")]
async fn health_quorum_across_routers_decides_the_primary() {
    let db = TestDb::new().await;
    let g1 = GitNode::start("gitaly-1");
    let g2 = GitNode::start("gitaly-2");
    let g3 = GitNode::start("gitaly-3");
    let path = "group/quorum.git";
    seed_repository(&db, &[&g3, &g1, &g2], path).await;
    let good: Vec<NodeEntry> = [&g1, &g2, &g3].into_iter().map(NodeEntry::from).collect();
    // Router C cannot reach gitaly-3 (a port nothing listens on): it sees it unhealthy.
    let mut blind = vec![NodeEntry::from(&g1), NodeEntry::from(&g2)];
    blind.push(NodeEntry::new(
        "gitaly-3",
        &format!("tcp://127.0.0.1:{}", free_port()),
    ));
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let config = |i: usize, nodes: &[NodeEntry]| {
        write_config_on(
            dirs[i].path(),
            &db.connection(),
            nodes,
            &format!("127.0.0.1:{}", free_port()),
            "",
        )
    };
    let router_a = start_router(config(0, &good)).await;
    let mut router_b = start_router(config(1, &good)).await;
    let router_c = start_router(config(2, &blind)).await;
    let store = db.datastore().await;
    let healthy_by_quorum = |storage: &'static str| {
        let store = store.clone();
        async move {
            store
                .healthy_storages()
                .await
                .unwrap()
                .iter()
                .any(|h| h.virtual_storage == "default" && h.storage == storage)
        }
    };
    // Two of three routers see gitaly-3: healthy by quorum, and it stays the primary.
    wait_until(
        Duration::from_secs(30),
        "gitaly-3 is healthy by quorum",
        || healthy_by_quorum("gitaly-3"),
    )
    .await;
    let write = |name: &str| WriteRefRequest {
        repository: Some(virtual_repo(path)),
        r#ref: format!("refs/heads/{name}").into_bytes(),
        revision: b"refs/heads/main".to_vec(),
        old_revision: vec![],
    };
    // Router C's own view decides whether it can use the primary: it cannot.
    let err = RepositoryServiceClient::new(router_c.channel())
        .write_ref(write("from-c"))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::Internal, "primary gitaly is not healthy")
    );
    assert_eq!(primary_of(&db, path).await, "gitaly-3");

    // Router B stops: its observations expire, one router of three (still active) sees
    // gitaly-3, below the quorum. The next write through A elects another up-to-date replica.
    router_b.stop();
    wait_until(
        Duration::from_secs(30),
        "gitaly-3 drops out of the quorum",
        || async { !healthy_by_quorum("gitaly-3").await },
    )
    .await;
    RepositoryServiceClient::new(router_a.channel())
        .write_ref(write("from-a"))
        .await
        .unwrap();
    let primary = primary_of(&db, path).await;
    assert!(
        primary == "gitaly-1" || primary == "gitaly-2",
        "a replica healthy by quorum is elected, not {primary}"
    );
    // The write went to the new primary.
    let exists = RefServiceClient::new(router_a.channel())
        .ref_exists(RefExistsRequest {
            repository: Some(virtual_repo(path)),
            r#ref: b"refs/heads/from-a".to_vec(),
        })
        .await
        .unwrap()
        .into_inner()
        .value;
    assert!(exists);
}

/// Loose objects of a replica on a node's disk.
fn loose_objects(node: &GitNode, replica_path: &str) -> usize {
    let objects = node.root.join(replica_path).join("objects");
    std::fs::read_dir(&objects)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().len() == 2 && e.path().is_dir())
        .map(|e| std::fs::read_dir(e.path()).unwrap().count())
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn maintenance_reaches_every_replica_and_size_reads_the_primary() {
    let db = TestDb::new().await;
    let a = GitNode::start("gitaly-1");
    let mut b = GitNode::start("gitaly-2");
    let path = "group/maintained.git";
    let id = seed_repository(&db, &[&a, &b], path).await;
    let replica = praefect::routing::replica_path(id);
    let dir = tempfile::tempdir().unwrap();
    let entries = [NodeEntry::from(&a), NodeEntry::from(&b)];
    let router = start_router(write_config_with(
        dir.path(),
        &db.connection(),
        &entries,
        "prometheus_listen_addr = \"127.0.0.1:0\"",
    ))
    .await;
    let mut repos = RepositoryServiceClient::new(router.channel());

    // The pushes left loose objects on both replicas; OptimizeRepository packs both.
    assert!(loose_objects(&a, &replica) > 0 && loose_objects(&b, &replica) > 0);
    repos
        .optimize_repository(OptimizeRepositoryRequest {
            repository: Some(virtual_repo(path)),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        (loose_objects(&a, &replica), loose_objects(&b, &replica)),
        (0, 0)
    );
    // Maintenance changes no generation.
    let generations: Vec<i64> =
        sqlx::query_scalar("SELECT generation FROM storage_repositories ORDER BY storage")
            .fetch_all(&mut db.raw().await)
            .await
            .unwrap();
    assert_eq!(generations, [0, 0]);

    // Sizes come from the primary (gitaly-1); so does anything asked for "primary-only".
    let before = scrape(&router).await;
    for _ in 0..10 {
        repos
            .repository_size(RepositorySizeRequest {
                repository: Some(virtual_repo(path)),
            })
            .await
            .unwrap();
    }
    let mut refs = RefServiceClient::new(router.channel());
    for _ in 0..10 {
        let mut request = tonic::Request::new(find_default_branch(path));
        request.metadata_mut().insert(
            "gitaly-route-repository-accessor-policy",
            "primary-only".parse().unwrap(),
        );
        refs.find_default_branch_name(request).await.unwrap();
    }
    let middle = scrape(&router).await;
    assert_eq!(
        read_count(&middle, "gitaly-1") - read_count(&before, "gitaly-1"),
        20.0
    );
    assert_eq!(
        read_count(&middle, "gitaly-2") - read_count(&before, "gitaly-2"),
        0.0
    );
    // Other reads spread over both up-to-date replicas.
    for _ in 0..40 {
        refs.find_default_branch_name(find_default_branch(path))
            .await
            .unwrap();
    }
    let after = scrape(&router).await;
    for storage in ["gitaly-1", "gitaly-2"] {
        assert!(
            read_count(&after, storage) > read_count(&middle, storage),
            "no plain read reached {storage}"
        );
    }
    assert!(
        sample(
            &after,
            "gitaly_praefect_method_types",
            &[("method_type", "maintenance")]
        ) >= 1.0
    );

    // One replica down: maintenance goes to the healthy one and succeeds.
    b.kill();
    wait_for_health_round(&db, &b.storage, false).await;
    repos
        .prune_unreachable_objects(PruneUnreachableObjectsRequest {
            repository: Some(virtual_repo(path)),
        })
        .await
        .unwrap();
    // A node's error is returned (an untracked repository never reaches one).
    let err = repos
        .optimize_repository(OptimizeRepositoryRequest {
            repository: Some(virtual_repo("untracked.git")),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread")]
async fn graceful_stop_lets_calls_finish_then_cuts_them() {
    use praefect::wire::proto::ssh_service_client::SshServiceClient;

    let db = TestDb::new().await;
    let node = GitNode::start("gitaly-1");
    let path = "group/stopping.git";
    seed_repository(&db, &[&node], path).await;
    let entries = [NodeEntry::from(&node)];

    // Opens a push (SSHReceivePack) through the router and reads the ref advertisement: the
    // call is in flight and waits for the client's commands.
    async fn open_push(
        router: &Router,
        path: &str,
    ) -> (
        tokio::sync::mpsc::Sender<SshReceivePackRequest>,
        tonic::Streaming<SshReceivePackResponse>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(SshReceivePackRequest {
            repository: Some(virtual_repo(path)),
            gl_id: "user-1".into(),
            gl_repository: "project-1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let mut responses = SshServiceClient::new(router.channel())
            .ssh_receive_pack(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let advertisement = responses.message().await.unwrap().unwrap();
        assert!(!advertisement.stdout.is_empty());
        (tx, responses)
    }

    // A call in flight when SIGTERM arrives finishes normally; then the router exits.
    let dir = tempfile::tempdir().unwrap();
    let mut router = start_router(write_config_with(
        dir.path(),
        &db.connection(),
        &entries,
        "graceful_stop_timeout = \"20s\"",
    ))
    .await;
    let (tx, mut responses) = open_push(&router, path).await;
    router.terminate();
    wait_until(
        Duration::from_secs(10),
        "the router logs its SIGTERM",
        async || !router.log_lines("shutting down").is_empty(),
    )
    .await;
    // Kept: what is checked is an absence (the router has not exited), which takes time to
    // observe; a router that did not wait for the call would exit within milliseconds.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        router.child.try_wait().unwrap().is_none(),
        "the router waits for the call in flight"
    );
    tx.send(SshReceivePackRequest {
        stdin: b"0000".to_vec(),
        ..Default::default()
    })
    .await
    .unwrap();
    drop(tx);
    let mut exit_code = None;
    while let Some(message) = responses
        .message()
        .await
        .unwrap_or_else(|e| panic!("the push in flight during the graceful stop failed: {e:?}"))
    {
        if let Some(status) = message.exit_status {
            exit_code = Some(status.value);
        }
    }
    assert_eq!(exit_code, Some(0));
    let status = tokio::task::spawn_blocking(move || {
        let status = router.wait_exited(
            Duration::from_secs(15),
            "the router exits once its calls finished",
        );
        (status, router)
    })
    .await
    .unwrap()
    .0;
    assert!(status.success(), "{status:?}");

    // A call still running at the graceful stop timeout is cut, and the router exits.
    let dir = tempfile::tempdir().unwrap();
    let mut router = start_router(write_config_with(
        dir.path(),
        &db.connection(),
        &entries,
        "graceful_stop_timeout = \"1s\"",
    ))
    .await;
    let (_tx, mut responses) = open_push(&router, path).await;
    router.terminate();
    let _router = tokio::task::spawn_blocking(move || {
        router.wait_exited(
            Duration::from_secs(15),
            "the router exits after the graceful stop timeout",
        );
        router
    })
    .await
    .unwrap();
    let outcome = loop {
        match responses.message().await {
            Ok(Some(_)) => continue,
            other => break other,
        }
    };
    assert!(
        outcome.is_err(),
        "the cut call ends in an error: {outcome:?}"
    );
}
