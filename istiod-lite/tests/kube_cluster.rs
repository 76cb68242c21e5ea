//! The cluster suite: the install and the controller against a real
//! Kubernetes API server (`just test-cluster`), through kubectl. Not part of
//! `cargo test`'s work unless `MESH_CLUSTER_TEST=1` (the recipe sets it):
//! without it this test only says it did not run; with it, an API server
//! that cannot be reached fails the test.
//!
//! The recipe starts a control plane (etcd and kube-apiserver, from
//! ../shared/kube) and passes it in `MESH_CLUSTER_KUBECONFIG`, with
//! `MESH_CLUSTER_DIR`, `MESH_CLUSTER_PORT` and `MESH_CONTROL_PLANE` so the
//! suite can restart it and start it afresh. Without those (a running
//! cluster given by `MESH_TEST_KUBECONFIG`), the stages that need to
//! restart or wipe the API server do not run, and say so.
//!
//! There is no kubelet: pods are objects created with kubectl, their status
//! patched as a kubelet would. istiod-lite runs out of cluster as its own
//! ServiceAccount (a token from `kubectl create token`), so the RBAC it
//! gets is exactly the install's.

mod kube_cluster_support;

use std::time::{Duration, Instant};

use kube_cluster_support::{Cluster, Istiod, eventually};

/// The longest the controller may take to be current after the API
/// server's return.
const CURRENT_WITHIN: Duration = Duration::from_secs(5);

fn pod_yaml(ns: &str, name: &str, sa: &str, node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: {sa}}}}}\n\
         spec: {{nodeName: {node}, serviceAccountName: {sa}, automountServiceAccountToken: false, containers: [{{name: c, image: x}}]}}\n"
    )
}

/// A pod, running at `ip`, as its kubelet would report it.
fn run_pod(c: &Cluster, ns: &str, name: &str, sa: &str, ip: &str) {
    c.apply(&pod_yaml(ns, name, sa, "node-1"));
    let status = format!(
        r#"{{"status":{{"phase":"Running","podIP":"{ip}","podIPs":[{{"ip":"{ip}"}}],"conditions":[{{"type":"Ready","status":"True"}}]}}}}"#
    );
    c.ok(&[
        "patch",
        "pod",
        name,
        "-n",
        ns,
        "--subresource=status",
        "--type=merge",
        "-p",
        &status,
    ]);
}

fn model_has_pod(istiod: &Istiod, ip: &str) -> bool {
    istiod.get_json("/debug/model").to_string().contains(ip)
}

#[test]
fn the_mesh_installs_and_converges_on_a_real_api_server() {
    let Some(c) = Cluster::from_env() else {
        eprintln!(
            "cluster suite NOT RUN: MESH_CLUSTER_TEST is not set (`just test-cluster` sets it and starts an API server)"
        );
        return;
    };
    c.reachable();
    fresh_install(&c);
    let istiod = Istiod::start(&c, "istio-system", "istiod-a");
    without_gateway_api(&c, &istiod);
    gateway_api_installed(&c, &istiod);
    route_status(&c);
    token_review(&c, &istiod);
    a_crd_deleted_while_running(&c, &istiod);
    match c.can_restart() {
        true => restart(&c, &istiod),
        false => eprintln!(
            "=== STAGE NOT RUN: API server restart (the suite did not start this API server)"
        ),
    }
    istiod.stop();
    match c.can_restart() {
        true => {
            c.wipe();
            upstream_gateway_api_and_another_namespace(&c);
        }
        false => eprintln!(
            "=== STAGE NOT RUN: upstream Gateway API CRDs on a fresh API server (the suite did not start this API server)"
        ),
    }
}

/// `kubectl apply -k manifests/` on a fresh API server: every object
/// accepted, every CRD Established.
fn fresh_install(c: &Cluster) {
    eprintln!("=== kubectl apply -k manifests/ on a fresh API server");
    let out = c.kubectl(&["apply", "-k", "manifests/"]);
    let text = testkube::text(&out);
    eprintln!("{text}");
    assert!(
        out.status.success(),
        "kubectl apply -k manifests/ failed:\n{text}"
    );
    assert!(!text.contains("Warning"), "{text}");
    c.ok(&[
        "wait",
        "--for=condition=Established",
        "crd",
        "--all",
        "--timeout=60s",
    ]);
    let crds = c.ok(&["get", "crd", "-o", "name"]);
    for crd in [
        "authorizationpolicies.security.istio.io",
        "peerauthentications.security.istio.io",
        "destinationrules.networking.istio.io",
        "trafficpolicies.extensions.mesh.dev",
    ] {
        assert!(crds.contains(crd), "{crd} missing from:\n{crds}");
    }
}

/// No Gateway API CRDs: the mesh is served without them, and says so.
fn without_gateway_api(c: &Cluster, istiod: &Istiod) {
    eprintln!("=== istiod-lite without the Gateway API CRDs: ready, reporting them");
    istiod.wait_ready(Duration::from_secs(20));
    let (_, body) = istiod.ready();
    for kind in ["GatewayClass", "Gateway", "HTTPRoute"] {
        assert!(body.contains(&format!("{kind}: not served")), "{body}");
    }
    eventually("the root ConfigMap in istio-system", 10, || {
        c.kubectl(&[
            "get",
            "configmap",
            "istio-ca-root-cert",
            "-n",
            "istio-system",
        ])
        .status
        .success()
    });
    let (ok, check) = istiod.meshctl_check();
    eprintln!("{check}");
    assert!(!ok && check.contains("istiod-lite: Gateway"), "{check}");
}

/// The Gateway API CRDs installed as docs/install.md says: picked up,
/// GatewayClasses created and Accepted, a waypoint deployed.
fn gateway_api_installed(c: &Cluster, istiod: &Istiod) {
    eprintln!("=== the Gateway API CRDs installed while istiod-lite runs");
    c.sh(
        "kubectl get crd gateways.gateway.networking.k8s.io >/dev/null 2>&1 \\\n  || kubectl apply -k manifests/gateway-api",
    );
    eventually("every kind listed", 15, || istiod.not_listed().is_empty());
    for class in ["istio-waypoint", "mesh-ingress"] {
        eventually(&format!("GatewayClass {class} Accepted"), 10, || {
            c.jsonpath(
                &["get", "gatewayclass", class],
                r#"{.status.conditions[?(@.type=="Accepted")].status}"#,
            ) == "True"
        });
    }
    let classes = c.ok(&["get", "gatewayclass", "-o", "wide"]);
    eprintln!("{classes}");
    c.ok(&["create", "namespace", "shop"]);
    c.ok(&[
        "label",
        "namespace",
        "shop",
        "istio.io/dataplane-mode=ambient",
    ]);
    c.apply(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: waypoint, namespace: shop}\n\
         spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}\n",
    );
    eventually("the waypoint's Deployment and Service", 15, || {
        c.kubectl(&["get", "deployment,service", "waypoint", "-n", "shop"])
            .status
            .success()
    });
    eventually("the waypoint Gateway Programmed", 15, || {
        c.jsonpath(
            &["get", "gateway", "waypoint", "-n", "shop"],
            r#"{.status.conditions[?(@.type=="Programmed")].status}"#,
        ) == "True"
    });
    eventually("the root ConfigMap in shop", 10, || {
        c.kubectl(&["get", "configmap", "istio-ca-root-cert", "-n", "shop"])
            .status
            .success()
    });
}

/// HTTPRoute and GRPCRoute status: one entry per parent of ours, with
/// Gateway API's reasons, our controllerName and the route's generation;
/// none for another controller's Gateway; rewritten when the route
/// changes, and not otherwise.
fn route_status(c: &Cluster) {
    eprintln!("=== route status (status.parents) for our parents only");
    c.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {ports: [{name: http, port: 80}]}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: edge, namespace: shop}\n\
         spec: {gatewayClassName: mesh-ingress, listeners: [{name: http, port: 80, protocol: HTTP, hostname: web.example.com}]}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: theirs, namespace: shop}\n\
         spec: {gatewayClassName: someone-else, listeners: [{name: http, port: 80, protocol: HTTP}]}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: web, namespace: shop}\n\
         spec: {parentRefs: [{name: edge}, {group: \"\", kind: Service, name: web}, {name: theirs}], rules: [{backendRefs: [{name: web, port: 80}]}]}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: echo, namespace: shop}\n\
         spec: {parentRefs: [{name: edge}], rules: [{backendRefs: [{name: missing, port: 80}]}]}\n",
    );
    let get =
        |kind: &str, name: &str, path: &str| c.jsonpath(&["get", kind, name, "-n", "shop"], path);
    let accepted = r#"{.status.parents[*].conditions[?(@.type=="Accepted")].reason}"#;
    let resolved = r#"{.status.parents[*].conditions[?(@.type=="ResolvedRefs")].reason}"#;
    eventually(
        "the HTTPRoute's status for its two parents of ours",
        15,
        || get("httproute", "web", accepted) == "Accepted Accepted",
    );
    assert_eq!(
        get("httproute", "web", "{.status.parents[*].controllerName}"),
        "mesh.dev/istiod-lite mesh.dev/istiod-lite"
    );
    assert_eq!(
        get("httproute", "web", "{.status.parents[*].parentRef.name}"),
        "edge web"
    );
    assert_eq!(
        get("httproute", "web", resolved),
        "ResolvedRefs ResolvedRefs"
    );
    eventually("the GRPCRoute's status", 15, || {
        get("grpcroute", "echo", accepted) == "Accepted"
    });
    assert_eq!(get("grpcroute", "echo", resolved), "BackendNotFound");
    // Written once: a converged status is left alone.
    let version = get("httproute", "web", "{.metadata.resourceVersion}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        get("httproute", "web", "{.metadata.resourceVersion}"),
        version,
        "the status was written again though nothing changed"
    );
    // A change to the route: its new generation, and the listener the
    // parentRef now names does not exist.
    c.apply(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: web, namespace: shop}\n\
         spec: {parentRefs: [{name: edge, sectionName: nope}], rules: [{backendRefs: [{name: web, port: 80}]}]}\n",
    );
    let generation = get("httproute", "web", "{.metadata.generation}");
    eventually("the HTTPRoute's status follows its change", 15, || {
        get("httproute", "web", accepted) == "NoMatchingParent"
            && get(
                "httproute",
                "web",
                "{.status.parents[0].conditions[0].observedGeneration}",
            ) == generation
    });
    cross_namespace_backend(c);
    c.ok(&[
        "delete",
        "httproute,grpcroute,gateway,service",
        "web",
        "echo",
        "edge",
        "theirs",
        "-n",
        "shop",
        "--ignore-not-found",
    ]);
}

/// A backendRef into another namespace: `RefNotPermitted` at every parent
/// until a ReferenceGrant there (written at v1beta1, as most users write
/// it) permits it, and again once the grant is deleted. Runs with the
/// install's RBAC, which must let the controller list and watch grants.
fn cross_namespace_backend(c: &Cluster) {
    eprintln!("=== a backend in another namespace needs a ReferenceGrant");
    c.ok(&["create", "namespace", "team"]);
    c.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: team}\nspec: {ports: [{name: http, port: 80}]}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: cross, namespace: shop}\n\
         spec: {parentRefs: [{name: edge}, {group: \"\", kind: Service, name: web}], rules: [{backendRefs: [{name: api, namespace: team, port: 80}]}]}\n",
    );
    let resolved = || {
        c.jsonpath(
            &["get", "httproute", "cross", "-n", "shop"],
            r#"{.status.parents[*].conditions[?(@.type=="ResolvedRefs")].reason}"#,
        )
    };
    eventually("cross: RefNotPermitted at both parents", 15, || {
        resolved() == "RefNotPermitted RefNotPermitted"
    });
    c.apply(
        "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {name: from-shop, namespace: team}\n\
         spec: {from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: shop}], to: [{group: \"\", kind: Service, name: api}]}\n",
    );
    eventually("cross: ResolvedRefs once team grants it", 15, || {
        resolved() == "ResolvedRefs ResolvedRefs"
    });
    c.ok(&["delete", "referencegrant", "from-shop", "-n", "team"]);
    eventually("cross: RefNotPermitted once the grant is gone", 15, || {
        resolved() == "RefNotPermitted RefNotPermitted"
    });
    c.ok(&["delete", "httproute", "cross", "-n", "shop"]);
    // (The namespace stays: without a controller-manager it would never
    // finish terminating.)
    c.ok(&["delete", "service", "api", "-n", "team"]);
}

/// A ztunnel's real projected token, reviewed by the real API server
/// (TokenReview, with the install's RBAC), gets a certificate for a pod on
/// its node.
fn token_review(c: &Cluster, istiod: &Istiod) {
    eprintln!("=== a certificate for a real service-account token (TokenReview)");
    c.ok(&["create", "serviceaccount", "web", "-n", "shop"]);
    run_pod(c, "istio-system", "ztunnel-x", "ztunnel", "10.0.0.2");
    run_pod(c, "shop", "web-1", "web", "10.0.0.5");
    eventually("web-1 in the model", 10, || {
        model_has_pod(istiod, "10.0.0.5")
    });
    let token = c.ok(&[
        "create",
        "token",
        "ztunnel",
        "-n",
        "istio-system",
        "--audience=istio-ca",
        "--bound-object-kind=Pod",
        "--bound-object-name=ztunnel-x",
        "--duration=10m",
    ]);
    let root = c.jsonpath(
        &[
            "get",
            "configmap",
            "istio-ca-root-cert",
            "-n",
            "istio-system",
        ],
        r#"{.data.root-cert\.pem}"#,
    );
    let web = istiod.certificate(&root, token.trim(), "spiffe://cluster.local/ns/shop/sa/web");
    assert!(web.is_ok(), "{web:?}");
    // Not for a pod elsewhere: the token is bound to node-1's ztunnel.
    let other = istiod.certificate(&root, token.trim(), "spiffe://cluster.local/ns/shop/sa/db");
    assert!(other.is_err(), "{other:?}");
    let refused = istiod.certificate(
        &root,
        "not-a-token",
        "spiffe://cluster.local/ns/shop/sa/web",
    );
    assert!(refused.is_err(), "{refused:?}");
}

/// One CRD deleted while istiod-lite runs: the rest stays served, the
/// missing kind is reported, and it is picked up again once reinstalled.
fn a_crd_deleted_while_running(c: &Cluster, istiod: &Istiod) {
    eprintln!("=== a CRD deleted while istiod-lite runs");
    c.ok(&["delete", "crd", "trafficpolicies.extensions.mesh.dev"]);
    eventually("TrafficPolicy reported", 15, || {
        istiod.ready().1.contains("TrafficPolicy: not served")
    });
    let (code, body) = istiod.ready();
    eprintln!("/ready: {code}\n{body}");
    assert_eq!(code, 200);
    let (ok, check) = istiod.meshctl_check();
    eprintln!("{check}");
    assert!(
        !ok && check.contains("istiod-lite: TrafficPolicy"),
        "{check}"
    );
    assert!(istiod.log().contains("TrafficPolicy: not served"));
    // The rest is served: a new pod arrives.
    run_pod(c, "shop", "web-2", "web", "10.0.0.6");
    eventually("web-2 in the model", 10, || {
        model_has_pod(istiod, "10.0.0.6")
    });
    c.ok(&["apply", "-k", "manifests/crds"]);
    eventually("TrafficPolicy listed again", 15, || {
        istiod.not_listed().is_empty()
    });
}

/// The API server (and its etcd) killed, down for a while, started again:
/// within [`CURRENT_WITHIN`] every kind is listed again and a pod created
/// after the return is in the model.
fn restart(c: &Cluster, istiod: &Istiod) {
    eprintln!("=== the API server killed, down 8 s, started again");
    c.kill_control_plane();
    // Long enough for a backoff that is never reset to have grown.
    std::thread::sleep(Duration::from_secs(8));
    assert!(!istiod.not_listed().is_empty(), "the outage went unnoticed");
    let back = c.start_control_plane();
    // The first write after the return may meet an API server that still
    // warms up; kubectl is not what is measured.
    eventually("a pod created after the return", 20, || {
        c.apply_quiet(&pod_yaml("shop", "web-3", "web", "node-1"))
    });
    let _ = c.kubectl(&[
        "patch",
        "pod",
        "web-3",
        "-n",
        "shop",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"phase":"Running","podIP":"10.0.0.7","podIPs":[{"ip":"10.0.0.7"}]}}"#,
    ]);
    let deadline = back + CURRENT_WITHIN;
    while Instant::now() < deadline
        && !(istiod.not_listed().is_empty() && model_has_pod(istiod, "10.0.0.7"))
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = back.elapsed();
    let current = istiod.not_listed().is_empty() && model_has_pod(istiod, "10.0.0.7");
    eprintln!("current again {took:?} after the API server's return: {current}");
    assert!(
        current,
        "not current {CURRENT_WITHIN:?} after the API server's return: not listed {:?}",
        istiod.not_listed()
    );
}

/// Upstream Gateway API CRDs installed first (standard channel shape: v1
/// stored, v1beta1 served, upstream's annotations), the mesh installed into
/// another namespace: the install leaves those CRDs alone and the mesh
/// uses them.
fn upstream_gateway_api_and_another_namespace(c: &Cluster) {
    eprintln!("=== upstream Gateway API CRDs first, the mesh in namespace `mesh`");
    for (_, mut crd) in istiod_lite::crdgen::gateway_api_crds() {
        let a = crd
            .metadata
            .annotations
            .get_or_insert_with(Default::default);
        a.remove(istiod_lite::crdgen::GATEWAY_API_ORIGIN);
        a.insert(
            "gateway.networking.k8s.io/bundle-version".into(),
            "v1.5.1".into(),
        );
        a.insert(
            "gateway.networking.k8s.io/channel".into(),
            "standard".into(),
        );
        c.apply(&serde_yaml::to_string(&crd).unwrap());
    }
    c.ok(&[
        "wait",
        "--for=condition=Established",
        "crd",
        "--all",
        "--timeout=60s",
    ]);
    let overlay = c.overlay("mesh");
    let text = c.sh(&format!(
        "kubectl get crd gateways.gateway.networking.k8s.io >/dev/null 2>&1 \\\n  || kubectl apply -k manifests/gateway-api\nkubectl apply -k {overlay}"
    ));
    assert!(
        !text.contains("gateway.networking.k8s.io created"),
        "{text}"
    );
    // Left as upstream made them: versions and annotations.
    for plural in [
        "gatewayclasses",
        "gateways",
        "httproutes",
        "referencegrants",
    ] {
        let crd = format!("{plural}.gateway.networking.k8s.io");
        let bundle = c.jsonpath(
            &["get", "crd", &crd],
            r#"{.metadata.annotations.gateway\.networking\.k8s\.io/bundle-version}"#,
        );
        assert_eq!(bundle, "v1.5.1", "{crd}");
        let served = c.jsonpath(&["get", "crd", &crd], "{.spec.versions[*].name}");
        assert_eq!(served, "v1 v1beta1", "{crd}");
    }
    let istiod = Istiod::start(c, "mesh", "istiod-b");
    istiod.wait_ready(Duration::from_secs(20));
    assert!(istiod.not_listed().is_empty(), "{:?}", istiod.not_listed());
    for class in ["istio-waypoint", "mesh-ingress"] {
        eventually(&format!("GatewayClass {class} Accepted"), 10, || {
            c.jsonpath(
                &["get", "gatewayclass", class],
                r#"{.status.conditions[?(@.type=="Accepted")].status}"#,
            ) == "True"
        });
    }
    // The root namespace is the controller's.
    eventually("the root ConfigMap in mesh", 10, || {
        c.kubectl(&["get", "configmap", "istio-ca-root-cert", "-n", "mesh"])
            .status
            .success()
    });
    // A waypoint written at v1beta1, which the upstream CRDs serve.
    c.ok(&["create", "namespace", "shop"]);
    c.apply(
        "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: Gateway\nmetadata: {name: waypoint, namespace: shop}\n\
         spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}\n",
    );
    eventually("the waypoint Gateway Programmed", 15, || {
        c.jsonpath(
            &["get", "gateway", "waypoint", "-n", "shop"],
            r#"{.status.conditions[?(@.type=="Programmed")].status}"#,
        ) == "True"
    });
    let config = c.jsonpath(
        &["get", "configmap", "waypoint-waypoint", "-n", "shop"],
        r#"{.data.config\.yaml}"#,
    );
    assert!(config.contains("istiod-lite.mesh.svc:15012"), "{config}");
    istiod.stop();
}
