//! The ingress role's configuration: one `mesh.waypoint.Ingress` from the
//! controller, compiled into listener ports, each with its listeners (told
//! apart by SNI for HTTPS, by the Host header for HTTP), each with virtual
//! hosts of routes. The data path is the waypoint's own (`proxy`); this
//! module only says which routes a request on a port gets, and which
//! certificate a TLS handshake is answered with.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use mesh_proto::mesh::waypoint as pb;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;

use crate::routes::ServiceConfig;

/// One certificate, ready to serve.
pub struct Certificate {
    /// "namespace/name" of the Secret it came from.
    pub source: String,
    pub key: Arc<CertifiedKey>,
}

impl fmt::Debug for Certificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        write!(f, "Certificate({})", self.source)
    }
}

/// Why a listener's certificate cannot be served; each names the Secret
/// (`of`) it came from.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("certificate chain of {of}: {reason}")]
    Chain { of: String, reason: String },
    #[error("certificate chain of {0} is empty")]
    EmptyChain(String),
    #[error("private key of {of}: {reason}")]
    Key { of: String, reason: String },
    #[error("certificate and key of {of} do not match: {reason}")]
    Mismatch { of: String, reason: String },
}

/// Why an Ingress resource is refused (the whole resource: NACKed).
#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    #[error("listener {listener}: port {port} is out of range")]
    Port { listener: String, port: u32 },
    #[error("listener {listener}: unknown protocol {protocol}")]
    Protocol { listener: String, protocol: i32 },
    #[error("listener {listener}: {source}")]
    Certificate {
        listener: String,
        source: CertificateError,
    },
    #[error("listener {0}: HTTPS without a certificate")]
    NoCertificate(String),
    #[error("listener {listener}: {source}")]
    VirtualHost {
        listener: String,
        source: crate::routes::RouteError,
    },
    #[error(
        "listener {listener}: port {port} is both HTTP and HTTPS; listeners sharing a port must share a protocol"
    )]
    MixedProtocols { listener: String, port: u16 },
}

/// Loads a PEM chain and key, and checks that they belong together.
pub fn load_certificate(c: &pb::TlsCertificate) -> Result<Certificate, CertificateError> {
    let of = || c.source.clone();
    let chain = CertificateDer::pem_slice_iter(c.cert_chain.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertificateError::Chain {
            of: of(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(CertificateError::EmptyChain(of()));
    }
    let key_error = |e: &dyn std::fmt::Display| CertificateError::Key {
        of: of(),
        reason: e.to_string(),
    };
    let key = PrivateKeyDer::from_pem_slice(c.private_key.as_bytes()).map_err(|e| key_error(&e))?;
    let provider = mesh_core::tls::provider();
    let signer = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| key_error(&e))?;
    let ck = CertifiedKey::new(chain, signer);
    ck.keys_match().map_err(|e| CertificateError::Mismatch {
        of: of(),
        reason: e.to_string(),
    })?;
    Ok(Certificate {
        source: c.source.clone(),
        key: Arc::new(ck),
    })
}

/// How specifically `pattern` (a listener or virtual host hostname) matches
/// `host`: exact beats any wildcard, a longer wildcard beats a shorter one,
/// and an empty pattern (any host) comes last. None: no match.
pub fn host_rank(pattern: &str, host: &str) -> Option<(u8, usize)> {
    if pattern.is_empty() {
        return Some((0, 0));
    }
    if let Some(suffix) = pattern.strip_prefix('*') {
        // "*.example.com" takes one or more labels in front of ".example.com".
        return (host.len() > suffix.len() && host.ends_with(suffix)).then_some((1, suffix.len()));
    }
    (pattern == host).then_some((2, pattern.len()))
}

/// A request's host, as routes match it: lower case, without a port or
/// the trailing dot.
pub fn normalize_host(authority: &str) -> String {
    let h = if authority.starts_with('[') {
        // An IPv6 literal keeps its brackets and loses the port.
        authority
            .split_once(']')
            .map_or(authority, |(a, _)| &authority[..a.len() + 1])
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    h.trim_end_matches('.').to_ascii_lowercase()
}

/// One virtual host: its hostnames and routes.
#[derive(Debug)]
pub struct VirtualHost {
    pub hostnames: Vec<String>,
    pub routes: Arc<ServiceConfig>,
}

impl VirtualHost {
    fn rank(&self, host: &str) -> Option<(u8, usize)> {
        if self.hostnames.is_empty() {
            return Some((0, 0));
        }
        self.hostnames
            .iter()
            .filter_map(|p| host_rank(p, host))
            .max()
    }
}

#[derive(Debug)]
pub struct Listener {
    pub name: String,
    pub hostname: String,
    pub certificate: Option<Certificate>,
    pub virtual_hosts: Vec<VirtualHost>,
}

impl Listener {
    /// The routes for a request's host; None means 404.
    pub fn routes_for(&self, host: &str) -> Option<&Arc<ServiceConfig>> {
        self.virtual_hosts
            .iter()
            .filter_map(|v| v.rank(host).map(|r| (r, v)))
            // The first of equally specific ones, as the controller sent them.
            .fold(
                None::<((u8, usize), &VirtualHost)>,
                |best, (r, v)| match best {
                    Some((b, _)) if b >= r => best,
                    _ => Some((r, v)),
                },
            )
            .map(|(_, v)| &v.routes)
    }
}

/// Everything served on one port.
#[derive(Debug)]
pub struct Port {
    pub https: bool,
    pub listeners: Vec<Arc<Listener>>,
}

impl Port {
    /// The listener whose hostname best matches `host` (the SNI name, or
    /// the Host header); without a name, only a listener for any host.
    pub fn listener_for(&self, host: Option<&str>) -> Option<&Arc<Listener>> {
        let host = host.map(normalize_host);
        let mut best: Option<((u8, usize), &Arc<Listener>)> = None;
        for l in &self.listeners {
            let rank = match &host {
                Some(h) => host_rank(&l.hostname, h),
                None => l.hostname.is_empty().then_some((0, 0)),
            };
            if let Some(r) = rank
                && best.is_none_or(|(b, _)| r > b)
            {
                best = Some((r, l));
            }
        }
        best.map(|(_, l)| l)
    }
}

/// The compiled Ingress resource.
#[derive(Debug, Default)]
pub struct IngressConfig {
    /// "namespace/name" of the Gateway; empty before the first push.
    pub gateway: String,
    pub ports: BTreeMap<u16, Arc<Port>>,
    /// Keys of the backend services, to drop them from the route table
    /// when a later version no longer names them.
    pub backends: Vec<String>,
}

/// Compiles the resource; the backend services go to the route table.
pub fn compile(ing: &pb::Ingress) -> Result<(IngressConfig, Vec<ServiceConfig>), IngressError> {
    let gateway = format!("{}/{}", ing.namespace, ing.name);
    let mut ports: BTreeMap<u16, Port> = BTreeMap::new();
    for l in &ing.listeners {
        let lname = || l.name.clone();
        let port = u16::try_from(l.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| IngressError::Port {
                listener: lname(),
                port: l.port,
            })?;
        let https = match pb::ListenerProtocol::try_from(l.protocol) {
            Ok(pb::ListenerProtocol::Http) => false,
            Ok(pb::ListenerProtocol::Https) => true,
            Err(_) => {
                return Err(IngressError::Protocol {
                    listener: lname(),
                    protocol: l.protocol,
                });
            }
        };
        let certificate = match (&l.certificate, https) {
            (Some(c), true) => {
                Some(
                    load_certificate(c).map_err(|source| IngressError::Certificate {
                        listener: lname(),
                        source,
                    })?,
                )
            }
            (None, true) => return Err(IngressError::NoCertificate(lname())),
            (_, false) => None,
        };
        let virtual_hosts = l
            .virtual_hosts
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let key = format!("{gateway}/{}/{i}", l.name);
                ServiceConfig::compile_virtual_host(key, &ing.namespace, v)
                    .map(|routes| VirtualHost {
                        hostnames: v.hostnames.iter().map(|h| h.to_ascii_lowercase()).collect(),
                        routes: Arc::new(routes),
                    })
                    .map_err(|source| IngressError::VirtualHost {
                        listener: lname(),
                        source,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let listener = Arc::new(Listener {
            name: l.name.clone(),
            hostname: l.hostname.to_ascii_lowercase(),
            certificate,
            virtual_hosts,
        });
        let entry = ports.entry(port).or_insert_with(|| Port {
            https,
            listeners: Vec::new(),
        });
        if entry.https != https {
            return Err(IngressError::MixedProtocols {
                listener: lname(),
                port,
            });
        }
        entry.listeners.push(listener);
    }
    let backends: Vec<ServiceConfig> = ing
        .backends
        .iter()
        .map(ServiceConfig::compile_backend_service)
        .collect();
    Ok((
        IngressConfig {
            gateway,
            ports: ports.into_iter().map(|(p, v)| (p, Arc::new(v))).collect(),
            backends: backends.iter().map(|b| b.key.clone()).collect(),
        },
        backends,
    ))
}

/// The live config, swapped whole; listeners watch it for ports to open
/// and close.
#[derive(Clone)]
pub struct IngressTable {
    inner: Arc<ArcSwap<IngressConfig>>,
    changed: watch::Sender<u64>,
}

impl Default for IngressTable {
    fn default() -> Self {
        IngressTable {
            inner: Arc::new(ArcSwap::from_pointee(IngressConfig::default())),
            changed: watch::Sender::new(0),
        }
    }
}

impl IngressTable {
    pub fn load(&self) -> Arc<IngressConfig> {
        self.inner.load_full()
    }

    pub fn port(&self, port: u16) -> Option<Arc<Port>> {
        self.inner.load().ports.get(&port).cloned()
    }

    pub fn store(&self, cfg: IngressConfig) {
        self.inner.store(Arc::new(cfg));
        self.changed.send_modify(|n| *n += 1);
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// Answers a TLS handshake on `port` with the certificate of the listener
/// its SNI name selects. No listener, no certificate: rustls refuses the
/// handshake with an alert.
#[derive(Debug)]
pub struct SniResolver {
    pub table: IngressTable,
    pub port: u16,
}

impl fmt::Debug for IngressTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IngressTable({})", self.inner.load().gateway)
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let port = self.table.port(self.port)?;
        let l = port.listener_for(hello.server_name())?;
        l.certificate.as_ref().map(|c| c.key.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_rank_exact_then_longest_wildcard_then_any() {
        assert_eq!(host_rank("a.example.com", "a.example.com"), Some((2, 13)));
        assert_eq!(host_rank("a.example.com", "b.example.com"), None);
        assert!(host_rank("*.example.com", "a.example.com").is_some());
        assert!(host_rank("*.example.com", "a.b.example.com").is_some());
        assert_eq!(host_rank("*.example.com", "example.com"), None);
        assert!(
            host_rank("*.example.com", "a.b.example.com")
                < host_rank("*.b.example.com", "a.b.example.com")
        );
        assert_eq!(host_rank("", "anything"), Some((0, 0)));
        assert_eq!(normalize_host("Shop.Example.com:8443"), "shop.example.com");
        assert_eq!(normalize_host("shop.example.com."), "shop.example.com");
        assert_eq!(normalize_host("[::1]:80"), "[::1]");
    }

    fn cert_pem(names: &[&str]) -> (String, String) {
        let k = rcgen::KeyPair::generate().expect("key");
        let p =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("params");
        let c = p.self_signed(&k).expect("cert");
        (c.pem(), k.serialize_pem())
    }

    fn listener(name: &str, host: &str, cert: Option<(String, String)>) -> pb::Listener {
        pb::Listener {
            name: name.into(),
            port: 8443,
            protocol: if cert.is_some() {
                pb::ListenerProtocol::Https as i32
            } else {
                pb::ListenerProtocol::Http as i32
            },
            hostname: host.into(),
            certificate: cert.map(|(c, k)| pb::TlsCertificate {
                source: format!("gw/{name}"),
                cert_chain: c,
                private_key: k,
            }),
            virtual_hosts: vec![pb::VirtualHost {
                hostnames: vec![],
                routes: vec![pb::Route {
                    name: format!("gw/{name}/0"),
                    ..Default::default()
                }],
            }],
        }
    }

    #[test]
    fn listeners_on_one_port_are_picked_by_name() {
        let ing = pb::Ingress {
            namespace: "edge".into(),
            name: "gw".into(),
            listeners: vec![
                listener("wild", "*.example.com", Some(cert_pem(&["*.example.com"]))),
                listener(
                    "shop",
                    "shop.example.com",
                    Some(cert_pem(&["shop.example.com"])),
                ),
            ],
            backends: vec![],
        };
        let (cfg, _) = compile(&ing).expect("compiles");
        let port = cfg.ports.get(&8443).expect("port");
        assert!(port.https);
        let name = |h: Option<&str>| port.listener_for(h).map(|l| l.name.clone());
        assert_eq!(name(Some("shop.example.com")).as_deref(), Some("shop"));
        assert_eq!(name(Some("news.example.com")).as_deref(), Some("wild"));
        assert_eq!(name(Some("other.test")), None);
        assert_eq!(name(None), None);
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused() {
        let (c, _) = cert_pem(&["shop.example.com"]);
        let (_, other_key) = cert_pem(&["shop.example.com"]);
        let ing = pb::Ingress {
            namespace: "edge".into(),
            name: "gw".into(),
            listeners: vec![listener("shop", "shop.example.com", Some((c, other_key)))],
            backends: vec![],
        };
        let err = compile(&ing).expect_err("mismatched key").to_string();
        assert!(
            err.contains("listener shop") && err.contains("do not match"),
            "{err}"
        );
        let ing = pb::Ingress {
            listeners: vec![listener(
                "shop",
                "",
                Some(("garbage".into(), "garbage".into())),
            )],
            ..ing
        };
        let err = compile(&ing).expect_err("garbage").to_string();
        assert!(err.contains("listener shop"), "{err}");
    }

    #[test]
    fn mixed_protocols_on_one_port_are_refused() {
        let ing = pb::Ingress {
            namespace: "edge".into(),
            name: "gw".into(),
            listeners: vec![
                listener("a", "a.test", Some(cert_pem(&["a.test"]))),
                listener("b", "b.test", None),
            ],
            backends: vec![],
        };
        let err = compile(&ing).expect_err("mixed").to_string();
        assert!(err.contains("both HTTP and HTTPS"), "{err}");
    }
}
