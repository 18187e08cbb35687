//! Node addresses as configured (`tcp://`, `tls://`, `unix:`, `dns:`, `dns+tls:`): what each
//! dials, and how a [`super::NodeChannel`] finds the socket addresses behind it. Pure parsing,
//! kept apart from the channel so that the channel and the module's constructors both import
//! it without importing each other.
//!
//! `dns:` and `dns+tls:` follow gRPC's dns scheme: `dns:NAME:PORT` and `dns:///NAME:PORT` are
//! looked up with the system resolver, `dns://SERVER/NAME:PORT` with the DNS server `SERVER`
//! alone (an IP address, port 53 unless given), as with Consul's DNS interface
//! (`dns://127.0.0.1:8600/gitaly.service.consul:8075`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use super::resolve;

/// The port of a DNS server named without one.
const DNS_PORT: u16 = 53;

/// Why a node address cannot be dialed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddressError {
    #[error("unsupported address {0:?}: use tcp://, tls://, unix:, dns: or dns+tls:")]
    Unsupported(String),
    /// The authority of `dns://AUTHORITY/NAME:PORT` is not a DNS server that can be asked.
    #[error(
        "address {address:?}: DNS server {server:?} {reason}; write dns://IP[:PORT]/NAME:PORT \
         (port 53 when left out), or dns:NAME:PORT for the system resolver"
    )]
    DnsServer {
        address: String,
        server: String,
        reason: &'static str,
    },
    /// `dns://SERVER` without `/NAME:PORT`: gRPC reads `SERVER` as the DNS server, so the
    /// name to look up is missing (rather than guessing which of the two was meant).
    #[error(
        "address {0:?} names no host after the DNS server: write dns://SERVER/NAME:PORT, or \
         dns:NAME:PORT for the system resolver"
    )]
    NoDnsName(String),
}

/// A `dns:` or `dns+tls:` address taken apart.
struct DnsAddress<'a> {
    /// The DNS server to ask; `None` for the system resolver.
    server: Option<SocketAddr>,
    /// `NAME:PORT` (or a bare name).
    target: &'a str,
    tls: bool,
}

/// Takes a `dns:` or `dns+tls:` address apart; `None` for the other schemes.
fn parse_dns(address: &str) -> Option<Result<DnsAddress<'_>, AddressError>> {
    let (tls, rest) = match address.strip_prefix("dns+tls:") {
        Some(rest) => (true, rest),
        None => (false, address.strip_prefix("dns:")?),
    };
    let Some(with_authority) = rest.strip_prefix("//") else {
        return Some(Ok(DnsAddress {
            server: None,
            target: rest,
            tls,
        }));
    };
    let Some((authority, target)) = with_authority.split_once('/') else {
        return Some(Err(AddressError::NoDnsName(address.to_string())));
    };
    let server = if authority.is_empty() {
        None
    } else {
        match dns_server(authority) {
            Ok(server) => Some(server),
            Err(reason) => {
                return Some(Err(AddressError::DnsServer {
                    address: address.to_string(),
                    server: authority.to_string(),
                    reason,
                }))
            }
        }
    };
    Some(Ok(DnsAddress {
        server,
        target,
        tls,
    }))
}

/// The socket address of a DNS server written as `IP`, `IP:PORT`, `[IPv6]` or `[IPv6]:PORT`
/// (or a bare IPv6 address). Only addresses: a server named by a host name would need another
/// resolver to find it, and the one it would fall back to is exactly what `dns://SERVER/`
/// is there to avoid.
fn dns_server(authority: &str) -> Result<SocketAddr, &'static str> {
    let port = |text: &str| -> Result<u16, &'static str> {
        match text.parse::<u16>() {
            Ok(0) | Err(_) => Err("has no valid port (1 to 65535)"),
            Ok(port) => Ok(port),
        }
    };
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or("has an unclosed '['")?;
        let ip: std::net::Ipv6Addr = host.parse().map_err(|_| "is not an IPv6 address")?;
        let port = match after.strip_prefix(':') {
            Some(text) => port(text)?,
            None if after.is_empty() => DNS_PORT,
            None => return Err("has text after ']' that is not a port"),
        };
        return Ok(SocketAddr::new(IpAddr::V6(ip), port));
    }
    // A bare IP: IPv4, or IPv6 without brackets (and so without a port).
    if let Ok(ip) = authority.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, DNS_PORT));
    }
    let (host, text) = authority.split_once(':').unwrap_or((authority, ""));
    let ip: Ipv4Addr = host
        .parse()
        .map_err(|_| "is not an IP address (a DNS server is named by its address)")?;
    Ok(SocketAddr::new(IpAddr::V4(ip), port(text)?))
}

/// Turns a configured node address into what [`crate::wire::backchannel::connect_raw`] takes
/// (`tcp://host:port`, `tls://host:port` or `unix:/path`). A `dns:` name becomes `tcp://` or
/// `tls://` with the name, which the OS resolves at connection (the DNS server of
/// `dns://SERVER/` is checked but not carried: [`super::NodeChannel`] resolves such names
/// itself, see [`resolution`]).
pub fn dial_target(address: &str) -> Result<String, AddressError> {
    let unsupported = || AddressError::Unsupported(address.to_string());
    if let Some(dns) = parse_dns(address) {
        let dns = dns?;
        let scheme = if dns.tls { "tls" } else { "tcp" };
        return Ok(format!("{scheme}://{}", dns.target));
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

/// Checks a node address the way the router will read it when it makes the node's channel,
/// so that configuration validation reports a bad address before anything starts.
pub fn check_address(address: &str) -> Result<(), AddressError> {
    resolution(address).map(drop)
}

/// How a node's addresses are found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Resolution {
    /// One address, dialed as written (`tcp://`, `tls://`, `unix:`).
    Fixed(String),
    /// A name whose addresses come from DNS: the system resolver, or the DNS `server` of a
    /// `dns://SERVER/` address; with TLS, certificates are checked for the name.
    Dns {
        host: String,
        port: u16,
        tls: bool,
        server: Option<SocketAddr>,
    },
}

/// How [`super::NodeChannel`] finds a node's addresses: `dns:` and `dns+tls:` names through DNS
/// (every address the name has), anything else as written.
pub(super) fn resolution(address: &str) -> Result<Resolution, AddressError> {
    let Some(dns) = parse_dns(address) else {
        return dial_target(address).map(Resolution::Fixed);
    };
    let dns = dns?;
    let (host, port) = resolve::split_host_port(dns.target)
        .ok_or_else(|| AddressError::Unsupported(address.to_string()))?;
    Ok(Resolution::Dns {
        host,
        port,
        tls: dns.tls,
        server: dns.server,
    })
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
            (
                "dns+tls://10.0.0.1:8600/gitaly.internal:9999",
                "tls://gitaly.internal:9999",
            ),
        ];
        for (address, target) in cases {
            assert_eq!(dial_target(address).unwrap(), target, "{address}");
        }
        for bad in [
            "http://x:1",
            "127.0.0.1:8075",
            "tcp://",
            "unix:",
            "dns://consul/gitaly:8075",
            "dns://127.0.0.1:8600",
        ] {
            assert!(dial_target(bad).is_err(), "{bad}");
        }
    }

    fn dns(address: &str) -> Option<(String, u16, bool, Option<SocketAddr>)> {
        match resolution(address).unwrap() {
            Resolution::Dns {
                host,
                port,
                tls,
                server,
            } => Some((host, port, tls, server)),
            Resolution::Fixed(_) => None,
        }
    }

    fn name(
        host: &str,
        port: u16,
        tls: bool,
        server: Option<&str>,
    ) -> Option<(String, u16, bool, Option<SocketAddr>)> {
        let server = server.map(|s| s.parse().unwrap());
        Some((host.to_string(), port, tls, server))
    }

    #[test]
    fn dns_names_are_resolved_by_the_channel_and_the_rest_dialed_as_written() {
        assert_eq!(
            dns("dns:gitaly.internal:8075"),
            name("gitaly.internal", 8075, false, None)
        );
        assert_eq!(
            dns("dns:///gitaly.internal:8075"),
            name("gitaly.internal", 8075, false, None)
        );
        assert_eq!(
            dns("dns+tls:gitaly.internal:9999"),
            name("gitaly.internal", 9999, true, None)
        );
        assert_eq!(
            dns("dns+tls:///gitaly.internal:9999"),
            name("gitaly.internal", 9999, true, None)
        );
        assert_eq!(dns("dns:[::1]:8075"), name("::1", 8075, false, None));
        assert_eq!(dns("tcp://gitaly.internal:8075"), None);
        assert_eq!(dns("unix:/run/gitaly.sock"), None);
        assert!(resolution("dns:host:port").is_err());
    }

    #[test]
    fn a_dns_authority_names_the_server_to_ask_on_port_53_unless_given() {
        let cases = [
            ("dns://10.0.0.2/gitaly.internal:8075", "10.0.0.2:53"),
            (
                "dns://127.0.0.1:8600/gitaly.internal:8075",
                "127.0.0.1:8600",
            ),
            ("dns://[fd00::53]/gitaly.internal:8075", "[fd00::53]:53"),
            ("dns://[::1]:8600/gitaly.internal:8075", "[::1]:8600"),
            ("dns://::1/gitaly.internal:8075", "[::1]:53"),
        ];
        for (address, server) in cases {
            assert_eq!(
                dns(address),
                name("gitaly.internal", 8075, false, Some(server)),
                "{address}"
            );
        }
        assert_eq!(
            dns("dns+tls://127.0.0.1:8600/gitaly.internal:9999"),
            name("gitaly.internal", 9999, true, Some("127.0.0.1:8600"))
        );
    }

    #[test]
    fn bad_dns_authorities_say_what_is_wrong_with_the_server() {
        let cases = [
            ("consul.internal", "is not an IP address"),
            ("consul.internal:8600", "is not an IP address"),
            ("127.0.0.1:", "has no valid port"),
            ("127.0.0.1:dns", "has no valid port"),
            ("127.0.0.1:0", "has no valid port"),
            ("127.0.0.1:65536", "has no valid port"),
            ("[::1", "has an unclosed '['"),
            ("[::1]8600", "has text after ']'"),
            ("[127.0.0.1]:53", "is not an IPv6 address"),
            ("[::1]:x", "has no valid port"),
            ("user@127.0.0.1", "is not an IP address"),
        ];
        for (authority, reason) in cases {
            let address = format!("dns://{authority}/gitaly.internal:8075");
            let err = resolution(&address).unwrap_err();
            match &err {
                AddressError::DnsServer {
                    address: a,
                    server,
                    reason: r,
                } => {
                    assert_eq!(a, &address);
                    assert_eq!(server, authority);
                    assert!(r.starts_with(reason), "{authority}: {r}");
                }
                other => panic!("{authority}: {other:?}"),
            }
            let text = err.to_string();
            assert!(
                text.contains(&format!("DNS server {authority:?}"))
                    && text.contains("dns://IP[:PORT]/NAME:PORT"),
                "{text}"
            );
        }
        assert_eq!(
            resolution("dns://127.0.0.1:8600"),
            Err(AddressError::NoDnsName("dns://127.0.0.1:8600".into()))
        );
        assert_eq!(
            check_address("dns+tls://127.0.0.1/"),
            Err(AddressError::Unsupported("dns+tls://127.0.0.1/".into()))
        );
        assert_eq!(check_address("dns://127.0.0.1:8600/gitaly:8075"), Ok(()));
    }
}
