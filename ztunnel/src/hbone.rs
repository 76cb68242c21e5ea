//! HBONE: one HTTP/2 CONNECT stream per proxied TCP connection, over mutual
//! TLS to port 15008. The request and response rules live here so the
//! ztunnel and the waypoint speak it the same way.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Version};
use http_body_util::Empty;

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
    #[error("protocol {0:?} is not HTTP/2")]
    Version(String),
}

/// Checks a CONNECT request and returns its target.
pub fn parse_connect<B>(req: &Request<B>) -> Result<SocketAddr, BadRequest> {
    if req.version() != Version::HTTP_2 {
        return Err(BadRequest::Version(format!("{:?}", req.version())));
    }
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
pub fn connect_request(
    target: SocketAddr,
    h: &ConnectHeaders,
) -> Result<Request<Empty<Bytes>>, http::Error> {
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
    b.body(Empty::new())
}

/// A new W3C trace context for a connection that arrived without one.
pub fn new_traceparent() -> String {
    format!(
        "00-{:032x}-{:016x}-01",
        fastrand::u128(1..),
        fastrand::u64(1..)
    )
}

/// The status that says why a tunnel was not opened.
pub fn status_for_denied() -> StatusCode {
    StatusCode::UNAUTHORIZED
}

pub fn status_for_dial_failure() -> StatusCode {
    StatusCode::SERVICE_UNAVAILABLE
}

/// HTTP/2 client settings for HBONE.
pub fn client_builder(
    cfg: &H2Config,
) -> hyper::client::conn::http2::Builder<hyper_util::rt::TokioExecutor> {
    let mut b = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
    b.initial_stream_window_size(cfg.stream_window)
        .initial_connection_window_size(cfg.connection_window)
        .max_frame_size(cfg.max_frame_size)
        .max_header_list_size(cfg.max_header_list_size)
        .keep_alive_interval(cfg.keepalive_interval)
        .keep_alive_timeout(cfg.keepalive_timeout)
        .keep_alive_while_idle(true)
        .timer(hyper_util::rt::TokioTimer::new());
    b
}

/// HTTP/2 server settings for HBONE.
pub fn server_builder(
    cfg: &H2Config,
    max_streams: u32,
) -> hyper::server::conn::http2::Builder<hyper_util::rt::TokioExecutor> {
    let mut b = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
    b.initial_stream_window_size(cfg.stream_window)
        .initial_connection_window_size(cfg.connection_window)
        .max_frame_size(cfg.max_frame_size)
        .max_header_list_size(cfg.max_header_list_size)
        .max_concurrent_streams(max_streams)
        .keep_alive_interval(cfg.keepalive_interval)
        .keep_alive_timeout(cfg.keepalive_timeout)
        .timer(hyper_util::rt::TokioTimer::new());
    b
}
