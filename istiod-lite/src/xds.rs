//! Delta ADS: `envoy.service.discovery.v3.AggregatedDiscoveryService/
//! DeltaAggregatedResources` for `istio.workload.Address` and
//! `istio.security.Authorization`.
//!
//! Each connection tracks, per type, the version of every resource the proxy
//! holds. A model change is broadcast as the set of changed names; each
//! connection sends only those whose version differs from what the proxy
//! holds, so the encoded resource (made once, in the model) is copied, never
//! re-serialized, per proxy. A reconnecting proxy states its versions
//! (`initial_resource_versions`) and is sent only the difference.
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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use futures::Stream;
use mesh_core::identity::Identity;
use mesh_proto::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use mesh_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use mesh_proto::{
    ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, INGRESS_TYPE_URL, SERVICE_ROUTES_TYPE_URL,
};
use serde::Serialize;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::ca::auth::{Authenticator, Caller, NodeAuthorizer, PodDirectory, PodError};
use crate::config::objects::Change;
use crate::config::sources::Sources;
use crate::metrics::metrics;
use crate::model::{Delta, Model};

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
        let delta = self
            .model
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .apply(changes);
        metrics().model_built(since.elapsed());
        self.applied.send_modify(|n| *n += 1);
        if !delta.is_empty() {
            self.pushes.fetch_add(1, Ordering::Relaxed);
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

    /// Proxies connected now.
    pub fn connected(&self) -> usize {
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn connections(&self) -> serde_json::Value {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        serde_json::json!({
            "pushes": self.pushes.load(Ordering::Relaxed),
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

/// The Gateway (namespace, name) a proxy serves, or why it serves none.
type Served = Result<(String, String), NotServed>;

/// Why a proxy is sent nothing of a Gateway-gated type (logged).
#[derive(Debug, thiserror::Error)]
enum NotServed {
    #[error(transparent)]
    Proxy(#[from] crate::model::ProxyError),
    #[error(transparent)]
    Access(#[from] crate::access::AccessError),
}

/// Per-type subscription state of one connection.
#[derive(Default)]
struct Sub {
    wildcard: bool,
    names: BTreeSet<String>,
    /// name -> version the proxy holds.
    held: HashMap<String, String>,
    /// Gated types only: which kind of Gateway's proxy may subscribe, and
    /// the Gateway this proxy serves, or why it serves none (then it is
    /// sent nothing). None for other types.
    gateway: Option<(Gated, Served)>,
    /// A response has been sent: until then, the next push answers even
    /// when empty (the proxy is waiting to know it is in sync).
    answered: bool,
}

impl Sub {
    fn wants(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }

    /// Whether this proxy may hold resource `name` at all.
    fn may_hold(&self, model: &Model, name: &str) -> bool {
        match &self.gateway {
            None => true,
            Some((gated, Ok(gw))) => gated.may_hold(model, gw, name),
            Some((_, Err(_))) => false,
        }
    }

    fn refused(&self) -> bool {
        matches!(self.gateway, Some((_, Err(_))))
    }
}

struct Conn {
    hub: Arc<Hub>,
    view: Arc<ConnView>,
    /// Who opened the stream, as authenticated.
    caller: Caller,
    subs: BTreeMap<String, Sub>,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    nonce: u64,
}

impl Conn {
    fn next_nonce(&mut self) -> String {
        self.nonce += 1;
        format!("{}-{}", self.view.id, self.nonce)
    }

    /// Sends what differs between the model and what the proxy holds,
    /// limited to `names` when given. `always` sends even an empty response
    /// (the answer to a subscription).
    async fn push(
        &mut self,
        type_url: &str,
        names: Option<&BTreeSet<String>>,
        always: bool,
    ) -> Result<(), ()> {
        let (resources, mut removed) = {
            let Some(sub) = self.subs.get(type_url) else {
                return Ok(());
            };
            let model = self.hub.model();
            let all = model.resources(type_url);
            let mut resources = Vec::new();
            let mut removed = Vec::new();
            let mut consider = |name: &String| {
                if !sub.wants(name) {
                    return;
                }
                match all
                    .and_then(|m| m.get(name))
                    .filter(|_| sub.may_hold(&model, name))
                {
                    Some(r) if sub.held.get(name) != Some(&r.version) => resources.push(Resource {
                        version: r.version.clone(),
                        resource: Some(r.any.clone()),
                        name: r.name.clone(),
                        ..Default::default()
                    }),
                    Some(_) => {}
                    None if sub.held.contains_key(name) => removed.push(name.clone()),
                    None => {}
                }
            };
            match names {
                Some(n) => n.iter().for_each(&mut consider),
                None => {
                    all.into_iter()
                        .flat_map(|m| m.keys())
                        .for_each(&mut consider);
                    let gone: Vec<String> = sub
                        .held
                        .keys()
                        .filter(|k| all.is_none_or(|m| !m.contains_key(*k)))
                        .cloned()
                        .collect();
                    gone.iter().for_each(&mut consider);
                }
            }
            (resources, removed)
        };
        // A refused subscriber is never answered; at most it is told to
        // drop what it was sent before it was refused.
        let (refused, answered) = self
            .subs
            .get(type_url)
            .map_or((false, true), |s| (s.refused(), s.answered));
        let always = (always || !answered) && !refused;
        if resources.is_empty() && removed.is_empty() && !always {
            return Ok(());
        }
        // The answer to a subscription is one response, so the proxy knows
        // when it holds the whole initial state (Delta xDS has no other end
        // marker). Later large pushes (a lagged connection's resync) go out in
        // chunks, so they start applying sooner.
        let mut chunks: Vec<Vec<Resource>> = Vec::new();
        let chunk = if always { usize::MAX } else { PUSH_CHUNK };
        let mut resources = resources.into_iter().peekable();
        while resources.peek().is_some() {
            chunks.push(resources.by_ref().take(chunk).collect());
        }
        if chunks.is_empty() {
            chunks.push(Vec::new());
        }
        let last = chunks.len() - 1;
        for (i, chunk) in chunks.into_iter().enumerate() {
            let removed = if i == last {
                std::mem::take(&mut removed)
            } else {
                Vec::new()
            };
            let nonce = self.next_nonce();
            if let Some(sub) = self.subs.get_mut(type_url) {
                sub.answered = true;
                for r in &chunk {
                    sub.held.insert(r.name.clone(), r.version.clone());
                }
                for n in &removed {
                    sub.held.remove(n);
                }
                let mut types = self.view.types.lock().unwrap_or_else(|p| p.into_inner());
                let t = types.entry(type_url.to_string()).or_default();
                t.resources = sub.held.len();
                t.responses_sent += 1;
                t.resources_sent += chunk.len() as u64;
                t.last_sent_nonce = Some(nonce.clone());
            }
            let resp = DeltaDiscoveryResponse {
                system_version_info: self.hub.pushes.load(Ordering::Relaxed).to_string(),
                resources: chunk,
                type_url: type_url.to_string(),
                nonce,
                removed_resources: removed,
                ..Default::default()
            };
            self.tx.send(Ok(resp)).await.map_err(|_| ())?;
            metrics().pushed(type_url);
        }
        Ok(())
    }

    async fn on_request(&mut self, req: DeltaDiscoveryRequest) -> Result<(), ()> {
        let t = req.type_url.clone();
        if !TYPES.contains(&t.as_str()) {
            warn!(node = %self.view.node, type_url = %t, "subscription to an unknown type ignored");
            return Ok(());
        }
        if !req.response_nonce.is_empty() {
            let mut types = self.view.types.lock().unwrap_or_else(|p| p.into_inner());
            let tv = types.entry(t.clone()).or_default();
            match &req.error_detail {
                Some(err) => {
                    warn!(node = %self.view.node, type_url = %t, nonce = %req.response_nonce, error = %err.message, "NACK");
                    tv.nacks += 1;
                    metrics().rejected(&t);
                    tv.last_nack = Some(NackView {
                        nonce: req.response_nonce.clone(),
                        error: err.message.clone(),
                        at: SystemTime::now(),
                    });
                }
                None => tv.last_acked_nonce = Some(req.response_nonce.clone()),
            }
        }
        let first = !self.subs.contains_key(&t);
        let gateway = Gated::of(&t)
            .filter(|_| first)
            .map(|g| (g, self.gateway_of(g)));
        let sub = self.subs.entry(t.clone()).or_default();
        if first {
            sub.held = req.initial_resource_versions.clone().into_iter().collect();
            if let Some((gated, gw)) = gateway {
                match &gw {
                    Ok((ns, name)) => {
                        info!(
                            proxy = %self.view.proxy_id, node = %self.view.node, type_url = %t,
                            gateway = %format!("{ns}/{name}"), "{} subscribed", gated.what()
                        );
                    }
                    Err(why) => {
                        warn!(
                            proxy = %self.view.proxy_id, node = %self.view.node, type_url = %t, reason = %why,
                            "subscription refused: not a {}; nothing of that type is sent", gated.what()
                        );
                        // What it claims to hold it may not hold: the push
                        // below removes every such name (a waypoint that
                        // reconnects after losing its Gateway drops its
                        // routes rather than serving stale policies).
                    }
                }
                sub.gateway = Some((gated, gw));
            }
            // An empty first subscription is the legacy wildcard.
            if req.resource_names_subscribe.is_empty() {
                sub.wildcard = true;
            }
        }
        let mut new_names = BTreeSet::new();
        for n in &req.resource_names_subscribe {
            if n == "*" {
                sub.wildcard = true;
            } else if sub.names.insert(n.clone()) {
                new_names.insert(n.clone());
            }
        }
        for n in &req.resource_names_unsubscribe {
            if n == "*" {
                sub.wildcard = false;
            } else {
                sub.names.remove(n);
                sub.held.remove(n);
            }
        }
        if first {
            self.push(&t, None, true).await?;
        } else if !new_names.is_empty() {
            // A name subscribed again must be answered even if held.
            if let Some(sub) = self.subs.get_mut(&t) {
                for n in &new_names {
                    sub.held.remove(n);
                }
            }
            self.push(&t, Some(&new_names), true).await?;
        }
        Ok(())
    }

    /// Which Gateway this proxy serves as a proxy of kind `gated`.
    fn gateway_of(&self, gated: Gated) -> Served {
        gated.gateway_of(&self.hub.model(), &self.caller, &self.view.proxy_id)
    }

    /// Re-checks the subscriber of each gated type after pods or Gateways
    /// changed. Returns the types whose Gateway changed (or that it began,
    /// or stopped, serving): those are diffed again in full.
    fn recheck_gateways(&mut self) -> Vec<&'static str> {
        let mut changed_types = Vec::new();
        for t in TYPES {
            let Some(gated) = self
                .subs
                .get(t)
                .and_then(|s| s.gateway.as_ref())
                .map(|(g, _)| *g)
            else {
                continue;
            };
            let now = self.gateway_of(gated);
            let Some(sub) = self.subs.get_mut(t) else {
                continue;
            };
            let before = sub
                .gateway
                .as_ref()
                .and_then(|(_, w)| w.as_ref().ok())
                .cloned();
            let changed = before.as_ref() != now.as_ref().ok();
            match (&before, &now) {
                (_, Ok((ns, gw))) if changed => {
                    info!(
                        proxy = %self.view.proxy_id, node = %self.view.node, type_url = t,
                        gateway = %format!("{ns}/{gw}"), "proxy now serves this {}", gated.what()
                    );
                }
                (Some(_), Err(why)) => {
                    warn!(
                        proxy = %self.view.proxy_id, node = %self.view.node, type_url = t, reason = %why,
                        "proxy is no longer a {}; its resources are withdrawn", gated.what()
                    );
                }
                _ => {}
            }
            sub.gateway = Some((gated, now));
            if changed {
                changed_types.push(t);
            }
        }
        changed_types
    }

    async fn on_delta(&mut self, d: &Delta) -> Result<(), ()> {
        if d.gateway_proxies {
            for t in self.recheck_gateways() {
                // A proxy refused until now gets its first answer here.
                self.push(t, None, false).await?;
            }
        }
        for t in TYPES {
            let mut names: BTreeSet<String> = BTreeSet::new();
            names.extend(d.changed.get(t).into_iter().flatten().cloned());
            names.extend(d.removed.get(t).into_iter().flatten().cloned());
            if !names.is_empty() {
                self.push(t, Some(&names), false).await?;
            }
        }
        Ok(())
    }

    async fn run(
        mut self,
        mut stream: Streaming<DeltaDiscoveryRequest>,
        mut events: broadcast::Receiver<Arc<Pushed>>,
    ) {
        loop {
            let done = tokio::select! {
                msg = stream.message() => match msg {
                    Ok(Some(req)) => self.on_request(req).await.is_err(),
                    Ok(None) => true,
                    Err(e) => {
                        debug!(node = %self.view.node, error = %e, "stream error");
                        true
                    }
                },
                ev = events.recv() => match ev {
                    Ok(p) => {
                        let failed = self.on_delta(&p.delta).await.is_err();
                        if !failed {
                            metrics().converged(p.since.elapsed());
                        }
                        failed
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        // Missed some deltas: diff everything instead.
                        warn!(node = %self.view.node, missed = n, "push lagged; full resync");
                        let mut failed = false;
                        self.recheck_gateways();
                        for t in TYPES {
                            failed |= self.push(t, None, false).await.is_err();
                        }
                        failed
                    }
                    Err(broadcast::error::RecvError::Closed) => true,
                },
            };
            if done {
                break;
            }
        }
        info!(node = %self.view.node, id = self.view.id, "xDS stream closed");
        self.hub
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.view.id);
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

    pub fn into_server(self) -> AggregatedDiscoveryServiceServer<Self> {
        AggregatedDiscoveryServiceServer::new(self).max_decoding_message_size(4 * 1024 * 1024)
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsService {
    type DeltaAggregatedResourcesStream = ResponseStream;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
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
                conn.hub
                    .conns
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&conn.view.id);
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
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
