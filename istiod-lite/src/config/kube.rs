//! The Kubernetes source: one `kube` watcher per kind, each turned into the
//! same [`Change`]s the folder source produces, so the model cannot tell the
//! two apart. A (re)list, including the one a 410 Gone forces, is diffed
//! against what the watcher knew: objects that vanished meanwhile are deleted.
//!
//! Degrade, never stall ([`super::sources`]): a kind the API server does not
//! serve (404: its CRD is not installed) has no objects, and is probed
//! quietly until it appears; one that RBAC refuses (403) keeps what it last
//! listed. Neither holds the rest of the mesh back (but see the fail-closed
//! rule for policy kinds there). A kind that only widens access
//! (ReferenceGrant) is never kept while it cannot be read: refused, its
//! objects are dropped at once; failing, after [`WIDENING_GRACE`], a silent
//! network included (a list deadline, a short watch and read timeout).
//! After any other failure the kind is
//! listed afresh once the API server answers, with a backoff that a success
//! resets, so a long outage leaves no long wait behind. A 410 relist is not
//! a failure.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use gateway_api::apis::experimental::grpcroutes::GrpcRoute;
use gateway_api::apis::experimental::httproutes::HttpRoute;
use gateway_api::apis::standard::gatewayclasses::GatewayClass;
use gateway_api::apis::standard::gateways::Gateway;
use gateway_api::apis::standard::referencegrants::ReferenceGrant;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::crds::{AuthorizationPolicy, DestinationRule, PeerAuthentication, TrafficPolicy};
use super::objects::{Change, Kind, Object, ObjectKey, merge_string_data};
use super::sources::{Backoff, Sources, State};

/// The first wait after a failure, and the longest: after an outage the
/// kinds are listed again within this of the API server's return.
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// How often a kind that is not served is probed for (its CRD appearing).
const MISSING_PROBE: Duration = Duration::from_secs(3);
/// How long grants (a kind that only widens access) stay in force while
/// their watch fails; a refusal (403) or a kind not served (404) drops
/// them at once.
pub const WIDENING_GRACE: Duration = Duration::from_secs(30);

/// What a failed list or watch means.
#[derive(Debug, PartialEq, Eq)]
enum Trouble {
    /// 410 Gone: the watcher lists again at once; not a failure.
    Expired,
    Missing(String),
    Forbidden(String),
    Failing(String),
}

/// "404 page not found", "403 forbidden: ...": the code once.
fn status_detail(code: u16, message: &str) -> String {
    let m = message.trim();
    if m.starts_with(&code.to_string()) {
        m.to_string()
    } else {
        format!("{code} {m}").trim().to_string()
    }
}

fn api_detail(e: &kube::Error) -> (Option<u16>, String) {
    match e {
        kube::Error::Api(s) => (Some(s.code), status_detail(s.code, &s.message)),
        other => (None, other.to_string()),
    }
}

fn classify(e: &watcher::Error) -> Trouble {
    let (code, detail) = match e {
        watcher::Error::InitialListFailed(k)
        | watcher::Error::WatchStartFailed(k)
        | watcher::Error::WatchFailed(k) => api_detail(k),
        watcher::Error::WatchError(s) => (Some(s.code), status_detail(s.code, &s.message)),
        watcher::Error::NoResourceVersion => (None, e.to_string()),
    };
    match code {
        Some(410) => Trouble::Expired,
        Some(404) => Trouble::Missing(detail),
        Some(403) => Trouble::Forbidden(detail),
        _ => Trouble::Failing(detail),
    }
}

/// One watched kind.
struct Watch<K: Resource + Clone + DeserializeOwned + Debug + Send + 'static> {
    api: Api<K>,
    config: watcher::Config,
    wrap: fn(K) -> Object,
    kind: &'static str,
    tx: mpsc::Sender<Vec<Change>>,
    sources: Arc<Sources>,
    client: Client,
    /// Its objects only widen access: trouble drops them (fail closed).
    widens: bool,
    grace: Duration,
}

impl<K> Watch<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    fn fresh(&self) -> BoxStream<'static, watcher::Result<Event<K>>> {
        watcher::watcher(self.api.clone(), self.config.clone()).boxed()
    }

    /// Waits until the kind is served, asking quietly (a raw request: no
    /// log line per probe). Returns false when the receiver is gone.
    async fn until_served(&self) -> bool {
        loop {
            tokio::select! {
                _ = self.tx.closed() => return false,
                _ = tokio::time::sleep(MISSING_PROBE) => {}
            }
            let url = format!("{}?limit=1", self.api.resource_url());
            let Ok(req) = http::Request::get(url).body(Vec::new()) else {
                return true;
            };
            match self.client.send(req.map(Into::into)).await {
                Ok(r) if r.status() == http::StatusCode::NOT_FOUND => {}
                // Served now, or some other answer: the watcher decides.
                _ => return true,
            }
        }
    }

    async fn run(self) {
        let mut stream = self.fresh();
        let mut known: BTreeSet<ObjectKey> = BTreeSet::new();
        let mut listing: Option<Vec<Object>> = None;
        let mut backoff = Backoff::new(RETRY_FIRST, RETRY_MAX);
        // Failures since the last success: a listed kind's first one (an
        // ended watch, a CRD being deleted) is retried before it is news.
        let mut failures = 0u32;
        // Grants only: since when the watch has failed, and whether what
        // was known has been dropped for it.
        let mut failing_since: Option<tokio::time::Instant> = None;
        let mut dropped = false;
        // Grants only: a (re)list must complete by this, or what was known
        // is dropped (a silent network raises no error for minutes).
        let mut list_deadline: Option<tokio::time::Instant> = None;
        loop {
            let ev = match next_before(&mut stream, list_deadline).await {
                Next::Event(ev) => ev,
                Next::End => return,
                Next::Late => {
                    list_deadline = None;
                    let detail = format!(
                        "no complete list within {:?}; known grants dropped: cross-namespace backends are refused until the kind is read again",
                        self.grace
                    );
                    if !self.drop_known_now(&mut known, &detail).await {
                        return;
                    }
                    dropped = true;
                    self.sources.set(self.kind, State::Failing, Some(detail));
                    continue;
                }
            };
            let changes = match ev {
                Ok(ev) => {
                    // A fresh watcher says Init before it asks anything,
                    // and a paged list's first page is no whole list: only
                    // a complete list or a watch event is a success.
                    if matches!(ev, Event::InitDone | Event::Apply(_) | Event::Delete(_)) {
                        backoff.reset();
                        failures = 0;
                        failing_since = None;
                    }
                    match ev {
                        Event::Init if self.widens => {
                            let from = failing_since.unwrap_or_else(tokio::time::Instant::now);
                            list_deadline = Some(from + self.grace);
                        }
                        Event::InitDone => {
                            dropped = false;
                            list_deadline = None;
                        }
                        _ => {}
                    }
                    match self.event(ev, &mut known, &mut listing) {
                        Some(c) => c,
                        None => continue,
                    }
                }
                Err(e) => {
                    let (state, detail, wait) = match classify(&e) {
                        Trouble::Expired => {
                            debug!(kind = self.kind, "resource version expired; listing again");
                            crate::metrics::metrics().watch_restarted(self.kind);
                            continue;
                        }
                        Trouble::Missing(d) => (State::Missing, d, None),
                        // Refusals are not always lasting: a restarted API
                        // server refuses everything (403) for a moment,
                        // until its RBAC authorizer has the bindings. So
                        // the same backoff as any failure.
                        Trouble::Forbidden(d) => {
                            (State::Forbidden, d, Some(backoff.next(RETRY_MAX)))
                        }
                        Trouble::Failing(d) => (State::Failing, d, Some(backoff.next(RETRY_MAX))),
                    };
                    listing = None;
                    if state != State::Missing {
                        failing_since.get_or_insert_with(tokio::time::Instant::now);
                    }
                    if self.drops_known(state, failing_since) {
                        dropped |= self.widens;
                        if !self.drop_known_now(&mut known, &detail).await {
                            return;
                        }
                    }
                    let detail = if dropped {
                        format!(
                            "{detail}; known grants dropped: cross-namespace backends are refused until the kind is read again"
                        )
                    } else {
                        detail
                    };
                    failures += 1;
                    let listed = self
                        .sources
                        .get(self.kind)
                        .is_some_and(|k| k.state == State::Listed);
                    if state == State::Failing && listed && failures == 1 {
                        debug!(kind = self.kind, error = %detail, "watch failed; listing again");
                    } else {
                        self.sources.set(self.kind, state, Some(detail));
                    }
                    let go_on = match wait {
                        None => self.until_served().await,
                        Some(w) => tokio::select! {
                            _ = self.tx.closed() => false,
                            _ = tokio::time::sleep(w) => true,
                        },
                    };
                    if !go_on {
                        return;
                    }
                    // Listed afresh: the next success is a whole list, so
                    // the kind is known to be current again.
                    crate::metrics::metrics().watch_restarted(self.kind);
                    stream = self.fresh();
                    continue;
                }
            };
            let listed = matches!(changes, Step::Listed(_));
            let batch = match changes {
                Step::Listed(c) | Step::Changed(c) => c,
            };
            if self.tx.send(batch).await.is_err() {
                return;
            }
            if listed {
                self.sources.set(self.kind, State::Listed, None);
            }
        }
    }

    /// Deletes every object known of the kind; false when the receiver is
    /// gone.
    async fn drop_known_now(&self, known: &mut BTreeSet<ObjectKey>, detail: &str) -> bool {
        if self.widens && !known.is_empty() {
            warn!(
                kind = self.kind,
                dropped = known.len(),
                error = %detail,
                "cannot read the kind; every known one is dropped (they only widen access)"
            );
        }
        let gone: Vec<Change> = std::mem::take(known)
            .into_iter()
            .map(Change::Delete)
            .collect();
        gone.is_empty() || self.tx.send(gone).await.is_ok()
    }

    /// Whether trouble of `state` drops every object known of the kind.
    /// Nothing of a kind that is not served exists (the API server deletes
    /// a CRD's objects with it). A kind that only widens access (grants)
    /// is not left in force while it cannot be read: a revocation would go
    /// unseen. Refused, at once; failing, after the grace.
    fn drops_known(&self, state: State, failing_since: Option<tokio::time::Instant>) -> bool {
        match state {
            State::Missing => true,
            State::Forbidden => self.widens,
            State::Failing => {
                self.widens && failing_since.is_some_and(|t| t.elapsed() >= self.grace)
            }
            State::Listing | State::Listed => false,
        }
    }

    /// The changes one event makes, once a list is complete.
    fn event(
        &self,
        ev: Event<K>,
        known: &mut BTreeSet<ObjectKey>,
        listing: &mut Option<Vec<Object>>,
    ) -> Option<Step> {
        let wrap = self.wrap;
        match ev {
            Event::Init => {
                *listing = Some(Vec::new());
                None
            }
            Event::InitApply(o) => {
                listing.get_or_insert_with(Vec::new).push(wrap(o));
                None
            }
            Event::InitDone => {
                let objects = listing.take().unwrap_or_default();
                let now: BTreeSet<ObjectKey> = objects.iter().map(Object::key).collect();
                let mut changes: Vec<Change> = known
                    .difference(&now)
                    .cloned()
                    .map(Change::Delete)
                    .collect();
                info!(
                    kind = self.kind,
                    objects = objects.len(),
                    removed = changes.len(),
                    "listed"
                );
                changes.extend(objects.into_iter().map(Change::Upsert));
                *known = now;
                Some(Step::Listed(changes))
            }
            Event::Apply(o) => {
                let o = wrap(o);
                known.insert(o.key());
                Some(Step::Changed(vec![Change::Upsert(o)]))
            }
            Event::Delete(o) => {
                let k = wrap(o).key();
                known.remove(&k);
                Some(Step::Changed(vec![Change::Delete(k)]))
            }
        }
    }
}

/// Only what the model reads of a Pod (its `PodView`): managed fields,
/// annotations, volumes, images and the rest are dropped as each pod
/// arrives, so a list of many pods is not held whole meanwhile.
fn trim_pod(p: Pod) -> Pod {
    use k8s_openapi::api::core::v1::{Container, ContainerPort, PodCondition, PodSpec, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    let m = p.metadata;
    Pod {
        metadata: ObjectMeta {
            name: m.name,
            namespace: m.namespace,
            uid: m.uid,
            resource_version: m.resource_version,
            labels: m.labels,
            owner_references: m.owner_references,
            deletion_timestamp: m.deletion_timestamp,
            ..Default::default()
        },
        spec: p.spec.map(|s| PodSpec {
            node_name: s.node_name,
            service_account_name: s.service_account_name,
            host_network: s.host_network,
            containers: s
                .containers
                .into_iter()
                .map(|c| Container {
                    name: c.name,
                    ports: c.ports.map(|ports| {
                        ports
                            .into_iter()
                            .map(|cp| ContainerPort {
                                name: cp.name,
                                container_port: cp.container_port,
                                ..Default::default()
                            })
                            .collect()
                    }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }),
        status: p.status.map(|s| PodStatus {
            phase: s.phase,
            pod_ip: s.pod_ip,
            pod_ips: s.pod_ips,
            conditions: s.conditions.map(|cs| {
                cs.into_iter()
                    .map(|c| PodCondition {
                        type_: c.type_,
                        status: c.status,
                        ..Default::default()
                    })
                    .collect()
            }),
            ..Default::default()
        }),
    }
}

/// What the watcher said, if anything, before a deadline.
enum Next<K> {
    Event(watcher::Result<Event<K>>),
    /// The stream ended.
    End,
    /// The deadline passed first.
    Late,
}

async fn next_before<K>(
    stream: &mut BoxStream<'static, watcher::Result<Event<K>>>,
    deadline: Option<tokio::time::Instant>,
) -> Next<K> {
    let next = async {
        match stream.next().await {
            Some(ev) => Next::Event(ev),
            None => Next::End,
        }
    };
    match deadline {
        None => next.await,
        Some(d) => tokio::select! {
            n = next => n,
            _ = tokio::time::sleep_until(d) => Next::Late,
        },
    }
}

/// A batch of changes: a whole list, or one event.
enum Step {
    Listed(Vec<Change>),
    Changed(Vec<Change>),
}

/// Changes from every watcher; each kind's state is in the hub's
/// [`Sources`].
pub struct Watchers {
    pub changes: mpsc::Receiver<Vec<Change>>,
}

/// Starts a watcher per kind the model uses, each registered in `sources`.
/// The watchers' client is made from `config` without the client's own
/// retries (of 429 and 503, up to minutes): the watchers retry by their own
/// backoff, which a success resets.
pub fn watch_all(config: kube::Config, sources: Arc<Sources>) -> Result<Watchers, kube::Error> {
    watch_all_with(config, sources, WatchOptions::default())
}

/// How the watchers treat trouble.
#[derive(Debug, Clone, Copy)]
pub struct WatchOptions {
    /// How long the objects of a kind that only widens access (grants) stay
    /// in force while its watch fails: then they are all dropped.
    pub widening_grace: Duration,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            widening_grace: WIDENING_GRACE,
        }
    }
}

/// The server-side timeout of a grant watch, in seconds: two thirds of the
/// grace (20 s of 30 s), so a healthy watch is renewed well within it.
fn widening_watch_timeout(grace: Duration) -> u32 {
    u32::try_from(grace.as_secs() * 2 / 3)
        .unwrap_or(u32::MAX)
        .max(1)
}

/// The read timeout of the grants' client: five sixths of the grace (25 s
/// of 30 s), above the watch timeout and below the grace.
fn widening_read_timeout(grace: Duration) -> Duration {
    (grace * 5 / 6)
        .max(Duration::from_secs(widening_watch_timeout(grace).into()) + Duration::from_millis(500))
}

/// [`watch_all`], with `options`.
pub fn watch_all_with(
    config: kube::Config,
    sources: Arc<Sources>,
    options: WatchOptions,
) -> Result<Watchers, kube::Error> {
    let mut config = config;
    config.default_retry = false;
    let client = Client::try_from(config.clone())?;
    // Grants: a silent network (no reset) must not keep them for minutes.
    // The API server ends each watch before the read timeout, so a healthy
    // quiet watch is never cut; a dead connection errors within it.
    config.read_timeout = Some(widening_read_timeout(options.widening_grace));
    let widening_client = Client::try_from(config)?;
    let (tx, rx) = mpsc::channel(64);
    macro_rules! watch {
        ($t:ty, $variant:ident, $name:literal, $narrows:expr) => {
            watch!(
                $t,
                $variant,
                $name,
                $narrows,
                watcher::Config::default(),
                |o| o
            )
        };
        ($t:ty, $variant:ident, $name:literal, $narrows:expr, $config:expr, $prepare:expr) => {
            watch!($t, $variant, $name, $narrows, $config, $prepare, client)
        };
        ($t:ty, $variant:ident, $name:literal, $narrows:expr, $config:expr, $prepare:expr, $client:expr) => {
            let api = Api::<$t>::all($client.clone());
            sources.register($name, api.resource_url().to_string(), $narrows);
            tokio::spawn(
                Watch {
                    api,
                    config: $config,
                    wrap: |o| Object::$variant(Box::new($prepare(o))),
                    kind: $name,
                    tx: tx.clone(),
                    sources: sources.clone(),
                    client: $client.clone(),
                    widens: Kind::from_name($name).is_some_and(Kind::widens_access),
                    grace: options.widening_grace,
                }
                .run(),
            );
        };
    }
    watch!(Namespace, Namespace, "Namespace", false);
    watch!(Pod, Pod, "Pod", false, watcher::Config::default(), trim_pod);
    watch!(Service, Service, "Service", false);
    watch!(EndpointSlice, EndpointSlice, "EndpointSlice", false);
    watch!(GatewayClass, GatewayClass, "GatewayClass", false);
    watch!(Gateway, Gateway, "Gateway", false);
    watch!(HttpRoute, HttpRoute, "HTTPRoute", false);
    // Grants only widen what routes may reach: without them (not served,
    // forbidden, failing past the grace: every known grant is dropped)
    // cross-namespace backends are refused, so they never hold the mesh
    // back.
    watch!(
        ReferenceGrant,
        ReferenceGrant,
        "ReferenceGrant",
        false,
        watcher::Config::default().timeout(widening_watch_timeout(options.widening_grace)),
        |o| o,
        widening_client
    );
    // Held as the HTTPRoute it amounts to (grpcroute.rs).
    watch!(
        GrpcRoute,
        HttpRoute,
        "GRPCRoute",
        false,
        watcher::Config::default(),
        |g: GrpcRoute| super::grpcroute::as_http_route(&g)
    );
    // Policies narrow access: never served without them while they may
    // exist (see `sources`).
    watch!(
        AuthorizationPolicy,
        AuthorizationPolicy,
        "AuthorizationPolicy",
        true
    );
    watch!(
        PeerAuthentication,
        PeerAuthentication,
        "PeerAuthentication",
        true
    );
    watch!(DestinationRule, DestinationRule, "DestinationRule", false);
    watch!(TrafficPolicy, TrafficPolicy, "TrafficPolicy", false);
    // Only TLS Secrets (the ingress's certificates): the controller has no
    // business holding any other Secret in memory.
    watch!(
        Secret,
        Secret,
        "Secret",
        false,
        watcher::Config::default().fields(&format!("type={TLS_SECRET_TYPE}")),
        merge_string_data
    );
    Ok(Watchers { changes: rx })
}

/// The only Secret type a listener's certificate comes from.
pub const TLS_SECRET_TYPE: &str = "kubernetes.io/tls";

/// Where a source's changes go: the xDS hub, passed down as this trait so
/// the config layer never names the layer above it.
pub trait ChangeSink: Send + Sync + 'static {
    /// The settled state of every kind the source watches.
    fn sources(&self) -> &Arc<Sources>;
    /// Applies one batch of changes (one push).
    fn apply(&self, batch: Vec<Change>);
    fn is_ready(&self) -> bool;
    fn set_ready(&self);
}

/// Whether a batch may go out alone, ahead of its window: only pods and
/// endpoints, whose lone change never widens access (a delete only narrows
/// it). Any other kind waits its window, so an object replaced as
/// delete-then-create a few ms apart (kubectl replace --force, Helm, Argo)
/// goes out as one push, never as the delete alone: a policy's delete
/// widens access, and a waypoint Gateway's or its Service's leaves their
/// services with no waypoint and their L7 policies enforced nowhere.
fn goes_at_once(batch: &[Change]) -> bool {
    batch.iter().all(|c| {
        let kind = match c {
            Change::Upsert(o) => o.key().kind,
            Change::Delete(k) => k.kind,
        };
        matches!(kind, Kind::Pod | Kind::EndpointSlice)
    })
}

/// Applies changes from a source to the hub, batching what arrives within
/// `window` into one push: at most one apply per window. The batching is
/// leading-edge once the hub is ready: a change after a quiet period (a
/// whole window since the last change and since the last apply) is applied
/// at once if it is only pods and endpoints (see `goes_at_once`), and what
/// follows within the window is applied together at its end. Until the hub
/// is ready every batch waits its window, so the initial lists go out
/// together.
/// The hub becomes ready once every kind is settled (listed, or reported
/// as not served: see [`Sources`]) and what they listed has been applied.
pub async fn feed(hub: Arc<impl ChangeSink>, w: Watchers, window: Duration) {
    let Watchers { changes: mut rx } = w;
    let sources = hub.sources().clone();
    let mut states = sources.subscribe();
    // When the last change arrived, and when the last apply was made.
    let mut last: Option<tokio::time::Instant> = None;
    let mut applied: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            batch = rx.recv() => {
                let Some(batch) = batch else { return };
                let now = tokio::time::Instant::now();
                let quiet = [last, applied]
                    .iter()
                    .all(|t| t.is_none_or(|t| now.duration_since(t) >= window));
                last = Some(now);
                let lead = hub.is_ready() && quiet && goes_at_once(&batch);
                let mut rest = if lead {
                    hub.apply(batch);
                    applied = Some(tokio::time::Instant::now());
                    Vec::new()
                } else {
                    batch
                };
                let deadline = now + window;
                let mut more_came = false;
                while let Ok(Some(more)) = tokio::time::timeout_at(deadline, rx.recv()).await {
                    rest.extend(more);
                    more_came = true;
                    last = Some(tokio::time::Instant::now());
                }
                if !lead || more_came {
                    hub.apply(rest);
                    applied = Some(tokio::time::Instant::now());
                }
            }
            r = states.changed() => if r.is_err() { return },
        }
        // A kind's list is sent before it counts as listed, so once all
        // are settled and the channel is empty, all are applied.
        if !hub.is_ready() && rx.is_empty() && sources.all_settled() {
            hub.set_ready();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16) -> kube::Error {
        kube::Error::Api(Box::new(kube::core::Status {
            code,
            message: "msg\n".into(),
            ..Default::default()
        }))
    }

    #[test]
    fn a_410_is_no_failure_and_404_403_are_named() {
        let gone = watcher::Error::WatchError(Box::new(kube::core::Status {
            code: 410,
            ..Default::default()
        }));
        assert_eq!(classify(&gone), Trouble::Expired);
        assert_eq!(
            classify(&watcher::Error::InitialListFailed(api_error(404))),
            Trouble::Missing("404 msg".into())
        );
        assert_eq!(
            status_detail(404, "404 page not found\n"),
            "404 page not found"
        );
        assert_eq!(
            classify(&watcher::Error::WatchStartFailed(api_error(403))),
            Trouble::Forbidden("403 msg".into())
        );
        assert!(matches!(
            classify(&watcher::Error::InitialListFailed(api_error(503))),
            Trouble::Failing(_)
        ));
    }
}

#[cfg(test)]
mod trim_tests {
    use super::*;
    use crate::model::pod::PodView;

    #[test]
    fn a_trimmed_pod_looks_the_same_to_the_model() {
        let full: Pod = serde_yaml::from_str(
            r#"
metadata:
  name: web-7d9f-abcde
  namespace: shop
  uid: u-1
  resourceVersion: "42"
  labels: {app: web, istio.io/dataplane-mode: ambient}
  annotations: {kubectl.kubernetes.io/last-applied-configuration: "{}"}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web-7d9f, uid: r}]
  managedFields: [{manager: kubelet, operation: Update}]
spec:
  nodeName: node-a
  serviceAccountName: web
  hostNetwork: false
  volumes: [{name: v, emptyDir: {}}]
  containers:
  - name: c
    image: example/web:1
    args: [--port, "8080"]
    ports: [{name: http, containerPort: 8080, protocol: TCP}]
status:
  phase: Running
  podIP: 10.0.0.1
  podIPs: [{ip: 10.0.0.1}]
  hostIP: 192.168.0.1
  conditions: [{type: Ready, status: "True", lastTransitionTime: "2026-01-01T00:00:00Z"}]
  containerStatuses: [{name: c, image: x, imageID: y, ready: true, restartCount: 0}]
"#,
        )
        .expect("a pod");
        let trimmed = trim_pod(full.clone());
        assert_eq!(PodView::of(&trimmed), PodView::of(&full));
        assert!(trimmed.metadata.managed_fields.is_none());
        assert!(trimmed.metadata.annotations.is_none());
        assert_eq!(trimmed.metadata.resource_version.as_deref(), Some("42"));
        assert!(trimmed.spec.as_ref().is_some_and(|s| s.volumes.is_none()));
    }
}
