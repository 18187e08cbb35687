//! How subcommands that talk to the router reach it: the address of its first configured
//! listener, dialled with the `[auth]` token.

use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::error::CliError;
use crate::config::Config;
use crate::wire::auth::TokenInterceptor;
use crate::wire::backchannel::{self, yamux_config, ClientHandler};

/// How long subcommands wait for the connection to the router.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// A channel to the router, signing calls with its `[auth]` token.
pub type PraefectChannel = InterceptedService<Channel, TokenInterceptor>;

/// The address subcommands dial to reach the router of `config`: its first configured
/// listener (socket_path, then listen_addr, then tls_listen_addr). A listen address without a
/// host (":2305") means this machine.
pub fn praefect_address(config: &Config) -> Option<String> {
    if !config.socket_path.is_empty() {
        let path = config
            .socket_path
            .strip_prefix("unix://")
            .or_else(|| config.socket_path.strip_prefix("unix:"))
            .unwrap_or(&config.socket_path);
        return Some(format!("unix:{path}"));
    }
    let local = |addr: &str| {
        if addr.starts_with(':') {
            format!("127.0.0.1{addr}")
        } else {
            addr.to_string()
        }
    };
    if !config.listen_addr.is_empty() {
        let addr = config
            .listen_addr
            .strip_prefix("tcp://")
            .unwrap_or(&config.listen_addr);
        return Some(format!("tcp://{}", local(addr)));
    }
    if !config.tls_listen_addr.is_empty() {
        let addr = config
            .tls_listen_addr
            .strip_prefix("tls://")
            .unwrap_or(&config.tls_listen_addr);
        return Some(format!("tls://{}", local(addr)));
    }
    None
}

/// Connects to the router of `config` within [`DIAL_TIMEOUT`].
pub async fn dial_praefect(config: &Config) -> Result<PraefectChannel, CliError> {
    let address = praefect_address(config).ok_or_else(|| {
        CliError::Dial("no listen address configured to reach praefect".to_string())
    })?;
    let yamux = yamux_config(
        u32::try_from(config.yamux.maximum_stream_window_size_bytes).unwrap_or(u32::MAX),
        usize::try_from(config.yamux.accept_backlog).unwrap_or(256),
    );
    let channel = backchannel::dial(&address, yamux, ClientHandler::default(), DIAL_TIMEOUT)
        .await
        .map_err(|err| CliError::Dial(format!("dialing praefect at {address}: {err}")))?;
    Ok(InterceptedService::new(
        channel,
        TokenInterceptor::new(&config.auth.token),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_configured_listener_is_dialed() {
        let config = |socket: &str, tcp: &str, tls: &str| Config {
            socket_path: socket.into(),
            listen_addr: tcp.into(),
            tls_listen_addr: tls.into(),
            ..Config::default()
        };
        assert_eq!(
            praefect_address(&config("/run/p.sock", "0.0.0.0:2305", "")).as_deref(),
            Some("unix:/run/p.sock")
        );
        assert_eq!(
            praefect_address(&config("unix:///run/p.sock", "", "")).as_deref(),
            Some("unix:/run/p.sock")
        );
        assert_eq!(
            praefect_address(&config("", "127.0.0.1:2305", "h:3305")).as_deref(),
            Some("tcp://127.0.0.1:2305")
        );
        assert_eq!(
            praefect_address(&config("", "tcp://:2305", "")).as_deref(),
            Some("tcp://127.0.0.1:2305")
        );
        assert_eq!(
            praefect_address(&config("", "", "praefect.example.com:3305")).as_deref(),
            Some("tls://praefect.example.com:3305")
        );
        assert_eq!(praefect_address(&config("", "", "")), None);
    }
}
