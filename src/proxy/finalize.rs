//! Running work after a forwarded call finished, before the client learns the outcome: the
//! response body is passed through untouched until the node's trailers arrive; then the
//! finalizer runs (with whether the call succeeded), and only then are the trailers sent,
//! replaced by an error status if the finalizer failed. So a write is reported successful
//! only once its bookkeeping (generations, replication jobs) is persisted.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

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
                .create_repository(&NewRepository {
                    repository_id: record.repository_id,
                    virtual_storage: record.repository.storage_name,
                    relative_path: record.repository.relative_path,
                    replica_path: record.replica_path,
                    primary: record.primary,
                    updated_secondaries: record.updated_secondaries,
                    outdated_secondaries: record.outdated,
                    store_assignments: creation.store_assignments,
                })
                .await?;
            store.enqueue_updates(&jobs).await
        }
    }
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
            finalizer: Some(Box::new(move |ok| Box::pin(finalizer(ok)))),
            pending: None,
        }
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
