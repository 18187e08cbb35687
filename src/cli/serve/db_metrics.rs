//! HTTP `/db_metrics`: the metrics only the database knows, queried on every scrape (bounded
//! by `[prometheus] scrape_timeout`), kept apart from `/metrics` so that a slow database never
//! slows the scrape of the in-memory metrics (production#2918). With
//! `prometheus_exclude_database_from_default_metrics = false` they are on `/metrics` too.
//!
//! - `gitaly_praefect_unavailable_repositories{virtual_storage}`: repositories with no valid
//!   primary;
//! - `gitaly_praefect_replication_queue_depth{virtual_storage,target_node,state}`;
//! - `gitaly_praefect_verification_queue_depth{virtual_storage,storage,status}` (only while
//!   background verification is enabled): replicas never verified or verified too long ago.

use std::time::Duration;

use prometheus::{Encoder, IntGaugeVec, Opts, Registry};

use crate::config::Config;
use crate::datastore::Datastore;

/// What a scrape needs.
#[derive(Clone)]
pub(super) struct DbMetrics {
    store: Datastore,
    virtual_storages: Vec<String>,
    timeout: Duration,
    /// The verification interval, when background verification is enabled.
    verification: Option<Duration>,
}

impl DbMetrics {
    pub(super) fn new(config: &Config, store: Datastore) -> Self {
        let interval = config
            .background_verification
            .verification_interval
            .to_std();
        DbMetrics {
            store,
            virtual_storages: config
                .virtual_storage
                .iter()
                .map(|vs| vs.name.clone())
                .collect(),
            timeout: config.prometheus.scrape_timeout.to_std(),
            verification: (!interval.is_zero()).then_some(interval),
        }
    }

    /// The families, in the text exposition format. A query that fails or times out leaves
    /// its family out (and is logged); the others are still served.
    pub(super) async fn render(&self) -> String {
        let registry = Registry::new();
        let (unavailable, queue, verification) = tokio::join!(
            self.store.unavailable_repositories(self.timeout),
            self.store.replication_queue_depth(self.timeout),
            async {
                match self.verification {
                    Some(interval) => Some(
                        self.store
                            .verification_queue_depth(interval, self.timeout)
                            .await,
                    ),
                    None => None,
                }
            }
        );
        match unavailable {
            Ok(rows) => {
                let gauge = gauge(
                    &registry,
                    "gitaly_praefect_unavailable_repositories",
                    "Number of repositories that have no healthy, up to date replicas.",
                    &["virtual_storage"],
                );
                // Every virtual storage appears, with 0 when all its repositories are fine.
                for vs in &self.virtual_storages {
                    gauge.with_label_values(&[vs.as_str()]).set(0);
                }
                for row in rows {
                    gauge
                        .with_label_values(&[row.virtual_storage.as_str()])
                        .set(row.count);
                }
            }
            Err(err) => tracing::warn!(error = %err, "db_metrics: unavailable repositories"),
        }
        match queue {
            Ok(rows) => {
                let gauge = gauge(
                    &registry,
                    "gitaly_praefect_replication_queue_depth",
                    "Number of jobs in the replication queue",
                    &["virtual_storage", "target_node", "state"],
                );
                for row in rows {
                    gauge
                        .with_label_values(&[
                            row.virtual_storage.as_str(),
                            row.target_node.as_str(),
                            row.state.as_str(),
                        ])
                        .set(row.count);
                }
            }
            Err(err) => tracing::warn!(error = %err, "db_metrics: replication queue depth"),
        }
        match verification {
            Some(Ok(rows)) => {
                let gauge = gauge(
                    &registry,
                    "gitaly_praefect_verification_queue_depth",
                    "Number of replicas pending verification.",
                    &["virtual_storage", "storage", "status"],
                );
                for row in rows {
                    gauge
                        .with_label_values(&[
                            row.virtual_storage.as_str(),
                            row.storage.as_str(),
                            row.status.as_str(),
                        ])
                        .set(row.count);
                }
            }
            Some(Err(err)) => tracing::warn!(error = %err, "db_metrics: verification queue depth"),
            None => {}
        }
        let mut buffer = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&registry.gather(), &mut buffer);
        String::from_utf8_lossy(&buffer).into_owned()
    }
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let gauge = crate::metrics::defined(IntGaugeVec::new(Opts::new(name, help), labels));
    let _ = registry.register(Box::new(gauge.clone()));
    gauge
}

/// The `/db_metrics` route.
pub(super) fn db_metrics_route(metrics: DbMetrics) -> axum::Router {
    axum::Router::new().route(
        "/db_metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(
                        http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    metrics.render().await,
                )
            }
        }),
    )
}
