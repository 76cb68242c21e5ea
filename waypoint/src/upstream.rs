//! Upstream HTTP connections: each one is an HBONE stream (pooled HTTP/2
//! over mutual TLS, from the ztunnel's pool) to the endpoint's node, or
//! plain TCP to an endpoint outside the mesh, carrying HTTP/1.1 (kept
//! alive and reused) or HTTP/2 (one connection multiplexed).
//!
//! Connections per backend are capped (`max_connections`); a request that
//! finds none free waits as pending, up to `max_pending_requests`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_core::hbone::ConnectHeaders;
use mesh_core::hbone::pool::{Pool, PoolError, PoolKey};
use mesh_core::identity::Identity;
use mesh_core::state::{TunnelProtocol, Workload};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tracing::debug;

use crate::batch::Batched;
use crate::reqbody::RequestBody;

pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    Http1,
    Http2,
}

/// Why an attempt got no response.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect: {0}")]
    Connect(String),
    #[error("too many pending requests for {0} (circuit open)")]
    Overflow(String),
    #[error("HTTP handshake: {0}")]
    Handshake(String),
    #[error("upstream reset: {0}")]
    Reset(String),
    #[error("request cannot be sent: {0}")]
    BadRequest(String),
    /// The request body cannot be (or be sent again).
    #[error("request body: {0}")]
    Body(crate::reqbody::BodyError),
}

impl From<PoolError> for UpstreamError {
    fn from(e: PoolError) -> Self {
        UpstreamError::Connect(e.to_string())
    }
}

enum Sender {
    H1(http1::SendRequest<RequestBody>),
    H2(http2::SendRequest<RequestBody>),
}

struct Idle {
    sender: http1::SendRequest<RequestBody>,
    since: Instant,
    used: u32,
}

#[derive(Default)]
struct EndpointConns {
    idle: Vec<Idle>,
    h2: Option<http2::SendRequest<RequestBody>>,
}

/// Connections to one backend service, under its connection cap.
struct BackendConns {
    permits: Arc<Semaphore>,
    /// max_connections the permits were made for (0 = unlimited).
    cap: u32,
    pending: AtomicU32,
    freed: Notify,
    by_endpoint: Mutex<HashMap<(SocketAddr, Proto), EndpointConns>>,
}

/// What a connection is opened with.
pub struct Dial<'a> {
    pub endpoint: &'a Workload,
    pub target: SocketAddr,
    pub proto: Proto,
    pub headers: &'a ConnectHeaders,
}

/// Limits for one backend, from its DestinationRule.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: u32,
    pub max_pending: u32,
    pub max_requests_per_connection: u32,
    pub idle_timeout: Duration,
    /// The DestinationRule's connectTimeout; the waypoint's own otherwise.
    pub connect_timeout: Option<Duration>,
}

pub struct Upstreams {
    pool: Pool,
    identity: Identity,
    connect_timeout: Duration,
    backends: Mutex<HashMap<String, Arc<BackendConns>>>,
}

/// A connection checked out for one request. An HTTP/1 connection goes
/// back to the idle list when the response is done (see [`Lease::finish`]).
pub struct Lease {
    sender: Sender,
    backend: Arc<BackendConns>,
    key: (SocketAddr, Proto),
    used: u32,
}

impl Upstreams {
    pub fn new(pool: Pool, identity: Identity, connect_timeout: Duration) -> Self {
        Upstreams {
            pool,
            identity,
            connect_timeout,
            backends: Mutex::new(HashMap::new()),
        }
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    fn backend(&self, key: &str, limits: &Limits) -> Arc<BackendConns> {
        let mut m = self.backends.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = || {
            Arc::new(BackendConns {
                permits: Arc::new(Semaphore::new(if limits.max_connections == 0 {
                    Semaphore::MAX_PERMITS
                } else {
                    limits.max_connections as usize
                })),
                cap: limits.max_connections,
                pending: AtomicU32::new(0),
                freed: Notify::new(),
                by_endpoint: Mutex::new(HashMap::new()),
            })
        };
        let b = m.entry(key.to_string()).or_insert_with(fresh);
        // A changed cap takes effect for new connections; the old ones
        // finish on the permits they hold.
        if b.cap != limits.max_connections {
            *b = fresh();
        }
        b.clone()
    }

    /// Number of idle and multiplexed upstream connections (admin view).
    pub fn connection_count(&self) -> usize {
        let m = self.backends.lock().unwrap_or_else(|p| p.into_inner());
        m.values()
            .map(|b| {
                b.by_endpoint
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .values()
                    .map(|e| e.idle.len() + usize::from(e.h2.is_some()))
                    .sum::<usize>()
            })
            .sum()
    }

    /// A connection to `d.target`: a reused one, a new one under the cap,
    /// or, at the cap, the next to free up (as a pending request).
    pub async fn checkout(
        &self,
        backend_key: &str,
        limits: &Limits,
        d: Dial<'_>,
    ) -> Result<Lease, UpstreamError> {
        let backend = self.backend(backend_key, limits);
        let key = (d.target, d.proto);
        let mut pending: Option<PendingGuard> = None;
        loop {
            let waiter = backend.clone();
            let freed = waiter.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some((sender, used)) = take_reusable(&backend, key, limits) {
                return Ok(Lease {
                    sender,
                    backend,
                    key,
                    used,
                });
            }
            if let Ok(permit) = backend.permits.clone().try_acquire_owned() {
                // The whole setup (TCP or HBONE, then the HTTP handshake)
                // within the backend's connect timeout.
                let within = limits.connect_timeout.unwrap_or(self.connect_timeout);
                let sender =
                    tokio::time::timeout(within, self.connect(&d, permit, backend.clone()))
                        .await
                        .map_err(|_| {
                            UpstreamError::Connect(format!(
                                "{}: no connection within {within:?}",
                                d.target
                            ))
                        })??;
                if let Sender::H2(s) = &sender {
                    backend
                        .by_endpoint
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(key)
                        .or_default()
                        .h2 = Some(s.clone());
                }
                return Ok(Lease {
                    sender,
                    backend,
                    key,
                    used: 0,
                });
            }
            // At the cap: an idle kept-alive connection to another endpoint
            // is worth less than this request; closing it frees its slot
            // (the waiter below is woken when it has closed).
            evict_oldest_idle_elsewhere(&backend, key);
            if pending.is_none() {
                let n = backend.pending.fetch_add(1, Ordering::AcqRel);
                pending = Some(PendingGuard(backend.clone()));
                if limits.max_pending > 0 && n >= limits.max_pending {
                    return Err(UpstreamError::Overflow(backend_key.to_string()));
                }
            }
            freed.await;
        }
    }

    async fn connect(
        &self,
        d: &Dial<'_>,
        permit: OwnedSemaphorePermit,
        backend: Arc<BackendConns>,
    ) -> Result<Sender, UpstreamError> {
        // Dropped on any early return below: the slot is free again.
        let slot = Slot {
            _permit: permit,
            backend,
        };
        let io = self.dial(d.endpoint, d.target, d.headers).await?;
        let target = d.target;
        let done = move || drop(slot);
        match d.proto {
            Proto::Http1 => {
                let (sender, conn) = http1::Builder::new()
                    .handshake(TokioIo::new(io))
                    .await
                    .map_err(|e| UpstreamError::Handshake(e.to_string()))?;
                // With upgrades: a 101 hands the connection to the relay.
                tokio::spawn(async move {
                    if let Err(e) = conn.with_upgrades().await {
                        debug!(%target, error = %e, "upstream HTTP/1 connection ended");
                    }
                    done();
                });
                Ok(Sender::H1(sender))
            }
            Proto::Http2 => {
                let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .keep_alive_interval(Duration::from_secs(30))
                    // Frames written in one pass of the runtime go out in
                    // one write (batch.rs).
                    .handshake(TokioIo::new(Batched::new(io)))
                    .await
                    .map_err(|e| UpstreamError::Handshake(e.to_string()))?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        debug!(%target, error = %e, "upstream HTTP/2 connection ended");
                    }
                    done();
                });
                Ok(Sender::H2(sender))
            }
        }
    }

    /// A byte stream to `endpoint` at `target`: an HBONE stream through
    /// the pool (to the endpoint's node, as the waypoint's identity) for an
    /// endpoint in the mesh, plain TCP for one outside it. For HTTP and
    /// opaque TCP alike; it sets no time limit of its own (callers bound it
    /// by the backend's connect timeout).
    pub async fn dial(
        &self,
        endpoint: &Workload,
        target: SocketAddr,
        headers: &ConnectHeaders,
    ) -> Result<Box<dyn Io>, UpstreamError> {
        match endpoint.protocol {
            TunnelProtocol::Hbone => {
                let key = PoolKey {
                    src: self.identity.clone(),
                    src_ip: None,
                    dst: endpoint.identity.clone(),
                    next_hop: SocketAddr::new(target.ip(), mesh_core::config::HBONE_PORT),
                };
                let (stream, guard) = self.pool.connect(&key, target, headers, None).await?;
                Ok(Box::new(Guarded::new(stream, guard)))
            }
            TunnelProtocol::None => {
                let tcp = tokio::net::TcpStream::connect(target)
                    .await
                    .map_err(|e| UpstreamError::Connect(format!("{target}: {e}")))?;
                let _ = tcp.set_nodelay(true);
                Ok(Box::new(tcp))
            }
        }
    }

    /// Closes idle HTTP/1 connections older than `max_idle`.
    pub fn evict_idle(&self, max_idle: Duration) {
        let backends: Vec<Arc<BackendConns>> = self
            .backends
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for b in backends {
            let mut m = b.by_endpoint.lock().unwrap_or_else(|p| p.into_inner());
            for e in m.values_mut() {
                e.idle
                    .retain(|i| i.since.elapsed() < max_idle && !i.sender.is_closed());
                if e.h2.as_ref().is_some_and(|s| s.is_closed()) {
                    e.h2 = None;
                }
            }
            m.retain(|_, e| !e.idle.is_empty() || e.h2.is_some());
        }
    }
}

/// A connection slot: freeing it (the connection ended, or never came up)
/// wakes requests waiting for one.
struct Slot {
    _permit: OwnedSemaphorePermit,
    backend: Arc<BackendConns>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.backend.freed.notify_waiters();
    }
}

struct PendingGuard(Arc<BackendConns>);

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Closes the longest-idle HTTP/1 connection of the backend to an endpoint
/// other than `key`'s (dropping its sender ends it, which frees its slot).
fn evict_oldest_idle_elsewhere(b: &BackendConns, key: (SocketAddr, Proto)) -> bool {
    let mut m = b.by_endpoint.lock().unwrap_or_else(|p| p.into_inner());
    let oldest = m
        .iter()
        .filter(|(k, _)| **k != key)
        .flat_map(|(k, e)| {
            e.idle
                .iter()
                .enumerate()
                .map(move |(i, c)| (*k, i, c.since))
        })
        .min_by_key(|(_, _, since)| *since);
    match oldest {
        Some((k, i, _)) => {
            if let Some(e) = m.get_mut(&k) {
                let closed = e.idle.swap_remove(i);
                debug!(endpoint = %k.0, "closing an idle connection: the backend is at max_connections");
                drop(closed);
            }
            true
        }
        None => false,
    }
}

fn take_reusable(
    b: &BackendConns,
    key: (SocketAddr, Proto),
    limits: &Limits,
) -> Option<(Sender, u32)> {
    let mut m = b.by_endpoint.lock().unwrap_or_else(|p| p.into_inner());
    let e = m.get_mut(&key)?;
    if let Some(h2) = &e.h2 {
        if !h2.is_closed() {
            return Some((Sender::H2(h2.clone()), 0));
        }
        e.h2 = None;
    }
    while let Some(i) = e.idle.pop() {
        if !i.sender.is_closed() && i.since.elapsed() < limits.idle_timeout {
            return Some((Sender::H1(i.sender), i.used));
        }
    }
    None
}

impl Lease {
    /// Sends one request. An HTTP/1 connection is busy until the response
    /// body is read; the caller gives the lease back with [`Lease::finish`].
    pub async fn send(
        &mut self,
        req: Request<RequestBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        self.used += 1;
        let r = match &mut self.sender {
            Sender::H1(s) => {
                s.ready()
                    .await
                    .map_err(|e| UpstreamError::Reset(e.to_string()))?;
                s.send_request(req).await
            }
            Sender::H2(s) => {
                s.ready()
                    .await
                    .map_err(|e| UpstreamError::Reset(e.to_string()))?;
                s.send_request(req).await
            }
        };
        r.map_err(|e| UpstreamError::Reset(e.to_string()))
    }

    /// Returns a kept-alive HTTP/1 connection to the idle list, unless it
    /// has served `max_requests_per_connection`.
    pub fn finish(self, limits: &Limits) {
        if let Sender::H1(sender) = self.sender {
            if sender.is_closed()
                || (limits.max_requests_per_connection > 0
                    && self.used >= limits.max_requests_per_connection)
            {
                return;
            }
            self.backend
                .by_endpoint
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(self.key)
                .or_default()
                .idle
                .push(Idle {
                    sender,
                    since: Instant::now(),
                    used: self.used,
                });
            self.backend.freed.notify_waiters();
        }
    }
}

/// An HBONE stream that keeps its pool slot for as long as it lives.
pub struct Guarded<S> {
    inner: S,
    _guard: mesh_core::hbone::pool::StreamGuard,
}

impl<S> Guarded<S> {
    pub fn new(inner: S, guard: mesh_core::hbone::pool::StreamGuard) -> Self {
        Guarded {
            inner,
            _guard: guard,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

forward_async_write!(Guarded, inner);

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    use bytes::Bytes;
    use http_body_util::Full;

    use crate::reqbody::{Buffered, RetryBuffer};

    use mesh_core::ca::{CaClient, CaError, CaFuture};
    use mesh_core::certs::{Backoff, CertificateManager};
    use mesh_core::clock::SystemClock;
    use mesh_core::tls::TrustRoots;

    struct NoCa;
    impl CaClient for NoCa {
        fn fetch_certificate<'a>(&'a self, _: &'a Identity) -> CaFuture<'a> {
            Box::pin(async { Err(CaError::Unreachable("no CA in this test".into())) })
        }
    }

    fn upstreams() -> Upstreams {
        let certs = CertificateManager::new(
            Arc::new(NoCa),
            Arc::new(SystemClock),
            TrustRoots::empty(),
            Backoff::default(),
        );
        let pool = Pool::new(
            certs,
            mesh_core::hbone::pool::PoolSettings {
                h2: Default::default(),
                cfg: Default::default(),
                connect_timeout: Duration::from_secs(1),
                handshake_timeout: Duration::from_secs(1),
                mark: None,
            },
            Arc::new(mesh_core::metrics::Metrics::default()),
        );
        let identity: Identity = "spiffe://cluster.local/ns/ns/sa/wp"
            .parse()
            .expect("identity");
        Upstreams::new(pool, identity, Duration::from_secs(1))
    }

    fn plain(addr: SocketAddr) -> Workload {
        Workload {
            uid: addr.to_string(),
            name: "e".into(),
            namespace: "ns".into(),
            addresses: vec![addr.ip()],
            network: String::new(),
            protocol: TunnelProtocol::None,
            identity: "spiffe://cluster.local/ns/ns/sa/e"
                .parse()
                .expect("identity"),
            waypoint: None,
            node: "n".into(),
            canonical_name: String::new(),
            canonical_revision: String::new(),
            workload_name: String::new(),
            services: Default::default(),
            authorization_policies: vec![],
            healthy: true,
            native_tunnel: false,
            cluster_id: String::new(),
            workload_type: Default::default(),
        }
    }

    /// An HTTP/1 server that answers 200 and counts connections.
    async fn server() -> (SocketAddr, Arc<AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let conns = Arc::new(AtomicUsize::new(0));
        let c = conns.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = l.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                            "ok",
                        ))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        (addr, conns)
    }

    async fn one_request(u: &Upstreams, limits: &Limits, ep: &Workload, to: SocketAddr) {
        let headers = ConnectHeaders::default();
        let d = Dial {
            endpoint: ep,
            target: to,
            proto: Proto::Http1,
            headers: &headers,
        };
        let mut lease = tokio::time::timeout(Duration::from_secs(5), u.checkout("svc", limits, d))
            .await
            .expect("a connection in time (not after the idle sweep)")
            .expect("checkout");
        let body = RetryBuffer::complete(&Buffered::default())
            .attempt()
            .expect("body");
        let req = Request::get("/").body(body).expect("request");
        let resp = lease.send(req).await.expect("response");
        let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
        lease.finish(limits);
    }

    #[tokio::test]
    async fn at_max_connections_an_idle_connection_elsewhere_makes_room() {
        let u = upstreams();
        let limits = Limits {
            max_connections: 1,
            max_pending: 10,
            max_requests_per_connection: 0,
            idle_timeout: Duration::from_secs(60),
            connect_timeout: None,
        };
        let (a, a_conns) = server().await;
        let (b, b_conns) = server().await;
        let (ea, eb) = (plain(a), plain(b));
        one_request(&u, &limits, &ea, a).await;
        // A's connection now idles, holding the backend's only slot; B is
        // served at once, not after A's idle timeout.
        one_request(&u, &limits, &eb, b).await;
        one_request(&u, &limits, &eb, b).await;
        assert_eq!(a_conns.load(Ordering::SeqCst), 1);
        assert_eq!(
            b_conns.load(Ordering::SeqCst),
            1,
            "B's connection is reused"
        );
        assert_eq!(u.connection_count(), 1, "only B's connection is left");
    }
}
