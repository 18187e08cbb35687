//! The health manager: every second it asks every node `grpc.health.v1.Health/Check` (one
//! second for the whole round), keeps the result as this router's local view of which nodes
//! are healthy, and writes the round to `node_status` in one statement, so that the routers
//! together can decide by quorum (the `healthy_storages` view) which replicas may be primary.
//!
//! The local view is what routing uses; it keeps working when the database does not (writes
//! that fail are only logged).

pub mod readiness;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::config::Config;
use crate::datastore::{Datastore, HealthObservation};
use crate::nodes::{NodeChannel, NodePool};
use crate::periodic::{FirstRun, Ticker};

/// Time between the end of one round and the start of the next.
pub const ROUND_INTERVAL: Duration = Duration::from_secs(1);
/// Bound on one whole round of probes.
pub const ROUND_TIMEOUT: Duration = Duration::from_secs(1);

/// Healthy storages per virtual storage, as this router saw them in its latest round.
pub use crate::routing::HealthySet;

/// This router's name in `node_status`: `<hostname>:<listen_addr>` (or the socket path), so
/// that it is the same after a restart.
pub fn praefect_name(config: &Config) -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let listener = if config.listen_addr.is_empty() {
        &config.socket_path
    } else {
        &config.listen_addr
    };
    format!("{host}:{listener}")
}

/// Probes the nodes and publishes the local healthy set.
#[derive(Clone)]
pub struct HealthManager {
    name: String,
    nodes: Arc<NodePool>,
    store: Datastore,
    healthy: Arc<RwLock<Arc<HealthySet>>>,
    written: watch::Sender<bool>,
}

/// One health check over `channel`, within [`ROUND_TIMEOUT`]: Ok when the node says it is
/// serving, else why not.
async fn probe(channel: NodeChannel) -> Result<(), String> {
    let mut client = HealthClient::new(channel);
    let check = client.check(HealthCheckRequest {
        service: String::new(),
    });
    match tokio::time::timeout(ROUND_TIMEOUT, check).await {
        Ok(Ok(response)) if response.get_ref().status == ServingStatus::Serving as i32 => Ok(()),
        Ok(Ok(response)) => Err(format!("status {}", response.get_ref().status)),
        Ok(Err(status)) => Err(status.message().to_string()),
        Err(_) => Err("timed out".to_string()),
    }
}

impl HealthManager {
    pub fn new(config: &Config, nodes: Arc<NodePool>, store: Datastore) -> Self {
        HealthManager {
            name: praefect_name(config),
            nodes,
            store,
            healthy: Arc::new(RwLock::new(Arc::new(HealthySet::new()))),
            written: watch::channel(false).0,
        }
    }

    pub fn praefect_name(&self) -> &str {
        &self.name
    }

    /// The latest local view (cheap: a shared snapshot).
    pub fn healthy(&self) -> Arc<HealthySet> {
        self.healthy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits until a round has been written to the database once (startup gate).
    pub async fn first_write(&self) {
        let mut rx = self.written.subscribe();
        let _ = rx.wait_for(|written| *written).await;
    }

    /// One round: probe every node, publish, write.
    pub async fn round(&self) {
        let probes = self.nodes.iter().map(|(node, channel)| async move {
            // Both lanes: reads go over plain HTTP/2, writes over backchannel sessions
            // (`nodes::subchannel::Lane`); a node only one of them reaches is not healthy.
            let (plain, backchannel) =
                futures::future::join(probe(channel.clone()), probe(channel.over_backchannel()))
                    .await;
            let failed = [("plain", plain), ("backchannel", backchannel)]
                .into_iter()
                .filter_map(|(lane, outcome)| outcome.err().map(|why| (lane, why)))
                .collect::<Vec<_>>();
            for (lane, why) in &failed {
                tracing::debug!(storage = %node.storage, lane, error = %why, "health check failed");
            }
            HealthObservation {
                virtual_storage: node.virtual_storage.clone(),
                storage: node.storage.clone(),
                healthy: failed.is_empty(),
            }
        });
        let observations = futures::future::join_all(probes).await;
        let mut set = HealthySet::new();
        for o in &observations {
            crate::metrics::NODE_HEALTHY
                .with_label_values(&[o.virtual_storage.as_str(), o.storage.as_str()])
                .set(i64::from(o.healthy));
            let entry = set.entry(o.virtual_storage.clone()).or_default();
            if o.healthy {
                entry.insert(o.storage.clone());
            }
        }
        let changed = *self.healthy() != set;
        *self.healthy.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
        if changed {
            tracing::info!(healthy = ?*self.healthy(), "local node health changed");
        }
        let outcome = self.store.record_health(&self.name, &observations).await;
        if let Some(err) = crate::datastore::outage::HEALTH_RECORDER.observe(&outcome) {
            tracing::warn!(error = %err, "recording health checks failed");
        }
        if outcome.is_ok() {
            self.written.send_replace(true);
        }
    }

    /// Runs rounds until `shutdown` is cancelled. A round also runs as soon as the database
    /// writer is found again after an outage: this router's observations expired from the
    /// quorum while it could not record them, and until they are back no primary can be
    /// elected by it.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut writer = self.store.watch_writer();
        let mut ticker = Ticker::new(ROUND_INTERVAL, shutdown, FirstRun::Immediately);
        loop {
            // Only while the writer is lost: a connected writer wakes nobody.
            let writer_found = async {
                if writer.borrow().is_connected() {
                    std::future::pending::<()>().await;
                }
                let _ = writer.wait_for(|state| state.is_connected()).await;
            };
            if !ticker.tick_or(writer_found).await {
                return;
            }
            self.round().await;
        }
    }
}

impl crate::routing::HealthView for HealthManager {
    fn healthy(&self) -> Arc<HealthySet> {
        HealthManager::healthy(self)
    }
}
