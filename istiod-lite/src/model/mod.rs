//! The controller's model: Kubernetes objects in, xDS resources out.
//!
//! Inputs are kept by key. A change marks only the outputs it can affect (a
//! pod marks its own workload; a service marks the pods of its namespace; a
//! namespace label marks that namespace), those are recomputed, and the
//! resulting [`Delta`] names the resources whose content changed. A
//! resource's version is a hash of its bytes, so an unchanged resource keeps
//! its version across restarts and a reconnecting proxy is not sent it again.

mod authz;
pub mod cluster;
mod extauthz;
pub mod ingress;
pub mod routes;
mod waypoint;
mod workload;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use mesh_proto::istio::security::Authorization;
use mesh_proto::istio::workload::Address;
use mesh_proto::{
    ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, INGRESS_TYPE_URL, SERVICE_ROUTES_TYPE_URL,
};
use prost::Message;
use serde::Serialize;
use ztunnel::identity::Identity;

use crate::config::crds::{AuthorizationPolicy, DestinationRule, PeerAuthentication};
use crate::config::objects::{Change, Kind, Object, ObjectKey};
use gateway_api::apis::experimental::httproutes::HttpRoute;
use gateway_api::apis::standard::gateways::Gateway;
use routes::TrafficPolicies;

/// Namespace (and pod) label that enrolls workloads in the mesh.
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
/// Label naming the waypoint a namespace, service or pod uses.
pub const USE_WAYPOINT: &str = "istio.io/use-waypoint";
/// Label on a waypoint Gateway: what traffic it serves.
pub const WAYPOINT_FOR: &str = "istio.io/waypoint-for";
pub const WAYPOINT_CLASS: &str = "istio-waypoint";
/// Label on a waypoint's pods naming their Gateway (set by Gateway API
/// implementations on what they deploy).
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// Node.id prefix of a waypoint proxy: `waypoint~<namespace>~<pod>`.
pub const WAYPOINT_PROXY_PREFIX: &str = "waypoint";
/// Class of an ingress Gateway (see [`ingress`]).
pub const INGRESS_CLASS: &str = "mesh-ingress";
/// Node.id prefix of an ingress gateway proxy: `ingress~<namespace>~<pod>`.
pub const INGRESS_PROXY_PREFIX: &str = "ingress";

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub trust_domain: String,
    /// Cluster DNS suffix: services are `name.ns.svc.<suffix>`.
    pub domain_suffix: String,
    pub root_namespace: String,
    pub cluster_id: String,
    /// Mesh-wide settings (`--mesh-config`): the extension providers.
    pub mesh: crate::config::mesh::MeshConfig,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            trust_domain: "cluster.local".into(),
            domain_suffix: "cluster.local".into(),
            root_namespace: "istio-system".into(),
            cluster_id: "Kubernetes".into(),
            mesh: Default::default(),
        }
    }
}

/// One xDS resource, encoded once and shared by every connection.
#[derive(Debug, Serialize)]
pub struct XdsResource {
    pub name: String,
    pub version: String,
    #[serde(skip)]
    pub any: prost_types::Any,
}

/// What an [`Model::apply`] changed, per type URL.
#[derive(Debug, Default, Clone)]
pub struct Delta {
    pub changed: BTreeMap<&'static str, BTreeSet<String>>,
    pub removed: BTreeMap<&'static str, BTreeSet<String>>,
    /// A Gateway's pod or a Gateway changed: which proxy serves which
    /// Gateway may have too (see [`Model::waypoint_of_proxy`] and
    /// [`Model::ingress_of_proxy`]).
    pub gateway_proxies: bool,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.changed.values().all(|s| s.is_empty())
            && self.removed.values().all(|s| s.is_empty())
            && !self.gateway_proxies
    }

    pub fn merge(&mut self, other: Delta) {
        self.gateway_proxies |= other.gateway_proxies;
        for (t, names) in other.changed {
            let removed = self.removed.entry(t).or_default();
            for n in names {
                removed.remove(&n);
                self.changed.entry(t).or_default().insert(n);
            }
        }
        for (t, names) in other.removed {
            let changed = self.changed.entry(t).or_default();
            for n in names {
                changed.remove(&n);
                self.removed.entry(t).or_default().insert(n);
            }
        }
    }
}

/// A problem with the config the model noticed (not a parse error).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelIssue {
    pub object: String,
    pub reason: String,
}

type NsName = (String, String);

#[derive(Default)]
pub struct Model {
    cfg: ModelConfig,
    namespaces: BTreeMap<String, Namespace>,
    pods: BTreeMap<NsName, Pod>,
    services: BTreeMap<NsName, Service>,
    slices: BTreeMap<NsName, EndpointSlice>,
    gateways: BTreeMap<NsName, Gateway>,
    authz_policies: BTreeMap<NsName, AuthorizationPolicy>,
    peer_auths: BTreeMap<NsName, PeerAuthentication>,
    http_routes: BTreeMap<NsName, HttpRoute>,
    dest_rules: BTreeMap<NsName, DestinationRule>,
    traffic_policies: TrafficPolicies,
    /// Secrets as listener certificates: checked once, when they change.
    secrets: BTreeMap<NsName, ingress::TlsSecret>,
    /// Each ingress Gateway's listener status, as of the last recompute.
    ingress_listeners: BTreeMap<NsName, Vec<ingress::ListenerStatus>>,
    others: BTreeMap<ObjectKey, Object>,
    /// Node -> pods scheduled there, for the CA's node check.
    pods_by_node: HashMap<String, BTreeSet<NsName>>,
    /// Outputs, by type URL then resource name.
    outputs: BTreeMap<&'static str, BTreeMap<String, Arc<XdsResource>>>,
    /// Which output names each input produced, so a removal removes them.
    produced: HashMap<Source, String>,
    /// The waypoint Gateway each ServiceRoutes resource (by name) is for.
    route_waypoints: HashMap<String, NsName>,
    issues: BTreeMap<String, Vec<ModelIssue>>,
}

/// The input that produced an output.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Source {
    Pod(NsName),
    Service(NsName),
    Policy(NsName),
    PeerAuth(NsName),
    Routes(NsName),
    Ingress(NsName),
    /// A waypoint Gateway's own `ServiceRoutes` (its policies).
    Waypoint(NsName),
}

fn ns_name(k: &ObjectKey) -> NsName {
    (k.namespace.clone(), k.name.clone())
}

fn version_of(bytes: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

fn in_ns<V>(m: &BTreeMap<NsName, V>, ns: &str) -> Vec<NsName> {
    m.range((ns.to_string(), String::new())..)
        .take_while(|((n, _), _)| n == ns)
        .map(|(k, _)| k.clone())
        .collect()
}

/// What to recompute.
#[derive(Default)]
struct Dirty {
    pods: BTreeSet<NsName>,
    services: BTreeSet<NsName>,
    policies: BTreeSet<NsName>,
    /// Services whose waypoint routes to recompute (besides `services`).
    routes: BTreeSet<NsName>,
    /// HTTPRoutes to re-check (for their issues).
    http_routes: BTreeSet<NsName>,
    /// DestinationRules to re-check (for their issues).
    dest_rules: BTreeSet<NsName>,
    /// TrafficPolicies to re-check (for their issues).
    traffic_policies: BTreeSet<NsName>,
    peer_auths: bool,
    /// Every ingress Gateway (they depend on most kinds; there are few).
    ingresses: bool,
    /// Every waypoint Gateway's own resource (its policies; there are few).
    waypoints: bool,
    /// See [`Delta::gateway_proxies`].
    gateway_proxies: bool,
}

impl Model {
    pub fn new(cfg: ModelConfig) -> Self {
        Model {
            cfg,
            ..Model::default()
        }
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Resources of one type, by name.
    pub fn resources(&self, type_url: &str) -> Option<&BTreeMap<String, Arc<XdsResource>>> {
        self.outputs.get(type_url)
    }

    /// Problems the model noticed, by object.
    pub fn issues(&self) -> Vec<ModelIssue> {
        self.issues.values().flatten().cloned().collect()
    }

    /// True when a running pod with `identity` is scheduled on `node`.
    pub fn identity_on_node(&self, node: &str, identity: &Identity) -> bool {
        if identity.trust_domain() != self.cfg.trust_domain {
            return false;
        }
        self.pods_by_node.get(node).is_some_and(|pods| {
            pods.iter().any(|k| {
                k.0 == identity.namespace()
                    && self.pods.get(k).is_some_and(|p| {
                        workload::running(p)
                            && workload::service_account(p) == identity.service_account()
                    })
            })
        })
    }

    /// The waypoint Gateway (namespace, name) a proxy serves, when it is a
    /// waypoint: its id is `waypoint~<namespace>~<pod>`, that pod runs on
    /// `node` (the node its caller proved) and carries
    /// `gateway.networking.k8s.io/gateway-name: <gateway>`, and that Gateway
    /// is of class `istio-waypoint`. Otherwise, why not.
    pub fn waypoint_of_proxy(&self, node: &str, proxy_id: &str) -> Result<NsName, String> {
        self.gateway_of_proxy(node, proxy_id, WAYPOINT_PROXY_PREFIX, WAYPOINT_CLASS)
    }

    /// The ingress Gateway a proxy serves, as [`Model::waypoint_of_proxy`]
    /// with id `ingress~<namespace>~<pod>` and class `mesh-ingress`.
    pub fn ingress_of_proxy(&self, node: &str, proxy_id: &str) -> Result<NsName, String> {
        self.gateway_of_proxy(node, proxy_id, INGRESS_PROXY_PREFIX, INGRESS_CLASS)
    }

    fn gateway_of_proxy(
        &self,
        node: &str,
        proxy_id: &str,
        prefix: &str,
        class: &str,
    ) -> Result<NsName, String> {
        let mut parts = proxy_id.split('~');
        let (Some(p), Some(ns), Some(pod), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(format!(
                "proxy id {proxy_id:?} is not {prefix}~<namespace>~<pod>"
            ));
        };
        if p != prefix {
            return Err(format!(
                "proxy id {proxy_id:?} is not {prefix}~<namespace>~<pod>"
            ));
        }
        let key = (ns.to_string(), pod.to_string());
        let p = self
            .pods
            .get(&key)
            .filter(|p| workload::running(p))
            .ok_or_else(|| format!("no running pod {ns}/{pod}"))?;
        let on = p
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .unwrap_or_default();
        if on != node {
            return Err(format!(
                "pod {ns}/{pod} runs on node {on:?}, not on the caller's node {node:?}"
            ));
        }
        let gw = p
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(GATEWAY_NAME_LABEL))
            .ok_or_else(|| format!("pod {ns}/{pod} has no {GATEWAY_NAME_LABEL} label"))?;
        let gw_key = (ns.to_string(), gw.clone());
        let g = self
            .gateways
            .get(&gw_key)
            .ok_or_else(|| format!("no Gateway {ns}/{gw}"))?;
        if g.spec.gateway_class_name != class {
            return Err(format!(
                "Gateway {ns}/{gw} is of class {:?}, not {class}",
                g.spec.gateway_class_name
            ));
        }
        Ok(gw_key)
    }

    /// The waypoint Gateway (namespace, name) serving a service, by its
    /// key "namespace/hostname", as of the last recompute: the one its
    /// ServiceRoutes resource is for. None when it has no waypoint.
    pub fn service_waypoint(&self, service: &str) -> Option<&NsName> {
        self.route_waypoints.get(service)
    }

    /// Applies a batch of changes and reports what changed in the outputs.
    pub fn apply(&mut self, changes: Vec<Change>) -> Delta {
        let mut dirty = Dirty::default();
        for c in changes {
            self.apply_one(c, &mut dirty);
        }
        self.recompute(dirty)
    }

    fn mark_ns(&self, ns: &str, d: &mut Dirty) {
        d.pods.extend(in_ns(&self.pods, ns));
        d.services.extend(in_ns(&self.services, ns));
    }

    fn apply_one(&mut self, c: Change, d: &mut Dirty) {
        let (key, obj) = match c {
            Change::Upsert(o) => (o.key(), Some(o)),
            Change::Delete(k) => (k, None),
        };
        let nn = ns_name(&key);
        match key.kind {
            Kind::Namespace => {
                match obj {
                    Some(Object::Namespace(n)) => self.namespaces.insert(key.name.clone(), *n),
                    _ => self.namespaces.remove(&key.name),
                };
                self.mark_ns(&key.name, d);
                d.policies.extend(in_ns(&self.authz_policies, &key.name));
                d.peer_auths = true;
                d.waypoints = true;
                // Namespace labels decide which routes an ingress admits.
                d.ingresses = true;
            }
            Kind::Pod => {
                let is_gateway = |p: &Pod| {
                    p.metadata
                        .labels
                        .as_ref()
                        .is_some_and(|l| l.contains_key(GATEWAY_NAME_LABEL))
                };
                d.gateway_proxies |= self.pods.get(&nn).is_some_and(is_gateway)
                    || matches!(&obj, Some(Object::Pod(p)) if is_gateway(p));
                if let Some(old) = self.pods.get(&nn)
                    && let Some(node) = old.spec.as_ref().and_then(|s| s.node_name.clone())
                    && let Some(set) = self.pods_by_node.get_mut(&node)
                {
                    set.remove(&nn);
                }
                match obj {
                    Some(Object::Pod(p)) => {
                        if let Some(node) = p.spec.as_ref().and_then(|s| s.node_name.clone()) {
                            self.pods_by_node
                                .entry(node)
                                .or_default()
                                .insert(nn.clone());
                        }
                        self.pods.insert(nn.clone(), *p);
                    }
                    _ => {
                        self.pods.remove(&nn);
                    }
                }
                d.pods.insert(nn);
            }
            Kind::Service => {
                match obj {
                    Some(Object::Service(s)) => self.services.insert(nn.clone(), *s),
                    _ => self.services.remove(&nn),
                };
                d.services.insert(nn.clone());
                d.pods.extend(in_ns(&self.pods, &nn.0));
                extauthz::mark_provider_service(self, &nn, d);
                // A waypoint's Service (named as its Gateway) carries the
                // address every service using that waypoint publishes.
                if self.gateways.contains_key(&nn) {
                    d.services.extend(in_ns(&self.services, &nn.0));
                    d.waypoints = true;
                }
                d.ingresses = true;
            }
            Kind::EndpointSlice => {
                match obj {
                    Some(Object::EndpointSlice(s)) => self.slices.insert(nn.clone(), *s),
                    _ => self.slices.remove(&nn),
                };
                d.pods.extend(in_ns(&self.pods, &nn.0));
            }
            Kind::Gateway => {
                match obj {
                    Some(Object::Gateway(g)) => self.gateways.insert(nn.clone(), *g),
                    _ => self.gateways.remove(&nn),
                };
                self.mark_ns(&nn.0, d);
                d.gateway_proxies = true;
                d.ingresses = true;
                d.waypoints = true;
            }
            Kind::AuthorizationPolicy => {
                let old = match obj {
                    Some(Object::AuthorizationPolicy(p)) => {
                        self.authz_policies.insert(nn.clone(), *p)
                    }
                    _ => self.authz_policies.remove(&nn),
                };
                d.policies.insert(nn.clone());
                d.waypoints = true;
                // A policy with targets (before or after) is in the waypoint
                // routes of its namespace's services (every service's, from
                // the root namespace).
                if old
                    .iter()
                    .chain(self.authz_policies.get(&nn))
                    .any(|p| p.spec.has_targets())
                {
                    if nn.0 == self.cfg.root_namespace {
                        d.routes.extend(self.services.keys().cloned());
                    } else {
                        d.routes.extend(in_ns(&self.services, &nn.0));
                    }
                }
                // Selector policies are listed on the workloads they select;
                // in the root namespace they select across the mesh.
                if nn.0 == self.cfg.root_namespace {
                    d.pods.extend(self.pods.keys().cloned());
                } else {
                    d.pods.extend(in_ns(&self.pods, &nn.0));
                }
            }
            Kind::PeerAuthentication => {
                match obj {
                    Some(Object::PeerAuthentication(p)) => self.peer_auths.insert(nn.clone(), *p),
                    _ => self.peer_auths.remove(&nn),
                };
                d.peer_auths = true;
                d.pods.extend(in_ns(&self.pods, &nn.0));
            }
            Kind::HttpRoute => {
                let old = match obj {
                    Some(Object::HttpRoute(r)) => {
                        d.routes.extend(routes::service_parents(&r));
                        self.http_routes.insert(nn.clone(), *r)
                    }
                    _ => self.http_routes.remove(&nn),
                };
                d.routes
                    .extend(old.iter().flat_map(routes::service_parents));
                d.http_routes.insert(nn.clone());
                d.ingresses = true;
            }
            Kind::DestinationRule => {
                match obj {
                    Some(Object::DestinationRule(r)) => self.dest_rules.insert(nn.clone(), *r),
                    _ => self.dest_rules.remove(&nn),
                };
                // A rule in the root namespace can apply to any service.
                if nn.0 == self.cfg.root_namespace {
                    d.routes.extend(self.services.keys().cloned());
                } else {
                    d.routes.extend(in_ns(&self.services, &nn.0));
                }
                d.dest_rules.insert(nn.clone());
                d.ingresses = true;
            }
            Kind::TrafficPolicy => {
                match obj {
                    Some(Object::TrafficPolicy(t)) => self.traffic_policies.insert(nn.clone(), *t),
                    _ => self.traffic_policies.remove(&nn),
                };
                // The routes whose rules reference it, and their issues.
                for (rk, r) in self
                    .http_routes
                    .range((nn.0.clone(), String::new())..)
                    .take_while(|((n, _), _)| *n == nn.0)
                {
                    if routes::extension_refs(r).any(|name| name == nn.1) {
                        d.routes.extend(routes::service_parents(r));
                        d.http_routes.insert(rk.clone());
                    }
                }
                // The namespace default applies to all its services.
                if nn.1 == routes::DEFAULT_TRAFFIC_POLICY {
                    d.routes.extend(in_ns(&self.services, &nn.0));
                }
                d.traffic_policies.insert(nn.clone());
                d.ingresses = true;
            }
            Kind::Secret => {
                // Only the verdict and what a listener serves are kept.
                match obj {
                    Some(Object::Secret(s)) => {
                        self.secrets.insert(nn.clone(), ingress::tls_secret(&s))
                    }
                    _ => self.secrets.remove(&nn),
                };
                d.ingresses = true;
            }
            Kind::ServiceAccount | Kind::Node | Kind::GatewayClass => {
                match obj {
                    Some(o) => self.others.insert(key, o),
                    None => self.others.remove(&key),
                };
            }
        }
    }

    fn set_output(
        &mut self,
        type_url: &'static str,
        source: Source,
        out: Option<(String, Vec<u8>)>,
        delta: &mut Delta,
    ) {
        let old_name = self.produced.remove(&source);
        if let Some(old) = &old_name
            && out.as_ref().is_none_or(|(n, _)| n != old)
            && self
                .outputs
                .entry(type_url)
                .or_default()
                .remove(old)
                .is_some()
        {
            delta
                .removed
                .entry(type_url)
                .or_default()
                .insert(old.clone());
        }
        let Some((name, bytes)) = out else {
            return;
        };
        let version = version_of(&bytes);
        self.produced.insert(source, name.clone());
        let outputs = self.outputs.entry(type_url).or_default();
        if outputs.get(&name).is_some_and(|r| r.version == version) {
            return;
        }
        outputs.insert(
            name.clone(),
            Arc::new(XdsResource {
                name: name.clone(),
                version,
                any: prost_types::Any {
                    type_url: type_url.to_string(),
                    value: bytes,
                },
            }),
        );
        if let Some(r) = delta.removed.get_mut(type_url) {
            r.remove(&name);
        }
        delta.changed.entry(type_url).or_default().insert(name);
    }

    fn note(&mut self, object: String, reasons: Vec<String>) {
        if reasons.is_empty() {
            self.issues.remove(&object);
        } else {
            for r in &reasons {
                tracing::warn!(%object, reason = %r, "config");
            }
            let issues = reasons
                .into_iter()
                .map(|reason| ModelIssue {
                    object: object.clone(),
                    reason,
                })
                .collect();
            self.issues.insert(object, issues);
        }
    }

    fn recompute(&mut self, d: Dirty) -> Delta {
        let mut delta = Delta {
            gateway_proxies: d.gateway_proxies,
            ..Delta::default()
        };
        for key in d.pods {
            let out = workload::workload(self, &key).map(|w| {
                let name = w.uid.clone();
                let addr = Address {
                    r#type: Some(mesh_proto::istio::workload::address::Type::Workload(w)),
                };
                (name, addr.encode_to_vec())
            });
            self.set_output(ADDRESS_TYPE_URL, Source::Pod(key), out, &mut delta);
        }
        for key in d.services.iter().cloned() {
            let out = workload::service(self, &key).map(|s| {
                let name = format!("{}/{}", s.namespace, s.hostname);
                let addr = Address {
                    r#type: Some(mesh_proto::istio::workload::address::Type::Service(s)),
                };
                (name, addr.encode_to_vec())
            });
            self.set_output(ADDRESS_TYPE_URL, Source::Service(key), out, &mut delta);
        }
        for key in &d.http_routes {
            let label = format!("HTTPRoute/{}/{}", key.0, key.1);
            let reasons = match self.http_routes.get(key) {
                Some(r) => routes::convert(r, &self.cfg.domain_suffix, &self.traffic_policies).1,
                None => Vec::new(),
            };
            self.note(label, reasons);
        }
        for key in &d.dest_rules {
            let label = format!("DestinationRule/{}/{}", key.0, key.1);
            let reasons = match self.dest_rules.get(key) {
                Some(r) => {
                    match routes::destination_host(&r.spec.host, &key.0, &self.cfg.domain_suffix) {
                        Ok(_) => routes::backend_policy(r).1,
                        Err(e) => vec![e],
                    }
                }
                None => Vec::new(),
            };
            self.note(label, reasons);
        }
        for key in &d.traffic_policies {
            let label = format!("TrafficPolicy/{}/{}", key.0, key.1);
            let reasons = match self.traffic_policies.get(key) {
                Some(t) => routes::route_extension(t).err().unwrap_or_default(),
                None => Vec::new(),
            };
            self.note(label, reasons);
        }
        let route_keys: BTreeSet<NsName> = d.services.iter().chain(&d.routes).cloned().collect();
        for key in route_keys {
            let name = format!("{}/{}", key.0, workload::hostname(self, &key.0, &key.1));
            let (out, gw) = match self.service_routes(&key) {
                Some((r, gw)) => (Some((name.clone(), r.encode_to_vec())), Some(gw)),
                None => (None, None),
            };
            self.set_output(
                SERVICE_ROUTES_TYPE_URL,
                Source::Routes(key),
                out,
                &mut delta,
            );
            // A service that moves to another waypoint changes for both
            // waypoints even when its routes do not.
            let old = match &gw {
                Some(gw) => self.route_waypoints.insert(name.clone(), gw.clone()),
                None => self.route_waypoints.remove(&name),
            };
            if old.is_some() && gw.is_some() && old != gw {
                delta
                    .changed
                    .entry(SERVICE_ROUTES_TYPE_URL)
                    .or_default()
                    .insert(name);
            }
        }
        if d.ingresses {
            self.recompute_ingresses(&mut delta);
        }
        if d.waypoints {
            self.recompute_waypoint_gateways(&mut delta);
        }
        for key in d.policies {
            let label = format!("AuthorizationPolicy/{}/{}", key.0, key.1);
            let (out, reasons) = match self.authz_policies.get(&key) {
                Some(p) => authz::convert(self, p),
                None => (None, Vec::new()),
            };
            self.note(label, reasons);
            let out = out.map(encode_authz);
            self.set_output(AUTHORIZATION_TYPE_URL, Source::Policy(key), out, &mut delta);
        }
        if d.peer_auths {
            let keys: Vec<NsName> = self
                .produced
                .keys()
                .filter_map(|s| match s {
                    Source::PeerAuth(k) => Some(k.clone()),
                    _ => None,
                })
                .chain(self.peer_auths.keys().cloned())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            for key in keys {
                let label = format!("PeerAuthentication/{}/{}", key.0, key.1);
                let (out, reasons) = match self.peer_auths.get(&key) {
                    Some(p) => authz::peer_authentication(self, p),
                    None => (None, Vec::new()),
                };
                self.note(label, reasons);
                let out = out.map(encode_authz);
                self.set_output(
                    AUTHORIZATION_TYPE_URL,
                    Source::PeerAuth(key),
                    out,
                    &mut delta,
                );
            }
        }
        delta
    }

    /// Every waypoint Gateway's own resource: the policies attached to the
    /// Gateway (and, from the root namespace, to every waypoint), which
    /// the waypoint applies to what it serves by pod address. Gated like a
    /// service's routes: only that Gateway's pods receive it.
    fn recompute_waypoint_gateways(&mut self, delta: &mut Delta) {
        let keys: BTreeSet<NsName> = self
            .produced
            .keys()
            .filter_map(|s| match s {
                Source::Waypoint(k) => Some(k.clone()),
                _ => None,
            })
            .chain(
                self.gateways
                    .iter()
                    .filter(|(_, g)| g.spec.gateway_class_name == WAYPOINT_CLASS)
                    .map(|(k, _)| k.clone()),
            )
            .collect();
        for key in keys {
            let name = format!("{}{}/{}", mesh_proto::WAYPOINT_GATEWAY_PREFIX, key.0, key.1);
            let is_waypoint = self
                .gateways
                .get(&key)
                .is_some_and(|g| g.spec.gateway_class_name == WAYPOINT_CLASS);
            let out = is_waypoint.then(|| {
                let r = mesh_proto::mesh::waypoint::ServiceRoutes {
                    hostname: workload::hostname(self, &key.0, &key.1),
                    namespace: key.0.clone(),
                    policies: waypoint::gateway_policies(self, &key),
                    ..Default::default()
                };
                (name.clone(), r.encode_to_vec())
            });
            if out.is_some() {
                self.route_waypoints.insert(name, key.clone());
            } else {
                self.route_waypoints.remove(&name);
            }
            self.set_output(SERVICE_ROUTES_TYPE_URL, Source::Waypoint(key), out, delta);
        }
    }

    /// Every ingress Gateway's resource, listener status and issues; and
    /// the removal of those of Gateways no longer ingresses.
    fn recompute_ingresses(&mut self, delta: &mut Delta) {
        let keys: BTreeSet<NsName> = self
            .produced
            .keys()
            .filter_map(|s| match s {
                Source::Ingress(k) => Some(k.clone()),
                _ => None,
            })
            .chain(self.ingress_listeners.keys().cloned())
            .chain(
                self.gateways
                    .iter()
                    .filter(|(_, g)| g.spec.gateway_class_name == INGRESS_CLASS)
                    .map(|(k, _)| k.clone()),
            )
            .collect();
        for key in keys {
            let label = format!("Gateway/{}/{}", key.0, key.1);
            let built = self
                .gateways
                .get(&key)
                .filter(|g| g.spec.gateway_class_name == INGRESS_CLASS)
                .map(|g| ingress::build(self, &key, g));
            let out = match built {
                Some(b) => {
                    self.note(label, b.issues);
                    self.ingress_listeners.insert(key.clone(), b.listeners);
                    Some((format!("{}/{}", key.0, key.1), b.ingress.encode_to_vec()))
                }
                None => {
                    self.note(label, Vec::new());
                    self.ingress_listeners.remove(&key);
                    None
                }
            };
            self.set_output(INGRESS_TYPE_URL, Source::Ingress(key), out, delta);
        }
    }

    /// The waypoint routes of a service, when it has a waypoint, and that
    /// waypoint's Gateway. Routes from older HTTPRoutes come first among
    /// equally specific matches.
    fn service_routes(
        &self,
        key: &NsName,
    ) -> Option<(mesh_proto::mesh::waypoint::ServiceRoutes, NsName)> {
        let gw = workload::service_waypoint(self, key)?;
        let svc = workload::service(self, key)?;
        let mut attached: Vec<&HttpRoute> = self
            .http_routes
            .values()
            // Only producer routes (in the service's namespace): a consumer
            // route applies to its own namespace's clients, which a
            // waypoint on the server side cannot tell apart; reported below.
            .filter(|r| r.metadata.namespace.as_deref() == Some(key.0.as_str()))
            .filter(|r| routes::service_parents(r).contains(key))
            .collect();
        attached.sort_by(|a, b| {
            (
                &a.metadata.creation_timestamp.as_ref().map(|t| t.0),
                &a.metadata.name,
            )
                .cmp(&(
                    &b.metadata.creation_timestamp.as_ref().map(|t| t.0),
                    &b.metadata.name,
                ))
        });
        let mut out: Vec<_> = attached
            .into_iter()
            .flat_map(|r| routes::convert(r, &self.cfg.domain_suffix, &self.traffic_policies).0)
            .collect();
        routes::sort(&mut out);
        let backend_policy = self
            .destination_rule(&key.0, &svc.hostname)
            .map(|r| routes::backend_policy(r).0);
        let ports = self
            .services
            .get(key)
            .map(waypoint::ports)
            .unwrap_or_default();
        let policies = waypoint::policies(self, key, &gw);
        Some((
            mesh_proto::mesh::waypoint::ServiceRoutes {
                hostname: svc.hostname,
                namespace: svc.namespace,
                routes: out,
                backend_policy,
                ports,
                policies,
                default_rate_limit: routes::default_rate_limit(&key.0, &self.traffic_policies),
            },
            gw,
        ))
    }

    /// The DestinationRule for a service: the oldest in its namespace naming
    /// it, else the oldest in the root namespace (Istio's lookup order, less
    /// the client's namespace, which a server-side waypoint does not have).
    fn destination_rule(&self, ns: &str, hostname: &str) -> Option<&DestinationRule> {
        let suffix = &self.cfg.domain_suffix;
        let pick = |rule_ns: &str| {
            self.dest_rules
                .range((rule_ns.to_string(), String::new())..)
                .take_while(|((n, _), _)| n == rule_ns)
                .map(|(_, r)| r)
                .filter(|r| {
                    routes::destination_host(&r.spec.host, rule_ns, suffix).as_deref()
                        == Ok(hostname)
                })
                .min_by_key(|r| {
                    (
                        r.metadata.creation_timestamp.as_ref().map(|t| t.0),
                        r.metadata.name.clone(),
                    )
                })
        };
        pick(ns).or_else(|| pick(&self.cfg.root_namespace))
    }

    /// Every resource as JSON, for the debug endpoint (decoded on demand:
    /// the model keeps only the encoded form).
    pub fn dump(&self) -> serde_json::Value {
        use mesh_proto::istio::workload::address::Type;
        let mut workloads = Vec::new();
        let mut services = Vec::new();
        for r in self
            .outputs
            .get(ADDRESS_TYPE_URL)
            .into_iter()
            .flat_map(|m| m.values())
        {
            match Address::decode(r.any.value.as_slice())
                .ok()
                .and_then(|a| a.r#type)
            {
                Some(Type::Workload(w)) => workloads.push(workload::workload_json(&w)),
                Some(Type::Service(s)) => services.push(workload::service_json(&s)),
                None => {}
            }
        }
        let authorizations: Vec<serde_json::Value> = self
            .outputs
            .get(AUTHORIZATION_TYPE_URL)
            .into_iter()
            .flat_map(|m| m.values())
            .filter_map(|r| Authorization::decode(r.any.value.as_slice()).ok())
            .map(|a| authz::authz_json(&a))
            .collect();
        // Route names only: enough to see which rules a waypoint was given.
        let waypoint_routes: Vec<serde_json::Value> = self
            .outputs
            .get(SERVICE_ROUTES_TYPE_URL)
            .into_iter()
            .flat_map(|m| m.values())
            .filter_map(|r| {
                mesh_proto::mesh::waypoint::ServiceRoutes::decode(r.any.value.as_slice()).ok()
            })
            .map(|s| {
                let service = format!("{}/{}", s.namespace, s.hostname);
                let waypoint = self
                    .service_waypoint(&service)
                    .map(|(ns, name)| format!("{ns}/{name}"));
                serde_json::json!({
                    "service": service,
                    "waypoint": waypoint,
                    "routes": s.routes.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
                    "ports": s.ports.iter().map(|p| format!(
                        "{}/{:?}",
                        p.port,
                        mesh_proto::mesh::waypoint::Protocol::try_from(p.protocol)
                            .unwrap_or_default()
                    )).collect::<Vec<_>>(),
                    "policies": s.policies.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
                })
            })
            .collect();
        // Listener shapes and route names; never the certificates' keys.
        let ingresses: Vec<serde_json::Value> = self
            .outputs
            .get(INGRESS_TYPE_URL)
            .into_iter()
            .flat_map(|m| m.values())
            .filter_map(|r| {
                mesh_proto::mesh::waypoint::Ingress::decode(r.any.value.as_slice()).ok()
            })
            .map(|i| ingress::ingress_json(&i))
            .collect();
        serde_json::json!({
            "workloads": workloads,
            "services": services,
            "authorizations": authorizations,
            "waypointRoutes": waypoint_routes,
            "ingresses": ingresses,
            "issues": self.issues(),
        })
    }
}

fn encode_authz(a: Authorization) -> (String, Vec<u8>) {
    let name = format!("{}/{}", a.namespace, a.name);
    (name, a.encode_to_vec())
}
