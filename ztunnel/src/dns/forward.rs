//! Names outside the mesh go to the node's nameservers through
//! hickory-resolver: every nameserver of the node's resolv.conf (or the
//! configured ones) in turn, UDP with a retry over TCP when an answer comes
//! back truncated, and a cache that honours the answers' TTLs.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::{Resolver, TokioResolver};
use tracing::debug;

/// Per attempt, per nameserver.
const TIMEOUT: Duration = Duration::from_secs(2);
const ATTEMPTS: usize = 2;
const CACHE_ENTRIES: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ForwarderError {
    #[error("no upstream nameserver: none configured and none in resolv.conf")]
    NoNameservers,
    #[error("building the DNS resolver: {0}")]
    Build(#[from] NetError),
}

pub struct Forwarder {
    resolver: TokioResolver,
}

/// The nameservers of a resolv.conf, port 53.
pub fn nameservers_from_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|ip| ip.trim().parse().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

impl Forwarder {
    pub fn new(upstreams: &[SocketAddr]) -> Result<Forwarder, ForwarderError> {
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
        opts.cache_size = CACHE_ENTRIES;
        opts.use_hosts_file = ResolveHosts::Never;
        opts.preserve_intermediates = true;
        opts.try_tcp_on_error = true;
        let resolver = Resolver::builder_with_config(
            ResolverConfig::from_name_servers(servers),
            TokioRuntimeProvider::default(),
        )
        .with_options(opts)
        .build()?;
        Ok(Forwarder { resolver })
    }

    /// The upstream's answer to `query`'s first question, as a response to
    /// `query`: its records (CNAME chain included), NXDOMAIN or an empty
    /// NOERROR with the SOA, SERVFAIL when no nameserver answered.
    pub async fn answer(&self, query: &Message, name: &Name, qtype: RecordType) -> Message {
        let mut resp = super::response_to(query);
        let mut fqdn = name.clone();
        fqdn.set_fqdn(true);
        match self.resolver.lookup(fqdn, qtype).await {
            Ok(lookup) => {
                resp.add_answers(lookup.answers().iter().cloned());
            }
            Err(NetError::Dns(DnsError::NoRecordsFound(no))) => {
                resp.metadata.response_code = match no.response_code {
                    ResponseCode::NXDomain => ResponseCode::NXDomain,
                    _ => ResponseCode::NoError,
                };
                if let Some(soa) = no.soa {
                    resp.add_authority(soa.into_record_of_rdata());
                }
            }
            Err(NetError::Dns(DnsError::ResponseCode(code))) => {
                resp.metadata.response_code = code;
            }
            Err(e) => {
                debug!(name = %name, error = %e, "DNS forward failed");
                resp.metadata.response_code = ResponseCode::ServFail;
            }
        }
        resp
    }
}
