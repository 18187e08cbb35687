//! The Gitaly nodes behind the virtual storages: their addresses as configured, and the
//! connections the router keeps to them ([`NodeChannel`]: one backchannel connection per
//! node address, or per resolved address for `dns:` names, with that node's v2 token on
//! every call).

mod address;
mod balancer;
mod channel;
pub(crate) mod http2;
mod resolve;
mod subchannel;

use std::time::Duration;

pub use address::{check_address, dial_target, AddressError};
pub use channel::{NodeChannel, NodeError, Unsent, RERESOLVE_INTERVAL};
pub use http2::ResponseBody;
pub use resolve::ResolveError;

use crate::config::{Config, Node as NodeConfig};
use crate::wire::backchannel::{yamux_config, ClientHandler};
use crate::wire::sidechannel::SidechannelRegistry;
use address::resolution;
use subchannel::ConnectSettings;

/// How long one connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// One configured node of one virtual storage.
#[derive(Clone, Debug)]
pub struct NodeRef {
    pub virtual_storage: String,
    pub storage: String,
    pub address: String,
    pub token: String,
}

/// Every node of every virtual storage, in configuration order.
pub fn configured_nodes(config: &Config) -> Vec<NodeRef> {
    config
        .virtual_storage
        .iter()
        .flat_map(|vs| {
            vs.node.iter().map(move |node: &NodeConfig| NodeRef {
                virtual_storage: vs.name.clone(),
                storage: node.storage.clone(),
                address: node.address.clone(),
                token: node.token.clone(),
            })
        })
        .collect()
}

/// Every configured (virtual storage, storage) pair, in configuration order: what the
/// datastore's per-storage questions (metadata, dataloss, status, cleanup) are asked about.
pub fn configured_pairs(config: &Config) -> Vec<(String, String)> {
    configured_nodes(config)
        .into_iter()
        .map(|node| (node.virtual_storage, node.storage))
        .collect()
}

fn yamux(config: &Config) -> tokio_yamux::Config {
    yamux_config(
        u32::try_from(config.yamux.maximum_stream_window_size_bytes).unwrap_or(u32::MAX),
        usize::try_from(config.yamux.accept_backlog).unwrap_or(256),
    )
}

fn invalid_input(err: AddressError) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, err)
}

/// A channel to `address` signing calls with `token`, connecting on first use.
pub fn node_channel(
    address: &str,
    token: &str,
    yamux: tokio_yamux::Config,
    handler: ClientHandler,
) -> Result<NodeChannel, AddressError> {
    let settings = ConnectSettings::new(yamux, handler, CONNECT_TIMEOUT);
    NodeChannel::new(address, resolution(address)?, token, settings)
}

/// Connects to a node now, within `timeout`.
pub async fn dial(
    config: &Config,
    address: &str,
    token: &str,
    timeout: Duration,
) -> std::io::Result<NodeChannel> {
    let channel = node_channel(address, token, yamux(config), ClientHandler::default())
        .map_err(invalid_input)?;
    channel
        .connect(timeout)
        .await
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::ConnectionRefused, e.to_string()))?;
    Ok(channel)
}

/// A channel that connects on first use and reconnects as needed: a node that is down at
/// startup does not keep the router from starting.
pub fn dial_lazy(
    config: &Config,
    address: &str,
    token: &str,
    handler: ClientHandler,
) -> std::io::Result<NodeChannel> {
    node_channel(address, token, yamux(config), handler).map_err(invalid_input)
}

/// Connections to every configured node, shared by the health manager and the proxy.
pub struct NodePool {
    entries: Vec<(NodeRef, NodeChannel)>,
    /// Sidechannels the nodes open back to this router, for every node connection.
    pub sidechannels: SidechannelRegistry,
}

impl NodePool {
    /// Dials every node lazily (nothing fails if a node is down now). `services` are served
    /// to the nodes over each connection's backchannel (the router's RefTransaction).
    pub fn connect(
        config: &Config,
        services: Option<tonic::service::Routes>,
    ) -> std::io::Result<Self> {
        let handler = ClientHandler {
            routes: services,
            ..ClientHandler::default()
        };
        let sidechannels = handler.sidechannels.clone();
        let entries = configured_nodes(config)
            .into_iter()
            .map(|node| {
                let channel = dial_lazy(config, &node.address, &node.token, handler.clone())?;
                Ok((node, channel))
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(NodePool {
            entries,
            sidechannels,
        })
    }

    pub fn iter(&self) -> impl Iterator<Item = &(NodeRef, NodeChannel)> {
        self.entries.iter()
    }

    /// The channel to `storage` of `virtual_storage`.
    pub fn channel(&self, virtual_storage: &str, storage: &str) -> Option<&NodeChannel> {
        self.entries
            .iter()
            .find(|(node, _)| node.virtual_storage == virtual_storage && node.storage == storage)
            .map(|(_, channel)| channel)
    }
}
