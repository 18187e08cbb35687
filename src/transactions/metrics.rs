//! The transaction metrics Praefect serves, by the same names.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounterVec};

use crate::metrics::{counter, defined, REGISTRY};

/// `gitaly_praefect_transactions_total{action}`: registered, started (a vote), committed,
/// failed, canceled, stopped, invalid.
static TRANSACTIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "gitaly_praefect_transactions_total",
        "Total number of transaction actions",
        &["action"],
    )
});

/// `gitaly_praefect_transactions_delay_seconds{action="vote"}`: how long a vote waited.
static DELAY: LazyLock<HistogramVec> = LazyLock::new(|| {
    let histogram = defined(HistogramVec::new(
        HistogramOpts::new(
            "gitaly_praefect_transactions_delay_seconds",
            "Delay between a node casting its vote and the vote being decided",
        )
        .buckets(vec![
            0.001, 0.005, 0.025, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0,
        ]),
        &["action"],
    ));
    let _ = REGISTRY.register(Box::new(histogram.clone()));
    histogram
});

/// `gitaly_praefect_subtransactions_per_transaction_total`.
static SUBTRANSACTIONS: LazyLock<Histogram> = LazyLock::new(|| {
    let histogram = defined(Histogram::with_opts(
        HistogramOpts::new(
            "gitaly_praefect_subtransactions_per_transaction_total",
            "The number of subtransactions created for a single registered transaction",
        )
        .buckets(vec![0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]),
    ));
    let _ = REGISTRY.register(Box::new(histogram.clone()));
    histogram
});

/// `gitaly_praefect_voters_per_transaction_total{virtual_storage}`.
static VOTERS: LazyLock<HistogramVec> = LazyLock::new(|| {
    let histogram = defined(HistogramVec::new(
        HistogramOpts::new(
            "gitaly_praefect_voters_per_transaction_total",
            "The number of voters a given transaction was created with",
        )
        .buckets(vec![1.0, 2.0, 3.0, 4.0, 5.0, 7.0, 10.0]),
        &["virtual_storage"],
    ));
    let _ = REGISTRY.register(Box::new(histogram.clone()));
    histogram
});

/// `gitaly_praefect_tx_replications_total{reason}`: secondaries left outdated by a
/// transactional write, by why.
pub static TX_REPLICATIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "gitaly_praefect_tx_replications_total",
        "The number of replication jobs scheduled after a transactional write, by reason",
        &["reason"],
    )
});

pub fn action(action: &str) {
    TRANSACTIONS.with_label_values(&[action]).inc();
}

pub fn vote_delay(elapsed: Duration) {
    DELAY
        .with_label_values(&["vote"])
        .observe(elapsed.as_secs_f64());
}

pub fn subtransactions(count: usize) {
    SUBTRANSACTIONS.observe(count as f64);
}

pub fn voters(virtual_storage: &str, count: usize) {
    VOTERS
        .with_label_values(&[virtual_storage])
        .observe(count as f64);
}
