//! `mesh-cni install` against temporary host directories and a fake API
//! server: chaining into the primary CNI config, keeping the plugin's
//! kubeconfig fresh, and the shutdown decision between uninstalling and
//! leaving everything for the next pod of the DaemonSet.

use std::convert::Infallible;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use mesh_cni::install::{self, Chain, Decision, InstallConfig, InstallError, chain};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const CALICO: &str = r#"{
  "name": "k8s-pod-network",
  "cniVersion": "0.3.1",
  "plugins": [
    {"type": "calico", "log_level": "info", "ipam": {"type": "calico-ipam"}, "datastore_type": "kubernetes"},
    {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}}
  ]
}"#;

const FLANNEL_CONF: &str = r#"{"name": "cbr0", "cniVersion": "0.3.1", "type": "flannel", "delegate": {"isDefaultGateway": true, "hairpinMode": true}}"#;

/// A node's directories under one tempdir; host paths equal container paths.
struct Node {
    _root: tempfile::TempDir,
    cfg: InstallConfig,
}

impl Node {
    fn new() -> Node {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        for d in ["bin", "net.d", "sa"] {
            std::fs::create_dir(r.join(d)).unwrap();
        }
        std::fs::write(r.join("plugin"), b"\x7fELF mesh-cni").unwrap();
        std::fs::write(r.join("sa/ca.crt"), b"-----BEGIN CERTIFICATE-----\nCA\n").unwrap();
        std::fs::write(r.join("sa/token"), "token-1\n").unwrap();
        let cfg = InstallConfig {
            cni_bin_dir: r.join("bin"),
            cni_conf_dir: r.join("net.d"),
            host_cni_conf_dir: PathBuf::from("/etc/cni/net.d"),
            plugin_binary: r.join("plugin"),
            sa_dir: r.join("sa"),
            server: install::files::server_url("fd00::1", "6443"),
            namespace: "istio-system".into(),
            daemonset: "ztunnel".into(),
            check_interval: Duration::from_millis(20),
            retry_interval: Duration::from_millis(10),
            api_timeout: Duration::from_millis(500),
            agent_socket: "/var/run/ztunnel/cni-control.sock".into(),
            exclude_namespaces: vec!["kube-system".into(), "istio-system".into()],
            timeout_secs: 30,
        };
        Node { _root: root, cfg }
    }

    fn conf(&self, name: &str) -> PathBuf {
        self.cfg.cni_conf_dir.join(name)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.conf(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        path
    }

    fn ensure(&self) -> Result<Chain, InstallError> {
        chain::ensure(&self.cfg.cni_conf_dir, &self.cfg.entry().to_json().unwrap())
    }

    /// Starts the install loop; the token stops it as SIGTERM would.
    fn start(
        &self,
        api: Option<kube::Client>,
    ) -> (
        CancellationToken,
        tokio::task::JoinHandle<Result<Decision, InstallError>>,
    ) {
        let stop = CancellationToken::new();
        let (cfg, s) = (self.cfg.clone(), stop.clone());
        (
            stop,
            tokio::spawn(async move { install::run(&cfg, api, s).await }),
        )
    }
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn types(conflist: &Value) -> Vec<String> {
    conflist["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap().to_string())
        .collect()
}

/// Polls until `done`, failing after a few seconds.
async fn eventually(what: &str, done: impl Fn() -> bool) {
    for _ in 0..500 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

fn chained(path: &Path) -> bool {
    std::fs::read_to_string(path).is_ok_and(|t| t.contains("\"mesh-cni\""))
}

#[test]
fn conflist_append_is_idempotent_and_keeps_other_plugins() {
    let node = Node::new();
    let primary = node.write("10-calico.conflist", CALICO);
    let other = node.write("20-other.conflist", CALICO);
    assert_eq!(node.ensure().unwrap(), Chain::Written(primary.clone()));
    let first = std::fs::read_to_string(&primary).unwrap();
    assert_eq!(node.ensure().unwrap(), Chain::InPlace(primary.clone()));
    assert_eq!(std::fs::read_to_string(&primary).unwrap(), first);

    let doc = read_json(&primary);
    assert_eq!(types(&doc), ["calico", "portmap", "mesh-cni"]);
    let before: Value = serde_json::from_str(CALICO).unwrap();
    assert_eq!(doc["plugins"][0], before["plugins"][0]);
    assert_eq!(doc["plugins"][1], before["plugins"][1]);
    assert_eq!(doc["name"], "k8s-pod-network");
    // Key order is the file's, not alphabetical.
    let pos = |k: &str| first.find(k).unwrap();
    assert!(pos("\"name\"") < pos("\"cniVersion\"") && pos("\"cniVersion\"") < pos("\"plugins\""));
    assert!(pos("\"log_level\"") < pos("\"ipam\"") && pos("\"ipam\"") < pos("\"datastore_type\""));
    assert_eq!(mode(&primary), 0o644);
    // Only the primary is touched.
    assert_eq!(std::fs::read_to_string(&other).unwrap(), CALICO);

    // The entry is what the plugin reads, with host paths.
    let mut ours = doc["plugins"][2].clone();
    assert_eq!(ours["name"], "mesh-cni");
    ours["cniVersion"] = json!("0.3.1");
    let conf: mesh_cni::NetConf = serde_json::from_value(ours).unwrap();
    assert_eq!(
        conf.kubeconfig,
        Some(PathBuf::from("/etc/cni/net.d/mesh-cni-kubeconfig"))
    );
    assert_eq!(
        conf.agent_socket,
        PathBuf::from("/var/run/ztunnel/cni-control.sock")
    );
    assert_eq!(conf.exclude_namespaces, ["kube-system", "istio-system"]);
    assert_eq!(conf.timeout_secs, 30);
}

#[test]
fn a_stale_entry_of_ours_is_updated_where_it_stands() {
    let node = Node::new();
    let stale = CALICO.replace(
        r#"{"type": "portmap""#,
        r#"{"type": "mesh-cni", "name": "mesh-cni", "timeout_secs": 5}, {"type": "portmap""#,
    );
    let primary = node.write("10-calico.conflist", &stale);
    assert_eq!(node.ensure().unwrap(), Chain::Written(primary.clone()));
    let doc = read_json(&primary);
    assert_eq!(types(&doc), ["calico", "mesh-cni", "portmap"]);
    assert_eq!(doc["plugins"][1]["timeout_secs"], 30);
}

#[test]
fn a_single_plugin_conf_becomes_a_conflist() {
    let node = Node::new();
    let conf = node.write("10-flannel.conf", FLANNEL_CONF);
    let list = node.conf("10-flannel.conflist");
    assert_eq!(
        node.ensure().unwrap(),
        Chain::Converted {
            from: conf.clone(),
            to: list.clone()
        }
    );
    assert!(!conf.exists());
    let doc = read_json(&list);
    assert_eq!(doc["name"], "cbr0");
    assert_eq!(doc["cniVersion"], "0.3.1");
    assert_eq!(types(&doc), ["flannel", "mesh-cni"]);
    let original: Value = serde_json::from_str(FLANNEL_CONF).unwrap();
    assert_eq!(doc["plugins"][0], original);
    assert_eq!(mode(&list), 0o644);
    assert_eq!(node.ensure().unwrap(), Chain::InPlace(list));
}

#[test]
fn the_primary_is_the_first_config_by_name() {
    let node = Node::new();
    node.write("README", "not a config");
    node.write("mesh-cni-kubeconfig", "{}");
    let later = node.write("20-b.conflist", CALICO);
    let first = node.write("10-a.conf", FLANNEL_CONF);
    let files = chain::config_files(&node.cfg.cni_conf_dir).unwrap();
    assert_eq!(files, [first, later.clone()]);
    assert!(matches!(node.ensure().unwrap(), Chain::Converted { .. }));
    assert_eq!(std::fs::read_to_string(&later).unwrap(), CALICO);
}

#[test]
fn bad_json_in_the_primary_is_never_overwritten() {
    let node = Node::new();
    let broken = "{\"name\": \"k8s\", \"plugins\": [";
    let primary = node.write("10-calico.conflist", broken);
    let err = node.ensure().unwrap_err();
    assert!(matches!(err, InstallError::BadJson { .. }), "{err}");
    assert!(err.to_string().contains("10-calico.conflist"), "{err}");
    assert_eq!(std::fs::read_to_string(&primary).unwrap(), broken);

    // A conflist without a plugin list, or a .conf without a version,
    // is left alone too.
    std::fs::write(&primary, r#"{"name": "k8s"}"#).unwrap();
    let err = node.ensure().unwrap_err();
    assert!(matches!(err, InstallError::Unchainable { .. }), "{err}");
    assert_eq!(
        std::fs::read_to_string(&primary).unwrap(),
        r#"{"name": "k8s"}"#
    );
}

#[tokio::test]
async fn the_loop_retries_a_bad_primary_until_it_parses() {
    let node = Node::new();
    let broken = "{\"name\": \"k8s\", \"plugins\": [";
    let primary = node.write("10-calico.conflist", broken);
    let (stop, task) = node.start(None);
    // Binary and kubeconfig are in place, the bad file untouched.
    eventually("the kubeconfig", || node.cfg.kubeconfig_path().exists()).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(std::fs::read_to_string(&primary).unwrap(), broken);
    node.write("10-calico.conflist", CALICO);
    eventually("chaining", || chained(&primary)).await;
    stop.cancel();
    assert!(matches!(task.await.unwrap().unwrap(), Decision::Keep(_)));
}

#[tokio::test]
async fn waits_for_a_primary_that_appears_later() {
    let node = Node::new();
    let (stop, task) = node.start(None);
    let binary = node.cfg.binary_path();
    eventually("the plugin binary", || binary.exists()).await;
    assert_eq!(std::fs::read(&binary).unwrap(), b"\x7fELF mesh-cni");
    assert_eq!(mode(&binary), 0o755);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!task.is_finished());
    let primary = node.write("10-calico.conflist", CALICO);
    eventually("chaining", || chained(&primary)).await;

    // Another CNI daemon rewrites its config and drops us: we come back.
    node.write("10-calico.conflist", CALICO);
    eventually("re-chaining", || chained(&primary)).await;
    assert_eq!(
        types(&read_json(&primary)),
        ["calico", "portmap", "mesh-cni"]
    );

    // With no API client, shutdown cannot know it is an uninstall.
    stop.cancel();
    assert!(matches!(task.await.unwrap().unwrap(), Decision::Keep(_)));
    assert!(chained(&primary) && binary.exists() && node.cfg.kubeconfig_path().exists());
}

#[tokio::test]
async fn token_rotation_rewrites_the_kubeconfig() {
    let node = Node::new();
    node.write("10-calico.conflist", CALICO);
    let (stop, task) = node.start(None);
    let path = node.cfg.kubeconfig_path();
    let has = |token: &str| {
        let path = path.clone();
        let token = token.to_string();
        move || std::fs::read_to_string(&path).is_ok_and(|t| t.contains(&token))
    };
    eventually("the first kubeconfig", has("token-1")).await;
    assert_eq!(mode(&path), 0o600);

    // The kubelet swaps the projected token in place.
    std::fs::write(node.cfg.sa_dir.join("token"), "token-2").unwrap();
    eventually("the rotated token", has("token-2")).await;
    assert_eq!(mode(&path), 0o600);
    stop.cancel();
    task.await.unwrap().unwrap();

    // It is a kubeconfig kube (so the plugin) reads: server, CA and token.
    let kc = kube::config::Kubeconfig::read_from(&path).unwrap();
    let cluster = kc.clusters[0].cluster.clone().unwrap();
    assert_eq!(cluster.server.as_deref(), Some("https://[fd00::1]:6443"));
    let ca: k8s_openapi::ByteString =
        serde_json::from_value(json!(cluster.certificate_authority_data)).unwrap();
    assert_eq!(ca.0, b"-----BEGIN CERTIFICATE-----\nCA\n");
    let user = read_json(&path)["users"][0]["user"]["token"].clone();
    assert_eq!(user, "token-2");
    assert_eq!(kc.current_context.as_deref(), Some("mesh-cni"));
}

/// Serves the one request shutdown makes, answering `status` with `body`,
/// and records the paths asked for.
async fn fake_api(status: u16, body: Value) -> (kube::Client, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (log, body) = (log.clone(), body.to_string());
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                log.lock()
                    .unwrap()
                    .push(format!("{} {}", req.method(), req.uri().path()));
                let mut resp = hyper::Response::new(Full::new(Bytes::from(body.clone())));
                *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                resp.headers_mut()
                    .insert("content-type", "application/json".parse().unwrap());
                async move { Ok::<_, Infallible>(resp) }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    (kube::Client::try_from(config).unwrap(), seen)
}

const DS_PATH: &str = "GET /apis/apps/v1/namespaces/istio-system/daemonsets/ztunnel";

fn daemonset(deleting: bool) -> Value {
    let mut ds = json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "ztunnel", "namespace": "istio-system", "uid": "ds-1"},
        "spec": {"selector": {"matchLabels": {"app": "ztunnel"}},
                 "template": {"metadata": {"labels": {"app": "ztunnel"}}, "spec": {"containers": []}}},
    });
    if deleting {
        ds["metadata"]["deletionTimestamp"] = json!("2025-06-01T12:00:00Z");
    }
    ds
}

fn not_found() -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "daemonsets.apps \"ztunnel\" not found", "reason": "NotFound",
        "details": {"name": "ztunnel", "group": "apps", "kind": "daemonsets"}, "code": 404,
    })
}

/// Installs with a conflist, then stops the loop against `api`.
async fn install_then_stop(node: &Node, api: Option<kube::Client>) -> Decision {
    let primary = node.write("10-calico.conflist", CALICO);
    let (stop, task) = node.start(api);
    eventually("chaining", || chained(&primary)).await;
    stop.cancel();
    task.await.unwrap().unwrap()
}

fn assert_uninstalled(node: &Node) {
    let doc = read_json(&node.conf("10-calico.conflist"));
    assert_eq!(types(&doc), ["calico", "portmap"]);
    assert!(!node.cfg.kubeconfig_path().exists());
    assert!(!node.cfg.binary_path().exists());
}

fn assert_in_place(node: &Node) {
    assert!(chained(&node.conf("10-calico.conflist")));
    assert!(node.cfg.kubeconfig_path().exists());
    assert!(node.cfg.binary_path().exists());
}

#[tokio::test]
async fn shutdown_uninstalls_when_the_daemonset_is_gone() {
    let node = Node::new();
    let (api, seen) = fake_api(404, not_found()).await;
    let decision = install_then_stop(&node, Some(api)).await;
    assert!(matches!(decision, Decision::Uninstall(_)), "{decision:?}");
    assert_eq!(*seen.lock().unwrap(), [DS_PATH]);
    assert_uninstalled(&node);
}

#[tokio::test]
async fn shutdown_uninstalls_when_the_daemonset_is_being_deleted() {
    let node = Node::new();
    let (api, seen) = fake_api(200, daemonset(true)).await;
    let decision = install_then_stop(&node, Some(api)).await;
    assert!(matches!(decision, Decision::Uninstall(_)), "{decision:?}");
    assert_eq!(*seen.lock().unwrap(), [DS_PATH]);
    assert_uninstalled(&node);
}

#[tokio::test]
async fn shutdown_keeps_everything_while_the_daemonset_lives() {
    let node = Node::new();
    let (api, seen) = fake_api(200, daemonset(false)).await;
    let decision = install_then_stop(&node, Some(api)).await;
    assert!(matches!(decision, Decision::Keep(_)), "{decision:?}");
    assert_eq!(*seen.lock().unwrap(), [DS_PATH]);
    assert_in_place(&node);
}

#[tokio::test]
async fn shutdown_uninstalls_when_the_mesh_role_is_gone() {
    // `kubectl delete -k` removes the role with the DaemonSet: the API
    // server's answer is a 403 Forbidden Status, and a plugin left behind
    // without it would fail every new pod on the node.
    let node = Node::new();
    let refused = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
        "reason": "Forbidden", "message": "no", "code": 403});
    let (api, _) = fake_api(403, refused).await;
    let decision = install_then_stop(&node, Some(api)).await;
    assert!(matches!(decision, Decision::Uninstall(_)), "{decision:?}");
    assert_uninstalled(&node);
}

#[tokio::test]
async fn shutdown_uninstalls_when_the_mesh_service_account_is_gone() {
    // `kubectl delete -k` (or deleting the namespace) removes the
    // ServiceAccount before the DaemonSet: the pods' token is refused with
    // a 401, and a plugin left chained with that dead token would fail every
    // new pod on the node for good.
    let node = Node::new();
    let refused = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
        "reason": "Unauthorized", "message": "no", "code": 401});
    let (api, _) = fake_api(401, refused).await;
    let decision = install_then_stop(&node, Some(api)).await;
    assert!(matches!(decision, Decision::Uninstall(_)), "{decision:?}");
    assert_uninstalled(&node);
}

#[tokio::test]
async fn shutdown_keeps_everything_on_a_refusal_not_from_kubernetes() {
    // A 401 or 403 whose body is not a Kubernetes Status (a proxy in front
    // of the API server) is no uninstall.
    for (code, body) in [
        (401, json!("Unauthorized")),
        (403, json!({"error": "blocked by proxy"})),
        (403, json!("Forbidden")),
    ] {
        let node = Node::new();
        let (api, _) = fake_api(code, body.clone()).await;
        let decision = install_then_stop(&node, Some(api)).await;
        assert!(
            matches!(decision, Decision::Keep(_)),
            "{code} {body}: {decision:?}"
        );
        assert_in_place(&node);
    }
}

#[tokio::test]
async fn shutdown_keeps_everything_when_the_api_cannot_answer() {
    // A server error is not "gone".
    let node = Node::new();
    let failing = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
        "reason": "InternalError", "message": "etcdserver: request timed out", "code": 500});
    let (api, _) = fake_api(500, failing).await;
    let decision = install_then_stop(&node, Some(api)).await;
    assert!(matches!(decision, Decision::Keep(_)), "{decision:?}");
    assert_in_place(&node);

    // Nothing listening.
    let node = Node::new();
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    let api = kube::Client::try_from(config).unwrap();
    let decision = install_then_stop(&node, Some(api)).await;
    assert!(matches!(decision, Decision::Keep(_)), "{decision:?}");
    assert_in_place(&node);

    // Accepts but never answers: the timeout decides, and keeps.
    let node = Node::new();
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((tcp, _)) = silent.accept().await {
            conns.push(tcp);
        }
    });
    let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    let api = kube::Client::try_from(config).unwrap();
    let decision = install_then_stop(&node, Some(api)).await;
    assert!(
        matches!(&decision, Decision::Keep(why) if why.contains("did not answer")),
        "{decision:?}"
    );
    assert_in_place(&node);
    held.abort();
}

#[test]
fn uninstall_takes_our_entry_out_of_every_conflist_and_skips_bad_ones() {
    let node = Node::new();
    let a = node.write("10-a.conflist", CALICO);
    let b = node.write("20-b.conflist", CALICO);
    let bad = node.write("30-bad.conflist", "{not json");
    chain::ensure(&node.cfg.cni_conf_dir, &node.cfg.entry().to_json().unwrap()).unwrap();
    // Simulate an earlier primary that still carries our entry.
    let with_ours = std::fs::read_to_string(&a).unwrap();
    std::fs::write(&b, &with_ours).unwrap();
    let (changed, failed) = chain::remove_everywhere(&node.cfg.cni_conf_dir);
    assert_eq!(changed, [a.clone(), b.clone()]);
    assert_eq!(failed.len(), 1);
    assert!(failed[0].to_string().contains("30-bad.conflist"));
    assert_eq!(std::fs::read_to_string(&bad).unwrap(), "{not json");
    for path in [a, b] {
        assert_eq!(types(&read_json(&path)), ["calico", "portmap"]);
    }
}
