//! The lab as a cluster (`just test-cluster`): a real Kubernetes API server
//! whose nodes are the lab's, their kubelet the lab's (`e2e::kubelet`),
//! driven with kubectl alone, as docs/install.md says: install, enroll,
//! mTLS across nodes, L4 and L7 policy, a waypoint route, certificates
//! re-issued with the ztunnel's new pod-bound token, controller failover,
//! a CRD deleted while running, an API server restart, uninstall.
//!
//! Not part of `cargo test`'s work unless `MESH_CLUSTER_TEST=1` (the recipe
//! sets it, and starts the API server): without it this test only says it
//! did not run.

mod kube_cluster_support;

use std::time::{Duration, Instant};

use kube_cluster_support::{Cluster, eventually};

/// The longest the controller may take to be current after the API
/// server's return.
const CURRENT_WITHIN: Duration = Duration::from_secs(5);

const APPS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: server, namespace: shop}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: client, namespace: shop}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: server, namespace: shop}
spec:
  replicas: 2
  selector: {matchLabels: {app: server}}
  template:
    metadata: {labels: {app: server}}
    spec:
      serviceAccountName: server
      containers: [{name: app, image: ghcr.io/mesh-dev/labapp:0.1.0, args: [http-echo, --port, "8080"]}]
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: shop}
spec:
  selector: {app: server}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: server-v2, namespace: shop}
spec:
  replicas: 1
  selector: {matchLabels: {app: server-v2}}
  template:
    metadata: {labels: {app: server-v2}}
    spec:
      serviceAccountName: server
      containers: [{name: app, image: ghcr.io/mesh-dev/labapp:0.1.0, args: [http-echo, --port, "8080"]}]
---
apiVersion: v1
kind: Service
metadata: {name: server-v2, namespace: shop}
spec:
  selector: {app: server-v2}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: client, namespace: shop}
spec:
  replicas: 1
  selector: {matchLabels: {app: client}}
  template:
    metadata: {labels: {app: client}}
    spec:
      serviceAccountName: client
      containers: [{name: app, image: ghcr.io/mesh-dev/labapp:0.1.0, args: [sleep]}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: legacy, namespace: legacy}
spec:
  replicas: 1
  selector: {matchLabels: {app: legacy}}
  template:
    metadata: {labels: {app: legacy}}
    spec:
      containers: [{name: app, image: ghcr.io/mesh-dev/labapp:0.1.0, args: [sleep]}]
"#;

#[test]
fn the_lab_is_the_kubelet_of_a_real_cluster() {
    let Some(c) = Cluster::from_env() else {
        eprintln!(
            "lab cluster suite NOT RUN: MESH_CLUSTER_TEST is not set (`just test-cluster` sets it and starts an API server)"
        );
        return;
    };
    let t0 = Instant::now();
    let stage = |name: &str| eprintln!("=== [{:>5.1}s] {name}", t0.elapsed().as_secs_f64());
    stage("install");
    install(&c);
    stage("enroll");
    enroll(&c);
    stage("mTLS across nodes");
    mtls_across_nodes(&c);
    stage("L4 policy");
    l4_policy(&c);
    stage("waypoint route and L7 policy");
    waypoint(&c);
    stage("certificates re-issued on a ztunnel rollout");
    certificates(&c);
    stage("the node agent rolls in place");
    node_agent_roll(&c);
    stage("controller failover");
    failover(&c);
    stage("a CRD deleted while running");
    crd_deleted(&c);
    match c.can_restart() {
        true => {
            stage("API server restart");
            api_restart(&c);
        }
        false => eprintln!(
            "=== STAGE NOT RUN: API server restart (the suite did not start this API server)"
        ),
    }
    stage("uninstall");
    uninstall(&c);
    stage("done");
}

fn install(c: &Cluster) {
    let out = c.sh(
        "kubectl get crd gateways.gateway.networking.k8s.io >/dev/null 2>&1 \\\n  || kubectl apply -k manifests/gateway-api\n\
         kubectl apply -k manifests/\n\
         kubectl -n istio-system rollout status deployment/istiod-lite --timeout=90s\n\
         kubectl -n istio-system rollout status daemonset/node-agent --timeout=90s\n\
         kubectl -n istio-system rollout status daemonset/ztunnel --timeout=90s",
    );
    assert!(out.contains("successfully rolled out"), "{out}");
    eprintln!("{}", c.ok(&["get", "pods", "-A", "-o", "wide"]));
    // kubectl logs, through the API server to the lab's kubelet.
    let logs = c.ok(&[
        "-n",
        "istio-system",
        "logs",
        "daemonset/node-agent",
        "-c",
        "install-cni",
    ]);
    assert!(logs.contains("chained mesh-cni"), "{logs}");
    eventually("meshctl --kube check passes", 30, || {
        c.meshctl(&["check"]).0
    });
    eprintln!("$ meshctl --kube check\n{}", c.meshctl(&["check"]).1);
    // install-cni chained the plugin on every node.
    for node in ["node-1", "node-2"] {
        let conf = c
            .dir()
            .join(format!("kube/nodes/{node}/etc/cni/net.d/10-lab.conflist"));
        eventually(&format!("mesh-cni chained on {node}"), 20, || {
            std::fs::read_to_string(&conf).is_ok_and(|t| t.contains("\"mesh-cni\""))
        });
    }
}

fn enroll(c: &Cluster) {
    c.apply(APPS);
    c.sh("kubectl -n shop rollout status deployment/server --timeout=60s");
    c.sh(
        "kubectl label namespace shop istio.io/dataplane-mode=ambient\n\
          kubectl -n shop rollout restart deployment\n\
          kubectl -n shop rollout status deployment/server --timeout=60s\n\
          kubectl -n shop rollout status deployment/client --timeout=60s\n\
          kubectl -n legacy rollout status deployment/legacy --timeout=60s",
    );
    eventually("the old shop pods gone", 30, || {
        c.jsonpath(&["get", "pods", "-n", "shop"], "{.items[*].metadata.name}")
            .split(' ')
            .count()
            == 4
    });
    // Every shop pod was handed to its node's agent by the CNI plugin.
    let agents: String = c
        .pods("istio-system", "node-agent-")
        .iter()
        .map(|z| c.log(z, "node-agent"))
        .collect();
    for p in c.pods("shop", "") {
        assert!(
            agents.contains(&format!("pod=shop/{}", p.name)),
            "{} not captured:\n{agents}",
            p.name
        );
    }
}

fn mtls_across_nodes(c: &Cluster) {
    let client = c.pod("shop", "client-", None).expect("the client");
    let other = if client.node == "node-1" {
        "node-2"
    } else {
        "node-1"
    };
    let server = c
        .pod("shop", "server-", Some(other))
        .filter(|p| !p.name.starts_with("server-v2"))
        .expect("a server on the other node");
    let answer = c
        .get(&client, &format!("http://{}:8080/", server.ip), &[])
        .expect("client -> server");
    assert!(answer.contains(&format!("pod={}", server.name)), "{answer}");
    // By the service name, through DNS and the ClusterIP.
    assert!(
        c.get(&client, "http://server/", &[])
            .is_some_and(|a| a.contains("200"))
    );
    // The destination's ztunnel saw a mutual-TLS connection from the client.
    let zt = c
        .pod("istio-system", "ztunnel-", Some(other))
        .expect("the ztunnel there");
    let metrics = c
        .get(&zt, "http://127.0.0.1:15020/metrics", &[])
        .unwrap_or_default();
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("istio_tcp_connections_opened_total")
                && l.contains("reporter=\"destination\"")
                && l.contains("source_principal=\"spiffe://cluster.local/ns/shop/sa/client\"")
        })
        .unwrap_or_else(|| panic!("no inbound connection from the client:\n{metrics}"));
    assert!(
        line.contains("connection_security_policy=\"mutual_tls\""),
        "{line}"
    );
    eprintln!("{line}");
}

fn l4_policy(c: &Cluster) {
    let client = c.pod("shop", "client-", None).expect("the client");
    let legacy = c.pod("legacy", "legacy-", None).expect("the legacy client");
    // Not enrolled, plaintext: admitted until STRICT.
    assert!(c.get(&legacy, "http://server.shop/", &[]).is_some());
    c.apply("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: shop}\nspec: {mtls: {mode: STRICT}}\n");
    eventually("legacy refused under STRICT", 15, || {
        c.get(&legacy, "http://server.shop/", &[]).is_none()
    });
    let deny = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-client, namespace: shop}\n\
                spec:\n  selector: {matchLabels: {app: server}}\n  action: DENY\n  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]}]\n";
    c.apply(deny);
    eventually("the client denied", 15, || {
        c.get(&client, "http://server/", &[]).is_none()
    });
    c.ok(&["delete", "authorizationpolicy", "no-client", "-n", "shop"]);
    eventually("the client allowed again", 15, || {
        c.get(&client, "http://server/", &[]).is_some()
    });
}

fn waypoint(c: &Cluster) {
    c.apply(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: waypoint, namespace: shop}\n\
         spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}\n",
    );
    c.sh(
        "kubectl label namespace shop istio.io/use-waypoint=waypoint\n\
          kubectl -n shop wait --for=condition=Programmed gateway/waypoint --timeout=60s\n\
          kubectl -n shop rollout status deployment/waypoint --timeout=60s",
    );
    c.apply(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: server, namespace: shop}\n\
         spec:\n  parentRefs: [{group: \"\", kind: Service, name: server, port: 80}]\n  rules:\n\
         \x20 - matches: [{headers: [{name: x-version, value: v2}]}]\n    backendRefs: [{name: server-v2, port: 80}]\n\
         \x20 - backendRefs: [{name: server, port: 80}]\n",
    );
    let client = c.pod("shop", "client-", None).expect("the client");
    eventually("x-version: v2 routed to server-v2", 20, || {
        c.get(&client, "http://server/", &["x-version: v2"])
            .is_some_and(|a| a.contains("pod=server-v2-"))
    });
    let plain = c.get(&client, "http://server/", &[]).unwrap_or_default();
    assert!(
        plain.contains("pod=server-") && !plain.contains("pod=server-v2-"),
        "{plain}"
    );
    c.apply(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-admin, namespace: shop}\n\
         spec:\n  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]\n  action: DENY\n\
         \x20 rules: [{to: [{operation: {paths: [/admin]}}]}]\n",
    );
    eventually("/admin denied at the waypoint (403)", 20, || {
        c.get(&client, "http://server/admin", &[])
            .is_some_and(|a| a.contains("403"))
    });
    assert!(
        c.get(&client, "http://server/", &[])
            .is_some_and(|a| a.contains("200"))
    );
}

/// The serial of every certificate a ztunnel holds.
fn serials(c: &Cluster) -> Vec<String> {
    let mut out = Vec::new();
    for z in c.pods("istio-system", "ztunnel-") {
        let dump = c
            .get(&z, "http://127.0.0.1:15000/config_dump", &[])
            .unwrap_or_default();
        let body = dump.split_once('\n').map_or(dump.as_str(), |(_, b)| b);
        let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        for cert in v["certificates"].as_array().into_iter().flatten() {
            out.push(cert["serial"].as_str().unwrap_or_default().to_string());
        }
    }
    out.sort();
    out
}

fn certificates(c: &Cluster) {
    let before = serials(c);
    assert!(!before.is_empty(), "no certificates in the ztunnels");
    c.sh(
        "kubectl -n istio-system rollout restart daemonset/ztunnel\n\
          kubectl -n istio-system rollout status daemonset/ztunnel --timeout=120s",
    );
    let client = c.pod("shop", "client-", None).expect("the client");
    eventually("traffic through the new ztunnels", 30, || {
        c.get(&client, "http://server/", &["x-version: v2"])
            .is_some_and(|a| a.contains("pod=server-v2-"))
    });
    // Once the old pods are gone: only certificates issued since.
    eventually("only new certificates in the ztunnels", 30, || {
        let after = serials(c);
        c.pods("istio-system", "ztunnel-").len() == 2
            && !after.is_empty()
            && after.iter().all(|s| !before.contains(s))
    });
    eprintln!("serials before {before:?}, after {:?}", serials(c));
}

/// The node agent's own roll (maxUnavailable, no surge): never two agents
/// on a node, and the pods stay captured and served (no ztunnel releases
/// one; traffic passes after, through the same ztunnels).
fn node_agent_roll(c: &Cluster) {
    let before: Vec<String> = c
        .pods("istio-system", "node-agent-")
        .into_iter()
        .map(|p| p.name)
        .collect();
    let ztunnels = c.pods("istio-system", "ztunnel-");
    let released = |c: &Cluster| -> usize {
        ztunnels
            .iter()
            .map(|z| c.log(z, "ztunnel").matches("pod released").count())
            .sum()
    };
    let released_before = released(c);
    let most_on_a_node = std::sync::atomic::AtomicUsize::new(0);
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let agents = c.pods("istio-system", "node-agent-");
                for node in ["node-1", "node-2"] {
                    let n = agents.iter().filter(|p| p.node == node).count();
                    most_on_a_node.fetch_max(n, std::sync::atomic::Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        c.sh(
            "kubectl -n istio-system rollout restart daemonset/node-agent\n\
              kubectl -n istio-system rollout status daemonset/node-agent --timeout=120s",
        );
        done.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    assert_eq!(
        most_on_a_node.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "two node agents on a node during their roll"
    );
    eventually("the old node agents gone", 30, || {
        let now = c.pods("istio-system", "node-agent-");
        now.len() == 2 && now.iter().all(|p| !before.contains(&p.name))
    });
    let client = c.pod("shop", "client-", None).expect("the client");
    eventually("traffic after the node agents' roll", 30, || {
        c.get(&client, "http://server/", &[])
            .is_some_and(|a| a.contains("200"))
    });
    assert_eq!(released(c), released_before, "a pod was released");
    // The same ztunnels, each re-synced by its new agent.
    let same: Vec<String> = c
        .pods("istio-system", "ztunnel-")
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(
        same,
        ztunnels.iter().map(|p| p.name.clone()).collect::<Vec<_>>()
    );
}

fn lease_holder(c: &Cluster) -> String {
    c.jsonpath(
        &["get", "lease", "istiod-lite", "-n", "istio-system"],
        "{.spec.holderIdentity}",
    )
}

fn failover(c: &Cluster) {
    let holder = lease_holder(c);
    assert!(holder.starts_with("istiod-lite-"), "{holder:?}");
    let t = Instant::now();
    c.ok(&[
        "delete",
        "pod",
        &holder,
        "-n",
        "istio-system",
        "--wait=false",
    ]);
    eventually("another replica holds the Lease", 30, || {
        let h = lease_holder(c);
        !h.is_empty() && h != holder
    });
    eprintln!(
        "Lease handed over in {:?}: {}",
        t.elapsed(),
        lease_holder(c)
    );
    // The new leader writes: a namespace enrolled now gets the root ConfigMap.
    c.ok(&["create", "namespace", "late"]);
    c.ok(&[
        "label",
        "namespace",
        "late",
        "istio.io/dataplane-mode=ambient",
    ]);
    eventually("the root ConfigMap in the new namespace", 20, || {
        c.kubectl(&["get", "configmap", "istio-ca-root-cert", "-n", "late"])
            .status
            .success()
    });
    c.sh("kubectl -n istio-system rollout status deployment/istiod-lite --timeout=60s");
    // meshctl reads a serving replica, and the ztunnels are connected again.
    eventually("meshctl --kube check passes after the failover", 30, || {
        c.meshctl(&["check"]).0
    });
}

/// /ready of an istiod-lite pod (its health port): (ok, body).
fn istiod_ready(c: &Cluster) -> Vec<String> {
    c.pods("istio-system", "istiod-lite-")
        .iter()
        .filter_map(|p| c.get(p, "http://127.0.0.1:15014/ready", &[]))
        .collect()
}

fn crd_deleted(c: &Cluster) {
    c.ok(&["delete", "crd", "trafficpolicies.extensions.mesh.dev"]);
    eventually("TrafficPolicy reported by every replica", 20, || {
        let r = istiod_ready(c);
        r.len() == 2
            && r.iter()
                .all(|b| b.contains("200") && b.contains("TrafficPolicy: not served"))
    });
    eprintln!("{}", istiod_ready(c).join("\n"));
    let (ok, check) = c.meshctl(&["check"]);
    eprintln!("$ meshctl --kube check\n{check}");
    assert!(!ok && check.contains("TrafficPolicy"), "{check}");
    let client = c.pod("shop", "client-", None).expect("the client");
    assert!(
        c.get(&client, "http://server/", &["x-version: v2"])
            .is_some_and(|a| a.contains("pod=server-v2-"))
    );
    c.ok(&["apply", "-k", "manifests/crds"]);
    eventually("TrafficPolicy served again", 20, || {
        istiod_ready(c).iter().all(|b| !b.contains("not served"))
    });
}

fn model_has(c: &Cluster, ip: &str) -> bool {
    let leader = lease_holder(c);
    c.pod("istio-system", &leader, None)
        .and_then(|p| c.get(&p, "http://127.0.0.1:15014/debug/model", &[]))
        .is_some_and(|m| m.contains(&format!("\"{ip}\"")) || m.contains(ip))
}

fn api_restart(c: &Cluster) {
    c.kill_control_plane();
    std::thread::sleep(Duration::from_secs(8));
    let back = c.start_control_plane();
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: after, namespace: legacy}\n\
               spec: {containers: [{name: app, image: labapp, args: [sleep]}]}\n";
    eventually("a pod created after the return", 20, || {
        c.kubectl(&["get", "--raw", "/readyz"]).status.success() && {
            c.apply(pod);
            true
        }
    });
    let deadline = back + CURRENT_WITHIN + Duration::from_secs(10);
    let mut current = None;
    while Instant::now() < deadline {
        if let Some(p) = c.pod("legacy", "after", None)
            && istiod_ready(c)
                .iter()
                .all(|b| b.contains("200") && !b.contains("not"))
            && model_has(c, &p.ip)
        {
            current = Some(back.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = current.expect("the controller never became current after the API server's return");
    // The kubelet's own start of the pod counts against the controller
    // here: it is measured from the pod's Running.
    eprintln!("the controller current {took:?} after the API server's return");
    assert!(
        took <= CURRENT_WITHIN,
        "current only {took:?} after the API server's return"
    );
}

/// What the node agents logged about their stops and captures (the lab's
/// container logs), for a failed uninstall's message.
fn agent_stops(dir: &std::path::Path) -> String {
    let mut out = String::new();
    let Ok(logs) = std::fs::read_dir(dir.join("logs")) else {
        return "(no logs directory)".into();
    };
    for entry in logs.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.ends_with("-node-agent.log") {
            continue;
        }
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        out.push_str(&format!("--- {name}\n"));
        for line in text.lines().filter(|l| {
            [
                "started",
                "captur",
                "releas",
                "left the mesh",
                "uninstall",
                "stopping",
                "probe tables",
                "WARN",
            ]
            .iter()
            .any(|k| l.contains(k))
        }) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fn uninstall(c: &Cluster) {
    c.sh(r#"for ns in $(kubectl get ns -l istio.io/dataplane-mode=ambient -o name | cut -d/ -f2); do
  kubectl label namespace "$ns" istio.io/dataplane-mode- istio.io/use-waypoint-
  kubectl -n "$ns" rollout restart deployment,statefulset,daemonset
  for w in $(kubectl -n "$ns" get deployment,statefulset,daemonset -o name); do
    kubectl -n "$ns" rollout status "$w" --timeout=120s
  done
done
kubectl get gateways.gateway.networking.k8s.io -A -o jsonpath='{range .items[?(@.spec.gatewayClassName=="istio-waypoint")]}{.metadata.namespace} {.metadata.name}{"\n"}{end}' \
  | while read -r ns name; do kubectl -n "$ns" delete gateway.gateway.networking.k8s.io "$name"; done
kubectl -n istio-system delete daemonset node-agent --cascade=foreground
kubectl -n istio-system wait --for=delete pod -l app=node-agent --timeout=120s
kubectl delete -k manifests/ --ignore-not-found
kubectl wait --for=delete namespace/istio-system --timeout=120s
kubectl delete configmap -A -l app.kubernetes.io/managed-by=istiod-lite
kubectl get crd gatewayclasses.gateway.networking.k8s.io >/dev/null 2>&1 \
  && kubectl delete gatewayclass -l app.kubernetes.io/managed-by=istiod-lite"#);
    eventually("istio-system gone", 60, || {
        !c.kubectl(&["get", "namespace", "istio-system"])
            .status
            .success()
    });
    let leftovers = c.sh(
        "kubectl get crd -o name | grep -E 'istio.io|mesh.dev' || true\n\
         kubectl get clusterrole,clusterrolebinding -o name | grep -E 'istiod-lite|ztunnel|node-agent' || true\n\
         kubectl get all,configmap,serviceaccount -A -o name -l gateway.networking.k8s.io/gateway-name || true\n\
         kubectl get configmap -A -o name --field-selector metadata.name=istio-ca-root-cert || true\n\
         kubectl get gatewayclass -o name || true\n\
         kubectl get all,configmap,secret,lease -A -o name -l app.kubernetes.io/managed-by=istiod-lite || true",
    );
    let left: Vec<&str> = leftovers.lines().filter(|l| l.contains('/')).collect();
    assert!(left.is_empty(), "left behind:\n{leftovers}");
    for node in ["node-1", "node-2"] {
        let root = c.dir().join(format!("kube/nodes/{node}"));
        let conf =
            std::fs::read_to_string(root.join("etc/cni/net.d/10-lab.conflist")).unwrap_or_default();
        assert!(!conf.contains("mesh-cni"), "{node}: {conf}");
        for f in ["etc/cni/net.d/mesh-cni-kubeconfig", "opt/cni/bin/mesh-cni"] {
            assert!(!root.join(f).exists(), "{node}: {f} left behind");
        }
    }
    assert!(
        c.state()
            .state
            .pods
            .keys()
            .all(|k| !k.starts_with("istio-system/"))
    );
    // No pod was captured when the agents stopped (their namespaces
    // unenrolled and rolled first): each node's probe tables went with them.
    eprintln!(
        "the node agents' captures and stops:\n{}",
        agent_stops(c.dir())
    );
    for node in &c.state().state.nodes {
        for family in ["inet", "bridge"] {
            let listed = std::process::Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &node.netns,
                    "nft",
                    "list",
                    "table",
                    family,
                    "ztunnel-host",
                ])
                .output()
                .unwrap();
            assert!(
                !listed.status.success(),
                "{}: the {family} ztunnel-host table was left behind; the node agents said:\n{}",
                node.netns,
                agent_stops(c.dir())
            );
        }
    }
    // The workloads run on, outside the mesh.
    c.sh("kubectl -n shop rollout status deployment/server --timeout=60s\nkubectl -n shop rollout status deployment/client --timeout=60s");
    eventually("the old shop pods gone", 30, || {
        c.pods("shop", "").len() == 4
    });
    let client = c.pod("shop", "client-", None).expect("the client");
    eventually("the client reaches the server, plain", 20, || {
        c.get(&client, "http://server/", &[]).is_some()
    });
}
