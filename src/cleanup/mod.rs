//! The repositories cleanup (`[repositories_cleanup]`): finds replicas on the nodes' disks
//! that the database has no record of (left behind by a failed creation or deletion, or
//! copied in by hand) and reports them, one warning each. It only reports, like Praefect's
//! "log" action: deleting data the database does not know is the operator's decision
//! (`track-repository` adopts such a replica, `list-untracked-repositories` lists them).
//!
//! Every router runs the worker; `storage_cleanups` rows make them take turns (see
//! `datastore/storage_cleanup.rs`). Every `check_interval` a router takes, one after the
//! other, the storages whose last walk is at least `run_interval` old, and walks each. A
//! `run_interval` or `check_interval` of 0 disables the worker.

pub mod walker;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::datastore::{Datastore, DatastoreError};
use crate::nodes::NodePool;
use crate::periodic::{run_every, FirstRun};
use walker::{Walk, WalkError};

/// A walk not refreshed for this long is taken to belong to a dead router.
pub const LIVENESS: Duration = Duration::from_secs(30);
/// How often a router says it is still walking (well within [`LIVENESS`]).
const REFRESH: Duration = Duration::from_secs(10);
/// Repositories changed more recently than this are not reported: a repository being
/// created has its directory before its record.
pub const MIN_AGE: Duration = Duration::from_secs(24 * 3600);

/// The worker of one router.
pub struct RepositoriesCleanup {
    pub config: Arc<Config>,
    pub nodes: Arc<NodePool>,
    pub store: Datastore,
}

impl RepositoriesCleanup {
    /// Checks every `check_interval`, the first time one interval after the start, as
    /// Praefect does: a router that just started talks to its nodes for routing only (and
    /// the database decides whether a walk is due, so restarts do not add walks).
    pub async fn run(self, stop: CancellationToken) {
        let settings = &self.config.repositories_cleanup;
        let (check, run) = (
            settings.check_interval.to_std(),
            settings.run_interval.to_std(),
        );
        if check.is_zero() || run.is_zero() {
            tracing::info!("repositories cleanup disabled");
            return;
        }
        let this = &self;
        let stop_ref = &stop;
        run_every(check, &stop, FirstRun::AfterPeriod, || async move {
            if let Err(err) = this.check(run, stop_ref).await {
                tracing::error!(error = %err, "repositories cleanup failed");
            }
        })
        .await
    }

    /// Walks every storage due, one at a time, until none is.
    async fn check(&self, run: Duration, stop: &CancellationToken) -> Result<(), DatastoreError> {
        let pairs = crate::nodes::configured_pairs(&self.config);
        self.store.populate_storage_cleanups(&pairs).await?;
        while !stop.is_cancelled() {
            let Some((virtual_storage, storage)) =
                self.store.acquire_cleanup_storage(run, LIVENESS).await?
            else {
                tracing::debug!("no storage due for the repositories cleanup");
                return Ok(());
            };
            let outcome = tokio::select! {
                outcome = self.walk(&virtual_storage, &storage) => Some(outcome),
                _ = self.keep_alive(&virtual_storage, &storage) => None,
                _ = stop.cancelled() => None,
            };
            match outcome {
                Some(Ok(checked)) => tracing::info!(
                    virtual_storage,
                    storage,
                    checked,
                    "repositories cleanup walked the storage"
                ),
                Some(Err(err)) => tracing::error!(
                    virtual_storage, storage, error = %err, "repositories cleanup of the storage failed"
                ),
                None => {}
            }
            // Given up or done: either way the storage is next due one run interval from now.
            self.store
                .release_cleanup_storage(&virtual_storage, &storage)
                .await?;
        }
        Ok(())
    }

    async fn walk(&self, virtual_storage: &str, storage: &str) -> Result<u64, WalkError> {
        let Some(channel) = self.nodes.channel(virtual_storage, storage) else {
            return Ok(0);
        };
        let walk = Walk {
            store: &self.store,
            channel: channel.clone(),
            virtual_storage,
            storage,
            batch: usize::try_from(self.config.repositories_cleanup.repositories_in_batch)
                .unwrap_or(1),
            older_than: MIN_AGE,
        };
        walk.untracked(|paths| {
            for path in paths {
                tracing::warn!(
                    virtual_storage,
                    storage,
                    relative_replica_path = %path,
                    "repository is not managed by praefect"
                );
            }
        })
        .await
    }

    /// Refreshes the claim on the storage until dropped; returns only if that fails.
    async fn keep_alive(&self, virtual_storage: &str, storage: &str) {
        loop {
            tokio::time::sleep(REFRESH).await;
            if let Err(err) = self
                .store
                .refresh_cleanup_storage(virtual_storage, storage)
                .await
            {
                tracing::error!(error = %err, "repositories cleanup lost its claim on the storage");
                return;
            }
        }
    }
}
