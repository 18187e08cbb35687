//! One transactional call: what the hook's votes find by the call's token ([`CallState`]),
//! and the handle the call's handler keeps while its git commands run ([`Transaction`]).

use std::ffi::OsString;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use praefect_wire::transaction::TransactionMetadata;
use tokio::sync::watch;
use tonic::Status;

use super::protocol::{self, Phase};
use super::{Transactions, VoteError};

/// A transactional call in progress, as the hook's votes find it by token.
pub(super) struct CallState {
    pub(super) tx: TransactionMetadata,
    pub(super) backchannel: u64,
    /// The first vote that did not pass, to tell why git failed.
    failure: Mutex<Option<VoteError>>,
    /// The router stopped the transaction: vote no more.
    stopped: AtomicBool,
    /// Set when the call ends, to give up votes still waiting.
    pub(super) ended: watch::Sender<bool>,
}

impl CallState {
    pub(super) fn new(tx: TransactionMetadata, backchannel: u64) -> CallState {
        CallState {
            tx,
            backchannel,
            failure: Mutex::default(),
            stopped: AtomicBool::new(false),
            ended: watch::channel(false).0,
        }
    }

    /// Remembers a vote that did not pass (the first one wins).
    pub(super) fn record(&self, err: &VoteError) {
        if *err == VoteError::Stopped {
            self.stopped.store(true, Ordering::Relaxed);
        }
        let mut failure = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        failure.get_or_insert_with(|| err.clone());
    }

    pub(super) fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Relaxed)
    }
}

/// One call's part in a transaction; unregisters the call when dropped. Keep it as long as
/// the git commands it configured run.
pub struct Transaction {
    pub(super) token: String,
    pub(super) call: Arc<CallState>,
    pub(super) owner: Transactions,
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
        self.call
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
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
