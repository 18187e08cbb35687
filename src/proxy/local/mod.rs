//! The RPCs the router answers itself instead of forwarding them, all listed in
//! [`ANSWERED_HERE`]: whole services (gRPC health, `ServerService`, `PraefectInfoService`,
//! generated tonic services mounted beside the proxy) and single methods of forwarded
//! services that only the database can answer (their first message is read by the proxy
//! pipeline, which then hands it here).

mod configured;
mod dataloss;
mod metadata;
mod praefect_info;
mod reply;
mod repository;
mod server_service;
mod walk;

use bytes::Bytes;

pub use praefect_info::PraefectInfo;
pub use server_service::{virtual_filesystem_id, ServerServiceHere};

use super::error::ProxyError;
use super::state::Proxy;

/// Who answers an RPC that is not forwarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnsweredBy {
    /// `grpc.health.v1.Health`: liveness.
    GrpcHealth,
    /// `gitaly.ServerService`: server info and disk statistics of the virtual storages.
    ServerService,
    /// `gitaly.PraefectInfoService`: the router's administrative RPCs.
    PraefectInfoService,
    /// A single method of a forwarded service, answered from the database.
    Method(LocalMethod),
}

/// The single methods of forwarded services that the router answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalMethod {
    RepositoryExists,
    RemoveRepository,
    DeleteObjectPool,
    WalkRepos,
}

/// Every RPC the router answers itself: a service prefix (ending in `/`) or a full method.
pub const ANSWERED_HERE: &[(&str, AnsweredBy)] = &[
    ("/grpc.health.v1.Health/", AnsweredBy::GrpcHealth),
    ("/gitaly.ServerService/", AnsweredBy::ServerService),
    (
        "/gitaly.PraefectInfoService/",
        AnsweredBy::PraefectInfoService,
    ),
    (
        "/gitaly.RepositoryService/RepositoryExists",
        AnsweredBy::Method(LocalMethod::RepositoryExists),
    ),
    (
        "/gitaly.RepositoryService/RemoveRepository",
        AnsweredBy::Method(LocalMethod::RemoveRepository),
    ),
    (
        "/gitaly.ObjectPoolService/DeleteObjectPool",
        AnsweredBy::Method(LocalMethod::DeleteObjectPool),
    ),
    (
        "/gitaly.InternalGitaly/WalkRepos",
        AnsweredBy::Method(LocalMethod::WalkRepos),
    ),
];

/// Who answers `path` if the router does; None for calls to forward.
pub fn answered_by(path: &str) -> Option<AnsweredBy> {
    ANSWERED_HERE.iter().find_map(|(name, by)| {
        let matches = match name.strip_suffix('/') {
            // A service: any method of it (a name must follow the slash).
            Some(_) => path.len() > name.len() && path.starts_with(name),
            None => path == *name,
        };
        matches.then_some(*by)
    })
}

impl LocalMethod {
    /// Answers the call whose first request message is `message`.
    pub async fn answer(
        self,
        proxy: &Proxy,
        message: &Bytes,
    ) -> Result<http::Response<tonic::body::Body>, ProxyError> {
        match self {
            LocalMethod::RepositoryExists => repository::repository_exists(proxy, message).await,
            LocalMethod::RemoveRepository => repository::remove_repository(proxy, message).await,
            LocalMethod::DeleteObjectPool => repository::delete_object_pool(proxy, message).await,
            LocalMethod::WalkRepos => walk::walk_repos(proxy, message).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::registry::Registry;

    #[test]
    fn the_table_names_rpcs_of_the_protocol() {
        let cases = [
            ("/grpc.health.v1.Health/Check", Some(AnsweredBy::GrpcHealth)),
            ("/grpc.health.v1.Health/", None),
            (
                "/gitaly.ServerService/ServerInfo",
                Some(AnsweredBy::ServerService),
            ),
            (
                "/gitaly.PraefectInfoService/MarkUnverified",
                Some(AnsweredBy::PraefectInfoService),
            ),
            (
                "/gitaly.InternalGitaly/WalkRepos",
                Some(AnsweredBy::Method(LocalMethod::WalkRepos)),
            ),
            ("/gitaly.RepositoryService/RepositoryExistsX", None),
            ("/gitaly.RefService/FindDefaultBranchName", None),
        ];
        for (path, want) in cases {
            assert_eq!(answered_by(path), want, "{path}");
        }
        // Every single method listed is an RPC of the registry, and every RPC of a service
        // listed here is one the registry marks as answered by the router.
        for (name, by) in ANSWERED_HERE {
            match by {
                AnsweredBy::Method(_) => {
                    assert!(Registry::global().lookup(name).is_some(), "{name}")
                }
                AnsweredBy::GrpcHealth => {}
                _ => {
                    let methods: Vec<_> = Registry::global()
                        .iter()
                        .filter(|m| m.full_name.starts_with(name))
                        .collect();
                    assert!(!methods.is_empty(), "{name}");
                    assert!(methods.iter().all(|m| m.intercepted), "{name}");
                }
            }
        }
    }
}
