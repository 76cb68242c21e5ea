//! The HTTP echo: answers with the caller's address, this pod's name, the
//! request line and headers, the size of the body (counted as it streams,
//! never held) and the request's trailers, which it also sends back as
//! response trailers (`x-echo-<name>`); a WebSocket (HTTP/1.1 Upgrade or
//! HTTP/2 extended CONNECT) is echoed frame by frame (`ws.rs`). Knobs: `/_fail`, `/_fail_next`,
//! `/_delay`, `/_stats`, and `/_bytes?n=N` (a download of N bytes).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

type Body = BoxBody<Bytes, Infallible>;

/// The echo server's run-time knobs and its count of requests served.
#[derive(Default)]
struct EchoState {
    fail_percent: AtomicU32,
    /// Fail this many of the next requests (then answer normally).
    fail_next: AtomicU32,
    delay_ms: AtomicU64,
    served: AtomicU64,
}

fn query_num(uri: &hyper::Uri, key: &str) -> Option<u64> {
    uri.query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.parse().ok()).flatten()
    })
}

/// The most `/_bytes` sends: 16 GiB.
const MAX_DOWNLOAD: u64 = 16 << 30;
const CHUNK: usize = 64 * 1024;

/// `n` bytes of zeros, streamed in 64 KiB chunks; with `stall`, a pause
/// that long after the first chunk.
fn download(n: u64, stall: Duration) -> Body {
    let chunk = Bytes::from(vec![0u8; CHUNK]);
    let n = n.min(MAX_DOWNLOAD);
    let frames = futures::stream::unfold(0u64, move |sent| {
        let chunk = chunk.clone();
        async move {
            if sent >= n {
                return None;
            }
            if sent > 0 && sent <= CHUNK as u64 && !stall.is_zero() {
                tokio::time::sleep(stall).await;
            }
            let len = (n - sent).min(CHUNK as u64) as usize;
            Some((
                Ok::<_, Infallible>(Frame::data(chunk.slice(..len))),
                sent + len as u64,
            ))
        }
    });
    StreamBody::new(frames).boxed()
}

/// Reads a body to its end without keeping it: its size and trailers.
async fn drain(mut body: Incoming) -> (u64, Option<HeaderMap>, Option<String>) {
    let mut n = 0u64;
    let mut trailers = None;
    while let Some(f) = body.frame().await {
        match f {
            Ok(f) => match f.into_data() {
                Ok(d) => n += d.len() as u64,
                Err(f) => trailers = f.into_trailers().ok(),
            },
            Err(e) => return (n, trailers, Some(e.to_string())),
        }
    }
    (n, trailers, None)
}

/// The body, then each request trailer back as `x-echo-<name>`.
fn with_trailers(body: String, trailers: &HeaderMap) -> Body {
    let mut back = HeaderMap::new();
    for (k, v) in trailers {
        if let Ok(name) = http::HeaderName::from_bytes(format!("x-echo-{k}").as_bytes()) {
            back.append(name, v.clone());
        }
    }
    let frames = vec![
        Ok::<_, Infallible>(Frame::data(Bytes::from(body))),
        Ok(Frame::trailers(back)),
    ];
    StreamBody::new(futures::stream::iter(frames)).boxed()
}

pub async fn http_echo(
    port: u16,
    fail_percent: u32,
    fail_status: u16,
    delay_ms: u64,
) -> std::io::Result<()> {
    let l = super::listen(port)?;
    // The pod's name: POD_NAME (the lab, a downward-API variable), else
    // HOSTNAME, which Kubernetes sets to it.
    let me = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "unknown".into());
    let state = Arc::new(EchoState::default());
    state.fail_percent.store(fail_percent, Ordering::Relaxed);
    state.delay_ms.store(delay_ms, Ordering::Relaxed);
    loop {
        let (s, peer) = l.accept().await?;
        let peer = super::peer_addr(peer);
        let me = me.clone();
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: hyper::Request<Incoming>| {
                answer(req, me.clone(), peer, state.clone(), fail_status)
            });
            // HTTP/2 with prior knowledge (h2c) or HTTP/1.1, by the preface.
            let mut first = [0u8; 4];
            let h2 = matches!(s.peek(&mut first).await, Ok(4) if &first == b"PRI ");
            if h2 {
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .enable_connect_protocol()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
            } else {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .with_upgrades()
                    .await;
            }
        });
    }
}

/// A WebSocket handshake (either version), answered and then echoed.
fn websocket(req: &mut hyper::Request<Incoming>) -> Option<hyper::Response<Body>> {
    let h2 = req.method() == http::Method::CONNECT
        && req
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str() == "websocket");
    let h1 = req
        .headers()
        .get(http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if !h1 && !h2 {
        return None;
    }
    let close_after = query_num(req.uri(), "close_after");
    let names: Vec<&str> = req.headers().keys().map(|k| k.as_str()).collect();
    let seen = names.join(",");
    let key = req
        .headers()
        .get("sec-websocket-key")
        .and_then(|v| v.to_str().ok())
        .map(super::ws::accept_key);
    let on = hyper::upgrade::on(&mut *req);
    tokio::spawn(async move {
        if let Ok(up) = on.await {
            let _ = super::ws::echo(TokioIo::new(up), close_after).await;
        }
    });
    let mut r = hyper::Response::new(Full::new(Bytes::new()).boxed());
    if h1 {
        *r.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
        let h = r.headers_mut();
        h.insert(
            http::header::UPGRADE,
            http::HeaderValue::from_static("websocket"),
        );
        h.insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("upgrade"),
        );
        if let Some(k) = key.and_then(|k| k.parse().ok()) {
            h.insert("sec-websocket-accept", k);
        }
    }
    if let Ok(v) = seen.parse() {
        r.headers_mut().insert("x-request-header-names", v);
    }
    if let Ok(v) = std::env::var("POD_NAME").unwrap_or_default().parse() {
        r.headers_mut().insert("x-pod", v);
    }
    Some(r)
}

async fn answer(
    mut req: hyper::Request<Incoming>,
    me: String,
    peer: std::net::SocketAddr,
    state: Arc<EchoState>,
    fail_status: u16,
) -> Result<hyper::Response<Body>, Infallible> {
    if let Some(r) = websocket(&mut req) {
        return Ok(r);
    }
    let seen = format!("{:?}", req.version());
    let wrap = |status: u16, body: Body| {
        let mut r = hyper::Response::new(body);
        if let Ok(v) = seen.parse() {
            r.headers_mut().insert("x-proto", v);
        }
        *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
        if let Ok(v) = me.parse() {
            r.headers_mut().insert("x-pod", v);
        }
        r
    };
    let plain = |status: u16, body: String| wrap(status, Full::new(Bytes::from(body)).boxed());
    match req.uri().path() {
        "/_fail" => {
            let p = query_num(req.uri(), "percent").unwrap_or(0) as u32;
            state.fail_percent.store(p, Ordering::Relaxed);
            return Ok(plain(200, format!("fail_percent={p}\n")));
        }
        "/_fail_next" => {
            let n = query_num(req.uri(), "n").unwrap_or(0) as u32;
            state.fail_next.store(n, Ordering::Relaxed);
            return Ok(plain(200, format!("fail_next={n}\n")));
        }
        "/_delay" => {
            let ms = query_num(req.uri(), "ms").unwrap_or(0);
            state.delay_ms.store(ms, Ordering::Relaxed);
            return Ok(plain(200, format!("delay_ms={ms}\n")));
        }
        "/_stats" => {
            return Ok(plain(
                200,
                format!("served={}\n", state.served.load(Ordering::Relaxed)),
            ));
        }
        "/_bytes" => {
            state.served.fetch_add(1, Ordering::Relaxed);
            let n = query_num(req.uri(), "n").unwrap_or(0);
            let stall = Duration::from_millis(query_num(req.uri(), "stall_ms").unwrap_or(0));
            return Ok(wrap(200, download(n, stall)));
        }
        _ => {}
    }
    state.served.fetch_add(1, Ordering::Relaxed);
    let delay = state.delay_ms.load(Ordering::Relaxed);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let mut body = format!("pod={me}\npeer={peer}\n{} {}\n", req.method(), req.uri());
    for (k, v) in req.headers() {
        body.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
    }
    let (n, trailers, err) = drain(req.into_body()).await;
    body.push_str(&format!("body-bytes: {n}\n"));
    if let Some(e) = err {
        body.push_str(&format!("body-error: {e}\n"));
    }
    for (k, v) in trailers.iter().flatten() {
        body.push_str(&format!("trailer {k}: {}\n", v.to_str().unwrap_or("?")));
    }
    let fail = state.fail_percent.load(Ordering::Relaxed);
    let fail_next = state
        .fail_next
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
        .is_ok();
    if fail_next || (fail > 0 && fastrand::u32(0..100) < fail) {
        return Ok(plain(fail_status, body));
    }
    Ok(match &trailers {
        Some(t) if !t.is_empty() => {
            let names: Vec<String> = t.keys().map(|k| format!("x-echo-{k}")).collect();
            let mut r = wrap(200, with_trailers(body, t));
            if let Ok(v) = names.join(", ").parse() {
                r.headers_mut().insert(http::header::TRAILER, v);
            }
            r
        }
        _ => plain(200, body),
    })
}
