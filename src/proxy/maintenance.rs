//! Maintenance calls (OptimizeRepository, PruneUnreachableObjects) change no data a client
//! can see, so they go to every replica that exists, is assigned and is locally healthy, not
//! just the primary; no generation changes. A node's failure does not cancel the others; once
//! all answered, the first failure in route order is the answer, else the first node's.

use bytes::Bytes;
use http_body::Frame;
use http_body_util::BodyExt;

use super::error::ProxyError;
use super::finalize::is_ok;
use super::handler::{Proxy, Route};
use super::registry::MethodInfo;
use super::rewrite;

/// One node's complete answer to a unary call.
struct Buffered {
    parts: http::response::Parts,
    data: Bytes,
    trailers: Option<http::HeaderMap>,
}

impl Buffered {
    fn succeeded(&self) -> bool {
        is_ok(&self.parts.headers) || self.trailers.as_ref().is_some_and(is_ok)
    }

    fn into_response(self) -> http::Response<tonic::body::Body> {
        let mut frames = Vec::new();
        if !self.data.is_empty() {
            frames.push(Ok::<_, tonic::Status>(Frame::data(self.data)));
        }
        if let Some(trailers) = self.trailers {
            frames.push(Ok(Frame::trailers(trailers)));
        }
        let body = http_body_util::StreamBody::new(futures::stream::iter(frames));
        http::Response::from_parts(self.parts, tonic::body::Body::new(body))
    }
}

impl Proxy {
    /// The replicas a maintenance call goes to, each with its rewritten first message.
    pub(super) async fn route_maintenance(
        &self,
        method: &MethodInfo,
        message: &[u8],
    ) -> Result<Vec<Route>, ProxyError> {
        let target = method
            .target_repository
            .as_deref()
            .ok_or(ProxyError::RepositoryNotSet)?;
        let repo = rewrite::read_repository(message, target)?;
        self.check_repository(&repo.storage_name, &repo.relative_path)?;
        let healthy = self.healthy(&repo.storage_name)?;
        let replicas = self
            .cache
            .store()
            .recorded_replicas(&repo.storage_name, &repo.relative_path)
            .await?
            .ok_or(ProxyError::RepositoryNotFound)?;
        let assigned = self
            .assigned_storages(&repo.storage_name, replicas.repository_id)
            .await?;
        let routes = replicas
            .storages
            .into_iter()
            .filter(|s| healthy.contains(s) && assigned.contains(s))
            .map(|storage| {
                let message =
                    rewrite::rewrite_repository(message, target, &storage, &replicas.replica_path)?;
                Ok(Route {
                    virtual_storage: repo.storage_name.clone(),
                    storage,
                    message,
                    repository_scoped: true,
                })
            })
            .collect::<Result<Vec<_>, ProxyError>>()?;
        if routes.is_empty() {
            return Err(ProxyError::NoSuitableNode);
        }
        Ok(routes)
    }

    /// Sends a unary call to every route at once and answers once all have answered.
    pub(super) async fn fan_out(
        &self,
        path: &str,
        headers: &http::HeaderMap,
        routes: Vec<Route>,
    ) -> Result<http::Response<tonic::body::Body>, ProxyError> {
        let calls = routes.into_iter().map(|route| async move {
            let body = tonic::body::Body::new(http_body_util::Full::new(super::frame::encode(
                &route.message,
            )));
            let response = self.send(path, headers.clone(), &route, body).await?;
            let (parts, body) = response.into_parts();
            let collected = body.collect().await.map_err(|status| {
                ProxyError::NodeUnavailable(format!(
                    "reading the answer of {}: {}",
                    route.storage,
                    status.message()
                ))
            })?;
            let trailers = collected.trailers().cloned();
            Ok::<_, ProxyError>(Buffered {
                parts,
                data: collected.to_bytes(),
                trailers,
            })
        });
        let answers = futures::future::join_all(calls).await;
        // The first failure in route order, else the first node's answer.
        let chosen = answers
            .iter()
            .position(|answer| answer.as_ref().map_or(true, |b| !b.succeeded()))
            .unwrap_or(0);
        answers
            .into_iter()
            .nth(chosen)
            .ok_or(ProxyError::NoSuitableNode)?
            .map(Buffered::into_response)
    }
}
