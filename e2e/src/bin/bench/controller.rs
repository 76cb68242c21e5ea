//! The controller scenario: istiod-lite (the binary) reads a folder holding
//! N pods, S services and P policies (or the same objects from a real API
//! server: [`crate::controller_kube`]); C thin Delta ADS clients connect
//! over real gRPC/TLS at once (see the crate's documentation).

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

pub(crate) struct Controller {
    pub(crate) child: Child,
    pub(crate) grpc: SocketAddr,
    /// Its debug endpoint (loopback: no token needed).
    pub(crate) debug: SocketAddr,
    /// The mesh root the clients trust.
    pub(crate) root: String,
    /// Its data directory, when it has one of its own.
    pub(crate) _data: Option<tempfile::TempDir>,
}

impl Controller {
    /// A GET on the debug endpoint: the status code and the body.
    pub(crate) async fn get(&self, path: &str) -> Result<(u16, String), Error> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(self.debug).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        let text = String::from_utf8_lossy(&out);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        Ok((code, body.to_string()))
    }

    /// When the controller handed its last change to the proxies' hub
    /// (after its source saw it), from its debug page; None from a
    /// build that does not say.
    pub(crate) async fn last_push(&self) -> Result<Option<SystemTime>, Error> {
        let (_, body) = self.get("/debug/connections").await?;
        let v: serde_json::Value = serde_json::from_str(&body)?;
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

pub(crate) fn sibling(name: &str) -> PathBuf {
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
        _data: None,
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
    token: &str,
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
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
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

pub(crate) struct Run {
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
    /// From the controller's start until it said it was ready (the
    /// Kubernetes source: every kind listed and applied).
    pub(crate) ready: Option<Duration>,
}

/// The pod the change moves.
pub(crate) const WATCHED: &str = "Kubernetes//Pod/ns-0/pod-0";

/// Connects a client per token, times the first full push (`expected`
/// resources to each), then `change` (which moves pod-0 to a new IP) until
/// every client holds the pod's new version.
pub(crate) async fn measure<F, Fut>(
    c: &Controller,
    expected: usize,
    tokens: &[String],
    change: F,
) -> Result<Run, Error>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<(), Error>>,
{
    let seen = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut clients = Vec::with_capacity(tokens.len());
    for token in tokens {
        clients.push(connect(c, token, seen.clone(), WATCHED).await?);
    }
    let total = expected * tokens.len();
    let deadline = t0 + Duration::from_secs(600);
    while seen.load(Ordering::Relaxed) < total {
        if Instant::now() > deadline {
            return Err(format!(
                "first push incomplete: {} of {total}",
                seen.load(Ordering::Relaxed),
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
    change().await?;
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
    // From the controller's hub taking the change (the source's part
    // done) to the last client holding it.
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
        ready: None,
    })
}

async fn run_once(a: &Args) -> Result<Run, Error> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("config");
    std::fs::create_dir(&config)?;
    write_config(&config, a)?;
    let c = start_controller(dir.path(), a.proxies, a.istiod_lite.as_deref()).await?;
    let expected = a.pods + a.services + a.policies;
    let tokens: Vec<String> = (0..a.proxies)
        .map(|i| format!("bench-token-for-node-{i}-000000"))
        .collect();
    measure(&c, expected, &tokens, || async {
        write_pod(&config, a, 0, 1).map_err(Error::from)
    })
    .await
}

/// The controller scenario: runs, then its table; its JSON object.
pub(crate) async fn run(a: &Args, machine: &str) -> Result<serde_json::Value, Error> {
    let (runs, context) = match a.controller_source {
        crate::ControllerSource::Folder => {
            let mut runs = Vec::new();
            for i in 0..a.runs {
                let r = run_once(a).await?;
                print_run(i, &r);
                runs.push(r);
            }
            (runs, serde_json::json!({"source": "folder"}))
        }
        crate::ControllerSource::Kube => crate::controller_kube::runs(a).await?,
    };
    Ok(table(a, machine, &runs, context))
}

pub(crate) fn print_run(i: usize, r: &Run) {
    eprintln!(
        "run {}: first push {:.0} ms, change {:.1} ms (from the hub {}), RSS {:.1} MiB after the push, {:.1} MiB at the end, peak {:.1} MiB{}",
        i + 1,
        r.first_push.as_secs_f64() * 1e3,
        r.change.as_secs_f64() * 1e3,
        r.observed
            .map_or("?".into(), |d| format!("{:.1} ms", d.as_secs_f64() * 1e3)),
        r.rss_push_mib,
        r.rss_mib,
        r.peak_mib,
        r.ready.map_or(String::new(), |d| format!(
            ", ready {:.0} ms after its start",
            d.as_secs_f64() * 1e3
        )),
    );
}

/// Prints the table of `runs`; the scenario's JSON (with `context`'s
/// fields).
fn table(a: &Args, machine: &str, runs: &[Run], context: serde_json::Value) -> serde_json::Value {
    let ms =
        |f: fn(&Run) -> Duration| stats(runs.iter().map(|r| f(r).as_secs_f64() * 1e3).collect());
    let fp = ms(|r| r.first_push);
    let ch = ms(|r| r.change);
    let opt = |v: Vec<f64>| (!v.is_empty()).then(|| stats(v));
    let obs = opt(runs
        .iter()
        .filter_map(|r| r.observed.map(|d| d.as_secs_f64() * 1e3))
        .collect());
    let ready = opt(runs
        .iter()
        .filter_map(|r| r.ready.map(|d| d.as_secs_f64() * 1e3))
        .collect());
    let rss = stats(runs.iter().map(|r| r.rss_mib).collect());
    let rss_push = stats(runs.iter().map(|r| r.rss_push_mib).collect());
    let peak = stats(runs.iter().map(|r| r.peak_mib).collect());
    println!(
        "\nController at scale ({} source): {} pods, {} services, {} policies, {} proxies ({machine})",
        context["source"].as_str().unwrap_or("?"),
        a.pods,
        a.services,
        a.policies,
        a.proxies
    );
    println!("| figure | median | min | max |");
    println!("| --- | --- | --- | --- |");
    let row = |name: &str, s: (f64, f64, f64), d: usize| {
        println!("| {name} | {:.d$} | {:.d$} | {:.d$} |", s.0, s.1, s.2);
    };
    if let Some(r) = ready {
        row("controller start to ready, every kind listed (ms)", r, 0);
    }
    row("first full push to all proxies (ms)", fp, 0);
    row("one pod change to all proxies (ms)", ch, 1);
    if let Some(o) = obs {
        row(
            "one pod change, from the controller taking it to all proxies (ms)",
            o,
            1,
        );
    }
    row("controller RSS after the first push (MiB)", rss_push, 1);
    row("controller RSS at the end (MiB)", rss, 1);
    row("controller peak RSS (MiB)", peak, 1);
    let j = |s: (f64, f64, f64)| serde_json::json!({"median": s.0, "min": s.1, "max": s.2});
    let mut out = serde_json::json!({
        "pods": a.pods, "services": a.services, "policies": a.policies, "proxies": a.proxies, "runs": a.runs,
        "first_push_ms": j(fp),
        "pod_change_ms": j(ch),
        "pod_change_from_hub_ms": obs.map(j),
        "ready_ms": ready.map(j),
        "rss_mib": j(rss),
        "rss_after_push_mib": j(rss_push),
        "peak_rss_mib": j(peak),
    });
    if let (Some(o), Some(c)) = (out.as_object_mut(), context.as_object()) {
        o.extend(c.clone());
    }
    out
}
