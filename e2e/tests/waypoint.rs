//! The waypoint in the lab: a namespace that asks for L7 gets it through
//! its waypoint pod (the production binary), and one that does not never
//! reaches a waypoint. Routing, weighted splits, retries under a budget,
//! timeouts, outlier ejection, trace context, metrics and the access log
//! are each checked from a client pod's point of view.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use e2e::lab::Lab;
use e2e::mesh::eventually;
use serde_json::Value;

use e2e::lab::Down as Guard;

#[path = "waypoint/attach.rs"]
mod attach;
#[path = "waypoint/grants.rs"]
mod grants;

fn yaml(text: &str) -> Vec<Value> {
    e2e::lab::parse_docs(text).unwrap()
}

/// An http-echo Deployment whose pods carry `labels` (and `app: name`).
fn echo(ns: &str, name: &str, replicas: u32, labels: &str, args: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  replicas: {replicas}\n  selector: {{matchLabels: {{app: {name}}}}}\n  template:\n    metadata: {{labels: {{app: {name}{labels}}}}}\n    spec:\n      serviceAccountName: {name}\n      containers: [{{name: app, image: labapp, args: [http-echo, --port, \"8080\"{args}]}}]\n---\n"
    )
}

fn service(ns: &str, name: &str, selector: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{selector: {{{selector}}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n---\n"
    )
}

#[derive(Debug, Default, serde::Deserialize)]
struct Load {
    status: BTreeMap<u16, usize>,
    by_pod: BTreeMap<String, usize>,
    #[serde(default)]
    by_proto: BTreeMap<String, usize>,
    errors: usize,
    first_error: Option<String>,
    max_ms: f64,
}

impl Load {
    fn ok(&self) -> usize {
        self.status.get(&200).copied().unwrap_or(0)
    }
}

/// `labapp load` from a pod.
fn load(
    lab: &Lab,
    from: &str,
    url: &str,
    requests: usize,
    concurrency: usize,
    extra: &[&str],
) -> Load {
    let n = requests.to_string();
    let c = concurrency.to_string();
    let mut cmd = vec!["labapp", "load", url, "--requests", &n, "--concurrency", &c];
    cmd.extend_from_slice(extra);
    let out = lab.exec(from, &cmd).unwrap();
    assert!(
        out.status.success(),
        "load failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

fn get(lab: &Lab, from: &str, url: &str, headers: &[&str]) -> String {
    let mut cmd = vec!["labapp", "get", url];
    for h in headers {
        cmd.extend_from_slice(&["--header", h]);
    }
    let out = lab.exec(from, &cmd).unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The echo pod's count of requests served, asked directly (pod IPs are
/// not sent through the waypoint: it serves services).
fn served(lab: &Lab, from: &str, pod: &str) -> u64 {
    let ip = lab.pod(pod).unwrap().ip.clone();
    let body = get(lab, from, &format!("http://{ip}:8080/_stats"), &[]);
    body.lines()
        .find_map(|l| l.strip_prefix("served="))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no count from {pod}: {body}"))
}

fn config_dump(lab: &Lab, waypoint: &str) -> Value {
    let out = get(lab, waypoint, "http://127.0.0.1:15000/config_dump", &[]);
    let json = out.split_once('\n').map(|(_, j)| j).unwrap_or("");
    serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn metrics(lab: &Lab, waypoint: &str) -> String {
    let ip = lab.pod(waypoint).unwrap().ip.clone();
    get(lab, waypoint, &format!("http://{ip}:15020/metrics"), &[])
}

/// The sum of `istio_requests_total` series whose labels contain all of `want`.
fn requests_total(metrics: &str, want: &[&str]) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .filter(|l| want.iter().all(|w| l.contains(w)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test]
async fn a_waypoint_routes_splits_retries_times_out_and_ejects() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Guard(Lab::create_in(dir.path(), e2e::lab::TEST_IDS, 2).unwrap());
    g.0.start_mesh().await.unwrap();
    let mut docs = String::new();
    docs.push_str("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}\n---\n");
    docs.push_str("apiVersion: v1\nkind: Namespace\nmetadata: {name: plain, labels: {istio.io/dataplane-mode: ambient}}\n---\n");
    docs.push_str("apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: waypoint, namespace: shop}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n---\n");
    docs.push_str(&echo(
        "shop",
        "reviews-v1",
        2,
        ", svc: reviews, version: v1",
        "",
    ));
    docs.push_str(&echo(
        "shop",
        "reviews-v2",
        1,
        ", svc: reviews, version: v2",
        "",
    ));
    docs.push_str(&echo("shop", "flaky", 2, "", ", --fail-percent, \"30\""));
    docs.push_str(&echo("shop", "slow", 1, "", ", --delay-ms, \"2000\""));
    docs.push_str(&echo("shop", "eject", 2, "", ""));
    docs.push_str(&echo("plain", "direct", 1, "", ""));
    docs.push_str("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: client, namespace: shop}\nspec:\n  replicas: 1\n  selector: {matchLabels: {app: client}}\n  template:\n    metadata: {labels: {app: client}}\n    spec:\n      serviceAccountName: client\n      containers: [{name: app, image: labapp, args: [sleep]}]\n---\n");
    docs.push_str(&service("shop", "reviews", "svc: reviews"));
    docs.push_str(&service("shop", "reviews-v1", "version: v1"));
    docs.push_str(&service("shop", "reviews-v2", "version: v2"));
    docs.push_str(&service("shop", "flaky", "app: flaky"));
    docs.push_str("apiVersion: v1\nkind: Service\nmetadata: {name: reviews-grpc, namespace: shop}\nspec: {selector: {version: v1}, ports: [{name: grpc, port: 80, targetPort: 8080}]}\n---\n");
    docs.push_str(&service("shop", "slow", "app: slow"));
    docs.push_str(&service("shop", "eject", "app: eject"));
    docs.push_str(&service("plain", "direct", "app: direct"));
    docs.push_str(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: shop}
spec:
  parentRefs: [{group: \"\", kind: Service, name: reviews, port: 80}]
  rules:
  - matches: [{headers: [{name: x-version, value: v2}]}]
    backendRefs: [{name: reviews-v2, port: 80}]
  - backendRefs: [{name: reviews-v1, port: 80, weight: 90}, {name: reviews-v2, port: 80, weight: 10}]
---
apiVersion: gateway.networking.k8s.io/v1
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
metadata: {name: slow, namespace: shop}
spec:
  parentRefs: [{group: \"\", kind: Service, name: slow}]
  rules:
  - backendRefs: [{name: slow, port: 80}]
    timeouts: {request: 300ms}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: eject, namespace: shop}
spec:
  host: eject.shop.svc.cluster.local
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 3s, maxEjectionPercent: 50}
",
    );
    g.0.apply(yaml(&docs)).await.unwrap();
    let lab = &g.0;
    assert!(!lab.pod("shop/waypoint-0").unwrap().captured);
    let client = "shop/client-0";

    // Until the route arrives the service's own pods answer, a third of
    // them v2: only ten v2 answers in a row say the header match is live.
    eventually(
        "the waypoint serves reviews with its routes",
        Duration::from_secs(60),
        || async {
            let l = load(
                lab,
                client,
                "http://reviews.shop/",
                10,
                1,
                &["--header", "x-version: v2"],
            );
            l.ok() == 10 && l.by_pod.keys().all(|p| p.starts_with("reviews-v2"))
        },
    )
    .await;

    // A header match sends everything to v2.
    let v2 = load(
        lab,
        client,
        "http://reviews.shop/",
        50,
        4,
        &["--header", "x-version: v2"],
    );
    assert_eq!(v2.ok(), 50, "{v2:?}");
    assert!(
        v2.by_pod.keys().all(|p| p.starts_with("reviews-v2")),
        "{v2:?}"
    );

    // A 90/10 split over 10 000 requests lands within two points.
    let split = load(lab, client, "http://reviews.shop/", 10_000, 16, &[]);
    assert_eq!(split.errors, 0, "{:?}", split.first_error);
    assert_eq!(split.ok(), 10_000, "{split:?}");
    let to_v2: usize = split
        .by_pod
        .iter()
        .filter(|(p, _)| p.starts_with("reviews-v2"))
        .map(|(_, n)| n)
        .sum();
    let share = to_v2 as f64 / 100.0;
    assert!((8.0..=12.0).contains(&share), "v2 got {share}%: {split:?}");
    // Per request, not per connection: both v1 pods take a fair share.
    for p in ["reviews-v1-0", "reviews-v1-1"] {
        let n = split.by_pod.get(p).copied().unwrap_or(0);
        assert!(n > 3000, "{p} got {n}: {split:?}");
    }

    // An HTTP/2 (h2c) client is served too; upstream speaks what the
    // backend port declares: HTTP/1.1 for `http`, HTTP/2 for `grpc`.
    let h2_to_h1 = load(lab, client, "http://reviews.shop/", 100, 4, &["--h2"]);
    assert_eq!(h2_to_h1.ok(), 100, "{h2_to_h1:?}");
    assert_eq!(
        h2_to_h1.by_proto.get("HTTP/1.1").copied(),
        Some(100),
        "{h2_to_h1:?}"
    );
    let h2_to_h2 = load(lab, client, "http://reviews-grpc.shop/", 100, 4, &["--h2"]);
    assert_eq!(h2_to_h2.ok(), 100, "{h2_to_h2:?}");
    assert_eq!(
        h2_to_h2.by_proto.get("HTTP/2.0").copied(),
        Some(100),
        "{h2_to_h2:?}"
    );

    // Per request over reused connections: a handful of HBONE connections,
    // HTTP/1 kept alive. The pool gives a busy destination (identity and
    // node) up to pool.connections_per_destination: here the reviews pods
    // (at most three such pairs) under load, and one each for at most six
    // pairs of the other backends.
    let dump = config_dump(lab, "shop/waypoint-0");
    let hbone = dump["upstream"]["hbone_connections"].as_u64().unwrap();
    let http = dump["upstream"]["http_connections"].as_u64().unwrap();
    let per_destination = mesh_core::config::PoolConfig::default().connections_per_destination;
    let most = (3 * per_destination + 6) as u64;
    assert!((1..=most).contains(&hbone), "{}", dump["upstream"]);
    assert!(http <= 48, "{}", dump["upstream"]);
    // The waypoint never serves its own Service.
    let routes = dump["routes"].as_object().unwrap();
    assert!(routes.contains_key("shop/reviews.shop.svc.cluster.local"));
    assert!(
        !routes.contains_key("shop/waypoint.shop.svc.cluster.local"),
        "{routes:?}"
    );

    // Retries turn a backend failing 30% of requests into near-total success.
    // (Two at a time: the budget's floor of three concurrent retries is
    // never the limit, so this measures the retries alone: 0.3^4 fail.)
    let flaky = load(lab, client, "http://flaky.shop/", 300, 2, &[]);
    assert!(flaky.ok() >= 290, "{flaky:?}");

    // When it fails everything, the budget caps retries well below the
    // three per request the route allows.
    for p in ["shop/flaky-0", "shop/flaky-1"] {
        let ip = lab.pod(p).unwrap().ip.clone();
        get(
            lab,
            client,
            &format!("http://{ip}:8080/_fail?percent=100"),
            &[],
        );
    }
    let before: u64 = ["shop/flaky-0", "shop/flaky-1"]
        .iter()
        .map(|p| served(lab, client, p))
        .sum();
    let failing = load(lab, client, "http://flaky.shop/", 400, 32, &[]);
    let after: u64 = ["shop/flaky-0", "shop/flaky-1"]
        .iter()
        .map(|p| served(lab, client, p))
        .sum();
    assert_eq!(failing.status.get(&503).copied(), Some(400), "{failing:?}");
    let attempts = after - before;
    assert!(
        (400..=640).contains(&attempts),
        "{attempts} upstream attempts for 400 requests (1600 without a budget)"
    );

    // A request timeout answers 504 on time, not when the backend does.
    let started = Instant::now();
    let slow = load(lab, client, "http://slow.shop/", 3, 1, &[]);
    assert_eq!(slow.status.get(&504).copied(), Some(3), "{slow:?}");
    assert!(slow.max_ms < 1500.0, "{slow:?}");
    assert!(started.elapsed() < Duration::from_secs(6));

    // An endpoint failing in a row is ejected, and returns after its time.
    let bad = lab.pod("shop/eject-0").unwrap().ip.clone();
    get(
        lab,
        client,
        &format!("http://{bad}:8080/_fail?percent=100"),
        &[],
    );
    let ejecting = load(lab, client, "http://eject.shop/", 60, 1, &[]);
    let to_bad = ejecting.by_pod.get("eject-0").copied().unwrap_or(0);
    assert!((3..=4).contains(&to_bad), "{ejecting:?}");
    assert_eq!(
        ejecting.by_pod.get("eject-1").copied(),
        Some(60 - to_bad),
        "{ejecting:?}"
    );
    get(
        lab,
        client,
        &format!("http://{bad}:8080/_fail?percent=0"),
        &[],
    );
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let back = load(lab, client, "http://eject.shop/", 40, 1, &[]);
    assert_eq!(back.ok(), 40, "{back:?}");
    assert!(
        back.by_pod.get("eject-0").copied().unwrap_or(0) > 5,
        "{back:?}"
    );

    // The trace continues through the waypoint: same trace id, new parent.
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let body = get(
        lab,
        client,
        "http://reviews.shop/",
        &[&format!("traceparent: {tp}")],
    );
    let got = body
        .lines()
        .find_map(|l| l.strip_prefix("traceparent: "))
        .unwrap_or_else(|| panic!("no traceparent at the backend: {body}"));
    assert!(
        got.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{got}"
    );
    assert!(!got.contains("00f067aa0ba902b7"), "{got}");

    // A namespace without a waypoint pays nothing: its traffic never
    // reaches the waypoint.
    let direct = load(lab, client, "http://direct.plain/", 20, 2, &[]);
    assert_eq!(direct.ok(), 20, "{direct:?}");

    // Metrics and the access log show each of these.
    let m = metrics(lab, "shop/waypoint-0");
    let svc = |s: &str| format!("destination_service=\"{s}.shop.svc.cluster.local\"");
    assert!(
        requests_total(&m, &[&svc("reviews-v2"), "response_code=\"200\""]) >= 1000,
        "{m}"
    );
    assert!(
        requests_total(&m, &[&svc("flaky"), "response_flags=\"URX\""]) >= 1,
        "{m}"
    );
    assert_eq!(
        requests_total(
            &m,
            &[
                &svc("slow"),
                "response_code=\"504\"",
                "response_flags=\"UT\""
            ]
        ),
        3,
        "{m}"
    );
    assert!(
        requests_total(&m, &[&svc("eject"), "response_code=\"503\""]) >= 3,
        "{m}"
    );
    assert!(m.contains("source_principal=\"spiffe://cluster.local/ns/shop/sa/client\""));
    assert!(m.contains("reporter=\"waypoint\""));
    assert!(m.contains("istio_request_duration_milliseconds_bucket"));
    assert_eq!(requests_total(&m, &["direct.plain"]), 0, "{m}");
    let log = std::fs::read_to_string(dir.path().join("logs/pod-shop-waypoint-0.log")).unwrap();
    assert!(
        log.contains("response_code=504 response_flags=\"UT\""),
        "{log}"
    );
    assert!(log.contains("trace_id=4bf92f3577b34da6a3ce929d0e0e4736"));
    assert!(!log.contains("direct.plain"));

    // A mesh identity by hand, through this waypoint, reaches its service
    // but not a service (or pod) without a waypoint.
    let intruder = attach::Intruder::new(lab, client, "shop", "client").await;
    let reviews = format!("{}:80", lab.state.services["shop/reviews"].vip);
    let direct_vip = format!("{}:80", lab.state.services["plain/direct"].vip);
    let direct_pod = format!("{}:8080", lab.pod("plain/direct-0").unwrap().ip);
    intruder.reaches_only_its_own(
        lab,
        "shop/waypoint-0",
        (&reviews, "reviews"),
        &[
            (&direct_vip, "plain/direct-0"),
            (&direct_pod, "plain/direct-0"),
        ],
    );
}

/// `labapp raw` / `labapp h2-abuse` from a pod: the first answer line.
/// A 20 per second limit counted in Redis, shared by the two replicas of a
/// waypoint: together they admit 20 of 100 requests; with the store gone,
/// each falls back to its own bucket (fail open).
async fn shared_limit_across_replicas(lab: &mut Lab, client: &str) {
    let docs = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: stores}}\n---\n\
apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: redis, namespace: stores}}\nspec:\n  replicas: 1\n  selector: {{matchLabels: {{app: redis}}}}\n  template:\n    metadata: {{labels: {{app: redis}}}}\n    spec:\n      containers: [{{name: redis, image: redis}}]\n---\n\
apiVersion: v1\nkind: Namespace\nmetadata: {{name: shared, labels: {{istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}}}\n---\n\
apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: waypoint, namespace: shared, annotations: {{{}: \"2\"}}}}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]\n---\n{}{}",
        e2e::lab::WAYPOINT_REPLICAS,
        echo("shared", "api", 1, "", ""),
        service("shared", "api", "app: api"),
    );
    lab.apply(yaml(&docs)).await.unwrap();
    let store = lab.state.pods["stores/redis-0"].ip.clone();
    let policy = format!(
        "apiVersion: extensions.mesh.dev/v1alpha1
kind: TrafficPolicy
metadata: {{name: twenty-per-second, namespace: shared}}
spec:
  rateLimit: {{requests: 20, per: 1s, global: {{store: \"redis://{store}:6379\"}}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: api, namespace: shared}}
spec:
  parentRefs: [{{group: \"\", kind: Service, name: api}}]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /limited}}}}]
    backendRefs: [{{name: api, port: 80}}]
    filters:
    - {{type: ExtensionRef, extensionRef: {{group: extensions.mesh.dev, kind: TrafficPolicy, name: twenty-per-second}}}}
  - matches: [{{path: {{type: PathPrefix, value: /free}}}}]
    backendRefs: [{{name: api, port: 80}}]
"
    );
    lab.apply(yaml(&policy)).await.unwrap();
    let lab = &*lab;
    eventually(
        "both replicas serve the shared service",
        Duration::from_secs(60),
        || async { load(lab, client, "http://api.shared/free", 40, 16, &[]).ok() == 40 },
    )
    .await;
    let counted = |status: &str| -> u64 {
        (0..2)
            .map(|i| {
                let m = metrics(lab, &format!("shared/waypoint-{i}"));
                requests_total(
                    &m,
                    &[
                        "destination_service=\"api.shared.svc.cluster.local\"",
                        &format!("response_code=\"{status}\""),
                    ],
                )
            })
            .sum()
    };
    let per_replica = |i: usize| {
        let m = metrics(lab, &format!("shared/waypoint-{i}"));
        requests_total(
            &m,
            &["destination_service=\"api.shared.svc.cluster.local\""],
        )
    };
    // The windows follow the clock: start just after a second begins, so
    // the burst (well under a second) falls in one window.
    let wait_for_second = || {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_millis())
            .unwrap_or(0);
        Duration::from_millis(u64::from(1000 - ms) + 20)
    };
    let (ok_before, before) = (counted("200"), [per_replica(0), per_replica(1)]);
    tokio::time::sleep(wait_for_second()).await;
    let shared = load(lab, client, "http://api.shared/limited", 100, 16, &[]);
    assert!((18..=22).contains(&shared.ok()), "{shared:?}");
    assert_eq!(
        shared.ok() + shared.status.get(&429).copied().unwrap_or(0),
        100
    );
    assert_eq!(counted("200") - ok_before, shared.ok() as u64);
    let after = [per_replica(0), per_replica(1)];
    assert!(
        after[0] > before[0] && after[1] > before[1],
        "both replicas took part: {before:?} -> {after:?}"
    );

    // The store goes: each replica falls back to its own 20-token bucket.
    let redis_pid = lab.state.pods["stores/redis-0"].pid.expect("redis runs");
    // SAFETY: kill(2) on a process this lab started.
    unsafe { libc::kill(redis_pid as i32, libc::SIGKILL) };
    tokio::time::sleep(wait_for_second()).await;
    let fallback = load(lab, client, "http://api.shared/limited", 100, 16, &[]);
    assert!((20..=40).contains(&fallback.ok()), "{fallback:?}");
    let failures: u64 = (0..2)
        .map(|i| {
            metrics(lab, &format!("shared/waypoint-{i}"))
                .lines()
                .filter(|l| l.starts_with("waypoint_rate_limit_store_failures_total{"))
                .filter(|l| l.contains("outcome=\"local_fallback\""))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>() as u64
        })
        .sum();
    assert!(failures >= 1, "the fallback is counted");
}

fn raw(lab: &Lab, from: &str, args: &[&str]) -> String {
    let mut cmd = vec!["labapp"];
    cmd.extend_from_slice(args);
    let out = lab.exec(from, &cmd).unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A DENY on `/admin*` holds for every spelling of /admin (Istio's
/// normalization: BASE, and MERGE_SLASHES as this lab's waypoint runs), a
/// NUL or a lower-case method is refused with 400, and the backend gets
/// the path the policy judged.
async fn path_normalization(lab: &Lab, client: &str) {
    // Until the waypoint has the vault's DENY policy; on timeout, what the
    // client last got (a 200 is the policy not applied; an error or another
    // status is the path to the vault).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let got = load(lab, client, "http://vault.shop/admin", 1, 1, &[]);
        if got.status.contains_key(&403) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the waypoint has not the vault's DENY policy after 30 s: status {:?}, first error {:?}",
            got.status,
            got.first_error
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let vault = format!("{}:80", lab.state.services["shop/vault"].vip);
    let mut wrong = Vec::new();
    for (line, want) in [
        ("GET /admin", "403"),
        ("GET /%61dmin", "403"),
        ("GET /%61%44%6d%49%6E", "200"),
        ("GET /%61%64%6D%69%6e", "403"),
        ("GET /./admin", "403"),
        ("GET /admin/../admin", "403"),
        ("GET /public/%2e%2E/admin", "403"),
        ("GET /public\\..\\admin", "403"),
        // Not origin-form: the HTTP parser refuses it before any policy.
        ("GET \\admin", "400"),
        // MERGE_SLASHES.
        ("GET //admin", "403"),
        ("GET /\\admin", "403"),
        ("GET /%00", "400"),
        ("GET /public%00", "400"),
        ("get /public", "400"),
        ("GET /public?x=/admin", "200"),
        // Decoded once, never twice: this is not /admin.
        ("GET /%2561dmin", "200"),
    ] {
        let head = format!("{line} HTTP/1.1\r\nHost: vault\r\n\r\n");
        let got = raw(lab, client, &["raw", &vault, &head]);
        if !got.starts_with(&format!("HTTP/1.1 {want}")) {
            wrong.push(format!("{line}: want {want}, got {got:?}"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    let echoed = get(
        lab,
        client,
        "http://vault.shop/%70ublic/./a/../b?q=/../x",
        &[],
    );
    assert!(echoed.contains("GET /public/b?q=/../x\n"), "{echoed}");
}

#[tokio::test]
async fn a_waypoint_enforces_l7_policy_breaks_circuits_injects_faults_limits_rates_and_refuses_bad_input()
 {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Guard(Lab::create_in(dir.path(), e2e::lab::TEST_IDS, 2).unwrap());
    // The mesh asks waypoints to merge slashes (Istio's MERGE_SLASHES).
    g.0.state.path_normalization = Some("MERGE_SLASHES".into());
    g.0.start_mesh().await.unwrap();
    let mut docs = String::new();
    docs.push_str("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}\n---\n");
    // For services and pods alike: the pod-IP requests below (the echo
    // servers' counters) pass through it too.
    docs.push_str("apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: waypoint, namespace: shop, labels: {istio.io/waypoint-for: all}}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n---\n");
    docs.push_str(&echo("shop", "orders", 1, "", ""));
    docs.push_str(&echo("shop", "cb", 1, "", ", --delay-ms, \"300\""));
    docs.push_str(&echo("shop", "chaos", 1, "", ""));
    docs.push_str(&echo("shop", "shadow", 1, "", ""));
    docs.push_str(&echo("shop", "limited", 1, "", ""));
    docs.push_str(&echo("shop", "vault", 1, "", ""));
    for c in ["client", "other"] {
        docs.push_str(&format!("apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {c}, namespace: shop}}\nspec:\n  replicas: 1\n  selector: {{matchLabels: {{app: {c}}}}}\n  template:\n    metadata: {{labels: {{app: {c}}}}}\n    spec:\n      serviceAccountName: {c}\n      containers: [{{name: app, image: labapp, args: [sleep]}}]\n---\n"));
    }
    for s in ["orders", "cb", "chaos", "shadow", "limited", "vault"] {
        docs.push_str(&service("shop", s, &format!("app: {s}")));
    }
    docs.push_str(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: orders-readers, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: \"\", name: orders}]
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]
    to: [{operation: {methods: [GET], paths: [/orders, /orders/*]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: vault-no-admin, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: \"\", name: vault}]
  action: DENY
  rules:
  - to: [{operation: {paths: [\"/admin*\"]}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: cb, namespace: shop}
spec:
  host: cb.shop.svc.cluster.local
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1}
      http: {http1MaxPendingRequests: 1}
---
apiVersion: extensions.mesh.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: chaos, namespace: shop}
spec:
  fault: {abort: {httpStatus: 418, percentage: 50}}
  mirrorPercentage: 100
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: chaos, namespace: shop}
spec:
  parentRefs: [{group: \"\", kind: Service, name: chaos}]
  rules:
  - backendRefs: [{name: chaos, port: 80}]
    filters:
    - {type: ExtensionRef, extensionRef: {group: extensions.mesh.dev, kind: TrafficPolicy, name: chaos}}
    - {type: RequestMirror, requestMirror: {backendRef: {name: shadow, port: 80}}}
---
apiVersion: extensions.mesh.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: ten-per-second, namespace: shop}
spec:
  rateLimit: {requests: 10, per: 1s}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: limited, namespace: shop}
spec:
  parentRefs: [{group: \"\", kind: Service, name: limited}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /limited}}]
    backendRefs: [{name: limited, port: 80}]
    filters:
    - {type: ExtensionRef, extensionRef: {group: extensions.mesh.dev, kind: TrafficPolicy, name: ten-per-second}}
  - matches: [{path: {type: PathPrefix, value: /free}}]
    backendRefs: [{name: limited, port: 80}]
",
    );
    g.0.apply(yaml(&docs)).await.unwrap();
    let lab = &g.0;
    let client = "shop/client-0";
    // The controller reads the applied files as they land: wait until the
    // waypoint has the orders service's policy, not just its endpoints.
    eventually(
        "the waypoint serves orders under its policy",
        Duration::from_secs(60),
        || async {
            load(lab, client, "http://orders.shop/orders", 1, 1, &[]).ok() == 1
                && load(lab, client, "http://orders.shop/admin", 1, 1, &[])
                    .status
                    .contains_key(&403)
        },
    )
    .await;

    // L7 policy: GET /orders in, POST /admin refused with 403; another
    // identity refused even for GET /orders.
    let served_before = served(lab, client, "shop/orders-0");
    assert_eq!(
        load(lab, client, "http://orders.shop/orders/7", 10, 2, &[]).ok(),
        10
    );
    let post = load(
        lab,
        client,
        "http://orders.shop/admin",
        5,
        1,
        &["--method", "POST"],
    );
    assert_eq!(post.status.get(&403).copied(), Some(5), "{post:?}");
    let get_admin = load(lab, client, "http://orders.shop/admin", 5, 1, &[]);
    assert_eq!(
        get_admin.status.get(&403).copied(),
        Some(5),
        "{get_admin:?}"
    );
    let other = load(lab, "shop/other-0", "http://orders.shop/orders", 5, 1, &[]);
    assert_eq!(other.status.get(&403).copied(), Some(5), "{other:?}");
    assert_eq!(
        served(lab, client, "shop/orders-0") - served_before,
        10,
        "refused requests never reach the backend"
    );

    // The circuit breaker: one connection, one pending; the rest fail fast.
    let cb = load(lab, client, "http://cb.shop/", 20, 10, &[]);
    let overflow = cb.status.get(&503).copied().unwrap_or(0);
    assert!(overflow >= 10 && cb.ok() >= 2, "{cb:?}");

    // Fault injection aborts about half; every request that gets through is
    // mirrored to the shadow, whose answers are dropped.
    let chaos = load(lab, client, "http://chaos.shop/", 400, 4, &[]);
    let aborted = chaos.status.get(&418).copied().unwrap_or(0);
    assert!((140..=260).contains(&aborted), "{chaos:?}");
    assert_eq!(chaos.ok() + aborted, 400, "{chaos:?}");
    assert!(
        chaos.by_pod.keys().all(|p| p.starts_with("chaos")),
        "{chaos:?}"
    );
    let through = chaos.ok() as u64;
    eventually(
        "the shadow saw the mirrored requests",
        Duration::from_secs(10),
        || async { served(lab, client, "shop/shadow-0") == through },
    )
    .await;

    // A 10 per second limit on one route: of 100 requests sent at once,
    // 10 (one more if the burst straddles a refill) pass and the rest get
    // 429 with retry-after; the route beside it is not limited.
    eventually(
        "the waypoint has the limited service's routes",
        Duration::from_secs(30),
        || async { load(lab, client, "http://limited.shop/free", 1, 1, &[]).ok() == 1 },
    )
    .await;
    // Start on a fresh bucket: wait out any interval the probe above began.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let limited = load(lab, client, "http://limited.shop/limited", 100, 4, &[]);
    let refused = limited.status.get(&429).copied().unwrap_or(0);
    assert!((9..=11).contains(&limited.ok()), "{limited:?}");
    assert_eq!(limited.ok() + refused, 100, "{limited:?}");
    let free = load(lab, client, "http://limited.shop/free", 100, 4, &[]);
    assert_eq!(free.ok(), 100, "{free:?}");
    // Whatever the bucket holds by now, it is not 20 more: one of these
    // is refused, and says when to come back.
    let mut answer = String::new();
    for _ in 0..20 {
        let out = lab
            .exec(
                client,
                &[
                    "labapp",
                    "get",
                    "--show-headers",
                    "http://limited.shop/limited",
                ],
            )
            .unwrap();
        answer = String::from_utf8_lossy(&out.stdout).to_string();
        if answer.starts_with("429") {
            break;
        }
    }
    assert!(answer.starts_with("429"), "{answer}");
    assert!(answer.contains("retry-after: 1\n"), "{answer}");

    shared_limit_across_replicas(&mut g.0, client).await;
    let lab = &g.0;

    // Bad input, each refused with its status, through ztunnel and HBONE.
    let vip = lab.state.services["shop/orders"].vip.clone();
    let to = format!("{vip}:80");
    // A path that only looks like /orders is judged as the /admin it is.
    for sneaky in ["/orders/../admin", "/orders/%2e%2e/admin", "//admin"] {
        let head = format!("GET {sneaky} HTTP/1.1\r\nHost: orders\r\n\r\n");
        let got = raw(lab, client, &["raw", &to, &head]);
        assert!(got.starts_with("HTTP/1.1 403"), "{sneaky}: {got}");
    }
    path_normalization(lab, client).await;
    let bad_line = raw(lab, client, &["raw", &to, "BAD REQUEST LINE\r\n\r\n"]);
    assert!(bad_line.starts_with("HTTP/1.1 400"), "{bad_line}");
    let big_head = raw(
        lab,
        client,
        &[
            "raw",
            &to,
            "GET /orders HTTP/1.1\r\nHost: orders\r\n\r\n",
            "--pad-header-bytes",
            "70000",
        ],
    );
    assert!(big_head.starts_with("HTTP/1.1 431"), "{big_head}");
    let big_body = raw(
        lab,
        client,
        &[
            "raw",
            &to,
            "GET /orders HTTP/1.1\r\nHost: orders\r\nContent-Length: 5000000\r\n\r\n",
            "--body-bytes",
            "5000000",
        ],
    );
    // No body limit unless the user sets one (http_timeouts.rs sets one):
    // a body well over the retry buffer streams through.
    assert!(big_body.starts_with("HTTP/1.1 200"), "{big_body}");
    let before = served(lab, client, "shop/orders-0");
    let smuggle = raw(
        lab,
        client,
        &[
            "raw",
            &to,
            "GET /orders HTTP/1.1\r\nHost: orders\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ],
    );
    assert!(smuggle.starts_with("HTTP/1.1 400"), "{smuggle}");
    assert_eq!(
        served(lab, client, "shop/orders-0"),
        before,
        "a conflicting request is never forwarded"
    );
    let window = raw(lab, client, &["h2-abuse", &to, "--mode", "window-overflow"]);
    assert!(
        window.contains("GOAWAY 3"),
        "FLOW_CONTROL_ERROR expected: {window}"
    );
    // A flood past the windows: refused with GOAWAY or RST_STREAM, or, when
    // the waypoint has closed before the client read them, a closed
    // connection (either way, ordinary traffic goes on, as checked below).
    let flood = raw(lab, client, &["h2-abuse", &to, "--mode", "data-flood"]);
    assert!(
        flood.contains("GOAWAY") || flood.contains("RST_STREAM") || flood == "closed",
        "{flood}"
    );

    // A slowloris client is cut off at the header timeout while others are
    // served as usual.
    let started = Instant::now();
    let slow_head = "GET /orders HTTP/1.1\r\nHost: orders\r\nx-a: aaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let loris = {
        let bin = e2e::mesh::binary("labapp");
        let netns = lab.pod(client).unwrap().netns.clone();
        let (to, head) = (to.clone(), slow_head.to_string());
        std::thread::spawn(move || {
            let out = std::process::Command::new("ip")
                .args(["netns", "exec", &netns])
                .arg(bin)
                .args([
                    "raw",
                    &to,
                    &head,
                    "--byte-delay-ms",
                    "200",
                    "--timeout-ms",
                    "15000",
                ])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        })
    };
    let meanwhile = load(lab, client, "http://orders.shop/orders", 50, 2, &[]);
    assert_eq!(meanwhile.ok(), 50, "{meanwhile:?}");
    let cut = loris.join().unwrap();
    assert!(
        cut.starts_with("closed") || cut.starts_with("HTTP/1.1 408"),
        "{cut}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "cut off after {:?}",
        started.elapsed()
    );

    // And after all of it, ordinary traffic still flows.
    assert_eq!(
        load(lab, client, "http://orders.shop/orders", 20, 4, &[]).ok(),
        20
    );

    let m = metrics(lab, "shop/waypoint-0");
    let svc = |s: &str| format!("destination_service=\"{s}.shop.svc.cluster.local\"");
    assert!(
        requests_total(
            &m,
            &[
                &svc("orders"),
                "response_code=\"403\"",
                "response_flags=\"RBAC\""
            ]
        ) >= 15,
        "{m}"
    );
    assert!(
        requests_total(
            &m,
            &[&svc("cb"), "response_code=\"503\"", "response_flags=\"UO\""]
        ) >= 10,
        "{m}"
    );
    assert!(
        requests_total(
            &m,
            &[
                &svc("chaos"),
                "response_code=\"418\"",
                "response_flags=\"FI\""
            ]
        ) >= 140,
        "{m}"
    );
    assert!(
        requests_total(
            &m,
            &[
                &svc("limited"),
                "response_code=\"429\"",
                "response_flags=\"RL\""
            ]
        ) >= 89,
        "{m}"
    );
    assert!(
        m.contains(
            "waypoint_rate_limited_requests_total{policy=\"shop/ten-per-second\",counted=\"local\"}"
        ),
        "{m}"
    );
    assert!(
        requests_total(
            &m,
            &[
                &svc("limited"),
                "response_code=\"429\"",
                "response_flags=\"RL\""
            ]
        ) >= 89,
        "{m}"
    );
    assert!(
        m.contains(
            "waypoint_rate_limited_requests_total{policy=\"shop/ten-per-second\",counted=\"local\"}"
        ),
        "{m}"
    );
    let log = std::fs::read_to_string(dir.path().join("logs/pod-shop-waypoint-0.log")).unwrap();
    assert!(log.contains("denied: no ALLOW policy matches"), "{log}");
    assert!(
        log.contains("path=/_stats"),
        "pod-IP traffic goes through the waypoint too"
    );

    attach::gateway_policy_holds_for_pod_ips(&mut g.0, client).await;
    // Nor does it reach a service (or pod) of another waypoint.
    let lab = &g.0;
    let intruder = attach::Intruder::new(lab, client, "shop", "client").await;
    let vault = format!("{}:80", lab.state.services["shop/vault"].vip);
    let api_vip = format!("{}:80", lab.state.services["shared/api"].vip);
    let api_pod = format!("{}:8080", lab.pod("shared/api-0").unwrap().ip);
    intruder.reaches_only_its_own(
        lab,
        "shop/waypoint-0",
        (&vault, "vault"),
        &[(&api_vip, "shared/api-0"), (&api_pod, "shared/api-0")],
    );
}
