//! What cluster mode writes back, read from the model: the namespaces that
//! need the root ConfigMap, the waypoint and ingress Gateways to deploy
//! (with the ingresses' listener status), and each policy's status. A snapshot of owned data, so the writer holds no lock
//! while it talks to the API server.

use std::collections::BTreeSet;
use std::net::IpAddr;

use gateway_api::apis::standard::gatewayclasses::GatewayClass;
use gateway_api::apis::standard::gateways::Gateway;
use mesh_core::identity::Identity;

use super::ingress::ListenerStatus;
use super::route_status::RouteView;
use super::workload::labels;
use super::{DATAPLANE_MODE, INGRESS_CLASS, Model, NsName, WAYPOINT_CLASS};
use crate::ca::auth::PodError;
use crate::config::crds::{PolicyCondition, PolicyStatus};
use crate::config::objects::Object;

/// Istio's condition types on an AuthorizationPolicy.
pub const ZTUNNEL_ACCEPTED: &str = "ZtunnelAccepted";
pub const WAYPOINT_ACCEPTED: &str = "WaypointAccepted";

/// One waypoint Gateway and what its Service currently has.
#[derive(Debug, Clone)]
pub struct WaypointView {
    pub gateway: Gateway,
    /// The cluster IP of the Service named after the Gateway, once assigned.
    pub cluster_ip: Option<String>,
}

/// One ingress Gateway, its Service's addresses and its listeners' status.
#[derive(Debug, Clone)]
pub struct IngressView {
    pub gateway: Gateway,
    /// (Gateway API address type, value) of the Service named after the
    /// Gateway: its load balancer's when assigned, else its cluster IP.
    pub addresses: Vec<(String, String)>,
    pub listeners: Vec<ListenerStatus>,
}

/// A policy, the status it should have and the one it has.
#[derive(Debug, Clone)]
pub struct PolicyView {
    pub key: NsName,
    pub generation: Option<i64>,
    pub want: PolicyCondition,
    pub current: Option<PolicyStatus>,
}

#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    pub root_namespace: String,
    /// Namespaces labelled into the mesh, the root namespace, and those
    /// with a waypoint Gateway.
    pub root_cert_namespaces: BTreeSet<String>,
    pub waypoints: Vec<WaypointView>,
    pub ingresses: Vec<IngressView>,
    pub policies: Vec<PolicyView>,
    /// Every HTTPRoute and GRPCRoute with a parent of ours.
    pub routes: Vec<RouteView>,
    /// Every GatewayClass, as watched.
    pub gateway_classes: Vec<GatewayClass>,
    /// Whether the cluster serves GatewayClass at all (the model cannot
    /// tell "none" from "not served"; the writer sets it from the watch).
    pub gateway_class_served: bool,
}

impl Model {
    pub fn cluster_view(&self) -> ClusterView {
        let mut root_cert_namespaces: BTreeSet<String> = self
            .namespaces
            .iter()
            .filter(|(_, n)| {
                labels(&n.metadata).get(DATAPLANE_MODE).map(String::as_str) == Some("ambient")
            })
            .map(|(name, _)| name.clone())
            .collect();
        root_cert_namespaces.insert(self.cfg.root_namespace.clone());
        // A waypoint's (or an ingress's) pods need the root wherever the
        // Gateway is, enrolled or not.
        root_cert_namespaces.extend(
            self.gateways
                .iter()
                .filter(|(_, g)| {
                    [WAYPOINT_CLASS, INGRESS_CLASS].contains(&g.spec.gateway_class_name.as_str())
                })
                .map(|((ns, _), _)| ns.clone()),
        );
        let waypoints = self
            .gateways
            .iter()
            .filter(|(_, g)| g.spec.gateway_class_name == WAYPOINT_CLASS)
            .map(|(k, g)| WaypointView {
                gateway: g.clone(),
                cluster_ip: self
                    .services
                    .get(k)
                    .and_then(|s| s.spec.as_ref()?.cluster_ip.clone())
                    .filter(|ip| !ip.is_empty() && ip != "None"),
            })
            .collect();
        let ingresses = self
            .gateways
            .iter()
            .filter(|(_, g)| g.spec.gateway_class_name == INGRESS_CLASS)
            .map(|(k, g)| IngressView {
                gateway: g.clone(),
                addresses: self.services.get(k).map(addresses).unwrap_or_default(),
                listeners: self.ingress_listeners.get(k).cloned().unwrap_or_default(),
            })
            .collect();
        let policies = self
            .authz_policies
            .iter()
            .map(|(k, p)| {
                let label = format!("AuthorizationPolicy/{}/{}", k.0, k.1);
                let reasons: Vec<String> = self
                    .issues
                    .get(&label)
                    .map(|v| v.iter().map(|i| i.reason.clone()).collect())
                    .unwrap_or_default();
                PolicyView {
                    key: k.clone(),
                    generation: p.metadata.generation,
                    want: policy_condition(p.spec.has_targets(), &reasons),
                    current: p.status.clone(),
                }
            })
            .collect();
        ClusterView {
            root_namespace: self.cfg.root_namespace.clone(),
            root_cert_namespaces,
            waypoints,
            ingresses,
            policies,
            routes: self.route_views(),
            gateway_classes: self
                .others
                .values()
                .filter_map(|o| match o {
                    Object::GatewayClass(c) => Some((**c).clone()),
                    _ => None,
                })
                .collect(),
            gateway_class_served: false,
        }
    }

    /// The node a pod runs on, when the pod with that uid is known: how a
    /// pod-bound service-account token is tied to its node.
    pub fn pod_node(&self, namespace: &str, name: &str, uid: &str) -> Option<String> {
        let p = self.pods.get(&(namespace.to_string(), name.to_string()))?;
        if p.uid.as_deref() != Some(uid) {
            return None;
        }
        p.node.clone()
    }

    /// The node and service account of the pod with that uid, when it is
    /// known and placed on a node.
    pub fn pod_node_account(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
    ) -> Option<(String, String)> {
        let p = self.pods.get(&(namespace.to_string(), name.to_string()))?;
        if p.uid.as_deref() != Some(uid) {
            return None;
        }
        Some((p.node.clone()?, p.service_account().to_string()))
    }

    /// Whether `ip` is one of the addresses of the pod with that uid
    /// (`status.podIPs`; a hostNetwork pod's are its node's).
    pub fn pod_has_ip(&self, namespace: &str, name: &str, uid: &str, ip: IpAddr) -> bool {
        let Some(p) = self.pods.get(&(namespace.to_string(), name.to_string())) else {
            return false;
        };
        p.uid.as_deref() == Some(uid) && p.ips.contains(&ip.to_canonical())
    }

    /// The node of a running pod and its service account's identity: how
    /// a pod's own token (folder mode) is tied to the pod.
    pub fn pod_identity(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<(String, Identity), PodError> {
        let p = self
            .pods
            .get(&(namespace.to_string(), name.to_string()))
            .filter(|p| p.running)
            .ok_or_else(|| PodError::NotRunning(namespace.into(), name.into()))?;
        let node = p
            .node
            .clone()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| PodError::NotScheduled(namespace.into(), name.into()))?;
        let sa = p.service_account();
        let identity = Identity::new(&self.cfg.trust_domain, namespace, sa).map_err(|reason| {
            PodError::BadAccount {
                namespace: namespace.into(),
                pod: name.into(),
                account: sa.into(),
                reason: Box::new(reason),
            }
        })?;
        Ok((node, identity))
    }

    /// The service account a known pod runs as.
    pub fn pod_service_account(&self, namespace: &str, name: &str) -> Option<&str> {
        self.pods
            .get(&(namespace.to_string(), name.to_string()))
            .map(|p| p.service_account())
    }
}

/// A Service's addresses as a Gateway reports them: its load balancer's
/// when assigned, else its cluster IP.
fn addresses(svc: &k8s_openapi::api::core::v1::Service) -> Vec<(String, String)> {
    let lb: Vec<(String, String)> = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|l| l.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| match (&i.ip, &i.hostname) {
            (Some(ip), _) if !ip.is_empty() => Some(("IPAddress".to_string(), ip.clone())),
            (_, Some(h)) if !h.is_empty() => Some(("Hostname".to_string(), h.clone())),
            _ => None,
        })
        .collect();
    if !lb.is_empty() {
        return lb;
    }
    svc.spec
        .as_ref()
        .and_then(|s| s.cluster_ip.clone())
        .filter(|ip| !ip.is_empty() && ip != "None")
        .map(|ip| vec![("IPAddress".to_string(), ip)])
        .unwrap_or_default()
}

/// The condition Istio writes: accepted, accepted with a warning (the
/// ztunnel drops L7 rules of an ALLOW), or not accepted at all.
fn policy_condition(for_waypoint: bool, reasons: &[String]) -> PolicyCondition {
    let (type_, attached) = if for_waypoint {
        (WAYPOINT_ACCEPTED, "attached to waypoint")
    } else {
        (ZTUNNEL_ACCEPTED, "attached to ztunnel")
    };
    let (status, reason, message) = if reasons.is_empty() {
        ("True", "Accepted", attached.to_string())
    } else if reasons
        .iter()
        .any(|r| r.contains("ignored") && r.contains("policy"))
    {
        ("False", "Invalid", reasons.join("; "))
    } else {
        ("True", "UnsupportedValue", reasons.join("; "))
    };
    PolicyCondition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        ..PolicyCondition::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_follow_the_issues() {
        let ok = policy_condition(false, &[]);
        assert_eq!(
            (ok.type_.as_str(), ok.status.as_str()),
            ("ZtunnelAccepted", "True")
        );
        let l7 = policy_condition(
            false,
            &["rule 0 has L7 fields a ztunnel cannot check; it never matches at the ztunnel (use a waypoint)".into()],
        );
        assert_eq!(l7.reason, "UnsupportedValue");
        assert!(l7.message.contains("rule 0 has L7 fields"));
        let bad = policy_condition(
            true,
            &["action Custom is not supported; the policy is ignored".into()],
        );
        assert_eq!(
            (bad.type_.as_str(), bad.status.as_str(), bad.reason.as_str()),
            ("WaypointAccepted", "False", "Invalid")
        );
    }
}
