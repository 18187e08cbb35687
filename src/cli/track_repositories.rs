//! `praefect -config FILE track-repositories -input-path FILE [-replicate-immediately]`:
//! `track-repository` for every line of a file (see `track_input.rs` for its form).
//!
//! Everything is validated before anything is tracked, so that a bad file changes nothing:
//! each line on its own, the whole file against the database (one query per virtual
//! storage), and every replica on its node (RepositoryExists, [`CHECKS_IN_FLIGHT`] at a time
//! over one connection per node). Tracking then runs [`TRACKS_IN_FLIGHT`] repositories at a
//! time, reported in input order: a progress bar on a terminal, a line per repository
//! otherwise.

use std::collections::{HashMap, HashSet};
use std::io::{IsTerminal, Write};
use std::path::Path;

use futures::StreamExt;

use super::error::CliError;
use super::track_input::{parse, Line};
use super::track_repository::{placement_error, Tracker};
use crate::config::Config;

/// RepositoryExists calls in flight during validation.
const CHECKS_IN_FLIGHT: usize = 32;
/// Repositories being tracked at once (each is two short transactions, or replications).
const TRACKS_IN_FLIGHT: usize = 8;

pub async fn run(
    config: &Config,
    input_path: &Path,
    replicate_immediately: bool,
) -> Result<(), CliError> {
    let text = std::fs::read_to_string(input_path)
        .map_err(|err| CliError::Failed(format!("reading {}: {err}", input_path.display())))?;
    let mut lines = parse(&text);
    if lines.is_empty() {
        return Err(CliError::Failed(format!(
            "no repositories in {:?}",
            input_path.display().to_string()
        )));
    }
    println!("Validating repository information.");
    for line in &mut lines {
        if let Some(problem) = line
            .request
            .as_ref()
            .and_then(|r| placement_error(config, r))
        {
            line.problems.push(problem);
        }
    }
    let tracker = Tracker::open(config, replicate_immediately).await?;
    let result = validate_and_track(&tracker, &mut lines, input_path).await;
    tracker.store.close().await;
    result
}

async fn validate_and_track(
    tracker: &Tracker<'_>,
    lines: &mut [Line],
    input_path: &Path,
) -> Result<(), CliError> {
    mark_tracked(tracker, lines).await?;
    mark_missing(tracker, lines).await;
    let invalid: Vec<&Line> = lines.iter().filter(|l| !l.problems.is_empty()).collect();
    if !invalid.is_empty() {
        println!(
            "Found {} invalid request(s) in {:?}:",
            invalid.len(),
            input_path.display().to_string()
        );
        for line in invalid {
            println!("  object on line {} invalid:", line.number);
            for problem in &line.problems {
                println!("    {problem}");
            }
        }
        return Err(CliError::Failed(
            "invalid input: no repository was tracked".to_string(),
        ));
    }
    println!(
        "All {} repositories are valid; tracking them in the praefect database.",
        lines.len()
    );
    track_all(tracker, lines).await
}

/// Marks the lines whose repository the database tracks already.
async fn mark_tracked(tracker: &Tracker<'_>, lines: &mut [Line]) -> Result<(), CliError> {
    let mut by_storage: HashMap<String, Vec<String>> = HashMap::new();
    for request in lines.iter().filter_map(|l| l.request.as_ref()) {
        by_storage
            .entry(request.virtual_storage.clone())
            .or_default()
            .push(request.relative_path.clone());
    }
    let mut tracked: HashSet<(String, String)> = HashSet::new();
    for (virtual_storage, paths) in by_storage {
        for path in tracker
            .store
            .tracked_relative_paths(&virtual_storage, &paths)
            .await?
        {
            tracked.insert((virtual_storage.clone(), path));
        }
    }
    for line in lines.iter_mut() {
        let Some(request) = &line.request else {
            continue;
        };
        let key = (
            request.virtual_storage.clone(),
            request.relative_path.clone(),
        );
        if tracked.contains(&key) {
            line.problems
                .push("repository is already tracked by Praefect".to_string());
        }
    }
    Ok(())
}

/// Marks the lines whose replica is not on its authoritative storage, asking the nodes
/// concurrently (only for lines otherwise valid).
async fn mark_missing(tracker: &Tracker<'_>, lines: &mut [Line]) {
    let to_check: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].request.is_some() && lines[i].problems.is_empty())
        .collect();
    let checks = futures::stream::iter(to_check.iter().map(|&i| {
        let request = lines[i].request.clone();
        async move {
            match request {
                Some(request) => tracker.replica_exists(&request).await.map(|exists| {
                    (!exists).then(|| {
                        format!(
                            "repository does not exist on storage {:?} at replica path {:?}",
                            request.authoritative_storage, request.replica_path
                        )
                    })
                }),
                None => Ok(None),
            }
        }
    }))
    .buffered(CHECKS_IN_FLIGHT)
    .collect::<Vec<_>>()
    .await;
    for (&i, outcome) in to_check.iter().zip(checks) {
        match outcome {
            Ok(None) => {}
            Ok(Some(problem)) | Err(problem) => lines[i].problems.push(problem),
        }
    }
}

async fn track_all(tracker: &Tracker<'_>, lines: &[Line]) -> Result<(), CliError> {
    let total = lines.len();
    let mut progress = Progress::new(total);
    let mut results = futures::stream::iter(lines.iter().filter_map(|line| {
        let request = line.request.as_ref()?;
        Some(async move { (line.number, request, tracker.track(request).await) })
    }))
    .buffered(TRACKS_IN_FLIGHT);
    let mut done = 0;
    while let Some((number, request, outcome)) = results.next().await {
        let output = outcome.map_err(|err| {
            CliError::Failed(format!(
                "tracking {:?} (line {number}) failed, the repositories after it were not tracked: {err}",
                request.relative_path
            ))
        })?;
        done += 1;
        progress.advance(done, &request.relative_path, &output);
    }
    progress.finish();
    println!("Finished adding {done} repositories to be tracked in praefect database.");
    Ok(())
}

/// How progress is shown: a bar redrawn in place on a terminal, plain lines otherwise (logs
/// and pipes get every repository's outcome).
struct Progress {
    total: usize,
    terminal: bool,
}

impl Progress {
    const WIDTH: usize = 40;

    fn new(total: usize) -> Self {
        Progress {
            total,
            terminal: std::io::stdout().is_terminal(),
        }
    }

    fn advance(&mut self, done: usize, relative_path: &str, output: &[String]) {
        let mut out = std::io::stdout().lock();
        if self.terminal {
            let filled = (done * Self::WIDTH) / self.total.max(1);
            let _ = write!(
                out,
                "\r[{}{}] {done}/{}",
                "#".repeat(filled),
                " ".repeat(Self::WIDTH - filled.min(Self::WIDTH)),
                self.total
            );
            let _ = out.flush();
            return;
        }
        let _ = writeln!(out, "[{done}/{}] {relative_path:?}:", self.total);
        for line in output {
            let _ = writeln!(out, "  {line}");
        }
    }

    fn finish(&self) {
        if self.terminal {
            println!();
        }
    }
}
