//! Upgraded requests: WebSocket over HTTP/1.1 (`Upgrade: websocket`) and
//! over HTTP/2 (RFC 8441 extended CONNECT), and any other `Upgrade` token
//! the config allows. The upgrade request is judged like any request
//! (policy, route, header edits, rate limits; an HTTP/2 extended CONNECT is
//! seen as the HTTP/1.1 GET it stands for, as Envoy does); once the
//! upstream accepts (101, or 2xx to an extended CONNECT) the client gets
//! its own protocol's acceptance and bytes are relayed both ways until
//! either side closes, or the stream idle timeout passes with nothing
//! moving. An HTTP/1.1 client may reach an HTTP/2 upstream and the
//! reverse: the waypoint translates the handshake (RFC 8441 section 5).

use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncRead;
use tracing::debug;

use super::Waypoint;
use super::lifetime::InFlight;
use crate::body::RespBody;
use crate::idle::{IdleTimer, StreamClock};
use crate::proxy_metrics::{UpgradeBytesLabels, UpgradeLabels};
use crate::upstream::Proto;

const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// An upgrade a client asked for.
pub(super) struct Upgrade {
    /// The protocol, lower case (`websocket`).
    pub(super) token: String,
    /// The HTTP/1.1 client's `Sec-WebSocket-Key`, to answer with
    /// `Sec-WebSocket-Accept` when the upstream (HTTP/2) does not.
    key: Option<String>,
    downstream_h2: bool,
    on: OnUpgrade,
}

/// What a request asks for.
pub(super) enum Asked {
    Plain,
    Relay(Upgrade),
    /// An upgrade to a protocol the config does not allow (its token).
    Refuse(String),
}

/// The upgrade `req` asks for. An HTTP/2 extended CONNECT is rewritten
/// into the HTTP/1.1 GET it stands for; `Upgrade: h2c` is dropped (the
/// request is served as HTTP/1.1), as Envoy does.
pub(super) fn take(req: &mut Request<Incoming>, allowed: &[String]) -> Asked {
    let h2_protocol = (req.method() == Method::CONNECT)
        .then(|| req.extensions().get::<hyper::ext::Protocol>())
        .flatten()
        .map(|p| p.as_str().to_ascii_lowercase());
    let (token, downstream_h2) = match h2_protocol {
        Some(p) => (p, true),
        None => {
            let wants = req
                .headers()
                .get_all(header::CONNECTION)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
            let token = req
                .headers()
                .get(header::UPGRADE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(',').next())
                .map(|t| t.trim().to_ascii_lowercase());
            match token {
                Some(t) if wants && t != "h2c" => (t, false),
                _ => return Asked::Plain,
            }
        }
    };
    // A token with a version (`websocket/13`) is judged by its name.
    let name = token.split('/').next().unwrap_or_default();
    if !allowed.iter().any(|a| a.eq_ignore_ascii_case(name)) {
        return Asked::Refuse(token);
    }
    if downstream_h2 {
        *req.method_mut() = Method::GET;
        req.extensions_mut().remove::<hyper::ext::Protocol>();
    }
    let key = req
        .headers()
        .get("sec-websocket-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let on = hyper::upgrade::on(&mut *req);
    Asked::Relay(Upgrade {
        token,
        key,
        downstream_h2,
        on,
    })
}

/// The upstream request for an upgrade: HTTP/1.1 `Upgrade`, or an HTTP/2
/// extended CONNECT.
pub(super) fn upstream_request<B>(req: &mut Request<B>, token: &str, proto: Proto) {
    let h = req.headers_mut();
    match proto {
        Proto::Http1 => {
            h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            if let Ok(v) = HeaderValue::from_str(token) {
                h.insert(header::UPGRADE, v);
            }
            if token == "websocket" && !h.contains_key("sec-websocket-key") {
                let key = base64(&fastrand::u128(..).to_be_bytes());
                if let Ok(v) = HeaderValue::from_str(&key) {
                    h.insert("sec-websocket-key", v);
                }
            }
        }
        Proto::Http2 => {
            // Not used over HTTP/2 (RFC 8441 section 5).
            h.remove("sec-websocket-key");
            *req.method_mut() = Method::CONNECT;
            req.extensions_mut()
                .insert(hyper::ext::Protocol::from(token));
        }
    }
}

/// Whether the upstream took the upgrade.
pub(super) fn accepted(resp: &Response<Incoming>) -> bool {
    match resp.version() {
        Version::HTTP_2 => resp.status().is_success(),
        _ => resp.status() == StatusCode::SWITCHING_PROTOCOLS,
    }
}

fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let b = |i: usize| u32::from(c.get(i).copied().unwrap_or(0));
        let n = (b(0) << 16) | (b(1) << 8) | b(2);
        for i in 0..4 {
            if i <= c.len() {
                out.push(char::from(T[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `Sec-WebSocket-Accept` for a key (RFC 6455 section 4.2.2).
fn accept_key(key: &str) -> String {
    let d = ring::digest::digest(
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        format!("{key}{WS_GUID}").as_bytes(),
    );
    base64(d.as_ref())
}

/// What the relay keeps until it ends.
pub(super) struct Hold {
    pub(super) _in_flight: InFlight,
    pub(super) _admitted: crate::lb::Held,
    pub(super) clock: StreamClock,
    pub(super) service: String,
}

impl Waypoint {
    /// The client's acceptance of an upgrade the upstream took, and the
    /// relay (spawned) that carries its bytes.
    pub(super) fn upgraded(
        self: &Arc<Self>,
        up: Upgrade,
        upstream_on: OnUpgrade,
        mut resp: Response<RespBody>,
        hold: Hold,
    ) -> Response<RespBody> {
        resp.headers_mut().remove(header::CONTENT_LENGTH);
        if up.downstream_h2 {
            *resp.status_mut() = StatusCode::OK;
            resp.headers_mut().remove("sec-websocket-accept");
        } else {
            *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let h = resp.headers_mut();
            h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            if let Ok(v) = HeaderValue::from_str(&up.token) {
                h.insert(header::UPGRADE, v);
            }
            // An HTTP/2 upstream sends no accept: the waypoint answers the
            // client's key itself.
            if !h.contains_key("sec-websocket-accept")
                && let Some(k) = &up.key
                && let Ok(v) = HeaderValue::from_str(&accept_key(k))
            {
                h.insert("sec-websocket-accept", v);
            }
        }
        let wp = self.clone();
        tokio::spawn(async move { wp.relay(up, upstream_on, hold).await });
        resp
    }

    async fn relay(self: Arc<Self>, up: Upgrade, upstream_on: OnUpgrade, hold: Hold) {
        let both = async { tokio::try_join!(up.on, upstream_on) };
        let wait = self
            .cfg
            .limits
            .header_read_timeout
            .max(std::time::Duration::from_secs(10));
        let (down, upstream) = match tokio::time::timeout(wait, both).await {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => return debug!(error = %e, "upgrade not completed"),
            Err(_) => return debug!("upgrade not completed in time"),
        };
        let m = &self.http_metrics.proxy;
        m.upgrades
            .get_or_create(&UpgradeLabels {
                destination_service: hold.service.clone(),
                upgrade: up.token.clone(),
            })
            .inc();
        let idle = IdleTimer::new(hold.clock.clone(), self.cfg.limits.stream_idle_timeout);
        let mut a = Touching::new(TokioIo::new(down), hold.clock.clone());
        let mut b = Touching::new(TokioIo::new(upstream), hold.clock.clone());
        let copied = tokio::select! {
            r = tokio::io::copy_bidirectional(&mut a, &mut b) => r.ok(),
            _ = idle_expired(idle) => None,
        };
        let (received, sent) = copied.unwrap_or((a.read, b.read));
        for (direction, n) in [("received", received), ("sent", sent)] {
            m.upgrade_bytes
                .get_or_create(&UpgradeBytesLabels {
                    destination_service: hold.service.clone(),
                    upgrade: up.token.clone(),
                    direction,
                })
                .inc_by(n);
        }
        debug!(upgrade = %up.token, received, sent, "upgraded connection closed");
        drop(hold);
    }
}

async fn idle_expired(mut t: IdleTimer) {
    std::future::poll_fn(|cx| {
        if t.poll_expired(cx) {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await
}

/// A stream that touches its clock whenever bytes come in, and counts them.
struct Touching<S> {
    inner: S,
    clock: StreamClock,
    read: u64,
}

impl<S> Touching<S> {
    fn new(inner: S, clock: StreamClock) -> Self {
        Touching {
            inner,
            clock,
            read: 0,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Touching<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.read += n as u64;
            self.clock.touch();
        }
        r
    }
}

forward_async_write!(Touching, inner);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_is_rfc_6455s() {
        // The example of RFC 6455 section 1.3.
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert_eq!(base64(b"ab"), "YWI=");
    }
}
