//! The router's tasks, grouped by how shutdown treats them.
//!
//! One cancellation token stops everything at once; what differs is how long shutdown waits
//! for each group: in-flight calls (with their sidechannel bridges) and running replication
//! jobs each get the graceful stop timeout (a stuck call or a job on an unresponsive node must
//! not keep the process alive), while the other workers stop at their next wait and are
//! simply awaited.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::GoDuration;

/// The tasks of a running router and the token that stops them.
pub(super) struct Tasks {
    stop: CancellationToken,
    /// The gRPC servers: they stop accepting at once; their in-flight calls get the grace.
    servers: TaskTracker,
    /// The sidechannel bridges, which finish a call's answer after the call itself: they
    /// share the calls' grace.
    bridges: TaskTracker,
    /// The replicator and the reconciler: running jobs finish, within the grace too.
    replication: TaskTracker,
    /// Every other background worker (health, change listener, verifier, metrics).
    workers: TaskTracker,
}

impl Tasks {
    pub(super) fn new() -> Self {
        Tasks {
            stop: CancellationToken::new(),
            servers: TaskTracker::new(),
            bridges: TaskTracker::new(),
            replication: TaskTracker::new(),
            workers: TaskTracker::new(),
        }
    }

    /// The token every task watches (a clone: cancelling it stops them all).
    pub(super) fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// The tracker the proxy spawns its sidechannel bridges on.
    pub(super) fn bridges(&self) -> TaskTracker {
        self.bridges.clone()
    }

    pub(super) fn spawn_server<T: Send + 'static>(
        &self,
        server: impl Future<Output = T> + Send + 'static,
    ) {
        self.servers.spawn(server);
    }

    pub(super) fn spawn_replication(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.replication.spawn(task);
    }

    pub(super) fn spawn_worker<T: Send + 'static>(
        &self,
        task: impl Future<Output = T> + Send + 'static,
    ) {
        self.workers.spawn(task);
    }

    /// Stops everything: the servers stop accepting and their calls (and the calls'
    /// sidechannel bridges) get `grace`, then the replication jobs get `grace` too, then the
    /// other workers are awaited. A group still running after its grace is left behind (it
    /// ends with the process).
    pub(super) async fn stop(self, grace: Duration) {
        self.stop.cancel();
        // Logged as configured (Go syntax), whatever unit the configuration used.
        let timeout = GoDuration::from(grace);
        self.servers.close();
        self.bridges.close();
        let calls = async {
            self.servers.wait().await;
            // A call's bridge is started before the call ends, so none starts after this.
            self.bridges.wait().await;
        };
        if tokio::time::timeout(grace, calls).await.is_err() {
            tracing::warn!(%timeout, "calls still running after the graceful stop timeout; cutting them");
        }
        // A job stuck on an unresponsive node must not keep the process alive: its heartbeat
        // stops, and another router takes it over after a minute.
        self.replication.close();
        if tokio::time::timeout(grace, self.replication.wait())
            .await
            .is_err()
        {
            tracing::warn!(%timeout, "replication jobs still running after the graceful stop timeout; leaving them to other routers");
        }
        self.workers.close();
        self.workers.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use tokio::time::Instant;

    use super::*;

    const GRACE: Duration = Duration::from_secs(10);

    #[tokio::test(start_paused = true)]
    async fn stuck_calls_and_jobs_are_each_cut_after_the_grace() {
        let tasks = Tasks::new();
        tasks.spawn_server(std::future::pending::<()>());
        tasks.spawn_replication(std::future::pending());
        let started = Instant::now();
        tasks.stop(GRACE).await;
        assert_eq!(started.elapsed(), 2 * GRACE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_bridge_that_outlives_its_call_is_waited_for() {
        let tasks = Tasks::new();
        let delivered = Arc::new(AtomicBool::new(false));
        tasks.spawn_server(tokio::time::sleep(Duration::from_secs(1)));
        tasks.bridges().spawn({
            let delivered = delivered.clone();
            async move {
                tokio::time::sleep(Duration::from_secs(3)).await;
                delivered.store(true, Ordering::SeqCst);
            }
        });
        tasks.stop(GRACE).await;
        assert!(delivered.load(Ordering::SeqCst));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stuck_bridge_is_cut_with_the_calls_after_the_grace() {
        let tasks = Tasks::new();
        tasks.spawn_server(tokio::time::sleep(Duration::from_secs(1)));
        tasks.bridges().spawn(std::future::pending::<()>());
        let started = Instant::now();
        tasks.stop(GRACE).await;
        assert_eq!(started.elapsed(), GRACE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stuck_call_does_not_shorten_the_jobs_grace() {
        let tasks = Tasks::new();
        tasks.spawn_server(std::future::pending::<()>());
        let job_done = Arc::new(AtomicBool::new(false));
        tasks.spawn_replication({
            let job_done = job_done.clone();
            async move {
                tokio::time::sleep(GRACE + GRACE / 2).await;
                job_done.store(true, Ordering::SeqCst);
            }
        });
        tasks.stop(GRACE).await;
        assert!(job_done.load(Ordering::SeqCst));
    }

    #[tokio::test(start_paused = true)]
    async fn every_group_sees_the_stop_and_shutdown_waits_for_the_workers() {
        let tasks = Tasks::new();
        let stopped = Arc::new(std::sync::Mutex::new(Vec::new()));
        for group in ["server", "replication", "worker"] {
            let stop = tasks.stop_token();
            let stopped = stopped.clone();
            let task = async move {
                stop.cancelled().await;
                // A little cleanup after the stop, which shutdown waits for.
                tokio::time::sleep(Duration::from_secs(1)).await;
                stopped.lock().unwrap().push(group);
            };
            match group {
                "server" => tasks.spawn_server(task),
                "replication" => tasks.spawn_replication(task),
                _ => tasks.spawn_worker(task),
            }
        }
        let started = Instant::now();
        tasks.stop(GRACE).await;
        assert!(started.elapsed() < GRACE);
        let mut stopped = stopped.lock().unwrap().clone();
        stopped.sort_unstable();
        assert_eq!(stopped, ["replication", "server", "worker"]);
    }
}
