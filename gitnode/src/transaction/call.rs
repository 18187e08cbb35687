//! One transactional call as the hook's votes find it by the call's token ([`CallState`]);
//! the call's handler holds it through a `Transaction` handle.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use praefect_wire::transaction::TransactionMetadata;
use tokio::sync::watch;

use super::voter::VoteError;

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

    /// The first vote that did not pass, if any.
    pub(super) fn failure(&self) -> Option<VoteError> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(super) fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Relaxed)
    }
}
