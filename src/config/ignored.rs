//! Keys that are read but change nothing in praefect-rs.
//!
//! An operator replacing Go Praefect starts us with their existing file, so every key Go
//! Praefect reads is accepted (an unknown one is an error). A few of them ask for something
//! we do not do; rather than drop them silently, `serve` logs one warning per such key at
//! startup. A key counts as ignored only when its value asks for something: a key left at
//! its default (or empty) asks for what we do anyway and is not warned about, so a plain
//! Omnibus file starts without warnings.
//!
//! This list is the one place that says which keys are ignored and why: the example
//! configuration and the README say the same, and the tests check each entry.

use std::fmt;

use super::{Config, Failover, ELECTION_STRATEGY_PER_REPOSITORY};

/// A key set to something praefect-rs does not do, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IgnoredKey {
    /// The key path, as in validation errors: `sentry.sentry_dsn`.
    pub key: &'static str,
    /// What is ignored and why.
    pub reason: &'static str,
}

impl fmt::Display for IgnoredKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} is ignored: {}", self.key, self.reason)
    }
}

/// One entry of [`RULES`]: the key, and when its value asks for something we do not do.
struct Rule {
    ignored: IgnoredKey,
    applies: fn(&Config) -> bool,
}

const fn rule(key: &'static str, reason: &'static str, applies: fn(&Config) -> bool) -> Rule {
    Rule {
        ignored: IgnoredKey { key, reason },
        applies,
    }
}

/// Go Praefect can keep its replication queue in memory (one router, no database needed for
/// replication). We have one queue implementation, in PostgreSQL; the read cache stays on too
/// (Go turns it off with the memory queue).
const MEMORY_QUEUE: Rule = rule(
    "memory_queue_enabled",
    "the replication queue is always kept in PostgreSQL",
    |config| config.memory_queue_enabled,
);

/// With per-repository elections Go Praefect does not look at this key either (it only
/// switched the legacy electors off); we elect a new primary for a repository whenever its
/// primary is unhealthy or outdated, and there is no way to turn that off.
const FAILOVER_ENABLED: Rule = rule(
    "failover.enabled",
    "failover cannot be turned off: a repository whose primary is unhealthy or outdated gets a new one elected",
    |config| !config.failover.enabled,
);

/// The legacy `sql` and `local` electors exist in Go Praefect behind the
/// `i_understand_my_election_strategy_is_unsupported_and_will_be_removed_without_warning`
/// flag. We implement only per-repository elections. (Without the flag Go forces
/// per_repository too, so the strategy key is then not ours to warn about.)
const ELECTION_STRATEGY: Rule = rule(
    "failover.election_strategy",
    "only per_repository elections are implemented; the legacy sql and local electors are not",
    |config| config.effective_election_strategy() != ELECTION_STRATEGY_PER_REPOSITORY,
);

/// Error-threshold failover counts proxied errors per node; only Go's legacy node manager
/// consulted the counts. Per-repository health comes from health checks alone, in Go
/// Praefect and here.
const ERROR_THRESHOLD_WINDOW: Rule = rule(
    "failover.error_threshold_window",
    "error-threshold failover is part of the legacy electors; node health comes from health checks only",
    |config| config.failover.error_threshold_window.is_some(),
);

/// See [`ERROR_THRESHOLD_WINDOW`].
const WRITE_ERROR_THRESHOLD_COUNT: Rule = rule(
    "failover.write_error_threshold_count",
    "error-threshold failover is part of the legacy electors; node health comes from health checks only",
    |config| config.failover.write_error_threshold_count.is_some(),
);

/// See [`ERROR_THRESHOLD_WINDOW`].
const READ_ERROR_THRESHOLD_COUNT: Rule = rule(
    "failover.read_error_threshold_count",
    "error-threshold failover is part of the legacy electors; node health comes from health checks only",
    |config| config.failover.read_error_threshold_count.is_some(),
);

/// The check timings of Go's legacy node manager. Our health manager checks every node once
/// a second, as Go's per-repository health manager does.
const BOOTSTRAP_INTERVAL: Rule = rule(
    "failover.bootstrap_interval",
    "it timed the legacy electors' node checks; nodes are health-checked every second",
    |config| config.failover.bootstrap_interval != Failover::default().bootstrap_interval,
);

/// See [`BOOTSTRAP_INTERVAL`].
const MONITOR_INTERVAL: Rule = rule(
    "failover.monitor_interval",
    "it timed the legacy electors' node checks; nodes are health-checked every second",
    |config| config.failover.monitor_interval != Failover::default().monitor_interval,
);

/// Go Praefect's `[logging]` is Gitaly's logging section, which has a directory for Gitaly's
/// own log files; Praefect always logged to standard output, and so do we.
const LOGGING_DIR: Rule = rule(
    "logging.dir",
    "logs are written to standard output",
    |config| !config.logging.dir.is_empty(),
);

/// praefect-rs has no Sentry client: errors are logged, not sent anywhere.
const SENTRY_DSN: Rule = rule(
    "sentry.sentry_dsn",
    "errors are not reported to Sentry (praefect-rs has no Sentry client); they are logged",
    |config| !config.sentry.sentry_dsn.is_empty(),
);

/// See [`SENTRY_DSN`].
const SENTRY_ENVIRONMENT: Rule = rule(
    "sentry.sentry_environment",
    "errors are not reported to Sentry (praefect-rs has no Sentry client); they are logged",
    |config| !config.sentry.sentry_environment.is_empty(),
);

/// Every key that can be ignored, in the order of the example configuration.
const RULES: &[Rule] = &[
    MEMORY_QUEUE,
    LOGGING_DIR,
    SENTRY_DSN,
    SENTRY_ENVIRONMENT,
    FAILOVER_ENABLED,
    ELECTION_STRATEGY,
    ERROR_THRESHOLD_WINDOW,
    WRITE_ERROR_THRESHOLD_COUNT,
    READ_ERROR_THRESHOLD_COUNT,
    BOOTSTRAP_INTERVAL,
    MONITOR_INTERVAL,
];

/// The keys of `config` that are set to something praefect-rs does not do, each once.
pub fn ignored_keys(config: &Config) -> Vec<IgnoredKey> {
    RULES
        .iter()
        .filter(|rule| (rule.applies)(config))
        .map(|rule| rule.ignored)
        .collect()
}

/// Every key [`ignored_keys`] may name, for tests and documentation checks.
pub fn ignorable_keys() -> Vec<IgnoredKey> {
    RULES.iter().map(|rule| rule.ignored).collect()
}
