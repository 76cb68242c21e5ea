//! The bytes of requests being buffered and decoded, across every stream.
//!
//! Each stream's size limit bounds one request; this bounds them all at
//! once: a request's bytes are taken from one shared budget as soon as its
//! gRPC frame header announces them (before they arrive), and given back
//! once its stream's task takes it (`reader`), or when its stream goes.
//! A request the budget cannot take ends its stream RESOURCE_EXHAUSTED
//! (the proxy backs off and retries) instead of being buffered.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::Sleep;
use tonic::Status;
use tracing::warn;

/// Bytes of requests all streams may have buffered or be decoding at once,
/// by default: room for several reconnecting ztunnels' largest first
/// requests at once, and far below what the controller may use.
pub const MAX_BUFFERED: usize = 512 * 1024 * 1024;

/// Of [`MAX_BUFFERED`], what all workload (pod) tokens' streams together
/// may take: the rest is nodes' alone, so pods can never refuse a node's
/// first request by filling the shared budget.
pub const MAX_WORKLOAD_BUFFERED: usize = 32 * 1024 * 1024;

/// The shared budget, or a pool of it.
#[derive(Debug)]
pub struct Budget {
    max: usize,
    used: AtomicUsize,
    /// The budget this is a pool of: what is taken here is taken there too.
    parent: Option<Arc<Budget>>,
}

impl Budget {
    pub fn new(max: usize) -> Arc<Budget> {
        Arc::new(Budget {
            max,
            used: AtomicUsize::new(0),
            parent: None,
        })
    }

    /// A pool of at most `max` bytes of `parent`: bytes taken from it are
    /// taken from `parent` as well, and refused when either is full.
    pub fn pool(parent: Arc<Budget>, max: usize) -> Arc<Budget> {
        Arc::new(Budget {
            max,
            used: AtomicUsize::new(0),
            parent: Some(parent),
        })
    }

    /// Bytes taken now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn try_take(&self, n: usize) -> bool {
        let own = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(n).filter(|t| *t <= self.max)
            })
            .is_ok();
        if !own {
            return false;
        }
        if let Some(parent) = &self.parent
            && !parent.try_take(n)
        {
            self.give_back_own(n);
            return false;
        }
        true
    }

    fn give_back(&self, n: usize) {
        self.give_back_own(n);
        if let Some(parent) = &self.parent {
            parent.give_back(n);
        }
    }

    fn give_back_own(&self, n: usize) {
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

    /// Gives back `n` bytes taken for a request that was refused.
    pub fn give_back(&self, n: usize) {
        self.decoded(n);
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

/// Messages this small are never charged: an ACK, a NACK or a proxy's
/// usual first request is never refused because others are buffering.
pub const SMALL: usize = 64 * 1024;

/// Time a message has to arrive once its header has: this, plus a second
/// per MiB it announces ([`allowance`]), in wall time (its stream's reader
/// polls its body until it has arrived, whatever the stream's connection
/// task is doing: `reader`).
pub const MESSAGE_DEADLINE: Duration = Duration::from_secs(10);

/// A message of `len` bytes' time to arrive once its header has (and,
/// once it has, to be taken by its connection task).
pub fn allowance(len: usize) -> Duration {
    MESSAGE_DEADLINE + Duration::from_secs(len.div_ceil(1 << 20) as u64)
}

/// Whether a line of `kind` is written now, and how many were left out.
fn logged(kind: &'static str) -> Option<u64> {
    crate::metrics::log_limit().admit(kind, std::time::Instant::now())
}

/// What a stream's body has taken from the budget for messages whose
/// headers it has read but that its reader has not yet decoded (a small
/// message and a large one's header may come in one chunk: the reader
/// hands the small one over and waits for it to be taken, and must not
/// wait unbounded while the large one's bytes stay taken); and whether
/// the reader has come back to reading after such a wait, so the current
/// message's deadline starts again (its body was held by flow control,
/// not by the proxy).
#[derive(Debug, Default)]
pub struct Unread {
    bytes: AtomicUsize,
    resumed: AtomicBool,
}

impl Unread {
    /// Bytes taken for messages not yet decoded.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Acquire)
    }

    /// A message of `n` bytes (taken on its header if over [`SMALL`]) is
    /// being decoded.
    pub fn decoded(&self, n: usize) {
        if n > SMALL {
            let _ = self
                .bytes
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                    Some(b.saturating_sub(n))
                });
        }
    }

    /// The reader reads again after waiting for its last message to be
    /// taken.
    pub fn resume(&self) {
        self.resumed.store(true, Ordering::Release);
    }
}

/// Bytes a large first request may carry per entry of the hub's entry
/// bound (`Hub::names_bound`, twice the most resources of a type ever
/// held, at least 100 000): a stated name and its version take some 30
/// bytes beside the name, so this leaves twice that for the name, and
/// twice again for the bound's own headroom. 100 000 entries: 12.2 MiB.
pub const ENTRY_BYTES: usize = 128;

/// What a stream's messages may announce.
#[derive(Debug, Clone, Copy)]
pub struct Framing {
    /// The stream's size limit: a message over it is refused by the
    /// decoder on its header alone, so it takes nothing.
    pub max: usize,
    /// Messages over this are large ...
    pub ordinary: usize,
    /// ... and the stream may announce at most this many of them (a
    /// node's first request of each type that may be large; a workload's
    /// none): one more is refused on its header.
    pub large: usize,
}

/// A request body that takes each gRPC message's announced length, when
/// its 5-byte header has arrived and the message is over [`SMALL`], from
/// its caller's share first and then from the shared budget; and that
/// ends the stream when a message does not arrive within its deadline.
pub struct Counted<B> {
    inner: B,
    held: Arc<Held>,
    /// The caller's share, across its streams.
    share: Arc<Held>,
    /// The header being read, and how much of it has arrived.
    header: [u8; 5],
    header_len: usize,
    /// Bytes of the current message still to arrive.
    left: usize,
    framing: Framing,
    /// When the current message must have arrived.
    deadline: Option<Pin<Box<Sleep>>>,
    /// The current message's announced length.
    announced: usize,
    /// The hub's entry bound, which bounds a large message (with
    /// [`ENTRY_BYTES`]), if it is to.
    entries: Option<Arc<AtomicUsize>>,
    unread: Arc<Unread>,
}

impl<B> Counted<B> {
    pub fn new(inner: B, held: Arc<Held>, share: Arc<Held>, framing: Framing) -> Counted<B> {
        Counted {
            inner,
            held,
            share,
            header: [0; 5],
            header_len: 0,
            left: 0,
            framing,
            deadline: None,
            announced: 0,
            unread: Arc::default(),
            entries: None,
        }
    }

    /// Bounds each large message (over `framing.ordinary`) to `entries`
    /// (read on each header) times [`ENTRY_BYTES`], never below
    /// `framing.ordinary`: a node's first request states what it holds,
    /// which is at most what the model has had.
    pub fn with_entries(mut self, entries: Arc<AtomicUsize>) -> Counted<B> {
        self.entries = Some(entries);
        self
    }

    /// The most a large message may announce.
    fn large_max(&self) -> usize {
        match &self.entries {
            Some(e) => e
                .load(Ordering::Relaxed)
                .saturating_mul(ENTRY_BYTES)
                .clamp(self.framing.ordinary, self.framing.max),
            None => self.framing.max,
        }
    }

    /// What it has taken for messages not yet decoded, shared with the
    /// stream's decoder and reader.
    pub fn unread(&self) -> Arc<Unread> {
        self.unread.clone()
    }

    /// Follows the message framing through one chunk of data.
    fn account(&mut self, mut data: &[u8]) -> Result<(), Status> {
        while !data.is_empty() {
            if self.left > 0 {
                let n = self.left.min(data.len());
                self.left -= n;
                data.advance(n);
                if self.left == 0 {
                    self.deadline = None;
                }
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
            if len <= self.framing.max {
                self.admit(len)?;
            }
            self.left = len;
            self.announced = len;
            if len > 0 {
                self.deadline = Some(Box::pin(tokio::time::sleep(allowance(len))));
            }
        }
        Ok(())
    }

    /// Takes an announced message of `len` bytes, or refuses it.
    fn admit(&mut self, len: usize) -> Result<(), Status> {
        if len > self.framing.ordinary {
            if self.framing.large == 0 {
                return Err(Status::out_of_range(format!(
                    "a request of {len} bytes; over {} only a node's first request of \
                     addresses or authorizations may be",
                    self.framing.ordinary
                )));
            }
            let most = self.large_max();
            if len > most {
                if let Some(left_out) = logged("xds request too large for the model") {
                    warn!(
                        left_out,
                        bytes = len,
                        most,
                        "xDS request refused: larger than the model justifies"
                    );
                }
                return Err(Status::out_of_range(format!(
                    "a first request of {len} bytes; what the controller has served \
                     justifies at most {most}"
                )));
            }
            self.framing.large -= 1;
        }
        if len <= SMALL {
            return Ok(());
        }
        if !self.share.take(len) {
            if let Some(left_out) = logged("xds request past its share") {
                warn!(
                    left_out,
                    bytes = len,
                    "xDS request refused: past its caller's share of requests in flight"
                );
            }
            return Err(Status::resource_exhausted(format!(
                "a request of {len} bytes does not fit this caller's {} bytes of requests \
                 in flight across its streams: retry later",
                self.share.limit()
            )));
        }
        if !self.held.take(len) {
            self.share.give_back(len);
            if let Some(left_out) = logged("xds budget full") {
                warn!(
                    left_out,
                    bytes = len,
                    buffered = self.held.budget.used(),
                    "xDS request refused: the controller is buffering too many requests"
                );
            }
            return Err(Status::resource_exhausted(format!(
                "the controller is buffering {} bytes of requests; a request of {len} more \
                 does not fit (at most {} at once): retry later",
                self.held.budget.used(),
                self.held.budget.max
            )));
        }
        self.unread.bytes.fetch_add(len, Ordering::AcqRel);
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
        if this.unread.resumed.swap(false, Ordering::AcqRel)
            && let Some(d) = &mut this.deadline
        {
            d.as_mut()
                .reset(tokio::time::Instant::now() + allowance(this.announced));
        }
        let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) else {
            if let Some(d) = &mut this.deadline
                && d.as_mut().poll(cx).is_ready()
            {
                this.deadline = None;
                if let Some(left_out) = logged("xds request deadline") {
                    warn!(
                        left_out,
                        left = this.left,
                        "xDS request cut: its message did not arrive in time"
                    );
                }
                return Poll::Ready(Some(Err(Status::deadline_exceeded(format!(
                    "a request's {} remaining bytes did not arrive in time",
                    this.left
                )))));
            }
            return Poll::Pending;
        };
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

    fn share() -> Arc<Held> {
        Held::new(Budget::new(1 << 30))
    }

    fn framing() -> Framing {
        Framing {
            max: 1 << 20,
            ordinary: 1 << 20,
            large: 0,
        }
    }

    #[tokio::test]
    async fn announced_requests_are_taken_from_the_budget_until_decoded() {
        let budget = Budget::new(1_000_000);
        let held = Held::new(budget.clone());
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Status>>(8);
        let inner = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let mut body = Counted::new(inner, held.clone(), share(), framing());
        // A header split across chunks, then part of its message.
        let h = frame_header(600_000);
        tx.send(Ok(Frame::data(h.slice(..2)))).await.expect("send");
        tx.send(Ok(Frame::data(h.slice(2..)))).await.expect("send");
        tx.send(Ok(Frame::data(Bytes::from(vec![0; 100]))))
            .await
            .expect("send");
        for _ in 0..3 {
            body.frame().await.expect("a frame").expect("taken");
        }
        assert_eq!(budget.used(), 600_000);
        // Another stream's request that does not fit is refused.
        let other = Held::new(budget.clone());
        let (tx2, rx2) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Status>>(8);
        let mut body2 = Counted::new(
            StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx2)),
            other,
            share(),
            framing(),
        );
        tx2.send(Ok(Frame::data(frame_header(500_000))))
            .await
            .expect("send");
        let refused = body2.frame().await.expect("a frame").expect_err("refused");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        // Decoded: given back. A stream that goes gives back what it holds.
        held.decoded(600_000);
        tx.send(Ok(Frame::data(Bytes::from(vec![0; 599_900]))))
            .await
            .expect("send");
        body.frame().await.expect("a frame").expect("the rest");
        assert_eq!(budget.used(), 0);
        tx.send(Ok(Frame::data(frame_header(700_000))))
            .await
            .expect("send");
        body.frame().await.expect("a frame").expect("taken");
        assert_eq!(budget.used(), 700_000);
        drop(body);
        drop(held);
        assert_eq!(budget.used(), 0);
    }

    /// A pool takes from its budget too, and is refused past its own bound
    /// however much room the budget has; what it gives back, both get.
    #[test]
    fn a_pool_is_bounded_on_its_own_and_within_its_budget() {
        let budget = Budget::new(100);
        let pool = Budget::pool(budget.clone(), 30);
        let pods = Held::new(pool.clone());
        assert!(pods.take(20));
        assert!(!pods.take(11), "past the pool's own bound");
        assert_eq!((pool.used(), budget.used()), (20, 20));
        let node = Held::new(budget.clone());
        assert!(node.take(75));
        assert!(!pods.take(10), "past the budget's");
        assert_eq!(pool.used(), 20);
        drop(pods);
        assert_eq!((pool.used(), budget.used()), (0, 75));
    }
}
