//! Metrics of the router's process, listeners and sessions: Praefect's
//! `gitaly_praefect_connections_total{type}`, Gitaly's `gitaly_authentications_total`,
//! `gitaly_authentication_errors_total` and `gitaly_backchannel_yamux_{read,write}_size_bytes`,
//! the `process_*` families and `gitlab_build_info`. The wire crate reports the events (it
//! serves gitnode too, which has no metrics); these turn them into counters.

use std::sync::{Arc, LazyLock};

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts};

use super::{counter, defined, REGISTRY};
use crate::wire::auth::{AuthEvent, AuthObserver};
use crate::wire::backchannel::{observe_sizes, AcceptObserver, Direction};

static CONNECTIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "gitaly_praefect_connections_total",
        "Total number of connections to Praefect",
        &["type"],
    )
});

static AUTHENTICATIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "gitaly_authentications_total",
        "Counts of authentications by status and whether they were enforced",
        &["enforced", "status"],
    )
});

static AUTHENTICATION_ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "gitaly_authentication_errors_total",
        "Counts of refused tokens by token version and what was wrong",
        &["version", "error"],
    )
});

/// Counts each accepted connection by its listener's type (tcp, tls, unix).
pub fn accept_observer() -> AcceptObserver {
    Arc::new(|scheme| CONNECTIONS.with_label_values(&[scheme]).inc())
}

/// The statuses the wire crate reports, whose handles are looked up once.
const STATUSES: [&str; 5] = [
    "ok",
    "would be ok",
    "unauthenticated",
    "denied",
    "server disabled authentication",
];

/// `gitaly_authentications_total` handles by enforced (false, true) and status.
static AUTHENTICATION_HANDLES: LazyLock<[[IntCounter; 5]; 2]> = LazyLock::new(|| {
    ["false", "true"].map(|enforced| {
        STATUSES.map(|status| AUTHENTICATIONS.with_label_values(&[enforced, status]))
    })
});

/// Counts each checked call. The label values come from a small fixed set, so the counter
/// families stay small whatever clients send.
pub fn auth_observer() -> AuthObserver {
    AuthObserver::new(|event: AuthEvent| {
        let by_status = &AUTHENTICATION_HANDLES[usize::from(event.enforced)];
        match STATUSES.iter().position(|s| *s == event.status) {
            Some(i) => by_status[i].inc(),
            None => {
                let enforced = if event.enforced { "true" } else { "false" };
                AUTHENTICATIONS
                    .with_label_values(&[enforced, event.status])
                    .inc();
            }
        }
        if let Some((version, error)) = event.error {
            AUTHENTICATION_ERRORS
                .with_label_values(&[version, error])
                .inc();
        }
    })
}

/// Sizes of session reads and writes: from a few bytes (a window update) to large bulk
/// writes of pack data.
const SIZE_BUCKETS: [f64; 9] = [
    16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0,
];

fn size_histogram(name: &str, help: &str) -> Histogram {
    let histogram = defined(Histogram::with_opts(
        HistogramOpts::new(name, help).buckets(SIZE_BUCKETS.to_vec()),
    ));
    let _ = REGISTRY.register(Box::new(histogram.clone()));
    histogram
}

/// Registers what a serving router reports about itself (once; later calls do nothing):
/// process metrics, its build, and the sizes its yamux sessions read and write.
pub fn install(version: &str) {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let _ = REGISTRY.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ));
        let build = defined(IntGaugeVec::new(
            Opts::new(
                "gitlab_build_info",
                "Current build info for this GitLab Service",
            ),
            &["version", "built"],
        ));
        let _ = REGISTRY.register(Box::new(build.clone()));
        build.with_label_values(&[version, ""]).set(1);
        let reads = size_histogram(
            "gitaly_backchannel_yamux_read_size_bytes",
            "Sizes of the reads of yamux sessions from their connections",
        );
        let writes = size_histogram(
            "gitaly_backchannel_yamux_write_size_bytes",
            "Sizes of the writes of yamux sessions to their connections",
        );
        observe_sizes(move |direction, size| match direction {
            Direction::Read => reads.observe(size as f64),
            Direction::Write => writes.observe(size as f64),
        });
    });
}
