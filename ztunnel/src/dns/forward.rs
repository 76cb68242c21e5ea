//! Names outside the mesh go to the node's nameservers through
//! hickory-resolver: one at a time, the fastest first (a nameserver that
//! fails or times out goes to the back), over UDP and again over TCP when an
//! answer comes back truncated. Answers are kept in a bounded cache (`cache.rs`), and the
//! questions waiting for an upstream are bounded for the whole node.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
    ServerOrderingStrategy,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::{Resolver, TokioResolver};
use tokio::sync::Semaphore;
use tracing::debug;

use super::cache::{Answer, AnswerCache};
use super::metrics::DnsMetrics;

/// Per attempt: the pool shares it across its nameservers, so a silent
/// nameserver costs one attempt, after which the pool (ordered by response
/// times, a failure counting against) starts with another.
const TIMEOUT: Duration = Duration::from_millis(1500);
const ATTEMPTS: usize = 3;
/// Questions waiting for an upstream at once, all pods together; more get
/// SERVFAIL at once.
pub const NODE_IN_FLIGHT: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum ForwarderError {
    #[error("no upstream nameserver: none configured and none in resolv.conf")]
    NoNameservers,
    #[error("building the DNS resolver: {0}")]
    Build(#[from] NetError),
}

pub struct Forwarder {
    resolver: TokioResolver,
    cache: AnswerCache,
    in_flight: Arc<Semaphore>,
    metrics: DnsMetrics,
}

/// The nameservers of a resolv.conf, port 53 (a `%zone` or a trailing
/// comment after the address is dropped).
pub fn nameservers_from_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter_map(|ip| ip.split('%').next()?.parse().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

impl Forwarder {
    pub fn new(upstreams: &[SocketAddr], metrics: DnsMetrics) -> Result<Forwarder, ForwarderError> {
        if upstreams.is_empty() {
            return Err(ForwarderError::NoNameservers);
        }
        let servers = upstreams
            .iter()
            .map(|up| {
                let conn = |mut c: ConnectionConfig| {
                    c.port = up.port();
                    c
                };
                let mut ns = NameServerConfig::udp_and_tcp(up.ip());
                ns.connections = vec![conn(ConnectionConfig::udp()), conn(ConnectionConfig::tcp())];
                ns
            })
            .collect();
        let mut opts = ResolverOpts::default();
        // The query arrives already expanded by the pod's resolver: no
        // search list of our own, no hosts file of the node's.
        opts.ndots = 0;
        opts.timeout = TIMEOUT;
        opts.attempts = ATTEMPTS;
        // Our own cache, bounded in bytes, replaces hickory's.
        opts.cache_size = 0;
        opts.use_hosts_file = ResolveHosts::Never;
        opts.preserve_intermediates = true;
        // One nameserver at a time (no fan-out doubling the upstream's
        // load), the fastest first.
        opts.num_concurrent_reqs = 1;
        opts.server_ordering_strategy = ServerOrderingStrategy::QueryStatistics;
        let resolver = Resolver::builder_with_config(
            ResolverConfig::from_name_servers(servers),
            TokioRuntimeProvider::default(),
        )
        .with_options(opts)
        .build()?;
        Ok(Forwarder {
            resolver,
            cache: AnswerCache::default(),
            in_flight: Arc::new(Semaphore::new(NODE_IN_FLIGHT)),
            metrics,
        })
    }

    /// The bytes the cache holds now.
    pub fn cache_weight(&self) -> u64 {
        self.cache.weight()
    }

    /// The upstream's answer to `query`'s question, as a response to
    /// `query`: its records (CNAME chain included), NXDOMAIN or an empty
    /// NOERROR with the SOA, SERVFAIL when no nameserver answered or the
    /// node has too many questions outstanding.
    pub async fn answer(&self, query: &Message, name: &Name, qtype: RecordType) -> Message {
        let mut resp = super::response_to(query);
        let key = (name.to_lowercase().to_ascii(), qtype);
        let answer = match self.cache.get(&key) {
            Some(hit) => {
                self.metrics.cache_hits.inc();
                hit
            }
            None => {
                let Some(answer) = self.ask(name, qtype).await else {
                    resp.metadata.response_code = ResponseCode::ServFail;
                    return resp;
                };
                let answer = Arc::new(answer);
                self.cache.put(key, answer.clone());
                answer
            }
        };
        resp.metadata.response_code = answer.code;
        let (answers, authorities) = answer.aged();
        resp.answers = answers;
        resp.authorities = authorities;
        resp
    }

    /// One question to the nameservers; None when none answered.
    async fn ask(&self, name: &Name, qtype: RecordType) -> Option<Answer> {
        let Ok(_slot) = self.in_flight.try_acquire() else {
            self.metrics.dropped.inc();
            debug!(%name, "DNS forward refused: the node's questions in flight are at the limit");
            return None;
        };
        self.metrics.upstream_requests.inc();
        let mut fqdn = name.clone();
        fqdn.set_fqdn(true);
        let answer = match self.resolver.lookup(fqdn, qtype).await {
            Ok(lookup) => Answer::new(ResponseCode::NoError, lookup.answers().to_vec(), Vec::new()),
            Err(NetError::Dns(DnsError::NoRecordsFound(no))) => {
                let code = match no.response_code {
                    ResponseCode::NXDomain => ResponseCode::NXDomain,
                    _ => ResponseCode::NoError,
                };
                let soa = no.soa.map(|s| s.into_record_of_rdata());
                Answer::new(code, Vec::new(), soa.into_iter().collect())
            }
            Err(NetError::Dns(DnsError::ResponseCode(code))) if code != ResponseCode::ServFail => {
                Answer::new(code, Vec::new(), Vec::new())
            }
            Err(e) => {
                debug!(%name, error = %e, "DNS forward failed");
                self.metrics.upstream_failures.inc();
                return None;
            }
        };
        Some(answer)
    }
}
