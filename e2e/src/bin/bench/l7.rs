//! The L7 path: HTTP/1.1 keep-alive requests from a client pod to an
//! http-echo pod on the other node, three ways in one lab and one run:
//!
//! - **direct**: the echo's namespace has no waypoint (client -> ztunnel ->
//!   HBONE -> ztunnel -> server);
//! - **waypoint**: its namespace uses a waypoint, our `waypoint` binary in a
//!   pod (client -> ztunnel -> HBONE -> waypoint -> HBONE -> ztunnel ->
//!   server), with an HTTPRoute (a path prefix match and a timeout);
//! - **envoy**: the same, with Envoy in that waypoint pod instead: same
//!   address, same identity (a certificate from the lab's CA), the same
//!   route, HBONE terminated and originated through internal listeners as
//!   Istio's waypoint does ([`e2e::envoy::waypoint_config`]).
//!
//! The lab places pods round-robin in creation order, so the documents are
//! ordered to put the client and both L7 proxies on node-1 and the three
//! echo pods on node-2. Each figure is the median of `--runs` runs with min
//! and max; the runs interleave the paths so drift hits them alike. CPU is
//! utime+stime from /proc/PID/stat over a run; memory is VmRSS before any
//! load (idle) and VmHWM after all of it (peak).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use e2e::ca::TRUST_DOMAIN;
use e2e::envoy::{WaypointEnvoy, envoy_binary, waypoint_config, write_cert};
use e2e::lab::{BENCH_IDS, Down, Lab, parse_docs, ztunnel_extra_from_env};
use e2e::mesh::binary;
use mesh_core::identity::Identity;
use serde_json::{Value, json};

use crate::common::{
    alive, cell, clock_ticks_per_second, cpu_ticks, envoy_admin, get, load_cpu, stat_json, stats,
    status_mib,
};
use crate::l7stream::GRPC_PORT;
use crate::{Args, Error};

pub(crate) const CLIENT: &str = "l7-direct/client-0";

/// The route's prefix, and the path every request asks for.
const PREFIX: &str = "/api";

const PATH: &str = "/api/echo";

const ROUTE_TIMEOUT_MS: u64 = 10_000;

/// What the route sets on the requests it matches (the echo shows it).
const ROUTE_HEADER: (&str, &str) = ("x-route", "api");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Proxy {
    Waypoint,
    Envoy,
}

pub(crate) struct DataPath {
    pub(crate) name: &'static str,
    pub(crate) ns: &'static str,
    pub(crate) proxy: Option<Proxy>,
}

pub(crate) const PATHS: [DataPath; 3] = [
    DataPath {
        name: "direct",
        ns: "l7-direct",
        proxy: None,
    },
    DataPath {
        name: "waypoint",
        ns: "l7-waypoint",
        proxy: Some(Proxy::Waypoint),
    },
    DataPath {
        name: "envoy",
        ns: "l7-envoy",
        proxy: Some(Proxy::Envoy),
    },
];

impl DataPath {
    pub(crate) fn proxy_pod(&self) -> String {
        format!("{}/waypoint-0", self.ns)
    }
}

fn docs() -> String {
    let namespace = |name: &str, waypoint: bool| {
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {{istio.io/dataplane-mode: ambient{}}}}}\n---\n",
            if waypoint {
                ", istio.io/use-waypoint: waypoint"
            } else {
                ""
            }
        )
    };
    let deployment = |ns: &str, name: &str, args: &str| {
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  replicas: 1\n  selector: {{matchLabels: {{app: {name}}}}}\n  template:\n    metadata: {{labels: {{app: {name}}}}}\n    spec:\n      serviceAccountName: {name}\n      containers: [{{name: app, image: labapp, args: [{args}]}}]\n---\n"
        )
    };
    let echo = |ns: &str| deployment(ns, "echo", "http-echo, --port, \"8080\"");
    // The gRPC echoes are bound to node-2 (after the round-robin ones),
    // with the echo's identity (the one Envoy's upstream TLS expects).
    let grpc = |ns: &str| {
        deployment(ns, "grpc", "grpc-echo, --port, \"9090\"").replace(
            "      serviceAccountName: grpc\n",
            "      serviceAccountName: echo\n      nodeName: node-2\n",
        ) + &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: grpc, namespace: {ns}}}\nspec: {{selector: {{app: grpc}}, ports: [{{name: grpc, port: {GRPC_PORT}, targetPort: 9090}}]}}\n---\n"
        )
    };
    let gateway = |ns: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: waypoint, namespace: {ns}}}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]\n---\n"
        )
    };
    let service = |ns: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: echo, namespace: {ns}}}\nspec: {{selector: {{app: echo}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n---\n"
        )
    };
    let route = |ns: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: echo, namespace: {ns}}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: echo, port: 80}}]\n  rules:\n  - matches: [{{path: {{type: PathPrefix, value: {PREFIX}}}}}]\n    filters: [{{type: RequestHeaderModifier, requestHeaderModifier: {{set: [{{name: {}, value: {}}}]}}}}]\n    backendRefs: [{{name: echo, port: 80}}]\n    timeouts: {{request: {ROUTE_TIMEOUT_MS}ms}}\n---\n",
            ROUTE_HEADER.0, ROUTE_HEADER.1
        )
    };
    let mut s = String::new();
    s += &namespace("l7-direct", false);
    s += &namespace("l7-waypoint", true);
    s += &namespace("l7-envoy", true);
    // Pods in this order: node-1, node-2, node-1, node-2, ...
    s += &deployment("l7-direct", "client", "sleep");
    s += &echo("l7-direct");
    s += &gateway("l7-waypoint");
    s += &echo("l7-waypoint");
    s += &gateway("l7-envoy");
    s += &echo("l7-envoy");
    for p in &PATHS {
        s += &service(p.ns);
    }
    s += &route("l7-waypoint");
    s += &route("l7-envoy");
    for p in &PATHS {
        s += &grpc(p.ns);
    }
    s
}

/// `labapp load`'s summary.
#[derive(Debug, Default, serde::Deserialize)]
struct Load {
    status: BTreeMap<u16, usize>,
    errors: usize,
    first_error: Option<String>,
    p50_ms: f64,
    p99_ms: f64,
    rps: f64,
}

impl Load {
    fn ok(&self) -> usize {
        self.status.get(&200).copied().unwrap_or(0)
    }
}

/// `labapp load` from the client pod, pinned, bounded in time.
fn load(lab: &Lab, url: &str, requests: usize, concurrency: usize) -> Result<Load, Error> {
    let labapp = binary("labapp").display().to_string();
    let (n, c) = (requests.to_string(), concurrency.to_string());
    let cpu = load_cpu().map(|c| c.to_string());
    let mut cmd: Vec<&str> = vec!["timeout", "300"];
    if let Some(cpu) = &cpu {
        cmd.extend(["taskset", "-c", cpu]);
    }
    cmd.extend([
        labapp.as_str(),
        "load",
        url,
        "--requests",
        &n,
        "--concurrency",
        &c,
    ]);
    let out = lab.exec(CLIENT, &cmd)?;
    if !out.status.success() {
        return Err(format!(
            "labapp load {url}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&out.stdout).trim()).into())
}

/// Requests the path's L7 proxy answered with 200, from its own
/// telemetry: our waypoint's `istio_requests_total`, Envoy's stats.
fn proxy_count(lab: &Lab, p: &DataPath) -> Result<u64, Error> {
    let key = p.proxy_pod();
    match p.proxy {
        None => Ok(0),
        Some(Proxy::Waypoint) => {
            let ip = lab.pod(&key).ok_or("no waypoint pod")?.ip.clone();
            let m = get(lab, &key, &format!("http://{ip}:15020/metrics"))?;
            let svc = format!("destination_service=\"echo.{}.svc.cluster.local\"", p.ns);
            Ok(m.lines()
                .filter(|l| l.starts_with("istio_requests_total{"))
                .filter(|l| l.contains(&svc) && l.contains("response_code=\"200\""))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>() as u64)
        }
        Some(Proxy::Envoy) => {
            let stat = "http.main_internal.downstream_rq_2xx";
            let body = envoy_admin(
                lab,
                &key,
                "/stats?filter=^http\\.main_internal\\.downstream_rq_2xx$",
            )?;
            body.lines()
                .find_map(|l| l.strip_prefix(&format!("{stat}: ")))
                .and_then(|n| n.trim().parse().ok())
                .ok_or_else(|| format!("no {stat} in Envoy's stats: {body}").into())
        }
    }
}

/// Stops our waypoint in the envoy namespace's waypoint pod and starts
/// Envoy there: same netns and address, a certificate for the same
/// identity from the lab's CA (kept in its data dir), the same route.
async fn envoy_in_waypoint_pod(lab: &mut Lab, p: &DataPath) -> Result<u32, Error> {
    let key = p.proxy_pod();
    let pod = lab.pod(&key).cloned().ok_or("no waypoint pod")?;
    let identity = Identity::new(TRUST_DOMAIN, &pod.namespace, &pod.service_account)
        .map_err(|e| e.to_string())?;
    let cert = e2e::ca::from_lab_ca(&lab.dir, std::slice::from_ref(&identity))
        .await?
        .remove(0);
    let certs = lab.dir.join("envoy");
    std::fs::create_dir_all(&certs)?;
    let (chain, key_file, root) = write_cert(&certs, "waypoint", &cert);
    let endpoints = |app: &str, port: u16| {
        lab.state
            .pods
            .values()
            .filter(|e| e.namespace == p.ns && e.name.starts_with(&format!("{app}-")))
            .map(|e| format!("{}:{port}", e.ip).parse())
            .collect::<Result<Vec<_>, _>>()
    };
    let (echo, grpc) = (endpoints("echo", 8080)?, endpoints("grpc", 9090)?);
    let echo_san = Identity::new(TRUST_DOMAIN, p.ns, "echo")
        .map_err(|e| e.to_string())?
        .to_string();
    let access_log = lab.dir.join("logs").join("envoy-access.log");
    let config = waypoint_config(&WaypointEnvoy {
        pod_ip: pod.ip.parse()?,
        admin: "127.0.0.1:15000".parse()?,
        files: (&chain, &key_file, &root),
        client_san_prefix: &format!("spiffe://{TRUST_DOMAIN}/"),
        path_prefix: PREFIX,
        set_header: ROUTE_HEADER,
        timeout_ms: ROUTE_TIMEOUT_MS,
        endpoints: echo,
        endpoint_san: &echo_san,
        access_log: &access_log,
        grpc_prefix: "/labecho.Echo/",
        grpc_endpoints: grpc,
    });
    let cfg = certs.join("envoy.yaml");
    std::fs::write(&cfg, config)?;
    // Two workers, as the waypoint's runtime has on two cores.
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .to_string();
    let cmd: Vec<String> = vec![
        envoy_binary().display().to_string(),
        "-c".into(),
        cfg.display().to_string(),
        "--disable-hot-restart".into(),
        "--concurrency".into(),
        workers,
        "-l".into(),
        "warning".into(),
    ];
    let pid = lab.replace_pod_process(&key, &format!("pod-{}-envoy.log", p.ns), &[], &cmd)?;
    // Ready when its admin says so.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if !alive(pid) {
            let log = std::fs::read_to_string(
                lab.dir.join("logs").join(format!("pod-{}-envoy.log", p.ns)),
            )
            .unwrap_or_default();
            return Err(format!("envoy exited:\n{log}").into());
        }
        let r = envoy_admin(lab, &key, "/ready");
        if r.as_ref().is_ok_and(|b| b.contains("LIVE")) {
            return Ok(pid);
        }
        if Instant::now() > deadline {
            return Err(format!("envoy did not become ready: {r:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until a request on the path is answered, and for the proxied
/// paths, answered by the proxy (the ztunnels know the waypoint).
async fn ready(lab: &Lab, p: &DataPath, url: &str) -> Result<(), Error> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let l = load(lab, url, 1, 1);
        let seen = proxy_count(lab, p).unwrap_or(0);
        let answered = l.as_ref().is_ok_and(|l| l.ok() == 1);
        if answered && (p.proxy.is_none() || seen > 0) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{}: not ready after 60 s: {l:?}; proxy answered {seen}",
                p.name
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Requests per run at `c` connections: one connection waits for each
/// answer, so it sends a fifth.
fn requests_at(a: &Args, c: usize) -> usize {
    if c == 1 {
        (a.l7_requests / 5).max(1)
    } else {
        a.l7_requests
    }
}

/// One measured run of one path at one concurrency.
struct Sample {
    rps: f64,
    p50: f64,
    p99: f64,
    /// CPU seconds per 1000 requests: the L7 proxy's, both ztunnels'.
    proxy_cpu: Option<f64>,
    ztunnel_cpu: f64,
}

/// Samples by (connections, index in [`PATHS`]).
type Samples = BTreeMap<(usize, usize), Vec<Sample>>;

/// What the measurements need of the running lab: the L7 proxies' and the
/// ztunnels' pids and each path's URL.
struct Running {
    waypoint_pid: u32,
    envoy_pid: u32,
    ztunnels: Vec<u32>,
    /// One per [`PATHS`] entry.
    urls: Vec<String>,
}

impl Running {
    fn proxy_pid(&self, p: &DataPath) -> Option<u32> {
        match p.proxy {
            None => None,
            Some(Proxy::Waypoint) => Some(self.waypoint_pid),
            Some(Proxy::Envoy) => Some(self.envoy_pid),
        }
    }

    /// A `/proc/PID/status` figure (MiB) of every path's L7 proxy.
    fn proxy_mib(&self, field: &str) -> BTreeMap<&'static str, f64> {
        PATHS
            .iter()
            .filter_map(|p| Some((p.name, status_mib(self.proxy_pid(p)?, field))))
            .collect()
    }
}

pub async fn run(a: &Args, machine: &str) -> Result<Value, Error> {
    // Kept after the run (minus the lab's config and CA): the logs.
    let dir = a.out_dir.join("lab-l7");
    std::fs::create_dir_all(&dir)?;
    let dir = std::fs::canonicalize(&dir)?;
    let mut guard = Down(Lab::create_in(&dir, BENCH_IDS, 2)?);
    let started = Instant::now();
    let envoy_pid = bring_up(&mut guard.0).await?;
    let lab = &guard.0;
    let r = running(lab, envoy_pid)?;
    check_paths(lab, &r).await?;
    eprintln!(
        "l7: lab up and every path answering after {:.1} s (mesh binaries from {}, Envoy {})",
        started.elapsed().as_secs_f64(),
        binary("waypoint")
            .parent()
            .map(|d| d.display().to_string())
            .unwrap_or_default(),
        e2e::envoy::ENVOY_PACKAGE,
    );
    let idle = r.proxy_mib("VmRSS:");

    // Warm-up: pools filled, caches and allocators past their first use.
    let warm = (a.l7_requests / 10).max(50);
    for (p, url) in PATHS.iter().zip(&r.urls) {
        let l = load(lab, url, warm, 16)?;
        if l.ok() != warm {
            return Err(format!("{} warm-up: {l:?}", p.name).into());
        }
    }
    let before: Vec<u64> = PATHS
        .iter()
        .map(|p| proxy_count(lab, p))
        .collect::<Result<_, _>>()?;
    let (samples, sent) = measure(a, lab, &r)?;
    check_carried(lab, &before, &sent)?;
    let streams = crate::l7stream::run(a, lab, &stream_targets(lab, &r)?)?;
    let peak = r.proxy_mib("VmHWM:");

    let rows = report(a, machine, &samples);
    println!("\n| L7 proxy | RSS idle (MiB) | RSS peak, VmHWM (MiB) |");
    println!("| --- | --- | --- |");
    let mut proxies = Vec::new();
    for p in PATHS.iter().filter(|p| p.proxy.is_some()) {
        let (i, h) = (idle[p.name], peak[p.name]);
        println!("| {} | {i:.1} | {h:.1} |", p.name);
        proxies.push(json!({"path": p.name, "rss_idle_mib": i, "rss_peak_mib": h}));
    }
    eprintln!(
        "l7: done in {:.0} s; logs in {}",
        started.elapsed().as_secs_f64(),
        Path::new(&dir).join("logs").display()
    );
    Ok(json!({
        "runs": a.runs,
        "requests": a.l7_requests,
        "route": {"path_prefix": PREFIX, "timeout_ms": ROUTE_TIMEOUT_MS, "sets_header": ROUTE_HEADER.0},
        "load_cpu": load_cpu(),
        "rows": rows,
        "proxies": proxies,
        "streams": streams,
    }))
}

/// Starts the mesh, applies the documents, checks where the pods landed and
/// puts Envoy in the envoy path's waypoint pod; returns Envoy's pid.
async fn bring_up(lab: &mut Lab) -> Result<u32, Error> {
    lab.state.ztunnel_extra = ztunnel_extra_from_env();
    lab.start_mesh().await?;
    lab.apply(parse_docs(&docs())?).await?;
    for (key, node) in [
        (CLIENT.to_string(), "node-1"),
        ("l7-waypoint/waypoint-0".into(), "node-1"),
        ("l7-envoy/waypoint-0".into(), "node-1"),
        ("l7-direct/echo-0".into(), "node-2"),
        ("l7-waypoint/echo-0".into(), "node-2"),
        ("l7-envoy/echo-0".into(), "node-2"),
        ("l7-direct/grpc-0".into(), "node-2"),
        ("l7-waypoint/grpc-0".into(), "node-2"),
        ("l7-envoy/grpc-0".into(), "node-2"),
    ] {
        let on = lab.pod(&key).map(|p| p.node.as_str()).unwrap_or("nowhere");
        if on != node {
            return Err(format!("{key} landed on {on}, not {node}").into());
        }
    }
    envoy_in_waypoint_pod(lab, &PATHS[2]).await
}

/// The pids and URLs the measurements use.
fn running(lab: &Lab, envoy_pid: u32) -> Result<Running, Error> {
    let waypoint_pid = lab
        .pod("l7-waypoint/waypoint-0")
        .and_then(|p| p.pid)
        .ok_or("the waypoint pod runs nothing")?;
    let ztunnels: Vec<u32> = ["node-1-ztunnel", "node-2-ztunnel"]
        .iter()
        .filter_map(|n| lab.state.procs.get(*n)?.pid)
        .collect();
    let urls: Vec<String> = PATHS
        .iter()
        .map(|p| {
            lab.state
                .services
                .get(&format!("{}/echo", p.ns))
                .map(|s| format!("http://{}{PATH}", s.vip))
                .ok_or_else(|| format!("no service in {}", p.ns))
        })
        .collect::<Result<_, _>>()?;
    Ok(Running {
        waypoint_pid,
        envoy_pid,
        ztunnels,
        urls,
    })
}

/// The stream measurements' services (the VIPs of each path's gRPC and
/// http-echo services) and proxies.
fn stream_targets(lab: &Lab, r: &Running) -> Result<crate::l7stream::Targets, Error> {
    let vips = |svc: &str| -> Result<Vec<String>, Error> {
        PATHS
            .iter()
            .map(|p| {
                lab.state
                    .services
                    .get(&format!("{}/{svc}", p.ns))
                    .map(|s| s.vip.to_string())
                    .ok_or_else(|| format!("no {svc} service in {}", p.ns).into())
            })
            .collect()
    };
    Ok(crate::l7stream::Targets {
        grpc_vips: vips("grpc")?,
        echo_vips: vips("echo")?,
        proxy_pids: PATHS.iter().map(|p| r.proxy_pid(p)).collect(),
    })
}

/// Every path answers, and the proxies route as configured.
async fn check_paths(lab: &Lab, r: &Running) -> Result<(), Error> {
    for (p, url) in PATHS.iter().zip(&r.urls) {
        ready(lab, p, url).await?;
    }
    // The proxies route: a request the rule matches arrives with the
    // rule's header (the echo shows what it got), one it does not match
    // without; the direct path never has it.
    let marker = format!("{}: {}", ROUTE_HEADER.0, ROUTE_HEADER.1);
    for (p, url) in PATHS.iter().zip(&r.urls) {
        let routed = get(lab, CLIENT, url)?;
        let unrouted = get(lab, CLIENT, &url.replace(PATH, "/unrouted"))?;
        let ok = routed.starts_with("200")
            && unrouted.starts_with("200")
            && routed.contains(&marker) == p.proxy.is_some()
            && !unrouted.contains(&marker);
        if !ok {
            return Err(format!(
                "{}: the route was not applied as configured:\n{routed}\n{unrouted}",
                p.name
            )
            .into());
        }
    }
    Ok(())
}

/// The measured runs: every path at every concurrency, `--runs` times,
/// interleaved. Returns the samples and the requests sent per path.
fn measure(a: &Args, lab: &Lab, r: &Running) -> Result<(Samples, [usize; 3]), Error> {
    let tck = clock_ticks_per_second();
    let mut sent = [0usize; 3];
    let mut samples: Samples = BTreeMap::new();
    for run in 0..a.runs {
        for &c in &a.l7_concurrency {
            let n = requests_at(a, c);
            for (i, (p, url)) in PATHS.iter().zip(&r.urls).enumerate() {
                let proxy0 = r.proxy_pid(p).map(cpu_ticks);
                let z0: u64 = r.ztunnels.iter().map(|z| cpu_ticks(*z)).sum();
                let l = load(lab, url, n, c)?;
                let proxy1 = r.proxy_pid(p).map(cpu_ticks);
                let z1: u64 = r.ztunnels.iter().map(|z| cpu_ticks(*z)).sum();
                if l.ok() != n || l.errors > 0 {
                    return Err(format!(
                        "{} at {c} connections: {} of {n} answered 200 ({:?}, {} errors, first: {:?})",
                        p.name, l.ok(), l.status, l.errors, l.first_error
                    )
                    .into());
                }
                sent[i] += n;
                let per_1000 = |t: u64| t as f64 / tck / n as f64 * 1000.0;
                let s = Sample {
                    rps: l.rps,
                    p50: l.p50_ms,
                    p99: l.p99_ms,
                    proxy_cpu: proxy0.zip(proxy1).map(|(a, b)| per_1000(b - a)),
                    ztunnel_cpu: per_1000(z1 - z0),
                };
                eprintln!(
                    "l7 run {}: {:>8} c={c:<3} {:>8.0} req/s  p50 {:.3} ms  p99 {:.3} ms  proxy {} CPU s/1000  ztunnels {:.3}",
                    run + 1,
                    p.name,
                    s.rps,
                    s.p50,
                    s.p99,
                    s.proxy_cpu
                        .map(|c| format!("{c:.3}"))
                        .unwrap_or_else(|| "-".into()),
                    s.ztunnel_cpu
                );
                samples.entry((c, i)).or_default().push(s);
            }
        }
    }
    Ok((samples, sent))
}

/// The proxies really carried the measured requests (`before`: their
/// counters before the runs), and Envoy sent them on as HBONE.
fn check_carried(lab: &Lab, before: &[u64], sent: &[usize; 3]) -> Result<(), Error> {
    // The proxies really carried it: their own counters grew by at
    // least what was sent through them.
    for (i, p) in PATHS.iter().enumerate() {
        if p.proxy.is_none() {
            continue;
        }
        let after = proxy_count(lab, p)?;
        let seen = after.saturating_sub(before[i]);
        if seen < sent[i] as u64 {
            return Err(format!(
                "{}: the proxy answered {seen} of the {} requests sent through it",
                p.name, sent[i]
            )
            .into());
        }
        eprintln!("l7: {} answered {seen} measured requests", p.name);
    }
    // And Envoy sent them on as HBONE: TLS to the server pod's 15008.
    let key = PATHS[2].proxy_pod();
    let upstream = envoy_admin(
        lab,
        &key,
        "/stats?filter=^cluster\\.connect_originate\\.(upstream_cx_total|ssl\\.handshake|upstream_rq_total)$",
    )?;
    let stat = |name: &str| -> u64 {
        upstream
            .lines()
            .find_map(|l| l.strip_prefix(&format!("cluster.connect_originate.{name}: ")))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    };
    if stat("upstream_cx_total") == 0 || stat("ssl.handshake") == 0 {
        return Err(format!("envoy did not tunnel over HBONE: {upstream}").into());
    }
    eprintln!(
        "l7: envoy upstream HBONE: {} TLS connections, {} CONNECT streams",
        stat("upstream_cx_total"),
        stat("upstream_rq_total")
    );
    Ok(())
}

/// Prints the table of the runs; returns its rows as JSON.
fn report(a: &Args, machine: &str, samples: &Samples) -> Vec<Value> {
    let pin = load_cpu()
        .map(|c| format!("load generator pinned to CPU {c}"))
        .unwrap_or_else(|| "load generator not pinned".into());
    let per_run: Vec<String> = a
        .l7_concurrency
        .iter()
        .map(|&c| format!("{} requests at {c} connections", requests_at(a, c)))
        .collect();
    println!(
        "\nL7: HTTP/1.1 keep-alive GET {PATH}, client pod (node-1) -> http-echo pod (node-2); per run {}; {} runs; {pin} ({machine})",
        per_run.join(", "),
        a.runs
    );
    println!("Each cell: median (min–max).");
    println!(
        "| path | connections | requests/s | p50 ms | p99 ms | added p50 ms | added p99 ms | L7 proxy CPU s / 1000 req | ztunnels CPU s / 1000 req |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let mut rows = Vec::new();
    for &c in &a.l7_concurrency {
        let direct = &samples[&(c, 0)];
        for (i, p) in PATHS.iter().enumerate() {
            let v = &samples[&(c, i)];
            let rps = stats(v.iter().map(|s| s.rps).collect());
            let p50 = stats(v.iter().map(|s| s.p50).collect());
            let p99 = stats(v.iter().map(|s| s.p99).collect());
            // Added latency: against direct in the same run.
            let add50 = stats(v.iter().zip(direct).map(|(s, d)| s.p50 - d.p50).collect());
            let add99 = stats(v.iter().zip(direct).map(|(s, d)| s.p99 - d.p99).collect());
            let pcpu = v
                .iter()
                .map(|s| s.proxy_cpu)
                .collect::<Option<Vec<f64>>>()
                .map(stats);
            let zcpu = stats(v.iter().map(|s| s.ztunnel_cpu).collect());
            let (a50, a99) = if i == 0 {
                ("-".to_string(), "-".to_string())
            } else {
                (cell(add50, 3), cell(add99, 3))
            };
            println!(
                "| {} | {c} | {} | {} | {} | {a50} | {a99} | {} | {} |",
                p.name,
                cell(rps, 0),
                cell(p50, 3),
                cell(p99, 3),
                pcpu.map(|s| cell(s, 3)).unwrap_or_else(|| "-".into()),
                cell(zcpu, 3),
            );
            rows.push(json!({
                "path": p.name,
                "connections": c,
                "requests_per_run": requests_at(a, c),
                "requests_per_second": stat_json(rps),
                "p50_ms": stat_json(p50),
                "p99_ms": stat_json(p99),
                "added_p50_ms": if i == 0 { Value::Null } else { stat_json(add50) },
                "added_p99_ms": if i == 0 { Value::Null } else { stat_json(add99) },
                "proxy_cpu_s_per_1000_requests": pcpu.map(stat_json),
                "ztunnels_cpu_s_per_1000_requests": stat_json(zcpu),
            }));
        }
    }
    rows
}
