//! Running work after a forwarded call finished, before the client learns the outcome: the
//! response body is passed through untouched until the node's trailers arrive; then the
//! finalizer runs (with whether the call succeeded), and only then are the trailers sent,
//! replaced by an error status if the finalizer failed. So a write is reported successful
//! only once its bookkeeping (generations, replication jobs) is persisted.
//!
//! The bookkeeping does not depend on the client staying: it runs as a task of its own,
//! bounded by [`FINALIZE_TIMEOUT`] as in Praefect, and a client that resets the stream (or
//! drops the connection) before the node's trailers only stops the forwarding: the node's
//! answer is still read to its end in the background and the finalizer runs with it. A write
//! the node applied is recorded however the client left.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tonic::Status;

use crate::datastore::{Datastore, DatastoreError, NewRepository, UpdateJob};
use crate::routing::WriteRecord;

/// Records a successful write: the new generation of the replicas that applied it and an
/// `update` job from the primary for every other assigned one; for a creation, the
/// repository itself first.
pub async fn record(
    store: &Datastore,
    record: WriteRecord,
    correlation_id: &str,
) -> Result<(), DatastoreError> {
    let jobs: Vec<UpdateJob> = record
        .outdated
        .iter()
        .map(|target| UpdateJob {
            repository_id: record.repository_id,
            virtual_storage: record.repository.storage_name.clone(),
            relative_path: record.repository.relative_path.clone(),
            replica_path: record.replica_path.clone(),
            source: record.primary.clone(),
            target: target.clone(),
            correlation_id: correlation_id.to_string(),
        })
        .collect();
    match record.created {
        None => {
            let mut updated = vec![record.primary];
            updated.extend(record.updated_secondaries);
            store
                .record_write(record.repository_id, &updated, &jobs)
                .await
                .map(|_| ())
        }
        Some(creation) => {
            store
                .create_repository(
                    &NewRepository {
                        repository_id: record.repository_id,
                        virtual_storage: record.repository.storage_name,
                        relative_path: record.repository.relative_path,
                        replica_path: record.replica_path,
                        primary: record.primary,
                        updated_secondaries: record.updated_secondaries,
                        outdated_secondaries: record.outdated,
                        store_assignments: creation.store_assignments,
                    },
                    &jobs,
                )
                .await
        }
    }
}

/// How long the bookkeeping of one finished call may take, whatever the client does.
pub const FINALIZE_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `work` as a task of its own, bounded by [`FINALIZE_TIMEOUT`]: dropping the returned
/// future (the client went away) does not cancel it.
pub fn detached<Fut>(work: Fut) -> impl Future<Output = Result<(), Status>> + Send
where
    Fut: Future<Output = Result<(), Status>> + Send + 'static,
{
    let task = tokio::spawn(async move {
        match tokio::time::timeout(FINALIZE_TIMEOUT, work).await {
            Ok(outcome) => outcome,
            Err(_) => {
                tracing::error!(timeout = ?FINALIZE_TIMEOUT, "recording a finished call timed out");
                Err(Status::deadline_exceeded("recording the write timed out"))
            }
        }
    });
    async move {
        task.await
            .unwrap_or_else(|_| Err(Status::internal("recording the write failed")))
    }
}

/// Whether the rest of `body` ends with trailers that report success.
async fn ends_ok(body: &mut tonic::body::Body) -> bool {
    use http_body_util::BodyExt;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(trailers) = frame.trailers_ref() {
                    return is_ok(trailers);
                }
            }
            Err(_) => return false,
        }
    }
    false
}

/// The bookkeeping of one finished call.
type Finishing = Pin<Box<dyn Future<Output = Result<(), Status>> + Send>>;
type Finalizer = Box<dyn FnOnce(bool) -> Finishing + Send>;

/// Trailers carrying `status`.
pub fn status_trailers(status: Status) -> http::HeaderMap {
    let response: http::Response<()> = status.into_http();
    let mut headers = response.into_parts().0.headers;
    headers.remove(http::header::CONTENT_TYPE);
    headers
}

/// Whether trailers (or trailers-only headers) report success.
pub fn is_ok(headers: &http::HeaderMap) -> bool {
    headers
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == b"0")
}

pub struct Finalizing {
    inner: tonic::body::Body,
    finalizer: Option<Finalizer>,
    pending: Option<(Finishing, http::HeaderMap)>,
}

impl Finalizing {
    pub fn new<F, Fut>(inner: tonic::body::Body, finalizer: F) -> Self
    where
        F: FnOnce(bool) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), Status>> + Send + 'static,
    {
        Finalizing {
            inner,
            finalizer: Some(Box::new(move |ok| Box::pin(detached(finalizer(ok))))),
            pending: None,
        }
    }
}

impl Drop for Finalizing {
    /// The client went away before the node's trailers: read the node's answer to its end in
    /// the background and finalize with its outcome.
    fn drop(&mut self) {
        let Some(finalizer) = self.finalizer.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut inner = std::mem::replace(&mut self.inner, tonic::body::Body::empty());
        runtime.spawn(async move {
            let ok = tokio::time::timeout(FINALIZE_TIMEOUT, ends_ok(&mut inner))
                .await
                .unwrap_or(false);
            let _ = finalizer(ok).await;
        });
    }
}

impl Body for Finalizing {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        loop {
            if let Some((future, trailers)) = self.pending.as_mut() {
                let outcome = match future.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(outcome) => outcome,
                };
                let trailers = std::mem::take(trailers);
                self.pending = None;
                let trailers = match outcome {
                    Ok(()) => trailers,
                    Err(status) => status_trailers(status),
                };
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => {
                    let trailers = frame.into_trailers().unwrap_or_default();
                    match self.finalizer.take() {
                        Some(finalizer) => {
                            let future = finalizer(is_ok(&trailers));
                            self.pending = Some((future, trailers));
                        }
                        None => return Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
                    }
                }
                other => return other,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use http_body_util::BodyExt;
    use tokio::sync::{mpsc, oneshot, Notify};

    type Frames = mpsc::Sender<Result<Frame<Bytes>, Status>>;

    /// A node's answer whose frames the test sends.
    fn node_answer() -> (Frames, tonic::body::Body) {
        let (tx, rx) = mpsc::channel(4);
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        (
            tx,
            tonic::body::Body::new(http_body_util::StreamBody::new(stream)),
        )
    }

    fn ok_trailers() -> Frame<Bytes> {
        Frame::trailers(status_trailers(Status::ok("")))
    }

    #[tokio::test]
    async fn a_client_gone_before_the_trailers_still_gets_the_write_recorded() {
        for (trailers, want) in [
            (ok_trailers(), true),
            (
                Frame::trailers(status_trailers(Status::internal("x"))),
                false,
            ),
        ] {
            let (node, inner) = node_answer();
            let (seen_tx, seen_rx) = oneshot::channel();
            let mut body = Finalizing::new(inner, move |ok| async move {
                let _ = seen_tx.send(ok);
                Ok(())
            });
            node.send(Ok(Frame::data(Bytes::from_static(b"answer"))))
                .await
                .unwrap();
            assert!(body.frame().await.unwrap().unwrap().is_data());
            drop(body); // the client reset the stream
            node.send(Ok(trailers)).await.unwrap();
            let seen = tokio::time::timeout(Duration::from_secs(5), seen_rx).await;
            assert_eq!(seen.unwrap().unwrap(), want);
        }
    }

    #[tokio::test]
    async fn a_client_gone_while_recording_does_not_cancel_it() {
        let (node, inner) = node_answer();
        let release = Arc::new(Notify::new());
        let (done_tx, done_rx) = oneshot::channel();
        let gate = release.clone();
        let mut body = Finalizing::new(inner, move |ok| async move {
            gate.notified().await;
            let _ = done_tx.send(ok);
            Ok(())
        });
        node.send(Ok(ok_trailers())).await.unwrap();
        // The trailers arrived; the finalizer is now running and the client waits for it.
        let poll = tokio::time::timeout(Duration::from_millis(100), body.frame()).await;
        assert!(poll.is_err(), "the trailers must wait for the finalizer");
        drop(body);
        release.notify_one();
        let done = tokio::time::timeout(Duration::from_secs(5), done_rx).await;
        assert!(done.unwrap().unwrap());
    }

    #[tokio::test]
    async fn the_client_sees_the_trailers_once_recorded() {
        let (node, inner) = node_answer();
        let mut body = Finalizing::new(inner, |_| async {
            Err(Status::unavailable("database away"))
        });
        node.send(Ok(ok_trailers())).await.unwrap();
        let frame = body.frame().await.unwrap().unwrap();
        let trailers = frame.trailers_ref().unwrap();
        assert_eq!(trailers.get("grpc-status").unwrap(), "14");
    }
}
