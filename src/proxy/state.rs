//! What every call shares: the configuration, the node connections, health, the read cache
//! and the router built on them.

use std::sync::Arc;

use tokio_util::task::TaskTracker;

use super::store::CachedStore;
use crate::config::Config;
use crate::datastore::{Datastore, StorageCache};
use crate::health::{readiness, HealthManager};
use crate::nodes::NodePool;
use crate::routing::registry::Registry;
use crate::routing::{Router, Topology};
use crate::transactions::Transactions;
use crate::wire::backchannel::SessionRegistry;

/// Everything routing and forwarding need, shared by all calls.
pub struct Proxy {
    pub registry: &'static Registry,
    pub config: Arc<Config>,
    pub nodes: Arc<NodePool>,
    pub health: HealthManager,
    pub cache: Arc<StorageCache>,
    pub router: Router<CachedStore, HealthManager>,
    /// Backchannel sessions of the router's clients, to open sidechannels to them.
    pub sessions: SessionRegistry,
    /// The reference transactions of writes in flight (the nodes vote on them).
    pub transactions: Transactions,
    /// The sidechannel bridges in flight. A bridge outlives its call (the node's answer is
    /// complete before the client has read it all), so a graceful stop waits for these as
    /// for the calls: stopping when the calls end would cut a clone's last megabytes.
    pub bridges: TaskTracker,
}

impl Proxy {
    pub fn new(
        config: Arc<Config>,
        nodes: Arc<NodePool>,
        health: HealthManager,
        cache: Arc<StorageCache>,
        sessions: SessionRegistry,
        transactions: Transactions,
        bridges: TaskTracker,
    ) -> Self {
        let router = Router::new(
            Topology::from_config(&config),
            CachedStore {
                cache: cache.clone(),
            },
            health.clone(),
        );
        Proxy {
            registry: Registry::global(),
            config,
            nodes,
            health,
            cache,
            router,
            sessions,
            transactions,
            bridges,
        }
    }

    pub fn store(&self) -> &Datastore {
        self.cache.store()
    }

    /// The readiness checks that fail now (see `health::readiness`).
    pub fn failed_readiness_checks(&self) -> Vec<readiness::FailedCheck> {
        readiness::failed_checks(
            &self.cache,
            &self.health.healthy(),
            self.config
                .virtual_storage
                .iter()
                .map(|vs| vs.name.as_str()),
        )
    }
}
