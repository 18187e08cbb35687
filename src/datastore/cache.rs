//! The read path's cache of up-to-date storages, so that an accessor RPC runs no SQL in steady
//! state.
//!
//! One LRU per virtual storage maps a relative path to its replica path and the storages that
//! hold its latest generation. Concurrent misses on one key share one query. Entries are
//! evicted by PostgreSQL NOTIFY (`storage_repositories_updates`, `repositories_updates`, sent
//! by the triggers of the schema), received on a dedicated session connection (LISTEN does not
//! survive a transaction pooler). While that connection is down the cache is purged and
//! bypassed, because notifications sent meanwhile are lost; the listener reconnects every
//! 5 seconds and re-enables the cache once it listens again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde::Deserialize;
use sqlx::postgres::PgListener;
use tokio::sync::watch;

use super::connect::{find_writable, lazy_pool, targets, PoolSettings};
use super::{ConsistentStorages, Datastore, DatastoreError};
use crate::config::DatabaseConnection;
use crate::metrics;

/// Entries per virtual storage, as in Praefect.
pub const CACHE_CAPACITY: u64 = 2_097_152;
/// The channels the schema's triggers notify.
pub const CHANNELS: [&str; 2] = ["storage_repositories_updates", "repositories_updates"];

/// How the listener connects.
#[derive(Clone, Debug)]
pub struct ListenerSettings {
    /// The direct (session) connection: `[database.session_pooled]` falling back to `[database]`.
    pub connection: DatabaseConnection,
    /// Wait between reconnection attempts.
    pub retry: Duration,
}

/// Counters of one cache, for tests and benchmarks (the Prometheus counters carry the same).
#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub evictions: AtomicU64,
    /// Reads while the cache was disabled (each one a query).
    pub bypassed: AtomicU64,
}

type Key = String;
type Value = Arc<ConsistentStorages>;

/// Why a lookup failed; errors are never cached.
#[derive(Clone, Debug)]
enum LookupError {
    NotFound,
    Database(Arc<DatastoreError>),
}

pub struct StorageCache {
    store: Datastore,
    caches: HashMap<String, moka::future::Cache<Key, Value>>,
    enabled: AtomicBool,
    /// Bumped by every eviction; with `evicted_at`, a query that raced with a notification does
    /// not leave its stale result in the cache.
    epoch: AtomicU64,
    evicted_at: Mutex<HashMap<(String, String), u64>>,
    pub stats: CacheStats,
    /// The `hit` counter of each virtual storage, looked up once (hits are every read).
    hit_counters: HashMap<String, OnceLock<prometheus::IntCounter>>,
}

#[derive(Deserialize)]
struct Change {
    virtual_storage: String,
    relative_paths: Vec<String>,
}

impl StorageCache {
    /// A cache for the given virtual storages, disabled until the listener runs.
    pub fn new(store: Datastore, virtual_storages: &[String]) -> Arc<Self> {
        Self::with_capacity(store, virtual_storages, CACHE_CAPACITY)
    }

    pub fn with_capacity(
        store: Datastore,
        virtual_storages: &[String],
        capacity: u64,
    ) -> Arc<Self> {
        let caches = virtual_storages
            .iter()
            .map(|vs| (vs.clone(), moka::future::Cache::new(capacity)))
            .collect();
        let hit_counters = virtual_storages
            .iter()
            .map(|vs| (vs.clone(), OnceLock::new()))
            .collect();
        Arc::new(StorageCache {
            store,
            caches,
            enabled: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            evicted_at: Mutex::new(HashMap::new()),
            stats: CacheStats::default(),
            hit_counters,
        })
    }

    /// The datastore behind the cache (writes always go to it directly).
    pub fn store(&self) -> &Datastore {
        &self.store
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    fn count_hit(&self, virtual_storage: &str) {
        self.stats.hits.fetch_add(1, Ordering::Relaxed);
        match self.hit_counters.get(virtual_storage) {
            // Looked up on the first hit, so the series appears only once counted, as before.
            Some(counter) => counter
                .get_or_init(|| metrics::CACHE_ACCESS.with_label_values(&[virtual_storage, "hit"]))
                .inc(),
            None => self.count(virtual_storage, "hit"),
        }
    }

    fn count(&self, virtual_storage: &str, kind: &str) {
        metrics::CACHE_ACCESS
            .with_label_values(&[virtual_storage, kind])
            .inc();
    }

    /// The up-to-date storages of a repository; None if it is not tracked.
    pub async fn get(
        &self,
        virtual_storage: &str,
        relative_path: &str,
    ) -> Result<Option<Value>, DatastoreError> {
        let cache = match self.caches.get(virtual_storage) {
            Some(cache) if self.is_enabled() => cache,
            _ => {
                self.stats.bypassed.fetch_add(1, Ordering::Relaxed);
                return Ok(self
                    .store
                    .consistent_storages(virtual_storage, relative_path)
                    .await?
                    .map(Arc::new));
            }
        };
        // A hit needs neither an owned key nor the shared-miss machinery of `try_get_with`.
        if let Some(value) = cache.get(relative_path).await {
            self.count_hit(virtual_storage);
            return Ok(Some(value));
        }
        let populated = AtomicBool::new(false);
        let started_at = self.epoch.load(Ordering::Acquire);
        let result = cache
            .try_get_with(relative_path.to_string(), async {
                populated.store(true, Ordering::Relaxed);
                match self
                    .store
                    .consistent_storages(virtual_storage, relative_path)
                    .await
                {
                    Ok(Some(found)) => Ok(Arc::new(found)),
                    Ok(None) => Err(LookupError::NotFound),
                    Err(err) => Err(LookupError::Database(Arc::new(err))),
                }
            })
            .await;
        if populated.load(Ordering::Relaxed) {
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
            self.count(virtual_storage, "miss");
            if result.is_ok() {
                self.count(virtual_storage, "populate");
                // A notification for this key that arrived while we queried means our result
                // may predate the change: do not keep it.
                let key = (virtual_storage.to_string(), relative_path.to_string());
                let raced = self
                    .evicted_at
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&key)
                    .is_some_and(|at| *at > started_at);
                if raced || !self.is_enabled() {
                    cache.invalidate(relative_path).await;
                }
            }
        } else {
            self.count_hit(virtual_storage);
        }
        match result {
            Ok(value) => Ok(Some(value)),
            Err(err) => match err.as_ref() {
                LookupError::NotFound => Ok(None),
                LookupError::Database(db) => Err(DatastoreError::Shared(db.clone())),
            },
        }
    }

    /// Evicts the paths a notification names.
    pub async fn evict(&self, virtual_storage: &str, relative_paths: &[String]) {
        let Some(cache) = self.caches.get(virtual_storage) else {
            return;
        };
        let epoch = self.epoch.fetch_add(1, Ordering::AcqRel) + 1;
        {
            let mut evicted = self.evicted_at.lock().unwrap_or_else(|p| p.into_inner());
            // Only keys evicted since the oldest query still running matter; a bounded map
            // is enough, since lookups take milliseconds.
            if evicted.len() > 100_000 {
                evicted.clear();
            }
            for path in relative_paths {
                evicted.insert((virtual_storage.to_string(), path.clone()), epoch);
            }
        }
        for path in relative_paths {
            cache.invalidate(path).await;
            self.stats.evictions.fetch_add(1, Ordering::Relaxed);
            self.count(virtual_storage, "evict");
        }
    }

    /// Handles one notification payload; an undecodable one purges everything.
    pub async fn on_notification(&self, payload: &str) {
        match serde_json::from_str::<Vec<Change>>(payload) {
            Ok(changes) => {
                for change in changes {
                    self.evict(&change.virtual_storage, &change.relative_paths)
                        .await;
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "undecodable change notification; purging the cache");
                self.purge();
            }
        }
    }

    fn purge(&self) {
        for cache in self.caches.values() {
            cache.invalidate_all();
        }
    }

    fn set_enabled(&self, enabled: bool) {
        if !enabled {
            self.purge();
        }
        self.enabled.store(enabled, Ordering::Release);
    }

    /// Listens for changes until `shutdown`, keeping the cache enabled only while listening.
    pub async fn listen(
        self: Arc<Self>,
        settings: ListenerSettings,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            match self.listen_once(&settings, &mut shutdown).await {
                Ok(()) => {
                    self.set_enabled(false);
                    return;
                }
                Err(err) => {
                    self.set_enabled(false);
                    metrics::NOTIFICATION_RECONNECTS
                        .with_label_values(&["disconnected"])
                        .inc();
                    tracing::warn!(error = %err, "change listener disconnected; read cache disabled");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(settings.retry) => {}
                _ = stopped(&mut shutdown) => return,
            }
        }
    }

    /// One connection's life: Ok when shut down, Err when the connection failed.
    async fn listen_once(
        &self,
        settings: &ListenerSettings,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), DatastoreError> {
        let candidates = targets(&settings.connection)?;
        let pool_settings = PoolSettings {
            max_connections: 1,
            application_name: "praefect-listener".to_string(),
            ..PoolSettings::default()
        };
        let target = find_writable(&candidates, pool_settings.connect_timeout).await?;
        let pool = lazy_pool(&target, &pool_settings);
        let query_error = |source| DatastoreError::Query {
            op: "listen",
            source,
        };
        let mut listener = PgListener::connect_with(&pool).await.map_err(query_error)?;
        listener.listen_all(CHANNELS).await.map_err(query_error)?;
        self.set_enabled(true);
        metrics::NOTIFICATION_RECONNECTS
            .with_label_values(&["connected"])
            .inc();
        tracing::info!(target = %target.describe(), "change listener connected; read cache enabled");
        loop {
            tokio::select! {
                received = listener.try_recv() => match received {
                    Ok(Some(notification)) => self.on_notification(notification.payload()).await,
                    Ok(None) => {
                        return Err(query_error(sqlx::Error::Protocol("listener connection lost".into())));
                    }
                    Err(source) => return Err(query_error(source)),
                },
                _ = stopped(shutdown) => return Ok(()),
            }
        }
    }
}

/// Resolves once `shutdown` turns true (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}
