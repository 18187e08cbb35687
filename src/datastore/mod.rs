//! The one module that speaks SQL.
//!
//! **PostgreSQL is the source of truth** for everything that must survive a router restart or
//! be shared between the routers behind a load balancer: repository ids and replica paths,
//! generations (which replica holds which version), assignments, the per-repository primary,
//! the replication queue and its locks, every router's health observations (`node_status`),
//! and verification state. Several routers write these concurrently, so every change that
//! must be atomic is one statement or one short transaction, and row locks (not process
//! memory) decide races such as two routers electing a primary at once.
//!
//! **Memory only caches** what can be rebuilt at any time: the local healthy set (rebuilt
//! every health round), the up-to-date-storages cache of the read path (rebuilt on a miss,
//! dropped on NOTIFY or when the LISTEN connection is down), and open connections.
//!
//! Every query goes through [`Datastore::run`], which names it with an operation label (used
//! for the timing metric and in logs), bounds it with a timeout, and rebuilds the connection
//! pool when the server turned out to be read-only or gone, which is how we survive a
//! Patroni failover without a restart (gitlab#328493).

mod assignments;
mod cache;
mod connect;
mod health;
pub mod migrations;
mod queue;
mod reconcile;
mod replicas;
mod repositories;
mod routing;
mod verification;

pub use cache::{CacheStats, ListenerSettings, StorageCache};
pub use connect::{
    find_writable, is_connection_error, is_read_only_error, targets, PoolSettings, Target,
    READ_ONLY_SQLSTATES,
};
pub use health::{HealthObservation, HealthyStorage};
pub use migrations::{
    Migration, MigrationEvent, MigrationState, MigrationStatus, MIGRATIONS_TABLE,
};
pub use queue::{
    ChangeType, JobState, QueuedJob, ReplicationJob, DEQUEUE_SQL, REDUNDANT_DELETE_SQL,
};
pub use reconcile::{ScheduledJob, StoragePair, RECONCILIATION_LOCK};
pub use replicas::JobContext;
pub use repositories::{ConsistentStorages, NewRepository, RecordedReplicas, ValidPrimary};
pub use routing::{Primary, UpdateJob};
pub use verification::{
    ReleasedLease, RemovedReplica, ReplicaSelector, VerificationJob, VerificationOutcome,
    VerificationResult,
};

use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use sqlx::PgPool;

use crate::config::DatabaseConnection;
use crate::metrics;

/// The smallest PostgreSQL we run on (`server_version_num`).
pub const MIN_SERVER_VERSION_NUM: i64 = 110_000;

/// What went wrong talking to the database.
#[derive(Debug, thiserror::Error)]
pub enum DatastoreError {
    #[error("invalid database settings: {0}")]
    Settings(String),
    #[error("connecting to {target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("connecting to {target}: timed out after {timeout:?}")]
    ConnectTimeout { target: String, timeout: Duration },
    #[error("no database host accepts writes: {0}")]
    NoWritableHost(String),
    #[error("{op}: {source}")]
    Query {
        op: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("{op}: timed out after {timeout:?}")]
    Timeout { op: &'static str, timeout: Duration },
    #[error("PostgreSQL 11 or later is required, the server reports version number {0}")]
    UnsupportedVersion(i64),
    #[error("{0}")]
    Migration(String),
    #[error("repository already exists")]
    RepositoryExists,
    #[error("repository not found")]
    RepositoryNotFound,
    #[error("write to outdated nodes")]
    WriteToOutdatedNodes,
    /// An error shared by the callers of one coalesced lookup.
    #[error("{0}")]
    Shared(Arc<DatastoreError>),
    #[error("the database has {0} pending migration(s): run `praefect -config FILE sql-migrate`")]
    PendingMigrations(usize),
}

impl DatastoreError {
    /// Whether the error came from not reaching a writable server (as opposed to the
    /// statement itself failing); such errors rebuild the pool.
    pub fn is_unavailable(&self) -> bool {
        match self {
            DatastoreError::Query { source, .. } => is_connection_error(source),
            DatastoreError::Connect { .. }
            | DatastoreError::ConnectTimeout { .. }
            | DatastoreError::NoWritableHost(_)
            | DatastoreError::Timeout { .. } => true,
            DatastoreError::Shared(inner) => inner.is_unavailable(),
            _ => false,
        }
    }
}

/// The handle to the database that every part of the router shares.
#[derive(Clone)]
pub struct Datastore {
    inner: Arc<Inner>,
}

struct Inner {
    targets: Vec<Target>,
    settings: PoolSettings,
    pool: RwLock<PgPool>,
    /// Serialises pool rebuilds and remembers the last one, so a burst of failing queries
    /// triggers one rediscovery, not hundreds.
    last_rebuild: tokio::sync::Mutex<Instant>,
}

/// The least time between two pool rebuilds.
const REBUILD_INTERVAL: Duration = Duration::from_secs(1);

impl Datastore {
    /// Connects once: finds the writable host among the configured ones and checks it answers.
    pub async fn connect(
        conn: &DatabaseConnection,
        settings: PoolSettings,
    ) -> Result<Self, DatastoreError> {
        let targets = targets(conn)?;
        let writer = find_writable(&targets, settings.connect_timeout).await?;
        let pool = connect::lazy_pool(&writer, &settings);
        tracing::debug!(target = %writer.describe(), "database pool bound to writable host");
        Ok(Datastore {
            inner: Arc::new(Inner {
                targets,
                settings,
                pool: RwLock::new(pool),
                last_rebuild: tokio::sync::Mutex::new(Instant::now()),
            }),
        })
    }

    /// Connects, retrying until `wait` has passed: how `serve` waits for a database that is
    /// still starting, with a clear error at the end instead of a hang.
    pub async fn connect_with_retry(
        conn: &DatabaseConnection,
        settings: PoolSettings,
        wait: Duration,
    ) -> Result<Self, DatastoreError> {
        let deadline = Instant::now() + wait;
        let mut delay = Duration::from_millis(200);
        loop {
            match Self::connect(conn, settings.clone()).await {
                Ok(store) => return Ok(store),
                Err(err @ DatastoreError::Settings(_)) => return Err(err),
                Err(err) if Instant::now() + delay >= deadline => return Err(err),
                Err(err) => {
                    tracing::warn!(error = %err, "database not reachable yet, retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// The current pool. Cheap: a pool is a reference-counted handle.
    pub fn pool(&self) -> PgPool {
        self.inner
            .pool
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Runs one named database operation with the query timeout, records its duration, and
    /// rebuilds the pool if the server was read-only or unreachable.
    pub async fn run<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T, DatastoreError>
    where
        F: FnOnce(PgPool) -> Fut,
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        self.run_with_timeout(op, self.inner.settings.query_timeout, f)
            .await
    }

    /// [`Datastore::run`] with an explicit timeout, for the few long operations (migrations).
    pub async fn run_with_timeout<T, F, Fut>(
        &self,
        op: &'static str,
        timeout: Duration,
        f: F,
    ) -> Result<T, DatastoreError>
    where
        F: FnOnce(PgPool) -> Fut,
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        let started = Instant::now();
        let outcome = tokio::time::timeout(timeout, f(self.pool())).await;
        let elapsed = started.elapsed();
        let result = match outcome {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(source)) => {
                if is_connection_error(&source) {
                    self.rebuild_pool().await;
                }
                Err(DatastoreError::Query { op, source })
            }
            Err(_) => Err(DatastoreError::Timeout { op, timeout }),
        };
        metrics::observe_db_query(op, result.is_ok(), elapsed);
        if let Err(err) = &result {
            tracing::debug!(db.operation = op, error = %err, "database operation failed");
        }
        result
    }

    /// Replaces the pool with one bound to the host that accepts writes now. The old pool is
    /// closed in the background once its checked-out connections come back.
    pub async fn rebuild_pool(&self) {
        let mut last = self.inner.last_rebuild.lock().await;
        if last.elapsed() < REBUILD_INTERVAL {
            return;
        }
        *last = Instant::now();
        let target =
            match find_writable(&self.inner.targets, self.inner.settings.connect_timeout).await {
                Ok(target) => target,
                Err(err) => {
                    tracing::warn!(error = %err, "no writable database host found; will retry");
                    // Still drop the old connections: they point at a server that failed us.
                    self.inner.targets[0].clone()
                }
            };
        let new_pool = connect::lazy_pool(&target, &self.inner.settings);
        let old = std::mem::replace(
            &mut *self
                .inner
                .pool
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
            new_pool,
        );
        tracing::info!(target = %target.describe(), "database pool rebuilt");
        tokio::spawn(async move { old.close().await });
    }

    /// `SHOW server_version_num`.
    pub async fn server_version_num(&self) -> Result<i64, DatastoreError> {
        let text: String = self
            .run("server_version_num", |pool| async move {
                sqlx::query_scalar("SHOW server_version_num")
                    .fetch_one(&pool)
                    .await
            })
            .await?;
        text.trim().parse().map_err(|_| {
            DatastoreError::Migration(format!("unexpected server_version_num {text:?}"))
        })
    }

    /// Pings the server and checks it is PostgreSQL 11 or later.
    pub async fn check_server(&self) -> Result<i64, DatastoreError> {
        let version = self.server_version_num().await?;
        if version < MIN_SERVER_VERSION_NUM {
            return Err(DatastoreError::UnsupportedVersion(version));
        }
        Ok(version)
    }

    /// Closes every connection.
    pub async fn close(&self) {
        self.pool().close().await;
    }
}
