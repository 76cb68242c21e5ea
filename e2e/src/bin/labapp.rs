//! The application processes the lab runs inside pods: a TCP echo, an HTTP
//! echo that reports who called and with which headers, and a client.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[path = "labapp/conn.rs"]
mod conn;
#[path = "labapp/dns.rs"]
mod dns;
#[path = "labapp/echo.rs"]
mod echo;
#[path = "labapp/grpc.rs"]
mod grpc;
#[path = "labapp/hbone.rs"]
mod hbone;
#[path = "labapp/raw.rs"]
mod raw;
#[path = "labapp/streamload.rs"]
mod streamload;
#[path = "labapp/trailers.rs"]
mod trailers;
#[path = "labapp/ws.rs"]
mod ws;

#[derive(Debug, Parser)]
#[command(about = "Lab application: echo servers and a client")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Echo every byte back; half-close after the client does.
    TcpEcho {
        #[arg(long, default_value_t = 9000)]
        port: u16,
    },
    /// Answer every HTTP request with the caller's address, this pod's name
    /// and the request headers.
    HttpEcho {
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Answer this share of requests (percent) with --fail-status;
        /// changeable at run time with `GET /_fail?percent=N`.
        #[arg(long, default_value_t = 0)]
        fail_percent: u32,
        #[arg(long, default_value_t = 503)]
        fail_status: u16,
        /// Wait this long before answering (`GET /_delay?ms=N` changes it).
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
    },
    /// Answer every HTTP/1.1 request with 200 and the same small body: the
    /// static server of the benchmarks (nothing per request but the answer).
    HttpStatic {
        #[arg(long, default_value_t = 8081)]
        port: u16,
        #[arg(long, default_value_t = 64)]
        body_bytes: usize,
    },
    /// Open `connections` TCP connections to a TCP echo at ip:port, keep them
    /// open for `seconds`, and send 8 bytes on each once a second (spread
    /// over the second), waiting for the echo. Prints a JSON summary:
    /// connections opened, pings answered, errors, round-trip percentiles.
    Hold {
        addr: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Per connect and per ping.
        #[arg(long, default_value_t = 5_000)]
        timeout_ms: u64,
    },
    /// Send `requests` GETs over `concurrency` kept-alive connections and
    /// print a JSON summary: statuses, the `x-pod` of each answer, latency
    /// percentiles, and answered requests per second.
    Load {
        url: String,
        #[arg(long, default_value_t = 100)]
        requests: usize,
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Extra request headers, `name: value`.
        #[arg(long = "header")]
        headers: Vec<String>,
        #[arg(long, default_value = "GET")]
        method: String,
        /// Per-request timeout.
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
        /// HTTP/2 with prior knowledge (h2c), one connection per worker.
        #[arg(long)]
        h2: bool,
    },
    /// GET a URL (http://ip:port/path) `count` times and print the answers.
    Get {
        url: String,
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// Extra request headers, `name: value`.
        #[arg(long = "header")]
        headers: Vec<String>,
        /// Print the response headers (`name: value`) after the status.
        #[arg(long)]
        show_headers: bool,
    },
    /// Write raw bytes to ip:port (an HTTP request made by hand, possibly
    /// malformed), optionally padded or sent slowly, and print the first
    /// line of the answer, or "closed" when none came.
    Raw {
        addr: SocketAddr,
        /// The request head; "\r\n" and "\n" escapes are turned into bytes.
        head: String,
        /// Add an `x-pad` header of this many bytes.
        #[arg(long, default_value_t = 0)]
        pad_header_bytes: usize,
        /// Then send this many body bytes.
        #[arg(long, default_value_t = 0)]
        body_bytes: usize,
        /// Send the head one byte at a time, this far apart (slowloris).
        #[arg(long, default_value_t = 0)]
        byte_delay_ms: u64,
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
    /// Break HTTP/2 flow control on an h2c connection and print the frames
    /// the server answers with ("GOAWAY <code>", "RST_STREAM <code>", ...).
    H2Abuse {
        addr: SocketAddr,
        /// "window-overflow": a WINDOW_UPDATE past 2^31-1; "data-flood":
        /// request body bytes far beyond the advertised window.
        #[arg(long, default_value = "window-overflow")]
        mode: String,
    },
    /// Open one HBONE tunnel by hand (mutual TLS and CONNECT to any
    /// `:authority`), print the CONNECT status and, when it opened, the
    /// first line of the answer to `--request`.
    Hbone(hbone::HboneArgs),
    /// Send `text` over TCP to ip:port and print what comes back.
    Send { addr: SocketAddr, text: String },
    /// Resolve a name with the system resolver and print its addresses.
    Resolve { name: String },
    /// Ask one DNS server (`ip:port`) over UDP for a name's A or AAAA
    /// records and print the addresses.
    Dns {
        server: SocketAddr,
        name: String,
        #[arg(default_value = "A")]
        qtype: String,
    },
    /// POST with request trailers; print the status, body and response
    /// trailers.
    Trailers(trailers::TrailersArgs),
    /// A WebSocket session (text, 10 MiB binary, ping, close), over
    /// HTTP/1.1 or (`--h2`) HTTP/2 extended CONNECT.
    Ws(ws::WsArgs),
    /// A gRPC echo (tonic, h2c): unary, server, client and bidirectional
    /// streaming.
    GrpcEcho {
        #[arg(long, default_value_t = 9090)]
        port: u16,
    },
    /// Messages on one long-lived stream (a gRPC bidirectional or
    /// client-streaming call, a WebSocket); prints a JSON summary.
    StreamLoad(streamload::StreamLoadArgs),
    /// Hold one connection (idle, or with a request every so often) until
    /// the server closes it; print when it did.
    Conn(conn::ConnArgs),
    /// Do nothing (a pod that only runs `lab exec` commands).
    Sleep,
    /// An external authorization server (Envoy's ext_authz gRPC API; see
    /// `e2e::extauthz`): allows requests with `x-ext-authz: allow`.
    ExtAuthz {
        #[arg(long, default_value_t = 9000)]
        port: u16,
    },
}

/// A listener on `port` for both families (the lab is dual-stack): one
/// IPv6 socket that also takes IPv4, whose peers it shows as v4-mapped
/// addresses (see [`peer_addr`]).
pub(crate) fn listen(port: u16) -> std::io::Result<TcpListener> {
    let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)?;
    s.set_only_v6(false)?;
    s.set_reuse_address(true)?;
    s.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)).into())?;
    s.listen(1024)?;
    s.set_nonblocking(true)?;
    TcpListener::from_std(s.into())
}

/// A peer as its own family: an IPv4 client of a [`listen`] socket is
/// shown as IPv4, not v4-mapped.
pub(crate) fn peer_addr(peer: SocketAddr) -> SocketAddr {
    SocketAddr::new(peer.ip().to_canonical(), peer.port())
}

async fn tcp_echo(port: u16) -> std::io::Result<()> {
    let l = listen(port)?;
    loop {
        let (mut s, _) = l.accept().await?;
        tokio::spawn(async move {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        });
    }
}

async fn http_static(port: u16, body_bytes: usize) -> std::io::Result<()> {
    let l = listen(port)?;
    let body = Bytes::from(vec![b'x'; body_bytes]);
    loop {
        let (s, _) = l.accept().await?;
        let _ = s.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |_req: hyper::Request<Incoming>| {
                let body = body.clone();
                async move { Ok::<_, Infallible>(hyper::Response::new(Full::new(body))) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(s), svc)
                .await;
        });
    }
}

/// The most connections `hold` opens: a bound on what one command can ask.
const HOLD_MAX_CONNECTIONS: usize = 20_000;
/// The longest `hold` keeps them.
const HOLD_MAX_SECONDS: u64 = 600;

/// `hold`'s summary.
#[derive(Default, serde::Serialize)]
struct HoldSummary {
    opened: usize,
    connect_errors: usize,
    first_error: Option<String>,
    pings: usize,
    ping_errors: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// From the first connect until every connection was open.
    open_ms: f64,
}

/// Raises this process's open-file limit to its hard limit (a thousand
/// sockets need more than the usual soft 1024).
fn raise_nofile() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

async fn hold(
    addr: SocketAddr,
    connections: usize,
    seconds: u64,
    timeout: Duration,
) -> Result<(), Box<dyn std::error::Error>> {
    if connections > HOLD_MAX_CONNECTIONS || seconds > HOLD_MAX_SECONDS {
        return Err(
            format!("at most {HOLD_MAX_CONNECTIONS} connections for {HOLD_MAX_SECONDS} s").into(),
        );
    }
    raise_nofile();
    let mut summary = HoldSummary::default();
    let started = std::time::Instant::now();
    // Open them all, 64 connects in flight at a time.
    let mut open = Vec::with_capacity(connections);
    let mut left = connections;
    while left > 0 {
        let batch = left.min(64);
        left -= batch;
        let tries = (0..batch).map(|_| tokio::time::timeout(timeout, TcpStream::connect(addr)));
        for r in futures::future::join_all(tries).await {
            match r {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    open.push(s);
                }
                Ok(Err(e)) => {
                    summary.connect_errors += 1;
                    summary.first_error.get_or_insert_with(|| e.to_string());
                }
                Err(_) => {
                    summary.connect_errors += 1;
                    summary
                        .first_error
                        .get_or_insert_with(|| "connect timed out".into());
                }
            }
        }
    }
    summary.opened = open.len();
    summary.open_ms = started.elapsed().as_secs_f64() * 1000.0;
    // Each connection pings once a second, at its own offset in the second,
    // until the deadline.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    let n = open.len().max(1) as u64;
    let mut tasks = Vec::with_capacity(open.len());
    for (i, mut s) in open.into_iter().enumerate() {
        let offset = Duration::from_micros(i as u64 * 1_000_000 / n);
        tasks.push(tokio::spawn(async move {
            let mut rtts = Vec::new();
            let mut errors = 0usize;
            let mut first_error = None;
            let mut tick = tokio::time::interval_at(
                tokio::time::Instant::now() + offset,
                Duration::from_secs(1),
            );
            loop {
                tick.tick().await;
                if tokio::time::Instant::now() >= deadline {
                    break;
                }
                let t = std::time::Instant::now();
                let ping = async {
                    s.write_all(b"ping1234").await?;
                    let mut back = [0u8; 8];
                    s.read_exact(&mut back).await?;
                    Ok::<_, std::io::Error>(())
                };
                match tokio::time::timeout(timeout, ping).await {
                    Ok(Ok(())) => rtts.push(t.elapsed().as_secs_f64() * 1000.0),
                    Ok(Err(e)) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| e.to_string());
                        break;
                    }
                    Err(_) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| "ping timed out".to_string());
                        break;
                    }
                }
            }
            (rtts, errors, first_error)
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        let (rtts, errors, first) = t.await?;
        lat.extend(rtts);
        summary.ping_errors += errors;
        if let Some(e) = first {
            summary.first_error.get_or_insert(e);
        }
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    let q = |f: f64| {
        lat.get(((lat.len() as f64 * f) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    summary.pings = lat.len();
    summary.p50_ms = q(0.5);
    summary.p99_ms = q(0.99);
    summary.max_ms = lat.last().copied().unwrap_or(0.0);
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

/// One load worker's connection.
enum Client {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

impl Client {
    fn is_closed(&self) -> bool {
        match self {
            Client::H1(c) => c.is_closed(),
            Client::H2(c) => c.is_closed(),
        }
    }

    async fn send(
        &mut self,
        req: hyper::Request<Empty<Bytes>>,
    ) -> Result<hyper::Response<Incoming>, hyper::Error> {
        match self {
            Client::H1(c) => {
                c.ready().await?;
                c.send_request(req).await
            }
            Client::H2(c) => {
                c.ready().await?;
                c.send_request(req).await
            }
        }
    }
}

/// A load run's summary.
#[derive(Default, serde::Serialize)]
struct LoadSummary {
    status: BTreeMap<u16, usize>,
    by_pod: BTreeMap<String, usize>,
    /// The HTTP version the server saw (its `x-proto`).
    by_proto: BTreeMap<String, usize>,
    errors: usize,
    first_error: Option<String>,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    /// Wall time of the whole run, and answered requests per second over it.
    elapsed_ms: f64,
    rps: f64,
}

async fn load(
    url: &str,
    requests: usize,
    concurrency: usize,
    headers: &[String],
    method: &str,
    timeout: Duration,
    h2: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let uri: hyper::Uri = url.parse()?;
    let host = uri.host().ok_or("no host")?.to_string();
    let port = uri.port_u16().unwrap_or(80);
    let addr = format!("{host}:{port}");
    let method: hyper::Method = method.parse()?;
    let mut extra = Vec::new();
    for h in headers {
        let (k, v) = h.split_once(':').ok_or("header must be name: value")?;
        extra.push((
            hyper::header::HeaderName::from_bytes(k.trim().as_bytes())?,
            hyper::header::HeaderValue::from_str(v.trim())?,
        ));
    }
    let next = Arc::new(AtomicU64::new(0));
    let run_started = std::time::Instant::now();
    let results = Arc::new(std::sync::Mutex::new((
        LoadSummary::default(),
        Vec::<f64>::new(),
    )));
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (next, results, uri, host, addr, method, extra) = (
            next.clone(),
            results.clone(),
            uri.clone(),
            host.clone(),
            addr.clone(),
            method.clone(),
            extra.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut conn: Option<Client> = None;
            while (next.fetch_add(1, Ordering::Relaxed) as usize) < requests {
                let started = std::time::Instant::now();
                let one = async {
                    if conn.as_ref().is_none_or(|c| c.is_closed()) {
                        let tcp = TcpStream::connect(&addr).await?;
                        conn = Some(if h2 {
                            let (s, c) = hyper::client::conn::http2::handshake(
                                hyper_util::rt::TokioExecutor::new(),
                                TokioIo::new(tcp),
                            )
                            .await?;
                            tokio::spawn(c);
                            Client::H2(s)
                        } else {
                            let (s, c) =
                                hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
                            tokio::spawn(c);
                            Client::H1(s)
                        });
                    }
                    let c = conn.as_mut().ok_or("no connection")?;
                    let mut b = hyper::Request::builder().method(method.clone());
                    b = if h2 {
                        b.uri(uri.clone())
                    } else {
                        b.uri(uri.clone()).header("host", &host)
                    };
                    for (k, v) in &extra {
                        b = b.header(k, v);
                    }
                    let resp = c.send(b.body(Empty::<Bytes>::new())?).await?;
                    let status = resp.status().as_u16();
                    let header = |name: &str| {
                        resp.headers()
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string)
                    };
                    let (pod, proto) = (header("x-pod"), header("x-proto"));
                    resp.into_body().collect().await?;
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, pod, proto))
                };
                let r = tokio::time::timeout(timeout, one).await;
                let ms = started.elapsed().as_secs_f64() * 1000.0;
                let mut g = results.lock().unwrap_or_else(|p| p.into_inner());
                match r {
                    Ok(Ok((status, pod, proto))) => {
                        *g.0.status.entry(status).or_default() += 1;
                        if let Some(p) = pod {
                            *g.0.by_pod.entry(p).or_default() += 1;
                        }
                        if let Some(p) = proto {
                            *g.0.by_proto.entry(p).or_default() += 1;
                        }
                        g.1.push(ms);
                    }
                    Ok(Err(e)) => {
                        g.0.errors += 1;
                        g.0.first_error.get_or_insert_with(|| e.to_string());
                        conn = None;
                    }
                    Err(_) => {
                        g.0.errors += 1;
                        g.0.first_error.get_or_insert_with(|| "timed out".into());
                        conn = None;
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let elapsed = run_started.elapsed().as_secs_f64();
    let (mut summary, mut lat) =
        std::mem::take(&mut *results.lock().unwrap_or_else(|p| p.into_inner()));
    lat.sort_by(|a, b| a.total_cmp(b));
    let q = |f: f64| {
        lat.get(((lat.len() as f64 * f) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    summary.p50_ms = q(0.5);
    summary.p90_ms = q(0.9);
    summary.p99_ms = q(0.99);
    summary.p999_ms = q(0.999);
    summary.max_ms = lat.last().copied().unwrap_or(0.0);
    summary.elapsed_ms = elapsed * 1000.0;
    summary.rps = if elapsed > 0.0 {
        lat.len() as f64 / elapsed
    } else {
        0.0
    };
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

async fn get(
    url: &str,
    count: usize,
    headers: &[String],
    show_headers: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let uri: hyper::Uri = url.parse()?;
    let host = uri.host().ok_or("no host")?.to_string();
    let port = uri.port_u16().unwrap_or(80);
    let addr = format!("{host}:{port}");
    for _ in 0..count {
        let tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&addr)).await??;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let mut b = hyper::Request::get(uri.clone()).header("host", &host);
        for h in headers {
            let (k, v) = h.split_once(':').ok_or("header must be name: value")?;
            b = b.header(k.trim(), v.trim());
        }
        let req = b.body(Empty::<Bytes>::new())?;
        let resp = tokio::time::timeout(Duration::from_secs(5), send.send_request(req)).await??;
        let status = resp.status();
        println!("{status}");
        if show_headers {
            for (k, v) in resp.headers() {
                println!("{k}: {}", String::from_utf8_lossy(v.as_bytes()));
            }
        }
        let body = resp.into_body().collect().await?.to_bytes();
        println!("{}", String::from_utf8_lossy(&body));
    }
    Ok(())
}

async fn send(addr: SocketAddr, text: &str) -> Result<(), Box<dyn std::error::Error>> {
    let mut s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await??;
    s.write_all(text.as_bytes()).await?;
    s.shutdown().await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await??;
    println!("{}", String::from_utf8_lossy(&out));
    Ok(())
}

#[tokio::main]
async fn main() {
    let r: Result<(), Box<dyn std::error::Error>> = match Args::parse().cmd {
        Cmd::TcpEcho { port } => tcp_echo(port).await.map_err(Into::into),
        Cmd::ExtAuthz { port } => {
            let pod = std::env::var("POD_NAME").unwrap_or_default();
            let addr = SocketAddr::from(([0, 0, 0, 0], port));
            e2e::extauthz::serve(addr, pod).await.map_err(Into::into)
        }
        Cmd::HttpEcho {
            port,
            fail_percent,
            fail_status,
            delay_ms,
        } => echo::http_echo(port, fail_percent, fail_status, delay_ms)
            .await
            .map_err(Into::into),
        Cmd::HttpStatic { port, body_bytes } => {
            http_static(port, body_bytes).await.map_err(Into::into)
        }
        Cmd::Hold {
            addr,
            connections,
            seconds,
            timeout_ms,
        } => {
            hold(
                addr,
                connections,
                seconds,
                Duration::from_millis(timeout_ms),
            )
            .await
        }
        Cmd::Load {
            url,
            requests,
            concurrency,
            headers,
            method,
            timeout_ms,
            h2,
        } => {
            load(
                &url,
                requests,
                concurrency,
                &headers,
                &method,
                Duration::from_millis(timeout_ms),
                h2,
            )
            .await
        }
        Cmd::Get {
            url,
            count,
            headers,
            show_headers,
        } => get(&url, count, &headers, show_headers).await,
        Cmd::Raw {
            addr,
            head,
            pad_header_bytes,
            body_bytes,
            byte_delay_ms,
            timeout_ms,
        } => {
            raw::raw(
                addr,
                &head,
                pad_header_bytes,
                body_bytes,
                byte_delay_ms,
                Duration::from_millis(timeout_ms),
            )
            .await
        }
        Cmd::Send { addr, text } => send(addr, &text).await,
        Cmd::H2Abuse { addr, mode } => raw::h2_abuse(addr, &mode).await,
        Cmd::Hbone(a) => hbone::run(&a).await,
        Cmd::Trailers(a) => trailers::run(&a).await,
        Cmd::Conn(a) => conn::run(&a).await,
        Cmd::Ws(a) => ws::client(&a).await,
        Cmd::StreamLoad(a) => streamload::run(&a).await,
        Cmd::GrpcEcho { port } => grpc::serve(port).await,
        Cmd::Resolve { name } => match tokio::net::lookup_host((name.as_str(), 0)).await {
            Ok(addrs) => {
                for a in addrs {
                    println!("{}", a.ip());
                }
                Ok(())
            }
            Err(e) => Err(e.into()),
        },
        Cmd::Dns {
            server,
            name,
            qtype,
        } => dns::ask(server, &name, &qtype).await,
        Cmd::Sleep => {
            std::future::pending::<()>().await;
            Ok(())
        }
    };
    if let Err(e) = r {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
