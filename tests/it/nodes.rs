//! The router's node connections against real gitnode processes on loopback, addressed by
//! `dns:localhost:PORT` (resolved by the channel's own resolver): calls, reconnection after a
//! restart, a node that is down when the channel is made, many calls at once, raw HTTP/2
//! requests as the proxy sends them, and `dns+tls:` (the certificate is checked for the name).
// Tests read and write the database directly (not through PgBouncer), so the
// datastore's rule about unnamed statements (clippy.toml) does not apply here.
#![allow(clippy::disallowed_methods)]

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::StreamExt;
use http_body_util::BodyExt;
use praefect::nodes::{node_channel, NodeChannel};
use praefect::wire::backchannel::{yamux_config, ClientHandler};
use praefect::wire::proto::repository_service_client::RepositoryServiceClient;
use praefect::wire::proto::RepositoryExistsRequest;
use prost::Message;
use tonic::Code;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tower::ServiceExt;

use common::gitnode::{binary, GitNode, TestCerts, TOKEN};
use common::wait::{wait_until, wait_until_blocking};

/// The test CA, trusted by the process (rustls-native-certs reads SSL_CERT_FILE). Set once,
/// before any test of this binary dials anything.
fn setup() -> &'static TestCerts {
    static CERTS: OnceLock<TestCerts> = OnceLock::new();
    CERTS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        let certs = TestCerts::generate(&dir);
        std::env::set_var("SSL_CERT_FILE", &certs.ca);
        certs
    })
}

fn port(node: &GitNode) -> u16 {
    node.address.rsplit(':').next().unwrap().parse().unwrap()
}

fn open(address: &str) -> NodeChannel {
    node_channel(
        address,
        TOKEN,
        yamux_config(0, 256),
        ClientHandler::default(),
    )
    .unwrap()
}

/// RepositoryExists on the node's storage: an authenticated call (health is not).
async fn exists(channel: &NodeChannel, node: &GitNode) -> Result<bool, tonic::Status> {
    RepositoryServiceClient::new(channel.clone())
        .repository_exists(RepositoryExistsRequest {
            repository: Some(node.repository("missing.git")),
        })
        .await
        .map(|r| r.into_inner().exists)
}

#[tokio::test]
async fn calls_go_through_a_dns_address() {
    setup();
    let node = GitNode::start("gitaly-1");
    let channel = open(&format!("dns:localhost:{}", port(&node)));
    assert!(!exists(&channel, &node).await.unwrap());
    let endpoints = channel.endpoints();
    let loopback = format!("127.0.0.1:{}", port(&node));
    assert!(
        endpoints
            .iter()
            .any(|(addr, ready)| *addr == loopback && *ready),
        "{endpoints:?}"
    );
    // The other spelling of a dns: address for the system resolver reaches the same node
    // (`dns://SERVER/NAME:PORT`, which asks SERVER instead, is dns_discovery's subject).
    let address = format!("dns:///localhost:{}", port(&node));
    assert!(!exists(&open(&address), &node).await.unwrap(), "{address}");
}

/// Addresses an operator may mistype are refused when the channel is made (at startup, not
/// at the first call), naming the address and the schemes that work; `dial` (what dial-nodes
/// uses) says the same as an invalid input, without dialing anything.
#[tokio::test]
async fn bad_addresses_are_refused_when_the_channel_is_made() {
    let cases = [
        ("no scheme", "127.0.0.1:8075"),
        ("another scheme", "http://127.0.0.1:8075"),
        ("empty", ""),
        ("tcp without host", "tcp://"),
        ("tls without host", "tls://"),
        ("unix without path", "unix:"),
        ("unix:// without path", "unix://"),
        ("dns without name", "dns:"),
        ("dns+tls without name", "dns+tls:"),
        ("dns, port not a number", "dns:localhost:http"),
        ("dns, port out of range", "dns:localhost:65536"),
        ("dns, empty host", "dns::8075"),
        ("dns, unclosed bracket", "dns:[::1:8075"),
        ("dns, empty brackets", "dns:[]:8075"),
    ];
    let config = praefect::config::Config::default();
    for (what, address) in cases {
        let expected =
            format!("unsupported address {address:?}: use tcp://, tls://, unix:, dns: or dns+tls:");
        let err = node_channel(
            address,
            TOKEN,
            yamux_config(0, 256),
            ClientHandler::default(),
        )
        .err()
        .unwrap_or_else(|| panic!("{what}: {address:?} was accepted"));
        assert_eq!(err.to_string(), expected, "{what}");
        let err = praefect::nodes::dial(&config, address, TOKEN, Duration::from_secs(2))
            .await
            .err()
            .unwrap_or_else(|| panic!("{what}: {address:?} was dialed"));
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{what}");
        assert_eq!(err.to_string(), expected, "{what}");
    }
}

/// The token is the node's: a channel with another one is refused by the node.
#[tokio::test]
async fn calls_carry_the_node_token() {
    setup();
    let node = GitNode::start("gitaly-1");
    let wrong = node_channel(
        &format!("dns:localhost:{}", port(&node)),
        "not-the-token",
        yamux_config(0, 256),
        ClientHandler::default(),
    )
    .unwrap();
    let status = exists(&wrong, &node).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
}

/// A raw request with a path-only URI, as the proxy forwards them, through `oneshot`; the
/// response body is wrapped in `tonic::body::Body` as the proxy does.
#[tokio::test]
async fn raw_requests_work_like_the_proxy_sends_them() {
    setup();
    let node = GitNode::start("gitaly-1");
    let channel = open(&node.address);
    let message = HealthCheckRequest {
        service: String::new(),
    }
    .encode_to_vec();
    let mut frame = BytesMut::new();
    frame.put_u8(0);
    frame.put_u32(message.len() as u32);
    frame.put_slice(&message);
    let request = http::Request::builder()
        .method(http::Method::POST)
        .version(http::Version::HTTP_2)
        .uri("/grpc.health.v1.Health/Check")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(http_body_util::Full::new(
            frame.freeze(),
        )))
        .unwrap();
    let response = channel.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), http::StatusCode::OK);
    let body = tonic::body::Body::new(response.into_body());
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned().unwrap_or_default();
    assert_eq!(trailers.get("grpc-status").unwrap(), "0");
    let mut data: Bytes = collected.to_bytes();
    assert_eq!(data.get_u8(), 0);
    let len = data.get_u32() as usize;
    let answer = HealthCheckResponse::decode(&data[..len]).unwrap();
    assert_eq!(answer.status, 1, "SERVING");
}

#[tokio::test]
async fn calls_work_again_after_the_node_restarts() {
    setup();
    let mut node = GitNode::start("gitaly-1");
    let channel = open(&format!("dns:localhost:{}", port(&node)));
    assert!(!exists(&channel, &node).await.unwrap());
    node.restart();
    wait_until(Duration::from_secs(20), "call after restart", || {
        exists(&channel, &node)
    })
    .await;
    // And the connection is back for good: calls in a row succeed.
    for _ in 0..20 {
        exists(&channel, &node).await.unwrap();
    }
}

#[tokio::test]
async fn a_node_down_at_creation_fails_calls_as_unavailable_until_it_is_up() {
    setup();
    let mut node = GitNode::start("gitaly-1");
    node.kill();
    let address = format!("dns:localhost:{}", port(&node));
    let channel = open(&address);
    let status = exists(&channel, &node).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains(&address),
        "the message names the node: {status:?}"
    );
    // Calls during the back-off fail at once, with the same code.
    let started = Instant::now();
    let again = exists(&channel, &node).await.unwrap_err();
    assert_eq!(again.code(), Code::Unavailable, "{again:?}");
    assert!(started.elapsed() < Duration::from_secs(1));
    // dial() (what dial-nodes uses) reports the failure within its timeout.
    let config = praefect::config::Config::default();
    let dialed = praefect::nodes::dial(&config, &address, TOKEN, Duration::from_secs(2)).await;
    assert!(dialed.is_err());

    node.restart();
    wait_until(Duration::from_secs(20), "call once the node is up", || {
        exists(&channel, &node)
    })
    .await;
    praefect::nodes::dial(&config, &address, TOKEN, Duration::from_secs(5))
        .await
        .expect("dial once the node is up");
}

#[tokio::test]
async fn many_concurrent_calls_all_succeed() {
    setup();
    let node = GitNode::start("gitaly-1");
    let channel = open(&format!("dns:localhost:{}", port(&node)));
    let results: Vec<Result<bool, tonic::Status>> = futures::stream::iter(0..500)
        .map(|_| exists(&channel, &node))
        .buffer_unordered(64)
        .collect()
        .await;
    let failures: Vec<_> = results.iter().filter(|r| r.is_err()).collect();
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        failures.first()
    );
    // Health checks through tonic's generated client over the same channel.
    let mut health = HealthClient::new(channel.clone());
    for _ in 0..10 {
        health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap();
    }
}

/// `dns+tls:` verifies the certificate against the name (the test certificate is for
/// "localhost" only, so checking it against 127.0.0.1 would fail).
#[tokio::test]
async fn dns_tls_checks_the_certificate_for_the_name() {
    let certs = setup();
    let node = GitNode::start_with("gitaly-1", Some(certs));
    let tls_port = node
        .tls_address
        .as_deref()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    let channel = open(&format!("dns+tls:localhost:{tls_port}"));
    assert!(!exists(&channel, &node).await.unwrap());
    // The same port by IP, without the name: the certificate does not match.
    let by_ip = open(&format!("tls://127.0.0.1:{tls_port}"));
    let status = exists(&by_ip, &node).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}

/// A gitnode on a given listen address (GitNode picks 127.0.0.1 itself), killed when dropped.
struct NodeAt {
    listen: String,
    config: PathBuf,
    child: Child,
}

impl NodeAt {
    fn start(listen: &str, dir: &Path) -> NodeAt {
        let storage = dir.join("storage");
        std::fs::create_dir_all(&storage).unwrap();
        let config = dir.join("gitnode.toml");
        std::fs::write(
            &config,
            format!(
                "listen_addr = \"{listen}\"\n[auth]\ntoken = \"{TOKEN}\"\n[[storage]]\nname = \"gitaly-1\"\npath = \"{}\"\n",
                storage.display()
            ),
        )
        .unwrap();
        let child = Self::spawn(&config, listen);
        NodeAt {
            listen: listen.to_string(),
            config,
            child,
        }
    }

    fn spawn(config: &Path, listen: &str) -> Child {
        let child = Command::new(binary("gitnode"))
            .args(["-config", config.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting gitnode");
        wait_until_blocking(
            Duration::from_secs(20),
            &format!("gitnode on {listen} accepts connections"),
            || std::net::TcpStream::connect(listen),
        );
        child
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn restart(&mut self) {
        self.kill();
        self.child = Self::spawn(&self.config, &self.listen);
    }
}

impl Drop for NodeAt {
    fn drop(&mut self) {
        self.kill();
    }
}

/// RepositoryExists for a repository that only the node on ::1 has: which node answered.
async fn answered_by_v6(channel: &NodeChannel) -> Result<bool, tonic::Status> {
    RepositoryServiceClient::new(channel.clone())
        .repository_exists(RepositoryExistsRequest {
            repository: Some(praefect::wire::proto::Repository {
                storage_name: "gitaly-1".into(),
                relative_path: "only-on-v6.git".into(),
                ..Default::default()
            }),
        })
        .await
        .map(|r| r.into_inner().exists)
}

/// `localhost` is 127.0.0.1 and ::1: with a node on each (same port), calls alternate
/// between them; one going away leaves the calls to the other, and once back it gets its
/// share again without any re-resolution.
#[tokio::test]
async fn calls_spread_over_every_address_of_a_name() {
    setup();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let _v4 = NodeAt::start(&format!("127.0.0.1:{port}"), dirs.0.path());
    let mut v6 = NodeAt::start(&format!("[::1]:{port}"), dirs.1.path());
    RepositoryServiceClient::new(open(&format!("tcp://[::1]:{port}")))
        .create_repository(praefect::wire::proto::CreateRepositoryRequest {
            repository: Some(praefect::wire::proto::Repository {
                storage_name: "gitaly-1".into(),
                relative_path: "only-on-v6.git".into(),
                ..Default::default()
            }),
            default_branch: b"main".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();

    let channel = open(&format!("dns:localhost:{port}"));
    let both_ready = |channel: &NodeChannel| {
        let endpoints = channel.endpoints();
        endpoints.len() == 2 && endpoints.iter().all(|(_, ready)| *ready)
    };
    let count = |answers: &[bool]| answers.iter().filter(|v6| **v6).count();
    wait_until(
        Duration::from_secs(20),
        "both addresses connected",
        || async {
            answered_by_v6(&channel).await?;
            match both_ready(&channel) {
                true => Ok(()),
                false => Err(tonic::Status::unavailable(format!(
                    "{:?}",
                    channel.endpoints()
                ))),
            }
        },
    )
    .await;
    let mut answers = Vec::new();
    for _ in 0..40 {
        answers.push(answered_by_v6(&channel).await.unwrap());
    }
    assert_eq!(
        count(&answers),
        20,
        "round-robin over two addresses: {answers:?}"
    );

    v6.kill();
    let mut answers = Vec::new();
    for _ in 0..40 {
        // A call already on its way to the node that went away may fail; the rest go to the
        // node still up.
        if let Ok(v6) = answered_by_v6(&channel).await {
            answers.push(v6);
        }
    }
    assert!(answers.len() >= 38, "{answers:?}");
    assert_eq!(count(&answers), 0, "{answers:?}");

    v6.restart();
    wait_until(
        Duration::from_secs(20),
        "the restarted address is used again",
        || async {
            let mut seen_v6 = false;
            for _ in 0..4 {
                seen_v6 |= answered_by_v6(&channel).await?;
            }
            match seen_v6 {
                true => Ok(()),
                false => Err(tonic::Status::unavailable(format!(
                    "{:?}",
                    channel.endpoints()
                ))),
            }
        },
    )
    .await;
}

/// The client's CPU per call, tonic's `Channel` (what the router used before) against
/// `NodeChannel`, both over a backchannel to one gitnode, 64 calls in flight. A measurement,
/// not a check: `cargo test --release --test it -- --ignored --nocapture nodes::client_cost`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "micro-benchmark; run by hand in release"]
async fn client_cost_per_call_tonic_channel_vs_node_channel() {
    setup();
    let node = GitNode::start("gitaly-1");
    fn cpu_ticks() -> u64 {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    }
    async fn run<T>(client: RepositoryServiceClient<T>, node: &GitNode) -> (usize, Duration, u64)
    where
        T: tonic::client::GrpcService<tonic::body::Body> + Clone + Send + 'static,
        T::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        T::ResponseBody: http_body::Body<Data = Bytes> + Send + 'static,
        <T::ResponseBody as http_body::Body>::Error:
            Into<Box<dyn std::error::Error + Send + Sync>> + Send,
        T::Future: Send,
    {
        let request = RepositoryExistsRequest {
            repository: Some(node.repository("missing.git")),
        };
        // Warm up (connects).
        client
            .clone()
            .repository_exists(request.clone())
            .await
            .unwrap();
        let started = Instant::now();
        let ticks = cpu_ticks();
        let calls = 30_000;
        futures::stream::iter(0..calls)
            .map(|_| {
                let mut client = client.clone();
                let request = request.clone();
                async move { client.repository_exists(request).await.unwrap() }
            })
            .buffer_unordered(64)
            .for_each(|_| async {})
            .await;
        (calls, started.elapsed(), cpu_ticks() - ticks)
    }
    let hz = 100.0; // USER_HZ
    for round in 1..=2 {
        let tonic_client = RepositoryServiceClient::new(node.channel());
        let (calls, took, ticks) = run(tonic_client, &node).await;
        println!(
            "round {round} tonic Channel: {:.0} calls/s, {:.1} us client CPU per call",
            calls as f64 / took.as_secs_f64(),
            ticks as f64 / hz * 1e6 / calls as f64
        );
        let node_client = RepositoryServiceClient::new(open(&node.address));
        let (calls, took, ticks) = run(node_client, &node).await;
        println!(
            "round {round} NodeChannel:   {:.0} calls/s, {:.1} us client CPU per call",
            calls as f64 / took.as_secs_f64(),
            ticks as f64 / hz * 1e6 / calls as f64
        );
    }
}

/// A node that answers plain HTTP/2 but opens no backchannel session (here a bare tonic
/// health server, as a node with a broken backchannel would be) would serve reads and fail
/// every write, which needs the session. The router's health checks go over both lanes, so
/// such a node is unhealthy to it, while a real node next to it is healthy.
#[tokio::test]
async fn a_node_without_backchannel_sessions_is_unhealthy() {
    let db = common::pg::TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let node = GitNode::start("gitaly-1");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let bare = format!("tcp://{}", listener.local_addr().unwrap());
    let (_reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    // The bare server answers a plain health check; one forced over a backchannel session
    // fails.
    let channel = open(&bare);
    HealthClient::new(channel.clone())
        .check(HealthCheckRequest::default())
        .await
        .expect("plain health check");
    let status = HealthClient::new(channel.over_backchannel())
        .check(HealthCheckRequest::default())
        .await
        .expect_err("a health check over a backchannel session");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    let entries = [
        common::router::NodeEntry::from(&node),
        common::router::NodeEntry::new("gitaly-2", &bare),
    ];
    let _router =
        common::router::start_router_on(dir.path(), &db.connection(), None, &entries, "").await;
    common::router::wait_for_health_round(&db, "gitaly-2", false).await;
    common::router::wait_for_health_round(&db, "gitaly-1", true).await;
}
