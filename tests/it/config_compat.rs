//! Go Praefect's configuration files against the built binary: a file with every key Go
//! Praefect reads starts `praefect -config FILE serve` on a real PostgreSQL and real gitnodes,
//! with one warning per key that is set but ignored; a misspelt key stops it with a
//! suggestion.

use crate::common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::cluster::create;
use common::gitnode::{GitNode, TestCerts, TOKEN};
use common::pg::TestDb;
use common::router::{free_port, virtual_repo, NodeEntry, Router, BIN, ROUTER_TOKEN};
use praefect::config::DatabaseConnection;
use praefect::wire::proto::repository_service_client::RepositoryServiceClient;
use praefect::wire::proto::RepositoryExistsRequest;

/// The keys the file below sets to something praefect-rs does not do, in the order `serve`
/// warns about them.
const IGNORED: [&str; 11] = [
    "memory_queue_enabled",
    "logging.dir",
    "sentry.sentry_dsn",
    "sentry.sentry_environment",
    "failover.enabled",
    "failover.election_strategy",
    "failover.error_threshold_window",
    "failover.write_error_threshold_count",
    "failover.read_error_threshold_count",
    "failover.bootstrap_interval",
    "failover.monitor_interval",
];

/// A configuration with every key of Go Praefect's configuration, with values an Omnibus
/// operator could have: the database password comes from `config_command`, the router's
/// token from `token_file`. `[auth] token` and `[tls] key` are present but empty, since each
/// is exclusive with its file form. The ignored keys are set so that each asks for
/// something (see [`IGNORED`]).
fn write_go_config(dir: &Path, db: &DatabaseConnection, nodes: &[NodeEntry]) -> PathBuf {
    let certs = TestCerts::generate(dir);
    let token_file = dir.join("praefect-token");
    std::fs::write(&token_file, format!("{ROUTER_TOKEN}\n")).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let secrets = dir.join("praefect-secrets");
    let password = serde_json::to_string(&db.password).unwrap();
    std::fs::write(
        &secrets,
        format!(
            "#!/bin/sh\necho '{{\"database\": {{\"password\": {password}, \"session_pooled\": {{\"password\": {password}}}}}}}'\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o755)).unwrap();
    let port: u16 = db.port.parse().expect("one database port");
    let connection = format!(
        "host = \"{}\"\nport = {port}\nuser = \"{}\"\npassword = \"\"\ndbname = \"{}\"\nsslmode = \"disable\"\nsslcert = \"\"\nsslkey = \"\"\nsslrootcert = \"\"\n",
        db.host, db.user, db.dbname
    );
    let mut text = format!(
        r#"listen_addr = "127.0.0.1:{listen_port}"
tls_listen_addr = "127.0.0.1:0"
socket_path = "{socket}"
prometheus_listen_addr = "127.0.0.1:0"
prometheus_exclude_database_from_default_metrics = true
memory_queue_enabled = true
graceful_stop_timeout = "1m30s"
config_command = "{secrets}"
failover_enabled = false
i_understand_my_election_strategy_is_unsupported_and_will_be_removed_without_warning = true

[auth]
token = ""
token_file = "{token_file}"
transitioning = false

[tls]
certificate_path = "{cert}"
key_path = "{key}"
key = ""
min_version = "TLS 1.2"

[logging]
format = "json"
level = "info"
dir = "/var/log/gitlab/praefect"

[sentry]
sentry_dsn = "https://public@sentry.example.com/1"
sentry_environment = "production"

[prometheus]
scrape_timeout = "10s"
grpc_latency_buckets = [0.001, 0.005, 0.025, 0.1, 0.5, 1, 10, 30, 60, 300, 1500]

[database]
{connection}host_no_proxy = "{host}"
port_no_proxy = {port}

[database.session_pooled]
{connection}
[failover]
enabled = false
election_strategy = "sql"
error_threshold_window = "20s"
write_error_threshold_count = 10
read_error_threshold_count = 100
bootstrap_interval = "5s"
monitor_interval = "10s"

[replication]
batch_size = 10
parallel_storage_processing_workers = 2

[reconciliation]
scheduling_interval = "5m"
histogram_buckets = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]

[background_verification]
verification_interval = 0
delete_invalid_records = true

[repositories_cleanup]
check_interval = "30m"
run_interval = "24h"
repositories_in_batch = 16

[yamux]
maximum_stream_window_size_bytes = 262144
accept_backlog = 256

[[virtual_storage]]
name = "default"
default_replication_factor = 2
"#,
        // Two listeners may not name the same address, so not port 0 twice.
        listen_port = free_port(),
        socket = dir.join("praefect.socket").display(),
        secrets = secrets.display(),
        token_file = token_file.display(),
        cert = certs.cert.display(),
        key = certs.key.display(),
        host = db.host,
    );
    for node in nodes {
        text.push_str(&format!(
            "\n[[virtual_storage.node]]\nstorage = \"{}\"\naddress = \"{}\"\ntoken = \"{TOKEN}\"\n",
            node.storage, node.address
        ));
    }
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn log_entries(lines: &[String]) -> Vec<serde_json::Value> {
    lines
        .iter()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_go_praefect_config_with_every_key_serves_and_warns_once_per_ignored_key() {
    let db = TestDb::new().await;
    let nodes = [GitNode::start("gitaly-1"), GitNode::start("gitaly-2")];
    let dir = tempfile::tempdir().unwrap();
    let entries: Vec<NodeEntry> = nodes.iter().map(NodeEntry::from).collect();
    let config = write_go_config(dir.path(), &db.connection(), &entries);

    // The library's view of the file names the same keys.
    let loaded = praefect::config::load_file(&config).unwrap();
    let expected: Vec<&str> = praefect::config::ignored_keys(&loaded)
        .iter()
        .map(|k| k.key)
        .collect();
    assert_eq!(expected, IGNORED);

    let start_config = config.clone();
    let router =
        tokio::task::spawn_blocking(move || Router::start_with_args(&start_config, &["serve"]))
            .await
            .unwrap();
    let startup = log_entries(&router.startup_log);

    let warned: Vec<&str> = startup
        .iter()
        .filter(|e| {
            e["msg"]
                .as_str()
                .is_some_and(|m| m.starts_with("ignoring configuration key"))
        })
        .map(|e| {
            assert_eq!(e["level"], "warn", "{e}");
            assert!(e["reason"].as_str().is_some_and(|r| !r.is_empty()), "{e}");
            e["key"].as_str().unwrap()
        })
        .collect();
    assert_eq!(warned, IGNORED, "one warning per ignored key, in order");
    for entry in &startup {
        if entry["msg"] == "ignoring configuration key failover.election_strategy" {
            assert!(
                entry["reason"].as_str().unwrap().contains("per_repository"),
                "{entry}"
            );
        }
    }

    // Every listener of the file is up.
    let mut schemes: Vec<&str> = startup
        .iter()
        .filter(|e| e["msg"] == "praefect listening")
        .filter_map(|e| e["scheme"].as_str())
        .collect();
    schemes.sort();
    assert_eq!(schemes, ["tcp", "tls", "unix"]);
    assert!(router.metrics_address.is_some());
    let started = startup
        .iter()
        .find(|e| e["msg"] == "praefect started")
        .unwrap();
    assert_eq!(started["election_strategy"], "per_repository", "{started}");

    // And it serves: a repository created through it exists through it (the token came from
    // token_file, the database password from config_command).
    create(&router, "compat/every-key.git").await;
    let exists = RepositoryServiceClient::new(router.channel())
        .repository_exists(RepositoryExistsRequest {
            repository: Some(virtual_repo("compat/every-key.git")),
        })
        .await
        .unwrap()
        .into_inner()
        .exists;
    assert!(exists);

    // Nothing is warned about twice later on: the whole log has the start-up warnings only.
    let all = router.log_lines("ignoring configuration key");
    assert_eq!(all.len(), IGNORED.len(), "{all:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_misspelt_key_stops_serve_with_a_suggestion() {
    // The file is refused before anything is dialled or connected to.
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let node = NodeEntry::new("gitaly-1", "tcp://127.0.0.1:1");
    let config = write_go_config(dir.path(), &db.connection(), &[node]);
    let text = std::fs::read_to_string(&config).unwrap();
    let typo = text.replacen("listen_addr = ", "listen_adr = ", 1);
    assert_ne!(text, typo);
    std::fs::write(&config, typo).unwrap();

    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(BIN)
            .arg("-config")
            .arg(&config)
            .arg("serve")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains(
            r#"listen_adr: unknown configuration key "listen_adr", did you mean "listen_addr"?"#
        ),
        "{stderr}"
    );
    // It stopped before serving anything: nothing was logged.
    assert!(
        output.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
}
