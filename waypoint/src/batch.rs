//! Coalesced writes to an upstream connection.
//!
//! Hyper's HTTP/2 client writes and flushes its frames every time its
//! connection task runs. Relaying a stream of small messages, that task is
//! woken by the first message the request body hands over and runs before
//! many more have arrived, and each flush became one DATA frame on the
//! HBONE stream, one TLS record and one `writev` of about 1.3 KB: most of
//! the waypoint's CPU on a gRPC client stream (`docs/performance.md`,
//! "Coalesced upstream writes").
//!
//! [`Batched`] keeps what is written until a flush, and on a flush with
//! bytes waiting first lets every other task ready on this thread run once
//! (it wakes its own task and returns `Pending`: a yield, never a timer).
//! Whatever the request bodies hand over meanwhile joins the same write.
//! With one message in flight nothing else is ready, so the flush goes
//! out on the very next poll. The buffer is bounded ([`MAX_BATCH`]): a full
//! one is sent before more is taken, and sending waits on the upstream's
//! flow control, so a slow upstream holds back the writer, not memory.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most a batch holds before it is sent without waiting for a flush.
pub const MAX_BATCH: usize = 64 * 1024;

/// A writer that gathers writes until a flush and yields once before
/// sending them (see the module docs).
pub struct Batched<S> {
    inner: S,
    buf: BytesMut,
    /// Bytes at the front of `buf` the inner writer already took.
    sent: usize,
    /// This flush already let the other ready tasks run.
    yielded: bool,
}

impl<S> Batched<S> {
    pub fn new(inner: S) -> Self {
        Batched {
            inner,
            buf: BytesMut::new(),
            sent: 0,
            yielded: false,
        }
    }

    /// Bytes written and not yet handed on (for tests).
    pub fn pending(&self) -> usize {
        self.buf.len() - self.sent
    }
}

impl<S: AsyncWrite + Unpin> Batched<S> {
    /// Hands the whole batch to the inner writer.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.buf.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Batched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Batched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.buf.len() >= MAX_BATCH {
            ready!(self.poll_send(cx))?;
        }
        let n = buf.len().min(MAX_BATCH - self.buf.len());
        self.buf.extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.pending() > 0 {
            if !self.yielded {
                self.yielded = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            ready!(self.poll_send(cx))?;
        }
        self.yielded = false;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_send(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    /// A duplex end that counts the writes it is handed.
    struct Counting {
        inner: DuplexStream,
        writes: usize,
    }

    impl AsyncWrite for Counting {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let r = Pin::new(&mut self.inner).poll_write(cx, buf);
            if r.is_ready() {
                self.writes += 1;
            }
            r
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// Writes before a flush reach the inner writer as one write, and only
    /// on the flush, which yields once and then completes by itself.
    #[tokio::test]
    async fn writes_until_a_flush_go_out_as_one() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut w = Batched::new(Counting {
            inner: a,
            writes: 0,
        });
        for _ in 0..100 {
            w.write_all(&[7u8; 78]).await.expect("write");
        }
        assert_eq!(w.inner.writes, 0, "nothing is sent before a flush");
        assert_eq!(w.pending(), 7800);
        tokio::time::timeout(Duration::from_secs(5), w.flush())
            .await
            .expect("the flush completes without anything else waking it")
            .expect("flush");
        assert_eq!(w.inner.writes, 1);
        assert_eq!(w.pending(), 0);
        let mut got = vec![0u8; 7800];
        b.read_exact(&mut got).await.expect("read");
        assert!(got.iter().all(|&x| x == 7));
    }

    /// An upstream that takes nothing holds the writer back once a batch is
    /// full: what the waypoint keeps is bounded by MAX_BATCH.
    #[tokio::test]
    async fn a_stalled_upstream_bounds_the_batch() {
        let (a, _b) = tokio::io::duplex(4096);
        let mut w = Batched::new(a);
        let chunk = [1u8; 1000];
        let mut accepted = 0usize;
        loop {
            match tokio::time::timeout(Duration::from_millis(200), w.write(&chunk)).await {
                Ok(r) => accepted += r.expect("write"),
                Err(_) => break,
            }
            assert!(accepted <= MAX_BATCH + 4096, "took {accepted} bytes");
        }
        assert!(accepted >= MAX_BATCH, "took only {accepted} bytes");
        assert!(w.pending() <= MAX_BATCH);
    }
}
