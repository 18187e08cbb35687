//! Prometheus metrics, kept in memory so that a scrape never touches the database
//! (production#2918). Names follow Praefect's where Praefect has the metric.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

pub mod grpc;
pub mod server;

/// The registry served on `/metrics`.
pub static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::new);

/// Time spent in each named datastore operation.
static DB_QUERY_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    let histogram = defined(HistogramVec::new(
        HistogramOpts::new(
            "gitaly_praefect_datastore_operation_seconds",
            "Time spent in each named database operation",
        )
        .buckets(vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0,
        ]),
        &["operation", "result"],
    ));
    // Registration only fails on a duplicate name, which the LazyLock rules out.
    let _ = REGISTRY.register(Box::new(histogram.clone()));
    histogram
});

/// `gitaly_praefect_uptodate_storages_cache_access_total{virtual_storage,type}`.
pub static CACHE_ACCESS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "gitaly_praefect_uptodate_storages_cache_access_total",
        "Accesses to the up-to-date storages cache by type (hit, miss, populate, evict)",
        &["virtual_storage", "type"],
    )
});

/// `gitaly_praefect_notifications_reconnects_total{state}`.
pub static NOTIFICATION_RECONNECTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "gitaly_praefect_notifications_reconnects_total",
        "Connections and disconnections of the change-notification listener",
        &["state"],
    )
});

/// `gitaly_praefect_database_writer_up`: 1 while a database server accepting writes is
/// known, 0 while the router is looking for one.
pub static DATABASE_WRITER_UP: LazyLock<prometheus::IntGauge> = LazyLock::new(|| {
    let gauge = defined(prometheus::IntGauge::new(
        "gitaly_praefect_database_writer_up",
        "Whether a database server accepting writes is known (1) or being searched for (0)",
    ));
    let _ = REGISTRY.register(Box::new(gauge.clone()));
    gauge
});

/// `gitaly_praefect_database_writer_changes_total{event}`: the writer lost or found.
pub static DATABASE_WRITER_CHANGES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "gitaly_praefect_database_writer_changes_total",
        "Times the database writer was lost (event=lost) or found again (event=found)",
        &["event"],
    )
});

/// `gitaly_praefect_uptodate_storages_cache_stale_reads_total{virtual_storage}`: reads
/// served from the cache while the database could not confirm it.
pub static CACHE_STALE_READS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "gitaly_praefect_uptodate_storages_cache_stale_reads_total",
        "Reads served from the up-to-date storages cache while the database was unavailable",
        &["virtual_storage"],
    )
});

/// `gitaly_praefect_read_distribution{virtual_storage,storage}`: where reads went.
pub static READ_DISTRIBUTION: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "gitaly_praefect_read_distribution",
        "Counts read operations directed to the storages",
        &["virtual_storage", "storage"],
    )
});

/// `gitaly_praefect_method_types{method_type}`: routed calls by operation type.
pub static METHOD_TYPES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "gitaly_praefect_method_types",
        "Counts the routed calls by operation type (accessor, mutator, maintenance)",
        &["method_type"],
    )
});

/// `gitaly_praefect_node_healthy{virtual_storage,storage}` (ours; Praefect has no per-node
/// health metric): 1 when this router's latest health check of the node passed, else 0, so
/// that a dashboard can show node health as each router sees it.
pub static NODE_HEALTHY: LazyLock<prometheus::IntGaugeVec> = LazyLock::new(|| {
    let gauge = defined(prometheus::IntGaugeVec::new(
        Opts::new(
            "gitaly_praefect_node_healthy",
            "Whether this router's latest health check of the node passed (1) or not (0)",
        ),
        &["virtual_storage", "storage"],
    ));
    let _ = REGISTRY.register(Box::new(gauge.clone()));
    gauge
});

/// `gitaly_praefect_verification_jobs_dequeued_total{virtual_storage,storage}`: replicas the
/// background verifier leased for a check.
pub static VERIFICATION_JOBS_DEQUEUED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "gitaly_praefect_verification_jobs_dequeued_total",
        "Number of verification jobs dequeued",
        &["virtual_storage", "storage"],
    )
});

/// `gitaly_praefect_verification_jobs_completed_total{virtual_storage,storage,result}`: checks
/// by outcome (valid, invalid, error).
pub static VERIFICATION_JOBS_COMPLETED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "gitaly_praefect_verification_jobs_completed_total",
        "Number of verification jobs completed and their result",
        &["virtual_storage", "storage", "result"],
    )
});

/// `gitaly_praefect_stale_verification_leases_released_total`: expired verification leases
/// released by this router.
pub static STALE_VERIFICATION_LEASES_RELEASED: LazyLock<prometheus::IntCounter> =
    LazyLock::new(|| {
        let counter = defined(prometheus::IntCounter::new(
            "gitaly_praefect_stale_verification_leases_released_total",
            "Number of stale verification leases released",
        ));
        let _ = REGISTRY.register(Box::new(counter.clone()));
        counter
    });

/// The metric a definition made of this crate's constants (name, help, label names,
/// buckets) describes. prometheus rejects a definition only for an invalid name or label name,
/// or buckets that do not increase: a typo in the source that the first scrape in any test
/// shows, never something input to the router can cause, so it panics rather than return an
/// error every caller would have to carry. Definitions with configured parts (the
/// reconciler's buckets) return the error instead.
#[allow(clippy::expect_used)]
pub(crate) fn defined<T>(definition: prometheus::Result<T>) -> T {
    definition.expect("static metric definition is valid")
}

pub(crate) fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let counter = defined(IntCounterVec::new(Opts::new(name, help), labels));
    let _ = REGISTRY.register(Box::new(counter.clone()));
    counter
}

/// Records one datastore operation.
pub fn observe_db_query(operation: &str, ok: bool, elapsed: Duration) {
    DB_QUERY_SECONDS
        .with_label_values(&[operation, if ok { "ok" } else { "error" }])
        .observe(elapsed.as_secs_f64());
}

/// Renders the registry in the text exposition format.
pub fn render() -> String {
    use prometheus::Encoder;
    let mut buffer = Vec::new();
    let encoder = prometheus::TextEncoder::new();
    // Encoding into a Vec cannot fail for well-formed metric families.
    let _ = encoder.encode(&REGISTRY.gather(), &mut buffer);
    String::from_utf8_lossy(&buffer).into_owned()
}

/// More metric families rendered on each scrape of `/metrics` (the database's, when they are
/// not kept to `/db_metrics`).
pub type ScrapeExtra = std::sync::Arc<
    dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = String> + Send>> + Send + Sync,
>;

/// Serves `/metrics` (and the routes of `extra`, such as `/readiness`) over HTTP on
/// `listener` until `stop` is cancelled. The registry is in memory, so a scrape never waits on
/// the database or a node, unless `scrape_extra` asks for it.
pub async fn serve(
    listener: tokio::net::TcpListener,
    stop: tokio_util::sync::CancellationToken,
    extra: axum::Router,
    scrape_extra: Option<ScrapeExtra>,
) -> std::io::Result<()> {
    let app = extra.route(
        "/metrics",
        axum::routing::get(move || {
            let scrape_extra = scrape_extra.clone();
            async move {
                let mut text = render();
                if let Some(more) = scrape_extra {
                    text.push_str(&more().await);
                }
                (
                    [(
                        http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    text,
                )
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
}
