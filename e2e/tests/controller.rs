//! istiod-lite over real gRPC: the folder source, Delta ADS to ztunnel-side
//! clients, restarts, many clients, NACKs, and the CA's node check.

use std::time::{Duration, Instant};

use e2e::controller::{Controller, XdsSession, ambient_namespace, pod};
use e2e::mesh::eventually;
use mesh_core::ca::CaClient;

fn has(s: &XdsSession, uid: &str) -> bool {
    s.state.snapshot().workload(uid).is_some()
}

const WEB: &str = "Kubernetes//Pod/shop/web-1";

#[tokio::test]
async fn a_client_sees_new_pods_removals_and_policy_changes() {
    let dir = tempfile::tempdir().unwrap();
    let c = Controller::start(dir.path(), &["node-a"]).await;
    c.write("ns.yaml", &ambient_namespace("shop"));
    let s = c.xds_client("node-a");
    tokio::time::timeout(Duration::from_secs(10), s.client.wait_synced())
        .await
        .expect("synced");

    let t0 = Instant::now();
    c.write(
        "web.yaml",
        &pod("shop", "web-1", "web", "10.1.0.5", "node-a"),
    );
    eventually("the new pod", Duration::from_secs(5), || async {
        has(&s, WEB)
    })
    .await;
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "the pod took {took:?} to arrive"
    );
    let w = s.state.snapshot().workload(WEB).cloned().unwrap();
    assert_eq!(
        w.identity.to_string(),
        "spiffe://cluster.local/ns/shop/sa/web"
    );

    let policy = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-all, namespace: shop}\nspec: {action: DENY, rules: [{}]}\n";
    c.write("policy.yaml", policy);
    eventually("the policy", Duration::from_secs(5), || async {
        s.state.snapshot().policies().any(|p| p.name == "deny-all")
    })
    .await;
    c.remove("policy.yaml");
    c.remove("web.yaml");
    eventually("removals", Duration::from_secs(5), || async {
        !has(&s, WEB) && s.state.snapshot().policies().next().is_none()
    })
    .await;
}

#[tokio::test]
async fn clients_keep_their_state_through_a_controller_restart_and_resync_without_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Controller::start(dir.path(), &["node-a"]).await;
    c.write("ns.yaml", &ambient_namespace("shop"));
    c.write(
        "web.yaml",
        &pod("shop", "web-1", "web", "10.1.0.5", "node-a"),
    );
    let s = c.xds_client("node-a");
    eventually("initial state", Duration::from_secs(10), || async {
        has(&s, WEB)
    })
    .await;
    let received = s
        .client
        .stats
        .resources
        .load(std::sync::atomic::Ordering::Relaxed);

    c.kill();
    // The controller is gone: the state stays.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(has(&s, WEB), "state lost while the controller was down");
    }
    c.spawn().await;
    eventually("reconnected", Duration::from_secs(20), || async {
        s.client
            .stats
            .connects
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(has(&s, WEB));
    let after = s
        .client
        .stats
        .resources
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        after, received,
        "nothing is re-sent: the client stated the versions it holds"
    );

    // And changes flow again.
    c.write("db.yaml", &pod("shop", "db-1", "db", "10.1.0.6", "node-a"));
    eventually(
        "a change after the restart",
        Duration::from_secs(5),
        || async { has(&s, "Kubernetes//Pod/shop/db-1") },
    )
    .await;
}

#[tokio::test]
async fn fifty_clients_converge() {
    let dir = tempfile::tempdir().unwrap();
    let nodes: Vec<String> = (0..50).map(|i| format!("node-{i}")).collect();
    let refs: Vec<&str> = nodes.iter().map(String::as_str).collect();
    let c = Controller::start(dir.path(), &refs).await;
    c.write("ns.yaml", &ambient_namespace("shop"));
    let sessions: Vec<XdsSession> = nodes.iter().map(|n| c.xds_client(n)).collect();
    for i in 0..20 {
        c.write(
            &format!("p{i}.yaml"),
            &pod(
                "shop",
                &format!("p-{i}"),
                "app",
                &format!("10.2.0.{}", i + 1),
                "node-0",
            ),
        );
    }
    eventually(
        "all fifty clients hold all twenty pods",
        Duration::from_secs(20),
        || async {
            sessions
                .iter()
                .all(|s| (0..20).all(|i| has(s, &format!("Kubernetes//Pod/shop/p-{i}"))))
        },
    )
    .await;
    let conns = c.debug_json("/debug/connections").await;
    assert_eq!(conns["connections"].as_array().unwrap().len(), 50);
}

#[tokio::test]
async fn a_nack_is_visible_in_the_debug_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let c = Controller::start(dir.path(), &["node-a"]).await;
    c.write("ns.yaml", &ambient_namespace("shop"));
    let s = c.xds_client("node-a");
    s.client.wait_synced().await;
    // A service account no SPIFFE identity can carry: the proxy rejects it.
    c.write(
        "bad.yaml",
        &pod("shop", "odd-1", "bad@account", "10.1.0.9", "node-a"),
    );
    c.write(
        "web.yaml",
        &pod("shop", "web-1", "web", "10.1.0.5", "node-a"),
    );
    eventually("the NACK is recorded", Duration::from_secs(5), || async {
        let v = c.debug_json("/debug/connections").await;
        v["connections"][0]["types"]["type.googleapis.com/istio.workload.Address"]["nacks"]
            .as_u64()
            .unwrap_or(0)
            >= 1
    })
    .await;
    let v = c.debug_json("/debug/connections").await;
    let err = v["connections"][0]["types"]["type.googleapis.com/istio.workload.Address"]["last_nack"]["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        err.contains("Kubernetes//Pod/shop/odd-1") && err.contains("service account"),
        "{err}"
    );
    // The rest still applies, and later pushes still flow.
    eventually(
        "good resources still applied",
        Duration::from_secs(5),
        || async { has(&s, WEB) },
    )
    .await;
    c.write("db.yaml", &pod("shop", "db-1", "db", "10.1.0.6", "node-a"));
    eventually("later pushes", Duration::from_secs(5), || async {
        has(&s, "Kubernetes//Pod/shop/db-1")
    })
    .await;
}

#[tokio::test]
async fn the_ca_issues_only_identities_running_on_the_callers_node() {
    let dir = tempfile::tempdir().unwrap();
    let c = Controller::start(dir.path(), &["node-a", "node-b"]).await;
    c.write("ns.yaml", &ambient_namespace("shop"));
    c.write(
        "web.yaml",
        &pod("shop", "web-1", "web", "10.1.0.5", "node-a"),
    );
    let web: mesh_core::identity::Identity =
        "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
    eventually("node-a gets web", Duration::from_secs(5), || async {
        c.ca_client("node-a").fetch_certificate(&web).await.is_ok()
    })
    .await;
    let err = c
        .ca_client("node-b")
        .fetch_certificate(&web)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("no workload with identity"),
        "{err}"
    );
    // Reschedule the pod: the answer follows the model.
    c.write(
        "web.yaml",
        &pod("shop", "web-1", "web", "10.1.0.5", "node-b"),
    );
    eventually(
        "node-b gets web after the move",
        Duration::from_secs(5),
        || async { c.ca_client("node-b").fetch_certificate(&web).await.is_ok() },
    )
    .await;
    assert!(c.ca_client("node-a").fetch_certificate(&web).await.is_err());
}

/// Fail closed, end to end: a real istiod-lite converts an ALLOW whose only
/// ports are invalid, the production xDS client carries it, and the
/// ztunnel's decision function denies what that ALLOW was meant to limit;
/// the controller names the problem on the policy.
#[tokio::test]
async fn an_allow_with_only_invalid_ports_denies_and_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let c = Controller::start(dir.path(), &["node-a"]).await;
    c.write("ns.yaml", &ambient_namespace("shop"));
    c.write(
        "web.yaml",
        &pod("shop", "web-1", "web", "10.1.0.5", "node-a"),
    );
    c.write(
        "policy.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: web-http, namespace: shop}\nspec: {action: ALLOW, rules: [{to: [{operation: {ports: [http]}}]}]}\n",
    );
    let s = c.xds_client("node-a");
    eventually(
        "the pod and its policy",
        Duration::from_secs(10),
        || async { has(&s, WEB) && s.state.snapshot().policies().any(|p| p.name == "web-http") },
    )
    .await;
    let snap = s.state.snapshot();
    let web = snap.workload(WEB).cloned().unwrap();
    let client: mesh_core::identity::Identity =
        "spiffe://cluster.local/ns/shop/sa/client".parse().unwrap();
    let ip: std::net::IpAddr = "10.1.0.5".parse().unwrap();
    let decision = mesh_core::state::decide::authorize(
        &snap,
        "istio-system",
        &web,
        Some(&client),
        "10.1.0.7".parse().unwrap(),
        std::net::SocketAddr::new(ip, 8080),
    );
    assert!(!decision.is_allowed(), "{decision}");
    let config = c.debug_json("/debug/config").await;
    let issues = config["model_issues"].to_string();
    assert!(
        issues.contains("web-http") && issues.contains("never matches (fail closed)"),
        "{issues}"
    );
}
