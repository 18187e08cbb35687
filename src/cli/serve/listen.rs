//! The router's gRPC listeners: TCP, TLS and a Unix socket, each only when configured.

use anyhow::Context;
use tokio::net::{TcpListener, UnixListener};

use crate::config::Config;
use crate::wire::backchannel::Listener;

/// Binds the configured listeners, logging each bound address.
pub(super) async fn bind(config: &Config) -> anyhow::Result<Vec<Listener>> {
    let mut listeners = Vec::new();
    if !config.listen_addr.is_empty() {
        let addr = config.listen_addr.trim_start_matches("tcp://");
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        tracing::info!(address = %listener.local_addr()?, scheme = "tcp", "praefect listening");
        listeners.push(Listener::Tcp(listener));
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
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        tracing::info!(address = %listener.local_addr()?, scheme = "tls", "praefect listening");
        listeners.push(Listener::Tls(listener, acceptor));
    }
    if !config.socket_path.is_empty() {
        let path = config.socket_path.trim_start_matches("unix://");
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).with_context(|| format!("listening on {path}"))?;
        tracing::info!(address = %path, scheme = "unix", "praefect listening");
        listeners.push(Listener::Unix(listener));
    }
    Ok(listeners)
}
