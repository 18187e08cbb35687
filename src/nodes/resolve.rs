//! DNS for `dns:` and `dns+tls:` node addresses, with hickory's resolver.
//!
//! Without a DNS server in the address, the system configuration (`/etc/resolv.conf`,
//! `/etc/hosts`) is used; when it cannot be read, the resolver falls back to what the C
//! library does without one, a name server on the local host. `dns://SERVER/NAME:PORT` asks
//! `SERVER` alone ([`server_resolver`]). Both A and AAAA records are asked for: a name with
//! several addresses gets a connection to each.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;

/// gRPC's default port for a `dns:` target that names none.
const DEFAULT_PORT: u16 = 443;

/// Why a name could not be turned into addresses.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResolveError {
    #[error("no usable DNS resolver: {0}")]
    NoResolver(String),
    #[error("resolving {host}{}: {reason}", asked(server))]
    Lookup {
        host: String,
        server: Option<SocketAddr>,
        reason: String,
    },
    #[error("{host} resolved to no addresses{}", asked(server))]
    Empty {
        host: String,
        server: Option<SocketAddr>,
    },
}

/// Names the DNS server of a `dns://SERVER/` address in messages: "no record found" alone
/// would send an operator to the system resolver's configuration.
fn asked(server: &Option<SocketAddr>) -> String {
    server
        .map(|server| format!(" with the DNS server {server}"))
        .unwrap_or_default()
}

/// Splits a `dns:` target (`host:port`, `[v6]:port`, or a bare host) into host and port.
pub(crate) fn split_host_port(target: &str) -> Option<(String, u16)> {
    if let Some(rest) = target.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(port) => port.parse().ok()?,
            None if after.is_empty() => DEFAULT_PORT,
            None => return None,
        };
        return (!host.is_empty()).then(|| (host.to_string(), port));
    }
    match target.rsplit_once(':') {
        // More than one colon without brackets: an IPv6 address without a port.
        Some((host, _)) if host.contains(':') => Some((target.to_string(), DEFAULT_PORT)),
        Some((host, port)) => {
            let port = port.parse().ok()?;
            (!host.is_empty()).then(|| (host.to_string(), port))
        }
        None => (!target.is_empty()).then(|| (target.to_string(), DEFAULT_PORT)),
    }
}

/// A resolver for the system's configuration, or the local-host fallback.
pub(crate) fn system_resolver() -> Result<TokioResolver, ResolveError> {
    let mut builder = match TokioResolver::builder_tokio() {
        Ok(builder) => builder,
        Err(err) => {
            tracing::warn!(error = %err, "system DNS configuration unusable; using a name server on 127.0.0.1");
            let config = ResolverConfig::from_parts(
                None,
                Vec::new(),
                vec![NameServerConfig::udp_and_tcp(IpAddr::V4(
                    Ipv4Addr::LOCALHOST,
                ))],
            );
            TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
        }
    };
    builder.options_mut().ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    builder
        .build()
        .map_err(|e| ResolveError::NoResolver(e.to_string()))
}

/// A resolver that asks the DNS server at `server` and nothing else: not `/etc/hosts`, not
/// the system's name servers, no search domains (the name is looked up as written). Queries
/// go over UDP and are repeated over TCP when the answer comes back truncated (hickory does
/// that for a name server with both connections configured). Nothing is cached: the channel
/// asks again only every [`super::RERESOLVE_INTERVAL`] or after a failure, and then it wants
/// the server's answer of the moment, so that a node added or removed there (Consul's
/// catalog) is seen at that re-resolution whatever TTL the server gave.
pub(crate) fn server_resolver(server: SocketAddr) -> Result<TokioResolver, ResolveError> {
    let mut name_server = NameServerConfig::udp_and_tcp(server.ip());
    for connection in &mut name_server.connections {
        connection.port = server.port();
    }
    let config = ResolverConfig::from_parts(None, Vec::new(), vec![name_server]);
    let mut builder = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default());
    let options = builder.options_mut();
    options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    options.use_hosts_file = ResolveHosts::Never;
    options.cache_size = 0;
    builder
        .build()
        .map_err(|e| ResolveError::NoResolver(e.to_string()))
}

/// Every address `host` resolves to, with `port`, without duplicates, in the resolver's order.
/// `server` is the DNS server `resolver` asks, if the address named one (for messages).
pub(crate) async fn lookup(
    resolver: &TokioResolver,
    server: Option<SocketAddr>,
    host: &str,
    port: u16,
) -> Result<Vec<SocketAddr>, ResolveError> {
    let found = resolver
        .lookup_ip(host)
        .await
        .map_err(|e| ResolveError::Lookup {
            host: host.to_string(),
            server,
            reason: e.to_string(),
        })?;
    let mut addrs: Vec<SocketAddr> = Vec::new();
    for ip in found.iter() {
        let addr = SocketAddr::new(ip, port);
        if !addrs.contains(&addr) {
            addrs.push(addr);
        }
    }
    if addrs.is_empty() {
        return Err(ResolveError::Empty {
            host: host.to_string(),
            server,
        });
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_split_into_host_and_port() {
        let cases = [
            ("gitaly.internal:8075", Some(("gitaly.internal", 8075))),
            ("gitaly.internal", Some(("gitaly.internal", 443))),
            ("[::1]:8075", Some(("::1", 8075))),
            ("[::1]", Some(("::1", 443))),
            ("::1", Some(("::1", 443))),
            ("127.0.0.1:1", Some(("127.0.0.1", 1))),
            ("host:notaport", None),
            (":8075", None),
            ("[]:8075", None),
            ("[::1]x", None),
            ("", None),
        ];
        for (target, expected) in cases {
            let got = split_host_port(target);
            let expected = expected.map(|(h, p)| (h.to_string(), p));
            assert_eq!(got, expected, "{target}");
        }
    }

    #[tokio::test]
    async fn localhost_and_literals_resolve() {
        let resolver = system_resolver().unwrap();
        let addrs = lookup(&resolver, None, "localhost", 8075).await.unwrap();
        assert!(
            addrs.contains(&"127.0.0.1:8075".parse().unwrap()),
            "{addrs:?}"
        );
        let literal = lookup(&resolver, None, "127.0.0.2", 1).await.unwrap();
        assert_eq!(literal, ["127.0.0.2:1".parse().unwrap()]);
    }
}
