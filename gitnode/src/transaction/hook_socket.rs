//! The Unix socket `gitnode-hook` votes through: one request line per connection, one answer
//! line back (see [`super::protocol`]). Apart from the gRPC listeners because only local
//! hooks speak to it, with a protocol small enough for a std-only hook.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;

use super::protocol::{Answer, HookRequest, MAX_REQUEST_LINE};
use super::Transactions;

/// A hook writes its line at once; one that does not is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds `socket` and answers hooks until the task is aborted or the node's transactions are
/// gone (the task holds them weakly, so it does not keep them alive).
pub(super) fn serve(socket: &Path, transactions: &Transactions) -> Result<JoinHandle<()>, String> {
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket)
        .map_err(|e| format!("binding the hook socket {}: {e}", socket.display()))?;
    let weak = Arc::downgrade(&transactions.inner);
    Ok(tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(err) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %err, "accepting on the hook socket");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Some(inner) = weak.upgrade() else {
                return;
            };
            tokio::spawn(answer(stream, Transactions { inner }));
        }
    }))
}

/// Reads one request, votes, answers.
async fn answer(stream: UnixStream, transactions: Transactions) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read.take(MAX_REQUEST_LINE as u64));
    let mut line = String::new();
    let answer = match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await {
        Err(_) => Answer::Error("no request within 10 seconds".into()),
        Ok(Err(err)) => Answer::Error(format!("reading the request: {err}")),
        Ok(Ok(_)) => match HookRequest::parse(&line) {
            Ok(request) => {
                transactions
                    .hook_vote(&request.token, request.phase, request.hash)
                    .await
            }
            Err(err) => Answer::Error(err.to_string()),
        },
    };
    if let Err(err) = write.write_all(answer.to_line().as_bytes()).await {
        tracing::debug!(error = %err, "answering the hook");
    }
}
