//! `just demo`: a two-node ambient mesh on this machine, built by the lab
//! from `manifests/demo/` with the production binaries.
//!
//! Shows requests crossing the mesh with the identities each side saw, that
//! the bytes on the wire are TLS, a policy refusing a caller, a waypoint
//! routing by header and by weight, and where to look next; tears
//! everything down on exit or Ctrl-C.

use std::path::Path;
use std::time::Duration;

use e2e::lab::{Lab, read_docs};
use e2e::mesh::binary;
use e2e::netns::capture;
use mesh_core::netns::Netns;

type Error = Box<dyn std::error::Error + Send + Sync>;

fn get(lab: &Lab, from: &str, url: &str) -> Result<String, Error> {
    let bin = binary("labapp");
    let out = lab.exec(from, &[bin.to_str().ok_or("path")?, "get", url])?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr)
            .trim()
            .to_string()
            .into())
    }
}

fn access_log_lines(lab: &Lab) -> Vec<String> {
    let mut out = Vec::new();
    for n in &lab.state.nodes {
        let log =
            std::fs::read_to_string(lab.dir.join("logs").join(format!("{}-ztunnel.log", n.name)))
                .unwrap_or_default();
        for l in log
            .lines()
            .filter(|l| l.contains("connection complete") && l.contains("direction=Inbound"))
        {
            let field = |k: &str| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(&format!("{k}=")))
                    .unwrap_or("-")
                    .to_string()
            };
            out.push(format!(
                "   {}: {} -> {}  src.identity={}  dst.identity={}",
                n.name,
                field("src.addr"),
                field("dst.addr"),
                field("src.identity"),
                field("dst.identity")
            ));
        }
    }
    out
}

async fn run(lab: &mut Lab, manifests: &Path) -> Result<(), Error> {
    let vip = start(lab, manifests).await?;
    let url = "http://server.shop/".to_string();
    let plain_url = format!("http://{vip}:80/");
    mesh_call(lab, &url).await?;
    on_the_wire(lab).await?;
    strict(lab, manifests, &url, &plain_url).await?;
    waypoint(lab, manifests, &url).await?;
    where_next();
    Ok(())
}

/// 1. The mesh and the demo's pods; the server's VIP.
async fn start(lab: &mut Lab, manifests: &Path) -> Result<String, Error> {
    println!("== 1. Two nodes, istiod-lite, a ztunnel and node agent per node");
    lab.start_mesh().await?;
    lab.apply(read_docs(&manifests.join("shop.yaml"))?).await?;
    for (k, p) in &lab.state.pods {
        println!(
            "   pod {k:<26} {:<14} on {}  {}",
            p.ip,
            p.node,
            if p.captured {
                "in the mesh (HBONE)"
            } else {
                "outside the mesh"
            }
        );
    }
    let vip = lab.state.services["shop/server"].vip.clone();
    println!("   service shop/server VIP {vip}:80 -> 8080");
    Ok(vip)
}

/// 2. A call across the mesh, and what the destination ztunnels logged.
async fn mesh_call(lab: &Lab, url: &str) -> Result<(), Error> {
    println!(
        "\n== 2. shop/client calls http://server.shop/ (the ztunnel answers DNS with the VIP; HBONE, mTLS)"
    );
    let mut ok = false;
    for _ in 0..60 {
        if let Ok(body) = get(lab, "shop/client-0", url) {
            print!(
                "{}",
                body.lines()
                    .take(2)
                    .map(|l| format!("   {l}\n"))
                    .collect::<String>()
            );
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    if !ok {
        return Err("the client never reached the server".into());
    }
    for _ in 0..3 {
        get(lab, "shop/client-0", url)?;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    println!("   what the destination ztunnels recorded:");
    for l in access_log_lines(lab).iter().take(4) {
        println!("{l}");
    }
    Ok(())
}

/// 3. A capture on the server's interface: TLS to 15008 only.
async fn on_the_wire(lab: &Lab) -> Result<(), Error> {
    println!("\n== 3. On the wire: TLS to 15008, never the application's bytes");
    let server = lab.pod("shop/server-1").ok_or("no server-1")?.clone();
    let netns = Netns::open(&format!("/var/run/netns/{}", server.netns))?;
    let marker = b"GET /";
    let cap =
        std::thread::spawn(move || capture(&netns, "eth0", Duration::from_millis(1500), marker));
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..4 {
        get(lab, "shop/client-0", &format!("http://{}:8080/", server.ip))?;
    }
    let seen = cap.join().map_err(|_| "capture thread")??;
    println!(
        "   captured on {}'s interface: {} frames, {} to/from port 15008, {} containing \"GET /\"",
        server.name, seen.frames, seen.hbone, seen.marker
    );
    Ok(())
}

/// 4. A caller outside the mesh, before and after STRICT mTLS.
async fn strict(lab: &mut Lab, manifests: &Path, url: &str, plain_url: &str) -> Result<(), Error> {
    println!("\n== 4. legacy/legacy-client (outside the mesh) calls {plain_url} in plaintext");
    match get(lab, "legacy/legacy-client-0", plain_url) {
        Ok(body) => println!("   allowed: {}", body.lines().next().unwrap_or("")),
        Err(e) => println!("   refused ({e})"),
    }
    println!("   applying manifests/demo/deny-legacy.yaml (PeerAuthentication STRICT in shop)");
    lab.apply(read_docs(&manifests.join("deny-legacy.yaml"))?)
        .await?;
    let mut refused = false;
    for _ in 0..40 {
        if let Err(e) = get(lab, "legacy/legacy-client-0", plain_url) {
            println!("   refused now: the connection was closed by the server's ztunnel ({e})");
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    if !refused {
        return Err("STRICT did not take effect".into());
    }
    println!(
        "   and the mesh client still gets through: {}",
        get(lab, "shop/client-0", url)?.lines().next().unwrap_or("")
    );
    Ok(())
}

/// 5. A waypoint for shop: a header match and a 90/10 split.
async fn waypoint(lab: &mut Lab, manifests: &Path, url: &str) -> Result<(), Error> {
    println!("\n== 5. L7 where it is asked for: a waypoint for shop, with a canary route");
    println!(
        "   applying manifests/demo/waypoint.yaml (Gateway istio-waypoint, istio.io/use-waypoint, HTTPRoute 90/10 + header match)"
    );
    lab.apply(read_docs(&manifests.join("waypoint.yaml"))?)
        .await?;
    let bin = binary("labapp");
    let bin = bin.to_str().ok_or("path")?;
    let mut via_waypoint = false;
    for _ in 0..80 {
        let out = lab.exec(
            "shop/client-0",
            &[bin, "get", url, "--header", "x-version: v2"],
        )?;
        if String::from_utf8_lossy(&out.stdout).contains("pod=server-v2-0") {
            via_waypoint = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    if !via_waypoint {
        return Err("the waypoint never routed x-version: v2 to server-v2".into());
    }
    println!("   with x-version: v2 -> pod=server-v2-0");
    let out = lab.exec(
        "shop/client-0",
        &[bin, "load", url, "--requests", "1000", "--concurrency", "8"],
    )?;
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    println!("   1000 requests without it, by pod: {}", summary["by_pod"]);
    let log = std::fs::read_to_string(lab.dir.join("logs/pod-shop-waypoint-0.log"))?;
    if let Some(l) = log.lines().rev().find(|l| l.contains("request complete")) {
        let keep = [
            "response_code",
            "route",
            "src.identity",
            "dst.workload",
            "duration_ms",
        ];
        let fields: Vec<&str> = l
            .split_whitespace()
            .filter(|w| keep.iter().any(|k| w.starts_with(&format!("{k}="))))
            .collect();
        println!("   the waypoint's access log: {}", fields.join(" "));
    }
    Ok(())
}

/// Commands to try on a lab of one's own.
fn where_next() {
    println!("\n== Where to look next (this lab goes away now; keep one running with the lab CLI)");
    println!(
        "   ./target/debug/lab up manifests/demo/shop.yaml        # lab 1: 10.101.0.0/16, state in /tmp/mesh-lab"
    );
    println!("   ./target/debug/lab exec shop/client-0 -- labapp get http://server.shop/");
    println!(
        "   ip netns exec lab1-n1 ./target/debug/labapp get http://10.101.0.1:15020/metrics          # istio_tcp_*"
    );
    println!(
        "   ip netns exec lab1-n1 ./target/debug/labapp get http://127.0.0.1:15000/config_dump      # admin"
    );
    println!("   ./target/debug/lab apply manifests/demo/waypoint.yaml; ls /tmp/mesh-lab/logs/");
    println!("   ./target/debug/lab down");
}

#[tokio::main]
async fn main() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "the demo builds network namespaces and needs root; without root, the lab CLI runs in a user \
             namespace of its own: cargo build --workspace --bins && ./target/debug/lab up manifests/demo/shop.yaml"
        );
        std::process::exit(1);
    }
    let manifests = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/demo");
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    let mut lab = match Lab::create_in(dir.path(), e2e::lab::DEMO_IDS, 2) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("demo failed: {e}");
            std::process::exit(1);
        }
    };
    let result = tokio::select! {
        r = run(&mut lab, &manifests) => r,
        _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
    };
    lab.down();
    println!("\nlab torn down");
    if let Err(e) = result {
        eprintln!("demo failed: {e}");
        std::process::exit(1);
    }
}
