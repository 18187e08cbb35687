//! Validation of a parsed configuration. Every problem is reported, each with the path of the
//! key it concerns, so an operator can fix a file in one pass.

use std::collections::HashSet;
use std::fmt;

use serde::Serialize;

use super::{Config, GoDuration, ProxyLimits, YAMUX_MIN_STREAM_WINDOW};

/// One problem in a configuration, at a key path such as
/// `["virtual_storage", "[1]", "node", "[0]", "address"]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ValidationError {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub key: Vec<String>,
    pub message: String,
}

impl ValidationError {
    pub fn new(key: &[&str], message: impl Into<String>) -> Self {
        ValidationError {
            key: key.iter().map(|s| s.to_string()).collect(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.key.join("."), self.message)
        }
    }
}

/// Node address schemes Praefect can dial.
pub const NODE_ADDRESS_SCHEMES: &[&str] = &["tcp://", "tls://", "unix:", "dns:", "dns+tls:"];

const SSL_MODES: &[&str] = &[
    "disable",
    "allow",
    "prefer",
    "require",
    "verify-ca",
    "verify-full",
];

/// Collects every validation error of `config`.
pub fn validate(config: &Config) -> Vec<ValidationError> {
    let mut errors = Errors::default();
    validate_listeners(config, &mut errors);
    validate_auth_and_tls(config, &mut errors);
    validate_logging(config, &mut errors);
    validate_database(config, &mut errors);
    validate_failover(config, &mut errors);
    validate_workers(config, &mut errors);
    validate_proxy_limits(config, &mut errors);
    validate_virtual_storages(config, &mut errors);
    errors.0
}

#[derive(Default)]
struct Errors(Vec<ValidationError>);

impl Errors {
    fn push(&mut self, key: Vec<String>, message: impl Into<String>) {
        self.0.push(ValidationError {
            key,
            message: message.into(),
        });
    }

    fn at(&mut self, key: &[&str], message: impl Into<String>) {
        self.0.push(ValidationError::new(key, message));
    }
}

/// Splits an explicit `scheme://` prefix off a listener address.
fn listener_scheme<'a>(addr: &'a str, default: &'a str) -> (&'a str, &'a str) {
    match addr.split_once("://") {
        Some((scheme, rest)) => (scheme, rest),
        None => (default, addr),
    }
}

fn validate_listeners(config: &Config, errors: &mut Errors) {
    let listeners = [
        ("listen_addr", config.listen_addr.as_str(), "tcp"),
        ("tls_listen_addr", config.tls_listen_addr.as_str(), "tls"),
        ("socket_path", config.socket_path.as_str(), "unix"),
    ];
    if listeners.iter().all(|(_, addr, _)| addr.is_empty()) {
        errors.at(
            &[],
            "no listener configured: set at least one of listen_addr, tls_listen_addr, socket_path",
        );
    }
    let mut seen: Vec<(&str, &str)> = Vec::new();
    for (key, addr, default_scheme) in listeners {
        if addr.is_empty() {
            continue;
        }
        let (scheme, rest) = listener_scheme(addr, default_scheme);
        if !["tcp", "tls", "unix"].contains(&scheme) {
            errors.at(&[key], format!("unsupported listener scheme {scheme:?}"));
        }
        if let Some((other, _)) = seen.iter().find(|(_, other_rest)| *other_rest == rest) {
            errors.at(
                &[key],
                format!("address {rest:?} is already used by {other}"),
            );
        }
        seen.push((key, rest));
    }
    if config.graceful_stop_timeout < GoDuration::ZERO {
        errors.at(&["graceful_stop_timeout"], "must not be negative");
    }
}

fn validate_auth_and_tls(config: &Config, errors: &mut Errors) {
    let tls = &config.tls;
    if !config.auth.token_file.is_empty() && !config.auth.token.is_empty() {
        errors.at(
            &["auth", "token_file"],
            "token and token_file are mutually exclusive",
        );
    }
    if !config.tls_listen_addr.is_empty() {
        if tls.certificate_path.is_empty() {
            errors.at(
                &["tls", "certificate_path"],
                "required when tls_listen_addr is set",
            );
        }
        if tls.key_path.is_empty() && tls.key.is_empty() {
            errors.at(&["tls", "key_path"], "required when tls_listen_addr is set");
        }
    }
    if !tls.key_path.is_empty() && !tls.key.is_empty() {
        errors.at(&["tls", "key"], "key and key_path are mutually exclusive");
    }
    if !["TLS 1.2", "TLS 1.3"].contains(&tls.min_version.as_str()) {
        errors.at(
            &["tls", "min_version"],
            format!(
                "unsupported value {:?}: use \"TLS 1.2\" or \"TLS 1.3\"",
                tls.min_version
            ),
        );
    }
}

fn validate_logging(config: &Config, errors: &mut Errors) {
    if !["text", "json"].contains(&config.logging.format.as_str()) {
        errors.at(
            &["logging", "format"],
            format!(
                "unsupported format {:?}: use \"text\" or \"json\"",
                config.logging.format
            ),
        );
    }
    let levels = [
        "trace", "debug", "info", "warn", "warning", "error", "fatal", "panic",
    ];
    if !levels.contains(&config.logging.level.to_ascii_lowercase().as_str()) {
        errors.at(
            &["logging", "level"],
            format!("unsupported level {:?}", config.logging.level),
        );
    }
    if config.prometheus.scrape_timeout < GoDuration::ZERO {
        errors.at(&["prometheus", "scrape_timeout"], "must not be negative");
    }
    if !is_sorted(&config.prometheus.grpc_latency_buckets) {
        errors.at(
            &["prometheus", "grpc_latency_buckets"],
            "buckets must be in increasing order",
        );
    }
}

fn is_sorted(values: &[f64]) -> bool {
    values.windows(2).all(|w| w[0] < w[1])
}

fn validate_database(config: &Config, errors: &mut Errors) {
    let sections = [
        (vec!["database"], config.database.connection()),
        (
            vec!["database", "session_pooled"],
            config.database.session_pooled.clone(),
        ),
    ];
    for (section, conn) in sections {
        let key = |leaf: &str| {
            let mut k: Vec<String> = section.iter().map(|s| s.to_string()).collect();
            k.push(leaf.to_string());
            k
        };
        if !conn.sslmode.is_empty() && !SSL_MODES.contains(&conn.sslmode.as_str()) {
            errors.push(
                key("sslmode"),
                format!(
                    "unsupported sslmode {:?}: use one of {}",
                    conn.sslmode,
                    SSL_MODES.join(", ")
                ),
            );
        }
        let hosts: Vec<&str> = if conn.host.is_empty() {
            Vec::new()
        } else {
            conn.host.split(',').map(str::trim).collect()
        };
        if hosts.iter().any(|h| h.is_empty()) {
            errors.push(key("host"), "empty host in the host list");
        }
        if !conn.port.is_empty() {
            let ports: Vec<&str> = conn.port.split(',').map(str::trim).collect();
            if let Some(bad) = ports
                .iter()
                .find(|p| p.parse::<u16>().map_or(true, |n| n == 0))
            {
                errors.push(key("port"), format!("invalid port {bad:?}"));
            } else if ports.len() > 1 && ports.len() != hosts.len() {
                errors.push(
                    key("port"),
                    format!(
                        "{} ports given for {} hosts: give one port, or one per host",
                        ports.len(),
                        hosts.len()
                    ),
                );
            }
        }
    }
    if !config.database.port_no_proxy.is_empty()
        && config.database.port_no_proxy.parse::<u16>().is_err()
    {
        errors.at(
            &["database", "port_no_proxy"],
            format!("invalid port {:?}", config.database.port_no_proxy),
        );
    }
}

fn validate_failover(config: &Config, errors: &mut Errors) {
    let failover = &config.failover;
    if !["per_repository", "sql", "local"].contains(&failover.election_strategy.as_str()) {
        errors.at(
            &["failover", "election_strategy"],
            format!(
                "unknown election strategy {:?}: use per_repository",
                failover.election_strategy
            ),
        );
    }
    let set = [
        failover.error_threshold_window.is_some(),
        failover.write_error_threshold_count.is_some(),
        failover.read_error_threshold_count.is_some(),
    ];
    if set.iter().any(|s| *s) && !set.iter().all(|s| *s) {
        errors.at(
            &["failover"],
            "error_threshold_window, write_error_threshold_count and read_error_threshold_count must be set together",
        );
    }
    if let Some(window) = failover.error_threshold_window {
        if !window.is_positive() {
            errors.at(&["failover", "error_threshold_window"], "must be positive");
        }
    }
    for (key, value) in [
        (
            "write_error_threshold_count",
            failover.write_error_threshold_count,
        ),
        (
            "read_error_threshold_count",
            failover.read_error_threshold_count,
        ),
    ] {
        if value == Some(0) {
            errors.at(&["failover", key], "must be at least 1");
        }
    }
}

fn validate_workers(config: &Config, errors: &mut Errors) {
    if config.replication.batch_size < 1 {
        errors.at(&["replication", "batch_size"], "must be at least 1");
    }
    if config.replication.parallel_storage_processing_workers < 1 {
        errors.at(
            &["replication", "parallel_storage_processing_workers"],
            "must be at least 1",
        );
    }
    if config.reconciliation.scheduling_interval < GoDuration::ZERO {
        errors.at(
            &["reconciliation", "scheduling_interval"],
            "must not be negative (0 disables the reconciler)",
        );
    }
    if !is_sorted(&config.reconciliation.histogram_buckets) {
        errors.at(
            &["reconciliation", "histogram_buckets"],
            "buckets must be in increasing order",
        );
    }
    let cleanup = &config.repositories_cleanup;
    let minute = GoDuration::from_secs(60);
    if cleanup.run_interval != GoDuration::ZERO {
        if cleanup.check_interval < minute {
            errors.at(
                &["repositories_cleanup", "check_interval"],
                format!("must be at least 1m0s, got {}", cleanup.check_interval),
            );
        }
        if cleanup.run_interval < minute {
            errors.at(
                &["repositories_cleanup", "run_interval"],
                format!(
                    "must be 0 (disabled) or at least 1m0s, got {}",
                    cleanup.run_interval
                ),
            );
        }
        if cleanup.repositories_in_batch < 1 {
            errors.at(
                &["repositories_cleanup", "repositories_in_batch"],
                "must be at least 1",
            );
        }
    }
    if config.yamux.maximum_stream_window_size_bytes < YAMUX_MIN_STREAM_WINDOW {
        errors.at(
            &["yamux", "maximum_stream_window_size_bytes"],
            format!("must be at least {YAMUX_MIN_STREAM_WINDOW}"),
        );
    }
    if config.yamux.accept_backlog < 1 {
        errors.at(&["yamux", "accept_backlog"], "must be at least 1");
    }
    validate_connections(&config.connections, errors);
}

fn validate_connections(limits: &crate::config::Connections, errors: &mut Errors) {
    let at_least = |errors: &mut Errors, key: &str, value: i64, min: i64, max: i64| {
        if value < min || value > max {
            errors.at(
                &["connections", key],
                format!("must be between {min} and {max}, got {value}"),
            );
        }
    };
    at_least(
        errors,
        "max_connections",
        limits.max_connections,
        1,
        1 << 30,
    );
    at_least(
        errors,
        "max_concurrent_streams",
        limits.max_concurrent_streams,
        1,
        i64::from(u32::MAX),
    );
    // Below 1 KiB not even an ordinary call's headers fit; HTTP/2 caps the setting at 2^32-1.
    at_least(
        errors,
        "max_header_list_size",
        limits.max_header_list_size,
        1024,
        i64::from(u32::MAX),
    );
    for (key, value) in [
        ("handshake_timeout", limits.handshake_timeout),
        ("keepalive_interval", limits.keepalive_interval),
        ("keepalive_timeout", limits.keepalive_timeout),
    ] {
        if !value.is_positive() {
            errors.at(
                &["connections", key],
                format!("must be positive, got {value}"),
            );
        }
    }
}

fn validate_proxy_limits(config: &Config, errors: &mut Errors) {
    let limits = &config.proxy;
    let max = ProxyLimits::MAX_FIRST_MESSAGE_BYTES_LIMIT;
    if !(1..=max).contains(&limits.max_first_message_bytes) {
        errors.at(
            &["proxy", "max_first_message_bytes"],
            format!(
                "must be between 1 and {max}, got {}",
                limits.max_first_message_bytes
            ),
        );
    }
    for (key, value) in [
        ("first_message_timeout", limits.first_message_timeout),
        ("sidechannel_idle_timeout", limits.sidechannel_idle_timeout),
    ] {
        if !value.is_positive() {
            errors.at(&["proxy", key], format!("must be positive, got {value}"));
        }
    }
}

fn validate_virtual_storages(config: &Config, errors: &mut Errors) {
    if config.virtual_storage.is_empty() {
        errors.at(
            &["virtual_storage"],
            "at least one virtual storage must be configured",
        );
    }
    let mut names = HashSet::new();
    for (i, vs) in config.virtual_storage.iter().enumerate() {
        let index = format!("[{i}]");
        let key = |rest: &[&str]| {
            let mut k = vec!["virtual_storage".to_string(), index.clone()];
            k.extend(rest.iter().map(|s| s.to_string()));
            k
        };
        if vs.name.is_empty() {
            errors.push(key(&["name"]), "virtual storage name is empty");
        } else if !names.insert(vs.name.as_str()) {
            errors.push(
                key(&["name"]),
                format!("virtual storage {:?} is configured more than once", vs.name),
            );
        }
        if vs.node.is_empty() {
            errors.push(key(&["node"]), "virtual storage has no nodes");
        }
        if vs.default_replication_factor < 0 {
            errors.push(
                key(&["default_replication_factor"]),
                "must not be negative (0 replicates to every node)",
            );
        } else if vs.default_replication_factor > vs.node.len() as i64 {
            errors.push(
                key(&["default_replication_factor"]),
                format!(
                    "replication factor {} is higher than the number of nodes ({})",
                    vs.default_replication_factor,
                    vs.node.len()
                ),
            );
        }
        let mut storages = HashSet::new();
        for (j, node) in vs.node.iter().enumerate() {
            let node_index = format!("[{j}]");
            if node.storage.is_empty() {
                errors.push(
                    key(&["node", &node_index, "storage"]),
                    "storage name is empty",
                );
            } else if !storages.insert(node.storage.as_str()) {
                errors.push(
                    key(&["node", &node_index, "storage"]),
                    format!(
                        "storage {:?} appears more than once in virtual storage {:?}",
                        node.storage, vs.name
                    ),
                );
            }
            if node.address.is_empty() {
                errors.push(key(&["node", &node_index, "address"]), "address is empty");
            } else if !NODE_ADDRESS_SCHEMES
                .iter()
                .any(|s| node.address.starts_with(s))
            {
                errors.push(
                    key(&["node", &node_index, "address"]),
                    format!(
                        "address {:?} has no supported scheme: use one of {}",
                        node.address,
                        NODE_ADDRESS_SCHEMES.join(" ")
                    ),
                );
            } else if let Err(err) = crate::nodes::check_address(&node.address) {
                // What making the node's channel would refuse at startup (a bad DNS server,
                // a port that is not a number), reported with the key like the rest.
                errors.push(key(&["node", &node_index, "address"]), err.to_string());
            }
        }
    }
}
