//! The plans of exactly the statements a datastore call runs, without copying any SQL: a
//! second datastore connects as a role whose sessions load `auto_explain` with
//! `log_min_duration = 0`, `log_analyze` and `log_buffers`, and `client_min_messages = log`,
//! so PostgreSQL sends every statement's EXPLAIN (ANALYZE, BUFFERS) back to the client as a
//! LOG notice. sqlx reports notices as tracing events (target `sqlx::postgres::notice`), which
//! a tracing layer collects here.
// The role is set up on a direct connection, not through the datastore.
#![allow(clippy::disallowed_methods)]

use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use praefect::config::DatabaseConnection;
use praefect::datastore::{Datastore, PoolSettings};
use sqlx::PgConnection;
use tracing::field::{Field, Visit};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

/// The role the explaining datastore connects as.
const ROLE: &str = "scale_bench_explain";

/// The plans collected so far.
#[derive(Clone, Default)]
pub struct Plans(Arc<Mutex<Vec<String>>>);

impl Plans {
    /// Installs the collecting layer as the global subscriber.
    pub fn install() -> Plans {
        let plans = Plans::default();
        let layer = Collect(plans.clone()).with_filter(
            Targets::new().with_target("sqlx::postgres::notice", tracing::Level::TRACE),
        );
        tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))
            .expect("scale_bench must run alone: another tracing subscriber is installed");
        plans
    }

    /// The plans collected since the last call.
    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

struct Collect(Plans);

impl<S: tracing::Subscriber> Layer<S> for Collect {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let mut message = Message(None);
        event.record(&mut message);
        // The writer tracker's probe runs on any connection; it is not the call's.
        let call = |m: &String| m.contains("plan:") && !m.contains("pg_is_in_recovery()");
        if let Some(text) = message.0.filter(call) {
            self.0 .0.lock().unwrap().push(text);
        }
    }
}

struct Message(Option<String>);

impl Visit for Message {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0 = Some(value.to_string());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        if field.name() == "message" && self.0.is_none() {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

/// Sets up the explaining role for database `dbname` (settings per role and database, so
/// they go when the test database is dropped) and connects a datastore as that role.
pub async fn explaining_datastore(
    raw: &mut PgConnection,
    conn: &DatabaseConnection,
    dbname: &str,
) -> Datastore {
    sqlx::raw_sql(&format!(
        "DO $$ BEGIN
             IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{ROLE}') THEN
                 CREATE ROLE {ROLE} LOGIN SUPERUSER;
             END IF;
         END $$;
         ALTER ROLE {ROLE} IN DATABASE \"{dbname}\" SET session_preload_libraries = 'auto_explain';
         ALTER ROLE {ROLE} IN DATABASE \"{dbname}\" SET auto_explain.log_min_duration = 0;
         ALTER ROLE {ROLE} IN DATABASE \"{dbname}\" SET auto_explain.log_analyze = on;
         ALTER ROLE {ROLE} IN DATABASE \"{dbname}\" SET auto_explain.log_buffers = on;
         ALTER ROLE {ROLE} IN DATABASE \"{dbname}\" SET client_min_messages = log;
         ALTER ROLE {ROLE} IN DATABASE \"{dbname}\" SET log_min_messages = fatal;"
    ))
    .execute(raw)
    .await
    .expect("setting up the explaining role");
    let conn = DatabaseConnection {
        user: ROLE.to_string(),
        password: String::new(),
        ..conn.clone()
    };
    Datastore::connect(
        &conn,
        PoolSettings {
            max_connections: 2,
            query_timeout: std::time::Duration::from_secs(600),
            application_name: "scale_bench_explain".into(),
            ..PoolSettings::default()
        },
    )
    .await
    .expect("connecting the explaining datastore")
}

/// The big tables a request-path statement must reach through an index.
pub const BIG_TABLES: [&str; 4] = [
    "repositories",
    "storage_repositories",
    "repository_assignments",
    "replication_queue",
];

/// The sequential scans of big tables in `plans` (e.g. "Seq Scan on storage_repositories").
pub fn big_table_scans(plans: &[String]) -> Vec<String> {
    let mut found = Vec::new();
    for plan in plans {
        for line in plan.lines() {
            for table in BIG_TABLES {
                let scan = format!("Seq Scan on {table} ");
                let scan_end = format!("Seq Scan on {table}");
                let line = line.trim_end();
                if line.contains(&scan) || line.ends_with(&scan_end) {
                    found.push(line.trim().to_string());
                }
            }
        }
    }
    found
}

/// The server-side duration auto_explain reports at the head of a plan, in ms.
pub fn duration_ms(plan: &str) -> Option<f64> {
    let rest = plan.split("duration: ").nth(1)?;
    rest.split(" ms").next()?.trim().parse().ok()
}
