//! The DNS proxy (15053 in each captured pod): service hostnames
//! (`name.ns.svc.<domain>`, and so the short forms a pod's search path
//! expands to) are answered with the service VIPs from the proxy state;
//! everything else is forwarded to the node's resolver (SERVFAIL when it
//! cannot be reached).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, ResponseCode};

use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tracing::debug;

use mesh_core::state::ProxyState;

const TTL: u32 = 30;
const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);

pub struct DnsProxy {
    state: ProxyState,
    /// e.g. "cluster.local".
    domain: String,
    upstream: Option<SocketAddr>,
}

/// The first nameserver in a resolv.conf.
pub fn upstream_from_resolv_conf(text: &str) -> Option<SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .find_map(|ip| ip.trim().parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
}

impl DnsProxy {
    pub fn new(
        state: ProxyState,
        domain: impl Into<String>,
        upstream: Option<SocketAddr>,
    ) -> Arc<Self> {
        Arc::new(DnsProxy {
            state,
            domain: domain.into(),
            upstream,
        })
    }

    /// The answer from the mesh's own records, or None to forward.
    pub fn local_answer(&self, query: &Message) -> Option<Message> {
        let q = query.queries.first()?;
        let name = q.name().to_lowercase().to_ascii();
        let name = name.trim_end_matches('.');
        let suffix = format!(".svc.{}", self.domain);
        let head = name.strip_suffix(&suffix)?;
        let mut resp = Message::response(query.metadata.id, query.metadata.op_code);
        resp.metadata.recursion_desired = query.metadata.recursion_desired;
        resp.metadata.recursion_available = true;
        resp.metadata.authoritative = true;
        resp.queries = query.queries.clone();
        let service = head
            .split_once('.')
            .filter(|(svc, ns)| !svc.is_empty() && !ns.contains('.'))
            .and_then(|(_, ns)| {
                self.state
                    .snapshot()
                    .service(&format!("{ns}/{name}"))
                    .cloned()
            });
        match service {
            None => resp.metadata.response_code = ResponseCode::NXDomain,
            Some(s) => {
                for (_, ip) in &s.service.vips {
                    let rdata = match (ip, q.query_type()) {
                        (IpAddr::V4(v4), RecordType::A) => RData::A(A(*v4)),
                        (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(*v6)),
                        _ => continue,
                    };
                    resp.add_answer(Record::from_rdata(q.name().clone(), TTL, rdata));
                }
            }
        }
        Some(resp)
    }

    fn failure(query: &Message, code: ResponseCode) -> Vec<u8> {
        let mut resp = Message::response(query.metadata.id, query.metadata.op_code);
        resp.queries = query.queries.clone();
        resp.metadata.response_code = code;
        resp.to_vec().unwrap_or_default()
    }

    async fn forward(&self, raw: &[u8], query: &Message) -> Vec<u8> {
        let Some(up) = self.upstream else {
            return Self::failure(query, ResponseCode::ServFail);
        };
        let attempt = async {
            let sock = UdpSocket::bind(if up.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).await?;
            sock.send_to(raw, up).await?;
            let mut buf = vec![0u8; 4096];
            let n = sock.recv(&mut buf).await?;
            buf.truncate(n);
            Ok::<_, std::io::Error>(buf)
        };
        match tokio::time::timeout(FORWARD_TIMEOUT, attempt).await {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) => {
                debug!(upstream = %up, error = %e, "DNS forward failed");
                Self::failure(query, ResponseCode::ServFail)
            }
            Err(_) => Self::failure(query, ResponseCode::ServFail),
        }
    }

    /// Answers one query message (the raw bytes); None for garbage.
    pub async fn answer(&self, raw: &[u8]) -> Option<Vec<u8>> {
        let query = match Message::from_vec(raw) {
            Ok(m) => m,
            Err(e) => {
                debug!(error = %e, "DNS query does not parse; dropped");
                return None;
            }
        };
        match self.local_answer(&query) {
            Some(resp) => resp.to_vec().ok(),
            None => Some(self.forward(raw, &query).await),
        }
    }

    pub async fn serve_udp(self: Arc<Self>, sock: UdpSocket) {
        let sock = Arc::new(sock);
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                continue;
            };
            let raw = buf[..n].to_vec();
            let (me, sock) = (self.clone(), sock.clone());
            tokio::spawn(async move {
                if let Some(resp) = me.answer(&raw).await {
                    let _ = sock.send_to(&resp, peer).await;
                }
            });
        }
    }

    pub async fn serve_tcp(self: Arc<Self>, listener: TcpListener) {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move {
                loop {
                    let Ok(len) = s.read_u16().await else { return };
                    let mut raw = vec![0u8; len as usize];
                    if s.read_exact(&mut raw).await.is_err() {
                        return;
                    }
                    let Some(resp) = me.answer(&raw).await else {
                        return;
                    };
                    if s.write_u16(resp.len() as u16).await.is_err()
                        || s.write_all(&resp).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    }
}
