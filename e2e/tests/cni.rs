//! The CNI plugin (`mesh-cni`), run the way the kubelet runs it, against a
//! lab's real node agent and ztunnel: ADD captures a pod of an enrolled
//! namespace before returning, DEL releases it, a pod outside the mesh is
//! passed through, and an unreachable agent fails ADD with a message the
//! kubelet shows. The API server answers with recorded pod and namespace
//! objects (there is no Kubernetes here).

use std::convert::Infallible;
use std::io::Write;
use std::process::{Command, Stdio};

use bytes::Bytes;
use e2e::lab::{Down, Lab};
use e2e::mesh::binary;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

/// A recorded API server: the two pods and their namespaces.
async fn api_server() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let svc = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    let pod = |ns: &str, name: &str, uid: &str| {
                        json!({"apiVersion": "v1", "kind": "Pod",
                               "metadata": {"name": name, "namespace": ns, "uid": uid, "labels": {"app": name}},
                               "spec": {"serviceAccountName": "client", "containers": [{"name": "app", "image": "labapp"}]}})
                    };
                    let (status, body) = match req.uri().path() {
                        "/api/v1/namespaces/meshed/pods/client-0" => {
                            (200, pod("meshed", "client-0", "uid-meshed"))
                        }
                        "/api/v1/namespaces/plain/pods/other-0" => {
                            (200, pod("plain", "other-0", "uid-plain"))
                        }
                        "/api/v1/namespaces/meshed" => (
                            200,
                            json!({"apiVersion": "v1", "kind": "Namespace",
                            "metadata": {"name": "meshed", "labels": {"istio.io/dataplane-mode": "ambient"}}}),
                        ),
                        "/api/v1/namespaces/plain" => (
                            200,
                            json!({"apiVersion": "v1", "kind": "Namespace",
                            "metadata": {"name": "plain"}}),
                        ),
                        p => (
                            404,
                            json!({"kind": "Status", "code": 404, "message": format!("{p} not found")}),
                        ),
                    };
                    let mut r = hyper::Response::new(Full::new(Bytes::from(body.to_string())));
                    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                    r.headers_mut()
                        .insert("content-type", "application/json".parse().unwrap());
                    Ok::<_, Infallible>(r)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// Runs the plugin as the kubelet would; (exit code, stdout).
fn cni(command: &str, netns: &str, args: &str, conf: &Value) -> (i32, String) {
    let mut child = Command::new(binary("mesh-cni"))
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "c0ffee")
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env("CNI_ARGS", args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // VERSION never reads its stdin: the plugin may be gone before the
    // write, which is no failure.
    let written = child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes());
    if let Err(e) = written {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The pods the node agent holds (`ztunnel-cni list`).
fn agent_pods(socket: &std::path::Path) -> String {
    let out = Command::new(binary("ztunnel-cni"))
        .arg("--control-socket")
        .arg(socket)
        .arg("list")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// Multi-threaded: the test blocks on the plugin process while the recorded
// API server answers it from another worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cni_plugin_captures_before_the_pod_starts_and_releases_on_delete() {
    let tmp = tempfile::tempdir().unwrap();
    let mut g = Down(Lab::create_in(tmp.path(), e2e::lab::TEST_IDS, 1).unwrap());
    g.0.start_mesh().await.unwrap();
    // The lab itself does not enroll these namespaces: the plugin decides,
    // from what the API server says.
    g.0.apply(e2e::lab::parse_docs(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: meshed}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: plain}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: client-0, namespace: meshed}\nspec: {serviceAccountName: client, containers: [{name: app, image: labapp, args: [sleep]}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: other-0, namespace: plain}\nspec: {serviceAccountName: client, containers: [{name: app, image: labapp, args: [sleep]}]}\n",
    ).unwrap())
    .await
    .unwrap();
    let lab = &g.0;
    let client = lab.pod("meshed/client-0").unwrap().clone();
    let other = lab.pod("plain/other-0").unwrap().clone();
    assert!(!client.captured && !other.captured);
    let socket = tmp.path().join(format!("{}-cni.sock", client.node));

    let api = api_server().await;
    let kubeconfig = tmp.path().join("cni-kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!("apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: \"http://{api}\"}}}}]\nusers: [{{name: u, user: {{}}}}]\ncontexts: [{{name: x, context: {{cluster: c, user: u}}}}]\ncurrent-context: x\n"),
    )
    .unwrap();
    let prev = json!({"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/x"}],
                      "ips": [{"address": format!("{}/24", client.ip), "interface": 0}]});
    let conf = json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "mesh-cni",
                      "agent_socket": socket, "kubeconfig": kubeconfig, "prevResult": prev});
    let netns = |p: &e2e::lab::PodState| format!("/var/run/netns/{}", p.netns);

    // The node's ztunnel connects to its agent once it has config; until
    // then an ADD fails (and the kubelet would retry it).
    let mut connected = Value::Null;
    for _ in 0..200 {
        connected = serde_json::from_str::<Value>(&agent_pods(&socket))
            .map(|v| v["ztunnel_connected"].clone())
            .unwrap_or(Value::Null);
        if connected == Value::Bool(true) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        connected,
        Value::Bool(true),
        "the node's ztunnel never connected to its agent"
    );

    // ADD for a pod of an enrolled namespace: captured when it returns.
    let (code, out) = cni(
        "ADD",
        &netns(&client),
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=meshed;K8S_POD_NAME=client-0;K8S_POD_INFRA_CONTAINER_ID=c0ffee;K8S_POD_UID=uid-meshed",
        &conf,
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap(),
        prev,
        "the previous result passes through"
    );
    let held = agent_pods(&socket);
    assert!(
        held.contains("uid-meshed") && held.contains("client-0"),
        "{held}"
    );
    // Its redirect rules are in place already: no early connection escapes.
    let rules = Command::new("ip")
        .args(["netns", "exec", &client.netns, "nft", "list", "ruleset"])
        .output()
        .unwrap();
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(
        rules.contains("15001") && rules.contains("15008"),
        "{rules}"
    );
    // And the routing that brings the app's replies back to the ztunnel's
    // dials from a client's address (once, however often applied).
    let ip_rules = || {
        let out = Command::new("ip")
            .args(["netns", "exec", &client.netns, "ip", "rule"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let r = ip_rules();
    assert_eq!(r.matches("fwmark 0x111 lookup 100").count(), 1, "{r}");

    // A pod whose namespace is not in the mesh is passed through untouched.
    let (code, out) = cni(
        "ADD",
        &netns(&other),
        "K8S_POD_NAMESPACE=plain;K8S_POD_NAME=other-0;K8S_POD_UID=uid-plain",
        &conf,
    );
    assert_eq!(code, 0, "{out}");
    assert!(!agent_pods(&socket).contains("uid-plain"));

    // DEL releases the captured pod (and is idempotent).
    let del_args = "K8S_POD_NAMESPACE=meshed;K8S_POD_NAME=client-0;K8S_POD_UID=uid-meshed";
    assert_eq!(cni("DEL", &netns(&client), del_args, &conf).0, 0);
    assert!(!agent_pods(&socket).contains("uid-meshed"));
    // Its rules and routing went with it.
    let r = ip_rules();
    assert!(!r.contains("fwmark 0x111"), "{r}");
    assert_eq!(cni("DEL", &netns(&client), del_args, &conf).0, 0);

    // No agent: ADD fails, with a CNI error the kubelet shows.
    let mut broken = conf.clone();
    broken["agent_socket"] = json!(tmp.path().join("nope.sock"));
    let (code, out) = cni(
        "ADD",
        &netns(&client),
        "K8S_POD_NAMESPACE=meshed;K8S_POD_NAME=client-0;K8S_POD_UID=uid-meshed",
        &broken,
    );
    assert_eq!(code, 1);
    let err: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(err["code"], 102);
    assert!(
        err["msg"]
            .as_str()
            .unwrap()
            .contains("cannot reach the node agent"),
        "{err}"
    );
    // An API server that does not know the pod: also a clear error.
    let (code, out) = cni(
        "ADD",
        &netns(&client),
        "K8S_POD_NAMESPACE=meshed;K8S_POD_NAME=ghost;K8S_POD_UID=u",
        &conf,
    );
    assert_eq!(code, 1);
    assert!(out.contains("reading pod meshed/ghost"), "{out}");
    // The version query needs nothing.
    let (code, out) = cni("VERSION", "", "", &json!({}));
    assert_eq!(code, 0);
    assert!(out.contains("1.0.0"));
}
