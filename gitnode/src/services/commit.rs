//! CommitService: FindCommit and CountCommits.

use praefect_wire::proto::commit_service_server::CommitService;
use praefect_wire::proto::*;
use tonic::{Request, Response, Status};

use super::refs::read_commits;
use super::Services;
use crate::git::check_revision;

#[tonic::async_trait]
impl CommitService for Services {
    async fn find_commit(
        &self,
        request: Request<FindCommitRequest>,
    ) -> Result<Response<FindCommitResponse>, Status> {
        let req = request.get_ref();
        let path = self.0.storages.existing_repo(req.repository.as_ref())?;
        let revision = check_revision(&req.revision)?;
        let spec = format!("{revision}^{{commit}}");
        let resolved = self
            .0
            .git
            .try_run(
                &path,
                &[
                    "rev-parse",
                    "--verify",
                    "--quiet",
                    "--end-of-options",
                    &spec,
                ],
            )
            .await?;
        let commit = match resolved {
            Some(oid) => {
                let oid = String::from_utf8_lossy(&oid).trim().to_string();
                read_commits(&self.0.git, &path, &[oid]).await?.pop()
            }
            None => None,
        };
        Ok(Response::new(FindCommitResponse { commit }))
    }

    async fn count_commits(
        &self,
        request: Request<CountCommitsRequest>,
    ) -> Result<Response<CountCommitsResponse>, Status> {
        let req = request.get_ref();
        let path = self.0.storages.existing_repo(req.repository.as_ref())?;
        let mut args: Vec<String> = vec!["rev-list".into(), "--count".into()];
        if req.max_count > 0 {
            args.push(format!("--max-count={}", req.max_count));
        }
        if req.first_parent {
            args.push("--first-parent".into());
        }
        if let Some(after) = &req.after {
            args.push(format!("--after={}", after.seconds));
        }
        if let Some(before) = &req.before {
            args.push(format!("--before={}", before.seconds));
        }
        if req.all {
            args.push("--all".into());
        } else {
            let mut revisions: Vec<&[u8]> = req.revisions.iter().map(Vec::as_slice).collect();
            if !req.revision.is_empty() {
                revisions.push(&req.revision);
            }
            if revisions.is_empty() {
                return Err(Status::invalid_argument("empty Revision and false All"));
            }
            for revision in revisions {
                args.push(check_revision(revision)?);
            }
        }
        args.push("--".into());
        if !req.path.is_empty() {
            args.push(String::from_utf8_lossy(&req.path).to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let count = match self.0.git.try_run(&path, &args).await? {
            Some(out) => String::from_utf8_lossy(&out).trim().parse().unwrap_or(0),
            None => 0,
        };
        Ok(Response::new(CountCommitsResponse { count }))
    }
}
