//! The `praefect` binary as an operator runs it: argument forms, the sql-* subcommands
//! against a live and a stopped database, `configuration validate`, and `serve`.
// Tests read and write the database directly (not through PgBouncer), so the
// datastore's rule about unnamed statements (clippy.toml) does not apply here.
#![allow(clippy::disallowed_methods)]

use crate::common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::pg::TestDb;
use common::wait::wait_until_blocking;
use praefect::config::DatabaseConnection;
use praefect::datastore::migrations::known_migrations;

const BIN: &str = env!("CARGO_BIN_EXE_praefect");

fn config_text(db: &DatabaseConnection, extra: &str) -> String {
    format!(
        r#"listen_addr = "127.0.0.1:0"
{extra}
[database]
host = "{}"
port = {}
user = "{}"
dbname = "{}"
sslmode = "disable"

[[virtual_storage]]
name = "default"
[[virtual_storage.node]]
storage = "gitaly-1"
address = "tcp://127.0.0.1:1"
"#,
        db.host, db.port, db.user, db.dbname
    )
}

struct Setup {
    _dir: tempfile::TempDir,
    config: PathBuf,
}

fn write_config(db: &DatabaseConnection, extra: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, config_text(db, extra)).unwrap();
    Setup { _dir: dir, config }
}

fn praefect(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("running praefect")
}

fn praefect_with_config(config: &Path, before: &[&str], after: &[&str]) -> Output {
    let mut args: Vec<&str> = before.to_vec();
    args.push(config.to_str().unwrap());
    args.extend_from_slice(after);
    praefect(&args)
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn version_flag_in_both_spellings() {
    for flag in ["--version", "-version"] {
        let output = praefect(&[flag]);
        assert!(output.status.success());
        assert_eq!(
            stdout(&output),
            format!("Praefect, version {}\n", env!("CARGO_PKG_VERSION"))
        );
    }
}

/// Command lines an operator may get wrong: each is refused before any configuration is
/// read (`x.toml` does not exist), with the usage exit code 2, a message on stderr saying
/// what is wrong, and nothing on stdout.
#[test]
fn bad_arguments_are_usage_errors() {
    let required = "-config flag is required";
    let cases: [(&str, &[&str], &str); 17] = [
        ("no -config, a subcommand", &["sql-ping"], required),
        ("no -config, nothing", &[], required),
        ("no -config, serve", &["serve"], required),
        (
            "unknown subcommand",
            &["-config", "x.toml", "no-such-command"],
            "unrecognized subcommand 'no-such-command'",
        ),
        (
            "extra argument",
            &["-config", "x.toml", "sql-ping", "extra"],
            "unexpected argument 'extra' found",
        ),
        (
            "unknown flag",
            &["-config", "x.toml", "-no-such-flag"],
            "unexpected argument '--no-such-flag' found",
        ),
        (
            "-config without a value",
            &["-config"],
            "a value is required for '--config <FILE>'",
        ),
        (
            "sql-migrate-down without N",
            &["-config", "x.toml", "sql-migrate-down"],
            "the following required arguments were not provided:\n  <N>",
        ),
        (
            "sql-migrate-down, N not a number",
            &["-config", "x.toml", "sql-migrate-down", "-f", "abc"],
            "invalid value 'abc' for '<N>'",
        ),
        (
            "verify without a selector",
            &["-config", "x.toml", "verify"],
            "<--repository-id <ID>|--virtual-storage <NAME>>",
        ),
        (
            "verify, repository id 0",
            &["-config", "x.toml", "verify", "-repository-id", "0"],
            "invalid value '0' for '--repository-id <ID>'",
        ),
        (
            "verify, repository id not a number",
            &["-config", "x.toml", "verify", "-repository-id", "x"],
            "invalid value 'x' for '--repository-id <ID>'",
        ),
        (
            "verify, both selectors",
            &[
                "-config",
                "x.toml",
                "verify",
                "-repository-id",
                "1",
                "-virtual-storage",
                "default",
            ],
            "'--repository-id <ID>' cannot be used with '--virtual-storage <NAME>'",
        ),
        (
            "verify, -storage without -virtual-storage",
            &["-config", "x.toml", "verify", "-storage", "gitaly-1"],
            "<--repository-id <ID>|--virtual-storage <NAME>>",
        ),
        (
            "set-replication-factor without its flags",
            &["-config", "x.toml", "set-replication-factor"],
            "--virtual-storage <NAME>\n  --relative-path <PATH>\n  --replication-factor <N>",
        ),
        (
            "dial-nodes, a timeout that is no duration",
            &["-config", "x.toml", "dial-nodes", "-timeout", "bogus"],
            "invalid value 'bogus' for '--timeout <DURATION>'",
        ),
        (
            "configuration without its subcommand",
            &["-config", "x.toml", "configuration"],
            "Usage: praefect configuration",
        ),
    ];
    for (what, args, says) in cases {
        let output = praefect(args);
        let err = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{what}: {args:?}: {err}");
        assert!(err.contains(says), "{what}: {args:?}: {err}");
        assert_eq!(stdout(&output), "", "{what}: {args:?}");
    }
}

#[tokio::test]
async fn sql_ping_against_a_live_database_in_both_argument_orders() {
    let db = TestDb::new().await;
    let setup = write_config(&db.connection(), "");
    for (before, after) in [
        (&["-config"][..], &["sql-ping"][..]),
        (&["sql-ping", "-config"][..], &[][..]),
        (&["sql-ping", "--config"][..], &[][..]),
    ] {
        let output = praefect_with_config(&setup.config, before, after);
        assert!(output.status.success(), "{before:?}: {}", stderr(&output));
        assert_eq!(stdout(&output), "praefect sql-ping: OK\n");
    }
}

#[tokio::test]
async fn sql_ping_against_a_stopped_database_fails_clearly() {
    let db = TestDb::new().await;
    // Nothing listens on this port any more: a stopped server.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let stopped = DatabaseConnection {
        port: port.to_string(),
        ..db.connection()
    };
    let setup = write_config(&stopped, "");
    let output = praefect_with_config(&setup.config, &["-config"], &["sql-ping"]);
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert!(err.starts_with("praefect sql-ping: fail: "), "{err}");
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(err.contains("refused"), "{err}");
    assert_eq!(stdout(&output), "");
}

fn is_timestamp(text: &str) -> bool {
    chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S").is_ok()
}

#[tokio::test]
async fn sql_migrate_applies_everything_then_reports_up_to_date() {
    let db = TestDb::empty().await;
    let setup = write_config(&db.connection(), "");
    let known = known_migrations();

    let output = praefect_with_config(&setup.config, &["-config"], &["sql-migrate"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        format!("praefect sql-migrate: migrations to apply: {}", known.len())
    );
    for (i, migration) in known.iter().enumerate() {
        let migrating = lines[1 + 2 * i];
        let applied = lines[2 + 2 * i];
        let rest = migrating.strip_prefix("=  ").expect(migrating);
        assert!(is_timestamp(&rest[..19]), "{migrating}");
        assert_eq!(&rest[19..], format!(" {}: migrating", migration.id));
        let rest = applied.strip_prefix("== ").expect(applied);
        assert!(is_timestamp(&rest[..19]), "{applied}");
        let tail = format!(" {}: applied (", migration.id);
        assert!(
            rest[19..].starts_with(&tail) && rest.ends_with(')'),
            "{applied}"
        );
    }
    assert_eq!(
        *lines.last().unwrap(),
        format!(
            "praefect sql-migrate: OK (applied {} migrations)",
            known.len()
        )
    );

    let output = praefect_with_config(&setup.config, &["sql-migrate", "-config"], &[]);
    assert!(output.status.success());
    assert_eq!(
        stdout(&output),
        "praefect sql-migrate: all migrations are up\n"
    );
}

#[tokio::test]
async fn sql_migrate_verbose_prints_the_migration_text() {
    let db = TestDb::empty().await;
    let setup = write_config(&db.connection(), "");
    let output = praefect_with_config(&setup.config, &["-config"], &["sql-migrate", "-verbose"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains("CREATE TABLE replication_queue"));
}

#[tokio::test]
async fn sql_migrate_status_and_down() {
    let db = TestDb::new().await;
    let setup = write_config(&db.connection(), "");
    let known = known_migrations();
    let newest = &known.last().unwrap().id;

    let status = |setup: &Setup| {
        let output = praefect_with_config(&setup.config, &["-config"], &["sql-migrate-status"]);
        assert!(output.status.success(), "{}", stderr(&output));
        stdout(&output)
    };
    let row = |table: &str, id: &str| -> String {
        table
            .lines()
            .find(|l| l.contains(id))
            .unwrap_or_else(|| panic!("{id} missing from\n{table}"))
            .to_string()
    };
    let table = status(&setup);
    assert!(
        table.contains("MIGRATION") && table.contains("APPLIED"),
        "{table}"
    );
    for m in &known {
        let line = row(&table, &m.id);
        assert!(
            line.contains(&chrono::Utc::now().format("%Y-").to_string()),
            "{line}"
        );
    }

    // Dry run: lists, changes nothing.
    let output = praefect_with_config(&setup.config, &["-config"], &["sql-migrate-down", "1"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(
        text.starts_with("praefect sql-migrate-down: DRY RUN -- would roll back:\n"),
        "{text}"
    );
    assert!(text.contains(&format!("\n- {newest}\n")), "{text}");
    assert!(
        !row(&status(&setup), newest).contains("| no"),
        "dry run rolled back"
    );

    let output = praefect_with_config(
        &setup.config,
        &["-config"],
        &["sql-migrate-down", "-f", "1"],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(
        stdout(&output),
        "praefect sql-migrate-down: OK (applied 1 \"down\" migrations)\n"
    );
    assert!(
        row(&status(&setup), newest).contains("| no "),
        "{}",
        status(&setup)
    );

    // A migration the binary does not know shows as such.
    let mut raw = db.raw().await;
    sqlx::query("INSERT INTO schema_migrations VALUES ('20990101000000_from_the_future', now())")
        .execute(&mut raw)
        .await
        .unwrap();
    assert!(row(&status(&setup), "20990101000000_from_the_future").contains("unknown migration"));

    // serve starts on an outdated schema, as Go Praefect does (another router may be running
    // sql-migrate right now), and says what is missing.
    let logged = write_config(&db.connection(), "[logging]\nformat = \"json\"\n");
    let mut router = common::router::Router::start(&logged.config);
    let warnings = router.log_lines("migrations this version needs that are not applied");
    assert_eq!(warnings.len(), 1, "{:?}", router.log_lines(""));
    assert_eq!(warnings[0]["pending"], 1);
    assert_eq!(warnings[0]["level"], "warn");
    router.stop();
}

fn validate(input: &str) -> Output {
    let mut child = Command::new(BIN)
        .args(["configuration", "validate"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn configuration_validate_reports_every_mistake_with_its_key() {
    let three_mistakes = r#"
listen_addr = "127.0.0.1:2305"
[replication]
batch_size = 0
[[virtual_storage]]
name = "default"
default_replication_factor = 2
[[virtual_storage.node]]
storage = "gitaly-1"
address = "tcp://127.0.0.1:8075"
tokn = "secret"
"#;
    let output = validate(three_mistakes);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let mut keys: Vec<String> = report["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
            e["key"]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k.as_str().unwrap())
                .collect::<Vec<_>>()
                .join("/")
        })
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "replication/batch_size",
            "virtual_storage/[0]/default_replication_factor",
            "virtual_storage/[0]/node/[0]/tokn",
        ],
        "{report:#}"
    );
    // Two-space indented JSON.
    assert!(
        stdout(&output).starts_with("{\n  \"errors\": [\n"),
        "{}",
        stdout(&output)
    );
}

#[test]
fn configuration_validate_syntax_errors_and_success() {
    let output = validate("listen_addr = \n");
    assert_eq!(output.status.code(), Some(2));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let error = &report["errors"][0];
    assert!(error.get("key").is_none(), "{report}");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .starts_with("line 1 column"),
        "{report}"
    );

    let example = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/praefect.example.toml"),
    )
    .unwrap();
    let output = validate(&example);
    assert!(output.status.success(), "{}", stdout(&output));
    assert_eq!(stdout(&output), "");
}

/// A configuration file that cannot be used stops every subcommand (and `serve`, the default)
/// before it does anything: exit code 1 and every mistake named on stderr.
#[test]
fn an_invalid_config_file_stops_every_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let node = "[[virtual_storage]]\nname = \"default\"\n[[virtual_storage.node]]\nstorage = \"gitaly-1\"\naddress = \"tcp://127.0.0.1:1\"\n";
    enum File {
        Text(String),
        Missing,
        Directory,
    }
    use File::{Directory, Missing, Text};
    let cases: [(&str, File, &[&str]); 6] = [
        (
            "invalid values",
            Text("listen_addr = \"x:1\"\n[replication]\nbatch_size = -1\n".into()),
            &["replication.batch_size", "virtual_storage"],
        ),
        (
            "not TOML",
            Text("listen_addr = \n".into()),
            &["line 1 column 15"],
        ),
        (
            "empty",
            Text(String::new()),
            &["no listener configured", "virtual_storage"],
        ),
        (
            "unknown key",
            Text(format!(
                "listen_addr = \"127.0.0.1:0\"\nno_such_key = 1\n{node}"
            )),
            &["unknown configuration key \"no_such_key\""],
        ),
        (
            "missing file",
            Missing,
            &["reading config file", "No such file or directory"],
        ),
        (
            "a directory",
            Directory,
            &["reading config file", "Is a directory"],
        ),
    ];
    let subcommands: [&[&str]; 5] = [
        &["sql-ping"],
        &[],
        &["sql-migrate-status"],
        &["dial-nodes"],
        &["verify", "-virtual-storage", "default"],
    ];
    for (i, (what, contents, says)) in cases.iter().enumerate() {
        let config = dir.path().join(format!("{i}.toml"));
        match contents {
            Text(text) => std::fs::write(&config, text).unwrap(),
            Missing => {}
            Directory => std::fs::create_dir(&config).unwrap(),
        }
        for subcommand in subcommands {
            let output = praefect_with_config(&config, &["-config"], subcommand);
            let err = stderr(&output);
            assert_eq!(
                output.status.code(),
                Some(1),
                "{what} {subcommand:?}: {err}"
            );
            assert!(
                err.starts_with(&format!(
                    "praefect: loading configuration {}",
                    config.display()
                )),
                "{what} {subcommand:?}: {err}"
            );
            for text in *says {
                assert!(err.contains(text), "{what} {subcommand:?}: {err}");
            }
        }
    }
}

#[tokio::test]
async fn serve_starts_logs_and_stops_on_sigterm() {
    let db = TestDb::new().await;
    let setup = write_config(&db.connection(), "[logging]\nformat = \"json\"\n");
    let mut child = Command::new(BIN)
        .args(["-config", setup.config.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let started = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|line| {
            let value: serde_json::Value = serde_json::from_str(&line).ok()?;
            (value["msg"] == "praefect started").then_some(value)
        })
        .expect("a 'praefect started' log line");
    assert_eq!(started["level"], "info");
    assert_eq!(started["election_strategy"], "per_repository");
    assert!(started["pid"].as_u64().is_some());
    assert!(started["time"].as_str().is_some());

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = wait_until_blocking(Duration::from_secs(30), "serve stops on SIGTERM", || {
        child.try_wait().unwrap()
    });
    assert!(exit.success(), "{exit:?}");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(
        rest.iter().any(|l| l.contains("praefect stopped")),
        "{rest:?}"
    );
}

fn dial_nodes_config(nodes: &[(&str, String)]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::from(
        "listen_addr = \"127.0.0.1:0\"\n[database]\nhost = \"127.0.0.1\"\nport = 1\n[[virtual_storage]]\nname = \"default\"\n",
    );
    for (storage, address) in nodes {
        text.push_str(&format!(
            "[[virtual_storage.node]]\nstorage = \"{storage}\"\naddress = \"{address}\"\ntoken = \"{}\"\n",
            common::gitnode::TOKEN
        ));
    }
    let path = dir.path().join("config.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

#[test]
fn dial_nodes_confirms_healthy_consistent_nodes_and_names_the_others() {
    use common::gitnode::GitNode;
    let a = GitNode::start("gitaly-1");
    let b = GitNode::start("gitaly-2");
    let (_dir, config) = dial_nodes_config(&[
        ("gitaly-1", a.address.clone()),
        ("gitaly-2", b.address.clone()),
    ]);
    let output = praefect_with_config(&config, &["-config"], &["dial-nodes", "-timeout", "5s"]);
    assert!(
        output.status.success(),
        "{}{}",
        stdout(&output),
        stderr(&output)
    );
    let text = stdout(&output);
    for (node, storage) in [(&a, "gitaly-1"), (&b, "gitaly-2")] {
        for line in [
            "dialing...".to_string(),
            "dialed successfully!".to_string(),
            "checking health...".to_string(),
            "SUCCESS: node is healthy!".to_string(),
            "checking consistency...".to_string(),
            format!("SUCCESS: confirmed Gitaly storage \"{storage}\" in virtual storages [default] is served"),
            "SUCCESS: node configuration is consistent!".to_string(),
        ] {
            let expected = format!("[{}]: {line}\n", node.address);
            assert!(text.contains(&expected), "missing {expected:?} in\n{text}");
        }
    }

    // A node that is down, and one that does not serve the storage configured for it.
    let dead = format!(
        "tcp://127.0.0.1:{}",
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    );
    let (_dir2, config) = dial_nodes_config(&[
        ("gitaly-1", a.address.clone()),
        ("gitaly-3", dead.clone()),
        ("gitaly-9", b.address.clone()),
    ]);
    let output = praefect_with_config(&config, &["-config"], &["dial-nodes", "--timeout=2s"]);
    assert_eq!(output.status.code(), Some(1));
    let text = stdout(&output);
    assert!(
        text.contains(&format!("[{dead}]: ERROR: dialing failed")),
        "{text}"
    );
    assert!(
        text.contains(&format!("[{}]: ERROR: storage \"gitaly-9\"", b.address)),
        "{text}"
    );
    let err = stderr(&output);
    assert!(
        err.contains("the following nodes are not healthy:"),
        "{err}"
    );
    assert!(err.contains(&dead) && err.contains(&b.address), "{err}");
    assert!(!err.contains(&a.address), "{err}");
}
