//! Node addresses as configured (`tcp://`, `tls://`, `unix:`, `dns:`, `dns+tls:`): what each
//! dials, and how a [`super::NodeChannel`] finds the socket addresses behind it. Pure parsing,
//! kept apart from the channel so that the channel and the module's constructors both import
//! it without importing each other.

use super::resolve;

/// Why a node address cannot be dialed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddressError {
    #[error("unsupported address {0:?}: use tcp://, tls://, unix:, dns: or dns+tls:")]
    Unsupported(String),
}

/// Turns a configured node address into what [`crate::wire::backchannel::connect_raw`] takes
/// (`tcp://host:port`, `tls://host:port` or `unix:/path`). A `dns:` name becomes `tcp://` or
/// `tls://` with the name, which the OS resolves at connection; [`super::NodeChannel`]
/// resolves such names itself instead (see [`resolution`]).
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

/// How a node's addresses are found.
pub(crate) enum Resolution {
    /// One address, dialed as written (`tcp://`, `tls://`, `unix:`).
    Fixed(String),
    /// A name whose addresses come from DNS; with TLS, certificates are checked for the name.
    Dns { host: String, port: u16, tls: bool },
}

/// How [`super::NodeChannel`] finds a node's addresses: `dns:` and `dns+tls:` names through DNS
/// (every address the name has), anything else as written.
pub(super) fn resolution(address: &str) -> Result<Resolution, AddressError> {
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
