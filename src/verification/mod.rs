//! The background verifier (`[background_verification]`): every router keeps checking that the
//! replicas the database records really exist on their nodes, so that a replica lost behind
//! the cluster's back (a disk replaced, a directory deleted) stops being counted as a copy and
//! stops serving reads.
//!
//! Every [`RUN_INTERVAL`] (counted from the end of the previous run) the worker leases up to
//! [`BATCH_SIZE`] due replicas on storages that are healthy for this router (one statement;
//! rows other routers lease are skipped), asks each node `RepositoryExists` for its replica
//! (all at once, the whole run bounded by [`RUN_TIMEOUT`]), and records the outcome in one
//! statement: leases cleared, checked replicas verified now, and the records of replicas that
//! do not exist deleted when `delete_invalid_records` is set. The repository's record is never
//! deleted here, so the loss stays visible (and the replica is not a read or primary
//! candidate any more).
//!
//! A router that dies mid-check leaves its leases behind; every router's lease releaser clears
//! leases that expired more than [`STALE_LEASE_GRACE`] ago, every [`RELEASE_INTERVAL`].

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::BackgroundVerification;
use crate::datastore::{
    Datastore, DatastoreError, HealthyStorage, RemovedReplica, VerificationJob,
    VerificationOutcome, VerificationResult,
};
use crate::health::{HealthManager, HealthySet};
use crate::metrics;
use crate::nodes::NodePool;
use crate::periodic::{run_every, FirstRun};
use crate::wire::proto::repository_service_client::RepositoryServiceClient;
use crate::wire::proto::{Repository, RepositoryExistsRequest};

/// Replicas leased and checked per run.
pub const BATCH_SIZE: i64 = 25;
/// How long a lease lasts.
pub const LEASE_DURATION: Duration = Duration::from_secs(30);
/// Pause between the end of one run and the start of the next.
pub const RUN_INTERVAL: Duration = Duration::from_secs(2);
/// Bound on one whole run (leasing, checking; recording runs with the query timeout).
pub const RUN_TIMEOUT: Duration = Duration::from_secs(30);
/// How often expired leases are looked for.
pub const RELEASE_INTERVAL: Duration = Duration::from_secs(10);
/// How long after its expiry a lease counts as stale.
pub const STALE_LEASE_GRACE: Duration = Duration::from_secs(30);

/// What the verifier needs from the cluster: the storages healthy for this router, and a way
/// to ask a node whether a replica exists.
pub trait Cluster: Send + Sync + 'static {
    /// The (virtual storage, storage) pairs this router currently sees as healthy.
    fn healthy_storages(&self) -> Vec<HealthyStorage>;

    /// Whether the replica of `job` exists on its node; an error when the node cannot tell.
    fn replica_exists(
        &self,
        job: &VerificationJob,
    ) -> impl Future<Output = Result<bool, String>> + Send;
}

/// The flat list of pairs in a healthy set, sorted.
pub fn healthy_pairs(set: &HealthySet) -> Vec<HealthyStorage> {
    set.iter()
        .flat_map(|(virtual_storage, storages)| {
            storages.iter().map(move |storage| HealthyStorage {
                virtual_storage: virtual_storage.clone(),
                storage: storage.clone(),
            })
        })
        .collect()
}

/// The real cluster: the health manager's local view and the router's node connections.
#[derive(Clone)]
pub struct NodeCluster {
    pub nodes: Arc<NodePool>,
    pub health: HealthManager,
}

impl Cluster for NodeCluster {
    fn healthy_storages(&self) -> Vec<HealthyStorage> {
        healthy_pairs(&self.health.healthy())
    }

    fn replica_exists(
        &self,
        job: &VerificationJob,
    ) -> impl Future<Output = Result<bool, String>> + Send {
        let channel = self
            .nodes
            .channel(&job.virtual_storage, &job.storage)
            .cloned();
        let request = RepositoryExistsRequest {
            repository: Some(Repository {
                storage_name: job.storage.clone(),
                relative_path: job.replica_path.clone(),
                ..Default::default()
            }),
        };
        async move {
            let channel = channel.ok_or_else(|| "storage is not configured".to_string())?;
            RepositoryServiceClient::new(channel)
                .repository_exists(request)
                .await
                .map(|response| response.into_inner().exists)
                .map_err(|status| status.message().to_string())
        }
    }
}

/// The `result` label of `gitaly_praefect_verification_jobs_completed_total`.
pub fn result_label(outcome: VerificationOutcome) -> &'static str {
    match outcome {
        VerificationOutcome::Checked { exists: true } => "valid",
        VerificationOutcome::Checked { exists: false } => "invalid",
        VerificationOutcome::Failed => "error",
    }
}

/// What one run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunSummary {
    pub dequeued: usize,
    pub valid: usize,
    pub invalid: usize,
    pub errors: usize,
    /// Replica records deleted because the replica does not exist.
    pub removed: Vec<RemovedReplica>,
}

/// The background verifier of one router.
pub struct Verifier<C> {
    store: Datastore,
    cluster: C,
    interval: Duration,
    delete_invalid: bool,
}

impl<C: Cluster> Verifier<C> {
    /// A verifier re-checking replicas verified more than `interval` ago.
    pub fn new(store: Datastore, cluster: C, interval: Duration, delete_invalid: bool) -> Self {
        Verifier {
            store,
            cluster,
            interval,
            delete_invalid,
        }
    }

    /// A verifier as `[background_verification]` configures it; None when it is disabled
    /// (`verification_interval` of zero or less).
    pub fn from_config(
        store: Datastore,
        cluster: C,
        settings: &BackgroundVerification,
    ) -> Option<Self> {
        settings.verification_interval.is_positive().then(|| {
            Self::new(
                store,
                cluster,
                settings.verification_interval.to_std(),
                settings.delete_invalid_records,
            )
        })
    }

    /// One run: lease a batch, check it, record the outcome. A check still running when the
    /// run's time is up, or when `stop` is cancelled, counts as failed (the replica keeps its
    /// state and its lease is cleared).
    pub async fn run_once(&self, stop: &CancellationToken) -> Result<RunSummary, DatastoreError> {
        let deadline = Instant::now() + RUN_TIMEOUT;
        let healthy = self.cluster.healthy_storages();
        let jobs = self
            .store
            .dequeue_verification(&healthy, self.interval, LEASE_DURATION, BATCH_SIZE)
            .await?;
        let mut summary = RunSummary {
            dequeued: jobs.len(),
            ..RunSummary::default()
        };
        if jobs.is_empty() {
            return Ok(summary);
        }
        for job in &jobs {
            metrics::VERIFICATION_JOBS_DEQUEUED
                .with_label_values(&[job.virtual_storage.as_str(), job.storage.as_str()])
                .inc();
        }

        let checks = jobs.iter().map(|job| {
            let stopped = stop.cancelled();
            async move {
                let outcome = tokio::select! {
                    answer = tokio::time::timeout_at(deadline, self.cluster.replica_exists(job)) => {
                        match answer {
                            Ok(Ok(exists)) => VerificationOutcome::Checked { exists },
                            Ok(Err(error)) => {
                                tracing::warn!(
                                    repository_id = job.repository_id,
                                    virtual_storage = %job.virtual_storage,
                                    storage = %job.storage,
                                    replica_path = %job.replica_path,
                                    error = %error,
                                    "failed to verify replica's existence"
                                );
                                VerificationOutcome::Failed
                            }
                            Err(_) => {
                                tracing::warn!(
                                    repository_id = job.repository_id,
                                    virtual_storage = %job.virtual_storage,
                                    storage = %job.storage,
                                    replica_path = %job.replica_path,
                                    "verifying replica's existence timed out"
                                );
                                VerificationOutcome::Failed
                            }
                        }
                    }
                    _ = stopped => VerificationOutcome::Failed,
                };
                (job, outcome)
            }
        });
        let outcomes = futures::future::join_all(checks).await;

        let mut results = Vec::with_capacity(outcomes.len());
        for (job, outcome) in &outcomes {
            match outcome {
                VerificationOutcome::Checked { exists: true } => summary.valid += 1,
                VerificationOutcome::Checked { exists: false } => summary.invalid += 1,
                VerificationOutcome::Failed => summary.errors += 1,
            }
            metrics::VERIFICATION_JOBS_COMPLETED
                .with_label_values(&[
                    job.virtual_storage.as_str(),
                    job.storage.as_str(),
                    result_label(*outcome),
                ])
                .inc();
            results.push(VerificationResult {
                repository_id: job.repository_id,
                storage: job.storage.clone(),
                outcome: *outcome,
            });
        }

        summary.removed = self
            .store
            .record_verification(&results, self.delete_invalid)
            .await?;
        if self.delete_invalid {
            for removed in &summary.removed {
                let replica_path = jobs
                    .iter()
                    .find(|job| {
                        job.repository_id == removed.repository_id && job.storage == removed.storage
                    })
                    .map(|job| job.replica_path.as_str())
                    .unwrap_or_default();
                tracing::info!(
                    perform_deletions = true,
                    repository_id = removed.repository_id,
                    virtual_storage = %removed.virtual_storage,
                    relative_path = %removed.relative_path,
                    storage = %removed.storage,
                    replica_path = %replica_path,
                    "removing metadata records of non-existent replicas"
                );
            }
        } else {
            for (job, _) in outcomes
                .iter()
                .filter(|(_, o)| *o == VerificationOutcome::Checked { exists: false })
            {
                tracing::info!(
                    perform_deletions = false,
                    repository_id = job.repository_id,
                    virtual_storage = %job.virtual_storage,
                    relative_path = %job.relative_path,
                    storage = %job.storage,
                    replica_path = %job.replica_path,
                    "removing metadata records of non-existent replicas"
                );
            }
        }
        tracing::info!(
            dequeued = summary.dequeued,
            valid = summary.valid,
            invalid = summary.invalid,
            error = summary.errors,
            removed = summary.removed.len(),
            "verified a batch of replicas"
        );
        Ok(summary)
    }

    /// Runs batches until `stop` is cancelled: the first at once, then [`RUN_INTERVAL`] after
    /// the end of each.
    pub async fn run(self, stop: CancellationToken) {
        tracing::info!(
            verification_interval = ?self.interval,
            delete_invalid_records = self.delete_invalid,
            "background verifier started"
        );
        let (this, token) = (&self, &stop);
        run_every(RUN_INTERVAL, &stop, FirstRun::Immediately, || async move {
            let outcome = this.run_once(token).await;
            if let Some(err) = crate::datastore::outage::VERIFIER.observe(&outcome) {
                tracing::warn!(error = %err, "background verification run failed");
            }
        })
        .await
    }
}

/// Releases every verification lease that expired more than [`STALE_LEASE_GRACE`] ago, a
/// batch of [`BATCH_SIZE`] at a time while batches come back full; returns how many.
pub async fn release_stale_leases(store: &Datastore) -> Result<usize, DatastoreError> {
    let mut total = 0;
    loop {
        let released = store
            .release_stale_verification_leases(STALE_LEASE_GRACE, BATCH_SIZE)
            .await?;
        if released.is_empty() {
            return Ok(total);
        }
        total += released.len();
        metrics::STALE_VERIFICATION_LEASES_RELEASED.inc_by(released.len() as u64);
        let replicas: Vec<String> = released
            .iter()
            .map(|lease| {
                format!(
                    "{}/{} on {} (repository {})",
                    lease.virtual_storage, lease.relative_path, lease.storage, lease.repository_id
                )
            })
            .collect();
        tracing::info!(
            count = released.len(),
            replicas = ?replicas,
            "released stale verification leases"
        );
        if (released.len() as i64) < BATCH_SIZE {
            return Ok(total);
        }
    }
}

/// Releases stale leases every [`RELEASE_INTERVAL`] (the first after one interval) until
/// `stop` is cancelled.
pub async fn run_lease_releaser(store: Datastore, stop: CancellationToken) {
    let store = &store;
    run_every(
        RELEASE_INTERVAL,
        &stop,
        FirstRun::AfterPeriod,
        || async move {
            let outcome = release_stale_leases(store).await;
            if let Some(err) = crate::datastore::outage::LEASE_RELEASER.observe(&outcome) {
                tracing::warn!(error = %err, "releasing stale verification leases failed");
            }
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthy_pairs_flatten_the_local_view() {
        let mut set = HealthySet::new();
        set.insert("vs-b".into(), ["s1".to_string()].into());
        set.insert(
            "vs-a".into(),
            ["s2".to_string(), "s1".to_string()].into_iter().collect(),
        );
        set.insert("vs-c".into(), Default::default());
        let pair = |vs: &str, s: &str| HealthyStorage {
            virtual_storage: vs.into(),
            storage: s.into(),
        };
        assert_eq!(
            healthy_pairs(&set),
            [pair("vs-a", "s1"), pair("vs-a", "s2"), pair("vs-b", "s1")]
        );
    }

    #[test]
    fn outcomes_map_to_the_metric_results() {
        assert_eq!(
            result_label(VerificationOutcome::Checked { exists: true }),
            "valid"
        );
        assert_eq!(
            result_label(VerificationOutcome::Checked { exists: false }),
            "invalid"
        );
        assert_eq!(result_label(VerificationOutcome::Failed), "error");
    }
}
