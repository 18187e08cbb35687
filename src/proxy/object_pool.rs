//! `ObjectPoolService/GetObjectPool` is routed like a read, but its answer names the pool as
//! the node knows it: a replica path on a physical storage. A pool the router created
//! (`@cluster/pools/xx/yy/<id>`) is given back to the client by its virtual storage and
//! relative path, which is what the client created it as; any other answer passes unchanged.

use bytes::Bytes;
use http_body::Frame;
use http_body_util::BodyExt;
use prost::Message;

use super::error::ProxyError;
use super::frame;
use super::state::Proxy;
use crate::routing::pool_repository_id;
use crate::wire::proto::GetObjectPoolResponse;

pub const GET_OBJECT_POOL: &str = "/gitaly.ObjectPoolService/GetObjectPool";

type Response = http::Response<tonic::body::Body>;

/// The node's answer with the pool's path translated back for the client.
pub async fn translate(proxy: &Proxy, response: Response) -> Result<Response, ProxyError> {
    let (parts, body) = response.into_parts();
    if parts
        .headers
        .contains_key(crate::wire::header_names::GRPC_STATUS)
    {
        return Ok(http::Response::from_parts(parts, body));
    }
    let forward_error = |source: tonic::Status| ProxyError::Forward {
        storage: "object pool answer".into(),
        source: Box::new(source),
    };
    let collected = body.collect().await.map_err(forward_error)?;
    let trailers = collected.trailers().cloned();
    let data = collected.to_bytes();
    let translated = match pool_answer(&data) {
        Some((answer, id)) => proxy
            .store()
            .repository_path(id)
            .await?
            .map(|(virtual_storage, relative_path)| named(answer, virtual_storage, relative_path)),
        None => None,
    };
    let mut frames = vec![Ok::<_, tonic::Status>(Frame::data(
        translated.unwrap_or(data),
    ))];
    if let Some(trailers) = trailers {
        frames.push(Ok(Frame::trailers(trailers)));
    }
    let body = http_body_util::StreamBody::new(futures::stream::iter(frames));
    Ok(http::Response::from_parts(
        parts,
        tonic::body::Body::new(body),
    ))
}

/// The answer and the pool's repository id, if the answer names a pool the router made.
fn pool_answer(data: &Bytes) -> Option<(GetObjectPoolResponse, i64)> {
    let len = u32::from_be_bytes(data.get(1..5)?.try_into().ok()?) as usize;
    if data.first() != Some(&0) || data.len() != 5 + len {
        return None;
    }
    let answer = GetObjectPoolResponse::decode(&data[5..]).ok()?;
    let repo = answer.object_pool.as_ref()?.repository.as_ref()?;
    let id = pool_repository_id(&repo.relative_path)?;
    Some((answer, id))
}

/// The answer, framed, with the pool named by its virtual storage and relative path.
fn named(
    mut answer: GetObjectPoolResponse,
    virtual_storage: String,
    relative_path: String,
) -> Bytes {
    if let Some(repo) = answer
        .object_pool
        .as_mut()
        .and_then(|pool| pool.repository.as_mut())
    {
        repo.storage_name = virtual_storage;
        repo.relative_path = relative_path;
    }
    frame::encode(&answer.encode_to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::{pool_replica_path, replica_path};
    use crate::wire::proto::{ObjectPool, Repository};

    fn answer(storage: &str, path: &str) -> Bytes {
        let answer = GetObjectPoolResponse {
            object_pool: Some(ObjectPool {
                repository: Some(Repository {
                    storage_name: storage.into(),
                    relative_path: path.into(),
                    gl_repository: "pool-1".into(),
                    ..Default::default()
                }),
            }),
        };
        frame::encode(&answer.encode_to_vec())
    }

    #[test]
    fn pools_the_router_made_are_named_as_the_client_knows_them() {
        let (found, id) = pool_answer(&answer("gitaly-2", &pool_replica_path(7))).unwrap();
        assert_eq!(id, 7);
        let named = named(found, "default".into(), "@pools/ab/cd/abcd.git".into());
        let (decoded, _) = (GetObjectPoolResponse::decode(&named[5..]).unwrap(), ());
        let repo = decoded.object_pool.unwrap().repository.unwrap();
        assert_eq!(
            (
                repo.storage_name.as_str(),
                repo.relative_path.as_str(),
                repo.gl_repository.as_str()
            ),
            ("default", "@pools/ab/cd/abcd.git", "pool-1")
        );
    }

    #[test]
    fn other_answers_pass_unchanged() {
        assert!(pool_answer(&answer("gitaly-2", &replica_path(7))).is_none());
        assert!(pool_answer(&answer("gitaly-2", "@pools/ab/cd/abcd.git")).is_none());
        assert!(pool_answer(&frame::encode(
            &GetObjectPoolResponse::default().encode_to_vec()
        ))
        .is_none());
        assert!(pool_answer(&Bytes::from_static(b"\x00\x00")).is_none());
        let mut two = answer("g", &pool_replica_path(7)).to_vec();
        two.extend_from_slice(&answer("g", &pool_replica_path(8)));
        assert!(pool_answer(&Bytes::from(two)).is_none(), "one message only");
    }
}
