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
//! Every operation goes through [`Datastore::run`], which names it with an operation label
//! (used for the timing metric and in logs), runs it in one transaction (so that it works
//! through PgBouncer in transaction mode, see `sql.rs`), bounds it with a timeout, and
//! reports a read-only or unreachable server to the writer tracker (`writer.rs`), which finds
//! the new writer: that is how we survive a Patroni switchover or failover without a restart
//! (gitlab#328493). While no writer is known, operations fail at once with
//! [`DatastoreError::Unavailable`].

pub mod adopt;
mod assignments;
mod cache;
mod connect;
mod dataloss;
pub mod db_metrics;
mod health;
pub mod migrations;
pub mod outage;
mod queue;
mod reconcile;
mod replicas;
mod repositories;
mod routing;
pub mod sql;
mod status;
mod storage_cleanup;
mod tracking;
mod verification;
mod writer;

pub use cache::{CacheStats, ListenerSettings, StorageCache, CACHE_BYTES};
pub use connect::{
    find_writable, is_connection_error, is_read_only_error, targets, PoolSettings, Target,
    READ_ONLY_SQLSTATES,
};
pub use dataloss::{ReplicaState, RepositoryLookup, RepositoryState};
pub use health::{HealthObservation, HealthyStorage};
pub use migrations::{
    Migration, MigrationEvent, MigrationState, MigrationStatus, MIGRATIONS_TABLE,
};
pub use queue::{ChangeType, JobState, QueuedJob, ReplicationJob, DEQUEUE_SQL};
pub use reconcile::{ScheduledJob, StoragePair, RECONCILIATION_LOCK};
pub use replicas::JobContext;
pub use repositories::{ConsistentStorages, NewRepository, RecordedReplicas, ValidPrimary};
pub use routing::{Primary, UpdateJob};
pub use status::{
    ClusterHealth, NodeObservation, QueueGroup, RepositoryCounts, RepositoryJob,
    COUNTS_SETTINGS_SQL, NODE_OBSERVATIONS_SQL, QUEUE_GROUPS_SQL, REPOSITORY_COUNTS_SQL,
    REPOSITORY_JOBS_LIMIT, REPOSITORY_JOBS_SQL,
};
pub use verification::{
    ReleasedLease, RemovedReplica, ReplicaSelector, VerificationJob, VerificationOutcome,
    VerificationResult,
};
pub use writer::{WriterState, WriterStatus, LOST_GRACE, PROBE_INTERVAL};

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
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
    /// No server accepting writes is known right now; the operation was not attempted.
    #[error("database unavailable: no server accepts writes: {0}")]
    Unavailable(String),
}

impl DatastoreError {
    /// Whether the error came from not reaching a writable server (as opposed to the
    /// statement itself failing): the proxy answers `Unavailable` for these, workers log
    /// them once per outage, and reads may fall back to the cache.
    pub fn is_unavailable(&self) -> bool {
        match self {
            DatastoreError::Query { source, .. } => is_connection_error(source),
            DatastoreError::Connect { .. }
            | DatastoreError::ConnectTimeout { .. }
            | DatastoreError::NoWritableHost(_)
            | DatastoreError::Unavailable(_)
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
    writer: Arc<writer::Writer>,
    settings: PoolSettings,
}

/// One operation's work: given a connection inside a transaction, the statements to run.
/// Boxed so that the borrow of the connection can be named (`BoxFuture<'c, _>`).
pub type Operation<'c, T> = BoxFuture<'c, Result<T, sqlx::Error>>;

pub use sql::Tx;

impl Datastore {
    /// Connects once: finds the writable host among the configured ones and checks it answers.
    pub async fn connect(
        conn: &DatabaseConnection,
        settings: PoolSettings,
    ) -> Result<Self, DatastoreError> {
        let targets = targets(conn)?;
        let writer = find_writable(&targets, settings.connect_timeout).await?;
        tracing::debug!(target = %writer.describe(), "database pool bound to writable host");
        Ok(Datastore {
            inner: Arc::new(Inner {
                writer: writer::Writer::start(targets, settings.clone(), &writer),
                settings,
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

    /// Where the writer is (or why none is known), for readiness and status reports.
    pub fn writer_status(&self) -> WriterStatus {
        self.inner.writer.status()
    }

    /// Whether a server accepting writes is known right now.
    pub fn is_writable(&self) -> bool {
        self.inner.writer.state().is_connected()
    }

    /// Follows the writer's state: a change each time it is lost or found.
    pub fn watch_writer(&self) -> tokio::sync::watch::Receiver<WriterState> {
        self.inner.writer.subscribe()
    }

    /// Runs one named database operation in one transaction, with the query timeout; records
    /// its duration; reports a failure that may mean the writer moved.
    pub async fn run<'env, T, F>(&self, op: &'static str, f: F) -> Result<T, DatastoreError>
    where
        T: Send,
        F: for<'c> FnOnce(&'c mut Tx<'env>) -> Operation<'c, T> + Send,
    {
        self.run_with_timeout(op, self.inner.settings.query_timeout, f)
            .await
    }

    /// [`Datastore::run`] with an explicit timeout.
    pub async fn run_with_timeout<'env, T, F>(
        &self,
        op: &'static str,
        timeout: Duration,
        f: F,
    ) -> Result<T, DatastoreError>
    where
        T: Send,
        F: for<'c> FnOnce(&'c mut Tx<'env>) -> Operation<'c, T> + Send,
    {
        self.run_on_pool(op, timeout, |pool| async move {
            let mut tx = Tx {
                tx: pool.begin().await?,
                env: std::marker::PhantomData,
            };
            let value = f(&mut tx).await?;
            tx.tx.commit().await?;
            Ok(value)
        })
        .await
    }

    /// Runs an operation on the pool itself, outside any transaction: only for the few
    /// operations that need a session of their own (the migration lock).
    pub async fn run_on_pool<T, F, Fut>(
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
        let result = match self.inner.writer.pool().await {
            Err(err) => Err(err),
            Ok((pool, generation)) => match tokio::select! {
                outcome = tokio::time::timeout(timeout, f(pool)) => outcome,
                // Someone found the writer gone: do not wait for this operation's own timeout.
                _ = self.inner.writer.replaced(generation) => {
                    Ok(Err(sqlx::Error::PoolClosed))
                }
            } {
                Ok(Ok(value)) => Ok(value),
                Ok(Err(source)) => {
                    if is_connection_error(&source) {
                        self.inner
                            .writer
                            .lost(generation, format!("{op}: {source}"));
                    }
                    Err(DatastoreError::Query { op, source })
                }
                Err(_) => {
                    self.inner
                        .writer
                        .lost(generation, format!("{op}: timed out after {timeout:?}"));
                    Err(DatastoreError::Timeout { op, timeout })
                }
            },
        };
        metrics::observe_db_query(op, result.is_ok(), started.elapsed());
        if let Err(err) = &result {
            tracing::debug!(db.operation = op, error = %err, "database operation failed");
        }
        result
    }

    /// `SHOW server_version_num`.
    pub async fn server_version_num(&self) -> Result<i64, DatastoreError> {
        let text: String = self
            .run("server_version_num", |conn| {
                Box::pin(sql::query_scalar("SHOW server_version_num").fetch_one(conn))
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
        self.inner.writer.close().await;
    }
}
