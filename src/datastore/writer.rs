//! Which database server accepts writes now, and the pool bound to it.
//!
//! On a Patroni cluster the writer moves: a planned switchover demotes the leader (its
//! PostgreSQL restarts read-only) and promotes a replica; a failover does the same after the
//! leader died; with Consul the one DNS name starts pointing elsewhere. Whatever happens, the
//! router must follow within about a second of the new writer accepting writes, and never
//! need a restart (gitlab#328493: Go Praefect kept using connections to the demoted server).
//!
//! The rule is simple: any failure that may mean "the writer moved" (a broken socket, a
//! refused connection, a timeout, a read-only answer, an administrator or crash shutdown)
//! marks the writer as *lost*. Operations report such failures; a watchdog also asks the
//! writer every [`WATCHDOG_INTERVAL`] whether it still accepts writes, on a connection of its
//! own, so that a stopped, demoted or unreachable server is noticed within about a second
//! even when no operation runs (or when every operation is stuck waiting for a connection:
//! sqlx's pool keeps retrying a refused connection until its acquire timeout).
//!
//! Once lost, a background finder probes every configured server concurrently, every
//! [`PROBE_INTERVAL`], until one accepts writes, and binds a fresh pool to it (host names are
//! resolved again at every new connection: sqlx hands the name to the resolver each time, so
//! a Consul name that now points elsewhere is followed too).
//!
//! While the writer is lost, database operations do not queue up behind timeouts: operations
//! in flight are abandoned, and new ones fail after a short grace ([`LOST_GRACE`], enough for
//! the finder to re-find a writer that merely dropped one connection), all with
//! [`DatastoreError::Unavailable`]. The transitions are logged once each way ("database
//! writer lost", "database writer found ... after Xs"), never per failed query.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::{watch, Notify};

use sqlx::ConnectOptions;

use super::connect::{find_writable, is_writable, lazy_pool, PoolSettings, Target};
use super::DatastoreError;
use crate::metrics;

/// Time between two probe rounds while no writer is known.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(200);
/// Bound on probing one server (connect, authenticate, ask whether it is in recovery). A
/// server that does not answer within this is not the writer we want to wait for.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an operation may wait for the finder after the writer was lost before it fails.
pub const LOST_GRACE: Duration = Duration::from_millis(250);
/// How often the watchdog asks the writer whether it still accepts writes.
pub const WATCHDOG_INTERVAL: Duration = Duration::from_millis(500);
/// Bound on one watchdog check (and on its reconnection).
const WATCHDOG_TIMEOUT: Duration = Duration::from_secs(1);

/// What the router knows about the writer.
#[derive(Clone)]
pub enum WriterState {
    /// Bound to the server that accepted writes at `since`.
    Connected {
        pool: PgPool,
        /// Identifies this pool, so a failure on an already replaced pool is not reported
        /// against its successor.
        generation: u64,
        target: Arc<Target>,
        since: Instant,
    },
    /// No writer known since `since`; the finder is probing.
    Lost { since: Instant, reason: Arc<str> },
}

impl WriterState {
    pub fn is_connected(&self) -> bool {
        matches!(self, WriterState::Connected { .. })
    }
}

/// A summary for readiness checks and status pages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriterStatus {
    /// `host:port` of the writer in use, if one is known.
    pub target: Option<String>,
    /// Why no writer is known, if none is.
    pub lost_reason: Option<String>,
    /// Since when the current state holds.
    pub for_duration: Duration,
}

pub(super) struct Writer {
    targets: Vec<Target>,
    settings: PoolSettings,
    state: watch::Sender<WriterState>,
    wake_finder: Arc<Notify>,
    next_generation: AtomicU64,
    /// Whether this outage's "no server accepts writes yet" line was logged (one per outage).
    logged_probe_failure: Mutex<bool>,
}

impl Writer {
    /// A writer already bound to `target` (found by the caller), with its finder task.
    pub(super) fn start(
        targets: Vec<Target>,
        settings: PoolSettings,
        target: &Target,
    ) -> Arc<Self> {
        let pool = lazy_pool(target, &settings);
        let writer = Arc::new(Writer {
            targets,
            settings,
            state: watch::Sender::new(WriterState::Connected {
                pool,
                generation: 0,
                target: Arc::new(target.clone()),
                since: Instant::now(),
            }),
            wake_finder: Arc::new(Notify::new()),
            next_generation: AtomicU64::new(1),
            logged_probe_failure: Mutex::new(false),
        });
        metrics::DATABASE_WRITER_UP.set(1);
        // The finder holds only a weak reference: it ends when the last Datastore handle is
        // dropped.
        let weak = Arc::downgrade(&writer);
        tokio::spawn(async move {
            let mut watchdog = Watchdog::default();
            loop {
                let Some(writer) = weak.upgrade() else { return };
                let current = match writer.state() {
                    WriterState::Connected {
                        generation, target, ..
                    } => Some((generation, target)),
                    WriterState::Lost { .. } => None,
                };
                match current {
                    Some((generation, target)) => {
                        // Drop our strong reference while we wait, so the writer can go
                        // away. (`notify_one` leaves a permit if it comes before we wait.)
                        let wake = writer.wake_finder.clone();
                        drop(writer);
                        tokio::select! {
                            _ = wake.notified() => continue,
                            _ = tokio::time::sleep(WATCHDOG_INTERVAL) => {}
                        }
                        let Some(writer) = weak.upgrade() else { return };
                        if let Err(reason) = watchdog.check(&target, &writer.settings).await {
                            writer.lost(generation, reason);
                        }
                    }
                    None => {
                        watchdog = Watchdog::default();
                        writer.probe_round().await;
                        drop(writer);
                        tokio::time::sleep(PROBE_INTERVAL).await;
                    }
                }
            }
        });
        writer
    }

    pub(super) fn state(&self) -> WriterState {
        self.state.borrow().clone()
    }

    pub(super) fn subscribe(&self) -> watch::Receiver<WriterState> {
        self.state.subscribe()
    }

    pub(super) fn status(&self) -> WriterStatus {
        match &*self.state.borrow() {
            WriterState::Connected { target, since, .. } => WriterStatus {
                target: Some(target.describe()),
                lost_reason: None,
                for_duration: since.elapsed(),
            },
            WriterState::Lost { since, reason } => WriterStatus {
                target: None,
                lost_reason: Some(reason.to_string()),
                for_duration: since.elapsed(),
            },
        }
    }

    /// Resolves when the pool of `generation` is no longer the writer's.
    pub(super) async fn replaced(&self, generation: u64) {
        let mut rx = self.state.subscribe();
        let _ = rx
            .wait_for(|state| {
                !matches!(state, WriterState::Connected { generation: current, .. } if *current == generation)
            })
            .await;
    }

    /// The pool to run an operation on, or `Unavailable` at once when no writer is known
    /// (after [`LOST_GRACE`] from the loss, so that a single dropped connection is healed
    /// by the finder without failing anyone).
    pub(super) async fn pool(&self) -> Result<(PgPool, u64), DatastoreError> {
        let mut rx = self.state.subscribe();
        loop {
            let since = match &*rx.borrow_and_update() {
                WriterState::Connected {
                    pool, generation, ..
                } => return Ok((pool.clone(), *generation)),
                WriterState::Lost { since, .. } => *since,
            };
            let waited = since.elapsed();
            if waited >= LOST_GRACE {
                return Err(self.unavailable());
            }
            if tokio::time::timeout(LOST_GRACE - waited, rx.changed())
                .await
                .is_err()
            {
                return Err(self.unavailable());
            }
        }
    }

    fn unavailable(&self) -> DatastoreError {
        let reason = match &*self.state.borrow() {
            WriterState::Lost { reason, since } => {
                format!("{reason} ({:.1}s ago)", since.elapsed().as_secs_f64())
            }
            WriterState::Connected { .. } => "writer lost".to_string(),
        };
        DatastoreError::Unavailable(reason)
    }

    /// Reports that an operation on the pool of `generation` failed in a way that may mean
    /// the writer moved. The first report for the current pool starts the finder.
    pub(super) fn lost(&self, generation: u64, reason: String) {
        let mut old_pool = None;
        self.state.send_if_modified(|state| match state {
            WriterState::Connected {
                generation: current,
                target,
                pool,
                ..
            } if *current == generation => {
                old_pool = Some(pool.clone());
                tracing::warn!(
                    target_server = %target.describe(),
                    reason = %reason,
                    "database writer lost; database operations fail fast until a server accepts writes"
                );
                *state = WriterState::Lost {
                    since: Instant::now(),
                    reason: reason.clone().into(),
                };
                true
            }
            _ => false,
        });
        // The pool is taken only when this report marked the writer lost.
        let Some(pool) = old_pool else { return };
        metrics::DATABASE_WRITER_UP.set(0);
        metrics::DATABASE_WRITER_CHANGES
            .with_label_values(&["lost"])
            .inc();
        *self
            .logged_probe_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = false;
        self.wake_finder.notify_one();
        // Its connections point at a server that failed us; close them once the operations
        // still holding one give it back.
        tokio::spawn(async move { pool.close().await });
    }

    /// One probe round over every server ([`find_writable`]); binds to the writer it finds.
    async fn probe_round(&self) {
        let timeout = self.settings.connect_timeout.min(PROBE_TIMEOUT);
        match find_writable(&self.targets, timeout).await {
            Ok(target) => self.bind(&target),
            Err(err) => {
                let mut logged = self
                    .logged_probe_failure
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                if !*logged {
                    *logged = true;
                    tracing::warn!(
                        error = %err,
                        "no database server accepts writes yet; probing every {}ms",
                        PROBE_INTERVAL.as_millis()
                    );
                }
            }
        }
    }

    fn bind(&self, target: &Target) {
        let pool = lazy_pool(target, &self.settings);
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let described = target.describe();
        let previous = self.state.send_replace(WriterState::Connected {
            pool,
            generation,
            target: Arc::new(target.clone()),
            since: Instant::now(),
        });
        if let WriterState::Lost { since, reason } = previous {
            tracing::info!(
                target_server = %described,
                outage_s = since.elapsed().as_secs_f64(),
                reason = %reason,
                "database writer found after {:.2}s",
                since.elapsed().as_secs_f64()
            );
            metrics::DATABASE_WRITER_CHANGES
                .with_label_values(&["found"])
                .inc();
        }
        metrics::DATABASE_WRITER_UP.set(1);
    }

    /// Closes the current pool.
    pub(super) async fn close(&self) {
        if let WriterState::Connected { pool, .. } = self.state() {
            pool.close().await;
        }
    }
}

/// The watchdog's own connection to the writer.
#[derive(Default)]
struct Watchdog {
    conn: Option<sqlx::PgConnection>,
}

impl Watchdog {
    /// Whether `target` still accepts writes: on the kept connection, and if that fails, on a
    /// fresh one (the old one may just have been closed by a pooler or a firewall). The
    /// reason when it does not.
    async fn check(&mut self, target: &Target, settings: &PoolSettings) -> Result<(), String> {
        if let Some(conn) = self.conn.as_mut() {
            match tokio::time::timeout(WATCHDOG_TIMEOUT, is_writable(conn)).await {
                Ok(Ok(true)) => return Ok(()),
                Ok(Ok(false)) => {
                    self.conn = None;
                    return Err(format!(
                        "{}: server no longer accepts writes",
                        target.describe()
                    ));
                }
                // Broken or hung: try a fresh connection before giving up on the server.
                Ok(Err(_)) | Err(_) => self.conn = None,
            }
        }
        let options = target
            .options
            .clone()
            .application_name(&format!("{}-watchdog", settings.application_name));
        let connect = async {
            let mut conn = options.connect().await?;
            let writable = is_writable(&mut conn).await?;
            Ok::<_, sqlx::Error>((conn, writable))
        };
        match tokio::time::timeout(WATCHDOG_TIMEOUT, connect).await {
            Ok(Ok((conn, true))) => {
                self.conn = Some(conn);
                Ok(())
            }
            Ok(Ok((_, false))) => Err(format!(
                "{}: server no longer accepts writes",
                target.describe()
            )),
            Ok(Err(err)) => Err(format!("{}: {err}", target.describe())),
            Err(_) => Err(format!(
                "{}: no answer within {WATCHDOG_TIMEOUT:?}",
                target.describe()
            )),
        }
    }
}
