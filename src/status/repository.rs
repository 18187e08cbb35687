//! The repository view (`/repository?virtual_storage=X&relative_path=Y` or
//! `?repository_id=N`, and `/repository.json` with the same parameters): what `praefect
//! metadata` prints, plus the repository's queued replication jobs.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::collect::Sources;
use super::html::{duration, escape, page, verdict};
use crate::datastore::{RepositoryJob, RepositoryLookup, RepositoryState};

/// Why the view could not be shown.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("give repository_id, or virtual_storage and relative_path")]
    Usage,
    #[error("repository_id must be a number: {0:?}")]
    BadId(String),
    #[error("repository not found")]
    NotFound,
    #[error("the database did not answer: {0}")]
    Database(String),
}

/// The repository and its queued jobs.
#[derive(Clone, Debug, Serialize)]
pub struct RepositoryView {
    pub repository_id: i64,
    pub virtual_storage: String,
    pub relative_path: String,
    pub replica_path: String,
    pub primary: Option<String>,
    pub generation: i64,
    pub replicas: Vec<ReplicaView>,
    pub jobs: Vec<RepositoryJob>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ReplicaView {
    pub storage: String,
    pub assigned: bool,
    /// -1 when the replica does not exist yet.
    pub generation: i64,
    /// `N, fully up to date`, `N, behind by K changes`, `replica not yet created`, as
    /// `praefect metadata` words it.
    pub generation_text: String,
    pub healthy: bool,
    pub valid_primary: bool,
    pub verified_at: Option<String>,
}

/// The lookup the query parameters ask for.
pub fn lookup(params: &BTreeMap<String, String>) -> Result<RepositoryLookup, ViewError> {
    let present = |key: &str| params.get(key).filter(|v| !v.is_empty());
    match (
        present("repository_id"),
        present("virtual_storage"),
        present("relative_path"),
    ) {
        (Some(id), _, _) => id
            .trim()
            .parse()
            .map(RepositoryLookup::Id)
            .map_err(|_| ViewError::BadId(id.clone())),
        (None, Some(vs), Some(path)) => Ok(RepositoryLookup::Path {
            virtual_storage: vs.clone(),
            relative_path: path.clone(),
        }),
        _ => Err(ViewError::Usage),
    }
}

/// Looks the repository and its jobs up, each bounded by the status queries' timeout.
pub async fn load(
    sources: &Sources,
    lookup: &RepositoryLookup,
) -> Result<RepositoryView, ViewError> {
    let timeout = sources.query_timeout();
    let state = tokio::time::timeout(
        timeout,
        sources
            .store
            .repository_state(lookup, &sources.configured()),
    )
    .await
    .map_err(|_| ViewError::Database(format!("no answer within {timeout:?}")))?
    .map_err(|err| ViewError::Database(err.to_string()))?
    .ok_or(ViewError::NotFound)?;
    let jobs = sources
        .store
        .repository_jobs(&state.virtual_storage, &state.relative_path, timeout)
        .await
        .map_err(|err| ViewError::Database(err.to_string()))?;
    Ok(view(state, jobs))
}

fn view(state: RepositoryState, jobs: Vec<RepositoryJob>) -> RepositoryView {
    let latest = state.generation;
    RepositoryView {
        replicas: state
            .replicas
            .into_iter()
            .map(|r| ReplicaView {
                generation_text: if r.generation < 0 {
                    "replica not yet created".to_string()
                } else if r.generation >= latest {
                    format!("{}, fully up to date", r.generation)
                } else {
                    let behind = latest - r.generation;
                    format!(
                        "{}, behind by {behind} change{}",
                        r.generation,
                        if behind == 1 { "" } else { "s" }
                    )
                },
                storage: r.storage,
                assigned: r.assigned,
                generation: r.generation,
                healthy: r.healthy,
                valid_primary: r.valid_primary,
                verified_at: r
                    .verified_at
                    .map(|at| at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
            })
            .collect(),
        repository_id: state.repository_id,
        virtual_storage: state.virtual_storage,
        relative_path: state.relative_path,
        replica_path: state.replica_path,
        primary: state.primary,
        generation: state.generation,
        jobs,
    }
}

/// The HTML page of a view or of why there is none.
pub fn render(result: &Result<RepositoryView, ViewError>) -> String {
    let mut body = String::from(
        "<header><h1>Repository</h1><p><a href=\"./\">&larr; cluster status</a></p></header><main>",
    );
    match result {
        Err(err) => {
            let _ = write!(
                body,
                "<p id=\"repository-error\" class=\"summary problem\">{}</p>",
                escape(&err.to_string())
            );
        }
        Ok(view) => render_view(&mut body, view),
    }
    body.push_str("</main>");
    page("Praefect repository", &body, None)
}

fn render_view(body: &mut String, view: &RepositoryView) {
    let _ = write!(
        body,
        "<div class=\"card\" id=\"repository\" data-repository-id=\"{id}\"><dl class=\"kv\">\
         <dt>Repository ID</dt><dd>{id}</dd><dt>Virtual Storage</dt><dd>{vs}</dd>\
         <dt>Relative Path</dt><dd>{rp}</dd><dt>Replica Path</dt><dd>{replica}</dd>\
         <dt>Primary</dt><dd>{primary}</dd><dt>Generation</dt><dd>{generation}</dd></dl></div>\
         <h2>Replicas</h2><div class=\"scroll\"><table class=\"replicas\"><tr><th>storage</th>\
         <th>assigned</th><th>generation</th><th>healthy</th><th>valid primary</th><th>verified at</th></tr>",
        id = view.repository_id,
        vs = escape(&view.virtual_storage),
        rp = escape(&view.relative_path),
        replica = escape(&view.replica_path),
        primary = escape(view.primary.as_deref().unwrap_or("none")),
        generation = view.generation,
    );
    for r in &view.replicas {
        let _ = write!(
            body,
            "<tr class=\"replica\" data-storage=\"{storage}\"><td>{storage}</td><td>{}</td><td>{}</td>\
             <td>{}</td><td>{}</td><td>{}</td></tr>",
            if r.assigned { "yes" } else { "no" },
            escape(&r.generation_text),
            verdict(r.healthy, "yes", "no"),
            if r.valid_primary { "yes" } else { "no" },
            escape(r.verified_at.as_deref().unwrap_or("unverified")),
            storage = escape(&r.storage),
        );
    }
    body.push_str("</table></div><h2>Queued replication jobs</h2>");
    if view.jobs.is_empty() {
        body.push_str("<p class=\"good\" id=\"no-jobs\">None.</p>");
        return;
    }
    body.push_str(
        "<div class=\"scroll\"><table class=\"jobs\"><tr><th>id</th><th>change</th><th>source</th>\
         <th>target</th><th>state</th><th>attempts left</th><th>age</th></tr>",
    );
    for job in &view.jobs {
        let _ = write!(
            body,
            "<tr class=\"job\" data-state=\"{state}\" data-target=\"{target}\"><td>{}</td><td>{}</td>\
             <td>{}</td><td>{target}</td><td>{state}</td><td>{}</td><td>{}</td></tr>",
            job.id,
            escape(job.change.as_deref().unwrap_or("")),
            escape(job.source.as_deref().unwrap_or("")),
            job.attempts_left,
            duration(job.age_seconds),
            state = escape(&job.state),
            target = escape(job.target.as_deref().unwrap_or("")),
        );
    }
    body.push_str("</table></div>");
}
