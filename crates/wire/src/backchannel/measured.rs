//! The sizes of what yamux sessions read from and write to their connections, for Gitaly's
//! `gitaly_backchannel_yamux_read_size_bytes` and `gitaly_backchannel_yamux_write_size_bytes`.
//! The wire crate only reports them, to an observer the process sets once ([`observe_sizes`]):
//! the router turns them into histograms; gitnode, which has no metrics, sets none, and then a
//! read or write costs one check of an unset cell.

use std::io;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Which way bytes went on a session's connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Read,
    Write,
}

type SizeObserver = Box<dyn Fn(Direction, usize) + Send + Sync>;

static OBSERVER: OnceLock<SizeObserver> = OnceLock::new();

/// Sets the process's observer of session read and write sizes; only the first call counts.
pub fn observe_sizes(observer: impl Fn(Direction, usize) + Send + Sync + 'static) {
    let _ = OBSERVER.set(Box::new(observer));
}

fn report(direction: Direction, size: usize) {
    if let Some(observe) = OBSERVER.get() {
        observe(direction, size);
    }
}

/// A session's connection whose reads and writes are reported by size.
pub struct Measured<T> {
    inner: T,
}

impl<T> Measured<T> {
    pub fn new(inner: T) -> Self {
        Measured { inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Measured<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            report(Direction::Read, read);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Measured<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(written)) = &polled {
            report(Direction::Write, *written);
        }
        polled
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(written)) = &polled {
            report(Direction::Write, *written);
        }
        polled
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
