//! Praefect's TOML configuration: the same keys and defaults as the Go Praefect, so that
//! existing Omnibus and Helm templates produce files we read unchanged.
//!
//! Loading happens in [`load`]: TOML over built-in defaults, unknown keys collected (Praefect
//! ignores typos silently; we report them, with a "did you mean" from [`keys`]), then
//! `config_command` output merged on top, `token_file` read, and every validation error
//! collected with its key path in [`validate`]. Keys that are read but change nothing here
//! are listed by [`ignored`], which `serve` warns about at startup.

mod duration;
mod ignored;
mod keys;
mod load;
mod validate;

pub use duration::{DurationError, GoDuration};
pub use ignored::{ignorable_keys, ignored_keys, IgnoredKey};
pub use keys::{known_keys, suggestion};
pub use load::{load_file, load_str, parse_str, ConfigError};
pub use validate::{validate, ValidationError};

use serde::{Deserialize, Serialize};

/// The election strategy Praefect uses whatever the file says, unless the operator sets the
/// "i understand" flag.
pub const ELECTION_STRATEGY_PER_REPOSITORY: &str = "per_repository";

/// The whole configuration file.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Config {
    pub listen_addr: String,
    pub tls_listen_addr: String,
    pub socket_path: String,
    pub prometheus_listen_addr: String,
    /// Keep the metrics that query the database to `/db_metrics` (the default); `false` serves
    /// them on `/metrics` too. Omnibus writes this key.
    pub prometheus_exclude_database_from_default_metrics: bool,
    pub memory_queue_enabled: bool,
    pub graceful_stop_timeout: GoDuration,
    pub config_command: String,
    pub i_understand_my_election_strategy_is_unsupported_and_will_be_removed_without_warning: bool,
    pub auth: Auth,
    pub tls: Tls,
    pub logging: Logging,
    pub sentry: Sentry,
    pub prometheus: Prometheus,
    pub database: Database,
    pub failover: Failover,
    /// Go Praefect's key from before `[failover]` existed (read until GitLab 15): `true`
    /// turns failover on whatever `[failover] enabled` says, as it did there.
    pub failover_enabled: bool,
    pub replication: Replication,
    pub reconciliation: Reconciliation,
    pub background_verification: BackgroundVerification,
    pub repositories_cleanup: RepositoriesCleanup,
    pub yamux: Yamux,
    /// praefect-rs: bounds on what one forwarded call may cost the router.
    pub proxy: ProxyLimits,
    /// Not a Go Praefect key: the limits on what clients may hold on the router's listeners.
    pub connections: Connections,
    pub virtual_storage: Vec<VirtualStorage>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen_addr: String::new(),
            tls_listen_addr: String::new(),
            socket_path: String::new(),
            prometheus_listen_addr: String::new(),
            prometheus_exclude_database_from_default_metrics: true,
            memory_queue_enabled: false,
            graceful_stop_timeout: GoDuration::from_secs(60),
            config_command: String::new(),
            i_understand_my_election_strategy_is_unsupported_and_will_be_removed_without_warning:
                false,
            auth: Auth::default(),
            tls: Tls::default(),
            logging: Logging::default(),
            sentry: Sentry::default(),
            prometheus: Prometheus::default(),
            database: Database::default(),
            failover: Failover::default(),
            failover_enabled: false,
            replication: Replication::default(),
            reconciliation: Reconciliation::default(),
            background_verification: BackgroundVerification::default(),
            repositories_cleanup: RepositoriesCleanup::default(),
            yamux: Yamux::default(),
            proxy: ProxyLimits::default(),
            connections: Connections::default(),
            virtual_storage: Vec::new(),
        }
    }
}

impl Config {
    /// The election strategy Go Praefect would use: it forces `per_repository` unless the
    /// operator explicitly opted out. We elect per repository whatever this says (a legacy
    /// strategy is warned about as ignored, see [`ignored_keys`]).
    pub fn effective_election_strategy(&self) -> &str {
        if self.i_understand_my_election_strategy_is_unsupported_and_will_be_removed_without_warning
        {
            &self.failover.election_strategy
        } else {
            ELECTION_STRATEGY_PER_REPOSITORY
        }
    }

    /// Looks a virtual storage up by name.
    pub fn virtual_storage(&self, name: &str) -> Option<&VirtualStorage> {
        self.virtual_storage.iter().find(|vs| vs.name == name)
    }

    /// The connection settings for LISTEN: each field from `[database.session_pooled]`, else
    /// the deprecated `host_no_proxy`/`port_no_proxy`, else `[database]`.
    pub fn direct_database(&self) -> DatabaseConnection {
        let main = &self.database;
        let sp = &main.session_pooled;
        let pick = |a: &str, b: &str| {
            if a.is_empty() {
                b.to_string()
            } else {
                a.to_string()
            }
        };
        let host = pick(&sp.host, &pick(&main.host_no_proxy, &main.host));
        let port = if !sp.port.is_empty() {
            sp.port.clone()
        } else if !main.port_no_proxy.is_empty() {
            main.port_no_proxy.clone()
        } else {
            main.port.clone()
        };
        DatabaseConnection {
            host,
            port,
            user: pick(&sp.user, &main.user),
            password: pick(&sp.password, &main.password),
            dbname: pick(&sp.dbname, &main.dbname),
            sslmode: pick(&sp.sslmode, &main.sslmode),
            sslcert: pick(&sp.sslcert, &main.sslcert),
            sslkey: pick(&sp.sslkey, &main.sslkey),
            sslrootcert: pick(&sp.sslrootcert, &main.sslrootcert),
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Auth {
    pub token: String,
    pub token_file: String,
    pub transitioning: bool,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Tls {
    pub certificate_path: String,
    pub key_path: String,
    pub key: String,
    pub min_version: String,
}

impl Default for Tls {
    fn default() -> Self {
        Tls {
            certificate_path: String::new(),
            key_path: String::new(),
            key: String::new(),
            min_version: "TLS 1.2".to_string(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Logging {
    pub format: String,
    pub level: String,
    /// Read because Go Praefect's logging section (shared with Gitaly) has it, but Praefect
    /// itself always logged to standard output, and so do we: see [`ignored_keys`].
    pub dir: String,
}

impl Default for Logging {
    fn default() -> Self {
        Logging {
            format: "text".to_string(),
            level: "info".to_string(),
            dir: String::new(),
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Sentry {
    pub sentry_dsn: String,
    pub sentry_environment: String,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Prometheus {
    pub scrape_timeout: GoDuration,
    pub grpc_latency_buckets: Vec<f64>,
}

impl Default for Prometheus {
    fn default() -> Self {
        Prometheus {
            scrape_timeout: GoDuration::from_secs(10),
            grpc_latency_buckets: vec![
                0.001, 0.005, 0.025, 0.1, 0.5, 1.0, 10.0, 30.0, 60.0, 300.0, 1500.0,
            ],
        }
    }
}

/// `[database]`. `host` and `port` may be comma-separated lists, as libpq allows: the pool
/// then uses the first host that accepts writes.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Database {
    pub host: String,
    #[serde(deserialize_with = "load::port_from_int_or_string")]
    pub port: String,
    pub user: String,
    pub password: String,
    pub dbname: String,
    pub sslmode: String,
    pub sslcert: String,
    pub sslkey: String,
    pub sslrootcert: String,
    /// Deprecated: use `[database.session_pooled]`.
    pub host_no_proxy: String,
    /// Deprecated: use `[database.session_pooled]`.
    #[serde(deserialize_with = "load::port_from_int_or_string")]
    pub port_no_proxy: String,
    pub session_pooled: DatabaseConnection,
    /// praefect-rs: how long a read-cache entry may still answer reads while the database is
    /// unavailable (counted from the last moment it was known fresh); "0" turns such reads
    /// off. Unset: [`Database::DEFAULT_STALE_READ_WINDOW`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stale_read_window: Option<GoDuration>,
}

impl Database {
    /// The stale-read window when `stale_read_window` is not set.
    pub const DEFAULT_STALE_READ_WINDOW: std::time::Duration = std::time::Duration::from_secs(300);

    /// The stale-read window in effect.
    pub fn stale_read_window(&self) -> std::time::Duration {
        self.stale_read_window
            .map(GoDuration::to_std)
            .unwrap_or(Self::DEFAULT_STALE_READ_WINDOW)
    }

    /// The settings of the main (possibly transaction-pooled) connection.
    pub fn connection(&self) -> DatabaseConnection {
        DatabaseConnection {
            host: self.host.clone(),
            port: self.port.clone(),
            user: self.user.clone(),
            password: self.password.clone(),
            dbname: self.dbname.clone(),
            sslmode: self.sslmode.clone(),
            sslcert: self.sslcert.clone(),
            sslkey: self.sslkey.clone(),
            sslrootcert: self.sslrootcert.clone(),
        }
    }
}

/// The nine connection keys shared by `[database]` and `[database.session_pooled]`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default)]
pub struct DatabaseConnection {
    pub host: String,
    #[serde(deserialize_with = "load::port_from_int_or_string")]
    pub port: String,
    pub user: String,
    pub password: String,
    pub dbname: String,
    pub sslmode: String,
    pub sslcert: String,
    pub sslkey: String,
    pub sslrootcert: String,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Failover {
    pub enabled: bool,
    pub election_strategy: String,
    pub error_threshold_window: Option<GoDuration>,
    pub write_error_threshold_count: Option<u32>,
    pub read_error_threshold_count: Option<u32>,
    pub bootstrap_interval: GoDuration,
    pub monitor_interval: GoDuration,
}

impl Default for Failover {
    fn default() -> Self {
        Failover {
            enabled: true,
            election_strategy: ELECTION_STRATEGY_PER_REPOSITORY.to_string(),
            error_threshold_window: None,
            write_error_threshold_count: None,
            read_error_threshold_count: None,
            bootstrap_interval: GoDuration::from_secs(1),
            monitor_interval: GoDuration::from_secs(3),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Replication {
    pub batch_size: i64,
    pub parallel_storage_processing_workers: i64,
}

impl Default for Replication {
    fn default() -> Self {
        Replication {
            batch_size: 10,
            parallel_storage_processing_workers: 1,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Reconciliation {
    pub scheduling_interval: GoDuration,
    pub histogram_buckets: Vec<f64>,
}

impl Default for Reconciliation {
    fn default() -> Self {
        Reconciliation {
            scheduling_interval: GoDuration::from_secs(5 * 60),
            histogram_buckets: vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ],
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct BackgroundVerification {
    pub verification_interval: GoDuration,
    pub delete_invalid_records: bool,
}

impl Default for BackgroundVerification {
    fn default() -> Self {
        BackgroundVerification {
            verification_interval: GoDuration::from_secs(168 * 3600),
            delete_invalid_records: true,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct RepositoriesCleanup {
    pub check_interval: GoDuration,
    pub run_interval: GoDuration,
    pub repositories_in_batch: i64,
}

impl Default for RepositoriesCleanup {
    fn default() -> Self {
        RepositoriesCleanup {
            check_interval: GoDuration::from_secs(30 * 60),
            run_interval: GoDuration::from_secs(24 * 3600),
            repositories_in_batch: 16,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Yamux {
    pub maximum_stream_window_size_bytes: i64,
    pub accept_backlog: i64,
}

/// hashicorp/yamux's smallest allowed stream window.
pub const YAMUX_MIN_STREAM_WINDOW: i64 = 262_144;

impl Default for Yamux {
    fn default() -> Self {
        Yamux {
            maximum_stream_window_size_bytes: YAMUX_MIN_STREAM_WINDOW,
            accept_backlog: 256,
        }
    }
}

/// `[proxy]` (praefect-rs only): limits on the calls the router forwards, so that one hostile
/// or broken client cannot hold the router's memory or a node's git process for ever. Go
/// Praefect has no such table; its gRPC server applies grpc-go's 4 MiB receive limit.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct ProxyLimits {
    /// The largest first request message the router reads to route a call, in bytes
    /// (grpc-go's default receive limit); a larger one is refused with InvalidArgument.
    pub max_first_message_bytes: i64,
    /// How long a client may take to send its whole first request message, from the start of
    /// the call; a slower one is refused with DeadlineExceeded.
    pub first_message_timeout: GoDuration,
    /// How long a proxied sidechannel may move no byte in either direction before the router
    /// closes both its sides (the node then stops its git process).
    pub sidechannel_idle_timeout: GoDuration,
}

impl ProxyLimits {
    /// grpc-go's default receive limit.
    pub const DEFAULT_MAX_FIRST_MESSAGE_BYTES: i64 = 4 * 1024 * 1024;
    /// Upper bound of `max_first_message_bytes`: a gRPC message length is 32 bits.
    pub const MAX_FIRST_MESSAGE_BYTES_LIMIT: i64 = u32::MAX as i64;

    /// `max_first_message_bytes` as a size (validation keeps it in range).
    pub fn max_first_message(&self) -> usize {
        usize::try_from(self.max_first_message_bytes).unwrap_or(0)
    }
}

impl Default for ProxyLimits {
    fn default() -> Self {
        ProxyLimits {
            max_first_message_bytes: Self::DEFAULT_MAX_FIRST_MESSAGE_BYTES,
            first_message_timeout: GoDuration::from_secs(20),
            sidechannel_idle_timeout: GoDuration::from_secs(60),
        }
    }
}

/// `[connections]`: what one client may hold on the router's listeners (see
/// `praefect_wire::backchannel::LimitSettings` for what each limit guards against). The
/// defaults are generous for GitLab's traffic; Go Praefect has none of these (grpc-go's
/// defaults: unlimited streams and connections, a 120 s handshake timeout).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Connections {
    /// Client connections open at once over all listeners; beyond it new ones are closed.
    pub max_connections: i64,
    /// Calls open at once on one client connection (HTTP/2 MAX_CONCURRENT_STREAMS).
    pub max_concurrent_streams: i64,
    /// From accepting a connection to the end of the client's HTTP/2 preface and SETTINGS.
    pub handshake_timeout: GoDuration,
    /// HTTP/2 pings to every client connection; no answer within the timeout closes it.
    pub keepalive_interval: GoDuration,
    pub keepalive_timeout: GoDuration,
    /// The request headers of one call, in bytes (HTTP/2 MAX_HEADER_LIST_SIZE).
    pub max_header_list_size: i64,
}

impl Default for Connections {
    fn default() -> Self {
        let limits = praefect_wire::backchannel::LimitSettings::default();
        let duration = |d: std::time::Duration| {
            GoDuration::from_millis(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        };
        Connections {
            max_connections: limits.max_connections as i64,
            max_concurrent_streams: i64::from(limits.max_concurrent_streams),
            handshake_timeout: duration(limits.handshake_timeout),
            keepalive_interval: duration(limits.keepalive_interval),
            keepalive_timeout: duration(limits.keepalive_timeout),
            max_header_list_size: i64::from(limits.max_header_list_size),
        }
    }
}

impl Connections {
    /// The limits for the listeners (validated first: out-of-range values are clamped).
    pub fn limit_settings(&self) -> praefect_wire::backchannel::LimitSettings {
        let defaults = praefect_wire::backchannel::LimitSettings::default();
        praefect_wire::backchannel::LimitSettings {
            max_connections: usize::try_from(self.max_connections.max(1)).unwrap_or(usize::MAX),
            max_concurrent_streams: u32::try_from(self.max_concurrent_streams.max(1))
                .unwrap_or(u32::MAX),
            handshake_timeout: self.handshake_timeout.to_std(),
            keepalive_interval: self.keepalive_interval.to_std(),
            keepalive_timeout: self.keepalive_timeout.to_std(),
            max_header_list_size: u32::try_from(self.max_header_list_size.max(1))
                .unwrap_or(u32::MAX),
            ..defaults
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct VirtualStorage {
    pub name: String,
    pub default_replication_factor: i64,
    pub node: Vec<Node>,
}

impl VirtualStorage {
    pub fn node(&self, storage: &str) -> Option<&Node> {
        self.node.iter().find(|n| n.storage == storage)
    }
}

/// One Gitaly storage behind a virtual storage.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default)]
pub struct Node {
    pub storage: String,
    pub address: String,
    pub token: String,
}

#[cfg(test)]
mod tests;
