//! Live enrollment through a real Kubernetes API server (`just
//! test-cluster`): the node agent watches as the `node-agent` ServiceAccount,
//! with exactly the RBAC of `manifests/install/rbac.yaml`, and captures and
//! releases a running pod of its node as labels change. Not part of `cargo
//! test`'s work unless `MESH_CLUSTER_TEST=1` (the recipe sets it, with
//! `MESH_CLUSTER_KUBECONFIG`); without it this test only says it did not run.
//!
//! There is no kubelet: pods are objects whose status the test patches as a
//! kubelet would, and the pod's netns is one the test makes, holding the
//! pod's IP. The ztunnel is the real one in node mode (its state from a
//! local file; no CA is reachable, which capture does not need).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use e2e::mesh::{binary, eventually};
use e2e::netns::{Namespaces, run, unique};

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn kubectl(kubeconfig: &Path, args: &[&str]) -> String {
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .expect("kubectl");
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn apply(kubeconfig: &Path, yaml: &str) {
    let mut child = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["apply", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("kubectl");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "kubectl apply");
}

/// Processes and the test's namespace, gone when the test ends.
struct Cleanup {
    children: Vec<Child>,
    kubeconfig: PathBuf,
    namespace: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["delete", "namespace", &self.namespace, "--wait=false"])
            .output();
    }
}

async fn held(control: &Path) -> Vec<String> {
    let v = mesh_cni::agent::call(control, &mesh_cni::agent::Request::List)
        .await
        .unwrap_or_default();
    v["pods"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["uid"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test]
async fn the_agent_follows_labels_on_a_real_api_server() {
    if env("MESH_CLUSTER_TEST").is_none() {
        eprintln!("not run: set MESH_CLUSTER_TEST=1 (just test-cluster)");
        return;
    }
    let admin = PathBuf::from(
        env("MESH_CLUSTER_KUBECONFIG")
            .or_else(|| env("MESH_TEST_KUBECONFIG"))
            .expect("MESH_CLUSTER_TEST is set, but no MESH_CLUSTER_KUBECONFIG"),
    );
    let dir = tempfile::tempdir().unwrap();
    let tag = unique("k");
    let (ns, node) = (format!("enroll-{tag}"), format!("node-{tag}"));
    let mut cleanup = Cleanup {
        children: Vec::new(),
        kubeconfig: admin.clone(),
        namespace: ns.clone(),
    };

    // The agent's identity: the node-agent ServiceAccount, the install's RBAC.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    apply(
        &admin,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: istio-system}\n",
    );
    kubectl(
        &admin,
        &[
            "apply",
            "-f",
            root.join("manifests/install/rbac.yaml").to_str().unwrap(),
        ],
    );
    let token = kubectl(
        &admin,
        &["-n", "istio-system", "create", "token", "node-agent"],
    );
    let sa = dir.path().join("sa.kubeconfig");
    std::fs::copy(&admin, &sa).unwrap();
    kubectl(
        &sa,
        &[
            "config",
            "set-credentials",
            "node-agent",
            &format!("--token={}", token.trim()),
        ],
    );
    kubectl(
        &sa,
        &["config", "set-context", "--current", "--user=node-agent"],
    );

    // The pod's netns, holding its IP; another pod's, on another node.
    let mut netns = Namespaces::default();
    let third = std::process::id() % 250;
    let (web_ip, other_ip) = (format!("100.64.{third}.5"), format!("100.64.{third}.6"));
    for (name, ip) in [("w", &web_ip), ("o", &other_ip)] {
        let n = format!("{tag}{name}");
        netns.add(&n);
        run(&[
            "ip", "-n", &n, "link", "add", "a0", "type", "veth", "peer", "name", "b0",
        ]);
        run(&[
            "ip",
            "-n",
            &n,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            "a0",
        ]);
        run(&["ip", "-n", &n, "link", "set", "a0", "up"]);
        run(&["ip", "-n", &n, "link", "set", "b0", "up"]);
    }
    let node_ns = format!("{tag}n");
    netns.add(&node_ns);

    // The agent (watching as the ServiceAccount) and a node-mode ztunnel.
    let control = dir.path().join("cni.sock");
    let zds = dir.path().join("zds.sock");
    let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
    cleanup.children.push(
        Command::new(binary("ztunnel-cni"))
            .arg("--control-socket")
            .arg(&control)
            .arg("serve")
            .arg("--zds-socket")
            .arg(&zds)
            .arg("--state-file")
            .arg(dir.path().join("pods.json"))
            .args(["--node", &node])
            .env("KUBECONFIG", &sa)
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let state = dir.path().join("state.yaml");
    std::fs::write(
        &state,
        format!("workloads:\n- {{uid: \"Kubernetes//Pod/{ns}/web\", name: web, namespace: {ns}, addresses: [{web_ip}], tunnel_protocol: HBONE, node: {node}}}\n"),
    )
    .unwrap();
    // A root the ztunnel's config needs; its CA is never reached.
    let ca = dir.path().join("ca.pem");
    run(&[
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=unreached",
        "-keyout",
        dir.path().join("ca.key").to_str().unwrap(),
        "-out",
        ca.to_str().unwrap(),
    ]);
    let cfg = dir.path().join("ztunnel.yaml");
    std::fs::write(
        &cfg,
        format!(
            "node: {node}\nca:\n  address: https://127.0.0.1:1\n  root_cert: {}\nstate:\n  local_file: {}\nnode_mode:\n  zds_socket: {}\ndrain_timeout: 1s\n",
            ca.display(),
            state.display(),
            zds.display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("ztunnel.log")).unwrap();
    cleanup.children.push(
        Command::new("ip")
            .args(["netns", "exec", &node_ns])
            .arg(binary("ztunnel"))
            .arg("--config")
            .arg(&cfg)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );

    // Running pods in a namespace that is not enrolled.
    // (No controller manager: the namespace's default ServiceAccount is
    // made here.)
    apply(
        &admin,
        &format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: default, namespace: {ns}}}\n"
        ),
    );
    for (name, on, ip) in [
        ("web", node.as_str(), &web_ip),
        ("other", "elsewhere", &other_ip),
    ] {
        apply(
            &admin,
            &format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{nodeName: {on}, automountServiceAccountToken: false, containers: [{{name: c, image: x}}]}}\n"
            ),
        );
        let status = format!(
            r#"{{"status":{{"phase":"Running","podIP":"{ip}","podIPs":[{{"ip":"{ip}"}}]}}}}"#
        );
        kubectl(
            &admin,
            &[
                "-n",
                &ns,
                "patch",
                "pod",
                name,
                "--subresource=status",
                "--type=merge",
                "-p",
                &status,
            ],
        );
    }
    let web = kubectl(
        &admin,
        &[
            "-n",
            &ns,
            "get",
            "pod",
            "web",
            "-o",
            "jsonpath={.metadata.uid}",
        ],
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(held(&control).await.is_empty(), "captured before any label");

    let label = |args: &[&str]| kubectl(&admin, args);
    label(&["label", "namespace", &ns, "istio.io/dataplane-mode=ambient"]);
    eventually(
        "web captured on the namespace label",
        Duration::from_secs(15),
        || async { held(&control).await == vec![web.clone()] },
    )
    .await;
    label(&[
        "-n",
        &ns,
        "label",
        "pod",
        "web",
        "istio.io/dataplane-mode=none",
    ]);
    eventually(
        "web released by its own label",
        Duration::from_secs(15),
        || async { held(&control).await.is_empty() },
    )
    .await;
    label(&["-n", &ns, "label", "pod", "web", "istio.io/dataplane-mode-"]);
    eventually("web captured again", Duration::from_secs(15), || async {
        held(&control).await == vec![web.clone()]
    })
    .await;
    label(&["label", "namespace", &ns, "istio.io/dataplane-mode-"]);
    eventually(
        "web released with the namespace",
        Duration::from_secs(15),
        || async { held(&control).await.is_empty() },
    )
    .await;
    drop(cleanup);
}
