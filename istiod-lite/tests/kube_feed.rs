//! The Kubernetes source's batching (`config::kube::feed`) against the real
//! hub: the channel the watchers send on is driven by hand, so the timing of
//! each change is the test's. The window is long (5 s) so that nothing here
//! passes by timing luck.

use std::time::Duration;

use istiod_lite::config::kube::{Watchers, feed};
use istiod_lite::config::objects::{Change, Object};
use istiod_lite::config::sources::State;
use istiod_lite::model::{Model, ModelConfig};
use istiod_lite::xds::Hub;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;

const WINDOW: Duration = Duration::from_secs(5);

fn pod(name: &str, ip: &str) -> Change {
    let v: Value = serde_yaml::from_str(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, uid: uid-{name}, labels: {{app: web}}}}\nspec: {{nodeName: node-a, serviceAccountName: web, containers: [{{name: c, image: x}}]}}\nstatus: {{podIP: {ip}, phase: Running}}\n"
    ))
    .expect("yaml");
    Change::Upsert(Object::parse(v).expect("parses").expect("an object"))
}

fn applies(hub: &Hub) -> u64 {
    *hub.applied().borrow()
}

async fn until(what: &str, within: Duration, f: impl Fn() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_lone_change_is_applied_at_once_and_a_burst_is_coalesced() {
    let hub = Hub::new(Model::new(ModelConfig::default()));
    hub.sources().register("Pod", "pods".into(), false);
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(feed(hub.clone(), Watchers { changes: rx }, WINDOW));

    // The initial list, as a watcher sends it: the list, then the kind
    // counts as listed.
    let ns: Value = serde_yaml::from_str(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n",
    )
    .expect("yaml");
    let ns = Change::Upsert(Object::parse(ns).expect("parses").expect("an object"));
    tx.send(vec![ns, pod("web-0", "10.0.0.1")])
        .await
        .expect("feed runs");
    hub.sources().set("Pod", State::Listed, None);
    until("ready", WINDOW * 3, || hub.is_ready()).await;
    assert_eq!(applies(&hub), 1, "the initial list is one apply");
    let listed = Instant::now();

    // A burst after a quiet period (the list was a window ago): at most two
    // applies (the first change at once, the rest at the window's end).
    let before = applies(&hub);
    for i in 1..=20 {
        tx.send(vec![pod(&format!("web-{i}"), &format!("10.0.0.{}", i + 1))])
            .await
            .expect("feed runs");
    }
    let burst_sent = Instant::now();
    until("the burst", WINDOW * 3, || {
        hub.model().dump()["workloads"]
            .as_array()
            .is_some_and(|w| w.len() == 21)
    })
    .await;
    // Whatever follows the window's end would be a third apply.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let burst = applies(&hub) - before;
    assert!(
        (1..=2).contains(&burst),
        "a burst of 20 changes made {burst} applies"
    );
    assert!(listed.elapsed() >= WINDOW, "the burst was batched");

    // A lone change after a quiet period reaches the hub well before the
    // window would end.
    tokio::time::sleep_until(burst_sent + WINDOW + Duration::from_millis(50)).await;
    let before = applies(&hub);
    let sent = Instant::now();
    tx.send(vec![pod("lone", "10.0.1.1")])
        .await
        .expect("feed runs");
    until("the lone change", WINDOW / 5, || applies(&hub) > before).await;
    assert!(sent.elapsed() < WINDOW / 5);
    assert_eq!(applies(&hub), before + 1);
}
