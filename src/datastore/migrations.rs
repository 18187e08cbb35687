//! Schema migrations: SQL files in `migrations/`, embedded in the binary by sqlx, applied by
//! our own runner so that progress is tracked the way Praefect tracks it: table
//! `schema_migrations (id text, applied_at timestamptz)`, ids ordered as strings, and output
//! the operators' runbooks already know.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::migrate::{MigrationType, Migrator};
use sqlx::Connection;

use super::adopt::{self, Lineage};
use super::{sql, Datastore, DatastoreError};

/// Where applied migrations are recorded.
pub const MIGRATIONS_TABLE: &str = "schema_migrations";

/// All migrations, compiled in.
static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// Migrations can take long on big databases; they get their own bound.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Advisory lock key that serialises concurrent `sql-migrate` runs of several routers.
const MIGRATION_LOCK_KEY: i64 = 0x7072_6165_6665_6374; // "praefect"

/// One migration known to this binary.
#[derive(Clone, Debug)]
pub struct Migration {
    /// `<version>_<name>`, e.g. `20261122000100_replication_queue`.
    pub id: String,
    pub up: &'static str,
    pub down: Option<&'static str>,
    /// Runs outside a transaction (for `CREATE INDEX CONCURRENTLY`).
    pub no_tx: bool,
}

/// Every migration of this binary, ordered by id.
pub fn known_migrations() -> Vec<Migration> {
    let mut by_version: BTreeMap<i64, Migration> = BTreeMap::new();
    for m in MIGRATOR.iter() {
        let id = format!("{}_{}", m.version, m.description.replace(' ', "_"));
        let sql: &'static str = match &m.sql {
            std::borrow::Cow::Borrowed(s) => s,
            std::borrow::Cow::Owned(s) => Box::leak(s.clone().into_boxed_str()),
        };
        let entry = by_version.entry(m.version).or_insert_with(|| Migration {
            id,
            up: "",
            down: None,
            no_tx: m.no_tx,
        });
        match m.migration_type {
            MigrationType::ReversibleDown => entry.down = Some(sql),
            _ => {
                entry.up = sql;
                entry.no_tx = m.no_tx;
            }
        }
    }
    let mut all: Vec<Migration> = by_version.into_values().collect();
    all.sort_by(|a, b| a.id.cmp(&b.id));
    all
}

/// The state of one migration id, known or found in the database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MigrationState {
    Applied(DateTime<Utc>),
    NotApplied,
    /// In the database but not known to this binary.
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigrationStatus {
    pub id: String,
    pub state: MigrationState,
}

/// Progress of `migrate_up`, reported as it happens.
#[derive(Clone, Debug)]
pub enum MigrationEvent<'a> {
    /// A Go Praefect database is being adopted (see `adopt.rs`); `version` says which Go
    /// versions leave it that way.
    Adopting {
        version: &'static str,
    },
    Planned(usize),
    Migrating {
        at: DateTime<Utc>,
        migration: &'a Migration,
    },
    Applied {
        at: DateTime<Utc>,
        migration: &'a Migration,
        took: Duration,
    },
}

impl Datastore {
    async fn ensure_migrations_table(&self) -> Result<(), DatastoreError> {
        self.run("ensure_migrations_table", |conn| Box::pin(async move {
            sql::query(
                "CREATE TABLE IF NOT EXISTS schema_migrations (id text PRIMARY KEY, applied_at timestamp with time zone)",
            )
            .execute(&mut *conn)
            .await
            .map(|_| ())
        }))
        .await
    }

    async fn applied_migrations(&self) -> Result<HashMap<String, DateTime<Utc>>, DatastoreError> {
        let rows: Vec<(String, Option<DateTime<Utc>>)> = self
            .run("applied_migrations", |conn| {
                Box::pin(async move {
                    sql::query_as("SELECT id, applied_at FROM schema_migrations")
                        .fetch_all(&mut *conn)
                        .await
                })
            })
            .await?;
        Ok(rows
            .into_iter()
            .map(|(id, at)| (id, at.unwrap_or_default()))
            .collect())
    }

    /// Every known migration and every migration found in the database, ordered by id.
    pub async fn migration_status(&self) -> Result<Vec<MigrationStatus>, DatastoreError> {
        self.ensure_migrations_table().await?;
        let mut applied = self.applied_migrations().await?;
        let mut rows: Vec<MigrationStatus> = known_migrations()
            .into_iter()
            .map(|m| MigrationStatus {
                state: applied
                    .remove(&m.id)
                    .map_or(MigrationState::NotApplied, MigrationState::Applied),
                id: m.id,
            })
            .collect();
        rows.extend(applied.into_iter().map(|(id, at)| MigrationStatus {
            state: if adopt::is_foreign_known(&id) {
                MigrationState::Applied(at)
            } else {
                MigrationState::Unknown
            },
            id,
        }));
        rows.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(rows)
    }

    /// The number of known migrations not yet applied.
    pub async fn pending_migrations(&self) -> Result<usize, DatastoreError> {
        Ok(self
            .migration_status()
            .await?
            .iter()
            .filter(|s| s.state == MigrationState::NotApplied)
            .count())
    }

    /// Fails unless every known migration is applied: `serve` refuses to run on an old schema.
    pub async fn check_migrations_up_to_date(&self) -> Result<(), DatastoreError> {
        match self.pending_migrations().await? {
            0 => Ok(()),
            n => Err(DatastoreError::PendingMigrations(n)),
        }
    }

    /// What `serve` needs to know of the schema: the number of migrations not yet applied.
    /// Those are no reason to refuse to start, as with Go Praefect: in a multi-router install
    /// one router runs `sql-migrate` while the others keep (re)starting. A Go Praefect database
    /// that was not adopted is: its NOTIFY function and views are Go's.
    pub async fn schema_for_serving(&self) -> Result<usize, DatastoreError> {
        let status = self.migration_status().await?;
        let applied: std::collections::HashSet<String> = status
            .iter()
            .filter(|s| matches!(s.state, MigrationState::Applied(_)))
            .map(|s| s.id.clone())
            .collect();
        match adopt::lineage(&applied) {
            Lineage::Ours | Lineage::Adopted => Ok(status
                .iter()
                .filter(|s| s.state == MigrationState::NotApplied)
                .count()),
            Lineage::GoPraefect { version } => Err(DatastoreError::Migration(format!(
                "the database belongs to Go Praefect ({version}) and was not adopted: stop every \
                 Go Praefect and run `praefect -config FILE sql-migrate --adopt-go-praefect` first"
            ))),
            Lineage::Unadoptable(why) => Err(DatastoreError::Migration(why)),
        }
    }

    /// Applies every pending migration in id order and returns how many were applied.
    /// Migrations found in the database but unknown to this binary are an error unless
    /// `ignore_unknown` is set.
    ///
    /// A database of Go Praefect is adopted (see `adopt.rs`) only with `adopt_go_praefect`;
    /// without it, it is an error that says what adopting means. The adoption and the
    /// migrations after it run in one transaction.
    pub async fn migrate_up(
        &self,
        ignore_unknown: bool,
        adopt_go_praefect: bool,
        mut progress: impl FnMut(MigrationEvent<'_>),
    ) -> Result<usize, DatastoreError> {
        self.ensure_migrations_table().await?;
        let known = known_migrations();
        let mut conn = self.lock_for_migrations().await?;
        let applied: Vec<(String,)> = sql::query_as("SELECT id FROM schema_migrations")
            .fetch_all(&mut *conn)
            .await
            .map_err(|source| DatastoreError::Query {
                op: "applied_migrations",
                source,
            })?;
        let applied: std::collections::HashSet<String> = applied.into_iter().map(|r| r.0).collect();
        let adopting = match adopt::lineage(&applied) {
            Lineage::Ours | Lineage::Adopted => None,
            Lineage::Unadoptable(why) => return Err(DatastoreError::Migration(why)),
            Lineage::GoPraefect { version } if !adopt_go_praefect => {
                return Err(DatastoreError::Migration(format!(
                    "this database belongs to Go Praefect ({version}). praefect-rs can adopt it \
                     in place, keeping every repository, replica, assignment and queued job, but \
                     Go Praefect cannot use it afterwards: stop every Go Praefect, back the \
                     database up (pg_dump), then run sql-migrate --adopt-go-praefect"
                )))
            }
            Lineage::GoPraefect { version } => Some(version),
        };
        if !ignore_unknown {
            let mut unknown: Vec<&String> = applied
                .iter()
                .filter(|id| !known.iter().any(|m| &m.id == *id) && !adopt::is_foreign_known(id))
                .collect();
            unknown.sort();
            if let Some(first) = unknown.first() {
                return Err(DatastoreError::Migration(format!(
                    "unknown migration in database: {first}"
                )));
            }
        }
        let pending: Vec<&Migration> = known
            .iter()
            .filter(|m| !applied.contains(&m.id))
            .filter(|m| adopting.is_none() || !adopt::BASE_MIGRATIONS.contains(&m.id.as_str()))
            .collect();
        if let Some(version) = adopting {
            progress(MigrationEvent::Adopting { version });
            progress(MigrationEvent::Planned(pending.len()));
            return adopt_and_migrate(&mut conn, &pending, progress)
                .await
                .map_err(|err| {
                    DatastoreError::Migration(format!("adopting the Go Praefect database: {err}"))
                });
        }
        progress(MigrationEvent::Planned(pending.len()));
        for migration in &pending {
            progress(MigrationEvent::Migrating {
                at: Utc::now(),
                migration,
            });
            let started = Instant::now();
            apply(
                &mut conn,
                migration.up,
                migration.no_tx,
                Record::Applied(&migration.id),
            )
            .await
            .map_err(|err| {
                DatastoreError::Migration(format!("migration {}: {err}", migration.id))
            })?;
            progress(MigrationEvent::Applied {
                at: Utc::now(),
                migration,
                took: started.elapsed(),
            });
        }
        Ok(pending.len())
    }

    /// The ids `migrate_down(max)` would roll back, newest first.
    pub async fn migrations_to_roll_back(&self, max: usize) -> Result<Vec<String>, DatastoreError> {
        let mut applied: Vec<String> = self.applied_migrations().await?.into_keys().collect();
        applied.sort();
        applied.reverse();
        applied.truncate(max);
        Ok(applied)
    }

    /// Rolls back the `max` newest applied migrations, newest first, each with its down
    /// migration. Returns how many were rolled back.
    pub async fn migrate_down(&self, max: usize) -> Result<usize, DatastoreError> {
        self.ensure_migrations_table().await?;
        let known = known_migrations();
        let ids = self.migrations_to_roll_back(max).await?;
        let mut conn = self.lock_for_migrations().await?;
        for id in &ids {
            let migration = known.iter().find(|m| &m.id == id).ok_or_else(|| {
                DatastoreError::Migration(format!(
                    "cannot roll back {id}: it is not a migration of this version of praefect"
                ))
            })?;
            let down = migration.down.ok_or_else(|| {
                DatastoreError::Migration(format!("migration {id} has no down migration"))
            })?;
            apply(&mut conn, down, migration.no_tx, Record::RolledBack(id))
                .await
                .map_err(|err| DatastoreError::Migration(format!("rolling back {id}: {err}")))?;
        }
        Ok(ids.len())
    }

    /// A dedicated connection holding the migration advisory lock.
    async fn lock_for_migrations(
        &self,
    ) -> Result<sqlx::pool::PoolConnection<sqlx::Postgres>, DatastoreError> {
        // A session of its own (not `run`'s transaction): the lock must outlive the statement.
        // Through a transaction pooler it would not; run `sql-migrate` against a direct
        // connection there (README, "PgBouncer").
        self.run_on_pool("migration_lock", MIGRATION_TIMEOUT, |pool| async move {
            let mut conn = pool.acquire().await?;
            // The lock is a session lock: closing the connection when it is dropped releases
            // it on every path, errors included.
            conn.close_on_drop();
            sql::query("SELECT pg_advisory_lock($1)")
                .bind(MIGRATION_LOCK_KEY)
                .execute(&mut *conn)
                .await?;
            Ok(conn)
        })
        .await
    }
}

/// Adopts a Go Praefect database and applies `pending` after it, all in one transaction
/// (migrations that need to run outside one, none so far, run after it).
async fn adopt_and_migrate(
    conn: &mut sqlx::PgConnection,
    pending: &[&Migration],
    mut progress: impl FnMut(MigrationEvent<'_>),
) -> Result<usize, sqlx::Error> {
    let (in_tx, after): (Vec<&Migration>, Vec<&Migration>) = pending.iter().partition(|m| !m.no_tx);
    let mut tx = conn.begin().await?;
    sqlx::raw_sql(adopt::ADOPTION_SQL).execute(&mut *tx).await?;
    for id in adopt::BASE_MIGRATIONS.iter().chain([&adopt::ADOPTION_ID]) {
        Record::Applied(id).write(&mut tx).await?;
    }
    for migration in &in_tx {
        progress(MigrationEvent::Migrating {
            at: Utc::now(),
            migration,
        });
        let started = Instant::now();
        sqlx::raw_sql(migration.up).execute(&mut *tx).await?;
        Record::Applied(&migration.id).write(&mut tx).await?;
        progress(MigrationEvent::Applied {
            at: Utc::now(),
            migration,
            took: started.elapsed(),
        });
    }
    tx.commit().await?;
    for migration in &after {
        progress(MigrationEvent::Migrating {
            at: Utc::now(),
            migration,
        });
        let started = Instant::now();
        apply(conn, migration.up, true, Record::Applied(&migration.id)).await?;
        progress(MigrationEvent::Applied {
            at: Utc::now(),
            migration,
            took: started.elapsed(),
        });
    }
    Ok(pending.len())
}

/// What to note in `schema_migrations` once a migration's text ran.
enum Record<'a> {
    Applied(&'a str),
    RolledBack(&'a str),
}

impl Record<'_> {
    async fn write(&self, conn: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
        let query = match self {
            Record::Applied(id) => {
                sql::query("INSERT INTO schema_migrations (id, applied_at) VALUES ($1, now())")
                    .bind(*id)
            }
            Record::RolledBack(id) => {
                sql::query("DELETE FROM schema_migrations WHERE id = $1").bind(*id)
            }
        };
        query.execute(conn).await.map(|_| ())
    }
}

/// Runs migration text and records it, in one transaction unless the migration asks for none.
async fn apply(
    conn: &mut sqlx::PgConnection,
    sql: &str,
    no_tx: bool,
    record: Record<'_>,
) -> Result<(), sqlx::Error> {
    if no_tx {
        sqlx::raw_sql(sql).execute(&mut *conn).await?;
        record.write(conn).await
    } else {
        let mut tx = conn.begin().await?;
        sqlx::raw_sql(sql).execute(&mut *tx).await?;
        record.write(&mut tx).await?;
        tx.commit().await
    }
}
