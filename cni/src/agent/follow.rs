//! One watch of the API server kept current in a reflector store, for
//! [`crate::agent::watch`]. A failed watch is started again from a fresh
//! list (never resumed where it stopped, which would show nothing until the
//! next change); from the failure until that list is in, the watch is
//! `behind` (its store still shows what it did before), and the agent
//! decides nothing on it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher;
use tokio::sync::Notify;
use tracing::warn;

/// The first wait after a watch fails, and the longest: short, since each
/// node watches little (its own pods, the namespaces) and a stale view
/// holds every enrollment change on the node.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(8);
/// How long a watch must run before its next failure waits the first wait
/// again (a watch that lists and fails at once keeps backing off).
const HEALTHY_AFTER: Duration = Duration::from_secs(60);

/// Sets `behind` when dropped: a task that ended (panicked, or its stream
/// closed) must not leave a store that looks current.
struct Stale(Arc<AtomicBool>);

impl Drop for Stale {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Applies one watch result to `store`; `behind` from a failure until a
/// list is whole (the store is swapped at its end) or a change comes.
/// Whether the watch goes on.
pub(crate) fn on_event<K>(
    store: &mut Writer<K>,
    behind: &AtomicBool,
    e: Result<watcher::Event<K>, watcher::Error>,
) -> Result<(), watcher::Error>
where
    K: kube::Resource + Clone,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    let e = e.inspect_err(|_| behind.store(true, Ordering::Release))?;
    store.apply_watcher_event(&e);
    if !matches!(e, watcher::Event::Init | watcher::Event::InitApply(_)) {
        behind.store(false, Ordering::Release);
    }
    Ok(())
}

/// Keeps `store` current from a watch of `api`, after a failure listing
/// again after a wait that doubles from [`RETRY_FIRST`] to [`RETRY_MAX`]
/// (drawn from its upper half) and starts over once a watch has run
/// [`HEALTHY_AFTER`]; `changed` is notified on every event.
pub(crate) async fn follow<K>(
    what: &'static str,
    api: kube::Api<K>,
    config: watcher::Config,
    mut store: Writer<K>,
    behind: Arc<AtomicBool>,
    changed: Arc<Notify>,
) where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let _stale = Stale(behind.clone());
    let mut wait = RETRY_FIRST;
    loop {
        let started = Instant::now();
        let mut events = watcher(api.clone(), config.clone()).boxed();
        while let Some(e) = events.next().await {
            let r = on_event(&mut store, &behind, e);
            changed.notify_one();
            if let Err(e) = r {
                warn!(what, error = %e, "watch failed; listing again");
                break;
            }
        }
        // A stream that ended without a failure is no more current.
        behind.store(true, Ordering::Release);
        changed.notify_one();
        if started.elapsed() >= HEALTHY_AFTER {
            wait = RETRY_FIRST;
        }
        tokio::time::sleep(wait.mul_f64(0.5 + fastrand::f64() * 0.5)).await;
        wait = (wait * 2).min(RETRY_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Namespace;
    use watcher::Event;

    fn ns(label: &str) -> Namespace {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "shop", "labels": {"istio.io/dataplane-mode": label}}
        }))
        .expect("a namespace")
    }

    /// A failure makes the watch behind until a new list is whole: while
    /// it comes in, the store still shows the old objects; at its end, the
    /// new ones, and the watch is current again.
    #[test]
    fn a_failed_watch_is_behind_until_its_next_list_is_whole() {
        let (reader, mut store) = kube::runtime::reflector::store::<Namespace>();
        let behind = AtomicBool::new(false);
        let label = || {
            reader.state()[0]
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("istio.io/dataplane-mode").cloned())
        };
        for e in [
            Event::Init,
            Event::InitApply(ns("ambient")),
            Event::InitDone,
        ] {
            on_event(&mut store, &behind, Ok(e)).expect("applied");
        }
        assert!(!behind.load(Ordering::Acquire));
        let failed = on_event(&mut store, &behind, Err(watcher::Error::NoResourceVersion));
        assert!(failed.is_err() && behind.load(Ordering::Acquire));
        for e in [Event::Init, Event::InitApply(ns("none"))] {
            on_event(&mut store, &behind, Ok(e)).expect("applied");
            assert!(
                behind.load(Ordering::Acquire),
                "current before the list ended"
            );
        }
        assert_eq!(label().as_deref(), Some("ambient"));
        on_event(&mut store, &behind, Ok(Event::InitDone)).expect("applied");
        assert!(!behind.load(Ordering::Acquire));
        assert_eq!(label().as_deref(), Some("none"));
    }

    #[test]
    fn an_ended_task_leaves_its_watch_behind() {
        let behind = Arc::new(AtomicBool::new(false));
        drop(Stale(behind.clone()));
        assert!(behind.load(Ordering::Acquire));
    }
}
