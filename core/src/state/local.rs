//! A local YAML file of the same resources xDS carries, for running a ztunnel
//! without a controller and for tests. It is turned into the protos and then
//! through the same conversion as xDS, so both paths agree.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;

use mesh_proto::istio::security as sec;
use mesh_proto::istio::workload as pb;
use serde::Deserialize;

use super::Update;

#[derive(Debug, thiserror::Error)]
pub enum LocalConfigError {
    #[error("{path}: {reason}")]
    Read { path: String, reason: String },
    #[error("{path}: {reason}")]
    Parse { path: String, reason: String },
    #[error("{path}: {reason}")]
    Resource { path: String, reason: String },
}

/// Why a resource of the file does not convert to its xDS form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocalResourceError {
    #[error("{0}: give exactly one of exact, prefix, suffix, presence")]
    StringMatch(String),
    #[error("{0:?}: {1}")]
    Cidr(String, String),
    #[error("tunnel_protocol {0:?} is not HBONE or NONE")]
    TunnelProtocol(String),
    #[error("status {0:?} is not HEALTHY or UNHEALTHY")]
    Status(String),
    #[error("scope {0:?} is not GLOBAL, NAMESPACE or WORKLOAD_SELECTOR")]
    Scope(String),
    #[error("action {0:?} is not ALLOW or DENY")]
    Action(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {
    #[serde(default)]
    pub workloads: Vec<LocalWorkload>,
    #[serde(default)]
    pub services: Vec<LocalService>,
    #[serde(default)]
    pub policies: Vec<LocalPolicy>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalPort {
    pub service_port: u16,
    pub target_port: u16,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalGateway {
    pub address: IpAddr,
    #[serde(default)]
    pub network: String,
    #[serde(default = "hbone_port")]
    pub hbone_mtls_port: u16,
}

fn hbone_port() -> u16 {
    15008
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalWorkload {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    #[serde(default)]
    pub network: String,
    /// HBONE or NONE.
    #[serde(default = "none")]
    pub tunnel_protocol: String,
    #[serde(default)]
    pub trust_domain: String,
    #[serde(default)]
    pub service_account: String,
    #[serde(default)]
    pub node: String,
    #[serde(default)]
    pub canonical_name: String,
    #[serde(default)]
    pub canonical_revision: String,
    #[serde(default)]
    pub workload_name: String,
    #[serde(default)]
    pub services: HashMap<String, Vec<LocalPort>>,
    #[serde(default)]
    pub authorization_policies: Vec<String>,
    #[serde(default = "healthy")]
    pub status: String,
    pub waypoint: Option<LocalGateway>,
}

fn none() -> String {
    "NONE".into()
}

fn healthy() -> String {
    "HEALTHY".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalService {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    #[serde(default)]
    pub network: String,
    #[serde(default)]
    pub ports: Vec<LocalPort>,
    pub waypoint: Option<LocalGateway>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalPolicy {
    pub name: String,
    pub namespace: String,
    /// GLOBAL, NAMESPACE or WORKLOAD_SELECTOR.
    pub scope: String,
    /// ALLOW or DENY.
    pub action: String,
    #[serde(default)]
    pub rules: Vec<LocalRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalRule {
    #[serde(default)]
    pub clauses: Vec<LocalClause>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalClause {
    #[serde(default)]
    pub matches: Vec<LocalMatch>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalMatch {
    #[serde(default)]
    pub namespaces: Vec<LocalStringMatch>,
    #[serde(default)]
    pub not_namespaces: Vec<LocalStringMatch>,
    #[serde(default)]
    pub principals: Vec<LocalStringMatch>,
    #[serde(default)]
    pub not_principals: Vec<LocalStringMatch>,
    /// CIDRs, "10.0.0.0/8" or a bare address.
    #[serde(default)]
    pub source_ips: Vec<String>,
    #[serde(default)]
    pub not_source_ips: Vec<String>,
    #[serde(default)]
    pub destination_ips: Vec<String>,
    #[serde(default)]
    pub not_destination_ips: Vec<String>,
    #[serde(default)]
    pub destination_ports: Vec<u16>,
    #[serde(default)]
    pub not_destination_ports: Vec<u16>,
}

/// Exactly one of the fields: `{exact: x}`, `{prefix: x}`, `{suffix: x}`,
/// or `{presence: {}}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalStringMatch {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub suffix: Option<String>,
    pub presence: Option<serde_yaml::Value>,
}

fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    }
}

fn gateway(g: &LocalGateway) -> pb::GatewayAddress {
    pb::GatewayAddress {
        destination: Some(pb::gateway_address::Destination::Address(
            pb::NetworkAddress {
                network: g.network.clone(),
                address: ip_bytes(&g.address),
            },
        )),
        hbone_mtls_port: g.hbone_mtls_port as u32,
    }
}

fn ports(p: &[LocalPort]) -> Vec<pb::Port> {
    p.iter()
        .map(|p| pb::Port {
            service_port: p.service_port as u32,
            target_port: p.target_port as u32,
        })
        .collect()
}

fn strings(list: &[LocalStringMatch]) -> Result<Vec<sec::StringMatch>, LocalResourceError> {
    use sec::string_match::MatchType;
    list.iter()
        .map(|m| {
            let t = match (&m.exact, &m.prefix, &m.suffix, &m.presence) {
                (Some(s), None, None, None) => MatchType::Exact(s.clone()),
                (None, Some(s), None, None) => MatchType::Prefix(s.clone()),
                (None, None, Some(s), None) => MatchType::Suffix(s.clone()),
                (None, None, None, Some(_)) => MatchType::Presence(()),
                _ => return Err(LocalResourceError::StringMatch(format!("{m:?}"))),
            };
            Ok(sec::StringMatch {
                match_type: Some(t),
            })
        })
        .collect()
}

fn cidrs(list: &[String]) -> Result<Vec<sec::Address>, LocalResourceError> {
    list.iter()
        .map(|s| {
            let (ip, len) = match s.split_once('/') {
                Some((ip, len)) => (ip, Some(len)),
                None => (s.as_str(), None),
            };
            let bad =
                |e: &dyn std::fmt::Display| LocalResourceError::Cidr(s.clone(), e.to_string());
            let ip: IpAddr = ip.parse().map_err(|e| bad(&e))?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let len = match len {
                Some(l) => l.parse::<u32>().map_err(|e| bad(&e))?,
                None => max,
            };
            Ok(sec::Address {
                address: ip_bytes(&ip),
                length: len,
            })
        })
        .collect()
}

impl LocalWorkload {
    pub fn to_proto(&self) -> Result<pb::Workload, LocalResourceError> {
        let protocol = match self.tunnel_protocol.as_str() {
            "HBONE" => pb::TunnelProtocol::Hbone,
            "NONE" => pb::TunnelProtocol::None,
            other => return Err(LocalResourceError::TunnelProtocol(other.into())),
        };
        let status = match self.status.as_str() {
            "HEALTHY" => pb::WorkloadStatus::Healthy,
            "UNHEALTHY" => pb::WorkloadStatus::Unhealthy,
            other => return Err(LocalResourceError::Status(other.into())),
        };
        Ok(pb::Workload {
            uid: self.uid.clone(),
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            addresses: self.addresses.iter().map(ip_bytes).collect(),
            network: self.network.clone(),
            tunnel_protocol: protocol as i32,
            trust_domain: self.trust_domain.clone(),
            service_account: self.service_account.clone(),
            node: self.node.clone(),
            canonical_name: self.canonical_name.clone(),
            canonical_revision: self.canonical_revision.clone(),
            workload_name: self.workload_name.clone(),
            services: self
                .services
                .iter()
                .map(|(k, v)| (k.clone(), pb::PortList { ports: ports(v) }))
                .collect(),
            authorization_policies: self.authorization_policies.clone(),
            status: status as i32,
            waypoint: self.waypoint.as_ref().map(gateway),
            ..Default::default()
        })
    }
}

impl LocalService {
    pub fn to_proto(&self) -> pb::Service {
        pb::Service {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            hostname: self.hostname.clone(),
            addresses: self
                .addresses
                .iter()
                .map(|ip| pb::NetworkAddress {
                    network: self.network.clone(),
                    address: ip_bytes(ip),
                })
                .collect(),
            ports: ports(&self.ports),
            waypoint: self.waypoint.as_ref().map(gateway),
            ..Default::default()
        }
    }
}

impl LocalPolicy {
    pub fn to_proto(&self) -> Result<sec::Authorization, LocalResourceError> {
        let scope = match self.scope.as_str() {
            "GLOBAL" => sec::Scope::Global,
            "NAMESPACE" => sec::Scope::Namespace,
            "WORKLOAD_SELECTOR" => sec::Scope::WorkloadSelector,
            other => return Err(LocalResourceError::Scope(other.into())),
        };
        let action = match self.action.as_str() {
            "ALLOW" => sec::Action::Allow,
            "DENY" => sec::Action::Deny,
            other => return Err(LocalResourceError::Action(other.into())),
        };
        let mut rules = Vec::new();
        for r in &self.rules {
            let mut clauses = Vec::new();
            for c in &r.clauses {
                let mut matches = Vec::new();
                for m in &c.matches {
                    matches.push(sec::Match {
                        namespaces: strings(&m.namespaces)?,
                        not_namespaces: strings(&m.not_namespaces)?,
                        principals: strings(&m.principals)?,
                        not_principals: strings(&m.not_principals)?,
                        source_ips: cidrs(&m.source_ips)?,
                        not_source_ips: cidrs(&m.not_source_ips)?,
                        destination_ips: cidrs(&m.destination_ips)?,
                        not_destination_ips: cidrs(&m.not_destination_ips)?,
                        destination_ports: m.destination_ports.iter().map(|p| *p as u32).collect(),
                        not_destination_ports: m
                            .not_destination_ports
                            .iter()
                            .map(|p| *p as u32)
                            .collect(),
                        ..Default::default()
                    });
                }
                clauses.push(sec::Clause { matches });
            }
            rules.push(sec::Rule { clauses });
        }
        Ok(sec::Authorization {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            scope: scope as i32,
            action: action as i32,
            rules,
            dry_run: false,
        })
    }
}

impl LocalConfig {
    pub fn load(path: &Path) -> Result<Self, LocalConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| LocalConfigError::Read {
            path: p.clone(),
            reason: e.to_string(),
        })?;
        serde_yaml::from_str(&text).map_err(|e| LocalConfigError::Parse {
            path: p,
            reason: e.to_string(),
        })
    }

    /// Every resource as a state update, through the xDS conversion.
    pub fn to_updates(
        &self,
        trust_domain: &str,
        path: &str,
    ) -> Result<Vec<Update>, LocalConfigError> {
        let fail = |reason: String| LocalConfigError::Resource {
            path: path.to_string(),
            reason,
        };
        let mut out = Vec::new();
        for w in &self.workloads {
            let proto = w
                .to_proto()
                .map_err(|e| fail(format!("workload {:?}: {e}", w.uid)))?;
            let addr = pb::Address {
                r#type: Some(pb::address::Type::Workload(proto)),
            };
            out.push(Update::from_address(&addr, trust_domain).map_err(|e| fail(e.to_string()))?);
        }
        for s in &self.services {
            let addr = pb::Address {
                r#type: Some(pb::address::Type::Service(s.to_proto())),
            };
            out.push(Update::from_address(&addr, trust_domain).map_err(|e| fail(e.to_string()))?);
        }
        for p in &self.policies {
            let proto = p
                .to_proto()
                .map_err(|e| fail(format!("policy {}/{}: {e}", p.namespace, p.name)))?;
            out.push(Update::from_authorization(&proto).map_err(|e| fail(e.to_string()))?);
        }
        Ok(out)
    }
}
