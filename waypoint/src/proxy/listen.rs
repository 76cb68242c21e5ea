//! Where connections come in: the HBONE listener (mutual TLS as the
//! waypoint's identity, then one CONNECT stream per client connection,
//! its protocol declared or sniffed) and the ingress listeners (TLS or
//! plain HTTP from outside the mesh), each served as HTTP/1, HTTP/2 or
//! opaque TCP until the drain.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use http::{Request, StatusCode};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_core::hbone::{self, Conn, Responder};
use mesh_core::identity::Identity;
use mesh_core::listen::accept_until;
use mesh_core::state::Workload;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::attach;
use crate::h1guard::{self, Framing, Scanner, Verdicts};
use crate::ingress::{self, IngressTable};
use crate::routes::PortProtocol;

use super::lifetime::{ConnActivity, Ended, serve_conn};
use super::sniff::{Rewind, Sniffed, sniff};
use super::{Downstream, IngressScope, Waypoint};

/// The TLS config of one ingress port: TLS 1.2 and 1.3 for clients outside
/// the mesh, no client certificate, the certificate chosen by SNI.
fn ingress_server_config(table: IngressTable, port: u16) -> Result<ServerConfig, rustls::Error> {
    let mut cfg = ServerConfig::builder_with_provider(mesh_core::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(ingress::SniResolver { table, port }));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Closes an HTTP/1 connection the way servers must when a client may still
/// be sending (an answer given before the body was read, such as 413, or a
/// malformed request): on shutdown, end our side, then read and drop what
/// keeps coming for a little while, so the client reads the answer instead
/// of a reset that discards it.
struct Linger<S> {
    inner: S,
    shut: bool,
    until: Option<Pin<Box<tokio::time::Sleep>>>,
    drained: usize,
}

const LINGER: Duration = Duration::from_secs(2);
const LINGER_MAX_BYTES: usize = 16 * 1024 * 1024;

impl<S> Linger<S> {
    fn new(inner: S) -> Self {
        Linger {
            inner,
            shut: false,
            until: None,
            drained: 0,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Linger<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Linger<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let me = &mut *self;
        if !me.shut {
            std::task::ready!(Pin::new(&mut me.inner).poll_shutdown(cx))?;
            me.shut = true;
            me.until = Some(Box::pin(tokio::time::sleep(LINGER)));
        }
        let mut scratch = [0u8; 8192];
        loop {
            if me
                .until
                .as_mut()
                .is_some_and(|u| u.as_mut().poll(cx).is_ready())
            {
                return Poll::Ready(Ok(()));
            }
            let mut rb = ReadBuf::new(&mut scratch);
            match Pin::new(&mut me.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if rb.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => {
                    me.drained += rb.filled().len();
                    if me.drained >= LINGER_MAX_BYTES {
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Counts open downstream connections while alive.
struct OpenGuard(tokio::sync::watch::Sender<usize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Why an ingress connection was refused before any request: each is
/// logged a few times per period at most (`loglimit`), as a flood of them
/// would fill the log.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    Unattributable,
    TlsRefused,
    TlsTimeout,
}

impl Refusal {
    fn key(self) -> &'static str {
        match self {
            Refusal::Unattributable => "unattributable",
            Refusal::TlsRefused => "tls_refused",
            Refusal::TlsTimeout => "tls_timeout",
        }
    }

    fn message(self) -> &'static str {
        match self {
            Refusal::Unattributable => {
                "ingress connection from a link-local, unspecified or multicast address refused"
            }
            Refusal::TlsRefused => "TLS handshake refused",
            Refusal::TlsTimeout => "TLS handshake timed out",
        }
    }
}

impl Waypoint {
    /// Logs a refused ingress connection: one line per reason per
    /// `loglimit::EVERY`, with how many were left out since the last.
    fn refused(&self, why: Refusal, peer: SocketAddr, port: u16, error: Option<&std::io::Error>) {
        let Some(suppressed) = self.refusals.admit(why.key(), std::time::Instant::now()) else {
            return;
        };
        let what = why.message();
        match error {
            Some(e) => {
                info!(%peer, port, reason = %e, suppressed, "{what} (one line per reason every 10 s; suppressed: left out since)")
            }
            None => {
                info!(%peer, port, suppressed, "{what} (one line per reason every 10 s; suppressed: left out since)")
            }
        }
    }

    /// Every `loglimit::EVERY` until the drain starts: one line per reason
    /// whose refusals were left out of the log and no line has counted
    /// since (a burst followed by silence still has its count written).
    pub async fn log_left_out_refusals(self: Arc<Self>) {
        let draining = self.draining.clone();
        let mut tick = tokio::time::interval(crate::loglimit::EVERY);
        loop {
            tokio::select! {
                _ = draining.cancelled() => return,
                _ = tick.tick() => {}
            }
            for (reason, suppressed) in self.refusals.due(std::time::Instant::now()) {
                info!(
                    reason,
                    suppressed,
                    "ingress connections refused and left out of the log in the last 10 s"
                );
            }
        }
    }

    /// Accepts HBONE connections until the drain starts.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let draining = self.draining.clone();
        accept_until(&listener, draining.cancelled(), |tcp, peer| {
            self.open.send_modify(|n| *n += 1);
            let guard = OpenGuard(self.open.clone());
            tokio::spawn(self.clone().connection(tcp, peer, guard));
        })
        .await
    }

    async fn connection(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr, _open: OpenGuard) {
        let local = match tcp.local_addr() {
            Ok(a) => a,
            Err(e) => return warn!(%peer, error = %e, "no local address"),
        };
        let wp = self.clone();
        let handler = move |req: Request<()>, respond: Responder, src: Identity| {
            let wp = wp.clone();
            async move { wp.stream(req, respond, peer, src).await }
        };
        let conn = Conn { tcp, peer, local };
        self.hbone.serve(conn, &self.identity, handler).await
    }

    /// Accepts on one ingress listener port until the port is closed (the
    /// Gateway no longer has it) or the drain starts.
    pub async fn serve_ingress(
        self: Arc<Self>,
        listener: TcpListener,
        port: u16,
        closed: CancellationToken,
    ) {
        let tls = match ingress_server_config(self.ingress.clone(), port) {
            Ok(c) => Arc::new(c),
            Err(e) => return warn!(port, error = %e, "ingress TLS config failed; port not served"),
        };
        let draining = self.draining.clone();
        let stop = async {
            tokio::select! {
                _ = draining.cancelled() => {}
                _ = closed.cancelled() => {}
            }
        };
        accept_until(&listener, stop, |tcp, peer| {
            // A client is attributed by its address: one that names no
            // workload and may be anyone on the link is refused.
            if !mesh_core::state::decide::attributable_peer(peer.ip()) {
                drop(tcp);
                return self.refused(Refusal::Unattributable, peer, port, None);
            }
            self.open.send_modify(|n| *n += 1);
            let guard = OpenGuard(self.open.clone());
            tokio::spawn(
                self.clone()
                    .ingress_connection(tcp, peer, port, tls.clone(), guard),
            );
        })
        .await
    }

    /// One client connection on an ingress port: TLS (HTTPS listeners) or
    /// plain, then HTTP/1 or HTTP/2 (ALPN, or the h2c preface).
    async fn ingress_connection(
        self: Arc<Self>,
        mut tcp: TcpStream,
        peer: SocketAddr,
        port: u16,
        tls: Arc<ServerConfig>,
        _open: OpenGuard,
    ) {
        let _ = tcp.set_nodelay(true);
        let target = tcp
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::new(self.cfg.ingress_bind, port));
        let Some(p) = self.ingress.port(port) else {
            return debug!(%peer, port, "port no longer configured; closing");
        };
        let service_key = format!("{}:{port}", self.ingress.load().gateway);
        // No identity: the source is the workload with the peer's address
        // in the state, as the ztunnel's plaintext inbound attributes it.
        let (src_workload, src_addrs) = self.source(peer.ip(), None);
        let ds = |protocol, sni| {
            Arc::new(Downstream {
                peer,
                src_identity: None,
                src_workload: src_workload.clone(),
                src_addrs: src_addrs.clone(),
                service_key: service_key.clone(),
                target,
                protocol,
                ingress: Some(IngressScope {
                    port,
                    https: p.https,
                    sni,
                }),
            })
        };
        if p.https {
            let accepted = tokio::time::timeout(
                self.cfg.handshake_timeout,
                TlsAcceptor::from(tls).accept(tcp),
            )
            .await;
            let stream = match accepted {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    return self.refused(Refusal::TlsRefused, peer, port, Some(&e));
                }
                Err(_) => return self.refused(Refusal::TlsTimeout, peer, port, None),
            };
            let (_, conn) = stream.get_ref();
            let sni = conn.server_name().map(str::to_string);
            let h2 = conn.alpn_protocol() == Some(b"h2");
            let ds = ds(if h2 { "http2" } else { "http" }, sni);
            return self.serve_http(stream, ds, h2).await;
        }
        // Plain HTTP: HTTP/1, or HTTP/2 with prior knowledge (its preface).
        let mut buf = BytesMut::with_capacity(64);
        let read = tokio::time::timeout(
            self.cfg.limits.header_read_timeout,
            sniff(&mut tcp, &mut buf),
        )
        .await;
        let h2 = match read {
            Ok(Ok(Sniffed::Http2)) => true,
            Ok(Ok(_)) => false,
            Ok(Err(e)) => return debug!(%peer, error = %e, "client failed before its first bytes"),
            Err(_) => return debug!(%peer, port, "no request within the header timeout; closing"),
        };
        let io = Rewind {
            prefix: buf.freeze(),
            inner: tcp,
        };
        let ds = ds(if h2 { "http2" } else { "http" }, None);
        self.serve_http(io, ds, h2).await
    }

    /// The workload a peer is attributed to (by its address in the state,
    /// never by a header) and the addresses its IP blocks are judged on
    /// (`decide::attributed`): the same on the HBONE and plaintext paths.
    fn source(
        &self,
        peer: std::net::IpAddr,
        identity: Option<&Identity>,
    ) -> (Option<Arc<Workload>>, Vec<std::net::IpAddr>) {
        crate::authz::attribute_source(&self.state.snapshot(), &self.cfg.network, peer, identity)
    }

    /// One CONNECT stream: one downstream TCP connection of a client.
    async fn stream(
        self: Arc<Self>,
        req: Request<()>,
        respond: Responder,
        peer: SocketAddr,
        src: Identity,
    ) {
        let target = match hbone::parse_connect(&req) {
            Ok(t) => t,
            Err(e) => {
                info!(%peer, identity = %src, reason = %e, "HBONE request refused (400)");
                return respond.refuse(StatusCode::BAD_REQUEST);
            }
        };
        let snap = self.state.snapshot();
        // Only a destination that names this waypoint (attach.rs).
        let service_key = match attach::serves(&snap, &self.routes, &self.cfg, target.ip()) {
            Ok(k) => k,
            Err(refusal) => {
                info!(%peer, %target, identity = %src, reason = %refusal, "HBONE target refused ({})", refusal.status().as_u16());
                return respond.refuse(refusal.status());
            }
        };
        drop(snap);
        let (src_workload, src_addrs) = self.source(peer.ip(), Some(&src));
        let protocol = self
            .routes
            .get(&service_key)
            .map(|s| s.protocol(target.port()))
            .unwrap_or(PortProtocol::Sniff);
        let mut tunnel = match respond.accept() {
            Ok(t) => t,
            Err(e) => return debug!(%peer, error = %e, "answering CONNECT failed"),
        };
        let limits = &self.cfg.limits;
        // Sniff unless the port says TCP; a declared HTTP port still tells
        // HTTP/1 from HTTP/2 by the preface.
        let mut buf = BytesMut::with_capacity(64);
        let sniffed = if protocol == PortProtocol::Tcp {
            Sniffed::Tcp
        } else {
            let wait = if protocol == PortProtocol::Sniff {
                limits.sniff_timeout
            } else {
                limits.header_read_timeout
            };
            let read = tokio::time::timeout(wait, sniff(&mut tunnel, &mut buf)).await;
            match read {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    return debug!(%peer, error = %e, "client stream failed before its first bytes");
                }
                // Nothing yet: a server-first protocol, so opaque TCP.
                Err(_) if protocol == PortProtocol::Sniff => Sniffed::Tcp,
                Err(_) => {
                    return info!(%peer, %target, "no request within the header timeout; closing");
                }
            }
        };
        let sniffed = match (protocol, sniffed) {
            (PortProtocol::Http1 | PortProtocol::Http2, Sniffed::Tcp) => Sniffed::Http1,
            (_, s) => s,
        };
        let io = Rewind {
            prefix: buf.freeze(),
            inner: tunnel,
        };
        let ds = Arc::new(Downstream {
            peer,
            src_identity: Some(src),
            src_workload,
            src_addrs,
            service_key,
            target,
            protocol: match sniffed {
                Sniffed::Http2 => "http2",
                _ => "http",
            },
            ingress: None,
        });
        match sniffed {
            Sniffed::Tcp => self.tcp(io, ds).await,
            Sniffed::Http1 => self.serve_http(io, ds, false).await,
            Sniffed::Http2 => self.serve_http(io, ds, true).await,
        }
    }

    /// Serves HTTP/1 or HTTP/2 on one downstream connection, until it
    /// ends, the drain, its idle timeout or its max duration.
    async fn serve_http<I>(self: Arc<Self>, io: I, ds: Arc<Downstream>, h2: bool)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let limits = &self.cfg.limits;
        let activity = ConnActivity::new();
        let (idle, max) = (limits.idle_timeout, limits.max_connection_duration);
        let (r, why) = match h2 {
            false => {
                let wp = self.clone();
                let d = ds.clone();
                let verdicts = Verdicts::default();
                let io = h1guard::Guarded::new(
                    io,
                    Scanner::new(limits.max_header_bytes, verdicts.clone()),
                );
                let a = activity.clone();
                let svc_fn = service_fn(move |req| {
                    let framing = verdicts.next();
                    wp.clone().request(d.clone(), req, framing, a.clone())
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(limits.header_read_timeout)
                    .max_buf_size(limits.max_header_bytes.max(8192))
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(Linger::new(io)), svc_fn)
                    .with_upgrades();
                serve_conn(conn, &self.draining, &activity, idle, max).await
            }
            true => {
                let wp = self.clone();
                let d = ds.clone();
                let a = activity.clone();
                let svc_fn = service_fn(move |req| {
                    wp.clone().request(d.clone(), req, Framing::Ok, a.clone())
                });
                let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .max_header_list_size(
                        u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX),
                    )
                    .max_concurrent_streams(limits.max_concurrent_streams)
                    .keep_alive_interval(Some(Duration::from_secs(30)))
                    // RFC 8441: WebSocket over HTTP/2.
                    .enable_connect_protocol()
                    .serve_connection(TokioIo::new(io), svc_fn);
                serve_conn(conn, &self.draining, &activity, idle, max).await
            }
        };
        if why != Ended::Closed {
            debug!(peer = %ds.peer, ?why, "downstream connection ended by the waypoint");
        }
        if let Err(e) = r {
            debug!(peer = %ds.peer, error = %e, h2, "downstream connection ended with an error");
        }
    }
}
