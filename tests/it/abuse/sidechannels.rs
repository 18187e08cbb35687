//! See `abuse/mod.rs`. Sidechannels: ids the router refuses (`abc`, `-1`, past int64, two of
//! them) and the id kept from fan-out calls, against echo nodes that record what reaches
//! them; and a client that answers `ok` on its sidechannel and then neither reads nor writes,
//! cut off by the router's idle timeout (`[proxy] sidechannel_idle_timeout`) and by the node's
//! own (`sidechannel_idle_timeout_seconds`), with the node's upload-pack ended either way.
// Tests read and write the database directly (not through PgBouncer), so the datastore's
// rule about unnamed statements (clippy.toml) does not apply here.
#![allow(clippy::disallowed_methods)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use prost::Message;
use tonic::Code;
use tower::ServiceExt;

use super::rss_and_fds;
use crate::common::cluster::{create, start_router};
use crate::common::echo::{EchoLog, EchoNode};
use crate::common::gitnode::{GitNode, TOKEN as NODE_TOKEN};
use crate::common::pg::TestDb;
use crate::common::router::{virtual_repo, write_config_with, NodeEntry, Router, ROUTER_TOKEN};
use crate::common::wait::wait_until;
use praefect::routing::replica_path;
use praefect::wire::auth::{self, TokenInterceptor};
use praefect::wire::backchannel::{dial_lazy, yamux_config, BoxIo, ClientHandler};
use praefect::wire::proto::ref_service_client::RefServiceClient;
use praefect::wire::proto::ssh_service_client::SshServiceClient;
use praefect::wire::proto::{
    FindDefaultBranchNameRequest, OptimizeRepositoryRequest, Repository,
    SshUploadPackWithSidechannelRequest,
};
use praefect::wire::sidechannel::METADATA_KEY;

const UPLOAD_PACK: &str = "/gitaly.SSHService/SSHUploadPackWithSidechannel";
const OPTIMIZE: &str = "/gitaly.RepositoryService/OptimizeRepository";
const REPO: &str = "abuse/sidechannel.git";
/// The test's idle timeouts (the defaults are a minute).
const IDLE: Duration = Duration::from_secs(2);
/// Time a process may take beyond a bound it enforces (scheduling, a loaded machine).
const SLACK: Duration = Duration::from_secs(8);
const SILENT_CLIENTS: usize = 5;

/// Sends `message` (one gRPC message) to `path` with `ids` as sidechannel ids; the status.
async fn call_with_ids(
    channel: &tonic::transport::Channel,
    path: &str,
    message: Vec<u8>,
    ids: &[&str],
) -> (Code, String) {
    let mut framed = vec![0u8];
    framed.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    framed.extend_from_slice(&message);
    let mut request = http::Request::builder()
        .method(http::Method::POST)
        .uri(path)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header("te", "trailers")
        .header("authorization", auth::bearer(ROUTER_TOKEN.as_bytes()));
    for id in ids {
        request = request.header(METADATA_KEY, *id);
    }
    let request = request
        .body(tonic::body::Body::new(http_body_util::Full::new(
            Bytes::from(framed),
        )))
        .unwrap();
    let response = tokio::time::timeout(SLACK, channel.clone().oneshot(request))
        .await
        .expect("an answer in time")
        .expect("no transport error");
    let (parts, body) = response.into_parts();
    if let Some(status) = tonic::Status::from_header_map(&parts.headers) {
        return (status.code(), status.message().to_string());
    }
    let collected = body.collect().await.expect("the whole answer");
    let status = collected
        .trailers()
        .and_then(tonic::Status::from_header_map)
        .unwrap_or_else(|| tonic::Status::unknown("no grpc-status"));
    (status.code(), status.message().to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn sidechannel_ids_are_checked_and_kept_from_fan_out() {
    let db = TestDb::new().await;
    let store = db.datastore().await;
    let id = store.reserve_repository_id("default", REPO).await.unwrap();
    store
        .create_repository(
            &praefect::datastore::NewRepository {
                repository_id: id,
                virtual_storage: "default".into(),
                relative_path: REPO.into(),
                replica_path: replica_path(id),
                primary: "gitaly-1".into(),
                updated_secondaries: vec!["gitaly-2".into()],
                outdated_secondaries: vec![],
                store_assignments: false,
            },
            &[],
        )
        .await
        .unwrap();
    let log = EchoLog::default();
    let nodes = [
        EchoNode::start("gitaly-1", log.clone()).await,
        EchoNode::start("gitaly-2", log.clone()).await,
    ];
    let entries: Vec<NodeEntry> = nodes
        .iter()
        .map(|n| NodeEntry::new(&n.storage, &n.address))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config_with(
        dir.path(),
        &db.connection(),
        &entries,
        "graceful_stop_timeout = \"2s\"",
    );
    let router = tokio::task::spawn_blocking(move || Router::start(&config))
        .await
        .unwrap();
    let channel =
        tonic::transport::Endpoint::from_shared(router.address.replace("tcp://", "http://"))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let fetch = SshUploadPackWithSidechannelRequest {
        repository: Some(virtual_repo(REPO)),
        ..Default::default()
    }
    .encode_to_vec();

    // Not a plain int64, or more than one: refused, and nothing reaches a node. (A plain
    // connection: the id is checked before the router asks for a backchannel, whose absence
    // would be refused with another message.)
    for ids in [
        &["abc"][..],
        &["-1"],
        &["9223372036854775808"],
        &["18446744073709551616"],
        &["5", "6"],
    ] {
        let before = log.len();
        let (code, message) = call_with_ids(&channel, UPLOAD_PACK, fetch.clone(), ids).await;
        assert_eq!(
            (code, message.as_str()),
            (
                Code::InvalidArgument,
                "first request message: invalid gitaly-sidechannel-id"
            ),
            "{ids:?}"
        );
        assert_eq!(log.len(), before, "{ids:?} reached a node");
    }

    // A maintenance call goes to every node: none of them gets the client's sidechannel id
    // (they cannot share one sidechannel, and none may open the client's).
    let before = log.len();
    let optimize = OptimizeRepositoryRequest {
        repository: Some(virtual_repo(REPO)),
        strategy: 0,
    }
    .encode_to_vec();
    let (code, message) = call_with_ids(&channel, OPTIMIZE, optimize, &["7"]).await;
    assert_eq!(code, Code::Ok, "{message}");
    let received = log.since(before);
    assert_eq!(received.len(), 2, "both nodes got the call");
    for r in &received {
        assert_eq!(r.path, OPTIMIZE);
        assert!(
            r.headers.get(METADATA_KEY).is_none(),
            "{} got the client's sidechannel id",
            r.node
        );
    }
}

/// The upload-pack processes running under process `pid` (not yet reaped ones excluded).
fn upload_packs_under(pid: u32) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
                return false;
            };
            // "pid (comm) state ppid ...": comm may hold spaces, so split after the ')'.
            let Some((_, rest)) = stat.rsplit_once(')') else {
                return false;
            };
            let mut fields = rest.split_whitespace();
            let running = fields.next().is_some_and(|state| state != "Z");
            let parent = fields.next().and_then(|p| p.parse::<u32>().ok());
            let cmdline = std::fs::read(format!("/proc/{child}/cmdline")).unwrap_or_default();
            running
                && parent == Some(pid)
                && String::from_utf8_lossy(&cmdline).contains("upload-pack")
        })
        .count()
}

/// A fetch whose client answers `ok` when its sidechannel opens, then never reads nor
/// writes: the call in flight, and the sidechannel it holds.
async fn silent_fetch(
    address: &str,
    token: &str,
    repository: Repository,
) -> (tokio::task::JoinHandle<Result<(), tonic::Status>>, BoxIo) {
    let handler = ClientHandler::default();
    let sidechannels = handler.sidechannels.clone();
    let channel = dial_lazy(address, yamux_config(0, 256), handler).unwrap();
    let mut client = SshServiceClient::with_interceptor(channel, TokenInterceptor::new(token));
    let mut waiter = sidechannels.register();
    let mut request = tonic::Request::new(SshUploadPackWithSidechannelRequest {
        repository: Some(repository),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert(METADATA_KEY, waiter.id().to_string().parse().unwrap());
    let call = tokio::spawn(async move {
        client
            .ssh_upload_pack_with_sidechannel(request)
            .await
            .map(|_| ())
    });
    let stream = tokio::time::timeout(SLACK, waiter.connected())
        .await
        .expect("the sidechannel opened in time")
        .expect("the sidechannel opened");
    (call, stream)
}

/// Waits for every call to end, within `bound` from `since`; their statuses.
async fn ended_within(
    calls: Vec<tokio::task::JoinHandle<Result<(), tonic::Status>>>,
    since: Instant,
    bound: Duration,
) -> Vec<Result<(), tonic::Status>> {
    let mut results = Vec::new();
    for call in calls {
        let left = bound.saturating_sub(since.elapsed());
        let result = tokio::time::timeout(left, call)
            .await
            .expect("the call ended within the idle timeout")
            .unwrap();
        results.push(result);
    }
    results
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_sidechannel_client_is_cut_off_by_the_router() {
    let db = TestDb::new().await;
    // The node's own idle timeout stays at its default (a minute): the router's acts here.
    let node = GitNode::start("gitaly-1");
    let dir = tempfile::tempdir().unwrap();
    let router = start_router(
        &db,
        dir.path(),
        &[&node],
        &format!(
            "[proxy]\nsidechannel_idle_timeout = \"{}s\"\n",
            IDLE.as_secs()
        ),
    )
    .await;
    create(&router, REPO).await;
    let pid = router.child.id();
    let (rss_before, fds_before) = rss_and_fds(pid);

    let mut calls = Vec::new();
    let mut streams = Vec::new();
    for _ in 0..SILENT_CLIENTS {
        let (call, stream) = silent_fetch(&router.address, ROUTER_TOKEN, virtual_repo(REPO)).await;
        calls.push(call);
        streams.push(stream);
    }
    let opened = Instant::now();
    // The node starts upload-pack once it has opened the sidechannel.
    wait_until(
        SLACK,
        "each silent client holds an upload-pack",
        async || upload_packs_under(node.pid()) == SILENT_CLIENTS,
    )
    .await;
    let (rss_during, fds_during) = rss_and_fds(pid);
    // The router serves others meanwhile.
    find_default_branch(&router).await;

    let results = ended_within(calls, opened, IDLE + SLACK).await;
    for result in &results {
        assert!(result.is_err(), "a fetch without input cannot succeed");
    }
    assert!(
        router
            .log_lines("sidechannel closed: no data moved either way")
            .len()
            >= SILENT_CLIENTS,
        "the router's idle timeout closed them"
    );
    wait_until(SLACK, "the node's upload-packs ended", async || {
        upload_packs_under(node.pid()) == 0
    })
    .await;
    eprintln!(
        "router: {rss_before} kB, {fds_before} fds before; {rss_during} kB, {fds_during} fds with {SILENT_CLIENTS} silent sidechannels"
    );
    assert!(
        fds_during <= fds_before + 2 * SILENT_CLIENTS,
        "{fds_before} -> {fds_during}"
    );
    assert!(
        rss_during <= rss_before + 32 * 1024,
        "{rss_before} -> {rss_during} kB"
    );
    drop(streams);
    find_default_branch(&router).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_node_ends_an_idle_sidechannel_and_its_upload_pack() {
    let node = GitNode::start_with_config(
        "gitaly-1",
        &format!("sidechannel_idle_timeout_seconds = {}", IDLE.as_secs()),
    );
    node.create_repository("silent.git").await;
    let (call, stream) =
        silent_fetch(&node.address, NODE_TOKEN, node.repository("silent.git")).await;
    let opened = Instant::now();
    wait_until(
        SLACK,
        "the silent client holds an upload-pack",
        async || upload_packs_under(node.pid()) == 1,
    )
    .await;
    let result = ended_within(vec![call], opened, IDLE + SLACK).await;
    let status = result[0].as_ref().unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    wait_until(SLACK, "the node's upload-pack ended", async || {
        upload_packs_under(node.pid()) == 0
    })
    .await;
    drop(stream);
    // The node still serves.
    RefServiceClient::new(node.channel())
        .find_default_branch_name(FindDefaultBranchNameRequest {
            repository: Some(node.repository("silent.git")),
            head_only: false,
        })
        .await
        .unwrap();
}

async fn find_default_branch(router: &Router) {
    RefServiceClient::new(router.channel())
        .find_default_branch_name(FindDefaultBranchNameRequest {
            repository: Some(virtual_repo(REPO)),
            head_only: false,
        })
        .await
        .expect("a normal call through the router");
}
