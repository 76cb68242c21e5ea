//! The DNS proxy's listeners in one pod, with that pod's limits: a bound on
//! queries in flight over UDP, on TCP connections and their idle time, and a
//! backoff instead of a spin when the socket keeps failing.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use super::{DnsProxy, Step};

/// One pod's share of the DNS proxy.
#[derive(Debug, Clone)]
pub struct Limits {
    /// UDP queries waiting for the upstream at once; more are dropped (the
    /// client retries). The mesh's own names need no slot.
    pub udp_in_flight: usize,
    /// Open TCP connections; more are closed at accept.
    pub tcp_connections: usize,
    /// A TCP connection with no query for this long is closed.
    pub tcp_idle: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            udp_in_flight: 256,
            tcp_connections: 32,
            tcp_idle: Duration::from_secs(10),
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

impl DnsProxy {
    pub async fn serve_udp(self: Arc<Self>, sock: UdpSocket) {
        let sock = Arc::new(sock);
        let permits = Arc::new(Semaphore::new(self.limits.udp_in_flight));
        let mut buf = vec![0u8; 4096];
        let mut backoff = Backoff(None);
        loop {
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
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                self.metrics.dropped.inc();
                debug!(%peer, "DNS query dropped: the pod's queries in flight are at the limit");
                continue;
            };
            let (me, sock) = (self.clone(), sock.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let resp = me.forward(&query).await;
                if let Some(bytes) = DnsProxy::encode(&resp, limit) {
                    let _ = sock.send_to(&bytes, peer).await;
                }
            });
        }
    }

    pub async fn serve_tcp(self: Arc<Self>, listener: TcpListener) {
        let permits = Arc::new(Semaphore::new(self.limits.tcp_connections));
        let mut backoff = Backoff(None);
        loop {
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
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                self.metrics.dropped.inc();
                debug!("DNS TCP connection closed: the pod's connections are at the limit");
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                me.tcp_connection(s).await;
            });
        }
    }

    /// Length-prefixed queries, answered in order, until the client closes,
    /// sends garbage or stays idle too long.
    async fn tcp_connection(&self, mut s: TcpStream) {
        loop {
            let len = match tokio::time::timeout(self.limits.tcp_idle, s.read_u16()).await {
                Ok(Ok(len)) => len,
                _ => return,
            };
            let mut raw = vec![0u8; len as usize];
            match tokio::time::timeout(self.limits.tcp_idle, s.read_exact(&mut raw)).await {
                Ok(Ok(_)) => {}
                _ => return,
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
            if s.write_u16(n).await.is_err() || s.write_all(&bytes).await.is_err() {
                return;
            }
        }
    }
}
