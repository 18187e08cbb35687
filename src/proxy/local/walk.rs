//! InternalGitaly/WalkRepos answered by the router: the repositories of a virtual storage as
//! the database knows them, by their virtual relative paths (a node would list replica
//! paths, which mean nothing to the caller). Streamed a page at a time, so memory stays
//! bounded however many repositories there are.

use bytes::{Bytes, BytesMut};
use http_body::Frame;
use prost::Message;

use super::reply::{decode, grpc_response};
use crate::datastore::Datastore;
use crate::proxy::error::ProxyError;
use crate::proxy::finalize::status_trailers;
use crate::proxy::frame;
use crate::proxy::state::Proxy;
use crate::wire::proto::{WalkReposRequest, WalkReposResponse};

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

pub async fn walk_repos(
    proxy: &Proxy,
    message: &Bytes,
) -> Result<http::Response<tonic::body::Body>, ProxyError> {
    let request: WalkReposRequest = decode(message)?;
    proxy.router.virtual_storage(&request.storage_name)?;
    let store = proxy.store().clone();
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
                Err(err) => (Frame::trailers(status_trailers(err.report())), Walk::Done),
            };
            Some((Ok::<_, tonic::Status>(item.0), item.1))
        }
    });
    Ok(grpc_response(tonic::body::Body::new(
        http_body_util::StreamBody::new(frames),
    )))
}
