//! gitnode in reference transactions, across processes: a real gitnode and real git, with
//! this test acting as the router (RefTransaction served on the backchannel, votes recorded
//! and answered from a script).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use common::*;
use praefect_wire::auth::TokenInterceptor;
use praefect_wire::proto::repository_service_client::RepositoryServiceClient;
use praefect_wire::proto::smart_http_service_client::SmartHttpServiceClient;
use praefect_wire::proto::vote_transaction_response::TransactionState;
use praefect_wire::proto::*;
use testkit::gitnode::{git, GitNode, TOKEN};
use tonic::Code;

fn repo_dir(node: &GitNode, path: &str) -> PathBuf {
    node.root.join(path)
}

fn write_ref(node: &GitNode, path: &str, name: &str, revision: &str) -> WriteRefRequest {
    WriteRefRequest {
        repository: Some(node.repository(path)),
        r#ref: name.as_bytes().to_vec(),
        revision: revision.as_bytes().to_vec(),
        ..Default::default()
    }
}

/// The temporary directories gitnode left in a storage.
fn leftovers(node: &GitNode) -> usize {
    std::fs::read_dir(node.root.join("+gitnode/tmp"))
        .unwrap()
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn write_ref_votes_prepared_then_committed_on_the_update() {
    let node = GitNode::start("gitaly-tx");
    let router = Router::default();
    let mut repos = RepositoryServiceClient::new(router.channel(&node));
    let path = "write-ref.git";
    node.create_repository(path).await;
    let dir = repo_dir(&node, path);
    let first = make_commit(&dir, "a", "one");

    repos
        .write_ref(in_transaction(
            write_ref(&node, path, "refs/heads/main", &first),
            1,
            "gitaly-tx",
        ))
        .await
        .unwrap();
    let hash = router.two_phase_hash(1, "gitaly-tx");
    // The hook votes the SHA-1 of git's queued updates, exactly: HEAD points to main, so
    // git updates it too (for its reflog).
    assert_eq!(
        hash,
        sha1_of(&format!(
            "{ZERO} {first} refs/heads/main\n{ZERO} {first} HEAD\n"
        ))
    );
    assert_eq!(resolve(&dir, "refs/heads/main").as_deref(), Some(&*first));

    // An update checked against the old value votes on both values.
    let second = make_commit(&dir, "b", "two");
    let mut request = write_ref(&node, path, "refs/heads/main", &second);
    request.old_revision = first.as_bytes().to_vec();
    repos
        .write_ref(in_transaction(request, 2, "gitaly-tx"))
        .await
        .unwrap();
    assert_eq!(
        router.two_phase_hash(2, "gitaly-tx"),
        sha1_of(&format!(
            "{first} {second} refs/heads/main\n{first} {second} HEAD\n"
        ))
    );

    // HEAD: symbolic-ref votes too, twice.
    repos
        .write_ref(in_transaction(
            write_ref(&node, path, "HEAD", "refs/heads/feature"),
            3,
            "gitaly-tx",
        ))
        .await
        .unwrap();
    router.two_phase_hash(3, "gitaly-tx");
    assert_eq!(
        std::fs::read_to_string(dir.join("HEAD")).unwrap().trim(),
        "ref: refs/heads/feature"
    );
    assert_eq!(router.votes().len(), 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_aborted_or_stopped_vote_fails_the_write_and_keeps_the_ref() {
    let node = GitNode::start("gitaly-abort");
    let router = Router::default();
    let mut repos = RepositoryServiceClient::new(router.channel(&node));
    let path = "abort.git";
    node.create_repository(path).await;
    let dir = repo_dir(&node, path);
    let commit = make_commit(&dir, "a", "one");

    for (id, state) in [(1, TransactionState::Abort), (2, TransactionState::Stop)] {
        router.answer(&[state]);
        let err = repos
            .write_ref(in_transaction(
                write_ref(&node, path, "refs/heads/main", &commit),
                id,
                "gitaly-abort",
            ))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Aborted, "{err:?}");
        let votes = router.votes_of(id);
        assert_eq!(votes.len(), 1, "no committed vote: {votes:?}");
        assert_eq!(votes[0].phase, PREPARED);
        assert_eq!(resolve(&dir, "refs/heads/main"), None, "ref unchanged");
    }
    assert_eq!(
        node.root.join(path),
        dir,
        "the repository is still where it was"
    );
}

/// A pack with `commit` and what it needs, from a scratch repository.
fn pack_of(scratch: &Path, commit: &str) -> Vec<u8> {
    git_stdin(
        scratch,
        &["pack-objects", "--stdout", "--revs", "--quiet"],
        format!("{commit}\n").as_bytes(),
    )
}

/// A stateless receive-pack request: one ref command and the pack.
async fn push_request(old: &str, new: &str, pack: &[u8]) -> Vec<u8> {
    let mut data = Vec::new();
    praefect_wire::pktline::write_data(
        &mut data,
        format!("{old} {new} refs/heads/main\0 report-status\n").as_bytes(),
    )
    .await
    .unwrap();
    data.extend_from_slice(b"0000");
    data.extend_from_slice(pack);
    data
}

/// PostReceivePack with one request message: receive-pack's report, or the call's error.
async fn post_receive_pack(
    client: &mut SmartHttpServiceClient<testkit::gitnode::Authed>,
    request: tonic::Request<PostReceivePackRequest>,
) -> Result<String, tonic::Status> {
    let (metadata, extensions, message) = request.into_parts();
    let stream = tokio_stream::iter(vec![message]);
    let request = tonic::Request::from_parts(metadata, extensions, stream);
    let mut responses = client.post_receive_pack(request).await?.into_inner();
    let mut out = Vec::new();
    while let Some(message) = responses.message().await? {
        out.extend_from_slice(&message.data);
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_push_votes_through_receive_pack() {
    let node = GitNode::start("gitaly-push");
    let router = Router::default();
    let mut http = SmartHttpServiceClient::new(router.channel(&node));
    let path = "push.git";
    node.create_repository(path).await;
    let scratch = tempfile::tempdir().unwrap();
    git(scratch.path(), &["init", "--quiet", "--bare", "."], &[]);
    let commit = make_commit(scratch.path(), "pushed", "content");
    let pack = pack_of(scratch.path(), &commit);

    let data = push_request(ZERO, &commit, &pack).await;
    let message = PostReceivePackRequest {
        repository: Some(node.repository(path)),
        data,
        ..Default::default()
    };
    let report = post_receive_pack(&mut http, in_transaction(message, 7, "gitaly-push"))
        .await
        .unwrap();
    assert!(report.contains("ok refs/heads/main"), "{report}");
    assert_eq!(
        router.two_phase_hash(7, "gitaly-push"),
        sha1_of(&format!(
            "{ZERO} {commit} refs/heads/main\n{ZERO} {commit} HEAD\n"
        ))
    );
    let dir = repo_dir(&node, path);
    assert_eq!(resolve(&dir, "refs/heads/main").as_deref(), Some(&*commit));

    // ABORT: the hook fails the update, receive-pack fails, the ref does not move.
    let other = make_commit(scratch.path(), "other", "more");
    let pack = pack_of(scratch.path(), &other);
    router.answer(&[TransactionState::Abort]);
    let message = PostReceivePackRequest {
        repository: Some(node.repository(path)),
        data: push_request(&commit, &other, &pack).await,
        ..Default::default()
    };
    let err = post_receive_pack(&mut http, in_transaction(message, 8, "gitaly-push"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    assert_eq!(router.votes_of(8).len(), 1);
    assert_eq!(resolve(&dir, "refs/heads/main").as_deref(), Some(&*commit));
}

#[tokio::test(flavor = "multi_thread")]
async fn create_repository_votes_on_the_new_repository() {
    let node = GitNode::start("gitaly-create");
    let router = Router::default();
    let mut repos = RepositoryServiceClient::new(router.channel(&node));
    let create = |path: &str| CreateRepositoryRequest {
        repository: Some(node.repository(path)),
        default_branch: b"main".to_vec(),
        ..Default::default()
    };
    repos
        .create_repository(in_transaction(create("new.git"), 1, "gitaly-create"))
        .await
        .unwrap();
    router.two_phase_hash(1, "gitaly-create");
    assert!(repo_dir(&node, "new.git").join("HEAD").is_file());

    router.answer(&[TransactionState::Abort]);
    let err = repos
        .create_repository(in_transaction(create("aborted.git"), 2, "gitaly-create"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    assert_eq!(err.message(), "transaction was aborted");
    assert_eq!(router.votes_of(2).len(), 1);
    assert!(!repo_dir(&node, "aborted.git").exists());
    assert_eq!(leftovers(&node), 0, "the temporary repository is removed");
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_without_a_transaction_do_not_vote() {
    let node = GitNode::start("gitaly-plain");
    let router = Router::default();
    let mut repos = RepositoryServiceClient::new(router.channel(&node));
    let path = "plain.git";
    repos
        .create_repository(CreateRepositoryRequest {
            repository: Some(node.repository(path)),
            ..Default::default()
        })
        .await
        .unwrap();
    let dir = repo_dir(&node, path);
    let commit = make_commit(&dir, "a", "one");
    repos
        .write_ref(write_ref(&node, path, "refs/heads/main", &commit))
        .await
        .unwrap();
    repos
        .write_ref(write_ref(&node, path, "HEAD", "refs/heads/main"))
        .await
        .unwrap();
    assert_eq!(resolve(&dir, "refs/heads/main").as_deref(), Some(&*commit));
    assert!(router.votes().is_empty(), "{:?}", router.votes());

    // A transaction needs the backchannel to vote on: without one, FailedPrecondition.
    let plain = node.plain_channel().await;
    let mut plain = RepositoryServiceClient::with_interceptor(plain, TokenInterceptor::new(TOKEN));
    let err = plain
        .write_ref(in_transaction(
            write_ref(&node, path, "refs/heads/other", &commit),
            9,
            "gitaly-plain",
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("backchannel"), "{}", err.message());
    assert_eq!(resolve(&dir, "refs/heads/other"), None);
}

/// Creates `path` and points `main` at the same commit on `node`, each in a transaction;
/// returns the two hashes (creation, update).
async fn same_changes(node: &GitNode, router: &Router, path: &str, id: u64) -> [Vec<u8>; 2] {
    let mut repos = RepositoryServiceClient::new(router.channel(node));
    repos
        .create_repository(in_transaction(
            CreateRepositoryRequest {
                repository: Some(node.repository(path)),
                default_branch: b"main".to_vec(),
                ..Default::default()
            },
            id,
            &node.storage,
        ))
        .await
        .unwrap();
    let commit = make_commit(&repo_dir(node, path), "a", "same");
    repos
        .write_ref(in_transaction(
            write_ref(node, path, "refs/heads/main", &commit),
            id + 1,
            &node.storage,
        ))
        .await
        .unwrap();
    [
        router.two_phase_hash(id, &node.storage),
        router.two_phase_hash(id + 1, &node.storage),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn nodes_vote_alike_unless_salted() {
    let a = GitNode::start("gitaly-a");
    let b = GitNode::start("gitaly-b");
    let mut salted = GitNode::start_with_env("gitaly-c", &[("GITNODE_TEST_VOTE_SALT", "x")]);
    let router = Router::default();
    let path = "@hashed/same.git";
    let on_a = same_changes(&a, &router, path, 10).await;
    let on_b = same_changes(&b, &router, path, 20).await;
    let on_c = same_changes(&salted, &router, path, 30).await;
    assert_eq!(on_a, on_b, "identical requests, identical votes");
    assert_ne!(on_a[0], on_c[0]);
    assert_ne!(on_a[1], on_c[1]);

    // The knob survives a restart; without it, the node votes like its peers again.
    salted.restart();
    let again = same_changes(&salted, &router, "@hashed/again.git", 40).await;
    assert_ne!(again[1], on_a[1]);
    salted.set_env(&[]);
    salted.restart();
    let plain = same_changes(&salted, &router, "@hashed/plain.git", 50).await;
    assert_eq!(plain[1], on_a[1]);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_refusing_hook_knob_fails_prepared_without_voting() {
    let node = GitNode::start_with_env("gitaly-refuse", &[("GITNODE_TEST_HOOK_REFUSE", "1")]);
    let router = Router::default();
    let mut repos = RepositoryServiceClient::new(router.channel(&node));
    let path = "refuse.git";
    node.create_repository(path).await;
    let dir = repo_dir(&node, path);
    let commit = make_commit(&dir, "a", "one");
    let err = repos
        .write_ref(in_transaction(
            write_ref(&node, path, "refs/heads/main", &commit),
            1,
            "gitaly-refuse",
        ))
        .await
        .unwrap_err();
    assert_ne!(err.code(), Code::Ok);
    assert!(
        err.message().contains("GITNODE_TEST_HOOK_REFUSE"),
        "{err:?}"
    );
    assert!(router.votes().is_empty());
    assert_eq!(resolve(&dir, "refs/heads/main"), None);
    // Outside transactions the hook is not even configured.
    repos
        .write_ref(write_ref(&node, path, "refs/heads/main", &commit))
        .await
        .unwrap();
    assert_eq!(resolve(&dir, "refs/heads/main").as_deref(), Some(&*commit));
}

async fn replicate_in(
    source: &GitNode,
    target: &GitNode,
    router: &Router,
    path: &str,
    id: u64,
) -> Result<(), tonic::Status> {
    use base64::Engine;
    let servers = serde_json::json!({
        &source.storage: {"address": source.address, "token": TOKEN}
    });
    let mut request = in_transaction(
        ReplicateRepositoryRequest {
            repository: Some(target.repository(path)),
            source: Some(source.repository(path)),
        },
        id,
        &target.storage,
    );
    request.metadata_mut().insert(
        "gitaly-servers",
        base64::engine::general_purpose::STANDARD
            .encode(servers.to_string())
            .parse()
            .unwrap(),
    );
    RepositoryServiceClient::new(router.channel(target))
        .replicate_repository(request)
        .await
        .map(|_| ())
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

#[tokio::test(flavor = "multi_thread")]
async fn replication_votes_on_the_replicas_state() {
    let source = GitNode::start("gitaly-source");
    let target = GitNode::start("gitaly-target");
    let router = Router::default();
    let path = "replicated.git";
    source.create_repository(path).await;
    let mut writes = RepositoryServiceClient::new(source.channel());
    let source_dir = repo_dir(&source, path);
    let first = make_commit(&source_dir, "a", "one");
    writes
        .write_ref(write_ref(&source, path, "refs/heads/main", &first))
        .await
        .unwrap();

    // A new replica: built aside, voted on, moved into place.
    replicate_in(&source, &target, &router, path, 1)
        .await
        .unwrap();
    let created = router.two_phase_hash(1, "gitaly-target");
    assert_eq!(checksum(&target, path).await, checksum(&source, path).await);
    // Again, into the existing replica: nothing changes, and the vote is the same.
    replicate_in(&source, &target, &router, path, 2)
        .await
        .unwrap();
    assert_eq!(router.two_phase_hash(2, "gitaly-target"), created);

    // Changes: a moved branch, a new one.
    let second = make_commit(&source_dir, "b", "two");
    writes
        .write_ref(write_ref(&source, path, "refs/heads/main", &second))
        .await
        .unwrap();
    writes
        .write_ref(write_ref(&source, path, "refs/heads/feature", &first))
        .await
        .unwrap();
    replicate_in(&source, &target, &router, path, 3)
        .await
        .unwrap();
    assert_ne!(router.two_phase_hash(3, "gitaly-target"), created);
    assert_eq!(checksum(&target, path).await, checksum(&source, path).await);

    // ABORT in prepared: the replica's refs stay as they were.
    let before = checksum(&target, path).await;
    writes
        .write_ref(write_ref(&source, path, "refs/heads/late", &second))
        .await
        .unwrap();
    router.answer(&[TransactionState::Abort]);
    let err = replicate_in(&source, &target, &router, path, 4)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    assert_eq!(router.votes_of(4).len(), 1);
    assert_eq!(checksum(&target, path).await, before);
    assert_eq!(resolve(&repo_dir(&target, path), "refs/heads/late"), None);

    // A deleted branch goes from the replica too.
    let mut delete = write_ref(&source, path, "refs/heads/feature", ZERO);
    delete.old_revision = first.as_bytes().to_vec();
    writes.write_ref(delete).await.unwrap();
    replicate_in(&source, &target, &router, path, 5)
        .await
        .unwrap();
    router.two_phase_hash(5, "gitaly-target");
    assert_eq!(checksum(&target, path).await, checksum(&source, path).await);
    assert_eq!(
        resolve(&repo_dir(&target, path), "refs/heads/feature"),
        None
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn deletions_vote_alike_whether_the_ref_is_packed_or_loose() {
    let node = GitNode::start("gitaly-delete");
    let router = Router::default();
    let mut repos = RepositoryServiceClient::new(router.channel(&node));
    let mut hashes = Vec::new();
    for (id, path, packed) in [(1, "packed.git", true), (2, "loose.git", false)] {
        node.create_repository(path).await;
        let dir = repo_dir(&node, path);
        let commit = make_commit(&dir, "a", "one");
        git(&dir, &["update-ref", "refs/heads/feature", &commit], &[]);
        if packed {
            git(&dir, &["pack-refs", "--all"], &[]);
            assert!(!dir.join("refs/heads/feature").exists());
        }
        let mut request = write_ref(&node, path, "refs/heads/feature", ZERO);
        request.old_revision = commit.as_bytes().to_vec();
        repos
            .write_ref(in_transaction(request, id, "gitaly-delete"))
            .await
            .unwrap();
        assert_eq!(resolve(&dir, "refs/heads/feature"), None);
        let hash = router.two_phase_hash(id, "gitaly-delete");
        assert_eq!(
            hash,
            sha1_of(&format!("{commit} {ZERO} refs/heads/feature\n"))
        );
        hashes.push(hash);
    }
    assert_eq!(hashes[0], hashes[1]);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_ssh_push_votes_through_receive_pack() {
    use praefect_wire::proto::ssh_service_client::SshServiceClient;
    let node = GitNode::start("gitaly-ssh-push");
    let router = Router::default();
    let mut ssh = SshServiceClient::new(router.channel(&node));
    let path = "ssh-push.git";
    node.create_repository(path).await;
    let scratch = tempfile::tempdir().unwrap();
    git(scratch.path(), &["init", "--quiet", "--bare", "."], &[]);
    let commit = make_commit(scratch.path(), "pushed", "content");
    let message = SshReceivePackRequest {
        repository: Some(node.repository(path)),
        stdin: push_request(ZERO, &commit, &pack_of(scratch.path(), &commit)).await,
        ..Default::default()
    };
    let (metadata, extensions, message) =
        in_transaction(message, 3, "gitaly-ssh-push").into_parts();
    let request =
        tonic::Request::from_parts(metadata, extensions, tokio_stream::iter(vec![message]));
    let mut responses = ssh.ssh_receive_pack(request).await.unwrap().into_inner();
    let (mut stdout, mut exit) = (Vec::new(), None);
    while let Some(message) = responses.message().await.unwrap() {
        stdout.extend_from_slice(&message.stdout);
        exit = exit.or(message.exit_status.map(|s| s.value));
    }
    assert_eq!(exit, Some(0), "{}", String::from_utf8_lossy(&stdout));
    assert_eq!(
        router.two_phase_hash(3, "gitaly-ssh-push"),
        sha1_of(&format!(
            "{ZERO} {commit} refs/heads/main\n{ZERO} {commit} HEAD\n"
        ))
    );
    assert_eq!(
        resolve(&repo_dir(&node, path), "refs/heads/main").as_deref(),
        Some(&*commit)
    );
}

/// The hook binary's own rules, without gitnode: no environment, a phase nobody votes in, or
/// only force deletions → exit 0 without connecting; otherwise it needs gitnode's answer.
#[test]
fn the_hook_votes_only_when_it_must() {
    let hook = testkit::gitnode::binary("gitnode-hook");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("missing.sock");
    let run = |args: &[&str], env: bool, stdin: &str| {
        use std::io::Write;
        let mut command = std::process::Command::new(&hook);
        command
            .args(args)
            .env_remove("GITNODE_HOOK_SOCKET")
            .env_remove("GITNODE_HOOK_TOKEN")
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        if env {
            command
                .env("GITNODE_HOOK_SOCKET", &socket)
                .env("GITNODE_HOOK_TOKEN", "token");
        }
        let mut child = command.spawn().unwrap();
        let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
        let output = child.wait_with_output().unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let update = format!("{ZERO} {} refs/heads/main\n", "1".repeat(40));
    let force_deletion = format!("{ZERO} {ZERO} refs/heads/main\n");
    assert!(run(&["prepared"], false, &update).0, "no environment");
    for phase in ["preparing", "aborted"] {
        assert!(run(&[phase], true, &update).0, "{phase}");
    }
    assert!(run(&["prepared"], true, &force_deletion).0);
    for phase in ["prepared", "committed"] {
        let (ok, stderr) = run(&[phase], true, &update);
        assert!(!ok, "{phase}: the socket is missing, so no vote");
        assert!(stderr.contains("gitnode-hook"), "{stderr}");
    }
}
