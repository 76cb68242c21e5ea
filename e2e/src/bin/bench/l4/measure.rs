//! The L4 measurements: iperf3, sockperf, wrk and `labapp hold` from the
//! client pod, with each proxy's CPU and memory meanwhile, and the meshes'
//! own counters.

use std::time::Duration;

use e2e::lab::Lab;
use e2e::mesh::binary;
use serde_json::Value;

use super::setup::run_in;
use super::{
    Ctx, ECHO_PORT, HTTP_PORT, IPERF_PORT, Mesh, NEW_CONN_CONCURRENCY, Placement, SOCKPERF_PORT,
    Sample, Test,
};
use crate::Error;
use crate::common::{cpu_ticks, envoy_admin, status_mib};

/// Connections the ztunnels opened to pods of the ztunnel path's
/// namespace (reporter destination), from both ztunnels' metrics.
pub(super) fn ztunnel_opened(lab: &Lab) -> Result<u64, Error> {
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
pub(super) fn envoy_stat(lab: &Lab, pod: &str, stat: &str) -> Result<u64, Error> {
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
pub(super) fn measure(
    c: &Ctx<'_>,
    t: Test,
    m: Mesh,
    p: Placement,
    s: &mut Sample,
) -> Result<(), Error> {
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
