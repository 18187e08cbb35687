//! `gitaly.ServerService` answered by the router (spec §10): clients see one Gitaly per
//! virtual storage, so ServerInfo reports virtual storages (asking one node of each), and
//! DiskStatistics lists every node's storages under their physical names.

use std::sync::Arc;
use std::time::Duration;

use rand::seq::SliceRandom;
use tonic::{Request, Response, Status};

use crate::proxy::error::ProxyError;
use crate::proxy::state::Proxy;
use crate::wire::proto::readiness_check_response::{
    failure, Failure, Ok as ReadyOk, Result as Readiness,
};
use crate::wire::proto::server_info_response::StorageStatus;
use crate::wire::proto::server_service_client::ServerServiceClient;
use crate::wire::proto::server_service_server::ServerService;
use crate::wire::proto::{
    DiskStatisticsRequest, DiskStatisticsResponse, ReadinessCheckRequest, ReadinessCheckResponse,
    ServerInfoRequest, ServerInfoResponse, ServerSignatureRequest, ServerSignatureResponse,
};

/// How long one node may take to answer.
const NODE_TIMEOUT: Duration = Duration::from_secs(10);

/// Namespace of the filesystem ids of virtual storages with more than one node.
const FILESYSTEM_ID_NAMESPACE: uuid::Uuid = uuid::uuid!("1ef1a8c6-cf52-4d0a-92a6-ca643e8bc7c5");

/// The filesystem id a virtual storage reports: its only node's own, or a stable id derived
/// from its name when several nodes (several filesystems) stand behind it.
pub fn virtual_filesystem_id(virtual_storage: &str) -> String {
    uuid::Uuid::new_v5(&FILESYSTEM_ID_NAMESPACE, virtual_storage.as_bytes()).to_string()
}

/// The router's `ServerService`.
pub struct ServerServiceHere {
    pub proxy: Arc<Proxy>,
}

#[tonic::async_trait]
impl ServerService for ServerServiceHere {
    /// ServerInfo: per virtual storage, the status one of its nodes reports for its own
    /// storage, renamed to the virtual storage. Nodes that fail are skipped (the next one of
    /// the virtual storage is tried); versions come from the first answer.
    async fn server_info(
        &self,
        _request: Request<ServerInfoRequest>,
    ) -> Result<Response<ServerInfoResponse>, Status> {
        let proxy = &self.proxy;
        let lookups = proxy.config.virtual_storage.iter().map(|vs| async move {
            let mut storages: Vec<&str> = vs.node.iter().map(|n| n.storage.as_str()).collect();
            storages.shuffle(&mut rand::thread_rng());
            // Try healthy nodes first; the others only if none of those answers.
            let healthy = proxy.health.healthy();
            let is_healthy = |s: &str| healthy.get(&vs.name).is_some_and(|set| set.contains(s));
            storages.sort_by_key(|s| !is_healthy(s));
            for storage in storages {
                let Some(channel) = proxy.nodes.channel(&vs.name, storage) else {
                    continue;
                };
                let mut client = ServerServiceClient::new(channel.clone());
                let answer =
                    tokio::time::timeout(NODE_TIMEOUT, client.server_info(ServerInfoRequest {}))
                        .await;
                let info = match answer {
                    Ok(Ok(info)) => info.into_inner(),
                    Ok(Err(status)) => {
                        tracing::warn!(storage, error = %status.message(), "ServerInfo failed on a node");
                        continue;
                    }
                    Err(_) => {
                        tracing::warn!(storage, "ServerInfo timed out on a node");
                        continue;
                    }
                };
                let Some(mut status) = info
                    .storage_statuses
                    .iter()
                    .find(|s| s.storage_name == storage)
                    .cloned()
                else {
                    continue;
                };
                status.storage_name = vs.name.clone();
                status.replication_factor = u32::try_from(vs.node.len()).unwrap_or(u32::MAX);
                if vs.node.len() > 1 {
                    status.filesystem_id = virtual_filesystem_id(&vs.name);
                }
                return Some((info.server_version, info.git_version, status));
            }
            None
        });
        let answers: Vec<Option<(String, String, StorageStatus)>> =
            futures::future::join_all(lookups).await;
        let mut response = ServerInfoResponse::default();
        for (server_version, git_version, status) in answers.into_iter().flatten() {
            if response.server_version.is_empty() {
                response.server_version = server_version;
                response.git_version = git_version;
            }
            response.storage_statuses.push(status);
        }
        Ok(Response::new(response))
    }

    /// DiskStatistics: every node in turn, their statuses concatenated under physical names.
    /// Any failure fails the call, naming the storage.
    async fn disk_statistics(
        &self,
        _request: Request<DiskStatisticsRequest>,
    ) -> Result<Response<DiskStatisticsResponse>, Status> {
        let mut response = DiskStatisticsResponse::default();
        for (node, channel) in self.proxy.nodes.iter() {
            let mut client = ServerServiceClient::new(channel.clone());
            let failed = |source: crate::proxy::error::BoxError| ProxyError::NodeRequest {
                what: "disk statistics",
                storage: node.storage.clone(),
                source,
            };
            let answer = tokio::time::timeout(
                NODE_TIMEOUT,
                client.disk_statistics(DiskStatisticsRequest {}),
            )
            .await
            .map_err(|elapsed| failed(Box::new(elapsed)).report())?
            .map_err(|status| failed(Box::new(status)).report())?;
            response
                .storage_statuses
                .extend(answer.into_inner().storage_statuses);
        }
        Ok(Response::new(response))
    }

    /// ReadinessCheck: ok, or the failed checks sorted by name. Every check reads memory,
    /// so the request's timeout cannot be reached.
    async fn readiness_check(
        &self,
        _request: Request<ReadinessCheckRequest>,
    ) -> Result<Response<ReadinessCheckResponse>, Status> {
        let failed = self.proxy.failed_readiness_checks();
        let result = if failed.is_empty() {
            Readiness::OkResponse(ReadyOk {})
        } else {
            Readiness::FailureResponse(Failure {
                failed_checks: failed
                    .into_iter()
                    .map(|check| failure::Response {
                        name: check.name,
                        error_message: check.error_message,
                    })
                    .collect(),
            })
        };
        Ok(Response::new(ReadinessCheckResponse {
            result: Some(result),
        }))
    }

    async fn server_signature(
        &self,
        _request: Request<ServerSignatureRequest>,
    ) -> Result<Response<ServerSignatureResponse>, Status> {
        Err(not_yet("/gitaly.ServerService/ServerSignature"))
    }
}

/// An RPC the router answers itself but does not implement yet.
pub(super) fn not_yet(method: &str) -> Status {
    ProxyError::NotImplemented(method.to_string()).to_status()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtual_filesystem_ids_are_stable_name_based_uuids() {
        let id = virtual_filesystem_id("default");
        assert_eq!(id, virtual_filesystem_id("default"));
        assert_ne!(id, virtual_filesystem_id("other"));
        let parsed = uuid::Uuid::parse_str(&id).unwrap();
        assert_eq!(parsed.get_version_num(), 5);
    }
}
