//! The bytes of requests being buffered and decoded, across every stream.
//!
//! Each stream's size limit bounds one request; this bounds them all at
//! once: a request's bytes are taken from one shared budget as soon as its
//! gRPC frame header announces them (before they arrive), and given back
//! once it is decoded, or when its stream goes. A request the budget cannot
//! take ends its stream RESOURCE_EXHAUSTED (the proxy backs off and
//! retries) instead of being buffered.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use hyper::body::{Body, Frame, SizeHint};
use tonic::Status;
use tracing::warn;

/// Bytes of requests all streams may have buffered or be decoding at once,
/// by default: room for several reconnecting ztunnels' largest first
/// requests at once, and far below what the controller may use.
pub const MAX_BUFFERED: usize = 512 * 1024 * 1024;

/// The shared budget.
#[derive(Debug)]
pub struct Budget {
    max: usize,
    used: AtomicUsize,
}

impl Budget {
    pub fn new(max: usize) -> Arc<Budget> {
        Arc::new(Budget {
            max,
            used: AtomicUsize::new(0),
        })
    }

    /// Bytes taken now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn try_take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(n).filter(|t| *t <= self.max)
            })
            .is_ok()
    }

    fn give_back(&self, n: usize) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(n))
            });
    }
}

/// One stream's share of the budget: what its body has announced and its
/// decoder has not yet decoded. Given back in full when the stream goes.
#[derive(Debug)]
pub struct Held {
    budget: Arc<Budget>,
    bytes: AtomicUsize,
}

impl Held {
    pub fn new(budget: Arc<Budget>) -> Arc<Held> {
        Arc::new(Held {
            budget,
            bytes: AtomicUsize::new(0),
        })
    }

    /// Takes `n` more bytes, if they fit.
    pub fn take(&self, n: usize) -> bool {
        if !self.budget.try_take(n) {
            return false;
        }
        self.bytes.fetch_add(n, Ordering::AcqRel);
        true
    }

    /// The budget's bound.
    pub fn limit(&self) -> usize {
        self.budget.max
    }

    /// A request of `n` bytes has been decoded.
    pub fn decoded(&self, n: usize) {
        let mut given = 0;
        let _ = self
            .bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                given = b.min(n);
                Some(b - given)
            });
        self.budget.give_back(given);
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.give_back(*self.bytes.get_mut());
    }
}

/// A request body that takes each gRPC message's announced length from
/// the stream's [`Held`] when its 5-byte header has arrived.
pub struct Counted<B> {
    inner: B,
    held: Arc<Held>,
    /// The header being read, and how much of it has arrived.
    header: [u8; 5],
    header_len: usize,
    /// Bytes of the current message still to arrive.
    left: usize,
    /// The stream's message size limit: a message over it is refused by
    /// the decoder on its header alone, so it takes nothing.
    max: usize,
}

impl<B> Counted<B> {
    pub fn new(inner: B, held: Arc<Held>, max: usize) -> Counted<B> {
        Counted {
            inner,
            held,
            header: [0; 5],
            header_len: 0,
            left: 0,
            max,
        }
    }

    /// Follows the message framing through one chunk of data.
    fn account(&mut self, mut data: &[u8]) -> Result<(), Status> {
        while !data.is_empty() {
            if self.left > 0 {
                let n = self.left.min(data.len());
                self.left -= n;
                data.advance(n);
                continue;
            }
            let n = (5 - self.header_len).min(data.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&data[..n]);
            self.header_len += n;
            data.advance(n);
            if self.header_len < 5 {
                break;
            }
            self.header_len = 0;
            let len = u32::from_be_bytes([
                self.header[1],
                self.header[2],
                self.header[3],
                self.header[4],
            ]) as usize;
            if len <= self.max && !self.held.take(len) {
                warn!(
                    bytes = len,
                    buffered = self.held.budget.used(),
                    "xDS request refused: the controller is buffering too many requests"
                );
                return Err(Status::resource_exhausted(format!(
                    "the controller is buffering {} bytes of requests; a request of {len} more \
                     does not fit (at most {} at once): retry later",
                    self.held.budget.used(),
                    self.held.budget.max
                )));
            }
            self.left = len;
        }
        Ok(())
    }
}

impl<B> Body for Counted<B>
where
    B: Body<Data = Bytes, Error = Status> + Unpin,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if let Some(Ok(f)) = &frame
            && let Some(data) = f.data_ref()
        {
            let data = data.clone();
            this.account(&data)?;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn frame_header(len: u32) -> Bytes {
        let mut h = vec![0u8];
        h.extend(len.to_be_bytes());
        Bytes::from(h)
    }

    #[tokio::test]
    async fn announced_requests_are_taken_from_the_budget_until_decoded() {
        let budget = Budget::new(10_000);
        let held = Held::new(budget.clone());
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Status>>(8);
        let inner = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let mut body = Counted::new(inner, held.clone(), 1 << 20);
        // A header split across chunks, then part of its message.
        let h = frame_header(6_000);
        tx.send(Ok(Frame::data(h.slice(..2)))).await.expect("send");
        tx.send(Ok(Frame::data(h.slice(2..)))).await.expect("send");
        tx.send(Ok(Frame::data(Bytes::from(vec![0; 100]))))
            .await
            .expect("send");
        for _ in 0..3 {
            body.frame().await.expect("a frame").expect("taken");
        }
        assert_eq!(budget.used(), 6_000);
        // Another stream's request that does not fit is refused.
        let other = Held::new(budget.clone());
        let (tx2, rx2) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Status>>(8);
        let mut body2 = Counted::new(
            StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx2)),
            other,
            1 << 20,
        );
        tx2.send(Ok(Frame::data(frame_header(5_000))))
            .await
            .expect("send");
        let refused = body2.frame().await.expect("a frame").expect_err("refused");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        // Decoded: given back. A stream that goes gives back what it holds.
        held.decoded(6_000);
        tx.send(Ok(Frame::data(Bytes::from(vec![0; 5_900]))))
            .await
            .expect("send");
        body.frame().await.expect("a frame").expect("the rest");
        assert_eq!(budget.used(), 0);
        tx.send(Ok(Frame::data(frame_header(7_000))))
            .await
            .expect("send");
        body.frame().await.expect("a frame").expect("taken");
        assert_eq!(budget.used(), 7_000);
        drop(body);
        drop(held);
        assert_eq!(budget.used(), 0);
    }
}
