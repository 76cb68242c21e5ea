//! The lab every HTTP traffic test starts from: a namespace behind its
//! waypoint, an ingress gateway in front of it, an echo that streams, a
//! flaky echo with a retrying route, and a client pod; and the helpers
//! those tests share (a command in a pod, a process's RSS sampled while a
//! transfer runs, the proxies' metrics and logs).

#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use e2e::lab::{Down, Lab, TEST_IDS};
use e2e::mesh::eventually;

pub const CLIENT: &str = "shop/client-0";
pub const WAYPOINT: &str = "shop/waypoint-0";
pub const INGRESS: &str = "edge/public-0";
pub const HOST: &str = "shop.example.test";

fn echo(name: &str, labels: &str, node: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  replicas: 1\n  selector: {{matchLabels: {{app: {name}}}}}\n  template:\n    metadata: {{labels: {{app: {name}{labels}}}}}\n    spec:\n      serviceAccountName: {name}\n      nodeName: {node}\n      containers: [{{name: app, image: labapp, args: [http-echo, --port, \"8080\"]}}]\n---\n"
    )
}

fn service(name: &str, app: &str, port_name: &str, app_protocol: Option<&str>) -> String {
    let ap = app_protocol
        .map(|a| format!(", appProtocol: {a}"))
        .unwrap_or_default();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{selector: {{app: {app}}}, ports: [{{name: {port_name}, port: 80, targetPort: 8080{ap}}}]}}\n---\n"
    )
}

/// The lab's objects, plus `extra` YAML.
pub fn docs(extra: &str) -> String {
    let mut d = String::new();
    d.push_str("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}\n---\n");
    d.push_str("apiVersion: v1\nkind: Namespace\nmetadata: {name: edge}\n---\n");
    d.push_str("apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: waypoint, namespace: shop}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n---\n");
    d.push_str("apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: public, namespace: edge}\nspec:\n  gatewayClassName: mesh-ingress\n  listeners:\n  - {name: http, port: 8080, protocol: HTTP, hostname: shop.example.test, allowedRoutes: {namespaces: {from: All}}}\n---\n");
    d.push_str(&echo("sink", "", "node-2"));
    d.push_str(&echo("flaky", "", "node-2"));
    d.push_str("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: client, namespace: shop}\nspec:\n  replicas: 1\n  selector: {matchLabels: {app: client}}\n  template:\n    metadata: {labels: {app: client}}\n    spec:\n      serviceAccountName: client\n      nodeName: node-1\n      containers: [{name: app, image: labapp, args: [sleep]}]\n---\n");
    d.push_str(&service("sink", "sink", "http", None));
    d.push_str(&service("sink-h2", "sink", "http2", None));
    d.push_str(&service("flaky", "flaky", "http", None));
    d.push_str(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: flaky, namespace: shop}
spec:
  parentRefs: [{group: \"\", kind: Service, name: flaky}]
  rules:
  - backendRefs: [{name: flaky, port: 80}]
    retry: {attempts: 3, codes: [503], backoff: 5ms}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: shop, namespace: shop}
spec:
  parentRefs: [{name: public, namespace: edge}]
  hostnames: [shop.example.test]
  rules: [{backendRefs: [{name: sink, port: 80}]}]
---
",
    );
    d.push_str(extra);
    d
}

/// A lab with [`docs`] applied, once the waypoint and the ingress serve.
pub async fn start(dir: &Path, extra: &str) -> Down {
    start_with_limits(dir, extra, "").await
}

/// [`start`], with `limits` (YAML lines, indented two spaces) added to the
/// waypoint's and the ingress's `limits:`.
pub async fn start_with_limits(dir: &Path, extra: &str, limits: &str) -> Down {
    let mut g = Down(Lab::create_in(dir, TEST_IDS, 2).unwrap());
    g.0.state.waypoint_limits = limits.to_string();
    g.0.start_mesh().await.unwrap();
    g.0.apply(e2e::lab::parse_docs(&docs(extra)).unwrap())
        .await
        .unwrap();
    let lab = &g.0;
    // The waypoint adds x-request-id: an answer with it came through it.
    eventually(
        "the waypoint serves sink",
        Duration::from_secs(60),
        || async {
            let out = sh(lab, CLIENT, "curl -sS --max-time 5 http://sink.shop/ready");
            out.contains("pod=sink-0") && out.contains("x-request-id")
        },
    )
    .await;
    let url = ingress_url(lab, "/ready");
    eventually(
        "the ingress serves shop.example.test",
        Duration::from_secs(60),
        || {
            let out = host_curl(lab, &["--max-time", "5", &url]);
            let ok = String::from_utf8_lossy(&out.stdout).contains("pod=sink-0");
            async move { ok }
        },
    )
    .await;
    g
}

/// `sh -c script` in a pod: its stdout (stderr after it).
pub fn sh(lab: &Lab, pod: &str, script: &str) -> String {
    let out = lab.exec(pod, &["sh", "-c", script]).unwrap();
    text(&out)
}

pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The ingress's published HTTP port on the machine's loopback.
pub fn ingress_port(lab: &Lab) -> String {
    let a = lab
        .published("edge", "public", 8080)
        .expect("8080 published");
    a.rsplit_once(':').unwrap().1.to_string()
}

pub fn ingress_url(lab: &Lab, path: &str) -> String {
    format!("http://{HOST}:{}{path}", ingress_port(lab))
}

/// curl from the machine's own netns, with shop.example.test resolved to
/// the published port.
pub fn host_curl(lab: &Lab, args: &[&str]) -> Output {
    let resolve = format!("{HOST}:{}:127.0.0.1", ingress_port(lab));
    Command::new("curl")
        .args(["-sS", "--resolve", &resolve])
        .args(args)
        .output()
        .expect("curl runs")
}

/// Resident memory of a process, in bytes (0 once it is gone).
pub fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Runs `f` while sampling `pid`'s RSS every 50 ms: its result, and how far
/// the RSS rose above where it stood before.
pub fn with_rss<T>(pid: u32, f: impl FnOnce() -> T) -> (T, u64) {
    let before = rss(pid);
    let peak = Arc::new(AtomicU64::new(before));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let r = f();
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    (r, peak.load(Ordering::Relaxed).saturating_sub(before))
}

pub fn pid(lab: &Lab, pod: &str) -> u32 {
    lab.pod(pod).unwrap().pid.expect("pod runs")
}

/// A proxy's Prometheus text.
pub fn metrics(lab: &Lab, pod: &str) -> String {
    let ip = lab.pod(pod).unwrap().ip.clone();
    sh(
        lab,
        CLIENT,
        &format!("curl -sS --max-time 5 http://{ip}:15020/metrics"),
    )
}

/// The sum of the samples of `name` whose labels contain all of `want`.
pub fn metric_sum(metrics: &str, name: &str, want: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| want.iter().all(|w| l.contains(w)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A pod's log (the waypoint's access log is in it).
pub fn log(dir: &Path, pod: &str) -> String {
    let file = format!("logs/pod-{}.log", pod.replace('/', "-"));
    std::fs::read_to_string(dir.join(file)).unwrap_or_default()
}

/// How many requests an echo pod has served (asked by pod IP, which
/// bypasses the waypoint).
pub fn served(lab: &Lab, pod: &str) -> u64 {
    let ip = lab.pod(pod).unwrap().ip.clone();
    let body = sh(
        lab,
        CLIENT,
        &format!("curl -sS --max-time 5 http://{ip}:8080/_stats"),
    );
    body.lines()
        .find_map(|l| l.strip_prefix("served="))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no count from {pod}: {body}"))
}

/// Tells an echo pod to fail its next `n` requests with 503.
pub fn fail_next(lab: &Lab, pod: &str, n: u32) {
    let ip = lab.pod(pod).unwrap().ip.clone();
    let out = sh(
        lab,
        CLIENT,
        &format!("curl -sS --max-time 5 'http://{ip}:8080/_fail_next?n={n}'"),
    );
    assert!(out.contains(&format!("fail_next={n}")), "{out}");
}
