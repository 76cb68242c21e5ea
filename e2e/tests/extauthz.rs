//! CUSTOM authorization in the lab: a waypoint asks the lab's external
//! authorization server (`labapp ext-authz`, Envoy's ext_authz gRPC API)
//! about the requests a CUSTOM policy matches. Allowed with the header the
//! server wants (and the server's edits applied), denied without it with
//! the server's own status, header and body; with the server gone, denied
//! with 403 until the provider is made `failOpen`.

use std::time::Duration;

use e2e::lab::{Down as Guard, Lab, MESH_CONFIG};
use e2e::mesh::eventually;

const CLIENT: &str = "shop/client-0";
const PRIVATE: &str = "http://orders.shop/private/report";

fn mesh_config(fail_open: bool) -> String {
    format!(
        "extensionProviders:\n- name: lab-authz\n  envoyExtAuthzGrpc:\n    service: ext-authz.authz.svc.cluster.local\n    port: 9000\n    timeout: 2s\n    failOpen: {fail_open}\n"
    )
}

const DOCS: &str = "apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
---
apiVersion: v1
kind: Namespace
metadata: {name: authz}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: orders, namespace: shop}
spec:
  replicas: 1
  selector: {matchLabels: {app: orders}}
  template:
    metadata: {labels: {app: orders}}
    spec:
      serviceAccountName: orders
      containers: [{name: app, image: labapp, args: [http-echo, --port, \"8080\"]}]
---
apiVersion: v1
kind: Service
metadata: {name: orders, namespace: shop}
spec: {selector: {app: orders}, ports: [{name: http, port: 80, targetPort: 8080}]}
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
      containers: [{name: app, image: labapp, args: [sleep]}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: ext-authz, namespace: authz}
spec:
  replicas: 1
  selector: {matchLabels: {app: ext-authz}}
  template:
    metadata: {labels: {app: ext-authz}}
    spec:
      containers: [{name: app, image: labapp, args: [ext-authz, --port, \"9000\"]}]
---
apiVersion: v1
kind: Service
metadata: {name: ext-authz, namespace: authz}
spec: {selector: {app: ext-authz}, ports: [{name: grpc, port: 9000, targetPort: 9000}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: private-needs-ext-authz, namespace: shop}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]
  action: CUSTOM
  provider: {name: lab-authz}
  rules: [{to: [{operation: {paths: [\"/private/*\"]}}]}]
";

/// `labapp get --show-headers` from a pod: status line, response headers,
/// then the body.
fn get_from(lab: &Lab, pod: &str, url: &str, headers: &[&str]) -> String {
    let mut cmd = vec!["labapp", "get", url, "--show-headers"];
    for h in headers {
        cmd.extend_from_slice(&["--header", h]);
    }
    let out = lab.exec(pod, &cmd).unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn get(lab: &Lab, url: &str, headers: &[&str]) -> String {
    get_from(lab, CLIENT, url, headers)
}

/// The waypoint's count of checks by result, read from its metrics.
fn checks(lab: &Lab, result: &str) -> u64 {
    let waypoint = "shop/waypoint-0";
    let ip = lab.pod(waypoint).unwrap().ip.clone();
    let text = get_from(lab, waypoint, &format!("http://{ip}:15020/metrics"), &[]);
    text.lines()
        .filter(|l| l.starts_with("waypoint_ext_authz_checks_total{"))
        .filter(|l| {
            l.contains("provider=\"lab-authz\"") && l.contains(&format!("result=\"{result}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test]
async fn a_custom_policy_asks_the_ext_authz_server_at_the_waypoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Guard(Lab::create_in(dir.path(), e2e::lab::TEST_IDS, 2).unwrap());
    std::fs::write(g.0.dir.join(MESH_CONFIG), mesh_config(false)).unwrap();
    g.0.start_mesh().await.unwrap();
    g.0.apply(e2e::lab::parse_docs(DOCS).unwrap())
        .await
        .unwrap();

    // The waypoint has the policy once a request without the header gets
    // the server's own denial.
    let lab = &g.0;
    eventually(
        "the waypoint asks the ext-authz server",
        Duration::from_secs(60),
        || async { get(lab, PRIVATE, &[]).starts_with("401") },
    )
    .await;

    // Denied without the header: the server's status, header and body.
    let denied = get(lab, PRIVATE, &[]);
    assert!(denied.starts_with("401 Unauthorized"), "{denied}");
    assert!(
        denied.contains("x-ext-authz-check-result: denied"),
        "{denied}"
    );
    assert!(
        denied.contains("denied by ext-authz ext-authz-0 for \"/private/report\""),
        "{denied}"
    );

    // Allowed with it, with the server's edits: the app sees the header the
    // server set and not the one it removed; the client sees the response
    // header the server added.
    let allowed = get(lab, PRIVATE, &["x-ext-authz: allow"]);
    assert!(allowed.starts_with("200 OK"), "{allowed}");
    assert!(allowed.contains("pod=orders-0"), "{allowed}");
    assert!(
        allowed.contains("x-ext-authz-check-result: allowed"),
        "{allowed}"
    );
    assert!(!allowed.contains("x-ext-authz: allow"), "{allowed}");
    assert!(
        allowed.contains("x-ext-authz-server: ext-authz-0"),
        "{allowed}"
    );

    // A path the policy does not match: the server is not asked.
    let before = checks(lab, "allowed") + checks(lab, "denied");
    let public = get(lab, "http://orders.shop/public", &[]);
    assert!(public.starts_with("200 OK"), "{public}");
    assert!(!public.contains("x-ext-authz-check-result"), "{public}");
    assert_eq!(checks(lab, "allowed") + checks(lab, "denied"), before);
    assert!(checks(lab, "allowed") >= 1 && checks(lab, "denied") >= 2);

    // The server gone: refused with 403 (failOpen is false).
    let pid = lab.pod("authz/ext-authz-0").unwrap().pid.expect("runs");
    g.0.end_process(pid).unwrap();
    let lab = &g.0;
    let down = get(lab, PRIVATE, &["x-ext-authz: allow"]);
    assert!(down.starts_with("403 Forbidden"), "{down}");
    assert!(!down.contains("pod=orders-0"), "{down}");
    assert!(checks(lab, "error_denied") >= 1);

    // failOpen: true (the controller reads the mesh config at start).
    std::fs::write(g.0.dir.join(MESH_CONFIG), mesh_config(true)).unwrap();
    g.0.stop("istiod-lite", false).unwrap();
    g.0.restart("istiod-lite").unwrap();
    let lab = &g.0;
    eventually(
        "a failing provider lets requests through once it fails open",
        Duration::from_secs(60),
        || async { get(lab, PRIVATE, &[]).starts_with("200") },
    )
    .await;
    let open = get(lab, PRIVATE, &[]);
    assert!(open.contains("pod=orders-0"), "{open}");
    assert!(checks(lab, "error_allowed") >= 1);
}
