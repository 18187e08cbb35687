//! The bytes under a backchannel: any connection boxed as one type ([`BoxIo`]), and how a
//! connection's first bytes are looked at to tell what it speaks ([`sniff`]) without losing
//! them ([`Prefixed`]). Both the server (backchannel or plain gRPC?) and the client (a
//! sidechannel or a gRPC call from the server?) sniff, so this sits below both.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// Implements `AsyncWrite` for a wrapper whose writes all go to one field unchanged (the
/// wrappers here change how a connection reads, or when it may, never what it writes).
macro_rules! forward_async_write {
    ($wrapper:ident, $field:ident) => {
        impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for $wrapper<T> {
            fn poll_write(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.$field).poll_write(cx, buf)
            }
            fn poll_flush(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.$field).poll_flush(cx)
            }
            fn poll_shutdown(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.$field).poll_shutdown(cx)
            }
            fn poll_write_vectored(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.$field).poll_write_vectored(cx, bufs)
            }
            fn is_write_vectored(&self) -> bool {
                self.$field.is_write_vectored()
            }
        }
    };
}
pub(crate) use forward_async_write;

/// What a backchannel client writes first.
pub const BACKCHANNEL_MAGIC: &[u8; 11] = b"backchannel";

/// How long a new connection may take to send its first bytes.
pub(crate) const SNIFF_TIMEOUT: Duration = Duration::from_secs(10);

/// Anything a connection can be carried over.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A boxed connection.
pub type BoxIo = Box<dyn Io>;

/// A stream whose first bytes were already read (to look for a magic); they are replayed
/// before the rest.
pub struct Prefixed<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Prefixed<T> {
    pub fn new(prefix: Bytes, inner: T) -> Self {
        Prefixed { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

forward_async_write!(Prefixed, inner);

/// Reads up to `magic.len()` bytes: whether the stream starts with `magic`, and the stream
/// with any bytes read that were not the magic put back.
pub async fn sniff<T: AsyncRead + Unpin>(
    mut io: T,
    magic: &[u8],
) -> io::Result<(bool, Prefixed<T>)> {
    let mut buf = vec![0u8; magic.len()];
    let mut filled = 0;
    while filled < magic.len() {
        let n = io.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
        if buf[..filled] != magic[..filled] {
            break;
        }
    }
    buf.truncate(filled);
    if buf == magic {
        Ok((true, Prefixed::new(Bytes::new(), io)))
    } else {
        Ok((false, Prefixed::new(Bytes::from(buf), io)))
    }
}
