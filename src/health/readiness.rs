//! Readiness: whether this router can do *everything* right now (record writes, trust its
//! read cache, reach a node of every virtual storage), as opposed to liveness
//! (`grpc.health.v1`), which stays SERVING for as long as the router can serve reads.
//!
//! A TCP load balancer should keep using `grpc.health.v1` (or a plain TCP check): during a
//! database switchover or outage a router that is not ready still serves reads from its
//! cache, and taking every router out of rotation at once would turn a database blip into a
//! full outage. Readiness (`ServerService/ReadinessCheck`, HTTP `/readiness` on
//! `prometheus_listen_addr`) is for deployment tooling and alerting: "this router cannot
//! take writes, and here is why".
//!
//! Every check reads memory only: a readiness probe never waits on the database.

use std::collections::BTreeMap;

use serde::Serialize;

use super::HealthySet;
use crate::datastore::StorageCache;

/// One failed check, as ReadinessCheck reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FailedCheck {
    pub name: String,
    pub error_message: String,
}

/// The checks that fail now, sorted by name; empty when the router is ready.
pub fn failed_checks<'a>(
    cache: &StorageCache,
    healthy: &HealthySet,
    virtual_storages: impl IntoIterator<Item = &'a str>,
) -> Vec<FailedCheck> {
    let mut failed: BTreeMap<&str, String> = BTreeMap::new();
    let writer = cache.store().writer_status();
    if let Some(reason) = writer.lost_reason {
        failed.insert(
            "database",
            format!(
                "database not writable for {:.1}s: {reason}",
                writer.for_duration.as_secs_f64()
            ),
        );
    }
    if let Some(down_for) = cache.listener_down_for() {
        failed.insert(
            "database change listener",
            format!(
                "LISTEN connection down for {:.1}s: reads are confirmed with the database, or served from the cache while it is unavailable",
                down_for.as_secs_f64()
            ),
        );
    }
    let without_nodes: Vec<&str> = virtual_storages
        .into_iter()
        .filter(|vs| healthy.get(*vs).is_none_or(|set| set.is_empty()))
        .collect();
    if !without_nodes.is_empty() {
        failed.insert(
            "healthy nodes",
            format!(
                "no healthy node in virtual storage {}",
                without_nodes.join(", ")
            ),
        );
    }
    failed
        .into_iter()
        .map(|(name, error_message)| FailedCheck {
            name: name.to_string(),
            error_message,
        })
        .collect()
}

/// The body of HTTP `/readiness`.
#[derive(Serialize)]
pub struct ReadinessReport {
    pub ready: bool,
    pub failed_checks: Vec<FailedCheck>,
}
