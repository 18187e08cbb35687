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
use crate::transactions::outcome::CallStatus;

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

/// How the rest of `body` ends: the status its trailers report, or a failure if it breaks
/// off or ends without trailers.
pub async fn ends_with(body: &mut tonic::body::Body) -> CallStatus {
    use http_body_util::BodyExt;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(trailers) = frame.trailers_ref() {
                    return call_status(trailers);
                }
            }
            Err(status) => return broken(status.to_string()),
        }
    }
    broken("the answer ended without trailers".to_string())
}

/// The status of an answer that broke off.
pub fn broken(message: String) -> CallStatus {
    CallStatus {
        code: tonic::Code::Unavailable as i32,
        message,
    }
}

/// The status trailers (or trailers-only headers) report. Messages are compared as the node
/// sent them (percent-encoded), which is enough to tell whether two nodes answered alike.
pub fn call_status(headers: &http::HeaderMap) -> CallStatus {
    let code = headers
        .get(crate::wire::header_names::GRPC_STATUS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(tonic::Code::Unknown as i32);
    let message = headers
        .get(crate::wire::header_names::GRPC_MESSAGE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    CallStatus { code, message }
}

/// Hands `response` to the client once `finish` has run with how the call ended: at once for
/// a trailers-only answer, else when the trailers arrive (see [`Finalizing`]). `finish` runs
/// detached from the client; if it fails, the client gets its error instead of the node's
/// trailers.
pub async fn after_call<F, Fut>(
    response: http::Response<tonic::body::Body>,
    finish: F,
) -> http::Response<tonic::body::Body>
where
    F: FnOnce(CallStatus) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), Status>> + Send + 'static,
{
    let (parts, body) = response.into_parts();
    if parts
        .headers
        .contains_key(crate::wire::header_names::GRPC_STATUS)
    {
        // A trailers-only answer: the outcome is known now.
        let status = call_status(&parts.headers);
        return match detached(finish(status)).await {
            Ok(()) => http::Response::from_parts(parts, body),
            Err(status) => status.into_http(),
        };
    }
    let body = Finalizing::new(body, finish);
    http::Response::from_parts(parts, super::body::boxed(body))
}

/// The bookkeeping of one finished call.
type Finishing = Pin<Box<dyn Future<Output = Result<(), Status>> + Send>>;
type Finalizer = Box<dyn FnOnce(CallStatus) -> Finishing + Send>;

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
        .get(crate::wire::header_names::GRPC_STATUS)
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
        F: FnOnce(CallStatus) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), Status>> + Send + 'static,
    {
        Finalizing {
            inner,
            finalizer: Some(Box::new(move |status| {
                Box::pin(detached(finalizer(status)))
            })),
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
            let status = tokio::time::timeout(FINALIZE_TIMEOUT, ends_with(&mut inner))
                .await
                .unwrap_or_else(|_| broken("the node did not finish its answer".to_string()));
            let _ = finalizer(status).await;
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
                            let future = finalizer(call_status(&trailers));
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
            let mut body = Finalizing::new(inner, move |status| async move {
                let _ = seen_tx.send(status.is_ok());
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
        let mut body = Finalizing::new(inner, move |status| async move {
            gate.notified().await;
            let _ = done_tx.send(status.is_ok());
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
        assert_eq!(
            trailers
                .get(crate::wire::header_names::GRPC_STATUS)
                .unwrap(),
            "14"
        );
    }
}
