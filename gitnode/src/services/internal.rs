//! InternalGitaly/WalkRepos: every repository under a storage, with its relative path and the
//! modification time of its directory, as Gitaly lists them for Praefect's cleanup and
//! `list-untracked-repositories`. The walk runs on a blocking thread and streams as it goes,
//! so a large storage is never held in memory.

use std::path::Path;
use std::time::UNIX_EPOCH;

use praefect_wire::proto::internal_gitaly_server::InternalGitaly;
use praefect_wire::proto::{WalkReposRequest, WalkReposResponse};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use super::stream::{channel, ResponseStream};
use super::Services;
use crate::storage::{is_repository, INTERNAL_DIR};

#[tonic::async_trait]
impl InternalGitaly for Services {
    async fn walk_repos(
        &self,
        request: Request<WalkReposRequest>,
    ) -> Result<Response<ResponseStream<WalkReposResponse>>, Status> {
        let root = self
            .0
            .storages
            .root(&request.get_ref().storage_name)?
            .to_path_buf();
        let (tx, stream) = channel();
        tokio::task::spawn_blocking(move || {
            if let Err(err) = walk(&root, &root, &tx) {
                let _ = tx.blocking_send(Err(Status::internal(format!("walking storage: {err}"))));
            }
        });
        Ok(Response::new(stream))
    }
}

/// Sends every repository under `dir` (not descending into repositories, nor into gitnode's
/// own directory at the top); stops early, without error, once the client is gone.
fn walk(
    root: &Path,
    dir: &Path,
    tx: &mpsc::Sender<Result<WalkReposResponse, Status>>,
) -> std::io::Result<bool> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if !kind.is_dir() || (dir == root && entry.file_name() == INTERNAL_DIR) {
            continue;
        }
        if is_repository(&path) {
            let Ok(relative) = path.strip_prefix(root) else {
                continue;
            };
            let modified = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| prost_types::Timestamp {
                    seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                    nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
                });
            let message = WalkReposResponse {
                relative_path: relative.to_string_lossy().into_owned(),
                modification_time: modified,
            };
            if tx.blocking_send(Ok(message)).is_err() {
                return Ok(false);
            }
        } else if !walk(root, &path, tx)? {
            return Ok(false);
        }
    }
    Ok(true)
}
