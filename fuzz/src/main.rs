//! `praefect-fuzz`: runs the fuzz targets (see the crate's documentation and README's
//! "Fuzzing").
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use praefect_fuzz::engine::{self, check_one, Budget};
use praefect_fuzz::targets;

#[derive(Parser)]
#[command(about = "Fuzz targets for praefect-rs's parsers, on stable Rust")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Lists the targets.
    List,
    /// Replays each target's corpus, then fuzzes it for a while.
    Run {
        /// Seconds per target.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Seed of the mutator (default: from the clock; printed, to repeat a run).
        #[arg(long)]
        seed: Option<u64>,
        /// Writes inputs that reach a new outcome into fuzz/corpus/<target>/.
        #[arg(long)]
        grow: bool,
        /// Targets to run (default: all).
        targets: Vec<String>,
    },
    /// Writes the hand-made seeds into fuzz/corpus/<target>/seed-*.
    Seed,
    /// Checks the given inputs (e.g. a saved crash) against one target, with the panic shown.
    Replay { target: String, files: Vec<PathBuf> },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::List => {
            for target in targets::all() {
                println!("{:<16} {}", target.name, target.about);
            }
            ExitCode::SUCCESS
        }
        Command::Run {
            seconds,
            seed,
            grow,
            targets: names,
        } => {
            let seed = seed.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0)
            });
            let chosen = if names.is_empty() {
                targets::all()
            } else {
                let mut chosen = Vec::new();
                for name in &names {
                    match targets::find(name) {
                        Some(target) => chosen.push(target),
                        None => {
                            eprintln!("unknown target {name:?}; see `praefect-fuzz list`");
                            return ExitCode::from(2);
                        }
                    }
                }
                chosen
            };
            let budget = Budget::Time(Duration::from_secs_f64(seconds));
            let mut failed = false;
            for target in chosen {
                match engine::run(&target, budget, seed, grow) {
                    Ok(report) => println!(
                        "fuzz {:<16} ok: {} corpus files, {} execs in {:.1?} ({:.0}/s), pool {}, {} outcomes",
                        target.name,
                        report.replayed,
                        report.execs,
                        report.elapsed,
                        report.execs as f64 / report.elapsed.as_secs_f64().max(1e-9),
                        report.pool,
                        report.outcomes.len()
                    ),
                    Err(finding) => {
                        failed = true;
                        println!("fuzz {:<16} FAILED (seed {seed}): {finding}", target.name);
                        println!("  input: {:?}", String::from_utf8_lossy(&finding.input));
                        if let Some(path) = &finding.artifact {
                            println!(
                                "  replay: cargo run -p praefect-fuzz -- replay {} {}",
                                target.name,
                                path.display()
                            );
                        }
                    }
                }
            }
            if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Command::Seed => {
            for target in targets::all() {
                let dir = engine::fuzz_dir().join("corpus").join(target.name);
                for (name, input) in praefect_fuzz::seeds::seeds(target.name) {
                    if let Err(err) = std::fs::create_dir_all(&dir)
                        .and_then(|()| std::fs::write(dir.join(&name), input))
                    {
                        eprintln!("{}: {err}", dir.join(&name).display());
                        return ExitCode::FAILURE;
                    }
                }
            }
            ExitCode::SUCCESS
        }
        Command::Replay { target, files } => {
            let Some(target) = targets::find(&target) else {
                eprintln!("unknown target {target:?}; see `praefect-fuzz list`");
                return ExitCode::from(2);
            };
            let mut failed = false;
            for file in files {
                let input = match std::fs::read(&file) {
                    Ok(input) => input,
                    Err(err) => {
                        eprintln!("{}: {err}", file.display());
                        return ExitCode::from(2);
                    }
                };
                match check_one(&target, &input) {
                    Ok(outcome) => println!("{}: ok ({outcome})", file.display()),
                    Err(finding) => {
                        failed = true;
                        println!("{}: {finding}", file.display());
                    }
                }
            }
            if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
    }
}
