//! The router's listeners: TCP, TLS and a Unix socket for gRPC, and the Prometheus HTTP
//! listener, each only when configured; inherited from a predecessor (SIGHUP hand-over) when
//! it passed one for the same configured address, bound otherwise.

use anyhow::Context;
use tokio::net::{TcpListener, UnixListener};

use super::handover::{InheritedListeners, ListenerId, Passable};
use crate::config::Config;
use crate::wire::backchannel::Listener;

/// Binds (or inherits) the configured gRPC listeners, logging each address; each with what
/// a later hand-over passes on.
pub(super) async fn bind(
    config: &Config,
    inherited: &mut InheritedListeners,
) -> anyhow::Result<Vec<(Listener, Passable)>> {
    let mut listeners = Vec::new();
    if !config.listen_addr.is_empty() {
        let addr = config.listen_addr.trim_start_matches("tcp://");
        let id = ListenerId::Tcp(addr.to_string());
        let (listener, passable) = tcp(inherited, id, addr, "tcp", "praefect listening").await?;
        listeners.push((Listener::Tcp(listener), passable));
    }
    if !config.tls_listen_addr.is_empty() {
        let tls = &config.tls;
        let key = if tls.key.is_empty() {
            crate::wire::tls::KeySource::File(std::path::Path::new(&tls.key_path))
        } else {
            crate::wire::tls::KeySource::Pem(&tls.key)
        };
        let acceptor = crate::wire::tls::acceptor(
            std::path::Path::new(&tls.certificate_path),
            key,
            tls.min_version == "TLS 1.3",
        )
        .context("loading the TLS certificate")?;
        let addr = config.tls_listen_addr.trim_start_matches("tls://");
        let id = ListenerId::Tls(addr.to_string());
        let (listener, passable) = tcp(inherited, id, addr, "tls", "praefect listening").await?;
        listeners.push((Listener::Tls(listener, acceptor), passable));
    }
    if !config.socket_path.is_empty() {
        let path = config.socket_path.trim_start_matches("unix://");
        let id = ListenerId::Unix(path.to_string());
        let (listener, was_inherited) = match inherited.take_unix(&id) {
            Some(listener) => {
                let listener = listener
                    .set_nonblocking(true)
                    .and_then(|()| UnixListener::from_std(listener))
                    .with_context(|| format!("serving the inherited socket {path}"))?;
                (listener, true)
            }
            None => {
                // A socket file left by a router that is gone would make the bind fail. Only
                // on a bind: an inherited socket's file is the one clients connect to.
                let _ = std::fs::remove_file(path);
                let listener =
                    UnixListener::bind(path).with_context(|| format!("listening on {path}"))?;
                (listener, false)
            }
        };
        tracing::info!(address = %path, scheme = "unix", inherited = was_inherited, "praefect listening");
        let passable = Passable::of(id, &listener).context("keeping the unix socket")?;
        listeners.push((Listener::Unix(listener), passable));
    }
    Ok(listeners)
}

/// The TCP listener configured as `id` on `addr`: the inherited one or a new one. Logs
/// `message` with its bound address and `scheme`.
pub(super) async fn tcp(
    inherited: &mut InheritedListeners,
    id: ListenerId,
    addr: &str,
    scheme: &'static str,
    message: &'static str,
) -> anyhow::Result<(TcpListener, Passable)> {
    let (listener, was_inherited) = match inherited.take_tcp(&id) {
        Some(listener) => {
            let listener = listener
                .set_nonblocking(true)
                .and_then(|()| TcpListener::from_std(listener))
                .with_context(|| format!("serving the inherited listener on {addr}"))?;
            (listener, true)
        }
        None => (
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("listening on {addr}"))?,
            false,
        ),
    };
    let address = listener.local_addr()?;
    tracing::info!(%address, scheme, inherited = was_inherited, "{message}");
    let passable = Passable::of(id, &listener).context("keeping the listening socket")?;
    Ok((listener, passable))
}
