//! The yamux settings both ends of a backchannel use, from the `[yamux]` configuration.

use tokio::io::BufWriter;
use tokio_yamux::{Config as YamuxConfig, StreamHandle};

/// How much an HTTP/2 connection over a yamux stream gathers before it hands a frame to the
/// session (see [`GrpcStream`]).
const GRPC_STREAM_WRITE_BUFFER: usize = 64 * 1024;

/// The yamux stream that carries a session's HTTP/2 connection, with its writes gathered.
///
/// h2 writes every frame as a 9-byte header and then its payload; on a socket the two go out
/// in one vectored write, but a yamux stream has no vectored write, so each would become a
/// yamux frame of its own, with its own write to the socket: a 131 MB push cost 18,700
/// writes of 7 KB on average. The buffer gathers what h2 writes between two flushes (h2
/// flushes after each batch of frames) into one yamux frame of up to 64 KiB.
pub type GrpcStream = BufWriter<StreamHandle>;

/// Wraps the stream that carries a session's HTTP/2 connection (see [`GrpcStream`]).
pub fn grpc_stream(stream: StreamHandle) -> GrpcStream {
    BufWriter::with_capacity(GRPC_STREAM_WRITE_BUFFER, stream)
}

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

    /// Counts the writes a session makes to its connection (a yamux session writes each
    /// frame with a write of its own).
    struct CountingWrites<T> {
        inner: T,
        writes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    }

    impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for CountingWrites<T> {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for CountingWrites<T> {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let written = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
            if written.is_ready() {
                self.writes
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            written
        }
        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// An HTTP/2 frame's header and payload, written one after the other as h2 writes them,
    /// leave the session as one yamux frame (one write to the connection), not two.
    #[tokio::test]
    async fn a_frame_header_and_its_payload_leave_as_one_yamux_frame() {
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        let writes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = CountingWrites {
            inner: client_io,
            writes: writes.clone(),
        };
        let mut client = Session::new_client(counted, yamux_config(0, 256));
        let mut control = client.control();
        tokio::spawn(async move { while let Some(Ok(_)) = client.next().await {} });
        let mut server = Session::new_server(server_io, yamux_config(0, 256));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut tx = Some(tx);
        tokio::spawn(async move {
            while let Some(Ok(stream)) = server.next().await {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(stream);
                }
            }
        });
        let mut stream = grpc_stream(control.open_stream().await.unwrap());
        stream.write_all(b"hello").await.unwrap();
        stream.flush().await.unwrap();
        let mut accepted = rx.await.unwrap();
        let mut hello = [0u8; 5];
        accepted.read_exact(&mut hello).await.unwrap();
        let before = writes.load(std::sync::atomic::Ordering::SeqCst);

        stream.write_all(&[1u8; 9]).await.unwrap();
        stream.write_all(&[2u8; 16 * 1024]).await.unwrap();
        stream.flush().await.unwrap();
        let mut received = vec![0u8; 9 + 16 * 1024];
        tokio::time::timeout(Duration::from_secs(10), accepted.read_exact(&mut received))
            .await
            .expect("the frame did not arrive")
            .unwrap();
        assert_eq!(&received[..9], &[1u8; 9]);
        assert!(received[9..].iter().all(|b| *b == 2));
        assert_eq!(
            writes.load(std::sync::atomic::Ordering::SeqCst) - before,
            1,
            "header and payload went out as separate frames"
        );
    }
}
