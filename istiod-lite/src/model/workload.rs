//! Pods and Services to `istio.workload` resources.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use mesh_proto::istio::workload as pb;

use super::pod::PodView;
use super::{DATAPLANE_MODE, Model, NsName, USE_WAYPOINT, WAYPOINT_CLASS, WAYPOINT_FOR, in_ns};

type Labels = BTreeMap<String, String>;

pub(super) fn labels(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Labels {
    m.labels.clone().unwrap_or_default()
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    }
}

fn selects(selector: &Labels, l: &Labels) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| l.get(k) == Some(v))
}

/// Enrolled in the mesh: the pod's own label wins (`none` opts out), else
/// the namespace's (`ns`, the pod's).
pub fn enrolled(model: &Model, ns: &str, p: &PodView) -> bool {
    match p.label(DATAPLANE_MODE) {
        Some("none") => false,
        Some("ambient") => true,
        _ => model.namespaces.get(ns).is_some_and(|n| {
            labels(&n.metadata).get(DATAPLANE_MODE).map(String::as_str) == Some("ambient")
        }),
    }
}

/// The waypoint Gateway named by `own` (or the namespace label), when it
/// serves `kind` ("service" or "workload"), with the VIP of its Service,
/// where it is reached. One lookup for addresses and waypoint routes alike.
fn waypoint_gateway(model: &Model, ns: &str, own: &Labels, kind: &str) -> Option<(NsName, IpAddr)> {
    let ns_labels = model
        .namespaces
        .get(ns)
        .map(|n| labels(&n.metadata))
        .unwrap_or_default();
    // A waypoint's own pods and Service are never sent through a waypoint
    // (its namespace's label would otherwise point it at itself).
    if own.contains_key(super::GATEWAY_NAME_LABEL) {
        return None;
    }
    let name = own
        .get(USE_WAYPOINT)
        .or_else(|| ns_labels.get(USE_WAYPOINT))?;
    if name == "none" {
        return None;
    }
    let key = (ns.to_string(), name.clone());
    let gw = model.gateways.get(&key)?;
    if gw.spec.gateway_class_name != WAYPOINT_CLASS {
        return None;
    }
    let gl = labels(&gw.metadata);
    let serves = gl
        .get(WAYPOINT_FOR)
        .map(String::as_str)
        .unwrap_or("service");
    if !(serves == kind || serves == "all") {
        return None;
    }
    // The waypoint is reached at its Service's VIP.
    let svc = model.services.get(&key)?;
    let vip: IpAddr = svc.spec.as_ref()?.cluster_ip.as_deref()?.parse().ok()?;
    Some((key, vip))
}

fn waypoint(model: &Model, ns: &str, own: &Labels, kind: &str) -> Option<pb::GatewayAddress> {
    let (_, vip) = waypoint_gateway(model, ns, own, kind)?;
    Some(pb::GatewayAddress {
        destination: Some(pb::gateway_address::Destination::Address(
            pb::NetworkAddress {
                network: String::new(),
                address: ip_bytes(vip),
            },
        )),
        hbone_mtls_port: 15008,
    })
}

/// The waypoint Gateway (namespace, name) that serves Service `key`: the
/// one its published address points at.
pub fn service_waypoint(model: &Model, key: &NsName) -> Option<NsName> {
    let svc = model.services.get(key)?;
    waypoint_gateway(model, &key.0, &labels(&svc.metadata), "service").map(|(gw, _)| gw)
}

fn target_port(tp: Option<&IntOrString>, port: i32, pod: &PodView) -> u32 {
    match tp {
        None => port as u32,
        Some(IntOrString::Int(i)) => *i as u32,
        Some(IntOrString::String(name)) => pod.named_port(name),
    }
}

pub fn hostname(model: &Model, ns: &str, name: &str) -> String {
    format!("{name}.{ns}.svc.{}", model.cfg.domain_suffix)
}

fn canonical(l: &Labels, keys: &[&str], default: &str) -> String {
    keys.iter()
        .find_map(|k| l.get(*k))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

/// The services a pod is an endpoint of, with their ports on it: those
/// whose selector picks its labels, and selector-less ones whose
/// EndpointSlices name one of its addresses.
fn services_of(
    model: &Model,
    ns: &str,
    p: &PodView,
    pl: &Labels,
    ips: &[IpAddr],
) -> BTreeMap<String, pb::PortList> {
    let mut services: BTreeMap<String, pb::PortList> = BTreeMap::new();
    for sk in in_ns(&model.services, ns) {
        let Some(svc) = model.services.get(&sk) else {
            continue;
        };
        let Some(spec) = svc.spec.as_ref() else {
            continue;
        };
        let selector = spec.selector.clone().unwrap_or_default();
        if selects(&selector, pl) {
            let ports = spec
                .ports
                .iter()
                .flatten()
                .map(|sp| pb::Port {
                    service_port: sp.port as u32,
                    target_port: target_port(sp.target_port.as_ref(), sp.port, p),
                })
                .collect();
            services.insert(
                format!("{ns}/{}", hostname(model, ns, &sk.1)),
                pb::PortList { ports },
            );
        }
    }
    // Services without a selector name their endpoints in EndpointSlices.
    for slk in in_ns(&model.slices, ns) {
        let Some(slice) = model.slices.get(&slk) else {
            continue;
        };
        let Some(svc_name) = labels(&slice.metadata)
            .get("kubernetes.io/service-name")
            .cloned()
        else {
            continue;
        };
        let Some(svc) = model.services.get(&(ns.to_string(), svc_name.clone())) else {
            continue;
        };
        let Some(spec) = svc.spec.as_ref() else {
            continue;
        };
        if spec.selector.as_ref().is_some_and(|s| !s.is_empty()) {
            continue;
        }
        let ours = slice
            .endpoints
            .iter()
            .flatten()
            .flat_map(|e| e.addresses.iter())
            .any(|a| a.parse::<IpAddr>().is_ok_and(|ip| ips.contains(&ip)));
        if !ours {
            continue;
        }
        let ports = spec
            .ports
            .iter()
            .flatten()
            .map(|sp| {
                let from_slice = slice
                    .ports
                    .iter()
                    .flatten()
                    .find(|ep| ep.name == sp.name)
                    .and_then(|ep| ep.port);
                pb::Port {
                    service_port: sp.port as u32,
                    target_port: from_slice.unwrap_or(sp.port) as u32,
                }
            })
            .collect();
        services.insert(
            format!("{ns}/{}", hostname(model, ns, &svc_name)),
            pb::PortList { ports },
        );
    }
    services
}

/// The policies (AuthorizationPolicies and PeerAuthentications, by
/// `namespace/name`) whose workload selector picks a pod's labels.
fn policies_of(model: &Model, ns: &str, pl: &Labels) -> Vec<String> {
    let mut policies: Vec<String> = model
        .authz_policies
        .iter()
        .filter(|((pns, _), ap)| {
            (pns == ns || *pns == model.cfg.root_namespace)
                && !ap.spec.has_targets()
                && ap
                    .spec
                    .selector
                    .as_ref()
                    .is_some_and(|s| selects(&s.match_labels, pl))
        })
        .map(|((pns, pname), _)| format!("{pns}/{pname}"))
        .collect();
    policies.extend(
        model
            .peer_auths
            .iter()
            .filter(|((pns, _), pa)| {
                (pns == ns || *pns == model.cfg.root_namespace)
                    && pa
                        .spec
                        .selector
                        .as_ref()
                        .is_some_and(|s| selects(&s.match_labels, pl))
            })
            .map(|((pns, pname), _)| {
                format!("{pns}/{}", super::authz::peer_auth_policy_name(pname))
            }),
    );
    policies.sort();
    policies
}

pub fn workload(model: &Model, key: &NsName) -> Option<pb::Workload> {
    let p = model.pods.get(key)?;
    if !p.running {
        return None;
    }
    let ips = p.ips.clone();
    if ips.is_empty() {
        // Not yet scheduled or no IP yet: it appears once it has one.
        tracing::debug!(pod = %format!("{}/{}", key.0, key.1), "pod has no IP yet");
        return None;
    }
    let (ns, name) = key;
    let pl = p.labels();
    let services = services_of(model, ns, p, &pl, &ips);
    let policies = policies_of(model, ns, &pl);
    let (workload_name, workload_type) = p.workload_name(name);
    let hbone = enrolled(model, ns, p);
    Some(pb::Workload {
        uid: format!("{}//Pod/{ns}/{name}", model.cfg.cluster_id),
        name: name.clone(),
        namespace: ns.clone(),
        addresses: ips.into_iter().map(ip_bytes).collect(),
        tunnel_protocol: if hbone {
            pb::TunnelProtocol::Hbone
        } else {
            pb::TunnelProtocol::None
        } as i32,
        trust_domain: model.cfg.trust_domain.clone(),
        service_account: p.service_account().to_string(),
        waypoint: waypoint(model, ns, &pl, "workload"),
        node: p.node.clone().unwrap_or_default(),
        canonical_name: canonical(
            &pl,
            &[
                "service.istio.io/canonical-name",
                "app.kubernetes.io/name",
                "app",
            ],
            &workload_name,
        ),
        canonical_revision: canonical(
            &pl,
            &[
                "service.istio.io/canonical-revision",
                "app.kubernetes.io/version",
                "version",
            ],
            "latest",
        ),
        workload_type: workload_type as i32,
        workload_name,
        services,
        authorization_policies: policies,
        status: if p.ready {
            pb::WorkloadStatus::Healthy
        } else {
            pb::WorkloadStatus::Unhealthy
        } as i32,
        cluster_id: model.cfg.cluster_id.clone(),
        network_mode: if p.host_network {
            pb::NetworkMode::HostNetwork
        } else {
            pb::NetworkMode::Standard
        } as i32,
        ..Default::default()
    })
}

pub fn service(model: &Model, key: &NsName) -> Option<pb::Service> {
    let svc: &Service = model.services.get(key)?;
    let spec = svc.spec.as_ref()?;
    let (ns, name) = key;
    let mut vips: Vec<String> = spec.cluster_ips.clone().unwrap_or_default();
    if vips.is_empty()
        && let Some(ip) = &spec.cluster_ip
    {
        vips.push(ip.clone());
    }
    let addresses = vips
        .iter()
        .filter_map(|v| v.parse::<IpAddr>().ok())
        .map(|ip| pb::NetworkAddress {
            network: String::new(),
            address: ip_bytes(ip),
        })
        .collect();
    let ports = spec
        .ports
        .iter()
        .flatten()
        .map(|p| pb::Port {
            service_port: p.port as u32,
            target_port: match &p.target_port {
                None => p.port as u32,
                Some(IntOrString::Int(i)) => *i as u32,
                // Named: each workload carries its own number.
                Some(IntOrString::String(_)) => 0,
            },
        })
        .collect();
    Some(pb::Service {
        name: name.clone(),
        namespace: ns.clone(),
        hostname: hostname(model, ns, name),
        addresses,
        ports,
        waypoint: waypoint(model, ns, &labels(&svc.metadata), "service"),
        ..Default::default()
    })
}

fn ip_str(b: &[u8]) -> String {
    mesh_core::state::ip_from_bytes(b)
        .map(|i| i.to_string())
        .unwrap_or_default()
}

fn gw_json(g: &Option<pb::GatewayAddress>) -> serde_json::Value {
    match g.as_ref().and_then(|g| g.destination.as_ref()) {
        Some(pb::gateway_address::Destination::Address(a)) => serde_json::json!(ip_str(&a.address)),
        _ => serde_json::Value::Null,
    }
}

pub fn workload_json(w: &pb::Workload) -> serde_json::Value {
    serde_json::json!({
        "uid": w.uid, "name": w.name, "namespace": w.namespace,
        "addresses": w.addresses.iter().map(|a| ip_str(a)).collect::<Vec<_>>(),
        "protocol": if w.tunnel_protocol == pb::TunnelProtocol::Hbone as i32 { "HBONE" } else { "TCP" },
        "serviceAccount": w.service_account, "node": w.node, "waypoint": gw_json(&w.waypoint),
        "services": w.services.iter().map(|(k, v)| (k.clone(), v.ports.iter().map(|p| format!("{}->{}", p.service_port, p.target_port)).collect::<Vec<_>>())).collect::<BTreeMap<_, _>>(),
        "authorizationPolicies": w.authorization_policies,
        "healthy": w.status == pb::WorkloadStatus::Healthy as i32,
        "canonicalName": w.canonical_name, "canonicalRevision": w.canonical_revision,
    })
}

pub fn service_json(s: &pb::Service) -> serde_json::Value {
    serde_json::json!({
        "name": s.name, "namespace": s.namespace, "hostname": s.hostname,
        "vips": s.addresses.iter().map(|a| ip_str(&a.address)).collect::<Vec<_>>(),
        "ports": s.ports.iter().map(|p| format!("{}->{}", p.service_port, p.target_port)).collect::<Vec<_>>(),
        "waypoint": gw_json(&s.waypoint),
    })
}
