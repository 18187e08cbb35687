//! ReplicateRepository: mirrors a repository of another node (refs, deletions included, and
//! the default branch), fetching through upload-pack over the sidechannel.
//!
//! In a reference transaction the node votes twice on the state the replica ends up with
//! (object format, HEAD, every ref): PREPARED before anything is visible, COMMITTED after.
//! A new replica is built in a temporary directory and moved into place between the votes;
//! an existing one first receives the objects only (`fetch --dry-run`, whose porcelain output
//! says what the refs would become), then its refs change in one atomic `update-ref`.

use std::collections::HashMap;
use std::path::Path;

use base64::Engine;
use praefect_wire::auth::TokenInterceptor;
use praefect_wire::backchannel::{dial_lazy, yamux_config, ClientHandler};
use praefect_wire::proto::ref_service_client::RefServiceClient;
use praefect_wire::proto::repository_service_client::RepositoryServiceClient;
use praefect_wire::proto::*;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tonic::{Request, Status};

use super::pack::take_pipe;
use super::Services;
use crate::storage::{is_repository, move_into_place, required};
use crate::transaction::{Phase, RepositoryState, Transaction};

/// Metadata that tells a replication target how to reach the source.
pub const GITALY_SERVERS_KEY: &str = "gitaly-servers";

#[derive(Clone, Debug, Deserialize)]
pub struct ServerInfo {
    pub address: String,
    #[serde(default)]
    pub token: String,
}

/// Decodes `gitaly-servers`: base64 of JSON `{"storage": {"address": ..., "token": ...}}`.
pub fn gitaly_servers(
    metadata: &tonic::metadata::MetadataMap,
) -> Result<HashMap<String, ServerInfo>, Status> {
    let value = metadata
        .get(GITALY_SERVERS_KEY)
        .ok_or_else(|| Status::invalid_argument("empty gitaly-servers metadata"))?;
    let text = value
        .to_str()
        .map_err(|_| Status::invalid_argument("gitaly-servers is not ASCII"))?;
    let json = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| Status::invalid_argument(format!("gitaly-servers: {e}")))?;
    serde_json::from_slice(&json)
        .map_err(|e| Status::invalid_argument(format!("gitaly-servers: {e}")))
}

/// Where to fetch from.
struct Source<'a> {
    repository: &'a Repository,
    server: &'a ServerInfo,
}

impl Services {
    pub(super) async fn replicate(
        &self,
        request: Request<ReplicateRepositoryRequest>,
    ) -> Result<(), Status> {
        let tx = self
            .0
            .transactions
            .begin(request.metadata(), request.extensions())?;
        let servers = gitaly_servers(request.metadata())?;
        let req = request.into_inner();
        let repo = required(req.repository.as_ref())?;
        let target = self.0.storages.repo_path(Some(repo))?;
        let source = req
            .source
            .ok_or_else(|| Status::invalid_argument("empty source repository"))?;
        let server = servers.get(&source.storage_name).ok_or_else(|| {
            Status::invalid_argument(format!(
                "gitaly-servers has no entry for storage {:?}",
                source.storage_name
            ))
        })?;
        let default_branch = source_default_branch(&source, server).await?;
        if !default_branch.is_empty() {
            crate::refs::check_ref_name(default_branch.as_bytes())?;
        }
        let source = Source {
            repository: &source,
            server,
        };
        let tx = tx.as_ref();
        if is_repository(&target) {
            return match tx {
                Some(tx) => {
                    self.replicate_voting(tx, &target, &source, &default_branch)
                        .await
                }
                None => self.update_replica(&target, &source, &default_branch).await,
            };
        }
        let temp = self
            .init_temp(&repo.storage_name, b"", ObjectFormat::Unspecified as i32)
            .await?;
        let built = self.update_replica(&temp, &source, &default_branch).await;
        let state = match (built, tx) {
            (Err(err), _) => Err(err),
            (Ok(()), None) => Ok(None),
            (Ok(()), Some(tx)) => self.vote_on(tx, &temp, Phase::Prepared).await.map(Some),
        };
        let state = match state {
            Ok(state) => state,
            Err(err) => {
                let _ = tokio::fs::remove_dir_all(&temp).await;
                return Err(err);
            }
        };
        let (from, to) = (temp.clone(), target.clone());
        let moved = tokio::task::spawn_blocking(move || move_into_place(&from, &to))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        if moved.is_err() {
            let _ = tokio::fs::remove_dir_all(&temp).await;
            if tx.is_some() {
                return Err(Status::aborted(
                    "the repository was created while it was replicated",
                ));
            }
            // Someone created it meanwhile: replicate into that one instead.
            return self.update_replica(&target, &source, &default_branch).await;
        }
        if let (Some(tx), Some(state)) = (tx, state) {
            tx.vote(Phase::Committed, state.hash()).await?;
        }
        Ok(())
    }

    /// Fetches every ref of the source into `repo` and points HEAD at the default branch.
    async fn update_replica(
        &self,
        repo: &Path,
        source: &Source<'_>,
        default_branch: &str,
    ) -> Result<(), Status> {
        self.fetch_from(repo, source, false).await?;
        if !default_branch.is_empty() {
            self.0
                .git
                .run(repo, &["symbolic-ref", "HEAD", default_branch])
                .await?;
        }
        Ok(())
    }

    /// Votes on the state of `repo` (see [`RepositoryState`]), which it returns.
    pub(super) async fn vote_on(
        &self,
        tx: &Transaction,
        repo: &Path,
        phase: Phase,
    ) -> Result<RepositoryState, Status> {
        let state = RepositoryState::read(&self.0.git, repo).await?;
        tx.vote(phase, state.hash()).await?;
        Ok(state)
    }

    /// Updates an existing replica in a transaction: objects first, then a vote on what the
    /// refs will be, then the refs, then a vote on what they are.
    async fn replicate_voting(
        &self,
        tx: &Transaction,
        target: &Path,
        source: &Source<'_>,
        default_branch: &str,
    ) -> Result<(), Status> {
        let porcelain = self.fetch_from(target, source, true).await?;
        let updates = parse_porcelain(&porcelain)?;
        let mut expected = RepositoryState::read(&self.0.git, target).await?;
        for update in &updates {
            if is_zero_oid(&update.new) {
                expected.refs.remove(&update.name);
            } else {
                expected
                    .refs
                    .insert(update.name.clone(), update.new.clone());
            }
        }
        if !default_branch.is_empty() {
            expected.head = default_branch.to_string();
        }
        tx.vote(Phase::Prepared, expected.hash()).await?;
        if !updates.is_empty() {
            self.update_refs(target, &updates).await?;
        }
        if !default_branch.is_empty() {
            self.0
                .git
                .run(target, &["symbolic-ref", "HEAD", default_branch])
                .await?;
        }
        self.vote_on(tx, target, Phase::Committed).await?;
        Ok(())
    }

    /// Applies `updates` in one atomic transaction that checks every old value.
    async fn update_refs(&self, repo: &Path, updates: &[RefUpdate]) -> Result<(), Status> {
        let mut input = String::new();
        for update in updates {
            if is_zero_oid(&update.new) {
                input.push_str(&format!("delete {} {}\n", update.name, update.old));
            } else {
                input.push_str(&format!(
                    "update {} {} {}\n",
                    update.name, update.new, update.old
                ));
            }
        }
        let mut child = self
            .0
            .git
            .command(repo)
            .args(["update-ref", "--stdin"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| Status::internal(format!("git update-ref: {e}")))?;
        let mut stdin = take_pipe(&mut child.stdin, "stdin")?;
        let written = stdin.write_all(input.as_bytes()).await;
        drop(stdin);
        let output = child
            .wait_with_output()
            .await
            .map_err(|e| Status::internal(format!("git update-ref: {e}")))?;
        if written.is_err() || !output.status.success() {
            return Err(Status::internal(format!(
                "updating the replica's refs: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        Ok(())
    }

    /// Fetches every ref of the source into `target`, pruning refs the source no longer
    /// has, through upload-pack over the sidechannel. With `dry_run`, only the objects come
    /// and the porcelain list of ref updates is returned.
    async fn fetch_from(
        &self,
        target: &Path,
        source: &Source<'_>,
        dry_run: bool,
    ) -> Result<Vec<u8>, Status> {
        let mut command = self.0.git.command(target);
        command
            .env("GIT_SSH_COMMAND", &self.0.ssh_helper)
            .env("GIT_SSH_VARIANT", "ssh")
            .env("GITALY_ADDRESS", &source.server.address)
            .env("GITALY_TOKEN", &source.server.token)
            .env("GITALY_STORAGE", &source.repository.storage_name)
            .env("GITALY_RELATIVE_PATH", &source.repository.relative_path)
            .args(["-c", "protocol.version=2", "fetch"]);
        if dry_run {
            // --quiet would silence the porcelain output too.
            command.args(["--dry-run", "--porcelain"]);
        } else {
            command.arg("--quiet");
        }
        let output = command
            .args([
                "--prune",
                "--force",
                "--no-write-fetch-head",
                "ssh://gitnode/source",
                "+refs/*:refs/*",
            ])
            .output()
            .await
            .map_err(|e| Status::internal(format!("git fetch: {e}")))?;
        if !output.status.success() {
            return Err(Status::internal(format!(
                "fetching from {}: {}",
                source.repository.storage_name,
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        Ok(output.stdout)
    }
}

/// The source's default branch (empty when HEAD is unset), or NotFound if the source
/// repository does not exist.
async fn source_default_branch(source: &Repository, server: &ServerInfo) -> Result<String, Status> {
    let channel = dial_lazy(
        &server.address,
        yamux_config(0, 256),
        ClientHandler::default(),
    )
    .map_err(|e| Status::internal(format!("dialing source: {e}")))?;
    let interceptor = TokenInterceptor::new(&server.token);
    let mut repos = RepositoryServiceClient::with_interceptor(channel.clone(), interceptor.clone());
    let exists = repos
        .repository_exists(RepositoryExistsRequest {
            repository: Some(source.clone()),
        })
        .await?
        .into_inner()
        .exists;
    if !exists {
        return Err(Status::not_found("invalid source repository"));
    }
    let name = RefServiceClient::with_interceptor(channel, interceptor)
        .find_default_branch_name(FindDefaultBranchNameRequest {
            repository: Some(source.clone()),
            head_only: true,
        })
        .await?
        .into_inner()
        .name;
    Ok(String::from_utf8_lossy(&name).to_string())
}

/// One ref update a dry-run fetch reports.
#[derive(Debug, PartialEq, Eq)]
struct RefUpdate {
    name: String,
    old: String,
    new: String,
}

/// Reads `git fetch --porcelain` output: `<flag> <old> <new> <ref>` lines. Up-to-date refs
/// (`=`) are no update; a rejected one (`!`) fails the replication. A ref reported twice (tag
/// following) counts once.
fn parse_porcelain(output: &[u8]) -> Result<Vec<RefUpdate>, Status> {
    let text = String::from_utf8_lossy(output);
    let mut updates: Vec<RefUpdate> = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        let mut chars = line.chars();
        let (Some(flag), Some(' ')) = (chars.next(), chars.next()) else {
            return Err(Status::internal(format!("fetch: unexpected line {line:?}")));
        };
        let fields: Vec<&str> = chars.as_str().splitn(3, ' ').collect();
        let [old, new, name] = fields[..] else {
            return Err(Status::internal(format!("fetch: unexpected line {line:?}")));
        };
        match flag {
            '=' => continue,
            '!' => {
                return Err(Status::internal(format!("fetch: {name} was rejected")));
            }
            _ => {}
        }
        crate::refs::check_ref_name(name.as_bytes())?;
        if updates.iter().any(|u| u.name == name) {
            continue;
        }
        updates.push(RefUpdate {
            name: name.to_string(),
            old: old.to_string(),
            new: new.to_string(),
        });
    }
    Ok(updates)
}

fn is_zero_oid(oid: &str) -> bool {
    !oid.is_empty() && oid.bytes().all(|b| b == b'0')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn porcelain_lines_become_updates() {
        let z = "0".repeat(40);
        let (a, b) = ("a".repeat(40), "b".repeat(40));
        let output = format!(
            "- {a} {z} refs/heads/old\n  {a} {b} refs/heads/main\n* {z} {b} refs/tags/t1\n\
             * {z} {b} refs/tags/t1\n= {a} {a} refs/heads/same\n"
        );
        let updates = parse_porcelain(output.as_bytes()).unwrap();
        let names: Vec<&str> = updates.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["refs/heads/old", "refs/heads/main", "refs/tags/t1"]);
        assert!(is_zero_oid(&updates[0].new));
        assert_eq!(updates[1].old, a);
        assert!(parse_porcelain(format!("! {a} {b} refs/heads/x\n").as_bytes()).is_err());
        assert!(parse_porcelain(b"garbage\n").is_err());
        assert!(parse_porcelain(format!("* {z} {b} HEAD\n").as_bytes()).is_err());
        assert!(parse_porcelain(b"").unwrap().is_empty());
    }
}
