//! The router's error model, and the one place where errors become gRPC statuses with the
//! codes and messages of Praefect (spec §13).
//!
//! Every error knows its [`Side`]: the client's own mistakes are told to the client as they
//! are; everything else (a node, the database, the router itself) reaches the client as a
//! sanitised message, without node addresses, host names or paths, while the full cause chain
//! goes to the log with the call's correlation id.

use tonic::{Code, Status};

use super::frame::FrameError;
use super::rewrite::RewriteError;
use crate::datastore::DatastoreError;
use crate::routing::RoutingError;

/// A cause of any type, kept for the log.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Whose fault an error is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The request itself is wrong (or names something that does not exist).
    Client,
    /// A Gitaly node could not be reached or failed.
    Node,
    /// The database could not answer.
    Database,
    /// The cluster's state or the router's own limits (no healthy node, not implemented).
    Internal,
}

/// A first request message (or its metadata) the router cannot use.
#[derive(Debug, thiserror::Error)]
pub enum Malformed {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Field(RewriteError),
    #[error("malformed protobuf message")]
    Message(#[source] prost::DecodeError),
    #[error("invalid gitaly-sidechannel-id")]
    SidechannelId,
    #[error("sidechannel requested without a backchannel connection")]
    NoBackchannel,
}

/// An administrative request (PraefectInfoService) that asks for something impossible.
#[derive(Debug, thiserror::Error)]
pub enum InvalidRequest {
    #[error("set replication factor: attempted to set replication factor {0} but minimum is 1")]
    ReplicationFactorBelowOne(i32),
    #[error("set replication factor: attempted to set replication factor {factor} but virtual storage only contains {storages} storages")]
    ReplicationFactorAboveStorages { factor: i32, storages: usize },
    #[error("set replication factor: repository {virtual_storage:?}/{relative_path:?} not found")]
    RepositoryNotTracked {
        virtual_storage: String,
        relative_path: String,
    },
    #[error("repository {relative_path:?} does not exist on virtual storage {virtual_storage:?}")]
    RepositoryNotOnVirtualStorage {
        virtual_storage: String,
        relative_path: String,
    },
    #[error("no query: set repository_id or path")]
    NoQuery,
    #[error("no selector: set repository_id, virtual_storage or storage")]
    NoSelector,
    #[error("unknown virtual storage {0:?}")]
    UnknownVirtualStorage(String),
    #[error("unknown storage {storage:?} in virtual storage {virtual_storage:?}")]
    UnknownStorage {
        virtual_storage: String,
        storage: String,
    },
}

/// Why the router could not route, forward or answer a call.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("full method name not found: {0}")]
    UnknownMethod(String),
    #[error("repository not set")]
    RepositoryNotSet,
    #[error("first request message: {0}")]
    Malformed(#[source] Malformed),
    /// The client did not send its whole first message in time (`[proxy]
    /// first_message_timeout`).
    #[error("the first request message did not arrive within {0:?}")]
    FirstMessageTimeout(std::time::Duration),
    /// The client's request stream failed before its first message was complete.
    #[error("reading the first request message: {0}")]
    ClientStream(#[source] BoxError),
    #[error(transparent)]
    Routing(#[from] RoutingError),
    #[error("repository does not exist")]
    RepositoryDoesNotExist,
    #[error(transparent)]
    InvalidRequest(#[from] InvalidRequest),
    #[error("delete object pool: invalid object pool path")]
    InvalidPoolPath,
    /// An RPC of a forwarded service that the router answers itself, not written yet.
    #[error("{0} is answered by praefect itself and not implemented yet")]
    NotImplemented(String),
    /// The call could not be sent to the node, or the node's answer broke off.
    #[error("forwarding to {storage}")]
    Forward {
        storage: String,
        #[source]
        source: BoxError,
    },
    /// A call the router made to a node on its own behalf failed.
    #[error("error when requesting {what} from internal storage {storage}")]
    NodeRequest {
        what: &'static str,
        storage: String,
        #[source]
        source: BoxError,
    },
    /// A metadata value the router made could not be encoded (a bug, not the client's).
    #[error("building the forwarded call: {0}")]
    Request(#[source] BoxError),
    #[error("database")]
    Database(#[from] DatastoreError),
}

impl From<RewriteError> for ProxyError {
    fn from(err: RewriteError) -> Self {
        match err {
            RewriteError::NotFound => ProxyError::RepositoryNotSet,
            other => ProxyError::Malformed(Malformed::Field(other)),
        }
    }
}

impl From<Malformed> for ProxyError {
    fn from(err: Malformed) -> Self {
        ProxyError::Malformed(err)
    }
}

impl ProxyError {
    /// Whose fault the error is.
    pub fn side(&self) -> Side {
        match self {
            ProxyError::UnknownMethod(_)
            | ProxyError::RepositoryNotSet
            | ProxyError::Malformed(_)
            | ProxyError::ClientStream(_)
            | ProxyError::FirstMessageTimeout(_)
            | ProxyError::RepositoryDoesNotExist
            | ProxyError::InvalidRequest(_)
            | ProxyError::InvalidPoolPath => Side::Client,
            ProxyError::Routing(err) => routing_side(err),
            ProxyError::NotImplemented(_) | ProxyError::Request(_) => Side::Internal,
            ProxyError::Forward { .. } | ProxyError::NodeRequest { .. } => Side::Node,
            ProxyError::Database(_) => Side::Database,
        }
    }

    /// Whether the same call may succeed if the client tries again (elsewhere or later):
    /// a node or the database being away is; a refused request is not.
    pub fn retryable(&self) -> bool {
        self.code() == Code::Unavailable
    }

    fn code(&self) -> Code {
        match self {
            ProxyError::RepositoryNotSet
            | ProxyError::Malformed(_)
            | ProxyError::InvalidRequest(_)
            | ProxyError::InvalidPoolPath => Code::InvalidArgument,
            ProxyError::RepositoryDoesNotExist => Code::NotFound,
            ProxyError::ClientStream(_) => Code::Cancelled,
            ProxyError::FirstMessageTimeout(_) => Code::DeadlineExceeded,
            ProxyError::NotImplemented(_) => Code::Unimplemented,
            ProxyError::Forward { .. } => Code::Unavailable,
            // The database being away (switchover, failover, stopped) is worth retrying
            // elsewhere or later; a statement that failed is not.
            ProxyError::Database(db) if db.is_unavailable() => Code::Unavailable,
            ProxyError::Routing(err) => routing_code(err),
            ProxyError::UnknownMethod(_)
            | ProxyError::NodeRequest { .. }
            | ProxyError::Request(_)
            | ProxyError::Database(_) => Code::Internal,
        }
    }

    /// The message the client sees: the error itself when it is the client's or names only
    /// what the client named; a fixed text otherwise (the log has the cause).
    fn client_message(&self) -> String {
        match self {
            ProxyError::Database(db) if db.is_unavailable() => {
                "database unavailable: no database server accepts writes right now".to_string()
            }
            ProxyError::Database(_) => "database error".to_string(),
            ProxyError::Routing(RoutingError::Store(store)) if store.unavailable => {
                "database unavailable: no database server accepts writes right now".to_string()
            }
            ProxyError::Routing(RoutingError::Store(_)) => "database error".to_string(),
            ProxyError::Forward { storage, .. } => {
                format!("forwarding to {storage}: node unavailable")
            }
            ProxyError::Request(_) => "internal error".to_string(),
            other => other.to_string(),
        }
    }

    /// The status the client sees.
    pub fn to_status(&self) -> Status {
        Status::new(self.code(), self.client_message())
    }

    /// Logs the error with its whole cause chain (the request span adds the method and the
    /// correlation id) and returns the status the client sees.
    pub fn report(&self) -> Status {
        match self.side() {
            Side::Client => {
                tracing::info!(error = %self.chain(), side = "client", "call not routed")
            }
            side => tracing::warn!(error = %self.chain(), side = ?side, "call failed"),
        }
        self.to_status()
    }

    /// The whole cause chain, for the log.
    pub fn chain(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            let cause_text = cause.to_string();
            if !text.ends_with(&cause_text) {
                text.push_str(": ");
                text.push_str(&cause_text);
            }
            source = cause.source();
        }
        text
    }
}

fn routing_side(err: &RoutingError) -> Side {
    match err {
        RoutingError::StorageNameNotSet
        | RoutingError::RelativePathNotSet
        | RoutingError::InvalidRelativePath(_)
        | RoutingError::StorageNotFound
        | RoutingError::RepositoryNotFound
        | RoutingError::AdditionalRepositoryNotFound
        | RoutingError::DifferentVirtualStorages
        | RoutingError::RepositoryExists => Side::Client,
        RoutingError::Store(_) => Side::Database,
        RoutingError::NoPrimary
        | RoutingError::PrimaryUnhealthy
        | RoutingError::PrimaryNotAssigned
        | RoutingError::ReadOnly
        | RoutingError::NoHealthyNodes
        | RoutingError::NoSuitableNode
        | RoutingError::StorageScopedMutator
        | RoutingError::PartitionScoped
        | RoutingError::Unscoped
        | RoutingError::UnsupportedOpType(_) => Side::Internal,
    }
}

fn routing_code(err: &RoutingError) -> Code {
    match err {
        RoutingError::StorageNameNotSet
        | RoutingError::RelativePathNotSet
        | RoutingError::InvalidRelativePath(_)
        | RoutingError::StorageNotFound
        | RoutingError::DifferentVirtualStorages => Code::InvalidArgument,
        RoutingError::RepositoryNotFound | RoutingError::AdditionalRepositoryNotFound => {
            Code::NotFound
        }
        RoutingError::RepositoryExists => Code::AlreadyExists,
        RoutingError::ReadOnly => Code::FailedPrecondition,
        RoutingError::UnsupportedOpType(_) => Code::Unimplemented,
        RoutingError::Store(store) if store.unavailable => Code::Unavailable,
        RoutingError::NoPrimary
        | RoutingError::PrimaryUnhealthy
        | RoutingError::PrimaryNotAssigned
        | RoutingError::NoHealthyNodes
        | RoutingError::NoSuitableNode
        | RoutingError::StorageScopedMutator
        | RoutingError::PartitionScoped
        | RoutingError::Unscoped
        | RoutingError::Store(_) => Code::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::StoreError;

    #[test]
    fn codes_and_messages_match_praefect() {
        let cases: Vec<(ProxyError, Code, &str, Side)> = vec![
            (
                ProxyError::RepositoryNotSet,
                Code::InvalidArgument,
                "repository not set",
                Side::Client,
            ),
            (
                RoutingError::StorageNameNotSet.into(),
                Code::InvalidArgument,
                "storage name not set",
                Side::Client,
            ),
            (
                RoutingError::RelativePathNotSet.into(),
                Code::InvalidArgument,
                "repository path not set",
                Side::Client,
            ),
            (
                RoutingError::StorageNotFound.into(),
                Code::InvalidArgument,
                "storage name not found",
                Side::Client,
            ),
            (
                RoutingError::RepositoryNotFound.into(),
                Code::NotFound,
                "repository not found",
                Side::Client,
            ),
            (
                RoutingError::RepositoryExists.into(),
                Code::AlreadyExists,
                "repository already exists",
                Side::Client,
            ),
            (
                RoutingError::ReadOnly.into(),
                Code::FailedPrecondition,
                "repository is in read-only mode",
                Side::Internal,
            ),
            (
                RoutingError::NoHealthyNodes.into(),
                Code::Internal,
                "no healthy nodes",
                Side::Internal,
            ),
            (
                RoutingError::NoSuitableNode.into(),
                Code::Internal,
                "no suitable node to serve the request",
                Side::Internal,
            ),
            (
                RoutingError::PartitionScoped.into(),
                Code::Internal,
                "rpc with undefined scope \"partition\"",
                Side::Internal,
            ),
            (
                ProxyError::UnknownMethod("/x.Y/Z".into()),
                Code::Internal,
                "full method name not found: /x.Y/Z",
                Side::Client,
            ),
            (
                Malformed::SidechannelId.into(),
                Code::InvalidArgument,
                "first request message: invalid gitaly-sidechannel-id",
                Side::Client,
            ),
            (
                Malformed::Frame(FrameError::Empty).into(),
                Code::InvalidArgument,
                "first request message: the request ended before its first message",
                Side::Client,
            ),
            (
                Malformed::Frame(FrameError::TooLarge {
                    len: 4194305,
                    limit: 4194304,
                })
                .into(),
                Code::InvalidArgument,
                "first request message: the first message is 4194305 bytes, more than the limit of 4194304 bytes",
                Side::Client,
            ),
            (
                ProxyError::FirstMessageTimeout(std::time::Duration::from_secs(20)),
                Code::DeadlineExceeded,
                "the first request message did not arrive within 20s",
                Side::Client,
            ),
            (
                ProxyError::ClientStream("stream reset".into()),
                Code::Cancelled,
                "reading the first request message: stream reset",
                Side::Client,
            ),
        ];
        for (error, code, message, side) in cases {
            let status = error.to_status();
            assert_eq!((status.code(), status.message()), (code, message));
            assert_eq!(error.side(), side, "{message}");
            assert!(!error.retryable(), "{message}");
        }
    }

    #[test]
    fn what_is_not_the_clients_fault_is_sanitised() {
        let io = || -> Box<dyn std::error::Error + Send + Sync> {
            Box::new(std::io::Error::other(
                "tcp connect 10.1.2.3:8075 /var/opt/gitlab/gitaly.socket refused",
            ))
        };
        let cases: Vec<(ProxyError, Code, Side, bool)> = vec![
            (
                ProxyError::Database(DatastoreError::Settings("host=db1.secret".into())),
                Code::Internal,
                Side::Database,
                false,
            ),
            (
                ProxyError::Database(DatastoreError::Unavailable(
                    "db1.secret:5432 refused".into(),
                )),
                Code::Unavailable,
                Side::Database,
                true,
            ),
            (
                RoutingError::Store(StoreError {
                    unavailable: true,
                    source: io(),
                })
                .into(),
                Code::Unavailable,
                Side::Database,
                true,
            ),
            (
                RoutingError::Store(StoreError {
                    unavailable: false,
                    source: io(),
                })
                .into(),
                Code::Internal,
                Side::Database,
                false,
            ),
            (
                ProxyError::Forward {
                    storage: "gitaly-1".into(),
                    source: io(),
                },
                Code::Unavailable,
                Side::Node,
                true,
            ),
            (
                ProxyError::Request(io()),
                Code::Internal,
                Side::Internal,
                false,
            ),
        ];
        for (error, code, side, retryable) in cases {
            let status = error.to_status();
            assert_eq!(status.code(), code, "{error:?}");
            assert_eq!(error.side(), side, "{error:?}");
            assert_eq!(error.retryable(), retryable, "{error:?}");
            for secret in ["secret", "10.1.2.3", "/var/opt"] {
                assert!(!status.message().contains(secret), "{}", status.message());
            }
            // The log still gets the cause.
            let chain = error.chain();
            assert!(
                chain.contains("secret") || chain.contains("10.1.2.3"),
                "{chain}"
            );
        }
        let forward = ProxyError::Forward {
            storage: "gitaly-1".into(),
            source: io(),
        };
        assert_eq!(
            forward.to_status().message(),
            "forwarding to gitaly-1: node unavailable"
        );
    }
}
