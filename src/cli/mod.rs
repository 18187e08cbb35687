//! The `praefect` command line: argument parsing and one file per subcommand.

mod accept_dataloss;
mod args;
mod check;
mod configuration;
mod dataloss;
mod dial;
mod dial_nodes;
mod error;
mod list_storages;
mod list_untracked;
mod metadata;
mod remove_repository;
mod replication_factor;
mod runtime;
mod serve;
mod sql;
mod track_input;
mod track_repositories;
mod track_repository;
mod verify;

pub use args::{normalize_args, Cli, Command, ConfigurationCommand};

use std::ffi::OsString;
use std::future::Future;
use std::process::ExitCode;

use clap::Parser;

pub use error::{report, CliError, EXIT_USAGE};

use crate::config::{self, Config};

/// The version `--version` prints.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Parses `args` (the full argv) and runs the chosen command.
pub fn run(args: Vec<OsString>) -> ExitCode {
    let cli = match Cli::try_parse_from(normalize_args(args)) {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return ExitCode::from(u8::try_from(err.exit_code()).unwrap_or(EXIT_USAGE));
        }
    };
    if cli.version {
        println!("Praefect, version {VERSION}");
        return ExitCode::SUCCESS;
    }
    if let Some(Command::Configuration {
        command: ConfigurationCommand::Validate,
    }) = cli.command
    {
        return configuration::validate_stdin();
    }
    let serving = matches!(cli.command, None | Some(Command::Serve));
    if serving {
        // Before the heap grows: pages already made huge stay huge.
        serve::huge_pages::disable();
    }
    // Before the configuration is loaded (`config_command` starts a process): the sockets a
    // predecessor passed to `serve` become close-on-exec here, so no other process gets them.
    let inheritance = serving.then(serve::inherit);
    let Some(config_path) = cli.config else {
        eprintln!("praefect: the -config flag is required: praefect -config FILE [subcommand]");
        return ExitCode::from(EXIT_USAGE);
    };
    let config = match config::load_file(&config_path) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("praefect: loading configuration {}:", config_path.display());
            match err.validation_errors() {
                Some(errors) => errors.iter().for_each(|e| eprintln!("  {e}")),
                None => eprintln!("  {err}"),
            }
            return ExitCode::FAILURE;
        }
    };
    let runtime = match runtime::build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("praefect: starting the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(dispatch(cli.command, config, inheritance))
}

/// A subcommand's work, run until done or interrupted.
type Work<'a> = std::pin::Pin<Box<dyn Future<Output = Result<(), CliError>> + 'a>>;

/// `inheritance` is what a `serve` predecessor passed (see `serve::inherit`); `None` for the
/// other subcommands.
async fn dispatch(
    command: Option<Command>,
    config: Config,
    inheritance: Option<Result<serve::Inheritance, serve::HandoverError>>,
) -> ExitCode {
    let (name, work): (&str, Work<'_>) = match command {
        None | Some(Command::Serve) => {
            return serve::run(
                config,
                inheritance.unwrap_or_else(|| Ok(Default::default())),
            )
            .await
        }
        Some(Command::Configuration { .. }) => {
            return report(
                "configuration",
                Err(CliError::Usage("configuration needs a subcommand".into())),
            )
        }
        Some(Command::SqlPing) => ("sql-ping", Box::pin(sql::ping(&config))),
        Some(Command::SqlMigrate {
            ignore_unknown,
            verbose,
            adopt_go_praefect,
        }) => (
            "sql-migrate",
            Box::pin(sql::migrate(
                &config,
                ignore_unknown,
                verbose,
                adopt_go_praefect,
            )),
        ),
        Some(Command::SqlMigrateStatus) => {
            ("sql-migrate-status", Box::pin(sql::migrate_status(&config)))
        }
        Some(Command::SqlMigrateDown { force, max }) => (
            "sql-migrate-down",
            Box::pin(sql::migrate_down(&config, force, max)),
        ),
        Some(Command::Check { quiet }) => ("check", Box::pin(check::run(&config, quiet))),
        Some(Command::DialNodes { timeout }) => (
            "dial-nodes",
            Box::pin(dial_nodes::run(&config, timeout.to_std())),
        ),
        Some(Command::Verify {
            repository_id,
            virtual_storage,
            storage,
        }) => (
            "verify",
            Box::pin(verify::run(
                &config,
                repository_id,
                virtual_storage,
                storage,
            )),
        ),
        Some(Command::SetReplicationFactor {
            virtual_storage,
            relative_path,
            replication_factor,
        }) => (
            "set-replication-factor",
            Box::pin(replication_factor::run(
                &config,
                virtual_storage,
                relative_path,
                replication_factor,
            )),
        ),
        Some(Command::Dataloss {
            virtual_storage,
            partially_unavailable,
        }) => (
            "dataloss",
            Box::pin(dataloss::run(
                &config,
                virtual_storage,
                partially_unavailable,
            )),
        ),
        Some(Command::AcceptDataloss {
            virtual_storage,
            relative_path,
            authoritative_storage,
        }) => (
            "accept-dataloss",
            Box::pin(accept_dataloss::run(
                &config,
                virtual_storage,
                relative_path,
                authoritative_storage,
            )),
        ),
        Some(Command::Metadata {
            repository_id,
            virtual_storage,
            relative_path,
        }) => (
            "metadata",
            Box::pin(metadata::run(
                &config,
                repository_id,
                virtual_storage,
                relative_path,
            )),
        ),
        Some(Command::ListStorages { virtual_storage }) => (
            "list-storages",
            Box::pin(list_storages::run(&config, virtual_storage)),
        ),
        Some(Command::TrackRepository {
            virtual_storage,
            relative_path,
            replica_path,
            authoritative_storage,
            replicate_immediately,
        }) => (
            "track-repository",
            Box::pin(track_repository::run(
                &config,
                track_repository::TrackRequest {
                    virtual_storage,
                    relative_path,
                    replica_path,
                    authoritative_storage,
                },
                replicate_immediately,
            )),
        ),
        Some(Command::TrackRepositories {
            input_path,
            replicate_immediately,
        }) => (
            "track-repositories",
            Box::pin(async move {
                track_repositories::run(&config, &input_path, replicate_immediately).await
            }),
        ),
        Some(Command::RemoveRepository {
            virtual_storage,
            relative_path,
            apply,
            db_only,
        }) => (
            "remove-repository",
            Box::pin(remove_repository::run(
                &config,
                virtual_storage,
                relative_path,
                apply,
                db_only,
            )),
        ),
        Some(Command::ListUntrackedRepositories {
            older_than,
            delimiter,
        }) => (
            "list-untracked-repositories",
            Box::pin(
                async move { list_untracked::run(&config, older_than.to_std(), &delimiter).await },
            ),
        ),
    };
    report(name, interruptible(work).await)
}

/// Runs a subcommand; the operator's Ctrl-C ends it with [`CliError::Interrupted`].
async fn interruptible(work: impl Future<Output = Result<(), CliError>>) -> Result<(), CliError> {
    tokio::select! {
        result = work => result,
        _ = tokio::signal::ctrl_c() => Err(CliError::Interrupted),
    }
}
