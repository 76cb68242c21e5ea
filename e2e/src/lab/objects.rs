//! Applying Kubernetes objects: namespaces, deployments, pods and services
//! the lab acts on; Gateways expanded as istiod-lite's deployment controller
//! does; everything else handed to the controller as it is.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Value, json};

use super::pods::pod_spec;
use super::{Error, Lab, ServiceState};

/// `spec.clusterIP` of a headless Service, kept as the lab's VIP.
pub const HEADLESS: &str = "None";

/// The Gateway class that declares a waypoint.
pub const WAYPOINT_CLASS: &str = "istio-waypoint";

/// The label that ties a waypoint's pods and Service to its Gateway.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

/// What a waypoint Gateway expands to, as istiod-lite's deployment
/// controller makes it on Kubernetes: a Service on 15008 and a pod of the
/// waypoint binary, outside the mesh's capture, running as its own
/// service account.
fn waypoint_objects(ns: &str, name: &str, replicas: usize) -> Vec<Value> {
    let mut out = vec![json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "labels": {GATEWAY_NAME_LABEL: name}},
        "spec": {"selector": {GATEWAY_NAME_LABEL: name},
                 "ports": [{"name": "mesh", "port": 15008, "targetPort": 15008, "appProtocol": "all"}]},
    })];
    for i in 0..replicas {
        out.push(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("{name}-{i}"), "namespace": ns,
                         "labels": {GATEWAY_NAME_LABEL: name, "istio.io/dataplane-mode": "none"}},
            "spec": {"serviceAccountName": name,
                     "containers": [{"name": "waypoint", "image": "waypoint"}]},
        }));
    }
    out
}

/// The Gateway class that declares an ingress gateway.
pub const INGRESS_CLASS: &str = "mesh-ingress";

/// Gateway annotation pinning the loopback ports an ingress's listener
/// ports are published on: "443=8443,80=8080". Unpinned ports get a free one.
pub const LOOPBACK_PORTS: &str = "lab.mesh.dev/loopback-ports";

/// The distinct listener ports of a Gateway.
pub(super) fn listener_ports(gateway: &Value) -> Vec<u16> {
    let mut ports: Vec<u16> = gateway["spec"]["listeners"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["port"].as_u64().and_then(|p| u16::try_from(p).ok()))
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// What an ingress Gateway expands to, as istiod-lite's deployment
/// controller makes it on Kubernetes: a LoadBalancer Service on the
/// listener ports and pods of the waypoint binary in its ingress role,
/// outside the mesh's capture, running as their own service account.
fn ingress_objects(ns: &str, name: &str, gateway: &Value) -> Vec<Value> {
    let ports: Vec<Value> = listener_ports(gateway)
        .into_iter()
        .map(|p| json!({"name": format!("port-{p}"), "port": p, "targetPort": p}))
        .collect();
    let mut out = vec![json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "labels": {GATEWAY_NAME_LABEL: name}},
        "spec": {"type": "LoadBalancer", "selector": {GATEWAY_NAME_LABEL: name}, "ports": ports},
    })];
    for i in 0..waypoint_replicas(gateway) {
        out.push(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("{name}-{i}"), "namespace": ns,
                         "labels": {GATEWAY_NAME_LABEL: name, "istio.io/dataplane-mode": "none"}},
            "spec": {"serviceAccountName": name,
                     "containers": [{"name": "ingress", "image": "ingress"}]},
        }));
    }
    out
}

/// The lab's stand-in for scaling a waypoint's Deployment: the Gateway
/// annotation `lab.mesh.dev/replicas` (1 to 4; default 1).
pub const WAYPOINT_REPLICAS: &str = "lab.mesh.dev/replicas";

fn waypoint_replicas(gateway: &Value) -> usize {
    gateway["metadata"]["annotations"][WAYPOINT_REPLICAS]
        .as_str()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1)
        .clamp(1, 4)
}

impl Lab {
    pub(super) fn write_object(&self, file: &str, v: &Value) -> Result<(), Error> {
        let path = self.dir.join("config").join(file);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_yaml::to_string(v)?)?;
        std::fs::rename(tmp, path)?;
        Ok(())
    }

    /// Applies Kubernetes objects: namespaces (labels, live), deployments and
    /// pods (started), services (a VIP), and everything else handed to the
    /// controller as it is.
    pub async fn apply(&mut self, docs: Vec<Value>) -> Result<(), Error> {
        let mut relabelled = Vec::new();
        let ingresses: Vec<Value> = docs
            .iter()
            .filter(|d| d["kind"] == "Gateway" && d["spec"]["gatewayClassName"] == INGRESS_CLASS)
            .cloned()
            .collect();
        let docs: Vec<Value> = docs
            .into_iter()
            .flat_map(|d| {
                let mut out = vec![d.clone()];
                let ns = d["metadata"]["namespace"].as_str().unwrap_or("default");
                let name = d["metadata"]["name"].as_str().unwrap_or_default();
                if d["kind"] == "Gateway" && d["spec"]["gatewayClassName"] == WAYPOINT_CLASS {
                    out.extend(waypoint_objects(ns, name, waypoint_replicas(&d)));
                }
                if d["kind"] == "Gateway" && d["spec"]["gatewayClassName"] == INGRESS_CLASS {
                    out.extend(ingress_objects(ns, name, &d));
                }
                out
            })
            .collect();
        for d in docs {
            let kind = d["kind"].as_str().unwrap_or_default().to_string();
            let name = d["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let ns = d["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string();
            let labels: BTreeMap<String, String> =
                serde_json::from_value(d["metadata"]["labels"].clone()).unwrap_or_default();
            match kind.as_str() {
                "Namespace" => {
                    self.state.namespaces.insert(name.clone(), labels);
                    self.write_object(&format!("namespace-{name}.yaml"), &d)?;
                    relabelled.push(name);
                }
                "Deployment" => {
                    let replicas = d["spec"]["replicas"].as_u64().unwrap_or(1);
                    let tmpl = &d["spec"]["template"];
                    let plabels: BTreeMap<String, String> =
                        serde_json::from_value(tmpl["metadata"]["labels"].clone())
                            .unwrap_or_default();
                    for i in 0..replicas {
                        let pname = format!("{name}-{i}");
                        if !self.state.pods.contains_key(&format!("{ns}/{pname}")) {
                            self.add_pod(&ns, &pname, plabels.clone(), pod_spec(&tmpl["spec"]))
                                .await?;
                        }
                    }
                }
                "Pod" => {
                    let key = format!("{ns}/{name}");
                    if let Some(p) = self.state.pods.get_mut(&key) {
                        p.labels = labels;
                        let (p, node) = (p.clone(), p.node.clone());
                        self.write_pod(&p)?;
                        self.save()?;
                        self.sync_capture(&node).await?;
                    } else {
                        self.add_pod(&ns, &name, labels, pod_spec(&d["spec"]))
                            .await?;
                    }
                }
                "Service" => {
                    let key = format!("{ns}/{name}");
                    // A headless Service (`clusterIP: None`) has no VIP: its
                    // name resolves to its endpoints.
                    let headless = d["spec"]["clusterIP"].as_str() == Some(HEADLESS);
                    let vip = match self.state.services.get(&key) {
                        _ if headless => HEADLESS.to_string(),
                        Some(s) if s.vip != HEADLESS => s.vip.clone(),
                        _ => {
                            let v = format!("{}.250.{}", self.net(), self.state.next_vip);
                            self.state.next_vip += 1;
                            v
                        }
                    };
                    let selector: BTreeMap<String, String> =
                        serde_json::from_value(d["spec"]["selector"].clone()).unwrap_or_default();
                    let ports: Vec<(u16, u16)> = d["spec"]["ports"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|p| {
                            let port = p["port"].as_u64().unwrap_or(80) as u16;
                            (
                                port,
                                p["targetPort"].as_u64().map(|t| t as u16).unwrap_or(port),
                            )
                        })
                        .collect();
                    let mut obj = d.clone();
                    obj["metadata"]["namespace"] = json!(ns);
                    obj["spec"]["clusterIP"] = json!(vip);
                    // Dual-stack, as a Service with `ipFamilyPolicy:
                    // PreferDualStack` gets on a dual-stack cluster.
                    if let Some(vip6) = super::ipv6_twin(&vip) {
                        obj["spec"]["clusterIPs"] = json!([vip, vip6]);
                        obj["spec"]["ipFamilies"] = json!(["IPv4", "IPv6"]);
                        obj["spec"]["ipFamilyPolicy"] = json!("PreferDualStack");
                    }
                    self.write_object(&format!("service-{ns}-{name}.yaml"), &obj)?;
                    self.state.services.insert(
                        key,
                        ServiceState {
                            name,
                            namespace: ns,
                            vip,
                            selector,
                            ports,
                        },
                    );
                    self.save()?;
                }
                _ => {
                    let mut obj = d.clone();
                    if obj["metadata"]["namespace"].is_null() && kind != "Namespace" {
                        obj["metadata"]["namespace"] = json!(ns);
                    }
                    self.write_object(&format!("{}-{ns}-{name}.yaml", kind.to_lowercase()), &obj)?;
                }
            }
        }
        // Each node's agent sees the new labels and captures or releases
        // the running pods they concern.
        let nodes: std::collections::BTreeSet<String> = self
            .state
            .pods
            .values()
            .filter(|p| relabelled.contains(&p.namespace))
            .map(|p| p.node.clone())
            .collect();
        for node in nodes {
            self.sync_capture(&node).await?;
        }
        self.kube_proxy()?;
        for g in &ingresses {
            self.publish(g)?;
        }
        self.save()
    }

    /// Removes an object the lab applied (a policy, say).
    pub fn delete(&mut self, kind: &str, namespace: &str, name: &str) -> Result<(), Error> {
        let _ = std::fs::remove_file(
            self.dir
                .join("config")
                .join(format!("{}-{namespace}-{name}.yaml", kind.to_lowercase())),
        );
        Ok(())
    }
}

/// Parses a multi-document YAML text; empty documents are skipped.
pub fn parse_docs(text: &str) -> Result<Vec<Value>, Error> {
    use serde::Deserialize;
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let v = Value::deserialize(doc)?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

/// Reads every YAML document in a file or folder.
pub fn read_docs(path: &Path) -> Result<Vec<Value>, Error> {
    let mut files = Vec::new();
    if path.is_dir() {
        for e in std::fs::read_dir(path)? {
            let p = e?.path();
            if matches!(p.extension().and_then(|x| x.to_str()), Some("yaml" | "yml")) {
                files.push(p);
            }
        }
        files.sort();
    } else {
        files.push(path.to_path_buf());
    }
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f)?;
        out.extend(parse_docs(&text).map_err(|e| format!("{}: {e}", f.display()))?);
    }
    Ok(out)
}
