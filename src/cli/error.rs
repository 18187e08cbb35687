//! How subcommands fail: each returns a [`CliError`], and [`report`] is the one place that
//! turns it into what the operator sees (a message on stderr) and the exit code scripts
//! check.

use std::process::ExitCode;

use crate::datastore::DatastoreError;

/// Exit code for usage errors (missing -config, bad flags, invalid configuration input).
pub const EXIT_USAGE: u8 = 2;
/// Exit code of a subcommand interrupted by SIGINT, as a shell would report it.
pub const EXIT_INTERRUPTED: u8 = 130;

/// Why a subcommand failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The flags ask for something the subcommand cannot do.
    #[error("{0}")]
    Usage(String),
    /// The database could not do what the subcommand asked.
    #[error("fail: {0}")]
    Database(#[from] DatastoreError),
    /// The router could not be reached.
    #[error("{0}")]
    Dial(String),
    /// The router refused or failed the call (`what` names it, when the output should).
    #[error("{}{}", what.map(|w| format!("{w}: ")).unwrap_or_default(), status_text(status, *with_code))]
    Rpc {
        what: Option<&'static str>,
        status: tonic::Status,
        /// Whether the gRPC code is printed after the message.
        with_code: bool,
    },
    /// Some nodes failed their checks (the output above says how).
    #[error("the following nodes are not healthy: {}", .0.join(", "))]
    UnhealthyNodes(Vec<String>),
    /// The subcommand could not do its work (the message says why).
    #[error("{0}")]
    Failed(String),
    #[error("reading stdin: {0}")]
    Stdin(#[source] std::io::Error),
    /// `check`: at least one fatal check failed (the output above says which).
    #[error("{0} check(s) failed, at least one was fatal.")]
    ChecksFailed(usize),
    #[error("interrupted")]
    Interrupted,
}

fn status_text(status: &tonic::Status, with_code: bool) -> String {
    if with_code {
        format!("{} ({:?})", status.message(), status.code())
    } else {
        status.message().to_string()
    }
}

impl CliError {
    /// A failed call to the router.
    pub fn rpc(status: tonic::Status) -> Self {
        CliError::Rpc {
            what: None,
            status,
            with_code: false,
        }
    }

    /// The exit code scripts see.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => EXIT_USAGE,
            CliError::Interrupted => EXIT_INTERRUPTED,
            _ => 1,
        }
    }
}

/// Prints a failed subcommand's error (`praefect NAME: message`) and gives the exit code.
pub fn report(name: &str, result: Result<(), CliError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            match &err {
                // Said as a sentence of its own, after the per-node lines.
                CliError::UnhealthyNodes(_) => eprintln!("{err}"),
                CliError::ChecksFailed(_) => println!("{err}"),
                CliError::Interrupted => eprintln!("praefect: {err}"),
                _ => eprintln!("praefect {name}: {err}"),
            }
            ExitCode::from(err.exit_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_exit_codes() {
        let cases = [
            (CliError::Usage("give -x".into()), "give -x", 2),
            (
                CliError::Database(DatastoreError::Settings("bad".into())),
                "fail: invalid database settings: bad",
                1,
            ),
            (
                CliError::Rpc {
                    what: Some("mark unverified"),
                    status: tonic::Status::invalid_argument("no selector"),
                    with_code: true,
                },
                "mark unverified: no selector (InvalidArgument)",
                1,
            ),
            (CliError::rpc(tonic::Status::internal("boom")), "boom", 1),
            (
                CliError::UnhealthyNodes(vec!["a".into(), "b".into()]),
                "the following nodes are not healthy: a, b",
                1,
            ),
            (CliError::Interrupted, "interrupted", 130),
        ];
        for (err, message, code) in cases {
            assert_eq!(err.to_string(), message);
            assert_eq!(err.exit_code(), code, "{message}");
        }
    }
}
