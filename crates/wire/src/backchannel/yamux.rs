//! The yamux settings both ends of a backchannel use, from the `[yamux]` configuration.

use tokio_yamux::Config as YamuxConfig;

/// yamux settings from `[yamux]`; keepalive is off, as in Gitaly (gRPC has its own).
pub fn yamux_config(window: u32, accept_backlog: usize) -> YamuxConfig {
    YamuxConfig {
        enable_keepalive: false,
        max_stream_window_size: window.max(tokio_yamux::config::INITIAL_STREAM_WINDOW),
        accept_backlog: accept_backlog.max(1),
        ..YamuxConfig::default()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_yamux::Session;

    use super::*;

    /// Bulk data on a stream the server opened, with the other direction idle but read.
    #[tokio::test]
    async fn server_opened_streams_carry_more_than_one_window() {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let mut server = Session::new_server(server_io, yamux_config(0, 256));
        let mut control = server.control();
        tokio::spawn(async move { while let Some(Ok(_)) = server.next().await {} });
        let mut client = Session::new_client(client_io, yamux_config(0, 256));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut tx = Some(tx);
        tokio::spawn(async move {
            while let Some(Ok(stream)) = client.next().await {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(stream);
                }
            }
        });
        let stream = control.open_stream().await.unwrap();
        let (mut server_read, mut server_write) = tokio::io::split(stream);
        let idle_reader = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let _ = server_read.read(&mut buf).await;
        });
        let writer = tokio::spawn(async move {
            let data = vec![7u8; 3_000_000];
            server_write.write_all(&data).await.unwrap();
            server_write.shutdown().await.unwrap();
        });
        let mut client_stream = rx.await.unwrap();
        let mut received = Vec::new();
        tokio::time::timeout(
            Duration::from_secs(20),
            client_stream.read_to_end(&mut received),
        )
        .await
        .expect("transfer stalled")
        .unwrap();
        assert_eq!(received.len(), 3_000_000);
        writer.await.unwrap();
        idle_reader.abort();
    }
}
