//! The L4 data paths: TCP between a client pod and a server pod, three ways
//! in one lab and one run, first across nodes, then on one node:
//!
//! - **plain**: neither pod enrolled (the physical limit here);
//! - **ztunnel**: both pods in an ambient namespace: client -> ztunnel ->
//!   HBONE -> ztunnel -> server (one ztunnel for both ends on one node);
//! - **envoy**: neither pod enrolled, an Envoy sidecar pair doing the same
//!   job: nftables in the client pod's netns redirects its outbound TCP to
//!   an Envoy there ([`e2e::envoy::sidecar_capture_rules`]), which reads the
//!   original destination and tunnels it as HTTP/2 CONNECT over mutual TLS
//!   (certificates from the lab's CA) to an Envoy on the server pod's
//!   :15008, which dials the server ([`e2e::envoy::sidecar_outbound_config`],
//!   [`e2e::envoy::sidecar_inbound_config`]).
//!
//! Scenarios (the numbering), each run for `--l4-seconds`:
//!
//! 1. one TCP stream each way (iperf3): Gbit/s; CPU seconds per GB of each
//!    proxy on the way up (the client side encrypts);
//! 2. eight parallel streams (iperf3 -P 8): Gbit/s;
//! 3. 64-byte ping-pong on one connection (sockperf): RTT p50/p99/p99.9;
//! 4. HTTP/1.1 keep-alive to a static server (wrk), 1 and 32 connections:
//!    requests/s, p50, p99; each proxy's CPU seconds per 1 000 requests;
//! 5. a new connection per request (wrk, `Connection: close`, 8 at a
//!    time): connections/s, p50, p99;
//! 6. `--l4-connections` open connections pinged once a second (`labapp
//!    hold` against a TCP echo): each proxy's largest RSS meanwhile;
//! 7. each proxy's RSS before any load and its peak (VmHWM) after all.
//!
//! Runs interleave the paths test by test, so drift hits them alike; each
//! mesh figure is also given as a ratio to plain in the same run. The load
//! generator is pinned to the last CPU (as in [`super::l7`]); servers and
//! proxies are not pinned.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use e2e::envoy::ENVOY_PACKAGE;
use e2e::lab::{BENCH_IDS, Down, Lab, parse_docs, ztunnel_extra_from_env};
use e2e::mesh::binary;
use serde_json::{Value, json};

use crate::common::{clock_ticks_per_second, load_cpu, status_mib};
use crate::{Args, Error};

// Under bench/l4/ (paths relative to this file's folder).
#[path = "l4/measure.rs"]
mod measure;
#[path = "l4/report.rs"]
mod report;
#[path = "l4/setup.rs"]
mod setup;

use measure::{envoy_stat, measure, ztunnel_opened};
use setup::{check_tools, paths_ready, start_envoys, start_servers};

const IPERF_PORT: u16 = 5201;

const SOCKPERF_PORT: u16 = 11111;

const HTTP_PORT: u16 = 8081;

const ECHO_PORT: u16 = 9000;

const SERVER_PORTS: [u16; 4] = [IPERF_PORT, SOCKPERF_PORT, HTTP_PORT, ECHO_PORT];

/// Connections at a time in scenario 5.
const NEW_CONN_CONCURRENCY: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Mesh {
    Plain,
    Ztunnel,
    Envoy,
}

const MESHES: [Mesh; 3] = [Mesh::Plain, Mesh::Ztunnel, Mesh::Envoy];

impl Mesh {
    fn name(self) -> &'static str {
        match self {
            Mesh::Plain => "plain",
            Mesh::Ztunnel => "ztunnel",
            Mesh::Envoy => "envoy",
        }
    }

    fn ns(self) -> &'static str {
        match self {
            Mesh::Plain => "l4-plain",
            Mesh::Ztunnel => "l4-ztunnel",
            Mesh::Envoy => "l4-envoy",
        }
    }

    fn client(self) -> String {
        format!("{}/client-0", self.ns())
    }
}

/// Where the server pod runs (`--l4-placements` picks some).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Placement {
    /// Client on node-1, server on node-2.
    #[value(name = "cross-node")]
    Cross,
    /// Client and server on node-1.
    #[value(name = "same-node")]
    Same,
}

impl Placement {
    fn name(self) -> &'static str {
        match self {
            Placement::Cross => "cross-node",
            Placement::Same => "same-node",
        }
    }

    /// The server pod's key for a path.
    fn server(self, m: Mesh) -> String {
        match self {
            Placement::Cross => format!("{}/server-0", m.ns()),
            Placement::Same => format!("{}/local-0", m.ns()),
        }
    }
}

/// One L4 measurement (`--l4-tests` picks some; profiling runs one long).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Test {
    OneStreamUp,
    OneStreamDown,
    EightStreams,
    PingPong,
    Http1,
    Http32,
    NewConnections,
    Hold,
}

const TESTS: [Test; 8] = [
    Test::OneStreamUp,
    Test::OneStreamDown,
    Test::EightStreams,
    Test::PingPong,
    Test::Http1,
    Test::Http32,
    Test::NewConnections,
    Test::Hold,
];

/// A figure of the table.
struct Figure {
    key: &'static str,
    scenario: &'static str,
    unit: &'static str,
    decimals: usize,
    higher_is_better: bool,
}

const fn fig(
    key: &'static str,
    scenario: &'static str,
    unit: &'static str,
    decimals: usize,
    higher_is_better: bool,
) -> Figure {
    Figure {
        key,
        scenario,
        unit,
        decimals,
        higher_is_better,
    }
}

const FIGURES: [Figure; 15] = [
    fig(
        "s1_up_gbps",
        "1. one stream, client -> server",
        "Gbit/s",
        2,
        true,
    ),
    fig(
        "s1_down_gbps",
        "1. one stream, server -> client",
        "Gbit/s",
        2,
        true,
    ),
    fig(
        "s2_gbps",
        "2. 8 streams, client -> server",
        "Gbit/s",
        2,
        true,
    ),
    fig("s3_p50_us", "3. 64 B ping-pong", "RTT p50 µs", 1, false),
    fig("s3_p99_us", "3. 64 B ping-pong", "RTT p99 µs", 1, false),
    fig("s3_p999_us", "3. 64 B ping-pong", "RTT p99.9 µs", 1, false),
    fig(
        "s4_c1_rps",
        "4. HTTP/1.1 keep-alive, 1 conn",
        "req/s",
        0,
        true,
    ),
    fig(
        "s4_c1_p50_ms",
        "4. HTTP/1.1 keep-alive, 1 conn",
        "p50 ms",
        3,
        false,
    ),
    fig(
        "s4_c1_p99_ms",
        "4. HTTP/1.1 keep-alive, 1 conn",
        "p99 ms",
        3,
        false,
    ),
    fig(
        "s4_c32_rps",
        "4. HTTP/1.1 keep-alive, 32 conns",
        "req/s",
        0,
        true,
    ),
    fig(
        "s4_c32_p50_ms",
        "4. HTTP/1.1 keep-alive, 32 conns",
        "p50 ms",
        3,
        false,
    ),
    fig(
        "s4_c32_p99_ms",
        "4. HTTP/1.1 keep-alive, 32 conns",
        "p99 ms",
        3,
        false,
    ),
    fig("s5_cps", "5. new connection per request", "conn/s", 0, true),
    fig(
        "s5_p50_ms",
        "5. new connection per request",
        "p50 ms",
        3,
        false,
    ),
    fig(
        "s5_p99_ms",
        "5. new connection per request",
        "p99 ms",
        3,
        false,
    ),
];

fn figures() -> impl Iterator<Item = &'static Figure> {
    FIGURES.iter()
}

/// A proxy process on a path.
#[derive(Debug, Clone)]
struct ProxyProc {
    name: String,
    /// "client side", "server side", or "both sides".
    side: &'static str,
    pid: u32,
}

/// One path's measurements in one run.
#[derive(Debug, Default)]
struct Sample {
    figures: BTreeMap<&'static str, f64>,
    /// Per proxy of the path (in [`Ctx::proxies`] order): CPU seconds per
    /// GB moved in scenario 1 up, per 1 000 requests in scenario 4 at 32
    /// connections, and the largest RSS (MiB) while scenario 6 held its
    /// connections.
    cpu_per_gb: BTreeMap<usize, f64>,
    cpu_per_1000: BTreeMap<usize, f64>,
    rss_held: BTreeMap<usize, f64>,
    /// The anonymous part of it (RssAnon: not the binary's mapped pages).
    anon_held: BTreeMap<usize, f64>,
}

/// What every measurement needs.
struct Ctx<'a> {
    lab: &'a Lab,
    secs: u64,
    hold_secs: u64,
    connections: usize,
    ztunnels: [u32; 2],
    /// Whether the ztunnels hand same-node connections over in memory
    /// (their `same_node_fast_path`, as configured in the lab).
    fast_path: bool,
    /// Runtime threads per ztunnel, and workers per Envoy.
    workers: usize,
    /// The ztunnels' runtime model, as configured in the lab.
    runtime: &'static str,
    /// Envoy pids by pod key.
    envoys: BTreeMap<String, u32>,
    tck: f64,
}

impl Ctx<'_> {
    fn ip(&self, key: &str) -> Result<String, Error> {
        Ok(self
            .lab
            .pod(key)
            .ok_or_else(|| format!("no pod {key}"))?
            .ip
            .clone())
    }

    fn proxies(&self, m: Mesh, p: Placement) -> Vec<ProxyProc> {
        let proc = |name: &str, side, pid| ProxyProc {
            name: name.to_string(),
            side,
            pid,
        };
        let envoy = |key: &str| self.envoys.get(key).copied().unwrap_or(0);
        match (m, p) {
            (Mesh::Plain, _) => vec![],
            (Mesh::Ztunnel, Placement::Cross) => vec![
                proc("node-1 ztunnel", "client side", self.ztunnels[0]),
                proc("node-2 ztunnel", "server side", self.ztunnels[1]),
            ],
            (Mesh::Ztunnel, Placement::Same) => {
                vec![proc("node-1 ztunnel", "both sides", self.ztunnels[0])]
            }
            (Mesh::Envoy, _) => vec![
                proc(
                    "client pod Envoy",
                    "client side",
                    envoy(&Mesh::Envoy.client()),
                ),
                proc(
                    &format!(
                        "{} pod Envoy",
                        if p == Placement::Cross {
                            "server"
                        } else {
                            "local server"
                        }
                    ),
                    "server side",
                    envoy(&p.server(Mesh::Envoy)),
                ),
            ],
        }
    }
}

fn docs() -> String {
    let deployment = |ns: &str, name: &str, sa: &str, node: &str, args: &str| {
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  replicas: 1\n  selector: {{matchLabels: {{app: {name}}}}}\n  template:\n    metadata: {{labels: {{app: {name}}}}}\n    spec:\n      nodeName: {node}\n      serviceAccountName: {sa}\n      containers: [{{name: app, image: labapp, args: [{args}]}}]\n---\n"
        )
    };
    let server = format!("http-static, --port, \"{HTTP_PORT}\"");
    let mut s = String::new();
    for m in MESHES {
        // Only the ztunnel path's namespace is enrolled.
        let labels = if m == Mesh::Ztunnel {
            "{istio.io/dataplane-mode: ambient}"
        } else {
            "{}"
        };
        s += &format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {}, labels: {labels}}}\n---\n",
            m.ns()
        );
        s += &deployment(m.ns(), "client", "client", "node-1", "sleep");
        s += &deployment(m.ns(), "server", "server", "node-2", &server);
        s += &deployment(m.ns(), "local", "server", "node-1", &server);
    }
    s
}

impl Test {
    /// The load generator it runs (which is also its Debian package).
    fn tool(self) -> &'static str {
        match self {
            Test::OneStreamUp | Test::OneStreamDown | Test::EightStreams => "iperf3",
            Test::PingPong => "sockperf",
            Test::Http1 | Test::Http32 | Test::NewConnections => "wrk",
            Test::Hold => "labapp",
        }
    }
}

/// Samples by path: one per run.
type Samples = BTreeMap<(Placement, Mesh), Vec<Sample>>;
/// RSS and its anonymous part (MiB) by proxy name.
type Rss = BTreeMap<String, (f64, f64)>;

pub async fn run(a: &Args, machine: &str) -> Result<Value, Error> {
    let (tests, placements) = chosen(a);
    check_tools(&tests)?;
    let secs = if a.smoke { 1 } else { a.l4_seconds.max(1) };
    let dir = a.out_dir.join("lab-l4");
    std::fs::create_dir_all(&dir)?;
    let dir = std::fs::canonicalize(&dir)?;
    let mut guard = Down(Lab::create_in(&dir, BENCH_IDS, 2)?);
    let started = Instant::now();
    let (zcfg, workers, envoys) = bring_up(&mut guard.0, &tests).await?;
    let lab = &guard.0;
    paths_ready(lab, &placements).await?;
    let ztunnels = [
        lab.state.procs.get("node-1-ztunnel").and_then(|p| p.pid),
        lab.state.procs.get("node-2-ztunnel").and_then(|p| p.pid),
    ];
    let [Some(z1), Some(z2)] = ztunnels else {
        return Err("the lab's ztunnels run nowhere".into());
    };
    let c = Ctx {
        fast_path: zcfg.same_node_fast_path,
        workers,
        runtime: zcfg.runtime.as_str(),
        lab,
        secs,
        hold_secs: a.l4_hold_seconds.max(2),
        connections: a.l4_connections,
        ztunnels: [z1, z2],
        envoys,
        tck: clock_ticks_per_second(),
    };
    eprintln!(
        "l4: lab up and every path answering after {:.1} s (mesh binaries from {}, {ENVOY_PACKAGE})",
        started.elapsed().as_secs_f64(),
        binary("ztunnel")
            .parent()
            .map(|d| d.display().to_string())
            .unwrap_or_default(),
    );
    // Idle: after the readiness checks, before any load; total and
    // anonymous.
    let idle = proxy_rss(&c, &placements, "VmRSS:");
    let z_before = ztunnel_opened(lab)?;
    let e_before = envoy_stat(
        lab,
        &Mesh::Envoy.client(),
        "cluster.hbone.upstream_rq_total",
    )?;
    let samples = measure_all(a, &c, &tests, &placements)?;
    check_carried(a, lab, &tests, &placements, z_before, e_before)?;
    // Peak: VmHWM, and the anonymous RSS now (the kernel keeps no peak of
    // that part alone).
    let peak = proxy_rss(&c, &placements, "VmHWM:");

    let paths_json = report::figures_table(a, machine, &c, &placements, &samples);
    let (proxies_json, medians) = report::proxies_table(a, &c, &placements, &samples, &idle, &peak);
    let goals = report::goals(a, &c, &placements, &samples, &medians);
    report::print_goals(&goals);
    eprintln!(
        "l4: done in {:.0} s; logs in {}",
        started.elapsed().as_secs_f64(),
        Path::new(&dir).join("logs").display()
    );
    Ok(json!({
        "runs": a.runs,
        "seconds": secs,
        "hold_seconds": c.hold_secs,
        "connections": a.l4_connections,
        "new_connection_concurrency": NEW_CONN_CONCURRENCY,
        "load_cpu": load_cpu(),
        "envoy": ENVOY_PACKAGE,
        "same_node_fast_path": c.fast_path,
        "worker_threads": c.workers,
        "runtime": c.runtime,
        "figures": paths_json,
        "proxies": proxies_json,
        "goals": goals,
    }))
}

/// The tests and placements to run: `--smoke`'s one, the ones asked for,
/// or all.
fn chosen(a: &Args) -> (Vec<Test>, Vec<Placement>) {
    let tests: Vec<Test> = if a.smoke {
        vec![Test::OneStreamUp]
    } else if a.l4_tests.is_empty() {
        TESTS.to_vec()
    } else {
        TESTS
            .iter()
            .copied()
            .filter(|t| a.l4_tests.contains(t))
            .collect()
    };
    let placements: Vec<Placement> = if a.smoke {
        vec![Placement::Cross]
    } else if a.l4_placements.is_empty() {
        vec![Placement::Cross, Placement::Same]
    } else {
        [Placement::Cross, Placement::Same]
            .into_iter()
            .filter(|p| a.l4_placements.contains(p))
            .collect()
    };
    (tests, placements)
}

/// Starts the mesh, applies the documents, checks where the pods landed and
/// what is captured, and starts the servers and the Envoy sidecars. Returns
/// the lab's ztunnel config, the workers per Envoy, and the Envoys' pids.
async fn bring_up(
    lab: &mut Lab,
    tests: &[Test],
) -> Result<(ztunnel::config::Config, usize, BTreeMap<String, u32>), Error> {
    lab.state.ztunnel_extra = ztunnel_extra_from_env();
    lab.start_mesh().await?;
    lab.apply(parse_docs(&docs())?).await?;
    for m in MESHES {
        for (key, node) in [
            (m.client(), "node-1"),
            (Placement::Cross.server(m), "node-2"),
            (Placement::Same.server(m), "node-1"),
        ] {
            let pod = lab.pod(&key).ok_or_else(|| format!("no pod {key}"))?;
            if pod.node != node {
                return Err(format!("{key} landed on {}, not {node}", pod.node).into());
            }
            if pod.captured != (m == Mesh::Ztunnel) {
                return Err(format!("{key}: captured is {}", pod.captured).into());
            }
        }
    }
    start_servers(lab, tests).await?;
    let zcfg = ztunnel::config::Config::load_for_node(&lab.dir.join("node-1-ztunnel.yaml"), None)
        .map_err(|e| format!("the lab's ztunnel config: {e}"))?;
    // Each Envoy gets as many workers as each ztunnel's runtime has threads.
    let workers = zcfg.worker_threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    });
    let envoys = start_envoys(lab, workers).await?;
    Ok((zcfg, workers, envoys))
}

/// A `/proc/PID/status` figure (`total`: VmRSS or VmHWM) of every proxy on
/// the placements' paths, with RssAnon beside it.
fn proxy_rss(c: &Ctx<'_>, placements: &[Placement], total: &str) -> Rss {
    let mut out = Rss::new();
    for &p in placements {
        for m in MESHES {
            for x in c.proxies(m, p) {
                out.insert(
                    x.name.clone(),
                    (status_mib(x.pid, total), status_mib(x.pid, "RssAnon:")),
                );
            }
        }
    }
    out
}

/// The measured runs: every test on every path, `--runs` times,
/// interleaved.
fn measure_all(
    a: &Args,
    c: &Ctx<'_>,
    tests: &[Test],
    placements: &[Placement],
) -> Result<Samples, Error> {
    let mut samples: Samples = BTreeMap::new();
    for run in 0..a.runs {
        eprintln!("l4: run {} of {}", run + 1, a.runs);
        for &p in placements {
            for &t in tests {
                for m in MESHES {
                    let v = samples.entry((p, m)).or_default();
                    if v.len() <= run {
                        v.push(Sample::default());
                    }
                    measure(c, t, m, p, &mut v[run])?;
                }
            }
        }
    }
    Ok(samples)
}

/// The meshes really carried it: the ztunnels' destination side opened
/// connections for the ztunnel path's pods, at least the held ones, and
/// the Envoy sidecar opened CONNECT streams over TLS (`z_before`,
/// `e_before`: the counters before the runs).
fn check_carried(
    a: &Args,
    lab: &Lab,
    tests: &[Test],
    placements: &[Placement],
    z_before: u64,
    e_before: u64,
) -> Result<(), Error> {
    let e_client = Mesh::Envoy.client();
    let held = if tests.contains(&Test::Hold) {
        (a.l4_connections * a.runs * placements.len()) as u64
    } else {
        1
    };
    let z_seen = ztunnel_opened(lab)?.saturating_sub(z_before);
    let e_seen =
        envoy_stat(lab, &e_client, "cluster.hbone.upstream_rq_total")?.saturating_sub(e_before);
    let e_tls = envoy_stat(lab, &e_client, "cluster.hbone.ssl.handshake")?;
    if z_seen < held || e_seen < held || e_tls == 0 {
        return Err(format!(
            "the proxies did not carry the load: ztunnels opened {z_seen}, Envoy {e_seen} CONNECT streams over {e_tls} TLS handshakes, expected at least {held}"
        )
        .into());
    }
    eprintln!(
        "l4: ztunnels opened {z_seen} measured connections; Envoy tunnelled {e_seen} over {e_tls} TLS connections"
    );
    Ok(())
}
