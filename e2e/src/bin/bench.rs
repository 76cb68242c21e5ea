//! `just bench`: measures the mesh. Three scenarios, run one after the
//! other (`--scenario` picks one): the controller at scale, the L7 path, and
//! the L4 data paths.
//!
//! Controller scenario: istiod-lite (the binary) reads a folder holding N
//! pods, S services and P policies; C proxy clients connect over real
//! gRPC/TLS at once. Reported: time until every client holds every resource
//! (first full push), time for one pod change to reach every client, and the
//! controller's RSS (after the push, at the end, and its peak). Each figure
//! is the median of `--runs` runs with min and max. The clients are thin
//! Delta ADS clients (they ACK, count, and decode only names and versions)
//! so the figures are the controller's, not the clients' decoding.
//! `--controller-large` is 50 000 pods, 10 000 services and 500 proxies.
//! `--controller-source kube` loads the same objects into a real API server
//! instead and runs istiod-lite with its Kubernetes source (see
//! [`controller_kube`]).
//!
//! L7 scenario: a two-node lab; HTTP/1.1 keep-alive requests from a client
//! pod on node-1 to an http-echo pod on node-2, directly (ztunnel to
//! ztunnel), through our waypoint, and through Envoy in the waypoint's
//! place, measured in the same run; then gRPC streams and a WebSocket on
//! the same three paths. See [`l7`] and [`l7stream`].
//!
//! L4 scenario: a two-node lab; TCP from a client pod to a server pod on the
//! other node and on the same node, plain, through our ztunnels, and through
//! an Envoy sidecar pair, with iperf3, sockperf, wrk and `labapp hold`. See
//! [`l4`].

use std::path::PathBuf;

use clap::Parser;

type Error = Box<dyn std::error::Error + Send + Sync>;

// In files of their own under bench/: a crate root looks for modules beside
// it, and every `.rs` beside it is a binary of its own.
#[path = "bench/common.rs"]
mod common;
#[path = "bench/controller.rs"]
mod controller;
#[path = "bench/controller_kube.rs"]
mod controller_kube;
#[path = "bench/kube_load.rs"]
mod kube_load;
#[path = "bench/kube_plane.rs"]
mod kube_plane;
#[path = "bench/l4.rs"]
mod l4;
#[path = "bench/l7.rs"]
mod l7;
#[path = "bench/l7stream.rs"]
mod l7stream;

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
    /// The controller at the scale beyond one cluster's usual: 50 000
    /// pods, 10 000 services, 500 proxies (overrides those three).
    #[arg(long)]
    controller_large: bool,
    /// Where the controller scenario's objects come from: a folder of YAML,
    /// or a real API server (etcd and kube-apiserver on loopback, started
    /// by the bench with ../shared/kube/control-plane) they are loaded into.
    #[arg(long, value_enum, default_value_t = ControllerSource::Folder)]
    controller_source: ControllerSource,
    /// The API server's port (`--controller-source kube`); etcd takes this
    /// plus 10 000 and 10 001. Not the cluster suite's.
    #[arg(long, default_value_t = 16_643)]
    kube_port: u16,
    /// The control-plane script (`--controller-source kube`; default:
    /// $MESH_CONTROL_PLANE, else ../shared/kube/control-plane).
    #[arg(long)]
    kube_plane: Option<PathBuf>,
    /// How long istiod-lite's Kubernetes source batches events into one
    /// push (its `--poll-ms`; the folder's poll is 50 ms).
    #[arg(long, default_value_t = 50)]
    kube_batch_ms: u64,
    /// Requests to the API server in flight at once while loading.
    #[arg(long, default_value_t = 32)]
    kube_concurrency: usize,
    /// The istiod-lite binary the controller scenario measures (default:
    /// the one beside this binary).
    #[arg(long)]
    istiod_lite: Option<PathBuf>,
    /// Requests per L7 run at each concurrency (kept-alive connections).
    #[arg(long, default_value_t = 40_000)]
    l7_requests: usize,
    /// Concurrencies of the L7 runs; with 1 connection a run sends a fifth
    /// of `--l7-requests` (each waits for the one before).
    #[arg(long, value_delimiter = ',', default_values_t = [16, 1])]
    l7_concurrency: Vec<usize>,
    /// Messages per L7 stream run (gRPC bidirectional, WebSocket; a
    /// hundred times as many for gRPC client streaming).
    #[arg(long, default_value_t = 10_000)]
    stream_messages: u32,
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

/// Where the controller scenario's objects come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ControllerSource {
    Folder,
    Kube,
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

#[tokio::main]
async fn main() {
    let mut a = Args::parse();
    if a.controller_large {
        (a.pods, a.services, a.proxies) = (50_000, 10_000, 500);
    }
    if a.smoke {
        (a.pods, a.services, a.policies, a.proxies, a.runs) = (50, 10, 5, 5, 1);
        (a.l7_requests, a.l7_concurrency) = (200, vec![16]);
        a.stream_messages = 100;
    }
    mesh_core::tls::install_default_provider();
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
            Scenario::Controller => controller::run(&a, &machine).await,
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
