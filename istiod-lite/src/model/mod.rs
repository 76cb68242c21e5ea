//! The controller's model: Kubernetes objects in, xDS resources out.
//!
//! Inputs are kept by key. A change marks only the outputs it can affect (a
//! pod marks its own workload; a service marks the pods of its namespace; a
//! namespace label marks that namespace), those are recomputed, and the
//! resulting [`Delta`] names the resources whose content changed. A
//! resource's version is a hash of its bytes, so an unchanged resource keeps
//! its version across restarts and a reconnecting proxy is not sent it again.

mod apply;
mod authz;
pub mod cluster;
mod extauthz;
mod gateways;
pub mod ingress;
pub(crate) mod pod;
mod recompute;
mod resource;
pub mod route_status;
pub mod routes;
mod tls_secret;
mod waypoint;
mod workload;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use mesh_core::identity::Identity;
use mesh_proto::istio::security::Authorization;
use mesh_proto::istio::workload::Address;
use mesh_proto::{
    ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, INGRESS_TYPE_URL, SERVICE_ROUTES_TYPE_URL,
};
use prost::Message;
use serde::Serialize;

use crate::config::crds::{AuthorizationPolicy, DestinationRule, PeerAuthentication};
use crate::config::objects::{Change, Kind, Object, ObjectKey};
use gateway_api::apis::experimental::httproutes::HttpRoute;
use gateway_api::apis::standard::gateways::Gateway;
use routes::{ReferenceGrants, TrafficPolicies};

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

/// The label a Deployment's ReplicaSet gives its pods (and its own name's
/// suffix).
pub const POD_TEMPLATE_HASH: &str = "pod-template-hash";
/// Node.id prefix of a waypoint proxy: `waypoint~<namespace>~<pod>`.
pub const WAYPOINT_PROXY_PREFIX: &str = "waypoint";
/// Class of an ingress Gateway (see [`ingress`]).
pub const INGRESS_CLASS: &str = "mesh-ingress";
/// The `controllerName` of the GatewayClasses istiod-lite implements: a
/// class of one of our names but another controller is not ours.
pub const CONTROLLER_NAME: &str = "mesh.dev/istiod-lite";
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
    /// A Gateway's pod must be one its Deployment made (cluster mode: the
    /// controller deploys every Gateway): controlled by a ReplicaSet named
    /// `<gateway>-<its pod-template-hash>`. A folder's pods are written by
    /// hand (the lab's carry no owners), so there only the service account
    /// is checked.
    pub gateway_pods_owned: bool,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            trust_domain: "cluster.local".into(),
            domain_suffix: "cluster.local".into(),
            root_namespace: "istio-system".into(),
            cluster_id: "Kubernetes".into(),
            mesh: Default::default(),
            gateway_pods_owned: false,
        }
    }
}

pub use resource::{VERSION_LEN, XdsResource, version_text};

/// Removals kept per type for connections that are behind, at least (or
/// as many as the type has resources, if more): a connection further
/// behind than that is reset ([`Model::forgotten`]).
pub const REMOVED_KEPT: usize = 10_000;

/// What an [`Model::apply`] changed, per type URL.
#[derive(Debug, Default, Clone)]
pub struct Delta {
    /// The model generation after the change ([`Model::generation`]).
    pub generation: u64,
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
        self.generation = self.generation.max(other.generation);
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

/// Why a proxy serves no Gateway of the kind it asks for (its stream is
/// sent nothing of that kind; logged).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("proxy id {proxy_id:?} is not {prefix}~<namespace>~<pod>")]
    BadId {
        proxy_id: String,
        prefix: &'static str,
    },
    #[error("no running pod {0}/{1}")]
    NotRunning(String, String),
    #[error("pod {pod} runs on node {on:?}, not on the caller's node {node:?}")]
    OtherNode {
        pod: String,
        on: String,
        node: String,
    },
    #[error("pod {0}/{1} has no {GATEWAY_NAME_LABEL} label")]
    NoGatewayLabel(String, String),
    #[error("no Gateway {0}/{1}")]
    NoGateway(String, String),
    #[error(
        "pod {pod} runs as service account {account:?}, not as its Gateway's {gateway:?} \
         (the one the controller assigns)"
    )]
    NotGatewayAccount {
        pod: String,
        account: String,
        gateway: String,
    },
    #[error(
        "pod {pod} is not one its Gateway's Deployment made (controlled by ReplicaSet \
         {gateway}-<pod-template-hash>); its controller is {controller:?}"
    )]
    NotGatewayOwned {
        pod: String,
        gateway: String,
        controller: Option<(String, String)>,
    },
    #[error("Gateway {gateway} is of class {class:?}, not {want}")]
    OtherClass {
        gateway: String,
        class: String,
        want: String,
    },
}

#[derive(Default)]
pub struct Model {
    cfg: ModelConfig,
    namespaces: BTreeMap<String, Namespace>,
    /// What the model reads of each pod ([`pod::PodView`]), not the Pod.
    pods: BTreeMap<NsName, pod::PodView>,
    services: BTreeMap<NsName, Service>,
    slices: BTreeMap<NsName, EndpointSlice>,
    gateways: BTreeMap<NsName, Gateway>,
    authz_policies: BTreeMap<NsName, AuthorizationPolicy>,
    peer_auths: BTreeMap<NsName, PeerAuthentication>,
    http_routes: BTreeMap<NsName, HttpRoute>,
    dest_rules: BTreeMap<NsName, DestinationRule>,
    traffic_policies: TrafficPolicies,
    /// What lets a route refer to a Service in another namespace.
    reference_grants: ReferenceGrants,
    /// Secrets as listener certificates: checked once, when they change.
    secrets: BTreeMap<NsName, tls_secret::TlsSecret>,
    /// Each ingress Gateway's listener status, as of the last recompute.
    ingress_listeners: BTreeMap<NsName, Vec<ingress::ListenerStatus>>,
    others: BTreeMap<ObjectKey, Object>,
    /// Node -> pods scheduled there, for the CA's node check.
    pods_by_node: HashMap<String, BTreeSet<NsName>>,
    /// Outputs, by type URL then resource name.
    outputs: BTreeMap<&'static str, Outputs>,
    /// Which output names each input produced, so a removal removes them.
    produced: HashMap<Source, Arc<str>>,
    /// Bumped by every [`Model::apply`]; each output carries the one that
    /// made it.
    generation: u64,
    /// Outputs removed, by type URL then name: the generation that removed
    /// each. A connection that missed pushes finds here what to remove
    /// (see [`Model::removed_since`]); pruned once every connection is past
    /// them ([`Model::prune_removed`]).
    removed: BTreeMap<&'static str, HashMap<Arc<str>, u64>>,
    /// By type URL: the latest generation whose removals were dropped
    /// before every connection had been sent them (more than
    /// [`REMOVED_KEPT`] were waiting).
    forgotten: BTreeMap<&'static str, u64>,
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

/// One type's outputs, by name.
pub type Outputs = BTreeMap<Arc<str>, Arc<XdsResource>>;

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
    pub fn resources(&self, type_url: &str) -> Option<&Outputs> {
        self.outputs.get(type_url)
    }

    /// The generation of the last [`Model::apply`].
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Names of `type_url` removed after generation `since` and not made
    /// again since.
    pub fn removed_since(&self, type_url: &str, since: u64) -> impl Iterator<Item = &Arc<str>> {
        self.removed
            .get(type_url)
            .into_iter()
            .flatten()
            .filter(move |(_, g)| **g > since)
            .map(|(n, _)| n)
    }

    /// Forgets removals of a type at or before generation `upto(type)` (every connection
    /// has been sent them), and the oldest ones beyond [`REMOVED_KEPT`] per
    /// type (or the type's resource count, if more) even if a connection
    /// still needs them: a connection that stopped reading must not make
    /// the controller keep every name ever removed. Such a connection is
    /// then reset ([`Model::forgotten`]).
    pub fn prune_removed(&mut self, upto: impl Fn(&str) -> u64) {
        for (t, m) in self.removed.iter_mut() {
            let upto = upto(t);
            m.retain(|_, g| *g > upto);
            let live = self.outputs.get(t).map_or(0, |o| o.len());
            let limit = REMOVED_KEPT.max(live);
            if m.len() <= limit {
                continue;
            }
            // Whole generations, oldest first, down to three quarters of
            // the limit (not one by one at every apply).
            let mut gens: Vec<u64> = m.values().copied().collect();
            gens.sort_unstable();
            let horizon = gens[m.len() - limit * 3 / 4 - 1];
            m.retain(|_, g| *g > horizon);
            let f = self.forgotten.entry(t).or_default();
            *f = (*f).max(horizon);
        }
    }

    /// The latest generation whose removals of `type_url` were forgotten
    /// before every connection had them (0: none): a connection synced to
    /// an older generation cannot be told what to remove.
    pub fn forgotten(&self, type_url: &str) -> u64 {
        self.forgotten.get(type_url).copied().unwrap_or(0)
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
                        p.running && p.service_account() == identity.service_account()
                    })
            })
        })
    }

    /// The waypoint Gateway (namespace, name) a proxy serves, when it is a
    /// waypoint: its id is `waypoint~<namespace>~<pod>`, that pod runs on
    /// `node` (the node its caller proved) and carries
    /// `gateway.networking.k8s.io/gateway-name: <gateway>`, that Gateway
    /// is of class `istio-waypoint`, and the pod is one the controller made
    /// for it (its service account, and in cluster mode its ReplicaSet: see
    /// [`ModelConfig::gateway_pods_owned`]). Otherwise, why not.
    pub fn waypoint_of_proxy(&self, node: &str, proxy_id: &str) -> Result<NsName, ProxyError> {
        self.gateway_of_proxy(node, proxy_id, WAYPOINT_PROXY_PREFIX, WAYPOINT_CLASS)
    }

    /// The ingress Gateway a proxy serves, as [`Model::waypoint_of_proxy`]
    /// with id `ingress~<namespace>~<pod>` and class `mesh-ingress`.
    pub fn ingress_of_proxy(&self, node: &str, proxy_id: &str) -> Result<NsName, ProxyError> {
        self.gateway_of_proxy(node, proxy_id, INGRESS_PROXY_PREFIX, INGRESS_CLASS)
    }

    fn gateway_of_proxy(
        &self,
        node: &str,
        proxy_id: &str,
        prefix: &'static str,
        class: &str,
    ) -> Result<NsName, ProxyError> {
        let bad_id = || ProxyError::BadId {
            proxy_id: proxy_id.to_string(),
            prefix,
        };
        let mut parts = proxy_id.split('~');
        let (Some(p), Some(ns), Some(pod), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad_id());
        };
        if p != prefix {
            return Err(bad_id());
        }
        let key = (ns.to_string(), pod.to_string());
        let p = self
            .pods
            .get(&key)
            .filter(|p| p.running)
            .ok_or_else(|| ProxyError::NotRunning(ns.to_string(), pod.to_string()))?;
        let on = p.node.as_deref().unwrap_or_default();
        if on != node {
            return Err(ProxyError::OtherNode {
                pod: format!("{ns}/{pod}"),
                on: on.to_string(),
                node: node.to_string(),
            });
        }
        let gw = p
            .label(GATEWAY_NAME_LABEL)
            .ok_or_else(|| ProxyError::NoGatewayLabel(ns.to_string(), pod.to_string()))?;
        let gw_key = (ns.to_string(), gw.to_string());
        let g = self
            .gateways
            .get(&gw_key)
            .ok_or_else(|| ProxyError::NoGateway(ns.to_string(), gw.to_string()))?;
        if g.spec.gateway_class_name != class {
            return Err(ProxyError::OtherClass {
                gateway: format!("{ns}/{gw}"),
                class: g.spec.gateway_class_name.clone(),
                want: class.to_string(),
            });
        }
        self.made_for_gateway(p, ns, pod, gw)?;
        Ok(gw_key)
    }

    /// Whether a pod labelled as Gateway `gw`'s is one the controller made
    /// for it: it runs as the service account the controller assigns (the
    /// Gateway's name) and, in cluster mode, is controlled by a ReplicaSet
    /// of the Gateway's Deployment (`<gw>-<pod-template-hash>`).
    fn made_for_gateway(
        &self,
        p: &pod::PodView,
        ns: &str,
        pod: &str,
        gw: &str,
    ) -> Result<(), ProxyError> {
        if p.service_account() != gw {
            return Err(ProxyError::NotGatewayAccount {
                pod: format!("{ns}/{pod}"),
                account: p.service_account().to_string(),
                gateway: gw.to_string(),
            });
        }
        if !self.cfg.gateway_pods_owned {
            return Ok(());
        }
        let made = match (p.controller(), p.label(POD_TEMPLATE_HASH)) {
            (Some(("ReplicaSet", rs)), Some(hash)) => rs
                .strip_prefix(gw)
                .and_then(|r| r.strip_prefix('-'))
                .is_some_and(|h| h == hash),
            _ => false,
        };
        if !made {
            return Err(ProxyError::NotGatewayOwned {
                pod: format!("{ns}/{pod}"),
                gateway: gw.to_string(),
                controller: p.controller().map(|(k, n)| (k.to_string(), n.to_string())),
            });
        }
        Ok(())
    }

    /// The waypoint Gateway (namespace, name) serving a service, by its
    /// key "namespace/hostname", as of the last recompute: the one its
    /// ServiceRoutes resource is for. None when it has no waypoint.
    pub fn service_waypoint(&self, service: &str) -> Option<&NsName> {
        self.route_waypoints.get(service)
    }

    /// How many objects of each kind the model holds.
    pub fn object_counts(&self) -> Vec<(&'static str, usize)> {
        let mut v = vec![
            ("Namespace", self.namespaces.len()),
            ("Pod", self.pods.len()),
            ("Service", self.services.len()),
            ("EndpointSlice", self.slices.len()),
            ("Gateway", self.gateways.len()),
            ("AuthorizationPolicy", self.authz_policies.len()),
            ("PeerAuthentication", self.peer_auths.len()),
            ("HTTPRoute", self.http_routes.len()),
            ("DestinationRule", self.dest_rules.len()),
            ("ReferenceGrant", self.reference_grants.len()),
            ("Secret", self.secrets.len()),
        ];
        let other = |kind: Kind| self.others.keys().filter(|k| k.kind == kind).count();
        v.push(("ServiceAccount", other(Kind::ServiceAccount)));
        v.push(("Node", other(Kind::Node)));
        v.push(("GatewayClass", other(Kind::GatewayClass)));
        v
    }

    /// Applies a batch of changes and reports what changed in the outputs.
    pub fn apply(&mut self, changes: Vec<Change>) -> Delta {
        let mut dirty = Dirty::default();
        for c in changes {
            self.apply_one(c, &mut dirty);
        }
        self.generation += 1;
        self.recompute(dirty)
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
            match Address::decode(r.value()).ok().and_then(|a| a.r#type) {
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
            .filter_map(|r| Authorization::decode(r.value()).ok())
            .map(|a| authz::authz_json(&a))
            .collect();
        // Route names only: enough to see which rules a waypoint was given.
        let waypoint_routes: Vec<serde_json::Value> = self
            .outputs
            .get(SERVICE_ROUTES_TYPE_URL)
            .into_iter()
            .flat_map(|m| m.values())
            .filter_map(|r| mesh_proto::mesh::waypoint::ServiceRoutes::decode(r.value()).ok())
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
            .filter_map(|r| mesh_proto::mesh::waypoint::Ingress::decode(r.value()).ok())
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
