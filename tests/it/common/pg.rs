//! Test databases with the router's schema, in the router's configuration type.
//!
//! `testkit::pg` runs the servers and copies databases; this module supplies what it cannot
//! know: the router's migrations (a template database made once per migration set) and
//! [`DatabaseConnection`], the type the router's configuration and datastore take.

use std::ops::Deref;
use std::sync::OnceLock;

use praefect::config::DatabaseConnection;
use praefect::datastore::{migrations::known_migrations, Datastore, PoolSettings};
use testkit::pg::Conn;

use testkit::pg::server;

/// The router's configuration for a database the harness describes.
pub fn database_connection(conn: Conn) -> DatabaseConnection {
    DatabaseConnection {
        host: conn.host,
        port: conn.port,
        user: conn.user,
        password: conn.password,
        dbname: conn.dbname,
        sslmode: "disable".into(),
        ..Default::default()
    }
}

/// Applies every migration of the router to the database at `conn`.
fn migrate(conn: Conn) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>> {
    Box::pin(async move {
        let store = Datastore::connect(&database_connection(conn), PoolSettings::default())
            .await
            .expect("connecting to the database to migrate");
        store
            .migrate_up(false, false, |_| {})
            .await
            .expect("migrating the database");
        store.close().await;
    })
}

/// The name of the template database with every migration applied, made on first use (and
/// kept across runs until the migrations change).
fn template() -> &'static str {
    static TEMPLATE: OnceLock<String> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let parts: Vec<String> = known_migrations()
            .iter()
            .flat_map(|m| {
                [
                    m.id.to_string(),
                    m.up.to_string(),
                    m.down.unwrap_or("").to_string(),
                ]
            })
            .collect();
        let name = format!(
            "praefect_template_{}",
            testkit::pg::fingerprint(parts.iter().map(String::as_str))
        );
        server().ensure_template(&name, migrate);
        name
    })
}

/// A database of one test's own, dropped when the value is.
pub struct TestDb(testkit::pg::TestDb);

impl TestDb {
    /// A fresh database with every migration applied.
    pub async fn new() -> TestDb {
        TestDb(testkit::pg::TestDb::new(template()).await)
    }

    /// A fresh database without any migration, for the migration tests.
    pub async fn empty() -> TestDb {
        TestDb(testkit::pg::TestDb::empty().await)
    }

    pub fn connection(&self) -> DatabaseConnection {
        database_connection(self.0.connection())
    }

    pub async fn datastore(&self) -> Datastore {
        Datastore::connect(&self.connection(), PoolSettings::default())
            .await
            .expect("connecting the datastore to the test database")
    }
}

/// The name, server, URL and plain connections of the database.
impl Deref for TestDb {
    type Target = testkit::pg::TestDb;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

/// A PostgreSQL server of one test's own (which it may stop and start), with a migrated
/// database `praefect`.
pub struct OwnServer(testkit::pg::OwnServer);

impl OwnServer {
    pub async fn start() -> OwnServer {
        OwnServer(testkit::pg::OwnServer::start(migrate).await)
    }

    /// The settings of database `praefect`.
    pub fn connection(&self) -> DatabaseConnection {
        database_connection(self.0.connection())
    }
}

/// The port, URLs, stop and start of the server.
impl Deref for OwnServer {
    type Target = testkit::pg::OwnServer;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}
