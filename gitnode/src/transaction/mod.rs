//! Reference transactions: how gitnode takes part in the router's votes, as Gitaly does.
//!
//! The router sends a write to several nodes at once, each copy with the
//! `gitaly-reference-transaction` metadata (transaction id, node name). Each node votes the
//! SHA-1 of the change it is about to make (PREPARED, before it is visible) and of the change
//! it made (COMMITTED), calling `RefTransaction/VoteTransaction` back to the router over the
//! backchannel session the call came in on; the router answers once the nodes agree (COMMIT)
//! or not (ABORT), or when it gave up on the transaction (STOP).
//!
//! Ref updates made by git vote through git's `reference-transaction` hook: a transactional
//! call runs git with `core.hooksPath` set to gitnode's private hooks directory, where the
//! hook is `gitnode-hook`, and with a token in the environment that names the call
//! ([`Transactions::begin`] registers it for the duration of the call). The hook hands its
//! vote to gitnode over a Unix socket ([`hook_socket`], [`protocol`]), and gitnode votes
//! ([`voter`]) over a channel per backchannel session (`praefect_wire::backchannel::CallbackChannels`). Changes git
//! makes outside a ref transaction (a new repository) are voted by gitnode directly, with
//! [`Transaction::vote`]. A call without the metadata is untouched: no hooks path, no token,
//! no votes.
//!
//! Test-only knobs, read from gitnode's environment at startup, to make one node of a test
//! cluster misbehave: [`SALT_ENV`] (`GITNODE_TEST_VOTE_SALT=<s>`) mixes `s` into every hash
//! this node sends, so it disagrees with its peers; [`REFUSE_ENV`]
//! (`GITNODE_TEST_HOOK_REFUSE=1`) makes this node's hook fail the `prepared` phase without
//! voting; [`DELAY_ENV`] (`GITNODE_TEST_HOOK_DELAY_MS=<ms>`) makes this node's hook wait that
//! long before its `committed` vote (the references are updated by then), so a test can act
//! while a write is applied but not finished. Never set them in production.

mod call;
mod hook_socket;
pub mod protocol;
mod runtime;
mod state;
mod voter;

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::Path;
use std::sync::{Arc, Mutex};

use praefect_wire::backchannel::{PeerInfo, SessionRegistry};
use praefect_wire::transaction::{TransactionMetadata, METADATA_KEY};
use tonic::Status;

pub use praefect_wire::backchannel::CallbackChannels;
pub use protocol::Phase;
pub use state::RepositoryState;
pub use voter::{VoteError, Voter, VOTE_TIMEOUT};

use call::CallState;
use protocol::Answer;
use runtime::RuntimeDir;

/// Test only: mixed into every hash this node votes.
pub const SALT_ENV: &str = "GITNODE_TEST_VOTE_SALT";
/// Test only: `1` makes this node's hook fail the `prepared` phase without voting.
pub const REFUSE_ENV: &str = "GITNODE_TEST_HOOK_REFUSE";
/// Test only: milliseconds the hook waits before its `committed` vote.
pub const DELAY_ENV: &str = "GITNODE_TEST_HOOK_DELAY_MS";

/// The test-only knobs (see the module documentation).
#[derive(Clone, Debug, Default)]
pub struct TestKnobs {
    pub vote_salt: Vec<u8>,
    pub hook_refuse: bool,
    pub committed_delay: std::time::Duration,
}

impl TestKnobs {
    pub fn from_env() -> TestKnobs {
        let knobs = TestKnobs {
            vote_salt: std::env::var_os(SALT_ENV)
                .map(|s| s.into_encoded_bytes())
                .unwrap_or_default(),
            hook_refuse: std::env::var(REFUSE_ENV).is_ok_and(|v| v == "1"),
            committed_delay: std::env::var(DELAY_ENV)
                .ok()
                .and_then(|v| v.parse().ok())
                .map(std::time::Duration::from_millis)
                .unwrap_or_default(),
        };
        if !knobs.vote_salt.is_empty() || knobs.hook_refuse || !knobs.committed_delay.is_zero() {
            tracing::warn!(?knobs, "test-only transaction knobs are set");
        }
        knobs
    }
}

/// The node's side of reference transactions: calls in progress, the hook's socket, votes.
#[derive(Clone)]
pub struct Transactions {
    inner: Arc<Inner>,
}

struct Inner {
    /// The hooks directory and socket, or why there are none (then transactional calls fail).
    runtime: Result<RuntimeDir, String>,
    calls: Mutex<HashMap<String, Arc<CallState>>>,
    voter: Voter,
    hook_refuse: bool,
    committed_delay: std::time::Duration,
    listener: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Transactions {
    /// Sets up the runtime directory under `base` (with the hook linked to `hook_binary`)
    /// and starts serving the hook socket. Failures are logged, not fatal: gitnode still
    /// serves everything but transactional calls.
    pub fn start(
        sessions: SessionRegistry,
        base: &Path,
        hook_binary: &Path,
        knobs: TestKnobs,
    ) -> Transactions {
        let runtime = if hook_binary.is_file() {
            RuntimeDir::create(base, hook_binary)
                .map_err(|e| format!("creating the hooks directory: {e}"))
        } else {
            Err(format!("{} not found", hook_binary.display()))
        };
        let transactions = Transactions {
            inner: Arc::new(Inner {
                runtime,
                calls: Mutex::default(),
                voter: Voter::new(CallbackChannels::new(sessions), knobs.vote_salt),
                hook_refuse: knobs.hook_refuse,
                committed_delay: knobs.committed_delay,
                listener: Mutex::default(),
            }),
        };
        let listener = match &transactions.inner.runtime {
            Ok(runtime) => hook_socket::serve(runtime.socket(), &transactions),
            Err(why) => Err(why.clone()),
        };
        match listener {
            Ok(task) => *transactions.lock_listener() = Some(task),
            Err(why) => {
                tracing::warn!(error = %why, "reference transactions are unavailable")
            }
        }
        transactions
    }

    fn lock_calls(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<CallState>>> {
        self.inner.calls.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_listener(&self) -> std::sync::MutexGuard<'_, Option<tokio::task::JoinHandle<()>>> {
        self.inner
            .listener
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The transaction of a call, if its metadata has one: registered until the returned
    /// guard is dropped. A transaction needs the caller's backchannel session to vote on.
    pub fn begin(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        extensions: &tonic::Extensions,
    ) -> Result<Option<Transaction>, Status> {
        let Some(value) = metadata.get(METADATA_KEY) else {
            return Ok(None);
        };
        let tx = TransactionMetadata::decode(value.as_bytes())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let backchannel = extensions
            .get::<PeerInfo>()
            .and_then(|peer| peer.backchannel_id)
            .ok_or_else(|| {
                Status::failed_precondition(
                    "reference transaction needs a backchannel connection: the node votes \
                     back over the caller's backchannel session, and this call came without one",
                )
            })?;
        if let Err(why) = &self.inner.runtime {
            return Err(Status::internal(format!(
                "reference transactions are unavailable on this node: {why}"
            )));
        }
        let token = uuid::Uuid::new_v4().simple().to_string();
        let call = Arc::new(CallState::new(tx, backchannel));
        self.lock_calls().insert(token.clone(), call.clone());
        Ok(Some(Transaction {
            token,
            call,
            owner: self.clone(),
        }))
    }

    /// Calls in progress (for tests).
    pub fn calls_in_progress(&self) -> usize {
        self.lock_calls().len()
    }

    /// Stops serving the hook socket and removes the runtime directory.
    pub fn shutdown(&self) {
        if let Some(task) = self.lock_listener().take() {
            task.abort();
        }
        if let Ok(runtime) = &self.inner.runtime {
            runtime.remove();
        }
    }

    async fn vote_for(
        &self,
        call: &CallState,
        phase: Phase,
        hash: [u8; 20],
    ) -> Result<(), VoteError> {
        if call.is_stopped() {
            return Err(VoteError::Stopped);
        }
        let mut ended = call.ended.subscribe();
        let result = tokio::select! {
            result = self.inner.voter.vote(&call.tx, call.backchannel, phase, hash) => result,
            _ = ended.wait_for(|ended| *ended) => {
                Err(VoteError::Failed("the call ended before the vote was answered".into()))
            }
        };
        if let Err(err) = &result {
            call.record(err);
        }
        result
    }

    /// A vote the hook asks for, on behalf of the call `token` names.
    async fn hook_vote(&self, token: &str, phase: Phase, hash: [u8; 20]) -> Answer {
        let call = self.lock_calls().get(token).cloned();
        let Some(call) = call else {
            return Answer::Error("no call in progress has this token".into());
        };
        if self.inner.hook_refuse && phase == Phase::Prepared {
            let why = format!("refused without voting ({REFUSE_ENV})");
            call.record(&VoteError::Failed(why.clone()));
            return Answer::Error(why);
        }
        if phase == Phase::Committed && !self.inner.committed_delay.is_zero() {
            tokio::time::sleep(self.inner.committed_delay).await;
        }
        match self.vote_for(&call, phase, hash).await {
            Ok(()) => Answer::Commit,
            Err(VoteError::Aborted) => Answer::Abort("the router answered ABORT".into()),
            Err(VoteError::Stopped) => Answer::Stop,
            Err(VoteError::Failed(message)) => Answer::Error(message),
        }
    }
}

/// One call's part in a transaction; unregisters the call when dropped. Keep it as long as
/// the git commands it configured run.
pub struct Transaction {
    token: String,
    call: Arc<CallState>,
    owner: Transactions,
}

impl Transaction {
    /// Makes a git command vote through the hook: sets the hooks path (a `-c` option, so call
    /// this before the subcommand's name is added) and the hook's environment.
    pub fn configure(&self, command: &mut tokio::process::Command) {
        let Ok(runtime) = &self.owner.inner.runtime else {
            return;
        };
        let mut option = OsString::from("core.hooksPath=");
        option.push(runtime.hooks());
        command
            .arg("-c")
            .arg(option)
            .env(protocol::SOCKET_ENV, runtime.socket())
            .env(protocol::TOKEN_ENV, &self.token);
    }

    /// Votes `hash` in `phase` directly (for changes no ref transaction of git covers).
    pub async fn vote(&self, phase: Phase, hash: [u8; 20]) -> Result<(), VoteError> {
        self.owner.vote_for(&self.call, phase, hash).await
    }

    /// The first vote of this call that did not pass, if any: why git failed, when the hook
    /// made it fail.
    pub fn failure(&self) -> Option<VoteError> {
        self.call.failure()
    }

    /// Turns a failed git command's status into the vote's failure, if a vote made it fail.
    pub fn explain(&self, status: Status) -> Status {
        self.failure().map(Status::from).unwrap_or(status)
    }

    pub fn metadata(&self) -> &TransactionMetadata {
        &self.call.tx
    }
}

impl Drop for Transaction {
    fn drop(&mut self) {
        self.owner.lock_calls().remove(&self.token);
        self.call.ended.send_replace(true);
    }
}

#[cfg(test)]
mod tests;
