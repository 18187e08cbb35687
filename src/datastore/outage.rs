//! One log line per worker kind when the database goes away, one when it is back (with the
//! outage's length), instead of one error per failed iteration: a 30 s outage would otherwise
//! print hundreds of lines per router and drown the one that matters. Errors that are not
//! about the database being unavailable are still logged by the caller every time.

use std::sync::Mutex;
use std::time::Instant;

use super::DatastoreError;

/// The outage state of one kind of background worker.
pub struct OutageLog {
    worker: &'static str,
    since: Mutex<Option<Instant>>,
}

impl OutageLog {
    pub const fn new(worker: &'static str) -> Self {
        OutageLog {
            worker,
            since: Mutex::new(None),
        }
    }

    /// Notes a failed operation. Returns true when the error is the database being
    /// unavailable (logged here once per outage; the caller should not log it again).
    pub fn failed(&self, err: &DatastoreError) -> bool {
        if !err.is_unavailable() {
            return false;
        }
        let mut since = self.since.lock().unwrap_or_else(|p| p.into_inner());
        if since.is_none() {
            *since = Some(Instant::now());
            tracing::warn!(
                worker = self.worker,
                error = %err,
                "database unavailable: {} paused until it is back",
                self.worker
            );
        }
        true
    }

    /// Notes a successful operation, ending an outage if there was one.
    fn succeeded(&self) {
        let mut since = self.since.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(started) = since.take() {
            let outage = started.elapsed().as_secs_f64();
            tracing::info!(
                worker = self.worker,
                outage_s = outage,
                "database available again: {} resumed after {outage:.2}s",
                self.worker
            );
        }
    }

    /// Notes an operation's outcome, success or failure; returns the error the caller should
    /// still log (one that is not the database being unavailable).
    pub fn observe<'a, T>(
        &self,
        outcome: &'a Result<T, DatastoreError>,
    ) -> Option<&'a DatastoreError> {
        match outcome {
            Ok(_) => {
                self.succeeded();
                None
            }
            Err(err) => (!self.failed(err)).then_some(err),
        }
    }
}

/// The health checker's writes to `node_status`.
pub static HEALTH_RECORDER: OutageLog = OutageLog::new("health recorder");
/// The replicator's dequeues, acknowledgements and heartbeats.
pub static REPLICATOR: OutageLog = OutageLog::new("replicator");
/// The replicator's periodic clean-ups (stale jobs, orphan locks).
pub static QUEUE_CLEANER: OutageLog = OutageLog::new("replication queue cleaner");
/// The reconciler.
pub static RECONCILER: OutageLog = OutageLog::new("reconciler");
/// The background verifier.
pub static VERIFIER: OutageLog = OutageLog::new("verifier");
/// The releaser of expired verification leases.
pub static LEASE_RELEASER: OutageLog = OutageLog::new("verification lease releaser");
