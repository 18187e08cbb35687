use super::*;

const EXAMPLE: &str = include_str!("../../config/praefect.example.toml");

const MINIMAL: &str = r#"
listen_addr = "127.0.0.1:2305"
[[virtual_storage]]
name = "default"
[[virtual_storage.node]]
storage = "gitaly-1"
address = "tcp://127.0.0.1:8075"
"#;

fn keys(errors: &[ValidationError]) -> Vec<String> {
    errors.iter().map(|e| e.key.join(".")).collect()
}

fn invalid(text: &str) -> Vec<ValidationError> {
    match load_str(text) {
        Err(ConfigError::Invalid(errors)) => errors,
        other => panic!("expected validation errors, got {other:?}"),
    }
}

#[test]
fn the_example_parses_cleanly_and_shows_the_defaults() {
    let config = load_str(EXAMPLE).expect("example config is valid");
    let defaults = Config::default();
    assert_eq!(config.graceful_stop_timeout, defaults.graceful_stop_timeout);
    assert_eq!(config.tls, defaults.tls);
    assert_eq!(config.logging, defaults.logging);
    assert_eq!(config.prometheus, defaults.prometheus);
    assert_eq!(config.failover, defaults.failover);
    assert_eq!(config.replication, defaults.replication);
    assert_eq!(config.reconciliation, defaults.reconciliation);
    assert_eq!(
        config.background_verification,
        defaults.background_verification
    );
    assert_eq!(config.repositories_cleanup, defaults.repositories_cleanup);
    assert_eq!(config.yamux, defaults.yamux);
    assert_eq!(config.proxy, defaults.proxy);
    assert_eq!(config.auth, defaults.auth);
    assert_eq!(config.virtual_storage.len(), 1);
    assert_eq!(config.virtual_storage[0].node.len(), 3);
    assert_eq!(config.database.port, "5432");
}

#[test]
fn defaults_match_praefect() {
    let (config, unknown) = parse_str(MINIMAL).unwrap();
    assert!(unknown.is_empty());
    assert_eq!(config.graceful_stop_timeout, GoDuration::from_secs(60));
    assert_eq!(config.replication.batch_size, 10);
    assert_eq!(config.replication.parallel_storage_processing_workers, 1);
    assert_eq!(
        config.reconciliation.scheduling_interval,
        GoDuration::from_secs(300)
    );
    assert_eq!(
        config.background_verification.verification_interval,
        GoDuration::from_secs(168 * 3600)
    );
    assert!(config.background_verification.delete_invalid_records);
    assert_eq!(
        config.repositories_cleanup.check_interval,
        GoDuration::from_secs(1800)
    );
    assert_eq!(
        config.repositories_cleanup.run_interval,
        GoDuration::from_secs(86400)
    );
    assert_eq!(config.repositories_cleanup.repositories_in_batch, 16);
    assert_eq!(config.yamux.maximum_stream_window_size_bytes, 262_144);
    assert_eq!(config.yamux.accept_backlog, 256);
    assert_eq!(config.prometheus.scrape_timeout, GoDuration::from_secs(10));
    assert_eq!(config.prometheus.grpc_latency_buckets.len(), 11);
    assert_eq!(config.tls.min_version, "TLS 1.2");
    assert_eq!(config.logging.format, "text");
    assert_eq!(config.logging.level, "info");
    assert!(config.failover.enabled);
    assert_eq!(config.failover.election_strategy, "per_repository");
    assert_eq!(config.virtual_storage[0].default_replication_factor, 0);
}

#[test]
fn every_key_is_read() {
    let text = r#"
listen_addr = "tcp://0.0.0.0:2305"
tls_listen_addr = "0.0.0.0:3305"
socket_path = "/run/praefect.sock"
prometheus_listen_addr = "0.0.0.0:9652"
memory_queue_enabled = true
graceful_stop_timeout = "1h30m"
i_understand_my_election_strategy_is_unsupported_and_will_be_removed_without_warning = true
[auth]
token = "secret"
transitioning = true
[tls]
certificate_path = "/cert.pem"
key_path = "/key.pem"
min_version = "TLS 1.3"
[logging]
format = "json"
level = "debug"
[sentry]
sentry_dsn = "https://sentry"
sentry_environment = "prod"
[prometheus]
scrape_timeout = "5s"
grpc_latency_buckets = [0.1, 1.0]
[database]
host = "db1,db2"
port = "5432,5433"
user = "u"
password = "p"
dbname = "d"
sslmode = "verify-full"
sslcert = "/c"
sslkey = "/k"
sslrootcert = "/r"
host_no_proxy = "direct"
port_no_proxy = 6432
[database.session_pooled]
host = "sp"
port = 5434
user = "spu"
[failover]
enabled = false
election_strategy = "sql"
error_threshold_window = "20s"
write_error_threshold_count = 5
read_error_threshold_count = 6
bootstrap_interval = "2s"
monitor_interval = "4s"
[replication]
batch_size = 7
parallel_storage_processing_workers = 3
[reconciliation]
scheduling_interval = "0"
histogram_buckets = [1.0, 2.0]
[background_verification]
verification_interval = "-1s"
delete_invalid_records = false
[repositories_cleanup]
check_interval = "2m"
run_interval = "0"
repositories_in_batch = 4
[yamux]
maximum_stream_window_size_bytes = 524288
accept_backlog = 8
[[virtual_storage]]
name = "vs1"
default_replication_factor = 2
[[virtual_storage.node]]
storage = "a"
address = "tls://a:1"
token = "ta"
[[virtual_storage.node]]
storage = "b"
address = "dns:b:2"
"#;
    let config = load_str(text).unwrap();
    assert_eq!(config.listen_addr, "tcp://0.0.0.0:2305");
    assert_eq!(config.tls_listen_addr, "0.0.0.0:3305");
    assert_eq!(config.socket_path, "/run/praefect.sock");
    assert_eq!(config.prometheus_listen_addr, "0.0.0.0:9652");
    assert!(config.memory_queue_enabled);
    assert_eq!(config.graceful_stop_timeout, GoDuration::from_secs(5400));
    assert_eq!(config.effective_election_strategy(), "sql");
    assert_eq!(config.auth.token, "secret");
    assert!(config.auth.transitioning);
    assert_eq!(config.tls.min_version, "TLS 1.3");
    assert_eq!(config.logging.format, "json");
    assert_eq!(config.sentry.sentry_environment, "prod");
    assert_eq!(config.prometheus.grpc_latency_buckets, [0.1, 1.0]);
    assert_eq!(config.database.host, "db1,db2");
    assert_eq!(config.database.port, "5432,5433");
    assert_eq!(config.database.sslrootcert, "/r");
    assert_eq!(config.database.port_no_proxy, "6432");
    let direct = config.direct_database();
    assert_eq!(
        (
            direct.host.as_str(),
            direct.port.as_str(),
            direct.user.as_str(),
            direct.dbname.as_str()
        ),
        ("sp", "5434", "spu", "d")
    );
    assert!(!config.failover.enabled);
    assert_eq!(
        config.failover.error_threshold_window,
        Some(GoDuration::from_secs(20))
    );
    assert_eq!(config.failover.read_error_threshold_count, Some(6));
    assert_eq!(config.replication.parallel_storage_processing_workers, 3);
    assert_eq!(config.reconciliation.scheduling_interval, GoDuration::ZERO);
    assert!(!config
        .background_verification
        .verification_interval
        .is_positive());
    assert_eq!(config.repositories_cleanup.repositories_in_batch, 4);
    assert_eq!(config.yamux.accept_backlog, 8);
    assert_eq!(config.virtual_storage[0].default_replication_factor, 2);
    assert_eq!(config.virtual_storage[0].node[1].address, "dns:b:2");
    assert_eq!(config.virtual_storage[0].node[0].token, "ta");
}

#[test]
fn the_election_strategy_is_forced_to_per_repository() {
    let text = format!("{MINIMAL}\n[failover]\nelection_strategy = \"sql\"\n");
    let config = load_str(&text).unwrap();
    assert_eq!(config.effective_election_strategy(), "per_repository");
}

#[test]
fn direct_database_falls_back_to_no_proxy_then_main() {
    let text = format!(
        "{MINIMAL}\n[database]\nhost = \"pgbouncer\"\nport = 6432\nhost_no_proxy = \"pg\"\ndbname = \"x\"\n"
    );
    let direct = load_str(&text).unwrap().direct_database();
    assert_eq!((direct.host.as_str(), direct.port.as_str()), ("pg", "6432"));
    assert_eq!(direct.dbname, "x");
}

#[test]
fn unknown_keys_are_all_reported_with_their_paths() {
    let text = format!(
        "{MINIMAL}\nlisten_adress = \"x\"\n[replication]\nbatchsize = 3\n[[virtual_storage]]\nname = \"b\"\n[[virtual_storage.node]]\nstorage = \"s\"\naddress = \"tcp://h:1\"\ntokn = \"t\"\n"
    );
    // `listen_adress` lands in the last [[virtual_storage.node]] because of TOML table scoping.
    let errors = invalid(&text);
    let found = keys(&errors);
    assert!(
        found.contains(&"virtual_storage.[0].node.[0].listen_adress".to_string()),
        "{found:?}"
    );
    assert!(
        found.contains(&"replication.batchsize".to_string()),
        "{found:?}"
    );
    assert!(
        found.contains(&"virtual_storage.[1].node.[0].tokn".to_string()),
        "{found:?}"
    );
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert!(errors[0].message.contains("unknown configuration key"));
}

#[test]
fn validation_collects_every_error() {
    let text = r#"
graceful_stop_timeout = "-1s"
[logging]
format = "xml"
[replication]
batch_size = 0
[yamux]
maximum_stream_window_size_bytes = 1024
accept_backlog = 0
[repositories_cleanup]
check_interval = "10s"
[failover]
error_threshold_window = "10s"
[[virtual_storage]]
name = "vs"
default_replication_factor = 3
[[virtual_storage.node]]
storage = "a"
address = "tcp://a:1"
[[virtual_storage.node]]
storage = "a"
address = "http://b"
[[virtual_storage]]
name = "vs"
[[virtual_storage]]
name = ""
[[virtual_storage.node]]
address = ""
"#;
    let found = keys(&invalid(text));
    for expected in [
        "",
        "graceful_stop_timeout",
        "logging.format",
        "replication.batch_size",
        "yamux.maximum_stream_window_size_bytes",
        "yamux.accept_backlog",
        "repositories_cleanup.check_interval",
        "failover",
        "virtual_storage.[0].default_replication_factor",
        "virtual_storage.[0].node.[1].storage",
        "virtual_storage.[0].node.[1].address",
        "virtual_storage.[1].name",
        "virtual_storage.[1].node",
        "virtual_storage.[2].name",
        "virtual_storage.[2].node.[0].storage",
        "virtual_storage.[2].node.[0].address",
    ] {
        assert!(
            found.contains(&expected.to_string()),
            "missing {expected:?} in {found:?}"
        );
    }
}

#[test]
fn node_addresses_with_a_bad_dns_server_are_validation_errors() {
    let text = r#"
listen_addr = "127.0.0.1:2305"
[[virtual_storage]]
name = "default"
[[virtual_storage.node]]
storage = "gitaly-1"
address = "dns://127.0.0.1:8600/gitaly-1.service.consul:8075"
[[virtual_storage.node]]
storage = "gitaly-2"
address = "dns://consul.internal:8600/gitaly-2.service.consul:8075"
[[virtual_storage.node]]
storage = "gitaly-3"
address = "dns+tls://127.0.0.1:99999/gitaly-3.service.consul:8075"
[[virtual_storage.node]]
storage = "gitaly-4"
address = "dns://127.0.0.1:8600"
"#;
    let errors = invalid(text);
    let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        keys(&errors),
        [
            "virtual_storage.[0].node.[1].address",
            "virtual_storage.[0].node.[2].address",
            "virtual_storage.[0].node.[3].address",
        ],
        "{messages:#?}"
    );
    assert!(
        messages[0].contains("DNS server \"consul.internal:8600\" is not an IP address"),
        "{}",
        messages[0]
    );
    assert!(
        messages[1].contains("DNS server \"127.0.0.1:99999\" has no valid port"),
        "{}",
        messages[1]
    );
    assert!(
        messages[2].contains("names no host after the DNS server"),
        "{}",
        messages[2]
    );
    // The same addresses with a DNS server the router can ask are accepted.
    let fixed = text
        .replace("consul.internal:8600", "10.0.0.53")
        .replace("127.0.0.1:99999", "[::1]:8600")
        .replace(
            "\"dns://127.0.0.1:8600\"",
            "\"dns:///gitaly-4.service.consul:8075\"",
        );
    load_str(&fixed).unwrap();
}

#[test]
fn no_virtual_storage_and_listener_conflicts() {
    let found = keys(&invalid(
        "listen_addr = \"127.0.0.1:1\"\nsocket_path = \"unix://127.0.0.1:1\"\n",
    ));
    assert!(found.contains(&"virtual_storage".to_string()), "{found:?}");
    assert!(found.contains(&"socket_path".to_string()), "{found:?}");
}

#[test]
fn syntax_and_type_errors_give_line_and_column() {
    let err = load_str("listen_addr = \"x\"\n[replication\n").unwrap_err();
    let ConfigError::Syntax(error) = err else {
        panic!("{err:?}")
    };
    assert!(error.key.is_empty());
    assert!(
        error.message.starts_with("line 2 column"),
        "{}",
        error.message
    );

    let err = load_str("[replication]\nbatch_size = \"ten\"\n").unwrap_err();
    let ConfigError::Syntax(error) = err else {
        panic!("{err:?}")
    };
    assert_eq!(error.key, ["replication", "batch_size"]);
    assert!(
        error.message.starts_with("line 2 column 14"),
        "{}",
        error.message
    );

    let err = load_str("graceful_stop_timeout = \"5 minutes\"\n").unwrap_err();
    let ConfigError::Syntax(error) = err else {
        panic!("{err:?}")
    };
    assert_eq!(error.key, ["graceful_stop_timeout"]);
    assert!(error.message.contains("duration"), "{}", error.message);
}

#[test]
fn token_file_is_read_and_must_be_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    std::fs::write(&path, "  s3cret\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let text = format!(
        "{MINIMAL}\n[auth]\ntoken_file = {:?}\n",
        path.display().to_string()
    );
    assert_eq!(load_str(&text).unwrap().auth.token, "s3cret");

    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let errors = invalid(&text);
    assert_eq!(keys(&errors), ["auth.token_file"]);
    assert!(
        errors[0].message.contains("0600 or 0400"),
        "{}",
        errors[0].message
    );

    let both = format!("{text}token = \"x\"\n");
    assert!(keys(&invalid(&both)).contains(&"auth.token_file".to_string()));
}

#[test]
fn config_command_output_is_merged_on_top() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("secrets.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\necho '{\"database\": {\"password\": \"from-command\"}, \"replication\": {\"batch_size\": 42}}'\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let text = format!(
        "config_command = {:?}\n{MINIMAL}",
        script.display().to_string()
    );
    let config = load_str(&text).unwrap();
    assert_eq!(config.database.password, "from-command");
    assert_eq!(config.replication.batch_size, 42);
    assert_eq!(config.virtual_storage[0].node[0].storage, "gitaly-1");

    std::fs::write(&script, "#!/bin/sh\necho '{\"databse\": {}}'\n").unwrap();
    assert_eq!(keys(&invalid(&text)), ["databse"]);

    std::fs::write(&script, "#!/bin/sh\nexit 3\n").unwrap();
    assert!(matches!(
        load_str(&text),
        Err(ConfigError::ConfigCommand(_))
    ));
}

/// Hostile or careless input: every case is an error with a key path, never a panic (a
/// panic in debug builds is how the long-fraction duration overflow showed).
#[test]
fn bad_input_is_an_error_never_a_panic() {
    let cases: &[(&str, &str)] = &[
        (
            "graceful_stop_timeout = \"99999999999999999999h\"",
            "graceful_stop_timeout",
        ),
        (
            "graceful_stop_timeout = \"9223372036854775807ns1ns\"",
            "graceful_stop_timeout",
        ),
        ("graceful_stop_timeout = \"-.s\"", "graceful_stop_timeout"),
        ("graceful_stop_timeout = \"1\u{0}s\"", "line 1 column"),
        ("graceful_stop_timeout = 5", "graceful_stop_timeout"),
        (
            "[replication]\nbatch_size = 99999999999999999999",
            "number too large",
        ),
        ("[replication]\nbatch_size = -1", "replication.batch_size"),
        (
            "[yamux]\nmaximum_stream_window_size_bytes = -5",
            "yamux.maximum_stream_window_size_bytes",
        ),
        ("[database]\nport = 70000", "database.port"),
        ("[[virtual_storage]]\nname = \"\"", "virtual_storage"),
        ("virtual_storage = 3", "virtual_storage"),
        ("listen_addr = [1, 2]", "listen_addr"),
    ];
    for (fragment, key) in cases {
        let text = format!("{MINIMAL}\n{fragment}\n");
        // Fragments that only add keys go before the tables of MINIMAL.
        let text = if fragment.starts_with('[') {
            text
        } else {
            format!("{fragment}\n{MINIMAL}")
        };
        let outcome = std::panic::catch_unwind(|| load_str(&text));
        let Ok(result) = outcome else {
            panic!("{fragment:?} panicked");
        };
        let Err(err) = result else {
            panic!("{fragment:?} was accepted");
        };
        let message = format!("{err:?}");
        let first_key = key.split('.').next().unwrap_or(key);
        assert!(message.contains(first_key), "{fragment:?}: {message}");
    }
    // Go truncates fraction digits beyond what a nanosecond count holds: about an hour.
    let config = load_str(&format!(
        "graceful_stop_timeout = \"0.99999999999999999999999999h\"\n{MINIMAL}"
    ))
    .unwrap();
    let nanos = config.graceful_stop_timeout.as_nanos();
    assert!(
        (3_599_000_000_000..=3_600_000_000_000).contains(&nanos),
        "{nanos}"
    );
}

/// Every key of Go Praefect's configuration structs (GitLab 15 to 18), as key paths; `[0]`
/// stands for an element of an array table.
const GO_PRAEFECT_KEYS: &[&str] = &[
    "listen_addr",
    "tls_listen_addr",
    "socket_path",
    "prometheus_listen_addr",
    "prometheus_exclude_database_from_default_metrics",
    "memory_queue_enabled",
    "graceful_stop_timeout",
    "config_command",
    "failover_enabled",
    "i_understand_my_election_strategy_is_unsupported_and_will_be_removed_without_warning",
    "auth.token",
    "auth.token_file",
    "auth.transitioning",
    "tls.certificate_path",
    "tls.key_path",
    "tls.key",
    "tls.min_version",
    "logging.format",
    "logging.level",
    "logging.dir",
    "sentry.sentry_dsn",
    "sentry.sentry_environment",
    "prometheus.scrape_timeout",
    "prometheus.grpc_latency_buckets",
    "database.host",
    "database.port",
    "database.user",
    "database.password",
    "database.dbname",
    "database.sslmode",
    "database.sslcert",
    "database.sslkey",
    "database.sslrootcert",
    "database.host_no_proxy",
    "database.port_no_proxy",
    "database.session_pooled.host",
    "database.session_pooled.port",
    "database.session_pooled.user",
    "database.session_pooled.password",
    "database.session_pooled.dbname",
    "database.session_pooled.sslmode",
    "database.session_pooled.sslcert",
    "database.session_pooled.sslkey",
    "database.session_pooled.sslrootcert",
    "failover.enabled",
    "failover.election_strategy",
    "failover.error_threshold_window",
    "failover.write_error_threshold_count",
    "failover.read_error_threshold_count",
    "failover.bootstrap_interval",
    "failover.monitor_interval",
    "replication.batch_size",
    "replication.parallel_storage_processing_workers",
    "reconciliation.scheduling_interval",
    "reconciliation.histogram_buckets",
    "background_verification.verification_interval",
    "background_verification.delete_invalid_records",
    "repositories_cleanup.check_interval",
    "repositories_cleanup.run_interval",
    "repositories_cleanup.repositories_in_batch",
    "yamux.maximum_stream_window_size_bytes",
    "yamux.accept_backlog",
    "virtual_storage.[0].name",
    "virtual_storage.[0].default_replication_factor",
    "virtual_storage.[0].node.[0].storage",
    "virtual_storage.[0].node.[0].address",
    "virtual_storage.[0].node.[0].token",
];

fn segments(path: &str) -> Vec<String> {
    path.split('.').map(str::to_string).collect()
}

fn is_known(path: &str) -> bool {
    let path = segments(path);
    let (key, parent) = path.split_last().unwrap();
    known_keys(parent).contains(key)
}

/// Every key path of a TOML document, arrays of tables as `[i]`.
fn toml_paths(value: &toml::Value, prefix: &mut Vec<String>, out: &mut Vec<String>) {
    match value {
        toml::Value::Table(table) => {
            for (key, child) in table {
                prefix.push(key.clone());
                out.push(prefix.join("."));
                toml_paths(child, prefix, out);
                prefix.pop();
            }
        }
        toml::Value::Array(items) if items.iter().all(toml::Value::is_table) => {
            for (i, item) in items.iter().enumerate() {
                prefix.push(format!("[{i}]"));
                toml_paths(item, prefix, out);
                prefix.pop();
            }
        }
        _ => {}
    }
}

#[test]
fn every_go_praefect_key_is_known() {
    for key in GO_PRAEFECT_KEYS {
        assert!(is_known(key), "{key} is not a known key");
    }
    // And the check can fail.
    assert!(!is_known("listen_adr"));
    assert!(!is_known("virtual_storage.[0].node.[0].primary"));
}

#[test]
fn every_key_of_the_example_is_known() {
    let example: toml::Value = toml::from_str(EXAMPLE).unwrap();
    let mut paths = Vec::new();
    toml_paths(&example, &mut Vec::new(), &mut paths);
    assert!(paths.len() > 60, "{paths:?}");
    for path in &paths {
        assert!(is_known(path), "{path} is not a known key");
    }
}

#[test]
fn known_keys_per_table() {
    assert_eq!(
        known_keys(&segments("virtual_storage.[3].node.[1]")),
        ["address", "storage", "token"]
    );
    assert_eq!(known_keys(&segments("logging")), ["dir", "format", "level"]);
    assert!(known_keys(&segments("database")).contains(&"stale_read_window".to_string()));
    assert!(known_keys(&segments("database.session_pooled")).contains(&"sslrootcert".to_string()));
    assert!(known_keys(&segments("nonexistent")).is_empty());
    assert!(known_keys(&segments("listen_addr")).is_empty());
}

/// A file as Omnibus writes it from `praefect['configuration']` (integers where the Ruby
/// hash had integers, `verification_interval: 0` as Omnibus's docs advise when migrating,
/// empty tables for unset sections), plus the keys Omnibus leaves out: it loads as Go
/// Praefect would read it.
#[test]
fn an_omnibus_style_file_with_every_go_key_loads() {
    let text = r#"
listen_addr = "0.0.0.0:2305"
socket_path = "/var/opt/gitlab/praefect/cluster.socket"
prometheus_listen_addr = "0.0.0.0:9652"
prometheus_exclude_database_from_default_metrics = true
tls_listen_addr = "0.0.0.0:3305"
memory_queue_enabled = false
graceful_stop_timeout = "1m30s"
config_command = ""
failover_enabled = true
i_understand_my_election_strategy_is_unsupported_and_will_be_removed_without_warning = false

[auth]
token = "external-token"
token_file = ""
transitioning = false

[tls]
certificate_path = "/etc/gitlab/ssl/praefect.crt"
key_path = "/etc/gitlab/ssl/praefect.key"
key = ""
min_version = "TLS 1.3"

[logging]
format = "json"
level = "warning"
dir = "/var/log/gitlab/praefect"

[sentry]

[prometheus]
scrape_timeout = "10s"
grpc_latency_buckets = [0.001, 0.005, 0.025, 0.1, 0.5, 1, 10, 30, 60, 300, 1500]

[database]
host = "10.0.0.5"
port = 6432
user = "praefect"
password = "secret"
dbname = "praefect_production"
sslmode = "prefer"
sslcert = ""
sslkey = ""
sslrootcert = ""
host_no_proxy = ""
port_no_proxy = 0

[database.session_pooled]
host = "10.0.0.6"
port = 5432
user = "praefect"
password = "secret"
dbname = "praefect_production"
sslmode = "prefer"
sslcert = ""
sslkey = ""
sslrootcert = ""

[failover]
enabled = false
election_strategy = "per_repository"
bootstrap_interval = "1s"
monitor_interval = "3s"

[replication]
batch_size = 20
parallel_storage_processing_workers = 2

[reconciliation]
scheduling_interval = "1m30s"
histogram_buckets = [0, 1, 2]

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
default_replication_factor = 3

[[virtual_storage.node]]
storage = "gitaly-1"
address = "tcp://10.0.0.11:8075"
token = "internal-token"

[[virtual_storage.node]]
storage = "gitaly-2"
address = "tls://10.0.0.12:9999"
token = "internal-token"

[[virtual_storage.node]]
storage = "gitaly-3"
address = "dns:///gitaly-3.internal:8075"
token = "internal-token"
"#;
    let config = load_str(text).unwrap();
    assert_eq!(config.graceful_stop_timeout, GoDuration::from_secs(90));
    assert_eq!(
        config.reconciliation.scheduling_interval,
        GoDuration::from_secs(90)
    );
    assert_eq!(config.reconciliation.histogram_buckets, [0.0, 1.0, 2.0]);
    assert_eq!(config.prometheus.grpc_latency_buckets[5], 1.0);
    assert_eq!(
        config.background_verification.verification_interval,
        GoDuration::ZERO
    );
    assert_eq!(config.database.port, "6432");
    assert_eq!(config.database.port_no_proxy, "");
    assert_eq!(config.logging.dir, "/var/log/gitlab/praefect");
    assert_eq!(config.tls.min_version, "TLS 1.3");
    assert_eq!(config.direct_database().host, "10.0.0.6");
    // failover_enabled = true wins over [failover] enabled = false, as in Go Praefect.
    assert!(config.failover.enabled);
    // Only logging.dir asks for something we do not do.
    assert_eq!(
        ignored_keys(&config)
            .iter()
            .map(|k| k.key)
            .collect::<Vec<_>>(),
        ["logging.dir"]
    );
}

/// Go decodes a duration from the literal text of the TOML value whatever its type: the
/// integer 0 is zero, any other integer lacks a unit.
#[test]
fn integer_durations_are_read_as_go_reads_them() {
    let config = load_str(&format!(
        "graceful_stop_timeout = 0\n{MINIMAL}\n[repositories_cleanup]\nrun_interval = 0\n"
    ))
    .unwrap();
    assert_eq!(config.repositories_cleanup.run_interval, GoDuration::ZERO);
    // Zero means "unset" here, as in Go Praefect: the default applies.
    assert_eq!(config.graceful_stop_timeout, GoDuration::from_secs(60));
    for bad in ["5", "-1", "1.5"] {
        let err = load_str(&format!("graceful_stop_timeout = {bad}\n{MINIMAL}")).unwrap_err();
        let ConfigError::Syntax(error) = err else {
            panic!("{bad}: {err:?}")
        };
        assert_eq!(error.key, ["graceful_stop_timeout"], "{bad}");
        assert!(
            error.message.contains("missing unit") || error.message.contains("duration"),
            "{bad}: {}",
            error.message
        );
    }
}

#[test]
fn zero_timings_take_go_praefects_defaults() {
    let text = format!(
        "graceful_stop_timeout = \"0s\"\n{MINIMAL}\n[failover]\nbootstrap_interval = \"0\"\nmonitor_interval = 0\n"
    );
    let config = load_str(&text).unwrap();
    assert_eq!(config.graceful_stop_timeout, GoDuration::from_secs(60));
    assert_eq!(config.failover, Failover::default());
    assert!(ignored_keys(&config).is_empty());
    // Only zero: any other value is kept.
    let text = format!("graceful_stop_timeout = \"1ms\"\n{MINIMAL}");
    assert_eq!(
        load_str(&text).unwrap().graceful_stop_timeout,
        GoDuration::from_millis(1)
    );
}

#[test]
fn failover_enabled_only_turns_failover_on() {
    let off = format!("failover_enabled = false\n{MINIMAL}\n[failover]\nenabled = false\n");
    assert!(!load_str(&off).unwrap().failover.enabled);
    let on = format!("failover_enabled = true\n{MINIMAL}\n[failover]\nenabled = false\n");
    assert!(load_str(&on).unwrap().failover.enabled);
}

fn unknown_key_messages(text: &str) -> Vec<String> {
    invalid(text)
        .iter()
        .filter(|e| e.message.starts_with("unknown configuration key"))
        .map(ValidationError::to_string)
        .collect()
}

#[test]
fn near_miss_keys_get_a_suggestion() {
    let text = format!(
        "listen_adr = \"127.0.0.1:2305\"\nListen_Addr = \"x\"\n{MINIMAL}tokn = \"t\"\n[replication]\nbatchsize = 3\n[databse]\nhost = \"db\"\n[database.session_pooled]\nhots = \"db\"\n[[virtual_storage]]\nname = \"b\"\n[[virtual_storage.nodes]]\nstorage = \"s\"\n"
    );
    let messages = unknown_key_messages(&text);
    for expected in [
        r#"listen_adr: unknown configuration key "listen_adr", did you mean "listen_addr"?"#,
        r#"Listen_Addr: unknown configuration key "Listen_Addr", did you mean "listen_addr"?"#,
        r#"virtual_storage.[0].node.[0].tokn: unknown configuration key "virtual_storage.[0].node.[0].tokn", did you mean "token"?"#,
        r#"replication.batchsize: unknown configuration key "replication.batchsize", did you mean "batch_size"?"#,
        r#"databse: unknown configuration key "databse", did you mean "database"?"#,
        r#"database.session_pooled.hots: unknown configuration key "database.session_pooled.hots", did you mean "host"?"#,
        r#"virtual_storage.[1].nodes: unknown configuration key "virtual_storage.[1].nodes", did you mean "node"?"#,
    ] {
        assert!(
            messages.contains(&expected.to_string()),
            "missing {expected:?} in {messages:#?}"
        );
    }
    assert_eq!(messages.len(), 7, "{messages:#?}");
}

#[test]
fn unrelated_keys_get_no_suggestion_and_misplaced_top_level_keys_a_hint() {
    let text = format!(
        "colour = \"blue\"\n{MINIMAL}\n[auth]\nname = \"x\"\n[logging]\nlisten_addr = \"127.0.0.1:1\"\n"
    );
    let messages = unknown_key_messages(&text);
    assert_eq!(
        messages,
        [
            r#"colour: unknown configuration key "colour""#,
            r#"auth.name: unknown configuration key "auth.name""#,
            r#"logging.listen_addr: unknown configuration key "logging.listen_addr", "listen_addr" is a top-level key: put it before the first [table] header"#,
        ],
    );
    assert_eq!(suggestion(&segments("node")), None);
    assert_eq!(
        suggestion(&segments("virtual_storage.[0].nmae")),
        Some("did you mean \"name\"?".to_string())
    );
}

#[test]
fn config_command_typos_get_a_suggestion_too() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("secrets.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\necho '{\"database\": {\"pasword\": \"x\"}}'\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let text = format!(
        "config_command = {:?}\n{MINIMAL}",
        script.display().to_string()
    );
    assert_eq!(
        unknown_key_messages(&text),
        [
            r#"database.pasword: unknown configuration key "database.pasword", did you mean "password"?"#
        ]
    );
}

fn ignored(text: &str) -> Vec<&'static str> {
    ignored_keys(&load_str(text).unwrap())
        .iter()
        .map(|k| k.key)
        .collect()
}

#[test]
fn keys_at_their_defaults_are_not_ignored() {
    assert!(ignored_keys(&Config::default()).is_empty());
    assert!(ignored(MINIMAL).is_empty());
    assert!(
        ignored(EXAMPLE).is_empty(),
        "the example must start quietly"
    );
    // Set, but to what we do anyway.
    let text = format!(
        "memory_queue_enabled = false\n{MINIMAL}\n[sentry]\nsentry_dsn = \"\"\n[logging]\ndir = \"\"\n[failover]\nenabled = true\nbootstrap_interval = \"1s\"\nmonitor_interval = \"3s\"\nelection_strategy = \"sql\"\n"
    );
    // Without the opt-out flag Go forces per_repository too: nothing of ours to warn about.
    assert!(ignored(&text).is_empty(), "{:?}", ignored(&text));
}

#[test]
fn every_ignored_key_is_named_once_with_its_reason() {
    let text = format!(
        "memory_queue_enabled = true\ni_understand_my_election_strategy_is_unsupported_and_will_be_removed_without_warning = true\n{MINIMAL}\n[logging]\ndir = \"/var/log/gitlab/praefect\"\n[sentry]\nsentry_dsn = \"https://key@sentry.example.com/1\"\nsentry_environment = \"production\"\n[failover]\nenabled = false\nelection_strategy = \"sql\"\nerror_threshold_window = \"20s\"\nwrite_error_threshold_count = 10\nread_error_threshold_count = 100\nbootstrap_interval = \"5s\"\nmonitor_interval = \"10s\"\n"
    );
    let config = load_str(&text).unwrap();
    let found = ignored_keys(&config);
    let keys: Vec<&str> = found.iter().map(|k| k.key).collect();
    assert_eq!(
        keys,
        [
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
        ]
    );
    assert_eq!(found, ignorable_keys(), "a rule is never triggered here");
    for key in &found {
        assert!(is_known(key.key), "{} names no key", key.key);
        assert!(!key.reason.is_empty());
        assert!(
            key.to_string()
                .starts_with(&format!("{} is ignored: ", key.key)),
            "{key}"
        );
    }
    // Each rule looks at its own key only.
    let text = format!("{MINIMAL}\n[sentry]\nsentry_environment = \"production\"\n");
    assert_eq!(ignored(&text), ["sentry.sentry_environment"]);
    let text = format!("{MINIMAL}\n[failover]\nmonitor_interval = \"1s\"\n");
    assert_eq!(ignored(&text), ["failover.monitor_interval"]);
}

#[test]
fn proxy_limits_default_set_and_validated() {
    let (config, _) = parse_str(MINIMAL).unwrap();
    assert_eq!(config.proxy.max_first_message(), 4 * 1024 * 1024);
    assert_eq!(
        config.proxy.first_message_timeout,
        GoDuration::from_secs(20)
    );
    assert_eq!(
        config.proxy.sidechannel_idle_timeout,
        GoDuration::from_secs(60)
    );

    let set = load_str(&format!(
        "{MINIMAL}[proxy]\nmax_first_message_bytes = 1024\nfirst_message_timeout = \"3s\"\nsidechannel_idle_timeout = \"500ms\"\n"
    ))
    .unwrap();
    assert_eq!(set.proxy.max_first_message(), 1024);
    assert_eq!(set.proxy.first_message_timeout, GoDuration::from_secs(3));
    assert_eq!(
        set.proxy.sidechannel_idle_timeout,
        GoDuration::from_millis(500)
    );

    let errors = invalid(&format!(
        "{MINIMAL}[proxy]\nmax_first_message_bytes = 0\nfirst_message_timeout = 0\nsidechannel_idle_timeout = \"-1s\"\n"
    ));
    assert_eq!(
        keys(&errors),
        [
            "proxy.max_first_message_bytes",
            "proxy.first_message_timeout",
            "proxy.sidechannel_idle_timeout"
        ]
    );
    let errors = invalid(&format!(
        "{MINIMAL}[proxy]\nmax_first_message_bytes = 4294967296\n"
    ));
    assert_eq!(keys(&errors), ["proxy.max_first_message_bytes"]);
}

#[test]
fn connection_limits_are_read_and_checked() {
    let config = load_str(&format!(
        "{MINIMAL}\n[connections]\nmax_connections = 50\nhandshake_timeout = \"3s\"\n"
    ))
    .unwrap();
    let limits = config.connections.limit_settings();
    assert_eq!(limits.max_connections, 50);
    assert_eq!(limits.handshake_timeout, std::time::Duration::from_secs(3));
    assert_eq!(limits.max_concurrent_streams, 1000, "the default");
    let found = keys(&invalid(&format!(
        "{MINIMAL}\n[connections]\nmax_connections = 0\nmax_concurrent_streams = -1\n\
         handshake_timeout = \"0s\"\nkeepalive_interval = \"-1s\"\nmax_header_list_size = 10\n"
    )));
    for key in [
        "connections.max_connections",
        "connections.max_concurrent_streams",
        "connections.handshake_timeout",
        "connections.keepalive_interval",
        "connections.max_header_list_size",
    ] {
        assert!(found.contains(&key.to_string()), "{key} not in {found:?}");
    }
}
