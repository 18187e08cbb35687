//! `gitaly.PraefectInfoService`: the router's own administrative RPCs, answered from the
//! database rather than forwarded (the subcommands `verify`, `set-replication-factor`, ...
//! call them through a router).

use http_body_util::BodyStream;
use prost::Message;

use super::error::ProxyError;
use super::handler::Proxy;
use super::{frame, intercept};
use crate::datastore::ReplicaSelector;
use crate::wire::proto::mark_unverified_request::Selector;
use crate::wire::proto::{
    MarkUnverifiedRequest, MarkUnverifiedResponse, SetReplicationFactorRequest,
    SetReplicationFactorResponse,
};

pub const MARK_UNVERIFIED: &str = "/gitaly.PraefectInfoService/MarkUnverified";
pub const SET_REPLICATION_FACTOR: &str = "/gitaly.PraefectInfoService/SetReplicationFactor";

/// Reads and decodes the request message of a unary call the router answers itself.
pub(super) async fn read_unary<M: Message + Default>(
    request: http::Request<axum::body::Body>,
) -> Result<M, ProxyError> {
    let mut body = BodyStream::new(request.into_body());
    let first = frame::read_first(&mut body).await.map_err(|e| match e {
        frame::FrameError::Body(text) => ProxyError::ClientStream(text),
        other => ProxyError::Malformed(other.to_string()),
    })?;
    intercept::decode(&first.message)
}

impl Proxy {
    /// MarkUnverified: sets `verified_at` to NULL on the selected replicas (one repository,
    /// a virtual storage, or one storage of it), so the background verifier checks them
    /// first; answers how many replicas matched.
    pub(super) async fn mark_unverified(
        &self,
        request: http::Request<axum::body::Body>,
    ) -> Result<http::Response<tonic::body::Body>, ProxyError> {
        let request: MarkUnverifiedRequest = read_unary(request).await?;
        let selector = self.replica_selector(request.selector)?;
        let marked = self.cache.store().mark_unverified(&selector).await?;
        tracing::info!(selector = ?selector, replicas_marked = marked, "marked replicas unverified");
        Ok(intercept::unary_ok(&MarkUnverifiedResponse {
            replicas_marked: i64::try_from(marked).unwrap_or(i64::MAX),
        }))
    }

    /// SetReplicationFactor: changes how many storages are assigned to a repository (the
    /// primary stays assigned) and answers the assignments. The reconciler then creates and
    /// removes replicas to match.
    pub(super) async fn set_replication_factor(
        &self,
        request: http::Request<axum::body::Body>,
    ) -> Result<http::Response<tonic::body::Body>, ProxyError> {
        let request: SetReplicationFactorRequest = read_unary(request).await?;
        let configured = self.known_virtual_storage(&request.virtual_storage)?;
        let factor = request.replication_factor;
        if factor < 1 {
            return Err(ProxyError::InvalidArgument(format!(
                "set replication factor: attempted to set replication factor {factor} but minimum is 1"
            )));
        }
        if usize::try_from(factor).unwrap_or(usize::MAX) > configured.len() {
            return Err(ProxyError::InvalidArgument(format!(
                "set replication factor: attempted to set replication factor {factor} but virtual storage only contains {} storages",
                configured.len()
            )));
        }
        let storages = self
            .cache
            .store()
            .set_replication_factor(
                &request.virtual_storage,
                &request.relative_path,
                i64::from(factor),
                &configured,
            )
            .await?
            .ok_or_else(|| {
                ProxyError::InvalidArgument(format!(
                    "set replication factor: repository {:?}/{:?} not found",
                    request.virtual_storage, request.relative_path
                ))
            })?;
        tracing::info!(
            virtual_storage = %request.virtual_storage,
            relative_path = %request.relative_path,
            replication_factor = factor,
            assignments = ?storages,
            "replication factor set"
        );
        Ok(intercept::unary_ok(&SetReplicationFactorResponse {
            storages,
        }))
    }

    /// Checks a MarkUnverified selector against the configuration.
    fn replica_selector(&self, selector: Option<Selector>) -> Result<ReplicaSelector, ProxyError> {
        match selector {
            None => Err(ProxyError::InvalidArgument(
                "no selector: set repository_id, virtual_storage or storage".into(),
            )),
            Some(Selector::RepositoryId(id)) => Ok(ReplicaSelector::Repository(id)),
            Some(Selector::VirtualStorage(virtual_storage)) => {
                self.known_virtual_storage(&virtual_storage)?;
                Ok(ReplicaSelector::VirtualStorage(virtual_storage))
            }
            Some(Selector::Storage(storage)) => {
                let configured = self.known_virtual_storage(&storage.virtual_storage)?;
                if !configured.contains(&storage.storage) {
                    return Err(ProxyError::InvalidArgument(format!(
                        "unknown storage {:?} in virtual storage {:?}",
                        storage.storage, storage.virtual_storage
                    )));
                }
                Ok(ReplicaSelector::Storage {
                    virtual_storage: storage.virtual_storage,
                    storage: storage.storage,
                })
            }
        }
    }

    /// The storages of a configured virtual storage; InvalidArgument naming it otherwise.
    fn known_virtual_storage(&self, name: &str) -> Result<Vec<String>, ProxyError> {
        self.config
            .virtual_storage(name)
            .map(|vs| vs.node.iter().map(|n| n.storage.clone()).collect())
            .ok_or_else(|| ProxyError::InvalidArgument(format!("unknown virtual storage {name:?}")))
    }
}
