//! See `abuse/mod.rs`. Connections: clients that stop reading, that open connections and say
//! nothing, that open too many, that reset streams; the HTTP/2 limits of both listeners.

use std::time::{Duration, Instant};

use praefect::wire::proto::ref_service_client::RefServiceClient;
use praefect::wire::proto::*;

use super::rss_and_fds;
use crate::common::cluster::{replica_path, start_router};
use crate::common::gitnode::{git, GitNode};
use crate::common::pg::TestDb;
use crate::common::router::{seed_repository, virtual_repo, Router};

/// Refs added to the big repository, and the length of each name: ListRefs of all of them is
/// about 6.5 MB, more than a stalled call can park anywhere on its way (the client's window,
/// the router's send buffer, the node connection's stream window).
const BIG_REFS: usize = 25_000;
const REF_NAME_PAD: usize = 200;

/// Gives the repository at `replica` on `node` [`BIG_REFS`] long-named refs (packed, so
/// creating them is one file write).
fn add_many_refs(node: &GitNode, replica: &str) {
    let repo = node.root.join(replica);
    let head = git(&repo, &["rev-parse", "main"], &[]).trim().to_string();
    let pad = "x".repeat(REF_NAME_PAD);
    let mut packed = String::from("# pack-refs with: peeled fully-peeled sorted \n");
    for i in 0..BIG_REFS {
        packed.push_str(&format!("{head} refs/heads/many/{pad}-{i:06}\n"));
    }
    std::fs::write(repo.join("packed-refs"), packed).unwrap();
}

/// FindDefaultBranchName and a one-ref ListRefs on `repo` over a fresh connection: how long
/// each took.
async fn normal_calls(router: &Router, repo: &Repository) -> (Duration, Duration) {
    let mut client = RefServiceClient::new(router.channel());
    let started = Instant::now();
    let branch = client
        .find_default_branch_name(FindDefaultBranchNameRequest {
            repository: Some(repo.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .name;
    let find = started.elapsed();
    assert_eq!(branch, b"refs/heads/main");
    let started = Instant::now();
    let mut stream = client
        .list_refs(ListRefsRequest {
            repository: Some(repo.clone()),
            patterns: vec![b"refs/heads/main".to_vec()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut names = Vec::new();
    while let Some(message) = stream.message().await.unwrap() {
        names.extend(message.references.into_iter().map(|r| r.name));
    }
    let list = started.elapsed();
    assert_eq!(names, [b"refs/heads/main".to_vec()]);
    (find, list)
}

/// Client A opens five ListRefs of multi-MB answers and never reads them; client B's
/// FindDefaultBranchName and ListRefs on the same node, over the router's one connection to
/// it, finish within 1 s each. With a node connection window of a few stream windows (as it
/// was: 5 MiB for 2 MiB streams), A's unread answers held the whole window and B's calls
/// waited until A went away.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stops_reading_does_not_stall_the_node_for_others() {
    let db = TestDb::new().await;
    let node = GitNode::start("gitaly-1");
    let dir = tempfile::tempdir().unwrap();
    let router = start_router(&db, dir.path(), &[&node], "").await;
    let pid = router.child.id();
    seed_repository(&db, &[&node], "big.git").await;
    add_many_refs(&node, &replica_path(&db, "big.git").await);
    let repo = virtual_repo("big.git");
    let (before_rss, before_fds) = rss_and_fds(pid);

    // A: five calls whose answers nobody reads.
    let mut a = RefServiceClient::new(router.channel());
    let mut stalled = Vec::new();
    for _ in 0..5 {
        let response = a
            .list_refs(ListRefsRequest {
                repository: Some(repo.clone()),
                patterns: vec![b"refs/heads/".to_vec()],
                ..Default::default()
            })
            .await
            .unwrap();
        stalled.push(response.into_inner());
    }
    // Time for the answers to fill every window on their way and stop.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Past the bound, not for ever: before the fix B waited until A went away.
    let (find, list) = tokio::time::timeout(Duration::from_secs(10), normal_calls(&router, &repo))
        .await
        .expect("B's calls stalled behind A's unread answers");
    let (rss, fds) = rss_and_fds(pid);
    println!(
        "slow reader: FindDefaultBranchName {find:?}, ListRefs {list:?} with 5 unread \
         answers; router RSS {before_rss} -> {rss} kB, fds {before_fds} -> {fds}"
    );
    assert!(
        find < Duration::from_secs(1),
        "FindDefaultBranchName took {find:?}"
    );
    assert!(list < Duration::from_secs(1), "ListRefs took {list:?}");
    // What the five stalled calls may hold: about 2.5 MiB each in the router.
    assert!(rss < before_rss + 64 * 1024, "RSS {before_rss} -> {rss} kB");
    assert!(fds < before_fds + 16, "fds {before_fds} -> {fds}");

    // A gives up on four and reads the fifth to its end after all: nothing was lost on the
    // way. (The four go first: A's own connection window is full of their answers too.)
    let mut last = stalled.pop().unwrap();
    drop(stalled);
    let mut count = 0;
    while let Some(message) = last.message().await.unwrap() {
        count += message.references.len();
    }
    assert_eq!(count, BIG_REFS + 1);
    normal_calls(&router, &repo).await;
}

// ---- HTTP/2 limits, with hand-made frames: what a hostile client sends is not what any
// ---- client library would let a test send.

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// One HTTP/2 frame.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend(stream.to_be_bytes());
    out.extend(payload);
    out
}

/// The client's side of the handshake: the preface and an empty SETTINGS frame.
fn hello() -> Vec<u8> {
    let mut out = PREFACE.to_vec();
    out.extend(frame(4, 0, 0, &[]));
    out
}

/// HEADERS of a health check (HPACK literals, no table), END_HEADERS, not END_STREAM.
fn request_head(stream: u32) -> Vec<u8> {
    let path = b"/grpc.health.v1.Health/Check";
    let mut block = vec![0x83, 0x86, 0x04, path.len() as u8];
    block.extend(path);
    block.extend([0x01, 1, b'x']);
    block.extend([0x0f, 0x10, 16]);
    block.extend(b"application/grpc");
    block.extend([0x00, 2]);
    block.extend(b"te");
    block.push(8);
    block.extend(b"trailers");
    frame(1, 0x4, stream, &block)
}

/// Reads until the peer closes (or `within` passes): the HTTP/2 frames it sent, as (type,
/// stream, payload), and whether it closed.
async fn frames_until_closed(
    socket: &mut tokio::net::TcpStream,
    within: Duration,
) -> (Vec<(u8, u32, Vec<u8>)>, bool) {
    use tokio::io::AsyncReadExt;
    let mut data = Vec::new();
    let closed = tokio::time::timeout(within, async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => data.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    let mut frames = Vec::new();
    let mut rest = &data[..];
    while rest.len() >= 9 {
        let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
        let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]) & 0x7fff_ffff;
        if rest.len() < 9 + len {
            break;
        }
        frames.push((rest[3], stream, rest[9..9 + len].to_vec()));
        rest = &rest[9 + len..];
    }
    (frames, closed)
}

/// Whether `frames` hold a GOAWAY with ENHANCE_YOUR_CALM.
fn calmed(frames: &[(u8, u32, Vec<u8>)]) -> bool {
    frames
        .iter()
        .any(|(kind, _, payload)| *kind == 7 && payload.get(4..8) == Some(&[0, 0, 0, 0xb][..]))
}

/// The server's SETTINGS_MAX_CONCURRENT_STREAMS, from its first SETTINGS frame.
async fn max_concurrent_streams(address: &str) -> Option<u32> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = connect(address).await;
    socket.write_all(&hello()).await.unwrap();
    let mut head = [0u8; 9];
    socket.read_exact(&mut head).await.unwrap();
    assert_eq!(head[3], 4, "the server's first frame is SETTINGS");
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    socket.read_exact(&mut payload).await.unwrap();
    payload.chunks(6).find_map(|setting| {
        (setting[..2] == [0, 3]).then(|| u32::from_be_bytes(setting[2..6].try_into().unwrap()))
    })
}

async fn connect(address: &str) -> tokio::net::TcpStream {
    tokio::net::TcpStream::connect(address.trim_start_matches("tcp://"))
        .await
        .unwrap()
}

/// A normal call through the router: a health check over a fresh connection.
async fn healthy(router: &Router) -> Result<(), tonic::Status> {
    use tonic_health::pb::health_client::HealthClient;
    HealthClient::new(router.channel())
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .map(drop)
}

/// Connections that complete no handshake are closed within the handshake timeout, and the
/// listeners of both router and gitnode announce finite stream limits and send GOAWAY to
/// clients that reset streams in bulk (rapid reset) or make the server reset them
/// (MadeYouReset). Before: nothing closed a silent connection, both announced no stream
/// limit, and the second attack went on for ever.
#[tokio::test(flavor = "multi_thread")]
async fn hostile_handshakes_and_resets_are_cut_off() {
    use tokio::io::AsyncWriteExt;
    let db = TestDb::new().await;
    let node = GitNode::start("gitaly-1");
    let dir = tempfile::tempdir().unwrap();
    let router = start_router(
        &db,
        dir.path(),
        &[&node],
        "[connections]\nhandshake_timeout = \"2s\"\n",
    )
    .await;
    let pid = router.child.id();
    let (before_rss, before_fds) = rss_and_fds(pid);

    // The preface and nothing more; the backchannel magic and nothing more; nothing at all.
    let mut silent = Vec::new();
    for first in [PREFACE, b"backchannel".as_slice(), b"".as_slice()] {
        let mut socket = connect(&router.address).await;
        socket.write_all(first).await.unwrap();
        silent.push(socket);
    }
    let started = Instant::now();
    for socket in &mut silent {
        let (_, closed) = frames_until_closed(socket, Duration::from_secs(10)).await;
        assert!(closed, "a silent connection was left open");
    }
    let closed_after = started.elapsed();

    assert_eq!(max_concurrent_streams(&router.address).await, Some(1000));
    assert_eq!(max_concurrent_streams(&node.address).await, Some(1000));

    // Rapid reset: streams opened and cancelled at once, 100 of them.
    let mut socket = connect(&router.address).await;
    let mut attack = hello();
    for i in 0..100u32 {
        attack.extend(request_head(2 * i + 1));
        attack.extend(frame(3, 0, 2 * i + 1, &8u32.to_be_bytes()));
    }
    socket.write_all(&attack).await.unwrap();
    let (frames, closed) = frames_until_closed(&mut socket, Duration::from_secs(10)).await;
    assert!(calmed(&frames) && closed, "rapid reset: no GOAWAY");

    // MadeYouReset: each stream's window overflowed, so the server must reset it.
    let mut socket = connect(&router.address).await;
    let mut attack = hello();
    for i in 0..1100u32 {
        attack.extend(request_head(2 * i + 1));
        attack.extend(frame(8, 0, 2 * i + 1, &0x7fff_ffffu32.to_be_bytes()));
    }
    socket.write_all(&attack).await.unwrap();
    let (frames, closed) = frames_until_closed(&mut socket, Duration::from_secs(10)).await;
    let resets = frames.iter().filter(|(kind, _, _)| *kind == 3).count();
    assert!(
        calmed(&frames) && closed,
        "MadeYouReset: no GOAWAY after {resets} resets"
    );

    let (rss, fds) = rss_and_fds(pid);
    println!(
        "hostile handshakes: silent connections closed after {closed_after:?}; \
         MadeYouReset answered with GOAWAY ({resets} RST_STREAM frames flushed before it); router RSS {before_rss} -> {rss} kB, \
         fds {before_fds} -> {fds}"
    );
    assert!(closed_after < Duration::from_secs(5), "{closed_after:?}");
    assert!(rss < before_rss + 64 * 1024, "RSS {before_rss} -> {rss} kB");
    assert!(fds < before_fds + 16, "fds {before_fds} -> {fds}");
    healthy(&router).await.unwrap();
}

/// Beyond `max_connections`, new connections are closed at once and the router says so;
/// once others close, new ones are served again.
#[tokio::test(flavor = "multi_thread")]
async fn the_connection_cap_refuses_new_connections_and_says_so() {
    use tokio::io::AsyncWriteExt;
    let db = TestDb::new().await;
    let node = GitNode::start("gitaly-1");
    let dir = tempfile::tempdir().unwrap();
    let router = start_router(
        &db,
        dir.path(),
        &[&node],
        "[connections]\nmax_connections = 3\n",
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut socket = connect(&router.address).await;
        socket.write_all(&hello()).await.unwrap();
        held.push(socket);
    }
    // The client sees its connection closed (as Unavailable, Cancelled or Unknown,
    // depending on when it notices).
    assert!(
        healthy(&router).await.is_err(),
        "a connection beyond the cap was served"
    );
    // The log is read from the router's output as it comes.
    let line = crate::common::wait::wait_until(
        Duration::from_secs(5),
        "the router logs that the limit is reached",
        async || router.log_lines("connection limit reached").pop(),
    )
    .await;
    assert_eq!(line["max_connections"], 3);
    drop(held);
    crate::common::wait::wait_until(
        Duration::from_secs(10),
        "a connection is served again",
        async || healthy(&router).await,
    )
    .await;
}

/// Yamux frame: version 0, `kind` (0 data, 1 window update), `flags` (1 SYN), stream, length.
fn yamux(kind: u8, flags: u16, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0, kind];
    out.extend(flags.to_be_bytes());
    out.extend(stream.to_be_bytes());
    out.extend((payload.len() as u32).to_be_bytes());
    out.extend(payload);
    out
}

/// A backchannel client that opens its gRPC stream, then a second one, then goes silent
/// (as a peer that vanished): the second stream is refused at once, and the keepalive ends
/// the connection and the session. Before, the session lived as long as the socket.
#[tokio::test(flavor = "multi_thread")]
async fn a_vanished_backchannel_peer_is_cleaned_up() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let db = TestDb::new().await;
    let node = GitNode::start("gitaly-1");
    let dir = tempfile::tempdir().unwrap();
    let router = start_router(
        &db,
        dir.path(),
        &[&node],
        "[connections]\nkeepalive_interval = \"1s\"\nkeepalive_timeout = \"1s\"\n",
    )
    .await;
    let mut socket = connect(&router.address).await;
    let mut opening = b"backchannel".to_vec();
    opening.extend(yamux(1, 1, 1, &[]));
    opening.extend(yamux(0, 0, 1, &hello()));
    opening.extend(yamux(1, 1, 3, &[]));
    socket.write_all(&opening).await.unwrap();
    let started = Instant::now();
    let mut data = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(15), async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => data.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    let elapsed = started.elapsed();
    // Stream 3 got a reset (a window update with RST, flag 8).
    let mut rest = &data[..];
    let mut reset_3 = false;
    while rest.len() >= 12 {
        let (kind, flags) = (rest[1], u16::from_be_bytes([rest[2], rest[3]]));
        let stream = u32::from_be_bytes(rest[4..8].try_into().unwrap());
        let len = u32::from_be_bytes(rest[8..12].try_into().unwrap()) as usize;
        reset_3 |= stream == 3 && flags & 8 != 0;
        let payload = if kind == 0 { len } else { 0 };
        rest = &rest[(12 + payload).min(rest.len())..];
    }
    println!("vanished peer: session closed after {elapsed:?}");
    assert!(reset_3, "the second stream was not refused");
    assert!(closed, "the session of a silent peer was left open");
    healthy(&router).await.unwrap();
}
