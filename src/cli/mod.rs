//! The `praefect` command line: argument parsing and one file per subcommand.

mod args;
mod configuration;
mod dial_nodes;
mod replication_factor;
mod serve;
mod sql;
mod verify;

pub use args::{normalize_args, Cli, Command, ConfigurationCommand};

use std::ffi::OsString;
use std::future::Future;
use std::process::ExitCode;

use clap::Parser;

use crate::config::{self, Config};

/// The version `--version` prints.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Exit code of a subcommand interrupted by SIGINT, as a shell would report it.
const EXIT_INTERRUPTED: u8 = 130;
/// Exit code for usage errors (missing -config, bad flags, invalid configuration input).
const EXIT_USAGE: u8 = 2;

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
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("praefect: starting the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(dispatch(cli.command, config))
}

async fn dispatch(command: Option<Command>, config: Config) -> ExitCode {
    match command {
        None | Some(Command::Serve) => serve::run(config).await,
        Some(Command::SqlPing) => interruptible(sql::ping(&config)).await,
        Some(Command::SqlMigrate {
            ignore_unknown,
            verbose,
        }) => interruptible(sql::migrate(&config, ignore_unknown, verbose)).await,
        Some(Command::SqlMigrateStatus) => interruptible(sql::migrate_status(&config)).await,
        Some(Command::SqlMigrateDown { force, max }) => {
            interruptible(sql::migrate_down(&config, force, max)).await
        }
        Some(Command::DialNodes { timeout }) => {
            interruptible(dial_nodes::run(&config, timeout.to_std())).await
        }
        Some(Command::Verify {
            repository_id,
            virtual_storage,
            storage,
        }) => {
            interruptible(verify::run(
                &config,
                repository_id,
                virtual_storage,
                storage,
            ))
            .await
        }
        Some(Command::SetReplicationFactor {
            virtual_storage,
            relative_path,
            replication_factor,
        }) => {
            interruptible(replication_factor::run(
                &config,
                virtual_storage,
                relative_path,
                replication_factor,
            ))
            .await
        }
        Some(Command::Configuration { .. }) => unreachable!("handled before loading the config"),
    }
}

/// Runs a subcommand, exiting with 130 if the operator presses Ctrl-C.
async fn interruptible(work: impl Future<Output = ExitCode>) -> ExitCode {
    tokio::select! {
        code = work => code,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("praefect: interrupted");
            ExitCode::from(EXIT_INTERRUPTED)
        }
    }
}
