//! gitnode against hostile requests, across processes: git config options that would run a
//! command on the node, and relative paths through symbolic links whose targets do not exist
//! yet. After each, the node still serves a normal call.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use praefect_wire::proto::repository_service_client::RepositoryServiceClient;
use praefect_wire::proto::smart_http_service_client::SmartHttpServiceClient;
use praefect_wire::proto::*;
use testkit::gitnode::*;
use tonic::Code;

/// The ref advertisement of InfoRefsUploadPack with `config`, or its error.
async fn advertise(node: &GitNode, path: &str, config: &[&str]) -> Result<String, tonic::Status> {
    let mut client = SmartHttpServiceClient::new(node.channel());
    let mut stream = client
        .info_refs_upload_pack(InfoRefsRequest {
            repository: Some(node.repository(path)),
            git_config_options: config.iter().map(|c| c.to_string()).collect(),
            git_protocol: String::new(),
        })
        .await?
        .into_inner();
    let mut data = Vec::new();
    while let Some(message) = stream.message().await? {
        data.extend(message.data);
    }
    Ok(String::from_utf8_lossy(&data).into_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn pack_config_options_are_limited_to_harmless_keys() {
    let node = GitNode::start("gitaly-config");
    let mut repos = RepositoryServiceClient::new(node.channel());
    repos
        .create_repository(CreateRepositoryRequest {
            repository: Some(node.repository("cfg.git")),
            ..Default::default()
        })
        .await
        .unwrap();
    let marker = tempfile::tempdir().unwrap();
    let ran = marker.path().join("ran");
    let hook = format!("uploadpack.packObjectsHook=touch {}", ran.display());
    for config in [
        hook.as_str(),
        "core.sshCommand=touch /tmp/never",
        "core.hooksPath=/tmp",
        "protocol.ext.allow=always",
        "uploadpack.allowFilter=true\ncore.hooksPath=/tmp",
    ] {
        let err = advertise(&node, "cfg.git", &[config]).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{config:?}: {err:?}");
        assert!(
            err.message().starts_with("git config option not allowed")
                || err.message().starts_with("invalid value"),
            "{}",
            err.message()
        );
        assert!(!err.message().contains("touch"), "{}", err.message());
    }
    assert!(!ran.exists());
    // An allowed key takes effect (the advertisement offers `filter`), in any case.
    let plain = advertise(&node, "cfg.git", &[]).await.unwrap();
    let filtered = advertise(&node, "cfg.git", &["uploadpack.allowFilter=true"])
        .await
        .unwrap();
    let shouted = advertise(&node, "cfg.git", &["UPLOADPACK.ALLOWFILTER=true"])
        .await
        .unwrap();
    assert!(!plain.contains(" filter"), "{plain}");
    assert!(
        filtered.contains(" filter") || filtered.contains("filter "),
        "{filtered}"
    );
    assert_eq!(filtered, shouted);
}

#[tokio::test(flavor = "multi_thread")]
async fn paths_through_symlinks_are_refused_even_to_missing_targets() {
    let node = GitNode::start("gitaly-links");
    let outside = tempfile::tempdir().unwrap();
    // A link to a place that does not exist yet, and a link to an existing directory
    // followed by a name that does not exist yet: neither can be resolved before creation.
    std::os::unix::fs::symlink(outside.path().join("later.git"), node.root.join("dangling"))
        .unwrap();
    std::fs::create_dir_all(node.root.join("group")).unwrap();
    std::os::unix::fs::symlink(outside.path(), node.root.join("group/out")).unwrap();
    let mut client = RepositoryServiceClient::new(node.channel());
    for path in [
        "dangling",
        "dangling/x.git",
        "group/out/x.git",
        "group/out/a/b.git",
    ] {
        let err = client
            .create_repository(CreateRepositoryRequest {
                repository: Some(node.repository(path)),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{path}: {err:?}");
        assert_eq!(
            err.message(),
            "relative path goes through a symbolic link",
            "{path}"
        );
        assert!(!err.message().contains(outside.path().to_str().unwrap()));
    }
    assert!(
        std::fs::read_dir(outside.path()).unwrap().next().is_none(),
        "nothing written outside the storage"
    );
    // Still serving: a repository in a real directory next to the link is created.
    client
        .create_repository(CreateRepositoryRequest {
            repository: Some(node.repository("group/real.git")),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(node.root.join("group/real.git/HEAD").is_file());
}
