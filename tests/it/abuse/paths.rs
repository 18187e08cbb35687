//! Relative paths outside the one accepted spelling (`..` escapes, absolute, NUL, non-UTF-8,
//! empty components, over-long) in the target repository, an additional repository, an
//! object pool, a fork source and a partitioning hint: InvalidArgument, no database row and
//! nothing sent to a node. Echo nodes record every call that reaches them.
// The test reads the database directly (not through PgBouncer).
#![allow(clippy::disallowed_methods)]

use crate::common;

use common::echo::{EchoLog, EchoNode};
use common::pg::TestDb;
use common::raw::raw_call;
use common::router::{start_router_on, NodeEntry, Router};
use praefect::wire::proto::{
    CreateForkRequest, CreateObjectPoolRequest, CreateRepositoryRequest,
    FindDefaultBranchNameRequest, ObjectPool, OptimizeRepositoryRequest, Repository,
};
use prost::Message;
use tonic::Code;

use super::rss_and_fds;

const CREATE: &str = "/gitaly.RepositoryService/CreateRepository";
const CREATE_FORK: &str = "/gitaly.RepositoryService/CreateFork";
const CREATE_POOL: &str = "/gitaly.ObjectPoolService/CreateObjectPool";
const FIND_DEFAULT_BRANCH: &str = "/gitaly.RefService/FindDefaultBranchName";
const OPTIMIZE: &str = "/gitaly.RepositoryService/OptimizeRepository";

fn repo(relative_path: &str) -> Option<Repository> {
    Some(Repository {
        storage_name: "default".into(),
        relative_path: relative_path.into(),
        ..Default::default()
    })
}

async fn rows(db: &TestDb) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM repositories")
        .fetch_one(&mut db.raw().await)
        .await
        .unwrap()
}

async fn start() -> (TestDb, EchoLog, Vec<EchoNode>, Router, tempfile::TempDir) {
    let db = TestDb::new().await;
    let log = EchoLog::default();
    let nodes = vec![
        EchoNode::start("gitaly-1", log.clone()).await,
        EchoNode::start("gitaly-2", log.clone()).await,
    ];
    let entries: Vec<NodeEntry> = nodes
        .iter()
        .map(|n| NodeEntry::new(&n.storage, &n.address))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    // Echo nodes never finish a replication: do not let the stop wait for one.
    let router = start_router_on(
        dir.path(),
        &db.connection(),
        None,
        &entries,
        "graceful_stop_timeout = \"2s\"",
    )
    .await;
    (db, log, nodes, router, dir)
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_relative_paths_are_refused_before_anything_is_recorded_or_sent() {
    let (db, log, _nodes, router, _dir) = start().await;
    let pid = router.child.id();
    // One client connection for the whole attack.
    let channel = router.channel();

    let long = format!("group/{}.git", "a/".repeat(3000));
    let long_component = format!("group/{}.git", "a".repeat(300));
    let bad: [(&str, &str); 10] = [
        ("../../x.git", "relative path escapes root directory"),
        ("group/../../x.git", "relative path escapes root directory"),
        ("group/..", "relative path escapes root directory"),
        ("/abs/x.git", "relative path is absolute"),
        ("group/a\0b.git", "relative path contains NUL"),
        (
            "group//x.git",
            "relative path has an empty or \".\" component",
        ),
        (
            "group/./x.git",
            "relative path has an empty or \".\" component",
        ),
        (
            "group/x.git/",
            "relative path has an empty or \".\" component",
        ),
        (&long, "relative path is too long: 6010 bytes, at most 4096"),
        (
            &long_component,
            "relative path has a component longer than 255 bytes",
        ),
    ];
    /// What, method, first message, metadata, expected message.
    type Case<'a> = (String, &'a str, Vec<u8>, Vec<(&'a str, &'a str)>, &'a str);
    let mut cases: Vec<Case> = Vec::new();
    for (path, why) in bad {
        let shown = format!("{:?}", path.chars().take(40).collect::<String>());
        cases.push((
            format!("create {shown}"),
            CREATE,
            CreateRepositoryRequest {
                repository: repo(path),
                ..Default::default()
            }
            .encode_to_vec(),
            vec![],
            why,
        ));
        cases.push((
            format!("pool {shown}"),
            CREATE_POOL,
            CreateObjectPoolRequest {
                object_pool: Some(ObjectPool {
                    repository: repo(path),
                }),
                origin: repo("group/origin.git"),
            }
            .encode_to_vec(),
            vec![],
            why,
        ));
        cases.push((
            format!("pool origin {shown}"),
            CREATE_POOL,
            CreateObjectPoolRequest {
                object_pool: Some(ObjectPool {
                    repository: repo("@pools/aa/bb/pool.git"),
                }),
                origin: repo(path),
            }
            .encode_to_vec(),
            vec![],
            why,
        ));
        cases.push((
            format!("fork source {shown}"),
            CREATE_FORK,
            CreateForkRequest {
                repository: repo("group/fork.git"),
                source_repository: repo(path),
                ..Default::default()
            }
            .encode_to_vec(),
            vec![],
            why,
        ));
        cases.push((
            format!("partitioning hint {shown}"),
            CREATE,
            CreateRepositoryRequest {
                repository: repo("group/hinted.git"),
                ..Default::default()
            }
            .encode_to_vec(),
            // Header values cannot hold NUL: that one is refused by the client library.
            vec![("gitaly-partitioning-hint", path)],
            why,
        ));
        cases.push((
            format!("read {shown}"),
            FIND_DEFAULT_BRANCH,
            FindDefaultBranchNameRequest {
                repository: repo(path),
                ..Default::default()
            }
            .encode_to_vec(),
            vec![],
            why,
        ));
        cases.push((
            format!("maintenance {shown}"),
            OPTIMIZE,
            OptimizeRepositoryRequest {
                repository: repo(path),
                ..Default::default()
            }
            .encode_to_vec(),
            vec![],
            why,
        ));
    }
    cases.retain(|(what, _, _, headers, _)| {
        !(what.starts_with("partitioning hint") && headers[0].1.contains('\0'))
    });
    // Not UTF-8: protobuf strings must be; the first-message reader refuses the repository.
    let mut not_utf8 = CreateRepositoryRequest {
        repository: repo("group/XX.git"),
        ..Default::default()
    }
    .encode_to_vec();
    let at = not_utf8.windows(2).position(|w| w == b"XX").unwrap();
    not_utf8[at..at + 2].copy_from_slice(&[0xff, 0xfe]);
    cases.push((
        "create, not UTF-8".into(),
        CREATE,
        not_utf8,
        vec![],
        "first request message: malformed protobuf message",
    ));

    let (rss_before, fds_before) = rss_and_fds(pid);
    let (mut rss_max, mut fds_max) = (rss_before, fds_before);
    for round in 0..5 {
        for (what, method, message, headers, why) in &cases {
            let status = raw_call(channel.clone(), method, message, headers).await;
            assert_eq!(
                (status.code(), status.message()),
                (Code::InvalidArgument, *why),
                "{what}"
            );
            assert!(log.is_empty(), "{what}: reached a node: {:?}", log.all());
        }
        assert_eq!(
            rows(&db).await,
            0,
            "round {round}: a repository was recorded"
        );
        let (rss, fds) = rss_and_fds(pid);
        rss_max = rss_max.max(rss);
        fds_max = fds_max.max(fds);
    }
    eprintln!(
        "paths: {} bad calls; router RSS {rss_before} -> max {rss_max} kB, fds {fds_before} -> max {fds_max}",
        cases.len() * 5
    );
    assert!(rss_max < rss_before + 64 * 1024, "RSS grew to {rss_max} kB");
    assert!(fds_max < fds_before + 64, "fds grew to {fds_max}");

    // The router still serves: a well-formed creation is recorded and reaches a node.
    let status = raw_call(
        channel,
        CREATE,
        &CreateRepositoryRequest {
            repository: repo("group/fine.git"),
            ..Default::default()
        }
        .encode_to_vec(),
        &[],
    )
    .await;
    assert_eq!(status.code(), Code::Ok, "{status:?}");
    assert_eq!(rows(&db).await, 1);
    assert!(!log.is_empty());
}

/// Item 6 of the hardening issue: statuses a client gets never name a path or an address on
/// a node. A replica whose HEAD is garbage makes git (on the node) fail with the replica's
/// absolute path in its message; the router passes the node's code on with the path replaced,
/// and logs the original with the correlation id. A node that is down is named by storage,
/// never by address.
#[tokio::test(flavor = "multi_thread")]
async fn node_errors_reach_clients_without_paths_or_addresses() {
    use common::cluster::{create, replica_path, start_router};
    use common::gitnode::GitNode;
    use praefect::wire::proto::repository_service_client::RepositoryServiceClient;
    use praefect::wire::proto::CalculateChecksumRequest;

    let db = TestDb::new().await;
    let mut node = GitNode::start("gitaly-1");
    let dir = tempfile::tempdir().unwrap();
    let router = start_router(&db, dir.path(), &[&node], "").await;
    let pid = router.child.id();
    create(&router, "group/broken.git").await;
    let replica = replica_path(&db, "group/broken.git").await;
    std::fs::write(node.root.join(&replica).join("HEAD"), "garbage\n").unwrap();
    let root = node.root.display().to_string();

    // Directly, the node names its path: the test has something to remove.
    let direct = RepositoryServiceClient::new(node.channel())
        .calculate_checksum(CalculateChecksumRequest {
            repository: Some(node.repository(&replica)),
        })
        .await
        .unwrap_err();
    assert!(direct.message().contains(&root), "{direct:?}");

    let (rss_before, fds_before) = rss_and_fds(pid);
    let mut client = RepositoryServiceClient::new(router.channel());
    let correlation = "abuse-paths-node-error";
    for _ in 0..20 {
        let mut request = tonic::Request::new(CalculateChecksumRequest {
            repository: repo("group/broken.git"),
        });
        request
            .metadata_mut()
            .insert("x-gitlab-correlation-id", correlation.parse().unwrap());
        let err = client.calculate_checksum(request).await.unwrap_err();
        assert_eq!(err.code(), direct.code(), "{err:?}");
        assert!(!err.message().contains(&root), "{err:?}");
        assert!(err.message().contains("<path>"), "{err:?}");
        assert_eq!(
            err.message(),
            direct
                .message()
                .replace(&format!("{}/{replica}", root), "<path>"),
        );
    }
    let (rss, fds) = rss_and_fds(pid);
    eprintln!("node errors: router RSS {rss_before} -> {rss} kB, fds {fds_before} -> {fds}");
    let logged = router.log_lines("node error message had paths or addresses removed");
    assert!(!logged.is_empty());
    assert_eq!(logged[0]["correlation_id"], correlation, "{}", logged[0]);
    assert!(logged[0]["node_message"].as_str().unwrap().contains(&root));

    // A node that is down: the status names the storage, not the address.
    let address = node.address.trim_start_matches("tcp://").to_string();
    node.kill();
    for _ in 0..3 {
        let err = client
            .calculate_checksum(CalculateChecksumRequest {
                repository: repo("group/broken.git"),
            })
            .await
            .unwrap_err();
        assert!(!err.message().contains(&address), "{err:?}");
        assert!(!err.message().contains("127.0.0.1"), "{err:?}");
    }
    // The router still answers what it can answer alone.
    let exists = client
        .repository_exists(praefect::wire::proto::RepositoryExistsRequest {
            repository: repo("group/broken.git"),
        })
        .await
        .unwrap()
        .into_inner()
        .exists;
    assert!(exists);
}
