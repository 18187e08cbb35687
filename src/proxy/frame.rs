//! gRPC message framing: a 1-byte compressed flag, a 4-byte big-endian length, the message.
//! The router reads the first request message to route it; everything after it is forwarded
//! as it came.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use http_body::Frame;

/// The largest first message the router reads (Gitaly clients send far smaller ones).
pub const MAX_FIRST_MESSAGE: usize = 16 * 1024 * 1024;

/// Why the first message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("the request ended before its first message")]
    Empty,
    #[error("the first message is compressed")]
    Compressed,
    #[error("the first message is larger than {MAX_FIRST_MESSAGE} bytes")]
    TooLarge,
    #[error("reading the request: {0}")]
    Body(Box<dyn std::error::Error + Send + Sync>),
}

/// The first message, and the bytes that followed it in the same chunk.
pub struct FirstMessage {
    pub message: Bytes,
    pub rest: Bytes,
}

/// Reads body frames until the first complete gRPC message.
pub async fn read_first<S, E>(body: &mut S) -> Result<FirstMessage, FrameError>
where
    S: Stream<Item = Result<Frame<Bytes>, E>> + Unpin,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut buf = BytesMut::new();
    loop {
        if buf.len() >= 5 {
            if buf[0] != 0 {
                return Err(FrameError::Compressed);
            }
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if len > MAX_FIRST_MESSAGE {
                return Err(FrameError::TooLarge);
            }
            if buf.len() >= 5 + len {
                buf.advance(5);
                let message = buf.split_to(len).freeze();
                return Ok(FirstMessage {
                    message,
                    rest: buf.freeze(),
                });
            }
        }
        match body.next().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                }
            }
            Some(Err(err)) => return Err(FrameError::Body(err.into())),
            None => return Err(FrameError::Empty),
        }
    }
}

/// Frames `message` as an uncompressed gRPC message.
pub fn encode(message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + message.len());
    out.put_u8(0);
    out.put_u32(message.len() as u32);
    out.extend_from_slice(message);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(
        chunks: Vec<&'static [u8]>,
    ) -> impl Stream<Item = Result<Frame<Bytes>, String>> + Unpin {
        futures::stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok(Frame::data(Bytes::from_static(c)))),
        )
    }

    #[tokio::test]
    async fn reassembles_a_message_split_across_chunks() {
        let mut body = frames(vec![
            b"\x00\x00\x00",
            b"\x00\x03a",
            b"bc\x00\x00\x00\x00\x01z",
        ]);
        let first = read_first(&mut body).await.unwrap();
        assert_eq!(&first.message[..], b"abc");
        assert_eq!(&first.rest[..], b"\x00\x00\x00\x00\x01z");
        assert_eq!(&encode(b"abc")[..], b"\x00\x00\x00\x00\x03abc");
    }

    #[tokio::test]
    async fn refuses_empty_compressed_and_huge_requests() {
        assert!(matches!(
            read_first(&mut frames(vec![])).await,
            Err(FrameError::Empty)
        ));
        assert!(matches!(
            read_first(&mut frames(vec![b"\x00\x00"])).await,
            Err(FrameError::Empty)
        ));
        assert!(matches!(
            read_first(&mut frames(vec![b"\x01\x00\x00\x00\x01a"])).await,
            Err(FrameError::Compressed)
        ));
        assert!(matches!(
            read_first(&mut frames(vec![b"\x00\xff\xff\xff\xff"])).await,
            Err(FrameError::TooLarge)
        ));
    }
}
