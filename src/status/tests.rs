//! The page and the problems from hand-made statuses: verdicts, advice, escaping.

use super::model::*;
use super::{page, problems};
use crate::datastore::RepositoryCounts;

fn status(name: &str, gitaly_3_healthy: bool, unavailable: i64) -> Status {
    let node = |storage: &str, healthy: bool| NodeStatus {
        storage: storage.to_string(),
        address: format!("tcp://{storage}:8075"),
        healthy_here: healthy,
        quorum_healthy: Some(healthy),
        seen_by: vec![RouterView {
            praefect_name: name.to_string(),
            healthy,
            seen_seconds_ago: Some(0.5),
            this_router: true,
        }],
        disk: Some(Disk {
            available_bytes: 600,
            used_bytes: 400,
        }),
        disk_error: None,
    };
    let mut status = Status {
        summary: Summary {
            ok: true,
            text: String::new(),
        },
        collected_at: "2026-12-02T16:00:00Z".to_string(),
        router: RouterInfo {
            name: name.to_string(),
            version: "0.1.0".to_string(),
            uptime_seconds: 75,
            database_writer: Some("db:5432".to_string()),
            database_writer_lost: None,
            listen_connected: true,
            listen_down_seconds: None,
        },
        virtual_storages: vec![VirtualStorageStatus {
            name: "default".to_string(),
            nodes: vec![node("gitaly-1", true), node("gitaly-3", gitaly_3_healthy)],
            active_routers: 1,
            quorum_needed: 1,
            repositories: Some(RepositoryCounts {
                virtual_storage: "default".to_string(),
                repositories: 10,
                healthy: 10 - unavailable,
                outdated: 0,
                unavailable,
                read_only: 0,
                replicas: 20,
                verified: 20,
                expired: 0,
                unverified: 0,
            }),
            repository_counts_error: None,
            repository_counts_age_seconds: Some(3),
            queue: Vec::new(),
            verification: Verification {
                enabled: true,
                interval_seconds: 604800,
                verified: Some(20),
                expired: Some(0),
                unverified: Some(0),
                failing_invalid: 0,
                failing_errors: 0,
            },
        }],
        problems: Vec::new(),
        database_errors: Vec::new(),
        recent_errors: Vec::new(),
    };
    status.problems = problems::find(&status);
    status.summary = problems::summary(&status.problems);
    status
}

#[test]
fn a_healthy_cluster_is_all_well() {
    let status = status("router-1", true, 0);
    assert!(status.problems.is_empty(), "{:?}", status.problems);
    assert!(status.summary.ok);
    let html = page::render(&status);
    assert!(html.contains("id=\"summary\" class=\"summary ok\" data-state=\"ok\""));
    assert!(html.contains("All is well"));
}

#[test]
fn problems_come_worst_first_with_what_to_do() {
    let status = status("router-1", false, 2);
    let kinds: Vec<&str> = status.problems.iter().map(|p| p.kind).collect();
    assert_eq!(kinds, ["node-unhealthy", "unavailable-repositories"]);
    assert!(status.problems[1]
        .what
        .contains("2 repositories of default have no valid primary"));
    assert!(status.problems[1]
        .action
        .contains("praefect -config FILE dataloss"));
    assert!(!status.summary.ok);
    assert!(status
        .summary
        .text
        .starts_with("Something is wrong: 2 problems."));
    let html = page::render(&status);
    assert!(html.contains("data-state=\"problem\""));
    assert!(html.contains("data-storage=\"gitaly-3\" data-healthy=\"false\""));
    assert!(html.contains("<code>praefect -config FILE dial-nodes</code>"));
}

#[test]
fn values_are_escaped() {
    let status = status("<script>alert(\"x\")</script>", true, 0);
    let html = page::render(&status);
    assert!(!html.contains("<script>alert"), "{html}");
    assert!(html.contains("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;"));
}
