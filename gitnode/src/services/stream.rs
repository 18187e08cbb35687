//! Plumbing between git processes and gRPC streams, with bounded buffers so a slow client
//! slows git down instead of filling memory.

use std::pin::Pin;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

/// Chunk size for data sent in gRPC messages.
pub const CHUNK: usize = 32 * 1024;

pub type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// A bounded channel whose receiving end is a response stream.
pub fn channel<T: Send + 'static>() -> (mpsc::Sender<Result<T, Status>>, ResponseStream<T>) {
    let (tx, rx) = mpsc::channel(16);
    (tx, Box::pin(ReceiverStream::new(rx)))
}

/// Reads `reader` to the end, sending each chunk wrapped by `wrap`. Returns false if the
/// receiver went away.
pub async fn forward<R, T, F>(mut reader: R, tx: &mpsc::Sender<Result<T, Status>>, wrap: F) -> bool
where
    R: AsyncRead + Unpin,
    F: Fn(Vec<u8>) -> T,
{
    let mut buf = vec![0u8; CHUNK];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) => return true,
            Ok(n) => {
                if tx.send(Ok(wrap(buf[..n].to_vec()))).await.is_err() {
                    return false;
                }
            }
            Err(err) => {
                let _ = tx
                    .send(Err(Status::internal(format!("reading git output: {err}"))))
                    .await;
                return false;
            }
        }
    }
}
