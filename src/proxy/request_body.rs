//! The request bodies sent to nodes: the client's stream behind the rewritten first message,
//! to one node ([`single`]) or copied to every node of a transactional write ([`copies`]).
//!
//! Copies: each node gets
//! its own first message (rewritten for its storage), then the same frames as the client sent
//! them. Each node's copy is a bounded queue of [`BUFFERED_FRAMES`] frames and a frame is
//! taken from the client only once every node's queue has room: the slowest node bounds the
//! memory a call holds, not a buffer that grows. A node whose call ended stops receiving; a
//! client whose stream fails fails every node's stream with it.

use bytes::Bytes;
use futures::StreamExt;
use http_body::Frame;
use http_body_util::{BodyStream, StreamBody};
use tokio::sync::mpsc;
use tonic::Status;

use super::frame;

/// Frames queued per node (Praefect buffers 16 too).
pub const BUFFERED_FRAMES: usize = 16;

type FrameSender = mpsc::Sender<Result<Frame<Bytes>, Status>>;

/// One request body per first frame: that frame, then `rest` (what followed the first
/// message in its chunk), then the rest of `client`'s stream, copied in a task of its own.
pub fn copies(
    first_frames: Vec<Bytes>,
    rest: Bytes,
    client: BodyStream<tonic::body::Body>,
) -> Vec<tonic::body::Body> {
    let mut senders = Vec::with_capacity(first_frames.len());
    let bodies = first_frames
        .into_iter()
        .map(|first| {
            let (tx, mut rx) = mpsc::channel(BUFFERED_FRAMES);
            senders.push(tx);
            let copied = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
            let head =
                futures::stream::iter([Ok(Frame::data(first)), Ok(Frame::data(rest.clone()))]);
            super::body::boxed(StreamBody::new(head.chain(copied)))
        })
        .collect();
    tokio::spawn(copy(client, senders));
    bodies
}

/// The request body sent to one node: the rewritten first message, then for a
/// client-streaming call the rest of the client's stream as it comes.
pub fn single(
    client_streaming: bool,
    message: &[u8],
    rest: Bytes,
    body: BodyStream<tonic::body::Body>,
) -> tonic::body::Body {
    if client_streaming {
        let first_frame = frame::encode(message);
        let head = futures::stream::iter([Ok(Frame::data(first_frame)), Ok(Frame::data(rest))]);
        let rest = body.map(|frame| frame.map_err(|e| Status::cancelled(e.to_string())));
        super::body::boxed(StreamBody::new(head.chain(rest)))
    } else {
        // One request message is all a unary or server-streaming call has: end the request
        // with it, rather than waiting for the client's end of stream. (A request still
        // open when the answer is complete gets reset, and a node counts resets.)
        one_message(message)
    }
}

/// The request body of a call with one request message (unary or server-streaming).
pub fn one_message(message: &[u8]) -> tonic::body::Body {
    super::body::infallible(http_body_util::Full::new(frame::encode(message)))
}

/// One request body per first message (the nodes of one write, primary first).
pub fn for_each(
    client_streaming: bool,
    messages: &[&[u8]],
    rest: Bytes,
    body: BodyStream<tonic::body::Body>,
) -> Vec<tonic::body::Body> {
    match messages {
        [message] => vec![single(client_streaming, message, rest, body)],
        _ if client_streaming => copies(
            messages.iter().map(|m| frame::encode(m)).collect(),
            rest,
            body,
        ),
        _ => messages.iter().map(|m| one_message(m)).collect(),
    }
}

/// Copies the client's frames to every node still listening, each frame once all have room.
async fn copy(mut client: BodyStream<tonic::body::Body>, mut senders: Vec<FrameSender>) {
    while let Some(frame) = client.next().await {
        let data = match frame {
            Ok(frame) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue, // request trailers: gRPC clients send none
            },
            Err(err) => {
                let status = Status::cancelled(format!("failed proxying c2s: {err}"));
                for sender in &senders {
                    let _ = sender.send(Err(status.clone())).await;
                }
                return;
            }
        };
        let sends = senders
            .iter()
            .map(|sender| sender.send(Ok(Frame::data(data.clone()))));
        let delivered = futures::future::join_all(sends).await;
        let mut delivered = delivered.iter();
        senders.retain(|_| delivered.next().is_some_and(Result::is_ok));
        if senders.is_empty() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::time::Duration;
    use tokio_stream::wrappers::ReceiverStream;

    /// A client body whose frames the test sends.
    fn client() -> (
        mpsc::Sender<Result<Frame<Bytes>, Status>>,
        BodyStream<tonic::body::Body>,
    ) {
        let (tx, rx) = mpsc::channel(1);
        let body = tonic::body::Body::new(StreamBody::new(ReceiverStream::new(rx)));
        (tx, BodyStream::new(body))
    }

    async fn next_data(body: &mut tonic::body::Body) -> Option<Bytes> {
        tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("a frame in time")
            .map(|f| f.unwrap().into_data().unwrap())
    }

    #[tokio::test]
    async fn every_node_gets_its_first_frame_then_the_same_stream() {
        let (tx, stream) = client();
        let mut bodies = copies(
            vec![
                Bytes::from_static(b"first-a"),
                Bytes::from_static(b"first-b"),
            ],
            Bytes::from_static(b"rest"),
            stream,
        );
        tx.send(Ok(Frame::data(Bytes::from_static(b"more"))))
            .await
            .unwrap();
        drop(tx);
        for (body, first) in bodies.iter_mut().zip(["first-a", "first-b"]) {
            assert_eq!(next_data(body).await.unwrap(), first.as_bytes());
            assert_eq!(next_data(body).await.unwrap(), &b"rest"[..]);
            assert_eq!(next_data(body).await.unwrap(), &b"more"[..]);
            assert!(
                next_data(body).await.is_none(),
                "the client's end ends each copy"
            );
        }
    }

    #[tokio::test]
    async fn the_slowest_node_holds_the_client_back() {
        let (tx, stream) = client();
        let mut bodies = copies(vec![Bytes::new(), Bytes::new()], Bytes::new(), stream);
        // Nobody reads node 1: after its queue is full, the client cannot send more.
        let mut sent = 0;
        while tokio::time::timeout(
            Duration::from_millis(100),
            tx.send(Ok(Frame::data(Bytes::from_static(b"x")))),
        )
        .await
        .is_ok()
        {
            sent += 1;
            assert!(sent < 100, "the client was never held back");
            // Node 0 reads everything it gets.
            while let Ok(Some(_)) =
                tokio::time::timeout(Duration::from_millis(1), bodies[0].frame()).await
            {
            }
        }
        // Queue (16) + the frame in the copier's hands + the client's channel (1).
        assert!(sent <= BUFFERED_FRAMES + 2 + 2, "sent {sent}");
        // Node 1 goes away: the others go on.
        bodies.truncate(1);
        tokio::time::timeout(
            Duration::from_secs(5),
            tx.send(Ok(Frame::data(Bytes::new()))),
        )
        .await
        .expect("unblocked once the slow node left")
        .unwrap();
    }

    #[tokio::test]
    async fn a_failing_client_fails_every_copy() {
        let (tx, stream) = client();
        let mut bodies = copies(vec![Bytes::new(), Bytes::new()], Bytes::new(), stream);
        tx.send(Err(Status::cancelled("reset"))).await.unwrap();
        for body in &mut bodies {
            next_data(body).await; // first
            next_data(body).await; // rest
            let err = body.frame().await.unwrap().unwrap_err();
            assert!(err.message().contains("failed proxying c2s"), "{err}");
        }
    }
}
