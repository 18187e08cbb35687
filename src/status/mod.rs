//! The cluster status page, served by every router on `prometheus_listen_addr`:
//!
//! - `/`: per virtual storage, the nodes (health as this router and as each other active
//!   router sees them, the quorum's verdict, disks), repositories by state, the replication
//!   queue by target, verification progress; this router's build, uptime, database writer
//!   and LISTEN state; its last errors; and a summary line with what to do about each
//!   problem. HTML rendered on the server, no external assets, a few lines of JavaScript to
//!   reload it.
//! - `/status.json`: the same data (503 when the database could not be asked).
//! - `/repository?virtual_storage=X&relative_path=Y` (or `?repository_id=N`) and
//!   `/repository.json`: one repository as `praefect metadata` shows it, with its queued jobs.
//!
//! **What it costs the database.** A collection is kept for [`STATUS_TTL`], so any number of
//! viewers cost one collection per router every few seconds, and viewers arriving during one
//! wait for it. A collection runs three operations, each bounded by `[prometheus]
//! scrape_timeout` (as a `statement_timeout`, so a slow statement is cancelled by the server
//! and does not make the router look for another database writer): `node_status` and
//! `healthy_storages` (one row per router and node), the replication queue grouped by target
//! and state (the backlog: completed and dead jobs are deleted), and the repository counts.
//! The counts are the one statement whose cost grows with the number of repositories (one
//! hashed pass over the repository tables: no index can find "a replica behind its
//! repository's generation"; 1.7-2.5 s at 100,000 repositories on a loaded 2-core machine,
//! about what `/db_metrics` spends on every scrape), so they are kept for
//! [`collect::COUNTS_TTL`], the page says how old they are, and a count that times out is a
//! warning on an otherwise complete page. The repository view is index-backed.

mod cache;
mod collect;
mod html;
mod model;
mod page;
mod problems;
mod query;
mod repository;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

pub use collect::{Sources, COUNTS_TTL};
pub use model::Status;

use cache::{Cached, Refreshed};
use collect::CountsResult;

/// How long a collection is shown before the next view collects again.
pub const STATUS_TTL: Duration = Duration::from_secs(5);

/// The status pages' state: what they read, and the kept collections.
pub struct StatusPage {
    sources: Sources,
    status: Cached<Arc<Status>>,
    /// Counted in the background (see [`Refreshed`]): at a million repositories a count takes
    /// longer than anyone should wait for a page.
    counts: Arc<Refreshed<CountsResult>>,
}

impl StatusPage {
    pub fn new(sources: Sources) -> Arc<Self> {
        Arc::new(StatusPage {
            sources,
            status: Cached::default(),
            counts: Arc::default(),
        })
    }

    /// The current status (a kept one if younger than [`STATUS_TTL`]).
    pub async fn status(&self) -> Arc<Status> {
        self.status
            .get(STATUS_TTL, || async {
                Arc::new(collect::collect(&self.sources, &self.counts).await)
            })
            .await
            .0
    }
}

const HTML: &str = "text/html; charset=utf-8";
const JSON: &str = "application/json";

/// The routes of the status pages.
pub fn routes(status_page: Arc<StatusPage>) -> axum::Router {
    let for_html = status_page.clone();
    let for_json = status_page.clone();
    let for_repository = status_page.clone();
    let for_repository_json = status_page;
    axum::Router::new()
        .route(
            "/",
            axum::routing::get(move || async move {
                let status = for_html.status().await;
                ([(http::header::CONTENT_TYPE, HTML)], page::render(&status))
            }),
        )
        .route(
            "/status.json",
            axum::routing::get(move || async move {
                let status = for_json.status().await;
                // The page itself is still useful without the database; a client of the
                // JSON is told clearly that part of it is missing.
                let code = if status.database_errors.is_empty() {
                    http::StatusCode::OK
                } else {
                    http::StatusCode::SERVICE_UNAVAILABLE
                };
                (
                    code,
                    [(http::header::CONTENT_TYPE, JSON)],
                    serde_json::to_string_pretty(&*status).unwrap_or_default(),
                )
            }),
        )
        .route(
            "/repository",
            axum::routing::get(move |uri: http::Uri| async move {
                let result = repository_view(&for_repository, &uri).await;
                let code = match &result {
                    Ok(_) | Err(repository::ViewError::Database(_)) => http::StatusCode::OK,
                    Err(repository::ViewError::NotFound) => http::StatusCode::NOT_FOUND,
                    Err(_) => http::StatusCode::BAD_REQUEST,
                };
                (
                    code,
                    [(http::header::CONTENT_TYPE, HTML)],
                    repository::render(&result),
                )
            }),
        )
        .route(
            "/repository.json",
            axum::routing::get(move |uri: http::Uri| async move {
                let result = repository_view(&for_repository_json, &uri).await;
                let (code, body) = match &result {
                    Ok(view) => (
                        http::StatusCode::OK,
                        serde_json::to_string_pretty(view).unwrap_or_default(),
                    ),
                    Err(err) => (
                        match err {
                            repository::ViewError::Database(_) => {
                                http::StatusCode::SERVICE_UNAVAILABLE
                            }
                            repository::ViewError::NotFound => http::StatusCode::NOT_FOUND,
                            _ => http::StatusCode::BAD_REQUEST,
                        },
                        serde_json::json!({ "error": err.to_string() }).to_string(),
                    ),
                };
                (code, [(http::header::CONTENT_TYPE, JSON)], body)
            }),
        )
}

async fn repository_view(
    status_page: &StatusPage,
    uri: &http::Uri,
) -> Result<repository::RepositoryView, repository::ViewError> {
    let params = query::parse(uri.query().unwrap_or(""));
    let lookup = repository::lookup(&params)?;
    repository::load(&status_page.sources, &lookup).await
}
