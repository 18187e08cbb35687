//! Real `praefect serve` processes for the end-to-end tests: a configuration writer, a process
//! handle that learns the bound addresses from the JSON log, and a client channel with the
//! router's token and the backchannel handshake.
// Tests read and write the database directly (not through PgBouncer), so the
// datastore's rule about unnamed statements (clippy.toml) does not apply here.
#![allow(clippy::disallowed_methods)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use praefect::config::DatabaseConnection;

use super::gitnode::{Authed, TOKEN};

pub const BIN: &str = env!("CARGO_BIN_EXE_praefect");
pub const ROUTER_TOKEN: &str = "router-secret";

/// A node as a router's configuration names it.
pub struct NodeEntry {
    pub storage: String,
    pub address: String,
}

impl NodeEntry {
    pub fn new(storage: &str, address: &str) -> NodeEntry {
        NodeEntry {
            storage: storage.into(),
            address: address.into(),
        }
    }
}

impl From<&super::gitnode::GitNode> for NodeEntry {
    fn from(node: &super::gitnode::GitNode) -> NodeEntry {
        NodeEntry::new(&node.storage, &node.address)
    }
}

/// Writes a router configuration for the virtual storage "default" with `nodes` (all with the
/// gitnode test token), listening on a free TCP port, with `extra` TOML appended at the top
/// level (before the tables).
pub fn write_config_with(
    dir: &Path,
    db: &DatabaseConnection,
    nodes: &[NodeEntry],
    extra: &str,
) -> PathBuf {
    write_config_on(dir, db, nodes, "127.0.0.1:0", extra)
}

/// A loopback port that was free a moment ago (see `testkit::ports`). Routers that must have
/// distinct instance names (`<hostname>:<listen_addr>`) need distinct configured ports, not
/// port 0.
pub use testkit::ports::free_port;

/// Like [`write_config_with`], listening on `listen_addr`.
pub fn write_config_on(
    dir: &Path,
    db: &DatabaseConnection,
    nodes: &[NodeEntry],
    listen_addr: &str,
    extra: &str,
) -> PathBuf {
    write_config_full(dir, db, None, nodes, listen_addr, extra)
}

/// The connection keys of one `[database]`-like table.
fn connection_keys(db: &DatabaseConnection) -> String {
    format!(
        "host = \"{}\"\nport = \"{}\"\nuser = \"{}\"\npassword = \"{}\"\ndbname = \"{}\"\nsslmode = \"disable\"\n",
        db.host, db.port, db.user, db.password, db.dbname
    )
}

/// Like [`write_config_on`], with `[database.session_pooled]` set to `session` when given.
pub fn write_config_full(
    dir: &Path,
    db: &DatabaseConnection,
    session: Option<&DatabaseConnection>,
    nodes: &[NodeEntry],
    listen_addr: &str,
    extra: &str,
) -> PathBuf {
    let session = session
        .map(|s| format!("[database.session_pooled]\n{}", connection_keys(s)))
        .unwrap_or_default();
    let mut text = format!(
        "listen_addr = \"{listen_addr}\"\n{extra}\n[auth]\ntoken = \"{ROUTER_TOKEN}\"\n[logging]\nformat = \"json\"\n[database]\n{}{session}[[virtual_storage]]\nname = \"default\"\n",
        connection_keys(db)
    );
    for node in nodes {
        text.push_str(&format!(
            "[[virtual_storage.node]]\nstorage = \"{}\"\naddress = \"{}\"\ntoken = \"{TOKEN}\"\n",
            node.storage, node.address
        ));
    }
    let path = dir.join("praefect.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Writes a configuration into `dir` (virtual storage "default" with `nodes`, a free
/// listening port, a Prometheus listener, `extra` at the top level) and starts a router on it.
pub async fn start_router_on(
    dir: &Path,
    db: &DatabaseConnection,
    session: Option<&DatabaseConnection>,
    nodes: &[NodeEntry],
    extra: &str,
) -> Router {
    let config = write_config_full(
        dir,
        db,
        session,
        nodes,
        &format!("127.0.0.1:{}", free_port()),
        &format!("prometheus_listen_addr = \"127.0.0.1:0\"\n{extra}"),
    );
    tokio::task::spawn_blocking(move || Router::start(&config))
        .await
        .unwrap()
}

/// A running `praefect serve`, stopped with SIGTERM when dropped.
pub struct Router {
    pub child: Child,
    stopped: bool,
    /// tcp://host:port of the router's listen_addr.
    pub address: String,
    /// host:port of the Prometheus listener, when configured.
    pub metrics_address: Option<String>,
    /// Every line the router logged after it started.
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// The lines it logged while starting, up to and including `praefect started`.
    pub startup_log: Vec<String>,
}

impl Router {
    pub fn start(config: &Path) -> Router {
        Self::start_with(config, &[], &[])
    }

    /// Like [`Router::start`], with `args` after `-config FILE` (e.g. `serve`).
    pub fn start_with_args(config: &Path, args: &[&str]) -> Router {
        Self::start_with(config, args, &[])
    }

    /// Like [`Router::start`], with extra environment variables (e.g. `GITALY_PID_FILE`).
    pub fn start_with_env(config: &Path, env: &[(&str, &str)]) -> Router {
        Self::start_with(config, &[], env)
    }

    /// Like [`Router::start`], with the process allowed one CPU only (`taskset`, the first
    /// CPU this test may use), as a router deployed on one vCPU is.
    pub fn start_on_one_cpu(config: &Path) -> Router {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let allowed = status
            .lines()
            .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
            .expect("Cpus_allowed_list in /proc/self/status");
        let first = allowed
            .trim()
            .split([',', '-'])
            .next()
            .expect("a CPU in Cpus_allowed_list");
        let mut command = Command::new("taskset");
        command.args(["-c", first, BIN]);
        Self::spawn(command, config, &[], &[])
    }

    fn start_with(config: &Path, args: &[&str], env: &[(&str, &str)]) -> Router {
        Self::spawn(Command::new(BIN), config, args, env)
    }

    /// Starts `command` (the router's binary, or a wrapper that executes it in the same
    /// process) with `-config FILE` and `args`, and reads its log until it has started.
    fn spawn(mut command: Command, config: &Path, args: &[&str], env: &[(&str, &str)]) -> Router {
        let mut child = command
            .args(["-config", config.to_str().unwrap()])
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut address = None;
        let mut metrics_address = None;
        let mut started = false;
        let mut startup_log = Vec::new();
        for line in lines.by_ref().map_while(Result::ok) {
            startup_log.push(line.clone());
            let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if entry["msg"] == "praefect listening" && entry["scheme"] == "tcp" {
                address = entry["address"].as_str().map(|a| format!("tcp://{a}"));
            }
            if entry["msg"] == "prometheus listening" {
                metrics_address = entry["address"].as_str().map(str::to_string);
            }
            if entry["msg"] == "praefect started" {
                started = true;
                break;
            }
        }
        assert!(started, "praefect did not start");
        let log = std::sync::Arc::new(std::sync::Mutex::new(startup_log.clone()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if std::env::var_os("ROUTER_LOG").is_some() {
                    eprintln!("router: {line}");
                }
                sink.lock().unwrap().push(line);
            }
        });
        Router {
            child,
            stopped: false,
            address: address.expect("praefect logged its address"),
            metrics_address,
            log,
            startup_log,
        }
    }

    /// Sends SIGTERM without waiting.
    pub fn terminate(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    /// Waits up to `timeout` for the process to exit and returns its exit status; panics
    /// after, naming `what` (phrased to follow "waiting until").
    pub fn wait_exited(&mut self, timeout: Duration, what: &str) -> std::process::ExitStatus {
        let status =
            super::wait::wait_until_blocking(timeout, what, || self.child.try_wait().unwrap());
        self.stopped = true;
        status
    }

    /// Gives the process up to `timeout` to exit after SIGTERM; whether it did. Not
    /// [`wait_until_blocking`](super::wait::wait_until_blocking): this is a grace period, not
    /// a check, run from `Drop` (a process that ignores SIGTERM is killed, not a panic).
    fn exited_within(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    pub fn stop(&mut self) {
        if self.stopped || matches!(self.child.try_wait(), Ok(Some(_))) {
            self.stopped = true;
            return;
        }
        self.terminate();
        if !self.exited_within(Duration::from_secs(30)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        self.stopped = true;
    }

    /// A client channel with the router's token, over the backchannel handshake.
    pub fn channel(&self) -> Authed {
        use praefect::wire::auth::TokenInterceptor;
        use praefect::wire::backchannel::{dial_lazy, yamux_config, ClientHandler};
        let channel = dial_lazy(
            &self.address,
            yamux_config(0, 256),
            ClientHandler::default(),
        )
        .unwrap();
        tonic::service::interceptor::InterceptedService::new(
            channel,
            TokenInterceptor::new(ROUTER_TOKEN),
        )
    }
}

impl Router {
    /// The log lines (JSON objects) whose `msg` contains `text`.
    pub fn log_lines(&self, text: &str) -> Vec<serde_json::Value> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|entry| entry["msg"].as_str().is_some_and(|m| m.contains(text)))
            .collect()
    }

    /// `GET path` on the Prometheus listener: (status code, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        let address = self
            .metrics_address
            .as_deref()
            .expect("a prometheus listener");
        let mut stream = std::net::TcpStream::connect(address).unwrap();
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes())
            .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (code, body)
    }
}

/// The body of `GET /metrics` from a Prometheus listener at `address` (blocking).
pub fn scrape_metrics(address: &str) -> String {
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: test\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.contains(" 200 "), "{head}");
    body.to_string()
}

/// The value of the sample of metric `name` whose labels include all of `labels`, 0 when
/// absent.
pub fn sample(scrape: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((metric, rest)) => (metric, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let present: Vec<(&str, &str)> = label_text
                .split(',')
                .filter_map(|pair| pair.split_once('='))
                .map(|(k, v)| (k, v.trim_matches('"')))
                .collect();
            labels
                .iter()
                .all(|wanted| present.contains(wanted))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .next()
        .unwrap_or(0.0)
}

impl Drop for Router {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A repository with one commit on `main` on every node of `nodes` at its replica path, all
/// replicas at generation 0 and `nodes[0]` the primary, recorded in the database: the state
/// a fully replicated repository has.
pub async fn seed_repository(
    db: &super::pg::TestDb,
    nodes: &[&super::gitnode::GitNode],
    relative_path: &str,
) -> i64 {
    use super::gitnode::{as_refs, git, ssh_env};
    let store = db.datastore().await;
    let id = store
        .reserve_repository_id("default", relative_path)
        .await
        .unwrap();
    let replica_path = praefect::routing::replica_path(id);
    let work = tempfile::tempdir().unwrap();
    git(
        work.path(),
        &["init", "--quiet", "--initial-branch=main", "."],
        &[],
    );
    std::fs::write(work.path().join("README"), "hello").unwrap();
    git(work.path(), &["add", "."], &[]);
    git(work.path(), &["commit", "--quiet", "-m", "first"], &[]);
    for node in nodes {
        node.create_repository(&replica_path).await;
        let env = ssh_env(&node.address, &node.storage, &replica_path);
        git(
            work.path(),
            &["push", "--quiet", "ssh://gitaly/x", "main"],
            &as_refs(&env),
        );
    }
    store
        .create_repository(
            &praefect::datastore::NewRepository {
                repository_id: id,
                virtual_storage: "default".into(),
                relative_path: relative_path.into(),
                replica_path,
                primary: nodes[0].storage.clone(),
                updated_secondaries: nodes[1..].iter().map(|n| n.storage.clone()).collect(),
                outdated_secondaries: vec![],
                store_assignments: false,
            },
            &[],
        )
        .await
        .unwrap();
    id
}

/// The environment for git over gitnode-ssh through a router, with the router's token.
pub fn router_git_env(router: &Router, relative_path: &str) -> Vec<(String, String)> {
    let mut env = super::gitnode::ssh_env(&router.address, "default", relative_path);
    env.retain(|(k, _)| k != "GITALY_TOKEN");
    env.push(("GITALY_TOKEN".into(), ROUTER_TOKEN.into()));
    env
}

/// A repository of the virtual storage "default".
pub fn virtual_repo(path: &str) -> praefect::wire::proto::Repository {
    praefect::wire::proto::Repository {
        storage_name: "default".into(),
        relative_path: path.into(),
        gl_repository: "project-1".into(),
        ..Default::default()
    }
}

/// A working copy with one commit per `files` entry of `size` bytes of noise.
pub fn work_tree(files: &[&str], size: usize) -> tempfile::TempDir {
    let work = tempfile::tempdir().unwrap();
    super::gitnode::git(
        work.path(),
        &["init", "--quiet", "--initial-branch=main", "."],
        &[],
    );
    for (i, name) in files.iter().enumerate() {
        std::fs::write(
            work.path().join(name),
            super::gitnode::noise(i as u64 + 7, size),
        )
        .unwrap();
        super::gitnode::git(work.path(), &["add", "."], &[]);
        super::gitnode::git(work.path(), &["commit", "--quiet", "-m", name], &[]);
    }
    work
}

pub fn commit_and_push(work: &std::path::Path, router: &Router, path: &str, name: &str) {
    std::fs::write(work.join(name), name).unwrap();
    super::gitnode::git(work, &["add", "."], &[]);
    super::gitnode::git(work, &["commit", "--quiet", "-m", name], &[]);
    let env = router_git_env(router, path);
    super::gitnode::git(
        work,
        &["push", "--quiet", "ssh://gitaly/x", "main"],
        &super::gitnode::as_refs(&env),
    );
}

/// Runs a praefect subcommand against the router configured in `dir`; (exit code, stdout,
/// stderr).
pub async fn praefect_cli(dir: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let config = dir.join("praefect.toml");
    let mut command = std::process::Command::new(BIN);
    command.arg("-config").arg(&config).args(args);
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Waits until every live router has recorded a health round, begun after this call, in
/// which it saw `storage` healthy (`healthy`) or not. A router publishes its round to its
/// routing before it records it in `node_status`, so from then on the routers route by it.
///
/// A round that saw the node down can only have probed it down, and one that saw it up only
/// up (these tests kill and restart nodes, they never flap them), so a round recorded after
/// this call reflects the node's state as of this call. Routers whose last round of any kind
/// is more than 5 s old (stopped ones) are not waited for.
pub async fn wait_for_health_round(db: &super::pg::TestDb, storage: &str, healthy: bool) {
    let mut conn = db.raw().await;
    let since: String = sqlx::query_scalar("SELECT now()::text")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    let state = if healthy { "healthy" } else { "unhealthy" };
    super::wait::wait_until(
        Duration::from_secs(30),
        &format!("every router's health round records {storage} {state}"),
        async || {
            // Both timestamps are the `now()` of one statement: equal when the round saw the
            // node healthy.
            let rows: Vec<(bool, bool)> = sqlx::query_as(
                "SELECT last_contact_attempt_at > $2::timestamptz,
                        last_seen_active_at IS NOT DISTINCT FROM last_contact_attempt_at
                 FROM node_status
                 WHERE node_name = $1
                   AND praefect_name IN (SELECT praefect_name FROM node_status
                                         WHERE last_contact_attempt_at
                                               > $2::timestamptz - interval '5 seconds')",
            )
            .bind(storage)
            .bind(&since)
            .fetch_all(&mut conn)
            .await
            .unwrap();
            !rows.is_empty()
                && rows
                    .iter()
                    .all(|&(recorded, seen)| recorded && seen == healthy)
        },
    )
    .await;
}
