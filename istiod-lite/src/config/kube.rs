//! The Kubernetes source: one `kube` watcher per kind, each turned into the
//! same [`Change`]s the folder source produces, so the model cannot tell the
//! two apart. A (re)list, including the one a 410 Gone forces, is diffed
//! against what the watcher knew: objects that vanished meanwhile are deleted.

use std::collections::BTreeSet;
use std::fmt::Debug;

use futures::StreamExt;
use gateway_api::apis::experimental::httproutes::HttpRoute;
use gateway_api::apis::standard::gateways::Gateway;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::crds::{AuthorizationPolicy, DestinationRule, PeerAuthentication, TrafficPolicy};
use super::objects::{Change, Object, ObjectKey, merge_string_data};
use crate::model::ingress::TLS_SECRET_TYPE;

async fn watch_kind<K>(
    api: Api<K>,
    config: watcher::Config,
    wrap: fn(K) -> Object,
    name: &'static str,
    tx: mpsc::Sender<Vec<Change>>,
    listed: std::sync::Arc<tokio::sync::watch::Sender<usize>>,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let mut stream = watcher::watcher(api, config).default_backoff().boxed();
    let mut known: BTreeSet<ObjectKey> = BTreeSet::new();
    let mut listing: Option<Vec<Object>> = None;
    let mut first_list = true;
    while let Some(ev) = stream.next().await {
        let changes = match ev {
            Ok(Event::Init) => {
                listing = Some(Vec::new());
                continue;
            }
            Ok(Event::InitApply(o)) => {
                listing.get_or_insert_with(Vec::new).push(wrap(o));
                continue;
            }
            Ok(Event::InitDone) => {
                let objects = listing.take().unwrap_or_default();
                let now: BTreeSet<ObjectKey> = objects.iter().map(Object::key).collect();
                let mut changes: Vec<Change> = known
                    .difference(&now)
                    .cloned()
                    .map(Change::Delete)
                    .collect();
                info!(
                    kind = name,
                    objects = objects.len(),
                    removed = changes.len(),
                    "listed"
                );
                changes.extend(objects.into_iter().map(Change::Upsert));
                known = now;
                changes
            }
            Ok(Event::Apply(o)) => {
                let o = wrap(o);
                known.insert(o.key());
                vec![Change::Upsert(o)]
            }
            Ok(Event::Delete(o)) => {
                let k = wrap(o).key();
                known.remove(&k);
                vec![Change::Delete(k)]
            }
            Err(e) => {
                warn!(kind = name, error = %e, "watch failed; retrying with backoff");
                continue;
            }
        };
        if tx.send(changes).await.is_err() {
            return;
        }
        if first_list && listing.is_none() {
            first_list = false;
            listed.send_modify(|n| *n += 1);
        }
    }
}

/// Changes from every watcher, and how many kinds have finished their first
/// list (of `kinds`).
pub struct Watchers {
    pub changes: mpsc::Receiver<Vec<Change>>,
    pub listed: tokio::sync::watch::Receiver<usize>,
    pub kinds: usize,
}

/// Starts a watcher per kind the model uses.
pub fn watch_all(client: Client) -> Watchers {
    let (tx, rx) = mpsc::channel(64);
    let listed = std::sync::Arc::new(tokio::sync::watch::Sender::new(0usize));
    let mut kinds = 0;
    macro_rules! watch {
        ($t:ty, $variant:ident, $name:literal) => {
            watch!($t, $variant, $name, watcher::Config::default(), |o| o)
        };
        ($t:ty, $variant:ident, $name:literal, $config:expr, $prepare:expr) => {
            kinds += 1;
            tokio::spawn(watch_kind(
                Api::<$t>::all(client.clone()),
                $config,
                |o| Object::$variant(Box::new($prepare(o))),
                $name,
                tx.clone(),
                listed.clone(),
            ));
        };
    }
    watch!(Namespace, Namespace, "Namespace");
    watch!(Pod, Pod, "Pod");
    watch!(Service, Service, "Service");
    watch!(EndpointSlice, EndpointSlice, "EndpointSlice");
    watch!(Gateway, Gateway, "Gateway");
    watch!(HttpRoute, HttpRoute, "HTTPRoute");
    watch!(
        AuthorizationPolicy,
        AuthorizationPolicy,
        "AuthorizationPolicy"
    );
    watch!(PeerAuthentication, PeerAuthentication, "PeerAuthentication");
    watch!(DestinationRule, DestinationRule, "DestinationRule");
    watch!(TrafficPolicy, TrafficPolicy, "TrafficPolicy");
    // Only TLS Secrets (the ingress's certificates): the controller has no
    // business holding any other Secret in memory.
    watch!(
        Secret,
        Secret,
        "Secret",
        watcher::Config::default().fields(&format!("type={TLS_SECRET_TYPE}")),
        merge_string_data
    );
    Watchers {
        changes: rx,
        listed: listed.subscribe(),
        kinds,
    }
}

/// Applies changes from a source to the hub, batching what arrives within
/// `window` into one push (a debounce: a burst of events costs one push).
/// The hub becomes ready once every kind has listed and what they listed
/// has been applied.
pub async fn feed(hub: std::sync::Arc<crate::xds::Hub>, w: Watchers, window: std::time::Duration) {
    let Watchers {
        changes: mut rx,
        listed,
        kinds,
    } = w;
    while let Some(mut batch) = rx.recv().await {
        let deadline = tokio::time::Instant::now() + window;
        while let Ok(Some(more)) = tokio::time::timeout_at(deadline, rx.recv()).await {
            batch.extend(more);
        }
        hub.apply(batch);
        // Every kind's first list is sent before it counts as listed, so
        // once all have counted and the channel is empty, all are applied.
        if *listed.borrow() == kinds && rx.is_empty() {
            hub.set_ready();
        }
    }
}
