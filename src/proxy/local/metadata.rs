//! GetRepositoryMetadata and RepositoryReplicas: one repository as the database records it,
//! and as its replicas actually are (their checksums).

use std::time::Duration;

use super::configured::{configured_pairs, known_virtual_storage};
use crate::datastore::{RepositoryLookup, RepositoryState};
use crate::proxy::error::{InvalidRequest, ProxyError};
use crate::proxy::state::Proxy;
use crate::routing::RoutingError;
use crate::wire::proto::get_repository_metadata_request::Query;
use crate::wire::proto::get_repository_metadata_response::Replica;
use crate::wire::proto::repository_replicas_response::RepositoryDetails;
use crate::wire::proto::repository_service_client::RepositoryServiceClient;
use crate::wire::proto::{
    CalculateChecksumRequest, GetRepositoryMetadataRequest, GetRepositoryMetadataResponse,
    Repository, RepositoryReplicasRequest, RepositoryReplicasResponse,
};

/// How long one node may take to compute a checksum (it reads every ref).
const CHECKSUM_TIMEOUT: Duration = Duration::from_secs(60);

/// GetRepositoryMetadata: the repository's record and every replica it has or should have.
pub async fn repository_metadata(
    proxy: &Proxy,
    request: GetRepositoryMetadataRequest,
) -> Result<GetRepositoryMetadataResponse, ProxyError> {
    let lookup = match request.query {
        None => return Err(InvalidRequest::NoQuery.into()),
        Some(Query::RepositoryId(id)) => RepositoryLookup::Id(id),
        Some(Query::Path(path)) => RepositoryLookup::Path {
            virtual_storage: path.virtual_storage,
            relative_path: path.relative_path,
        },
    };
    let state = proxy
        .store()
        .repository_state(&lookup, &configured_pairs(proxy))
        .await?
        .ok_or(RoutingError::RepositoryNotFound)?;
    Ok(to_proto(state))
}

fn to_proto(state: RepositoryState) -> GetRepositoryMetadataResponse {
    GetRepositoryMetadataResponse {
        repository_id: state.repository_id,
        virtual_storage: state.virtual_storage,
        relative_path: state.relative_path,
        replica_path: state.replica_path,
        primary: state.primary.unwrap_or_default(),
        generation: state.generation,
        replicas: state
            .replicas
            .into_iter()
            .map(|replica| Replica {
                storage: replica.storage,
                assigned: replica.assigned,
                generation: replica.generation,
                healthy: replica.healthy,
                valid_primary: replica.valid_primary,
                verified_at: replica.verified_at.map(|at| prost_types::Timestamp {
                    seconds: at.timestamp(),
                    nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(0),
                }),
            })
            .collect(),
    }
}

/// RepositoryReplicas: the checksum of the primary's replica and of every other assigned
/// replica, computed by their nodes (what the operator compares after a data loss).
pub async fn repository_replicas(
    proxy: &Proxy,
    request: RepositoryReplicasRequest,
) -> Result<RepositoryReplicasResponse, ProxyError> {
    let repository = request.repository.ok_or(ProxyError::RepositoryNotSet)?;
    let virtual_storage = repository.storage_name;
    let relative_path = repository.relative_path;
    let configured = known_virtual_storage(proxy, &virtual_storage)?;
    let store = proxy.store();
    let replicas = store
        .consistent_storages(&virtual_storage, &relative_path)
        .await?
        .ok_or(RoutingError::RepositoryNotFound)?;
    let primary = store
        .get_primary(replicas.repository_id)
        .await?
        .storage
        .ok_or(RoutingError::NoPrimary)?;
    let mut assigned = store.assignments(replicas.repository_id).await?;
    assigned.retain(|storage| configured.contains(storage));
    if assigned.is_empty() {
        assigned = configured.to_vec();
    }
    if !assigned.contains(&primary) {
        return Err(RoutingError::PrimaryNotAssigned.into());
    }
    let details = |storage: String| {
        checksum(
            proxy,
            &virtual_storage,
            storage,
            &relative_path,
            &replicas.replica_path,
        )
    };
    let secondaries = assigned.into_iter().filter(|storage| *storage != primary);
    let (primary, secondaries) = futures::join!(
        details(primary.clone()),
        futures::future::join_all(secondaries.map(details))
    );
    Ok(RepositoryReplicasResponse {
        primary: Some(primary?),
        replicas: secondaries.into_iter().collect::<Result<_, _>>()?,
    })
}

/// The checksum of one replica, named by the client's relative path.
async fn checksum(
    proxy: &Proxy,
    virtual_storage: &str,
    storage: String,
    relative_path: &str,
    replica_path: &str,
) -> Result<RepositoryDetails, ProxyError> {
    let failed = |storage: &str, source: crate::proxy::error::BoxError| ProxyError::NodeRequest {
        what: "checksum",
        storage: storage.to_string(),
        source,
    };
    let channel = proxy
        .nodes
        .channel(virtual_storage, &storage)
        .ok_or_else(|| failed(&storage, "no connection to the node".into()))?;
    let mut client = RepositoryServiceClient::new(channel.clone());
    let call = client.calculate_checksum(CalculateChecksumRequest {
        repository: Some(Repository {
            storage_name: storage.clone(),
            relative_path: replica_path.to_string(),
            ..Default::default()
        }),
    });
    let checksum = match tokio::time::timeout(CHECKSUM_TIMEOUT, call).await {
        Ok(Ok(response)) => response.into_inner().checksum,
        Ok(Err(status)) => return Err(failed(&storage, Box::new(status))),
        Err(elapsed) => return Err(failed(&storage, Box::new(elapsed))),
    };
    Ok(RepositoryDetails {
        repository: Some(Repository {
            storage_name: storage,
            relative_path: relative_path.to_string(),
            ..Default::default()
        }),
        checksum,
    })
}
