//! The one place where the router's errors become gRPC statuses, with the codes and messages
//! of Praefect (spec §13). Internal details go to the log, not to the client.

use tonic::{Code, Status};

use crate::datastore::DatastoreError;
use crate::proxy::rewrite::RewriteError;

/// Why the router could not route or forward a call.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("full method name not found: {0}")]
    UnknownMethod(String),
    #[error("repository not set")]
    RepositoryNotSet,
    #[error("storage name not set")]
    StorageNameNotSet,
    #[error("repository path not set")]
    RelativePathNotSet,
    #[error("storage name not found")]
    StorageNotFound,
    #[error("repository not found")]
    RepositoryNotFound,
    #[error("additional repository not found")]
    AdditionalRepositoryNotFound,
    #[error("repository already exists")]
    RepositoryExists,
    #[error("repository does not exist")]
    RepositoryDoesNotExist,
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
    /// Not implemented by praefect-rs yet (Unimplemented).
    #[error("{0}")]
    Unsupported(String),
    /// Calls Praefect itself refuses to route (Internal), e.g. storage-scoped mutators.
    #[error("{0}")]
    NotRoutable(String),
    #[error("{0}")]
    NodeUnavailable(String),
    /// A call the router made to a node on its own behalf failed (Internal).
    #[error("{0}")]
    NodeRequest(String),
    #[error("first request message: {0}")]
    Malformed(String),
    /// A request that is well-formed but asks for something impossible (InvalidArgument).
    #[error("{0}")]
    InvalidArgument(String),
    #[error("reading the first request message: {0}")]
    ClientStream(String),
    #[error("database: {0}")]
    Database(#[from] DatastoreError),
}

impl From<RewriteError> for ProxyError {
    fn from(err: RewriteError) -> Self {
        match err {
            RewriteError::NotFound => ProxyError::RepositoryNotSet,
            other => ProxyError::Malformed(other.to_string()),
        }
    }
}

impl ProxyError {
    /// The status the client sees.
    pub fn to_status(&self) -> Status {
        let code = match self {
            ProxyError::RepositoryNotSet
            | ProxyError::StorageNameNotSet
            | ProxyError::RelativePathNotSet
            | ProxyError::StorageNotFound
            | ProxyError::Malformed(_)
            | ProxyError::InvalidArgument(_) => Code::InvalidArgument,
            ProxyError::RepositoryNotFound
            | ProxyError::AdditionalRepositoryNotFound
            | ProxyError::RepositoryDoesNotExist => Code::NotFound,
            ProxyError::RepositoryExists => Code::AlreadyExists,
            ProxyError::ReadOnly => Code::FailedPrecondition,
            ProxyError::NoPrimary
            | ProxyError::PrimaryUnhealthy
            | ProxyError::PrimaryNotAssigned => Code::Internal,
            ProxyError::Unsupported(_) => Code::Unimplemented,
            ProxyError::ClientStream(_) => Code::Cancelled,
            ProxyError::NodeUnavailable(_) => Code::Unavailable,
            // The database being away (switchover, failover, stopped) is worth retrying
            // elsewhere or later; a statement that failed is not.
            ProxyError::Database(db) if db.is_unavailable() => Code::Unavailable,
            ProxyError::UnknownMethod(_)
            | ProxyError::NotRoutable(_)
            | ProxyError::NodeRequest(_)
            | ProxyError::NoHealthyNodes
            | ProxyError::NoSuitableNode
            | ProxyError::Database(_) => Code::Internal,
        };
        let message = match self {
            // Database errors can carry host names and SQL; the log has them.
            ProxyError::Database(db) if db.is_unavailable() => {
                "database unavailable: no database server accepts writes right now".to_string()
            }
            ProxyError::Database(_) => "database error".to_string(),
            other => other.to_string(),
        };
        Status::new(code, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_messages_match_praefect() {
        let cases = [
            (
                ProxyError::RepositoryNotSet,
                Code::InvalidArgument,
                "repository not set",
            ),
            (
                ProxyError::StorageNameNotSet,
                Code::InvalidArgument,
                "storage name not set",
            ),
            (
                ProxyError::RelativePathNotSet,
                Code::InvalidArgument,
                "repository path not set",
            ),
            (
                ProxyError::StorageNotFound,
                Code::InvalidArgument,
                "storage name not found",
            ),
            (
                ProxyError::RepositoryNotFound,
                Code::NotFound,
                "repository not found",
            ),
            (
                ProxyError::NoHealthyNodes,
                Code::Internal,
                "no healthy nodes",
            ),
            (
                ProxyError::NoSuitableNode,
                Code::Internal,
                "no suitable node to serve the request",
            ),
            (
                ProxyError::UnknownMethod("/x.Y/Z".into()),
                Code::Internal,
                "full method name not found: /x.Y/Z",
            ),
        ];
        for (error, code, message) in cases {
            let status = error.to_status();
            assert_eq!((status.code(), status.message()), (code, message));
        }
        let db = ProxyError::Database(DatastoreError::Settings("host=secret".into())).to_status();
        assert!(!db.message().contains("secret"));
        assert_eq!(db.code(), Code::Internal);
        let away = ProxyError::Database(DatastoreError::Unavailable("db1:5432 refused".into()))
            .to_status();
        assert_eq!(away.code(), Code::Unavailable);
        assert!(away.message().starts_with("database unavailable"));
        assert!(!away.message().contains("db1"));
    }
}
