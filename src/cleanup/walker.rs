//! Walking a node's storage for repositories the database does not know: the node lists
//! what it has on disk (InternalGitaly/WalkRepos, streamed), and the database is asked about
//! a batch of replica paths at a time, so that neither side ever holds the whole storage.

use std::time::{Duration, SystemTime};

use crate::datastore::{Datastore, DatastoreError};
use crate::nodes::NodeChannel;
use crate::wire::proto::internal_gitaly_client::InternalGitalyClient;
use crate::wire::proto::WalkReposRequest;

/// Why a walk stopped.
#[derive(Debug, thiserror::Error)]
pub enum WalkError {
    #[error("walking storage {storage:?}: {status}")]
    Node {
        storage: String,
        status: tonic::Status,
    },
    #[error("checking repositories against the database: {0}")]
    Database(#[from] DatastoreError),
}

/// One storage of one virtual storage, and how to walk it.
pub struct Walk<'a> {
    pub store: &'a Datastore,
    pub channel: NodeChannel,
    pub virtual_storage: &'a str,
    pub storage: &'a str,
    /// Replica paths per database check (at least 1).
    pub batch: usize,
    /// Repositories modified more recently than this are left out: they may be being
    /// created right now, before their record is written.
    pub older_than: Duration,
}

impl Walk<'_> {
    /// Walks the storage; `found` gets, batch by batch, the replica paths on disk that no
    /// repository of the virtual storage lives at. Returns how many repositories were checked.
    pub async fn untracked(&self, mut found: impl FnMut(Vec<String>)) -> Result<u64, WalkError> {
        let node_error = |status| WalkError::Node {
            storage: self.storage.to_string(),
            status,
        };
        let mut stream = InternalGitalyClient::new(self.channel.clone())
            .walk_repos(WalkReposRequest {
                storage_name: self.storage.to_string(),
            })
            .await
            .map_err(node_error)?
            .into_inner();
        let cutoff = SystemTime::now()
            .checked_sub(self.older_than)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let batch_size = self.batch.max(1);
        let mut batch = Vec::with_capacity(batch_size);
        let mut checked = 0;
        loop {
            let next = stream.message().await.map_err(node_error)?;
            let done = next.is_none();
            if let Some(repo) = next {
                let time = repo
                    .modification_time
                    .as_ref()
                    .map(|t| (t.seconds, t.nanos));
                if modified_before(time, cutoff) {
                    batch.push(repo.relative_path);
                }
            }
            if batch.len() >= batch_size || (done && !batch.is_empty()) {
                checked += batch.len() as u64;
                let untracked = self
                    .store
                    .untracked_replica_paths(self.virtual_storage, &batch)
                    .await?;
                batch.clear();
                if !untracked.is_empty() {
                    found(untracked);
                }
            }
            if done {
                return Ok(checked);
            }
        }
    }
}

/// Whether a modification time the node reported (seconds and nanoseconds since the epoch)
/// is before `cutoff`. A repository without one is counted as old (a node that does not say
/// cannot hold it back forever).
fn modified_before(time: Option<(i64, i32)>, cutoff: SystemTime) -> bool {
    let Some((seconds, nanos)) = time else {
        return true;
    };
    let (Ok(seconds), Ok(nanos)) = (u64::try_from(seconds), u32::try_from(nanos)) else {
        return true;
    };
    SystemTime::UNIX_EPOCH + Duration::new(seconds, nanos) <= cutoff
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_repositories_are_left_out() {
        let now = SystemTime::now();
        let secs = |t: SystemTime| {
            i64::try_from(t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs()).unwrap()
        };
        let cutoff = now - Duration::from_secs(3600);
        assert!(modified_before(Some((secs(now) - 7200, 0)), cutoff));
        assert!(!modified_before(Some((secs(now), 0)), cutoff));
        assert!(modified_before(None, cutoff));
        assert!(modified_before(Some((-5, 0)), cutoff));
    }
}
