//! What routing needs to know about repositories, behind a small trait: the router's
//! decisions are pure functions of these answers, so they can be tested against an in-memory
//! store, and the proxy plugs in the read cache and the database.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;

/// Where a repository lives and which of its replicas a question was about: the up-to-date
/// ones (consistent storages) or every recorded one, depending on the call.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplicaSet {
    pub repository_id: i64,
    pub replica_path: String,
    /// Storages, sorted.
    pub storages: Vec<String>,
}

/// A store answer that failed. Routing does not look inside; the proxy maps it to a status
/// (a database that is away is worth retrying, a failed statement is not).
#[derive(Debug, thiserror::Error)]
#[error("repository store: {source}")]
pub struct StoreError {
    /// True when no database server accepts writes right now (switchover, failover).
    pub unavailable: bool,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// The answers routing asks for. Reads may come from a cache; everything a write depends on
/// comes from the database.
pub trait RoutingStore: Send + Sync {
    /// The up-to-date storages of a repository as the read cache knows them (reads).
    fn cached_consistent(
        &self,
        virtual_storage: &str,
        relative_path: &str,
    ) -> impl Future<Output = Result<Option<Arc<ReplicaSet>>, StoreError>> + Send;

    /// The up-to-date storages of a repository, from the database (writes, forced-primary
    /// reads, placement).
    fn consistent(
        &self,
        virtual_storage: &str,
        relative_path: &str,
    ) -> impl Future<Output = Result<Option<ReplicaSet>, StoreError>> + Send;

    /// Every storage that holds a replica of a repository, whatever its generation.
    fn recorded(
        &self,
        virtual_storage: &str,
        relative_path: &str,
    ) -> impl Future<Output = Result<Option<ReplicaSet>, StoreError>> + Send;

    /// The repository's primary, elected now if it has none or an invalid one; None when no
    /// replica can be primary.
    fn primary(
        &self,
        repository_id: i64,
    ) -> impl Future<Output = Result<Option<String>, StoreError>> + Send;

    /// The storages explicitly assigned to a repository (empty: none recorded).
    fn assignments(
        &self,
        repository_id: i64,
    ) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;

    /// Reserves an id for a repository about to be created; None when it exists already.
    fn reserve_repository_id(
        &self,
        virtual_storage: &str,
        relative_path: &str,
    ) -> impl Future<Output = Result<Option<i64>, StoreError>> + Send;
}

/// The locally healthy storages of each virtual storage.
pub type HealthySet = BTreeMap<String, BTreeSet<String>>;

/// This router's view of node health, as its health checks last saw it.
pub trait HealthView: Send + Sync {
    fn healthy(&self) -> Arc<HealthySet>;
}
