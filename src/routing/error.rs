//! Why a call could not be routed. The messages are Praefect's (spec §13); the proxy's error
//! model maps each to its gRPC code in one place.

use super::registry::OpType;
use super::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("storage name not set")]
    StorageNameNotSet,
    #[error("repository path not set")]
    RelativePathNotSet,
    /// A relative path outside the one accepted spelling (see `relative_path`).
    #[error(transparent)]
    InvalidRelativePath(#[from] super::relative_path::InvalidPath),
    #[error("storage name not found")]
    StorageNotFound,
    #[error("repository not found")]
    RepositoryNotFound,
    #[error("additional repository not found")]
    AdditionalRepositoryNotFound,
    #[error("resolve additional replica path: repository and additional repository are on different virtual storages")]
    DifferentVirtualStorages,
    #[error("repository already exists")]
    RepositoryExists,
    #[error("no primary")]
    NoPrimary,
    #[error("primary gitaly is not healthy")]
    PrimaryUnhealthy,
    #[error("primary node is not assigned")]
    PrimaryNotAssigned,
    #[error("repository is in read-only mode")]
    ReadOnly,
    #[error("no healthy nodes")]
    NoHealthyNodes,
    #[error("no suitable node to serve the request")]
    NoSuitableNode,
    #[error("storage-scoped mutators are not supported")]
    StorageScopedMutator,
    #[error("rpc with undefined scope \"partition\"")]
    PartitionScoped,
    #[error("rpc without scope")]
    Unscoped,
    /// Repository-scoped RPCs without an operation type (Unimplemented).
    #[error("routing {0:?} RPCs is not implemented yet")]
    UnsupportedOpType(OpType),
    #[error(transparent)]
    Store(#[from] StoreError),
}
