//! `praefect check` and `/db_metrics` against real parts: a PostgreSQL the test starts, real
//! gitnodes, a real router; the built binary's output compared line by line.
// Tests read and write the database directly (not through PgBouncer), so the datastore's
// rule about unnamed statements (clippy.toml) does not apply here.
#![allow(clippy::disallowed_methods)]

use crate::common;

use std::time::Duration;

use common::cluster::{clone_replica, replica_path, start_router};
use common::gitnode::GitNode;
use common::pg::{OwnServer, TestDb};
use common::router::{
    commit_and_push, praefect_cli, sample, seed_repository, wait_for_health_round,
    write_config_with, NodeEntry,
};
use common::wait::wait_until;

const PASSED: [&str; 9] = [
    "Checking praefect migrations - Confirms whether or not all migrations have run [fatal]",
    "Passed",
    "Checking gitaly node connectivity & disk access - Checks connectivity to each node and that each of its storages is readable and writable [fatal]",
    "Passed",
    "Checking database read/write - Checks that the database can be written to and read from [fatal]",
    "Passed",
    "Checking unavailable repositories - Checks for repositories without a healthy, up-to-date replica [warning]",
    "Passed",
    "",
];

fn lines(text: &str) -> Vec<&str> {
    text.lines().collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn check_passes_then_names_what_fails() {
    let db = TestDb::new().await;
    let mut nodes = [GitNode::start("gitaly-1"), GitNode::start("gitaly-2")];
    let dir = tempfile::tempdir().unwrap();
    let entries: Vec<NodeEntry> = nodes.iter().map(NodeEntry::from).collect();
    write_config_with(dir.path(), &db.connection(), &entries, "");

    let (code, out, err) = praefect_cli(dir.path(), &["check"]).await;
    let mut want = PASSED.to_vec();
    want.push("All checks passed.");
    assert_eq!((code, lines(&out)), (0, want), "{err}");

    let (code, out, _) = praefect_cli(dir.path(), &["check", "-q"]).await;
    assert_eq!(code, 0);
    assert_eq!(
        lines(&out),
        [
            "Checking praefect migrations...",
            "Passed",
            "Checking gitaly node connectivity & disk access...",
            "Passed",
            "Checking database read/write...",
            "Passed",
            "Checking unavailable repositories...",
            "Passed",
            "",
            "All checks passed."
        ]
    );

    // A repository whose only replica is behind: unavailable, a warning.
    let id = seed_repository(&db, &[&nodes[0]], "group/lost.git").await;
    sqlx::query("UPDATE repositories SET generation = 3 WHERE repository_id = $1")
        .bind(id)
        .execute(&mut db.raw().await)
        .await
        .unwrap();
    let (code, out, _) = praefect_cli(dir.path(), &["check"]).await;
    assert_eq!(code, 0, "a warning does not fail the command:\n{out}");
    let out = lines(&out);
    assert_eq!(
        out[7],
        "Failed (warning) error: virtual storage \"default\" has 1 unavailable repository; run `praefect dataloss` to see them"
    );
    assert_eq!(out[9], "1 check(s) failed, but none are fatal.");

    // A node down: fatal.
    nodes[1].kill();
    let (code, out, _) = praefect_cli(dir.path(), &["check"]).await;
    assert_eq!(code, 1, "{out}");
    let out = lines(&out);
    assert_eq!(
        out[3],
        format!(
            "Failed (fatal) error: the following nodes are not healthy: {}",
            nodes[1].address
        )
    );
    assert_eq!(
        out.last().copied(),
        Some("2 check(s) failed, at least one was fatal.")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn check_with_the_database_down_fails_every_database_check() {
    let pg = OwnServer::start().await;
    let node = GitNode::start("gitaly-1");
    let dir = tempfile::tempdir().unwrap();
    write_config_with(dir.path(), &pg.connection(), &[NodeEntry::from(&node)], "");
    pg.stop();
    let (code, out, _) = praefect_cli(dir.path(), &["check"]).await;
    assert_eq!(code, 1, "{out}");
    let out = lines(&out);
    for (line, passed) in [(1, false), (3, true), (5, false), (7, false)] {
        assert_eq!(out[line] == "Passed", passed, "line {line}: {}", out[line]);
    }
    assert!(out[1].starts_with("Failed (fatal) error: "), "{}", out[1]);
    assert!(out[7].starts_with("Failed (warning) error: "), "{}", out[7]);
    assert_eq!(
        out.last().copied(),
        Some("3 check(s) failed, at least one was fatal.")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn db_metrics_show_a_queue_building_against_a_stopped_node() {
    let db = TestDb::new().await;
    let mut nodes = [
        GitNode::start("gitaly-1"),
        GitNode::start("gitaly-2"),
        GitNode::start("gitaly-3"),
    ];
    let path = "group/queued.git";
    seed_repository(&db, &[&nodes[0], &nodes[1], &nodes[2]], path).await;
    // gitaly-3 stops before the router starts: otherwise the background verifier could verify
    // its replica first, and the replica would no longer count as unverified below.
    nodes[2].kill();
    let dir = tempfile::tempdir().unwrap();
    let router = {
        let refs: Vec<&GitNode> = nodes.iter().collect();
        start_router(&db, dir.path(), &refs, "").await
    };
    wait_for_health_round(&db, "gitaly-3", false).await;

    let replica = replica_path(&db, path).await;
    let work = clone_replica(&nodes[0], &replica);
    commit_and_push(work.path(), &router, path, "while gitaly-3 is away");

    let db_metrics = || {
        let (code, body) = router.http_get("/db_metrics");
        assert_eq!(code, 200, "{body}");
        body
    };
    wait_until(
        Duration::from_secs(10),
        "the queue shows in /db_metrics",
        || async {
            let body = db_metrics();
            ["ready", "in_progress", "failed"].iter().any(|state| {
                sample(
                    &body,
                    "gitaly_praefect_replication_queue_depth",
                    &[("target_node", "gitaly-3"), ("state", state)],
                ) >= 1.0
            })
        },
    )
    .await;
    let body = db_metrics();
    assert!(
        body.contains("gitaly_praefect_unavailable_repositories{virtual_storage=\"default\"} 0"),
        "{body}"
    );
    // The replica on the stopped node cannot be verified.
    assert!(
        sample(
            &body,
            "gitaly_praefect_verification_queue_depth",
            &[("storage", "gitaly-3"), ("status", "unverified")]
        ) >= 1.0,
        "{body}"
    );
    // Kept off /metrics by default.
    let (_, metrics) = router.http_get("/metrics");
    assert!(!metrics.contains("gitaly_praefect_replication_queue_depth"));

    // The other way round, on request.
    drop(router);
    let dir = tempfile::tempdir().unwrap();
    let refs: Vec<&GitNode> = nodes.iter().take(2).collect();
    let router = start_router(
        &db,
        dir.path(),
        &refs,
        "prometheus_exclude_database_from_default_metrics = false",
    )
    .await;
    let (_, metrics) = router.http_get("/metrics");
    assert!(
        metrics.contains("gitaly_praefect_replication_queue_depth"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_call_is_logged_once_and_counted() {
    use praefect::wire::proto::ref_service_client::RefServiceClient;
    use praefect::wire::proto::FindDefaultBranchNameRequest;

    let db = TestDb::new().await;
    let nodes = [GitNode::start("gitaly-1"), GitNode::start("gitaly-2")];
    let path = "group/logged.git";
    seed_repository(&db, &[&nodes[0], &nodes[1]], path).await;
    let dir = tempfile::tempdir().unwrap();
    let refs: Vec<&GitNode> = nodes.iter().collect();
    let router = start_router(&db, dir.path(), &refs, "").await;
    let mut client = RefServiceClient::new(router.channel());
    let call = |path: &str, id: &str| {
        let mut request = tonic::Request::new(FindDefaultBranchNameRequest {
            repository: Some(common::router::virtual_repo(path)),
            head_only: false,
        });
        request
            .metadata_mut()
            .insert("x-gitlab-correlation-id", id.parse().unwrap());
        request
    };
    client
        .find_default_branch_name(call(path, "logged-ok"))
        .await
        .unwrap();
    let err = client
        .find_default_branch_name(call("group/missing.git", "logged-missing"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    let line = |id: &str| {
        let lines: Vec<serde_json::Value> = router
            .log_lines("finished call")
            .into_iter()
            .filter(|l| l["correlation_id"] == id)
            .collect();
        assert_eq!(
            lines.len(),
            1,
            "one line per call: {:?}",
            router.log_lines("finished call")
        );
        lines[0].clone()
    };
    wait_until(Duration::from_secs(5), "both calls logged", || async {
        router.log_lines("finished call").len() >= 2
    })
    .await;
    let ok = line("logged-ok");
    assert_eq!(ok["level"], "info", "{ok}");
    assert_eq!(
        ok["grpc.method"],
        "/gitaly.RefService/FindDefaultBranchName"
    );
    assert_eq!(ok["grpc.code"], "OK");
    assert_eq!(ok["virtual_storage"], "default");
    assert_eq!(ok["relative_path"], path);
    assert!(
        ["gitaly-1", "gitaly-2"].contains(&ok["storage"].as_str().unwrap_or("")),
        "{ok}"
    );
    assert!(ok["grpc.time_ms"].as_f64().is_some_and(|t| t > 0.0), "{ok}");
    assert!(
        ok["peer.address"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:")),
        "{ok}"
    );
    let missing = line("logged-missing");
    // Not the cluster's fault: info, as go-grpc-middleware logs it.
    assert_eq!(missing["level"], "info", "{missing}");
    assert_eq!(missing["grpc.code"], "NotFound");
    assert_eq!(missing["grpc.message"], "repository not found");
    let all = router.log_lines("");
    assert!(
        all.iter()
            .all(|l| !l.to_string().contains(common::router::ROUTER_TOKEN)
                && !l.to_string().contains("Bearer")),
        "no token in the log"
    );

    let (_, metrics) = router.http_get("/metrics");
    let labels = [
        ("grpc_service", "gitaly.RefService"),
        ("grpc_method", "FindDefaultBranchName"),
    ];
    assert_eq!(
        sample(&metrics, "grpc_server_started_total", &labels),
        2.0,
        "{metrics}"
    );
    for (code, want) in [("OK", 1.0), ("NotFound", 1.0)] {
        let mut with_code = labels.to_vec();
        with_code.push(("grpc_code", code));
        assert_eq!(
            sample(&metrics, "grpc_server_handled_total", &with_code),
            want,
            "{code}"
        );
    }
    assert_eq!(
        sample(&metrics, "grpc_server_handling_seconds_count", &labels),
        2.0
    );
    // The router's own calls to the nodes: the forwarded read, and the health checks.
    let mut forwarded = labels.to_vec();
    forwarded.push(("grpc_code", "OK"));
    assert_eq!(
        sample(&metrics, "grpc_client_handled_total", &forwarded),
        1.0,
        "{metrics}"
    );
    assert!(
        sample(
            &metrics,
            "grpc_client_handled_total",
            &[
                ("grpc_service", "grpc.health.v1.Health"),
                ("grpc_code", "OK")
            ]
        ) >= 2.0
    );
    assert!(sample(&metrics, "grpc_client_started_total", &labels) >= 1.0);
    // Messages, counted from the forwarded bytes: both requests came in, one answer went
    // out (the router answered the unknown repository with trailers only); to the node, one
    // request and one answer.
    for (name, want) in [
        ("grpc_server_msg_received_total", 2.0),
        ("grpc_server_msg_sent_total", 1.0),
        ("grpc_client_msg_sent_total", 1.0),
        ("grpc_client_msg_received_total", 1.0),
    ] {
        assert_eq!(sample(&metrics, name, &labels), want, "{name}: {metrics}");
    }
    // A server-streaming call whose answer is several messages on the node's side.
    let mut stream = client
        .list_refs(praefect::wire::proto::ListRefsRequest {
            repository: Some(common::router::virtual_repo(path)),
            patterns: vec![b"refs/".to_vec()],
            head: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut answers = 0.0;
    while stream.message().await.unwrap().is_some() {
        answers += 1.0;
    }
    let (_, metrics) = router.http_get("/metrics");
    assert!(answers >= 1.0);
    let listed = [("grpc_method", "ListRefs"), ("grpc_type", "server_stream")];
    assert_eq!(
        sample(&metrics, "grpc_server_msg_sent_total", &listed),
        answers
    );
    assert_eq!(
        sample(&metrics, "grpc_client_msg_received_total", &listed),
        answers
    );

    // Every call was authenticated; a wrong token is counted as denied, and why.
    let ok = sample(
        &metrics,
        "gitaly_authentications_total",
        &[("enforced", "true"), ("status", "ok")],
    );
    assert!(ok >= 3.0, "{metrics}");
    let wrong = tonic::service::interceptor::InterceptedService::new(
        praefect::wire::backchannel::dial_lazy(
            &router.address,
            praefect::wire::backchannel::yamux_config(0, 256),
            praefect::wire::backchannel::ClientHandler::default(),
        )
        .unwrap(),
        praefect::wire::auth::TokenInterceptor::new("not the router's token"),
    );
    let refused = RefServiceClient::new(wrong)
        .find_default_branch_name(call(path, "wrong-token"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    let (_, metrics) = router.http_get("/metrics");
    assert_eq!(
        sample(
            &metrics,
            "gitaly_authentications_total",
            &[("enforced", "true"), ("status", "denied")]
        ),
        1.0
    );
    assert_eq!(
        sample(
            &metrics,
            "gitaly_authentication_errors_total",
            &[("version", "v2"), ("error", "hmac")]
        ),
        1.0
    );
    // The test's channels are backchannel sessions: their reads and writes were measured.
    for name in [
        "gitaly_backchannel_yamux_read_size_bytes_count",
        "gitaly_backchannel_yamux_write_size_bytes_count",
        "process_resident_memory_bytes",
    ] {
        assert!(sample(&metrics, name, &[]) > 0.0, "{name}: {metrics}");
    }
    assert_eq!(sample(&metrics, "gitlab_build_info", &[]), 1.0);
    // Each client connection (the test's two channels) was counted by its listener's type.
    assert!(
        sample(
            &metrics,
            "gitaly_praefect_connections_total",
            &[("type", "tcp")]
        ) >= 2.0,
        "{metrics}"
    );
}
