//! The controller scenario on the Kubernetes source
//! (`--controller-source kube`): a real API server of the bench's own
//! ([`crate::kube_plane`]) is loaded with the folder's objects as API
//! objects ([`crate::kube_load`]), once; then each run starts the
//! istiod-lite binary with `--kube` against it (as the admin, out of
//! cluster), waits until it says it is ready (every kind listed and
//! applied), and measures it with the folder's thin clients, each
//! presenting its node's ztunnel token (reviewed by the API server). The
//! pod change is pod-0's status patched to a new IP through the API
//! server, as its kubelet would.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};

use crate::controller::{Controller, Run, measure, print_run, sibling};
use crate::kube_load::{self, MESH_NS};
use crate::kube_plane::Plane;
use crate::{Args, Error};

/// Loads the objects once, then `--runs` runs of a fresh controller; the
/// runs and what the scenario adds to its JSON.
pub(crate) async fn runs(a: &Args) -> Result<(Vec<Run>, serde_json::Value), Error> {
    let plane = Plane::up(a)?;
    let kubeconfig = Kubeconfig::read_from(&plane.kubeconfig)?;
    let config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    let client = Client::try_from(config)?;
    let loaded = kube_load::load(&client, a).await?;
    let api_loaded = plane.mib("apiserver", "VmRSS");
    eprintln!(
        "loaded in {:.1} s: {} resources per proxy; API server RSS {api_loaded:.0} MiB, etcd {:.0} MiB",
        loaded.took.as_secs_f64(),
        loaded.expected,
        plane.mib("etcd", "VmRSS"),
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), &kube_load::pod_ns(0, a.services));
    let mut runs = Vec::new();
    for i in 0..a.runs {
        let (c, ready) = start(&plane, a, &client).await?;
        let pods = &pods;
        let mut r = measure(&c, loaded.expected, &loaded.tokens, || async move {
            kube_load::set_ip(pods, 0, i + 1).await
        })
        .await?;
        r.ready = Some(ready);
        print_run(i, &r);
        runs.push(r);
    }
    let context = serde_json::json!({
        "source": "kube",
        "load_s": loaded.took.as_secs_f64(),
        "batch_ms": a.kube_batch_ms,
        "concurrency": a.kube_concurrency,
        "apiserver_rss_mib_loaded": api_loaded,
        "apiserver_rss_mib_end": plane.mib("apiserver", "VmRSS"),
        "apiserver_peak_mib": plane.mib("apiserver", "VmHWM"),
        "etcd_rss_mib_end": plane.mib("etcd", "VmRSS"),
    });
    println!(
        "\nKubernetes source: objects loaded in {:.1} s ({} requests in flight); API server RSS {:.0} MiB after the load, {:.0} MiB at the end, peak {:.0} MiB; etcd {:.0} MiB",
        loaded.took.as_secs_f64(),
        a.kube_concurrency,
        api_loaded,
        plane.mib("apiserver", "VmRSS"),
        plane.mib("apiserver", "VmHWM"),
        plane.mib("etcd", "VmRSS"),
    );
    Ok((runs, context))
}

/// The istiod-lite binary with its Kubernetes source, once it has settled
/// after saying it is ready, with the root its clients trust (from the CA
/// Secret it made); how long it took to be ready.
async fn start(plane: &Plane, a: &Args, client: &Client) -> Result<(Controller, Duration), Error> {
    let started = Instant::now();
    let data = tempfile::tempdir()?;
    let grpc = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let debug = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let bin = a
        .istiod_lite
        .as_deref()
        .map_or_else(|| sibling("istiod-lite"), Path::to_path_buf);
    let child = Command::new(bin)
        .arg("--kube")
        .arg("--data-dir")
        .arg(data.path())
        .args([
            "--grpc-addr",
            &grpc.to_string(),
            "--debug-addr",
            &debug.to_string(),
            "--poll-ms",
            &a.kube_batch_ms.to_string(),
        ])
        .env("KUBECONFIG", &plane.kubeconfig)
        .env("POD_NAME", "bench-istiod-lite")
        .env("RUST_LOG", "warn")
        .spawn()?;
    let mut c = Controller {
        child,
        grpc,
        debug,
        root: String::new(),
        _data: Some(data),
    };
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        if Instant::now() > deadline {
            return Err("istiod-lite was not ready within 900 s".into());
        }
        if let Ok(Some(status)) = c.child.try_wait() {
            return Err(format!("istiod-lite exited: {status}").into());
        }
        if let Ok((200, _)) = c.get("/ready").await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ready = started.elapsed();
    settle(&c).await?;
    let secret = Api::<Secret>::namespaced(client.clone(), MESH_NS)
        .get("istio-ca-secret")
        .await?;
    let root = secret
        .data
        .and_then(|d| d.get("ca-cert.pem").cloned())
        .ok_or("istio-ca-secret has no ca-cert.pem")?;
    c.root = String::from_utf8(root.0)?;
    Ok((c, ready))
}

/// Waits until the controller's own first writes have come back as events
/// and been applied: the leader writes every policy's status once, and
/// each write is a watch event that the source batches and the hub applies.
/// Settled: at least [`SETTLE`] after ready and no push for [`SETTLE`],
/// so neither the first push nor the pod change shares a batch with them.
async fn settle(c: &Controller) -> Result<(), Error> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = c.last_push().await?;
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = c.last_push().await?;
        if now != last {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() >= SETTLE {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err("istiod-lite kept pushing for 120 s after it was ready".into());
        }
    }
}

const SETTLE: Duration = Duration::from_secs(3);
