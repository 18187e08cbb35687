//! What the status shows as wrong, and what an operator should do about each: the page's
//! purpose is to say "all is well" or to point at the fix.

use super::model::{Problem, Severity, Status, Summary};

/// A node's disk is nearly full above this share in use.
const DISK_FULL_PERCENT: f64 = 90.0;
/// A target whose oldest queued job is older than this is falling behind.
const QUEUE_STUCK_SECONDS: f64 = 300.0;

/// Every problem of `status`, critical ones first.
pub fn find(status: &Status) -> Vec<Problem> {
    let mut found = Vec::new();
    let mut add = |severity, kind, what: String, action: &str| {
        found.push(Problem {
            severity,
            kind,
            what,
            action: action.to_string(),
        })
    };
    let router = &status.router;
    if router.database_writer.is_none() {
        add(
            Severity::Critical,
            "database-unavailable",
            format!(
                "No database server accepts writes: {}",
                router.database_writer_lost.as_deref().unwrap_or("unknown reason")
            ),
            "Check PostgreSQL (and Patroni or PgBouncer in front of it) and the [database] settings; `praefect -config FILE sql-ping` tests the connection. Writes fail until a writer is found; reads are served from the cache meanwhile.",
        );
    }
    for error in &status.database_errors {
        add(
            Severity::Critical,
            "database-query-failed",
            format!("A status query failed: {error}"),
            "The figures it provides are missing below. Check the database's load and availability; a timeout is bounded by [prometheus] scrape_timeout.",
        );
    }
    if !router.listen_connected {
        add(
            Severity::Warning,
            "listen-down",
            "The read cache's LISTEN connection is down: reads query the database instead of the cache.".to_string(),
            "Check that the router can reach PostgreSQL directly ([database.session_pooled], not through PgBouncer in transaction mode); it reconnects by itself.",
        );
    }
    for vs in &status.virtual_storages {
        for node in vs.nodes.iter().filter(|n| n.unhealthy()) {
            let quorum = match node.quorum_healthy {
                Some(true) => "healthy",
                Some(false) => "unhealthy",
                None => "unknown",
            };
            add(
                Severity::Critical,
                "node-unhealthy",
                format!(
                    "Node {} of {} ({}) is unhealthy: this router sees it {}, the routers' quorum {}.",
                    node.storage,
                    vs.name,
                    node.address,
                    if node.healthy_here { "healthy" } else { "unhealthy" },
                    quorum
                ),
                "Check the Gitaly service on that node and the network to it (`praefect -config FILE dial-nodes`). Its replicas fall behind while it is away; the replicator catches them up once it is back.",
            );
        }
        for node in &vs.nodes {
            if let Some(disk) = node
                .disk
                .as_ref()
                .filter(|d| d.used_percent() >= DISK_FULL_PERCENT)
            {
                add(
                    Severity::Warning,
                    "disk-nearly-full",
                    format!(
                        "The disk of {} ({}) is {:.0}% full.",
                        node.storage,
                        vs.name,
                        disk.used_percent()
                    ),
                    "Free space or grow the volume before writes and replication to it fail.",
                );
            }
        }
        if let Some(err) = &vs.repository_counts_error {
            add(
                Severity::Warning,
                "repository-counts-failed",
                format!("The repositories of {} could not be counted: {err}", vs.name),
                "Counting reads the repository tables once (at most every 30 s; after a timeout, not again for 5 minutes); on a very large or busy database it can exceed [prometheus] scrape_timeout, which bounds it. Raise scrape_timeout or look at the database's load; `/db_metrics` and `praefect dataloss` give the unavailable repositories meanwhile.",
            );
        }
        if let Some(counts) = &vs.repositories {
            if counts.unavailable > 0 {
                add(
                    Severity::Critical,
                    "unavailable-repositories",
                    format!(
                        "{} repositor{} of {} ha{} no valid primary (unavailable).",
                        counts.unavailable,
                        plural_y(counts.unavailable),
                        vs.name,
                        if counts.unavailable == 1 { "s" } else { "ve" },
                    ),
                    "Bring back the unhealthy nodes first. `praefect -config FILE dataloss -virtual-storage NAME` lists the repositories; if an up-to-date replica is lost for good, `praefect accept-dataloss` makes another replica authoritative.",
                );
            }
            if counts.read_only > 0 {
                add(
                    Severity::Critical,
                    "read-only-repositories",
                    format!(
                        "{} repositor{} of {} {} read-only: no up-to-date replica on an assigned storage.",
                        counts.read_only,
                        plural_y(counts.read_only),
                        vs.name,
                        if counts.read_only == 1 { "is" } else { "are" },
                    ),
                    "The reconciler replicates to the assigned storages when they are healthy; `praefect -config FILE dataloss -partially-unavailable` lists them, `praefect metadata` shows one.",
                );
            }
            if counts.outdated > 0 {
                add(
                    Severity::Warning,
                    "outdated-replicas",
                    format!(
                        "{} repositor{} of {} ha{} outdated or missing replicas.",
                        counts.outdated,
                        plural_y(counts.outdated),
                        vs.name,
                        if counts.outdated == 1 { "s" } else { "ve" },
                    ),
                    "Replication catches up while the target nodes are healthy (see the queue below); `praefect -config FILE dataloss -partially-unavailable` lists them.",
                );
            }
        }
        for target in &vs.queue {
            let failed: i64 = target
                .states
                .iter()
                .filter(|s| s.state == "failed")
                .map(|s| s.count)
                .sum();
            if failed > 0 || target.oldest_seconds >= QUEUE_STUCK_SECONDS {
                add(
                    Severity::Warning,
                    "replication-behind",
                    format!(
                        "Replication to {} ({}) is behind: {} job{} queued ({} failed), the oldest {} old.",
                        target.target,
                        vs.name,
                        target.total,
                        if target.total == 1 { "" } else { "s" },
                        failed,
                        super::html::duration(target.oldest_seconds)
                    ),
                    "Check that the target node is healthy and has disk space, and the router logs for `replication job failed`; jobs are retried, then dropped (the reconciler schedules them again).",
                );
            }
        }
        let failing = vs.verification.failing_invalid + vs.verification.failing_errors;
        if failing > 0 {
            add(
                Severity::Warning,
                "verification-failing",
                format!(
                    "Background verification on {}: {} replica{} found missing, {} check{} failed (this router, since it started).",
                    vs.name,
                    vs.verification.failing_invalid,
                    if vs.verification.failing_invalid == 1 { "" } else { "s" },
                    vs.verification.failing_errors,
                    if vs.verification.failing_errors == 1 { "" } else { "s" },
                ),
                "Missing replicas are dropped from the records and replicated again; failed checks usually mean an unhealthy node. `praefect verify` re-checks a repository or storage.",
            );
        }
    }
    found.sort_by_key(|p| p.severity);
    found
}

fn plural_y(n: i64) -> &'static str {
    if n == 1 {
        "y"
    } else {
        "ies"
    }
}

/// The line at the top of the page.
pub fn summary(problems: &[Problem]) -> Summary {
    match problems.first() {
        None => Summary {
            ok: true,
            text: "All is well: every node is healthy, every repository available and up to date."
                .to_string(),
        },
        Some(first) => Summary {
            ok: false,
            text: format!(
                "Something is wrong: {} problem{}. {}",
                problems.len(),
                if problems.len() == 1 { "" } else { "s" },
                first.what
            ),
        },
    }
}
