//! ServerService: ServerInfo and DiskStatistics.

use praefect_wire::proto::server_service_server::ServerService;
use praefect_wire::proto::{
    disk_statistics_response, server_info_response, DiskStatisticsRequest, DiskStatisticsResponse,
    ServerInfoRequest, ServerInfoResponse,
};
use tonic::{Request, Response, Status};

use super::Services;
use crate::storage;

#[tonic::async_trait]
impl ServerService for Services {
    async fn server_info(
        &self,
        _request: Request<ServerInfoRequest>,
    ) -> Result<Response<ServerInfoResponse>, Status> {
        let node = &self.0;
        let mut statuses = Vec::new();
        for name in node.storages.names() {
            let root = node.storages.root(&name)?.to_path_buf();
            let status = tokio::task::spawn_blocking(move || {
                let readable = std::fs::read_dir(&root).is_ok();
                let probe = root
                    .join(storage::INTERNAL_DIR)
                    .join("tmp")
                    .join(format!("probe-{}", uuid::Uuid::new_v4().simple()));
                let writeable = std::fs::write(&probe, b"").is_ok();
                let _ = std::fs::remove_file(&probe);
                let filesystem_id = storage::filesystem_id(&root).unwrap_or_default();
                (readable, writeable, filesystem_id)
            })
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
            statuses.push(server_info_response::StorageStatus {
                storage_name: name,
                readable: status.0,
                writeable: status.1,
                fs_type: String::new(),
                filesystem_id: status.2,
                replication_factor: 0,
            });
        }
        Ok(Response::new(ServerInfoResponse {
            server_version: format!("gitnode-{}", crate::VERSION),
            git_version: node.git_version.clone(),
            storage_statuses: statuses,
        }))
    }

    async fn disk_statistics(
        &self,
        _request: Request<DiskStatisticsRequest>,
    ) -> Result<Response<DiskStatisticsResponse>, Status> {
        let mut statuses = Vec::new();
        for name in self.0.storages.names() {
            let root = self.0.storages.root(&name)?.to_path_buf();
            let stats = tokio::task::spawn_blocking(move || nix::sys::statvfs::statvfs(&root))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| Status::internal(format!("statvfs {name}: {e}")))?;
            let fragment = stats.fragment_size() as i64;
            let available = stats.blocks_available() as i64 * fragment;
            let used = (stats.blocks() as i64 - stats.blocks_free() as i64) * fragment;
            statuses.push(disk_statistics_response::StorageStatus {
                storage_name: name,
                available,
                used,
            });
        }
        Ok(Response::new(DiskStatisticsResponse {
            storage_statuses: statuses,
        }))
    }
}
