//! Idle detection for byte streams that must not be held open for ever by a peer that stops
//! both reading and writing (a sidechannel whose caller answered `ok` and went silent would
//! otherwise keep the node's git process and the router's copy tasks alive as long as the
//! connection lives).
//!
//! An [`Activity`] is shared by the streams of one transfer; each stream is wrapped with
//! [`Activity::watch`], which notes the time of every read or write that moved at least one
//! byte. [`Activity::idle`] completes once no byte has moved on any of them for the given time.
//! A slow peer that still moves bytes is not idle: only a transfer that made no progress at
//! all is cut.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// When the streams of one transfer last moved a byte.
#[derive(Clone, Debug)]
pub struct Activity {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    start: Instant,
    /// Milliseconds from `start` to the last byte moved.
    last_ms: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

impl Activity {
    /// A transfer that counts as active now.
    pub fn new() -> Self {
        Activity {
            inner: Arc::new(Inner {
                start: Instant::now(),
                last_ms: AtomicU64::new(0),
            }),
        }
    }

    /// Notes that a byte moved now.
    pub fn touch(&self) {
        let ms = u64::try_from(self.inner.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.inner.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.inner.start + Duration::from_millis(self.inner.last_ms.load(Ordering::Relaxed))
    }

    /// `io`, noting every byte it moves in this activity.
    pub fn watch<T>(&self, io: T) -> Watched<T> {
        Watched {
            io,
            activity: self.clone(),
        }
    }

    /// Completes once no byte has moved for `timeout`.
    pub async fn idle(&self, timeout: Duration) {
        loop {
            let deadline = self.last() + timeout;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// A stream whose progress is noted in an [`Activity`].
#[derive(Debug)]
pub struct Watched<T> {
    io: T,
    activity: Activity,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn idle_only_after_no_byte_moved_for_the_timeout() {
        let activity = Activity::new();
        let (a, b) = tokio::io::duplex(64);
        let mut a = activity.watch(a);
        let mut b = activity.watch(b);
        let timeout = Duration::from_secs(10);
        // A byte every 6 s keeps it active for 30 s.
        let talker = async {
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_secs(6)).await;
                a.write_all(b"x").await.unwrap();
                let mut byte = [0u8; 1];
                b.read_exact(&mut byte).await.unwrap();
            }
        };
        let start = Instant::now();
        tokio::select! {
            () = talker => {}
            () = activity.idle(timeout) => panic!("idle while bytes moved"),
        }
        // Then silence: idle 10 s after the last byte.
        let last = Instant::now();
        activity.idle(timeout).await;
        assert_eq!(Instant::now() - last, timeout);
        assert!(Instant::now() - start >= Duration::from_secs(40));
    }
}
