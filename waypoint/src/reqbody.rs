//! Request bodies on their way upstream: streamed as they arrive (each
//! attempt reads the client only as fast as the upstream takes it), and
//! kept in a per-request retry buffer only while they fit in it.
//!
//! A request whose body fits the buffer can be sent again (a retry) or
//! copied (a mirror): a later attempt replays what was buffered and goes
//! on reading the client from there. Once the body outgrows the buffer the
//! buffer is let go, the request goes on streaming, and it can no longer
//! be retried or mirrored ([`RetryBuffer::overflowed`]). This is Envoy's
//! per-request buffer limit (`per_request_buffer_limit_bytes`).
//!
//! Trailers pass through, and are replayed with the body.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::watch;

use crate::idle::{IdleTimer, StreamClock};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The client's body, as read by whichever attempt is current.
pub type Source = UnsyncBoxBody<Bytes, BoxError>;

/// Why a request body ended early.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// A later attempt took over (this one's upstream is abandoned).
    #[error("superseded by a later attempt")]
    Superseded,
    /// What was streamed already is no longer kept.
    #[error("not retryable: body over the retry buffer")]
    NotReplayable,
    /// Over the user's `limits.max_body_bytes`.
    #[error("request body over {0} bytes")]
    TooLarge(u64),
    /// Nothing came from the client for this long.
    #[error("no request body data for {0:?}")]
    Idle(Duration),
    /// The client's stream failed (a reset, a broken chunk).
    #[error("reading the request body: {0}")]
    Client(String),
}

/// What a request's body limits are.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// Kept for retries and mirrors up to this many bytes.
    pub retry_buffer_bytes: usize,
    /// None: no limit.
    pub max_body_bytes: Option<u64>,
    /// The stream idle timeout: the longest the stream may go with nothing
    /// moving either way while the body waits on the client.
    pub idle: Duration,
}

/// The whole body, once it has been read and fits the buffer.
#[derive(Debug, Clone, Default)]
pub struct Buffered {
    pub chunks: Vec<Bytes>,
    pub trailers: Option<HeaderMap>,
}

/// How far the body has got, as a mirror waits on it.
#[derive(Debug, Clone, Default)]
pub enum Progress {
    #[default]
    Reading,
    Complete(Arc<Buffered>),
    /// Over the buffer, failed or abandoned: nothing to copy.
    Gone,
}

struct Shared {
    source: Option<Source>,
    limits: BodyLimits,
    /// Chunks kept (all of them, until an overflow empties it for good).
    chunks: Vec<Bytes>,
    buffered: usize,
    /// Chunks read from the client so far.
    total: usize,
    received: u64,
    overflowed: bool,
    trailers: Option<HeaderMap>,
    ended: bool,
    failure: Option<BodyError>,
    /// The current attempt; readers of earlier ones are cut off.
    generation: u64,
    idle: IdleTimer,
    progress: watch::Sender<Progress>,
}

impl Shared {
    fn fail(&mut self, e: BodyError) -> BodyError {
        self.failure.get_or_insert(e.clone());
        self.source = None;
        self.chunks.clear();
        self.progress.send_replace(Progress::Gone);
        e
    }

    fn finish(&mut self) {
        self.ended = true;
        self.source = None;
        if !self.overflowed {
            self.progress
                .send_replace(Progress::Complete(Arc::new(Buffered {
                    chunks: self.chunks.clone(),
                    trailers: self.trailers.clone(),
                })));
        }
    }

    /// Keeps a chunk while the buffer has room; lets the buffer go at once
    /// when it has not.
    fn keep(&mut self, d: &Bytes) {
        self.received += d.len() as u64;
        self.total += 1;
        if self.overflowed {
            return;
        }
        if self.buffered + d.len() > self.limits.retry_buffer_bytes {
            self.overflowed = true;
            self.chunks = Vec::new();
            self.buffered = 0;
            self.progress.send_replace(Progress::Gone);
        } else {
            self.buffered += d.len();
            self.chunks.push(d.clone());
        }
    }

    fn poll_source(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let Some(src) = self.source.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(src).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                self.idle.clock().touch();
                if let Some(d) = frame.data_ref() {
                    let d = d.clone();
                    self.keep(&d);
                    if let Some(max) = self.limits.max_body_bytes
                        && self.received > max
                    {
                        return Poll::Ready(Some(Err(self.fail(BodyError::TooLarge(max)))));
                    }
                } else if let Some(t) = frame.trailers_ref() {
                    self.trailers = Some(t.clone());
                    self.finish();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                Poll::Ready(Some(Err(self.fail(BodyError::Client(e.to_string())))))
            }
            Poll::Ready(None) => {
                self.finish();
                Poll::Ready(None)
            }
            Poll::Pending => {
                if self.idle.poll_expired(cx) {
                    let idle = self.idle.idle();
                    return Poll::Ready(Some(Err(self.fail(BodyError::Idle(idle)))));
                }
                Poll::Pending
            }
        }
    }
}

/// A request's body and its retry buffer, shared by its attempts.
#[derive(Clone)]
pub struct RetryBuffer {
    shared: Arc<Mutex<Shared>>,
    /// The declared length (Content-Length), if any.
    declared: Option<u64>,
}

impl RetryBuffer {
    /// `clock`: the stream's, shared with its response.
    pub fn new(
        source: Source,
        declared: Option<u64>,
        limits: BodyLimits,
        clock: StreamClock,
    ) -> RetryBuffer {
        let ended = source.is_end_stream();
        let mut s = Shared {
            source: Some(source),
            limits,
            chunks: Vec::new(),
            buffered: 0,
            total: 0,
            received: 0,
            overflowed: false,
            trailers: None,
            ended: false,
            failure: None,
            generation: 0,
            idle: IdleTimer::new(clock, limits.idle),
            progress: watch::Sender::new(Progress::Reading),
        };
        if ended {
            s.finish();
        }
        RetryBuffer {
            shared: Arc::new(Mutex::new(s)),
            declared,
        }
    }

    /// A body that is already whole (a mirror's copy).
    pub fn complete(b: &Buffered) -> RetryBuffer {
        let limits = BodyLimits {
            retry_buffer_bytes: usize::MAX,
            max_body_bytes: None,
            idle: Duration::MAX,
        };
        let empty = http_body_util::Empty::new()
            .map_err(|e| match e {})
            .boxed_unsync();
        let mut r = RetryBuffer::new(empty, None, limits, StreamClock::default());
        let len = {
            let mut s = r.lock();
            s.chunks = b.chunks.clone();
            s.total = b.chunks.len();
            s.buffered = b.chunks.iter().map(Bytes::len).sum();
            s.received = s.buffered as u64;
            s.trailers = b.trailers.clone();
            s.received
        };
        r.declared = Some(len);
        r
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The body for the next attempt, from its first byte; earlier
    /// attempts' bodies end with [`BodyError::Superseded`].
    pub fn attempt(&self) -> Result<RequestBody, BodyError> {
        let mut s = self.lock();
        if s.overflowed && s.total > 0 {
            return Err(BodyError::NotReplayable);
        }
        if let Some(f) = &s.failure {
            return Err(f.clone());
        }
        s.generation += 1;
        Ok(RequestBody {
            shared: self.shared.clone(),
            generation: s.generation,
            pos: 0,
            sent: 0,
            trailers_sent: false,
            declared: self.declared,
        })
    }

    /// Whether another attempt could send the whole body again.
    pub fn replayable(&self) -> bool {
        let s = self.lock();
        !(s.overflowed || s.failure.is_some())
    }

    /// Whether the body outgrew the retry buffer.
    pub fn overflowed(&self) -> bool {
        self.lock().overflowed
    }

    /// Why the body ended early, if it did.
    pub fn failure(&self) -> Option<BodyError> {
        self.lock().failure.clone()
    }

    /// Body bytes read from the client so far.
    pub fn received(&self) -> u64 {
        self.lock().received
    }

    /// Watches the body until it is whole (for a mirror).
    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.lock().progress.subscribe()
    }
}

/// One attempt's view of the body.
pub struct RequestBody {
    shared: Arc<Mutex<Shared>>,
    generation: u64,
    /// Chunks this attempt has sent.
    pos: usize,
    sent: u64,
    trailers_sent: bool,
    declared: Option<u64>,
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let me = &mut *self;
        let mut s = me.shared.lock().unwrap_or_else(|p| p.into_inner());
        if s.generation != me.generation {
            return Poll::Ready(Some(Err(BodyError::Superseded)));
        }
        if me.pos < s.total {
            // Replaying what an earlier attempt read.
            let Some(d) = s.chunks.get(me.pos).cloned() else {
                return Poll::Ready(Some(Err(BodyError::NotReplayable)));
            };
            me.pos += 1;
            me.sent += d.len() as u64;
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        if s.ended {
            if !me.trailers_sent
                && let Some(t) = s.trailers.clone()
            {
                me.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(t))));
            }
            return Poll::Ready(None);
        }
        if let Some(f) = &s.failure {
            return Poll::Ready(Some(Err(f.clone())));
        }
        let polled = s.poll_source(cx);
        if let Poll::Ready(Some(Ok(f))) = &polled {
            if let Some(d) = f.data_ref() {
                me.pos += 1;
                me.sent += d.len() as u64;
            } else {
                me.trailers_sent = true;
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        let s = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        s.ended && self.pos >= s.total && (self.trailers_sent || s.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        match self.declared {
            Some(n) => SizeHint::with_exact(n.saturating_sub(self.sent)),
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::StreamBody;
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::ReceiverStream;

    type Tx = mpsc::Sender<Result<Frame<Bytes>, BoxError>>;

    fn source() -> (Tx, Source) {
        let (tx, rx) = mpsc::channel(4);
        (tx, StreamBody::new(ReceiverStream::new(rx)).boxed_unsync())
    }

    fn limits(buf: usize) -> BodyLimits {
        BodyLimits {
            retry_buffer_bytes: buf,
            max_body_bytes: None,
            idle: Duration::from_secs(5),
        }
    }

    async fn send(tx: &mut Tx, f: Frame<Bytes>) {
        tx.send(Ok(f)).await.expect("send");
    }

    async fn read_all(b: RequestBody) -> Result<(Vec<u8>, Option<HeaderMap>), BodyError> {
        let c = b.collect().await?;
        let t = c.trailers().cloned();
        Ok((c.to_bytes().to_vec(), t))
    }

    #[tokio::test]
    async fn a_body_that_fits_is_replayed_whole_with_its_trailers() {
        let (mut tx, src) = source();
        let rb = RetryBuffer::new(src, None, limits(100), StreamClock::default());
        let first = rb.attempt().expect("first");
        let reader = tokio::spawn(read_all(first));
        send(&mut tx, Frame::data(Bytes::from_static(b"hello "))).await;
        send(&mut tx, Frame::data(Bytes::from_static(b"world"))).await;
        let mut t = HeaderMap::new();
        t.insert("x-sum", "1".parse().expect("v"));
        send(&mut tx, Frame::trailers(t)).await;
        drop(tx);
        let (b, t) = reader.await.expect("join").expect("read");
        assert_eq!(b, b"hello world");
        assert_eq!(t.expect("trailers")["x-sum"], "1");
        assert!(rb.replayable());
        let (b2, t2) = read_all(rb.attempt().expect("second"))
            .await
            .expect("replay");
        assert_eq!(b2, b"hello world");
        assert!(t2.is_some());
        match &*rb.progress().borrow() {
            Progress::Complete(b) => assert_eq!(b.chunks.len(), 2),
            p => panic!("{p:?}"),
        }
    }

    #[tokio::test]
    async fn a_retry_mid_body_replays_then_reads_on() {
        let (mut tx, src) = source();
        let rb = RetryBuffer::new(src, None, limits(100), StreamClock::default());
        let mut first = rb.attempt().expect("first");
        send(&mut tx, Frame::data(Bytes::from_static(b"abc"))).await;
        let f = first.frame().await.expect("frame").expect("ok");
        assert_eq!(f.data_ref().map(|d| d.as_ref()), Some(&b"abc"[..]));
        // The upstream failed: a second attempt takes over.
        let second = rb.attempt().expect("second");
        assert_eq!(
            first.frame().await.map(|r| r.err()),
            Some(Some(BodyError::Superseded))
        );
        send(&mut tx, Frame::data(Bytes::from_static(b"def"))).await;
        drop(tx);
        let (b, _) = read_all(second).await.expect("read");
        assert_eq!(b, b"abcdef");
    }

    #[tokio::test]
    async fn a_body_over_the_buffer_streams_on_and_is_not_replayable() {
        let (mut tx, src) = source();
        let rb = RetryBuffer::new(src, None, limits(10), StreamClock::default());
        let mut progress = rb.progress();
        let reader = tokio::spawn(read_all(rb.attempt().expect("first")));
        for _ in 0..5 {
            send(&mut tx, Frame::data(Bytes::from_static(b"0123456"))).await;
        }
        drop(tx);
        let (b, _) = reader.await.expect("join").expect("read");
        assert_eq!(b.len(), 35);
        assert!(rb.overflowed() && !rb.replayable());
        assert_eq!(rb.received(), 35);
        assert_eq!(rb.attempt().err(), Some(BodyError::NotReplayable));
        progress.changed().await.ok();
        assert!(matches!(&*progress.borrow(), Progress::Gone));
    }

    #[tokio::test]
    async fn the_user_limit_and_the_idle_timeout_end_the_body() {
        let (mut tx, src) = source();
        let mut l = limits(100);
        l.max_body_bytes = Some(5);
        let rb = RetryBuffer::new(src, None, l, StreamClock::default());
        let reader = tokio::spawn(read_all(rb.attempt().expect("first")));
        send(&mut tx, Frame::data(Bytes::from_static(b"0123456"))).await;
        assert_eq!(
            reader.await.expect("join").err(),
            Some(BodyError::TooLarge(5))
        );
        assert_eq!(rb.failure(), Some(BodyError::TooLarge(5)));

        let (_tx, src) = source();
        let mut l = limits(100);
        l.idle = Duration::from_millis(50);
        let rb = RetryBuffer::new(src, None, l, StreamClock::default());
        let r = read_all(rb.attempt().expect("first")).await;
        assert!(matches!(r, Err(BodyError::Idle(_))), "{:?}", r.err());
    }

    #[tokio::test]
    async fn a_complete_copy_reads_whole() {
        let b = Buffered {
            chunks: vec![Bytes::from_static(b"ab"), Bytes::from_static(b"c")],
            trailers: None,
        };
        let rb = RetryBuffer::complete(&b);
        let body = rb.attempt().expect("attempt");
        assert_eq!(body.size_hint().exact(), Some(3));
        let (got, _) = read_all(body).await.expect("read");
        assert_eq!(got, b"abc");
    }
}
