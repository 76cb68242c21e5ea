//! `just bench`: measures the mesh. Three scenarios, run one after the
//! other (`--scenario` picks one): the controller at scale, the L7 path, and
//! the L4 data paths.
//!
//! Controller scenario: istiod-lite (the binary) reads a folder holding N
//! pods, S services and P policies; C proxy clients connect over real
//! gRPC/TLS at once. Reported: time until every client holds every resource
//! (first full push), time for one pod change to reach every client, and the
//! controller's RSS. Each figure is the median of `--runs` runs with min and
//! max. The clients are thin Delta ADS clients (they ACK and count) so the
//! figures are the controller's, not the clients' decoding.
//!
//! L7 scenario: a two-node lab; HTTP/1.1 keep-alive requests from a client
//! pod on node-1 to an http-echo pod on node-2, directly (ztunnel to
//! ztunnel), through our waypoint, and through Envoy in the waypoint's
//! place, measured in the same run. See [`l7`].
//!
//! L4 scenario: a two-node lab; TCP from a client pod to a server pod on the
//! other node and on the same node, plain, through our ztunnels, and through
//! an Envoy sidecar pair, with iperf3, sockperf, wrk and `labapp hold`. See
//! [`l4`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use mesh_proto::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use mesh_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use mesh_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use tokio::sync::{Mutex, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// In its own file: a crate root looks for modules beside it, and every
/// `.rs` beside it is a binary of its own.
#[path = "bench/l4.rs"]
mod l4;

#[derive(Debug, Parser)]
#[command(about = "Measure the mesh")]
struct Args {
    #[arg(long, default_value_t = 10_000)]
    pods: usize,
    #[arg(long, default_value_t = 2_000)]
    services: usize,
    #[arg(long, default_value_t = 100)]
    policies: usize,
    #[arg(long, default_value_t = 100)]
    proxies: usize,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Requests per L7 run at each concurrency (kept-alive connections).
    #[arg(long, default_value_t = 40_000)]
    l7_requests: usize,
    /// Concurrencies of the L7 runs; with 1 connection a run sends a fifth
    /// of `--l7-requests` (each waits for the one before).
    #[arg(long, value_delimiter = ',', default_values_t = [16, 1])]
    l7_concurrency: Vec<usize>,
    /// Seconds per L4 measurement (iperf3, sockperf, wrk).
    #[arg(long, default_value_t = 2)]
    l4_seconds: u64,
    /// Seconds the L4 scenario 6 holds its connections open.
    #[arg(long, default_value_t = 4)]
    l4_hold_seconds: u64,
    /// Connections the L4 scenario 6 holds open (at most 20 000).
    #[arg(long, default_value_t = 1000)]
    l4_connections: usize,
    /// Only these L4 measurements (all when not given).
    #[arg(long, value_enum, value_delimiter = ',')]
    l4_tests: Vec<l4::Test>,
    /// Only these L4 placements (both when not given).
    #[arg(long, value_enum, value_delimiter = ',')]
    l4_placements: Vec<l4::Placement>,
    /// Which scenario to run.
    #[arg(long, value_enum, default_value_t = Scenario::All)]
    scenario: Scenario,
    /// A tiny run for `just test`: proves the harness works.
    #[arg(long)]
    smoke: bool,
    /// Where to write the JSON results.
    #[arg(long, default_value = "target/bench")]
    out_dir: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Scenario {
    All,
    Controller,
    L7,
    L4,
}

impl Scenario {
    /// Its key in the JSON file.
    fn key(&self) -> &'static str {
        match self {
            Scenario::All => "all",
            Scenario::Controller => "controller",
            Scenario::L7 => "l7",
            Scenario::L4 => "l4",
        }
    }
}

struct Controller {
    child: Child,
    grpc: SocketAddr,
    root: String,
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Raises the open-file limit to its hard limit, for this process and the
/// lab's processes it starts.
fn raise_nofile() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

fn write_config(dir: &Path, a: &Args) -> std::io::Result<()> {
    use std::fmt::Write;
    let namespaces = 20;
    let mut s = String::new();
    for n in 0..namespaces {
        let _ = write!(
            s,
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{n}, labels: {{istio.io/dataplane-mode: ambient}}}}\n---\n"
        );
    }
    for i in 0..a.services {
        let _ = write!(
            s,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: ns-{}}}\nspec: {{selector: {{app: app-{i}}}, clusterIP: 10.96.{}.{}, ports: [{{port: 80, targetPort: 8080}}]}}\n---\n",
            i % namespaces,
            i / 250,
            i % 250 + 1
        );
    }
    for p in 0..a.policies {
        let _ = write!(
            s,
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: pol-{p}, namespace: ns-{}}}\nspec: {{selector: {{matchLabels: {{app: app-{p}}}}}, rules: [{{from: [{{source: {{namespaces: [ns-{}]}}}}]}}]}}\n---\n",
            p % namespaces,
            (p + 1) % namespaces
        );
    }
    std::fs::write(dir.join("base.yaml"), s)?;
    for i in 0..a.pods {
        write_pod(dir, a, i, 0)?;
    }
    Ok(())
}

fn write_pod(dir: &Path, a: &Args, i: usize, generation: usize) -> std::io::Result<()> {
    let svc = i % a.services.max(1);
    let ns = svc % 20;
    let text = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: pod-{i}, namespace: ns-{ns}, labels: {{app: app-{svc}}}}}\nspec: {{nodeName: node-{}, serviceAccountName: sa-{svc}, containers: [{{name: c, image: x}}]}}\nstatus: {{podIP: 10.{}.{}.{}, phase: Running}}\n",
        i % 100,
        10 + generation,
        i / 250,
        i % 250 + 1
    );
    // One file per pod: a change touches one file, as a real pod update does.
    let tmp = dir.join(format!(".pod-{i}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(tmp, dir.join(format!("pod-{i}.yaml")))
}

fn sibling(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("exe");
    exe.parent().expect("dir").join(name)
}

async fn start_controller(dir: &Path, proxies: usize) -> Result<Controller, Error> {
    let tokens: String = (0..proxies)
        .map(|i| format!("node-{i}: bench-token-for-node-{i}-000000\n"))
        .collect();
    std::fs::write(dir.join("tokens.yaml"), tokens)?;
    let grpc: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let data = dir.join("data");
    std::fs::create_dir_all(&data)?;
    let child = Command::new(sibling("istiod-lite"))
        .arg("--config-dir")
        .arg(dir.join("config"))
        .arg("--data-dir")
        .arg(&data)
        .arg("--node-tokens")
        .arg(dir.join("tokens.yaml"))
        .args([
            "--grpc-addr",
            &grpc.to_string(),
            "--debug-addr",
            "127.0.0.1:0",
            "--poll-ms",
            "50",
        ])
        .env("RUST_LOG", "warn")
        .spawn()?;
    let mut c = Controller {
        child,
        grpc,
        root: String::new(),
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if let Ok(root) = std::fs::read_to_string(data.join("root-cert.pem"))
            && tokio::net::TcpStream::connect(grpc).await.is_ok()
        {
            c.root = root;
            return Ok(c);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err("istiod-lite did not start".into())
}

/// A thin Delta ADS client: subscribes to both types, ACKs, and keeps the
/// version of every resource it holds.
struct Client {
    held: Arc<Mutex<HashMap<String, String>>>,
}

async fn connect(
    c: &Controller,
    node: usize,
    total_seen: Arc<AtomicUsize>,
) -> Result<Client, Error> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&c.root))
        .domain_name("istiod.istio-system.svc");
    let ch = Endpoint::from_shared(format!("https://{}", c.grpc))?
        .tls_config(tls)?
        .connect()
        .await?;
    let (tx, rx) = mpsc::channel(16);
    for t in [ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL] {
        tx.send(DeltaDiscoveryRequest {
            type_url: t.into(),
            resource_names_subscribe: vec!["*".into()],
            ..Default::default()
        })
        .await?;
    }
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer bench-token-for-node-{node}-000000").parse()?,
    );
    let mut stream = AggregatedDiscoveryServiceClient::new(ch)
        .max_decoding_message_size(256 * 1024 * 1024)
        .delta_aggregated_resources(req)
        .await?
        .into_inner();
    let held = Arc::new(Mutex::new(HashMap::new()));
    let h = held.clone();
    tokio::spawn(async move {
        while let Ok(Some(resp)) = stream.message().await {
            let mut held = h.lock().await;
            for r in resp.resources {
                if held.insert(r.name, r.version).is_none() {
                    total_seen.fetch_add(1, Ordering::Relaxed);
                }
            }
            for n in resp.removed_resources {
                held.remove(&n);
            }
            drop(held);
            let _ = tx
                .send(DeltaDiscoveryRequest {
                    type_url: resp.type_url,
                    response_nonce: resp.nonce,
                    ..Default::default()
                })
                .await;
        }
    });
    Ok(Client { held })
}

struct Run {
    first_push: Duration,
    change: Duration,
    rss_mib: f64,
}

async fn run_once(a: &Args) -> Result<Run, Error> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("config");
    std::fs::create_dir(&config)?;
    write_config(&config, a)?;
    let c = start_controller(dir.path(), a.proxies).await?;
    let expected = a.pods + a.services + a.policies;

    let seen = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut clients = Vec::with_capacity(a.proxies);
    for i in 0..a.proxies {
        clients.push(connect(&c, i, seen.clone()).await?);
    }
    let deadline = t0 + Duration::from_secs(600);
    while seen.load(Ordering::Relaxed) < expected * a.proxies {
        if Instant::now() > deadline {
            return Err(format!(
                "first push incomplete: {} of {}",
                seen.load(Ordering::Relaxed),
                expected * a.proxies
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let first_push = t0.elapsed();

    // One pod moves to a new IP: time until every client holds the new version.
    let name = "Kubernetes//Pod/ns-0/pod-0".to_string();
    let mut before = Vec::new();
    for cl in &clients {
        before.push(cl.held.lock().await.get(&name).cloned());
    }
    let t1 = Instant::now();
    write_pod(&config, a, 0, 1)?;
    let deadline = t1 + Duration::from_secs(60);
    'wait: loop {
        if Instant::now() > deadline {
            return Err("the pod change did not reach every client".into());
        }
        for (cl, old) in clients.iter().zip(&before) {
            if cl.held.lock().await.get(&name) == old.as_ref() {
                tokio::time::sleep(Duration::from_millis(2)).await;
                continue 'wait;
            }
        }
        break;
    }
    let change = t1.elapsed();
    let rss_mib = rss_kib(c.child.id()) as f64 / 1024.0;
    Ok(Run {
        first_push,
        change,
        rss_mib,
    })
}

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// The controller scenario: runs, then its table; its JSON object.
async fn controller(a: &Args, machine: &str) -> Result<serde_json::Value, Error> {
    let mut runs = Vec::new();
    for i in 0..a.runs {
        let r = run_once(a).await?;
        eprintln!(
            "run {}: first push {:.0} ms, change {:.1} ms, RSS {:.1} MiB",
            i + 1,
            r.first_push.as_secs_f64() * 1e3,
            r.change.as_secs_f64() * 1e3,
            r.rss_mib
        );
        runs.push(r);
    }
    let fp = stats(
        runs.iter()
            .map(|r| r.first_push.as_secs_f64() * 1e3)
            .collect(),
    );
    let ch = stats(runs.iter().map(|r| r.change.as_secs_f64() * 1e3).collect());
    let rss = stats(runs.iter().map(|r| r.rss_mib).collect());
    println!(
        "\nController at scale: {} pods, {} services, {} policies, {} proxies ({machine})",
        a.pods, a.services, a.policies, a.proxies
    );
    println!("| figure | median | min | max |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| first full push to all proxies (ms) | {:.0} | {:.0} | {:.0} |",
        fp.0, fp.1, fp.2
    );
    println!(
        "| one pod change to all proxies (ms) | {:.1} | {:.1} | {:.1} |",
        ch.0, ch.1, ch.2
    );
    println!(
        "| controller RSS (MiB) | {:.1} | {:.1} | {:.1} |",
        rss.0, rss.1, rss.2
    );
    Ok(serde_json::json!({
        "pods": a.pods, "services": a.services, "policies": a.policies, "proxies": a.proxies, "runs": a.runs,
        "first_push_ms": {"median": fp.0, "min": fp.1, "max": fp.2},
        "pod_change_ms": {"median": ch.0, "min": ch.1, "max": ch.2},
        "rss_mib": {"median": rss.0, "min": rss.1, "max": rss.2},
    }))
}

#[tokio::main]
async fn main() {
    let mut a = Args::parse();
    if a.smoke {
        (a.pods, a.services, a.policies, a.proxies, a.runs) = (50, 10, 5, 5, 1);
        (a.l7_requests, a.l7_concurrency) = (200, vec![16]);
    }
    ztunnel::tls::install_default_provider();
    // The lab's processes inherit it: 1 000 held connections are 2 000
    // sockets in one ztunnel on one node.
    raise_nofile();
    let machine = format!(
        "{} cores, kernel {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    let mut json = serde_json::json!({ "machine": machine });
    let scenarios: &[Scenario] = match a.scenario {
        Scenario::All => &[Scenario::Controller, Scenario::L7, Scenario::L4],
        ref one => std::slice::from_ref(one),
    };
    for s in scenarios {
        let result = match s {
            Scenario::Controller => controller(&a, &machine).await,
            Scenario::L7 => l7::run(&a, &machine).await,
            Scenario::L4 => l4::run(&a, &machine).await,
            Scenario::All => continue,
        };
        match result {
            Ok(v) => json[s.key()] = v,
            Err(e) => {
                eprintln!("bench failed ({}): {e}", s.key());
                std::process::exit(1);
            }
        }
    }
    let date = time::OffsetDateTime::now_utc();
    let name = format!(
        "{:04}-{:02}-{:02}{}.json",
        date.year(),
        date.month() as u8,
        date.day(),
        if a.smoke { "-smoke" } else { "" }
    );
    if std::fs::create_dir_all(&a.out_dir).is_ok() {
        let path = a.out_dir.join(name);
        if std::fs::write(&path, serde_json::to_vec_pretty(&json).unwrap_or_default()).is_ok() {
            println!("\nwrote {}", path.display());
        }
    }
}

/// The L7 path: HTTP/1.1 keep-alive requests from a client pod to an
/// http-echo pod on the other node, three ways in one lab and one run:
///
/// - **direct**: the echo's namespace has no waypoint (client -> ztunnel ->
///   HBONE -> ztunnel -> server);
/// - **waypoint**: its namespace uses a waypoint, our `waypoint` binary in a
///   pod (client -> ztunnel -> HBONE -> waypoint -> HBONE -> ztunnel ->
///   server), with an HTTPRoute (a path prefix match and a timeout);
/// - **envoy**: the same, with Envoy in that waypoint pod instead: same
///   address, same identity (a certificate from the lab's CA), the same
///   route, HBONE terminated and originated through internal listeners as
///   Istio's waypoint does ([`e2e::envoy::waypoint_config`]).
///
/// The lab places pods round-robin in creation order, so the documents are
/// ordered to put the client and both L7 proxies on node-1 and the three
/// echo pods on node-2. Each figure is the median of `--runs` runs with min
/// and max; the runs interleave the paths so drift hits them alike. CPU is
/// utime+stime from /proc/PID/stat over a run; memory is VmRSS before any
/// load (idle) and VmHWM after all of it (peak).
mod l7 {
    use std::collections::BTreeMap;
    use std::path::Path;
    use std::time::{Duration, Instant};

    use e2e::ca::TRUST_DOMAIN;
    use e2e::envoy::{WaypointEnvoy, envoy_binary, waypoint_config, write_cert};
    use e2e::lab::{BENCH_IDS, Down, Lab, parse_docs, ztunnel_extra_from_env};
    use e2e::mesh::binary;
    use serde_json::{Value, json};
    use ztunnel::identity::Identity;

    use super::{Args, Error, stats};

    const CLIENT: &str = "l7-direct/client-0";
    /// The route's prefix, and the path every request asks for.
    const PREFIX: &str = "/api";
    const PATH: &str = "/api/echo";
    const ROUTE_TIMEOUT_MS: u64 = 10_000;
    /// What the route sets on the requests it matches (the echo shows it).
    const ROUTE_HEADER: (&str, &str) = ("x-route", "api");

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Proxy {
        Waypoint,
        Envoy,
    }

    struct DataPath {
        name: &'static str,
        ns: &'static str,
        proxy: Option<Proxy>,
    }

    const PATHS: [DataPath; 3] = [
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
        fn proxy_pod(&self) -> String {
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
        s
    }

    /// Where the load generator is pinned: the last CPU, when there are two
    /// or more.
    pub(super) fn load_cpu() -> Option<usize> {
        let n = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        (n > 1).then(|| n - 1)
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

    /// `labapp get` from inside a pod: the status line and the body.
    pub(super) fn get(lab: &Lab, from: &str, url: &str) -> Result<String, Error> {
        let labapp = binary("labapp").display().to_string();
        let out = lab.exec(from, &["timeout", "20", &labapp, "get", url])?;
        if !out.status.success() {
            return Err(format!("get {url} in {from}: {}", out.status).into());
        }
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    }

    /// A GET to Envoy's admin inside its pod, with curl: `labapp get` sends
    /// the absolute form (`GET http://host/path`), which proxies take and
    /// Envoy's admin does not.
    pub(super) fn envoy_admin(lab: &Lab, pod: &str, path: &str) -> Result<String, Error> {
        let url = format!("http://127.0.0.1:15000{path}");
        let out = lab.exec(pod, &["curl", "-sf", "--max-time", "10", &url])?;
        if !out.status.success() {
            return Err(format!("curl {url} in {pod}: {}", out.status).into());
        }
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
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

    /// utime + stime of a process, in clock ticks.
    pub(super) fn cpu_ticks(pid: u32) -> u64 {
        e2e::procfs::pid_stat(pid).map_or(0, |f| e2e::procfs::cpu_ticks(&f))
    }

    pub(super) fn clock_ticks_per_second() -> f64 {
        // SAFETY: sysconf(3) reads a constant of the system; no memory is
        // passed.
        let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if t > 0 { t as f64 } else { 100.0 }
    }

    /// A `/proc/PID/status` figure in MiB (VmRSS, VmHWM).
    pub(super) fn status_mib(pid: u32, field: &str) -> f64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with(field))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            })
            .unwrap_or(0.0)
            / 1024.0
    }

    pub(super) fn alive(pid: u32) -> bool {
        e2e::procfs::pid_stat(pid).is_some_and(|f| f.first().map(String::as_str) != Some("Z"))
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
        let echo = lab
            .state
            .pods
            .values()
            .filter(|e| e.namespace == p.ns && e.name.starts_with("echo-"))
            .map(|e| format!("{}:8080", e.ip).parse())
            .collect::<Result<Vec<_>, _>>()?;
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

    pub(super) fn cell(s: (f64, f64, f64), decimals: usize) -> String {
        format!("{:.d$} ({:.d$}–{:.d$})", s.0, s.1, s.2, d = decimals)
    }

    pub(super) fn stat_json(s: (f64, f64, f64)) -> Value {
        json!({"median": s.0, "min": s.1, "max": s.2})
    }

    pub async fn run(a: &Args, machine: &str) -> Result<Value, Error> {
        // Kept after the run (minus the lab's config and CA): the logs.
        let dir = a.out_dir.join("lab-l7");
        std::fs::create_dir_all(&dir)?;
        let dir = std::fs::canonicalize(&dir)?;
        let mut guard = Down(Lab::create_in(&dir, BENCH_IDS, 2)?);
        let started = Instant::now();
        let lab = &mut guard.0;
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
        ] {
            let on = lab.pod(&key).map(|p| p.node.as_str()).unwrap_or("nowhere");
            if on != node {
                return Err(format!("{key} landed on {on}, not {node}").into());
            }
        }
        let envoy_pid = envoy_in_waypoint_pod(lab, &PATHS[2]).await?;
        let lab = &guard.0;
        let waypoint_pid = lab
            .pod("l7-waypoint/waypoint-0")
            .and_then(|p| p.pid)
            .ok_or("the waypoint pod runs nothing")?;
        let ztunnels: Vec<u32> = ["node-1-ztunnel", "node-2-ztunnel"]
            .iter()
            .filter_map(|n| lab.state.procs.get(*n)?.pid)
            .collect();
        let proxy_pid = |p: &DataPath| match p.proxy {
            None => None,
            Some(Proxy::Waypoint) => Some(waypoint_pid),
            Some(Proxy::Envoy) => Some(envoy_pid),
        };
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
        for (p, url) in PATHS.iter().zip(&urls) {
            ready(lab, p, url).await?;
        }
        // The proxies route: a request the rule matches arrives with the
        // rule's header (the echo shows what it got), one it does not match
        // without; the direct path never has it.
        let marker = format!("{}: {}", ROUTE_HEADER.0, ROUTE_HEADER.1);
        for (p, url) in PATHS.iter().zip(&urls) {
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
        eprintln!(
            "l7: lab up and every path answering after {:.1} s (mesh binaries from {}, Envoy {})",
            started.elapsed().as_secs_f64(),
            binary("waypoint")
                .parent()
                .map(|d| d.display().to_string())
                .unwrap_or_default(),
            e2e::envoy::ENVOY_PACKAGE,
        );
        let idle: BTreeMap<&str, f64> = PATHS
            .iter()
            .filter_map(|p| Some((p.name, status_mib(proxy_pid(p)?, "VmRSS:"))))
            .collect();

        // Warm-up: pools filled, caches and allocators past their first use.
        let warm = (a.l7_requests / 10).max(50);
        for (p, url) in PATHS.iter().zip(&urls) {
            let l = load(lab, url, warm, 16)?;
            if l.ok() != warm {
                return Err(format!("{} warm-up: {l:?}", p.name).into());
            }
        }
        let before: Vec<u64> = PATHS
            .iter()
            .map(|p| proxy_count(lab, p))
            .collect::<Result<_, _>>()?;

        let tck = clock_ticks_per_second();
        let mut sent = [0usize; 3];
        let mut samples: BTreeMap<(usize, usize), Vec<Sample>> = BTreeMap::new();
        for run in 0..a.runs {
            for &c in &a.l7_concurrency {
                let n = requests_at(a, c);
                for (i, (p, url)) in PATHS.iter().zip(&urls).enumerate() {
                    let proxy0 = proxy_pid(p).map(cpu_ticks);
                    let z0: u64 = ztunnels.iter().map(|z| cpu_ticks(*z)).sum();
                    let l = load(lab, url, n, c)?;
                    let proxy1 = proxy_pid(p).map(cpu_ticks);
                    let z1: u64 = ztunnels.iter().map(|z| cpu_ticks(*z)).sum();
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
        let peak: BTreeMap<&str, f64> = PATHS
            .iter()
            .filter_map(|p| Some((p.name, status_mib(proxy_pid(p)?, "VmHWM:"))))
            .collect();

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
        }))
    }
}
