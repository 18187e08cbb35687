//! Taking over a Go Praefect database in place: a database in Go Praefect's shape
//! (`fixtures/go_praefect_schema.sql`, with Go's migration ids), filled with repositories,
//! replicas at different generations, assignments, queued, running and dead jobs, health
//! rows and verification state, is adopted by `sql-migrate --adopt-go-praefect` and then
//! served by a router over real gitnodes.
// Tests read the database directly.
#![allow(clippy::disallowed_methods)]

use std::time::Duration;

use crate::common;
use common::cluster::{checksum, converged, generations, primary_of, start_router};
use common::pg::TestDb;
use common::router::{praefect_cli, virtual_repo};
use common::wait::wait_until;
use praefect::datastore::adopt::{ADOPTION_ID, BASE_MIGRATIONS, GO_PRAEFECT_MIGRATIONS};
use praefect::wire::proto::ref_service_client::RefServiceClient;
use praefect::wire::proto::repository_service_client::RepositoryServiceClient;
use praefect::wire::proto::{FindDefaultBranchNameRequest, WriteRefRequest};
use testkit::gitnode::{as_refs, git, ssh_env, GitNode};

const GO_SCHEMA: &str = include_str!("fixtures/go_praefect_schema.sql");
const STORAGES: [&str; 3] = ["gitaly-1", "gitaly-2", "gitaly-3"];

/// Go Praefect's database, as `ids` of its migrations left it (before any row).
async fn go_database(ids: &[&str]) -> TestDb {
    let db = TestDb::empty().await;
    let mut raw = db.raw().await;
    sqlx::raw_sql(GO_SCHEMA).execute(&mut raw).await.unwrap();
    for id in ids {
        sqlx::query("INSERT INTO schema_migrations (id, applied_at) VALUES ($1, now())")
            .bind(id)
            .execute(&mut raw)
            .await
            .unwrap();
    }
    db
}

/// The rows a Go cluster of three storages leaves: see each statement.
const GO_ROWS: &str = r#"
-- alpha: gitaly-3 one generation behind, an update job queued for it; no assignments
-- (every storage assigned).
INSERT INTO repositories (virtual_storage, relative_path, generation, "primary", repository_id, replica_path)
VALUES ('default', 'group/alpha.git', 2, 'gitaly-1', 17, '@cluster/repositories/aa/bb/17'),
-- beta: replication factor 2 on gitaly-2 and gitaly-3, gitaly-1 outdated and unassigned.
       ('default', 'group/beta.git', 5, 'gitaly-2', 23, '@cluster/repositories/cc/dd/23'),
-- gamma: only on gitaly-1; a job for gitaly-2 queued, one for gitaly-3 left running by a
-- Go router that went away, an old one dead.
       ('default', 'group/gamma.git', 0, NULL, 40, '@cluster/repositories/ee/ff/40');
SELECT setval('repositories_repository_id_seq', 40);

INSERT INTO storage_repositories (virtual_storage, relative_path, storage, generation, repository_id, verified_at, verification_leased_until)
VALUES ('default', 'group/alpha.git', 'gitaly-1', 2, 17, now() - interval '1 day', NULL),
       ('default', 'group/alpha.git', 'gitaly-2', 2, 17, NULL, NULL),
       ('default', 'group/alpha.git', 'gitaly-3', 1, 17, NULL, NULL),
       ('default', 'group/beta.git', 'gitaly-1', 4, 23, NULL, NULL),
       ('default', 'group/beta.git', 'gitaly-2', 5, 23, now() - interval '2 days', NULL),
       ('default', 'group/beta.git', 'gitaly-3', 5, 23, NULL, now() - interval '1 hour'),
       ('default', 'group/gamma.git', 'gitaly-1', 0, 40, NULL, NULL);

INSERT INTO repository_assignments (virtual_storage, relative_path, storage, repository_id)
VALUES ('default', 'group/beta.git', 'gitaly-2', 23),
       ('default', 'group/beta.git', 'gitaly-3', 23);

INSERT INTO replication_queue_lock (id, acquired)
VALUES ('default|gitaly-3|group/alpha.git', false),
       ('default|gitaly-2|group/gamma.git', false),
       ('default|gitaly-3|group/gamma.git', true);

INSERT INTO replication_queue (state, created_at, updated_at, attempt, lock_id, job, meta)
VALUES ('ready', now() AT TIME ZONE 'UTC' - interval '5 minutes', NULL, 3,
        'default|gitaly-3|group/alpha.git',
        '{"change": "update", "repository_id": 17, "replica_path": "@cluster/repositories/aa/bb/17", "relative_path": "group/alpha.git", "virtual_storage": "default", "source_node_storage": "gitaly-1", "target_node_storage": "gitaly-3", "params": null}',
        '{"correlation_id": "go-alpha"}'),
       ('ready', now() AT TIME ZONE 'UTC' - interval '4 minutes', NULL, 3,
        'default|gitaly-2|group/gamma.git',
        '{"change": "update", "repository_id": 40, "replica_path": "@cluster/repositories/ee/ff/40", "relative_path": "group/gamma.git", "virtual_storage": "default", "source_node_storage": "gitaly-1", "target_node_storage": "gitaly-2", "params": null}',
        '{"correlation_id": "go-gamma"}'),
       ('in_progress', now() AT TIME ZONE 'UTC' - interval '3 minutes', now() AT TIME ZONE 'UTC' - interval '3 minutes', 2,
        'default|gitaly-3|group/gamma.git',
        '{"change": "update", "repository_id": 40, "replica_path": "@cluster/repositories/ee/ff/40", "relative_path": "group/gamma.git", "virtual_storage": "default", "source_node_storage": "gitaly-1", "target_node_storage": "gitaly-3", "params": null}',
        '{"correlation_id": "go-running"}'),
       ('dead', now() AT TIME ZONE 'UTC' - interval '10 days', now() AT TIME ZONE 'UTC' - interval '9 days', 0,
        'default|gitaly-2|group/gamma.git',
        '{"change": "update", "repository_id": 40, "replica_path": "@cluster/repositories/ee/ff/40", "relative_path": "group/gamma.git", "virtual_storage": "default", "source_node_storage": "gitaly-1", "target_node_storage": "gitaly-2", "params": null}',
        NULL);

INSERT INTO replication_queue_job_lock (job_id, lock_id, triggered_at)
SELECT id, lock_id, now() AT TIME ZONE 'UTC' - interval '3 minutes'
FROM replication_queue WHERE state = 'in_progress';

INSERT INTO node_status (praefect_name, shard_name, node_name, last_contact_attempt_at, last_seen_active_at)
VALUES ('go-praefect-1', 'default', 'gitaly-1', now() - interval '1 hour', now() - interval '1 hour'),
       ('go-praefect-1', 'default', 'gitaly-2', now() - interval '1 hour', now() - interval '1 hour');

INSERT INTO storage_cleanups (virtual_storage, storage, last_run, triggered_at)
VALUES ('default', 'gitaly-1', now() AT TIME ZONE 'UTC' - interval '1 day', NULL);

INSERT INTO shard_primaries (shard_name, node_name, elected_by_praefect, elected_at)
VALUES ('default', 'gitaly-1', 'go-praefect-1', now() - interval '1 year');
INSERT INTO virtual_storages (virtual_storage, repositories_imported) VALUES ('default', true);
"#;

/// Tables whose every row adoption must keep, and a fingerprint of their rows.
const KEPT: [&str; 11] = [
    "repositories",
    "storage_repositories",
    "repository_assignments",
    "replication_queue",
    "replication_queue_lock",
    "replication_queue_job_lock",
    "node_status",
    "storage_cleanups",
    "hello_world",
    "shard_primaries",
    "virtual_storages",
];

async fn rows_of(db: &TestDb) -> Vec<(String, String)> {
    let mut raw = db.raw().await;
    let mut all = Vec::new();
    for table in KEPT {
        let rows: Option<String> = sqlx::query_scalar(&format!(
            "SELECT string_agg(row_text, E'\\n' ORDER BY row_text) FROM (SELECT t::text AS row_text FROM {table} AS t) AS r"
        ))
        .fetch_one(&mut raw)
        .await
        .unwrap();
        all.push((table.to_string(), rows.unwrap_or_default()));
    }
    all
}

/// Every schema object in a comparable form (names and definitions; columns by name, since
/// Go's tables have some in another order), leaving out Go's leftover tables.
async fn schema_of(db: &TestDb) -> Vec<String> {
    const LEFTOVERS: &str = "('shard_primaries', 'virtual_storages')";
    let queries = [
        format!(
            "SELECT 'column ' || c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
                    || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
                    || coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), '')
             FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
             JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'public'
             LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
             WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'v')
               AND c.relname NOT IN {LEFTOVERS}"
        ),
        format!(
            "SELECT 'constraint ' || conrelid::regclass || ' ' || conname || ' ' || pg_get_constraintdef(oid)
             FROM pg_constraint WHERE connamespace = 'public'::regnamespace
               AND conrelid::regclass::text NOT IN {LEFTOVERS}"
        ),
        format!(
            "SELECT 'index ' || indexdef FROM pg_indexes
             WHERE schemaname = 'public' AND tablename NOT IN {LEFTOVERS}"
        ),
        "SELECT 'view ' || viewname || ' ' || pg_get_viewdef(viewname::regclass)
         FROM pg_views WHERE schemaname = 'public'"
            .to_string(),
        "SELECT 'trigger ' || pg_get_triggerdef(oid) FROM pg_trigger WHERE NOT tgisinternal"
            .to_string(),
        "SELECT 'function ' || proname || ' ' || md5(prosrc) FROM pg_proc
         WHERE pronamespace = 'public'::regnamespace"
            .to_string(),
        "SELECT 'enum ' || t.typname || ' ' || string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder)
         FROM pg_type t JOIN pg_enum e ON e.enumtypid = t.oid GROUP BY t.typname"
            .to_string(),
        "SELECT 'sequence ' || sequencename FROM pg_sequences
         WHERE schemaname = 'public' AND NOT sequencename LIKE ANY (ARRAY['shard_primaries%', 'virtual_storages%'])"
            .to_string(),
    ];
    let mut raw = db.raw().await;
    let mut objects = Vec::new();
    for query in queries {
        let found: Vec<String> = sqlx::query_scalar(&query)
            .fetch_all(&mut raw)
            .await
            .unwrap();
        objects.extend(found);
    }
    objects.sort();
    objects
}

async fn migration_ids(db: &TestDb) -> Vec<String> {
    sqlx::query_scalar("SELECT id FROM schema_migrations ORDER BY id")
        .fetch_all(&mut db.raw().await)
        .await
        .unwrap()
}

fn write_config(dir: &std::path::Path, db: &TestDb) {
    let conn = db.connection();
    std::fs::write(
        dir.join("praefect.toml"),
        format!(
            "listen_addr = \"127.0.0.1:0\"\n[database]\nhost = \"{}\"\nport = {}\nuser = \"{}\"\ndbname = \"{}\"\nsslmode = \"disable\"\n\
             [[virtual_storage]]\nname = \"default\"\n[[virtual_storage.node]]\nstorage = \"gitaly-1\"\naddress = \"tcp://127.0.0.1:1\"\n",
            conn.host, conn.port, conn.user, conn.dbname
        ),
    )
    .unwrap();
}

/// A commit on `main` with one file, pushed to the replica at `replica` on each of `nodes`.
fn push_commit(work: &std::path::Path, nodes: &[&GitNode], replica: &str, file: &str) {
    std::fs::write(work.join(file), file).unwrap();
    git(work, &["add", "."], &[]);
    git(work, &["commit", "--quiet", "-m", file], &[]);
    for node in nodes {
        let env = ssh_env(&node.address, &node.storage, replica);
        git(
            work,
            &["push", "--quiet", "--force", "ssh://gitaly/x", "main"],
            &as_refs(&env),
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_go_praefect_database_is_adopted_and_served() {
    let db = go_database(&GO_PRAEFECT_MIGRATIONS).await;
    sqlx::raw_sql(GO_ROWS)
        .execute(&mut db.raw().await)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), &db);
    let before_rows = rows_of(&db).await;
    let before_schema = schema_of(&db).await;

    // Status: Go's ids are known; ours are not applied yet.
    let (code, out, err) = praefect_cli(dir.path(), &["sql-migrate-status"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("unknown migration"), "{out}");
    assert!(out.contains(GO_PRAEFECT_MIGRATIONS[41]), "{out}");
    assert!(
        out.lines()
            .any(|l| l.contains(BASE_MIGRATIONS[0]) && l.contains("| no")),
        "{out}"
    );

    // Without the flag: refused, nothing changed.
    let (code, out, err) = praefect_cli(dir.path(), &["sql-migrate"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        err.contains("belongs to Go Praefect (15.1 or later)"),
        "{err}"
    );
    assert!(err.contains("--adopt-go-praefect"), "{err}");
    assert_eq!(migration_ids(&db).await.len(), GO_PRAEFECT_MIGRATIONS.len());
    assert_eq!(schema_of(&db).await, before_schema);

    // serve refuses a database that was not adopted.
    let (code, _, err) = praefect_cli(dir.path(), &["serve"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("was not adopted"), "{err}");

    let (code, out, err) = praefect_cli(dir.path(), &["sql-migrate", "--adopt-go-praefect"]).await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0],
        "praefect sql-migrate: adopting the database of Go Praefect 15.1 or later"
    );
    assert_eq!(lines[1], "praefect sql-migrate: migrations to apply: 4");
    assert!(
        lines.last().unwrap().ends_with("OK (applied 4 migrations)"),
        "{out}"
    );

    // Every row kept; the schema is exactly ours, Go's leftover tables aside.
    assert_eq!(rows_of(&db).await, before_rows);
    let ours = TestDb::new().await;
    assert_eq!(schema_of(&db).await, schema_of(&ours).await);
    let ids = migration_ids(&db).await;
    assert!(ids.contains(&ADOPTION_ID.to_string()));
    assert_eq!(
        ids.len(),
        GO_PRAEFECT_MIGRATIONS.len() + 1 + migration_ids(&ours).await.len()
    );

    // Idempotent, and the status knows every id.
    let (code, out, _) = praefect_cli(dir.path(), &["sql-migrate", "--adopt-go-praefect"]).await;
    assert_eq!(
        (code, out.as_str()),
        (0, "praefect sql-migrate: all migrations are up\n")
    );
    let (_, status, _) = praefect_cli(dir.path(), &["sql-migrate-status"]).await;
    assert!(
        !status.contains("unknown migration") && !status.contains("| no"),
        "{status}"
    );

    // The replicas on disk, where Go's records say they are: alpha's gitaly-3 and beta's
    // gitaly-1 one commit behind; gamma only on gitaly-1.
    let nodes = STORAGES.map(GitNode::start);
    let [n1, n2, n3] = [&nodes[0], &nodes[1], &nodes[2]];
    for (replica, all, behind) in [
        ("@cluster/repositories/aa/bb/17", vec![n1, n2, n3], n3),
        ("@cluster/repositories/cc/dd/23", vec![n1, n2, n3], n1),
    ] {
        for node in &all {
            node.create_repository(replica).await;
        }
        let work = tempfile::tempdir().unwrap();
        git(
            work.path(),
            &["init", "--quiet", "--initial-branch=main", "."],
            &[],
        );
        push_commit(work.path(), &all, replica, "first");
        let ahead: Vec<&GitNode> = all
            .iter()
            .copied()
            .filter(|n| n.storage != behind.storage)
            .collect();
        push_commit(work.path(), &ahead, replica, "second");
    }
    n1.create_repository("@cluster/repositories/ee/ff/40").await;
    let work = tempfile::tempdir().unwrap();
    git(
        work.path(),
        &["init", "--quiet", "--initial-branch=main", "."],
        &[],
    );
    push_commit(
        work.path(),
        &[n1],
        "@cluster/repositories/ee/ff/40",
        "gamma",
    );

    let refs: Vec<&GitNode> = nodes.iter().collect();
    let router = start_router(&db, dir.path(), &refs, "").await;

    // Every repository answers at its recorded replica path.
    let mut refs_client = RefServiceClient::new(router.channel());
    for path in ["group/alpha.git", "group/beta.git", "group/gamma.git"] {
        let branch = refs_client
            .find_default_branch_name(FindDefaultBranchNameRequest {
                repository: Some(virtual_repo(path)),
                head_only: false,
            })
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"))
            .into_inner()
            .name;
        assert_eq!(branch, b"refs/heads/main", "{path}");
    }

    // The queued jobs run: alpha's gitaly-3 and gamma's gitaly-2 catch up.
    wait_until(Duration::from_secs(60), "the queued jobs ran", || async {
        converged(&db, "group/alpha.git", &STORAGES).await
            && converged(&db, "group/gamma.git", &["gitaly-1", "gitaly-2"]).await
    })
    .await;
    assert_eq!(
        checksum(n3, "@cluster/repositories/aa/bb/17").await,
        checksum(n1, "@cluster/repositories/aa/bb/17").await
    );
    assert_eq!(
        checksum(n2, "@cluster/repositories/ee/ff/40").await,
        checksum(n1, "@cluster/repositories/ee/ff/40").await
    );

    // A write to beta goes to a replica at generation 5, never to the outdated gitaly-1.
    let main = git(
        &n2.root.join("@cluster/repositories/cc/dd/23"),
        &["rev-parse", "main"],
        &[],
    )
    .trim()
    .to_string();
    RepositoryServiceClient::new(router.channel())
        .write_ref(WriteRefRequest {
            repository: Some(virtual_repo("group/beta.git")),
            r#ref: b"refs/heads/adopted".to_vec(),
            revision: main.into_bytes(),
            ..Default::default()
        })
        .await
        .unwrap();
    let primary = primary_of(&db, "group/beta.git").await;
    assert!(
        ["gitaly-2", "gitaly-3"].contains(&primary.as_str()),
        "{primary}"
    );
    let (latest, replicas) = generations(&db, "group/beta.git").await;
    assert_eq!(latest, 6);
    // gitaly-1 stays behind (or is gone: it is not assigned, the reconciler may remove it).
    assert!(
        !replicas.contains(&("gitaly-1".to_string(), 6)),
        "{replicas:?}"
    );
    let on_primary = git(
        &nodes[STORAGES.iter().position(|s| *s == primary).unwrap()]
            .root
            .join("@cluster/repositories/cc/dd/23"),
        &["for-each-ref", "--format=%(refname)", "refs/heads/adopted"],
        &[],
    );
    assert_eq!(on_primary.trim(), "refs/heads/adopted");
}

#[tokio::test(flavor = "multi_thread")]
async fn adoption_is_all_or_nothing_and_takes_go_15_0() {
    // A Go 15.0 database (its last migration missing) with a maintenance job queued: adopted,
    // and the job purged as Go's last migration would have.
    let db = go_database(&GO_PRAEFECT_MIGRATIONS[..41]).await;
    sqlx::raw_sql(
        "INSERT INTO replication_queue (lock_id, job) VALUES
             ('default|gitaly-1|a.git', '{\"change\": \"gc\", \"relative_path\": \"a.git\", \"virtual_storage\": \"default\", \"target_node_storage\": \"gitaly-1\"}'),
             ('default|gitaly-1|a.git', '{\"change\": \"update\", \"relative_path\": \"a.git\", \"virtual_storage\": \"default\", \"target_node_storage\": \"gitaly-1\", \"source_node_storage\": \"gitaly-2\"}')",
    )
    .execute(&mut db.raw().await)
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), &db);
    let (code, out, err) = praefect_cli(dir.path(), &["sql-migrate", "--adopt-go-praefect"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("praefect sql-migrate: adopting the database of Go Praefect 15.0\n"),
        "{out}"
    );
    let changes: Vec<String> = sqlx::query_scalar("SELECT job ->> 'change' FROM replication_queue")
        .fetch_all(&mut db.raw().await)
        .await
        .unwrap();
    assert_eq!(changes, ["update"]);

    // A database adoption fails on part-way (here: an index it renames is missing) is left as
    // it was, Go's triggers and all.
    let broken = go_database(&GO_PRAEFECT_MIGRATIONS).await;
    sqlx::raw_sql("DROP INDEX shard_node_names_on_node_status_idx")
        .execute(&mut broken.raw().await)
        .await
        .unwrap();
    let before = schema_of(&broken).await;
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), &broken);
    let (code, _, err) = praefect_cli(dir.path(), &["sql-migrate", "--adopt-go-praefect"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("adopting the Go Praefect database"), "{err}");
    assert!(err.contains("shard_node_names_on_node_status_idx"), "{err}");
    assert_eq!(schema_of(&broken).await, before);
    assert_eq!(
        migration_ids(&broken).await.len(),
        GO_PRAEFECT_MIGRATIONS.len()
    );

    // Older than 15.0: refused with what to do.
    let old = go_database(&GO_PRAEFECT_MIGRATIONS[..30]).await;
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), &old);
    let (code, _, err) = praefect_cli(dir.path(), &["sql-migrate", "--adopt-go-praefect"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("older than 15.0"), "{err}");
}

/// A pending `delete_replica` job takes its replica out of the primary candidates by the
/// repository's id, also when the job names the repository by a path it no longer has.
#[tokio::test(flavor = "multi_thread")]
async fn a_replica_being_deleted_is_no_primary_candidate_whatever_path_its_job_names() {
    let db = TestDb::new().await;
    let mut raw = db.raw().await;
    sqlx::raw_sql(
        "INSERT INTO repositories (repository_id, virtual_storage, relative_path, generation, replica_path)
         VALUES (7, 'default', 'renamed.git', 1, '@cluster/repositories/00/00/7');
         INSERT INTO storage_repositories (repository_id, virtual_storage, relative_path, storage, generation)
         VALUES (7, 'default', 'renamed.git', 'gitaly-1', 1), (7, 'default', 'renamed.git', 'gitaly-2', 1);
         INSERT INTO node_status (praefect_name, shard_name, node_name, last_contact_attempt_at, last_seen_active_at)
         VALUES ('p', 'default', 'gitaly-1', now(), now()), ('p', 'default', 'gitaly-2', now(), now());
         INSERT INTO replication_queue (lock_id, job) VALUES ('default|gitaly-2|old-name.git',
             '{\"change\": \"delete_replica\", \"repository_id\": 7, \"relative_path\": \"old-name.git\", \"virtual_storage\": \"default\", \"target_node_storage\": \"gitaly-2\"}')",
    )
    .execute(&mut raw)
    .await
    .unwrap();
    let valid: Vec<String> = sqlx::query_scalar(
        "SELECT storage FROM valid_primaries WHERE repository_id = 7 ORDER BY storage",
    )
    .fetch_all(&mut raw)
    .await
    .unwrap();
    assert_eq!(valid, ["gitaly-1"]);
}
