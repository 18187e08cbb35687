//! `praefect -config FILE check [-q]`: the post-install check. Four checks run one after the
//! other, each bounded by [`CHECK_TIMEOUT`]; each prints what it checks and whether it passed.
//! A failed fatal check makes the command fail; a failed warning is reported and tolerated.

use std::future::Future;
use std::time::Duration;

use super::dial_nodes;
use super::error::CliError;
use crate::config::Config;
use crate::datastore::{Datastore, PoolSettings};

/// How long each check may take.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Severity {
    Fatal,
    Warning,
}

impl Severity {
    fn label(self) -> &'static str {
        match self {
            Severity::Fatal => "fatal",
            Severity::Warning => "warning",
        }
    }
}

/// How the checks went.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    pub failed: usize,
    pub fatal: bool,
}

/// Runs one check, bounded by [`CHECK_TIMEOUT`], printing its name and result.
async fn run_check<F>(
    quiet: bool,
    name: &str,
    description: &str,
    severity: Severity,
    check: F,
    outcome: &mut Outcome,
) where
    F: Future<Output = Result<(), String>>,
{
    if quiet {
        println!("Checking {name}...");
    } else {
        println!("Checking {name} - {description} [{}]", severity.label());
    }
    let result = match tokio::time::timeout(CHECK_TIMEOUT, check).await {
        Ok(result) => result,
        Err(_) => Err(format!("timed out after {}s", CHECK_TIMEOUT.as_secs())),
    };
    match result {
        Ok(()) => println!("Passed"),
        Err(message) => {
            println!("Failed ({}) error: {message}", severity.label());
            outcome.failed += 1;
            outcome.fatal |= severity == Severity::Fatal;
        }
    }
}

async fn open(config: &Config) -> Result<Datastore, String> {
    Datastore::connect(&config.database.connection(), PoolSettings::default())
        .await
        .map_err(|e| e.to_string())
}

/// Every known migration applied.
async fn migrations(config: &Config) -> Result<(), String> {
    let store = open(config).await?;
    let pending = store.pending_migrations().await.map_err(|e| e.to_string());
    store.close().await;
    match pending? {
        0 => Ok(()),
        n => Err(format!("{n} migrations have not been run")),
    }
}

/// Every node reachable, healthy, and serving its storages readable and writable.
async fn nodes(config: &Config) -> Result<(), String> {
    let unhealthy = dial_nodes::unhealthy_nodes(config, CHECK_TIMEOUT).await;
    if unhealthy.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the following nodes are not healthy: {}",
            unhealthy.join(", ")
        ))
    }
}

/// The database takes a write and gives it back.
async fn read_write(config: &Config) -> Result<(), String> {
    let store = open(config).await?;
    let result = store
        .check_read_write(CHECK_TIMEOUT)
        .await
        .map_err(|e| e.to_string());
    store.close().await;
    result
}

/// No repository without a valid primary.
async fn unavailable(config: &Config) -> Result<(), String> {
    let store = open(config).await?;
    let counts = store
        .unavailable_repositories(CHECK_TIMEOUT)
        .await
        .map_err(|e| e.to_string());
    store.close().await;
    let problems: Vec<String> = counts?
        .into_iter()
        .filter(|c| c.count > 0)
        .map(|c| {
            format!(
                "virtual storage {:?} has {} unavailable repositor{}",
                c.virtual_storage,
                c.count,
                if c.count == 1 { "y" } else { "ies" }
            )
        })
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{}; run `praefect dataloss` to see them",
            problems.join(", ")
        ))
    }
}

/// Runs the checks; fails when a fatal one failed.
pub async fn run(config: &Config, quiet: bool) -> Result<(), CliError> {
    let mut outcome = Outcome {
        failed: 0,
        fatal: false,
    };
    run_check(
        quiet,
        "praefect migrations",
        "Confirms whether or not all migrations have run",
        Severity::Fatal,
        migrations(config),
        &mut outcome,
    )
    .await;
    run_check(
        quiet,
        "gitaly node connectivity & disk access",
        "Checks connectivity to each node and that each of its storages is readable and writable",
        Severity::Fatal,
        nodes(config),
        &mut outcome,
    )
    .await;
    run_check(
        quiet,
        "database read/write",
        "Checks that the database can be written to and read from",
        Severity::Fatal,
        read_write(config),
        &mut outcome,
    )
    .await;
    run_check(
        quiet,
        "unavailable repositories",
        "Checks for repositories without a healthy, up-to-date replica",
        Severity::Warning,
        unavailable(config),
        &mut outcome,
    )
    .await;
    println!();
    match outcome {
        Outcome { failed: 0, .. } => {
            println!("All checks passed.");
            Ok(())
        }
        Outcome {
            failed,
            fatal: false,
        } => {
            println!("{failed} check(s) failed, but none are fatal.");
            Ok(())
        }
        Outcome {
            failed,
            fatal: true,
        } => Err(CliError::ChecksFailed(failed)),
    }
}
