//! The node side of a real cluster, in the lab: live enrollment (the node
//! agent watches labels and captures or releases running pods, finding
//! their netns from the node) and kubelet probes that pass the mesh
//! untouched (SNAT on the node, let through in the pod).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use e2e::lab::{Down as Guard, Lab, TEST_IDS};
use e2e::mesh::{binary, eventually};
use e2e::netns::capture;
use mesh_core::netns::Netns;
use serde_json::Value;

fn yaml(text: &str) -> Vec<Value> {
    e2e::lab::parse_docs(text).unwrap()
}

fn pod(ns: &str, name: &str, sa: &str, node: &str, labels: &str, args: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: {name}{labels}}}}}\nspec:\n  nodeName: {node}\n  serviceAccountName: {sa}\n  containers: [{{name: app, image: labapp, args: {args}}}]\n---\n"
    )
}

fn netns_of(lab: &Lab, key: &str) -> Netns {
    Netns::open(&format!("/var/run/netns/{}", lab.pod(key).unwrap().netns)).unwrap()
}

/// `labapp send` from inside a pod; whether the text came back.
fn send(lab: &Lab, from: &str, to: &str, text: &str) -> bool {
    let bin = binary("labapp");
    let Ok(out) = lab.exec(from, &[bin.to_str().unwrap(), "send", to, text]) else {
        return false;
    };
    out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == text
}

/// What the destination pod's eth0 shows of one `send`: (HBONE segments,
/// frames carrying the text in plaintext).
fn on_the_wire(
    lab: &Lab,
    from: &str,
    to: &str,
    to_addr: &str,
    marker: &'static str,
) -> (usize, usize) {
    let netns = netns_of(lab, to);
    let cap = std::thread::spawn(move || {
        capture(
            &netns,
            "eth0",
            Duration::from_millis(1500),
            marker.as_bytes(),
        )
    });
    std::thread::sleep(Duration::from_millis(200));
    let ok = send(lab, from, to_addr, marker);
    let seen = cap.join().unwrap().unwrap();
    assert!(ok, "{from} -> {to_addr} failed");
    (seen.hbone, seen.marker)
}

/// Replaces an object the way `kubectl apply` would on the API server:
/// only the object changes (the lab's `apply` is not involved), so
/// whatever follows is the node agent's own doing.
fn write_object(lab: &Lab, file: &str, text: &str) {
    let path = lab.dir.join("config").join(file);
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, path).unwrap();
}

/// The uids the node's agent holds.
async fn held(dir: &Path, node: &str) -> Vec<String> {
    let v = mesh_cni::agent::call(
        &dir.join(format!("{node}-cni.sock")),
        &mesh_cni::agent::Request::List,
    )
    .await
    .unwrap();
    v["pods"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["uid"].as_str().map(str::to_string))
        .collect()
}

/// Round-trips `text` on a connection the test holds open.
async fn echo(s: &mut tokio::net::TcpStream, text: &[u8]) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; text.len()];
    let round = async {
        s.write_all(text).await?;
        s.read_exact(&mut buf).await
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(5), round).await,
        Ok(Ok(_))
    ) && buf == text
}

#[tokio::test]
async fn labelling_a_namespace_captures_its_running_pods_and_unlabelling_releases_them() {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::create_in(dir.path(), TEST_IDS, 2).unwrap();
    let mut g = Guard(lab);
    g.0.start_mesh().await.unwrap();
    let mut docs = String::new();
    docs.push_str("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n---\n");
    docs.push_str("apiVersion: v1\nkind: Namespace\nmetadata: {name: late}\n---\n");
    docs.push_str(&pod(
        "shop",
        "echo",
        "echo",
        "node-2",
        "",
        "[tcp-echo, --port, \"9000\"]",
    ));
    docs.push_str(&pod("late", "client", "client", "node-1", "", "[sleep]"));
    docs.push_str(&pod(
        "late",
        "optout",
        "optout",
        "node-1",
        ", istio.io/dataplane-mode: none",
        "[sleep]",
    ));
    g.0.apply(yaml(&docs)).await.unwrap();
    let lab = &g.0;
    let echo_ip = lab.pod("shop/echo").unwrap().ip.clone();
    let to = format!("{echo_ip}:9000");
    let client_uid = lab.pod("late/client").unwrap().uid.clone();
    let optout_uid = lab.pod("late/optout").unwrap().uid.clone();
    eventually("echo is reachable", Duration::from_secs(30), || async {
        send(lab, "late/client", &to, "up")
    })
    .await;
    // Not enrolled yet: plaintext reaches echo (through its 15006).
    let (hbone, plain) = on_the_wire(lab, "late/client", "shop/echo", &to, "BEFORE-LABEL-marker");
    assert!(
        hbone == 0 && plain > 0,
        "before: hbone {hbone}, plain {plain}"
    );

    // A connection open before the label: it must be left as it is.
    let mut open = connect(&netns_of(lab, "late/client"), &to).await.unwrap();
    assert!(echo(&mut open, b"old-1").await);

    // The namespace is labelled on the "API server": the agent captures its
    // running pods within seconds, no restart; the opted-out one stays out.
    write_object(
        lab,
        "namespace-late.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: late, labels: {istio.io/dataplane-mode: ambient}}\n",
    );
    eventually(
        "the agent captures late/client",
        Duration::from_secs(10),
        || async { held(dir.path(), "node-1").await.contains(&client_uid) },
    )
    .await;
    eventually(
        "late/client's traffic is HBONE at echo",
        Duration::from_secs(20),
        || async {
            let (hbone, plain) =
                on_the_wire(lab, "late/client", "shop/echo", &to, "AFTER-LABEL-marker");
            hbone > 0 && plain == 0
        },
    )
    .await;
    assert!(!held(dir.path(), "node-1").await.contains(&optout_uid));
    let (hbone, plain) = on_the_wire(lab, "late/optout", "shop/echo", &to, "OPTOUT-marker");
    assert!(
        hbone == 0 && plain > 0,
        "optout: hbone {hbone}, plain {plain}"
    );
    assert!(
        echo(&mut open, b"old-2").await,
        "the connection from before the label was cut"
    );

    // Unlabelled: released, plaintext again.
    write_object(
        lab,
        "namespace-late.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: late}\n",
    );
    eventually(
        "the agent releases late/client",
        Duration::from_secs(10),
        || async { !held(dir.path(), "node-1").await.contains(&client_uid) },
    )
    .await;
    let (hbone, plain) = on_the_wire(lab, "late/client", "shop/echo", &to, "RELEASED-marker");
    assert!(
        hbone == 0 && plain > 0,
        "released: hbone {hbone}, plain {plain}"
    );
    // Released, it keeps the guard alone (the ztunnel's transparent
    // connections not yet closed never reply out of eth0); no capture.
    let t = pod_table(lab, "late/client");
    assert!(
        t.contains("chain orig_src_guard") && !t.contains("redirect"),
        "{t}"
    );

    // The lab's own apply goes the same way (it asks the agent to act now).
    g.0.apply(yaml("apiVersion: v1\nkind: Namespace\nmetadata: {name: late, labels: {istio.io/dataplane-mode: ambient}}\n"))
        .await
        .unwrap();
    assert!(g.0.pod("late/client").unwrap().captured);
    assert!(!g.0.pod("late/optout").unwrap().captured);
    // Captured again: the whole table replaced the guard's.
    let t = pod_table(&g.0, "late/client");
    assert!(
        t.contains("redirect to :15001") && t.contains("orig_src_mark"),
        "{t}"
    );
}

/// The pod's nftables table (`ztunnel-inpod`) as `nft` lists it, or
/// what `nft` said when it could not.
fn pod_table(lab: &Lab, key: &str) -> String {
    let ns = lab.pod(key).unwrap().netns.clone();
    let out = Command::new("ip")
        .args(["netns", "exec", &ns, "nft", "list", "table", "inet"])
        .arg(mesh_cni::rules::TABLE)
        .output()
        .unwrap();
    let (o, e) = (out.stdout, out.stderr);
    format!(
        "{}{}",
        String::from_utf8_lossy(&o),
        String::from_utf8_lossy(&e)
    )
}

/// Connects from inside `netns`.
async fn connect(netns: &Netns, addr: &str) -> std::io::Result<tokio::net::TcpStream> {
    let addr: SocketAddr = addr.parse().unwrap();
    let sock = if addr.is_ipv6() {
        netns.run(tokio::net::TcpSocket::new_v6)??
    } else {
        netns.run(tokio::net::TcpSocket::new_v4)??
    };
    tokio::time::timeout(Duration::from_secs(3), sock.connect(addr))
        .await
        .map_err(|_| std::io::Error::other("connect timed out"))?
}

/// A kubelet TCP probe from the node's netns: whether the connection is
/// accepted.
async fn tcp_probe(node: &Netns, addr: &str) -> bool {
    connect(node, addr).await.is_ok()
}

/// A kubelet HTTP probe from a node's netns: the status line.
fn http_probe(node: &str, url: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", node])
        .arg(binary("labapp"))
        .args(["get", url])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn kubelet_probes_reach_the_app_under_strict_and_an_allow_for_one_caller() {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::create_in(dir.path(), TEST_IDS, 2).unwrap();
    let mut g = Guard(lab);
    g.0.start_mesh().await.unwrap();
    let mut docs = String::new();
    docs.push_str("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n---\n");
    docs.push_str(&pod(
        "shop",
        "web",
        "web",
        "node-1",
        "",
        "[http-echo, --port, \"8080\"]",
    ));
    docs.push_str(&pod("shop", "client", "client", "node-2", "", "[sleep]"));
    docs.push_str(&pod("shop", "other", "other", "node-2", "", "[sleep]"));
    // Inbound capture bypassed (Istio's label): STRICT does not cover it.
    docs.push_str(&pod(
        "shop",
        "open",
        "open",
        "node-1",
        ", ambient.istio.io/bypass-inbound-capture: \"true\"",
        "[tcp-echo, --port, \"9000\"]",
    ));
    docs.push_str("apiVersion: v1\nkind: Namespace\nmetadata: {name: legacy}\n---\n");
    docs.push_str(&pod("legacy", "plain", "plain", "node-2", "", "[sleep]"));
    docs.push_str("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: shop}\nspec: {mtls: {mode: STRICT}}\n---\n");
    docs.push_str("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: only-client, namespace: shop}\nspec:\n  selector: {matchLabels: {app: web}}\n  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]}]\n");
    g.0.apply(yaml(&docs)).await.unwrap();
    let lab = &g.0;
    assert!(lab.pod("shop/web").unwrap().captured);
    let web = lab.pod("shop/web").unwrap().ip.clone();
    let labapp = binary("labapp");
    let get = |from: &'static str| {
        let url = format!("http://{web}:8080/healthz");
        let out = lab.exec(from, &[labapp.to_str().unwrap(), "get", &url]);
        out.map(|o| String::from_utf8_lossy(&o.stdout).starts_with("200"))
            .unwrap_or(false)
    };
    // The policy is in force: the named caller gets in, another does not.
    eventually("client reaches web", Duration::from_secs(30), || async {
        get("shop/client")
    })
    .await;
    eventually("other is refused", Duration::from_secs(10), || async {
        !get("shop/other")
    })
    .await;
    // STRICT is in force too (the policies may reach the ztunnel in two
    // updates): plaintext from outside the mesh is refused.
    eventually(
        "STRICT refuses plaintext",
        Duration::from_secs(10),
        || async { !get("legacy/plain") },
    )
    .await;

    // The kubelet on web's node: its probes reach the app itself.
    let n1 = lab.state.nodes[0].netns.clone();
    let node1 = Netns::open(&format!("/var/run/netns/{n1}")).unwrap();
    let status = http_probe(&n1, &format!("http://{web}:8080/healthz"));
    assert!(
        status.starts_with("200"),
        "HTTP probe from the node: {status:?}"
    );
    assert!(
        tcp_probe(&node1, &format!("{web}:8080")).await,
        "TCP probe to the app"
    );
    assert!(
        !tcp_probe(&node1, &format!("{web}:8081")).await,
        "a TCP probe to a port nobody listens on must fail"
    );
    // The same over IPv6 (the lab is dual-stack): an IPv6-primary
    // cluster's kubelet probes from the node's IPv6 address.
    let web6 = lab.pod_ip6("shop/web").unwrap();
    let status = http_probe(&n1, &format!("http://[{web6}]:8080/healthz"));
    assert!(
        status.starts_with("200"),
        "IPv6 HTTP probe from the node: {status:?}"
    );
    assert!(
        tcp_probe(&node1, &format!("[{web6}]:8080")).await,
        "IPv6 TCP probe to the app"
    );
    assert!(
        !tcp_probe(&node1, &format!("[{web6}]:8081")).await,
        "an IPv6 TCP probe to a port nobody listens on must fail"
    );
    // Exactly the node's own connections pass: another node's are still
    // the mesh's, and STRICT refuses them.
    let n2 = lab.state.nodes[1].netns.clone();
    let status = http_probe(&n2, &format!("http://{web}:8080/healthz"));
    assert!(!status.starts_with("200"), "from another node: {status:?}");
    let status = http_probe(&n2, &format!("http://[{web6}]:8080/healthz"));
    assert!(
        !status.starts_with("200"),
        "IPv6 from another node: {status:?}"
    );
    // And the policy still holds for pods.
    assert!(!get("shop/other"));
    assert!(get("shop/client"));

    // A pod that bypasses inbound capture takes plaintext from outside the
    // mesh under STRICT (web, without the label, refuses it: above).
    let open = lab.pod("shop/open").unwrap().ip.clone();
    assert!(lab.pod("shop/open").unwrap().captured);
    assert!(send(
        lab,
        "legacy/plain",
        &format!("{open}:9000"),
        "bypassed"
    ));
}
