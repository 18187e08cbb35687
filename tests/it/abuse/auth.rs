//! Token games against a real router, decided as Gitaly decides them: the scheme in any case,
//! hex in either case, the first of several `authorization` values, a 16 KiB header refused
//! without harm, a token replayed past its window refused (also when the router remembers it
//! as the last one verified); in `transitioning` mode, a flood of bad tokens is counted in
//! full but logged at a bounded rate and never with the token; a startup warning when the
//! token is empty.

use crate::common;

use std::time::{Duration, Instant, SystemTime};

use common::echo::{EchoLog, EchoNode};
use common::pg::TestDb;
use common::router::{sample, scrape_metrics, write_config_full, NodeEntry, Router, ROUTER_TOKEN};
use praefect::wire::auth;
use praefect::wire::backchannel::{dial_lazy, yamux_config, ClientHandler};
use praefect::wire::proto::{Repository, RepositoryExistsRequest};
use prost::Message;
use tonic::Code;

use super::rss_and_fds;
use crate::common::raw::raw_call;

const EXISTS: &str = "/gitaly.RepositoryService/RepositoryExists";

/// A router over one echo node whose `[auth]` table gets `auth_extra`, and `token`.
async fn start(token: &str, auth_extra: &str) -> (TestDb, EchoNode, Router, tempfile::TempDir) {
    let db = TestDb::new().await;
    let node = EchoNode::start("gitaly-1", EchoLog::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config_full(
        dir.path(),
        &db.connection(),
        None,
        &[NodeEntry::new(&node.storage, &node.address)],
        "127.0.0.1:0",
        "prometheus_listen_addr = \"127.0.0.1:0\"\ngraceful_stop_timeout = \"2s\"",
    );
    let text = std::fs::read_to_string(&path).unwrap().replace(
        &format!("[auth]\ntoken = \"{ROUTER_TOKEN}\"\n"),
        &format!("[auth]\ntoken = \"{token}\"\n{auth_extra}\n"),
    );
    std::fs::write(&path, text).unwrap();
    let router = tokio::task::spawn_blocking(move || Router::start(&path))
        .await
        .unwrap();
    (db, node, router, dir)
}

fn exists_request() -> Vec<u8> {
    RepositoryExistsRequest {
        repository: Some(Repository {
            storage_name: "default".into(),
            relative_path: "group/x.git".into(),
            ..Default::default()
        }),
    }
    .encode_to_vec()
}

/// A client connection without a token of its own: each call brings its `authorization`.
fn bare_channel(router: &Router) -> tonic::transport::Channel {
    dial_lazy(
        &router.address,
        yamux_config(0, 256),
        ClientHandler::default(),
    )
    .unwrap()
}

fn token_at(secret: &str, age: Duration) -> String {
    auth::sign_v2(secret.as_bytes(), SystemTime::now() - age)
}

#[tokio::test(flavor = "multi_thread")]
async fn token_edge_cases_are_decided_as_gitaly_decides_them() {
    let (_db, _node, router, _dir) = start(ROUTER_TOKEN, "").await;
    let pid = router.child.id();
    let channel = bare_channel(&router);
    let message = exists_request();
    let call = |headers: Vec<String>| {
        let channel = channel.clone();
        let message = message.clone();
        async move {
            let pairs: Vec<(&str, &str)> = headers
                .iter()
                .map(|h| ("authorization", h.as_str()))
                .collect();
            raw_call(channel, EXISTS, &message, &pairs).await
        }
    };
    let fresh = || token_at(ROUTER_TOKEN, Duration::ZERO);
    let upper = {
        let token = fresh();
        let (head, rest) = token.split_at(3);
        let (signature, tail) = rest.split_at(64);
        format!("{head}{}{tail}", signature.to_uppercase())
    };
    // Under the router's header-list limit, so that it reaches the token check; and 16 KiB,
    // which the HTTP/2 layer may refuse before (431) instead.
    let long = format!("Bearer {}{}", fresh(), "0".repeat(12 * 1024));
    let huge = format!("Bearer {}{}", fresh(), "0".repeat(16 * 1024));
    let (rss_before, fds_before) = rss_and_fds(pid);
    let cases: Vec<(&str, Vec<String>, Code)> = vec![
        (
            "lower-case scheme",
            vec![format!("bearer {}", fresh())],
            Code::Ok,
        ),
        (
            "upper-case scheme",
            vec![format!("BEARER {}", fresh())],
            Code::Ok,
        ),
        ("upper-case hex", vec![format!("Bearer {upper}")], Code::Ok),
        (
            "valid first, garbage second",
            vec![format!("Bearer {}", fresh()), "Bearer garbage".into()],
            Code::Ok,
        ),
        (
            "garbage first, valid second",
            vec!["Bearer garbage".into(), format!("Bearer {}", fresh())],
            Code::Unauthenticated,
        ),
        (
            "wrong secret first, valid second",
            vec![
                format!("Bearer {}", token_at("other", Duration::ZERO)),
                format!("Bearer {}", fresh()),
            ],
            Code::PermissionDenied,
        ),
        ("12 KiB token", vec![long.clone()], Code::Unauthenticated),
        (
            "another scheme",
            vec![format!("Basic {}", fresh())],
            Code::Unauthenticated,
        ),
    ];
    for _ in 0..20 {
        for (what, headers, code) in &cases {
            let status = call(headers.clone()).await;
            assert_eq!(status.code(), *code, "{what}: {status:?}");
        }
        let status = call(vec![huge.clone()]).await;
        assert!(
            status.code() == Code::Unauthenticated
                || status
                    .message()
                    .ends_with("HTTP 431 Request Header Fields Too Large"),
            "16 KiB header: {status:?}"
        );
    }

    // A token 29 s old passes and is remembered as the last one verified; the same bytes
    // replayed once it is 31 s old are refused: the window is checked on every call.
    let replayed = format!("Bearer {}", token_at(ROUTER_TOKEN, Duration::from_secs(29)));
    let signed_at = Instant::now();
    let status = call(vec![replayed.clone()]).await;
    assert_eq!(status.code(), Code::Ok, "{status:?}");
    tokio::time::sleep(Duration::from_millis(2200).saturating_sub(signed_at.elapsed())).await;
    let status = call(vec![replayed.clone()]).await;
    assert_eq!(
        (status.code(), status.message()),
        (
            Code::PermissionDenied,
            "permission denied: token has expired"
        )
    );
    let (rss, fds) = rss_and_fds(pid);
    eprintln!(
        "auth: {} token calls; router RSS {rss_before} -> {rss} kB, fds {fds_before} -> {fds}",
        (cases.len() + 1) * 20 + 2
    );
    assert!(rss < rss_before + 64 * 1024, "RSS grew to {rss} kB");
    assert!(fds < fds_before + 64, "fds grew to {fds}");
    // Nothing the client sent as a token reached the log.
    let log = router.log.lock().unwrap().join("\n");
    assert!(
        !log.contains(&"0".repeat(1024)),
        "the 16 KiB header was logged"
    );
    assert!(!log.contains(&upper[3..67]), "a token was logged");
    // Still serving, on a new connection too.
    let status = raw_call(router.channel(), EXISTS, &exists_request(), &[]).await;
    assert_eq!(status.code(), Code::Ok, "{status:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_tokens_in_transitioning_mode_are_counted_and_logged_at_a_bounded_rate() {
    let (_db, _node, router, _dir) = start(ROUTER_TOKEN, "transitioning = true").await;
    let channel = bare_channel(&router);
    let message = exists_request();
    // A token signed with the wrong secret: distinctive, so the log can be searched for it.
    let bad = token_at("not-the-router-secret", Duration::ZERO);
    let header = format!("Bearer {bad}");
    const CALLS: usize = 200;
    for _ in 0..CALLS {
        let status = raw_call(
            channel.clone(),
            EXISTS,
            &message,
            &[("authorization", &header)],
        )
        .await;
        assert_eq!(
            status.code(),
            Code::Ok,
            "transitioning never refuses: {status:?}"
        );
    }
    let scrape = {
        let address = router.metrics_address.clone().unwrap();
        tokio::task::spawn_blocking(move || scrape_metrics(&address))
            .await
            .unwrap()
    };
    assert_eq!(
        sample(
            &scrape,
            "gitaly_authentication_errors_total",
            &[("version", "v2"), ("error", "hmac")]
        ),
        CALLS as f64,
        "every bad token is counted"
    );
    let lines = router.log_lines("authentication would have failed");
    // One line per 10 s at most: the whole flood takes far less than 10 s, but allow for a
    // slow machine crossing one boundary.
    assert!(
        (1..=2).contains(&lines.len()),
        "{} lines for {CALLS} bad tokens",
        lines.len()
    );
    assert_eq!(lines[0]["error"], "permission denied: wrong hmac signature");
    let log = router.log.lock().unwrap().join("\n");
    assert!(
        !log.contains(&bad[3..67]),
        "the token's signature was logged"
    );
    assert!(!log.contains(&bad), "the token was logged");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_empty_token_is_warned_about_at_startup() {
    let (_db, _node, router, _dir) = start("", "").await;
    let warned = router
        .startup_log
        .iter()
        .any(|line| line.contains("authentication disabled: [auth] token is empty"));
    assert!(warned, "{:#?}", router.startup_log);
    // And calls without a token are served.
    let status = raw_call(bare_channel(&router), EXISTS, &exists_request(), &[]).await;
    assert_eq!(status.code(), Code::Ok, "{status:?}");
}
