//! What `gitnode-hook` (git's `reference-transaction` hook) and gitnode say to each other, and
//! the hook's rules for what to vote on. Std only (plus `sha1` and `hex`): the hook binary
//! includes this file directly (`#[path]`) so that it links neither tokio nor the library, and
//! starts in a millisecond on every ref update.
//!
//! The hook connects to the Unix socket named by [`SOCKET_ENV`] and writes one line,
//! `<token> <phase> <hex-hash>\n`, where `<token>` is [`TOKEN_ENV`] (it names the call whose
//! git runs the hook), `<phase>` is `prepared` or `committed`, and `<hex-hash>` the 40 hex
//! digits of the SHA-1 of the hook's stdin. gitnode votes and answers one line: `commit`,
//! `abort <reason>`, `stop` or `error <message>`, then closes the connection.

use std::fmt;

use sha1::{Digest, Sha1};

/// The Unix socket the hook connects to; without it the hook does nothing.
pub const SOCKET_ENV: &str = "GITNODE_HOOK_SOCKET";
/// The call the hook votes for; without it the hook does nothing.
pub const TOKEN_ENV: &str = "GITNODE_HOOK_TOKEN";
/// The longest request line gitnode reads (a token, a phase, 40 hex digits).
pub const MAX_REQUEST_LINE: usize = 256;

/// The phases a node votes in: before the change is visible, and after.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Prepared,
    Committed,
}

impl Phase {
    /// The phase of git's hook argument; None for the phases nobody votes in (`preparing`,
    /// `aborted`, and whatever later gits add).
    pub fn from_hook_arg(arg: &str) -> Option<Phase> {
        match arg {
            "prepared" => Some(Phase::Prepared),
            "committed" => Some(Phase::Committed),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Prepared => "prepared",
            Phase::Committed => "committed",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The vote on a set of queued updates: SHA-1 of the hook's stdin, exactly as git wrote it.
pub fn updates_hash(updates: &[u8]) -> [u8; 20] {
    Sha1::digest(updates).into()
}

/// Whether every queued update deletes a ref without checking its value (old and new all
/// zeros). git runs the hook a second time for `packed-refs` when it deletes refs, with such
/// lines, only on a node where the ref happens to be packed: voting on them would make nodes
/// vote different numbers of times for the same change. No updates at all counts too.
pub fn only_force_deletions(updates: &[u8]) -> bool {
    updates
        .split(|b| *b == b'\n')
        .filter(|line| !line.is_empty())
        .all(is_force_deletion)
}

fn is_force_deletion(line: &[u8]) -> bool {
    let mut fields = line.splitn(3, |b| *b == b' ');
    let (Some(old), Some(new), Some(_name)) = (fields.next(), fields.next(), fields.next()) else {
        return false;
    };
    is_zero_oid(old) && is_zero_oid(new)
}

fn is_zero_oid(oid: &[u8]) -> bool {
    (oid.len() == 40 || oid.len() == 64) && oid.iter().all(|b| *b == b'0')
}

/// A hook's request, as gitnode reads it.
#[derive(Debug, PartialEq, Eq)]
pub struct HookRequest {
    pub token: String,
    pub phase: Phase,
    pub hash: [u8; 20],
}

impl HookRequest {
    /// The request line, newline included.
    pub fn to_line(&self) -> String {
        format!(
            "{} {} {}\n",
            self.token,
            self.phase.as_str(),
            hex::encode(self.hash)
        )
    }

    /// Reads a request line (with or without its newline).
    pub fn parse(line: &str) -> Result<HookRequest, ProtocolError> {
        let mut fields = line.trim_end_matches('\n').split(' ');
        let (Some(token), Some(phase), Some(hash), None) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(ProtocolError("expected \"<token> <phase> <hash>\""));
        };
        if token.is_empty() {
            return Err(ProtocolError("empty token"));
        }
        let phase = Phase::from_hook_arg(phase).ok_or(ProtocolError("unknown phase"))?;
        let mut bytes = [0u8; 20];
        hex::decode_to_slice(hash, &mut bytes)
            .map_err(|_| ProtocolError("the hash is not 40 hex digits"))?;
        Ok(HookRequest {
            token: token.to_string(),
            phase,
            hash: bytes,
        })
    }
}

/// gitnode's answer to a hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The vote passed: go on.
    Commit,
    /// The transaction failed: roll back.
    Abort(String),
    /// The transaction was stopped: apply nothing, vote no more.
    Stop,
    /// No vote could be cast (unknown token, router unreachable, ...).
    Error(String),
}

impl Answer {
    /// The answer line, newline included; reasons are kept on one line.
    pub fn to_line(&self) -> String {
        let one_line = |text: &str| text.replace(['\n', '\r'], " ");
        match self {
            Answer::Commit => "commit\n".to_string(),
            Answer::Abort(reason) => format!("abort {}\n", one_line(reason)),
            Answer::Stop => "stop\n".to_string(),
            Answer::Error(message) => format!("error {}\n", one_line(message)),
        }
    }

    /// Reads an answer line; anything unexpected is an error answer.
    pub fn parse(line: &str) -> Answer {
        let line = line.trim_end_matches('\n');
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        match word {
            "commit" => Answer::Commit,
            "abort" => Answer::Abort(rest.to_string()),
            "stop" => Answer::Stop,
            "error" => Answer::Error(rest.to_string()),
            _ => Answer::Error(format!("unexpected answer {line:?}")),
        }
    }
}

/// A request line that does not parse. (A plain error type rather than `thiserror`: this file
/// is compiled into the std-only hook too.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProtocolError(pub &'static str);

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad hook request: {}", self.0)
    }
}

impl std::error::Error for ProtocolError {}

#[cfg(test)]
mod tests {
    use super::*;

    const ZERO: &str = "0000000000000000000000000000000000000000";
    const A: &str = "c0474e6c5ea388641d2e3ccb02ac89ad8707003e";

    #[test]
    fn the_hash_is_sha1_of_the_exact_input() {
        let input = format!("{ZERO} {A} refs/heads/main\n");
        let hash = updates_hash(input.as_bytes());
        assert_eq!(hash.len(), 20);
        assert_eq!(
            hex::encode(hash),
            hex::encode(Sha1::digest(input.as_bytes()))
        );
        // One byte more is another vote.
        assert_ne!(updates_hash(input.trim_end().as_bytes()), hash);
        assert_eq!(
            hex::encode(updates_hash(b"")),
            "da39a3ee5e6b4b0d3255bfef95601890afd80709"
        );
    }

    #[test]
    fn only_force_deletions_are_skipped() {
        let force = format!("{ZERO} {ZERO} refs/heads/gone\n");
        let checked = format!("{A} {ZERO} refs/heads/gone\n");
        let create = format!("{ZERO} {A} refs/heads/new\n");
        let zero256 = "0".repeat(64);
        assert!(only_force_deletions(force.as_bytes()));
        assert!(only_force_deletions(
            format!("{force}{ZERO} {ZERO} refs/tags/x\n").as_bytes()
        ));
        assert!(only_force_deletions(
            format!("{zero256} {zero256} refs/heads/x\n").as_bytes()
        ));
        assert!(only_force_deletions(b""), "nothing to vote on");
        assert!(!only_force_deletions(checked.as_bytes()));
        assert!(!only_force_deletions(create.as_bytes()));
        assert!(!only_force_deletions(format!("{force}{create}").as_bytes()));
        // A symbolic ref update: the new value is not an object id.
        assert!(!only_force_deletions(
            format!("{ZERO} ref:refs/heads/main HEAD\n").as_bytes()
        ));
        assert!(!only_force_deletions(b"garbage\n"));
    }

    #[test]
    fn phases_of_the_hook_argument() {
        assert_eq!(Phase::from_hook_arg("prepared"), Some(Phase::Prepared));
        assert_eq!(Phase::from_hook_arg("committed"), Some(Phase::Committed));
        for other in ["preparing", "aborted", "", "PREPARED"] {
            assert_eq!(Phase::from_hook_arg(other), None, "{other:?}");
        }
    }

    #[test]
    fn requests_and_answers_round_trip() {
        let request = HookRequest {
            token: "abc123".into(),
            phase: Phase::Committed,
            hash: updates_hash(b"x"),
        };
        let line = request.to_line();
        assert!(line.ends_with('\n') && line.starts_with("abc123 committed "));
        assert_eq!(HookRequest::parse(&line).unwrap(), request);
        for bad in [
            "",
            "abc prepared",
            "abc prepared 00",
            "abc aborted 0000000000000000000000000000000000000000",
            " prepared 0000000000000000000000000000000000000000",
            "abc prepared 0000000000000000000000000000000000000000 extra",
            "abc prepared zz00000000000000000000000000000000000000",
        ] {
            assert!(HookRequest::parse(bad).is_err(), "{bad:?} accepted");
        }
        for answer in [
            Answer::Commit,
            Answer::Stop,
            Answer::Abort("votes differ".into()),
            Answer::Error("no such token".into()),
        ] {
            assert_eq!(Answer::parse(&answer.to_line()), answer);
        }
        assert_eq!(
            Answer::Abort("a\nb".into()).to_line(),
            "abort a b\n",
            "one line"
        );
        assert!(matches!(Answer::parse("maybe\n"), Answer::Error(_)));
    }
}
