//! `praefect -config FILE remove-repository -virtual-storage X -relative-path Y [-apply]
//! [-db-only]`: removes a repository from the cluster. Without -apply it only says whether
//! the repository is tracked (a dry run). With -apply it removes it through the router
//! (RemoveRepository: the replicas and the records), or with -db-only only its records
//! (the replicas stay on disk, untracked), and then the replication jobs still queued for it,
//! waiting for running ones to end so that none recreates a replica afterwards.

use std::time::Duration;

use super::dial::dial_praefect;
use super::error::CliError;
use crate::config::Config;
use crate::datastore::Datastore;
use crate::wire::proto::repository_service_client::RepositoryServiceClient;
use crate::wire::proto::{RemoveRepositoryRequest, Repository};

/// How often the queue is looked at again while a job for the repository is running.
const JOB_POLL: Duration = Duration::from_secs(1);

pub async fn run(
    config: &Config,
    virtual_storage: String,
    relative_path: String,
    apply: bool,
    db_only: bool,
) -> Result<(), CliError> {
    if config.virtual_storage(&virtual_storage).is_none() {
        return Err(CliError::Usage(format!(
            "virtual storage {virtual_storage:?} not found"
        )));
    }
    let store = super::sql::open(config).await?;
    let result = remove(
        config,
        &store,
        &virtual_storage,
        &relative_path,
        apply,
        db_only,
    )
    .await;
    store.close().await;
    result
}

async fn remove(
    config: &Config,
    store: &Datastore,
    virtual_storage: &str,
    relative_path: &str,
    apply: bool,
    db_only: bool,
) -> Result<(), CliError> {
    if apply {
        println!(
            "Attempting to remove {relative_path:?} of virtual storage {virtual_storage:?} from the database{}...",
            if db_only { "" } else { " and from every gitaly node" }
        );
    } else {
        println!(
            "DRY RUN -- Repository will not be removed from the database or from Gitaly storage."
        );
    }
    if !store
        .repository_exists(virtual_storage, relative_path)
        .await?
    {
        return Err(CliError::Failed(
            "repository is not being tracked in Praefect".to_string(),
        ));
    }
    println!("Repository found in the database.");
    if !apply {
        println!("Re-run the command with -apply to remove repositories from the database and disk or -apply and -db-only to remove from database only.");
        return Ok(());
    }
    if db_only {
        store
            .delete_repository(virtual_storage, relative_path)
            .await?;
        println!("Removed repository metadata from the database.");
    } else {
        let channel = dial_praefect(config).await?;
        RepositoryServiceClient::new(channel)
            .remove_repository(RemoveRepositoryRequest {
                repository: Some(Repository {
                    storage_name: virtual_storage.to_string(),
                    relative_path: relative_path.to_string(),
                    ..Default::default()
                }),
            })
            .await
            .map_err(|status| CliError::Rpc {
                what: Some("remove repository"),
                status,
                with_code: true,
            })?;
        println!("Repository removal completed.");
    }
    println!("Removing replication jobs...");
    while store
        .delete_repository_jobs(virtual_storage, relative_path)
        .await?
    {
        tracing::debug!("waiting for the repository's running replication jobs to end");
        tokio::time::sleep(JOB_POLL).await;
    }
    println!("Replication job removal completed.");
    Ok(())
}
