//! meshctl on Kubernetes, against an API server that answers with recorded
//! responses (there is no Kubernetes here): pods listed by label, the
//! ztunnel's admin reached through the pod port-forward (the WebSocket
//! `v4.channel.k8s.io` protocol, bridged to a server of a recorded
//! `/config_dump`), and the patches `enroll` and `waypoint apply` send.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshctl_reaches_ztunnels_through_the_api_server_and_steers_by_patches() {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let admin = recorded_admin().await;
    let api = fake_api(seen.clone(), admin).await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: \"http://{api}\"}}}}]\nusers: [{{name: u, user: {{}}}}]\ncontexts: [{{name: x, context: {{cluster: c, user: u}}}}]\ncurrent-context: x\n"
        ),
    )
    .unwrap();
    let kc = kubeconfig.clone();
    let run = move |args: Vec<&'static str>| {
        let kc = kc.clone();
        tokio::task::spawn_blocking(move || meshctl(&kc, &args))
    };

    let (code, out, err) = run(vec!["ztunnel-config", "workloads"]).await.unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("client-0") && out.contains("HBONE"), "{out}");
    let (code, out, err) = run(vec!["ztunnel-config", "certificates"]).await.unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("node-1") && out.contains("spiffe://cluster.local/ns/shop/sa/client"),
        "{out}"
    );
    let (code, out, err) = run(vec!["why", "shop/client-0", "server.shop"])
        .await
        .unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ALLOWED"), "{out}");
    let forwards = seen.lock().unwrap().forwards.clone();
    let (ztunnel, controller): (Vec<&String>, Vec<&String>) =
        forwards.iter().partition(|f| f.contains("/ztunnel-x7k2p/"));
    assert!(
        !ztunnel.is_empty()
            && ztunnel.iter().all(|f| f
                .starts_with("/api/v1/namespaces/istio-system/pods/ztunnel-x7k2p/portforward?")
                && f.contains("ports=15000")),
        "{forwards:?}"
    );
    // `why` asks the controller (its debug port) for the waypoints' policies.
    assert!(
        controller.iter().all(|f| f
            .starts_with("/api/v1/namespaces/istio-system/pods/istiod-lite-0/")
            && f.contains("ports=15014")),
        "{forwards:?}"
    );

    let (code, out, err) = run(vec!["enroll", "legacy"]).await.unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("legacy enrolled"));
    let (code, _, err) = run(vec![
        "waypoint",
        "apply",
        "-n",
        "shop",
        "--enroll-namespace",
        "--for",
        "all",
    ])
    .await
    .unwrap();
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run(vec!["waypoint", "delete", "-n", "shop"]).await.unwrap();
    assert_eq!(code, 0, "{err}");
    let seen = seen.lock().unwrap();
    let p = &seen.patches;
    assert_eq!(p[0].1, "/api/v1/namespaces/legacy?");
    assert_eq!(
        p[0].2,
        json!({"metadata": {"labels": {"istio.io/dataplane-mode": "ambient"}}})
    );
    assert!(
        p[1].1
            .starts_with("/apis/gateway.networking.k8s.io/v1/namespaces/shop/gateways/waypoint?"),
        "{p:?}"
    );
    assert!(p[1].1.contains("fieldManager=meshctl"), "{p:?}");
    assert_eq!(p[1].2["spec"]["gatewayClassName"], "istio-waypoint");
    assert_eq!(p[1].2["metadata"]["labels"]["istio.io/waypoint-for"], "all");
    assert_eq!(
        p[2].2,
        json!({"metadata": {"labels": {"istio.io/use-waypoint": "waypoint"}}})
    );
    assert_eq!(p[3].0, "DELETE");
    assert_eq!(
        p[4].2,
        json!({"metadata": {"labels": {"istio.io/use-waypoint": null}}})
    );
}

#[tokio::test]
async fn a_cluster_without_ztunnels_is_named() {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let api = fake_api(seen, "127.0.0.1:9".parse().unwrap()).await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: \"http://{api}\"}}}}]\nusers: [{{name: u, user: {{}}}}]\ncontexts: [{{name: x, context: {{cluster: c, user: u}}}}]\ncurrent-context: x\n"
        ),
    )
    .unwrap();
    let (code, _, err) = tokio::task::spawn_blocking(move || {
        meshctl(
            &kubeconfig,
            &["--kube-namespace", "mesh", "ztunnel-config", "workloads"],
        )
    })
    .await
    .unwrap();
    assert_eq!(code, 2);
    assert!(
        err.contains("no ztunnel pods") && err.contains("mesh"),
        "{err}"
    );
}
