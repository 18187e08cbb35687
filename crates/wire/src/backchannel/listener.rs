//! The sockets a server listens on (TCP, TLS over TCP, Unix) and what accepting on them gives,
//! before any handshake: the TLS handshake runs in the connection's own task, not in the
//! accept loop, so one slow client does not hold up the others.

use std::io;

use tokio::net::{TcpListener, TcpStream, UnixListener};

use super::io::BoxIo;

/// A listening socket. TLS listeners do the handshake per connection, before the backchannel
/// magic is looked for (the backchannel runs inside TLS).
pub enum Listener {
    Tcp(TcpListener),
    Tls(TcpListener, tokio_rustls::TlsAcceptor),
    Unix(UnixListener),
}

/// An accepted connection, before any handshake.
pub(crate) enum Accepted {
    Ready(BoxIo),
    NeedsTls(TcpStream, tokio_rustls::TlsAcceptor),
}

impl Accepted {
    pub(crate) async fn into_io(self) -> io::Result<BoxIo> {
        match self {
            Accepted::Ready(io) => Ok(io),
            Accepted::NeedsTls(tcp, acceptor) => Ok(Box::new(acceptor.accept(tcp).await?)),
        }
    }
}

impl Listener {
    /// The listener's kind as Praefect names it in `gitaly_praefect_connections_total{type}`.
    pub fn scheme(&self) -> &'static str {
        match self {
            Listener::Tcp(_) => "tcp",
            Listener::Tls(..) => "tls",
            Listener::Unix(_) => "unix",
        }
    }

    pub(crate) async fn accept(&self) -> io::Result<(Accepted, String)> {
        match self {
            Listener::Tcp(l) => {
                let (s, addr) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok((Accepted::Ready(Box::new(s)), addr.to_string()))
            }
            Listener::Tls(l, acceptor) => {
                let (s, addr) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok((Accepted::NeedsTls(s, acceptor.clone()), addr.to_string()))
            }
            Listener::Unix(l) => {
                let (s, _) = l.accept().await?;
                Ok((Accepted::Ready(Box::new(s)), "unix".to_string()))
            }
        }
    }
}
