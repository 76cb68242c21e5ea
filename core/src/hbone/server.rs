//! The HBONE server, the one both the ztunnel's inbound (15008) and the
//! waypoint run: mutual TLS as a chosen identity under a timeout, the
//! peer's identity from its certificate, then HTTP/2 with a stream limit,
//! each CONNECT stream handed to the caller's handler until the drain.
//! Below it, [`serve_connection`] speaks HTTP/2 on one accepted TLS
//! connection.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::FuturesUnordered;
use h2::RecvStream;
use http::{Request, Response, StatusCode};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{H2Stream, StreamJob, Turn, h2_io_error, keepalive, keepalive_lapsed, poll_jobs};
use crate::certs::{CertError, CertificateManager};
use crate::config::H2Config;
use crate::identity::Identity;
use crate::socket::tls_io;
use crate::tls::{TlsError, handshake_failure, peer_identity, server_config};

/// Why no TLS server config could be had for an identity.
#[derive(Debug, thiserror::Error)]
pub enum ServerConfigError {
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// Why a handshake was refused (logged with the peer).
#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error(transparent)]
    Config(#[from] ServerConfigError),
    #[error("{0}")]
    Handshake(String),
}

/// TLS server configs presenting each identity's current certificate,
/// rebuilt only when the certificate changes (keyed by its serial).
pub struct ServerConfigs {
    certs: CertificateManager,
    cache: Mutex<HashMap<Identity, (String, Arc<ServerConfig>)>>,
}

impl ServerConfigs {
    pub fn new(certs: CertificateManager) -> Self {
        ServerConfigs {
            certs,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The config presenting `identity`'s current certificate.
    pub async fn get(&self, identity: &Identity) -> Result<Arc<ServerConfig>, ServerConfigError> {
        let cert = self.certs.fetch(identity).await?;
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((serial, cfg)) = cache.get(identity)
            && serial == cert.serial()
        {
            return Ok(cfg.clone());
        }
        let cfg = Arc::new(server_config(&cert, self.certs.roots().clone())?);
        cache.insert(identity.clone(), (cert.serial().to_string(), cfg.clone()));
        Ok(cfg)
    }
}

/// What an HBONE server needs besides its certificates.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub h2: H2Config,
    /// Concurrent CONNECT streams per connection.
    pub max_streams: usize,
    /// For the TLS handshake, and then for the HTTP/2 preface.
    pub handshake_timeout: Duration,
    /// Where each stream's handler runs.
    pub tasks: StreamTasks,
}

/// An accepted TCP connection, with the address it came to.
pub struct Conn {
    pub tcp: TcpStream,
    pub peer: SocketAddr,
    pub local: SocketAddr,
}

/// The HBONE server: one per proxy.
pub struct Server {
    configs: ServerConfigs,
    settings: ServerSettings,
    draining: CancellationToken,
}

impl Server {
    /// A server whose connections say GOAWAY when `draining` is cancelled.
    pub fn new(
        certs: CertificateManager,
        settings: ServerSettings,
        draining: CancellationToken,
    ) -> Self {
        Server {
            configs: ServerConfigs::new(certs),
            settings,
            draining,
        }
    }

    /// Serves one connection to its end: the TLS handshake as `identity`
    /// (the certificate is chosen by the caller: there is no SNI), then
    /// each CONNECT stream through `handler` with the peer's identity.
    /// Refusals and failures are logged, never returned: the connection
    /// is simply closed.
    pub async fn serve<F, Fut>(&self, conn: Conn, identity: &Identity, handler: F)
    where
        F: Fn(Request<()>, Responder, Identity) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Conn { tcp, peer, local } = conn;
        let _ = tcp.set_nodelay(true);
        let timeout = self.settings.handshake_timeout;
        let accepted = tokio::time::timeout(timeout, async {
            let cfg = self.configs.get(identity).await?;
            TlsAcceptor::from(cfg)
                .accept(tls_io(tcp))
                .await
                .map_err(|e| Refused::Handshake(handshake_failure(&e)))
        })
        .await;
        let mut tls = match accepted {
            Ok(Ok(tls)) => tls,
            Ok(Err(reason)) => return info!(%peer, %local, %reason, "HBONE handshake refused"),
            Err(_) => return info!(%peer, %local, ?timeout, "HBONE handshake timed out"),
        };
        let Some(src_identity) = peer_identity(tls.get_ref().1) else {
            return warn!(%peer, "HBONE peer has no identity after handshake; closing");
        };
        crate::socket::tls_write_batch(tls.get_mut().1);
        debug!(%peer, %local, identity = %src_identity, "HBONE connection");
        let max_streams = u32::try_from(self.settings.max_streams).unwrap_or(u32::MAX);
        let result = serve_connection(
            tls,
            &self.settings.h2,
            max_streams,
            timeout,
            self.draining.clone(),
            self.settings.tasks,
            |req, respond| handler(req, respond, src_identity.clone()),
        )
        .await;
        if let Err(e) = result {
            debug!(%peer, error = %e, "HBONE connection ended with an error");
        }
    }
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
    pub fn accept(self) -> Result<H2Stream, h2::Error> {
        self.accept_with_baggage(None)
    }

    /// Answers 200 with the destination's `baggage` (so the client can
    /// name the workload it reached) and hands back the tunnel.
    pub fn accept_with_baggage(mut self, baggage: Option<&str>) -> Result<H2Stream, h2::Error> {
        let mut r = Response::new(());
        if let Some(v) = baggage.and_then(|b| http::HeaderValue::from_str(b).ok()) {
            r.headers_mut().insert(super::BAGGAGE, v);
        }
        let send = self.respond.send_response(r, false)?;
        Ok(H2Stream::new(send, self.recv))
    }
}

/// Where the handler of each request stream runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamTasks {
    /// In the connection's own task (see [`StreamRunner`](super::StreamRunner) for why): for
    /// streams that only copy bytes.
    Inline,
    /// A task of its own per stream: for handlers with heavy work of their
    /// own (the waypoint's HTTP processing).
    Spawn,
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
    tasks: StreamTasks,
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
    let conn = tokio::time::timeout(handshake_timeout, handshake)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no HTTP/2 preface in time"))?
        .map_err(h2_io_error)?;
    let mut conn = Some(conn);
    let ping = conn.as_mut().and_then(|c| c.ping_pong());
    let alive = keepalive(ping, cfg.keepalive_interval, cfg.keepalive_timeout);
    tokio::pin!(alive);
    let cancelled = shutdown.cancelled();
    tokio::pin!(cancelled);
    let mut closing = false;
    let mut jobs = FuturesUnordered::<StreamJob>::new();
    let mut result = None;
    let (turn, waker) = Turn::new();
    std::future::poll_fn(|cx| {
        turn.poll(&waker, cx, |cx| {
            loop {
                if !closing
                    && cancelled.as_mut().poll(cx).is_ready()
                    && let Some(c) = conn.as_mut()
                {
                    closing = true;
                    c.graceful_shutdown();
                }
                poll_jobs(&mut jobs, cx);
                if let Some(c) = conn.as_mut() {
                    let next = {
                        let accept = c.accept();
                        tokio::pin!(accept);
                        accept.poll(cx)
                    };
                    let ended = match next {
                        Poll::Ready(Some(Ok((req, respond)))) => {
                            let (parts, recv) = req.into_parts();
                            let job = handler(
                                Request::from_parts(parts, ()),
                                Responder { respond, recv },
                            );
                            match tasks {
                                StreamTasks::Inline => jobs.push(Box::pin(job)),
                                StreamTasks::Spawn => {
                                    tokio::spawn(job);
                                }
                            }
                            continue;
                        }
                        Poll::Ready(Some(Err(e))) => Some(Err(h2_io_error(e))),
                        Poll::Ready(None) => Some(Ok(())),
                        Poll::Pending => keepalive_lapsed(alive.as_mut(), cx),
                    };
                    if let Some(r) = ended {
                        // Dropping the connection fails its open streams, which
                        // then end here.
                        conn = None;
                        result = Some(r);
                        continue;
                    }
                    poll_jobs(&mut jobs, cx);
                }
                if conn.is_none() && jobs.is_empty() {
                    return Poll::Ready(result.take().unwrap_or(Ok(())));
                }
                return Poll::Pending;
            }
        })
    })
    .await
}
