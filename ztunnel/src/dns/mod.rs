//! The DNS proxy (15053 in each captured pod).
//!
//! - A and AAAA queries for the mesh's names are answered from the proxy
//!   state (`local`): Service VIPs, a headless Service's ready endpoints, and
//!   the per-pod names under a headless Service.
//! - Everything else goes to the node's nameservers (`forward`): all of
//!   them, with retries, TCP when an answer is truncated, and a cache.
//! - Each pod's listeners have their own limits (`serve`).

mod cache;
mod forward;
mod local;
mod metrics;
mod serve;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use tracing::{debug, warn};

pub use forward::{Forwarder, ForwarderError, NODE_IN_FLIGHT, nameservers_from_resolv_conf};
pub use local::{Local, lookup};
pub use metrics::DnsMetrics;
pub use serve::Limits;

use mesh_core::state::ProxyState;

/// TTL of the mesh's answers with a Service VIP.
const VIP_TTL: u32 = 30;
/// TTL of its answers with pod addresses (a headless Service, a per-pod
/// name): the cluster DNS's 5 s, as a restarted pod's address changes.
const ENDPOINT_TTL: u32 = 5;
/// The largest UDP answer we send when the client advertises more (the
/// DNS flag day's figure; larger answers are truncated and retried on TCP).
const MAX_UDP_PAYLOAD: u16 = 1232;

/// What becomes of one query.
pub enum Step {
    /// Not a query: no answer.
    Drop,
    /// Answered at once.
    Answer(Message),
    /// For the upstream.
    Forward(Message),
}

/// The longest a pod waits for a forwarded answer (and holds one of its
/// in-flight slots): every nameserver's attempts fit in it.
const FORWARD_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

pub struct DnsProxy {
    state: ProxyState,
    /// e.g. "cluster.local".
    domain: String,
    forwarder: Option<Forwarder>,
    metrics: DnsMetrics,
    limits: Limits,
    /// Rotates a headless Service's addresses from one answer to the next,
    /// so clients that take the first do not all pick the same pod.
    rotation: AtomicUsize,
}

/// The skeleton of a response to `query`: same id, opcode and question,
/// recursion flags, and an OPT record when the query had one.
fn response_to(query: &Message) -> Message {
    let mut resp = Message::response(query.metadata.id, query.metadata.op_code);
    resp.metadata.recursion_desired = query.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.queries = query.queries.clone();
    if query.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(MAX_UDP_PAYLOAD);
        resp.set_edns(edns);
    }
    resp
}

impl DnsProxy {
    /// `upstreams` empty: names outside the mesh get SERVFAIL (reported once
    /// here).
    pub fn new(
        state: ProxyState,
        domain: impl Into<String>,
        upstreams: &[SocketAddr],
        metrics: DnsMetrics,
        limits: Limits,
    ) -> Arc<Self> {
        let forwarder = match Forwarder::new(upstreams, metrics.clone()) {
            Ok(f) => Some(f),
            Err(e) => {
                warn!(error = %e, "DNS proxy: names outside the mesh will get SERVFAIL");
                None
            }
        };
        Arc::new(DnsProxy {
            state,
            domain: domain.into().trim_end_matches('.').to_ascii_lowercase(),
            forwarder,
            metrics,
            limits,
            rotation: AtomicUsize::new(0),
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The mesh's answer to an A or AAAA query, or None when the name is not
    /// the mesh's.
    pub fn local_answer(&self, query: &Message) -> Option<Message> {
        let q = query.queries.first()?;
        let qtype = q.query_type();
        if !matches!(qtype, RecordType::A | RecordType::AAAA) {
            return None;
        }
        let name = q.name().to_lowercase().to_ascii();
        let name = name.trim_end_matches('.');
        let mut resp = response_to(query);
        resp.metadata.authoritative = true;
        match lookup(&self.state.snapshot(), &self.domain, name) {
            Local::Unknown => return None,
            Local::NoSuchName => resp.metadata.response_code = ResponseCode::NXDomain,
            Local::Addresses { mut ips, endpoints } => {
                let ttl = if endpoints { ENDPOINT_TTL } else { VIP_TTL };
                if endpoints && !ips.is_empty() {
                    let n = self.rotation.fetch_add(1, Ordering::Relaxed) % ips.len();
                    ips.rotate_left(n);
                }
                for ip in ips {
                    let rdata = match (ip, qtype) {
                        (IpAddr::V4(v4), RecordType::A) => RData::A(A(v4)),
                        (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(v6)),
                        _ => continue,
                    };
                    resp.add_answer(Record::from_rdata(q.name().clone(), ttl, rdata));
                }
            }
        }
        Some(resp)
    }

    /// The first step for one query message: an answer the proxy gives at
    /// once (its own names, refusals), a question for the upstream, or
    /// nothing for what is not a query (garbage and responses are dropped).
    pub fn respond_local(&self, raw: &[u8]) -> Step {
        let query = match Message::from_vec(raw) {
            Ok(m) => m,
            Err(e) => {
                debug!(error = %e, "DNS query does not parse; dropped");
                return Step::Drop;
            }
        };
        if query.metadata.message_type != MessageType::Query {
            return Step::Drop;
        }
        self.metrics.requests.inc();
        let fail = |code| {
            let mut r = response_to(&query);
            r.metadata.response_code = code;
            Step::Answer(r)
        };
        if query.metadata.op_code != OpCode::Query {
            return fail(ResponseCode::NotImp);
        }
        let [q] = query.queries.as_slice() else {
            return fail(ResponseCode::FormErr);
        };
        if q.query_class() != DNSClass::IN {
            return fail(ResponseCode::NotImp);
        }
        if let Some(resp) = self.local_answer(&query) {
            return Step::Answer(resp);
        }
        if self.forwarder.is_none() {
            return fail(ResponseCode::ServFail);
        }
        Step::Forward(query)
    }

    /// The upstream's answer to a query `respond_local` passed on; SERVFAIL
    /// when none came within `FORWARD_DEADLINE`.
    pub async fn forward(&self, query: &Message) -> Message {
        let (Some(fwd), [q]) = (&self.forwarder, query.queries.as_slice()) else {
            let mut r = response_to(query);
            r.metadata.response_code = ResponseCode::ServFail;
            return r;
        };
        match tokio::time::timeout(
            FORWARD_DEADLINE,
            fwd.answer(query, q.name(), q.query_type()),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => {
                self.metrics.upstream_failures.inc();
                let mut r = response_to(query);
                r.metadata.response_code = ResponseCode::ServFail;
                r
            }
        }
    }

    /// Both steps: the response to one query message, or None.
    pub async fn respond(&self, raw: &[u8]) -> Option<Message> {
        match self.respond_local(raw) {
            Step::Drop => None,
            Step::Answer(m) => Some(m),
            Step::Forward(q) => Some(self.forward(&q).await),
        }
    }

    /// The wire form of `resp`. When it is longer than `limit` bytes, the
    /// answers that fit go, TC set (the client asks again over TCP; one
    /// that cannot still has some addresses).
    pub fn encode(resp: &Message, limit: Option<usize>) -> Option<Vec<u8>> {
        let bytes = resp.to_vec().ok()?;
        let Some(max) = limit.filter(|max| bytes.len() > *max) else {
            return Some(bytes);
        };
        let mut cut = resp.truncate();
        let mut fitting = cut.to_vec().ok()?;
        for record in &resp.answers {
            cut.answers.push(record.clone());
            match cut.to_vec() {
                Ok(b) if b.len() <= max => fitting = b,
                _ => break,
            }
        }
        Some(fitting)
    }

    /// The largest UDP answer `query`'s sender accepts.
    pub fn udp_limit(raw_query: &[u8]) -> usize {
        Message::from_vec(raw_query)
            .map(|q| q.max_payload().min(MAX_UDP_PAYLOAD))
            .unwrap_or(512) as usize
    }
}
