//! What a cluster's endpoint controller, kube-proxy and DNS do for the
//! lab's pods: an EndpointSlice per Service with a selector (its pods'
//! addresses and readiness, the ports resolved to container ports), the
//! ClusterIPs DNAT-ed to ready endpoints in every node (nftables, as the
//! lab's own kube-proxy does), and every Service's names in each pod's
//! `/etc/hosts` (the file `ip netns exec` puts there from
//! `/etc/netns/<netns>/`), with the namespace's search path.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};

use super::Kubelet;
use super::controllers::is_ready;
use super::error::{KubeletError, Result};
use crate::lab::nft_in;

/// What was last written, so only changes are.
#[derive(Default)]
pub struct Last {
    slices: BTreeMap<String, Value>,
    rules: String,
    services: Vec<(String, String, String)>,
}

fn selects(svc: &Service, p: &Pod) -> bool {
    let Some(sel) = svc.spec.as_ref().and_then(|s| s.selector.as_ref()) else {
        return false;
    };
    !sel.is_empty()
        && p.namespace() == svc.namespace()
        && sel.iter().all(|(k, v)| p.labels().get(k) == Some(v))
}

/// The container port a Service port's `targetPort` names in `pod`.
fn target_port(port: &k8s_openapi::api::core::v1::ServicePort, pod: Option<&Pod>) -> Option<i32> {
    match &port.target_port {
        None => Some(port.port),
        Some(IntOrString::Int(p)) => Some(*p),
        Some(IntOrString::String(name)) => pod?
            .spec
            .as_ref()?
            .containers
            .iter()
            .flat_map(|c| c.ports.as_deref().unwrap_or_default())
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .map(|p| p.container_port),
    }
}

impl Kubelet {
    pub(super) async fn sync_endpoints(&mut self) -> Result<()> {
        let services = Api::<Service>::all(self.client.clone())
            .list(&ListParams::default())
            .await
            .map_err(|e| KubeletError::api("listing Services", e))?;
        let pods = Api::<Pod>::all(self.client.clone())
            .list(&ListParams::default())
            .await
            .map_err(|e| KubeletError::api("listing pods", e))?;
        let mut rules = String::new();
        for svc in services
            .items
            .iter()
            .filter(|s| s.metadata.deletion_timestamp.is_none())
        {
            let members: Vec<&Pod> = pods
                .items
                .iter()
                .filter(|p| {
                    selects(svc, p) && p.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_some()
                })
                .collect();
            if svc
                .spec
                .as_ref()
                .and_then(|s| s.selector.as_ref())
                .is_none_or(|s| s.is_empty())
            {
                continue;
            }
            self.slice(svc, &members).await?;
            rules.push_str(&proxy_rules(svc, &members));
        }
        if rules != self.endpoints.rules {
            let script = format!(
                "table ip lab-kube-proxy\ndelete table ip lab-kube-proxy\ntable ip lab-kube-proxy {{\n  chain pre {{\n    type nat hook prerouting priority dstnat; policy accept;\n{rules}  }}\n}}\n"
            );
            for n in &self.lab.state.nodes {
                nft_in(&n.netns, &script).map_err(|e| KubeletError::lab("kube-proxy rules", e))?;
            }
            self.endpoints.rules = rules;
        }
        let names: Vec<(String, String, String)> = services
            .items
            .iter()
            .filter_map(|s| {
                let ip = s
                    .spec
                    .as_ref()?
                    .cluster_ip
                    .clone()
                    .filter(|ip| ip != "None" && !ip.is_empty())?;
                Some((ip, s.name_any(), s.namespace().unwrap_or_default()))
            })
            .collect();
        if names != self.endpoints.services {
            self.endpoints.services = names;
            for run in self.pods.values() {
                self.write_dns(&run.netns, &run.namespace)?;
            }
        }
        Ok(())
    }

    async fn slice(&mut self, svc: &Service, members: &[&Pod]) -> Result<()> {
        let (ns, name) = (svc.namespace().unwrap_or_default(), svc.name_any());
        let ports: Vec<Value> = svc
            .spec
            .as_ref()
            .and_then(|s| s.ports.clone())
            .unwrap_or_default()
            .iter()
            .filter_map(|p| {
                let target = target_port(p, members.first().copied())?;
                Some(
                    json!({"name": p.name.clone().unwrap_or_default(), "port": target,
                            "protocol": p.protocol.clone().unwrap_or_else(|| "TCP".into())}),
                )
            })
            .collect();
        let endpoints: Vec<Value> = members
            .iter()
            .map(|p| {
                let ip = p.status.as_ref().and_then(|s| s.pod_ip.clone()).unwrap_or_default();
                json!({"addresses": [ip],
                       "conditions": {"ready": is_ready(p), "serving": is_ready(p), "terminating": false},
                       "nodeName": p.spec.as_ref().and_then(|s| s.node_name.clone()),
                       "targetRef": {"kind": "Pod", "name": p.name_any(), "namespace": ns, "uid": p.uid()}})
            })
            .collect();
        let slice_name = format!("{name}-lab");
        let slice = json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": slice_name, "namespace": ns,
                "labels": {"kubernetes.io/service-name": name, "endpointslice.kubernetes.io/managed-by": "lab-kubelet"},
                "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": name, "uid": svc.uid(),
                                     "controller": true, "blockOwnerDeletion": true}]},
            "addressType": "IPv4", "endpoints": endpoints, "ports": ports,
        });
        let key = format!("{ns}/{slice_name}/{}", svc.uid().unwrap_or_default());
        if self.endpoints.slices.get(&key) == Some(&slice) {
            return Ok(());
        }
        let api: Api<k8s_openapi::api::discovery::v1::EndpointSlice> =
            Api::namespaced(self.client.clone(), &ns);
        api.patch(
            &slice_name,
            &PatchParams::apply("lab-kubelet").force(),
            &Patch::Apply(&slice),
        )
        .await
        .map_err(|e| KubeletError::api(format!("writing EndpointSlice {ns}/{slice_name}"), e))?;
        self.endpoints.slices.insert(key, slice);
        Ok(())
    }

    /// A pod's `/etc/hosts` (every Service's names) and `/etc/resolv.conf`
    /// (its namespace's search path), by `ip netns exec`'s convention.
    pub(super) fn write_dns(&self, netns: &str, namespace: &str) -> Result<()> {
        let dir = std::path::Path::new("/etc/netns").join(netns);
        std::fs::create_dir_all(&dir)
            .map_err(|e| KubeletError::io(format!("creating {}", dir.display()), e))?;
        let mut hosts = String::from("127.0.0.1 localhost\n::1 localhost\n");
        for (ip, name, ns) in &self.endpoints.services {
            hosts.push_str(&format!(
                "{ip} {name}.{ns}.svc.cluster.local {name}.{ns}.svc {name}.{ns}"
            ));
            if ns == namespace {
                hosts.push_str(&format!(" {name}"));
            }
            hosts.push('\n');
        }
        let resolv = format!(
            "search {namespace}.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\nnameserver 127.0.0.1\n"
        );
        for (file, text) in [("hosts", hosts), ("resolv.conf", resolv)] {
            let path = dir.join(file);
            if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
                // In place: a running pod's bind mount of it sees the change.
                std::fs::write(&path, text)
                    .map_err(|e| KubeletError::io(format!("writing {}", path.display()), e))?;
            }
        }
        Ok(())
    }
}

/// kube-proxy's DNAT of one Service's ClusterIP ports to its ready pods.
fn proxy_rules(svc: &Service, members: &[&Pod]) -> String {
    let Some(spec) = &svc.spec else {
        return String::new();
    };
    let Some(vip) = spec
        .cluster_ip
        .as_deref()
        .filter(|ip| *ip != "None" && !ip.is_empty())
    else {
        return String::new();
    };
    let ready: Vec<&&Pod> = members.iter().filter(|p| is_ready(p)).collect();
    if ready.is_empty() {
        return String::new();
    }
    let mut out = String::new();
    for port in spec.ports.as_deref().unwrap_or_default() {
        if port.protocol.as_deref().unwrap_or("TCP") != "TCP" {
            continue;
        }
        let map: Vec<String> = ready
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                let ip = p.status.as_ref()?.pod_ip.clone()?;
                Some(format!("{i} : {ip} . {}", target_port(port, Some(p))?))
            })
            .collect();
        if map.len() != ready.len() {
            continue;
        }
        out.push_str(&format!(
            "    ip daddr {vip} tcp dport {} dnat ip to numgen inc mod {} map {{ {} }}\n",
            port.port,
            ready.len(),
            map.join(", ")
        ));
    }
    out
}
