//! Backchannel clients as tonic `Channel`s: each (re)connection of the channel is a new
//! session, its first stream carrying the channel's HTTP/2. For callers that want tonic's
//! channel (gitnode's clients, the CLI); the router's node connections manage their sessions
//! themselves (`praefect::nodes`).

use std::io;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio_yamux::Config as YamuxConfig;
use tonic::transport::{Channel, Endpoint};

use super::client::{start_client_session, ClientHandler};
use super::connect::connect_raw;
use super::yamux::GrpcStream;

/// Dials `address` with the backchannel handshake. Each (re)connection of the returned
/// channel is a new yamux session whose first stream carries our gRPC calls; streams the
/// server opens are handed to `handler`. The channel connects lazily, so a server that is
/// down now does not fail the caller.
pub fn dial_lazy(address: &str, yamux: YamuxConfig, handler: ClientHandler) -> io::Result<Channel> {
    let (endpoint, connector) =
        endpoint_and_connector(address, yamux, handler, Duration::from_secs(10))?;
    Ok(endpoint.connect_with_connector_lazy(connector))
}

/// Like [`dial_lazy`], but connects now, within `timeout`.
pub async fn dial(
    address: &str,
    yamux: YamuxConfig,
    handler: ClientHandler,
    timeout: Duration,
) -> io::Result<Channel> {
    let (endpoint, connector) = endpoint_and_connector(address, yamux, handler, timeout)?;
    endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|err| io::Error::other(error_chain(&err)))
}

/// An error with all its causes, "a: b: c" (tonic's transport errors say little on their own).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        // A tonic Status displays as "code: '...', message: \"...\"": its message says it all.
        let cause_text = match cause.downcast_ref::<tonic::Status>() {
            Some(status) => status.message().to_string(),
            None => cause.to_string(),
        };
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

type Connector = tower::util::BoxCloneSyncService<http::Uri, TokioIo<GrpcStream>, io::Error>;

fn endpoint_and_connector(
    address: &str,
    yamux: YamuxConfig,
    handler: ClientHandler,
    timeout: Duration,
) -> io::Result<(Endpoint, Connector)> {
    let endpoint = Endpoint::from_shared("http://backchannel.invalid".to_string())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?
        .connect_timeout(timeout)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    let address = address.to_string();
    let connector = tower::service_fn(move |_uri: http::Uri| {
        let address = address.clone();
        let handler = handler.clone();
        async move {
            let stream = open_session(&address, yamux, handler).await?;
            Ok::<_, io::Error>(TokioIo::new(stream))
        }
    });
    Ok((endpoint, tower::util::BoxCloneSyncService::new(connector)))
}

async fn open_session(
    address: &str,
    yamux: YamuxConfig,
    handler: ClientHandler,
) -> io::Result<GrpcStream> {
    let io = connect_raw(address).await?;
    Ok(start_client_session(io, yamux, handler).await?.stream)
}
