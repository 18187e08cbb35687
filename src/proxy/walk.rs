//! InternalGitaly/WalkRepos answered by the router: the repositories of a virtual storage as
//! the database knows them, by their virtual relative paths (a node would list replica
//! paths, which mean nothing to the caller). Streamed a page at a time, so memory stays
//! bounded however many repositories there are.

use bytes::{Bytes, BytesMut};
use http_body::Frame;
use prost::Message;

use super::error::ProxyError;
use super::finalize::status_trailers;
use super::handler::Proxy;
use super::{frame, intercept};
use crate::datastore::Datastore;
use crate::wire::proto::{WalkReposRequest, WalkReposResponse};

pub const WALK_REPOS: &str = "/gitaly.InternalGitaly/WalkRepos";

/// Repositories per database page (and per HTTP/2 data frame batch).
const PAGE: i64 = 1000;

enum Walk {
    After(i64),
    Done,
}

/// The next page as one buffer of gRPC messages; None at the end.
async fn next_page(
    store: &Datastore,
    virtual_storage: &str,
    after: i64,
) -> Result<Option<(Bytes, i64)>, ProxyError> {
    let page = store
        .relative_paths_page(virtual_storage, after, PAGE)
        .await?;
    let Some(last) = page.last().map(|(id, _)| *id) else {
        return Ok(None);
    };
    let mut buffer = BytesMut::new();
    for (_, relative_path) in page {
        let message = WalkReposResponse {
            relative_path,
            modification_time: None,
        };
        buffer.extend_from_slice(&frame::encode(&message.encode_to_vec()));
    }
    Ok(Some((buffer.freeze(), last)))
}

impl Proxy {
    pub(super) async fn walk_repos(
        &self,
        message: &Bytes,
    ) -> Result<http::Response<tonic::body::Body>, ProxyError> {
        let request: WalkReposRequest = intercept::decode(message)?;
        self.check_virtual_storage(&request.storage_name)?;
        let store = self.cache.store().clone();
        let virtual_storage = request.storage_name;
        let frames = futures::stream::unfold(Walk::After(0), move |state| {
            let store = store.clone();
            let virtual_storage = virtual_storage.clone();
            async move {
                let Walk::After(after) = state else {
                    return None;
                };
                let item = match next_page(&store, &virtual_storage, after).await {
                    Ok(Some((data, last))) => (Frame::data(data), Walk::After(last)),
                    Ok(None) => (
                        Frame::trailers(status_trailers(tonic::Status::ok(""))),
                        Walk::Done,
                    ),
                    Err(err) => {
                        tracing::error!(error = %err, "walking repositories failed");
                        (
                            Frame::trailers(status_trailers(err.to_status())),
                            Walk::Done,
                        )
                    }
                };
                Some((Ok::<_, tonic::Status>(item.0), item.1))
            }
        });
        let mut response = http::Response::new(tonic::body::Body::new(
            http_body_util::StreamBody::new(frames),
        ));
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        Ok(response)
    }
}
