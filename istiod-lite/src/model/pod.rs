//! What the model keeps of a Pod: only the fields its outputs and checks
//! read, a few hundred bytes instead of the whole object (kilobytes: the
//! spec alone has dozens of fields), which at tens of thousands of pods is
//! most of the model.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Pod;
use mesh_proto::istio::workload::WorkloadType;

/// A pod as the model sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct PodView {
    pub uid: Option<String>,
    /// Sorted by key.
    labels: Vec<(String, String)>,
    pub node: Option<String>,
    /// `spec.serviceAccountName` when set and not empty.
    service_account: Option<String>,
    pub host_network: bool,
    /// `status.podIPs`, else `status.podIP`.
    pub ips: Vec<IpAddr>,
    /// Not being deleted, and neither Succeeded nor Failed.
    pub running: bool,
    /// Ready, or reports no conditions (a hand-written pod).
    pub ready: bool,
    /// Named container ports, in container order.
    named_ports: Vec<(String, u32)>,
    /// The workload it belongs to, when an owner names one.
    owner: Option<(String, WorkloadType)>,
    /// Its managing controller's ownerReference (kind, name), if any.
    controller: Option<(String, String)>,
}

impl PodView {
    pub fn of(p: &Pod) -> PodView {
        let spec = p.spec.as_ref();
        let status = p.status.as_ref();
        let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Running");
        let mut ips: Vec<IpAddr> = status
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|i| i.ip.parse().ok())
            .collect();
        if ips.is_empty()
            && let Some(ip) = status
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|i| i.parse().ok())
        {
            ips.push(ip);
        }
        PodView {
            uid: p.metadata.uid.clone(),
            labels: p
                .metadata
                .labels
                .iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            node: spec.and_then(|s| s.node_name.clone()),
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .filter(|s| !s.is_empty()),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            ips,
            running: p.metadata.deletion_timestamp.is_none()
                && !matches!(phase, "Succeeded" | "Failed"),
            ready: status
                .and_then(|s| s.conditions.as_ref())
                .map(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
                .unwrap_or(true),
            named_ports: spec
                .iter()
                .flat_map(|s| s.containers.iter())
                .flat_map(|c| c.ports.iter().flatten())
                .filter_map(|p| Some((p.name.clone()?, p.container_port as u32)))
                .collect(),
            owner: owner(p),
            controller: p
                .metadata
                .owner_references
                .iter()
                .flatten()
                .find(|o| o.controller == Some(true))
                .map(|o| (o.kind.clone(), o.name.clone())),
        }
    }

    /// Its labels, as a map.
    pub fn labels(&self) -> BTreeMap<String, String> {
        self.labels.iter().cloned().collect()
    }

    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .binary_search_by(|(k, _)| k.as_str().cmp(key))
            .ok()
            .map(|i| self.labels[i].1.as_str())
    }

    /// The service account it runs as (`default` when none is named).
    pub fn service_account(&self) -> &str {
        self.service_account.as_deref().unwrap_or("default")
    }

    /// The number of the container port named `name` (0: none).
    pub fn named_port(&self, name: &str) -> u32 {
        self.named_ports
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, p)| *p)
    }

    /// Its managing controller (kind, name), from its ownerReferences.
    pub fn controller(&self) -> Option<(&str, &str)> {
        self.controller
            .as_ref()
            .map(|(k, n)| (k.as_str(), n.as_str()))
    }

    /// The deployment name for a pod owned by a ReplicaSet, the Job's for
    /// a Job's, else the pod's own name (`name`).
    pub fn workload_name(&self, name: &str) -> (String, WorkloadType) {
        self.owner
            .clone()
            .unwrap_or_else(|| (name.to_string(), WorkloadType::Pod))
    }
}

fn owner(p: &Pod) -> Option<(String, WorkloadType)> {
    for o in p.metadata.owner_references.iter().flatten() {
        if o.kind == "ReplicaSet"
            && let Some((deploy, _hash)) = o.name.rsplit_once('-')
        {
            return Some((deploy.to_string(), WorkloadType::Deployment));
        }
        if o.kind == "Job" {
            return Some((o.name.clone(), WorkloadType::Job));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(yaml: &str) -> PodView {
        PodView::of(&serde_yaml::from_str::<Pod>(yaml).expect("a pod"))
    }

    #[test]
    fn the_view_keeps_what_the_model_reads() {
        let p = pod(r#"
metadata:
  name: web-7d9f-abcde
  uid: u-1
  labels: {app: web, version: v2}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web-7d9f, uid: r}]
spec:
  nodeName: node-a
  serviceAccountName: web-sa
  containers:
  - {name: c, image: x, ports: [{name: http, containerPort: 8080}, {containerPort: 9}]}
  - {name: d, image: y, ports: [{name: http, containerPort: 9090}, {name: admin, containerPort: 15000}]}
status:
  phase: Running
  podIP: 10.0.0.9
  podIPs: [{ip: 10.0.0.1}, {ip: "fd00::1"}]
  conditions: [{type: Ready, status: "False"}]
"#);
        assert_eq!(p.uid.as_deref(), Some("u-1"));
        assert_eq!(p.label("app"), Some("web"));
        assert_eq!(p.label("version"), Some("v2"));
        assert_eq!(p.label("nope"), None);
        assert_eq!(p.labels().len(), 2);
        assert_eq!(p.node.as_deref(), Some("node-a"));
        assert_eq!(p.service_account(), "web-sa");
        assert_eq!(
            p.ips,
            vec![
                "10.0.0.1".parse::<IpAddr>().unwrap(),
                "fd00::1".parse().unwrap()
            ]
        );
        assert!(p.running && !p.ready && !p.host_network);
        // The first container port of that name wins.
        assert_eq!(p.named_port("http"), 8080);
        assert_eq!(p.named_port("admin"), 15000);
        assert_eq!(p.named_port("none"), 0);
        assert_eq!(
            p.workload_name("web-7d9f-abcde"),
            ("web".to_string(), WorkloadType::Deployment)
        );
    }

    #[test]
    fn defaults_for_a_hand_written_pod() {
        let p = pod("metadata: {name: p}\nstatus: {podIP: 10.0.0.2}\n");
        assert_eq!(p.service_account(), "default");
        assert!(p.running && p.ready);
        assert_eq!(p.ips, vec!["10.0.0.2".parse::<IpAddr>().unwrap()]);
        assert_eq!(p.workload_name("p"), ("p".to_string(), WorkloadType::Pod));
        let done = pod("metadata: {name: p}\nstatus: {phase: Succeeded}\n");
        assert!(!done.running);
        let leaving = pod("metadata: {name: p, deletionTimestamp: \"2026-01-01T00:00:00Z\"}\n");
        assert!(!leaving.running);
        let job = pod(
            "metadata: {name: j-x, ownerReferences: [{apiVersion: batch/v1, kind: Job, name: j, uid: u}]}\n",
        );
        assert_eq!(
            job.workload_name("j-x"),
            ("j".to_string(), WorkloadType::Job)
        );
        let sa = pod("metadata: {name: p}\nspec: {serviceAccountName: \"\", containers: []}\n");
        assert_eq!(sa.service_account(), "default");
    }
}
