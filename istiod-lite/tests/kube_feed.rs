//! The Kubernetes source's batching (`config::kube::feed`) against the real
//! hub: the channel the watchers send on is driven by hand, so the timing of
//! each change is the test's. The window is long (5 s) so that nothing here
//! passes by timing luck.

use std::time::Duration;

use istiod_lite::config::kube::{Watchers, feed};
use istiod_lite::config::objects::{Change, Kind, Object, ObjectKey};
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

/// A hub fed by `feed` with its initial list applied: the hub, the sender,
/// and when the list's apply was seen (it happened no later).
async fn ready_hub() -> (std::sync::Arc<Hub>, mpsc::Sender<Vec<Change>>, Instant) {
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
    until("the list applied", WINDOW * 3, || applies(&hub) == 1).await;
    (hub, tx, Instant::now())
}

#[tokio::test]
async fn a_lone_change_is_applied_at_once_and_a_burst_is_coalesced() {
    let (hub, tx, listed) = ready_hub().await;

    // A burst (here right after the list's apply, so none of it is quiet):
    // at most two applies (after a quiet window the first change goes at
    // once, the rest at the window's end).
    let before = applies(&hub);
    for i in 1..=20 {
        tx.send(vec![pod(&format!("web-{i}"), &format!("10.0.0.{}", i + 1))])
            .await
            .expect("feed runs");
    }
    until("the burst", WINDOW * 3, || {
        hub.model().dump()["workloads"]
            .as_array()
            .is_some_and(|w| w.len() == 21)
    })
    .await;
    // The burst's last apply happened no later than now.
    let burst_applied = Instant::now();
    // Whatever follows the window's end would be a third apply.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let burst = applies(&hub) - before;
    assert!(
        (1..=2).contains(&burst),
        "a burst of 20 changes made {burst} applies"
    );
    assert!(listed.elapsed() >= WINDOW, "the burst was batched");

    // A lone change after a quiet period (a full window since the last
    // change and the last apply) reaches the hub well before the window
    // would end.
    tokio::time::sleep_until(burst_applied + WINDOW + Duration::from_millis(50)).await;
    let before = applies(&hub);
    let sent = Instant::now();
    tx.send(vec![pod("lone", "10.0.1.1")])
        .await
        .expect("feed runs");
    until("the lone change", WINDOW / 5, || applies(&hub) > before).await;
    assert!(sent.elapsed() < WINDOW / 5);
    assert_eq!(applies(&hub), before + 1);
}

fn policy_delete(name: &str) -> Change {
    delete(Kind::AuthorizationPolicy, name)
}

fn delete(kind: Kind, name: &str) -> Change {
    Change::Delete(ObjectKey {
        kind,
        namespace: "shop".into(),
        name: name.into(),
    })
}

/// An object swapped as delete-then-create (kubectl replace --force) must
/// not have its delete applied alone: a change to any kind but pods and
/// endpoints always waits the window (a policy, a waypoint's Gateway),
/// even after a quiet period, while a pod change does not.
#[tokio::test]
async fn a_policy_change_always_waits_the_window() {
    let (hub, tx, listed) = ready_hub().await;
    tokio::time::sleep_until(listed + WINDOW + Duration::from_millis(50)).await;

    let before = applies(&hub);
    let sent = Instant::now();
    tx.send(vec![policy_delete("allow-web")])
        .await
        .expect("feed runs");
    tokio::time::sleep(WINDOW / 5).await;
    assert_eq!(applies(&hub), before, "the policy delete waited");
    assert!(sent.elapsed() < WINDOW, "checked before the window ended");
    until("the policy delete", WINDOW * 3, || applies(&hub) > before).await;
    assert!(sent.elapsed() >= WINDOW, "held the whole window");
    let mut policy_applied = Instant::now();

    // So does any kind but pods and endpoints: a waypoint Gateway (or its
    // Service) replaced as delete-then-create would, deleted alone, leave
    // its services with no waypoint and their L7 policies enforced nowhere.
    for kind in [Kind::Gateway, Kind::Service, Kind::Namespace] {
        tokio::time::sleep_until(policy_applied + WINDOW + Duration::from_millis(50)).await;
        let before = applies(&hub);
        let sent = Instant::now();
        tx.send(vec![delete(kind, "waypoint")])
            .await
            .expect("feed runs");
        tokio::time::sleep(WINDOW / 5).await;
        assert_eq!(applies(&hub), before, "the {kind:?} delete waited");
        assert!(sent.elapsed() < WINDOW, "checked before the window ended");
        until("the delete", WINDOW * 3, || applies(&hub) > before).await;
        policy_applied = Instant::now();
    }

    // A pod change after a quiet window goes at once.
    tokio::time::sleep_until(policy_applied + WINDOW + Duration::from_millis(50)).await;
    let before = applies(&hub);
    let sent = Instant::now();
    tx.send(vec![pod("lone", "10.0.1.1")])
        .await
        .expect("feed runs");
    until("the pod change", WINDOW / 5, || applies(&hub) > before).await;
    assert!(sent.elapsed() < WINDOW / 5);
}

/// Quiet means a full window since the last apply too, not only since the
/// last change: A (at once), B late in A's window (applied at its end), C a
/// window after B but less than one after B's apply: C waits, so there are
/// never two applies within one window.
#[tokio::test]
async fn at_most_one_apply_per_window() {
    let (hub, tx, listed) = ready_hub().await;
    tokio::time::sleep_until(listed + WINDOW + Duration::from_millis(50)).await;

    let before = applies(&hub);
    let a_sent = Instant::now();
    tx.send(vec![pod("a", "10.0.2.1")])
        .await
        .expect("feed runs");
    until("A", WINDOW / 5, || applies(&hub) == before + 1).await;

    tokio::time::sleep_until(a_sent + WINDOW - Duration::from_secs(1)).await;
    let b_sent = Instant::now();
    tx.send(vec![pod("b", "10.0.2.2")])
        .await
        .expect("feed runs");
    until("B", WINDOW * 3, || applies(&hub) == before + 2).await;
    // B's apply, at A's window's end, about a second after B was sent.
    assert!(b_sent.elapsed() < WINDOW, "B applied at A's window's end");

    // A window after B (quiet since the last change), under one after B's
    // apply.
    tokio::time::sleep_until(b_sent + WINDOW + Duration::from_millis(100)).await;
    let c_sent = Instant::now();
    tx.send(vec![pod("c", "10.0.2.3")])
        .await
        .expect("feed runs");
    tokio::time::sleep(WINDOW / 5).await;
    assert_eq!(
        applies(&hub),
        before + 2,
        "C waited: an apply within a window of B's"
    );
    assert!(c_sent.elapsed() < WINDOW, "checked before the window ended");
    until("C", WINDOW * 3, || applies(&hub) == before + 3).await;
}
