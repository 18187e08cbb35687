//! The database subcommands: `sql-ping`, `sql-migrate`, `sql-migrate-status`,
//! `sql-migrate-down`.

use std::process::ExitCode;

use comfy_table::{presets::ASCII_FULL_CONDENSED, Table};

use crate::config::{Config, GoDuration};
use crate::datastore::{Datastore, DatastoreError, MigrationEvent, MigrationState, PoolSettings};

async fn open(config: &Config) -> Result<Datastore, DatastoreError> {
    Datastore::connect(&config.database.connection(), PoolSettings::default()).await
}

/// Prints `praefect NAME: fail: ERR` and returns failure.
fn fail(name: &str, err: impl std::fmt::Display) -> ExitCode {
    eprintln!("praefect {name}: fail: {err}");
    ExitCode::FAILURE
}

/// `sql-ping`: connects, checks the server version, prints OK.
pub async fn ping(config: &Config) -> ExitCode {
    let result = async {
        let store = open(config).await?;
        store.check_server().await?;
        store.close().await;
        Ok::<_, DatastoreError>(())
    }
    .await;
    match result {
        Ok(()) => {
            println!("praefect sql-ping: OK");
            ExitCode::SUCCESS
        }
        Err(err) => fail("sql-ping", err),
    }
}

fn timestamp(at: chrono::DateTime<chrono::Utc>) -> String {
    at.format("%Y-%m-%dT%H:%M:%S").to_string()
}

/// `sql-migrate`: applies pending migrations, reporting each.
pub async fn migrate(config: &Config, ignore_unknown: bool, verbose: bool) -> ExitCode {
    const NAME: &str = "praefect sql-migrate";
    let store = match open(config).await {
        Ok(store) => store,
        Err(err) => return fail("sql-migrate", err),
    };
    let result = store
        .migrate_up(ignore_unknown, |event| match event {
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
    match result {
        Ok(0) => {
            println!("{NAME}: all migrations are up");
            ExitCode::SUCCESS
        }
        Ok(n) => {
            println!("{NAME}: OK (applied {n} migrations)");
            ExitCode::SUCCESS
        }
        Err(err) => fail("sql-migrate", err),
    }
}

/// `sql-migrate-status`: a table of every migration and when it was applied.
pub async fn migrate_status(config: &Config) -> ExitCode {
    let result = async {
        let store = open(config).await?;
        let status = store.migration_status().await;
        store.close().await;
        status
    }
    .await;
    let rows = match result {
        Ok(rows) => rows,
        Err(err) => return fail("sql-migrate-status", err),
    };
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
    ExitCode::SUCCESS
}

/// `sql-migrate-down [-f] N`: rolls back the N newest migrations, or lists them.
pub async fn migrate_down(config: &Config, force: bool, max: usize) -> ExitCode {
    const NAME: &str = "praefect sql-migrate-down";
    let store = match open(config).await {
        Ok(store) => store,
        Err(err) => return fail("sql-migrate-down", err),
    };
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
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => fail("sql-migrate-down", err),
    }
}
