//! The outbound HBONE connection pool: HTTP/2 connections keyed by (source
//! identity, source address, destination identity, next hop), each carrying
//! up to `max_streams` CONNECT streams. A full connection makes room for a
//! new one; a dead one fails only its own streams and is replaced; idle ones
//! are closed after `idle_timeout`. HTTP/2 PINGs find dead peers.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::sync::atomic::AtomicBool;

use bytes::Bytes;
use h2::client::SendRequest;
use rustls_pki_types::ServerName;
use tokio_rustls::TlsConnector;
use tracing::{debug, info, warn};

use crate::certs::{CertError, CertificateManager};
use crate::config::{H2Config, PoolConfig};
use crate::hbone::{self, H2Stream, OpenError};
use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::socket;
use crate::tls::{TlsError, client_config, handshake_failure};

#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct PoolKey {
    pub src: Identity,
    pub src_ip: Option<IpAddr>,
    pub dst: Identity,
    pub next_hop: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("connect to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("TLS handshake with {addr}: {reason}")]
    Handshake { addr: SocketAddr, reason: String },
    #[error("HTTP/2 with {addr}: {reason}")]
    H2 { addr: SocketAddr, reason: String },
    #[error("HBONE to {addr}: {source}")]
    Open {
        addr: SocketAddr,
        #[source]
        source: OpenError,
    },
}

struct Conn {
    id: u64,
    sender: SendRequest<Bytes>,
    runner: hbone::StreamRunner,
    /// Set by the connection's driver task when the connection ends.
    closed: Arc<AtomicBool>,
    streams: AtomicUsize,
    last_used: Mutex<Instant>,
}

impl Conn {
    fn try_acquire(&self, max: usize) -> bool {
        self.streams
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    fn usable(&self) -> bool {
        !self.closed.load(Ordering::Acquire)
    }
}

/// Holds a stream's slot on its connection; released on drop.
pub struct StreamGuard {
    conn: Arc<Conn>,
}

impl StreamGuard {
    /// Runs the stream's copy on its connection's task.
    pub fn runner(&self) -> &hbone::StreamRunner {
        &self.conn.runner
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.conn.streams.fetch_sub(1, Ordering::AcqRel);
        *self
            .conn
            .last_used
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }
}

/// One dial at a time per key; a failure is shared with whoever was
/// waiting, so a dead peer costs one timeout, not one per queued stream.
#[derive(Default)]
struct DialSlot {
    lock: tokio::sync::Mutex<Option<(Instant, String)>>,
}

/// How long a failed dial is reported to later callers without retrying.
const DIAL_FAILURE_HOLD: Duration = Duration::from_millis(500);

type Conns = HashMap<PoolKey, Vec<Arc<Conn>>>;

struct Inner {
    /// One pool per runtime shard (see `crate::shards`): a stream only uses
    /// connections its own thread drives.
    conns: Vec<Mutex<Conns>>,
    dialing: Vec<Mutex<HashMap<PoolKey, Arc<DialSlot>>>>,
    /// `connections_per_destination`, split over the shards.
    per_shard: usize,
    certs: CertificateManager,
    h2: H2Config,
    cfg: PoolConfig,
    connect_timeout: Duration,
    handshake_timeout: Duration,
    mark: Option<u32>,
    next_id: AtomicU64,
    metrics: Arc<Metrics>,
}

#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

/// Everything the pool needs to dial.
pub struct PoolSettings {
    pub h2: H2Config,
    pub cfg: PoolConfig,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    pub mark: Option<u32>,
}

impl Pool {
    pub fn new(certs: CertificateManager, s: PoolSettings, metrics: Arc<Metrics>) -> Self {
        let shards = crate::shards::current().len();
        let pool = Pool {
            inner: Arc::new(Inner {
                conns: (0..shards).map(|_| Mutex::default()).collect(),
                dialing: (0..shards).map(|_| Mutex::default()).collect(),
                per_shard: s.cfg.connections_per_destination.div_ceil(shards).max(1),
                certs,
                h2: s.h2,
                cfg: s.cfg,
                connect_timeout: s.connect_timeout,
                handshake_timeout: s.handshake_timeout,
                mark: s.mark,
                next_id: AtomicU64::new(0),
                metrics,
            }),
        };
        let weak = Arc::downgrade(&pool.inner);
        let period = (pool.inner.cfg.idle_timeout / 2).max(Duration::from_millis(100));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                Pool { inner }.evict_idle();
            }
        });
        pool
    }

    fn shard(&self) -> usize {
        crate::shards::index().min(self.inner.conns.len() - 1)
    }

    /// This thread's shard's connections.
    fn conns(&self) -> std::sync::MutexGuard<'_, Conns> {
        self.inner.conns[self.shard()]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn each_shard(&self) -> impl Iterator<Item = std::sync::MutexGuard<'_, Conns>> {
        self.inner
            .conns
            .iter()
            .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Pooled connections now, over all shards (for tests and the admin
    /// view).
    pub fn connection_count(&self) -> usize {
        self.connections_per_shard().iter().sum()
    }

    /// Pooled connections now, per shard (the admin view).
    pub fn connections_per_shard(&self) -> Vec<usize> {
        self.each_shard()
            .map(|conns| {
                conns
                    .values()
                    .map(|v| v.iter().filter(|c| c.usable()).count())
                    .sum()
            })
            .collect()
    }

    fn evict_idle(&self) {
        let idle = self.inner.cfg.idle_timeout;
        let now = Instant::now();
        for mut conns in self.each_shard() {
            Self::evict_from(&mut conns, idle, now);
        }
    }

    fn evict_from(conns: &mut Conns, idle: Duration, now: Instant) {
        for list in conns.values_mut() {
            list.retain(|c| {
                let idle_for =
                    now.duration_since(*c.last_used.lock().unwrap_or_else(|p| p.into_inner()));
                let keep = c.usable() && (c.streams.load(Ordering::Acquire) > 0 || idle_for < idle);
                if !keep {
                    debug!(conn = c.id, "closing idle or dead pooled connection");
                }
                keep
            });
        }
        conns.retain(|_, v| !v.is_empty());
    }

    /// A stream slot on the least busy connection to `key`; None when a new
    /// connection should be dialled: all are full, or every one is busy and
    /// the destination has fewer than `connections_per_destination`.
    fn try_take(&self, key: &PoolKey) -> Option<Arc<Conn>> {
        let cfg = &self.inner.cfg;
        let mut conns = self.conns();
        let list = conns.get_mut(key)?;
        list.retain(|c| c.usable());
        // No allocation here: this runs for every new stream.
        let least = list
            .iter()
            .min_by_key(|c| c.streams.load(Ordering::Acquire))?;
        if least.streams.load(Ordering::Acquire) > 0 && list.len() < self.inner.per_shard {
            return None;
        }
        if least.try_acquire(cfg.max_streams) {
            return Some(least.clone());
        }
        // The least busy one is full, so all are (slots are only given back
        // concurrently): one more look, then dial.
        list.iter()
            .find(|c| c.try_acquire(cfg.max_streams))
            .cloned()
    }

    fn remove(&self, key: &PoolKey, id: u64) {
        if let Some(list) = self.conns().get_mut(key) {
            list.retain(|c| c.id != id);
        }
    }

    async fn checkout(
        &self,
        key: &PoolKey,
        netns: Option<&crate::netns::Netns>,
    ) -> Result<Arc<Conn>, PoolError> {
        if let Some(c) = self.try_take(key) {
            return Ok(c);
        }
        // One dial per key at a time, so a burst shares the new connection.
        let slot = self.inner.dialing[self.shard()]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        let result = {
            let mut last_failure = slot.lock.lock().await;
            if let Some(c) = self.try_take(key) {
                Ok(c)
            } else if let Some((at, reason)) = last_failure
                .as_ref()
                .filter(|(at, _)| at.elapsed() < DIAL_FAILURE_HOLD)
            {
                Err(PoolError::Connect {
                    addr: key.next_hop,
                    reason: format!("{reason} ({}ms ago)", at.elapsed().as_millis()),
                })
            } else {
                // Boxed: the dial's state (TLS and HTTP/2 handshakes, ~4 KiB)
                // would otherwise be part of every stream's connect future,
                // and a burst of new connections queues here.
                match Box::pin(self.dial(key, netns)).await {
                    Ok(conn) => {
                        *last_failure = None;
                        conn.streams.store(1, Ordering::Release);
                        self.conns()
                            .entry(key.clone())
                            .or_default()
                            .push(conn.clone());
                        Ok(conn)
                    }
                    Err(e) => {
                        *last_failure = Some((Instant::now(), e.to_string()));
                        Err(e)
                    }
                }
            }
        };
        // Drop the slot once no one else waits on it, so the map stays small
        // (the held failure only matters to callers already queued).
        let mut dialing = self.inner.dialing[self.shard()]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if Arc::strong_count(&slot) == 2 {
            dialing.remove(key);
        }
        result
    }

    async fn dial(
        &self,
        key: &PoolKey,
        netns: Option<&crate::netns::Netns>,
    ) -> Result<Arc<Conn>, PoolError> {
        let addr = key.next_hop;
        let cert = self.inner.certs.fetch(&key.src).await?;
        let cfg = client_config(
            &cert,
            self.inner.certs.roots().clone(),
            vec![key.dst.clone()],
        )?;
        let tcp = socket::dial(
            addr,
            key.src_ip,
            self.inner.mark,
            self.inner.connect_timeout,
            netns,
        )
        .await
        .map_err(|e| PoolError::Connect {
            addr,
            reason: e.to_string(),
        })?;
        let mut tls = tokio::time::timeout(
            self.inner.handshake_timeout,
            TlsConnector::from(Arc::new(cfg))
                .connect(ServerName::IpAddress(addr.ip().into()), socket::tls_io(tcp)),
        )
        .await
        .map_err(|_| PoolError::Handshake {
            addr,
            reason: "timed out".into(),
        })?
        .map_err(|e| PoolError::Handshake {
            addr,
            reason: handshake_failure(&e),
        })?;
        socket::tls_write_batch(tls.get_mut().1);
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let gauge = self.inner.metrics.hbone_pool_connections.clone();
        let closed = Arc::new(AtomicBool::new(false));
        let closed_flag = closed.clone();
        let on_closed = {
            let gauge = gauge.clone();
            move |r: Result<(), std::io::Error>| {
                match r {
                    Ok(()) => debug!(conn = id, %addr, "pooled connection closed"),
                    Err(e) => info!(conn = id, %addr, error = %e, "pooled connection failed"),
                }
                closed_flag.store(true, Ordering::Release);
                gauge.dec();
            }
        };
        let (sender, runner, driver) = hbone::client_handshake(tls, &self.inner.h2, on_closed)
            .await
            .map_err(|e| PoolError::H2 {
                addr,
                reason: e.to_string(),
            })?;
        gauge.inc();
        let (src, dst) = (key.src.clone(), key.dst.clone());
        tokio::spawn(driver);
        debug!(conn = id, %addr, %src, %dst, "new pooled HBONE connection");
        Ok(Arc::new(Conn {
            id,
            sender,
            runner,
            closed,
            streams: AtomicUsize::new(0),
            last_used: Mutex::new(Instant::now()),
        }))
    }

    /// Opens a CONNECT stream to `target` through the pool.
    pub async fn connect(
        &self,
        key: &PoolKey,
        target: SocketAddr,
        headers: &hbone::ConnectHeaders,
        netns: Option<&crate::netns::Netns>,
    ) -> Result<(H2Stream, StreamGuard), PoolError> {
        let addr = key.next_hop;
        // A connection found dead when used is dropped and the stream is
        // retried once on a fresh one; other errors belong to this stream.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let conn = self.checkout(key, netns).await?;
            let guard = StreamGuard { conn: conn.clone() };
            match hbone::open(&conn.sender, target, headers, self.inner.connect_timeout).await {
                Ok(stream) => return Ok((stream, guard)),
                Err(e) if attempt == 1 && e.connection_gone() => {
                    warn!(conn = conn.id, %addr, error = %e, "pooled connection is gone; retrying on a new one");
                    conn.closed.store(true, Ordering::Release);
                    self.remove(key, conn.id);
                }
                Err(source) => return Err(PoolError::Open { addr, source }),
            }
        }
    }
}
