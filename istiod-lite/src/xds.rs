//! Delta ADS: `envoy.service.discovery.v3.AggregatedDiscoveryService/
//! DeltaAggregatedResources` for `istio.workload.Address` and
//! `istio.security.Authorization`.
//!
//! Each connection tracks, per type, what the proxy holds ([`conn`]: the
//! model's state as of a generation for a plain wildcard subscription,
//! else each name and version). A model change is broadcast as the set of
//! changed names; each connection sends only those the proxy does not hold
//! as they are. A resource is encoded once, in the model, and shared by
//! every response that carries it ([`wire`]). A reconnecting proxy states
//! its versions (`initial_resource_versions`) and is sent only the
//! difference.
//!
//! `mesh.waypoint.ServiceRoutes` goes only to waypoints, and to each only
//! the routes of the services it serves: a proxy is a waypoint when its
//! Node.id is `waypoint~<namespace>~<pod>` and the model says that pod runs
//! on the caller's (authenticated) node as a pod of a waypoint Gateway
//! ([`Model::waypoint_of_proxy`]). `mesh.waypoint.Ingress` likewise goes
//! only to an ingress gateway's pod (`ingress~<namespace>~<pod>`,
//! [`Model::ingress_of_proxy`]), and to it only its own Gateway's resource:
//! it carries private keys, so the caller must also be that pod itself
//! (its own token, never a node's: [`crate::access`]). Any other subscriber
//! is refused: logged, and sent nothing of that type.

mod conn;
mod server;
pub mod wire;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use mesh_core::identity::Identity;
use mesh_proto::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use mesh_proto::{
    ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, INGRESS_TYPE_URL, SERVICE_ROUTES_TYPE_URL,
};
use serde::Serialize;
use tokio::sync::{broadcast, mpsc};
use tonic::{Request, Status, Streaming};
use tracing::{debug, info, warn};

use crate::ca::auth::{Authenticator, Caller, NodeAuthorizer, PodDirectory, PodError};
use crate::config::objects::Change;
use crate::config::sources::Sources;
use crate::metrics::metrics;
use crate::model::{Delta, Model};
use conn::{Conn, Served};
pub use server::AdsServer;
use wire::Response;

/// What the controller serves. Waypoint routes go only to waypoints that
/// subscribe to them, ingress resources only to ingress gateways; ztunnels
/// subscribe to neither.
pub const TYPES: [&str; 4] = [
    ADDRESS_TYPE_URL,
    AUTHORIZATION_TYPE_URL,
    SERVICE_ROUTES_TYPE_URL,
    INGRESS_TYPE_URL,
];

/// A type served only to the pods of one kind of Gateway, each only the
/// resources of its own Gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gated {
    /// ServiceRoutes: the services whose waypoint the Gateway is.
    Waypoint,
    /// Ingress: the Gateway's own resource.
    Ingress,
}

impl Gated {
    fn of(type_url: &str) -> Option<Gated> {
        match type_url {
            SERVICE_ROUTES_TYPE_URL => Some(Gated::Waypoint),
            INGRESS_TYPE_URL => Some(Gated::Ingress),
            _ => None,
        }
    }

    fn what(self) -> &'static str {
        match self {
            Gated::Waypoint => "waypoint",
            Gated::Ingress => "ingress gateway",
        }
    }

    /// The Gateway a proxy serves as this kind, or why it does not.
    fn gateway_of(self, model: &Model, caller: &Caller, proxy_id: &str) -> Served {
        match self {
            Gated::Waypoint => Ok(model.waypoint_of_proxy(&caller.node, proxy_id)?),
            Gated::Ingress => {
                let gw = model.ingress_of_proxy(&caller.node, proxy_id)?;
                crate::access::own_ingress_pod(caller, model, proxy_id)?;
                Ok(gw)
            }
        }
    }

    /// Whether the proxy serving Gateway `gw` may hold resource `name`.
    fn may_hold(self, model: &Model, gw: &(String, String), name: &str) -> bool {
        match self {
            Gated::Waypoint => model.service_waypoint(name) == Some(gw),
            Gated::Ingress => name.split_once('/') == Some((gw.0.as_str(), gw.1.as_str())),
        }
    }
}

/// Resources per response when a push is large.
const PUSH_CHUNK: usize = 500;

/// The model plus everyone connected to it.
pub struct Hub {
    /// The model holds the whole config (initial folder scan, or every
    /// Kubernetes kind listed). Until then the model is partial: serving it
    /// would tell reconnecting proxies to delete what has not been listed yet.
    ready: tokio::sync::watch::Sender<bool>,
    model: RwLock<Model>,
    events: broadcast::Sender<Arc<Pushed>>,
    conns: Mutex<BTreeMap<u64, Arc<ConnView>>>,
    next: AtomicU64,
    pushes: AtomicU64,
    /// When the last change that pushed something was handed to the hub
    /// (wall clock, for the debug page: the bench times a change from here
    /// to the last proxy, without the folder source's poll).
    last_push: Mutex<Option<SystemTime>>,
    /// Bumped on every applied batch, whether or not an output changed
    /// (cluster mode's writer also follows Gateways and statuses).
    applied: tokio::sync::watch::Sender<u64>,
    /// How each watched kind stands (cluster mode; empty for a folder).
    sources: Arc<Sources>,
}

/// A change to push, and when it was made (for the convergence time).
pub struct Pushed {
    pub delta: Delta,
    pub since: std::time::Instant,
}

/// What the debug endpoint shows of one proxy connection.
#[derive(Debug, Serialize)]
pub struct ConnView {
    pub id: u64,
    pub node: String,
    pub proxy_id: String,
    pub peer: Option<String>,
    #[serde(serialize_with = "rfc3339")]
    pub connected: SystemTime,
    pub types: Mutex<BTreeMap<String, TypeView>>,
    /// The oldest model generation a wildcard subscription of this
    /// connection is synced to (u64::MAX: none is): removals after it are
    /// kept for it.
    #[serde(skip)]
    pub synced: AtomicU64,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct TypeView {
    /// Resources the proxy holds, by our account.
    pub resources: usize,
    pub responses_sent: u64,
    pub resources_sent: u64,
    pub last_sent_nonce: Option<String>,
    pub last_acked_nonce: Option<String>,
    pub nacks: u64,
    pub last_nack: Option<NackView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NackView {
    pub nonce: String,
    pub error: String,
    #[serde(serialize_with = "rfc3339")]
    pub at: SystemTime,
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(
        &time::OffsetDateTime::from(*t)
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
    )
}

impl Hub {
    pub fn new(model: Model) -> Arc<Hub> {
        let (events, _) = broadcast::channel(256);
        Arc::new(Hub {
            ready: tokio::sync::watch::Sender::new(false),
            model: RwLock::new(model),
            events,
            conns: Mutex::new(BTreeMap::new()),
            next: AtomicU64::new(1),
            pushes: AtomicU64::new(0),
            last_push: Mutex::new(None),
            applied: tokio::sync::watch::Sender::new(0),
            sources: Arc::new(Sources::default()),
        })
    }

    /// Each watched kind's state (see [`Sources`]).
    pub fn sources(&self) -> &Arc<Sources> {
        &self.sources
    }

    pub fn set_ready(&self) {
        if !self.ready.send_replace(true) {
            info!("config complete; serving proxies");
        }
    }

    /// Returns once the model holds the whole config.
    pub async fn wait_ready(&self) {
        let mut rx = self.ready.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }

    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Changes whenever a batch of config changes has been applied.
    pub fn applied(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applied.subscribe()
    }

    pub fn model(&self) -> std::sync::RwLockReadGuard<'_, Model> {
        self.model.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies changes and pushes what they changed to every connection.
    pub fn apply(&self, changes: Vec<Change>) -> Delta {
        if changes.is_empty() {
            return Delta::default();
        }
        let since = std::time::Instant::now();
        let at = SystemTime::now();
        let delta = {
            let mut model = self.model.write().unwrap_or_else(|p| p.into_inner());
            let delta = model.apply(changes);
            // Removals every connection has been sent are forgotten.
            let oldest = self
                .conns
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .map(|c| c.synced.load(Ordering::Relaxed))
                .min()
                .unwrap_or(u64::MAX);
            model.prune_removed(oldest);
            delta
        };
        metrics().model_built(since.elapsed());
        self.applied.send_modify(|n| *n += 1);
        if !delta.is_empty() {
            self.pushes.fetch_add(1, Ordering::Relaxed);
            *self.last_push.lock().unwrap_or_else(|p| p.into_inner()) = Some(at);
            let n: usize = delta
                .changed
                .values()
                .chain(delta.removed.values())
                .map(|s| s.len())
                .sum();
            debug!(resources = n, "pushing");
            let _ = self.events.send(Arc::new(Pushed {
                delta: delta.clone(),
                since,
            }));
        }
        delta
    }

    /// A connection ended.
    fn forget(&self, id: u64) {
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    /// Proxies connected now.
    pub fn connected(&self) -> usize {
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn connections(&self) -> serde_json::Value {
        let last_push = self
            .last_push
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map(|d| d.as_micros() as u64);
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        serde_json::json!({
            "pushes": self.pushes.load(Ordering::Relaxed),
            "last_push_unix_us": last_push,
            "connections": conns.values().map(|c| {
                let types = c.types.lock().unwrap_or_else(|p| p.into_inner()).clone();
                serde_json::json!({
                    "id": c.id, "node": c.node, "proxy_id": c.proxy_id, "peer": c.peer,
                    "connected": time::OffsetDateTime::from(c.connected)
                        .format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
                    "types": types,
                })
            }).collect::<Vec<_>>(),
        })
    }
}

/// The CA's node check, answered by the live model.
impl NodeAuthorizer for Hub {
    fn workload_on_node(&self, node: &str, identity: &Identity) -> bool {
        self.model().identity_on_node(node, identity)
    }
}

/// Folder mode's pod tokens, tied to their pods by the live model.
impl PodDirectory for Hub {
    fn pod_identity(&self, namespace: &str, name: &str) -> Result<(String, Identity), PodError> {
        self.model().pod_identity(namespace, name)
    }
}

/// The gRPC service.
#[derive(Clone)]
pub struct AdsService {
    hub: Arc<Hub>,
    authn: Arc<dyn Authenticator>,
}

impl AdsService {
    pub fn new(hub: Arc<Hub>, authn: Arc<dyn Authenticator>) -> Self {
        AdsService { hub, authn }
    }

    pub fn into_server(self) -> AdsServer {
        AdsServer::new(self)
    }
}

impl AdsService {
    /// Opens one proxy's stream: authenticates the caller, reads its first
    /// request, and starts the connection's task; its responses come out of
    /// the receiver.
    pub(crate) async fn open(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<mpsc::Receiver<Response>, Status> {
        let caller = self
            .authn
            .authenticate(request.metadata())
            .await
            .map_err(|e| Status::unauthenticated(format!("caller not authenticated: {e}")))?;
        if !self.hub.is_ready() {
            return Err(Status::unavailable(
                "the controller is still loading its config; retry",
            ));
        }
        let peer = request.remote_addr().map(|a| a.to_string());
        let mut stream = request.into_inner();
        // The first request names the proxy.
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("stream closed before the first request"))?;
        let proxy_id = first
            .node
            .as_ref()
            .map(|n| n.id.clone())
            .unwrap_or_default();
        // A workload token opens only its own pod's stream; a node token
        // never an ingress gateway's (its keys are the pod's alone).
        if let Err(why) = crate::access::may_open(&caller, &proxy_id) {
            warn!(
                node = %caller.node, pod = ?caller.pod, proxy = %proxy_id, peer = ?peer, reason = %why,
                "xDS stream refused"
            );
            return Err(Status::permission_denied(why.to_string()));
        }
        let id = self.hub.next.fetch_add(1, Ordering::Relaxed);
        let view = Arc::new(ConnView {
            id,
            node: caller.node.clone(),
            proxy_id,
            peer,
            connected: SystemTime::now(),
            types: Mutex::new(BTreeMap::new()),
            synced: AtomicU64::new(u64::MAX),
        });
        self.hub
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, view.clone());
        info!(node = %caller.node, id, "xDS stream opened");
        let (tx, rx) = mpsc::channel(16);
        let mut conn = Conn {
            hub: self.hub.clone(),
            view,
            caller,
            subs: BTreeMap::new(),
            tx,
            nonce: 0,
        };
        // Subscribe before the first push: a change landing while it is
        // sent is then seen afterwards (and re-diffed), never lost.
        let events = self.hub.events.subscribe();
        tokio::spawn(async move {
            if conn.on_request(first).await.is_ok() {
                conn.run(stream, events).await;
            } else {
                conn.hub.forget(conn.view.id);
            }
        });
        Ok(rx)
    }
}

/// The kube source feeds the hub through this (`config::kube::feed`).
impl crate::config::kube::ChangeSink for Hub {
    fn sources(&self) -> &Arc<Sources> {
        Hub::sources(self)
    }
    fn apply(&self, batch: Vec<Change>) {
        Hub::apply(self, batch);
    }
    fn is_ready(&self) -> bool {
        Hub::is_ready(self)
    }
    fn set_ready(&self) {
        Hub::set_ready(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::objects::{Kind, Object, ObjectKey};
    use crate::model::ModelConfig;

    fn pod(i: usize) -> Change {
        let doc = format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: p-{i}, namespace: shop}}\nspec: {{nodeName: n, containers: [{{name: c, image: x}}]}}\nstatus: {{podIP: 10.1.{}.{}, phase: Running}}\n",
            i / 250,
            i % 250 + 1
        );
        let v: serde_json::Value = serde_yaml::from_str(&doc).expect("yaml");
        Change::Upsert(Object::parse(v).expect("parses").expect("known"))
    }

    fn gone(i: usize) -> Change {
        Change::Delete(ObjectKey {
            kind: Kind::Pod,
            namespace: "shop".into(),
            name: format!("p-{i}"),
        })
    }

    /// A connection that stopped reading (a stuck or hostile proxy) is
    /// synced to an old generation forever; the removals kept for it must
    /// not grow with every pod ever deleted.
    #[test]
    fn a_connection_left_behind_does_not_keep_every_removal() {
        let hub = Hub::new(Model::new(ModelConfig::default()));
        hub.apply(vec![pod(0)]);
        hub.conns.lock().expect("lock").insert(
            1,
            Arc::new(ConnView {
                id: 1,
                node: "n".into(),
                proxy_id: "ztunnel~n".into(),
                peer: None,
                connected: SystemTime::now(),
                types: Mutex::new(BTreeMap::new()),
                synced: AtomicU64::new(hub.model().generation()),
            }),
        );
        let n = crate::model::REMOVED_KEPT + 500;
        for round in 0..2 {
            hub.apply((1..=n).map(|i| pod(round * n + i)).collect());
            hub.apply((1..=n).map(|i| gone(round * n + i)).collect());
        }
        let kept = hub.model().removed_since(ADDRESS_TYPE_URL, 0).count();
        assert!(
            kept <= crate::model::REMOVED_KEPT,
            "{kept} removals kept for a connection that stopped reading"
        );
    }
}
