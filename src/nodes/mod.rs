//! The Gitaly nodes behind the virtual storages: their addresses as configured, and the
//! connections the router keeps to them ([`NodeChannel`]: one backchannel connection per
//! node address, or per resolved address for `dns:` names, with that node's v2 token on
//! every call).

mod balancer;
mod channel;
mod http2;
mod resolve;
mod subchannel;

use std::time::Duration;

pub use channel::{NodeChannel, NodeError, RERESOLVE_INTERVAL};
pub use http2::ResponseBody;
pub use resolve::ResolveError;

use crate::config::{Config, Node as NodeConfig};
use crate::wire::backchannel::{yamux_config, ClientHandler};
use crate::wire::sidechannel::SidechannelRegistry;
use channel::Resolution;
use subchannel::ConnectSettings;

/// How long one connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a node address cannot be dialed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddressError {
    #[error("unsupported address {0:?}: use tcp://, tls://, unix:, dns: or dns+tls:")]
    Unsupported(String),
}

/// Turns a configured node address into what [`crate::wire::backchannel::connect_raw`] takes
/// (`tcp://host:port`, `tls://host:port` or `unix:/path`). A `dns:` name becomes `tcp://` or
/// `tls://` with the name, which the OS resolves at connection; [`NodeChannel`] resolves such
/// names itself instead (see [`resolution`]).
pub fn dial_target(address: &str) -> Result<String, AddressError> {
    let unsupported = || AddressError::Unsupported(address.to_string());
    // gRPC's dns scheme allows an authority: dns://[authority]/host:port.
    let strip_dns = |rest: &str| -> String {
        match rest.strip_prefix("//") {
            Some(with_authority) => with_authority
                .split_once('/')
                .map_or(with_authority, |(_, target)| target)
                .to_string(),
            None => rest.to_string(),
        }
    };
    if let Some(rest) = address.strip_prefix("dns+tls:") {
        return Ok(format!("tls://{}", strip_dns(rest)));
    }
    if let Some(rest) = address.strip_prefix("dns:") {
        return Ok(format!("tcp://{}", strip_dns(rest)));
    }
    if let Some(path) = address
        .strip_prefix("unix://")
        .or_else(|| address.strip_prefix("unix:"))
    {
        return if path.is_empty() {
            Err(unsupported())
        } else {
            Ok(format!("unix:{path}"))
        };
    }
    for scheme in ["tcp://", "tls://"] {
        if let Some(rest) = address.strip_prefix(scheme) {
            return if rest.is_empty() {
                Err(unsupported())
            } else {
                Ok(address.to_string())
            };
        }
    }
    Err(unsupported())
}

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

/// How [`NodeChannel`] finds a node's addresses: `dns:` and `dns+tls:` names through DNS
/// (every address the name has), anything else as written.
fn resolution(address: &str) -> Result<Resolution, AddressError> {
    let target = dial_target(address)?;
    if !address.starts_with("dns:") && !address.starts_with("dns+tls:") {
        return Ok(Resolution::Fixed(target));
    }
    let (tls, host_port) = match target.strip_prefix("tls://") {
        Some(rest) => (true, rest),
        None => (false, target.strip_prefix("tcp://").unwrap_or(&target)),
    };
    let (host, port) = resolve::split_host_port(host_port)
        .ok_or_else(|| AddressError::Unsupported(address.to_string()))?;
    Ok(Resolution::Dns { host, port, tls })
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
    let settings = ConnectSettings {
        yamux,
        handler,
        timeout: CONNECT_TIMEOUT,
    };
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
    /// Dials every node lazily (nothing fails if a node is down now).
    pub fn connect(config: &Config) -> std::io::Result<Self> {
        let handler = ClientHandler::default();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_map_to_dial_targets() {
        let cases = [
            ("tcp://127.0.0.1:8075", "tcp://127.0.0.1:8075"),
            (
                "tls://gitaly.example.com:9999",
                "tls://gitaly.example.com:9999",
            ),
            ("unix:/var/run/gitaly.sock", "unix:/var/run/gitaly.sock"),
            ("unix:///var/run/gitaly.sock", "unix:/var/run/gitaly.sock"),
            ("dns:gitaly.internal:8075", "tcp://gitaly.internal:8075"),
            ("dns:///gitaly.internal:8075", "tcp://gitaly.internal:8075"),
            (
                "dns://8.8.8.8/gitaly.internal:8075",
                "tcp://gitaly.internal:8075",
            ),
            ("dns+tls:gitaly.internal:9999", "tls://gitaly.internal:9999"),
        ];
        for (address, target) in cases {
            assert_eq!(dial_target(address).unwrap(), target, "{address}");
        }
        for bad in ["http://x:1", "127.0.0.1:8075", "tcp://", "unix:"] {
            assert!(dial_target(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn dns_names_are_resolved_by_the_channel_and_the_rest_dialed_as_written() {
        let dns = |address: &str| match resolution(address).unwrap() {
            Resolution::Dns { host, port, tls } => Some((host, port, tls)),
            Resolution::Fixed(_) => None,
        };
        let name = |h: &str, p: u16, tls: bool| Some((h.to_string(), p, tls));
        assert_eq!(
            dns("dns:gitaly.internal:8075"),
            name("gitaly.internal", 8075, false)
        );
        assert_eq!(
            dns("dns:///gitaly.internal:8075"),
            name("gitaly.internal", 8075, false)
        );
        assert_eq!(
            dns("dns://10.0.0.2/gitaly.internal:8075"),
            name("gitaly.internal", 8075, false)
        );
        assert_eq!(
            dns("dns+tls:gitaly.internal:9999"),
            name("gitaly.internal", 9999, true)
        );
        assert_eq!(dns("dns:[::1]:8075"), name("::1", 8075, false));
        assert_eq!(dns("tcp://gitaly.internal:8075"), None);
        assert_eq!(dns("unix:/run/gitaly.sock"), None);
        assert!(resolution("dns:host:port").is_err());
    }
}
