//! IPv6 in the dual-stack lab: every pod, node and Service VIP has an IPv6
//! twin (fd00:10:L:i::k). A captured pod's IPv6 TCP is captured like its
//! IPv4: HBONE over IPv6 to a pod on another node (mTLS, as the
//! destination's metrics say), the same-node path, a Service's IPv6 VIP,
//! its AAAA record, passthrough to a plain pod and plaintext in through
//! 15006; and policy `ipBlocks` with IPv6 CIDRs: an ALLOW never matches
//! the other family; a DENY holds for every address of the source.

use std::collections::BTreeSet;
use std::time::Duration;

use e2e::lab::Down as Guard;
use e2e::lab::{Lab, TEST_IDS};
use e2e::mesh::eventually;
use e2e::netns::capture;
use mesh_core::netns::Netns;
use serde_json::Value;

fn yaml(text: &str) -> Vec<Value> {
    e2e::lab::parse_docs(text).unwrap()
}

fn deployment(ns: &str, name: &str, replicas: u32, args: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  replicas: {replicas}\n  selector: {{matchLabels: {{app: {name}}}}}\n  template:\n    metadata: {{labels: {{app: {name}}}}}\n    spec:\n      serviceAccountName: {name}\n      containers: [{{name: app, image: labapp, args: {args}}}]\n---\n"
    )
}

/// `labapp send` from inside a pod; the echoed text, or None when refused.
fn send(lab: &Lab, from: &str, to: &str, text: &str) -> Option<String> {
    let bin = e2e::mesh::binary("labapp");
    let out = lab.exec(from, &[bin.to_str()?, "send", to, text]).ok()?;
    let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && s == text).then_some(s)
}

/// What `name` resolves to inside `pod` (both families), sorted.
fn resolve(lab: &Lab, pod: &str, name: &str) -> BTreeSet<String> {
    let bin = e2e::mesh::binary("labapp");
    let out = lab
        .exec(pod, &[bin.to_str().unwrap(), "resolve", name])
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// `labapp dns`: the addresses `server` answers for `name` (`qtype`), or
/// the error it printed.
fn dig(lab: &Lab, pod: &str, server: &str, name: &str, qtype: &str) -> Vec<String> {
    let bin = e2e::mesh::binary("labapp");
    let out = lab
        .exec(pod, &[bin.to_str().unwrap(), "dns", server, name, qtype])
        .unwrap();
    if !out.status.success() {
        return vec![String::from_utf8_lossy(&out.stderr).trim().to_string()];
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// A node's ztunnel metrics, fetched from inside the node.
fn metrics(lab: &Lab, node: &str) -> String {
    let n = lab.state.nodes.iter().find(|n| n.name == node).unwrap();
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &n.netns])
        .arg(e2e::mesh::binary("labapp"))
        .args(["get", &format!("http://{}:15020/metrics", n.ip)])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

const SHOP: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: legacy}\n---\n";

fn policy(name: &str, action: &str, blocks: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  selector: {{matchLabels: {{app: echo}}}}\n  action: {action}\n  rules: [{{from: [{{source: {{ipBlocks: [{blocks}]}}}}]}}]\n"
    )
}

#[tokio::test]
async fn ipv6_traffic_is_captured_tunnelled_resolved_and_authorized() {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::create_in(dir.path(), TEST_IDS, 2).unwrap();
    let mut g = Guard(lab);
    g.0.start_mesh().await.unwrap();
    let mut docs = SHOP.to_string();
    docs.push_str(&deployment(
        "shop",
        "echo",
        2,
        "[tcp-echo, --port, \"9000\"]",
    )); // node-1, node-2
    docs.push_str(&deployment("shop", "client", 1, "[sleep]")); // node-1
    docs.push_str(&deployment(
        "legacy",
        "lecho",
        1,
        "[tcp-echo, --port, \"9000\"]",
    )); // node-2
    docs.push_str(&deployment("legacy", "lclient", 1, "[sleep]")); // node-1
    docs.push_str("apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: shop}\nspec: {selector: {app: echo}, ports: [{port: 80, targetPort: 9000}]}\n");
    g.0.apply(yaml(&docs)).await.unwrap();
    let lab = &g.0;
    let v6 = |k: &str| lab.pod_ip6(k).unwrap();
    let (echo0, echo1, lecho) = (v6("shop/echo-0"), v6("shop/echo-1"), v6("legacy/lecho-0"));
    assert_eq!(lab.pod("shop/echo-1").unwrap().node, "node-2");
    assert_eq!(lab.pod("shop/client-0").unwrap().node, "node-1");
    assert!(lab.pod("shop/client-0").unwrap().captured);

    // Across nodes, over IPv6: HBONE on the wire, in IPv6 packets.
    eventually(
        "client reaches echo-1 over IPv6",
        Duration::from_secs(30),
        || async { send(lab, "shop/client-0", &format!("[{echo1}]:9000"), "hello6").is_some() },
    )
    .await;
    let marker = "PLAINTEXT-MARKER-ipv6";
    let netns = Netns::open(&format!(
        "/var/run/netns/{}",
        lab.pod("shop/echo-1").unwrap().netns
    ))
    .unwrap();
    let cap = std::thread::spawn(move || {
        capture(
            &netns,
            "eth0",
            Duration::from_millis(1500),
            marker.as_bytes(),
        )
    });
    std::thread::sleep(Duration::from_millis(200));
    assert!(send(lab, "shop/client-0", &format!("[{echo1}]:9000"), marker).is_some());
    let seen = cap.join().unwrap().unwrap();
    assert!(seen.hbone6 > 0 && seen.marker == 0, "{seen:?}");

    // The destination's ztunnel saw mutual TLS from the client's identity.
    let m = metrics(lab, "node-2");
    assert!(
        m.lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("reporter=\"destination\"")
                && l.contains("connection_security_policy=\"mutual_tls\"")
                && l.contains("source_principal=\"spiffe://cluster.local/ns/shop/sa/client\"")
                && l.contains("destination_workload=\"echo")),
        "{m}"
    );

    // The same node, over IPv6.
    assert!(send(lab, "shop/client-0", &format!("[{echo0}]:9000"), "same6").is_some());

    // The Service's IPv6 VIP reaches its endpoints; its names resolve to
    // both VIPs (A and AAAA).
    let vip = lab.state.services["shop/echo"].vip.clone();
    let vip6 = lab.service_vip6("shop/echo").unwrap();
    for i in 0..4 {
        assert!(
            send(lab, "shop/client-0", &format!("[{vip6}]:80"), "via-vip6").is_some(),
            "VIP {vip6}, try {i}"
        );
    }
    let want: BTreeSet<String> = [vip.clone(), vip6.clone()].into();
    for name in ["echo", "echo.shop.svc.cluster.local"] {
        assert_eq!(resolve(lab, "shop/client-0", name), want, "{name}");
    }
    // A pod whose nameserver is an IPv6 address is answered by the
    // ztunnel's DNS proxy as one with an IPv4 nameserver is (any address:
    // port 53 is redirected; here a lab node's, in both families).
    let node = lab.state.nodes[0].ip.clone();
    let node6 = e2e::lab::ipv6_twin(&node).unwrap();
    for server in [format!("[{node6}]:53"), format!("{node}:53")] {
        for (qtype, want) in [("AAAA", &vip6), ("A", &vip)] {
            let got = dig(
                lab,
                "shop/client-0",
                &server,
                "echo.shop.svc.cluster.local",
                qtype,
            );
            assert_eq!(got, vec![want.clone()], "{qtype} from {server}");
        }
    }

    // Ambient to plain: passthrough. Plain to ambient: in through 15006.
    assert!(send(lab, "shop/client-0", &format!("[{lecho}]:9000"), "out6").is_some());
    assert!(send(lab, "legacy/lclient-0", &format!("[{echo0}]:9000"), "in6").is_some());

    // ipBlocks in a dual-stack cluster: a DENY of one of the client's
    // addresses refuses its connections from either (across nodes and on
    // the same node): it is not escaped by switching family.
    let client6 = v6("shop/client-0");
    let client4 = lab.pod("shop/client-0").unwrap().ip.clone();
    let echo1_v4 = lab.pod("shop/echo-1").unwrap().ip.clone();
    for (name, block) in [
        ("deny-v4", format!("{client4}/32")),
        ("deny-v6", format!("\"{client6}/128\"")),
    ] {
        g.0.apply(yaml(&policy(name, "DENY", &block)))
            .await
            .unwrap();
        let lab = &g.0;
        eventually(name, Duration::from_secs(10), || async {
            send(lab, "shop/client-0", &format!("{echo1_v4}:9000"), "x").is_none()
        })
        .await;
        // Across nodes and on the same node (echo-0's ztunnel, node-1, may
        // take the policy a moment later): each is awaited.
        for to in [format!("[{echo1}]:9000"), format!("[{echo0}]:9000")] {
            eventually(
                &format!("{name}: {to}"),
                Duration::from_secs(10),
                || async { send(lab, "shop/client-0", &to, "x").is_none() },
            )
            .await;
        }
        g.0.delete("AuthorizationPolicy", "shop", name).unwrap();
        let lab = &g.0;
        eventually("no DENY", Duration::from_secs(10), || async {
            send(lab, "shop/client-0", &format!("{echo1_v4}:9000"), "x").is_some()
        })
        .await;
    }
    // An ALLOW of IPv6 ULA sources only: IPv6 in, IPv4 out (an IPv4 source
    // is never inside an IPv6 block, nor an IPv6 one inside 0.0.0.0/0).
    g.0.apply(yaml(&policy("allow-v6", "ALLOW", "\"fd00::/8\"")))
        .await
        .unwrap();
    let lab = &g.0;
    eventually(
        "the IPv6 ALLOW applies",
        Duration::from_secs(10),
        || async { send(lab, "shop/client-0", &format!("{echo1_v4}:9000"), "x").is_none() },
    )
    .await;
    assert!(send(lab, "shop/client-0", &format!("[{echo1}]:9000"), "allowed6").is_some());
    g.0.delete("AuthorizationPolicy", "shop", "allow-v6")
        .unwrap();
    g.0.apply(yaml(&policy("allow-v4", "ALLOW", "\"0.0.0.0/0\"")))
        .await
        .unwrap();
    let lab = &g.0;
    eventually(
        "the IPv4 ALLOW applies",
        Duration::from_secs(10),
        || async { send(lab, "shop/client-0", &format!("[{echo1}]:9000"), "x").is_none() },
    )
    .await;
    assert!(
        send(
            lab,
            "shop/client-0",
            &format!("{echo1_v4}:9000"),
            "allowed4"
        )
        .is_some()
    );
}

/// `labapp get` from inside a pod: the status line and the body.
fn get(lab: &Lab, from: &str, url: &str) -> String {
    let bin = e2e::mesh::binary("labapp");
    match lab.exec(from, &[bin.to_str().unwrap_or("labapp"), "get", url]) {
        Ok(out) => String::from_utf8_lossy(&out.stdout).to_string(),
        Err(e) => format!("exec failed: {e}"),
    }
}

/// A waypoint and an ingress gateway serve IPv6 as they serve IPv4: a
/// captured client's request to a Service's IPv6 VIP goes through the
/// Service's waypoint, which applies its L7 policy, and the waypoint's
/// HBONE port accepts IPv6 connections; a client outside the mesh reaches the ingress gateway on its
/// IPv6 address, and the gateway attributes it to its workload by address
/// (as the ztunnel does for plaintext), so its metrics name the caller.
#[tokio::test]
async fn a_waypoint_and_an_ingress_gateway_serve_ipv6() {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::create_in(dir.path(), TEST_IDS, 2).unwrap();
    let mut g = Guard(lab);
    g.0.start_mesh().await.unwrap();
    let mut docs = String::new();
    docs.push_str("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}\n---\n");
    docs.push_str("apiVersion: v1\nkind: Namespace\nmetadata: {name: legacy}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: edge}\n---\n");
    docs.push_str("apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: waypoint, namespace: shop}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n---\n");
    docs.push_str(&deployment(
        "shop",
        "web",
        1,
        "[http-echo, --port, \"8080\"]",
    ));
    docs.push_str("apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080}]}\n---\n");
    docs.push_str(&deployment("shop", "client", 1, "[sleep]"));
    docs.push_str(&deployment("legacy", "lclient", 1, "[sleep]"));
    // The waypoint's own L7 policy: proof that it served the request.
    docs.push_str("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-blocked, namespace: shop}\nspec:\n  targetRefs: [{kind: Service, group: \"\", name: web}]\n  action: DENY\n  rules: [{to: [{operation: {paths: [\"/blocked\"]}}]}]\n---\n");
    docs.push_str("apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: public, namespace: edge}\nspec:\n  gatewayClassName: mesh-ingress\n  listeners:\n  - {name: http, port: 8080, protocol: HTTP, allowedRoutes: {namespaces: {from: All}}}\n---\n");
    docs.push_str("apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: web, namespace: shop}\nspec:\n  parentRefs: [{name: public, namespace: edge}]\n  rules: [{backendRefs: [{name: web, port: 80}]}]\n---\n");
    g.0.apply(yaml(&docs)).await.unwrap();
    let lab = &g.0;
    assert!(lab.pod("shop/client-0").unwrap().captured);
    let vip6 = lab.service_vip6("shop/web").unwrap();

    // Through the waypoint over IPv6: served, and its L7 DENY applies.
    let mut last = String::new();
    eventually(
        "the client reaches web's IPv6 VIP through the waypoint",
        Duration::from_secs(30),
        || {
            last = get(lab, "shop/client-0", &format!("http://[{vip6}]/hello"));
            let ok = last.starts_with("200") && last.contains("pod=web-0");
            async move { ok }
        },
    )
    .await;
    let blocked = get(lab, "shop/client-0", &format!("http://[{vip6}]/blocked"));
    assert!(blocked.starts_with("403"), "{blocked}");
    // The waypoint served the client (its metrics name it).
    let wp = lab.pod("shop/waypoint-0").unwrap().ip.clone();
    let wp_metrics = get(
        lab,
        "shop/waypoint-0",
        &format!("http://{wp}:15020/metrics"),
    );
    assert!(
        wp_metrics
            .lines()
            .any(|l| l.starts_with("istio_requests_total")
                && l.contains("source_canonical_service=\"client\"")),
        "{wp_metrics}"
    );

    // The waypoint's HBONE port takes IPv6 too (a ztunnel dials it in the
    // family it has; the lab's dial IPv4): a connection is accepted.
    let wp6 = lab.pod_ip6("shop/waypoint-0").unwrap();
    let bin = e2e::mesh::binary("labapp");
    let out = lab
        .exec(
            "legacy/lclient-0",
            &[
                bin.to_str().unwrap(),
                "raw",
                &format!("[{wp6}]:15008"),
                "x\r\n",
                "--timeout-ms",
                "2000",
            ],
        )
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The ingress gateway on its IPv6 address, from outside the mesh.
    let ingress6 = lab.pod_ip6("edge/public-0").unwrap();
    eventually(
        "lclient reaches the ingress gateway over IPv6",
        Duration::from_secs(30),
        || {
            last = get(
                lab,
                "legacy/lclient-0",
                &format!("http://[{ingress6}]:8080/in"),
            );
            let ok = last.starts_with("200") && last.contains("pod=web-0");
            async move { ok }
        },
    )
    .await;
    // It attributed the plaintext caller to its workload by address.
    let ingress4 = lab.pod("edge/public-0").unwrap().ip.clone();
    let m = get(
        lab,
        "edge/public-0",
        &format!("http://{ingress4}:15020/metrics"),
    );
    assert!(
        m.lines().any(|l| l.starts_with("istio_requests_total")
            && l.contains("source_canonical_service=\"lclient\"")),
        "{m}"
    );
}
