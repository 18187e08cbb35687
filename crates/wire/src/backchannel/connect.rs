//! Opening a client's raw connection (TCP, TLS or Unix), before any backchannel handshake:
//! from an address as configured, or from one socket address a name resolved to.

use std::fmt;
use std::io;
use std::net::SocketAddr;

use tokio::net::{TcpStream, UnixStream};

use super::io::BoxIo;
use crate::tls;

/// Opens the raw connection for an address: `tcp://host:port`, `host:port`, `tls://host:port`
/// or `unix:/path`.
pub async fn connect_raw(address: &str) -> io::Result<BoxIo> {
    if let Some(path) = address
        .strip_prefix("unix://")
        .or_else(|| address.strip_prefix("unix:"))
    {
        Ok(Box::new(UnixStream::connect(path).await?))
    } else if let Some(target) = address.strip_prefix("tls://") {
        Ok(Box::new(tls::connect(target).await?))
    } else {
        let target = address.strip_prefix("tcp://").unwrap_or(address);
        let stream = TcpStream::connect(target).await?;
        let _ = stream.set_nodelay(true);
        Ok(Box::new(stream))
    }
}

/// Where a client's connection goes: an address as [`connect_raw`] takes it, or one socket
/// address that a name resolved to. A resolved address over TLS keeps the name, because the
/// certificate is for the name, not for the IP.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum DialTarget {
    Address(String),
    Resolved {
        addr: SocketAddr,
        tls_server_name: Option<String>,
    },
}

impl fmt::Display for DialTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DialTarget::Address(address) => f.write_str(address),
            DialTarget::Resolved {
                addr,
                tls_server_name: None,
            } => write!(f, "{addr}"),
            DialTarget::Resolved {
                addr,
                tls_server_name: Some(name),
            } => write!(f, "{addr} (TLS as {name})"),
        }
    }
}

/// Opens the raw connection to `target`.
pub async fn connect_target(target: &DialTarget) -> io::Result<BoxIo> {
    match target {
        DialTarget::Address(address) => connect_raw(address).await,
        DialTarget::Resolved {
            addr,
            tls_server_name,
        } => {
            let tcp = TcpStream::connect(addr).await?;
            let _ = tcp.set_nodelay(true);
            match tls_server_name {
                None => Ok(Box::new(tcp)),
                Some(name) => {
                    let name =
                        rustls::pki_types::ServerName::try_from(name.clone()).map_err(|e| {
                            io::Error::new(io::ErrorKind::InvalidInput, format!("server name: {e}"))
                        })?;
                    Ok(Box::new(tls::connector()?.connect(name, tcp).await?))
                }
            }
        }
    }
}
