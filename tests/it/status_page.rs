//! The status page against a real cluster (PostgreSQL, three gitnodes, a router), looked at
//! in headless Chromium: a stopped node shows unhealthy, the queue building for it shows
//! with its depth, the summary says something is wrong; `/status.json` agrees with the
//! database; the repository view shows a repository's replicas and queued jobs and escapes
//! what it shows; a database that is down gives a page that says so.
//!
//! Chromium (Debian `chromium`) runs as a process: `--dump-dom` for the DOM after load,
//! `--screenshot` for a picture. Without it the tests are skipped, unless
//! `PRAEFECT_REQUIRE_HA_TESTS` is set (CI, `.ci/run`), where they fail. Set
//! `STATUS_PAGE_SCREENSHOT=FILE.png` to keep the screenshots (FILE.png, FILE.phone.png; README:
//! docs/status-page.png).
// Tests read the database directly (not through PgBouncer), so the datastore's rule about
// unnamed statements (clippy.toml) does not apply here.
#![allow(clippy::disallowed_methods)]

use crate::common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::cluster::{clone_replica, create, replica_path, start_router};
use common::gitnode::GitNode;
use common::pg::{OwnServer, TestDb};
use common::router::{
    commit_and_push, seed_repository, start_router_on, wait_for_health_round, NodeEntry,
};
use common::wait::wait_until;

/// Chromium's binary, if installed.
fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|dir| dir.join(name))
                    .find(|candidate| candidate.is_file())
            })
        })
}

/// Chromium, or None when the test may be skipped without it.
fn required_chromium() -> Option<PathBuf> {
    let found = chromium();
    if found.is_none() {
        assert!(
            std::env::var_os("PRAEFECT_REQUIRE_HA_TESTS").is_none(),
            "chromium is not installed but PRAEFECT_REQUIRE_HA_TESTS is set"
        );
        eprintln!("skipping: chromium is not installed (apt-get install chromium)");
    }
    found
}

/// Runs headless Chromium with `args` then `url`; its standard output.
async fn run_chromium(binary: &Path, args: &[String], url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut command = tokio::process::Command::new(binary);
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(90), command.output())
        .await
        .expect("chromium finished within 90 s")
        .expect("chromium ran");
    assert!(
        output.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The DOM of `url` once loaded, serialized.
async fn dump_dom(binary: &Path, url: &str) -> String {
    run_chromium(binary, &["--dump-dom".to_string()], url).await
}

/// A screenshot of `url` at `width`x`height` into `file`.
async fn screenshot(binary: &Path, url: &str, file: &Path, width: u32, height: u32) {
    run_chromium(
        binary,
        &[
            format!("--screenshot={}", file.display()),
            format!("--window-size={width},{height}"),
        ],
        url,
    )
    .await;
    let size = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    assert!(size > 1000, "a screenshot was written ({size} bytes)");
}

/// The opening tag of the first element whose opening tag contains every one of `parts`.
fn element<'a>(dom: &'a str, parts: &[&str]) -> Option<&'a str> {
    let mut rest = dom;
    while let Some(start) = rest.find('<') {
        let tail = &rest[start..];
        let end = tail.find('>').map_or(tail.len(), |e| e + 1);
        let tag = &tail[..end];
        if parts.iter().all(|p| tag.contains(p)) {
            return Some(tag);
        }
        rest = &tail[end..];
    }
    None
}

/// The value of attribute `name` in an opening tag.
fn attribute<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let key = format!(" {name}=\"");
    let start = tag.find(&key)? + key.len();
    let end = tag[start..].find('"')?;
    Some(&tag[start..start + end])
}

async fn queued_for(db: &TestDb, target: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM replication_queue WHERE job ->> 'target_node_storage' = $1",
    )
    .bind(target)
    .fetch_one(&mut db.raw().await)
    .await
    .unwrap()
}

/// The repository counts, computed here the simple way (every storage is assigned: the
/// test's repositories have no explicit assignments).
async fn counts_from_database(db: &TestDb) -> (i64, i64, i64) {
    let mut raw = db.raw().await;
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM repositories")
        .fetch_one(&mut raw)
        .await
        .unwrap();
    let unavailable: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM repositories AS r WHERE NOT EXISTS
             (SELECT 1 FROM valid_primaries AS v WHERE v.repository_id = r.repository_id)",
    )
    .fetch_one(&mut raw)
    .await
    .unwrap();
    let outdated: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM repositories AS r
         WHERE EXISTS (SELECT 1 FROM valid_primaries AS v WHERE v.repository_id = r.repository_id)
           AND (SELECT count(*) FROM storage_repositories AS s
                WHERE s.repository_id = r.repository_id AND s.generation = r.generation) < 3",
    )
    .fetch_one(&mut raw)
    .await
    .unwrap();
    (total, outdated, unavailable)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_page_shows_a_stopped_node_and_the_queue_building_for_it() {
    let Some(chromium) = required_chromium() else {
        return;
    };
    let db = TestDb::new().await;
    let mut nodes = [
        GitNode::start("gitaly-1"),
        GitNode::start("gitaly-2"),
        GitNode::start("gitaly-3"),
    ];
    let pushed = ["group/pushed-1.git", "group/pushed-2.git"];
    for path in pushed {
        seed_repository(&db, &[&nodes[0], &nodes[1], &nodes[2]], path).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let other_dir = tempfile::tempdir().unwrap();
    let (router, other) = {
        let refs: Vec<&GitNode> = nodes.iter().collect();
        (
            start_router(&db, dir.path(), &refs, "").await,
            start_router(&db, other_dir.path(), &refs, "").await,
        )
    };
    // Repositories created through the router, one with markup in its path.
    let odd = "group/<b>odd</b> & \"quoted\".git";
    for path in ["group/created-1.git", "group/created-2.git", odd] {
        create(&router, path).await;
    }
    let base = format!("http://{}", router.metrics_address.clone().unwrap());

    // All is well at first.
    wait_until(
        Duration::from_secs(60),
        "the status says all is well",
        async || {
            let (_, body) = router.http_get("/status.json");
            let ok = body.contains("\"ok\": true");
            if !ok {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            ok.then_some(()).ok_or(body)
        },
    )
    .await;
    let dom = dump_dom(&chromium, &format!("{base}/")).await;
    assert!(
        element(&dom, &["id=\"summary\"", "data-state=\"ok\""]).is_some(),
        "{dom}"
    );

    nodes[2].kill();
    wait_for_health_round(&db, "gitaly-3", false).await;
    for path in pushed {
        let work = clone_replica(&nodes[0], &replica_path(&db, path).await);
        commit_and_push(work.path(), &router, path, "while gitaly-3 is away");
    }
    wait_until(
        Duration::from_secs(10),
        "jobs for gitaly-3 are queued",
        async || queued_for(&db, "gitaly-3").await >= 2,
    )
    .await;
    // After the repository counts' lifetime, a view starts a count in the background and
    // shows the last one meanwhile: a later view shows the new count.
    tokio::time::sleep(praefect::status::COUNTS_TTL).await;
    wait_until(
        Duration::from_secs(60),
        "the repository counts show the outdated replicas",
        async || {
            let (_, body) = router.http_get("/status.json");
            let status: serde_json::Value =
                serde_json::from_str(&body).map_err(|e| e.to_string())?;
            let outdated = status["virtual_storages"][0]["repositories"]["outdated"]
                .as_i64()
                .unwrap_or(0);
            if outdated < 2 {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            (outdated >= 2).then_some(()).ok_or(body)
        },
    )
    .await;
    // The page itself is collected every 5 s: the next one has the new counts.
    tokio::time::sleep(praefect::status::STATUS_TTL).await;

    let url = format!("{base}/");
    let dom = dump_dom(&chromium, &url).await;
    let summary = element(&dom, &["id=\"summary\""]).expect("a summary line");
    assert_eq!(attribute(summary, "data-state"), Some("problem"), "{dom}");
    assert!(dom.contains("Something is wrong"), "{dom}");
    let stopped = element(&dom, &["class=\"node\"", "data-storage=\"gitaly-3\""]).unwrap();
    assert_eq!(
        attribute(stopped, "data-healthy"),
        Some("false"),
        "{stopped}"
    );
    assert_eq!(attribute(stopped, "data-healthy-here"), Some("false"));
    assert_eq!(attribute(stopped, "data-quorum-healthy"), Some("false"));
    // The other router's view is shown too.
    let other_name: String = sqlx::query_scalar(
        "SELECT praefect_name FROM node_status WHERE praefect_name LIKE $1 LIMIT 1",
    )
    .bind(format!("%{}", other.address.trim_start_matches("tcp://")))
    .fetch_one(&mut db.raw().await)
    .await
    .unwrap();
    assert!(
        dom.contains(&format!("data-router=\"{other_name}\"")),
        "{other_name}: {dom}"
    );
    for storage in ["gitaly-1", "gitaly-2"] {
        let node = element(
            &dom,
            &["class=\"node\"", &format!("data-storage=\"{storage}\"")],
        )
        .unwrap();
        assert_eq!(attribute(node, "data-healthy"), Some("true"), "{node}");
    }
    let queue = element(
        &dom,
        &["class=\"queue-target\"", "data-target=\"gitaly-3\""],
    )
    .expect("the queue for gitaly-3");
    let depth: i64 = attribute(queue, "data-total").unwrap().parse().unwrap();
    assert!(depth >= 2, "{queue}");
    // What to do about it is said.
    for kind in ["node-unhealthy", "outdated-replicas"] {
        assert!(
            element(&dom, &["class=\"problem", &format!("data-kind=\"{kind}\"")]).is_some(),
            "no {kind} problem: {dom}"
        );
    }
    assert!(dom.contains("dial-nodes"), "{dom}");

    // Screenshots, wide and phone-sized.
    let shots = tempfile::tempdir().unwrap();
    let wide = shots.path().join("wide.png");
    screenshot(&chromium, &url, &wide, 1400, 1800).await;
    let phone = shots.path().join("phone.png");
    screenshot(&chromium, &url, &phone, 390, 1600).await;
    if let Some(keep) = std::env::var_os("STATUS_PAGE_SCREENSHOT") {
        let keep = PathBuf::from(keep);
        std::fs::copy(&wide, &keep).unwrap();
        std::fs::copy(&phone, keep.with_extension("phone.png")).unwrap();
    }

    // The JSON twin agrees with the database.
    let (code, body) = router.http_get("/status.json");
    assert_eq!(code, 200, "{body}");
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["summary"]["ok"], false);
    let vs = &status["virtual_storages"][0];
    assert_eq!(vs["name"], "default");
    let node = vs["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["storage"] == "gitaly-3")
        .unwrap();
    assert_eq!(node["healthy_here"], false);
    assert_eq!(node["quorum_healthy"], false);
    let seen_by = node["seen_by"].as_array().unwrap();
    let mut names: Vec<&str> = seen_by
        .iter()
        .map(|v| v["praefect_name"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    let recorded: Vec<String> = sqlx::query_scalar(
        "SELECT praefect_name FROM node_status WHERE node_name = 'gitaly-3' ORDER BY 1",
    )
    .fetch_all(&mut db.raw().await)
    .await
    .unwrap();
    assert_eq!(names, recorded, "both routers' views: {node}");
    assert!(seen_by.iter().all(|v| v["healthy"] == false), "{node}");
    assert_eq!(
        seen_by.iter().filter(|v| v["this_router"] == true).count(),
        1
    );
    assert_eq!(vs["active_routers"], 2);
    let healthy_node = vs["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["storage"] == "gitaly-1")
        .unwrap();
    assert!(healthy_node["disk"]["available_bytes"].as_i64().unwrap() > 0);
    let json_depth = vs["queue"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["target"] == "gitaly-3")
        .unwrap()["total"]
        .as_i64()
        .unwrap();
    assert_eq!(json_depth, queued_for(&db, "gitaly-3").await);
    let (total, outdated, unavailable) = counts_from_database(&db).await;
    let repositories = &vs["repositories"];
    assert_eq!(repositories["repositories"], total);
    assert_eq!(total, 5);
    assert_eq!(repositories["outdated"], outdated);
    assert!(
        outdated >= 2,
        "the pushed repositories are outdated on gitaly-3"
    );
    assert_eq!(repositories["unavailable"], unavailable);
    assert_eq!(repositories["read_only"], 0);
    assert_eq!(
        repositories["healthy"].as_i64().unwrap(),
        total - outdated - unavailable
    );
    assert_eq!(status["router"]["listen_connected"], true);
    assert!(status["router"]["database_writer"].is_string());

    // The repository view: replicas, the queued job, and markup shown as text.
    let dom = dump_dom(
        &chromium,
        &format!("{base}/repository?virtual_storage=default&relative_path=group%2Fpushed-1.git"),
    )
    .await;
    for storage in ["gitaly-1", "gitaly-2", "gitaly-3"] {
        assert!(
            element(
                &dom,
                &["class=\"replica\"", &format!("data-storage=\"{storage}\"")]
            )
            .is_some(),
            "{dom}"
        );
    }
    assert!(
        element(&dom, &["class=\"job\"", "data-target=\"gitaly-3\""]).is_some(),
        "{dom}"
    );
    assert!(dom.contains("behind by 1 change"), "{dom}");
    let id: i64 =
        sqlx::query_scalar("SELECT repository_id FROM repositories WHERE relative_path = $1")
            .bind(odd)
            .fetch_one(&mut db.raw().await)
            .await
            .unwrap();
    let dom = dump_dom(&chromium, &format!("{base}/repository?repository_id={id}")).await;
    assert!(
        !dom.contains("<b>odd</b>"),
        "markup from the database is escaped: {dom}"
    );
    assert!(
        dom.contains("&lt;b&gt;odd&lt;/b&gt; &amp; \"quoted\".git"),
        "{dom}"
    );
    let (code, body) = router.http_get(&format!("/repository.json?repository_id={id}"));
    assert_eq!(code, 200, "{body}");
    let view: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(view["relative_path"], odd);
    let (code, _) = router.http_get("/repository?virtual_storage=default&relative_path=nope.git");
    assert_eq!(code, 404);
    let (code, _) = router.http_get("/repository");
    assert_eq!(code, 400);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_that_is_down_gives_a_page_that_says_so() {
    let pg = OwnServer::start().await;
    let node = GitNode::start("gitaly-1");
    let dir = tempfile::tempdir().unwrap();
    let router = start_router_on(
        dir.path(),
        &pg.connection(),
        None,
        &[NodeEntry::from(&node)],
        "",
    )
    .await;
    let (code, body) = router.http_get("/status.json");
    assert_eq!(code, 200, "{body}");
    pg.stop();
    // After the kept collection expires, the next one finds the database gone.
    tokio::time::sleep(praefect::status::STATUS_TTL).await;
    let (code, page) = router.http_get("/");
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("data-state=\"problem\""), "{page}");
    assert!(page.contains("data-kind=\"database-"), "{page}");
    let (code, body) = router.http_get("/status.json");
    assert_eq!(code, 503, "{body}");
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        !status["database_errors"].as_array().unwrap().is_empty(),
        "{body}"
    );
    // The node is still shown, as this router sees it.
    assert_eq!(
        status["virtual_storages"][0]["nodes"][0]["healthy_here"],
        true
    );
    let (code, body) = router.http_get("/repository.json?repository_id=1");
    assert_eq!(code, 503, "{body}");
    pg.start_again();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_count_that_times_out_is_a_warning_on_a_complete_page() {
    let db = TestDb::new().await;
    let node = GitNode::start("gitaly-1");
    let dir = tempfile::tempdir().unwrap();
    let router = start_router(
        &db,
        dir.path(),
        &[&node],
        "[prometheus]\nscrape_timeout = \"1s\"",
    )
    .await;
    // A transaction holding the repositories table: the count waits for the lock until its
    // statement timeout cancels it, however fast the machine (a count that was merely slow
    // finished in time on a fast one). The node observations do not read that table.
    let mut holder = db.raw().await;
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("LOCK TABLE repositories IN ACCESS EXCLUSIVE MODE")
        .execute(&mut holder)
        .await
        .unwrap();
    let (code, page) = router.http_get("/");
    assert_eq!(code, 200, "{page}");
    assert!(
        page.contains("data-kind=\"repository-counts-failed\""),
        "{page}"
    );
    assert!(page.contains("id=\"repository-counts-error\""), "{page}");
    assert!(page.contains("statement timeout"), "{page}");
    // The rest of the page is there.
    assert!(
        page.contains("class=\"node\" data-storage=\"gitaly-1\""),
        "{page}"
    );
    assert!(!page.contains("data-kind=\"database-"), "{page}");
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
}
