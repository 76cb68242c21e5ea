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
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use http::{Method, Request, Response, StatusCode, Version};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

use crate::config::{H2Config, PROXY_PORTS};

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
        b = b.header(FORWARDED, format!("for=\"{f}\""));
    }
    if let Some(t) = &h.traceparent {
        b = b.header(TRACEPARENT, t);
    }
    b.body(())
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
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        H2Stream {
            send,
            recv,
            buf: Bytes::new(),
            write_closed: false,
        }
    }

    /// Aborts the tunnel: the peer sees a reset, not an end of stream.
    pub fn reset(&mut self) {
        self.send.send_reset(Reason::CONNECT_ERROR);
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

/// Client side: HTTP/2 over an established TLS connection. Returns the
/// request handle and the connection driver to spawn; the driver also sends
/// PINGs and gives up on a peer that stops answering them.
pub async fn client_handshake<IO>(
    io: IO,
    cfg: &H2Config,
) -> Result<
    (
        h2::client::SendRequest<Bytes>,
        impl Future<Output = Result<(), io::Error>> + Send + use<IO>,
    ),
    h2::Error,
>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, mut conn) = h2::client::Builder::new()
        .initial_window_size(cfg.stream_window)
        .initial_connection_window_size(cfg.connection_window)
        .max_frame_size(cfg.max_frame_size)
        .max_header_list_size(cfg.max_header_list_size)
        .handshake(io)
        .await?;
    let ping = conn.ping_pong();
    let (interval, timeout) = (cfg.keepalive_interval, cfg.keepalive_timeout);
    let driver = async move {
        tokio::select! {
            r = &mut conn => r.map_err(h2_io_error),
            _ = keepalive(ping, interval, timeout) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "peer stopped answering HTTP/2 PINGs",
            )),
        }
    };
    Ok((send, driver))
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
    Ok(H2Stream::new(send, resp.into_body()))
}

/// Server side: the answer to one CONNECT request.
pub struct Responder {
    respond: h2::server::SendResponse<Bytes>,
    recv: RecvStream,
}

impl Responder {
    /// Refuses with `status` and ends the stream.
    pub fn refuse(mut self, status: StatusCode) {
        let mut r = Response::new(());
        *r.status_mut() = status;
        let _ = self.respond.send_response(r, true);
    }

    /// Answers 200 and hands back the tunnel.
    pub fn accept(mut self) -> Result<H2Stream, h2::Error> {
        let send = self.respond.send_response(Response::new(()), false)?;
        Ok(H2Stream::new(send, self.recv))
    }
}

/// Serves HTTP/2 on an accepted TLS connection, calling `handler` for each
/// request stream. The preface must arrive within `handshake_timeout`; a peer
/// that stops answering PINGs is dropped. On `shutdown`, sends GOAWAY and
/// lets open streams finish.
pub async fn serve_connection<IO, F, Fut>(
    io: IO,
    cfg: &H2Config,
    max_streams: u32,
    handshake_timeout: Duration,
    shutdown: CancellationToken,
    handler: F,
) -> Result<(), io::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    F: Fn(Request<()>, Responder) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let handshake = h2::server::Builder::new()
        .initial_window_size(cfg.stream_window)
        .initial_connection_window_size(cfg.connection_window)
        .max_frame_size(cfg.max_frame_size)
        .max_header_list_size(cfg.max_header_list_size)
        .max_concurrent_streams(max_streams)
        .handshake(io);
    let mut conn = tokio::time::timeout(handshake_timeout, handshake)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no HTTP/2 preface in time"))?
        .map_err(h2_io_error)?;
    let ping = conn.ping_pong();
    let alive = keepalive(ping, cfg.keepalive_interval, cfg.keepalive_timeout);
    tokio::pin!(alive);
    let mut closing = false;
    loop {
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((req, respond))) => {
                    let (parts, recv) = req.into_parts();
                    tokio::spawn(handler(Request::from_parts(parts, ()), Responder { respond, recv }));
                }
                Some(Err(e)) => return Err(h2_io_error(e)),
                None => return Ok(()),
            },
            _ = &mut alive => {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "peer stopped answering HTTP/2 PINGs"));
            }
            _ = shutdown.cancelled(), if !closing => {
                closing = true;
                conn.graceful_shutdown();
            }
        }
    }
}
