//! Who is in the mesh: the one decision the CNI plugin (new pods) and the
//! node agent's watch (running pods) both take, from Istio's labels.
//!
//! - namespace label `istio.io/dataplane-mode=ambient` enrolls its pods;
//! - a pod's own `istio.io/dataplane-mode` wins: `none` (or any other value
//!   than `ambient`) keeps it out, `ambient` puts it in;
//! - host-network pods never are (they share the node's netns);
//! - `ambient.istio.io/bypass-inbound-capture: "true"` (annotation or
//!   label) keeps the pod's outbound capture but leaves inbound traffic to
//!   the app uncaptured.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Pod;

pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
pub const BYPASS_INBOUND: &str = "ambient.istio.io/bypass-inbound-capture";

/// Whether a pod with these labels, in a namespace with these, is enrolled.
pub fn enrolled(
    host_network: bool,
    labels: &BTreeMap<String, String>,
    namespace_labels: &BTreeMap<String, String>,
) -> bool {
    if host_network {
        return false;
    }
    match labels.get(DATAPLANE_MODE).map(String::as_str) {
        Some(v) => v == "ambient",
        None => namespace_labels
            .get(DATAPLANE_MODE)
            .is_some_and(|v| v == "ambient"),
    }
}

/// Whether inbound capture is bypassed (annotation or label `"true"`).
pub fn bypass_inbound(
    labels: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
) -> bool {
    [annotations, labels]
        .iter()
        .any(|m| m.get(BYPASS_INBOUND).is_some_and(|v| v == "true"))
}

/// What the agent's watch knows of one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub node: String,
    pub host_network: bool,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// status.podIPs: empty until the sandbox has its network.
    pub ips: Vec<IpAddr>,
    /// Succeeded or Failed: its containers are gone for good.
    pub terminated: bool,
    /// Being deleted (deletionTimestamp set).
    pub deleting: bool,
}

impl PodView {
    /// Reads a Pod object; None when it lacks a name, namespace or uid.
    pub fn from_pod(p: &Pod) -> Option<PodView> {
        let m = &p.metadata;
        let spec = p.spec.clone().unwrap_or_default();
        let status = p.status.clone().unwrap_or_default();
        let mut ips: Vec<IpAddr> = status
            .pod_ips
            .unwrap_or_default()
            .iter()
            .filter_map(|i| i.ip.parse().ok())
            .collect();
        if ips.is_empty()
            && let Some(ip) = status.pod_ip.as_deref().and_then(|i| i.parse().ok())
        {
            ips.push(ip);
        }
        Some(PodView {
            uid: m.uid.clone()?,
            name: m.name.clone()?,
            namespace: m.namespace.clone()?,
            service_account: spec
                .service_account_name
                .unwrap_or_else(|| "default".into()),
            node: spec.node_name.unwrap_or_default(),
            host_network: spec.host_network.unwrap_or(false),
            labels: m.labels.clone().unwrap_or_default(),
            annotations: m.annotations.clone().unwrap_or_default(),
            ips,
            terminated: matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")),
            deleting: m.deletion_timestamp.is_some(),
        })
    }

    /// Whether the agent should hold this pod now, given its namespace's
    /// labels: enrolled, and alive with an address to find its netns by.
    pub fn wanted(&self, namespace_labels: &BTreeMap<String, String>) -> bool {
        enrolled(self.host_network, &self.labels, namespace_labels)
            && !self.terminated
            && !self.deleting
    }

    pub fn bypass_inbound(&self) -> bool {
        bypass_inbound(&self.labels, &self.annotations)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_pod_label_wins_and_host_network_never_is() {
        let ambient = labels(&[(DATAPLANE_MODE, "ambient")]);
        let none = labels(&[(DATAPLANE_MODE, "none")]);
        let empty = BTreeMap::new();
        assert!(enrolled(false, &empty, &ambient));
        assert!(!enrolled(false, &none, &ambient));
        assert!(enrolled(false, &ambient, &empty));
        assert!(!enrolled(false, &empty, &empty));
        assert!(!enrolled(true, &ambient, &ambient));
        // Anything but "ambient" on the pod keeps it out.
        assert!(!enrolled(
            false,
            &labels(&[(DATAPLANE_MODE, "sidecar")]),
            &ambient
        ));
    }

    #[test]
    fn a_pod_object_is_read_with_its_addresses() {
        let p: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "a", "namespace": "shop", "uid": "u1",
                         "annotations": {BYPASS_INBOUND: "true"}},
            "spec": {"nodeName": "node-1", "containers": []},
            "status": {"phase": "Running", "podIP": "10.1.1.5", "podIPs": [{"ip": "10.1.1.5"}]},
        }))
        .unwrap();
        let v = PodView::from_pod(&p).unwrap();
        assert_eq!(v.ips, vec!["10.1.1.5".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            (v.node.as_str(), v.service_account.as_str()),
            ("node-1", "default")
        );
        assert!(v.bypass_inbound());
        assert!(v.wanted(&labels(&[(DATAPLANE_MODE, "ambient")])));
        let mut done = v.clone();
        done.terminated = true;
        assert!(!done.wanted(&labels(&[(DATAPLANE_MODE, "ambient")])));
    }
}
