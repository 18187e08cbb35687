//! Unit tests of the transaction registry.

use super::*;

fn metadata(tx: Option<&TransactionMetadata>) -> tonic::metadata::MetadataMap {
    let mut metadata = tonic::metadata::MetadataMap::new();
    if let Some(tx) = tx {
        metadata.insert(METADATA_KEY, tx.encode().parse().unwrap());
    }
    metadata
}

fn over_backchannel(id: Option<u64>) -> tonic::Extensions {
    let mut extensions = tonic::Extensions::new();
    extensions.insert(PeerInfo {
        remote_addr: "test".into(),
        backchannel_id: id,
    });
    extensions
}

fn start(base: &Path, knobs: TestKnobs) -> Transactions {
    Transactions::start(
        SessionRegistry::default(),
        base,
        Path::new("/bin/true"),
        knobs,
    )
}

#[tokio::test]
async fn calls_are_registered_while_they_run() {
    let base = tempfile::tempdir().unwrap();
    let transactions = start(base.path(), TestKnobs::default());
    let tx = TransactionMetadata {
        id: 3,
        node: "gitaly-1".into(),
        primary: false,
    };
    // No metadata: nothing to do.
    let none = transactions
        .begin(&metadata(None), &over_backchannel(Some(1)))
        .unwrap();
    assert!(none.is_none());
    // Metadata without a backchannel, or that does not decode: refused.
    for extensions in [over_backchannel(None), tonic::Extensions::new()] {
        let err = transactions
            .begin(&metadata(Some(&tx)), &extensions)
            .err()
            .unwrap();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    }
    let mut bad = tonic::metadata::MetadataMap::new();
    bad.insert(METADATA_KEY, "e30=".parse().unwrap());
    let err = transactions
        .begin(&bad, &over_backchannel(Some(1)))
        .err()
        .unwrap();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    let call = transactions
        .begin(&metadata(Some(&tx)), &over_backchannel(Some(1)))
        .unwrap()
        .unwrap();
    assert_eq!(call.metadata(), &tx);
    assert_eq!(transactions.calls_in_progress(), 1);
    let mut command = tokio::process::Command::new("git");
    call.configure(&mut command);
    let args: Vec<_> = command.as_std().get_args().collect();
    assert_eq!(args[0], "-c");
    assert!(args[1].to_string_lossy().starts_with("core.hooksPath="));
    let envs: Vec<_> = command.as_std().get_envs().collect();
    assert!(envs
        .iter()
        .any(|(k, v)| *k == protocol::TOKEN_ENV && v.is_some()));
    drop(call);
    assert_eq!(transactions.calls_in_progress(), 0);
    assert!(matches!(
        transactions
            .hook_vote("gone", Phase::Prepared, [0; 20])
            .await,
        Answer::Error(_)
    ));
    transactions.shutdown();
}

#[tokio::test]
async fn the_refusal_knob_fails_prepared_and_is_remembered() {
    let base = tempfile::tempdir().unwrap();
    let knobs = TestKnobs {
        hook_refuse: true,
        ..Default::default()
    };
    let transactions = start(base.path(), knobs);
    let tx = TransactionMetadata {
        id: 1,
        node: "n".into(),
        primary: true,
    };
    let call = transactions
        .begin(&metadata(Some(&tx)), &over_backchannel(Some(1)))
        .unwrap()
        .unwrap();
    let answer = transactions
        .hook_vote(&call.token, Phase::Prepared, [0; 20])
        .await;
    assert!(matches!(answer, Answer::Error(ref m) if m.contains(REFUSE_ENV)));
    let status = call.explain(Status::internal("git failed"));
    assert!(status.message().contains(REFUSE_ENV), "{status:?}");
}

#[tokio::test]
async fn without_the_hook_binary_transactional_calls_fail() {
    let base = tempfile::tempdir().unwrap();
    let transactions = Transactions::start(
        SessionRegistry::default(),
        base.path(),
        Path::new("/nonexistent/gitnode-hook"),
        TestKnobs::default(),
    );
    let tx = TransactionMetadata {
        id: 1,
        node: "n".into(),
        primary: true,
    };
    let err = transactions
        .begin(&metadata(Some(&tx)), &over_backchannel(Some(1)))
        .err()
        .unwrap();
    assert!(err.message().contains("gitnode-hook"), "{err:?}");
    assert!(transactions
        .begin(&metadata(None), &over_backchannel(None))
        .unwrap()
        .is_none());
}
