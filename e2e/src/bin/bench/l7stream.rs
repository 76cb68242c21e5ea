//! The L7 scenario's long-lived streams, on the same three paths as its
//! HTTP/1.1 figures (direct, our waypoint, Envoy as the waypoint):
//!
//! - **gRPC bidirectional**: one stream to the tonic echo (`labapp
//!   grpc-echo`, h2c), one small message in flight: per-message round trip
//!   (p50, p99) and messages per second;
//! - **gRPC client-streaming**: one call sending messages back to back, as
//!   fast as HTTP/2 flow control lets them through: messages per second;
//! - **WebSocket**: one connection to the http-echo (HTTP/1.1 `Upgrade:
//!   websocket`, then the echo answers every frame), one small text message
//!   in flight: per-message round trip and messages per second.
//!
//! The load generator is `labapp stream-load` (tonic's client,
//! tokio-tungstenite's client) in the client pod, pinned like the HTTP
//! load. Each figure is the median of `--runs` runs with min and max; the
//! runs interleave the paths. The proxy's CPU is utime+stime over a run,
//! in microseconds per message.

use std::collections::BTreeMap;

use e2e::lab::Lab;
use e2e::mesh::binary;
use serde_json::{Value, json};

use crate::common::{
    cell, clock_ticks_per_second, cpu_ticks, envoy_admin, get, load_cpu, stat_json, stats,
};
use crate::l7::{CLIENT, DataPath, PATHS, Proxy};
use crate::{Args, Error};

/// The gRPC echo's port on its service.
pub(crate) const GRPC_PORT: u16 = 80;
/// The path the WebSocket asks for (no route rule matches it: the
/// service's default route on both proxies).
const WS_PATH: &str = "/ws";

#[derive(Debug, Clone, Copy)]
enum Kind {
    GrpcBidi,
    GrpcClientStream,
    Ws,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::GrpcBidi, Kind::GrpcClientStream, Kind::Ws];

    fn name(self) -> &'static str {
        match self {
            Kind::GrpcBidi => "gRPC bidirectional, 1 in flight",
            Kind::GrpcClientStream => "gRPC client-streaming",
            Kind::Ws => "WebSocket, 1 in flight",
        }
    }

    fn mode(self) -> &'static str {
        match self {
            Kind::GrpcBidi => "grpc-bidi",
            Kind::GrpcClientStream => "grpc-client-stream",
            Kind::Ws => "ws",
        }
    }

    /// Messages per run: client streaming sends a hundred times as many
    /// (it is that much faster).
    fn messages(self, a: &Args) -> u32 {
        match self {
            Kind::GrpcClientStream => a.stream_messages.saturating_mul(100),
            _ => a.stream_messages,
        }
    }

    fn round_trips(self) -> bool {
        !matches!(self, Kind::GrpcClientStream)
    }
}

/// What a run needs of the lab: each path's gRPC and echo service VIPs and
/// its L7 proxy's pid.
pub(crate) struct Targets {
    pub grpc_vips: Vec<String>,
    pub echo_vips: Vec<String>,
    pub proxy_pids: Vec<Option<u32>>,
}

/// `labapp stream-load`'s summary.
#[derive(Debug, serde::Deserialize)]
struct Summary {
    p50_ms: f64,
    p99_ms: f64,
    messages_per_second: f64,
}

fn stream_load(lab: &Lab, kind: Kind, url: &str, messages: u32) -> Result<Summary, Error> {
    let labapp = binary("labapp").display().to_string();
    let n = messages.to_string();
    let cpu = load_cpu().map(|c| c.to_string());
    let mut cmd: Vec<&str> = vec!["timeout", "300"];
    if let Some(cpu) = &cpu {
        cmd.extend(["taskset", "-c", cpu]);
    }
    cmd.extend([
        labapp.as_str(),
        "stream-load",
        url,
        "--mode",
        kind.mode(),
        "--messages",
        &n,
    ]);
    let out = lab.exec(CLIENT, &cmd)?;
    if !out.status.success() {
        return Err(format!(
            "labapp stream-load {} {url}: {}: {}",
            kind.mode(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&out.stdout).trim()).into())
}

fn url(kind: Kind, t: &Targets, i: usize) -> String {
    match kind {
        Kind::Ws => format!("ws://{}{WS_PATH}", t.echo_vips[i]),
        _ => format!("http://{}:{GRPC_PORT}", t.grpc_vips[i]),
    }
}

struct Sample {
    mps: f64,
    p50: f64,
    p99: f64,
    proxy_cpu: Option<f64>,
}

/// gRPC calls and WebSocket upgrades the path's L7 proxy carried, from
/// its own telemetry: our waypoint's `istio_requests_total` for the gRPC
/// service and `waypoint_upgraded_connections`; Envoy's gRPC cluster's
/// requests and its connection manager's upgrades.
fn carried(lab: &Lab, p: &DataPath) -> Result<(u64, u64), Error> {
    let key = p.proxy_pod();
    let sum = |text: &str, prefix: &str, must: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with(prefix) && l.contains(must))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    match p.proxy {
        None => Ok((0, 0)),
        Some(Proxy::Waypoint) => {
            let ip = lab.pod(&key).ok_or("no waypoint pod")?.ip.clone();
            let m = get(lab, &key, &format!("http://{ip}:15020/metrics"))?;
            let svc = format!("destination_service=\"grpc.{}.svc.cluster.local\"", p.ns);
            Ok((
                sum(&m, "istio_requests_total{", &svc),
                sum(&m, "waypoint_upgraded_connections", ""),
            ))
        }
        Some(Proxy::Envoy) => {
            let s = envoy_admin(
                lab,
                &key,
                "/stats?filter=^(cluster\\.grpc\\.upstream_rq_total|http\\.main_internal\\.downstream_cx_upgrades_total)$",
            )?;
            let stat = |name: &str| {
                s.lines()
                    .find_map(|l| l.strip_prefix(&format!("{name}: ")))
                    .and_then(|n| n.trim().parse().ok())
                    .unwrap_or(0)
            };
            Ok((
                stat("cluster.grpc.upstream_rq_total"),
                stat("http.main_internal.downstream_cx_upgrades_total"),
            ))
        }
    }
}

/// Warms every path up once, then measures; checks the proxies carried the
/// streams; prints the table and returns its rows.
pub(crate) fn run(a: &Args, lab: &Lab, t: &Targets) -> Result<Vec<Value>, Error> {
    let before: Vec<(u64, u64)> = PATHS
        .iter()
        .map(|p| carried(lab, p))
        .collect::<Result<_, _>>()?;
    let samples = measure(a, lab, t)?;
    // Per path: two gRPC calls and one WebSocket per run, and the warm-up.
    let (grpc, ws) = (2 * (a.runs as u64 + 1), a.runs as u64 + 1);
    for (p, b) in PATHS.iter().zip(&before) {
        if p.proxy.is_none() {
            continue;
        }
        let (g, w) = carried(lab, p)?;
        let (g, w) = (g.saturating_sub(b.0), w.saturating_sub(b.1));
        if g < grpc || w < ws {
            return Err(format!(
                "{}: the proxy carried {g} of {grpc} gRPC calls and {w} of {ws} WebSockets",
                p.name
            )
            .into());
        }
        eprintln!(
            "l7 streams: {} carried {g} gRPC calls and {w} WebSocket upgrades",
            p.name
        );
    }
    Ok(report(a, &samples))
}

type Samples = BTreeMap<(usize, usize), Vec<Sample>>;

fn measure(a: &Args, lab: &Lab, t: &Targets) -> Result<Samples, Error> {
    for kind in Kind::ALL {
        for i in 0..PATHS.len() {
            stream_load(
                lab,
                kind,
                &url(kind, t, i),
                (a.stream_messages / 10).max(10),
            )?;
        }
    }
    let tck = clock_ticks_per_second();
    let mut samples: Samples = BTreeMap::new();
    for run in 0..a.runs {
        for (k, kind) in Kind::ALL.into_iter().enumerate() {
            let n = kind.messages(a);
            for (i, p) in PATHS.iter().enumerate() {
                let pid = t.proxy_pids[i];
                let c0 = pid.map(cpu_ticks);
                let s = stream_load(lab, kind, &url(kind, t, i), n)?;
                let c1 = pid.map(cpu_ticks);
                let cpu = c0
                    .zip(c1)
                    .map(|(x, y)| (y - x) as f64 / tck / f64::from(n) * 1e6);
                eprintln!(
                    "l7 streams run {}: {:>8} {:<32} {:>8.0} msg/s  p50 {:.3} ms  p99 {:.3} ms  proxy {} CPU µs/message",
                    run + 1,
                    p.name,
                    kind.name(),
                    s.messages_per_second,
                    s.p50_ms,
                    s.p99_ms,
                    cpu.map(|c| format!("{c:.3}")).unwrap_or_else(|| "-".into()),
                );
                samples.entry((k, i)).or_default().push(Sample {
                    mps: s.messages_per_second,
                    p50: s.p50_ms,
                    p99: s.p99_ms,
                    proxy_cpu: cpu,
                });
            }
        }
    }
    Ok(samples)
}

fn report(a: &Args, samples: &Samples) -> Vec<Value> {
    println!(
        "\nL7 streams: client pod (node-1) -> tonic gRPC echo / WebSocket echo (node-2), one stream per run, {} messages of 64 bytes ({} for client streaming); {} runs",
        a.stream_messages,
        a.stream_messages.saturating_mul(100),
        a.runs
    );
    println!("Each cell: median (min–max).");
    println!(
        "| stream | path | messages/s | round trip p50 ms | round trip p99 ms | L7 proxy CPU µs / message |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    let mut rows = Vec::new();
    for (k, kind) in Kind::ALL.into_iter().enumerate() {
        for (i, p) in PATHS.iter().enumerate() {
            let v = &samples[&(k, i)];
            let mps = stats(v.iter().map(|s| s.mps).collect());
            let p50 = stats(v.iter().map(|s| s.p50).collect());
            let p99 = stats(v.iter().map(|s| s.p99).collect());
            let cpu = v
                .iter()
                .map(|s| s.proxy_cpu)
                .collect::<Option<Vec<f64>>>()
                .map(stats);
            let (c50, c99) = if kind.round_trips() {
                (cell(p50, 3), cell(p99, 3))
            } else {
                ("-".into(), "-".into())
            };
            println!(
                "| {} | {} | {} | {c50} | {c99} | {} |",
                kind.name(),
                p.name,
                cell(mps, 0),
                cpu.map(|s| cell(s, 2)).unwrap_or_else(|| "-".into()),
            );
            rows.push(json!({
                "stream": kind.mode(),
                "path": p.name,
                "messages_per_run": kind.messages(a),
                "messages_per_second": stat_json(mps),
                "round_trip_p50_ms": kind.round_trips().then(|| stat_json(p50)),
                "round_trip_p99_ms": kind.round_trips().then(|| stat_json(p99)),
                "proxy_cpu_us_per_message": cpu.map(stat_json),
            }));
        }
    }
    rows
}
