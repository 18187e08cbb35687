//! `gitaly.PraefectInfoService`: the router's own administrative RPCs, answered from the
//! database rather than forwarded (the subcommands `verify`, `set-replication-factor`, ...
//! call them through a router).

use std::sync::Arc;

use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status};

use super::configured::known_virtual_storage;
use super::{dataloss, metadata};
use crate::datastore::ReplicaSelector;
use crate::proxy::error::{InvalidRequest, ProxyError};
use crate::proxy::state::Proxy;
use crate::wire::proto::mark_unverified_request::Selector;
use crate::wire::proto::praefect_info_service_server::PraefectInfoService;
use crate::wire::proto::{
    DatalossRequest, DatalossResponse, GetRepositoryMetadataRequest, GetRepositoryMetadataResponse,
    MarkUnverifiedRequest, MarkUnverifiedResponse, RepositoryReplicasRequest,
    RepositoryReplicasResponse, SetAuthoritativeStorageRequest, SetAuthoritativeStorageResponse,
    SetReplicationFactorRequest, SetReplicationFactorResponse,
};

/// The router's `PraefectInfoService`.
pub struct PraefectInfo {
    pub proxy: Arc<Proxy>,
}

#[tonic::async_trait]
impl PraefectInfoService for PraefectInfo {
    /// MarkUnverified: sets `verified_at` to NULL on the selected replicas (one repository,
    /// a virtual storage, or one storage of it), so the background verifier checks them
    /// first; answers how many replicas matched.
    async fn mark_unverified(
        &self,
        request: Request<MarkUnverifiedRequest>,
    ) -> Result<Response<MarkUnverifiedResponse>, Status> {
        self.mark(request.into_inner())
            .await
            .map(Response::new)
            .map_err(|err| err.report())
    }

    /// SetReplicationFactor: changes how many storages are assigned to a repository (the
    /// primary stays assigned) and answers the assignments. The reconciler then creates and
    /// removes replicas to match.
    async fn set_replication_factor(
        &self,
        request: Request<SetReplicationFactorRequest>,
    ) -> Result<Response<SetReplicationFactorResponse>, Status> {
        self.set_factor(request.into_inner())
            .await
            .map(Response::new)
            .map_err(|err| err.report())
    }

    /// RepositoryReplicas: the checksums of the primary's and the other assigned replicas.
    async fn repository_replicas(
        &self,
        request: Request<RepositoryReplicasRequest>,
    ) -> Result<Response<RepositoryReplicasResponse>, Status> {
        metadata::repository_replicas(&self.proxy, request.into_inner())
            .await
            .map(Response::new)
            .map_err(|err| err.report())
    }

    /// Dataloss: the repositories that lost their primary (or, if asked, miss replicas).
    async fn dataloss(
        &self,
        request: Request<DatalossRequest>,
    ) -> Result<Response<BoxStream<DatalossResponse>>, Status> {
        let messages = dataloss::dataloss(&self.proxy, request.into_inner())
            .await
            .map_err(|err| err.report())?;
        let stream = futures::stream::iter(messages.into_iter().map(Ok));
        Ok(Response::new(Box::pin(stream)))
    }

    /// SetAuthoritativeStorage: accepts a data loss; the chosen replica is the only up-to-date
    /// one afterwards and the reconciler overwrites the others from it.
    async fn set_authoritative_storage(
        &self,
        request: Request<SetAuthoritativeStorageRequest>,
    ) -> Result<Response<SetAuthoritativeStorageResponse>, Status> {
        dataloss::set_authoritative_storage(&self.proxy, request.into_inner())
            .await
            .map(|()| Response::new(SetAuthoritativeStorageResponse {}))
            .map_err(|err| err.report())
    }

    /// GetRepositoryMetadata: the repository's record and all of its replicas.
    async fn get_repository_metadata(
        &self,
        request: Request<GetRepositoryMetadataRequest>,
    ) -> Result<Response<GetRepositoryMetadataResponse>, Status> {
        metadata::repository_metadata(&self.proxy, request.into_inner())
            .await
            .map(Response::new)
            .map_err(|err| err.report())
    }
}

impl PraefectInfo {
    async fn mark(
        &self,
        request: MarkUnverifiedRequest,
    ) -> Result<MarkUnverifiedResponse, ProxyError> {
        let selector = self.replica_selector(request.selector)?;
        let marked = self.proxy.store().mark_unverified(&selector).await?;
        tracing::info!(selector = ?selector, replicas_marked = marked, "marked replicas unverified");
        Ok(MarkUnverifiedResponse {
            replicas_marked: i64::try_from(marked).unwrap_or(i64::MAX),
        })
    }

    async fn set_factor(
        &self,
        request: SetReplicationFactorRequest,
    ) -> Result<SetReplicationFactorResponse, ProxyError> {
        let configured = known_virtual_storage(&self.proxy, &request.virtual_storage)?;
        let factor = request.replication_factor;
        if factor < 1 {
            return Err(InvalidRequest::ReplicationFactorBelowOne(factor).into());
        }
        if usize::try_from(factor).unwrap_or(usize::MAX) > configured.len() {
            return Err(InvalidRequest::ReplicationFactorAboveStorages {
                factor,
                storages: configured.len(),
            }
            .into());
        }
        let storages = self
            .proxy
            .store()
            .set_replication_factor(
                &request.virtual_storage,
                &request.relative_path,
                i64::from(factor),
                configured,
            )
            .await?
            .ok_or_else(|| InvalidRequest::RepositoryNotTracked {
                virtual_storage: request.virtual_storage.clone(),
                relative_path: request.relative_path.clone(),
            })?;
        tracing::info!(
            virtual_storage = %request.virtual_storage,
            relative_path = %request.relative_path,
            replication_factor = factor,
            assignments = ?storages,
            "replication factor set"
        );
        Ok(SetReplicationFactorResponse { storages })
    }

    /// Checks a MarkUnverified selector against the configuration.
    fn replica_selector(&self, selector: Option<Selector>) -> Result<ReplicaSelector, ProxyError> {
        match selector {
            None => Err(InvalidRequest::NoSelector.into()),
            Some(Selector::RepositoryId(id)) => Ok(ReplicaSelector::Repository(id)),
            Some(Selector::VirtualStorage(virtual_storage)) => {
                known_virtual_storage(&self.proxy, &virtual_storage)?;
                Ok(ReplicaSelector::VirtualStorage(virtual_storage))
            }
            Some(Selector::Storage(storage)) => {
                let configured = known_virtual_storage(&self.proxy, &storage.virtual_storage)?;
                if !configured.contains(&storage.storage) {
                    return Err(InvalidRequest::UnknownStorage {
                        virtual_storage: storage.virtual_storage,
                        storage: storage.storage,
                    }
                    .into());
                }
                Ok(ReplicaSelector::Storage {
                    virtual_storage: storage.virtual_storage,
                    storage: storage.storage,
                })
            }
        }
    }
}
