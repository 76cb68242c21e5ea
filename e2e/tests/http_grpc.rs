//! gRPC through the waypoint and the ingress gateway, HTTP/2 end to end:
//! a tonic echo (`labapp grpc-echo`) called with Python's grpcio (PyPI).
//! Unary, server-streaming, client-streaming and bidirectional calls; the
//! first bidirectional reply arrives before the client half-closes; 10 000
//! messages each way on one stream; `grpc-status` in Istio's metric label
//! and the access log; a `grpc-status` 14 (UNAVAILABLE) answer is retried
//! under the route's retry policy, and counted; a DENY on a method is a
//! gRPC PERMISSION_DENIED; a GRPCRoute sends one method (and one header
//! match) to v2, at the waypoint and (attached to the ingress Gateway) at
//! the ingress.

use std::time::Duration;

#[path = "http/common.rs"]
mod common;
use common::*;

const EXTRA: &str = "apiVersion: apps/v1
kind: Deployment
metadata: {name: grpc-echo-v2, namespace: shop}
spec:
  replicas: 1
  selector: {matchLabels: {app: grpc-echo-v2}}
  template:
    metadata: {labels: {app: grpc-echo-v2}}
    spec:
      serviceAccountName: grpc-echo
      nodeName: node-2
      containers: [{name: app, image: labapp, args: [grpc-echo, --port, \"9090\"]}]
---
apiVersion: v1
kind: Service
metadata: {name: grpc-echo-v2, namespace: shop}
spec: {selector: {app: grpc-echo-v2}, ports: [{name: grpc, port: 80, targetPort: 9090}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: grpc-echo, namespace: shop}
spec:
  parentRefs: [{group: \"\", kind: Service, name: grpc-echo}]
  rules:
  - matches: [{method: {service: labecho.Echo, method: ServerStream}}]
    backendRefs: [{name: grpc-echo-v2, port: 80}]
  - matches: [{method: {service: labecho.Echo, method: Unary}, headers: [{name: x-version, value: v2}]}]
    backendRefs: [{name: grpc-echo-v2, port: 80, weight: 1}]
    filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier: {add: [{name: x-grpcroute, value: \"yes\"}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: grpc-echo, namespace: shop}
spec:
  replicas: 1
  selector: {matchLabels: {app: grpc-echo}}
  template:
    metadata: {labels: {app: grpc-echo}}
    spec:
      serviceAccountName: grpc-echo
      nodeName: node-2
      containers: [{name: app, image: labapp, args: [grpc-echo, --port, \"9090\"]}]
---
apiVersion: v1
kind: Service
metadata: {name: grpc-echo, namespace: shop}
spec: {selector: {app: grpc-echo}, ports: [{name: grpc, port: 80, targetPort: 9090}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: grpc-echo, namespace: shop}
spec:
  parentRefs: [{group: \"\", kind: Service, name: grpc-echo}]
  rules:
  - backendRefs: [{name: grpc-echo, port: 80}]
    retry: {attempts: 2, codes: [503], backoff: 5ms}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-fail-knob, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: \"\", name: grpc-echo}]
  action: DENY
  rules:
  - to: [{operation: {paths: [/labecho.Echo/SetFailNext]}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: grpc-in, namespace: shop}
spec:
  parentRefs: [{name: public, namespace: edge}]
  hostnames: [shop.example.test]
  rules:
  - matches: [{method: {service: labecho.Echo, method: Unary}}, {method: {service: labecho.Echo, method: Bidi}}]
    backendRefs: [{name: grpc-echo, port: 80}]
  - matches: [{method: {service: labecho.Echo, method: ServerStream}}]
    backendRefs: [{name: grpc-echo-v2, port: 80}]
---
";

fn grpc_in_pod(lab: &e2e::lab::Lab, target: &str, call: &[&str]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/http/grpc_client.py");
    let mut cmd = vec!["timeout", "90", "python3", script, target];
    cmd.extend_from_slice(call);
    text(&lab.exec(CLIENT, &cmd).unwrap())
}

fn grpc_from_host(lab: &e2e::lab::Lab, call: &[&str]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/http/grpc_client.py");
    let target = format!("127.0.0.1:{}", ingress_port(lab));
    let out = std::process::Command::new("timeout")
        .args(["90", "python3", script, &target])
        .args(call)
        .args(["--authority", HOST])
        .output()
        .unwrap();
    text(&out)
}

#[tokio::test]
async fn grpc_calls_of_every_kind_stream_through_the_waypoint_and_the_ingress() {
    e2e::pytools::ensure();
    let dir = tempfile::tempdir().unwrap();
    let g = start(dir.path(), EXTRA).await;
    let lab = &g.0;
    let target = "grpc-echo.shop:80";

    e2e::mesh::eventually(
        "the waypoint serves grpc-echo",
        Duration::from_secs(60),
        || {
            let out = grpc_in_pod(lab, target, &["unary"]);
            async move { out.contains("pod=grpc-echo-0 code=OK") }
        },
    )
    .await;
    // The GRPCRoute sends ServerStream to v2 (every other method stays).
    e2e::mesh::eventually("the GRPCRoute is applied", Duration::from_secs(30), || {
        let out = grpc_in_pod(lab, target, &["server", "3"]);
        async move { out.contains("server pods=grpc-echo-v2-0") }
    })
    .await;
    let out = grpc_in_pod(lab, target, &["server", "10000"]);
    assert!(
        out.contains("server 10000\nserver pods=grpc-echo-v2-0\nok"),
        "{out}"
    );
    let out = grpc_in_pod(lab, target, &["unary", "--meta", "x-version=v2"]);
    assert!(
        out.contains("pod=grpc-echo-v2-0 code=OK"),
        "header match: {out}"
    );
    let out = grpc_in_pod(lab, target, &["unary"]);
    assert!(out.contains("pod=grpc-echo-0 code=OK"), "{out}");
    let out = grpc_in_pod(lab, target, &["client", "10000"]);
    assert!(out.contains("client 10000 last=c9999\nok"), "{out}");
    let out = grpc_in_pod(lab, target, &["bidi", "10000"]);
    assert!(
        out.contains("bidi first-reply-before-half-close=True replies=10000"),
        "{out}"
    );

    // Through the ingress, from outside the mesh, routed by a GRPCRoute
    // (the listener admits GRPCRoutes by default): one method to v2.
    let out = grpc_from_host(lab, &["unary"]);
    assert!(out.contains("pod=grpc-echo-0 code=OK"), "{out}");
    let out = grpc_from_host(lab, &["server", "3"]);
    assert!(out.contains("server pods=grpc-echo-v2-0"), "{out}");
    let out = grpc_from_host(lab, &["bidi", "10000"]);
    assert!(
        out.contains("bidi first-reply-before-half-close=True replies=10000"),
        "{out}"
    );

    // A DENY on a method: the gRPC client gets PERMISSION_DENIED (a
    // trailers-only answer, as Envoy gives it), not an HTTP 403.
    let out = grpc_in_pod(lab, target, &["fail", "1", "14"]);
    assert!(out.contains("error PERMISSION_DENIED"), "{out}");

    // UNAVAILABLE once: retried, and the caller sees OK.
    let pod = lab.pod("shop/grpc-echo-0").unwrap().ip.clone();
    let direct = format!("{pod}:9090");
    let out = grpc_in_pod(lab, &direct, &["fail", "1", "14"]);
    assert!(out.contains("set fail_next=1"), "{out}");
    let out = grpc_in_pod(lab, target, &["unary"]);
    assert!(out.contains("code=OK"), "not retried: {out}");
    // UNAVAILABLE past the retries: the caller gets it, and it is counted.
    grpc_in_pod(lab, &direct, &["fail", "3", "14"]);
    let out = grpc_in_pod(lab, target, &["unary"]);
    assert!(out.contains("error UNAVAILABLE"), "{out}");

    // A call slower than its grpc-timeout: the waypoint ends it at the
    // deadline (DEADLINE_EXCEEDED, flag UT), not the client cancelling.
    let out = grpc_in_pod(
        lab,
        target,
        &["unary", "--deadline", "0.5", "--delay-ms", "3000"],
    );
    assert!(out.contains("error DEADLINE_EXCEEDED"), "{out}");

    let m = metrics(lab, WAYPOINT);
    let svc = "destination_service=\"grpc-echo.shop.svc.cluster.local\"";
    let ok = metric_sum(
        &m,
        "istio_requests_total",
        &[
            svc,
            "request_protocol=\"grpc\"",
            "grpc_response_status=\"0\"",
        ],
    );
    assert!(ok >= 4.0, "{ok}: {m}");
    let unavailable = metric_sum(
        &m,
        "istio_requests_total",
        &[
            svc,
            "request_protocol=\"grpc\"",
            "grpc_response_status=\"14\"",
        ],
    );
    assert!(unavailable >= 1.0, "{unavailable}: {m}");
    let log = log(dir.path(), WAYPOINT);
    assert!(
        log.lines().any(|l| l.contains("path=/labecho.Echo/Unary")
            && l.contains("grpc_status=0")
            && l.contains("retries=1")),
        "no retried unary call with grpc_status=0 in the access log:\n{log}"
    );
    assert!(
        log.lines().any(|l| l.contains("path=/labecho.Echo/Unary")
            && l.contains("grpc_status=14")
            && l.contains("grpc_message=\"failing as asked\"")),
        "no grpc_status=14 in the access log:\n{log}"
    );
    assert!(
        log.lines().any(|l| l.contains("path=/labecho.Echo/Unary")
            && l.contains("response_flags=\"UT\"")
            && l.contains("grpc_status=4")),
        "no call ended by the waypoint at its grpc-timeout:\n{log}"
    );
}
