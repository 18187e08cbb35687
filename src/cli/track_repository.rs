//! `praefect -config FILE track-repository -virtual-storage X -relative-path Y -replica-path Z
//! -authoritative-storage S [-replicate-immediately]`: adopts a repository that exists on one
//! storage (put there by hand, or left behind by a lost database) into the database, and
//! brings the other storages up to date from it.
//!
//! Like Praefect's, it works on the database and the nodes directly, not through a router:
//! the replica must be checked on that very node, and the records are written with the
//! authoritative storage as the only replica (generation 0) and the primary. The other
//! storages (all of them, or `default_replication_factor` − 1 chosen at random, then also
//! stored as assignments) get `update` jobs, queued for the routers' replicators or run here
//! at once.

use rand::seq::SliceRandom;

use super::error::CliError;
use crate::config::Config;
use crate::datastore::{
    ChangeType, Datastore, DatastoreError, NewRepository, ReplicationJob, UpdateJob,
};
use crate::nodes::NodePool;
use crate::replication::JobRunner;
use crate::wire::proto::repository_service_client::RepositoryServiceClient;
use crate::wire::proto::{Repository, RepositoryExistsRequest};

/// One repository to track, as the flags (or a line of `track-repositories` input) give it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrackRequest {
    pub virtual_storage: String,
    pub relative_path: String,
    pub replica_path: String,
    pub authoritative_storage: String,
}

/// What tracking needs, opened once for any number of repositories.
pub struct Tracker<'a> {
    pub config: &'a Config,
    pub store: Datastore,
    /// Connections to the nodes, shared by every check and replication.
    pub nodes: NodePool,
    pub replicate_immediately: bool,
}

/// Why the configuration cannot place a request (also a validation error of the bulk form).
pub fn placement_error(config: &Config, request: &TrackRequest) -> Option<String> {
    let Some(vs) = config.virtual_storage(&request.virtual_storage) else {
        return Some(format!(
            "virtual storage {:?} not found",
            request.virtual_storage
        ));
    };
    if !vs
        .node
        .iter()
        .any(|n| n.storage == request.authoritative_storage)
    {
        return Some(format!(
            "storage {:?} not found in virtual storage {:?}",
            request.authoritative_storage, request.virtual_storage
        ));
    }
    None
}

impl<'a> Tracker<'a> {
    /// Connects to the database and (lazily) to every node.
    pub async fn open(config: &'a Config, replicate_immediately: bool) -> Result<Self, CliError> {
        let store = super::sql::open(config).await?;
        let nodes = NodePool::connect(config, None)
            .map_err(|err| CliError::Dial(format!("setting up node connections: {err}")))?;
        Ok(Tracker {
            config,
            store,
            nodes,
            replicate_immediately,
        })
    }

    /// Whether the replica exists on the authoritative storage, asked of that node itself.
    pub async fn replica_exists(&self, request: &TrackRequest) -> Result<bool, String> {
        let channel = self
            .nodes
            .channel(&request.virtual_storage, &request.authoritative_storage)
            .ok_or_else(|| {
                placement_error(self.config, request).unwrap_or_else(|| "no node".into())
            })?;
        RepositoryServiceClient::new(channel.clone())
            .repository_exists(RepositoryExistsRequest {
                repository: Some(Repository {
                    storage_name: request.authoritative_storage.clone(),
                    relative_path: request.replica_path.clone(),
                    ..Default::default()
                }),
            })
            .await
            .map(|response| response.into_inner().exists)
            .map_err(|status| {
                format!(
                    "checking the repository on storage {:?}: {}",
                    request.authoritative_storage,
                    status.message()
                )
            })
    }

    /// The storages to replicate to, and whether they are explicit assignments.
    fn secondaries(&self, request: &TrackRequest) -> (Vec<String>, bool) {
        let Some(vs) = self.config.virtual_storage(&request.virtual_storage) else {
            return (Vec::new(), false);
        };
        let mut others: Vec<String> = vs
            .node
            .iter()
            .map(|n| n.storage.clone())
            .filter(|s| *s != request.authoritative_storage)
            .collect();
        let factor = vs.default_replication_factor;
        if factor <= 0 {
            return (others, false);
        }
        others.shuffle(&mut rand::thread_rng());
        others.truncate(usize::try_from(factor - 1).unwrap_or(0));
        others.sort();
        (others, true)
    }

    /// Tracks one repository whose replica is known to exist; returns the lines to print.
    pub async fn track(&self, request: &TrackRequest) -> Result<Vec<String>, CliError> {
        let (secondaries, store_assignments) = self.secondaries(request);
        let correlation_id = uuid::Uuid::new_v4().to_string();
        let mut lines = Vec::new();
        let job = |repository_id: i64, target: &str| UpdateJob {
            repository_id,
            virtual_storage: request.virtual_storage.clone(),
            relative_path: request.relative_path.clone(),
            replica_path: request.replica_path.clone(),
            source: request.authoritative_storage.clone(),
            target: target.to_string(),
            correlation_id: correlation_id.clone(),
        };
        let created = match self
            .store
            .reserve_repository_id(&request.virtual_storage, &request.relative_path)
            .await
        {
            Ok(id) => {
                let jobs: Vec<UpdateJob> = if self.replicate_immediately {
                    Vec::new()
                } else {
                    secondaries.iter().map(|s| job(id, s)).collect()
                };
                let repository = NewRepository {
                    repository_id: id,
                    virtual_storage: request.virtual_storage.clone(),
                    relative_path: request.relative_path.clone(),
                    replica_path: request.replica_path.clone(),
                    primary: request.authoritative_storage.clone(),
                    updated_secondaries: Vec::new(),
                    outdated_secondaries: secondaries.clone(),
                    store_assignments,
                };
                match self.store.create_repository(&repository, &jobs).await {
                    Ok(()) => Some(id),
                    Err(DatastoreError::RepositoryExists) => None,
                    Err(err) => return Err(err.into()),
                }
            }
            Err(DatastoreError::RepositoryExists) => None,
            Err(err) => return Err(err.into()),
        };
        let repository_id = match created {
            Some(id) => {
                lines.push(
                    "Finished adding new repository to be tracked in praefect database."
                        .to_string(),
                );
                id
            }
            None => {
                lines.push("repository is already tracked in praefect database".to_string());
                self.store
                    .repository_id(&request.virtual_storage, &request.relative_path)
                    .await?
                    .ok_or_else(|| {
                        CliError::Failed("the repository was removed meanwhile".to_string())
                    })?
            }
        };
        for target in &secondaries {
            let update = job(repository_id, target);
            if self.replicate_immediately {
                self.replicate(&update).await?;
                lines.push(format!("Finished replicating repository to {target:?}."));
            } else if created.is_some()
                || self
                    .store
                    .enqueue(&queued_job(&update), &correlation_id)
                    .await?
                    .is_some()
            {
                // A new repository's jobs were queued with its records.
                lines.push(format!(
                    "Added replication job to replicate repository to {target:?}."
                ));
            } else {
                lines.push(format!(
                    "A replication job to {target:?} is queued already."
                ));
            }
        }
        Ok(lines)
    }

    /// Runs one `update` job here and now.
    async fn replicate(&self, update: &UpdateJob) -> Result<(), CliError> {
        let runner = JobRunner {
            config: self.config,
            nodes: &self.nodes,
            store: &self.store,
        };
        runner
            .run_now(queued_job(update), &update.correlation_id)
            .await
            .map_err(|err| CliError::Failed(format!("replicating to {:?}: {err}", update.target)))
    }
}

fn queued_job(update: &UpdateJob) -> ReplicationJob {
    ReplicationJob {
        repository_id: update.repository_id,
        replica_path: update.replica_path.clone(),
        change: ChangeType::Update,
        relative_path: update.relative_path.clone(),
        target_node_storage: update.target.clone(),
        source_node_storage: update.source.clone(),
        virtual_storage: update.virtual_storage.clone(),
        params: None,
    }
}

/// The subcommand.
pub async fn run(
    config: &Config,
    request: TrackRequest,
    replicate_immediately: bool,
) -> Result<(), CliError> {
    if let Some(problem) = placement_error(config, &request) {
        return Err(CliError::Usage(problem));
    }
    let tracker = Tracker::open(config, replicate_immediately).await?;
    let result = track_one(&tracker, &request).await;
    tracker.store.close().await;
    result
}

async fn track_one(tracker: &Tracker<'_>, request: &TrackRequest) -> Result<(), CliError> {
    match tracker.replica_exists(request).await {
        Ok(true) => {}
        Ok(false) => {
            return Err(CliError::Failed(format!(
                "attempting to track repository in praefect database: authoritative repository does not exist (storage {:?}, replica path {:?})",
                request.authoritative_storage, request.replica_path
            )))
        }
        Err(problem) => return Err(CliError::Failed(problem)),
    }
    for line in tracker.track(request).await? {
        println!("{line}");
    }
    Ok(())
}
