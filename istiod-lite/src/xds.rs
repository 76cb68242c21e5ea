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

mod admit;
pub mod budget;
mod conn;
pub mod queue;
mod reader;
pub mod request;
mod server;
pub mod wire;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use mesh_core::identity::Identity;
use mesh_core::loglimit::LogLimit;
use mesh_proto::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use mesh_proto::{
    ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, INGRESS_TYPE_URL, SERVICE_ROUTES_TYPE_URL,
};
use serde::Serialize;
use tokio::sync::broadcast;
use tonic::Status;
use tonic::metadata::MetadataMap;
use tracing::{debug, info, warn};

use crate::ca::auth::{Authenticator, Caller, NodeAuthorizer, PodDirectory, PodError};
use crate::config::objects::Change;
use crate::config::sources::Sources;
use crate::metrics::metrics;
use crate::model::{Delta, Model};
use admit::{Slots, StreamGuard};
use budget::{Budget, MAX_BUFFERED, MAX_WORKLOAD_BUFFERED};
use conn::{Conn, Served};
use reader::{Cut, Incoming};
pub use server::AdsServer;

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
    /// Streams admitted per quota (open, or awaiting their first request).
    slots: Slots,
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
    /// Names and held versions one request may carry: twice the most
    /// resources any type has ever had, at least [`conn::NAMES_KEPT`]
    /// (never lowered: a proxy reconnecting after mass deletions states
    /// what it held before them).
    names_bound: Arc<AtomicUsize>,
}

/// A change to push, and when it was made (for the convergence time).
pub struct Pushed {
    /// Shared with the caller of [`Hub::apply`]: never copied under the lock.
    pub delta: Arc<Delta>,
    pub since: std::time::Instant,
}

/// ADS streams a node's token (its ztunnel, and proxies it opens streams
/// for) may hold open at once: a node's proxies need a few; a caller
/// opening ever more is refused (RESOURCE_EXHAUSTED).
pub const MAX_STREAMS_PER_NODE: usize = 64;

/// ADS streams one pod may hold open at once with its own token (a
/// Gateway's pod needs one; two let it reconnect before the old one is
/// seen gone). Never counted against its node's quota.
pub const MAX_STREAMS_PER_POD: usize = 2;

/// Whose stream quota a stream counts against: a node's token and pods'
/// own tokens never share one, so no pod can lock its node's ztunnel out.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Quota {
    /// A node's token.
    Node(String),
    /// A workload's own token: its pod (namespace, name), or its identity
    /// when the token names no pod.
    Pod(String, String),
}

impl Quota {
    fn of(caller: &Caller) -> Quota {
        match (&caller.only, &caller.pod) {
            (None, _) => Quota::Node(caller.node.clone()),
            (Some(_), Some((ns, pod))) => Quota::Pod(ns.clone(), pod.clone()),
            (Some(id), None) => Quota::Pod(String::new(), id.to_string()),
        }
    }

    /// Its streams' share of requests in flight, across them: a node's
    /// [`request::MAX_LARGE_PER_NODE`] (its large first requests stay
    /// taken while their streams last), a workload's [`request::MAX_REQUEST`].
    fn share_max(&self) -> usize {
        match self {
            Quota::Node(_) => request::MAX_LARGE_PER_NODE,
            Quota::Pod(..) => request::MAX_REQUEST,
        }
    }

    /// Streams it may hold open at once.
    fn max(&self) -> usize {
        match self {
            Quota::Node(_) => MAX_STREAMS_PER_NODE,
            Quota::Pod(..) => MAX_STREAMS_PER_POD,
        }
    }
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
    /// Per type (as in [`TYPES`]), the model generation this connection's
    /// wildcard subscription is synced to (u64::MAX: none is): removals of
    /// that type after it are kept for it.
    #[serde(skip)]
    pub synced: [AtomicU64; TYPES.len()],
}

/// Synced to nothing yet, for every type.
fn synced_to_none() -> [AtomicU64; TYPES.len()] {
    std::array::from_fn(|_| AtomicU64::new(u64::MAX))
}

/// Where `type_url` is in [`TYPES`].
fn type_index(type_url: &str) -> Option<usize> {
    TYPES.iter().position(|t| *t == type_url)
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
            slots: Slots::default(),
            next: AtomicU64::new(1),
            pushes: AtomicU64::new(0),
            last_push: Mutex::new(None),
            applied: tokio::sync::watch::Sender::new(0),
            sources: Arc::new(Sources::default()),
            names_bound: Arc::new(AtomicUsize::new(conn::NAMES_KEPT)),
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

    /// Names and held versions one request may carry (see `names_bound`).
    pub fn names_bound(&self) -> usize {
        self.names_bound.load(Ordering::Relaxed)
    }

    /// Applies changes and pushes what they changed to every connection.
    pub fn apply(&self, changes: Vec<Change>) -> Arc<Delta> {
        if changes.is_empty() {
            return Arc::default();
        }
        let since = std::time::Instant::now();
        let at = SystemTime::now();
        let delta = {
            let mut model = self.model.write().unwrap_or_else(|p| p.into_inner());
            let delta = Arc::new(model.apply(changes));
            let most = TYPES
                .iter()
                .map(|t| model.resources(t).map_or(0, |m| m.len()))
                .max()
                .unwrap_or(0);
            self.names_bound
                .fetch_max(most.saturating_mul(2), Ordering::Relaxed);
            // Removals of a type every connection has been sent are forgotten.
            let oldest = self.oldest_synced();
            model.prune_removed(|t| type_index(t).map_or(0, |i| oldest[i]));
            // Announced under the write lock: concurrent applies are
            // announced in the order of their generations (a connection
            // skips a generation older than one it has seen).
            if !delta.is_empty() {
                self.announce(&delta, since, at);
            }
            delta
        };
        metrics().model_built(since.elapsed());
        self.applied.send_modify(|n| *n += 1);
        delta
    }

    /// Per type, the oldest generation any connection is synced to.
    fn oldest_synced(&self) -> [u64; TYPES.len()] {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        std::array::from_fn(|i| {
            conns
                .values()
                .map(|c| c.synced[i].load(Ordering::Relaxed))
                .min()
                .unwrap_or(u64::MAX)
        })
    }

    /// Tells every connection what a change changed.
    fn announce(&self, delta: &Arc<Delta>, since: std::time::Instant, at: SystemTime) {
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
            delta: Arc::clone(delta),
            since,
        }));
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

/// How long a stream may take to send its first request: until then it
/// holds a slot of its caller's quota and names no proxy.
pub const FIRST_REQUEST_DEADLINE: Duration = Duration::from_secs(10);

/// The gRPC service.
#[derive(Clone)]
pub struct AdsService {
    hub: Arc<Hub>,
    authn: Arc<dyn Authenticator>,
    /// Bytes of requests being buffered or decoded, across all streams.
    budget: Arc<Budget>,
    /// The pool of `budget` all workload tokens' streams draw from.
    workloads: Arc<Budget>,
    first_deadline: Duration,
    push_stall: Duration,
    /// Admission refusals' log lines, limited.
    refusals: Arc<LogLimit>,
}

impl AdsService {
    pub fn new(hub: Arc<Hub>, authn: Arc<dyn Authenticator>) -> Self {
        let budget = Budget::new(MAX_BUFFERED);
        AdsService {
            hub,
            authn,
            workloads: Budget::pool(budget.clone(), MAX_WORKLOAD_BUFFERED),
            budget,
            first_deadline: FIRST_REQUEST_DEADLINE,
            push_stall: queue::PUSH_STALL,
            refusals: Arc::new(LogLimit::default()),
        }
    }

    /// How long a push may wait for a proxy to read before its stream is
    /// ended (default [`queue::PUSH_STALL`]).
    /// Its admission refusals' log limit (a periodic task writes what it
    /// left out).
    pub fn refusals(&self) -> Arc<LogLimit> {
        self.refusals.clone()
    }

    pub fn with_push_stall(mut self, stall: Duration) -> Self {
        self.push_stall = stall;
        self
    }

    /// Bytes of requests all streams may buffer at once (default
    /// [`MAX_BUFFERED`]); workload tokens' streams together at most
    /// [`MAX_WORKLOAD_BUFFERED`] of it, or half of it if that is less.
    pub fn with_buffer_budget(mut self, bytes: usize) -> Self {
        self.budget = Budget::new(bytes);
        self.workloads = Budget::pool(self.budget.clone(), MAX_WORKLOAD_BUFFERED.min(bytes / 2));
        self
    }

    /// How long a stream may take to send its first request (default
    /// [`FIRST_REQUEST_DEADLINE`]).
    pub fn with_first_request_deadline(mut self, deadline: Duration) -> Self {
        self.first_deadline = deadline;
        self
    }

    pub fn into_server(self) -> AdsServer {
        AdsServer::new(self)
    }

    /// Admits a stream from its headers alone, before any of its body is
    /// read: authenticates the caller, refuses a workload token whose pod
    /// is no Gateway's ([`crate::access::may_admit`]: PERMISSION_DENIED),
    /// and takes a slot of its quota.
    pub(crate) async fn admit(
        &self,
        metadata: &MetadataMap,
        peer: Option<std::net::IpAddr>,
    ) -> Result<(Caller, StreamGuard), Status> {
        let caller = self
            .authn
            .authenticate_from(metadata, peer)
            .await
            .map_err(|e| e.status("caller not authenticated"))?;
        if !self.hub.is_ready() {
            return Err(Status::unavailable(
                "the controller is still loading its config; retry",
            ));
        }
        let admitted = crate::access::may_admit(&caller, &self.hub.model());
        // Refusals are logged a line per kind per period at most (a flood
        // of them would flood the log), with how many were left out.
        let now = std::time::Instant::now();
        if let Err(why) = admitted {
            if let Some(left_out) = self.refusals.admit("headers", now) {
                warn!(node = %caller.node, pod = ?caller.pod, reason = %why, left_out,
                    "xDS stream refused on its headers");
            }
            return Err(Status::permission_denied(why.to_string()));
        }
        let guard = StreamGuard::take(&self.hub, Quota::of(&caller)).inspect_err(|s| {
            if let Some(left_out) = self.refusals.admit("quota", now) {
                warn!(node = %caller.node, pod = ?caller.pod, reason = %s.message(), left_out,
                    "xDS stream refused: quota full");
            }
        })?;
        Ok((caller, guard))
    }

    /// Opens an admitted stream: reads its first request (within the
    /// deadline), checks the caller may open the proxy it names, and starts
    /// the connection's task; its responses come out of the receiver.
    async fn open(
        &self,
        caller: Caller,
        mut guard: StreamGuard,
        (mut incoming, mut cut): (Incoming, Cut),
        peer: Option<String>,
    ) -> Result<(queue::QueueRx, wire::End), Status> {
        // The first request names the proxy. Its reader is stopped before
        // a refusal gives the stream's slot back (see Incoming::stop).
        let first = match self
            .first_request(&caller, (&mut incoming, &mut cut), &peer)
            .await
        {
            Ok(first) => first,
            Err(why) => {
                incoming.stop().await;
                return Err(why);
            }
        };
        let proxy_id = first
            .node
            .as_ref()
            .map(|n| n.id.clone())
            .unwrap_or_default();
        // Subscribe before the check and the first push: a change landing
        // meanwhile (a Gateway or its pod changed, so the check must be
        // made again; or resources to re-diff) is then seen, never lost.
        let events = self.hub.events.subscribe();
        // A workload token opens only its own pod's stream; a node token
        // never an ingress gateway's (its keys are the pod's alone).
        let allowed = crate::access::may_open(&caller, &self.hub.model(), &proxy_id);
        if let Err(why) = allowed {
            warn!(
                node = %caller.node, pod = ?caller.pod, proxy = %proxy_id, peer = ?peer, reason = %why,
                "xDS stream refused"
            );
            incoming.stop().await;
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
            synced: synced_to_none(),
        });
        self.hub
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, view.clone());
        guard.id = Some(id);
        info!(node = %caller.node, id, quota = ?guard.quota(), "xDS stream opened");
        let (tx, rx) = queue::queue(self.push_stall);
        let end = guard.end.clone();
        let mut conn = Conn {
            guard,
            hub: self.hub.clone(),
            view,
            caller,
            subs: BTreeMap::new(),
            tx,
            nonce: 0,
        };
        tokio::spawn(async move {
            let handled = tokio::select! {
                biased;
                why = cut.wait() => Err(why),
                r = conn.on_request(first) => r,
            };
            match handled {
                Ok(()) => conn.run((incoming, cut), events).await,
                Err(why) => {
                    incoming.stop().await;
                    conn.close(Some(why))
                }
            }
        });
        Ok((rx, end))
    }

    /// The stream's first request, within the deadline.
    async fn first_request(
        &self,
        caller: &Caller,
        (incoming, cut): (&mut Incoming, &mut Cut),
        peer: &Option<String>,
    ) -> Result<DeltaDiscoveryRequest, Status> {
        let first = tokio::time::timeout(self.first_deadline, async {
            tokio::select! {
                biased;
                why = cut.wait() => Err(why),
                req = incoming.next() => req.ok_or_else(|| {
                    Status::invalid_argument("stream closed before the first request")
                }),
            }
        })
        .await;
        first.map_err(|_| {
            warn!(node = %caller.node, pod = ?caller.pod, peer = ?peer,
                "xDS stream closed: no first request in time");
            Status::deadline_exceeded(format!("no first request within {:?}", self.first_deadline))
        })?
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
impl Hub {
    /// Registers a connection as `open` does; its id.
    fn register_for_test(&self, quota: &Quota) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let view = Arc::new(ConnView {
            id,
            node: format!("{quota:?}"),
            proxy_id: String::new(),
            peer: None,
            connected: SystemTime::now(),
            types: Mutex::new(BTreeMap::new()),
            synced: synced_to_none(),
        });
        self.conns.lock().expect("lock").insert(id, view);
        id
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

    /// A flood of streams refused on their headers (a plain pod's own
    /// token) writes one log line per period, the next carrying how many
    /// were left out.
    #[tokio::test]
    async fn admission_refusals_are_logged_once_per_period() {
        use crate::ca::auth::BootstrapTokens;
        let hub = Hub::new(Model::new(ModelConfig::default()));
        hub.apply(vec![pod(0)]);
        hub.set_ready();
        let token = "pod-token-for-shop-p-0-0123456789";
        let tokens = BootstrapTokens::new([("shop/p-0".to_string(), token.to_string())])
            .expect("tokens")
            .with_pods(hub.clone());
        let ads = AdsService::new(hub, Arc::new(tokens));
        let mut md = MetadataMap::new();
        md.insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header"),
        );
        for _ in 0..100 {
            let refused = ads.admit(&md, None).await.err().expect("refused");
            assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        }
        let later = std::time::Instant::now() + mesh_core::loglimit::EVERY;
        assert_eq!(ads.refusals.due(later), vec![("headers", 99)]);
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
                synced: std::array::from_fn(|_| AtomicU64::new(hub.model().generation())),
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

    /// The change announced is the one returned, shared: announcing it
    /// under the model's write lock copies nothing.
    #[test]
    fn a_change_is_announced_without_a_copy() {
        let hub = Hub::new(Model::new(ModelConfig::default()));
        let mut rx = hub.events.subscribe();
        let delta = hub.apply(vec![pod(0)]);
        let pushed = rx.try_recv().expect("announced");
        assert!(Arc::ptr_eq(&pushed.delta, &delta));
    }

    /// Changes applied at once are announced in the order of their
    /// generations: a connection skips an older one it sees late.
    #[test]
    fn concurrent_applies_are_announced_in_generation_order() {
        for _ in 0..20 {
            let hub = Hub::new(Model::new(ModelConfig::default()));
            let mut rx = hub.events.subscribe();
            std::thread::scope(|s| {
                for t in 0..4 {
                    let hub = &hub;
                    s.spawn(move || {
                        for i in 0..50 {
                            hub.apply(vec![pod(t * 1000 + i)]);
                        }
                    });
                }
            });
            let mut last = 0;
            while let Ok(p) = rx.try_recv() {
                assert!(
                    p.delta.generation > last,
                    "generation {} announced after {last}",
                    p.delta.generation
                );
                last = p.delta.generation;
            }
        }
    }
}
