//! gRPC message framing: a 1-byte compressed flag, a 4-byte big-endian length, the message.
//! The router reads the first request message to route it; everything after it is forwarded
//! as it came. The first message is bounded in size (`[proxy] max_first_message_bytes`) and
//! its buffer is sized once from its length prefix, so reading it costs its size, not a
//! multiple of it.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use http_body::Frame;

/// Why the first message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("the request ended before its first message")]
    Empty,
    #[error("the first message is compressed")]
    Compressed,
    #[error("the first message is {len} bytes, more than the limit of {limit} bytes")]
    TooLarge { len: usize, limit: usize },
    #[error("reading the request: {0}")]
    Body(Box<dyn std::error::Error + Send + Sync>),
}

/// The first message, and the bytes that followed it in the same chunk.
pub struct FirstMessage {
    pub message: Bytes,
    pub rest: Bytes,
}

/// Reads body frames until the first complete gRPC message, refusing one longer than `limit`
/// bytes as soon as its length prefix is in (before reading it).
pub async fn read_first<S, E>(body: &mut S, limit: usize) -> Result<FirstMessage, FrameError>
where
    S: Stream<Item = Result<Frame<Bytes>, E>> + Unpin,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut buf = BytesMut::new();
    let mut reserved = false;
    loop {
        if buf.len() >= 5 {
            if buf[0] != 0 {
                return Err(FrameError::Compressed);
            }
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if len > limit {
                return Err(FrameError::TooLarge { len, limit });
            }
            if !reserved {
                // Room for the whole message at once: growing by doubling would copy it
                // several times and could leave twice its size allocated.
                buf.reserve((5 + len).saturating_sub(buf.len()));
                reserved = true;
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
        let first = read_first(&mut body, 3).await.unwrap();
        assert_eq!(&first.message[..], b"abc");
        assert_eq!(&first.rest[..], b"\x00\x00\x00\x00\x01z");
        assert_eq!(&encode(b"abc")[..], b"\x00\x00\x00\x00\x03abc");
    }

    #[tokio::test]
    async fn refuses_empty_compressed_and_huge_requests() {
        const LIMIT: usize = 4 * 1024 * 1024;
        assert!(matches!(
            read_first(&mut frames(vec![]), LIMIT).await,
            Err(FrameError::Empty)
        ));
        assert!(matches!(
            read_first(&mut frames(vec![b"\x00\x00"]), LIMIT).await,
            Err(FrameError::Empty)
        ));
        assert!(matches!(
            read_first(&mut frames(vec![b"\x01\x00\x00\x00\x01a"]), LIMIT).await,
            Err(FrameError::Compressed)
        ));
        assert!(matches!(
            read_first(&mut frames(vec![b"\x00\xff\xff\xff\xff"]), LIMIT).await,
            Err(FrameError::TooLarge {
                len: 0xffff_ffff,
                limit: LIMIT
            })
        ));
        // The limit is the message's length, without the 5-byte prefix: 4 MiB passes a
        // 4 MiB limit, one byte more does not (and is refused before its body is read).
        assert!(matches!(
            read_first(&mut frames(vec![b"\x00\x00\x40\x00\x01"]), LIMIT).await,
            Err(FrameError::TooLarge { len, .. }) if len == LIMIT + 1
        ));
        assert!(matches!(
            read_first(&mut frames(vec![b"\x00\x00\x40\x00\x00"]), LIMIT).await,
            Err(FrameError::Empty)
        ));
        // A smaller configured limit.
        assert!(matches!(
            read_first(&mut frames(vec![b"\x00\x00\x00\x00\x03abc"]), 2).await,
            Err(FrameError::TooLarge { len: 3, limit: 2 })
        ));
    }
}
