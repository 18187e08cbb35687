//! PostgreSQL for the tests: one shared server, a fresh database per test, and servers of a
//! test's own.
//!
//! Without PGHOST/PGPORT, the harness starts one private server from the system's
//! PostgreSQL binaries (initdb into `target/tmp/praefect-test-pg`, a free port on 127.0.0.1;
//! when run as root, as the unprivileged `postgres` user, because PostgreSQL refuses root, and
//! with its data under `/tmp/praefect-test-pg-<hash>` where that user can reach it). The server is
//! shared by every test process of a run and reused by later runs; a file lock makes the
//! start-up safe when processes start at once. Every test gets its own database, copied from a
//! template that the caller's migrations made once, and dropped when the test ends.
// The harness reads and writes the database directly (not through PgBouncer), so the
// datastore's rule about unnamed statements (clippy.toml) does not apply here.
#![allow(clippy::disallowed_methods)]

use std::fs::{self, OpenOptions};
use std::future::Future;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use sha2::{Digest, Sha256};

pub use crate::ports::free_port;
use sqlx::{Connection, Executor, PgConnection};

/// How to reach one database: what a router's `[database]` section holds. The tests turn it
/// into the router's own configuration type; this crate does not know that type.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Conn {
    pub host: String,
    /// A port, or comma-separated ports for multi-host settings (libpq style).
    pub port: String,
    pub user: String,
    pub password: String,
    pub dbname: String,
}

/// Applies a schema to the database at `Conn`; how is the caller's business (the router's
/// tests run its migrations).
pub type Migrate = fn(Conn) -> Pin<Box<dyn Future<Output = ()>>>;

/// Where the shared server lives, and how to reach it.
#[derive(Clone, Debug)]
pub struct PgServer {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    /// Set when the harness manages the server (not PGHOST).
    pub data_dir: Option<PathBuf>,
}

impl PgServer {
    pub fn connection(&self, dbname: &str) -> Conn {
        Conn {
            host: self.host.clone(),
            port: self.port.to_string(),
            user: self.user.clone(),
            password: self.password.clone(),
            dbname: dbname.to_string(),
        }
    }

    pub fn url(&self, dbname: &str) -> String {
        let auth = if self.password.is_empty() {
            self.user.clone()
        } else {
            format!("{}:{}", self.user, self.password)
        };
        format!(
            "postgres://{auth}@{}:{}/{dbname}?sslmode=disable",
            self.host, self.port
        )
    }

    pub async fn admin(&self) -> PgConnection {
        PgConnection::connect(&self.url("postgres"))
            .await
            .expect("connecting to the test server's postgres database")
    }
}

/// Runs `work` to completion on a thread and runtime of its own, so that the harness's set-up
/// can be called from any test, async or not, and outlives the test's runtime.
fn on_own_runtime<T: Send + 'static, F: Future<Output = T>>(
    work: impl FnOnce() -> F + Send + 'static,
) -> T {
    std::thread::spawn(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(work())
    })
    .join()
    .expect("test database setup panicked")
}

/// Holds the harness's lock file (shared by every test process of the checkout) while alive.
fn lock_state_dir(state_dir: &Path) -> fs::File {
    fs::create_dir_all(state_dir).expect("creating the test server directory");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(state_dir.join("lock"))
        .expect("opening the harness lock file");
    lock.lock().expect("locking the harness lock file");
    lock
}

/// The shared server, started (or found) on first use.
pub fn server() -> &'static PgServer {
    static SERVER: OnceLock<PgServer> = OnceLock::new();
    SERVER.get_or_init(|| on_own_runtime(setup))
}

async fn setup() -> PgServer {
    let state_dir = state_dir();
    let lock = lock_state_dir(&state_dir);
    let server = match (std::env::var("PGHOST"), std::env::var("PGPORT")) {
        (Ok(host), Ok(port)) if !host.is_empty() => PgServer {
            host,
            port: port.parse().expect("PGPORT is a number"),
            user: std::env::var("PGUSER").unwrap_or_else(|_| "postgres".into()),
            password: std::env::var("PGPASSWORD").unwrap_or_default(),
            data_dir: None,
        },
        _ => start_private_server(&state_dir).await,
    };
    drop(lock);
    server
}

/// The target directory of the running test (`target/<profile>/deps/<test>` is the test's
/// executable): Cargo's `CARGO_TARGET_TMPDIR` is given to test crates, not to this library.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.ancestors()
        .nth(3)
        .expect("tests run from target/<profile>/deps")
        .to_path_buf()
}

/// Where the private server keeps its data. Normally under `target/tmp`; when the server runs
/// as another user (we are root), under the system temp dir instead, because that user may not
/// be able to enter our checkout (a clone in a 0700 temp dir, say).
fn state_dir() -> PathBuf {
    let in_target = target_dir().join("tmp").join("praefect-test-pg");
    if server_identity().is_none() {
        return in_target;
    }
    let tag = hex::encode(&Sha256::digest(in_target.to_string_lossy().as_bytes())[..6]);
    std::env::temp_dir().join(format!("praefect-test-pg-{tag}"))
}

/// A fingerprint of `parts` (a schema's migrations, say) for naming a template database.
pub fn fingerprint<'a>(parts: impl IntoIterator<Item = &'a str>) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part.len().to_le_bytes());
        hasher.update(part.as_bytes());
    }
    hex::encode(&hasher.finalize()[..8])
}

impl PgServer {
    /// Makes template database `name` with `migrate`, unless a test process made it before
    /// (its name should carry a [`fingerprint`] of the schema, so that a changed schema gets
    /// a new template). Test databases are copied from it ([`TestDb::new`]); callers keep
    /// the answer rather than asking for every test.
    pub fn ensure_template(&'static self, name: &str, migrate: Migrate) {
        let name = name.to_string();
        on_own_runtime(move || async move {
            let lock = lock_state_dir(&state_dir());
            ensure_template(self, &name, migrate).await;
            drop(lock);
        });
    }
}

/// Creates template database `name` with `migrate` unless it exists.
async fn ensure_template(server: &PgServer, name: &str, migrate: Migrate) {
    let mut admin = server.admin().await;
    let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(name)
        .fetch_optional(&mut admin)
        .await
        .expect("looking for the template database");
    if exists.is_none() {
        let building = format!("{name}_building");
        admin
            .execute(format!("DROP DATABASE IF EXISTS \"{building}\"").as_str())
            .await
            .expect("dropping a half-built template");
        admin
            .execute(format!("CREATE DATABASE \"{building}\"").as_str())
            .await
            .expect("creating the template database");
        migrate(server.connection(&building)).await;
        admin
            .execute(format!("ALTER DATABASE \"{building}\" RENAME TO \"{name}\"").as_str())
            .await
            .expect("renaming the template database");
    }
}

pub fn find_pg_binary(name: &str) -> PathBuf {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(entries) = fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<(u32, PathBuf)> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let version = e.file_name().to_str()?.parse::<u32>().ok()?;
                Some((version, e.path().join("bin").join(name)))
            })
            .collect();
        versions.sort();
        candidates.extend(versions.into_iter().rev().map(|(_, p)| p));
    }
    if let Ok(path) = std::env::var("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|dir| dir.join(name)));
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("PostgreSQL's {name} not found: install the postgresql package"))
}

/// The user and group to run PostgreSQL as: ourselves, or `postgres`/`nobody` when root.
pub fn server_identity() -> Option<(u32, u32)> {
    // Our uid, read from /proc to avoid unsafe libc calls.
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let uid: u32 = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if uid != 0 {
        return None;
    }
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    let lookup = |user: &str| {
        passwd.lines().find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.first() == Some(&user) && fields.len() > 3)
                .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
                .flatten()
        })
    };
    Some(
        lookup("postgres")
            .or_else(|| lookup("nobody"))
            .unwrap_or((65534, 65534)),
    )
}

fn run_as(command: &mut Command, identity: Option<(u32, u32)>) -> &mut Command {
    if let Some((uid, gid)) = identity {
        command.gid(gid).uid(uid);
    }
    command
}

async fn is_up(url: &str) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(3), PgConnection::connect(url)).await,
        Ok(Ok(_))
    )
}

/// initdb of a fresh data directory: superuser `postgres`, trust authentication, UTF8, C locale.
fn initdb(cwd: &Path, data_dir: &Path, identity: Option<(u32, u32)>) {
    let output = run_as(&mut Command::new(find_pg_binary("initdb")), identity)
        .current_dir(cwd)
        .arg("-D")
        .arg(data_dir)
        .args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("running initdb");
    assert!(
        output.status.success(),
        "initdb failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `pg_ctl start` of `data_dir` on 127.0.0.1:`port` (sockets in `socket_dir`, log in
/// `dir/server.log`), tuned for tests (no fsync), waiting until it accepts connections.
fn pg_ctl_start(
    dir: &Path,
    data_dir: &Path,
    port: u16,
    socket_dir: &Path,
    identity: Option<(u32, u32)>,
) {
    let options = format!(
        "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
         -c full_page_writes=off -c max_connections=500",
        socket_dir.display()
    );
    let output = run_as(&mut Command::new(find_pg_binary("pg_ctl")), identity)
        .current_dir(dir)
        .arg("-D")
        .arg(data_dir)
        .arg("-l")
        .arg(dir.join("server.log"))
        .args(["-w", "-t", "60", "-o", &options, "start"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .output()
        .expect("running pg_ctl start");
    assert!(
        output.status.success(),
        "pg_ctl start failed: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        fs::read_to_string(dir.join("server.log")).unwrap_or_default()
    );
}

async fn start_private_server(state_dir: &Path) -> PgServer {
    let identity = server_identity();
    let data_dir = state_dir.join("data");
    let socket_dir = state_dir.join("socket");
    let port_file = state_dir.join("port");
    let mut server = PgServer {
        host: "127.0.0.1".to_string(),
        port: 0,
        user: "postgres".to_string(),
        password: String::new(),
        data_dir: Some(data_dir.clone()),
    };
    if let Some(port) = fs::read_to_string(&port_file)
        .ok()
        .and_then(|p| p.trim().parse().ok())
    {
        server.port = port;
        if is_up(&server.url("postgres")).await {
            return server;
        }
    }
    fs::create_dir_all(&socket_dir).expect("creating the socket directory");
    if let Some((uid, gid)) = identity {
        for dir in [state_dir, socket_dir.as_path()] {
            std::os::unix::fs::chown(dir, Some(uid), Some(gid)).expect("chown test server dir");
        }
    }
    if !data_dir.join("PG_VERSION").exists() {
        let _ = fs::remove_dir_all(&data_dir);
        initdb(state_dir, &data_dir, identity);
    }
    server.port = free_port();
    pg_ctl_start(state_dir, &data_dir, server.port, &socket_dir, identity);
    fs::write(&port_file, server.port.to_string()).expect("writing the port file");
    server
}

/// A database of its own for one test, dropped when the value is dropped.
pub struct TestDb {
    pub name: String,
    pub server: &'static PgServer,
}

impl TestDb {
    /// A fresh database copied from `template` (see [`PgServer::ensure_template`]).
    pub async fn new(template: &str) -> TestDb {
        Self::create(server(), Some(template)).await
    }

    /// A fresh, empty database.
    pub async fn empty() -> TestDb {
        Self::create(server(), None).await
    }

    async fn create(server: &'static PgServer, template: Option<&str>) -> TestDb {
        let name = format!("praefect_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = server.admin().await;
        let statement = match template {
            Some(template) => format!("CREATE DATABASE \"{name}\" TEMPLATE \"{template}\""),
            None => format!("CREATE DATABASE \"{name}\""),
        };
        admin
            .execute(statement.as_str())
            .await
            .expect("creating the test database");
        TestDb { name, server }
    }

    pub fn connection(&self) -> Conn {
        self.server.connection(&self.name)
    }

    pub fn url(&self) -> String {
        self.server.url(&self.name)
    }

    /// A plain connection for seeding and inspecting test data.
    pub async fn raw(&self) -> PgConnection {
        PgConnection::connect(&self.url())
            .await
            .expect("connecting to the test database")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let server = self.server;
        on_own_runtime(move || async move {
            let mut admin = server.admin().await;
            let _ = admin
                .execute(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)").as_str())
                .await;
        });
    }
}

/// A PostgreSQL server of one test's own, which the test may stop and start again (the
/// shared server must stay up for everyone else). Removed when dropped.
pub struct OwnServer {
    pub port: u16,
    dir: PathBuf,
    identity: Option<(u32, u32)>,
}

impl OwnServer {
    /// initdb into a fresh directory and start on a free port, with a database `praefect`
    /// that `migrate` has prepared.
    pub async fn start(migrate: Migrate) -> OwnServer {
        let identity = server_identity();
        let dir =
            std::env::temp_dir().join(format!("praefect-own-pg-{}", uuid::Uuid::new_v4().simple()));
        fs::create_dir_all(dir.join("socket")).unwrap();
        if let Some((uid, gid)) = identity {
            for d in [dir.clone(), dir.join("socket")] {
                std::os::unix::fs::chown(&d, Some(uid), Some(gid)).unwrap();
            }
        }
        initdb(&dir, &dir.join("data"), identity);
        let server = OwnServer {
            port: free_port(),
            dir,
            identity,
        };
        server.start_again();
        let mut admin = PgConnection::connect(&server.url("postgres"))
            .await
            .unwrap();
        admin.execute("CREATE DATABASE praefect").await.unwrap();
        migrate(server.connection()).await;
        server
    }

    pub fn url(&self, dbname: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{dbname}?sslmode=disable",
            self.port
        )
    }

    /// The settings of database `praefect`.
    pub fn connection(&self) -> Conn {
        Conn {
            host: "127.0.0.1".into(),
            port: self.port.to_string(),
            user: "postgres".into(),
            dbname: "praefect".into(),
            ..Default::default()
        }
    }

    fn pg_ctl(&self, args: &[&str]) {
        let output = run_as(&mut Command::new(find_pg_binary("pg_ctl")), self.identity)
            .current_dir(&self.dir)
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .output()
            .expect("running pg_ctl");
        assert!(
            output.status.success(),
            "pg_ctl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// (Re)starts the server on its port.
    pub fn start_again(&self) {
        pg_ctl_start(
            &self.dir,
            &self.dir.join("data"),
            self.port,
            &self.dir.join("socket"),
            self.identity,
        );
    }

    /// Stops the server the way an operator or a crash-free restart does (fast shutdown:
    /// sessions are terminated).
    pub fn stop(&self) {
        self.pg_ctl(&["-w", "-t", "60", "-m", "fast", "stop"]);
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let _ = run_as(&mut Command::new(find_pg_binary("pg_ctl")), self.identity)
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "stop"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
