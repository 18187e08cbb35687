//! The Grafana dashboard (`dashboards/praefect.json`) uses only metric names the router
//! serves: a real cluster does some traffic (reads, a write whose secondary is down, its
//! replication once the node is back, background verification), then every metric name in
//! the dashboard's PromQL must appear as a sample on `/metrics` or `/db_metrics`. A sample,
//! not a `# HELP` line: the prometheus crate prints a labelled family only once it has a
//! series, so a name that is only registered would not be seen by Prometheus either.
// Tests write the database directly (not through PgBouncer).
#![allow(clippy::disallowed_methods)]

use crate::common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::cluster::{clone_replica, converged, metrics, replica_path, start_router};
use common::gitnode::GitNode;
use common::pg::TestDb;
use common::router::{commit_and_push, seed_repository, virtual_repo, wait_for_health_round};
use common::wait::wait_until;
use praefect::wire::proto::ref_service_client::RefServiceClient;
use praefect::wire::proto::FindDefaultBranchNameRequest;

const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/dashboards/praefect.json");

/// PromQL words that are not metric names.
const KEYWORDS: [&str; 11] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
];

/// Aggregation operators: written `sum by (x) (...)` as well as `sum(...)`.
const AGGREGATIONS: [&str; 12] = [
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "group",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
];

/// The metric names an expression reads: identifiers outside label matchers (`{...}`),
/// ranges (`[...]`), strings and grouping clauses (`by (...)`), that are not functions
/// (followed by `(`) or keywords.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    // Skips from an opening bracket to its closing one.
    let skip_group = |mut i: usize, open: char, close: char| {
        let mut depth = 0;
        while i < chars.len() {
            if chars[i] == open {
                depth += 1;
            } else if chars[i] == close {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            i += 1;
        }
        i
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '{' {
            i = skip_group(i, '{', '}');
        } else if c == '[' {
            i = skip_group(i, '[', ']');
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next] == ' ' {
                next += 1;
            }
            let before_paren = next < chars.len() && chars[next] == '(';
            if KEYWORDS.contains(&word.as_str()) {
                if before_paren {
                    i = skip_group(next, '(', ')');
                }
            } else if !before_paren && !AGGREGATIONS.contains(&word.as_str()) {
                names.insert(word);
            }
        } else if c.is_ascii_digit() || c == '.' {
            // A number (0.95, 1e3): its letters are not a name.
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else {
            i += 1;
        }
    }
    names
}

/// Every PromQL expression of the dashboard: panel targets (rows included) and the
/// metric of each `label_values(metric, label)` variable.
fn dashboard_expressions(dashboard: &serde_json::Value) -> Vec<String> {
    fn walk(value: &serde_json::Value, out: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, value) in map {
                    match (key.as_str(), value) {
                        ("expr", serde_json::Value::String(expr)) => out.push(expr.clone()),
                        ("query" | "definition", serde_json::Value::String(query)) => {
                            if let Some(inner) = query
                                .strip_prefix("label_values(")
                                .and_then(|q| q.strip_suffix(')'))
                            {
                                let metric = inner.split(',').next().unwrap_or("").trim();
                                out.push(metric.to_string());
                            }
                        }
                        _ => walk(value, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(dashboard, &mut out);
    out
}

/// The metric names with at least one sample in a scrape.
fn served(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| line.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

#[test]
fn names_are_read_from_promql() {
    let names = metric_names(
        "histogram_quantile(0.95, sum by (le, grpc_type) (rate(grpc_server_handling_seconds_bucket{grpc_code!=\"OK\", a=~\"$x\"}[$__rate_interval]))) / on (x) group_left (y) other_metric offset 5m",
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["grpc_server_handling_seconds_bucket", "other_metric"]
    );
    assert_eq!(
        metric_names("min(gitaly_praefect_database_writer_up) * 1e3")
            .into_iter()
            .collect::<Vec<_>>(),
        ["gitaly_praefect_database_writer_up"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_metric_the_dashboard_uses_is_served() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap()).unwrap();
    let expressions = dashboard_expressions(&dashboard);
    assert!(expressions.len() >= 20, "{expressions:?}");
    let used: BTreeSet<String> = expressions.iter().flat_map(|e| metric_names(e)).collect();
    assert!(used.len() >= 20, "{used:?}");

    // A cluster with traffic: reads, a write while a secondary is down (transactions and a
    // replication job), the job run once the node is back, background verification.
    let db = TestDb::new().await;
    let mut nodes = [
        GitNode::start("gitaly-1"),
        GitNode::start("gitaly-2"),
        GitNode::start("gitaly-3"),
    ];
    let path = "group/dashboard.git";
    seed_repository(&db, &[&nodes[0], &nodes[1], &nodes[2]], path).await;
    let dir = tempfile::tempdir().unwrap();
    let router = {
        let refs: Vec<&GitNode> = nodes.iter().collect();
        start_router(&db, dir.path(), &refs, "").await
    };
    let mut reads = RefServiceClient::new(router.channel());
    for _ in 0..10 {
        reads
            .find_default_branch_name(FindDefaultBranchNameRequest {
                repository: Some(virtual_repo(path)),
                head_only: false,
            })
            .await
            .unwrap();
    }
    nodes[2].kill();
    wait_for_health_round(&db, "gitaly-3", false).await;
    let work = clone_replica(&nodes[0], &replica_path(&db, path).await);
    commit_and_push(work.path(), &router, path, "while gitaly-3 is away");
    // The database's families have series only while there is something to count: a queue
    // and a verification backlog exist while gitaly-3 is away (its replica marked
    // unverified, as `praefect verify` does; the verifier may have checked it already).
    sqlx::query("UPDATE storage_repositories SET verified_at = NULL WHERE storage = 'gitaly-3'")
        .execute(&mut db.raw().await)
        .await
        .unwrap();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    wait_until(
        Duration::from_secs(30),
        "/db_metrics shows the queue and the verification backlog",
        async || {
            let (_, body) = router.http_get("/db_metrics");
            let names = served(&body);
            let both = names.contains("gitaly_praefect_replication_queue_depth")
                && names.contains("gitaly_praefect_verification_queue_depth");
            seen.extend(names);
            if !both {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            both
        },
    )
    .await;
    nodes[2].restart();
    wait_until(
        Duration::from_secs(60),
        "gitaly-3 caught up by replication",
        || converged(&db, path, &["gitaly-1", "gitaly-2", "gitaly-3"]),
    )
    .await;
    // A failed call, for the error panels.
    let _ = reads
        .find_default_branch_name(FindDefaultBranchNameRequest {
            repository: Some(virtual_repo("group/missing.git")),
            head_only: false,
        })
        .await;

    let scrapes = async || {
        let mut names = served(&metrics(&router).await);
        let (code, db_metrics) = router.http_get("/db_metrics");
        assert_eq!(code, 200);
        names.extend(served(&db_metrics));
        names
    };
    let missing = wait_until(
        Duration::from_secs(60),
        "every metric the dashboard uses is served",
        async || {
            let mut names = scrapes().await;
            names.extend(seen.iter().cloned());
            let missing: Vec<&String> = used.iter().filter(|n| !names.contains(*n)).collect();
            if missing.is_empty() {
                Ok(())
            } else {
                tokio::time::sleep(Duration::from_millis(500)).await;
                Err(format!("{missing:?}"))
            }
        },
    )
    .await;
    let () = missing;
}
