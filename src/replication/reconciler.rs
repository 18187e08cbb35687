//! The reconciler: every `reconciliation.scheduling_interval` (0 disables it) it queues the
//! jobs that bring the replicas in line with the assignments (spec §5). Only virtual storages
//! with at least two locally healthy storages take part; the database's advisory lock makes
//! sure only one router schedules at a time.

use std::sync::{Arc, LazyLock};
use std::time::Instant;

use prometheus::{Histogram, HistogramOpts};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::datastore::{Datastore, DatastoreError, ScheduledJob, StoragePair};
use crate::health::HealthManager;
use crate::periodic::{run_every, FirstRun};

/// How many scheduled jobs one log line lists.
const LOG_BATCH: usize = 25;

/// Runs the reconciler until `stop` is cancelled.
pub struct Reconciler {
    pub config: Arc<Config>,
    pub health: HealthManager,
    pub store: Datastore,
    seconds: Histogram,
}

/// `gitaly_praefect_reconciliation_scheduling_seconds`, with the configured buckets.
static SCHEDULING_SECONDS: LazyLock<std::sync::Mutex<Option<Histogram>>> =
    LazyLock::new(|| std::sync::Mutex::new(None));

/// The buckets come from the configuration, so a definition prometheus rejects (buckets not
/// increasing, which validation already refuses) is an error for startup to report.
fn scheduling_histogram(buckets: &[f64]) -> prometheus::Result<Histogram> {
    let mut slot = SCHEDULING_SECONDS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(existing) = slot.as_ref() {
        return Ok(existing.clone());
    }
    let mut opts = HistogramOpts::new(
        "gitaly_praefect_reconciliation_scheduling_seconds",
        "Time one reconciliation scheduling run took",
    );
    if !buckets.is_empty() {
        opts = opts.buckets(buckets.to_vec());
    }
    let histogram = Histogram::with_opts(opts)?;
    let _ = crate::metrics::REGISTRY.register(Box::new(histogram.clone()));
    *slot = Some(histogram.clone());
    Ok(histogram)
}

impl Reconciler {
    /// Fails when prometheus refuses the configured histogram buckets.
    pub fn new(
        config: Arc<Config>,
        health: HealthManager,
        store: Datastore,
    ) -> prometheus::Result<Self> {
        let seconds = scheduling_histogram(&config.reconciliation.histogram_buckets)?;
        Ok(Reconciler {
            config,
            health,
            store,
            seconds,
        })
    }

    /// Schedules every `scheduling_interval`, the first run after one interval.
    pub async fn run(self, stop: CancellationToken) {
        let interval = self.config.reconciliation.scheduling_interval.to_std();
        if interval.is_zero() {
            tracing::info!("reconciliation disabled");
            return;
        }
        let this = &self;
        run_every(interval, &stop, FirstRun::AfterPeriod, || async move {
            let outcome = this.reconcile().await;
            if let Some(err) = crate::datastore::outage::RECONCILER.observe(&outcome) {
                tracing::error!(error = %err, "reconciliation failed");
            }
        })
        .await
    }

    /// One scheduling run; the jobs queued (None when another router held the lock).
    pub async fn reconcile(&self) -> Result<Option<Vec<ScheduledJob>>, DatastoreError> {
        let healthy_now = self.health.healthy();
        let mut healthy: Vec<StoragePair> = Vec::new();
        let mut configured: Vec<StoragePair> = Vec::new();
        for vs in &self.config.virtual_storage {
            configured.extend(vs.node.iter().map(|n| (vs.name.clone(), n.storage.clone())));
            let local = healthy_now.get(&vs.name);
            if local.map_or(0, |set| set.len()) < 2 {
                continue;
            }
            healthy.extend(
                local
                    .into_iter()
                    .flatten()
                    .map(|storage| (vs.name.clone(), storage.clone())),
            );
        }
        if healthy.is_empty() {
            return Ok(Some(Vec::new()));
        }
        let started = Instant::now();
        let scheduled = self
            .store
            .schedule_reconciliation(&healthy, &configured)
            .await?;
        self.seconds.observe(started.elapsed().as_secs_f64());
        match &scheduled {
            None => tracing::debug!("another router is reconciling"),
            Some(jobs) => {
                for batch in jobs.chunks(LOG_BATCH) {
                    let listed: Vec<String> = batch
                        .iter()
                        .map(|j| {
                            format!(
                                "{} {}/{} {} -> {}",
                                j.change,
                                j.virtual_storage,
                                j.relative_path,
                                j.source_node_storage,
                                j.target_node_storage
                            )
                        })
                        .collect();
                    tracing::info!(jobs = ?listed, "reconciliation jobs scheduled");
                }
            }
        }
        Ok(scheduled)
    }
}
