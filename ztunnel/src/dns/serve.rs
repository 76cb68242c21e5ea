//! The DNS proxy's listeners in one pod, with that pod's limits: a rate of
//! queries, a bound on questions waiting for the upstream, on TCP
//! connections and their idle time, and a backoff instead of a spin when
//! the socket keeps failing. Every task a pod's listeners start ends with
//! them.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{debug, warn};

use super::{DnsProxy, Step};

/// One pod's share of the DNS proxy.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Queries per second, UDP and TCP together (with a burst of as many);
    /// more are dropped.
    pub qps: u32,
    /// UDP queries waiting for the upstream at once; more are dropped (the
    /// client retries). The mesh's own names need no slot.
    pub udp_in_flight: usize,
    /// Open TCP connections; more are closed at accept.
    pub tcp_connections: usize,
    /// A TCP connection with no query (or an answer not taken) for this
    /// long is closed.
    pub tcp_idle: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits::from(&crate::config::DnsLimits::default())
    }
}

impl From<&crate::config::DnsLimits> for Limits {
    fn from(c: &crate::config::DnsLimits) -> Self {
        Limits {
            qps: c.qps,
            udp_in_flight: c.udp_in_flight,
            tcp_connections: c.tcp_connections,
            tcp_idle: c.tcp_idle,
        }
    }
}

/// A token bucket: `rate` a second, up to `rate` saved.
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u32) -> Bucket {
        Bucket {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            at: Instant::now(),
        }
    }
    fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Grows the pause between failing socket calls from 5 ms to 1 s; one
/// success resets it.
struct Backoff(Option<Duration>);

impl Backoff {
    async fn failed(&mut self, what: &str, e: &std::io::Error) {
        let next = match self.0 {
            None => {
                warn!(error = %e, "DNS proxy: {what} failed; backing off");
                Duration::from_millis(5)
            }
            Some(d) => (d * 2).min(Duration::from_secs(1)),
        };
        self.0 = Some(next);
        tokio::time::sleep(next).await;
    }
    fn ok(&mut self) {
        self.0 = None;
    }
}

/// What one pod's two listeners share.
struct PodShare {
    pod: String,
    rate: Mutex<Bucket>,
    /// The pod's UDP queries in flight upstream, on all its sockets.
    udp_permits: Arc<Semaphore>,
    /// The pod's open TCP connections, on all its listeners.
    tcp_permits: Arc<Semaphore>,
}

impl PodShare {
    fn admit(&self, proxy: &DnsProxy) -> bool {
        let ok = self.rate.lock().unwrap_or_else(|p| p.into_inner()).take();
        if !ok {
            proxy.metrics.dropped.inc();
            debug!(pod = %self.pod, "DNS query dropped: over the pod's rate");
        }
        ok
    }
}

impl DnsProxy {
    /// Serves one pod (`pod` names it in logs) on its UDP socket and TCP
    /// listener until the future is dropped, which ends every task it
    /// started.
    pub async fn serve(self: Arc<Self>, pod: String, udp: UdpSocket, tcp: TcpListener) {
        self.serve_all(pod, vec![(udp, tcp)]).await
    }

    /// The same on several pairs (one per address family): one rate for
    /// the pod across all of them.
    pub async fn serve_all(self: Arc<Self>, pod: String, pairs: Vec<(UdpSocket, TcpListener)>) {
        let share = Arc::new(PodShare {
            pod,
            rate: Mutex::new(Bucket::new(self.limits.qps)),
            udp_permits: Arc::new(Semaphore::new(self.limits.udp_in_flight)),
            tcp_permits: Arc::new(Semaphore::new(self.limits.tcp_connections)),
        });
        let each = pairs.into_iter().map(|(udp, tcp)| {
            let (me, share) = (self.clone(), share.clone());
            async move {
                tokio::join!(
                    me.clone().serve_udp(share.clone(), udp),
                    me.serve_tcp(share, tcp)
                );
            }
        });
        futures::future::join_all(each).await;
    }

    async fn serve_udp(self: Arc<Self>, share: Arc<PodShare>, sock: UdpSocket) {
        let sock = Arc::new(sock);
        let mut tasks = JoinSet::new();
        let mut buf = vec![0u8; 4096];
        let mut backoff = Backoff(None);
        loop {
            while tasks.try_join_next().is_some() {}
            let (n, peer) = match sock.recv_from(&mut buf).await {
                Ok(r) => {
                    backoff.ok();
                    r
                }
                Err(e) => {
                    backoff.failed("UDP receive", &e).await;
                    continue;
                }
            };
            if !share.admit(&self) {
                continue;
            }
            let raw = &buf[..n];
            let limit = Some(DnsProxy::udp_limit(raw));
            // The mesh's own names are answered here and now; only what goes
            // upstream takes one of the pod's in-flight slots.
            let query = match self.respond_local(raw) {
                Step::Drop => continue,
                Step::Answer(resp) => {
                    if let Some(bytes) = DnsProxy::encode(&resp, limit) {
                        let _ = sock.send_to(&bytes, peer).await;
                    }
                    continue;
                }
                Step::Forward(q) => q,
            };
            let Ok(permit) = share.udp_permits.clone().try_acquire_owned() else {
                self.metrics.dropped.inc();
                debug!(pod = %share.pod, "DNS query dropped: the pod's queries in flight are at the limit");
                continue;
            };
            let (me, sock) = (self.clone(), sock.clone());
            tasks.spawn(async move {
                let _permit = permit;
                let resp = me.forward(&query).await;
                if let Some(bytes) = DnsProxy::encode(&resp, limit) {
                    let _ = sock.send_to(&bytes, peer).await;
                }
            });
        }
    }

    async fn serve_tcp(self: Arc<Self>, share: Arc<PodShare>, listener: TcpListener) {
        let mut tasks = JoinSet::new();
        let mut backoff = Backoff(None);
        loop {
            while tasks.try_join_next().is_some() {}
            let s = match listener.accept().await {
                Ok((s, _)) => {
                    backoff.ok();
                    s
                }
                Err(e) => {
                    backoff.failed("TCP accept", &e).await;
                    continue;
                }
            };
            let Ok(permit) = share.tcp_permits.clone().try_acquire_owned() else {
                self.metrics.dropped.inc();
                debug!(pod = %share.pod, "DNS TCP connection closed: the pod's connections are at the limit");
                continue;
            };
            let (me, share) = (self.clone(), share.clone());
            tasks.spawn(async move {
                let _permit = permit;
                me.tcp_connection(&share, s).await;
            });
        }
    }

    /// Length-prefixed queries, answered in order, until the client closes,
    /// sends garbage, stays idle or does not take its answers.
    async fn tcp_connection(&self, share: &PodShare, mut s: TcpStream) {
        let idle = self.limits.tcp_idle;
        loop {
            let len = match tokio::time::timeout(idle, s.read_u16()).await {
                Ok(Ok(len)) => len,
                _ => return,
            };
            let mut raw = vec![0u8; len as usize];
            match tokio::time::timeout(idle, s.read_exact(&mut raw)).await {
                Ok(Ok(_)) => {}
                _ => return,
            }
            if !share.admit(self) {
                continue;
            }
            let Some(resp) = self.respond(&raw).await else {
                return;
            };
            let Some(bytes) = DnsProxy::encode(&resp, Some(u16::MAX as usize)) else {
                return;
            };
            let Ok(n) = u16::try_from(bytes.len()) else {
                return;
            };
            let mut framed = Vec::with_capacity(bytes.len() + 2);
            framed.extend_from_slice(&n.to_be_bytes());
            framed.extend_from_slice(&bytes);
            match tokio::time::timeout(idle, s.write_all(&framed)).await {
                Ok(Ok(())) => {}
                _ => return,
            }
        }
    }
}
