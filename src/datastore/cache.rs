//! The read path's cache of up-to-date storages, so that an accessor RPC runs no SQL in steady
//! state.
//!
//! One LRU per virtual storage maps a relative path to its replica path and the storages that
//! hold its latest generation. Concurrent misses on one key share one query. Entries are
//! evicted by PostgreSQL NOTIFY (`storage_repositories_updates`, `repositories_updates`, sent
//! by the triggers of the schema), received on a dedicated session connection (LISTEN does not
//! survive a transaction pooler), which must be on the server that accepts writes (NOTIFY is
//! delivered only on the server where the writing transaction committed).
//!
//! **While the listener is down** notifications sent meanwhile are lost, so the cache is not
//! trusted: every read asks the database, and the answer refreshes the entry. Only when the
//! database itself is unavailable (no writer known: a switchover, a failover, PostgreSQL
//! stopped) does a read fall back to the entry it has, and only if that entry was confirmed
//! less than `stale_read_window` ago, counting an entry that was kept fresh by the listener
//! as confirmed until the moment the listener went down. What this accepts: during such an
//! outage no router can record a write (writes need the database before they reach a node),
//! so the entries stay right, except when only this router lost the database while others
//! still write; then a read may be served by a replica that misses writes made in the last
//! `stale_read_window` at most.
//!
//! The listener reconnects quickly (250 ms, doubling to 5 s, or at once when the main pool
//! finds a writer), checks every second that its server still accepts writes (a demoted
//! server never notifies again), and **flushes the cache on every reconnect**, since whatever
//! changed while it was away was never notified; it does so only once the main pool has a
//! writer too, so that a flush never throws away the entries serving reads in an outage.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::Deserialize;
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

use super::connect::{find_writable, lazy_pool, listener_is_writable, targets, PoolSettings};
use super::{ConsistentStorages, Datastore, DatastoreError};
use crate::config::DatabaseConnection;
use crate::metrics;

/// The read cache's memory budget, shared equally by the virtual storages. Go Praefect
/// caps each virtual storage at 2,097,152 entries; measured at a million repositories
/// (`scale_bench`), an entry costs about 614 bytes of RSS (hashed relative paths, three
/// replicas), so that cap would be 1.2 GiB. This budget keeps a router's RSS under 500 MB
/// with its cache full: about 650,000 such entries, the most used ones (moka keeps by
/// frequency), and the rest read from the database on a miss (0.3 ms of server time).
pub const CACHE_BYTES: u64 = 384 * 1024 * 1024;
/// What an entry costs besides its strings (moka's entry and its bookkeeping, the `Arc`, the
/// `Vec`, the timestamp): the measured 614 bytes less the strings of the measured entries.
const ENTRY_OVERHEAD: usize = 470;

/// An entry's weight against [`CACHE_BYTES`]: an estimate of its bytes.
fn weigh(key: &Key, entry: &Cached) -> u32 {
    let set = &entry.storages;
    let strings =
        key.len() + set.replica_path.len() + set.storages.iter().map(String::len).sum::<usize>();
    u32::try_from(ENTRY_OVERHEAD + strings).unwrap_or(u32::MAX)
}
/// The channels the schema's triggers notify.
pub const CHANNELS: [&str; 2] = ["storage_repositories_updates", "repositories_updates"];

/// How long a cache entry may serve reads while the database is unavailable, by default.
pub const DEFAULT_STALE_READ_WINDOW: Duration = crate::config::Database::DEFAULT_STALE_READ_WINDOW;
/// How often the listener checks that its server still accepts writes.
const LISTENER_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// The first wait before reconnecting the listener; it doubles up to `ListenerSettings::retry`.
const LISTENER_FIRST_RETRY: Duration = Duration::from_millis(250);

/// How the listener connects.
#[derive(Clone, Debug)]
pub struct ListenerSettings {
    /// The direct (session) connection: `[database.session_pooled]` falling back to `[database]`.
    pub connection: DatabaseConnection,
    /// The longest wait between reconnection attempts.
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
    /// Reads served from an entry while the database was unavailable.
    pub stale: AtomicU64,
    /// Times the listener connected (the cache was flushed each time).
    pub listener_connects: AtomicU64,
}

type Key = String;
type Value = Arc<ConsistentStorages>;

/// A cache entry: the storages and when the database last confirmed them without a
/// listener to keep them fresh (entries made while listening carry the time they were made,
/// which is older than the moment the listener was lost).
#[derive(Clone)]
struct Cached {
    storages: Value,
    confirmed_at: Instant,
}

/// Why a lookup failed; errors are never cached.
#[derive(Clone, Debug)]
enum LookupError {
    NotFound,
    Database(Arc<DatastoreError>),
}

/// One virtual storage's cache (foldhash: every read looks into it).
type RepositoryCache = moka::future::Cache<Key, Cached, foldhash::fast::RandomState>;

pub struct StorageCache {
    store: Datastore,
    caches: foldhash::HashMap<String, RepositoryCache>,
    enabled: AtomicBool,
    /// Bumped each time the listener (re)connects, so that a read that queried before a
    /// reconnect does not put its result into the freshly flushed cache.
    connects: AtomicU64,
    /// When the listener was lost (None while it listens).
    listener_lost_at: Mutex<Option<Instant>>,
    stale_read_window: Duration,
    /// Bumped by every eviction; with `evicted_at`, a query that raced with a notification does
    /// not leave its stale result in the cache.
    epoch: AtomicU64,
    evicted_at: Mutex<HashMap<(String, String), u64>>,
    pub stats: CacheStats,
    /// The `hit` counter of each virtual storage, looked up once (hits are every read).
    hit_counters: foldhash::HashMap<String, OnceLock<prometheus::IntCounter>>,
}

#[derive(Deserialize)]
struct Change {
    virtual_storage: String,
    relative_paths: Vec<String>,
}

impl StorageCache {
    /// A cache for the given virtual storages within [`CACHE_BYTES`], disabled until the
    /// listener runs.
    pub fn new(store: Datastore, virtual_storages: &[String]) -> Arc<Self> {
        Self::with_settings(
            store,
            virtual_storages,
            CACHE_BYTES,
            DEFAULT_STALE_READ_WINDOW,
        )
    }

    /// A cache with its memory budget in bytes (over all virtual storages, each getting an
    /// equal share) and its stale-read window.
    pub fn with_settings(
        store: Datastore,
        virtual_storages: &[String],
        budget_bytes: u64,
        stale_read_window: Duration,
    ) -> Arc<Self> {
        let share = budget_bytes / u64::try_from(virtual_storages.len().max(1)).unwrap_or(1);
        let caches = virtual_storages
            .iter()
            .map(|vs| {
                let cache = moka::future::Cache::builder()
                    .max_capacity(share)
                    .weigher(weigh)
                    .build_with_hasher(foldhash::fast::RandomState::default());
                (vs.clone(), cache)
            })
            .collect();
        let hit_counters = virtual_storages
            .iter()
            .map(|vs| (vs.clone(), OnceLock::new()))
            .collect();
        Arc::new(StorageCache {
            store,
            caches,
            enabled: AtomicBool::new(false),
            connects: AtomicU64::new(0),
            // Not listening yet: nothing cached to trust either.
            listener_lost_at: Mutex::new(Some(Instant::now())),
            stale_read_window,
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
        // A hit needs neither an owned key nor the shared-miss machinery of `try_get_with`.
        if let Some(cache) = self.caches.get(virtual_storage) {
            if self.is_enabled() {
                if let Some(cached) = cache.get(relative_path).await {
                    self.count_hit(virtual_storage);
                    return Ok(Some(cached.storages));
                }
            }
        }
        // Boxed: the future of a miss (the shared loader, the query, the fallback) is several
        // kilobytes, and unboxed it would make every read's future as large, to be copied
        // whole each time the call's future moves (into its box, into its task).
        Box::pin(self.get_uncached(virtual_storage, relative_path)).await
    }

    /// [`Self::get`] when the cache did not answer: the cache bypassed or unconfirmed, or a
    /// miss.
    async fn get_uncached(
        &self,
        virtual_storage: &str,
        relative_path: &str,
    ) -> Result<Option<Value>, DatastoreError> {
        let Some(cache) = self.caches.get(virtual_storage) else {
            self.stats.bypassed.fetch_add(1, Ordering::Relaxed);
            return Ok(self
                .store
                .consistent_storages(virtual_storage, relative_path)
                .await?
                .map(Arc::new));
        };
        if !self.is_enabled() {
            return self
                .get_unconfirmed(cache, virtual_storage, relative_path)
                .await;
        }
        let populated = AtomicBool::new(false);
        let started_at = self.epoch.load(Ordering::Acquire);
        let connects = self.connects.load(Ordering::Acquire);
        let result = cache
            .try_get_with(relative_path.to_string(), async {
                populated.store(true, Ordering::Relaxed);
                match self
                    .store
                    .consistent_storages(virtual_storage, relative_path)
                    .await
                {
                    Ok(Some(found)) => Ok(Cached {
                        storages: Arc::new(found),
                        confirmed_at: Instant::now(),
                    }),
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
                // may predate the change: do not keep it. Nor when the listener was lost or
                // reconnected meanwhile.
                let key = (virtual_storage.to_string(), relative_path.to_string());
                let raced = self
                    .evicted_at
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&key)
                    .is_some_and(|at| *at > started_at);
                if raced || !self.is_enabled() || self.connects.load(Ordering::Acquire) != connects
                {
                    cache.invalidate(relative_path).await;
                }
            }
        } else {
            self.count_hit(virtual_storage);
        }
        match result {
            Ok(cached) => Ok(Some(cached.storages)),
            Err(err) => match err.as_ref() {
                LookupError::NotFound => Ok(None),
                LookupError::Database(db) => match self
                    .stale_fallback(cache, virtual_storage, relative_path, db)
                    .await
                {
                    Some(value) => Ok(Some(value)),
                    None => Err(DatastoreError::Shared(db.clone())),
                },
            },
        }
    }

    /// A read while the listener is down: the database decides, and its answer refreshes
    /// the entry; if the database is unavailable, a recent enough entry answers.
    async fn get_unconfirmed(
        &self,
        cache: &RepositoryCache,
        virtual_storage: &str,
        relative_path: &str,
    ) -> Result<Option<Value>, DatastoreError> {
        self.stats.bypassed.fetch_add(1, Ordering::Relaxed);
        let connects = self.connects.load(Ordering::Acquire);
        match self
            .store
            .consistent_storages(virtual_storage, relative_path)
            .await
        {
            Ok(Some(found)) => {
                let value = Arc::new(found);
                // Not across a reconnect: the cache was flushed then and listens again.
                if !self.is_enabled() && self.connects.load(Ordering::Acquire) == connects {
                    cache
                        .insert(
                            relative_path.to_string(),
                            Cached {
                                storages: value.clone(),
                                confirmed_at: Instant::now(),
                            },
                        )
                        .await;
                }
                Ok(Some(value))
            }
            Ok(None) => {
                cache.invalidate(relative_path).await;
                Ok(None)
            }
            Err(err) => match self
                .stale_fallback(cache, virtual_storage, relative_path, &err)
                .await
            {
                Some(value) => Ok(Some(value)),
                None => Err(err),
            },
        }
    }

    /// The entry to serve when the database failed with `err`: only when the database is
    /// unavailable (not for a statement error) and the entry is within the stale-read
    /// window.
    async fn stale_fallback(
        &self,
        cache: &RepositoryCache,
        virtual_storage: &str,
        relative_path: &str,
        err: &DatastoreError,
    ) -> Option<Value> {
        if !err.is_unavailable() {
            return None;
        }
        let cached = cache.get(relative_path).await?;
        let lost_at = *self
            .listener_lost_at
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Kept fresh by the listener until it was lost; confirmed by a query at
        // `confirmed_at` otherwise.
        let fresh_until = match lost_at {
            Some(lost_at) => cached.confirmed_at.max(lost_at),
            None => Instant::now(),
        };
        if fresh_until.elapsed() > self.stale_read_window {
            return None;
        }
        self.stats.stale.fetch_add(1, Ordering::Relaxed);
        metrics::CACHE_STALE_READS
            .with_label_values(&[virtual_storage])
            .inc();
        Some(cached.storages)
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

    /// The listener connected: everything cached may have changed unnoticed, so flush,
    /// then trust notifications again.
    fn listener_connected(&self) {
        self.connects.fetch_add(1, Ordering::AcqRel);
        self.purge();
        *self
            .listener_lost_at
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
        self.enabled.store(true, Ordering::Release);
        self.stats.listener_connects.fetch_add(1, Ordering::Relaxed);
    }

    /// The listener is gone: keep the entries (they may serve reads through a database
    /// outage, within the stale-read window) but stop trusting them.
    fn listener_lost(&self) {
        let was_enabled = self.enabled.swap(false, Ordering::AcqRel);
        if was_enabled {
            *self
                .listener_lost_at
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        }
    }

    /// When the listener was lost, if it is down.
    pub fn listener_down_for(&self) -> Option<Duration> {
        self.listener_lost_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|at| at.elapsed())
    }

    /// Listens for changes until `shutdown` is cancelled, trusting the cache only while
    /// listening. One log line when the listener is lost, one when it is back (with how long
    /// it was away).
    pub async fn listen(self: Arc<Self>, settings: ListenerSettings, shutdown: CancellationToken) {
        let mut delay = LISTENER_FIRST_RETRY;
        let mut down_since: Option<(Instant, String)> = None;
        loop {
            let outcome = self
                .listen_once(&settings, &shutdown, &mut down_since)
                .await;
            self.listener_lost();
            match outcome {
                Ok(()) => return,
                Err(ListenError { err, was_listening }) => {
                    if was_listening {
                        delay = LISTENER_FIRST_RETRY;
                        metrics::NOTIFICATION_RECONNECTS
                            .with_label_values(&["disconnected"])
                            .inc();
                    }
                    if down_since.is_none() {
                        tracing::warn!(error = %err, "change listener disconnected; reads check the database until it is back");
                        down_since = Some((Instant::now(), err.to_string()));
                    } else {
                        tracing::debug!(error = %err, "change listener still disconnected");
                    }
                }
            }
            // Retry after the back-off, or as soon as the main pool found a writer again
            // (usually the server the listener wants too).
            let mut writer = self.store.watch_writer();
            writer.mark_unchanged();
            let writer_found = async {
                while writer.changed().await.is_ok() {
                    if writer.borrow().is_connected() {
                        return;
                    }
                }
                std::future::pending::<()>().await
            };
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = writer_found => {}
                _ = shutdown.cancelled() => return,
            }
            delay = (delay * 2).min(settings.retry.max(LISTENER_FIRST_RETRY));
        }
    }

    /// One connection's life: Ok when shut down, Err when the connection failed or its
    /// server stopped accepting writes.
    async fn listen_once(
        &self,
        settings: &ListenerSettings,
        shutdown: &CancellationToken,
        down_since: &mut Option<(Instant, String)>,
    ) -> Result<(), ListenError> {
        let not_listening = |err| ListenError {
            err,
            was_listening: false,
        };
        let candidates = targets(&settings.connection).map_err(not_listening)?;
        let pool_settings = PoolSettings {
            max_connections: 1,
            application_name: "praefect-listener".to_string(),
            connect_timeout: Duration::from_secs(2),
            ..PoolSettings::default()
        };
        let target = find_writable(&candidates, pool_settings.connect_timeout)
            .await
            .map_err(not_listening)?;
        let pool = lazy_pool(&target, &pool_settings);
        let query_error = |source| DatastoreError::Query {
            op: "listen",
            source,
        };
        let mut listener = PgListener::connect_with(&pool)
            .await
            .map_err(|e| not_listening(query_error(e)))?;
        listener
            .listen_all(CHANNELS)
            .await
            .map_err(|e| not_listening(query_error(e)))?;
        // The cache is flushed and trusted again only once the main pool has a writer too:
        // flushing while the database is unavailable would throw away the entries that are
        // serving reads through the outage. Until then notifications still evict.
        let mut writer = self.store.watch_writer();
        let mut trusted = false;
        let lost = |err, trusted| ListenError {
            err,
            was_listening: trusted,
        };
        let mut check = tokio::time::interval(LISTENER_CHECK_INTERVAL);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        check.tick().await;
        loop {
            tokio::select! {
                received = listener.try_recv() => match received {
                    Ok(Some(notification)) => self.on_notification(notification.payload()).await,
                    Ok(None) => {
                        return Err(lost(query_error(sqlx::Error::Protocol("listener connection lost".into())), trusted));
                    }
                    Err(source) => return Err(lost(query_error(source), trusted)),
                },
                // Until trusted: the main pool's writer. Then every second, and at once when
                // the main pool lost or found its writer (a switchover may have demoted the
                // listener's server too): check the listener's server.
                wake = async {
                    if trusted {
                        tokio::select! {
                            _ = check.tick() => {}
                            _ = writer.changed() => {}
                        }
                        Wake::Check
                    } else {
                        drop(writer.wait_for(|state| state.is_connected()).await);
                        Wake::Trust
                    }
                } => {
                    if let Wake::Trust = wake {
                        trusted = true;
                        self.listener_connected();
                        metrics::NOTIFICATION_RECONNECTS
                            .with_label_values(&["connected"])
                            .inc();
                        match down_since.take() {
                            Some((since, _)) => tracing::info!(
                                target = %target.describe(),
                                outage_s = since.elapsed().as_secs_f64(),
                                "change listener reconnected after {:.2}s; read cache flushed and trusted again",
                                since.elapsed().as_secs_f64()
                            ),
                            None => {
                                tracing::info!(target = %target.describe(), "change listener connected; read cache enabled")
                            }
                        }
                        continue;
                    }
                    // A server that was demoted (or an address that now leads to a replica)
                    // will never notify us of a write again.
                    let checked = tokio::time::timeout(
                        pool_settings.connect_timeout,
                        listener_is_writable(&mut listener),
                    ).await;
                    match checked {
                        Ok(Ok(true)) => {}
                        Ok(Ok(false)) => return Err(lost(DatastoreError::NoWritableHost(format!(
                            "{}: the listener's server no longer accepts writes", target.describe()
                        )), trusted)),
                        Ok(Err(source)) => return Err(lost(query_error(source), trusted)),
                        Err(_) => return Err(lost(DatastoreError::Timeout {
                            op: "listener_check",
                            timeout: pool_settings.connect_timeout,
                        }, trusted)),
                    }
                }
                _ = shutdown.cancelled() => return Ok(()),
            }
        }
    }
}

/// What woke the listener besides a notification.
enum Wake {
    /// The main pool has a writer: flush and trust the cache.
    Trust,
    /// Time to check that the listener's server still accepts writes.
    Check,
}

/// Why one listener connection ended.
struct ListenError {
    err: DatastoreError,
    /// Whether it had been listening (the cache was trusted) before it failed.
    was_listening: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(replicas: usize) -> Cached {
        Cached {
            storages: Arc::new(crate::routing::ReplicaSet {
                repository_id: 4242,
                replica_path: "@cluster/repositories/03/15/4242".into(),
                storages: (1..=replicas).map(|n| format!("gitaly-{n}")).collect(),
            }),
            confirmed_at: Instant::now(),
        }
    }

    #[tokio::test]
    async fn the_budget_bounds_the_entries_by_their_weight() {
        let key = || format!("@hashed/03/15/{}.git", "0".repeat(64));
        // A hashed path with three replicas weighs what the benchmark measured per entry.
        let weight = weigh(&key(), &entry(3));
        assert!((590..=640).contains(&weight), "{weight}");
        let cache: moka::future::Cache<Key, Cached> = moka::future::Cache::builder()
            .max_capacity(100 * u64::from(weight))
            .weigher(weigh)
            .build();
        for n in 0..1000 {
            cache
                .insert(format!("@hashed/{n:04}/{}.git", "0".repeat(60)), entry(3))
                .await;
        }
        cache.run_pending_tasks().await;
        assert!(
            cache.weighted_size() <= 100 * u64::from(weight),
            "{}",
            cache.weighted_size()
        );
        assert!(cache.entry_count() <= 100, "{}", cache.entry_count());
    }
}
