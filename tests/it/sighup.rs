//! The router under a service manager: `GITALY_PID_FILE` names the serving process, and SIGHUP
//! hands the listeners over to a new process of the binary, which serves on the same
//! addresses while the old process finishes its calls in flight and exits. A successor that
//! cannot start leaves the old process serving.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::gitnode::{as_refs, binary, git, GitNode};
use common::pg::TestDb;
use common::router::{
    free_port, router_git_env, scrape_metrics, virtual_repo, work_tree, write_config_on, NodeEntry,
    Router, ROUTER_TOKEN,
};
use common::wait::{wait_until, wait_until_blocking};
use praefect::wire::proto::repository_service_client::RepositoryServiceClient;
use praefect::wire::proto::RepositoryExistsRequest;

/// Long enough that no call of these tests is cut: what ends the old process is its calls
/// finishing, never the timeout.
const GRACE: &str = "graceful_stop_timeout = \"2m\"";

/// Starts a router over `node` with a pid file, a Prometheus listener, a Unix socket
/// (`dir/praefect.socket`) and a long graceful stop timeout; its configuration is
/// `dir/praefect.toml`.
async fn start_router(dir: &Path, db: &TestDb, node: &GitNode, pid_file: &Path) -> Router {
    let config = write_config_on(
        dir,
        &db.connection(),
        &[NodeEntry::from(node)],
        &format!("127.0.0.1:{}", free_port()),
        &format!(
            "prometheus_listen_addr = \"127.0.0.1:0\"\nsocket_path = \"{}\"\n{GRACE}",
            dir.join("praefect.socket").display()
        ),
    );
    let pid_file = pid_file.display().to_string();
    tokio::task::spawn_blocking(move || {
        Router::start_with_env(&config, &[("GITALY_PID_FILE", &pid_file)])
    })
    .await
    .unwrap()
}

fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} {pid}: {status:?}");
}

/// The pid the pid file holds, once it holds one.
fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.parse().ok()
}

/// Whether process `pid` is gone: no such process, or a zombie (a successor outlives its
/// parent, the test's child, and whoever adopts it may not reap it at once).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // "pid (comm) state ...": the state follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// A router process that is not the test's child (the successor of a hand-over): stopped
/// with SIGTERM by the test, killed when dropped (a failing test must not leave it running).
struct Successor(u32);

impl Successor {
    fn stop(self) {
        signal(self.0, "TERM");
        wait_until_blocking(
            Duration::from_secs(30),
            "the successor exits after SIGTERM",
            || gone(self.0),
        );
    }
}

impl Drop for Successor {
    fn drop(&mut self) {
        if !gone(self.0) {
            let _ = Command::new("kill")
                .args(["-KILL", &self.0.to_string()])
                .status();
        }
    }
}

/// RepositoryExists through `router`'s listening address, on a new connection.
async fn repository_exists(router: &Router, path: &str) -> bool {
    repository_exists_at(router.channel(), path).await
}

/// RepositoryExists through the router's Unix socket in `dir`, on a new connection.
async fn repository_exists_on_socket(dir: &Path, path: &str) -> bool {
    use praefect::wire::auth::TokenInterceptor;
    use praefect::wire::backchannel::{dial_lazy, yamux_config, ClientHandler};
    let address = format!("unix:{}", dir.join("praefect.socket").display());
    let channel = dial_lazy(&address, yamux_config(0, 256), ClientHandler::default()).unwrap();
    let channel = tonic::service::interceptor::InterceptedService::new(
        channel,
        TokenInterceptor::new(ROUTER_TOKEN),
    );
    repository_exists_at(channel, path).await
}

async fn repository_exists_at(channel: common::gitnode::Authed, path: &str) -> bool {
    RepositoryServiceClient::new(channel)
        .repository_exists(RepositoryExistsRequest {
            repository: Some(virtual_repo(path)),
        })
        .await
        .unwrap()
        .into_inner()
        .exists
}

/// A script for `GIT_SSH_COMMAND` that runs gitnode-ssh but passes only the start of the
/// server's answer on to git (256 reads, at most 1 MiB), then holds the rest (creating
/// `held`) until the file `open` exists: the clone stays in flight, mid-transfer, for as long
/// as the test needs, however fast the machine. `dd` writes each read at once (the ref
/// advertisement must reach git before the pack is sent) and reads no more than it writes,
/// so nothing is lost.
fn gated_ssh(dir: &Path) -> PathBuf {
    let script = dir.join("gated-ssh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n\"{ssh}\" \"$@\" | {{\n  dd bs=4096 count=256 status=none\n  : > \"{held}\"\n  while [ ! -e \"{open}\" ]; do sleep 0.05; done\n  exec cat\n}}\n",
            ssh = binary("gitnode-ssh").display(),
            held = dir.join("held").display(),
            open = dir.join("open").display(),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    script
}

/// Creates `path` through `router` and pushes one commit per `files` entry of `size` bytes of
/// noise; the commit pushed.
async fn push_repository(router: &Router, path: &str, files: &[&str], size: usize) -> String {
    common::cluster::create(router, path).await;
    let work = work_tree(files, size);
    git(
        work.path(),
        &["push", "--quiet", "ssh://gitaly/x", "main"],
        &as_refs(&router_git_env(router, path)),
    );
    git(work.path(), &["rev-parse", "main"], &[])
}

/// A `git clone` through a router, held by [`gated_ssh`] until [`HeldClone::finish`].
struct HeldClone {
    child: Child,
    gate: tempfile::TempDir,
    target: PathBuf,
}

impl HeldClone {
    /// Starts `git clone` of `path` through `router` into `dir/clone` and waits until the
    /// gate holds it, mid-transfer.
    async fn start(router: &Router, path: &str, dir: &Path) -> HeldClone {
        let gate = tempfile::tempdir().unwrap();
        let ssh = gated_ssh(gate.path());
        let target = dir.join("clone");
        let mut env = router_git_env(router, path);
        env.retain(|(k, _)| k != "GIT_SSH_COMMAND");
        let mut child = Command::new("git")
            .args(["clone", "--quiet", "--no-checkout", "ssh://gitaly/x"])
            .arg(&target)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("GIT_SSH_COMMAND", &ssh)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_until(
            Duration::from_secs(60),
            "the clone has received the start of the pack",
            async || {
                if let Some(status) = child.try_wait().unwrap() {
                    let mut stderr = String::new();
                    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr)
                        .unwrap();
                    panic!("the clone ended before the gate held it: {status:?}: {stderr}");
                }
                gate.path().join("held").exists()
            },
        )
        .await;
        HeldClone {
            child,
            gate,
            target,
        }
    }

    fn is_held(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Opens the gate and checks that the clone completes with `head`, intact.
    async fn finish(self, head: &str) {
        let HeldClone {
            child,
            gate,
            target,
        } = self;
        std::fs::write(gate.path().join("open"), "").unwrap();
        let output = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
            .await
            .unwrap();
        assert!(
            output.status.success(),
            "the clone completes: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(git(&target, &["rev-parse", "HEAD"], &[]), head);
        git(&target, &["fsck", "--no-progress"], &[]);
    }
}

/// Sends SIGHUP to the router `old_pid` and waits until it says its successor serves; the
/// successor, which the pid file names.
async fn hand_over(router: &Router, old_pid: u32, pid_file: &Path) -> Successor {
    signal(old_pid, "HUP");
    let handed_over = wait_until(
        Duration::from_secs(90),
        "the old router says its successor serves",
        async || router.log_lines("the successor serves").pop(),
    )
    .await;
    let new_pid = read_pid(pid_file).expect("a pid in the pid file");
    assert_ne!(new_pid, old_pid, "the pid file names the successor");
    assert_eq!(handed_over["successor_pid"], new_pid);
    assert!(!gone(new_pid), "the successor runs");
    Successor(new_pid)
}

/// Waits until the old router `router` has exited, cleanly; the router, for its log.
async fn old_router_exits(mut router: Router, what: &'static str) -> Router {
    let (status, router) = tokio::task::spawn_blocking(move || {
        let status = router.wait_exited(Duration::from_secs(60), what);
        (status, router)
    })
    .await
    .unwrap();
    assert!(status.success(), "{status:?}");
    router
}

#[tokio::test(flavor = "multi_thread")]
async fn the_pid_file_names_the_router_once_it_serves() {
    let db = TestDb::new().await;
    let node = GitNode::start("gitaly-1");
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("praefect.pid");
    let router = start_router(dir.path(), &db, &node, &pid_file).await;
    let pid = wait_until(
        Duration::from_secs(30),
        "the router writes its pid file",
        async || read_pid(&pid_file),
    )
    .await;
    assert_eq!(pid, router.child.id());
    // Written whole (renamed into place): nothing is left beside it.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains("pid"))
        .collect();
    assert_eq!(names, ["praefect.pid"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_hands_over_to_a_new_process_without_cutting_a_clone() {
    let started = Instant::now();
    let db = TestDb::new().await;
    let node = GitNode::start("gitaly-1");
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("praefect.pid");
    let mut router = start_router(dir.path(), &db, &node, &pid_file).await;
    let old_pid = router.child.id();
    wait_until(
        Duration::from_secs(30),
        "the router writes its pid file",
        async || read_pid(&pid_file) == Some(old_pid),
    )
    .await;

    // A clone of a large repository through the router, held mid-transfer: in flight on the
    // old process.
    let path = "group/large.git";
    let head = push_repository(
        &router,
        path,
        &["big-1", "big-2", "big-3", "big-4"],
        5_000_000,
    )
    .await;
    let mut clone = HeldClone::start(&router, path, dir.path()).await;

    let successor = hand_over(&router, old_pid, &pid_file).await;
    // The successor serves on the sockets it inherited (binding the same ports anew would
    // fail while the old process holds them).
    let inherited: Vec<String> = router
        .log_lines("listening")
        .iter()
        .filter(|entry| entry["inherited"] == true)
        .filter_map(|entry| entry["scheme"].as_str().map(str::to_string))
        .collect();
    assert_eq!(inherited, ["http", "tcp", "unix"], "inherited listeners");

    // A new call right after the hand-over, on the same address, succeeds.
    assert!(repository_exists(&router, path).await);
    // The old process is still there: its clone is held, and it waits for it.
    assert!(
        router.child.try_wait().unwrap().is_none(),
        "the old router waits for its clone in flight"
    );
    assert!(clone.is_held(), "the clone is held until the gate opens");

    // The clone finishes through the old process, complete; then the old process exits.
    clone.finish(&head).await;
    let router = old_router_exits(router, "the old router exits once its clone finished").await;

    // The successor alone serves gRPC (TCP and the same Unix socket file) and Prometheus on
    // the same addresses, and the pid file still names it.
    assert!(repository_exists(&router, path).await);
    assert!(repository_exists_on_socket(dir.path(), path).await);
    let metrics_address = router.metrics_address.clone().unwrap();
    tokio::task::spawn_blocking(move || scrape_metrics(&metrics_address))
        .await
        .unwrap();
    assert_eq!(read_pid(&pid_file), Some(successor.0));
    assert!(!gone(successor.0));
    tokio::task::spawn_blocking(move || successor.stop())
        .await
        .unwrap();
    eprintln!("sighup hand-over test took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_successor_that_cannot_start_leaves_the_router_serving() {
    let db = TestDb::new().await;
    let node = GitNode::start("gitaly-1");
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("praefect.pid");
    let mut router = start_router(dir.path(), &db, &node, &pid_file).await;
    let pid = router.child.id();
    wait_until(
        Duration::from_secs(30),
        "the router writes its pid file",
        async || read_pid(&pid_file) == Some(pid),
    )
    .await;
    let path = "group/kept.git";
    common::cluster::create(&router, path).await;

    // The successor reads the configuration anew, and this one does not load.
    let config = dir.path().join("praefect.toml");
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{good}\nnot toml at all")).unwrap();
    signal(pid, "HUP");
    let failed = wait_until(
        Duration::from_secs(60),
        "the router logs the failed hand-over",
        async || router.log_lines("hand-over failed").pop(),
    )
    .await;
    assert!(
        failed["error"]
            .as_str()
            .is_some_and(|e| e.contains("exited before it was ready")),
        "{failed}"
    );
    assert!(router.child.try_wait().unwrap().is_none(), "still running");
    assert!(repository_exists(&router, path).await);
    assert_eq!(read_pid(&pid_file), Some(pid));

    // A later SIGHUP, with the configuration fixed, hands over.
    std::fs::write(&config, good).unwrap();
    signal(pid, "HUP");
    wait_until(
        Duration::from_secs(90),
        "the router says its successor serves",
        async || !router.log_lines("the successor serves").is_empty(),
    )
    .await;
    let successor = Successor(read_pid(&pid_file).unwrap());
    assert_ne!(successor.0, pid);
    let (status, router) = tokio::task::spawn_blocking(move || {
        let status = router.wait_exited(Duration::from_secs(60), "the old router exits");
        (status, router)
    })
    .await
    .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(repository_exists(&router, path).await);
    tokio::task::spawn_blocking(move || successor.stop())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_hand_over_kills_the_new_process() {
    let db = TestDb::new().await;
    let node = GitNode::start("gitaly-1");
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("praefect.pid");
    let mut router = start_router(dir.path(), &db, &node, &pid_file).await;
    let pid = router.child.id();

    // The successor's database is a port nothing listens on: it waits 30 s for it, starting.
    let config = dir.path().join("praefect.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let port = format!("port = \"{}\"", db.connection().port);
    assert!(text.contains(&port), "{text}");
    std::fs::write(
        &config,
        text.replacen(&port, &format!("port = \"{}\"", free_port()), 1),
    )
    .unwrap();
    signal(pid, "HUP");
    let started = wait_until(
        Duration::from_secs(30),
        "the router starts its successor",
        async || router.log_lines("successor started").pop(),
    )
    .await;
    let successor = Successor(u32::try_from(started["successor_pid"].as_u64().unwrap()).unwrap());
    assert!(!gone(successor.0), "the successor is starting");

    signal(pid, "TERM");
    let (status, router) = tokio::task::spawn_blocking(move || {
        let status = router.wait_exited(Duration::from_secs(30), "the router exits");
        (status, router)
    })
    .await
    .unwrap();
    assert!(status.success(), "{status:?}");
    // Killed with the router, not given up on after its database wait.
    wait_until(
        Duration::from_secs(15),
        "the successor is gone",
        async || gone(successor.0),
    )
    .await;
    assert!(router.log_lines("hand-over failed").is_empty());
    assert_eq!(router.log_lines("hand-over abandoned").len(), 1);
    assert_eq!(read_pid(&pid_file), Some(pid));
}
