//! The database subcommands: `sql-ping`, `sql-migrate`, `sql-migrate-status`,
//! `sql-migrate-down`.

use comfy_table::{presets::ASCII_FULL_CONDENSED, Table};

use super::error::CliError;
use crate::config::{Config, GoDuration};
use crate::datastore::{Datastore, DatastoreError, MigrationEvent, MigrationState, PoolSettings};

/// The database of `config`, for the subcommands that work on it directly.
pub(super) async fn open(config: &Config) -> Result<Datastore, DatastoreError> {
    Datastore::connect(&config.database.connection(), PoolSettings::default()).await
}

/// `sql-ping`: connects, checks the server version, prints OK.
pub async fn ping(config: &Config) -> Result<(), CliError> {
    let store = open(config).await?;
    store.check_server().await?;
    store.close().await;
    println!("praefect sql-ping: OK");
    Ok(())
}

fn timestamp(at: chrono::DateTime<chrono::Utc>) -> String {
    at.format("%Y-%m-%dT%H:%M:%S").to_string()
}

/// `sql-migrate`: applies pending migrations, reporting each.
pub async fn migrate(
    config: &Config,
    ignore_unknown: bool,
    verbose: bool,
    adopt_go_praefect: bool,
) -> Result<(), CliError> {
    const NAME: &str = "praefect sql-migrate";
    let store = open(config).await?;
    let result = store
        .migrate_up(ignore_unknown, adopt_go_praefect, |event| match event {
            MigrationEvent::Adopting { version } => {
                println!("{NAME}: adopting the database of Go Praefect {version}")
            }
            MigrationEvent::Planned(0) => {}
            MigrationEvent::Planned(n) => println!("{NAME}: migrations to apply: {n}"),
            MigrationEvent::Migrating { at, migration } => {
                println!("=  {} {}: migrating", timestamp(at), migration.id);
                if verbose {
                    println!("{}", migration.up.trim_end());
                }
            }
            MigrationEvent::Applied {
                at,
                migration,
                took,
            } => println!(
                "== {} {}: applied ({})",
                timestamp(at),
                migration.id,
                GoDuration::from(took)
            ),
        })
        .await;
    store.close().await;
    match result? {
        0 => println!("{NAME}: all migrations are up"),
        n => println!("{NAME}: OK (applied {n} migrations)"),
    }
    Ok(())
}

/// `sql-migrate-status`: a table of every migration and when it was applied.
pub async fn migrate_status(config: &Config) -> Result<(), CliError> {
    let store = open(config).await?;
    let status = store.migration_status().await;
    store.close().await;
    let rows = status?;
    let mut table = Table::new();
    table.load_preset(ASCII_FULL_CONDENSED);
    table.set_header(["MIGRATION", "APPLIED"]);
    for row in rows {
        let applied = match row.state {
            MigrationState::Applied(at) => at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            MigrationState::NotApplied => "no".to_string(),
            MigrationState::Unknown => "unknown migration".to_string(),
        };
        table.add_row([row.id, applied]);
    }
    println!("{table}");
    Ok(())
}

/// `sql-migrate-down [-f] N`: rolls back the N newest migrations, or lists them.
pub async fn migrate_down(config: &Config, force: bool, max: usize) -> Result<(), CliError> {
    const NAME: &str = "praefect sql-migrate-down";
    let store = open(config).await?;
    let result = if force {
        store.migrate_down(max).await.map(|n| {
            println!("{NAME}: OK (applied {n} \"down\" migrations)");
        })
    } else {
        store.migrations_to_roll_back(max).await.map(|ids| {
            println!("{NAME}: DRY RUN -- would roll back:");
            println!();
            for id in ids {
                println!("- {id}");
            }
            println!();
            println!("To apply these migrations run with -f");
        })
    };
    store.close().await;
    Ok(result?)
}
