//! Service discovery through a named DNS server: node addresses written
//! `dns://SERVER/NAME:PORT` (Consul's DNS interface, typically) are looked up by asking SERVER,
//! not the system resolver, and what SERVER answers at each re-resolution is the set of
//! addresses calls go to.
//!
//! A DNS server of the test's own ([`testkit::dns::DnsServer`]) answers for `gitaly.test`,
//! a name the system resolver does not know, with loopback addresses 127.0.0.2, .3 and .4; a
//! gitnode listens on each, all on the same port (the port is the address's, not the DNS
//! answer's). Every gitnode holds the same repository with its own default branch
//! (`node-a`, ...), so FindDefaultBranchName tells which node answered a call.
// Tests write the database directly (not through PgBouncer), so the datastore's rule about
// unnamed statements (clippy.toml) does not apply here.
#![allow(clippy::disallowed_methods)]

use crate::common;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use praefect::nodes::{node_channel, NodeChannel, RERESOLVE_INTERVAL};
use praefect::wire::backchannel::{yamux_config, ClientHandler};
use praefect::wire::proto::ref_service_client::RefServiceClient;
use praefect::wire::proto::repository_service_client::RepositoryServiceClient;
use praefect::wire::proto::{CreateRepositoryRequest, FindDefaultBranchNameRequest, Repository};
use testkit::dns::DnsServer;

use common::gitnode::{GitNode, TOKEN};
use common::pg::TestDb;
use common::router::{start_router_on, virtual_repo, NodeEntry, Router};
use common::wait::wait_until;

const NAME: &str = "gitaly.test";
const STORAGE: &str = "gitaly-1";

/// Gitnodes of one storage on one port, each on its own loopback address.
struct Nodes {
    port: u16,
    nodes: Vec<(IpAddr, GitNode)>,
}

impl Nodes {
    /// `count` gitnodes on 127.0.0.2, 127.0.0.3, ...: the first on any port, the others on
    /// the port it got.
    fn start(count: u8) -> Nodes {
        let first = GitNode::start_on(STORAGE, "127.0.0.2:0");
        let port: u16 = first.address.rsplit(':').next().unwrap().parse().unwrap();
        let mut nodes = vec![(IpAddr::from([127, 0, 0, 2]), first)];
        for i in 1..count {
            let ip = IpAddr::from([127, 0, 0, 2 + i]);
            nodes.push((ip, GitNode::start_on(STORAGE, &format!("{ip}:{port}"))));
        }
        Nodes { port, nodes }
    }

    fn ip(&self, i: usize) -> IpAddr {
        self.nodes[i].0
    }

    /// The marker branch of node `i`: "node-a", "node-b", ...
    fn marker(i: usize) -> String {
        format!("node-{}", char::from(b'a' + i as u8))
    }

    /// The node whose default branch `branch` is.
    fn which(&self, branch: &[u8]) -> usize {
        let name = String::from_utf8_lossy(branch);
        (0..self.nodes.len())
            .find(|&i| name == format!("refs/heads/{}", Self::marker(i)))
            .unwrap_or_else(|| panic!("no node has the default branch {name:?}"))
    }

    /// Creates `relative_path` on every node, with that node's marker as default branch.
    async fn create_markers(&self, relative_path: &str) {
        for (i, (_, node)) in self.nodes.iter().enumerate() {
            RepositoryServiceClient::new(node.channel())
                .create_repository(CreateRepositoryRequest {
                    repository: Some(node.repository(relative_path)),
                    default_branch: Self::marker(i).into_bytes(),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
    }
}

fn open(address: &str) -> NodeChannel {
    node_channel(
        address,
        TOKEN,
        yamux_config(0, 256),
        ClientHandler::default(),
    )
    .unwrap()
}

/// Which node answers FindDefaultBranchName for `repository` through `channel` (a node
/// channel, or a router's).
async fn answered_by<C>(nodes: &Nodes, channel: C, repository: Repository) -> usize
where
    C: tonic::client::GrpcService<tonic::body::Body>,
    C::Error: Into<tonic::codegen::StdError>,
    C::ResponseBody: tonic::codegen::Body<Data = bytes::Bytes> + Send + 'static,
    <C::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let name = RefServiceClient::new(channel)
        .find_default_branch_name(FindDefaultBranchNameRequest {
            repository: Some(repository),
            head_only: true,
        })
        .await
        .unwrap()
        .into_inner()
        .name;
    nodes.which(&name)
}

/// Calls through `call` until every node of `wanted` has answered one, within `timeout`;
/// panics as soon as any other node answers.
async fn until_answered_by_all<F>(timeout: Duration, wanted: &[usize], mut call: impl FnMut() -> F)
where
    F: std::future::Future<Output = usize>,
{
    let wanted: BTreeSet<usize> = wanted.iter().copied().collect();
    let mut seen = BTreeSet::new();
    wait_until(
        timeout,
        &format!("calls are answered by every node of {wanted:?}"),
        async || {
            let node = call().await;
            assert!(
                wanted.contains(&node),
                "node {node} answered; only {wanted:?} should"
            );
            seen.insert(node);
            if seen == wanted {
                Ok(())
            } else {
                Err(format!("answered so far by {seen:?}"))
            }
        },
    )
    .await;
}

fn endpoints(channel: &NodeChannel) -> Vec<String> {
    let mut found: Vec<String> = channel.endpoints().into_iter().map(|(a, _)| a).collect();
    found.sort();
    found
}

/// A node channel for `dns://SERVER/gitaly.test:PORT` connects to what SERVER answers, and a
/// re-resolution after the answer changed adds the new node and drops the removed one: calls
/// go to the new set only.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_channel_asks_the_named_dns_server_and_follows_its_answer() {
    let nodes = Nodes::start(3);
    nodes.create_markers("marker.git").await;
    let dns = DnsServer::start(NAME, &[nodes.ip(0), nodes.ip(1)]).await;
    let channel = open(&format!("dns://{}/{NAME}:{}", dns.addr, nodes.port));
    let repository = nodes.nodes[0].1.repository("marker.git");
    let call = || answered_by(&nodes, channel.clone(), repository.clone());

    until_answered_by_all(Duration::from_secs(30), &[0, 1], call).await;
    let port = nodes.port;
    assert_eq!(
        endpoints(&channel),
        [format!("127.0.0.2:{port}"), format!("127.0.0.3:{port}")]
    );
    let (udp, _) = dns.queries();
    assert!(udp > 0, "the DNS server was asked");

    // Node c joins, node a leaves: seen at the next re-resolution, not before.
    dns.set(&[nodes.ip(1), nodes.ip(2)]);
    assert_eq!(endpoints(&channel).len(), 2);
    assert!(endpoints(&channel).contains(&format!("127.0.0.2:{port}")));
    channel.resolve_now().await.unwrap();
    assert_eq!(
        endpoints(&channel),
        [format!("127.0.0.3:{port}"), format!("127.0.0.4:{port}")]
    );
    until_answered_by_all(Duration::from_secs(30), &[1, 2], call).await;
}

/// An answer too big for UDP comes back truncated; the resolver asks again over TCP and
/// gets the addresses from there.
#[tokio::test(flavor = "multi_thread")]
async fn a_truncated_udp_answer_is_asked_again_over_tcp() {
    let nodes = Nodes::start(2);
    nodes.create_markers("marker.git").await;
    let dns = DnsServer::start(NAME, &[nodes.ip(0), nodes.ip(1)]).await;
    dns.truncate_udp(true);
    let channel = open(&format!("dns://{}/{NAME}:{}", dns.addr, nodes.port));
    channel.resolve_now().await.unwrap();
    let port = nodes.port;
    assert_eq!(
        endpoints(&channel),
        [format!("127.0.0.2:{port}"), format!("127.0.0.3:{port}")]
    );
    let (udp, tcp) = dns.queries();
    assert!(udp > 0 && tcp > 0, "udp {udp}, tcp {tcp}");
    let repository = nodes.nodes[0].1.repository("marker.git");
    let call = || answered_by(&nodes, channel.clone(), repository.clone());
    until_answered_by_all(Duration::from_secs(30), &[0, 1], call).await;
}

/// A name the named server does not know fails the call as Unavailable, naming the server.
#[tokio::test(flavor = "multi_thread")]
async fn a_name_the_dns_server_does_not_know_is_unavailable_and_names_the_server() {
    let node = GitNode::start(STORAGE);
    let port: u16 = node.address.rsplit(':').next().unwrap().parse().unwrap();
    let dns = DnsServer::start(NAME, &[IpAddr::from([127, 0, 0, 1])]).await;
    let channel = open(&format!("dns://{}/other.test:{port}", dns.addr));
    let err = RepositoryServiceClient::new(channel.clone())
        .repository_exists(praefect::wire::proto::RepositoryExistsRequest {
            repository: Some(node.repository("missing.git")),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        err.message()
            .contains(&format!("with the DNS server {}", dns.addr)),
        "{}",
        err.message()
    );
    assert!(channel.endpoints().is_empty());
    // The same name through the server that knows it works.
    let known = open(&format!("dns://{}/{NAME}:{port}", dns.addr));
    let exists = RepositoryServiceClient::new(known)
        .repository_exists(praefect::wire::proto::RepositoryExistsRequest {
            repository: Some(node.repository("missing.git")),
        })
        .await
        .unwrap()
        .into_inner()
        .exists;
    assert!(!exists);
}

/// The router, with its storage at `dns://SERVER/gitaly.test:PORT`, sends reads to the nodes
/// SERVER names; after the answer changes (one node added, one removed) its periodic
/// re-resolution picks the change up and calls go to the new set only.
#[tokio::test(flavor = "multi_thread")]
async fn the_router_follows_the_dns_answer_at_re_resolution() {
    let db = TestDb::new().await;
    let nodes = Nodes::start(3);
    let dns = DnsServer::start(NAME, &[nodes.ip(0), nodes.ip(1)]).await;

    // One repository, on every node at its replica path, each with its own default branch.
    let relative_path = "discovery.git";
    let store = db.datastore().await;
    let id = store
        .reserve_repository_id("default", relative_path)
        .await
        .unwrap();
    let replica_path = praefect::routing::replica_path(id);
    nodes.create_markers(&replica_path).await;
    store
        .create_repository(
            &praefect::datastore::NewRepository {
                repository_id: id,
                virtual_storage: "default".into(),
                relative_path: relative_path.into(),
                replica_path,
                primary: STORAGE.into(),
                updated_secondaries: vec![],
                outdated_secondaries: vec![],
                store_assignments: false,
            },
            &[],
        )
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let address = format!("dns://{}/{NAME}:{}", dns.addr, nodes.port);
    let router: Router = start_router_on(
        dir.path(),
        &db.connection(),
        None,
        &[NodeEntry::new(STORAGE, &address)],
        "",
    )
    .await;
    let call = || answered_by(&nodes, router.channel(), virtual_repo(relative_path));

    until_answered_by_all(Duration::from_secs(30), &[0, 1], call).await;

    // Node c joins, node a leaves. The router re-resolves every RERESOLVE_INTERVAL; until
    // then a and b answer, after it b and c only.
    dns.set(&[nodes.ip(1), nodes.ip(2)]);
    wait_until(
        RERESOLVE_INTERVAL + Duration::from_secs(30),
        "node c answers a call through the router",
        async || {
            let by_c = call().await == 2;
            if !by_c {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            by_c
        },
    )
    .await;
    // The change was one update of the address set: from the first call c answered on, a is
    // gone.
    until_answered_by_all(Duration::from_secs(30), &[1, 2], call).await;

    let changes = router.log_lines("node addresses changed");
    let port = nodes.port;
    assert!(
        changes.iter().any(|entry| {
            entry["added"] == format!("127.0.0.4:{port}")
                && entry["removed"] == format!("127.0.0.2:{port}")
        }),
        "{changes:#?}"
    );
}
