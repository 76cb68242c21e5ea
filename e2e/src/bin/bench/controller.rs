//! The controller scenario: istiod-lite (the binary) reads a folder holding
//! N pods, S services and P policies; C thin Delta ADS clients connect over
//! real gRPC/TLS at once (see the crate's documentation).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use mesh_proto::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use mesh_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use tokio::sync::{Mutex, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use crate::common::{stats, status_mib};
use crate::{Args, Error};

struct Controller {
    child: Child,
    grpc: SocketAddr,
    /// Its debug endpoint (loopback: no token needed).
    debug: SocketAddr,
    root: String,
}

impl Controller {
    /// When the controller handed its last change to the proxies' hub
    /// (after the folder source saw it), from its debug page; None from a
    /// build that does not say.
    async fn last_push(&self) -> Result<Option<SystemTime>, Error> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(self.debug).await?;
        s.write_all(b"GET /debug/connections HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            .await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        let text = String::from_utf8_lossy(&out);
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        let v: serde_json::Value = serde_json::from_str(body)?;
        Ok(v["last_push_unix_us"]
            .as_u64()
            .map(|us| SystemTime::UNIX_EPOCH + Duration::from_micros(us)))
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

async fn start_controller(
    dir: &Path,
    proxies: usize,
    bin: Option<&Path>,
) -> Result<Controller, Error> {
    let tokens: String = (0..proxies)
        .map(|i| format!("node-{i}: bench-token-for-node-{i}-000000\n"))
        .collect();
    std::fs::write(dir.join("tokens.yaml"), tokens)?;
    let grpc: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let debug: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let data = dir.join("data");
    std::fs::create_dir_all(&data)?;
    let bin = bin.map_or_else(|| sibling("istiod-lite"), Path::to_path_buf);
    let child = Command::new(bin)
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
            &debug.to_string(),
            "--poll-ms",
            "50",
        ])
        .env("RUST_LOG", "warn")
        .spawn()?;
    let mut c = Controller {
        child,
        grpc,
        debug,
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

/// The part of a `DeltaDiscoveryResponse` the bench reads: each resource's
/// name and version, not its payload (which is skipped undecoded), so the
/// clients' cost stays out of the controller's figures.
#[derive(Clone, PartialEq, prost::Message)]
struct ThinResponse {
    #[prost(message, repeated, tag = "2")]
    resources: Vec<ThinResource>,
    #[prost(string, tag = "4")]
    type_url: String,
    #[prost(string, tag = "5")]
    nonce: String,
    #[prost(string, repeated, tag = "6")]
    removed_resources: Vec<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ThinResource {
    #[prost(string, tag = "1")]
    version: String,
    #[prost(string, tag = "3")]
    name: String,
}

/// A thin Delta ADS client: subscribes to both types, ACKs, counts the
/// resources it is sent and keeps the version of one (`watched`).
struct Client {
    /// The watched resource's version, and when it arrived.
    watched: Arc<Mutex<Option<(String, SystemTime)>>>,
}

const DELTA_METHOD: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

async fn connect(
    c: &Controller,
    node: usize,
    total_seen: Arc<AtomicUsize>,
    watched_name: &'static str,
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
    let mut grpc = tonic::client::Grpc::new(ch).max_decoding_message_size(1024 * 1024 * 1024);
    grpc.ready().await?;
    let codec = tonic_prost::ProstCodec::<DeltaDiscoveryRequest, ThinResponse>::default();
    let mut stream = grpc
        .streaming(
            req,
            http::uri::PathAndQuery::from_static(DELTA_METHOD),
            codec,
        )
        .await?
        .into_inner();
    let watched = Arc::new(Mutex::new(None));
    let w = watched.clone();
    tokio::spawn(async move {
        while let Ok(Some(resp)) = stream.message().await {
            // The config does not change during the first push: no
            // resource is sent twice before every client holds all.
            total_seen.fetch_add(resp.resources.len(), Ordering::Relaxed);
            if let Some(r) = resp.resources.iter().find(|r| r.name == watched_name) {
                *w.lock().await = Some((r.version.clone(), SystemTime::now()));
            }
            if resp.removed_resources.iter().any(|n| n == watched_name) {
                *w.lock().await = None;
            }
            let _ = tx
                .send(DeltaDiscoveryRequest {
                    type_url: resp.type_url,
                    response_nonce: resp.nonce,
                    ..Default::default()
                })
                .await;
        }
    });
    Ok(Client { watched })
}

struct Run {
    first_push: Duration,
    change: Duration,
    /// From the hub taking the change to the last client (None: the
    /// build does not say when).
    observed: Option<Duration>,
    /// Right after the first push.
    rss_push_mib: f64,
    /// After the pod change.
    rss_mib: f64,
    /// The most it held (VmHWM).
    peak_mib: f64,
}

async fn run_once(a: &Args) -> Result<Run, Error> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("config");
    std::fs::create_dir(&config)?;
    write_config(&config, a)?;
    let c = start_controller(dir.path(), a.proxies, a.istiod_lite.as_deref()).await?;
    let expected = a.pods + a.services + a.policies;

    // The pod the change below moves.
    const NAME: &str = "Kubernetes//Pod/ns-0/pod-0";
    let seen = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut clients = Vec::with_capacity(a.proxies);
    for i in 0..a.proxies {
        clients.push(connect(&c, i, seen.clone(), NAME).await?);
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
    let rss_push_mib = status_mib(c.child.id(), "VmRSS");

    // One pod moves to a new IP: time until every client holds the new version.
    let mut before = Vec::new();
    for cl in &clients {
        before.push(cl.watched.lock().await.clone().map(|w| w.0));
    }
    let t1 = Instant::now();
    write_pod(&config, a, 0, 1)?;
    let deadline = t1 + Duration::from_secs(60);
    'wait: loop {
        if Instant::now() > deadline {
            return Err("the pod change did not reach every client".into());
        }
        for (cl, old) in clients.iter().zip(&before) {
            if cl.watched.lock().await.as_ref().map(|w| &w.0) == old.as_ref() {
                tokio::time::sleep(Duration::from_millis(2)).await;
                continue 'wait;
            }
        }
        break;
    }
    let change = t1.elapsed();
    // From the controller's hub taking the change (the folder's poll and
    // scan done) to the last client holding it.
    let mut last = SystemTime::UNIX_EPOCH;
    for cl in &clients {
        if let Some((_, at)) = *cl.watched.lock().await {
            last = last.max(at);
        }
    }
    let observed = c
        .last_push()
        .await?
        .and_then(|p| last.duration_since(p).ok());
    Ok(Run {
        first_push,
        change,
        observed,
        rss_push_mib,
        rss_mib: status_mib(c.child.id(), "VmRSS"),
        peak_mib: status_mib(c.child.id(), "VmHWM"),
    })
}

/// The controller scenario: runs, then its table; its JSON object.
pub(crate) async fn run(a: &Args, machine: &str) -> Result<serde_json::Value, Error> {
    let mut runs = Vec::new();
    for i in 0..a.runs {
        let r = run_once(a).await?;
        eprintln!(
            "run {}: first push {:.0} ms, change {:.1} ms (from the hub {}), RSS {:.1} MiB after the push, {:.1} MiB at the end, peak {:.1} MiB",
            i + 1,
            r.first_push.as_secs_f64() * 1e3,
            r.change.as_secs_f64() * 1e3,
            r.observed
                .map_or("?".into(), |d| format!("{:.1} ms", d.as_secs_f64() * 1e3)),
            r.rss_push_mib,
            r.rss_mib,
            r.peak_mib
        );
        runs.push(r);
    }
    let fp = stats(
        runs.iter()
            .map(|r| r.first_push.as_secs_f64() * 1e3)
            .collect(),
    );
    let ch = stats(runs.iter().map(|r| r.change.as_secs_f64() * 1e3).collect());
    let obs: Vec<f64> = runs
        .iter()
        .filter_map(|r| r.observed.map(|d| d.as_secs_f64() * 1e3))
        .collect();
    let obs = (!obs.is_empty()).then(|| stats(obs));
    let rss = stats(runs.iter().map(|r| r.rss_mib).collect());
    let rss_push = stats(runs.iter().map(|r| r.rss_push_mib).collect());
    let peak = stats(runs.iter().map(|r| r.peak_mib).collect());
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
    if let Some(o) = obs {
        println!(
            "| one pod change, from the controller taking it to all proxies (ms) | {:.1} | {:.1} | {:.1} |",
            o.0, o.1, o.2
        );
    }
    println!(
        "| controller RSS after the first push (MiB) | {:.1} | {:.1} | {:.1} |",
        rss_push.0, rss_push.1, rss_push.2
    );
    println!(
        "| controller RSS at the end (MiB) | {:.1} | {:.1} | {:.1} |",
        rss.0, rss.1, rss.2
    );
    println!(
        "| controller peak RSS (MiB) | {:.1} | {:.1} | {:.1} |",
        peak.0, peak.1, peak.2
    );
    Ok(serde_json::json!({
        "pods": a.pods, "services": a.services, "policies": a.policies, "proxies": a.proxies, "runs": a.runs,
        "first_push_ms": {"median": fp.0, "min": fp.1, "max": fp.2},
        "pod_change_ms": {"median": ch.0, "min": ch.1, "max": ch.2},
        "pod_change_from_hub_ms": obs.map(|o| serde_json::json!({"median": o.0, "min": o.1, "max": o.2})),
        "rss_mib": {"median": rss.0, "min": rss.1, "max": rss.2},
        "rss_after_push_mib": {"median": rss_push.0, "min": rss_push.1, "max": rss_push.2},
        "peak_rss_mib": {"median": peak.0, "min": peak.1, "max": peak.2},
    }))
}
