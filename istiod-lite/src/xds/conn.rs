//! One proxy's stream: its subscriptions, what it holds by our account,
//! and the pushes that bring it up to date.
//!
//! What a proxy holds is kept per type in one of two forms. A plain
//! wildcard subscription (every resource of a type a proxy may hold, as a
//! ztunnel's) that has been answered holds the model's whole state as of
//! a generation ([`Held::All`]): one number, not a copy of every name and
//! version per proxy. Pushes in order keep it so; a connection that missed
//! pushes is sent what changed after its generation, and told of what was
//! removed after it ([`Model::removed_since`]). Other subscriptions (by
//! name, or of a type served only to a Gateway's pods) keep each name and
//! version ([`Held::Each`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use mesh_proto::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use tokio::sync::broadcast;
use tonic::Status;
use tracing::{info, warn};

use super::admit::StreamGuard;
use super::queue::{QueueError, QueueTx};
use super::reader::{Cut, Incoming};
use super::wire::Response;
use super::{ConnView, Gated, Hub, NackView, PUSH_CHUNK, Pushed, TYPES};
use crate::ca::auth::Caller;
use crate::metrics::metrics;
use crate::model::{Delta, Model, XdsResource};

/// The Gateway (namespace, name) a proxy serves, or why it serves none.
pub(super) type Served = Result<(String, String), NotServed>;

/// Why a proxy is sent nothing of a Gateway-gated type (logged).
#[derive(Debug, thiserror::Error)]
pub(super) enum NotServed {
    #[error(transparent)]
    Proxy(#[from] crate::model::ProxyError),
    #[error(transparent)]
    Access(#[from] crate::access::AccessError),
}

/// What the proxy holds of one type, by our account.
enum Held {
    /// Each name it holds, with the version (None: one that no resource
    /// of ours has, e.g. a stand-in the proxy made for a resource it refused).
    Each(HashMap<Arc<str>, Option<u64>>),
    /// Everything the model had of the type at this generation.
    All(u64),
}

impl Default for Held {
    fn default() -> Self {
        Held::Each(HashMap::new())
    }
}

/// Names one subscription may list, at least (or twice as many as the
/// type has resources, if more): a proxy that asks for more is cut off
/// rather than let it grow the controller's memory without bound. Names a
/// reconnecting proxy states it holds are bounded by the hub's
/// high-water mark instead ([`Hub::names_bound`]), checked before the
/// request is decoded, and trimmed to what is live by the first push.
pub(super) const NAMES_KEPT: usize = 100_000;

/// A version as a proxy states it.
fn parse_version(v: &str) -> Option<u64> {
    (v.len() == crate::model::VERSION_LEN)
        .then(|| u64::from_str_radix(v, 16).ok())
        .flatten()
}

/// Per-type subscription state of one connection.
#[derive(Default)]
pub(super) struct Sub {
    wildcard: bool,
    names: BTreeSet<String>,
    held: Held,
    /// Gated types only: which kind of Gateway's proxy may subscribe, and
    /// the Gateway this proxy serves, or why it serves none (then it is
    /// sent nothing). None for other types.
    gateway: Option<(Gated, Served)>,
    /// A response has been sent: until then, the next push answers even
    /// when empty (the proxy is waiting to know it is in sync).
    answered: bool,
}

impl Sub {
    /// Every resource of the type that exists, for any proxy.
    fn plain_wildcard(&self) -> bool {
        self.wildcard && self.gateway.is_none()
    }

    fn refused(&self) -> bool {
        matches!(self.gateway, Some((_, Err(_))))
    }

    /// Leaves [`Held::All`]: each name the proxy may hold, with its version
    /// where known.
    fn hold_each(&mut self, model: &Model, type_url: &str) -> Result<(), Behind> {
        let Held::All(g) = self.held else {
            return Ok(());
        };
        behind(model, type_url, g)?;
        let mut each: HashMap<Arc<str>, Option<u64>> = model
            .resources(type_url)
            .into_iter()
            .flat_map(|m| m.values())
            .map(|r| (r.name.clone(), (r.generation <= g).then_some(r.version)))
            .collect();
        each.extend(model.removed_since(type_url, g).map(|n| (n.clone(), None)));
        self.held = Held::Each(each);
        Ok(())
    }
}

/// The proxy holds the model's state as of a generation whose later
/// removals were forgotten ([`Model::forgotten`]): what it must drop is no
/// longer known, so its stream is ended and it reconnects stating what it
/// holds.
#[derive(Debug, thiserror::Error)]
#[error("synced to generation {synced}, but removals up to {forgotten} were forgotten")]
pub(super) struct Behind {
    synced: u64,
    forgotten: u64,
}

fn behind(model: &Model, type_url: &str, synced: u64) -> Result<(), Behind> {
    let forgotten = model.forgotten(type_url);
    if synced < forgotten {
        return Err(Behind { synced, forgotten });
    }
    Ok(())
}

/// Which resources a push considers.
#[derive(Clone, Copy)]
enum Scope<'a> {
    /// Every resource of the type, and every one the proxy holds.
    Everything,
    /// These names, changed by the broadcast of this generation.
    Changed(&'a BTreeSet<String>, u64),
    /// These names, just subscribed to: each sent even if held.
    Subscribed(&'a BTreeSet<String>),
}

/// What one push sends, worked out under the model's lock.
#[derive(Default)]
struct Plan {
    resources: Vec<Arc<XdsResource>>,
    removed: Vec<Arc<str>>,
    /// Resources the proxy holds afterwards.
    held: usize,
}

fn plan(model: &Model, type_url: &str, sub: &mut Sub, scope: Scope<'_>) -> Result<Plan, Behind> {
    let all = model.resources(type_url);
    let plain = sub.plain_wildcard();
    let mut p = Plan::default();
    match (&mut sub.held, scope) {
        (Held::All(g), Scope::Everything) => {
            behind(model, type_url, *g)?;
            p.resources = all
                .into_iter()
                .flat_map(|m| m.values())
                .filter(|r| r.generation > *g)
                .cloned()
                .collect();
            p.removed = model.removed_since(type_url, *g).cloned().collect();
            *g = model.generation();
        }
        (Held::All(g), Scope::Changed(names, generation)) => {
            // Already sent in full by a later diff.
            if generation > *g {
                for n in names {
                    match all.and_then(|m| m.get(n.as_str())) {
                        Some(r) if r.generation > *g => p.resources.push(r.clone()),
                        Some(_) => {}
                        None => p.removed.push(Arc::from(n.as_str())),
                    }
                }
                *g = generation;
            }
        }
        (Held::All(_), Scope::Subscribed(names)) => {
            p.resources = names
                .iter()
                .filter_map(|n| all.and_then(|m| m.get(n.as_str())).cloned())
                .collect();
        }
        (Held::Each(held), scope) => {
            // Whether the proxy wants `name`, and may hold it at all.
            let (wildcard, names, gateway) = (sub.wildcard, &sub.names, &sub.gateway);
            let mut consider = |name: &str| {
                if !wildcard && !names.contains(name) {
                    return;
                }
                let may_hold = match gateway {
                    None => true,
                    Some((gated, Ok(gw))) => gated.may_hold(model, gw, name),
                    Some((_, Err(_))) => false,
                };
                match all.and_then(|m| m.get(name)).filter(|_| may_hold) {
                    Some(r) if held.get(name) != Some(&Some(r.version)) => {
                        p.resources.push(r.clone())
                    }
                    Some(_) => {}
                    None => {
                        if let Some((n, _)) = held.get_key_value(name) {
                            p.removed.push(n.clone());
                        }
                    }
                }
            };
            match scope {
                Scope::Changed(names, _) | Scope::Subscribed(names) => {
                    names.iter().for_each(|n| consider(n.as_str()))
                }
                Scope::Everything => {
                    all.into_iter()
                        .flat_map(|m| m.keys())
                        .for_each(|n| consider(n));
                    let gone: Vec<Arc<str>> = held
                        .keys()
                        .filter(|k| all.is_none_or(|m| !m.contains_key(&***k)))
                        .cloned()
                        .collect();
                    gone.iter().for_each(|n| consider(n));
                }
            }
            if matches!(scope, Scope::Everything) && plain {
                // The proxy now holds exactly the model's state.
                sub.held = Held::All(model.generation());
            } else {
                for r in &p.resources {
                    held.insert(r.name.clone(), Some(r.version));
                }
                for n in &p.removed {
                    held.remove(n);
                }
            }
        }
    }
    p.held = match &sub.held {
        Held::All(_) => all.map_or(0, |m| m.len()),
        Held::Each(h) => h.len(),
    };
    Ok(p)
}

pub(super) struct Conn {
    /// The stream's quota slot; first, so that it is dropped (and sets the
    /// stream's end status) before `tx`.
    pub(super) guard: StreamGuard,
    pub(super) hub: Arc<Hub>,
    pub(super) view: Arc<ConnView>,
    /// Who opened the stream, as authenticated.
    pub(super) caller: Caller,
    pub(super) subs: BTreeMap<String, Sub>,
    pub(super) tx: QueueTx,
    pub(super) nonce: u64,
}

/// The stream is closed: the proxy is gone, or is cut off for this cause.
fn too_far_behind(why: &Behind) -> Status {
    Status::resource_exhausted(format!(
        "connection too far behind ({why}); reconnect stating what you hold"
    ))
}

/// A proxy asked for more names than it may.
fn too_many_names(asked: usize, limit: usize) -> Status {
    Status::resource_exhausted(format!(
        "{asked} names subscribed or held; at most {limit} may be"
    ))
}

impl Conn {
    /// A response could not be queued: the proxy is gone, or has stopped
    /// reading (then what is queued for it is dropped, and the stream ends).
    fn unsent(&self, e: QueueError) -> Status {
        match e {
            QueueError::Gone => Status::cancelled("the proxy's stream is gone"),
            QueueError::Stalled(_) => {
                warn!(node = %self.view.node, proxy = %self.view.proxy_id, reason = %e,
                    "proxy stopped reading; closing its stream");
                self.tx.drain();
                Status::resource_exhausted(format!("{e}; reconnect stating what you hold"))
            }
        }
    }
}

impl Conn {
    fn next_nonce(&mut self) -> String {
        self.nonce += 1;
        format!("{}-{}", self.view.id, self.nonce)
    }

    /// Sends what differs between the model and what the proxy holds,
    /// within `scope`. `always` sends even an empty response (the answer
    /// to a subscription).
    async fn push(&mut self, type_url: &str, scope: Scope<'_>, always: bool) -> Result<(), Status> {
        let Plan {
            resources,
            mut removed,
            held,
        } = {
            let model = self.hub.model();
            let Some(sub) = self.subs.get_mut(type_url) else {
                return Ok(());
            };
            let p = match plan(&model, type_url, sub, scope) {
                Ok(p) => p,
                Err(why) => {
                    warn!(node = %self.view.node, proxy = %self.view.proxy_id, type_url, reason = %why,
                        "connection too far behind; closing it so the proxy reconnects");
                    return Err(too_far_behind(&why));
                }
            };
            // Published under the model's lock, per type: removals this
            // connection may still need are kept (see Hub::apply); a type
            // that never changes pins no other type's.
            for (i, t) in TYPES.iter().enumerate() {
                let synced = match self.subs.get(*t).map(|s| &s.held) {
                    Some(Held::All(g)) => *g,
                    _ => u64::MAX,
                };
                self.view.synced[i].store(synced, Ordering::Relaxed);
            }
            p
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
        let chunk = if always { usize::MAX } else { PUSH_CHUNK };
        let mut chunks: Vec<Vec<Arc<XdsResource>>> = Vec::new();
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
                let mut types = self.view.types.lock().unwrap_or_else(|p| p.into_inner());
                let t = types.entry(type_url.to_string()).or_default();
                t.resources = held;
                t.responses_sent += 1;
                t.resources_sent += chunk.len() as u64;
                t.last_sent_nonce = Some(nonce.clone());
            }
            let resp = Response {
                system_version_info: self.hub.pushes.load(Ordering::Relaxed).to_string(),
                resources: chunk,
                type_url: type_url.to_string(),
                nonce,
                removed,
            };
            self.tx.send(resp).await.map_err(|e| self.unsent(e))?;
            metrics().pushed(type_url);
        }
        Ok(())
    }

    /// Records an ACK or NACK.
    fn on_ack(&self, t: &str, req: &DeltaDiscoveryRequest) {
        let mut types = self.view.types.lock().unwrap_or_else(|p| p.into_inner());
        let tv = types.entry(t.to_string()).or_default();
        match &req.error_detail {
            Some(err) => {
                warn!(node = %self.view.node, type_url = %t, nonce = %req.response_nonce, error = %err.message, "NACK");
                tv.nacks += 1;
                metrics().rejected(t);
                tv.last_nack = Some(NackView {
                    nonce: req.response_nonce.clone(),
                    error: err.message.clone(),
                    at: SystemTime::now(),
                });
            }
            None => tv.last_acked_nonce = Some(req.response_nonce.clone()),
        }
    }

    /// Names a proxy may subscribe to, or say it holds, of type `t`.
    fn names_limit(&self, t: &str) -> usize {
        NAMES_KEPT.max(2 * self.hub.model().resources(t).map_or(0, |m| m.len()))
    }

    /// A first subscription to type `t`: what the proxy says it holds (of
    /// a subscription by name, only the names subscribed to), and for a
    /// gated type, whether it may have any. However many it states (after
    /// mass deletions, more than is live), it is served: the first push
    /// removes every stated name that is not live, so what is kept shrinks
    /// to what exists; only more than the hub's high-water mark (checked
    /// on the wire already) is refused, as no proxy can hold that much.
    fn subscribe(&mut self, t: &str, req: &mut DeltaDiscoveryRequest) -> Result<(), Status> {
        let stated = req.initial_resource_versions.len();
        let bound = self.hub.names_bound();
        if stated > bound {
            warn!(node = %self.view.node, proxy = %self.view.proxy_id, type_url = %t, stated, bound,
                "first request states more held names than ever existed; closing the stream");
            return Err(too_many_names(stated, bound));
        }
        if stated > self.names_limit(t) {
            info!(node = %self.view.node, proxy = %self.view.proxy_id, type_url = %t, stated,
                "first request states more held names than are live; removing the rest");
        }
        let gateway = Gated::of(t).map(|g| (g, self.gateway_of(g)));
        let wildcard = req.resource_names_subscribe.is_empty()
            || req.resource_names_subscribe.iter().any(|n| n == "*");
        let by_name: BTreeSet<&str> = req
            .resource_names_subscribe
            .iter()
            .map(String::as_str)
            .collect();
        let held = std::mem::take(&mut req.initial_resource_versions)
            .into_iter()
            .filter(|(n, _)| wildcard || by_name.contains(n.as_str()))
            .map(|(n, v)| (Arc::from(n), parse_version(&v)))
            .collect();
        let sub = self.subs.entry(t.to_string()).or_default();
        sub.held = Held::Each(held);
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
        Ok(())
    }

    pub(super) async fn on_request(
        &mut self,
        mut req: DeltaDiscoveryRequest,
    ) -> Result<(), Status> {
        let t = req.type_url.clone();
        if !TYPES.contains(&t.as_str()) {
            warn!(node = %self.view.node, type_url = %t, "subscription to an unknown type ignored");
            return Ok(());
        }
        if !req.response_nonce.is_empty() {
            self.on_ack(&t, &req);
        }
        let first = !self.subs.contains_key(&t);
        if first {
            self.subscribe(&t, &mut req)?;
        }
        if req.resource_names_unsubscribe.iter().any(|n| n == "*")
            && let Some(sub) = self.subs.get_mut(&t)
            && let Err(why) = sub.hold_each(&self.hub.model(), &t)
        {
            warn!(node = %self.view.node, proxy = %self.view.proxy_id, type_url = %t, reason = %why,
                "connection too far behind; closing it so the proxy reconnects");
            return Err(too_far_behind(&why));
        }
        // (An ACK names nothing: no look at the model.)
        let limit = match req.resource_names_subscribe.len() {
            0 => usize::MAX,
            _ => self.names_limit(&t),
        };
        let Some(sub) = self.subs.get_mut(&t) else {
            return Ok(());
        };
        if sub.names.len() + req.resource_names_subscribe.len() > limit {
            warn!(node = %self.view.node, proxy = %self.view.proxy_id, type_url = %t,
                subscribed = sub.names.len(), asked = req.resource_names_subscribe.len(), limit,
                "subscription to too many names; closing the stream");
            return Err(too_many_names(
                sub.names.len() + req.resource_names_subscribe.len(),
                limit,
            ));
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
                if let Held::Each(h) = &mut sub.held {
                    h.remove(n.as_str());
                }
            }
        }
        // A name subscribed again must be answered even if held.
        if let Held::Each(h) = &mut sub.held {
            for n in &new_names {
                h.remove(n.as_str());
            }
        }
        if first {
            self.push(&t, Scope::Everything, true).await?;
        } else if !new_names.is_empty() {
            self.push(&t, Scope::Subscribed(&new_names), true).await?;
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

    /// The caller may still open this proxy's stream (a Gateway's pod may
    /// have lost its Gateway): else the stream ends PERMISSION_DENIED.
    fn still_allowed(&self) -> Result<(), Status> {
        let model = self.hub.model();
        crate::access::may_open(&self.caller, &model, &self.view.proxy_id).map_err(|why| {
            warn!(node = %self.view.node, proxy = %self.view.proxy_id, reason = %why,
                "xDS stream closed: the caller may no longer open it");
            Status::permission_denied(why.to_string())
        })
    }

    async fn on_delta(&mut self, d: &Delta) -> Result<(), Status> {
        if d.gateway_proxies {
            self.still_allowed()?;
            for t in self.recheck_gateways() {
                // A proxy refused until now gets its first answer here.
                self.push(t, Scope::Everything, false).await?;
            }
        }
        for t in TYPES {
            let mut names: BTreeSet<String> = BTreeSet::new();
            names.extend(d.changed.get(t).into_iter().flatten().cloned());
            names.extend(d.removed.get(t).into_iter().flatten().cloned());
            if !names.is_empty() {
                self.push(t, Scope::Changed(&names, d.generation), false)
                    .await?;
            }
        }
        Ok(())
    }

    /// Handles the stream's requests and the model's changes until it
    /// ends. Its reader may cut it at any time, mid-push too (a request
    /// left waiting too long: `reader`).
    pub(super) async fn run(
        mut self,
        (mut incoming, mut cut): (Incoming, Cut),
        mut events: broadcast::Receiver<Arc<Pushed>>,
    ) {
        let end = loop {
            let step: Result<bool, Status> = tokio::select! {
                biased;
                why = cut.wait() => Err(why),
                step = self.step(&mut incoming, &mut events) => step,
            };
            match step {
                Ok(false) => {}
                Ok(true) => break None,
                Err(s) => break Some(s),
            }
        };
        info!(node = %self.view.node, id = self.view.id, status = ?end.as_ref().map(|s| s.code()),
            "xDS stream closed");
        // The stream goes before its slot is given back.
        incoming.stop().await;
        self.close(end);
    }

    /// Handles the next request or change: whether the stream ended.
    async fn step(
        &mut self,
        incoming: &mut Incoming,
        events: &mut broadcast::Receiver<Arc<Pushed>>,
    ) -> Result<bool, Status> {
        // Neither first: requests before pushes would let a caller that
        // always keeps a request waiting starve its own stream's events,
        // and with them the re-check of its Gateway access (a request
        // waiting to be taken is bounded by the reader's own deadline).
        tokio::select! {
            req = incoming.next() => match req {
                Some(req) => self.on_request(req).await.map(|()| false),
                // The reader ended: cleanly, unless it cut the stream
                // (then its status is sent before its end, and `run`
                // takes it first).
                None => Ok(true),
            },
            ev = events.recv() => match ev {
                Ok(p) => {
                    let r = self.on_delta(&p.delta).await;
                    if r.is_ok() {
                        metrics().converged(p.since.elapsed());
                    }
                    r.map(|()| false)
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    // Missed some deltas: diff everything instead.
                    warn!(node = %self.view.node, missed = n, "push lagged; full resync");
                    self.recheck_gateways();
                    // Its Gateway may have gone meanwhile.
                    self.still_allowed()?;
                    for t in TYPES {
                        self.push(t, Scope::Everything, false).await?;
                    }
                    Ok(false)
                }
                Err(broadcast::error::RecvError::Closed) => {
                    Err(Status::unavailable("the controller is stopping"))
                }
            },
        }
    }

    /// Ends the stream, with `why` as its status (None: a clean end).
    pub(super) fn close(self, why: Option<Status>) {
        self.guard.close(why);
        // Dropping the guard forgets the connection and gives its slot
        // back; dropping `tx` lets the response body send the status.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::objects::{Change, Kind, Object, ObjectKey};
    use crate::model::{ModelConfig, version_text};
    use mesh_proto::ADDRESS_TYPE_URL;

    fn pod(name: &str, ip: &str) -> Change {
        let doc = format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{nodeName: n, containers: [{{name: c, image: x}}]}}\nstatus: {{podIP: {ip}, phase: Running}}\n"
        );
        let v: serde_json::Value = serde_yaml::from_str(&doc).expect("yaml");
        Change::Upsert(Object::parse(v).expect("parses").expect("known"))
    }

    fn uid(name: &str) -> String {
        format!("Kubernetes//Pod/shop/{name}")
    }

    fn names(p: &Plan) -> (Vec<String>, Vec<String>) {
        (
            p.resources.iter().map(|r| r.name.to_string()).collect(),
            p.removed.iter().map(|n| n.to_string()).collect(),
        )
    }

    #[test]
    fn a_wildcard_subscription_that_missed_pushes_is_sent_what_changed_since() {
        let mut m = Model::new(ModelConfig::default());
        m.apply(vec![
            pod("a", "10.0.0.1"),
            pod("b", "10.0.0.2"),
            pod("c", "10.0.0.3"),
        ]);
        let mut sub = Sub {
            wildcard: true,
            ..Sub::default()
        };
        // The first answer: everything; then only the generation is kept.
        let p = plan(&m, ADDRESS_TYPE_URL, &mut sub, Scope::Everything).expect("not behind");
        assert_eq!(p.resources.len(), 3);
        assert!(matches!(sub.held, Held::All(g) if g == m.generation()));
        // Missed: b changes, c goes, d comes; a stays as it was.
        m.apply(vec![pod("b", "10.0.0.9")]);
        m.apply(vec![Change::Delete(ObjectKey {
            kind: Kind::Pod,
            namespace: "shop".into(),
            name: "c".into(),
        })]);
        m.apply(vec![pod("d", "10.0.0.4")]);
        let p = plan(&m, ADDRESS_TYPE_URL, &mut sub, Scope::Everything).expect("not behind");
        let (mut sent, removed) = names(&p);
        sent.sort();
        assert_eq!(sent, vec![uid("b"), uid("d")]);
        assert_eq!(removed, vec![uid("c")]);
        assert_eq!(p.held, 3);
        // Nothing more to send; and removals every connection has been
        // sent are forgotten.
        let p = plan(&m, ADDRESS_TYPE_URL, &mut sub, Scope::Everything).expect("not behind");
        assert!(p.resources.is_empty() && p.removed.is_empty());
        let Held::All(g) = sub.held else {
            panic!("still a generation")
        };
        m.prune_removed(|_| g);
        assert_eq!(m.removed_since(ADDRESS_TYPE_URL, 0).count(), 0);
    }

    #[test]
    fn a_broadcast_already_covered_is_skipped_and_a_removal_is_sent() {
        let mut m = Model::new(ModelConfig::default());
        m.apply(vec![pod("a", "10.0.0.1")]);
        let mut sub = Sub {
            wildcard: true,
            ..Sub::default()
        };
        plan(&m, ADDRESS_TYPE_URL, &mut sub, Scope::Everything).expect("not behind");
        let d = m.apply(vec![pod("a", "10.0.0.2")]);
        let changed = d.changed[ADDRESS_TYPE_URL].clone();
        let p = plan(
            &m,
            ADDRESS_TYPE_URL,
            &mut sub,
            Scope::Changed(&changed, d.generation),
        )
        .expect("not behind");
        assert_eq!(names(&p).0, vec![uid("a")]);
        // The same broadcast again (as after a full diff): nothing.
        let p = plan(
            &m,
            ADDRESS_TYPE_URL,
            &mut sub,
            Scope::Changed(&changed, d.generation),
        )
        .expect("not behind");
        assert!(p.resources.is_empty());
        let d = m.apply(vec![Change::Delete(ObjectKey {
            kind: Kind::Pod,
            namespace: "shop".into(),
            name: "a".into(),
        })]);
        let gone = d.removed[ADDRESS_TYPE_URL].clone();
        let p = plan(
            &m,
            ADDRESS_TYPE_URL,
            &mut sub,
            Scope::Changed(&gone, d.generation),
        )
        .expect("not behind");
        assert_eq!(names(&p).1, vec![uid("a")]);
        assert_eq!(p.held, 0);
    }

    #[test]
    fn leaving_the_wildcard_keeps_each_name_the_proxy_may_hold() {
        let mut m = Model::new(ModelConfig::default());
        m.apply(vec![pod("a", "10.0.0.1")]);
        let mut sub = Sub {
            wildcard: true,
            ..Sub::default()
        };
        plan(&m, ADDRESS_TYPE_URL, &mut sub, Scope::Everything).expect("not behind");
        // A change not yet pushed: its version is not known to be held.
        m.apply(vec![pod("a", "10.0.0.2")]);
        sub.hold_each(&m, ADDRESS_TYPE_URL).expect("not behind");
        let Held::Each(h) = &sub.held else {
            panic!("each name")
        };
        assert_eq!(h.get(uid("a").as_str()), Some(&None));
        sub.wildcard = false;
        sub.names.insert(uid("a"));
        let names: BTreeSet<String> = [uid("a")].into();
        let p = plan(
            &m,
            ADDRESS_TYPE_URL,
            &mut sub,
            Scope::Changed(&names, m.generation()),
        )
        .expect("not behind");
        assert_eq!(names_of(&p), vec![uid("a")]);
    }

    fn names_of(p: &Plan) -> Vec<String> {
        names(p).0
    }

    #[test]
    fn a_stated_version_is_ours_only_in_our_form() {
        assert_eq!(
            parse_version(&version_text(0x0123_4567_89ab_cdef)),
            Some(0x0123_4567_89ab_cdef)
        );
        assert_eq!(parse_version("nacked"), None);
        assert_eq!(parse_version("123"), None);
        assert_eq!(parse_version("0123456789abcdeg"), None);
    }

    #[test]
    fn a_wildcard_subscription_behind_forgotten_removals_is_reset_not_left_stale() {
        let mut m = Model::new(ModelConfig::default());
        let n = crate::model::REMOVED_KEPT + 10;
        m.apply((0..n).map(|i| pod(&format!("p{i}"), "10.0.0.1")).collect());
        let mut sub = Sub {
            wildcard: true,
            ..Sub::default()
        };
        plan(&m, ADDRESS_TYPE_URL, &mut sub, Scope::Everything).expect("not behind");
        // Every pod goes while this connection is stuck; the model keeps
        // only so many removals.
        m.apply(
            (0..n)
                .map(|i| {
                    Change::Delete(ObjectKey {
                        kind: Kind::Pod,
                        namespace: "shop".into(),
                        name: format!("p{i}"),
                    })
                })
                .collect(),
        );
        m.apply(vec![pod("late", "10.0.0.2")]);
        m.prune_removed(|_| 0);
        assert!(m.forgotten(ADDRESS_TYPE_URL) > 0);
        // Sending only what is left would leave the removed pods with the
        // proxy for good: the connection is reset instead.
        assert!(plan(&m, ADDRESS_TYPE_URL, &mut sub, Scope::Everything).is_err());
        let mut leaving = Sub {
            wildcard: true,
            held: Held::All(1),
            ..Sub::default()
        };
        assert!(leaving.hold_each(&m, ADDRESS_TYPE_URL).is_err());
    }
}
