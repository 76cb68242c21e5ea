//! The proxy state: workloads, services and authorization policies, keyed as
//! the workload-discovery protocol keys them.
//!
//! Readers take an immutable [`Snapshot`] (an `Arc` load, no lock); writers
//! apply a batch of updates to a copy and swap it in, so a batch from one xDS
//! response is seen all at once or not at all.

pub mod decide;
mod local;
pub mod policy;
mod types;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arc_swap::ArcSwap;
use mesh_proto::istio::security as pb_security;
use mesh_proto::istio::workload as pb;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub use local::{LocalConfig, LocalConfigError};
pub use policy::{Authorization, Decision};
pub use types::{
    FieldError, GatewayAddress, GatewayDestination, PortMapping, ResourceError, Service,
    TunnelProtocol, Workload, WorkloadKind, ip_from_bytes,
};

use policy::Scope;

/// A service and its round-robin cursor.
#[derive(Debug, Serialize, Deserialize)]
pub struct ServiceEntry {
    #[serde(flatten)]
    pub service: Service,
    #[serde(skip)]
    cursor: AtomicUsize,
}

/// Entries by (network, IP), looked up without building a key: every new
/// connection looks up its source and destination here. Addresses are
/// almost never reused across networks, so each IP holds one entry.
#[derive(Debug)]
struct ByAddress<T>(HashMap<IpAddr, Vec<(String, Arc<T>)>>);

impl<T> Default for ByAddress<T> {
    fn default() -> Self {
        ByAddress(HashMap::new())
    }
}

impl<T> Clone for ByAddress<T> {
    fn clone(&self) -> Self {
        ByAddress(self.0.clone())
    }
}

impl<T> ByAddress<T> {
    fn get(&self, network: &str, ip: IpAddr) -> Option<&Arc<T>> {
        self.0
            .get(&ip)?
            .iter()
            .find_map(|(n, v)| (n == network).then_some(v))
    }

    fn insert(&mut self, network: &str, ip: IpAddr, v: Arc<T>) {
        let list = self.0.entry(ip).or_default();
        match list.iter_mut().find(|(n, _)| n == network) {
            Some(slot) => slot.1 = v,
            None => list.push((network.to_string(), v)),
        }
    }

    /// Removes the entry at (network, ip) if `owned` says it is the caller's.
    fn remove_if(&mut self, network: &str, ip: IpAddr, owned: impl Fn(&T) -> bool) {
        if let Some(list) = self.0.get_mut(&ip) {
            list.retain(|(n, v)| !(n == network && owned(v)));
            if list.is_empty() {
                self.0.remove(&ip);
            }
        }
    }
}

/// One consistent view of the state.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    workloads: HashMap<String, Arc<Workload>>,
    workload_by_addr: ByAddress<Workload>,
    services: HashMap<String, Arc<ServiceEntry>>,
    service_by_vip: ByAddress<ServiceEntry>,
    /// Service key -> backing workloads, by uid (ordered, for stable picks).
    endpoints: HashMap<String, BTreeMap<String, Arc<Workload>>>,
    policies: HashMap<String, Arc<Authorization>>,
}

/// One change in a batch.
#[derive(Debug, Clone)]
pub enum Update {
    Workload(Workload),
    Service(Service),
    /// Removes the workload (by uid) or service ("namespace/hostname") of that name.
    RemoveAddress(String),
    Policy(Authorization),
    RemovePolicy(String),
}

impl Update {
    /// Converts an `istio.workload.Address` resource.
    pub fn from_address(a: &pb::Address, trust_domain: &str) -> Result<Update, ResourceError> {
        match &a.r#type {
            Some(pb::address::Type::Workload(w)) => {
                Ok(Update::Workload(Workload::from_proto(w, trust_domain)?))
            }
            Some(pb::address::Type::Service(s)) => Ok(Update::Service(Service::from_proto(s)?)),
            None => Err(ResourceError::Envelope {
                name: String::new(),
                reason: "Address with neither workload nor service".into(),
            }),
        }
    }

    pub fn from_authorization(a: &pb_security::Authorization) -> Result<Update, ResourceError> {
        Ok(Update::Policy(Authorization::from_proto(a)?))
    }
}

impl Snapshot {
    pub fn workload(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.workloads.get(uid)
    }

    pub fn workload_by_ip(&self, network: &str, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.workload_by_addr.get(network, ip)
    }

    pub fn service(&self, key: &str) -> Option<&Arc<ServiceEntry>> {
        self.services.get(key)
    }

    pub fn service_by_vip(&self, network: &str, ip: IpAddr) -> Option<&Arc<ServiceEntry>> {
        self.service_by_vip.get(network, ip)
    }

    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.values()
    }

    pub fn services(&self) -> impl Iterator<Item = &Arc<ServiceEntry>> {
        self.services.values()
    }

    pub fn policies(&self) -> impl Iterator<Item = &Arc<Authorization>> {
        self.policies.values()
    }

    /// Healthy workloads backing a service.
    pub fn endpoints(&self, service_key: &str) -> impl Iterator<Item = &Arc<Workload>> {
        self.endpoints
            .get(service_key)
            .into_iter()
            .flat_map(|m| m.values())
            .filter(|w| w.healthy)
    }

    /// Picks the next healthy endpoint of `svc`, round robin.
    pub fn pick_endpoint(&self, svc: &ServiceEntry) -> Option<Arc<Workload>> {
        let eps: Vec<&Arc<Workload>> = self.endpoints(&svc.service.key()).collect();
        if eps.is_empty() {
            return None;
        }
        let i = svc.cursor.fetch_add(1, Ordering::Relaxed) % eps.len();
        Some(eps[i].clone())
    }

    /// The policies that apply to `w`, sorted by key (so decisions are stable).
    pub fn policies_for(&self, w: &Workload, root_namespace: &str) -> Vec<Arc<Authorization>> {
        let mut out: Vec<Arc<Authorization>> = self
            .policies
            .values()
            .filter(|p| match p.scope {
                Scope::Global => p.namespace == root_namespace || p.namespace.is_empty(),
                Scope::Namespace => p.namespace == w.namespace,
                Scope::WorkloadSelector => w.authorization_policies.iter().any(|k| *k == p.key()),
                Scope::Unknown => {
                    p.namespace == w.namespace
                        || p.namespace == root_namespace
                        || p.namespace.is_empty()
                }
            })
            .cloned()
            .collect();
        out.sort_by_key(|p| p.key());
        out
    }

    fn remove_workload(&mut self, uid: &str) -> Option<Arc<Workload>> {
        let old = self.workloads.remove(uid)?;
        for ip in &old.addresses {
            self.workload_by_addr
                .remove_if(&old.network, *ip, |w| w.uid == old.uid);
        }
        for svc in old.services.keys() {
            if let Some(m) = self.endpoints.get_mut(svc) {
                m.remove(uid);
                if m.is_empty() {
                    self.endpoints.remove(svc);
                }
            }
        }
        Some(old)
    }

    fn insert_workload(&mut self, w: Workload) {
        self.remove_workload(&w.uid.clone());
        let w = Arc::new(w);
        for ip in &w.addresses {
            self.workload_by_addr.insert(&w.network, *ip, w.clone());
        }
        for svc in w.services.keys() {
            self.endpoints
                .entry(svc.clone())
                .or_default()
                .insert(w.uid.clone(), w.clone());
        }
        self.workloads.insert(w.uid.clone(), w);
    }

    fn remove_service(&mut self, key: &str) -> bool {
        let Some(old) = self.services.remove(key) else {
            return false;
        };
        for (net, ip) in &old.service.vips {
            self.service_by_vip
                .remove_if(net, *ip, |s| s.service.key() == key);
        }
        true
    }

    fn insert_service(&mut self, s: Service) {
        let key = s.key();
        self.remove_service(&key);
        let entry = Arc::new(ServiceEntry {
            service: s,
            cursor: AtomicUsize::new(0),
        });
        for (net, ip) in &entry.service.vips {
            self.service_by_vip.insert(net, *ip, entry.clone());
        }
        self.services.insert(key, entry);
    }

    /// Applies one update; true when it can change a policy decision for
    /// an open connection (so open connections must be re-checked).
    fn apply(&mut self, u: Update) -> bool {
        match u {
            Update::Workload(w) => {
                let relevant = match self.workloads.get(&w.uid) {
                    Some(old) => {
                        old.authorization_policies != w.authorization_policies
                            || old.namespace != w.namespace
                            || old.identity != w.identity
                            || old.addresses != w.addresses
                    }
                    None => false,
                };
                self.insert_workload(w);
                relevant
            }
            Update::Service(s) => {
                self.insert_service(s);
                false
            }
            Update::RemoveAddress(name) => {
                if self.remove_workload(&name).is_some() {
                    return true;
                }
                self.remove_service(&name);
                false
            }
            Update::Policy(p) => {
                self.policies.insert(p.key(), Arc::new(p));
                true
            }
            Update::RemovePolicy(key) => {
                self.policies.remove(&key);
                true
            }
        }
    }
}

/// The shared, swappable state.
#[derive(Clone)]
pub struct ProxyState {
    current: Arc<ArcSwap<Snapshot>>,
    /// Serializes writers; readers never take it.
    writer: Arc<std::sync::Mutex<()>>,
    /// Bumped on every applied batch; policy changes also bump `policy_epoch`.
    version: watch::Sender<u64>,
    policy_epoch: watch::Sender<u64>,
}

impl Default for ProxyState {
    fn default() -> Self {
        ProxyState {
            current: Arc::new(ArcSwap::from_pointee(Snapshot::default())),
            writer: Arc::new(std::sync::Mutex::new(())),
            version: watch::Sender::new(0),
            policy_epoch: watch::Sender::new(0),
        }
    }
}

impl ProxyState {
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Applies a batch atomically.
    pub fn apply(&self, batch: Vec<Update>) {
        if batch.is_empty() {
            return;
        }
        let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = Snapshot::clone(&self.current.load());
        let mut touches_policy = false;
        for u in batch {
            touches_policy |= next.apply(u);
        }
        self.current.store(Arc::new(next));
        self.version.send_modify(|v| *v += 1);
        if touches_policy {
            self.policy_epoch.send_modify(|v| *v += 1);
        }
    }

    /// Replaces everything with `batch` (a full resync).
    pub fn replace(&self, batch: Vec<Update>) {
        let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = Snapshot::default();
        for u in batch {
            next.apply(u);
        }
        self.current.store(Arc::new(next));
        self.version.send_modify(|v| *v += 1);
        self.policy_epoch.send_modify(|v| *v += 1);
    }

    /// Fires after every applied batch.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Fires after every batch that touched policies.
    pub fn subscribe_policies(&self) -> watch::Receiver<u64> {
        self.policy_epoch.subscribe()
    }

    /// True once any config has been applied.
    pub fn has_config(&self) -> bool {
        *self.version.borrow() > 0
    }
}

/// The destination address of `w` on `port`, on its first address.
pub fn workload_addr(w: &Workload, port: u16) -> Option<SocketAddr> {
    w.addresses.first().map(|ip| SocketAddr::new(*ip, port))
}

/// Reads the state back from a `/config_dump` (its `workloads`,
/// `services` and `policies`), so tools can run the proxy's own decision
/// code on it. Lenient: an entry that does not parse (a dump from another
/// version) is left out and named in the returned errors; unknown fields
/// are ignored.
pub fn updates_from_dump(dump: &serde_json::Value) -> (Vec<Update>, Vec<String>) {
    let mut updates = Vec::new();
    let mut errors = Vec::new();
    let items = |k: &str| {
        dump.get(k)
            .and_then(|v| v.as_array())
            .cloned()
            .unwrap_or_default()
    };
    for (i, w) in items("workloads").into_iter().enumerate() {
        match serde_json::from_value::<Workload>(w) {
            Ok(w) => updates.push(Update::Workload(w)),
            Err(e) => errors.push(format!("workloads[{i}]: {e}")),
        }
    }
    for (i, s) in items("services").into_iter().enumerate() {
        match serde_json::from_value::<Service>(s) {
            Ok(s) => updates.push(Update::Service(s)),
            Err(e) => errors.push(format!("services[{i}]: {e}")),
        }
    }
    for (i, p) in items("policies").into_iter().enumerate() {
        match serde_json::from_value::<Authorization>(p) {
            Ok(p) => updates.push(Update::Policy(p)),
            Err(e) => errors.push(format!("policies[{i}]: {e}")),
        }
    }
    (updates, errors)
}

/// What the admin view shows of the state.
#[derive(Debug, Serialize)]
pub struct StateDump {
    pub workloads: Vec<Arc<Workload>>,
    pub services: Vec<Arc<ServiceEntry>>,
    pub policies: Vec<Arc<Authorization>>,
}

impl Snapshot {
    pub fn dump(&self) -> StateDump {
        let mut workloads: Vec<_> = self.workloads.values().cloned().collect();
        workloads.sort_by(|a, b| a.uid.cmp(&b.uid));
        let mut services: Vec<_> = self.services.values().cloned().collect();
        services.sort_by_key(|s| s.service.key());
        let mut policies: Vec<_> = self.policies.values().cloned().collect();
        policies.sort_by_key(|p| p.key());
        StateDump {
            workloads,
            services,
            policies,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL: &str = r#"
workloads:
- {uid: "c//Pod/shop/client", name: client, namespace: shop, addresses: [10.1.1.1], tunnel_protocol: HBONE, service_account: client, node: n1}
- {uid: "c//Pod/shop/server", name: server, namespace: shop, addresses: [10.1.1.2], tunnel_protocol: HBONE, service_account: server, node: n2,
   services: {"shop/server.shop.svc.cluster.local": [{service_port: 80, target_port: 8080}]},
   waypoint: {address: 10.1.9.9}}
services:
- {name: server, namespace: shop, hostname: server.shop.svc.cluster.local, addresses: [10.2.0.1], ports: [{service_port: 80, target_port: 8080}]}
policies:
- name: only-client
  namespace: shop
  scope: NAMESPACE
  action: ALLOW
  rules: [{clauses: [{matches: [{principals: [{exact: cluster.local/ns/shop/sa/client}], destination_ports: [8080], source_ips: [10.1.0.0/16]}]}]}]
"#;

    fn updates(yaml: &str) -> Vec<Update> {
        let local: LocalConfig = serde_yaml::from_str(yaml).expect("local config");
        local.to_updates("cluster.local", "test").expect("updates")
    }

    /// Lookups by address follow the network, an address that moved to a
    /// new workload stays with it when the old one goes, and a service's
    /// VIP goes with the service.
    #[test]
    fn addresses_resolve_per_network_and_follow_their_owner() {
        let ip: IpAddr = "10.1.1.1".parse().expect("ip");
        let state = ProxyState::default();
        state.replace(updates(
            r#"
workloads:
- {uid: "c//Pod/a/old", name: old, namespace: a, addresses: [10.1.1.1], service_account: a, node: n1}
- {uid: "c//Pod/a/other-net", name: far, namespace: a, addresses: [10.1.1.1], network: east, service_account: a, node: n1}
services:
- {name: s, namespace: a, hostname: s.a.svc.cluster.local, addresses: [10.2.0.1], ports: [{service_port: 80, target_port: 8080}]}
"#,
        ));
        let snap = state.snapshot();
        let uid = |net: &str| snap.workload_by_ip(net, ip).map(|w| w.uid.clone());
        assert_eq!(uid("").as_deref(), Some("c//Pod/a/old"));
        assert_eq!(uid("east").as_deref(), Some("c//Pod/a/other-net"));
        assert_eq!(uid("west"), None);
        let vip: IpAddr = "10.2.0.1".parse().expect("ip");
        assert!(snap.service_by_vip("", vip).is_some());
        assert!(snap.service_by_vip("east", vip).is_none());

        // The address moves to a new pod; then the old pod is deleted.
        let mut batch = updates(
            "workloads:\n- {uid: \"c//Pod/a/new\", name: new, namespace: a, addresses: [10.1.1.1], service_account: a, node: n1}\n",
        );
        batch.push(Update::RemoveAddress("c//Pod/a/old".into()));
        batch.push(Update::RemoveAddress("a/s.a.svc.cluster.local".into()));
        state.apply(batch);
        let snap = state.snapshot();
        let uid = |net: &str| snap.workload_by_ip(net, ip).map(|w| w.uid.clone());
        assert_eq!(uid("").as_deref(), Some("c//Pod/a/new"));
        assert_eq!(uid("east").as_deref(), Some("c//Pod/a/other-net"));
        assert!(snap.service_by_vip("", vip).is_none());
    }

    #[test]
    fn a_config_dump_reads_back_into_the_same_state() {
        let local: LocalConfig = serde_yaml::from_str(LOCAL).expect("local config");
        let state = ProxyState::default();
        state.replace(local.to_updates("cluster.local", "test").expect("updates"));
        let dump = serde_json::to_value(state.snapshot().dump()).expect("dump");
        let (updates, errors) = updates_from_dump(&dump);
        assert!(errors.is_empty(), "{errors:?}");
        let again = ProxyState::default();
        again.replace(updates);
        assert_eq!(
            serde_json::to_value(again.snapshot().dump()).expect("dump"),
            dump
        );
        // A newer dump: an unknown field is ignored, an entry that no
        // longer parses is named and left out.
        let mut newer = dump.clone();
        newer["workloads"][0]["future_field"] = serde_json::json!(1);
        newer["services"][0]["ports"] = serde_json::json!("not a list");
        let (updates, errors) = updates_from_dump(&newer);
        assert_eq!(updates.len(), 3, "{errors:?}");
        assert_eq!(errors.len(), 1);
        assert!(errors[0].starts_with("services[0]"), "{errors:?}");
    }
}
