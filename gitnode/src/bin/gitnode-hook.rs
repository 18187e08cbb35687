//! `gitnode-hook`: git's `reference-transaction` hook for gitnode. gitnode points
//! `core.hooksPath` at a directory where `reference-transaction` is a symlink to this binary,
//! only for calls that take part in a reference transaction, and sets two variables:
//!
//! ```text
//! GITNODE_HOOK_SOCKET  gitnode's Unix socket for votes
//! GITNODE_HOOK_TOKEN   which call's transaction to vote in
//! ```
//!
//! git runs the hook with the phase as argument (`preparing`, `prepared`, `committed`,
//! `aborted`) and the queued updates on stdin (`<old> <new> <ref>` lines). In `prepared` and
//! `committed` the hook votes with the SHA-1 of its stdin, through gitnode, and exits 0 only
//! if the transaction may go on; a failure in `prepared` makes git roll the update back. A
//! failure in `committed` cannot undo anything: it is reported (non-zero exit, stderr).
//!
//! Std only, and no runtime: it runs on every ref update of a transactional call. The
//! protocol is in `gitnode/src/transaction/protocol.rs`, which this binary includes.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::Duration;

#[path = "../transaction/protocol.rs"]
#[allow(dead_code)]
mod protocol;

use protocol::{Answer, HookRequest, Phase};

/// gitnode waits up to five minutes for the router's answer; a little more here.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(330);
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    let (Some(socket), Ok(token)) = (
        std::env::var_os(protocol::SOCKET_ENV),
        std::env::var(protocol::TOKEN_ENV),
    ) else {
        // Not a transactional call (or not run by gitnode at all).
        return ExitCode::SUCCESS;
    };
    let Some(phase) = std::env::args()
        .nth(1)
        .as_deref()
        .and_then(Phase::from_hook_arg)
    else {
        return ExitCode::SUCCESS;
    };
    let mut updates = Vec::new();
    if let Err(err) = std::io::stdin().read_to_end(&mut updates) {
        eprintln!("gitnode-hook: reading the updates: {err}");
        return ExitCode::FAILURE;
    }
    if protocol::only_force_deletions(&updates) {
        return ExitCode::SUCCESS;
    }
    let request = HookRequest {
        token,
        phase,
        hash: protocol::updates_hash(&updates),
    };
    match ask(&socket, &request) {
        Ok(Answer::Commit) => ExitCode::SUCCESS,
        Ok(Answer::Abort(reason)) => fail(phase, &format!("transaction was aborted: {reason}")),
        Ok(Answer::Stop) => fail(phase, "transaction was stopped"),
        Ok(Answer::Error(message)) => fail(phase, &message),
        Err(err) => fail(phase, &format!("asking gitnode: {err}")),
    }
}

fn fail(phase: Phase, message: &str) -> ExitCode {
    eprintln!("gitnode-hook: {phase}: {message}");
    ExitCode::FAILURE
}

/// Sends the vote to gitnode and reads its answer.
fn ask(socket: &std::ffi::OsStr, request: &HookRequest) -> std::io::Result<Answer> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    stream.write_all(request.to_line().as_bytes())?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "gitnode closed the connection without an answer",
        ));
    }
    Ok(Answer::parse(&line))
}
