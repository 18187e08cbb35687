//! The router across processes: `praefect serve` with real gitnodes and a real database.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::gitnode::{GitNode, TOKEN};
use common::pg::TestDb;
use praefect::config::DatabaseConnection;

const BIN: &str = env!("CARGO_BIN_EXE_praefect");

fn write_config(dir: &Path, db: &DatabaseConnection, nodes: &[&GitNode]) -> PathBuf {
    let mut text = format!(
        "listen_addr = \"127.0.0.1:0\"\n[logging]\nformat = \"json\"\n[database]\nhost = \"{}\"\nport = {}\nuser = \"{}\"\ndbname = \"{}\"\nsslmode = \"disable\"\n[[virtual_storage]]\nname = \"default\"\n",
        db.host, db.port, db.user, db.dbname
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

/// A running `praefect serve`, stopped with SIGTERM when dropped.
struct Router {
    child: Child,
    stopped: bool,
}

impl Router {
    fn start(config: &Path) -> Router {
        let mut child = Command::new(BIN)
            .args(["-config", config.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let started = lines
            .by_ref()
            .map_while(Result::ok)
            .any(|line| line.contains("\"msg\":\"praefect started\""));
        assert!(started, "praefect did not start");
        std::thread::spawn(move || for _ in lines {});
        Router {
            child,
            stopped: false,
        }
    }

    fn stop(&mut self) {
        if std::mem::replace(&mut self.stopped, true) {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        self.stop();
    }
}

#[derive(Debug, sqlx::FromRow)]
struct Status {
    praefect_name: String,
    node_name: String,
    /// Seconds since the last attempt and since the node was last seen healthy.
    since_attempt: f64,
    since_seen: Option<f64>,
}

async fn node_status(db: &TestDb) -> Vec<Status> {
    let mut conn = db.raw().await;
    sqlx::query_as(
        "SELECT praefect_name::text, node_name::text,
                extract(epoch FROM now() - last_contact_attempt_at)::float8 AS since_attempt,
                extract(epoch FROM now() - last_seen_active_at)::float8 AS since_seen
         FROM node_status ORDER BY node_name",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap()
}

async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("timed out waiting until {what}");
}

#[tokio::test(flavor = "multi_thread")]
async fn health_rounds_are_recorded_and_follow_nodes_down_and_up() {
    let db = TestDb::new().await;
    let a = GitNode::start("gitaly-1");
    let mut b = GitNode::start("gitaly-2");
    let dir = tempfile::tempdir().unwrap();
    let config_path = write_config(dir.path(), &db.connection(), &[&a, &b]);
    let config = praefect::config::load_file(&config_path).unwrap();
    let name = praefect::health::praefect_name(&config);
    let mut router = Router::start(&config_path);

    // Startup waited for the first round: both rows exist, both nodes seen healthy.
    let rows = node_status(&db).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(
        (rows[0].node_name.as_str(), rows[1].node_name.as_str()),
        ("gitaly-1", "gitaly-2")
    );
    for row in &rows {
        assert_eq!(row.praefect_name, name);
    }
    wait_until("both nodes are seen healthy", || async {
        node_status(&db)
            .await
            .iter()
            .all(|r| r.since_seen.is_some_and(|s| s < 2.0))
    })
    .await;
    let store = db.datastore().await;
    assert_eq!(store.healthy_storages().await.unwrap().len(), 2);

    // gitaly-2 goes down: still probed every second, no longer seen.
    b.kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rows = node_status(&db).await;
    assert!(rows[0].since_seen.unwrap() < 2.0, "{rows:?}");
    assert!(rows[1].since_attempt < 2.0, "{rows:?}");
    assert!(rows[1].since_seen.unwrap() >= 2.0, "{rows:?}");

    // It comes back: recovery is seen too.
    b.restart();
    wait_until("gitaly-2 is seen healthy again", || async {
        node_status(&db).await[1]
            .since_seen
            .is_some_and(|s| s < 2.0)
    })
    .await;

    // A restarted router keeps its name: the same rows are updated, none added.
    router.stop();
    let _router = Router::start(&config_path);
    let rows = node_status(&db).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(rows.iter().all(|r| r.praefect_name == name));
}
