//! Executing one replication job against the nodes (spec §5, "Executing a job").

use std::collections::HashMap;

use base64::Engine;
use tonic::Code;

use crate::config::Config;
use crate::datastore::{
    ChangeType, Datastore, DatastoreError, JobState, QueuedJob, ReplicationJob,
};
use crate::nodes::NodePool;
use crate::wire::proto::repository_service_client::RepositoryServiceClient;
use crate::wire::proto::{RemoveRepositoryRequest, ReplicateRepositoryRequest, Repository};

/// Metadata that tells a replication target how to reach the source node.
pub const GITALY_SERVERS_METADATA: &str = "gitaly-servers";

/// Why a job failed (it is retried while attempts remain).
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("storage {0:?} is not configured in virtual storage {1:?}")]
    UnknownStorage(String, String),
    #[error("{storage}: {status}")]
    Node {
        storage: String,
        status: tonic::Status,
    },
    #[error("database: {0}")]
    Database(#[from] DatastoreError),
    #[error("encoding gitaly-servers: {0}")]
    Metadata(String),
}

/// What the runner needs to execute jobs.
pub struct JobRunner<'a> {
    pub config: &'a Config,
    pub nodes: &'a NodePool,
    pub store: &'a Datastore,
}

/// `gitaly-servers`: base64 of `{"<storage>": {"address": .., "token": ..}}`.
pub fn gitaly_servers(storage: &str, address: &str, token: &str) -> Result<String, JobError> {
    let mut servers = HashMap::new();
    servers.insert(
        storage,
        serde_json::json!({ "address": address, "token": token }),
    );
    let json = serde_json::to_vec(&servers).map_err(|e| JobError::Metadata(e.to_string()))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(json))
}

impl JobRunner<'_> {
    fn client(
        &self,
        virtual_storage: &str,
        storage: &str,
    ) -> Result<RepositoryServiceClient<crate::nodes::NodeChannel>, JobError> {
        self.nodes
            .channel(virtual_storage, storage)
            .cloned()
            .map(RepositoryServiceClient::new)
            .ok_or_else(|| {
                JobError::UnknownStorage(storage.to_string(), virtual_storage.to_string())
            })
    }

    /// Runs a job that was never queued: `track-repository -replicate-immediately`
    /// replicates at once, the way the replicator would, instead of queueing the job.
    pub async fn run_now(&self, job: ReplicationJob, correlation_id: &str) -> Result<(), JobError> {
        let queued = QueuedJob {
            id: 0,
            state: JobState::InProgress,
            attempt: 0,
            lock_id: job.lock_id(),
            job,
            correlation_id: correlation_id.to_string(),
            created_at: chrono::Utc::now().naive_utc(),
            updated_at: None,
        };
        self.run(&queued).await
    }

    pub async fn run(&self, queued: &QueuedJob) -> Result<(), JobError> {
        match queued.job.change {
            ChangeType::Update | ChangeType::Create => self.update(queued).await,
            ChangeType::Delete | ChangeType::DeleteReplica => self.delete(queued).await,
        }
    }

    async fn update(&self, queued: &QueuedJob) -> Result<(), JobError> {
        let job = &queued.job;
        let Some(context) = self
            .store
            .job_context(
                job.repository_id,
                &job.source_node_storage,
                &job.target_node_storage,
            )
            .await?
        else {
            tracing::info!(job_id = queued.id, relative_path = %job.relative_path, "repository deleted meanwhile; nothing to replicate");
            return Ok(());
        };
        if let (Some(target), Some(source)) = (context.target_generation, context.source_generation)
        {
            if target >= source {
                let what = if target > source {
                    "downgrade prevented"
                } else {
                    "already on the same generation"
                };
                tracing::info!(
                    job_id = queued.id,
                    target_generation = target,
                    source_generation = source,
                    "{what}"
                );
                return Ok(());
            }
        }
        let source_node = self
            .config
            .virtual_storage(&job.virtual_storage)
            .and_then(|vs| {
                vs.node
                    .iter()
                    .find(|n| n.storage == job.source_node_storage)
            })
            .ok_or_else(|| {
                JobError::UnknownStorage(
                    job.source_node_storage.clone(),
                    job.virtual_storage.clone(),
                )
            })?;
        let servers = gitaly_servers(
            &source_node.storage,
            &source_node.address,
            &source_node.token,
        )?;
        let mut request = tonic::Request::new(ReplicateRepositoryRequest {
            repository: Some(Repository {
                storage_name: job.target_node_storage.clone(),
                relative_path: context.replica_path.clone(),
                ..Default::default()
            }),
            source: Some(Repository {
                storage_name: job.source_node_storage.clone(),
                relative_path: context.replica_path.clone(),
                ..Default::default()
            }),
        });
        let value = servers
            .parse()
            .map_err(|_| JobError::Metadata("not ASCII".into()))?;
        request
            .metadata_mut()
            .insert(GITALY_SERVERS_METADATA, value);
        if !queued.correlation_id.is_empty() {
            if let Ok(value) = queued.correlation_id.parse() {
                request
                    .metadata_mut()
                    .insert("x-gitlab-correlation-id", value);
            }
        }
        let mut target = self.client(&job.virtual_storage, &job.target_node_storage)?;
        match target.replicate_repository(request).await {
            Ok(_) => {}
            Err(status)
                if status.code() == Code::NotFound
                    && status.message().contains("invalid source repository") =>
            {
                // The source does not have the repository after all: its record is wrong.
                tracing::warn!(job_id = queued.id, source = %job.source_node_storage, "source replica does not exist; removing its record");
                self.store
                    .delete_invalid_source(job.repository_id, &job.source_node_storage)
                    .await?;
                return Ok(());
            }
            Err(status) => {
                return Err(JobError::Node {
                    storage: job.target_node_storage.clone(),
                    status,
                })
            }
        }
        if let Some(generation) = context.source_generation {
            self.store
                .set_replica_generation(job.repository_id, &job.target_node_storage, generation)
                .await?;
        }
        Ok(())
    }

    async fn delete(&self, queued: &QueuedJob) -> Result<(), JobError> {
        let job = &queued.job;
        // The replica path as recorded now; a job for a deleted repository uses its own copy.
        let replica_path = match self
            .store
            .job_context(job.repository_id, "", &job.target_node_storage)
            .await?
        {
            Some(context) => context.replica_path,
            None if !job.replica_path.is_empty() => job.replica_path.clone(),
            None => job.relative_path.clone(),
        };
        let mut target = self.client(&job.virtual_storage, &job.target_node_storage)?;
        let removed = target
            .remove_repository(RemoveRepositoryRequest {
                repository: Some(Repository {
                    storage_name: job.target_node_storage.clone(),
                    relative_path: replica_path,
                    ..Default::default()
                }),
            })
            .await;
        match removed {
            Ok(_) => {}
            // Already gone: the goal is reached.
            Err(status) if status.code() == Code::NotFound => {}
            Err(status) => {
                return Err(JobError::Node {
                    storage: job.target_node_storage.clone(),
                    status,
                })
            }
        }
        self.store
            .delete_replica_record(job.repository_id, &job.target_node_storage)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gitaly_servers_is_base64_json_by_storage() {
        let encoded = gitaly_servers("gitaly-1", "tcp://127.0.0.1:1", "secret").unwrap();
        let json = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap();
        let value: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(value["gitaly-1"]["address"], "tcp://127.0.0.1:1");
        assert_eq!(value["gitaly-1"]["token"], "secret");
    }
}
