//! The proxy's own view of workloads and services, converted (and checked)
//! from the workload-discovery protos. Both the xDS client and the local file
//! produce protos, so this is the one conversion path.

use std::collections::HashMap;
use std::net::IpAddr;

use mesh_proto::istio::workload as pb;
use serde::{Deserialize, Serialize};

use crate::identity::{Identity, IdentityError};

/// Why a resource was rejected.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ResourceError {
    #[error("workload {uid:?}: {reason}")]
    Workload { uid: String, reason: String },
    #[error("service {key:?}: {reason}")]
    Service { key: String, reason: String },
    #[error("authorization {key:?}: {reason}")]
    Policy { key: String, reason: String },
    #[error("resource {name:?}: {reason}")]
    Envelope { name: String, reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TunnelProtocol {
    /// Plain TCP.
    None,
    /// HTTP/2 CONNECT over mutual TLS to port 15008.
    Hbone,
}

/// What runs a workload, as the workload-discovery protocol names it; peers
/// read it from baggage (`k8s.<kind>.name`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum WorkloadKind {
    #[default]
    Deployment,
    CronJob,
    Pod,
    Job,
}

impl WorkloadKind {
    pub fn from_proto(t: i32) -> WorkloadKind {
        match pb::WorkloadType::try_from(t) {
            Ok(pb::WorkloadType::Cronjob) => WorkloadKind::CronJob,
            Ok(pb::WorkloadType::Pod) => WorkloadKind::Pod,
            Ok(pb::WorkloadType::Job) => WorkloadKind::Job,
            // Deployment is the protocol's zero value (and any other owner).
            _ => WorkloadKind::Deployment,
        }
    }

    /// The word in the baggage key `k8s.<kind>.name`.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadKind::Deployment => "deployment",
            WorkloadKind::CronJob => "cronjob",
            WorkloadKind::Pod => "pod",
            WorkloadKind::Job => "job",
        }
    }

    pub fn parse(s: &str) -> Option<WorkloadKind> {
        [
            WorkloadKind::Deployment,
            WorkloadKind::CronJob,
            WorkloadKind::Pod,
            WorkloadKind::Job,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// Where a waypoint is reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayAddress {
    pub destination: GatewayDestination,
    pub hbone_port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GatewayDestination {
    Address { network: String, ip: IpAddr },
    Hostname { namespace: String, hostname: String },
}

/// A port mapping: what clients dial and what the workload listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    pub service_port: u16,
    pub target_port: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Workload {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub addresses: Vec<IpAddr>,
    pub network: String,
    pub protocol: TunnelProtocol,
    pub identity: Identity,
    pub waypoint: Option<GatewayAddress>,
    pub node: String,
    pub canonical_name: String,
    pub canonical_revision: String,
    pub workload_name: String,
    /// "namespace/hostname" -> this workload's port mappings for that service.
    pub services: HashMap<String, Vec<PortMapping>>,
    /// Selector-scoped policies ("namespace/name") that apply to it.
    pub authorization_policies: Vec<String>,
    pub healthy: bool,
    pub native_tunnel: bool,
    /// The cluster it runs in (Istio's cluster ID).
    #[serde(default)]
    pub cluster_id: String,
    #[serde(default)]
    pub workload_type: WorkloadKind,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    pub vips: Vec<(String, IpAddr)>,
    pub ports: Vec<PortMapping>,
    pub subject_alt_names: Vec<Identity>,
    pub waypoint: Option<GatewayAddress>,
}

impl Workload {
    /// The address to reach this workload at for a connection made to (or
    /// from) `like`: its first address of the same family, else its first
    /// address. A dual-stack connection stays in its family.
    pub fn address_like(&self, like: IpAddr) -> Option<IpAddr> {
        self.addresses
            .iter()
            .find(|a| a.is_ipv4() == like.is_ipv4())
            .or(self.addresses.first())
            .copied()
    }
}

impl Service {
    /// The xDS key, "namespace/hostname".
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }
}

/// Why a field of a resource could not be read (the reason in a
/// [`ResourceError`], and so in the NACK the control plane reads).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldError {
    #[error("address of {0} bytes is neither IPv4 nor IPv6")]
    AddressLength(usize),
    #[error("{field} {value} is not a port")]
    Port { field: &'static str, value: u32 },
    #[error("{0} is not a port")]
    PortValue(u32),
    #[error("waypoint without an address")]
    NoWaypointAddress,
    #[error("string match with no match type")]
    NoMatchType,
    #[error("prefix length {len} too long for {addr}")]
    PrefixLength { len: u32, addr: IpAddr },
    #[error("service account match {namespace:?}/{name:?} is incomplete")]
    ServiceAccount { namespace: String, name: String },
}

pub fn ip_from_bytes(b: &[u8]) -> Result<IpAddr, FieldError> {
    if let Ok(v4) = <[u8; 4]>::try_from(b) {
        return Ok(IpAddr::from(v4));
    }
    <[u8; 16]>::try_from(b)
        .map(IpAddr::from)
        .map_err(|_| FieldError::AddressLength(b.len()))
}

fn port(p: u32, field: &'static str) -> Result<u16, FieldError> {
    u16::try_from(p).map_err(|_| FieldError::Port { field, value: p })
}

fn ports(list: &[pb::Port]) -> Result<Vec<PortMapping>, FieldError> {
    list.iter()
        .map(|p| {
            Ok(PortMapping {
                service_port: port(p.service_port, "service_port")?,
                target_port: port(p.target_port, "target_port")?,
            })
        })
        .collect()
}

fn gateway(g: &pb::GatewayAddress) -> Result<GatewayAddress, FieldError> {
    let destination = match &g.destination {
        Some(pb::gateway_address::Destination::Address(a)) => GatewayDestination::Address {
            network: a.network.clone(),
            ip: ip_from_bytes(&a.address)?,
        },
        Some(pb::gateway_address::Destination::Hostname(h)) => GatewayDestination::Hostname {
            namespace: h.namespace.clone(),
            hostname: h.hostname.clone(),
        },
        None => return Err(FieldError::NoWaypointAddress),
    };
    let hbone_port = match g.hbone_mtls_port {
        0 => 15008,
        p => port(p, "hbone_mtls_port")?,
    };
    Ok(GatewayAddress {
        destination,
        hbone_port,
    })
}

impl Workload {
    /// Converts a workload resource. `default_trust_domain` fills an elided
    /// trust domain, as the protocol allows.
    pub fn from_proto(w: &pb::Workload, default_trust_domain: &str) -> Result<Self, ResourceError> {
        let fail = |reason: String| ResourceError::Workload {
            uid: w.uid.clone(),
            reason,
        };
        if w.uid.is_empty() {
            return Err(fail("no uid".into()));
        }
        let addresses = w
            .addresses
            .iter()
            .map(|a| ip_from_bytes(a))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| fail(e.to_string()))?;
        let td = if w.trust_domain.is_empty() {
            default_trust_domain
        } else {
            &w.trust_domain
        };
        let sa = if w.service_account.is_empty() {
            "default"
        } else {
            &w.service_account
        };
        let identity =
            Identity::new(td, &w.namespace, sa).map_err(|e: IdentityError| fail(e.to_string()))?;
        let protocol = match pb::TunnelProtocol::try_from(w.tunnel_protocol) {
            Ok(pb::TunnelProtocol::Hbone) => TunnelProtocol::Hbone,
            Ok(pb::TunnelProtocol::None) => TunnelProtocol::None,
            Err(_) => {
                return Err(fail(format!(
                    "unknown tunnel_protocol {}",
                    w.tunnel_protocol
                )));
            }
        };
        let services = w
            .services
            .iter()
            .map(|(k, v)| Ok((k.clone(), ports(&v.ports)?)))
            .collect::<Result<HashMap<_, _>, FieldError>>()
            .map_err(|e| fail(e.to_string()))?;
        Ok(Workload {
            uid: w.uid.clone(),
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            addresses,
            network: w.network.clone(),
            protocol,
            identity,
            waypoint: w
                .waypoint
                .as_ref()
                .map(gateway)
                .transpose()
                .map_err(|e| fail(e.to_string()))?,
            node: w.node.clone(),
            canonical_name: w.canonical_name.clone(),
            canonical_revision: w.canonical_revision.clone(),
            workload_name: w.workload_name.clone(),
            services,
            authorization_policies: w.authorization_policies.clone(),
            healthy: w.status == pb::WorkloadStatus::Healthy as i32,
            native_tunnel: w.native_tunnel,
            cluster_id: w.cluster_id.clone(),
            workload_type: WorkloadKind::from_proto(w.workload_type),
        })
    }
}

impl Service {
    pub fn from_proto(s: &pb::Service) -> Result<Self, ResourceError> {
        let fail = |reason: String| ResourceError::Service {
            key: format!("{}/{}", s.namespace, s.hostname),
            reason,
        };
        if s.hostname.is_empty() || s.namespace.is_empty() {
            return Err(fail("namespace and hostname are required".into()));
        }
        let vips = s
            .addresses
            .iter()
            .map(|a| Ok((a.network.clone(), ip_from_bytes(&a.address)?)))
            .collect::<Result<Vec<_>, FieldError>>()
            .map_err(|e| fail(e.to_string()))?;
        let subject_alt_names = s
            .subject_alt_names
            .iter()
            .map(|s| s.parse::<Identity>().map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(fail)?;
        Ok(Service {
            name: s.name.clone(),
            namespace: s.namespace.clone(),
            hostname: s.hostname.clone(),
            vips,
            ports: ports(&s.ports).map_err(|e| fail(e.to_string()))?,
            subject_alt_names,
            waypoint: s
                .waypoint
                .as_ref()
                .map(gateway)
                .transpose()
                .map_err(|e| fail(e.to_string()))?,
        })
    }
}
