//! RepositoryService: existence, creation, removal, replication, checksums, refs and size.

use std::path::{Path, PathBuf};

use praefect_wire::proto::repository_service_server::RepositoryService;
use praefect_wire::proto::*;
use sha1::{Digest, Sha1};
use tokio::process::Command;
use tonic::{Request, Response, Status};

use super::Services;
use crate::storage::{is_repository, move_into_place, required};
use crate::transaction::Phase;

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::internal(e.to_string()))
}

impl Services {
    /// `git init --bare` into a temporary directory of the target's storage.
    pub(super) async fn init_temp(
        &self,
        storage: &str,
        default_branch: &[u8],
        object_format: i32,
    ) -> Result<PathBuf, Status> {
        let temp = self.0.storages.temp_path(storage, "create")?;
        let mut command = self.0.git.bare_command();
        command.arg("init").arg("--bare").arg("--quiet");
        if !default_branch.is_empty() {
            let branch = String::from_utf8_lossy(default_branch);
            let branch = branch
                .strip_prefix("refs/heads/")
                .unwrap_or(&branch)
                .to_string();
            if branch.starts_with('-') || branch.contains(char::is_whitespace) {
                return Err(Status::invalid_argument("invalid default branch"));
            }
            command.arg(format!("--initial-branch={branch}"));
        }
        if object_format == ObjectFormat::Sha256 as i32 {
            command.arg("--object-format=sha256");
        }
        let output = command
            .arg(&temp)
            .output()
            .await
            .map_err(|e| Status::internal(format!("git init: {e}")))?;
        if !output.status.success() {
            return Err(Status::internal(format!(
                "git init: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        Ok(temp)
    }
}

#[tonic::async_trait]
impl RepositoryService for Services {
    async fn repository_exists(
        &self,
        request: Request<RepositoryExistsRequest>,
    ) -> Result<Response<RepositoryExistsResponse>, Status> {
        let path = self
            .0
            .storages
            .repo_path(request.get_ref().repository.as_ref())?;
        Ok(Response::new(RepositoryExistsResponse {
            exists: is_repository(&path),
        }))
    }

    /// In a reference transaction, votes on the new repository's state (object format, HEAD,
    /// refs): PREPARED before it is moved into place, COMMITTED after.
    async fn create_repository(
        &self,
        request: Request<CreateRepositoryRequest>,
    ) -> Result<Response<CreateRepositoryResponse>, Status> {
        let tx = self
            .0
            .transactions
            .begin(request.metadata(), request.extensions())?;
        let req = request.into_inner();
        let repo = required(req.repository.as_ref())?;
        let path = self.0.storages.repo_path(Some(repo))?;
        if path.exists() {
            return Err(Status::already_exists(
                "creating repository: repository exists already",
            ));
        }
        let storage = &repo.storage_name;
        let temp = self
            .init_temp(storage, &req.default_branch, req.object_format)
            .await?;
        let voted = match &tx {
            Some(tx) => self.vote_on(tx, &temp, Phase::Prepared).await.map(Some),
            None => Ok(None),
        };
        let state = match voted {
            Ok(state) => state,
            Err(err) => {
                let _ = tokio::fs::remove_dir_all(&temp).await;
                return Err(err);
            }
        };
        let moved = {
            let (temp, path) = (temp.clone(), path.clone());
            tokio::task::spawn_blocking(move || move_into_place(&temp, &path))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
        };
        if let Err(err) = moved {
            let _ = tokio::fs::remove_dir_all(&temp).await;
            return Err(if err.kind() == std::io::ErrorKind::AlreadyExists {
                Status::already_exists("creating repository: repository exists already")
            } else {
                Status::internal(format!("moving repository into place: {err}"))
            });
        }
        if let (Some(tx), Some(state)) = (&tx, state) {
            tx.vote(Phase::Committed, state.hash()).await?;
        }
        Ok(Response::new(CreateRepositoryResponse {}))
    }

    async fn remove_repository(
        &self,
        request: Request<RemoveRepositoryRequest>,
    ) -> Result<Response<RemoveRepositoryResponse>, Status> {
        let repo = required(request.get_ref().repository.as_ref())?;
        let path = self.0.storages.repo_path(Some(repo))?;
        if !is_repository(&path) {
            return Err(Status::not_found("repository does not exist"));
        }
        let trash = self.0.storages.temp_path(&repo.storage_name, "delete")?;
        // Renaming first makes the removal atomic for readers; the copy in trash goes after.
        blocking(move || {
            std::fs::rename(&path, &trash)?;
            std::fs::remove_dir_all(&trash)
        })
        .await?;
        Ok(Response::new(RemoveRepositoryResponse {}))
    }

    async fn replicate_repository(
        &self,
        request: Request<ReplicateRepositoryRequest>,
    ) -> Result<Response<ReplicateRepositoryResponse>, Status> {
        self.replicate(request).await?;
        Ok(Response::new(ReplicateRepositoryResponse {}))
    }

    /// The checksum is the XOR of SHA-1("<object id> <ref name>") over every ref under
    /// `refs/`, as 40 hex digits; all zeros for a repository without refs. Two replicas have
    /// the same checksum exactly when they have the same refs pointing at the same objects.
    async fn calculate_checksum(
        &self,
        request: Request<CalculateChecksumRequest>,
    ) -> Result<Response<CalculateChecksumResponse>, Status> {
        let path = self
            .0
            .storages
            .existing_repo(request.get_ref().repository.as_ref())?;
        let listing = self
            .0
            .git
            .run(
                &path,
                &["for-each-ref", "--format=%(objectname) %(refname)", "refs/"],
            )
            .await?;
        let mut checksum = [0u8; 20];
        for line in listing.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let digest = Sha1::digest(line);
            for (acc, byte) in checksum.iter_mut().zip(digest.iter()) {
                *acc ^= byte;
            }
        }
        Ok(Response::new(CalculateChecksumResponse {
            checksum: hex::encode(checksum),
        }))
    }

    /// In a reference transaction, git's reference-transaction hook votes on the update
    /// (`update-ref` and, since git 2.46, `symbolic-ref` run it): twice, prepared and
    /// committed, on every node alike.
    async fn write_ref(
        &self,
        request: Request<WriteRefRequest>,
    ) -> Result<Response<WriteRefResponse>, Status> {
        let tx = self
            .0
            .transactions
            .begin(request.metadata(), request.extensions())?;
        let req = request.into_inner();
        let path = self.0.storages.existing_repo(req.repository.as_ref())?;
        let revision = crate::git::check_revision(&req.revision)?;
        let hooks = |command: &mut Command| {
            if let Some(tx) = &tx {
                tx.configure(command);
            }
        };
        let written = if req.r#ref == b"HEAD" {
            crate::refs::check_ref_name(revision.as_bytes())?;
            self.0
                .git
                .run_with(&path, &["symbolic-ref", "HEAD", &revision], hooks)
                .await
        } else {
            let name = crate::refs::check_ref_name(&req.r#ref)?;
            let mut args = vec!["update-ref", "--", name, revision.as_str()];
            let old;
            if !req.old_revision.is_empty() {
                old = crate::git::check_revision(&req.old_revision)?;
                args.push(&old);
            }
            self.0.git.run_with(&path, &args, hooks).await
        };
        written.map_err(|status| match &tx {
            Some(tx) => tx.explain(status),
            None => status,
        })?;
        Ok(Response::new(WriteRefResponse {}))
    }

    /// Packs all objects and references: what a client can observe does not change.
    async fn optimize_repository(
        &self,
        request: Request<OptimizeRepositoryRequest>,
    ) -> Result<Response<OptimizeRepositoryResponse>, Status> {
        let path = self
            .0
            .storages
            .existing_repo(request.get_ref().repository.as_ref())?;
        self.0.git.run(&path, &["repack", "-a", "-d", "-q"]).await?;
        self.0.git.run(&path, &["pack-refs", "--all"]).await?;
        Ok(Response::new(OptimizeRepositoryResponse {}))
    }

    /// Drops unreachable loose objects older than 30 minutes (younger ones may belong to a
    /// write in progress).
    async fn prune_unreachable_objects(
        &self,
        request: Request<PruneUnreachableObjectsRequest>,
    ) -> Result<Response<PruneUnreachableObjectsResponse>, Status> {
        let path = self
            .0
            .storages
            .existing_repo(request.get_ref().repository.as_ref())?;
        self.0
            .git
            .run(&path, &["prune", "--expire=30.minutes.ago"])
            .await?;
        Ok(Response::new(PruneUnreachableObjectsResponse {}))
    }

    async fn repository_size(
        &self,
        request: Request<RepositorySizeRequest>,
    ) -> Result<Response<RepositorySizeResponse>, Status> {
        let path = self
            .0
            .storages
            .existing_repo(request.get_ref().repository.as_ref())?;
        let bytes = blocking(move || dir_size(&path)).await?;
        Ok(Response::new(RepositorySizeResponse {
            size: (bytes / 1024) as i64,
        }))
    }

    async fn object_format(
        &self,
        request: Request<ObjectFormatRequest>,
    ) -> Result<Response<ObjectFormatResponse>, Status> {
        let path = self
            .0
            .storages
            .existing_repo(request.get_ref().repository.as_ref())?;
        let out = self
            .0
            .git
            .run(&path, &["rev-parse", "--show-object-format"])
            .await?;
        let format = match String::from_utf8_lossy(&out).trim() {
            "sha256" => ObjectFormat::Sha256,
            _ => ObjectFormat::Sha1,
        };
        Ok(Response::new(ObjectFormatResponse {
            format: format as i32,
        }))
    }
}

fn dir_size(path: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                total += meta.len();
            }
        }
    }
    Ok(total)
}
