//! HBONE: one HTTP/2 CONNECT stream per proxied TCP connection, over mutual
//! TLS to port 15008. Everything about speaking it lives here so the ztunnel
//! and the waypoint speak it the same way.
//!
//! Built on `h2` directly (not hyper's upgrade), for two reasons: a TCP reset
//! must travel as `RST_STREAM(CONNECT_ERROR)` and come out as a reset on the
//! far side (hyper reports a peer's reset as a clean EOF), and bytes go
//! straight between the socket and the stream without an extra task.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use futures::task::AtomicWaker;
use h2::{Reason, RecvStream, SendStream};
use http::{Method, Request, StatusCode, Version};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::config::{H2Config, PROXY_PORTS};

pub mod pool;
pub mod server;

pub use server::{
    Conn, Responder, Server, ServerConfigError, ServerConfigs, ServerSettings, StreamTasks,
    serve_connection,
};

pub const BAGGAGE: &str = "baggage";
pub const FORWARDED: &str = "forwarded";
pub const TRACEPARENT: &str = "traceparent";

/// Why a CONNECT request was refused with 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadRequest {
    #[error("method {0} is not CONNECT")]
    Method(String),
    #[error("no :authority")]
    NoAuthority,
    #[error(":authority {0:?} is not ip:port")]
    Authority(String),
    #[error("target port {0} is one of the proxy's own ports")]
    ProxyPort(u16),
}

/// Checks a CONNECT request and returns its target.
pub fn parse_connect<B>(req: &Request<B>) -> Result<SocketAddr, BadRequest> {
    if req.method() != Method::CONNECT {
        return Err(BadRequest::Method(req.method().to_string()));
    }
    let authority = req.uri().authority().ok_or(BadRequest::NoAuthority)?;
    let target: SocketAddr = authority
        .as_str()
        .parse()
        .map_err(|_| BadRequest::Authority(authority.to_string()))?;
    if PROXY_PORTS.contains(&target.port()) {
        return Err(BadRequest::ProxyPort(target.port()));
    }
    Ok(target)
}

/// Peer metadata and tracing headers sent with each CONNECT.
#[derive(Debug, Clone, Default)]
pub struct ConnectHeaders {
    /// W3C baggage with the source's k8s attributes.
    pub baggage: Option<String>,
    /// The original client address, sent as `forwarded: for="ip:port"`.
    pub forwarded_for: Option<SocketAddr>,
    /// The service hostname the client addressed, sent as `;host=` in
    /// `forwarded` (the peer then attributes the connection to it).
    pub forwarded_host: Option<String>,
    pub traceparent: Option<String>,
}

/// A CONNECT request for `target`.
pub fn connect_request(target: SocketAddr, h: &ConnectHeaders) -> Result<Request<()>, http::Error> {
    let mut b = Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string())
        .version(Version::HTTP_2);
    if let Some(v) = &h.baggage {
        b = b.header(BAGGAGE, v);
    }
    if let Some(f) = h.forwarded_for {
        b = b.header(FORWARDED, forwarded_value(f, h.forwarded_host.as_deref()));
    }
    if let Some(t) = &h.traceparent {
        b = b.header(TRACEPARENT, t);
    }
    b.body(())
}

/// The `forwarded` value: the original client, and the service it asked
/// for when it addressed one (`for="ip:port";host=<hostname>`).
pub fn forwarded_value(client: SocketAddr, service_host: Option<&str>) -> String {
    match service_host {
        Some(h) => format!("for=\"{client}\";host={h}"),
        None => format!("for=\"{client}\""),
    }
}

/// A new W3C trace context for a connection that arrived without one.
pub fn new_traceparent() -> String {
    format!(
        "00-{:032x}-{:016x}-01",
        fastrand::u128(1..),
        fastrand::u64(1..)
    )
}

/// One CONNECT stream as a byte stream. Shutdown sends END_STREAM (a
/// half-close); [`H2Stream::reset`] sends `RST_STREAM(CONNECT_ERROR)`, which
/// the far side reads as `ConnectionReset`.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    buf: Bytes,
    write_closed: bool,
    /// The `baggage` of the peer's 200, on a stream this side opened.
    peer_baggage: Option<String>,
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        H2Stream {
            send,
            recv,
            buf: Bytes::new(),
            write_closed: false,
            peer_baggage: None,
        }
    }

    /// What the destination said of itself on its 200 (`baggage`).
    pub fn peer_baggage(&self) -> Option<&str> {
        self.peer_baggage.as_deref()
    }

    /// Aborts the tunnel: the peer sees a reset, not an end of stream.
    pub fn reset(&mut self) {
        self.send.send_reset(Reason::CONNECT_ERROR);
    }

    /// The two directions, to run at once.
    pub fn split(&mut self) -> (H2Send<'_>, H2Recv<'_>) {
        let H2Stream {
            send,
            recv,
            buf,
            write_closed,
            ..
        } = self;
        (H2Send { send, write_closed }, H2Recv { recv, buf })
    }
}

/// The sending half of an [`H2Stream`], for copies that hand over whole
/// buffers instead of copying them through `AsyncWrite`.
pub struct H2Send<'a> {
    send: &'a mut SendStream<Bytes>,
    write_closed: &'a mut bool,
}

impl H2Send<'_> {
    /// Sends `data` as DATA frames as the peer's window allows.
    pub async fn send_bytes(&mut self, mut data: Bytes) -> io::Result<()> {
        while !data.is_empty() {
            self.send.reserve_capacity(data.len());
            let n = match std::future::poll_fn(|cx| self.send.poll_capacity(cx)).await {
                None => return Err(io::ErrorKind::BrokenPipe.into()),
                Some(Err(e)) => return Err(h2_io_error(e)),
                Some(Ok(0)) => continue,
                Some(Ok(n)) => n.min(data.len()),
            };
            self.send
                .send_data(data.split_to(n), false)
                .map_err(h2_io_error)?;
        }
        Ok(())
    }

    /// Ends this side of the tunnel (END_STREAM): a half-close.
    pub fn send_end(&mut self) -> io::Result<()> {
        if !*self.write_closed {
            *self.write_closed = true;
            self.send
                .send_data(Bytes::new(), true)
                .map_err(h2_io_error)?;
        }
        Ok(())
    }
}

/// The receiving half of an [`H2Stream`].
pub struct H2Recv<'a> {
    recv: &'a mut RecvStream,
    buf: &'a mut Bytes,
}

impl H2Recv<'_> {
    /// The next received bytes as they arrived; None at the end of the
    /// stream. The window opens again only on [`H2Recv::release`], once
    /// the bytes are passed on: backpressure.
    pub async fn recv_bytes(&mut self) -> io::Result<Option<Bytes>> {
        if !self.buf.is_empty() {
            return Ok(Some(std::mem::take(self.buf)));
        }
        match self.recv.data().await {
            None => Ok(None),
            Some(Ok(b)) => Ok(Some(b)),
            // A peer may end its side with RST_STREAM(NO_ERROR).
            Some(Err(e)) if e.reason() == Some(Reason::NO_ERROR) => Ok(None),
            Some(Err(e)) => Err(h2_io_error(e)),
        }
    }

    /// Gives back `n` bytes of receive window.
    pub fn release(&mut self, n: usize) {
        let _ = self.recv.flow_control().release_capacity(n);
    }
}

fn h2_io_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"));
    }
    match e.reason() {
        Some(Reason::NO_ERROR) => io::Error::new(io::ErrorKind::UnexpectedEof, e),
        Some(_) => io::Error::new(io::ErrorKind::ConnectionReset, e),
        None => io::Error::other(e),
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.buf.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Ok(b)) => self.buf = b,
                // A peer may end its side with RST_STREAM(NO_ERROR).
                Some(Err(e)) if e.reason() == Some(Reason::NO_ERROR) => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(h2_io_error(e))),
            }
        }
        let n = self.buf.len().min(out.remaining());
        out.put_slice(&self.buf[..n]);
        self.buf.advance(n);
        // Open the window only as the bytes are consumed: backpressure.
        let _ = self.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.send.reserve_capacity(buf.len());
        loop {
            match ready!(self.send.poll_capacity(cx)) {
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
                Some(Err(e)) => return Poll::Ready(Err(h2_io_error(e))),
                Some(Ok(0)) => continue,
                Some(Ok(n)) => {
                    let n = n.min(buf.len());
                    self.send
                        .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                        .map_err(h2_io_error)?;
                    return Poll::Ready(Ok(n));
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.write_closed {
            self.write_closed = true;
            self.send
                .send_data(Bytes::new(), true)
                .map_err(h2_io_error)?;
        }
        Poll::Ready(Ok(()))
    }
}

/// Why opening a tunnel failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    #[error("building the request: {0}")]
    Request(#[from] http::Error),
    #[error("peer answered {0} to CONNECT")]
    Status(StatusCode),
    #[error("no answer to CONNECT within {0:?}")]
    Timeout(Duration),
}

impl OpenError {
    /// The connection (not just this stream) is unusable.
    pub fn connection_gone(&self) -> bool {
        matches!(self, OpenError::H2(e) if e.is_go_away() || e.is_io() || (e.reason().is_none() && !e.is_reset()))
    }
}

/// A future run inside an HTTP/2 connection's own task (see [`StreamRunner`]).
type StreamJob = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Runs a stream's copy inside the task that drives its HTTP/2 connection.
/// Each byte of a tunnelled request otherwise wakes two tasks per side (the
/// stream's copy and the connection's driver), often on different runtime
/// threads; in one task the read, the framing, TLS and the write happen in
/// one turn, as in an event-loop proxy (`just bench`, scenario 4).
#[derive(Clone)]
pub struct StreamRunner {
    tx: tokio::sync::mpsc::UnboundedSender<StreamJob>,
}

impl StreamRunner {
    /// Runs `fut` on the connection's task; when that task has already
    /// ended, on a task of its own.
    pub fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        if let Err(tokio::sync::mpsc::error::SendError(job)) = self.tx.send(Box::pin(fut)) {
            tokio::spawn(job);
        }
    }
}

/// The waker a connection's task hands to everything it polls. A wake that
/// comes from inside the task's own turn (a stream wrote data the connection
/// must send; the connection read data a stream must copy) only asks for
/// another pass of the turn. Woken through the runtime instead, the task
/// would be queued again as a yield and another worker thread woken to
/// steal it: a futex wake and a context switch per hop, which made 64-byte
/// ping-pong 30 µs slower (`just bench`, scenario 3).
struct Turn {
    task: AtomicWaker,
    in_turn: AtomicBool,
    woken: AtomicBool,
}

impl std::task::Wake for Turn {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::SeqCst);
        if !self.in_turn.load(Ordering::SeqCst) {
            self.task.wake();
        }
    }
}

/// At most this many passes in one turn before yielding to the runtime.
const MAX_PASSES: usize = 2;

impl Turn {
    fn new() -> (Arc<Self>, Waker) {
        let turn = Arc::new(Turn {
            task: AtomicWaker::new(),
            in_turn: AtomicBool::new(false),
            woken: AtomicBool::new(false),
        });
        let waker = Waker::from(turn.clone());
        (turn, waker)
    }

    /// Runs `pass` with this turn's waker until nothing it polled woke it
    /// again (or the task's cooperative budget is spent).
    fn poll<T>(
        &self,
        waker: &Waker,
        cx: &mut Context<'_>,
        mut pass: impl FnMut(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        self.task.register(cx.waker());
        crate::spin::note_work();
        let mut inner = Context::from_waker(waker);
        for _ in 0..MAX_PASSES {
            self.woken.store(false, Ordering::SeqCst);
            self.in_turn.store(true, Ordering::SeqCst);
            let r = pass(&mut inner);
            self.in_turn.store(false, Ordering::SeqCst);
            if r.is_ready() {
                return r;
            }
            if !self.woken.load(Ordering::SeqCst) {
                return Poll::Pending;
            }
            if !tokio::task::coop::has_budget_remaining() {
                break;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// Polls every ready stream job once more; returns when none is ready.
fn poll_jobs(jobs: &mut FuturesUnordered<StreamJob>, cx: &mut Context<'_>) {
    while let Poll::Ready(Some(())) = jobs.poll_next_unpin(cx) {}
}

/// Client side: HTTP/2 over an established TLS connection. Returns the
/// request handle, the [`StreamRunner`] for the streams opened on it, and
/// the connection's driver to spawn. The driver sends PINGs and gives up on
/// a peer that stops answering them; when the connection ends it calls
/// `on_closed`, then runs the streams it holds to their end (they see the
/// connection's error) before it returns.
pub async fn client_handshake<IO, C>(
    io: IO,
    cfg: &H2Config,
    on_closed: C,
) -> Result<
    (
        h2::client::SendRequest<Bytes>,
        StreamRunner,
        impl Future<Output = ()> + Send + use<IO, C>,
    ),
    h2::Error,
>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    C: FnOnce(Result<(), io::Error>) + Send + 'static,
{
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(cfg.stream_window)
        .initial_connection_window_size(cfg.connection_window)
        .max_frame_size(cfg.max_frame_size)
        .max_header_list_size(cfg.max_header_list_size)
        .handshake(io)
        .await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<StreamJob>();
    let (interval, timeout) = (cfg.keepalive_interval, cfg.keepalive_timeout);
    let driver = async move {
        let mut conn = Some(conn);
        let ping = conn.as_mut().and_then(|c| c.ping_pong());
        let alive = keepalive(ping, interval, timeout);
        tokio::pin!(alive);
        let mut on_closed = Some(on_closed);
        let mut jobs = FuturesUnordered::<StreamJob>::new();
        let mut no_more_jobs = false;
        let (turn, waker) = Turn::new();
        std::future::poll_fn(|cx| {
            turn.poll(&waker, cx, |cx| {
                loop {
                    while !no_more_jobs {
                        match rx.poll_recv(cx) {
                            Poll::Ready(Some(job)) => jobs.push(job),
                            Poll::Ready(None) => no_more_jobs = true,
                            Poll::Pending => break,
                        }
                    }
                    poll_jobs(&mut jobs, cx);
                    if let Some(c) = conn.as_mut() {
                        let ended = match Pin::new(c).poll(cx) {
                            Poll::Ready(r) => Some(r.map_err(h2_io_error)),
                            Poll::Pending => keepalive_lapsed(alive.as_mut(), cx),
                        };
                        if let Some(r) = ended {
                            // Dropping the connection fails its open streams.
                            conn = None;
                            rx.close();
                            if let Some(f) = on_closed.take() {
                                f(r);
                            }
                            continue;
                        }
                        // Data just read may have woken streams: run them now.
                        poll_jobs(&mut jobs, cx);
                    }
                    if conn.is_none() && no_more_jobs && jobs.is_empty() {
                        return Poll::Ready(());
                    }
                    return Poll::Pending;
                }
            })
        })
        .await
    };
    Ok((send, StreamRunner { tx }, driver))
}

/// The connection's end when its PING keepalive has given up.
fn keepalive_lapsed(
    alive: Pin<&mut impl Future<Output = ()>>,
    cx: &mut Context<'_>,
) -> Option<Result<(), io::Error>> {
    alive.poll(cx).is_ready().then(|| {
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "peer stopped answering HTTP/2 PINGs",
        ))
    })
}

async fn keepalive(ping: Option<h2::PingPong>, interval: Duration, timeout: Duration) {
    let Some(mut ping) = ping else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
    }
}

/// Opens one CONNECT stream; succeeds only on 200, within `timeout`.
pub async fn open(
    sender: &h2::client::SendRequest<Bytes>,
    target: SocketAddr,
    headers: &ConnectHeaders,
    timeout: Duration,
) -> Result<H2Stream, OpenError> {
    tokio::time::timeout(timeout, open_inner(sender, target, headers))
        .await
        .map_err(|_| OpenError::Timeout(timeout))?
}

async fn open_inner(
    sender: &h2::client::SendRequest<Bytes>,
    target: SocketAddr,
    headers: &ConnectHeaders,
) -> Result<H2Stream, OpenError> {
    let mut sender = sender.clone().ready().await?;
    let (resp, send) = sender.send_request(connect_request(target, headers)?, false)?;
    let resp = resp.await?;
    if resp.status() != StatusCode::OK {
        return Err(OpenError::Status(resp.status()));
    }
    let baggage = resp
        .headers()
        .get(BAGGAGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut s = H2Stream::new(send, resp.into_body());
    s.peer_baggage = baggage;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_util::sync::CancellationToken;

    const WAIT: Duration = Duration::from_secs(10);

    /// Real h2 over an in-memory pipe: an echo stream runs on the client
    /// connection's task and on the server connection's task, the driver
    /// reports the connection's end, and a runner whose connection is gone
    /// still runs what it is handed.
    #[tokio::test]
    async fn streams_run_on_their_connection_and_after_it() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            serve_connection(
                b,
                &H2Config::default(),
                10,
                WAIT,
                CancellationToken::new(),
                StreamTasks::Inline,
                |_req, respond: Responder| async move {
                    let mut t = respond
                        .accept_with_baggage(Some("k8s.namespace.name=shop,service.name=server"))
                        .expect("answer 200");
                    let mut got = Vec::new();
                    t.read_to_end(&mut got).await.expect("read the request");
                    t.write_all(&got).await.expect("echo");
                    t.shutdown().await.expect("end");
                },
            )
            .await
        });
        let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
        let (send, runner, driver) = client_handshake(a, &H2Config::default(), move |r| {
            let _ = closed_tx.send(r.is_ok());
        })
        .await
        .expect("handshake");
        let driver = tokio::spawn(driver);
        let target: SocketAddr = "10.1.2.3:8080".parse().expect("addr");
        let mut s = open(&send, target, &ConnectHeaders::default(), WAIT)
            .await
            .expect("CONNECT");
        // The destination named itself on its 200.
        assert_eq!(
            s.peer_baggage(),
            Some("k8s.namespace.name=shop,service.name=server")
        );
        let (tx, rx) = tokio::sync::oneshot::channel();
        runner.spawn(async move {
            s.write_all(b"ping over HBONE").await.expect("write");
            s.shutdown().await.expect("half-close");
            let mut out = Vec::new();
            s.read_to_end(&mut out).await.expect("read the echo");
            let _ = tx.send(out);
        });
        let echoed = tokio::time::timeout(WAIT, rx).await.expect("in time");
        assert_eq!(echoed.expect("the stream ran"), b"ping over HBONE");

        // No handle and no stream left: the connection closes cleanly and
        // the driver returns.
        drop(send);
        let clean = tokio::time::timeout(WAIT, closed_rx)
            .await
            .expect("in time");
        assert_eq!(clean.ok(), Some(true));
        tokio::time::timeout(WAIT, driver)
            .await
            .expect("driver ends")
            .expect("driver did not panic");
        let served = tokio::time::timeout(WAIT, server)
            .await
            .expect("server ends");
        assert!(served.expect("no panic").is_ok());

        let (tx, rx) = tokio::sync::oneshot::channel();
        runner.spawn(async move {
            let _ = tx.send(());
        });
        tokio::time::timeout(WAIT, rx)
            .await
            .expect("in time")
            .expect("ran on a task of its own");
    }
}
