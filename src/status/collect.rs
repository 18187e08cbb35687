//! One status collection: the database's view (health observations, quorum, queue,
//! repository counts), the nodes' disks, and this router's own state, put together per
//! virtual storage. Nothing here fails as a whole: a part that cannot be had is reported as
//! an error in the status, and the page says so.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::cache::Refreshed;
use super::model::{
    Disk, NodeStatus, QueueState, QueueTarget, RouterInfo, RouterView, Status, Summary,
    Verification, VirtualStorageStatus,
};
use super::problems;
use crate::config::Config;
use crate::datastore::{
    ClusterHealth, Datastore, DatastoreError, QueueGroup, RepositoryCounts, StorageCache,
};
use crate::health::HealthManager;
use crate::nodes::NodePool;
use crate::wire::proto::server_service_client::ServerServiceClient;
use crate::wire::proto::DiskStatisticsRequest;

/// How long the repository counts are kept: a count (a pass over the repository tables, in
/// slices) starts at most this often per router, however many people look at the page, and
/// runs in the background while the page shows the last one with its age.
pub const COUNTS_TTL: Duration = Duration::from_secs(30);
/// How long a count that timed out is kept: a count that timed out (a very large or busy database)
/// would time out again, at the cost of a whole `scrape_timeout` of the database's time.
pub const COUNTS_FAILURE_TTL: Duration = Duration::from_secs(300);
/// The longest a node may take to report its disk.
const DISK_TIMEOUT: Duration = Duration::from_secs(2);
/// The bound on each query when `scrape_timeout` is zero.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// What a collection reads: the router's parts, shared with the rest of it.
#[derive(Clone)]
pub struct Sources {
    pub config: Arc<Config>,
    pub store: Datastore,
    pub health: HealthManager,
    pub nodes: Arc<NodePool>,
    pub cache: Arc<StorageCache>,
    /// This build's version.
    pub version: String,
    pub started: Instant,
}

/// The repository counts, or why they could not be had.
pub type CountsResult = Result<Arc<Vec<RepositoryCounts>>, CountsError>;

/// A count that failed.
#[derive(Clone, Debug)]
pub struct CountsError {
    pub message: String,
    /// It ran out of time (rather than finding the database unavailable): trying again soon
    /// would cost as much again.
    pub timed_out: bool,
}

impl CountsError {
    fn new(err: &DatastoreError) -> Self {
        let timed_out = match err {
            DatastoreError::Timeout { .. } => true,
            // 57014: query_canceled, what statement_timeout raises.
            DatastoreError::Query {
                source: sqlx::Error::Database(db),
                ..
            } => db.code().as_deref() == Some("57014"),
            _ => false,
        };
        CountsError {
            message: err.to_string(),
            timed_out,
        }
    }
}

impl Sources {
    /// Each query's bound: `[prometheus] scrape_timeout`, as for `/db_metrics`.
    pub fn query_timeout(&self) -> Duration {
        let timeout = self.config.prometheus.scrape_timeout.to_std();
        if timeout.is_zero() {
            DEFAULT_TIMEOUT
        } else {
            timeout
        }
    }

    /// Every configured (virtual storage, storage).
    pub fn configured(&self) -> Vec<(String, String)> {
        crate::nodes::configured_pairs(&self.config)
    }

    fn verification_interval(&self) -> Duration {
        self.config
            .background_verification
            .verification_interval
            .to_std()
    }
}

/// Collects the status now; the repository counts come from `counts` (kept for
/// [`COUNTS_TTL`]).
pub async fn collect(sources: &Sources, counts: &Arc<Refreshed<CountsResult>>) -> Status {
    let timeout = sources.query_timeout();
    let store = &sources.store;
    let configured = sources.configured();
    let interval = sources.verification_interval();
    let (health, queue, (counts, counts_age), disks) = tokio::join!(
        store.cluster_health(timeout),
        store.queue_groups(timeout),
        counts.get(
            |result: &CountsResult| match result {
                Err(err) if err.timed_out => COUNTS_FAILURE_TTL,
                _ => COUNTS_TTL,
            },
            || {
                let (store, configured) = (store.clone(), configured.clone());
                async move {
                    store
                        .repository_counts(&configured, interval, timeout)
                        .await
                        .map(Arc::new)
                        .map_err(|err| CountsError::new(&err))
                }
            }
        ),
        disks(&sources.nodes, timeout.min(DISK_TIMEOUT)),
    );
    let mut database_errors = Vec::new();
    let mut note = |err: &DatastoreError| database_errors.push(err.to_string());
    let health = health.inspect_err(&mut note).ok();
    let queue = queue.inspect_err(&mut note).unwrap_or_default();
    let virtual_storages = sources
        .config
        .virtual_storage
        .iter()
        .map(|vs| {
            let storages: Vec<(String, String)> = vs
                .node
                .iter()
                .map(|n| (n.storage.clone(), n.address.clone()))
                .collect();
            virtual_storage(
                sources,
                &vs.name,
                &storages,
                health.as_ref(),
                &queue,
                (&counts, counts_age),
                &disks,
            )
        })
        .collect();
    let router = router_info(sources);
    let mut status = Status {
        summary: Summary {
            ok: true,
            text: String::new(),
        },
        collected_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        router,
        virtual_storages,
        problems: Vec::new(),
        database_errors,
        recent_errors: crate::logging::recent_errors(),
    };
    status.problems = problems::find(&status);
    status.summary = problems::summary(&status.problems);
    status
}

fn router_info(sources: &Sources) -> RouterInfo {
    let writer = sources.store.writer_status();
    let listen_down = sources.cache.listener_down_for();
    RouterInfo {
        name: sources.health.praefect_name().to_string(),
        version: sources.version.clone(),
        uptime_seconds: sources.started.elapsed().as_secs(),
        database_writer: writer.target,
        database_writer_lost: writer.lost_reason,
        listen_connected: sources.cache.is_enabled(),
        listen_down_seconds: if sources.cache.is_enabled() {
            None
        } else {
            listen_down.map(|d| d.as_secs())
        },
    }
}

/// One virtual storage's part of the status.
fn virtual_storage(
    sources: &Sources,
    name: &str,
    storages: &[(String, String)],
    health: Option<&ClusterHealth>,
    queue: &[QueueGroup],
    (counts, counts_age): (&CountsResult, Duration),
    disks: &BTreeMap<(String, String), Result<Disk, String>>,
) -> VirtualStorageStatus {
    let here = sources.health.healthy();
    let this_router = sources.health.praefect_name();
    let observations: Vec<_> = health
        .map(|h| {
            h.observations
                .iter()
                .filter(|o| o.virtual_storage == name)
                .collect()
        })
        .unwrap_or_default();
    let mut routers: Vec<&str> = observations
        .iter()
        .map(|o| o.praefect_name.as_str())
        .collect();
    routers.sort_unstable();
    routers.dedup();
    let nodes = storages
        .iter()
        .map(|(storage, address)| {
            let disk = disks.get(&(name.to_string(), storage.clone()));
            NodeStatus {
                storage: storage.clone(),
                address: address.clone(),
                healthy_here: here.get(name).is_some_and(|set| set.contains(storage)),
                quorum_healthy: health.map(|h| {
                    h.quorum_healthy
                        .iter()
                        .any(|(vs, s)| vs == name && s == storage)
                }),
                seen_by: observations
                    .iter()
                    .filter(|o| o.storage == *storage)
                    .map(|o| RouterView {
                        praefect_name: o.praefect_name.clone(),
                        healthy: o.healthy,
                        seen_seconds_ago: o.seen_seconds_ago,
                        this_router: o.praefect_name == this_router,
                    })
                    .collect(),
                disk: disk.and_then(|d| d.as_ref().ok()).cloned(),
                disk_error: disk.and_then(|d| d.as_ref().err()).cloned(),
            }
        })
        .collect();
    let repositories = counts
        .as_ref()
        .ok()
        .and_then(|rows| rows.iter().find(|row| row.virtual_storage == name))
        .cloned()
        .or_else(|| {
            // A virtual storage without repositories has no row.
            counts.is_ok().then(|| RepositoryCounts {
                virtual_storage: name.to_string(),
                repositories: 0,
                healthy: 0,
                outdated: 0,
                unavailable: 0,
                read_only: 0,
                replicas: 0,
                verified: 0,
                expired: 0,
                unverified: 0,
            })
        });
    let interval = sources.verification_interval();
    let enabled = !interval.is_zero();
    let failing = |result: &str| {
        storages
            .iter()
            .map(|(storage, _)| {
                crate::metrics::VERIFICATION_JOBS_COMPLETED
                    .with_label_values(&[name, storage.as_str(), result])
                    .get()
            })
            .sum()
    };
    let verification = Verification {
        enabled,
        interval_seconds: interval.as_secs(),
        verified: repositories
            .as_ref()
            .filter(|_| enabled)
            .map(|c| c.verified),
        expired: repositories.as_ref().filter(|_| enabled).map(|c| c.expired),
        unverified: repositories
            .as_ref()
            .filter(|_| enabled)
            .map(|c| c.unverified),
        failing_invalid: failing("invalid"),
        failing_errors: failing("error"),
    };
    let active_routers = routers.len();
    VirtualStorageStatus {
        name: name.to_string(),
        nodes,
        active_routers,
        quorum_needed: active_routers.div_ceil(2),
        repository_counts_error: counts.as_ref().err().map(|err| err.message.clone()),
        repository_counts_age_seconds: counts.is_ok().then_some(counts_age.as_secs()),
        repositories,
        queue: queue_targets(name, queue),
        verification,
    }
}

/// The queue groups of `virtual_storage`, by target.
fn queue_targets(virtual_storage: &str, groups: &[QueueGroup]) -> Vec<QueueTarget> {
    let mut targets: BTreeMap<&str, QueueTarget> = BTreeMap::new();
    for group in groups
        .iter()
        .filter(|g| g.virtual_storage == virtual_storage)
    {
        let target = targets
            .entry(group.target_node.as_str())
            .or_insert_with(|| QueueTarget {
                target: group.target_node.clone(),
                total: 0,
                states: Vec::new(),
                oldest_seconds: 0.0,
            });
        target.total += group.count;
        target.oldest_seconds = target.oldest_seconds.max(group.oldest_seconds);
        target.states.push(QueueState {
            state: group.state.clone(),
            count: group.count,
            oldest_seconds: group.oldest_seconds,
        });
    }
    targets.into_values().collect()
}

/// Every node's disk, asked of all nodes at once, each bounded by `timeout`; keyed by
/// (virtual storage, storage).
async fn disks(
    nodes: &NodePool,
    timeout: Duration,
) -> BTreeMap<(String, String), Result<Disk, String>> {
    let asks = nodes.iter().map(|(node, channel)| async move {
        let mut client = ServerServiceClient::new(channel.clone());
        let answer =
            tokio::time::timeout(timeout, client.disk_statistics(DiskStatisticsRequest {})).await;
        let disk = match answer {
            Err(_) => Err(format!("no answer within {timeout:?}")),
            Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
            Ok(Ok(response)) => response
                .into_inner()
                .storage_statuses
                .into_iter()
                .find(|s| s.storage_name == node.storage)
                .map(|s| Disk {
                    available_bytes: s.available,
                    used_bytes: s.used,
                })
                .ok_or_else(|| "the node does not report this storage".to_string()),
        };
        ((node.virtual_storage.clone(), node.storage.clone()), disk)
    });
    futures::future::join_all(asks).await.into_iter().collect()
}
