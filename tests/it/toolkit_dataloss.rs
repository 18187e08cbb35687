//! The lost-primary tooling as an operator uses it, against a real cluster (PostgreSQL, three
//! gitnodes, a router): `dataloss` finds a repository whose only up-to-date replica is gone,
//! `accept-dataloss` makes a secondary authoritative, writes resume and the reconciler
//! overwrites the other replicas; `metadata` and `list-storages` print what they know; and
//! every failure an operator can cause ends with a clear message and the right exit code.
// Tests read the database directly (not through PgBouncer), so the datastore's rule about
// unnamed statements (clippy.toml) does not apply here.
#![allow(clippy::disallowed_methods)]

use crate::common;

use std::time::Duration;

use common::cluster::{
    checksum, converged, create, generations, primary_of, replica_path, start_router,
};
use common::gitnode::{git, GitNode};
use common::pg::TestDb;
use common::router::{
    commit_and_push, praefect_cli, router_git_env, virtual_repo, wait_for_health_round, work_tree,
};
use common::wait::wait_until;
use praefect::wire::proto::praefect_info_service_client::PraefectInfoServiceClient;
use praefect::wire::proto::RepositoryReplicasRequest;

/// The reconciler every second (it repairs the replicas after accept-dataloss), and no
/// background verification (it would make `Verified At` depend on timing).
const EXTRA: &str = "[reconciliation]\nscheduling_interval = \"1s\"\n[background_verification]\nverification_interval = \"0s\"\n";

fn three_nodes() -> [GitNode; 3] {
    [
        GitNode::start("gitaly-1"),
        GitNode::start("gitaly-2"),
        GitNode::start("gitaly-3"),
    ]
}

/// Runs `praefect` with `args` and expects success; its stdout.
async fn ok(dir: &std::path::Path, args: &[&str]) -> String {
    let (code, stdout, stderr) = praefect_cli(dir, args).await;
    assert_eq!(code, 0, "{args:?}: {stderr}");
    assert_eq!(stderr, "", "{args:?}");
    stdout
}

/// Waits until the quorum view (`healthy_storages`) agrees on `storage`'s health: it lags the
/// router's own view by up to its 10 s window.
async fn wait_quorum_health(db: &TestDb, storage: &str, healthy: bool) {
    let mut conn = db.raw().await;
    wait_until(
        Duration::from_secs(30),
        &format!("healthy_storages says {storage} healthy={healthy}"),
        async || {
            let listed: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM healthy_storages WHERE storage = $1)",
            )
            .bind(storage)
            .fetch_one(&mut conn)
            .await
            .unwrap();
            listed == healthy
        },
    )
    .await;
}

fn metadata_replica(
    storage: &str,
    assigned: bool,
    generation: &str,
    healthy: bool,
    valid: bool,
) -> String {
    format!(
        "- Storage: \"{storage}\"\n  Assigned: {assigned}\n  Generation: {generation}\n  Healthy: {healthy}\n  Valid Primary: {valid}\n  Verified At: unverified\n"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_primary_is_found_accepted_and_repaired() {
    let db = TestDb::new().await;
    let mut nodes = three_nodes();
    let dir = tempfile::tempdir().unwrap();
    let refs: Vec<&GitNode> = nodes.iter().collect();
    let router = start_router(&db, dir.path(), &refs, EXTRA).await;
    let dir = dir.path();
    let path = "group/lost-primary.git";
    create(&router, path).await;
    let replica = replica_path(&db, path).await;
    let id: i64 =
        sqlx::query_scalar("SELECT repository_id FROM repositories WHERE relative_path = $1")
            .bind(path)
            .fetch_one(&mut db.raw().await)
            .await
            .unwrap();
    let primary = primary_of(&db, path).await;
    let mut secondaries: Vec<String> = ["gitaly-1", "gitaly-2", "gitaly-3"]
        .into_iter()
        .filter(|s| *s != primary)
        .map(String::from)
        .collect();
    secondaries.sort();
    let (first, second) = (secondaries[0].clone(), secondaries[1].clone());

    // A healthy cluster has nothing to report.
    assert_eq!(
        ok(dir, &["dataloss"]).await,
        "Virtual storage: default\n  All repositories are available!\n"
    );
    assert_eq!(
        ok(dir, &["dataloss", "-partially-unavailable"]).await,
        "Virtual storage: default\n  All repositories are fully available on all assigned storages!\n"
    );

    // Both secondaries go down; a push is acknowledged by the primary alone.
    for name in [&first, &second] {
        nodes
            .iter_mut()
            .find(|n| n.storage == *name)
            .unwrap()
            .kill();
        wait_for_health_round(&db, name, false).await;
    }
    let work = work_tree(&["a"], 1000);
    commit_and_push(work.path(), &router, path, "only-on-the-primary");
    let (latest, replicas) = generations(&db, path).await;
    assert_eq!(latest, 1);
    assert_eq!(
        replicas,
        vec![
            (
                "gitaly-1".to_string(),
                if primary == "gitaly-1" { 1 } else { 0 }
            ),
            (
                "gitaly-2".to_string(),
                if primary == "gitaly-2" { 1 } else { 0 }
            ),
            (
                "gitaly-3".to_string(),
                if primary == "gitaly-3" { 1 } else { 0 }
            ),
        ]
    );

    // The primary dies before anything replicated; the secondaries come back.
    nodes
        .iter_mut()
        .find(|n| n.storage == primary)
        .unwrap()
        .kill();
    for name in [&first, &second] {
        nodes
            .iter_mut()
            .find(|n| n.storage == *name)
            .unwrap()
            .restart();
        wait_for_health_round(&db, name, true).await;
        wait_quorum_health(&db, name, true).await;
    }
    wait_for_health_round(&db, &primary, false).await;
    wait_quorum_health(&db, &primary, false).await;

    let lost = format!(
        "Virtual storage: default
  Repositories:
    {path} (unavailable):
      Primary: {primary}
      In-Sync Storages:
        {primary}, assigned host, unhealthy
      Outdated Storages:
        {first} is behind by 1 change or less, assigned host
        {second} is behind by 1 change or less, assigned host
"
    );
    let dataloss = ok(dir, &["dataloss"]).await;
    eprintln!("dataloss while the primary is lost:\n{dataloss}");
    assert_eq!(dataloss, lost);
    assert_eq!(
        ok(
            dir,
            &[
                "dataloss",
                "-virtual-storage",
                "default",
                "--partially-unavailable=true"
            ]
        )
        .await,
        lost
    );

    let mut replicas_text = String::new();
    for storage in ["gitaly-1", "gitaly-2", "gitaly-3"] {
        let (generation, healthy) = if storage == primary {
            ("1, fully up to date", false)
        } else {
            ("0, behind by 1 changes", true)
        };
        replicas_text.push_str(&metadata_replica(storage, true, generation, healthy, false));
    }
    let header = |primary: &str, generation: i64| {
        format!(
            "Repository ID: {id}\nVirtual Storage: \"default\"\nRelative Path: \"{path}\"\nReplica Path: \"{replica}\"\nPrimary: \"{primary}\"\nGeneration: {generation}\nReplicas:\n"
        )
    };
    let by_path = ok(
        dir,
        &[
            "metadata",
            "-virtual-storage",
            "default",
            "-relative-path",
            path,
        ],
    )
    .await;
    eprintln!("metadata while the primary is lost:\n{by_path}");
    assert_eq!(by_path, format!("{}{replicas_text}", header(&primary, 1)));
    assert_eq!(
        ok(dir, &["metadata", "-repository-id", &id.to_string()]).await,
        by_path
    );

    // Writes fail: no replica may be the primary.
    let env = router_git_env(&router, path);
    std::fs::write(work.path().join("refused"), "refused").unwrap();
    git(work.path(), &["add", "."], &[]);
    git(work.path(), &["commit", "--quiet", "-m", "refused"], &[]);
    let refused = std::process::Command::new("git")
        .args(["push", "--quiet", "ssh://gitaly/x", "main"])
        .current_dir(work.path())
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(
        !refused.success(),
        "a push without a valid primary succeeded"
    );

    // The operator accepts the loss onto the first secondary.
    assert_eq!(
        ok(
            dir,
            &[
                "accept-dataloss",
                "-virtual-storage",
                "default",
                "-relative-path",
                path,
                "-authoritative-storage",
                &first,
            ],
        )
        .await,
        ""
    );
    assert_eq!(
        ok(dir, &["dataloss"]).await,
        "Virtual storage: default\n  All repositories are available!\n"
    );

    // Writes resume through the router, on the new primary.
    wait_until(
        Duration::from_secs(20),
        "a push succeeds after accept-dataloss",
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
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            pushed
        },
    )
    .await;
    assert_eq!(primary_of(&db, path).await, first);
    let survivors = [first.as_str(), second.as_str()];
    wait_until(
        Duration::from_secs(40),
        "the reconciler repaired the other secondary",
        || converged(&db, path, &survivors),
    )
    .await;

    let mut replicas_text = String::new();
    for storage in ["gitaly-1", "gitaly-2", "gitaly-3"] {
        replicas_text.push_str(&if storage == primary {
            metadata_replica(storage, true, "1, behind by 2 changes", false, false)
        } else {
            metadata_replica(storage, true, "3, fully up to date", true, true)
        });
    }
    let after = ok(
        dir,
        &[
            "metadata",
            "-virtual-storage",
            "default",
            "-relative-path",
            path,
        ],
    )
    .await;
    eprintln!("metadata after accept-dataloss and a write:\n{after}");
    assert_eq!(after, format!("{}{replicas_text}", header(&first, 3)));
    assert_eq!(
        ok(dir, &["dataloss", "-partially-unavailable"]).await,
        format!(
            "Virtual storage: default
  Repositories:
    {path}:
      Primary: {first}
      In-Sync Storages:
        {first}, assigned host
        {second}, assigned host
      Outdated Storages:
        {primary} is behind by 2 changes or less, assigned host, unhealthy
"
        )
    );

    // The old primary returns and is overwritten from the authoritative replica.
    nodes
        .iter_mut()
        .find(|n| n.storage == primary)
        .unwrap()
        .restart();
    wait_until(
        Duration::from_secs(40),
        "the old primary was repaired",
        || converged(&db, path, &["gitaly-1", "gitaly-2", "gitaly-3"]),
    )
    .await;
    wait_quorum_health(&db, &primary, true).await;
    assert_eq!(
        ok(dir, &["dataloss", "-partially-unavailable"]).await,
        "Virtual storage: default\n  All repositories are fully available on all assigned storages!\n"
    );
    let pushed = git(work.path(), &["rev-parse", "main"], &[]);
    for node in &nodes {
        assert_eq!(
            git(&node.root.join(&replica), &["rev-parse", "main"], &[]),
            pushed
        );
    }

    // RepositoryReplicas: the new primary's checksum and the others', all equal now.
    let answer = PraefectInfoServiceClient::new(router.channel())
        .repository_replicas(RepositoryReplicasRequest {
            repository: Some(virtual_repo(path)),
        })
        .await
        .unwrap()
        .into_inner();
    let sum = checksum(nodes.iter().find(|n| n.storage == first).unwrap(), &replica).await;
    let primary_details = answer.primary.unwrap();
    assert_eq!(
        primary_details.repository.as_ref().unwrap().storage_name,
        first
    );
    assert_eq!(
        primary_details.repository.as_ref().unwrap().relative_path,
        path
    );
    assert_eq!(primary_details.checksum, sum);
    let mut others: Vec<(String, String)> = answer
        .replicas
        .into_iter()
        .map(|d| (d.repository.unwrap().storage_name, d.checksum))
        .collect();
    others.sort();
    let mut expected = vec![
        (second.clone(), sum.clone()),
        (primary.clone(), sum.clone()),
    ];
    expected.sort();
    assert_eq!(others, expected);
}

#[tokio::test(flavor = "multi_thread")]
async fn operator_mistakes_and_an_unreachable_router() {
    let db = TestDb::new().await;
    let nodes = three_nodes();
    let dir = tempfile::tempdir().unwrap();
    let refs: Vec<&GitNode> = nodes.iter().collect();
    let mut router = start_router(&db, dir.path(), &refs, EXTRA).await;
    let dir = dir.path();
    create(&router, "group/known.git").await;

    let table = format!(
        "VIRTUAL_STORAGE   NODE       ADDRESS\ndefault           gitaly-1   {}\ndefault           gitaly-2   {}\ndefault           gitaly-3   {}\n",
        nodes[0].address, nodes[1].address, nodes[2].address
    );
    assert_eq!(ok(dir, &["list-storages"]).await, table);
    assert_eq!(
        ok(dir, &["list-storages", "-virtual-storage", "default"]).await,
        table
    );
    assert_eq!(
        ok(dir, &["list-storages", "-virtual-storage", "nope"]).await,
        "No virtual storages named nope.\n"
    );

    let refused: [(&[&str], &str); 8] = [
        (
            &["metadata", "-repository-id", "999"],
            "praefect metadata: get metadata: repository not found\n",
        ),
        (
            &["metadata", "-virtual-storage", "default", "-relative-path", "nope.git"],
            "praefect metadata: get metadata: repository not found\n",
        ),
        (
            &["metadata", "-virtual-storage", "nope", "-relative-path", "group/known.git"],
            "praefect metadata: get metadata: repository not found\n",
        ),
        (
            &["accept-dataloss", "-virtual-storage", "default", "-relative-path", "nope.git", "-authoritative-storage", "gitaly-1"],
            "praefect accept-dataloss: set authoritative storage: repository \"nope.git\" does not exist on virtual storage \"default\"\n",
        ),
        (
            &["accept-dataloss", "-virtual-storage", "default", "-relative-path", "group/known.git", "-authoritative-storage", "gitaly-9"],
            "praefect accept-dataloss: set authoritative storage: unknown storage \"gitaly-9\" in virtual storage \"default\"\n",
        ),
        (
            &["accept-dataloss", "-virtual-storage", "nope", "-relative-path", "group/known.git", "-authoritative-storage", "gitaly-1"],
            "praefect accept-dataloss: set authoritative storage: unknown virtual storage \"nope\"\n",
        ),
        (
            &["dataloss", "-virtual-storage", "nope"],
            "praefect dataloss: unknown virtual storage \"nope\"\n",
        ),
        (
            &["dataloss", "-virtual-storage", "nope", "-partially-unavailable"],
            "praefect dataloss: unknown virtual storage \"nope\"\n",
        ),
    ];
    for (args, message) in refused {
        let (code, stdout, stderr) = praefect_cli(dir, args).await;
        assert_eq!(
            (code, stdout.as_str(), stderr.as_str()),
            (1, "", message),
            "{args:?}"
        );
    }
    // A refused accept-dataloss changed nothing.
    let (generation, _) = generations(&db, "group/known.git").await;
    assert_eq!(generation, 0);

    let usage: [(&[&str], &str); 7] = [
        (
            &["metadata"],
            "<--repository-id <ID>|--virtual-storage <NAME>>",
        ),
        (
            &["metadata", "-virtual-storage", "default"],
            "--relative-path <PATH>",
        ),
        (
            &["metadata", "-repository-id", "x"],
            "invalid value 'x' for '--repository-id <ID>'",
        ),
        (
            &[
                "metadata",
                "-repository-id",
                "1",
                "-virtual-storage",
                "default",
                "-relative-path",
                "p",
            ],
            "cannot be used with",
        ),
        (
            &[
                "accept-dataloss",
                "-virtual-storage",
                "default",
                "-relative-path",
                "p",
            ],
            "--authoritative-storage <NAME>",
        ),
        (
            &["dataloss", "-partially-unavailable=maybe"],
            "invalid value 'maybe' for '--partially-unavailable [<BOOL>]'",
        ),
        (
            &["list-storages", "extra"],
            "unexpected argument 'extra' found",
        ),
    ];
    for (args, says) in usage {
        let (code, stdout, stderr) = praefect_cli(dir, args).await;
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert_eq!(stdout, "", "{args:?}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }

    // The router is gone: the subcommands that need it say where they tried; list-storages
    // reads only the configuration.
    let address = router.address.clone();
    tokio::task::spawn_blocking(move || {
        router.stop();
        router
    })
    .await
    .unwrap();
    for args in [
        &["dataloss"][..],
        &["metadata", "-repository-id", "1"],
        &[
            "accept-dataloss",
            "-virtual-storage",
            "default",
            "-relative-path",
            "p",
            "-authoritative-storage",
            "gitaly-1",
        ],
    ] {
        let (code, stdout, stderr) = praefect_cli(dir, args).await;
        assert_eq!(code, 1, "{args:?}: {stderr}");
        assert_eq!(stdout, "", "{args:?}");
        assert!(
            stderr.starts_with(&format!(
                "praefect {}: dialing praefect at {address}: ",
                args[0]
            )),
            "{args:?}: {stderr}"
        );
    }
    assert_eq!(ok(dir, &["list-storages"]).await, table);
}
