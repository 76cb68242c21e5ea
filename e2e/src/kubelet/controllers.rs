//! The controllers a lab needs, as kube-controller-manager runs them:
//! Deployments make ReplicaSets (one per pod template, named by its hash;
//! the old ones scaled to zero once the new one is ready), ReplicaSets and
//! DaemonSets make Pods (with owner references), every namespace gets its
//! `default` ServiceAccount and the `kube-root-ca.crt` ConfigMap. And the
//! lab's nodes are registered as Node objects.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod, ServiceAccount};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::{Value, json};

use super::error::{KubeletError, Result};
use crate::lab::Lab;

const MANAGER: &str = "lab-kubelet";

fn apply() -> PatchParams {
    PatchParams::apply(MANAGER).force()
}

/// A name suffix as Kubernetes makes them (no vowels, no look-alikes).
pub fn suffix() -> String {
    const CHARS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| CHARS[fastrand::usize(..CHARS.len())] as char)
        .collect()
}

/// A pod template's hash (the `pod-template-hash` label's value).
fn template_hash(template: &impl serde::Serialize) -> String {
    let text = serde_json::to_string(template).unwrap_or_default();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    format!("{:x}", h.finish())[..10].to_string()
}

fn owner_ref<K: Resource<DynamicType = ()>>(o: &K) -> Value {
    json!({
        "apiVersion": K::api_version(&()), "kind": K::kind(&()),
        "name": o.meta().name, "uid": o.meta().uid,
        "controller": true, "blockOwnerDeletion": true,
    })
}

/// Is `o` controlled by the object with `uid`?
pub fn controlled_by(o: &impl Resource, uid: &str) -> bool {
    o.meta()
        .owner_references
        .as_deref()
        .unwrap_or_default()
        .iter()
        .any(|r| r.controller == Some(true) && r.uid == uid)
}

pub fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn api_err(what: &str) -> impl FnOnce(kube::Error) -> KubeletError + '_ {
    move |e| KubeletError::api(what, e)
}

/// Registers every node of the lab (Ready, with its address and pod CIDR).
/// Every node's kubelet endpoint is the lab's streaming port on loopback
/// (the `Hostname` address, which the API server dials first).
pub async fn register_nodes(client: &Client, lab: &Lab, kubelet_port: u16) -> Result<()> {
    let nodes = Api::<Node>::all(client.clone());
    for n in &lab.state.nodes {
        let cidr = format!("{}.{}.0/24", lab.net(), n.index);
        let node = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": n.name, "labels": {
                "kubernetes.io/hostname": n.name, "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64", "mesh.dev/lab": lab.state.id.to_string()}},
            "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
        });
        nodes
            .patch(&n.name, &apply(), &Patch::Apply(&node))
            .await
            .map_err(api_err("registering a Node"))?;
        let now = super::status::now();
        let status = json!({
            "apiVersion": "v1", "kind": "Node",
            "status": {
                "addresses": [{"type": "InternalIP", "address": n.ip}, {"type": "Hostname", "address": "127.0.0.1"}],
                "daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet_port}},
                "capacity": {"cpu": "2", "memory": "4Gi", "pods": "110"},
                "allocatable": {"cpu": "2", "memory": "4Gi", "pods": "110"},
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                    "message": "the lab plays this node's kubelet", "lastHeartbeatTime": now, "lastTransitionTime": now}],
                "nodeInfo": {"architecture": "amd64", "operatingSystem": "linux", "kubeletVersion": "lab",
                    "containerRuntimeVersion": "lab://netns", "kernelVersion": "", "osImage": "lab",
                    "machineID": "", "systemUUID": "", "bootID": "", "kubeProxyVersion": ""},
            },
        });
        nodes
            .patch_status(&n.name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .map_err(api_err("a Node's status"))?;
    }
    Ok(())
}

/// One pass of every controller.
pub async fn sync(client: &Client, lab: &Lab, ca_pem: &str) -> Result<()> {
    namespaces(client, ca_pem).await?;
    let pods = Api::<Pod>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(api_err("listing pods"))?;
    let sets = Api::<ReplicaSet>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(api_err("listing ReplicaSets"))?;
    deployments(client, &sets.items).await?;
    replica_sets(client, &sets.items, &pods.items).await?;
    let nodes: Vec<String> = lab.state.nodes.iter().map(|n| n.name.clone()).collect();
    daemon_sets(client, &nodes, &pods.items).await
}

/// The CA ConfigMaps every namespace gets: Kubernetes' root CA (what
/// kube-controller-manager publishes), and the service CA that this build
/// of the API server (from OpenShift's tree) adds to every pod's API token
/// volume (what OpenShift's service-CA operator publishes; here the same
/// CA).
const CA_CONFIGMAPS: &[(&str, &str)] = &[
    ("kube-root-ca.crt", "ca.crt"),
    ("openshift-service-ca.crt", "service-ca.crt"),
];

async fn namespaces(client: &Client, ca_pem: &str) -> Result<()> {
    let nss = Api::<Namespace>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(api_err("listing namespaces"))?;
    let sas = Api::<ServiceAccount>::all(client.clone())
        .list(&ListParams::default().fields("metadata.name=default"))
        .await
        .map_err(api_err("listing ServiceAccounts"))?;
    let cms = Api::<ConfigMap>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(api_err("listing ConfigMaps"))?;
    for ns in nss
        .items
        .iter()
        .filter(|n| n.metadata.deletion_timestamp.is_none())
    {
        let name = ns.name_any();
        if !sas
            .items
            .iter()
            .any(|s| s.namespace().as_deref() == Some(&name))
        {
            let sa = json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}});
            create_quietly(
                &Api::<ServiceAccount>::namespaced(client.clone(), &name),
                &sa,
            )
            .await?;
        }
        for (cm_name, key) in CA_CONFIGMAPS {
            let has_ca = cms.items.iter().any(|c| {
                c.namespace().as_deref() == Some(&name)
                    && c.name_any() == *cm_name
                    && c.data
                        .as_ref()
                        .and_then(|d| d.get(*key))
                        .map(String::as_str)
                        == Some(ca_pem)
            });
            if !has_ca {
                let cm = json!({"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": cm_name}, "data": {*key: ca_pem}});
                Api::<ConfigMap>::namespaced(client.clone(), &name)
                    .patch(cm_name, &apply(), &Patch::Apply(&cm))
                    .await
                    .map_err(api_err("writing a CA ConfigMap"))?;
            }
        }
    }
    Ok(())
}

/// Creates `obj`; one that exists already (409), or a namespace that is
/// going away, is not an error.
async fn create_quietly<K>(api: &Api<K>, obj: &Value) -> Result<()>
where
    K: Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let typed: K =
        serde_json::from_value(obj.clone()).map_err(|e| KubeletError::Setup(format!("{e}")))?;
    match api.create(&PostParams::default(), &typed).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 || s.code == 403 => Ok(()),
        Err(e) => Err(KubeletError::api("creating an object", e)),
    }
}

async fn deployments(client: &Client, sets: &[ReplicaSet]) -> Result<()> {
    let list = Api::<Deployment>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(api_err("listing Deployments"))?;
    for d in list
        .items
        .iter()
        .filter(|d| d.metadata.deletion_timestamp.is_none())
    {
        let (ns, name, uid) = (
            d.namespace().unwrap_or_default(),
            d.name_any(),
            d.uid().unwrap_or_default(),
        );
        let Some(spec) = &d.spec else { continue };
        let desired = spec.replicas.unwrap_or(1);
        let hash = template_hash(&spec.template);
        let rs_name = format!("{name}-{hash}");
        let owned: Vec<&ReplicaSet> = sets.iter().filter(|r| controlled_by(*r, &uid)).collect();
        let rs_api = Api::<ReplicaSet>::namespaced(client.clone(), &ns);
        let mut template = serde_json::to_value(&spec.template).unwrap_or_default();
        template["metadata"]["labels"]["pod-template-hash"] = json!(hash);
        let mut selector = serde_json::to_value(&spec.selector).unwrap_or_default();
        selector["matchLabels"]["pod-template-hash"] = json!(hash);
        let rs = json!({
            "apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {"name": rs_name, "labels": template["metadata"]["labels"], "ownerReferences": [owner_ref(d)]},
            "spec": {"replicas": desired, "selector": selector, "template": template},
        });
        let current = owned.iter().find(|r| r.name_any() == rs_name);
        if current
            .and_then(|r| r.spec.as_ref())
            .and_then(|s| s.replicas)
            != Some(desired)
        {
            rs_api
                .patch(&rs_name, &apply(), &Patch::Apply(&rs))
                .await
                .map_err(api_err("applying a ReplicaSet"))?;
        }
        let ready = |r: &ReplicaSet| {
            r.status
                .as_ref()
                .and_then(|s| s.ready_replicas)
                .unwrap_or(0)
        };
        let replicas = |r: &ReplicaSet| r.status.as_ref().map(|s| s.replicas).unwrap_or(0);
        let new_ready = current.map(|r| ready(r)).unwrap_or(0);
        for old in owned.iter().filter(|r| r.name_any() != rs_name) {
            if new_ready >= desired && old.spec.as_ref().and_then(|s| s.replicas) != Some(0) {
                let p = json!({"spec": {"replicas": 0}});
                rs_api
                    .patch(&old.name_any(), &PatchParams::default(), &Patch::Merge(&p))
                    .await
                    .map_err(api_err("scaling a ReplicaSet down"))?;
            }
        }
        let total: i32 = owned.iter().map(|r| replicas(r)).sum();
        let all_ready: i32 = owned.iter().map(|r| ready(r)).sum();
        let updated = current.map(|r| replicas(r)).unwrap_or(0);
        let available = if all_ready >= desired {
            "True"
        } else {
            "False"
        };
        let status = json!({"status": {
            "observedGeneration": d.metadata.generation, "replicas": total, "updatedReplicas": updated,
            "readyReplicas": all_ready, "availableReplicas": all_ready,
            "unavailableReplicas": (desired - all_ready).max(0),
            "conditions": [
                {"type": "Available", "status": available, "reason": "MinimumReplicasAvailable"},
                {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}],
        }});
        patch_status_if(
            &Api::<Deployment>::namespaced(client.clone(), &ns),
            &name,
            d.status.as_ref(),
            status,
        )
        .await?;
    }
    Ok(())
}

/// Patches `status` when it differs from `current` in what it sets.
async fn patch_status_if<K, S>(
    api: &Api<K>,
    name: &str,
    current: Option<&S>,
    status: Value,
) -> Result<()>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    S: serde::Serialize,
{
    let now = serde_json::to_value(current).unwrap_or_default();
    let want = &status["status"];
    // Kubernetes leaves zero counts out; conditions, once there, are kept.
    let same = want.as_object().is_some_and(|o| {
        o.iter().all(|(k, v)| {
            let cur = now.get(k).cloned().unwrap_or(Value::Null);
            (k == "conditions" && !cur.is_null()) || cur == *v || (cur.is_null() && *v == json!(0))
        })
    });
    if same {
        return Ok(());
    }
    match api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(KubeletError::api(
            format!("writing the status of {name}"),
            e,
        )),
    }
}

fn pod_from_template(template: &Value, name: &str, owner: Value, node: Option<&str>) -> Value {
    let mut meta = template["metadata"].clone();
    if !meta.is_object() {
        meta = json!({});
    }
    meta["name"] = json!(name);
    meta["ownerReferences"] = json!([owner]);
    let mut spec = template["spec"].clone();
    if let Some(n) = node {
        spec["nodeName"] = json!(n);
    }
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec})
}

async fn replica_sets(client: &Client, sets: &[ReplicaSet], pods: &[Pod]) -> Result<()> {
    for rs in sets
        .iter()
        .filter(|r| r.metadata.deletion_timestamp.is_none())
    {
        let (ns, name, uid) = (
            rs.namespace().unwrap_or_default(),
            rs.name_any(),
            rs.uid().unwrap_or_default(),
        );
        let Some(spec) = &rs.spec else { continue };
        let desired = spec.replicas.unwrap_or(1).max(0) as usize;
        let live: Vec<&Pod> = pods
            .iter()
            .filter(|p| controlled_by(*p, &uid) && p.metadata.deletion_timestamp.is_none())
            .collect();
        let api = Api::<Pod>::namespaced(client.clone(), &ns);
        let template = serde_json::to_value(&spec.template).unwrap_or_default();
        for _ in live.len()..desired {
            let pod = pod_from_template(
                &template,
                &format!("{name}-{}", suffix()),
                owner_ref(rs),
                None,
            );
            create_quietly(&api, &pod).await?;
        }
        let mut extra: Vec<&&Pod> = live.iter().collect();
        extra.sort_by_key(|p| is_ready(p));
        for p in extra.iter().take(live.len().saturating_sub(desired)) {
            delete_quietly(&api, &p.name_any()).await?;
        }
        let ready = live.iter().filter(|p| is_ready(p)).count();
        let status = json!({"status": {"replicas": live.len(), "fullyLabeledReplicas": live.len(),
            "readyReplicas": ready, "availableReplicas": ready, "observedGeneration": rs.metadata.generation}});
        patch_status_if(
            &Api::<ReplicaSet>::namespaced(client.clone(), &ns),
            &name,
            rs.status.as_ref(),
            status,
        )
        .await?;
    }
    Ok(())
}

pub async fn delete_quietly<K>(api: &Api<K>, name: &str) -> Result<()>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
        Err(e) => Err(KubeletError::api(format!("deleting {name}"), e)),
    }
}

async fn daemon_sets(client: &Client, nodes: &[String], pods: &[Pod]) -> Result<()> {
    let list = Api::<DaemonSet>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(api_err("listing DaemonSets"))?;
    for ds in list
        .items
        .iter()
        .filter(|d| d.metadata.deletion_timestamp.is_none())
    {
        let (ns, name, uid) = (
            ds.namespace().unwrap_or_default(),
            ds.name_any(),
            ds.uid().unwrap_or_default(),
        );
        let Some(spec) = &ds.spec else { continue };
        let hash = template_hash(&spec.template);
        let mut template = serde_json::to_value(&spec.template).unwrap_or_default();
        template["metadata"]["labels"]["controller-revision-hash"] = json!(hash);
        let api = Api::<Pod>::namespaced(client.clone(), &ns);
        let mut by_node: BTreeMap<&str, Vec<&Pod>> = BTreeMap::new();
        for p in pods
            .iter()
            .filter(|p| controlled_by(*p, &uid) && p.metadata.deletion_timestamp.is_none())
        {
            let node = p
                .spec
                .as_ref()
                .and_then(|s| s.node_name.as_deref())
                .unwrap_or_default();
            by_node.entry(node).or_default().push(p);
        }
        let current = |p: &Pod| p.labels().get("controller-revision-hash") == Some(&hash);
        let mut ready = 0;
        let mut updated = 0;
        let mut all_settled = true;
        for n in nodes {
            let on = by_node.get(n.as_str()).cloned().unwrap_or_default();
            if on.is_empty() {
                let pod = pod_from_template(
                    &template,
                    &format!("{name}-{}", suffix()),
                    owner_ref(ds),
                    Some(n),
                );
                create_quietly(&api, &pod).await?;
                all_settled = false;
            }
            ready += on.iter().filter(|p| is_ready(p)).count();
            updated += on.iter().filter(|p| current(p)).count();
            all_settled &= on.iter().all(|p| is_ready(p));
        }
        // A new template replaces one node's pod at a time: with a surge,
        // the new pod first, the old one deleted once the new one is ready;
        // without, the old one first (maxUnavailable: 1).
        if all_settled {
            match next_replacement(&by_node, surges(ds), current) {
                Some(Replace::Create(node)) => {
                    let pod = pod_from_template(
                        &template,
                        &format!("{name}-{}", suffix()),
                        owner_ref(ds),
                        Some(node),
                    );
                    create_quietly(&api, &pod).await?;
                }
                Some(Replace::Delete(old)) => delete_quietly(&api, &old).await?,
                None => {}
            }
        }
        let status = json!({"status": {
            "desiredNumberScheduled": nodes.len(), "currentNumberScheduled": by_node.len().min(nodes.len()),
            "numberReady": ready, "numberAvailable": ready, "updatedNumberScheduled": updated,
            "numberMisscheduled": 0, "observedGeneration": ds.metadata.generation}});
        patch_status_if(
            &Api::<DaemonSet>::namespaced(client.clone(), &ns),
            &name,
            ds.status.as_ref(),
            status,
        )
        .await?;
    }
    Ok(())
}

/// Whether a DaemonSet rolls with a surge (`maxSurge` set and not zero).
fn surges(ds: &DaemonSet) -> bool {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let surge = ds
        .spec
        .as_ref()
        .and_then(|s| s.update_strategy.as_ref())
        .and_then(|u| u.rolling_update.as_ref())
        .and_then(|r| r.max_surge.as_ref());
    match surge {
        Some(IntOrString::Int(n)) => *n > 0,
        Some(IntOrString::String(p)) => p.trim_end_matches('%').parse::<u32>().is_ok_and(|n| n > 0),
        None => false,
    }
}

/// The next step of a rolling update, every pod being ready.
enum Replace<'a> {
    /// A new pod on this node, beside its old one (surge).
    Create(&'a str),
    /// This old pod goes.
    Delete(String),
}

fn next_replacement<'a>(
    by_node: &BTreeMap<&'a str, Vec<&Pod>>,
    surge: bool,
    current: impl Fn(&Pod) -> bool,
) -> Option<Replace<'a>> {
    if !surge {
        let old = by_node.values().flatten().find(|p| !current(p))?;
        return Some(Replace::Delete(old.name_any()));
    }
    // A node with both goes first (its new pod is ready: all are).
    for on in by_node.values() {
        if let (Some(old), true) = (
            on.iter().find(|p| !current(p)),
            on.iter().any(|p| current(p)),
        ) {
            return Some(Replace::Delete(old.name_any()));
        }
    }
    by_node
        .iter()
        .find(|(_, on)| on.iter().any(|p| !current(p)))
        .map(|(node, _)| Replace::Create(node))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, hash: &str) -> Pod {
        serde_json::from_value(
            json!({"metadata": {"name": name, "labels": {"controller-revision-hash": hash}}}),
        )
        .unwrap()
    }

    fn step(by_node: &BTreeMap<&str, Vec<&Pod>>, surge: bool) -> Option<String> {
        let current = |p: &Pod| {
            p.labels()
                .get("controller-revision-hash")
                .map(String::as_str)
                == Some("new")
        };
        next_replacement(by_node, surge, current).map(|r| match r {
            Replace::Create(n) => format!("create on {n}"),
            Replace::Delete(p) => format!("delete {p}"),
        })
    }

    #[test]
    fn a_surge_creates_the_new_pod_before_deleting_the_old_one() {
        let (a_old, a_new, b_old) = (
            pod("a-old", "old"),
            pod("a-new", "new"),
            pod("b-old", "old"),
        );
        let start = BTreeMap::from([("a", vec![&a_old]), ("b", vec![&b_old])]);
        assert_eq!(step(&start, true).as_deref(), Some("create on a"));
        assert_eq!(step(&start, false).as_deref(), Some("delete a-old"));
        let both = BTreeMap::from([("a", vec![&a_old, &a_new]), ("b", vec![&b_old])]);
        assert_eq!(step(&both, true).as_deref(), Some("delete a-old"));
        let next = BTreeMap::from([("a", vec![&a_new]), ("b", vec![&b_old])]);
        assert_eq!(step(&next, true).as_deref(), Some("create on b"));
        let done = BTreeMap::from([("a", vec![&a_new])]);
        assert_eq!(step(&done, true), None);
    }
}
