//! Reads ahead for a yamux session whose frame decoder asks for tiny reads.
//!
//! The session's decoder (tokio-util's `Framed`) reserves one byte of room before each read,
//! and `bytes` may then grow its buffer by exactly that byte: during a 131 MB push a quarter of
//! the router's reads from its client's session were one byte long, each a system call. Here
//! a small read is served from a buffer filled by one larger read; a read with room for a lot
//! goes to the connection directly, so bulk data is not copied twice.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// The read-ahead buffer, allocated at the first small read.
const READ_AHEAD: usize = 32 * 1024;
/// A read with at least this much room skips the buffer (when it is empty).
const DIRECT_READ: usize = 8 * 1024;

/// A connection whose small reads are served from a read-ahead buffer; writes pass through.
pub struct ReadAhead<T> {
    inner: T,
    buf: Vec<u8>,
    /// What of `buf` is read but not yet handed out.
    start: usize,
    end: usize,
}

impl<T> ReadAhead<T> {
    pub fn new(inner: T) -> Self {
        ReadAhead {
            inner,
            buf: Vec::new(),
            start: 0,
            end: 0,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.start == this.end {
            if out.remaining() >= DIRECT_READ {
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            if this.buf.is_empty() {
                this.buf = vec![0; READ_AHEAD];
            }
            let mut ahead = ReadBuf::new(&mut this.buf);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut ahead))?;
            this.start = 0;
            this.end = ahead.filled().len();
            // Nothing read is the end of the connection: `out` stays empty and says so.
        }
        let n = out.remaining().min(this.end - this.start);
        out.put_slice(&this.buf[this.start..this.start + n]);
        this.start += n;
        Poll::Ready(Ok(()))
    }
}

super::io::forward_async_write!(ReadAhead, inner);

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Small and large reads, in any mix, see every byte once and in order, then the end.
    #[tokio::test]
    async fn mixed_reads_see_every_byte_in_order() {
        let (mut client, server) = tokio::io::duplex(256 * 1024);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            for piece in sent.chunks(7_000) {
                client.write_all(piece).await.unwrap();
            }
        });
        let mut reader = ReadAhead::new(server);
        let mut received = Vec::new();
        let sizes = [1usize, 3, 9_000, 12, 40_000, 1, 100];
        let mut i = 0;
        loop {
            let mut chunk = vec![0u8; sizes[i % sizes.len()]];
            i += 1;
            let n = reader.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            received.extend_from_slice(&chunk[..n]);
        }
        writer.await.unwrap();
        assert_eq!(received, data);
    }

    /// A small read takes what is there in one read of the connection and serves later small
    /// reads from it.
    #[tokio::test]
    async fn small_reads_are_served_from_one_read() {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        client.write_all(&[5u8; 1000]).await.unwrap();
        let mut reader = ReadAhead::new(server);
        let mut one = [0u8; 1];
        reader.read_exact(&mut one).await.unwrap();
        assert_eq!(
            reader.end - reader.start,
            999,
            "the rest waits in the buffer"
        );
        let mut rest = [0u8; 999];
        reader.read_exact(&mut rest).await.unwrap();
        assert_eq!(reader.start, reader.end);
    }
}
