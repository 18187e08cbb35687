//! The operator's tracking toolkit as an operator runs it, against a real cluster (one
//! database, three gitnodes, a router): `track-repository`, `track-repositories` (with a
//! timed run over a thousand repositories), `remove-repository`,
//! `list-untracked-repositories`, and the repositories cleanup worker of `serve`.
// Tests read and write the database directly (not through PgBouncer), so the
// datastore's rule about unnamed statements (clippy.toml) does not apply here.
#![allow(clippy::disallowed_methods)]

use crate::common;

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use common::cluster::{checksum, converged, start_router};
use common::gitnode::{as_refs, git, ssh_env, GitNode};
use common::pg::TestDb;
use common::router::{praefect_cli, seed_repository};
use common::wait::wait_until;

const ALL: [&str; 3] = ["gitaly-1", "gitaly-2", "gitaly-3"];

fn start_nodes() -> [GitNode; 3] {
    ALL.map(GitNode::start)
}

/// A bare repository made by hand in a node's storage: what an operator copies in. Fast
/// enough for a thousand (no git process).
fn bare_repository(node: &GitNode, replica_path: &str) {
    let path = node.root.join(replica_path);
    for dir in ["objects/info", "objects/pack", "refs/heads", "refs/tags"] {
        std::fs::create_dir_all(path.join(dir)).unwrap();
    }
    std::fs::write(path.join("HEAD"), "ref: refs/heads/main\n").unwrap();
    std::fs::write(
        path.join("config"),
        "[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n\tbare = true\n",
    )
    .unwrap();
}

/// A repository with one commit on `main`, on `node` only, created through the node itself.
async fn repository_with_commit(node: &GitNode, replica_path: &str) {
    node.create_repository(replica_path).await;
    let work = tempfile::tempdir().unwrap();
    git(
        work.path(),
        &["init", "--quiet", "--initial-branch=main", "."],
        &[],
    );
    std::fs::write(work.path().join("README"), "adopted").unwrap();
    git(work.path(), &["add", "."], &[]);
    git(work.path(), &["commit", "--quiet", "-m", "first"], &[]);
    let env = ssh_env(&node.address, &node.storage, replica_path);
    git(
        work.path(),
        &["push", "--quiet", "ssh://gitaly/x", "main"],
        &as_refs(&env),
    );
}

/// Sets a directory's modification time `age` into the past.
fn age(path: &Path, age: Duration) {
    let dir = std::fs::File::open(path).unwrap();
    dir.set_modified(SystemTime::now() - age).unwrap();
}

async fn count(db: &TestDb, sql: &str, relative_path: &str) -> i64 {
    sqlx::query_scalar(sql)
        .bind(relative_path)
        .fetch_one(&mut db.raw().await)
        .await
        .unwrap()
}

async fn tracked(db: &TestDb, relative_path: &str) -> bool {
    count(
        db,
        "SELECT count(*) FROM repositories WHERE relative_path = $1",
        relative_path,
    )
    .await
        > 0
}

async fn queued_jobs(db: &TestDb, relative_path: &str) -> i64 {
    count(
        db,
        "SELECT count(*) FROM replication_queue WHERE job ->> 'relative_path' = $1",
        relative_path,
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn track_repository_adopts_a_replica_and_replicates_it() {
    let db = TestDb::new().await;
    let nodes = start_nodes();
    let dir = tempfile::tempdir().unwrap();
    let refs: Vec<&GitNode> = nodes.iter().collect();
    let _router = start_router(&db, dir.path(), &refs, "").await;
    repository_with_commit(&nodes[0], "adopted/one.git").await;

    // Bad flags: usage errors, nothing tracked.
    let (code, out, err) = praefect_cli(
        dir.path(),
        &[
            "track-repository",
            "-virtual-storage",
            "default",
            "-relative-path",
            "one.git",
            "-replica-path",
            "adopted/one.git",
        ],
    )
    .await;
    assert_eq!((code, out.as_str()), (2, ""), "{err}");
    assert!(err.contains("--authoritative-storage <NAME>"), "{err}");
    let (code, out, err) = praefect_cli(
        dir.path(),
        &[
            "track-repository",
            "-virtual-storage=nope",
            "-relative-path=one.git",
            "-replica-path=adopted/one.git",
            "-authoritative-storage=gitaly-1",
        ],
    )
    .await;
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (
            2,
            "",
            "praefect track-repository: virtual storage \"nope\" not found\n"
        )
    );

    // The replica is not where the flags say.
    let (code, out, err) = praefect_cli(
        dir.path(),
        &[
            "track-repository",
            "-virtual-storage",
            "default",
            "-relative-path",
            "one.git",
            "-replica-path",
            "adopted/one.git",
            "-authoritative-storage",
            "gitaly-2",
        ],
    )
    .await;
    assert_eq!((code, out.as_str()), (1, ""), "{err}");
    assert_eq!(
        err,
        "praefect track-repository: attempting to track repository in praefect database: \
         authoritative repository does not exist (storage \"gitaly-2\", replica path \"adopted/one.git\")\n"
    );
    assert!(!tracked(&db, "one.git").await);

    // Tracked, and replicated at once (two-dash flags work too).
    let (code, out, err) = praefect_cli(
        dir.path(),
        &[
            "track-repository",
            "--virtual-storage",
            "default",
            "--relative-path",
            "one.git",
            "--replica-path",
            "adopted/one.git",
            "--authoritative-storage",
            "gitaly-1",
            "--replicate-immediately",
        ],
    )
    .await;
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (
            0,
            "Finished adding new repository to be tracked in praefect database.\n\
             Finished replicating repository to \"gitaly-2\".\n\
             Finished replicating repository to \"gitaly-3\".\n",
            ""
        )
    );
    assert!(converged(&db, "one.git", &ALL).await);
    let sums =
        futures::future::join_all(nodes.iter().map(|n| checksum(n, "adopted/one.git"))).await;
    assert!(sums.iter().all(|s| *s == sums[0]), "{sums:?}");
    assert_ne!(sums[0], "0000000000000000000000000000000000000000");
    let primary: String =
        sqlx::query_scalar("SELECT \"primary\" FROM repositories WHERE relative_path = 'one.git'")
            .fetch_one(&mut db.raw().await)
            .await
            .unwrap();
    assert_eq!(primary, "gitaly-1");

    // Already tracked: said so, and the replication jobs are queued all the same.
    let (code, out, err) = praefect_cli(
        dir.path(),
        &[
            "track-repository",
            "-virtual-storage",
            "default",
            "-relative-path",
            "one.git",
            "-replica-path",
            "adopted/one.git",
            "-authoritative-storage",
            "gitaly-1",
        ],
    )
    .await;
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (
            0,
            "repository is already tracked in praefect database\n\
             Added replication job to replicate repository to \"gitaly-2\".\n\
             Added replication job to replicate repository to \"gitaly-3\".\n",
            ""
        )
    );

    // Queued jobs: the router's replicator brings the other storages up to date.
    repository_with_commit(&nodes[1], "adopted/two.git").await;
    let (code, out, err) = praefect_cli(
        dir.path(),
        &[
            "track-repository",
            "-virtual-storage",
            "default",
            "-relative-path",
            "two.git",
            "-replica-path",
            "adopted/two.git",
            "-authoritative-storage",
            "gitaly-2",
        ],
    )
    .await;
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (
            0,
            "Finished adding new repository to be tracked in praefect database.\n\
             Added replication job to replicate repository to \"gitaly-1\".\n\
             Added replication job to replicate repository to \"gitaly-3\".\n",
            ""
        )
    );
    wait_until(
        Duration::from_secs(30),
        "the router's replicator copies the adopted repository",
        || converged(&db, "two.git", &ALL),
    )
    .await;
    let sums =
        futures::future::join_all(nodes.iter().map(|n| checksum(n, "adopted/two.git"))).await;
    assert!(sums.iter().all(|s| *s == sums[0]), "{sums:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn track_repository_with_a_replication_factor_assigns_the_primary_and_one_more() {
    let db = TestDb::new().await;
    let nodes = start_nodes();
    let dir = tempfile::tempdir().unwrap();
    // A config whose virtual storage has default_replication_factor = 2.
    let refs: Vec<&GitNode> = nodes.iter().collect();
    let router = start_router(&db, dir.path(), &refs, "").await;
    drop(router);
    let config = dir.path().join("praefect.toml");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "name = \"default\"\n",
        "name = \"default\"\ndefault_replication_factor = 2\n",
    );
    std::fs::write(&config, text).unwrap();
    bare_repository(&nodes[2], "rf/one.git");
    let (code, out, err) = praefect_cli(
        dir.path(),
        &[
            "track-repository",
            "-virtual-storage",
            "default",
            "-relative-path",
            "rf.git",
            "-replica-path",
            "rf/one.git",
            "-authoritative-storage",
            "gitaly-3",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[1].starts_with("Added replication job to replicate repository to \"gitaly-"));
    let assigned: Vec<String> = sqlx::query_scalar(
        "SELECT storage FROM repository_assignments WHERE relative_path = 'rf.git' ORDER BY storage",
    )
    .fetch_all(&mut db.raw().await)
    .await
    .unwrap();
    assert_eq!(assigned.len(), 2, "{assigned:?}");
    assert!(assigned.contains(&"gitaly-3".to_string()));
    assert_eq!(queued_jobs(&db, "rf.git").await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn track_repositories_refuses_a_bad_file_and_tracks_a_thousand_fast() {
    let db = TestDb::new().await;
    let nodes = start_nodes();
    let dir = tempfile::tempdir().unwrap();
    let refs: Vec<&GitNode> = nodes.iter().collect();
    let _router = start_router(&db, dir.path(), &refs, "").await;
    seed_repository(&db, &[&nodes[0]], "seeded.git").await;
    bare_repository(&nodes[0], "bulk/valid.git");
    bare_repository(&nodes[0], "bulk/dup.git");

    let line = |relative: &str, replica: &str, storage: &str| {
        format!(
            "{{\"relative_path\":\"{relative}\",\"replica_path\":\"{replica}\",\"virtual_storage\":\"default\",\"authoritative_storage\":\"{storage}\"}}"
        )
    };
    let bad = [
        line("valid.git", "bulk/valid.git", "gitaly-1"),
        line("dup.git", "bulk/dup.git", "gitaly-1"),
        line("dup.git", "bulk/dup.git", "gitaly-1"),
        "{\"relative_path\":\"missing-keys.git\",\"virtual_storage\":\"default\"}".to_string(),
        line("seeded.git", "bulk/valid.git", "gitaly-1"),
        line("absent.git", "bulk/absent.git", "gitaly-1"),
        line("elsewhere.git", "bulk/valid.git", "gitaly-9"),
    ];
    let bad_path = dir.path().join("bad.ndjson");
    std::fs::write(&bad_path, bad.join("\n")).unwrap();
    let bad_arg = bad_path.to_str().unwrap();
    let (code, out, err) =
        praefect_cli(dir.path(), &["track-repositories", "-input-path", bad_arg]).await;
    assert_eq!(
        (code, out, err),
        (
            1,
            format!(
                "Validating repository information.\n\
                 Found 5 invalid request(s) in {bad_arg:?}:\n  \
                 object on line 3 invalid:\n    \
                 duplicate entry for relative_path \"dup.git\", first given on line 2\n  \
                 object on line 4 invalid:\n    \
                 \"replica_path\" is a required parameter\n    \
                 \"authoritative_storage\" is a required parameter\n  \
                 object on line 5 invalid:\n    \
                 repository is already tracked by Praefect\n  \
                 object on line 6 invalid:\n    \
                 repository does not exist on storage \"gitaly-1\" at replica path \"bulk/absent.git\"\n  \
                 object on line 7 invalid:\n    \
                 storage \"gitaly-9\" not found in virtual storage \"default\"\n"
            ),
            "praefect track-repositories: invalid input: no repository was tracked\n".to_string()
        )
    );
    assert!(
        !tracked(&db, "valid.git").await,
        "a bad file tracks nothing"
    );

    // Bad flags.
    let (code, _, err) = praefect_cli(dir.path(), &["track-repositories"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--input-path <FILE>"), "{err}");

    // A thousand repositories, made on gitaly-1's disk, tracked in one run.
    const N: usize = 1000;
    let mut input = String::new();
    for i in 0..N {
        let replica = format!("thousand/{:02}/repo-{i}.git", i % 50);
        bare_repository(&nodes[0], &replica);
        input.push_str(&line(
            &format!("thousand/repo-{i}.git"),
            &replica,
            "gitaly-1",
        ));
        input.push('\n');
    }
    let input_path = dir.path().join("thousand.ndjson");
    std::fs::write(&input_path, input).unwrap();
    let started = Instant::now();
    let (code, out, err) = praefect_cli(
        dir.path(),
        &[
            "track-repositories",
            "-input-path",
            input_path.to_str().unwrap(),
        ],
    )
    .await;
    let took = started.elapsed();
    println!("track-repositories: {N} repositories tracked in {took:.2?}");
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "Validating repository information.");
    assert_eq!(
        lines[1],
        "All 1000 repositories are valid; tracking them in the praefect database."
    );
    assert_eq!(lines[2], "[1/1000] \"thousand/repo-0.git\":");
    assert_eq!(
        lines[3],
        "  Finished adding new repository to be tracked in praefect database."
    );
    assert_eq!(
        lines[4],
        "  Added replication job to replicate repository to \"gitaly-2\"."
    );
    assert_eq!(
        *lines.last().unwrap(),
        "Finished adding 1000 repositories to be tracked in praefect database."
    );
    let tracked_count: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM repositories WHERE relative_path LIKE 'thousand/%'",
    )
    .fetch_one(&mut db.raw().await)
    .await
    .unwrap();
    assert_eq!(tracked_count, 1000);
    // The router's replicator works through the jobs: the first repositories converge.
    wait_until(
        Duration::from_secs(60),
        "a tracked repository reaches the other storages",
        || converged(&db, "thousand/repo-0.git", &ALL),
    )
    .await;

    // On a terminal (a pseudo-terminal from util-linux's `script`), progress is one bar
    // redrawn in place instead of a line per repository.
    let mut input = String::new();
    for i in 0..3 {
        let replica = format!("tty/repo-{i}.git");
        bare_repository(&nodes[0], &replica);
        input.push_str(&line(&format!("tty/repo-{i}.git"), &replica, "gitaly-1"));
        input.push('\n');
    }
    let tty_input = dir.path().join("tty.ndjson");
    std::fs::write(&tty_input, input).unwrap();
    let command = format!(
        "{} -config {} track-repositories -input-path {}",
        common::router::BIN,
        dir.path().join("praefect.toml").display(),
        tty_input.display()
    );
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("script")
            .args(["--quiet", "--return", "--command", &command, "/dev/null"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let screen = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{screen}");
    let full_bar = format!("\r[{}] 3/3", "#".repeat(40));
    assert!(screen.contains(&full_bar), "{screen:?}");
    assert!(screen.contains("\r[#"), "{screen:?}");
    assert!(
        !screen.contains("[1/3]"),
        "no per-repository lines: {screen:?}"
    );
    assert!(
        screen.contains("Finished adding 3 repositories to be tracked in praefect database."),
        "{screen:?}"
    );
    assert!(tracked(&db, "tty/repo-2.git").await);
}

#[tokio::test(flavor = "multi_thread")]
async fn remove_repository_dry_run_apply_and_db_only() {
    let db = TestDb::new().await;
    let nodes = start_nodes();
    let dir = tempfile::tempdir().unwrap();
    let refs: Vec<&GitNode> = nodes.iter().collect();
    let _router = start_router(&db, dir.path(), &refs, "").await;
    let id = seed_repository(&db, &refs, "remove/me.git").await;
    let replica = praefect::routing::replica_path(id);
    let args = |extra: &[&'static str]| {
        let mut args = vec![
            "remove-repository",
            "-virtual-storage",
            "default",
            "-relative-path",
            "remove/me.git",
        ];
        args.extend_from_slice(extra);
        args
    };

    let (code, out, err) = praefect_cli(dir.path(), &args(&[])).await;
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (
            0,
            "DRY RUN -- Repository will not be removed from the database or from Gitaly storage.\n\
             Repository found in the database.\n\
             Re-run the command with -apply to remove repositories from the database and disk or -apply and -db-only to remove from database only.\n",
            ""
        )
    );
    assert!(tracked(&db, "remove/me.git").await);

    // A queued job for it goes too.
    sqlx::query(
        "INSERT INTO replication_queue (job) VALUES (jsonb_build_object(
             'change', 'update', 'relative_path', 'remove/me.git', 'virtual_storage', 'default',
             'source_node_storage', 'gitaly-1', 'target_node_storage', 'gitaly-2',
             'repository_id', $1::bigint, 'replica_path', $2::text))",
    )
    .bind(id)
    .bind(&replica)
    .execute(&mut db.raw().await)
    .await
    .unwrap();
    let (code, out, err) = praefect_cli(dir.path(), &args(&["-apply"])).await;
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (
            0,
            "Attempting to remove \"remove/me.git\" of virtual storage \"default\" from the database and from every gitaly node...\n\
             Repository found in the database.\n\
             Repository removal completed.\n\
             Removing replication jobs...\n\
             Replication job removal completed.\n",
            ""
        )
    );
    assert!(!tracked(&db, "remove/me.git").await);
    assert_eq!(queued_jobs(&db, "remove/me.git").await, 0);
    for node in &nodes {
        assert!(!node.root.join(&replica).exists(), "{}", node.storage);
    }

    // Not tracked any more: an error.
    let (code, out, err) = praefect_cli(dir.path(), &args(&["-apply"])).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        err.ends_with("praefect remove-repository: repository is not being tracked in Praefect\n"),
        "{err}"
    );

    // -db-only: the records go, the replicas stay.
    let id = seed_repository(&db, &refs, "remove/me.git").await;
    let replica = praefect::routing::replica_path(id);
    let (code, out, err) = praefect_cli(dir.path(), &args(&["-apply", "-db-only"])).await;
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (
            0,
            "Attempting to remove \"remove/me.git\" of virtual storage \"default\" from the database...\n\
             Repository found in the database.\n\
             Removed repository metadata from the database.\n\
             Removing replication jobs...\n\
             Replication job removal completed.\n",
            ""
        )
    );
    assert!(!tracked(&db, "remove/me.git").await);
    for node in &nodes {
        assert!(node.root.join(&replica).exists(), "{}", node.storage);
    }

    // Bad flags.
    let (code, _, err) =
        praefect_cli(dir.path(), &["remove-repository", "-relative-path", "x"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--virtual-storage <NAME>"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn untracked_repositories_are_listed_and_logged_by_the_cleanup_worker() {
    let db = TestDb::new().await;
    let nodes = start_nodes();
    let dir = tempfile::tempdir().unwrap();
    let refs: Vec<&GitNode> = nodes.iter().collect();
    let id = seed_repository(&db, &refs, "tracked.git").await;
    let tracked_replica = praefect::routing::replica_path(id);
    for node in &nodes {
        age(
            &node.root.join(&tracked_replica),
            Duration::from_secs(3 * 24 * 3600),
        );
    }
    bare_repository(&nodes[1], "untracked/old.git");
    age(
        &nodes[1].root.join("untracked/old.git"),
        Duration::from_secs(2 * 24 * 3600),
    );
    bare_repository(&nodes[2], "untracked/new.git");

    let router = start_router(
        &db,
        dir.path(),
        &refs,
        "[repositories_cleanup]\ncheck_interval = \"1m\"\nrun_interval = \"1m\"\nrepositories_in_batch = 2\n",
    )
    .await;

    let (code, out, err) = praefect_cli(dir.path(), &["list-untracked-repositories"]).await;
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (
            0,
            "The following repositories were found on disk, but missing from the tracking database:\n\
             {\"relative_path\":\"untracked/old.git\",\"storage\":\"gitaly-2\",\"virtual_storage\":\"default\"}\n",
            ""
        )
    );
    let (code, out, err) = praefect_cli(
        dir.path(),
        &[
            "list-untracked-repositories",
            "-older-than",
            "0s",
            "-delimiter",
            ",",
        ],
    )
    .await;
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (
            0,
            "The following repositories were found on disk, but missing from the tracking database:\n\
             {\"relative_path\":\"untracked/old.git\",\"storage\":\"gitaly-2\",\"virtual_storage\":\"default\"},\
             {\"relative_path\":\"untracked/new.git\",\"storage\":\"gitaly-3\",\"virtual_storage\":\"default\"},",
            ""
        )
    );
    let (code, _, err) = praefect_cli(
        dir.path(),
        &["list-untracked-repositories", "-older-than", "x"],
    )
    .await;
    assert_eq!(code, 2, "{err}");

    // The worker walks every storage once, one check interval (at least a minute, as
    // Praefect validates it) after the start, and reports only the old untracked repository.
    assert!(router.log_lines("repositories cleanup walked").is_empty());
    wait_until(
        Duration::from_secs(100),
        "the cleanup worker walks all three storages",
        async || {
            router
                .log_lines("repositories cleanup walked the storage")
                .len()
                >= 3
        },
    )
    .await;
    let reported: Vec<(String, String)> = router
        .log_lines("repository is not managed by praefect")
        .iter()
        .map(|entry| {
            (
                entry["storage"].as_str().unwrap_or_default().to_string(),
                entry["relative_replica_path"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    assert_eq!(
        reported,
        [("gitaly-2".to_string(), "untracked/old.git".to_string())]
    );
    let warned = &router.log_lines("repository is not managed by praefect")[0];
    assert_eq!(warned["level"], "warn", "{warned}");
    let runs: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM storage_cleanups WHERE last_run IS NOT NULL AND triggered_at IS NULL",
    )
    .fetch_one(&mut db.raw().await)
    .await
    .unwrap();
    assert_eq!(runs, 3);
}
