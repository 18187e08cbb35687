//! Looking at a running cluster from a test: a router over gitnodes, the database's view of a
//! repository (generations, primary, replica path), checksums on the nodes, metrics.
// Tests read the database directly (not through PgBouncer), so the datastore's rule about
// unnamed statements (clippy.toml) does not apply here.
#![allow(clippy::disallowed_methods)]

use super::gitnode::GitNode;
use super::pg::TestDb;
use super::router::{scrape_metrics, start_router_on, virtual_repo, NodeEntry, Router};
use praefect::wire::proto::repository_service_client::RepositoryServiceClient;
use praefect::wire::proto::*;

/// A router over `nodes` (virtual storage "default") with `extra` configuration.
pub async fn start_router(
    db: &TestDb,
    dir: &std::path::Path,
    nodes: &[&GitNode],
    extra: &str,
) -> Router {
    let entries: Vec<NodeEntry> = nodes.iter().map(|n| NodeEntry::from(*n)).collect();
    start_router_on(dir, &db.connection(), None, &entries, extra).await
}

/// (storage, generation) of every replica, and the repository's generation.
pub async fn generations(db: &TestDb, relative_path: &str) -> (i64, Vec<(String, i64)>) {
    let mut raw = db.raw().await;
    let repo: i64 =
        sqlx::query_scalar("SELECT generation FROM repositories WHERE relative_path = $1")
            .bind(relative_path)
            .fetch_one(&mut raw)
            .await
            .unwrap();
    let replicas = sqlx::query_as(
        "SELECT storage, generation FROM storage_repositories WHERE relative_path = $1
         ORDER BY storage",
    )
    .bind(relative_path)
    .fetch_all(&mut raw)
    .await
    .unwrap();
    (repo, replicas)
}

/// Whether every storage in `storages` holds the repository's latest generation.
pub async fn converged(db: &TestDb, relative_path: &str, storages: &[&str]) -> bool {
    let (latest, replicas) = generations(db, relative_path).await;
    storages
        .iter()
        .all(|s| replicas.iter().any(|(st, g)| st == s && *g == latest))
}

pub async fn replica_path(db: &TestDb, relative_path: &str) -> String {
    sqlx::query_scalar("SELECT replica_path FROM repositories WHERE relative_path = $1")
        .bind(relative_path)
        .fetch_one(&mut db.raw().await)
        .await
        .unwrap()
}

pub async fn checksum(node: &GitNode, replica_path: &str) -> String {
    RepositoryServiceClient::new(node.channel())
        .calculate_checksum(CalculateChecksumRequest {
            repository: Some(node.repository(replica_path)),
        })
        .await
        .unwrap()
        .into_inner()
        .checksum
}

pub async fn primary_of(db: &TestDb, relative_path: &str) -> String {
    sqlx::query_scalar("SELECT \"primary\" FROM repositories WHERE relative_path = $1")
        .bind(relative_path)
        .fetch_one(&mut db.raw().await)
        .await
        .unwrap()
}

pub async fn metrics(router: &Router) -> String {
    let address = router.metrics_address.clone().expect("metrics configured");
    tokio::task::spawn_blocking(move || scrape_metrics(&address))
        .await
        .unwrap()
}

pub async fn create(router: &Router, path: &str) {
    RepositoryServiceClient::new(router.channel())
        .create_repository(CreateRepositoryRequest {
            repository: Some(virtual_repo(path)),
            default_branch: b"main".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
}

/// A working copy cloned from `node`'s replica at `replica_path`.
pub fn clone_replica(node: &GitNode, replica_path: &str) -> tempfile::TempDir {
    let work = tempfile::tempdir().unwrap();
    let source = node.root.join(replica_path).display().to_string();
    super::gitnode::git(work.path(), &["clone", "--quiet", &source, "."], &[]);
    work
}
