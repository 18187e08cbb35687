//! The replicator (spec §5): per virtual storage, `parallel_storage_processing_workers`
//! workers take the target storages in turn, dequeue up to `batch_size` jobs for a locally
//! healthy one, run them one after the other, and acknowledge them by outcome. A storage that
//! had no work (or was unhealthy) waits 1 s, 2 s, 4 s, then 5 s before its next turn; finding
//! work resets that. Jobs in flight are finished on shutdown, never cut.
//!
//! Also here: the two housekeepers of the queue, which free the jobs of routers that died
//! mid-job (heartbeat older than a minute, checked every 30 s) and drop lock rows nothing uses
//! (every 30 min).

mod job;
mod metrics;
pub mod reconciler;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::datastore::{outage, Datastore, JobState, QueuedJob};
use crate::health::HealthManager;
use crate::nodes::NodePool;
use crate::periodic::{run_every, sleep_unless_cancelled, FirstRun};

pub use job::{gitaly_servers, JobError, JobRunner, GITALY_SERVERS_METADATA};

/// How often running jobs refresh their heartbeat.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
/// A job whose heartbeat is older than this belongs to a router that died.
pub const STALE_JOB_TIMEOUT: Duration = Duration::from_secs(60);
/// How often stale jobs are looked for.
pub const STALE_JOB_CHECK_INTERVAL: Duration = Duration::from_secs(30);
/// How often unused lock rows are deleted, and how many at a time.
pub const ORPHAN_LOCK_INTERVAL: Duration = Duration::from_secs(30 * 60);
pub const ORPHAN_LOCK_BATCH: i64 = 1000;

const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The next wait after an idle turn: doubling from 1 s, capped at 5 s.
fn next_backoff(current: Duration) -> Duration {
    if current.is_zero() {
        BACKOFF_START
    } else {
        (current * 2).min(BACKOFF_MAX)
    }
}

/// One target storage's place in the rotation.
#[derive(Debug)]
struct Turn {
    storage: String,
    not_before: Instant,
    backoff: Duration,
}

/// The target storages of one virtual storage, shared by its workers.
struct Rotation {
    turns: Mutex<Vec<Turn>>,
}

impl Rotation {
    fn new(storages: impl IntoIterator<Item = String>) -> Self {
        let now = Instant::now();
        Rotation {
            turns: Mutex::new(
                storages
                    .into_iter()
                    .map(|storage| Turn {
                        storage,
                        not_before: now,
                        backoff: Duration::ZERO,
                    })
                    .collect(),
            ),
        }
    }

    /// Takes the turn that is due first (None while other workers hold them all).
    fn take(&self) -> Option<Turn> {
        let mut turns = self.turns.lock().unwrap_or_else(|p| p.into_inner());
        let index = turns
            .iter()
            .enumerate()
            .min_by_key(|(_, turn)| turn.not_before)
            .map(|(index, _)| index)?;
        Some(turns.swap_remove(index))
    }

    fn give_back(&self, turn: Turn) {
        self.turns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(turn);
    }
}

/// Runs the replication queue of every virtual storage.
#[derive(Clone)]
pub struct Replicator {
    pub config: Arc<Config>,
    pub nodes: Arc<NodePool>,
    pub health: HealthManager,
    pub store: Datastore,
}

impl Replicator {
    /// Runs until `stop` is cancelled, then lets running batches finish.
    pub async fn run(self, stop: CancellationToken) {
        let workers = usize::try_from(self.config.replication.parallel_storage_processing_workers)
            .unwrap_or(1)
            .max(1);
        let mut tasks = Vec::new();
        for vs in &self.config.virtual_storage {
            let rotation = Arc::new(Rotation::new(vs.node.iter().map(|n| n.storage.clone())));
            for _ in 0..workers {
                tasks.push(tokio::spawn(self.clone().worker(
                    vs.name.clone(),
                    rotation.clone(),
                    stop.clone(),
                )));
            }
        }
        tasks.push(tokio::spawn(self.clone().release_stale_jobs(stop.clone())));
        tasks.push(tokio::spawn(self.clone().delete_orphan_locks(stop.clone())));
        futures::future::join_all(tasks).await;
    }

    async fn worker(
        self,
        virtual_storage: String,
        rotation: Arc<Rotation>,
        stop: CancellationToken,
    ) {
        loop {
            if stop.is_cancelled() {
                return;
            }
            let Some(mut turn) = rotation.take() else {
                // Every storage is being worked on by another worker.
                if sleep_unless_cancelled(BACKOFF_START, &stop).await {
                    continue;
                }
                return;
            };
            let wait = turn.not_before.saturating_duration_since(Instant::now());
            if !wait.is_zero() && !sleep_unless_cancelled(wait, &stop).await {
                rotation.give_back(turn);
                return;
            }
            // Not raced against `stop`: a batch that started runs to its end.
            let found = self.process(&virtual_storage, &turn.storage).await;
            turn.backoff = if found {
                Duration::ZERO
            } else {
                next_backoff(turn.backoff)
            };
            turn.not_before = Instant::now() + turn.backoff;
            rotation.give_back(turn);
        }
    }

    /// One turn of one target storage; whether it found work.
    async fn process(&self, virtual_storage: &str, storage: &str) -> bool {
        let healthy = self
            .health
            .healthy()
            .get(virtual_storage)
            .is_some_and(|set| set.contains(storage));
        if !healthy {
            return false;
        }
        let dequeued = self
            .store
            .dequeue(
                virtual_storage,
                storage,
                self.config.replication.batch_size.max(1),
            )
            .await;
        if let Some(err) = outage::REPLICATOR.observe(&dequeued) {
            tracing::error!(virtual_storage, storage, error = %err, "dequeuing replication jobs failed");
        }
        let Ok(jobs) = dequeued else {
            return false;
        };
        if jobs.is_empty() {
            return false;
        }
        let ids: Vec<i64> = jobs.iter().map(|j| j.id).collect();
        let heartbeat = tokio::spawn({
            let store = self.store.clone();
            let ids = ids.clone();
            async move {
                let mut ticks = tokio::time::interval(HEARTBEAT_INTERVAL);
                ticks.tick().await;
                loop {
                    ticks.tick().await;
                    if let Err(err) = store.refresh_job_locks(&ids).await {
                        if !outage::REPLICATOR.failed(&err) {
                            tracing::warn!(error = %err, "refreshing replication job locks failed");
                        }
                    }
                }
            }
        });
        let runner = JobRunner {
            config: &self.config,
            nodes: &self.nodes,
            store: &self.store,
        };
        let mut outcomes: Vec<(JobState, i64)> = Vec::with_capacity(jobs.len());
        for queued in &jobs {
            let state = self.run_one(&runner, queued).await;
            outcomes.push((state, queued.id));
        }
        heartbeat.abort();
        for state in [JobState::Completed, JobState::Failed, JobState::Dead] {
            let ids: Vec<i64> = outcomes
                .iter()
                .filter(|(s, _)| *s == state)
                .map(|(_, id)| *id)
                .collect();
            if ids.is_empty() {
                continue;
            }
            if let Err(err) = self.store.acknowledge(state, &ids).await {
                // The heartbeat stopped: the stale-job check will hand these out again.
                if !outage::REPLICATOR.failed(&err) {
                    tracing::error!(error = %err, ?state, "acknowledging replication jobs failed");
                }
            }
        }
        true
    }

    async fn run_one(&self, runner: &JobRunner<'_>, queued: &QueuedJob) -> JobState {
        let job = &queued.job;
        let change = job.change.as_str();
        let in_flight = metrics::JOBS_IN_FLIGHT.with_label_values(&[
            job.virtual_storage.as_str(),
            job.target_node_storage.as_str(),
            change,
        ]);
        in_flight.inc();
        let delay = chrono::Utc::now().naive_utc() - queued.created_at;
        metrics::DELAY
            .with_label_values(&[change])
            .observe(delay.num_milliseconds().max(0) as f64 / 1000.0);
        let started = Instant::now();
        let outcome = runner.run(queued).await;
        metrics::LATENCY
            .with_label_values(&[change])
            .observe(started.elapsed().as_secs_f64());
        in_flight.dec();
        match outcome {
            Ok(()) => {
                tracing::info!(
                    job_id = queued.id,
                    change,
                    virtual_storage = %job.virtual_storage,
                    relative_path = %job.relative_path,
                    source = %job.source_node_storage,
                    target = %job.target_node_storage,
                    correlation_id = %queued.correlation_id,
                    "replication job done"
                );
                JobState::Completed
            }
            Err(err) => {
                let state = if queued.attempt > 0 {
                    JobState::Failed
                } else {
                    JobState::Dead
                };
                tracing::error!(
                    job_id = queued.id,
                    change,
                    relative_path = %job.relative_path,
                    target = %job.target_node_storage,
                    attempts_left = queued.attempt,
                    correlation_id = %queued.correlation_id,
                    error = %err,
                    "replication job failed"
                );
                state
            }
        }
    }

    /// Frees the jobs of routers that died mid-job: once at start, then every 30 s.
    async fn release_stale_jobs(self, stop: CancellationToken) {
        let store = &self.store;
        run_every(
            STALE_JOB_CHECK_INTERVAL,
            &stop,
            FirstRun::Immediately,
            || async move {
                let outcome = store.release_stale_jobs(STALE_JOB_TIMEOUT).await;
                if let Some(err) = outage::QUEUE_CLEANER.observe(&outcome) {
                    tracing::error!(error = %err, "releasing stale replication jobs failed")
                }
                if let Ok(released @ 1..) = outcome {
                    tracing::info!(released, "released stale replication jobs");
                }
            },
        )
        .await
    }

    /// Deletes lock rows that no job uses any more, every 30 min (the first after 30 min).
    async fn delete_orphan_locks(self, stop: CancellationToken) {
        let store = &self.store;
        run_every(
            ORPHAN_LOCK_INTERVAL,
            &stop,
            FirstRun::AfterPeriod,
            || async move {
                let outcome = store.delete_orphan_locks(ORPHAN_LOCK_BATCH).await;
                if let Some(err) = outage::QUEUE_CLEANER.observe(&outcome) {
                    tracing::error!(error = %err, "deleting unused replication locks failed")
                }
                if let Ok(deleted @ 1..) = outcome {
                    tracing::info!(deleted, "deleted unused replication locks");
                }
            },
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_one_second_up_to_five() {
        let mut backoff = Duration::ZERO;
        let mut seen = Vec::new();
        for _ in 0..5 {
            backoff = next_backoff(backoff);
            seen.push(backoff.as_secs());
        }
        assert_eq!(seen, [1, 2, 4, 5, 5]);
    }

    #[test]
    fn the_rotation_hands_out_the_turn_due_first() {
        let rotation = Rotation::new(["a".to_string(), "b".to_string()]);
        let mut a = rotation.take().unwrap();
        let b = rotation.take().unwrap();
        assert!(rotation.take().is_none(), "both turns are out");
        a.not_before = Instant::now() + Duration::from_secs(5);
        rotation.give_back(a);
        rotation.give_back(b);
        assert_eq!(rotation.take().unwrap().storage, "b");
    }
}
