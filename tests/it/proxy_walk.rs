//! The router's pass-through across processes, RPC by RPC: the real `praefect serve` binary,
//! a real PostgreSQL, and two in-process echo nodes (tests/common/echo.rs) on loopback
//! sockets that record what reaches them and answer with it.
//!
//! - `every_registry_row_reaches_a_node_rewritten` sends one raw request for every row of the
//!   RPC registry and checks what the node received (storage and replica path rewritten, the
//!   additional repository too, `virtual_storage` set, the client's token replaced by the
//!   node's) or, for the calls the router answers or refuses, the documented status; then it
//!   counts the rows per outcome, so a row that silently stops reaching a node fails the test.
//! - `bad_input_keeps_the_router_serving` sends malformed frames, malformed messages, missing
//!   and foreign repositories, paths escaping the storage, unknown methods and bad tokens, and
//!   checks the code and message of each, that none reached a node, and that the router still
//!   serves afterwards.
//! - `unreadable_additional_repository_is_refused`: an additional repository the router
//!   cannot read is refused and reaches no node.
//!
//! `ROUTER_LOG=1` shows the router's log lines.
// Tests read and write the database directly (not through PgBouncer), so the
// datastore's rule about unnamed statements (clippy.toml) does not apply here.
#![allow(clippy::disallowed_methods)]

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::echo::{self, EchoLog, EchoNode, Received};
use common::pg::TestDb;
use common::router::{write_config_with, NodeEntry, Router, ROUTER_TOKEN};
use http_body_util::BodyExt;
use praefect::proxy::rewrite;
use praefect::routing::methods;
use praefect::routing::registry::{MethodInfo, OpType, Registry, Scope};
use praefect::routing::{pool_replica_path, replica_path};
use praefect::wire::auth;
use praefect::wire::proto::{
    RemoveRepositoryRequest, Repository, RepositoryExistsResponse, WalkReposResponse,
};
use praefect::wire::transaction::{TransactionMetadata, METADATA_KEY as TRANSACTION_KEY};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;
use tonic::Code;
use tower::ServiceExt;

const NODE_TOKEN: &str = common::gitnode::TOKEN;
const VIRTUAL: &str = "default";
const STORAGES: [&str; 2] = ["gitaly-1", "gitaly-2"];
/// The primary recorded for the seeded repositories.
const PRIMARY: &str = "gitaly-1";
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The repository every row targets, the one rows name as their additional repository, and
/// the one RemoveRepository removes.
const TARGET: &str = "group/target.git";
const OTHER: &str = "group/other.git";
const REMOVED: &str = "group/removed.git";

/// A field the router knows nothing about, added to every request: it must reach the node.
const MARKER_FIELD: u32 = 1000;
const MARKER: &[u8] = b"passed through untouched";
/// Client metadata that must reach the node as it is.
const CLIENT_HEADER: &str = "x-walk-client";
const GL_REPOSITORY: &str = "project-walk";

const CREATE_METHODS: [&str; 8] = [
    "/gitaly.RepositoryService/CreateRepository",
    "/gitaly.RepositoryService/CreateRepositoryFromURL",
    "/gitaly.RepositoryService/CreateRepositoryFromBundle",
    "/gitaly.RepositoryService/CreateRepositoryFromSnapshot",
    "/gitaly.RepositoryService/CreateFork",
    "/gitaly.RepositoryService/ReplicateRepository",
    "/gitaly.RepositoryService/RestoreRepository",
    "/gitaly.ObjectPoolService/CreateObjectPool",
];
/// Creations that update an existing repository instead of failing.
const UPSERT_METHODS: [&str; 2] = [
    "/gitaly.RepositoryService/ReplicateRepository",
    "/gitaly.RepositoryService/RestoreRepository",
];
const REPOSITORY_EXISTS: &str = "/gitaly.RepositoryService/RepositoryExists";
const REMOVE_REPOSITORY: &str = "/gitaly.RepositoryService/RemoveRepository";
const FIND_DEFAULT_BRANCH: &str = "/gitaly.RefService/FindDefaultBranchName";
const WRITE_REF: &str = "/gitaly.RepositoryService/WriteRef";
const WALK_REPOS: &str = "/gitaly.InternalGitaly/WalkRepos";
const DELETE_OBJECT_POOL: &str = "/gitaly.ObjectPoolService/DeleteObjectPool";
const LINK_TO_POOL: &str = "/gitaly.ObjectPoolService/LinkRepositoryToObjectPool";
const CREATE_POOL: &str = "/gitaly.ObjectPoolService/CreateObjectPool";

// ---------------------------------------------------------------------------------------
// The router process

fn write_config(dir: &Path, db: &TestDb, nodes: &[EchoNode]) -> PathBuf {
    let entries: Vec<NodeEntry> = nodes
        .iter()
        .map(|node| NodeEntry::new(&node.storage, &node.address))
        .collect();
    // The echo nodes never finish a replication: do not let a stop wait for one.
    write_config_with(
        dir,
        &db.connection(),
        &entries,
        "graceful_stop_timeout = \"2s\"",
    )
}

// ---------------------------------------------------------------------------------------
// Raw calls

/// What the router answered.
#[derive(Debug)]
struct Reply {
    code: Code,
    message: String,
    /// The response messages, as raw bytes.
    messages: Vec<Bytes>,
}

impl Reply {
    fn assert_status(&self, code: Code, message: &str, what: &str) {
        assert_eq!(
            (self.code, self.message.as_str()),
            (code, message),
            "{what}: {self:?}"
        );
    }
}

/// Sends `body` (the raw request body: gRPC frames, or anything) to `path` and reads the
/// whole answer.
async fn raw_call(channel: &Channel, path: &str, body: Bytes, headers: &[(&str, String)]) -> Reply {
    let mut request = http::Request::builder()
        .method(http::Method::POST)
        .uri(path)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header("te", "trailers");
    for (name, value) in headers {
        request = request.header(*name, value.as_str());
    }
    let request = request
        .body(tonic::body::Body::new(http_body_util::Full::new(body)))
        .unwrap();
    let response = tokio::time::timeout(CALL_TIMEOUT, channel.clone().oneshot(request))
        .await
        .unwrap_or_else(|_| panic!("{path}: no answer within {CALL_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("{path}: transport error: {e:?}"));
    let (parts, body) = response.into_parts();
    if let Some(status) = tonic::Status::from_header_map(&parts.headers) {
        return Reply {
            code: status.code(),
            message: status.message().to_string(),
            messages: Vec::new(),
        };
    }
    let collected = tokio::time::timeout(CALL_TIMEOUT, body.collect())
        .await
        .unwrap_or_else(|_| panic!("{path}: answer not complete within {CALL_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("{path}: reading the answer: {e:?}"));
    let status = collected
        .trailers()
        .and_then(tonic::Status::from_header_map)
        .unwrap_or_else(|| tonic::Status::unknown("no grpc-status in the answer"));
    Reply {
        code: status.code(),
        message: status.message().to_string(),
        messages: echo::messages(&collected.to_bytes()),
    }
}

fn router_auth() -> (&'static str, String) {
    ("authorization", auth::bearer(ROUTER_TOKEN.as_bytes()))
}

// ---------------------------------------------------------------------------------------
// Building request messages along field-number paths

/// A message as a tree of length-delimited fields, so paths with a common prefix share their
/// parent message.
#[derive(Default)]
struct Msg(BTreeMap<u32, Part>);

enum Part {
    Bytes(Vec<u8>),
    Msg(Msg),
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// `payload` as the length-delimited field `number`.
fn field(number: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    put_varint(&mut out, (u64::from(number) << 3) | 2);
    put_varint(&mut out, payload.len() as u64);
    out.extend_from_slice(payload);
    out
}

impl Msg {
    fn set(&mut self, path: &[u32], value: Vec<u8>) -> &mut Self {
        let (first, rest) = path.split_first().expect("a field path is not empty");
        if rest.is_empty() {
            self.0.insert(*first, Part::Bytes(value));
        } else {
            match self
                .0
                .entry(*first)
                .or_insert_with(|| Part::Msg(Msg::default()))
            {
                Part::Msg(inner) => {
                    inner.set(rest, value);
                }
                Part::Bytes(_) => panic!("field paths overlap at {first}"),
            }
        }
        self
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (number, part) in &self.0 {
            let payload = match part {
                Part::Bytes(bytes) => bytes.clone(),
                Part::Msg(inner) => inner.encode(),
            };
            out.extend(field(*number, &payload));
        }
        out
    }
}

fn repository(storage: &str, relative_path: &str) -> Vec<u8> {
    Repository {
        storage_name: storage.into(),
        relative_path: relative_path.into(),
        gl_repository: GL_REPOSITORY.into(),
        gl_project_path: "group/walk".into(),
        ..Default::default()
    }
    .encode_to_vec()
}

/// A request with `repo` at `path` (and nothing else), framed.
fn framed_repo_request(path: &[u32], storage: &str, relative_path: &str) -> Bytes {
    echo::frame(
        &Msg::default()
            .set(path, repository(storage, relative_path))
            .encode(),
    )
}

/// The repository at `path` of a message a node received.
fn repository_at(message: &[u8], path: &[u32], what: &str) -> Repository {
    let bytes = rewrite::read_at(message, path)
        .unwrap_or_else(|e| panic!("{what}: no repository at {path:?}: {e}"));
    Repository::decode(bytes).unwrap_or_else(|e| panic!("{what}: repository at {path:?}: {e}"))
}

// ---------------------------------------------------------------------------------------
// The cluster

struct Cluster {
    log: EchoLog,
    _nodes: Vec<EchoNode>,
    router: Router,
    channel: Channel,
    db: TestDb,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Two echo nodes, the repositories `tracked` recorded on both of them (primary
    /// gitaly-1, both at generation 0), and a router in front.
    async fn start(tracked: &[&str]) -> (Cluster, Vec<i64>) {
        let db = TestDb::new().await;
        let store = db.datastore().await;
        let mut ids = Vec::new();
        for path in tracked {
            ids.push(track(&store, path).await);
        }
        let log = EchoLog::default();
        let mut nodes = Vec::new();
        for storage in STORAGES {
            nodes.push(EchoNode::start(storage, log.clone()).await);
        }
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(dir.path(), &db, &nodes);
        let router = tokio::task::spawn_blocking(move || Router::start(&config))
            .await
            .unwrap();
        let channel = praefect::wire::backchannel::dial_lazy(
            &router.address,
            praefect::wire::backchannel::yamux_config(0, 256),
            praefect::wire::backchannel::ClientHandler::default(),
        )
        .unwrap();
        let cluster = Cluster {
            log,
            _nodes: nodes,
            router,
            channel,
            db,
            _dir: dir,
        };
        (cluster, ids)
    }

    /// A call with the router's token.
    async fn call(&self, path: &str, body: Bytes) -> Reply {
        raw_call(&self.channel, path, body, &[router_auth()]).await
    }

    /// A call with the router's token and the calls that reached a node meanwhile.
    async fn call_logged(
        &self,
        path: &str,
        body: Bytes,
        headers: &[(&str, String)],
    ) -> (Reply, Vec<Received>) {
        let before = self.log.len();
        let mut all = vec![router_auth()];
        all.extend(headers.iter().cloned());
        let reply = raw_call(&self.channel, path, body, &all).await;
        (reply, self.log.since(before))
    }

    /// The id, replica path, primary and generation the database records for `relative_path`.
    async fn record(&self, relative_path: &str) -> Option<(i64, String, String, i64)> {
        let mut conn = self.db.raw().await;
        sqlx::query_as(
            "SELECT repository_id, replica_path, \"primary\", generation FROM repositories
             WHERE virtual_storage = $1 AND relative_path = $2",
        )
        .bind(VIRTUAL)
        .bind(relative_path)
        .fetch_optional(&mut conn)
        .await
        .unwrap()
    }

    /// Every replica's generation of a repository, by storage.
    async fn replica_generations(&self, id: i64) -> Vec<(String, i64)> {
        let mut conn = self.db.raw().await;
        sqlx::query_as(
            "SELECT storage, generation FROM storage_repositories
             WHERE repository_id = $1 ORDER BY storage",
        )
        .bind(id)
        .fetch_all(&mut conn)
        .await
        .unwrap()
    }

    /// The targets of the queued (ready, or taken by a replicator: the echo nodes never
    /// finish a replication) `update` jobs of a repository.
    async fn ready_update_targets(&self, id: i64) -> Vec<String> {
        let mut conn = self.db.raw().await;
        sqlx::query_scalar(
            "SELECT DISTINCT job->>'target_node_storage' FROM replication_queue
             WHERE state IN ('ready', 'in_progress') AND job->>'change' = 'update'
               AND (job->>'repository_id')::bigint = $1
             ORDER BY 1",
        )
        .bind(id)
        .fetch_all(&mut conn)
        .await
        .unwrap()
    }
}

/// Records a repository on both storages at generation 0, primary gitaly-1, as if it had been
/// created on both (the echo nodes hold nothing: only the records matter to routing).
async fn track(store: &praefect::datastore::Datastore, relative_path: &str) -> i64 {
    let id = store
        .reserve_repository_id(VIRTUAL, relative_path)
        .await
        .unwrap();
    store
        .create_repository(
            &praefect::datastore::NewRepository {
                repository_id: id,
                virtual_storage: VIRTUAL.into(),
                relative_path: relative_path.into(),
                replica_path: replica_path(id),
                primary: PRIMARY.into(),
                updated_secondaries: vec![STORAGES[1].into()],
                outdated_secondaries: vec![],
                store_assignments: false,
            },
            &[],
        )
        .await
        .unwrap();
    id
}

/// What every forwarded call must carry: the node's token instead of the client's (exactly one
/// `authorization`), the client's own metadata, and `virtual_storage` on repository calls.
fn check_forwarded_headers(r: &Received, repository_scoped: bool, correlation_id: &str) {
    let what = format!("{} on {}", r.path, r.node);
    let token = r.header("authorization");
    let now = SystemTime::now();
    if let Err(e) = auth::check_v2(NODE_TOKEN.as_bytes(), Some(token), now) {
        panic!("{what}: the node's token is not valid: {e} ({token})");
    }
    assert!(
        auth::check_v2(ROUTER_TOKEN.as_bytes(), Some(token), now).is_err(),
        "{what}: the client's token reached the node"
    );
    if repository_scoped {
        assert_eq!(r.header("virtual_storage"), VIRTUAL, "{what}");
    } else {
        assert!(
            r.headers.get("virtual_storage").is_none(),
            "{what}: virtual_storage on a storage-scoped call"
        );
    }
    assert_eq!(
        r.header("x-gitlab-correlation-id"),
        correlation_id,
        "{what}"
    );
    assert_eq!(r.header(CLIENT_HEADER), "kept", "{what}");
}

// ---------------------------------------------------------------------------------------
// A. Every registry row

/// What became of one registry row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    /// Reached one up-to-date healthy replica, rewritten.
    Accessor,
    /// Reached the primary, rewritten; the generation moved on.
    Mutator,
    /// Reached a healthy node, storage field rewritten.
    StorageAccessor,
    /// Reached every healthy assigned replica, each rewritten for itself.
    Maintenance,
    /// Answered by the router (from the database, or by asking the nodes itself).
    Answered,
    /// AlreadyExists: a creation naming an existing repository.
    AlreadyExists,
    /// Internal: refused by design (storage-scoped mutators, partition scope).
    NotRoutable,
    /// InvalidArgument "storage name not set": a storage-scoped RPC without a storage field.
    NoStorageField,
    /// Unimplemented: an intercepted RPC praefect-rs does not answer yet.
    NotYet,
}

impl Outcome {
    fn describe(self) -> &'static str {
        match self {
            Outcome::Accessor => "accessor -> an up-to-date replica, rewritten",
            Outcome::Mutator => "mutator -> the primary, rewritten, generation bumped",
            Outcome::StorageAccessor => "storage accessor -> a healthy node, storage rewritten",
            Outcome::Maintenance => "maintenance -> every replica, rewritten",
            Outcome::Answered => "answered by the router itself",
            Outcome::AlreadyExists => "AlreadyExists: creation of an existing repository",
            Outcome::NotRoutable => "Internal: not routable by design",
            Outcome::NoStorageField => "InvalidArgument: storage scope without storage field",
            Outcome::NotYet => "Unimplemented: intercepted, not implemented yet",
        }
    }
}

fn is_routed_write(m: &MethodInfo) -> bool {
    m.scope == Scope::Repository && m.op_type == OpType::Mutator && !m.intercepted
}

/// Checks one row's answer and what reached the nodes; returns its outcome.
fn check_row(
    m: &MethodInfo,
    reply: &Reply,
    received: &[Received],
    ids: &Ids,
    correlation_id: &str,
) -> Outcome {
    let name = m.full_name.as_str();
    let refused = |code: Code, message: &str, outcome: Outcome| {
        reply.assert_status(code, message, name);
        assert!(received.is_empty(), "{name} reached a node: {received:?}");
        outcome
    };
    if m.intercepted {
        if reply.code == Code::Unimplemented {
            let message = format!("{name} is answered by praefect itself and not implemented yet");
            return refused(Code::Unimplemented, &message, Outcome::NotYet);
        }
        if reply.code == Code::InvalidArgument {
            // Answered by the router, which refuses the empty request of an administrative
            // RPC (MarkUnverified without a selector, SetReplicationFactor without a
            // repository) without asking any node.
            assert!(!reply.message.is_empty(), "{name}: {reply:?}");
            assert!(received.is_empty(), "{name} reached a node: {received:?}");
            return Outcome::Answered;
        }
        // Implemented since: the router answers; what it asks nodes is its own business, but
        // it asks with the node's token.
        reply.assert_status(Code::Ok, "", name);
        for r in received {
            auth::check_v2(
                NODE_TOKEN.as_bytes(),
                Some(r.header("authorization")),
                SystemTime::now(),
            )
            .unwrap_or_else(|e| panic!("{name}: {}: {e}", r.path));
        }
        return Outcome::Answered;
    }
    if name == WALK_REPOS {
        // Answered from the database, with virtual relative paths.
        reply.assert_status(Code::Ok, "", name);
        assert!(received.is_empty(), "{name} reached a node: {received:?}");
        let paths: BTreeSet<String> = reply
            .messages
            .iter()
            .map(|m| WalkReposResponse::decode(&m[..]).unwrap().relative_path)
            .collect();
        assert!(
            paths.contains(TARGET) && paths.contains(OTHER),
            "{name}: {paths:?}"
        );
        return Outcome::Answered;
    }
    if name == DELETE_OBJECT_POOL {
        // Answered by the router, which only deletes Rails pool paths (TARGET is not one).
        return refused(
            Code::InvalidArgument,
            "delete object pool: invalid object pool path",
            Outcome::Answered,
        );
    }
    match m.scope {
        Scope::Partition => {
            return refused(
                Code::Internal,
                "rpc with undefined scope \"partition\"",
                Outcome::NotRoutable,
            )
        }
        Scope::Storage if m.op_type != OpType::Accessor => {
            return refused(
                Code::Internal,
                "storage-scoped mutators are not supported",
                Outcome::NotRoutable,
            )
        }
        Scope::Storage if m.storage.is_none() => {
            return refused(
                Code::InvalidArgument,
                "storage name not set",
                Outcome::NoStorageField,
            )
        }
        Scope::Storage => {
            reply.assert_status(Code::Ok, "", name);
            assert_eq!(received.len(), 1, "{name}: {received:?}");
            let r = &received[0];
            assert_eq!(r.path, name);
            let message = r.message();
            assert_eq!(
                reply.messages,
                vec![Bytes::copy_from_slice(message)],
                "{name}"
            );
            let storage_path = m.storage.as_deref().unwrap();
            assert_eq!(
                rewrite::read_string(message, storage_path).unwrap(),
                r.node,
                "{name}: storage field"
            );
            assert_eq!(rewrite::read_at(message, &[MARKER_FIELD]).unwrap(), MARKER);
            check_forwarded_headers(r, false, correlation_id);
            return Outcome::StorageAccessor;
        }
        Scope::None => panic!("{name}: a row without scope that is not intercepted"),
        Scope::Repository => {}
    }
    if name == REPOSITORY_EXISTS {
        reply.assert_status(Code::Ok, "", name);
        assert!(received.is_empty(), "{name} reached a node: {received:?}");
        assert_eq!(reply.messages.len(), 1, "{name}");
        let answer = RepositoryExistsResponse::decode(&reply.messages[0][..]).unwrap();
        assert!(answer.exists, "{name}: {TARGET} exists");
        return Outcome::Answered;
    }
    if name == REMOVE_REPOSITORY {
        // The records first, then the replica on every storage that had one.
        reply.assert_status(Code::Ok, "", name);
        assert_eq!(reply.messages, vec![Bytes::new()], "{name}");
        let nodes: BTreeSet<&str> = received.iter().map(|r| r.node.as_str()).collect();
        assert_eq!(nodes, BTreeSet::from(STORAGES), "{name}: {received:?}");
        for r in received {
            assert_eq!(r.path, name);
            let request = RemoveRepositoryRequest::decode(r.message()).unwrap();
            let repo = request.repository.unwrap();
            assert_eq!(
                (repo.storage_name.as_str(), repo.relative_path.as_str()),
                (r.node.as_str(), replica_path(ids.removed).as_str()),
                "{name}"
            );
            auth::check_v2(
                NODE_TOKEN.as_bytes(),
                Some(r.header("authorization")),
                SystemTime::now(),
            )
            .unwrap();
        }
        return Outcome::Answered;
    }
    match m.op_type {
        OpType::Maintenance => {
            reply.assert_status(Code::Ok, "", name);
            let nodes: BTreeSet<&str> = received.iter().map(|r| r.node.as_str()).collect();
            assert_eq!(received.len(), 2, "{name}: {received:?}");
            assert_eq!(nodes, BTreeSet::from(STORAGES), "{name}");
            for r in received {
                check_repository_call(m, r, ids, correlation_id);
            }
            assert_eq!(reply.messages.len(), 1, "{name}");
            assert!(received
                .iter()
                .any(|r| r.message.as_ref() == Some(&reply.messages[0])));
            Outcome::Maintenance
        }
        OpType::Mutator if CREATE_METHODS.contains(&name) && !UPSERT_METHODS.contains(&name) => {
            refused(
                Code::AlreadyExists,
                "repository already exists",
                Outcome::AlreadyExists,
            )
        }
        OpType::Mutator if methods::is_transactional(m) => {
            // A reference transaction: the primary and the up-to-date secondary both get the
            // call, each told its own name and role; the client gets the primary's answer.
            reply.assert_status(Code::Ok, "", name);
            let nodes: BTreeSet<&str> = received.iter().map(|r| r.node.as_str()).collect();
            assert_eq!(received.len(), 2, "{name}: {received:?}");
            assert_eq!(nodes, BTreeSet::from(STORAGES), "{name}");
            let mut transactions = BTreeSet::new();
            for r in received {
                check_repository_call(m, r, ids, correlation_id);
                let tx = TransactionMetadata::decode(r.header(TRANSACTION_KEY).as_bytes())
                    .unwrap_or_else(|e| panic!("{name} on {}: {e}", r.node));
                assert_eq!(tx.node, r.node, "{name}");
                assert_eq!(tx.primary, r.node == PRIMARY, "{name} on {}", r.node);
                transactions.insert(tx.id);
                if r.node == PRIMARY {
                    assert_eq!(
                        reply.messages,
                        vec![Bytes::copy_from_slice(r.message())],
                        "{name}: the primary's answer comes back as it is"
                    );
                }
            }
            assert_eq!(
                transactions.len(),
                1,
                "{name}: one transaction for all nodes"
            );
            Outcome::Mutator
        }
        OpType::Mutator | OpType::Accessor => {
            reply.assert_status(Code::Ok, "", name);
            assert_eq!(received.len(), 1, "{name}: {received:?}");
            let r = &received[0];
            assert_eq!(
                reply.messages,
                vec![Bytes::copy_from_slice(r.message())],
                "{name}: the node's answer comes back as it is"
            );
            check_repository_call(m, r, ids, correlation_id);
            if m.op_type == OpType::Mutator {
                assert_eq!(r.node, PRIMARY, "{name}: writes go to the primary");
                Outcome::Mutator
            } else {
                Outcome::Accessor
            }
        }
        OpType::Unknown => panic!("{name}: a repository-scoped row without operation type"),
    }
}

/// A repository call that reached node `r.node`: the target (and additional) repository name
/// that node and the replica paths, everything else of the message is as the client sent it.
fn check_repository_call(m: &MethodInfo, r: &Received, ids: &Ids, correlation_id: &str) {
    let what = format!("{} on {}", m.full_name, r.node);
    assert_eq!(r.path, m.full_name, "{what}");
    let message = r.message();
    let target = repository_at(message, m.target_repository.as_deref().unwrap(), &what);
    assert_eq!(
        (target.storage_name.as_str(), target.relative_path.as_str()),
        (r.node.as_str(), replica_path(ids.target).as_str()),
        "{what}: target repository"
    );
    assert_eq!(target.gl_repository, GL_REPOSITORY, "{what}");
    assert_eq!(target.gl_project_path, "group/walk", "{what}");
    if let Some(path) = m.additional_repository.as_deref() {
        let other = repository_at(message, path, &what);
        assert_eq!(
            (other.storage_name.as_str(), other.relative_path.as_str()),
            (r.node.as_str(), replica_path(ids.other).as_str()),
            "{what}: additional repository"
        );
        assert_eq!(other.gl_repository, GL_REPOSITORY, "{what}");
    }
    assert_eq!(
        rewrite::read_at(message, &[MARKER_FIELD]).unwrap(),
        MARKER,
        "{what}"
    );
    check_forwarded_headers(r, true, correlation_id);
}

struct Ids {
    target: i64,
    other: i64,
    removed: i64,
}

#[tokio::test(flavor = "multi_thread")]
async fn every_registry_row_reaches_a_node_rewritten() {
    let (cluster, seeded) = Cluster::start(&[TARGET, OTHER, REMOVED]).await;
    let ids = Ids {
        target: seeded[0],
        other: seeded[1],
        removed: seeded[2],
    };
    // Reads go to either up-to-date replica, except the forced-primary ones (spec §4):
    // RepositorySize, GetObjectDirectorySize, and any read asking for `primary-only`.
    let mut spread = BTreeSet::new();
    for _ in 0..40 {
        let (reply, received) = cluster
            .call_logged(
                FIND_DEFAULT_BRANCH,
                framed_repo_request(&[1], VIRTUAL, TARGET),
                &[],
            )
            .await;
        reply.assert_status(Code::Ok, "", FIND_DEFAULT_BRANCH);
        spread.insert(received[0].node.clone());
    }
    assert_eq!(spread.len(), 2, "reads are spread over the replicas");
    let primary_only = [(
        "gitaly-route-repository-accessor-policy",
        "primary-only".to_string(),
    )];
    for (path, headers) in [
        ("/gitaly.RepositoryService/RepositorySize", &[][..]),
        ("/gitaly.RepositoryService/GetObjectDirectorySize", &[][..]),
        (FIND_DEFAULT_BRANCH, &primary_only[..]),
    ] {
        for _ in 0..8 {
            let (reply, received) = cluster
                .call_logged(path, framed_repo_request(&[1], VIRTUAL, TARGET), headers)
                .await;
            reply.assert_status(Code::Ok, "", path);
            assert_eq!(received.len(), 1, "{path}");
            assert_eq!(received[0].node, PRIMARY, "{path} {headers:?}");
        }
    }

    let registry = Registry::global();
    // Reads first, while both replicas are up to date; then the writes, which leave gitaly-2
    // behind (each write bumps only the primary and queues an update job).
    let mut rows: Vec<&MethodInfo> = registry.iter().collect();
    rows.sort_by_key(|m| (is_routed_write(m), m.full_name.clone()));

    let mut outcomes: BTreeMap<Outcome, Vec<&str>> = BTreeMap::new();
    let mut read_nodes: BTreeMap<String, usize> = BTreeMap::new();
    for (i, m) in rows.iter().enumerate() {
        let mut msg = Msg::default();
        if let Some(path) = &m.target_repository {
            let relative = if m.full_name == REMOVE_REPOSITORY {
                REMOVED
            } else {
                TARGET
            };
            msg.set(path, repository(VIRTUAL, relative));
        }
        if let Some(path) = &m.additional_repository {
            msg.set(path, repository(VIRTUAL, OTHER));
        }
        if let Some(path) = &m.storage {
            msg.set(path, VIRTUAL.as_bytes().to_vec());
        }
        msg.set(&[MARKER_FIELD], MARKER.to_vec());
        let correlation_id = format!("walk-{i}");
        let (reply, received) = cluster
            .call_logged(
                &m.full_name,
                echo::frame(&msg.encode()),
                &[
                    ("x-gitlab-correlation-id", correlation_id.clone()),
                    (CLIENT_HEADER, "kept".into()),
                ],
            )
            .await;
        let outcome = check_row(m, &reply, &received, &ids, &correlation_id);
        if outcome == Outcome::Accessor {
            *read_nodes.entry(received[0].node.clone()).or_default() += 1;
        }
        outcomes.entry(outcome).or_default().push(&m.full_name);
    }

    println!("\n{:<55} | rows | methods", "outcome");
    println!("{}", "-".repeat(100));
    for (outcome, methods) in &outcomes {
        let listed = if methods.len() <= 15 {
            methods.join(" ")
        } else {
            format!(
                "{} ... ({} more)",
                methods[..3].join(" "),
                methods.len() - 3
            )
        };
        println!(
            "{:<55} | {:>4} | {listed}",
            outcome.describe(),
            methods.len()
        );
    }
    println!("accessors served by: {read_nodes:?}\n");

    let count = |o: Outcome| outcomes.get(&o).map_or(0, Vec::len);
    assert_eq!(
        outcomes.values().map(Vec::len).sum::<usize>(),
        registry.len()
    );
    assert_eq!(registry.len(), 168);
    // 94 repository-scoped accessors, less RepositoryExists (answered from the database).
    assert_eq!(count(Outcome::Accessor), 93);
    // 45 repository-scoped mutators, less RemoveRepository and DeleteObjectPool (answered)
    // and the 6 creations that fail on an existing repository (CreateObjectPool too: its
    // origin only places the new pool). ReplicateRepository and RestoreRepository are upserts: they reach the primary.
    assert_eq!(count(Outcome::Mutator), 37);
    assert_eq!(count(Outcome::AlreadyExists), 6);
    // OptimizeRepository and PruneUnreachableObjects reach both replicas.
    assert_eq!(count(Outcome::Maintenance), 2);
    // 14 storage-scoped RPCs: 7 accessors with a storage field (WalkRepos, the 8th, is
    // answered from the database)...
    assert_eq!(count(Outcome::StorageAccessor), 7);
    // ...4 mutators refused by design (with the one partition-scoped RPC)...
    assert_eq!(count(Outcome::NotRoutable), 4 + 1);
    // ...and the 2 Raft accessors without a storage field (GetPartitions, GetClusterInfo).
    assert_eq!(count(Outcome::NoStorageField), 2);
    // RepositoryExists, RemoveRepository, WalkRepos, DeleteObjectPool, ServerInfo and
    // DiskStatistics are answered by the router; the other 10 intercepted RPCs
    // (PraefectInfoService, ReadinessCheck, ServerSignature, RefTransaction) are not
    // implemented yet, or answered once they are.
    assert!(count(Outcome::Answered) >= 6, "{outcomes:?}");
    assert_eq!(count(Outcome::Answered) + count(Outcome::NotYet), 4 + 12);
    // Reads are spread over both up-to-date replicas.
    assert_eq!(read_nodes.len(), 2, "{read_nodes:?}");

    // Every write was a reference transaction both nodes voted in: the target's generation
    // moved on both replicas, and no replication job was needed; the other repositories did
    // not change.
    let writes = count(Outcome::Mutator) as i64;
    let (_, _, primary, generation) = cluster.record(TARGET).await.unwrap();
    assert_eq!((primary.as_str(), generation), (PRIMARY, writes));
    assert_eq!(
        cluster.replica_generations(ids.target).await,
        vec![
            (STORAGES[0].to_string(), writes),
            (STORAGES[1].to_string(), writes)
        ]
    );
    assert!(cluster.ready_update_targets(ids.target).await.is_empty());
    assert_eq!(cluster.record(OTHER).await.unwrap().3, 0);
    assert!(cluster.ready_update_targets(ids.other).await.is_empty());
    assert!(cluster.record(REMOVED).await.is_none());

    // Reads still spread over both up-to-date replicas.
    let mut after_writes = BTreeSet::new();
    for _ in 0..40 {
        let (reply, received) = cluster
            .call_logged(
                FIND_DEFAULT_BRANCH,
                framed_repo_request(&[1], VIRTUAL, TARGET),
                &[],
            )
            .await;
        reply.assert_status(Code::Ok, "", "read after the writes");
        assert_eq!(received.len(), 1);
        after_writes.insert(received[0].node.clone());
    }
    assert_eq!(after_writes.len(), 2, "{after_writes:?}");

    // The creations, with new paths: each reaches both healthy nodes (CreateObjectPool, not
    // transactional, only one) with a new replica path (a pool path for a Rails pool), is
    // recorded with the primary, both replicas at generation 0 (CreateObjectPool leaves an
    // update job for the other node). A second creation fails, or updates for the upserts.
    let pool_path = format!("@pools/ab/cd/abcd{}.git", "0".repeat(60));
    for (i, name) in CREATE_METHODS.iter().enumerate() {
        let m = registry.lookup(name).unwrap();
        let relative = if *name == CREATE_POOL {
            pool_path.clone()
        } else {
            format!("created/{i}.git")
        };
        let mut msg = Msg::default();
        msg.set(
            m.target_repository.as_deref().unwrap(),
            repository(VIRTUAL, &relative),
        );
        msg.set(&[MARKER_FIELD], MARKER.to_vec());
        let body = echo::frame(&msg.encode());
        let (reply, received) = cluster.call_logged(name, body.clone(), &[]).await;
        reply.assert_status(Code::Ok, "", name);
        let transactional = methods::is_transactional(m);
        // A transactional creation reaches both nodes at once; CreateObjectPool one.
        let reached = if transactional { STORAGES.len() } else { 1 };
        assert_eq!(received.len(), reached, "{name}: {received:?}");
        let r = received
            .iter()
            .find(|r| {
                !transactional
                    || TransactionMetadata::decode(r.header(TRANSACTION_KEY).as_bytes())
                        .unwrap()
                        .primary
            })
            .unwrap();
        let (id, recorded_replica_path, primary, generation) = cluster
            .record(&relative)
            .await
            .unwrap_or_else(|| panic!("{name}: {relative} is not recorded"));
        let expected_replica_path = if relative.starts_with("@pools/") {
            pool_replica_path(id)
        } else {
            replica_path(id)
        };
        assert_eq!(recorded_replica_path, expected_replica_path, "{name}");
        assert_eq!(
            (primary.as_str(), generation),
            (r.node.as_str(), 0),
            "{name}"
        );
        for r in &received {
            let target = repository_at(r.message(), m.target_repository.as_deref().unwrap(), name);
            assert_eq!(
                (target.storage_name.as_str(), target.relative_path.as_str()),
                (r.node.as_str(), expected_replica_path.as_str()),
                "{name}"
            );
        }
        if transactional {
            assert!(cluster.ready_update_targets(id).await.is_empty(), "{name}");
            assert_eq!(
                cluster.replica_generations(id).await,
                STORAGES
                    .iter()
                    .map(|s| (s.to_string(), 0))
                    .collect::<Vec<_>>(),
                "{name}: created on both together"
            );
        } else {
            let other = STORAGES.iter().find(|s| **s != r.node).unwrap();
            assert_eq!(
                cluster.ready_update_targets(id).await,
                vec![other.to_string()],
                "{name}"
            );
        }
        let primary = r.node.clone();

        let (again, received) = cluster.call_logged(name, body, &[]).await;
        if UPSERT_METHODS.contains(name) {
            again.assert_status(Code::Ok, "", name);
            assert_eq!(received.len(), STORAGES.len(), "{name}: {received:?}");
            assert!(
                received.iter().any(|r| r.node == primary),
                "{name}: the upsert goes to the primary (and the up-to-date secondary)"
            );
            for r in &received {
                let target =
                    repository_at(r.message(), m.target_repository.as_deref().unwrap(), name);
                assert_eq!(target.relative_path, expected_replica_path, "{name}");
            }
            assert_eq!(cluster.record(&relative).await.unwrap().3, 1, "{name}");
        } else {
            again.assert_status(Code::AlreadyExists, "repository already exists", name);
            assert!(received.is_empty(), "{name}: {received:?}");
        }
    }
    println!(
        "creations with a new path: {} reached a node and were recorded",
        CREATE_METHODS.len()
    );
}

// ---------------------------------------------------------------------------------------
// B. Bad input

/// How a refusal's message must look.
enum Says {
    Exactly(&'static str),
    StartsWith(&'static str),
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_keeps_the_router_serving() {
    let (mut cluster, seeded) = Cluster::start(&[TARGET, OTHER]).await;
    let target_id = seeded[0];

    // A normal read works.
    let normal_read = || framed_repo_request(&[1], VIRTUAL, TARGET);
    let (reply, received) = cluster
        .call_logged(FIND_DEFAULT_BRANCH, normal_read(), &[])
        .await;
    reply.assert_status(Code::Ok, "", "a normal read");
    assert_eq!(received.len(), 1);

    let frame = |bytes: &[u8]| echo::frame(bytes);
    let raw = |bytes: &[u8]| Bytes::copy_from_slice(bytes);
    let repo_frame =
        |path: &[u32], storage: &str, relative: &str| framed_repo_request(path, storage, relative);
    let valid = Msg::default()
        .set(&[1], repository(VIRTUAL, TARGET))
        .encode();
    let mut compressed = echo::frame(&valid).to_vec();
    compressed[0] = 1;
    let twice = [
        field(1, &repository(VIRTUAL, TARGET)),
        field(1, &repository(VIRTUAL, TARGET)),
    ]
    .concat();
    let link_on = |storage: &str, pool_path: &str| {
        echo::frame(
            &Msg::default()
                .set(&[2], repository(VIRTUAL, TARGET))
                .set(&[1, 1], repository(storage, pool_path))
                .encode(),
        )
    };
    let link = |pool_path: &str| link_on(VIRTUAL, pool_path);
    let new_pool = format!("@pools/12/34/1234{}.git", "0".repeat(60));
    let create_pool = |storage: &str, origin: &str| {
        echo::frame(
            &Msg::default()
                .set(&[1, 1], repository(VIRTUAL, &new_pool))
                .set(&[2], repository(storage, origin))
                .encode(),
        )
    };
    let foreign = "resolve additional replica path: repository and additional repository are on different virtual storages";
    // A repository whose relative path is not UTF-8 (storage_name is field 2, relative_path 3).
    let not_utf8 = [
        field(2, VIRTUAL.as_bytes()),
        field(3, b"group/\xff\xfe.git"),
    ]
    .concat();
    let long_path = format!("group/{}.git", "a".repeat(100_000));

    use Says::{Exactly, StartsWith};
    let malformed = "first request message: malformed protobuf message";
    let ended = "first request message: the request ended before its first message";
    let mut cases: Vec<(String, &str, Bytes, Code, Says)> = vec![
        // Not protobuf at all, for a read, a write, a storage-scoped read and an
        // intercepted call (which decodes the whole message).
        (
            "garbage message, accessor".into(),
            FIND_DEFAULT_BRANCH,
            frame(&[0xff; 6]),
            Code::InvalidArgument,
            Exactly(malformed),
        ),
        (
            "garbage message, mutator".into(),
            WRITE_REF,
            frame(&[0xff; 6]),
            Code::InvalidArgument,
            Exactly(malformed),
        ),
        (
            "garbage message, storage accessor".into(),
            WALK_REPOS,
            frame(&[0xff; 6]),
            Code::InvalidArgument,
            Exactly(malformed),
        ),
        (
            "garbage message, RepositoryExists".into(),
            REPOSITORY_EXISTS,
            frame(&[0xff; 6]),
            Code::InvalidArgument,
            StartsWith("first request message: "),
        ),
        (
            "field longer than the message".into(),
            FIND_DEFAULT_BRANCH,
            frame(&[0x0a, 0x64, 1, 2, 3]),
            Code::InvalidArgument,
            Exactly(malformed),
        ),
        (
            "repository field is a varint".into(),
            FIND_DEFAULT_BRANCH,
            frame(&[0x08, 0x01]),
            Code::InvalidArgument,
            Exactly("first request message: field is not a string or message"),
        ),
        (
            "repository field twice".into(),
            WRITE_REF,
            frame(&twice),
            Code::InvalidArgument,
            Exactly("first request message: field is ambiguous"),
        ),
        // Framing.
        (
            "declared length exceeds the data, then end of stream".into(),
            FIND_DEFAULT_BRANCH,
            raw(&[0, 0, 0, 0, 100, 0x0a, 0x02, 0x12]),
            Code::InvalidArgument,
            Exactly(ended),
        ),
        (
            "same, client-streaming mutator".into(),
            "/gitaly.SSHService/SSHReceivePack",
            raw(&[0, 0, 0, 0, 100, 0x0a, 0x02, 0x12]),
            Code::InvalidArgument,
            Exactly(ended),
        ),
        (
            "half a frame header".into(),
            FIND_DEFAULT_BRANCH,
            raw(&[0, 0]),
            Code::InvalidArgument,
            Exactly(ended),
        ),
        (
            "no message at all".into(),
            WRITE_REF,
            Bytes::new(),
            Code::InvalidArgument,
            Exactly(ended),
        ),
        (
            "compressed flag".into(),
            FIND_DEFAULT_BRANCH,
            Bytes::from(compressed.clone()),
            Code::InvalidArgument,
            Exactly("first request message: the first message is compressed"),
        ),
        (
            "compressed flag, mutator".into(),
            WRITE_REF,
            Bytes::from(compressed.clone()),
            Code::InvalidArgument,
            Exactly("first request message: the first message is compressed"),
        ),
        (
            "declared length 4 GiB".into(),
            FIND_DEFAULT_BRANCH,
            raw(&[0, 0xff, 0xff, 0xff, 0xff]),
            Code::InvalidArgument,
            Exactly("first request message: the first message is 4294967295 bytes, more than the limit of 4194304 bytes"),
        ),
        // Missing repositories and storages.
        (
            "empty message, accessor".into(),
            FIND_DEFAULT_BRANCH,
            frame(&[]),
            Code::InvalidArgument,
            Exactly("repository not set"),
        ),
        (
            "empty message, mutator".into(),
            WRITE_REF,
            frame(&[]),
            Code::InvalidArgument,
            Exactly("repository not set"),
        ),
        (
            "empty message, RepositoryExists".into(),
            REPOSITORY_EXISTS,
            frame(&[]),
            Code::InvalidArgument,
            Exactly("repository not set"),
        ),
        (
            "empty message, RemoveRepository".into(),
            REMOVE_REPOSITORY,
            frame(&[]),
            Code::InvalidArgument,
            Exactly("repository not set"),
        ),
        (
            "empty message, storage accessor".into(),
            WALK_REPOS,
            frame(&[]),
            Code::InvalidArgument,
            Exactly("storage name not set"),
        ),
        (
            "empty storage name, accessor".into(),
            FIND_DEFAULT_BRANCH,
            repo_frame(&[1], "", TARGET),
            Code::InvalidArgument,
            Exactly("storage name not set"),
        ),
        (
            "empty storage name, mutator".into(),
            WRITE_REF,
            repo_frame(&[1], "", TARGET),
            Code::InvalidArgument,
            Exactly("storage name not set"),
        ),
        (
            "empty relative path".into(),
            FIND_DEFAULT_BRANCH,
            repo_frame(&[1], VIRTUAL, ""),
            Code::InvalidArgument,
            Exactly("repository path not set"),
        ),
        (
            "unknown virtual storage, accessor".into(),
            FIND_DEFAULT_BRANCH,
            repo_frame(&[1], "nope", TARGET),
            Code::InvalidArgument,
            Exactly("storage name not found"),
        ),
        (
            "unknown virtual storage, mutator".into(),
            WRITE_REF,
            repo_frame(&[1], "nope", TARGET),
            Code::InvalidArgument,
            Exactly("storage name not found"),
        ),
        (
            "unknown virtual storage, RepositoryExists".into(),
            REPOSITORY_EXISTS,
            repo_frame(&[1], "nope", TARGET),
            Code::InvalidArgument,
            Exactly("storage name not found"),
        ),
        (
            "unknown virtual storage, storage accessor".into(),
            WALK_REPOS,
            frame(&field(1, b"nope")),
            Code::InvalidArgument,
            Exactly("storage name not found"),
        ),
        (
            "NUL byte in the storage name".into(),
            FIND_DEFAULT_BRANCH,
            repo_frame(&[1], "default\0", TARGET),
            Code::InvalidArgument,
            Exactly("storage name not found"),
        ),
        // A NUL byte is refused before the database (which refuses it in text) sees it.
        (
            "NUL byte in the relative path, accessor".into(),
            FIND_DEFAULT_BRANCH,
            repo_frame(&[1], VIRTUAL, "group/a\0b.git"),
            Code::InvalidArgument,
            Exactly("relative path contains NUL"),
        ),
        (
            "NUL byte in the relative path, mutator".into(),
            WRITE_REF,
            repo_frame(&[1], VIRTUAL, "group/a\0b.git"),
            Code::InvalidArgument,
            Exactly("relative path contains NUL"),
        ),
        (
            "relative path not UTF-8, accessor".into(),
            FIND_DEFAULT_BRANCH,
            frame(&field(1, &not_utf8)),
            Code::InvalidArgument,
            Exactly(malformed),
        ),
        (
            "relative path not UTF-8, mutator".into(),
            WRITE_REF,
            frame(&field(1, &not_utf8)),
            Code::InvalidArgument,
            Exactly(malformed),
        ),
        (
            "100 KB relative path".into(),
            FIND_DEFAULT_BRANCH,
            repo_frame(&[1], VIRTUAL, &long_path),
            Code::InvalidArgument,
            Exactly("relative path is too long: 100010 bytes, at most 4096"),
        ),
        // A physical storage is not a virtual storage: clients cannot address a node directly.
        (
            "physical storage name".into(),
            FIND_DEFAULT_BRANCH,
            repo_frame(&[1], STORAGES[0], TARGET),
            Code::InvalidArgument,
            Exactly("storage name not found"),
        ),
        (
            "physical storage name, storage accessor".into(),
            WALK_REPOS,
            frame(&field(1, STORAGES[0].as_bytes())),
            Code::InvalidArgument,
            Exactly("storage name not found"),
        ),
        (
            "untracked additional repository".into(),
            LINK_TO_POOL,
            link("group/untracked.git"),
            Code::NotFound,
            Exactly("additional repository not found"),
        ),
        (
            "additional repository on another virtual storage".into(),
            LINK_TO_POOL,
            link_on("nope", OTHER),
            Code::InvalidArgument,
            Exactly(foreign),
        ),
        (
            "untracked origin of a new pool".into(),
            CREATE_POOL,
            create_pool(VIRTUAL, "group/untracked.git"),
            Code::NotFound,
            Exactly("additional repository not found"),
        ),
        (
            "origin of a new pool on another virtual storage".into(),
            CREATE_POOL,
            create_pool("nope", OTHER),
            Code::InvalidArgument,
            Exactly(foreign),
        ),
        // Unknown methods (Praefect's code and message, spec §13).
        (
            "unknown method".into(),
            "/gitaly.RepositoryService/NoSuchMethod",
            frame(&valid),
            Code::Internal,
            Exactly("full method name not found: /gitaly.RepositoryService/NoSuchMethod"),
        ),
        (
            "unknown service".into(),
            "/gitaly.NoSuchService/Method",
            frame(&valid),
            Code::Internal,
            Exactly("full method name not found: /gitaly.NoSuchService/Method"),
        ),
        (
            "not a gRPC path".into(),
            "/nope",
            frame(&valid),
            Code::Internal,
            Exactly("full method name not found: /nope"),
        ),
    ];
    // Paths that would escape the storage, or spell one path in several ways, are refused
    // before anything is looked up (see abuse::paths for creations).
    const ESCAPING: [(&str, &str); 4] = [
        ("../../etc", "relative path escapes root directory"),
        ("a/../../b", "relative path escapes root directory"),
        ("/etc/passwd", "relative path is absolute"),
        ("./../x", "relative path has an empty or \".\" component"),
    ];
    for (path, why) in ESCAPING {
        for (what, method, body) in [
            (
                "accessor",
                FIND_DEFAULT_BRANCH,
                repo_frame(&[1], VIRTUAL, path),
            ),
            ("mutator", WRITE_REF, repo_frame(&[1], VIRTUAL, path)),
            (
                "RemoveRepository",
                REMOVE_REPOSITORY,
                repo_frame(&[1], VIRTUAL, path),
            ),
            (
                "RepositoryExists",
                REPOSITORY_EXISTS,
                repo_frame(&[1], VIRTUAL, path),
            ),
            ("additional repository", LINK_TO_POOL, link(path)),
        ] {
            cases.push((
                format!("{path:?}, {what}"),
                method,
                body,
                Code::InvalidArgument,
                Exactly(why),
            ));
        }
    }

    for (what, path, body, code, says) in &cases {
        let (reply, received) = cluster.call_logged(path, body.clone(), &[]).await;
        assert_eq!(reply.code, *code, "{what}: {reply:?}");
        match says {
            Exactly(text) => assert_eq!(reply.message, *text, "{what}"),
            StartsWith(text) => assert!(reply.message.starts_with(text), "{what}: {reply:?}"),
        }
        assert!(received.is_empty(), "{what}: reached a node: {received:?}");
    }

    // Tokens (spec §9): none or an unparsable one is Unauthenticated, a wrong or expired one
    // PermissionDenied; the health service needs none.
    let signed_by = |secret: &str, age: u64| {
        format!(
            "Bearer {}",
            auth::sign_v2(
                secret.as_bytes(),
                SystemTime::now() - Duration::from_secs(age)
            )
        )
    };
    let token_cases = [
        (
            "no token",
            None,
            Code::Unauthenticated,
            "authentication required",
        ),
        (
            "unparsable token",
            Some("Bearer garbage".to_string()),
            Code::Unauthenticated,
            "authentication required",
        ),
        (
            "the node's token",
            Some(signed_by(NODE_TOKEN, 0)),
            Code::PermissionDenied,
            "permission denied: wrong hmac signature",
        ),
        (
            "an expired token",
            Some(signed_by(ROUTER_TOKEN, 120)),
            Code::PermissionDenied,
            "permission denied: token has expired",
        ),
    ];
    for (what, token, code, message) in token_cases {
        let headers: Vec<(&str, String)> =
            token.into_iter().map(|t| ("authorization", t)).collect();
        let before = cluster.log.len();
        let reply = raw_call(
            &cluster.channel,
            FIND_DEFAULT_BRANCH,
            normal_read(),
            &headers,
        )
        .await;
        reply.assert_status(code, message, what);
        assert_eq!(cluster.log.len(), before, "{what}: reached a node");
    }
    let health = raw_call(
        &cluster.channel,
        "/grpc.health.v1.Health/Check",
        echo::frame(&[]),
        &[],
    )
    .await;
    health.assert_status(Code::Ok, "", "health without a token");
    assert_eq!(
        health.messages,
        vec![Bytes::from_static(&[0x08, 0x01])],
        "SERVING"
    );

    // Connections that do not speak HTTP/2 (or stop speaking it) are dropped.
    let addr = cluster
        .router
        .address
        .trim_start_matches("tcp://")
        .to_string();
    for garbage in [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        (0..=255u8).rev().collect::<Vec<u8>>(),
        [&b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..], &[0xff; 64]].concat(),
        [
            &praefect::wire::backchannel::BACKCHANNEL_MAGIC[..],
            &[0xff; 64],
        ]
        .concat(),
    ] {
        let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        stream.write_all(&garbage).await.unwrap();
        let _ = stream.shutdown().await;
        let mut sink = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut sink));
        assert!(
            closed.await.is_ok(),
            "the router kept a garbage connection open: {:?}",
            String::from_utf8_lossy(&garbage)
        );
    }

    // Creating repositories at escaping paths is refused: nothing is recorded under that
    // key, and no node is asked.
    for (path, why) in ESCAPING {
        let (reply, received) = cluster
            .call_logged(
                "/gitaly.RepositoryService/CreateRepository",
                repo_frame(&[1], VIRTUAL, path),
                &[],
            )
            .await;
        reply.assert_status(Code::InvalidArgument, why, path);
        assert!(cluster.record(path).await.is_none(), "{path} recorded");
        assert!(received.is_empty(), "{path}: reached a node: {received:?}");
    }

    // Nothing a node received names a path outside its storage, or a storage not its own.
    for r in cluster.log.all() {
        let message = r.message();
        for needle in [&b"../"[..], b"/etc/", b"nope"] {
            assert!(
                !message.windows(needle.len()).any(|w| w == needle),
                "{} on {} received {:?}",
                r.path,
                r.node,
                String::from_utf8_lossy(message)
            );
        }
        let repo = repository_at(message, &[1], &r.path);
        assert_eq!(repo.storage_name, r.node);
    }

    // Still serving, still the same process.
    let (reply, received) = cluster
        .call_logged(FIND_DEFAULT_BRANCH, normal_read(), &[])
        .await;
    reply.assert_status(Code::Ok, "", "a normal read at the end");
    assert_eq!(received.len(), 1);
    assert_eq!(
        repository_at(received[0].message(), &[1], "end").relative_path,
        replica_path(target_id)
    );
    let reply = cluster
        .call(WRITE_REF, framed_repo_request(&[1], VIRTUAL, TARGET))
        .await;
    reply.assert_status(Code::Ok, "", "a normal write at the end");
    assert!(
        cluster.router.child.try_wait().unwrap().is_none(),
        "the router exited"
    );
    println!(
        "bad input: {} refused as documented, {} token cases, 4 garbage connections, {} escaping paths refused for creation",
        cases.len() + ESCAPING.len(),
        4,
        ESCAPING.len()
    );
}

// ---------------------------------------------------------------------------------------
// An additional repository the router cannot read

/// An additional repository the router cannot read (ambiguous, malformed, of the wrong type)
/// is refused like an unreadable target repository: forwarding it unrewritten would hand the
/// node the client's virtual storage name and relative path, `../../etc` included.
#[tokio::test(flavor = "multi_thread")]
async fn unreadable_additional_repository_is_refused() {
    let (cluster, _) = Cluster::start(&[TARGET, OTHER]).await;
    let twice = [
        field(1, &repository(VIRTUAL, OTHER)),
        field(1, &repository(VIRTUAL, "../../etc")),
    ]
    .concat();
    let link = |pool: Vec<u8>| {
        echo::frame(&[field(1, &pool), field(2, &repository(VIRTUAL, TARGET))].concat())
    };
    let new_pool = format!("@pools/12/34/1234{}.git", "0".repeat(60));
    let create_pool = |origin: Vec<u8>| {
        echo::frame(&[field(1, &field(1, &repository(VIRTUAL, &new_pool))), origin].concat())
    };
    let cases = [
        (
            "LinkRepositoryToObjectPool: the pool repository twice, the second ../../etc",
            LINK_TO_POOL,
            link(twice),
        ),
        (
            "LinkRepositoryToObjectPool: the pool repository is not protobuf",
            LINK_TO_POOL,
            link(field(1, &[0xff; 6])),
        ),
        (
            "LinkRepositoryToObjectPool: the pool repository is a varint",
            LINK_TO_POOL,
            link(vec![0x08, 0x01]),
        ),
        (
            "CreateObjectPool: the origin twice, the second ../../etc",
            CREATE_POOL,
            create_pool(
                [
                    field(2, &repository(VIRTUAL, OTHER)),
                    field(2, &repository(VIRTUAL, "../../etc")),
                ]
                .concat(),
            ),
        ),
    ];
    let mut failures = Vec::new();
    for (what, path, body) in cases {
        let (reply, received) = cluster.call_logged(path, body, &[]).await;
        let refused = matches!(reply.code, Code::InvalidArgument | Code::NotFound);
        if !refused || !received.is_empty() {
            failures.push(format!(
                "{what}: answered {:?} {:?}; the node received {:?}",
                reply.code,
                reply.message,
                received
                    .iter()
                    .map(|r| String::from_utf8_lossy(r.message()).into_owned())
                    .collect::<Vec<_>>()
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
