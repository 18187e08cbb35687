//! What the transaction tests share: a stand-in for the router's RefTransaction service that
//! records every vote and answers from a script, and helpers to make objects and requests.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::collections::VecDeque;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use praefect_wire::auth::TokenInterceptor;
use praefect_wire::backchannel::{dial_lazy, yamux_config, ClientHandler};
use praefect_wire::proto::ref_transaction_server::{RefTransaction, RefTransactionServer};
use praefect_wire::proto::vote_transaction_response::TransactionState;
use praefect_wire::proto::*;
use praefect_wire::transaction::{TransactionMetadata, METADATA_KEY};
use testkit::gitnode::{Authed, GitNode, TOKEN};
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

pub const ZERO: &str = "0000000000000000000000000000000000000000";
pub const PREPARED: i32 = 1;
pub const COMMITTED: i32 = 2;

/// One vote as the router saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vote {
    pub id: u64,
    pub node: String,
    pub phase: i32,
    pub hash: Vec<u8>,
}

/// The router's side of the votes: records them, answers COMMIT unless scripted otherwise.
#[derive(Clone, Default)]
pub struct Router {
    votes: Arc<Mutex<Vec<Vote>>>,
    script: Arc<Mutex<VecDeque<TransactionState>>>,
}

#[tonic::async_trait]
impl RefTransaction for Router {
    async fn vote_transaction(
        &self,
        request: Request<VoteTransactionRequest>,
    ) -> Result<Response<VoteTransactionResponse>, Status> {
        let req = request.into_inner();
        self.votes.lock().unwrap().push(Vote {
            id: req.transaction_id,
            node: req.node,
            phase: req.phase,
            hash: req.reference_updates_hash,
        });
        let state = self
            .script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(TransactionState::Commit);
        Ok(Response::new(VoteTransactionResponse {
            state: state as i32,
        }))
    }

    async fn stop_transaction(
        &self,
        _request: Request<StopTransactionRequest>,
    ) -> Result<Response<StopTransactionResponse>, Status> {
        Ok(Response::new(StopTransactionResponse {}))
    }
}

impl Router {
    /// A channel to `node` with the backchannel, on which the node can reach this router.
    pub fn channel(&self, node: &GitNode) -> Authed {
        let handler = ClientHandler {
            routes: Some(tonic::service::Routes::new(RefTransactionServer::new(
                self.clone(),
            ))),
            ..Default::default()
        };
        let channel = dial_lazy(&node.address, yamux_config(0, 256), handler).unwrap();
        InterceptedService::new(channel, TokenInterceptor::new(TOKEN))
    }

    /// The answers to the next votes, in order (COMMIT after them).
    pub fn answer(&self, states: &[TransactionState]) {
        self.script.lock().unwrap().extend(states.iter().copied());
    }

    pub fn votes(&self) -> Vec<Vote> {
        self.votes.lock().unwrap().clone()
    }

    /// The votes of transaction `id`.
    pub fn votes_of(&self, id: u64) -> Vec<Vote> {
        self.votes().into_iter().filter(|v| v.id == id).collect()
    }

    /// Checks that transaction `id` had exactly a PREPARED and a COMMITTED vote from
    /// `node`, on the same 20-byte hash, and returns it.
    pub fn two_phase_hash(&self, id: u64, node: &str) -> Vec<u8> {
        let votes = self.votes_of(id);
        let phases: Vec<i32> = votes.iter().map(|v| v.phase).collect();
        assert_eq!(phases, [PREPARED, COMMITTED], "{votes:?}");
        for vote in &votes {
            assert_eq!(vote.node, node);
            assert_eq!(vote.hash.len(), 20, "a SHA-1 digest");
        }
        assert_eq!(votes[0].hash, votes[1].hash);
        votes[0].hash.clone()
    }
}

/// `message` with the transaction metadata of transaction `id` for `node`.
pub fn in_transaction<T>(message: T, id: u64, node: &str) -> Request<T> {
    let mut request = Request::new(message);
    let value = TransactionMetadata {
        id,
        node: node.to_string(),
        primary: true,
    }
    .encode();
    request
        .metadata_mut()
        .insert(METADATA_KEY, value.parse().unwrap());
    request
}

/// Runs git in `dir` with `input` on stdin; returns stdout.
pub fn git_stdin(dir: &Path, args: &[&str], input: &[u8]) -> Vec<u8> {
    let mut child = Command::new("git")
        .current_dir(dir)
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

/// Writes a commit with a file `name` holding `content` straight into the repository at
/// `git_dir`; the same arguments give the same commit id in any repository.
pub fn make_commit(git_dir: &Path, name: &str, content: &str) -> String {
    let blob = git_stdin(
        git_dir,
        &["hash-object", "-w", "--stdin"],
        content.as_bytes(),
    );
    let blob = String::from_utf8(blob).unwrap();
    let tree = git_stdin(
        git_dir,
        &["mktree"],
        format!("100644 blob {}\t{name}\n", blob.trim()).as_bytes(),
    );
    let tree = String::from_utf8(tree).unwrap();
    let date = [
        ("GIT_AUTHOR_DATE", "1700000000 +0000"),
        ("GIT_COMMITTER_DATE", "1700000000 +0000"),
    ];
    testkit::gitnode::git(git_dir, &["commit-tree", "-m", name, tree.trim()], &date)
        .trim()
        .to_string()
}

/// The object a ref of the repository at `git_dir` points to, if it exists.
pub fn resolve(git_dir: &Path, name: &str) -> Option<String> {
    let output = Command::new("git")
        .current_dir(git_dir)
        .args(["rev-parse", "--verify", "--quiet", name])
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .output()
        .unwrap();
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_string())
}

/// SHA-1 of `text`, what the hook votes for that stdin.
pub fn sha1_of(text: &str) -> Vec<u8> {
    use sha1::Digest;
    sha1::Sha1::digest(text.as_bytes()).to_vec()
}
