//! The command line, as operators type it for Praefect: `praefect -config FILE [subcommand]`
//! or `praefect subcommand -config FILE`, long flags with one dash or two.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{ArgAction, Parser, Subcommand};

/// Rewrites Go-style single-dash long flags (`-config`, `-virtual-storage=x`) to the
/// double-dash form clap understands. One-letter flags (`-f`, `-q`), negative numbers and
/// everything after `--` are left alone.
pub fn normalize_args<I>(args: I) -> Vec<OsString>
where
    I: IntoIterator<Item = OsString>,
{
    let mut out = Vec::new();
    let mut passthrough = false;
    for (i, arg) in args.into_iter().enumerate() {
        if i == 0 || passthrough {
            out.push(arg);
            continue;
        }
        let rewritten = match arg.to_str() {
            Some("--") => {
                passthrough = true;
                None
            }
            Some(text) if is_single_dash_long_flag(text) => {
                Some(OsString::from(format!("-{text}")))
            }
            _ => None,
        };
        out.push(rewritten.unwrap_or(arg));
    }
    out
}

fn is_single_dash_long_flag(text: &str) -> bool {
    let Some(rest) = text.strip_prefix('-') else {
        return false;
    };
    if rest.starts_with('-') {
        return false;
    }
    let name = rest.split('=').next().unwrap_or("");
    name.len() > 1 && name.starts_with(|c: char| c.is_ascii_alphabetic())
}

/// `praefect`: the Gitaly Cluster router.
#[derive(Debug, Parser)]
#[command(
    name = "praefect",
    about = "The Gitaly Cluster router: makes several Gitaly nodes look like one highly available Gitaly",
    disable_version_flag = true,
    args_conflicts_with_subcommands = false
)]
pub struct Cli {
    /// Path to the configuration file (TOML).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Print the version and exit.
    #[arg(long, short = 'v', action = ArgAction::SetTrue)]
    pub version: bool,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the router (the default when no subcommand is given).
    Serve,
    /// Check that the database can be reached and is PostgreSQL 11 or later.
    #[command(name = "sql-ping")]
    SqlPing,
    /// Apply all pending database migrations.
    #[command(name = "sql-migrate")]
    SqlMigrate {
        /// Ignore migrations in the database that this version does not know.
        #[arg(
            long,
            default_value_t = true,
            num_args = 0..=1,
            default_missing_value = "true",
            action = ArgAction::Set,
            value_name = "BOOL"
        )]
        ignore_unknown: bool,
        /// Print the text of each migration as it is applied.
        #[arg(long)]
        verbose: bool,
        /// Take over a database of Go Praefect in place (it cannot go back to Go Praefect).
        #[arg(long)]
        adopt_go_praefect: bool,
    },
    /// Show which migrations are applied.
    #[command(name = "sql-migrate-status")]
    SqlMigrateStatus,
    /// Roll back the N newest migrations (a dry run unless -f is given).
    #[command(name = "sql-migrate-down")]
    SqlMigrateDown {
        /// Really roll back; without it, only list what would be rolled back.
        #[arg(short = 'f', long = "force")]
        force: bool,
        /// How many migrations to roll back.
        #[arg(value_name = "N")]
        max: usize,
    },
    /// The post-install check: migrations, node connectivity and disk access, database
    /// read/write, unavailable repositories. Fails when a fatal check fails.
    Check {
        /// Shorter output: the check names only.
        #[arg(short = 'q')]
        quiet: bool,
    },
    /// Check that every node can be reached, is healthy and serves its configured storages.
    #[command(name = "dial-nodes")]
    DialNodes {
        /// How long each step may take per node (Go duration).
        #[arg(long, default_value = "10s", value_name = "DURATION")]
        timeout: crate::config::GoDuration,
    },
    /// Mark replicas unverified so that the background verifier checks them first: every
    /// replica of one repository, of a virtual storage, or of one storage of it.
    #[command(group(
        clap::ArgGroup::new("selector")
            .required(true)
            .args(["repository_id", "virtual_storage"])
    ))]
    Verify {
        /// The id of the repository whose replicas to mark.
        #[arg(
            long,
            value_name = "ID",
            value_parser = clap::value_parser!(i64).range(1..),
            conflicts_with_all = ["virtual_storage", "storage"]
        )]
        repository_id: Option<i64>,
        /// The virtual storage whose replicas to mark.
        #[arg(long, value_name = "NAME")]
        virtual_storage: Option<String>,
        /// Only the replicas on this storage of -virtual-storage.
        #[arg(long, value_name = "NAME", requires = "virtual_storage")]
        storage: Option<String>,
    },
    /// Set how many storages host a repository; the reconciler then creates or removes
    /// replicas to match. The primary always stays assigned.
    #[command(name = "set-replication-factor")]
    SetReplicationFactor {
        /// The repository's virtual storage.
        #[arg(long, value_name = "NAME")]
        virtual_storage: String,
        /// The repository's relative path.
        #[arg(long, value_name = "PATH")]
        relative_path: String,
        /// How many storages should host it (at least 1).
        #[arg(long, value_name = "N")]
        replication_factor: i32,
    },
    /// List the repositories that lost their primary (no replica is up to date and healthy),
    /// with how far behind each replica is.
    Dataloss {
        /// Only this virtual storage (default: every configured one).
        #[arg(long, value_name = "NAME")]
        virtual_storage: Option<String>,
        /// Also list repositories that are available but miss up-to-date replicas on
        /// assigned storages.
        #[arg(
            long,
            default_value_t = false,
            num_args = 0..=1,
            default_missing_value = "true",
            action = ArgAction::Set,
            value_name = "BOOL"
        )]
        partially_unavailable: bool,
    },
    /// Accept the loss of the changes a repository's other replicas have: the authoritative
    /// storage's replica becomes the only up-to-date one and the others are overwritten from
    /// it.
    #[command(name = "accept-dataloss")]
    AcceptDataloss {
        /// The repository's virtual storage.
        #[arg(long, value_name = "NAME")]
        virtual_storage: String,
        /// The repository's relative path.
        #[arg(long, value_name = "PATH")]
        relative_path: String,
        /// The storage whose replica to keep.
        #[arg(long, value_name = "NAME")]
        authoritative_storage: String,
    },
    /// Show a repository's record and its replicas: generations, assignment, health.
    #[command(group(
        clap::ArgGroup::new("repository")
            .required(true)
            .args(["repository_id", "virtual_storage"])
    ))]
    Metadata {
        /// The repository's id.
        #[arg(
            long,
            value_name = "ID",
            value_parser = clap::value_parser!(i64).range(1..),
            conflicts_with_all = ["virtual_storage", "relative_path"]
        )]
        repository_id: Option<i64>,
        /// The repository's virtual storage (with -relative-path).
        #[arg(long, value_name = "NAME", requires = "relative_path")]
        virtual_storage: Option<String>,
        /// The repository's relative path (with -virtual-storage).
        #[arg(long, value_name = "PATH", requires = "virtual_storage")]
        relative_path: Option<String>,
    },
    /// List the configured virtual storages and their nodes.
    #[command(name = "list-storages")]
    ListStorages {
        /// Only this virtual storage.
        #[arg(long, value_name = "NAME")]
        virtual_storage: Option<String>,
    },
    /// Start tracking a repository that exists on one storage but not in the database: it
    /// becomes the primary, and the other storages are brought up to date from it.
    #[command(name = "track-repository")]
    TrackRepository {
        /// The repository's virtual storage.
        #[arg(long, value_name = "NAME")]
        virtual_storage: String,
        /// The relative path clients will use.
        #[arg(long, value_name = "PATH")]
        relative_path: String,
        /// Where the repository is on the storage's disk.
        #[arg(long, value_name = "PATH")]
        replica_path: String,
        /// The storage that has the repository, to consider authoritative.
        #[arg(long, value_name = "NAME")]
        authoritative_storage: String,
        /// Replicate to the other storages now, instead of queueing replication jobs.
        #[arg(long)]
        replicate_immediately: bool,
    },
    /// `track-repository` for every line of a file of JSON objects (keys relative_path,
    /// replica_path, virtual_storage, authoritative_storage); nothing is tracked unless every
    /// line is valid.
    #[command(name = "track-repositories")]
    TrackRepositories {
        /// The file of newline-delimited JSON objects.
        #[arg(long, value_name = "FILE")]
        input_path: PathBuf,
        /// Replicate to the other storages now, instead of queueing replication jobs.
        #[arg(long)]
        replicate_immediately: bool,
    },
    /// Remove a repository from the nodes and the database (a dry run unless -apply).
    #[command(name = "remove-repository")]
    RemoveRepository {
        /// The repository's virtual storage.
        #[arg(long, value_name = "NAME")]
        virtual_storage: String,
        /// The repository's relative path.
        #[arg(long, value_name = "PATH")]
        relative_path: String,
        /// Really remove it.
        #[arg(long)]
        apply: bool,
        /// With -apply: remove only the database records, leaving the replicas on disk.
        #[arg(long)]
        db_only: bool,
    },
    /// List the repositories on the nodes' disks that the database does not track.
    #[command(name = "list-untracked-repositories")]
    ListUntrackedRepositories {
        /// Leave out repositories modified more recently than this (Go duration).
        #[arg(long, default_value = "6h", value_name = "DURATION")]
        older_than: crate::config::GoDuration,
        /// What follows each repository (`\n`, `\t` and `\0` are understood).
        #[arg(long, default_value = "\n", value_name = "TEXT")]
        delimiter: String,
    },
    /// Work with configuration files.
    Configuration {
        #[command(subcommand)]
        command: ConfigurationCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigurationCommand {
    /// Validate the TOML configuration read from standard input; errors are printed as JSON.
    Validate,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(args: &[&str]) -> Vec<String> {
        normalize_args(args.iter().map(OsString::from))
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    #[test]
    fn single_dash_long_flags_become_double_dash() {
        assert_eq!(
            norm(&[
                "praefect",
                "-config",
                "f.toml",
                "sql-migrate-down",
                "-f",
                "1"
            ]),
            [
                "praefect",
                "--config",
                "f.toml",
                "sql-migrate-down",
                "-f",
                "1"
            ]
        );
        assert_eq!(
            norm(&[
                "praefect",
                "-virtual-storage=x",
                "--config=y",
                "-1",
                "--",
                "-keep"
            ]),
            [
                "praefect",
                "--virtual-storage=x",
                "--config=y",
                "-1",
                "--",
                "-keep"
            ]
        );
    }

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(normalize_args(args.iter().map(OsString::from))).unwrap()
    }

    #[test]
    fn both_argument_orders_parse() {
        let before = parse(&["praefect", "-config", "c.toml", "sql-ping"]);
        let after = parse(&["praefect", "sql-ping", "-config", "c.toml"]);
        for cli in [before, after] {
            assert_eq!(cli.config.as_deref(), Some(std::path::Path::new("c.toml")));
            assert!(matches!(cli.command, Some(Command::SqlPing)));
        }
        let serve = parse(&["praefect", "-config", "c.toml"]);
        assert!(serve.command.is_none());
    }

    #[test]
    fn sql_migrate_flags() {
        match parse(&["praefect", "-config", "c", "sql-migrate"]).command {
            Some(Command::SqlMigrate {
                ignore_unknown,
                verbose,
                adopt_go_praefect,
            }) => assert!(ignore_unknown && !verbose && !adopt_go_praefect),
            other => panic!("unexpected {other:?}"),
        }
        match parse(&[
            "praefect",
            "sql-migrate",
            "-ignore-unknown=false",
            "-verbose",
            "--adopt-go-praefect",
        ])
        .command
        {
            Some(Command::SqlMigrate {
                ignore_unknown,
                verbose,
                adopt_go_praefect,
            }) => assert!(!ignore_unknown && verbose && adopt_go_praefect),
            other => panic!("unexpected {other:?}"),
        }
        match parse(&["praefect", "sql-migrate-down", "-f", "2"]).command {
            Some(Command::SqlMigrateDown { force, max }) => assert!(force && max == 2),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn verify_takes_one_selector() {
        let verify = |args: &[&str]| {
            Cli::try_parse_from(normalize_args(args.iter().map(OsString::from))).map(
                |cli| match cli.command {
                    Some(Command::Verify {
                        repository_id,
                        virtual_storage,
                        storage,
                    }) => (repository_id, virtual_storage, storage),
                    other => panic!("unexpected {other:?}"),
                },
            )
        };
        assert_eq!(
            verify(&["praefect", "verify", "-repository-id", "7"]).unwrap(),
            (Some(7), None, None)
        );
        assert_eq!(
            verify(&[
                "praefect",
                "verify",
                "-virtual-storage",
                "vs",
                "-storage",
                "s"
            ])
            .unwrap(),
            (None, Some("vs".into()), Some("s".into()))
        );
        assert_eq!(
            verify(&["praefect", "verify", "-virtual-storage=vs"]).unwrap(),
            (None, Some("vs".into()), None)
        );
        for bad in [
            &["praefect", "verify"][..],
            &[
                "praefect",
                "verify",
                "-repository-id",
                "1",
                "-virtual-storage",
                "vs",
            ],
            &["praefect", "verify", "-repository-id", "1", "-storage", "s"],
            &["praefect", "verify", "-storage", "s"],
            &["praefect", "verify", "-repository-id", "0"],
            &["praefect", "verify", "-repository-id", "x"],
        ] {
            assert!(verify(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn lost_primary_tooling_flags() {
        let parsed = |args: &[&str]| {
            Cli::try_parse_from(normalize_args(args.iter().map(OsString::from)))
                .map(|cli| format!("{:?}", cli.command))
        };
        assert_eq!(
            parsed(&["praefect", "dataloss"]).unwrap(),
            format!(
                "{:?}",
                Some(Command::Dataloss {
                    virtual_storage: None,
                    partially_unavailable: false
                })
            )
        );
        for flag in ["-partially-unavailable", "--partially-unavailable=true"] {
            assert!(
                parsed(&["praefect", "dataloss", "-virtual-storage", "vs", flag])
                    .unwrap()
                    .contains("partially_unavailable: true")
            );
        }
        assert!(parsed(&[
            "praefect",
            "accept-dataloss",
            "-virtual-storage=vs",
            "-relative-path=p",
            "-authoritative-storage=s"
        ])
        .is_ok());
        assert!(parsed(&["praefect", "metadata", "-repository-id", "4"]).is_ok());
        assert!(parsed(&[
            "praefect",
            "metadata",
            "-virtual-storage",
            "vs",
            "-relative-path",
            "p"
        ])
        .is_ok());
        assert!(parsed(&["praefect", "list-storages"]).is_ok());
        for bad in [
            &["praefect", "accept-dataloss", "-virtual-storage", "vs"][..],
            &["praefect", "metadata"],
            &["praefect", "metadata", "-virtual-storage", "vs"],
            &["praefect", "metadata", "-relative-path", "p"],
            &[
                "praefect",
                "metadata",
                "-repository-id",
                "1",
                "-virtual-storage",
                "vs",
                "-relative-path",
                "p",
            ],
            &["praefect", "metadata", "-repository-id", "x"],
            &["praefect", "dataloss", "-partially-unavailable=maybe"],
            &["praefect", "list-storages", "extra"],
        ] {
            assert!(parsed(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn unexpected_positional_arguments_are_refused() {
        let args = normalize_args(["praefect", "sql-ping", "extra"].map(OsString::from));
        assert!(Cli::try_parse_from(args).is_err());
    }
}
