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
use std::time::{Duration, Instant};

use e2e::ca::TRUST_DOMAIN;
use e2e::envoy::{
    ENVOY_PACKAGE, envoy_binary, sidecar_capture_rules, sidecar_inbound_config,
    sidecar_outbound_config, write_cert,
};
use e2e::lab::{BENCH_IDS, Down, Lab, parse_docs, ztunnel_extra_from_env};
use e2e::mesh::binary;
use serde_json::{Value, json};
use ztunnel::identity::Identity;

use super::l7::{
    alive, cell, clock_ticks_per_second, cpu_ticks, envoy_admin, get, load_cpu, stat_json,
    status_mib,
};
use super::{Args, Error, stats};

const IPERF_PORT: u16 = 5201;
const SOCKPERF_PORT: u16 = 11111;
const HTTP_PORT: u16 = 8081;
const ECHO_PORT: u16 = 9000;
const SERVER_PORTS: [u16; 4] = [IPERF_PORT, SOCKPERF_PORT, HTTP_PORT, ECHO_PORT];
/// Connections at a time in scenario 5.
const NEW_CONN_CONCURRENCY: usize = 8;
/// The tools every run needs, and the Debian package of each: `taskset`
/// pins the load, `nft` installs the sidecar's capture, `curl` reads
/// Envoy's admin.
const TOOLS: [(&str, &str); 3] = [
    ("taskset", "util-linux"),
    ("nft", "nftables"),
    ("curl", "curl"),
];

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

/// `name` is an executable on PATH.
fn on_path(name: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|d| {
            std::fs::metadata(d.join(name)).is_ok_and(|m| {
                use std::os::unix::fs::PermissionsExt;
                m.is_file() && m.permissions().mode() & 0o111 != 0
            })
        })
    })
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

/// The tools the chosen tests need are installed.
fn check_tools(tests: &[Test]) -> Result<(), Error> {
    let mut need: Vec<(&str, &str)> = TOOLS.to_vec();
    for t in tests.iter().map(|t| t.tool()).filter(|t| *t != "labapp") {
        if !need.iter().any(|(n, _)| *n == t) {
            need.push((t, t));
        }
    }
    let missing: Vec<&str> = need
        .iter()
        .filter(|(t, _)| !on_path(t))
        .map(|(_, p)| *p)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "missing tools; install them with: apt-get install {} (`just bench` does)",
            missing.join(" ")
        )
        .into())
    }
}

/// Runs a command in a pod, bounded by `limit` seconds, and returns its
/// stdout; fails with its stderr when it fails.
fn run_in(lab: &Lab, pod: &str, limit: u64, pinned: bool, cmd: &[&str]) -> Result<String, Error> {
    let limit = limit.to_string();
    let cpu = load_cpu().map(|c| c.to_string());
    let mut full: Vec<&str> = vec!["timeout", &limit];
    if let (true, Some(cpu)) = (pinned, &cpu) {
        full.extend(["taskset", "-c", cpu]);
    }
    full.extend(cmd);
    let out = lab.exec(pod, &full)?;
    if !out.status.success() {
        return Err(format!(
            "{} in {pod}: {}: {}{}",
            cmd.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .join(" | ")
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// The servers a test talks to, beside each server pod's static HTTP
/// server (its app): the name, the port and the command.
fn server_for(t: Test, ip: &str) -> (&'static str, u16, Vec<String>) {
    let cmd = |c: &[&str]| c.iter().map(|s| s.to_string()).collect();
    match t.tool() {
        "iperf3" => (
            "iperf3",
            IPERF_PORT,
            cmd(&["iperf3", "-s", "-p", &IPERF_PORT.to_string()]),
        ),
        "sockperf" => (
            "sockperf",
            SOCKPERF_PORT,
            cmd(&[
                "sockperf",
                "server",
                "--tcp",
                "-i",
                ip,
                "-p",
                &SOCKPERF_PORT.to_string(),
            ]),
        ),
        "labapp" => (
            "echo",
            ECHO_PORT,
            cmd(&[
                &binary("labapp").display().to_string(),
                "tcp-echo",
                "--port",
                &ECHO_PORT.to_string(),
            ]),
        ),
        _ => ("http", HTTP_PORT, vec![]),
    }
}

/// Starts the servers the tests need in every server pod (ended with the
/// lab), and waits until they and the pod's HTTP server listen.
async fn start_servers(lab: &mut Lab, tests: &[Test]) -> Result<(), Error> {
    let mut ports = vec![HTTP_PORT];
    for m in MESHES {
        for p in [Placement::Cross, Placement::Same] {
            let key = p.server(m);
            let ip = lab.pod(&key).ok_or("no server pod")?.ip.clone();
            let tag = key.replace('/', "-");
            let mut started = Vec::new();
            for &t in tests {
                let (name, port, cmd) = server_for(t, &ip);
                if cmd.is_empty() || started.contains(&name) {
                    continue;
                }
                started.push(name);
                if !ports.contains(&port) {
                    ports.push(port);
                }
                lab.spawn_in_pod(&key, &format!("pod-{tag}-{name}.log"), &[], &cmd)?;
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for m in MESHES {
        for p in [Placement::Cross, Placement::Same] {
            let key = p.server(m);
            loop {
                let ss = run_in(lab, &key, 10, false, &["ss", "-Hltn"])?;
                let listening: Vec<u16> = ss
                    .lines()
                    .filter_map(|l| {
                        l.split_whitespace()
                            .nth(3)?
                            .rsplit(':')
                            .next()?
                            .parse()
                            .ok()
                    })
                    .collect();
                if ports.iter().all(|p| listening.contains(p)) {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(format!("{key}: servers not listening on {ports:?}: {ss}").into());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    Ok(())
}

/// The Envoy sidecars: an outbound one in the envoy path's client pod (with
/// the capture rules) and an inbound one in each of its server pods, with
/// certificates from the lab's CA for the pods' identities. Returns their
/// pids by pod key.
async fn start_envoys(lab: &mut Lab, workers: usize) -> Result<BTreeMap<String, u32>, Error> {
    let m = Mesh::Envoy;
    let id = |sa: &str| Identity::new(TRUST_DOMAIN, m.ns(), sa).map_err(|e| e.to_string());
    let (client_id, server_id) = (id("client")?, id("server")?);
    let mut certs = e2e::ca::from_lab_ca(&lab.dir, &[client_id.clone(), server_id.clone()])
        .await?
        .into_iter();
    let (Some(client_cert), Some(server_cert)) = (certs.next(), certs.next()) else {
        return Err("the lab's CA issued fewer certificates than asked".into());
    };
    let dir = lab.dir.join("envoy-l4");
    std::fs::create_dir_all(&dir)?;
    let (cc, ck, cr) = write_cert(&dir, "client", &client_cert);
    let (sc, sk, sr) = write_cert(&dir, "server", &server_cert);
    let admin = "127.0.0.1:15000".parse()?;
    let workers = workers.to_string();

    let mut configs = Vec::new();
    let ckey = m.client();
    let cip = lab.pod(&ckey).ok_or("no client pod")?.ip.parse()?;
    configs.push((
        ckey.clone(),
        sidecar_outbound_config(admin, cip, (&cc, &ck, &cr), server_id.as_str()),
    ));
    for p in [Placement::Cross, Placement::Same] {
        let key = p.server(m);
        let ip = lab.pod(&key).ok_or("no server pod")?.ip.parse()?;
        configs.push((
            key,
            sidecar_inbound_config(
                admin,
                ip,
                &SERVER_PORTS,
                (&sc, &sk, &sr),
                &format!("spiffe://{TRUST_DOMAIN}/"),
            ),
        ));
    }
    let mut pids = BTreeMap::new();
    for (key, config) in configs {
        let tag = key.replace('/', "-");
        let cfg = dir.join(format!("{tag}.yaml"));
        std::fs::write(&cfg, config)?;
        let log = format!("pod-{tag}-envoy.log");
        let cmd: Vec<String> = vec![
            envoy_binary().display().to_string(),
            "-c".into(),
            cfg.display().to_string(),
            "--disable-hot-restart".into(),
            "--concurrency".into(),
            workers.clone(),
            "-l".into(),
            "warning".into(),
        ];
        let pid = lab.spawn_in_pod(&key, &log, &[], &cmd)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if !alive(pid) {
                let text =
                    std::fs::read_to_string(lab.dir.join("logs").join(&log)).unwrap_or_default();
                return Err(format!("envoy in {key} exited:\n{text}").into());
            }
            let r = envoy_admin(lab, &key, "/ready");
            if r.as_ref().is_ok_and(|b| b.contains("LIVE")) {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("envoy in {key} did not become ready: {r:?}").into());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        pids.insert(key, pid);
    }
    // Capture only once the outbound listener is up.
    let rules = dir.join("capture.nft");
    std::fs::write(&rules, sidecar_capture_rules())?;
    run_in(
        lab,
        &ckey,
        10,
        false,
        &["nft", "-f", &rules.display().to_string()],
    )?;
    Ok(pids)
}

/// Waits until the client reaches the server's HTTP port over each path.
async fn paths_ready(lab: &Lab, placements: &[Placement]) -> Result<(), Error> {
    for &p in placements {
        for m in MESHES {
            let ip = lab.pod(&p.server(m)).ok_or("no server pod")?.ip.clone();
            let url = format!("http://{ip}:{HTTP_PORT}/");
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let r = get(lab, &m.client(), &url);
                if r.as_ref().is_ok_and(|b| b.starts_with("200")) {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "{} {}: {url} not answering after 60 s: {r:?}",
                        p.name(),
                        m.name()
                    )
                    .into());
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
    Ok(())
}

/// Connections the ztunnels opened to pods of the ztunnel path's
/// namespace (reporter destination), from both ztunnels' metrics.
fn ztunnel_opened(lab: &Lab) -> Result<u64, Error> {
    let labapp = binary("labapp").display().to_string();
    let want = format!("destination_workload_namespace=\"{}\"", Mesh::Ztunnel.ns());
    let mut total = 0.0;
    for n in &lab.state.nodes {
        let url = format!("http://{}:15020/metrics", n.ip);
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &n.netns, "timeout", "20", &labapp, "get"])
            .arg(&url)
            .output()?;
        if !out.status.success() {
            return Err(format!("metrics of {}: {}", n.name, out.status).into());
        }
        total += String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("istio_tcp_connections_opened_total{"))
            .filter(|l| l.contains("reporter=\"destination\"") && l.contains(&want))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
    }
    Ok(total as u64)
}

/// One of Envoy's counters, from its admin.
fn envoy_stat(lab: &Lab, pod: &str, stat: &str) -> Result<u64, Error> {
    let body = envoy_admin(lab, pod, &format!("/stats?filter=^{stat}$"))?;
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{stat}: ")))
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| format!("no {stat} in Envoy's stats in {pod}: {body}").into())
}

/// `iperf3 -J`: bits per second and bytes, as the receiver counted them.
fn iperf(
    c: &Ctx<'_>,
    m: Mesh,
    p: Placement,
    streams: usize,
    reverse: bool,
) -> Result<(f64, f64), Error> {
    let ip = c.ip(&p.server(m))?;
    let (t, port, par) = (
        c.secs.to_string(),
        IPERF_PORT.to_string(),
        streams.to_string(),
    );
    let mut cmd = vec![
        "iperf3",
        "-c",
        &ip,
        "-p",
        &port,
        "-t",
        &t,
        "-P",
        &par,
        "-J",
        "--connect-timeout",
        "5000",
    ];
    if reverse {
        cmd.push("-R");
    }
    let out = run_in(c.lab, &m.client(), c.secs + 30, true, &cmd)?;
    let v: Value =
        serde_json::from_str(&out).map_err(|e| format!("iperf3 output: {e}: {}", out.trim()))?;
    if let Some(e) = v["error"].as_str() {
        return Err(format!("iperf3 {} {}: {e}", p.name(), m.name()).into());
    }
    let r = &v["end"]["sum_received"];
    match (r["bits_per_second"].as_f64(), r["bytes"].as_f64()) {
        (Some(bps), Some(bytes)) if bytes > 0.0 => Ok((bps, bytes)),
        _ => Err(format!("iperf3 {} {}: nothing received", p.name(), m.name()).into()),
    }
}

/// sockperf ping-pong, 64-byte messages: RTT p50, p99, p99.9 in µs.
fn sockperf(c: &Ctx<'_>, m: Mesh, p: Placement) -> Result<(f64, f64, f64), Error> {
    let ip = c.ip(&p.server(m))?;
    let (t, port) = (c.secs.to_string(), SOCKPERF_PORT.to_string());
    let cmd = [
        "sockperf",
        "ping-pong",
        "--tcp",
        "-i",
        &ip,
        "-p",
        &port,
        "-m",
        "64",
        "-t",
        &t,
        "--full-rtt",
    ];
    let out = run_in(c.lab, &m.client(), c.secs + 30, true, &cmd)?;
    let pct = |which: &str| -> Result<f64, Error> {
        out.lines()
            .find(|l| l.contains(&format!("percentile {which} =")))
            .and_then(|l| l.rsplit('=').next()?.trim().parse().ok())
            .ok_or_else(|| format!("no percentile {which} in sockperf's output: {out}").into())
    };
    Ok((pct("50.000")?, pct("99.000")?, pct("99.900")?))
}

/// What wrk reports.
#[derive(Debug, Default)]
struct Wrk {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    requests: u64,
    errors: u64,
}

/// A wrk duration ("388.00us", "1.23ms", "1.00s") in ms.
fn wrk_ms(s: &str) -> Option<f64> {
    let (n, scale) = if let Some(n) = s.strip_suffix("us") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60e3)
    } else {
        return None;
    };
    n.parse::<f64>().ok().map(|v| v * scale)
}

fn parse_wrk(out: &str) -> Result<Wrk, Error> {
    let mut w = Wrk::default();
    let (mut p50, mut p99, mut rps) = (None, None, None);
    for l in out.lines().map(str::trim) {
        let mut words = l.split_whitespace();
        match words.next() {
            Some("50%") => p50 = words.next().and_then(wrk_ms),
            Some("99%") => p99 = words.next().and_then(wrk_ms),
            Some("Requests/sec:") => rps = words.next().and_then(|v| v.parse().ok()),
            Some("Socket") => {
                // "Socket errors: connect 0, read 0, write 0, timeout 0"
                w.errors += l
                    .split(|c: char| !c.is_ascii_digit())
                    .filter_map(|n| n.parse::<u64>().ok())
                    .sum::<u64>();
            }
            Some("Non-2xx") => {
                w.errors += l
                    .rsplit(' ')
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0);
            }
            Some(n) if l.contains(" requests in ") => w.requests = n.parse().unwrap_or(0),
            _ => {}
        }
    }
    match (p50, p99, rps) {
        (Some(a), Some(b), Some(r)) if w.requests > 0 => {
            (w.p50_ms, w.p99_ms, w.rps) = (a, b, r);
            Ok(w)
        }
        _ => Err(format!("wrk answered nothing usable: {out}").into()),
    }
}

/// wrk against the static server: `conns` connections, kept alive or a new
/// one per request.
fn wrk(c: &Ctx<'_>, m: Mesh, p: Placement, conns: usize, close: bool) -> Result<Wrk, Error> {
    let ip = c.ip(&p.server(m))?;
    let url = format!("http://{ip}:{HTTP_PORT}/");
    let (d, n) = (format!("{}s", c.secs), conns.to_string());
    let mut cmd = vec![
        "wrk",
        "-t1",
        "-c",
        &n,
        "-d",
        &d,
        "--latency",
        "--timeout",
        "5s",
    ];
    if close {
        cmd.extend(["-H", "Connection: close"]);
    }
    cmd.push(&url);
    let out = run_in(c.lab, &m.client(), c.secs + 30, true, &cmd)?;
    let w = parse_wrk(&out)?;
    // A closed connection may cost wrk a read error now and then; more
    // than 1% means the path is broken, not slow.
    if w.errors * 100 > w.requests {
        return Err(format!(
            "wrk {} {} ({conns} conns, close {close}): {} errors in {} requests:\n{out}",
            p.name(),
            m.name(),
            w.errors,
            w.requests
        )
        .into());
    }
    Ok(w)
}

/// `labapp hold`'s summary.
#[derive(Debug, serde::Deserialize)]
struct Held {
    opened: usize,
    connect_errors: usize,
    pings: usize,
    ping_errors: usize,
    first_error: Option<String>,
}

/// Scenario 6: holds the connections while sampling each proxy's RSS; the
/// largest per proxy (MiB), total and anonymous.
fn hold(c: &Ctx<'_>, m: Mesh, p: Placement) -> Result<Vec<(f64, f64)>, Error> {
    let ip = c.ip(&p.server(m))?;
    let addr = format!("{ip}:{ECHO_PORT}");
    let labapp = binary("labapp").display().to_string();
    let (n, secs) = (c.connections.to_string(), c.hold_secs.to_string());
    let pids: Vec<u32> = c.proxies(m, p).iter().map(|x| x.pid).collect();
    let client = m.client();
    let cmd = [
        labapp.as_str(),
        "hold",
        &addr,
        "--connections",
        &n,
        "--seconds",
        &secs,
    ];
    let (out, peak) = std::thread::scope(|sc| {
        let h = sc.spawn(|| run_in(c.lab, &client, c.hold_secs + 60, true, &cmd));
        let mut peak = vec![(0.0f64, 0.0f64); pids.len()];
        while !h.is_finished() {
            for (i, pid) in pids.iter().enumerate() {
                peak[i].0 = peak[i].0.max(status_mib(*pid, "VmRSS:"));
                peak[i].1 = peak[i].1.max(status_mib(*pid, "RssAnon:"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        (h.join(), peak)
    });
    let out = out.map_err(|_| "the hold thread panicked")??;
    let h: Held =
        serde_json::from_str(&out).map_err(|e| format!("labapp hold: {e}: {}", out.trim()))?;
    if h.opened != c.connections || h.connect_errors > 0 || h.ping_errors > 0 || h.pings == 0 {
        return Err(format!(
            "hold {} {}: {} of {} connections, {} pings, {} ping errors ({:?})",
            p.name(),
            m.name(),
            h.opened,
            c.connections,
            h.pings,
            h.ping_errors,
            h.first_error
        )
        .into());
    }
    Ok(peak)
}

/// Runs one test on one path and records its figures in `s`.
fn measure(c: &Ctx<'_>, t: Test, m: Mesh, p: Placement, s: &mut Sample) -> Result<(), Error> {
    let proxies = c.proxies(m, p);
    let before: Vec<u64> = proxies.iter().map(|x| cpu_ticks(x.pid)).collect();
    let cpu = |before: &[u64]| -> Vec<f64> {
        proxies
            .iter()
            .zip(before)
            .map(|(x, b)| cpu_ticks(x.pid).saturating_sub(*b) as f64 / c.tck)
            .collect()
    };
    let log = |what: String| eprintln!("l4: {:>10} {:>7} {what}", p.name(), m.name());
    match t {
        Test::OneStreamUp => {
            let (bps, bytes) = iperf(c, m, p, 1, false)?;
            let gb = bytes / 1e9;
            for (i, secs) in cpu(&before).into_iter().enumerate() {
                s.cpu_per_gb.insert(i, secs / gb);
            }
            s.figures.insert("s1_up_gbps", bps / 1e9);
            log(format!("1 stream up    {:.2} Gbit/s", bps / 1e9));
        }
        Test::OneStreamDown => {
            let (bps, _) = iperf(c, m, p, 1, true)?;
            s.figures.insert("s1_down_gbps", bps / 1e9);
            log(format!("1 stream down  {:.2} Gbit/s", bps / 1e9));
        }
        Test::EightStreams => {
            let (bps, _) = iperf(c, m, p, 8, false)?;
            s.figures.insert("s2_gbps", bps / 1e9);
            log(format!("8 streams up   {:.2} Gbit/s", bps / 1e9));
        }
        Test::PingPong => {
            let (p50, p99, p999) = sockperf(c, m, p)?;
            s.figures.insert("s3_p50_us", p50);
            s.figures.insert("s3_p99_us", p99);
            s.figures.insert("s3_p999_us", p999);
            log(format!(
                "ping-pong      p50 {p50:.1} µs  p99 {p99:.1} µs  p99.9 {p999:.1} µs"
            ));
        }
        Test::Http1 => {
            let w = wrk(c, m, p, 1, false)?;
            s.figures.insert("s4_c1_rps", w.rps);
            s.figures.insert("s4_c1_p50_ms", w.p50_ms);
            s.figures.insert("s4_c1_p99_ms", w.p99_ms);
            log(format!(
                "http c=1       {:.0} req/s  p50 {:.3} ms  p99 {:.3} ms",
                w.rps, w.p50_ms, w.p99_ms
            ));
        }
        Test::Http32 => {
            let w = wrk(c, m, p, 32, false)?;
            for (i, secs) in cpu(&before).into_iter().enumerate() {
                s.cpu_per_1000.insert(i, secs / w.requests as f64 * 1000.0);
            }
            s.figures.insert("s4_c32_rps", w.rps);
            s.figures.insert("s4_c32_p50_ms", w.p50_ms);
            s.figures.insert("s4_c32_p99_ms", w.p99_ms);
            log(format!(
                "http c=32      {:.0} req/s  p50 {:.3} ms  p99 {:.3} ms",
                w.rps, w.p50_ms, w.p99_ms
            ));
        }
        Test::NewConnections => {
            let w = wrk(c, m, p, NEW_CONN_CONCURRENCY, true)?;
            s.figures.insert("s5_cps", w.rps);
            s.figures.insert("s5_p50_ms", w.p50_ms);
            s.figures.insert("s5_p99_ms", w.p99_ms);
            log(format!(
                "new conn       {:.0} conn/s  p50 {:.3} ms  p99 {:.3} ms",
                w.rps, w.p50_ms, w.p99_ms
            ));
        }
        Test::Hold => {
            let peak = hold(c, m, p)?;
            for (i, (total, anon)) in peak.iter().enumerate() {
                s.rss_held.insert(i, *total);
                s.anon_held.insert(i, *anon);
            }
            log(format!(
                "{} conns held: proxy RSS (anon) {} MiB",
                c.connections,
                peak.iter()
                    .map(|(t, a)| format!("{t:.1} ({a:.1})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    Ok(())
}

/// One proxy's figures the goals are judged on (medians, MiB and CPU s).
#[derive(Debug, Clone, Copy)]
struct ProxyMedians {
    idle: f64,
    held: Option<f64>,
    cpu_per_gb: Option<f64>,
}

/// Median (min, max) of a list, or None when it is empty.
fn stats_of(v: Vec<f64>) -> Option<(f64, f64, f64)> {
    (!v.is_empty()).then(|| stats(v))
}

/// 8 MB and 20 MB (the goals are in MB) in MiB.
const MB: f64 = 1e6 / (1024.0 * 1024.0);

pub async fn run(a: &Args, machine: &str) -> Result<Value, Error> {
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
    check_tools(&tests)?;
    let secs = if a.smoke { 1 } else { a.l4_seconds.max(1) };
    let dir = a.out_dir.join("lab-l4");
    std::fs::create_dir_all(&dir)?;
    let dir = std::fs::canonicalize(&dir)?;
    let mut guard = Down(Lab::create_in(&dir, BENCH_IDS, 2)?);
    let started = Instant::now();
    let lab = &mut guard.0;
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
    start_servers(lab, &tests).await?;
    let zcfg = ztunnel::config::Config::load_for_node(&lab.dir.join("node-1-ztunnel.yaml"), None)
        .map_err(|e| format!("the lab's ztunnel config: {e}"))?;
    // Each Envoy gets as many workers as each ztunnel's runtime has threads.
    let workers = zcfg.worker_threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    });
    let envoys = start_envoys(lab, workers).await?;
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
    let mut idle: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for &p in &placements {
        for m in MESHES {
            for x in c.proxies(m, p) {
                idle.insert(
                    x.name.clone(),
                    (status_mib(x.pid, "VmRSS:"), status_mib(x.pid, "RssAnon:")),
                );
            }
        }
    }
    let z_before = ztunnel_opened(lab)?;
    let e_client = Mesh::Envoy.client();
    let e_before = envoy_stat(lab, &e_client, "cluster.hbone.upstream_rq_total")?;

    let mut samples: BTreeMap<(Placement, Mesh), Vec<Sample>> = BTreeMap::new();
    for run in 0..a.runs {
        eprintln!("l4: run {} of {}", run + 1, a.runs);
        for &p in &placements {
            for &t in &tests {
                for m in MESHES {
                    let v = samples.entry((p, m)).or_default();
                    if v.len() <= run {
                        v.push(Sample::default());
                    }
                    measure(&c, t, m, p, &mut v[run])?;
                }
            }
        }
    }

    // The meshes really carried it: the ztunnels' destination side opened
    // connections for the ztunnel path's pods, at least the held ones, and
    // the Envoy sidecar opened CONNECT streams over TLS.
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
    // Peak: VmHWM, and the anonymous RSS now (the kernel keeps no peak of
    // that part alone).
    let mut peak: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for &p in &placements {
        for m in MESHES {
            for x in c.proxies(m, p) {
                peak.insert(
                    x.name.clone(),
                    (status_mib(x.pid, "VmHWM:"), status_mib(x.pid, "RssAnon:")),
                );
            }
        }
    }

    let pin = load_cpu()
        .map(|c| format!("load generator pinned to CPU {c}"))
        .unwrap_or_else(|| "load generator not pinned".into());
    println!(
        "\nL4: client pod (node-1) -> server pod (node-2 cross-node, node-1 same-node); {} runs of {secs} s per figure; {pin} ({machine})",
        a.runs
    );
    println!(
        "{} runtime threads per ztunnel ({}), --concurrency {} per Envoy. Each cell: median (min–max); x plain: the mesh's figure over plain's in the same run.",
        c.workers, c.runtime, c.workers
    );
    let mut paths_json = Vec::new();
    for &p in &placements {
        println!("\n{}:\n", p.name());
        if p == Placement::Same && c.fast_path {
            println!(
                "(ztunnel: one ztunnel serves both pods and hands each connection from its outbound side to its inbound side in memory: no tunnel, no TLS; `same_node_fast_path`)\n"
            );
        }
        println!(
            "| scenario | figure | plain | ztunnel | envoy | ztunnel x plain | envoy x plain |"
        );
        println!("| --- | --- | --- | --- | --- | --- | --- |");
        for f in figures() {
            let per = |m: Mesh| -> Vec<f64> {
                samples
                    .get(&(p, m))
                    .map(|v| {
                        v.iter()
                            .filter_map(|s| s.figures.get(f.key).copied())
                            .collect()
                    })
                    .unwrap_or_default()
            };
            let plain = per(Mesh::Plain);
            if plain.is_empty() {
                continue;
            }
            let ratio = |m: Mesh| {
                stats_of(
                    per(m)
                        .iter()
                        .zip(&plain)
                        .filter(|(_, b)| **b > 0.0)
                        .map(|(a, b)| a / b)
                        .collect(),
                )
            };
            let show = |s: Option<(f64, f64, f64)>, d: usize| {
                s.map(|s| cell(s, d)).unwrap_or_else(|| "-".into())
            };
            println!(
                "| {} | {} | {} | {} | {} | {} | {} |",
                f.scenario,
                f.unit,
                show(stats_of(plain.clone()), f.decimals),
                show(stats_of(per(Mesh::Ztunnel)), f.decimals),
                show(stats_of(per(Mesh::Envoy)), f.decimals),
                show(ratio(Mesh::Ztunnel), 2),
                show(ratio(Mesh::Envoy), 2),
            );
            for m in MESHES {
                paths_json.push(json!({
                    "placement": p.name(),
                    "path": m.name(),
                    "figure": f.key,
                    "scenario": f.scenario,
                    "unit": f.unit,
                    "higher_is_better": f.higher_is_better,
                    "runs": per(m),
                    "value": stats_of(per(m)).map(stat_json),
                    "ratio_to_plain": if m == Mesh::Plain { Value::Null } else { ratio(m).map(stat_json).into() },
                }));
            }
        }
    }

    println!(
        "\nPer proxy: RSS before any load, largest RSS while {} connections were open (scenario 6), peak RSS (VmHWM) after everything, each with its anonymous part (RssAnon: without the binary's mapped pages) in brackets; CPU seconds per GB in scenario 1 up, per 1 000 requests in scenario 4 at 32 connections (7).\n",
        a.l4_connections
    );
    println!(
        "| path | proxy | side | RSS idle MiB | RSS {} conns MiB | RSS peak MiB | CPU s / GB (1, up) | CPU s / 1000 req (4, 32 conns) |",
        a.l4_connections
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    let mut proxies_json = Vec::new();
    // Per path, per proxy, its medians: for the goals.
    let mut medians: BTreeMap<(Placement, Mesh), Vec<ProxyMedians>> = BTreeMap::new();
    for &p in &placements {
        for m in [Mesh::Ztunnel, Mesh::Envoy] {
            let Some(v) = samples.get(&(p, m)) else {
                continue;
            };
            for (i, x) in c.proxies(m, p).iter().enumerate() {
                let of = |f: fn(&Sample) -> &BTreeMap<usize, f64>| {
                    stats_of(v.iter().filter_map(|s| f(s).get(&i).copied()).collect())
                };
                let gb = of(|s| &s.cpu_per_gb);
                let k = of(|s| &s.cpu_per_1000);
                let held = of(|s| &s.rss_held);
                let held_anon = of(|s| &s.anon_held);
                let show = |s: Option<(f64, f64, f64)>, d| {
                    s.map(|s| cell(s, d)).unwrap_or_else(|| "-".into())
                };
                let (idle, idle_anon) = idle.get(&x.name).copied().unwrap_or_default();
                let (top, top_anon) = peak.get(&x.name).copied().unwrap_or_default();
                let held_cell = match (held, held_anon) {
                    (Some(h), Some(a)) => format!("{} [{:.1}]", cell(h, 1), a.0),
                    _ => "-".into(),
                };
                println!(
                    "| {} {} | {} | {} | {idle:.1} [{idle_anon:.1}] | {held_cell} | {top:.1} [{top_anon:.1}] | {} | {} |",
                    p.name(),
                    m.name(),
                    x.name,
                    x.side,
                    show(gb, 3),
                    show(k, 3),
                );
                medians.entry((p, m)).or_default().push(ProxyMedians {
                    idle,
                    held: held.map(|s| s.0),
                    cpu_per_gb: gb.map(|s| s.0),
                });
                proxies_json.push(json!({
                    "placement": p.name(),
                    "path": m.name(),
                    "proxy": x.name,
                    "side": x.side,
                    "rss_idle_mib": idle,
                    "rss_anon_idle_mib": idle_anon,
                    "rss_held_mib": held.map(stat_json),
                    "rss_anon_held_mib": held_anon.map(stat_json),
                    "rss_peak_mib": top,
                    "rss_anon_peak_mib": top_anon,
                    "cpu_s_per_gb_up": gb.map(stat_json),
                    "cpu_s_per_1000_requests": k.map(stat_json),
                }));
            }
        }
    }

    // The goals for the ztunnel path, against the medians.
    let mut goals = Vec::new();
    let ratio_median = |p: Placement, key: &str| -> Option<f64> {
        let z = samples.get(&(p, Mesh::Ztunnel))?;
        let plain = samples.get(&(p, Mesh::Plain))?;
        stats_of(
            z.iter()
                .zip(plain)
                .filter_map(|(a, b)| Some(a.figures.get(key)? / b.figures.get(key)?))
                .collect(),
        )
        .map(|s| s.0)
    };
    let median_of = |p: Placement, m: Mesh, key: &str| -> Option<f64> {
        stats_of(
            samples
                .get(&(p, m))?
                .iter()
                .filter_map(|s| s.figures.get(key).copied())
                .collect(),
        )
        .map(|s| s.0)
    };
    for &p in &placements {
        let mut goal = |name: String, value: Option<f64>, target: String, met: Option<bool>| {
            if let Some(v) = value {
                goals.push(json!({"placement": p.name(), "goal": name, "measured": v, "target": target, "met": met}));
            }
        };
        for (key, what, min) in [
            ("s1_up_gbps", "one stream (up) / plain", 0.5),
            ("s1_down_gbps", "one stream (down) / plain", 0.5),
            ("s4_c32_rps", "32-connection HTTP req/s / plain", 0.35),
            ("s5_cps", "new connections/s / plain", 0.40),
        ] {
            let r = ratio_median(p, key);
            goal(what.into(), r, format!(">= {min}"), r.map(|r| r >= min));
        }
        let added: Option<f64> = stats_of(
            samples
                .get(&(p, Mesh::Ztunnel))
                .zip(samples.get(&(p, Mesh::Plain)))
                .map(|(z, pl)| {
                    z.iter()
                        .zip(pl)
                        .filter_map(|(a, b)| {
                            Some(a.figures.get("s3_p50_us")? - b.figures.get("s3_p50_us")?)
                        })
                        .collect()
                })
                .unwrap_or_default(),
        )
        .map(|s| s.0);
        goal(
            "ping-pong p50 added over plain (µs)".into(),
            added,
            "< 35".into(),
            added.map(|a| a < 35.0),
        );
        let z = medians
            .get(&(p, Mesh::Ztunnel))
            .cloned()
            .unwrap_or_default();
        let e = medians.get(&(p, Mesh::Envoy)).cloned().unwrap_or_default();
        let max_of = |v: &[ProxyMedians], f: fn(&ProxyMedians) -> Option<f64>| {
            v.iter().filter_map(f).reduce(f64::max)
        };
        let idle_max = max_of(&z, |x| Some(x.idle));
        goal(
            "idle RSS per ztunnel (MiB)".into(),
            idle_max,
            format!("< 8 MB ({:.2} MiB)", 8.0 * MB),
            idle_max.map(|v| v < 8.0 * MB),
        );
        let held_max = max_of(&z, |x| x.held);
        goal(
            format!(
                "RSS per ztunnel with {} connections (MiB)",
                a.l4_connections
            ),
            held_max,
            format!("< 20 MB ({:.2} MiB)", 20.0 * MB),
            held_max.map(|v| v < 20.0 * MB),
        );
        // The encrypting side of scenario 1 up is the client side's proxy;
        // a same-node hand-over encrypts nothing.
        let enc = z.first().and_then(|x| x.cpu_per_gb);
        goal(
            if p == Placement::Same && c.fast_path {
                "CPU s / GB, ztunnel (scenario 1 up; same-node hand-over, no encryption)".into()
            } else {
                "CPU s / GB, encrypting ztunnel (scenario 1 up)".into()
            },
            enc,
            "< 0.5".into(),
            enc.map(|v| v < 0.5),
        );
        // ztunnel against Envoy: every figure, and memory per path.
        let mut worse = Vec::new();
        for f in figures() {
            if let (Some(zv), Some(ev)) = (
                median_of(p, Mesh::Ztunnel, f.key),
                median_of(p, Mesh::Envoy, f.key),
            ) && (if f.higher_is_better { zv < ev } else { zv > ev })
            {
                worse.push(format!("{} {}", f.scenario, f.unit));
            }
        }
        let sum = |v: &[ProxyMedians], f: fn(&ProxyMedians) -> Option<f64>| {
            v.iter().filter_map(f).sum::<f64>()
        };
        for (what, zv, ev) in [
            ("idle", sum(&z, |x| Some(x.idle)), sum(&e, |x| Some(x.idle))),
            ("held", sum(&z, |x| x.held), sum(&e, |x| x.held)),
        ] {
            if zv > 0.0 && ev > 0.0 && zv >= ev {
                worse.push(format!(
                    "RSS {what}: ztunnels {zv:.1} MiB, Envoys {ev:.1} MiB"
                ));
            }
        }
        let compared = figures().any(|f| median_of(p, Mesh::Envoy, f.key).is_some());
        if compared {
            goals.push(json!({
                "placement": p.name(),
                "goal": "ztunnel at least as good as Envoy in every figure, less memory",
                "measured": if worse.is_empty() { "yes".to_string() } else { format!("not in: {}", worse.join("; ")) },
                "target": "every figure",
                "met": worse.is_empty(),
            }));
        }
    }
    println!("\nGoals for the ztunnel path (medians; not asserted):\n");
    println!("| placement | goal | measured | target | met |");
    println!("| --- | --- | --- | --- | --- |");
    for g in &goals {
        let measured = match &g["measured"] {
            Value::Number(n) => format!("{:.2}", n.as_f64().unwrap_or(0.0)),
            v => v.as_str().unwrap_or_default().to_string(),
        };
        println!(
            "| {} | {} | {measured} | {} | {} |",
            g["placement"].as_str().unwrap_or_default(),
            g["goal"].as_str().unwrap_or_default(),
            g["target"].as_str().unwrap_or_default(),
            match g["met"].as_bool() {
                Some(true) => "yes",
                Some(false) => "no",
                None => "-",
            }
        );
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk() {
        let out = "Running 2s test @ http://10.107.2.10:8081/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.02ms  300.00us   5.00ms   90.00%
  Latency Distribution
     50%  388.00us
     75%  500.00us
     90%  800.00us
     99%    1.23ms
  12345 requests in 2.00s, 1.20MB read
  Socket errors: connect 0, read 3, write 0, timeout 1
Requests/sec:   6172.50
Transfer/sec:    600.00KB
";
        let w = parse_wrk(out).expect("parsed");
        assert_eq!(w.requests, 12345);
        assert_eq!(w.errors, 4);
        assert!((w.rps - 6172.5).abs() < 1e-9);
        assert!((w.p50_ms - 0.388).abs() < 1e-9);
        assert!((w.p99_ms - 1.23).abs() < 1e-9);
        assert_eq!(wrk_ms("1.50s"), Some(1500.0));
    }
}
