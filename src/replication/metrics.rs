//! The replicator's metrics, under Praefect's names.

use std::sync::LazyLock;

use prometheus::{HistogramOpts, HistogramVec, IntGaugeVec, Opts};

use crate::metrics::{defined, REGISTRY};

fn histogram(name: &str, help: &str) -> HistogramVec {
    let histogram = defined(HistogramVec::new(HistogramOpts::new(name, help), &["type"]));
    let _ = REGISTRY.register(Box::new(histogram.clone()));
    histogram
}

/// `gitaly_praefect_replication_latency{type}`: how long a job ran.
pub static LATENCY: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram(
        "gitaly_praefect_replication_latency",
        "Time a replication job took to run, by change type",
    )
});

/// `gitaly_praefect_replication_delay{type}`: how long a job waited in the queue.
pub static DELAY: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram(
        "gitaly_praefect_replication_delay",
        "Time between queueing a replication job and starting it, by change type",
    )
});

/// `gitaly_praefect_replication_jobs{virtual_storage,gitaly_storage,change_type}`.
pub static JOBS_IN_FLIGHT: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    let gauge = defined(IntGaugeVec::new(
        Opts::new(
            "gitaly_praefect_replication_jobs",
            "Replication jobs running now",
        ),
        &["virtual_storage", "gitaly_storage", "change_type"],
    ));
    let _ = REGISTRY.register(Box::new(gauge.clone()));
    gauge
});
