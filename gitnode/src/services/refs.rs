//! RefService: default branch, ref existence (both from files, no git process), branches and
//! ref listings.

use std::path::Path;

use praefect_wire::proto::ref_service_server::RefService;
use praefect_wire::proto::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tonic::{Request, Response, Status};

use super::pack::take_pipe;
use super::stream::{channel, ResponseStream};
use super::Services;
use crate::commit::parse_commit;
use crate::git::Git;

/// Reads the commits `oids` with one `git cat-file --batch`.
pub async fn read_commits(
    git: &Git,
    repo: &Path,
    oids: &[String],
) -> Result<Vec<GitCommit>, Status> {
    if oids.is_empty() {
        return Ok(Vec::new());
    }
    let mut child = git
        .command(repo)
        .args(["cat-file", "--batch"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| Status::internal(format!("git cat-file: {e}")))?;
    let mut stdin = take_pipe(&mut child.stdin, "stdin")?;
    let input: String = oids.iter().map(|o| format!("{o}\n")).collect();
    let writer = tokio::spawn(async move {
        let _ = stdin.write_all(input.as_bytes()).await;
    });
    let mut out = BufReader::new(take_pipe(&mut child.stdout, "stdout")?);
    let mut commits = Vec::with_capacity(oids.len());
    for _ in oids {
        let mut header = String::new();
        out.read_line(&mut header)
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let fields: Vec<&str> = header.split_whitespace().collect();
        if fields.len() != 3 {
            return Err(Status::internal(format!("cat-file: unexpected {header:?}")));
        }
        let size: usize = fields[2]
            .parse()
            .map_err(|_| Status::internal("cat-file size"))?;
        let mut body = vec![0u8; size + 1];
        out.read_exact(&mut body)
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        body.pop();
        if fields[1] == "commit" {
            commits.push(parse_commit(fields[0], &body));
        }
    }
    let _ = writer.await;
    let _ = child.wait().await;
    Ok(commits)
}

/// `(name, oid)` of refs matching `patterns` (all refs when empty).
async fn for_each_ref(
    git: &Git,
    repo: &Path,
    patterns: &[String],
) -> Result<Vec<(String, String)>, Status> {
    let mut args = vec!["for-each-ref", "--format=%(objectname) %(refname)", "--"];
    args.extend(patterns.iter().map(String::as_str));
    let out = git.run(repo, &args).await?;
    Ok(String::from_utf8_lossy(&out)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(oid, name)| (name.to_string(), oid.to_string()))
        .collect())
}

#[tonic::async_trait]
impl RefService for Services {
    async fn find_default_branch_name(
        &self,
        request: Request<FindDefaultBranchNameRequest>,
    ) -> Result<Response<FindDefaultBranchNameResponse>, Status> {
        let req = request.get_ref();
        let path = self.0.storages.existing_repo(req.repository.as_ref())?;
        let name = crate::refs::default_branch(&path, req.head_only).unwrap_or_default();
        Ok(Response::new(FindDefaultBranchNameResponse {
            name: name.into_bytes(),
        }))
    }

    async fn ref_exists(
        &self,
        request: Request<RefExistsRequest>,
    ) -> Result<Response<RefExistsResponse>, Status> {
        let req = request.get_ref();
        let path = self.0.storages.existing_repo(req.repository.as_ref())?;
        let name = crate::refs::check_ref_name(&req.r#ref)?;
        Ok(Response::new(RefExistsResponse {
            value: crate::refs::ref_exists(&path, name),
        }))
    }

    async fn find_all_branches(
        &self,
        request: Request<FindAllBranchesRequest>,
    ) -> Result<Response<ResponseStream<FindAllBranchesResponse>>, Status> {
        let path = self
            .0
            .storages
            .existing_repo(request.get_ref().repository.as_ref())?;
        let refs = for_each_ref(&self.0.git, &path, &["refs/heads/".to_string()]).await?;
        let oids: Vec<String> = refs.iter().map(|(_, oid)| oid.clone()).collect();
        let commits = read_commits(&self.0.git, &path, &oids).await?;
        let branches: Vec<find_all_branches_response::Branch> = refs
            .into_iter()
            .zip(commits)
            .map(|((name, _), commit)| find_all_branches_response::Branch {
                name: name.into_bytes(),
                target: Some(commit),
            })
            .collect();
        let (tx, stream) = channel();
        tokio::spawn(async move {
            for chunk in branches.chunks(20) {
                let message = FindAllBranchesResponse {
                    branches: chunk.to_vec(),
                };
                if tx.send(Ok(message)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn find_branch(
        &self,
        request: Request<FindBranchRequest>,
    ) -> Result<Response<FindBranchResponse>, Status> {
        let req = request.get_ref();
        let path = self.0.storages.existing_repo(req.repository.as_ref())?;
        let name = String::from_utf8_lossy(&req.name).to_string();
        if name.is_empty() {
            return Err(Status::invalid_argument("Branch name cannot be empty"));
        }
        let full = if name.starts_with("refs/heads/") {
            name
        } else {
            format!("refs/heads/{name}")
        };
        crate::refs::check_ref_name(full.as_bytes())?;
        let refs = for_each_ref(&self.0.git, &path, std::slice::from_ref(&full)).await?;
        let Some((_, oid)) = refs.into_iter().find(|(n, _)| *n == full) else {
            return Err(Status::not_found("branch not found"));
        };
        let commit = read_commits(&self.0.git, &path, &[oid]).await?.pop();
        Ok(Response::new(FindBranchResponse {
            branch: Some(Branch {
                name: full.trim_start_matches("refs/heads/").as_bytes().to_vec(),
                target_commit: commit,
            }),
        }))
    }

    async fn list_refs(
        &self,
        request: Request<ListRefsRequest>,
    ) -> Result<Response<ResponseStream<ListRefsResponse>>, Status> {
        let req = request.into_inner();
        let path = self.0.storages.existing_repo(req.repository.as_ref())?;
        let patterns: Vec<String> = req
            .patterns
            .iter()
            .map(|p| String::from_utf8_lossy(p).to_string())
            .collect();
        if patterns.iter().any(|p| p.starts_with('-')) {
            return Err(Status::invalid_argument("invalid pattern"));
        }
        let mut references = Vec::new();
        if req.head {
            if let Some(out) = self
                .0
                .git
                .try_run(&path, &["rev-parse", "--verify", "HEAD"])
                .await?
            {
                references.push(list_refs_response::Reference {
                    name: b"HEAD".to_vec(),
                    target: String::from_utf8_lossy(&out).trim().to_string(),
                    peeled_target: String::new(),
                });
            }
        }
        for (name, oid) in for_each_ref(&self.0.git, &path, &patterns).await? {
            references.push(list_refs_response::Reference {
                name: name.into_bytes(),
                target: oid,
                peeled_target: String::new(),
            });
        }
        let (tx, stream) = channel();
        tokio::spawn(async move {
            for chunk in references.chunks(100) {
                let message = ListRefsResponse {
                    references: chunk.to_vec(),
                    pagination_cursor: None,
                };
                if tx.send(Ok(message)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }
}
