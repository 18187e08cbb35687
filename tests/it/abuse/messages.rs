//! See `abuse/mod.rs`. The first request message, which the router reads before it can route
//! a call: its size limit (`[proxy] max_first_message_bytes`, 4 MiB by default, as grpc-go's
//! receive limit), what reading and rewriting a maximal one of tiny fields costs the router's
//! memory, and its deadline (`[proxy] first_message_timeout`).
// Tests read the database directly (not through PgBouncer), so the datastore's rule about
// unnamed statements (clippy.toml) does not apply here.
#![allow(clippy::disallowed_methods)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Code;
use tower::ServiceExt;

use super::rss_and_fds;
use crate::common::cluster::{create, start_router};
use crate::common::gitnode::GitNode;
use crate::common::pg::TestDb;
use crate::common::router::{virtual_repo, Router, ROUTER_TOKEN};
use praefect::wire::auth;
use praefect::wire::proto::ref_service_client::RefServiceClient;
use praefect::wire::proto::FindDefaultBranchNameRequest;

const FIND_DEFAULT_BRANCH: &str = "/gitaly.RefService/FindDefaultBranchName";
const REPO: &str = "abuse/messages.git";
const LIMIT: usize = 4 * 1024 * 1024;
/// The test router's first-message deadline (the default is 20 s).
const DEADLINE: Duration = Duration::from_secs(3);
/// Time the router may take beyond a bound it enforces (scheduling, a loaded machine).
const SLACK: Duration = Duration::from_secs(5);

/// A call whose request body the test writes as it likes; `answer` completes with the
/// status once the router answered (headers-only or after the body).
struct OpenCall {
    body: mpsc::Sender<Result<Frame<Bytes>, tonic::Status>>,
    answer: tokio::task::JoinHandle<(Code, String)>,
}

fn open_call(channel: &Channel, path: &str) -> OpenCall {
    let (body, rx) = mpsc::channel(4);
    let request = http::Request::builder()
        .method(http::Method::POST)
        .uri(path)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header("te", "trailers")
        .header("authorization", auth::bearer(ROUTER_TOKEN.as_bytes()))
        .body(tonic::body::Body::new(StreamBody::new(
            ReceiverStream::new(rx),
        )))
        .unwrap();
    let channel = channel.clone();
    let answer = tokio::spawn(async move {
        let response = match channel.oneshot(request).await {
            Ok(response) => response,
            Err(err) => return (Code::Unknown, format!("transport: {err}")),
        };
        let (parts, body) = response.into_parts();
        if let Some(status) = tonic::Status::from_header_map(&parts.headers) {
            return (status.code(), status.message().to_string());
        }
        match body.collect().await {
            Ok(collected) => {
                let status = collected
                    .trailers()
                    .and_then(tonic::Status::from_header_map)
                    .unwrap_or_else(|| tonic::Status::unknown("no grpc-status"));
                (status.code(), status.message().to_string())
            }
            Err(err) => (Code::Unknown, format!("reading the answer: {err}")),
        }
    });
    OpenCall { body, answer }
}

impl OpenCall {
    async fn send(&self, data: impl Into<Bytes>) {
        // The router may have answered and reset the stream already.
        let _ = self.body.send(Ok(Frame::data(data.into()))).await;
    }

    async fn status(self, within: Duration) -> (Code, String) {
        tokio::time::timeout(within, self.answer)
            .await
            .expect("the router answered in time")
            .unwrap()
    }
}

/// The gRPC length prefix of an uncompressed message of `len` bytes.
fn prefix(len: usize) -> Vec<u8> {
    let mut out = vec![0u8];
    out.extend_from_slice(&u32::try_from(len).unwrap().to_be_bytes());
    out
}

/// A FindDefaultBranchName request of exactly `len` bytes: the repository, then two-byte
/// fields (number 15, varint 0) the request type does not have, which a node skips but the
/// router has to walk past.
fn request_of_tiny_fields(len: usize) -> Vec<u8> {
    let repository = virtual_repo(REPO).encode_to_vec();
    let mut message = vec![0x0a];
    prost::encoding::encode_varint(repository.len() as u64, &mut message);
    message.extend_from_slice(&repository);
    if (len - message.len()) % 2 == 1 {
        message.extend_from_slice(&[0x72, 0x01, 0x00]); // field 14, one byte
    }
    while message.len() < len {
        message.extend_from_slice(&[0x78, 0x00]);
    }
    assert_eq!(message.len(), len);
    message
}

/// The peak resident memory (kB) of `pid` since the last [`reset_peak_rss`].
fn peak_rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Starts counting the peak resident memory of `pid` afresh (our own child: we may).
fn reset_peak_rss(pid: u32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
}

async fn normal_call_works(router: &Router) {
    RefServiceClient::new(router.channel())
        .find_default_branch_name(FindDefaultBranchNameRequest {
            repository: Some(virtual_repo(REPO)),
            head_only: false,
        })
        .await
        .expect("a normal call through the router");
}

#[tokio::test(flavor = "multi_thread")]
async fn first_messages_are_bounded_in_size_cost_and_time() {
    let db = TestDb::new().await;
    let node = GitNode::start("gitaly-1");
    let dir = tempfile::tempdir().unwrap();
    let router = start_router(
        &db,
        dir.path(),
        &[&node],
        &format!(
            "[proxy]\nfirst_message_timeout = \"{}s\"\n",
            DEADLINE.as_secs()
        ),
    )
    .await;
    create(&router, REPO).await;
    normal_call_works(&router).await;
    let pid = router.child.id();
    let channel =
        tonic::transport::Endpoint::from_shared(router.address.replace("tcp://", "http://"))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let (rss_before, fds_before) = rss_and_fds(pid);

    // 1. A first message announced one byte over the limit is refused at once, from its
    //    length prefix, while the client still holds its stream open: 20 at a time.
    let mut calls = Vec::new();
    for _ in 0..20 {
        let call = open_call(&channel, FIND_DEFAULT_BRANCH);
        call.send(prefix(LIMIT + 1)).await;
        calls.push(call);
    }
    for call in calls {
        let (code, message) = call.status(SLACK).await;
        assert_eq!(
            (code, message.as_str()),
            (
                Code::InvalidArgument,
                "first request message: the first message is 4194305 bytes, more than the limit of 4194304 bytes"
            )
        );
    }

    // 2. A first message of the limit's size, made of two million two-byte fields, is read,
    //    routed, rewritten and forwarded for a small multiple of its size. (256 bytes under
    //    it: the rewritten repository is longer, and the node has a 4 MiB limit too.)
    let len = LIMIT - 256;
    let message = request_of_tiny_fields(len);
    let mut framed = prefix(len);
    framed.extend_from_slice(&message);
    let framed = Bytes::from(framed);
    let rss_idle = rss_and_fds(pid).0;
    reset_peak_rss(pid);
    let call = open_call(&channel, FIND_DEFAULT_BRANCH);
    for chunk in framed.chunks(64 * 1024) {
        call.send(framed.slice_ref(chunk)).await;
    }
    drop(call.body);
    let (code, message) = tokio::time::timeout(Duration::from_secs(60), call.answer)
        .await
        .expect("the 4 MiB call answered")
        .unwrap();
    assert_eq!(code, Code::Ok, "{message}");
    let peak_growth_kb = peak_rss_kb(pid).saturating_sub(rss_idle);
    eprintln!("4 MiB first message of tiny fields: router peak RSS +{peak_growth_kb} kB over {rss_idle} kB");
    // Buffered once, rewritten once, framed once for the node: about 3x; 6x is the bound.
    assert!(
        peak_growth_kb <= 6 * (LIMIT as u64 / 1024),
        "the router's peak RSS grew by {peak_growth_kb} kB for a 4 MiB first message"
    );

    // 3. Clients that trickle their first message (a byte a second, never waiting as long as
    //    the deadline between two bytes) fail at the deadline: 10 at a time, while the router
    //    serves others.
    let started = Instant::now();
    let calls: Vec<OpenCall> = (0..10)
        .map(|_| open_call(&channel, FIND_DEFAULT_BRANCH))
        .collect();
    for call in &calls {
        call.send(prefix(100)).await;
    }
    let trickle = {
        let senders: Vec<_> = calls.iter().map(|c| c.body.clone()).collect();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                for sender in &senders {
                    let _ = sender
                        .send(Ok(Frame::data(Bytes::from_static(b"\x00"))))
                        .await;
                }
            }
        })
    };
    normal_call_works(&router).await;
    let (rss_during, fds_during) = rss_and_fds(pid);
    for call in calls {
        let (code, message) = call.status(DEADLINE + SLACK).await;
        assert_eq!(
            (code, message.as_str()),
            (
                Code::DeadlineExceeded,
                "the first request message did not arrive within 3s"
            )
        );
    }
    assert!(started.elapsed() < DEADLINE + SLACK);
    trickle.abort();
    eprintln!(
        "router: {rss_before} kB, {fds_before} fds before; {rss_during} kB, {fds_during} fds while 10 clients trickled"
    );
    assert!(
        fds_during <= fds_before + 10,
        "{fds_before} -> {fds_during}"
    );
    assert!(
        rss_during <= rss_before + 64 * 1024,
        "{rss_before} -> {rss_during} kB"
    );

    // Still serving.
    normal_call_works(&router).await;
}
