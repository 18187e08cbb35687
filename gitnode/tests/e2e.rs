//! gitnode across processes: real nodes, real git, pushes and clones through gitnode-ssh,
//! replication between nodes, auth and bad input.

// Test code: a test (or the harness under it) that panics on a broken precondition reports
// the failure where it happened, which is what a test should do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime};

use base64::Engine;
use praefect_wire::auth::{sign_v2, TokenInterceptor};
use praefect_wire::proto::ref_service_client::RefServiceClient;
use praefect_wire::proto::repository_service_client::RepositoryServiceClient;
use praefect_wire::proto::server_service_client::ServerServiceClient;
use praefect_wire::proto::*;
use testkit::gitnode::*;
use tonic::Code;

fn refs_of(dir: &Path) -> String {
    git(
        dir,
        &["for-each-ref", "--format=%(objectname) %(refname)"],
        &[],
    )
}

async fn checksum(node: &GitNode, path: &str) -> String {
    RepositoryServiceClient::new(node.channel())
        .calculate_checksum(CalculateChecksumRequest {
            repository: Some(node.repository(path)),
        })
        .await
        .unwrap()
        .into_inner()
        .checksum
}

async fn replicate(source: &GitNode, target: &GitNode, path: &str) -> Result<(), tonic::Status> {
    let servers = serde_json::json!({
        &source.storage: {"address": source.address, "token": TOKEN}
    });
    let mut request = tonic::Request::new(ReplicateRepositoryRequest {
        repository: Some(target.repository(path)),
        source: Some(source.repository(path)),
    });
    request.metadata_mut().insert(
        "gitaly-servers",
        base64::engine::general_purpose::STANDARD
            .encode(servers.to_string())
            .parse()
            .unwrap(),
    );
    RepositoryServiceClient::new(target.channel())
        .replicate_repository(request)
        .await
        .map(|_| ())
}

/// A local repository with several branches, tags and a few MB of objects.
fn build_history(dir: &Path) {
    git(dir, &["init", "--quiet", "--initial-branch=main", "."], &[]);
    for i in 0..3u64 {
        std::fs::write(dir.join(format!("blob-{i}.bin")), noise(i, 1_000_000)).unwrap();
        std::fs::write(dir.join("README"), format!("revision {i}\n")).unwrap();
        git(dir, &["add", "."], &[]);
        git(
            dir,
            &[
                "commit",
                "--quiet",
                "-m",
                &format!("commit {i}\n\nbody {i}"),
            ],
            &[],
        );
    }
    git(dir, &["tag", "v1.0"], &[]);
    git(dir, &["tag", "-a", "v1.1", "-m", "annotated"], &[]);
    for branch in ["feature-a", "feature-b"] {
        git(dir, &["checkout", "--quiet", "-b", branch, "main"], &[]);
        std::fs::write(dir.join(format!("{branch}.txt")), branch).unwrap();
        git(dir, &["add", "."], &[]);
        git(dir, &["commit", "--quiet", "-m", branch], &[]);
    }
    git(dir, &["checkout", "--quiet", "main"], &[]);
}

#[tokio::test(flavor = "multi_thread")]
async fn push_clone_replicate_and_converge() {
    let a = GitNode::start("gitaly-a");
    let b = GitNode::start("gitaly-b");
    let path = "@hashed/aa/bb/project.git";

    a.create_repository(path).await;
    let again = RepositoryServiceClient::new(a.channel())
        .create_repository(CreateRepositoryRequest {
            repository: Some(a.repository(path)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists);

    // Push a real history through the helper.
    let work = tempfile::tempdir().unwrap();
    build_history(work.path());
    let env_a = ssh_env(&a.address, &a.storage, path);
    git(
        work.path(),
        &["push", "--quiet", "ssh://gitaly/x", "--all"],
        &as_refs(&env_a),
    );
    git(
        work.path(),
        &["push", "--quiet", "ssh://gitaly/x", "--tags"],
        &as_refs(&env_a),
    );

    // Clone it back and compare every ref.
    let clone = tempfile::tempdir().unwrap();
    git(
        clone.path(),
        &["clone", "--quiet", "--mirror", "ssh://gitaly/x", "."],
        &as_refs(&env_a),
    );
    git(clone.path(), &["fsck", "--strict"], &[]);
    assert_eq!(refs_of(clone.path()), refs_of(&work.path().join(".git")));
    let cloned_refs = refs_of(clone.path());
    assert!(cloned_refs.contains("refs/tags/v1.1") && cloned_refs.contains("refs/heads/feature-b"));

    // Protocol v0 works too.
    let clone_v0 = tempfile::tempdir().unwrap();
    let mut env_v0 = env_a.clone();
    env_v0.push(("GIT_SSH_VARIANT".into(), "simple".into()));
    git(
        clone_v0.path(),
        &[
            "-c",
            "protocol.version=0",
            "clone",
            "--quiet",
            "--bare",
            "ssh://gitaly/x",
            ".",
        ],
        &as_refs(&env_v0),
    );

    // Replicate A -> B: same refs, same checksum, same default branch.
    replicate(&a, &b, path).await.unwrap();
    let sum_a = checksum(&a, path).await;
    assert_ne!(sum_a, "0".repeat(40));
    assert_eq!(checksum(&b, path).await, sum_a);
    let head_b = RefServiceClient::new(b.channel())
        .find_default_branch_name(FindDefaultBranchNameRequest {
            repository: Some(b.repository(path)),
            head_only: false,
        })
        .await
        .unwrap()
        .into_inner()
        .name;
    assert_eq!(head_b, b"refs/heads/main");

    // Delete a branch and force-push another; replicate again: B follows, deletions included.
    git(
        work.path(),
        &["push", "--quiet", "ssh://gitaly/x", ":feature-a"],
        &as_refs(&env_a),
    );
    git(work.path(), &["checkout", "--quiet", "feature-b"], &[]);
    git(work.path(), &["reset", "--quiet", "--hard", "main"], &[]);
    std::fs::write(work.path().join("rewritten.txt"), "rewritten").unwrap();
    git(work.path(), &["add", "."], &[]);
    git(work.path(), &["commit", "--quiet", "-m", "rewritten"], &[]);
    git(
        work.path(),
        &["push", "--quiet", "--force", "ssh://gitaly/x", "feature-b"],
        &as_refs(&env_a),
    );
    let sum_a2 = checksum(&a, path).await;
    assert_ne!(sum_a2, sum_a);
    assert_ne!(
        checksum(&b, path).await,
        sum_a2,
        "B must be behind before replication"
    );
    replicate(&a, &b, path).await.unwrap();
    assert_eq!(checksum(&b, path).await, sum_a2);
    // Idempotent.
    replicate(&a, &b, path).await.unwrap();
    assert_eq!(checksum(&b, path).await, sum_a2);
    let exists = RefServiceClient::new(b.channel())
        .ref_exists(RefExistsRequest {
            repository: Some(b.repository(path)),
            r#ref: b"refs/heads/feature-a".to_vec(),
        })
        .await
        .unwrap()
        .into_inner()
        .value;
    assert!(!exists, "deleted branch must be gone on B");

    // Clone from B equals a clone from A.
    let clone_b = tempfile::tempdir().unwrap();
    let env_b = ssh_env(&b.address, &b.storage, path);
    git(
        clone_b.path(),
        &["clone", "--quiet", "--mirror", "ssh://gitaly/x", "."],
        &as_refs(&env_b),
    );
    let clone_a = tempfile::tempdir().unwrap();
    git(
        clone_a.path(),
        &["clone", "--quiet", "--mirror", "ssh://gitaly/x", "."],
        &as_refs(&env_a),
    );
    assert_eq!(refs_of(clone_a.path()), refs_of(clone_b.path()));

    // ServerInfo reports the storage; the filesystem id is stable.
    let info = ServerServiceClient::new(a.channel())
        .server_info(ServerInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let status = &info.storage_statuses[0];
    assert_eq!(status.storage_name, "gitaly-a");
    assert!(status.readable && status.writeable);
    let again = ServerServiceClient::new(a.channel())
        .server_info(ServerInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        again.storage_statuses[0].filesystem_id,
        status.filesystem_id
    );
    assert!(!status.filesystem_id.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_are_checked_with_gitalys_codes() {
    let node = GitNode::start("gitaly-auth");
    let request = || RepositoryExistsRequest {
        repository: Some(node.repository("x.git")),
    };
    let plain = node.plain_channel().await;

    let missing = RepositoryServiceClient::new(plain.clone())
        .repository_exists(request())
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::Unauthenticated);
    assert_eq!(missing.message(), "authentication required");

    let with_token = |token: String| {
        let mut r = tonic::Request::new(request());
        r.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        r
    };
    let now = SystemTime::now();
    for (token, message) in [
        (
            sign_v2(b"wrong", now),
            "permission denied: wrong hmac signature",
        ),
        (
            sign_v2(TOKEN.as_bytes(), now - Duration::from_secs(60)),
            "permission denied: token has expired",
        ),
        (
            sign_v2(TOKEN.as_bytes(), now + Duration::from_secs(60)),
            "permission denied: token's validity window is in future",
        ),
    ] {
        let err = RepositoryServiceClient::new(plain.clone())
            .repository_exists(with_token(token))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        assert_eq!(err.message(), message);
    }
    let ok = RepositoryServiceClient::new(plain.clone())
        .repository_exists(with_token(sign_v2(TOKEN.as_bytes(), now)))
        .await
        .unwrap();
    assert!(!ok.into_inner().exists);

    // Health needs no token.
    let health = tonic_health::pb::health_client::HealthClient::new(plain)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_clear_errors_and_the_node_keeps_serving() {
    let node = GitNode::start("gitaly-bad");
    let outside = tempfile::tempdir().unwrap();
    let mut client = RepositoryServiceClient::new(node.channel());
    for (relative, storage) in [
        ("../escape.git", "gitaly-bad"),
        ("a/../../escape.git", "gitaly-bad"),
        (outside.path().to_str().unwrap(), "gitaly-bad"),
        ("+gitnode/tmp/x", "gitaly-bad"),
        ("", "gitaly-bad"),
        ("ok.git", "no-such-storage"),
        ("ok.git", ""),
    ] {
        let err = client
            .create_repository(CreateRepositoryRequest {
                repository: Some(Repository {
                    storage_name: storage.into(),
                    relative_path: relative.into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{relative:?} on {storage:?}: {err:?}"
        );
    }
    assert!(
        std::fs::read_dir(outside.path()).unwrap().next().is_none(),
        "nothing written outside"
    );
    let err = client
        .create_repository(CreateRepositoryRequest {
            repository: Some(Repository {
                storage_name: "no-such-storage".into(),
                relative_path: "ok.git".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        err.message().contains("storage not found"),
        "{}",
        err.message()
    );

    // Missing repositories are NotFound.
    let err = client
        .calculate_checksum(CalculateChecksumRequest {
            repository: Some(node.repository("missing.git")),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // A frame that is not protobuf: InvalidArgument / Internal from the decoder, not a crash.
    let mut raw = tonic::client::Grpc::new(node.channel());
    raw.ready().await.unwrap();
    let garbage = raw
        .unary::<Vec<u8>, Vec<u8>, _>(
            tonic::Request::new(vec![0xff, 0xff, 0xff, 0x0f, 0x01]),
            "/gitaly.RepositoryService/RepositoryExists"
                .parse()
                .unwrap(),
            RawCodec,
        )
        .await
        .unwrap_err();
    assert_ne!(garbage.code(), Code::Ok);

    // Replicating from a source that does not exist leaves no repository behind.
    let source = GitNode::start("gitaly-src");
    let err = replicate(&source, &node, "never-created.git")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.message(), "invalid source repository");
    let exists = client
        .repository_exists(RepositoryExistsRequest {
            repository: Some(node.repository("never-created.git")),
        })
        .await
        .unwrap()
        .into_inner()
        .exists;
    assert!(!exists);

    // A client that disconnects in the middle of a push leaves the repository as it was.
    let path = "interrupted.git";
    client
        .create_repository(CreateRepositoryRequest {
            repository: Some(node.repository(path)),
            ..Default::default()
        })
        .await
        .unwrap();
    {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(SshReceivePackRequest {
            repository: Some(node.repository(path)),
            stdin: b"00a00000000000000000000000000000000000000000 1111111111111111111111111111111111111111 refs/heads/main\0 report-status\n0000PACK\0\0\0\x02".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
        let mut ssh =
            praefect_wire::proto::ssh_service_client::SshServiceClient::new(node.channel());
        let call = tokio::spawn(async move {
            ssh.ssh_receive_pack(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        });
        // Kept: the scenario, a push left half-sent for a while before the client goes
        // away (nothing to wait on: the node shows no sign of a push in progress).
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(tx);
        call.abort();
    }
    // Kept: what is checked is an absence (no ref appears after the client went away),
    // which takes time to observe.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        checksum(&node, path).await,
        "0".repeat(40),
        "no ref appeared"
    );
    // Still serving.
    let exists = client
        .repository_exists(RepositoryExistsRequest {
            repository: Some(node.repository(path)),
        })
        .await
        .unwrap()
        .into_inner()
        .exists;
    assert!(exists);
}

/// Sends and receives raw message bytes, to put malformed protobuf on the wire.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf;
        let mut out = vec![0u8; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn smart_http_advertises_refs_and_serves_packs_over_the_sidechannel() {
    use praefect_wire::backchannel::{dial_lazy, yamux_config, ClientHandler};
    use praefect_wire::proto::smart_http_service_client::SmartHttpServiceClient;
    use praefect_wire::{pktline, sidechannel};
    use tokio::io::AsyncReadExt;

    let node = GitNode::start("gitaly-http");
    let path = "http.git";
    node.create_repository(path).await;
    let work = tempfile::tempdir().unwrap();
    build_history(work.path());
    let env = ssh_env(&node.address, &node.storage, path);
    git(
        work.path(),
        &["push", "--quiet", "ssh://gitaly/x", "main"],
        &as_refs(&env),
    );
    let head = git(work.path(), &["rev-parse", "main"], &[])
        .trim()
        .to_string();

    let handler = ClientHandler::default();
    let sidechannels = handler.sidechannels.clone();
    let channel = dial_lazy(&node.address, yamux_config(0, 256), handler).unwrap();
    let mut client = SmartHttpServiceClient::with_interceptor(
        channel,
        praefect_wire::auth::TokenInterceptor::new(TOKEN),
    );

    let mut advertisement = Vec::new();
    let mut stream = client
        .info_refs_upload_pack(InfoRefsRequest {
            repository: Some(node.repository(path)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(message) = stream.message().await.unwrap() {
        advertisement.extend_from_slice(&message.data);
    }
    let text = String::from_utf8_lossy(&advertisement);
    assert!(
        text.starts_with("001e# service=git-upload-pack\n0000"),
        "{text}"
    );
    assert!(text.contains(&format!("{head} refs/heads/main")), "{text}");

    // A stateless (HTTP-style) fetch of main: wants, done, then the pack comes back raw.
    let mut waiter = sidechannels.register();
    let mut request = tonic::Request::new(PostUploadPackWithSidechannelRequest {
        repository: Some(node.repository(path)),
        ..Default::default()
    });
    request.metadata_mut().insert(
        sidechannel::METADATA_KEY,
        waiter.id().to_string().parse().unwrap(),
    );
    let call = tokio::spawn(async move { client.post_upload_pack_with_sidechannel(request).await });
    let channel = waiter.connected().await.unwrap();
    let (mut from_node, mut to_node) = tokio::io::split(channel);
    let mut body = Vec::new();
    pktline::write_data(&mut body, format!("want {head}\n").as_bytes())
        .await
        .unwrap();
    body.extend_from_slice(b"0000");
    pktline::write_data(&mut body, b"done\n").await.unwrap();
    pktline::copy_framed(&mut &body[..], &mut to_node)
        .await
        .unwrap();
    let mut response = Vec::new();
    from_node.read_to_end(&mut response).await.unwrap();
    call.await.unwrap().unwrap();
    assert!(
        response.windows(4).any(|w| w == b"PACK"),
        "no pack in {} bytes",
        response.len()
    );
    assert!(
        response.len() > 3_000_000,
        "the pack holds the history ({} bytes)",
        response.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn push_and_clone_over_tls_with_the_backchannel_inside() {
    let certs_dir = tempfile::tempdir().unwrap();
    let certs = TestCerts::generate(certs_dir.path());
    let node = GitNode::start_with("gitaly-tls", Some(&certs));
    let tls_address = node.tls_address.clone().expect("TLS listener");
    let path = "tls.git";
    node.create_repository(path).await;
    let work = tempfile::tempdir().unwrap();
    build_history(work.path());
    let mut env = ssh_env(&tls_address, &node.storage, path);
    env.push(("SSL_CERT_FILE".into(), certs.ca.display().to_string()));
    git(
        work.path(),
        &["push", "--quiet", "ssh://gitaly/x", "main", "feature-a"],
        &as_refs(&env),
    );
    let clone = tempfile::tempdir().unwrap();
    git(
        clone.path(),
        &["clone", "--quiet", "--mirror", "ssh://gitaly/x", "."],
        &as_refs(&env),
    );
    let refs = refs_of(clone.path());
    assert!(
        refs.contains("refs/heads/main") && refs.contains("refs/heads/feature-a"),
        "{refs}"
    );

    // Trusting another CA only, the node's certificate is refused.
    let other_dir = tempfile::tempdir().unwrap();
    let other = TestCerts::generate(other_dir.path());
    let output = std::process::Command::new("git")
        .current_dir(clone.path())
        .args(["fetch", "--quiet", "ssh://gitaly/x"])
        .envs(as_refs(&ssh_env(&tls_address, &node.storage, path)))
        .env("SSL_CERT_FILE", &other.ca)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("certificate") || stderr.contains("Unknown"),
        "{stderr}"
    );
}

/// `h2-relay`, the bench's yardstick for the HTTP/2 library, in front of a node: unary
/// answers and error statuses come through as they are, and a push (a stream each way)
/// lands. A relay that broke calls would make the bench's floor a floor of failures.
#[tokio::test(flavor = "multi_thread")]
async fn h2_relay_passes_calls_and_pushes_through_unchanged() {
    let node = GitNode::start("gitaly-relay");
    let port = testkit::ports::free_port();
    let node_addr = node.address.trim_start_matches("tcp://").to_string();
    let _relay = KillOnDrop(
        std::process::Command::new(binary("h2-relay"))
            .args([format!("127.0.0.1:{port}"), node_addr])
            .spawn()
            .unwrap(),
    );
    let relay_address = format!("tcp://127.0.0.1:{port}");
    testkit::wait::wait_until(WAIT, "h2-relay listens", async || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await;
    let through_relay = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();

    // An error status (with its message) comes through unchanged.
    let refused = RefServiceClient::new(through_relay.clone())
        .find_default_branch_name(FindDefaultBranchNameRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert_eq!(refused.message(), "authentication required");

    // A push through the relay, over plain HTTP/2 (the relay has no backchannel).
    let path = "relayed.git";
    node.create_repository(path).await;
    let work = tempfile::tempdir().unwrap();
    build_history(work.path());
    let mut env = ssh_env(&relay_address, &node.storage, path);
    env.push(("GITALY_PLAIN_HTTP2".into(), "1".into()));
    // Under `timeout`: a relay that waited for the whole request before the answer would
    // hang the push (the client waits for the advertisement first).
    let pushed = std::process::Command::new("timeout")
        .args(["60", "git", "push", "--quiet", "ssh://gitaly/x", "--all"])
        .current_dir(work.path())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .status()
        .unwrap();
    assert!(pushed.success(), "push through h2-relay: {pushed}");
    let source_main = common::resolve(&work.path().join(".git"), "refs/heads/main");
    assert!(source_main.is_some());
    assert_eq!(
        common::resolve(&node.root.join(path), "refs/heads/main"),
        source_main
    );

    // Many unary calls in a row on one connection, each answered like the direct one.
    let request = || FindDefaultBranchNameRequest {
        repository: Some(node.repository(path)),
        ..Default::default()
    };
    let signed = TokenInterceptor::new(TOKEN);
    let direct = RefServiceClient::with_interceptor(node.plain_channel().await, signed.clone())
        .find_default_branch_name(request())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(direct.name, b"refs/heads/main");
    let mut relayed_client = RefServiceClient::with_interceptor(through_relay, signed);
    for _ in 0..50 {
        let relayed = relayed_client
            .find_default_branch_name(request())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(relayed, direct);
    }
}

/// A child process killed when the test ends, failed or not (a relay left running would
/// hold the test's output open).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
