//! `meshctl top`: connections, bytes and requests per workload edge, from
//! the proxies' Prometheus metrics, as rates between two scrapes.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::output::Table;
use crate::source::{Endpoint, Mesh, SourceError};

/// One sample: metric name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the Prometheus/OpenMetrics text format (what the proxies serve).
/// Comment and malformed lines are skipped.
pub fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (head, value) = match line.rfind(' ') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => continue,
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match head.find('{') {
            Some(i) if head.ends_with('}') => {
                (&head[..i], parse_labels(&head[i + 1..head.len() - 1]))
            }
            Some(_) => continue,
            None => (head, BTreeMap::new()),
        };
        out.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    out
}

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while let Some(eq) = rest.find("=\"") {
        let key = rest[..eq].trim_start_matches(',').trim().to_string();
        let mut value = String::new();
        let mut chars = rest[eq + 2..].char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => {}
                },
                '"' => {
                    end = Some(eq + 2 + i + 1);
                    break;
                }
                c => value.push(c),
            }
        }
        out.insert(key, value);
        match end {
            Some(e) => rest = &rest[e..],
            None => break,
        }
    }
    out
}

/// Traffic between two workloads.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Edge {
    pub open: f64,
    pub opened: f64,
    pub bytes: f64,
    pub requests: f64,
}

type EdgeKey = (String, String);

fn workload(l: &BTreeMap<String, String>, side: &str) -> String {
    let ns = l
        .get(&format!("{side}_workload_namespace"))
        .map(String::as_str)
        .unwrap_or("unknown");
    let w = l
        .get(&format!("{side}_workload"))
        .map(String::as_str)
        .unwrap_or("unknown");
    format!("{ns}/{w}")
}

/// Totals per edge from one scrape of every proxy. TCP figures come from
/// the destination side (each mesh connection counted once), requests from
/// waypoints.
pub fn edges(samples: &[Sample]) -> BTreeMap<EdgeKey, Edge> {
    let mut out: BTreeMap<EdgeKey, Edge> = BTreeMap::new();
    for s in samples {
        let reporter = s.labels.get("reporter").map(String::as_str);
        let key = (
            workload(&s.labels, "source"),
            workload(&s.labels, "destination"),
        );
        let e = match (s.name.as_str(), reporter) {
            (
                "istio_tcp_connections_opened_total"
                | "istio_tcp_connections_closed_total"
                | "istio_tcp_sent_bytes_total"
                | "istio_tcp_received_bytes_total",
                Some("destination"),
            )
            | ("istio_requests_total", Some("waypoint")) => out.entry(key).or_default(),
            _ => continue,
        };
        match s.name.as_str() {
            "istio_tcp_connections_opened_total" => {
                e.opened += s.value;
                e.open += s.value;
            }
            "istio_tcp_connections_closed_total" => e.open -= s.value,
            "istio_requests_total" => e.requests += s.value,
            _ => e.bytes += s.value,
        }
    }
    out
}

/// One scrape of every proxy: what answered, and who did not.
pub struct Scrape {
    pub samples: Vec<Sample>,
    pub answered: std::collections::BTreeSet<String>,
    pub failed: Vec<String>,
    pub at: std::time::Instant,
}

/// Scrapes every proxy's metrics once. A proxy that does not answer is
/// named in `failed`; only when none answers is it an error.
pub async fn scrape(mesh: &Mesh) -> Result<Scrape, SourceError> {
    let mut endpoints: Vec<&Endpoint> = mesh
        .ztunnels
        .iter()
        .filter_map(|z| z.metrics.as_ref())
        .collect();
    endpoints.extend(mesh.waypoints.iter().filter_map(|w| w.metrics.as_ref()));
    if endpoints.is_empty() {
        return Err(SourceError::Other(
            "top needs the proxies' metrics: pass --metrics-addr ADDR (a ztunnel's :15020) or use --lab".into(),
        ));
    }
    let at = std::time::Instant::now();
    let mut out = Scrape {
        samples: Vec::new(),
        answered: Default::default(),
        failed: Vec::new(),
        at,
    };
    let mut last_err = None;
    for e in endpoints {
        match e.get("/metrics").await {
            Ok(text) => {
                out.samples.extend(parse_metrics(&text));
                out.answered.insert(e.what.clone());
            }
            Err(err) => {
                out.failed.push(format!("{}: {err}", e.what));
                last_err = Some(err);
            }
        }
    }
    match last_err {
        Some(e) if out.answered.is_empty() => Err(e),
        _ => Ok(out),
    }
}

/// One frame: rates between `before` and `after`, `secs` apart.
pub fn frame(before: &[Sample], after: &[Sample], secs: f64) -> Table {
    let a = edges(before);
    let b = edges(after);
    let mut t = Table::new(
        "edges",
        &[
            "SOURCE",
            "DESTINATION",
            "OPEN",
            "CONN/S",
            "BYTES/S",
            "REQ/S",
            "TOTAL CONNS",
            "TOTAL REQS",
        ],
    );
    let mut rows: Vec<(&EdgeKey, &Edge, Edge)> = b
        .iter()
        .map(|(k, now)| {
            let then = a.get(k).cloned().unwrap_or_default();
            let rate = |x: f64, y: f64| ((x - y) / secs).max(0.0);
            (
                k,
                now,
                Edge {
                    open: now.open,
                    opened: rate(now.opened, then.opened),
                    bytes: rate(now.bytes, then.bytes),
                    requests: rate(now.requests, then.requests),
                },
            )
        })
        .collect();
    rows.sort_by(|x, y| {
        (y.2.bytes + y.2.requests)
            .total_cmp(&(x.2.bytes + x.2.requests))
            .then(x.0.cmp(y.0))
    });
    for ((src, dst), total, r) in rows {
        let item = serde_json::json!({
            "source": src,
            "destination": dst,
            "open": r.open.max(0.0),
            "connections_per_second": r.opened,
            "bytes_per_second": r.bytes,
            "requests_per_second": r.requests,
            "total_connections": total.opened,
            "total_requests": total.requests,
            "interval_seconds": secs,
        });
        t.push_item(
            vec![
                src.clone(),
                dst.clone(),
                format!("{:.0}", r.open.max(0.0)),
                format!("{:.1}", r.opened),
                human(r.bytes),
                format!("{:.1}", r.requests),
                format!("{:.0}", total.opened),
                format!("{:.0}", total.requests),
            ],
            item,
        );
    }
    t
}

fn human(bytes_per_s: f64) -> String {
    match bytes_per_s {
        b if b >= 1e9 => format!("{:.1}G", b / 1e9),
        b if b >= 1e6 => format!("{:.1}M", b / 1e6),
        b if b >= 1e3 => format!("{:.1}k", b / 1e3),
        b => format!("{b:.0}"),
    }
}

/// Runs `top`: one frame (`once`) or refreshing in place until interrupted.
/// Rates use the time measured between the two scrapes. A proxy that does
/// not answer is reported; a frame is drawn only from two scrapes of the
/// same proxies (a proxy coming back would otherwise count its whole
/// history as one interval's traffic).
pub async fn run(
    mesh: &Mesh,
    interval: Duration,
    once: bool,
    mut show: impl FnMut(&Table, bool),
) -> Result<(), SourceError> {
    let mut before = scrape(mesh).await?;
    loop {
        tokio::time::sleep(interval).await;
        let after = match scrape(mesh).await {
            Ok(a) => a,
            Err(e) if !once => {
                eprintln!("meshctl top: {e}; retrying");
                continue;
            }
            Err(e) => return Err(e),
        };
        for f in &after.failed {
            eprintln!("meshctl top: no answer from {f}");
        }
        if after.answered == before.answered {
            let secs = after.at.duration_since(before.at).as_secs_f64();
            show(&frame(&before.samples, &after.samples, secs), !once);
            if once {
                return Ok(());
            }
        } else if once {
            return Err(SourceError::Other(
                "the proxies that answered changed between the two scrapes; run again".into(),
            ));
        }
        before = after;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_istio_series_and_computes_rates() {
        let before = parse_metrics(
            "# HELP x\nistio_tcp_connections_opened_total{reporter=\"destination\",source_workload=\"client\",source_workload_namespace=\"shop\",destination_workload=\"server\",destination_workload_namespace=\"shop\"} 10\n\
             istio_tcp_sent_bytes_total{reporter=\"destination\",source_workload=\"client\",source_workload_namespace=\"shop\",destination_workload=\"server\",destination_workload_namespace=\"shop\"} 1000\n\
             istio_tcp_connections_opened_total{reporter=\"source\",source_workload=\"client\",source_workload_namespace=\"shop\",destination_workload=\"server\",destination_workload_namespace=\"shop\"} 99\n",
        );
        let after = parse_metrics(
            "istio_tcp_connections_opened_total{reporter=\"destination\",source_workload=\"client\",source_workload_namespace=\"shop\",destination_workload=\"server\",destination_workload_namespace=\"shop\"} 14\n\
             istio_tcp_connections_closed_total{reporter=\"destination\",source_workload=\"client\",source_workload_namespace=\"shop\",destination_workload=\"server\",destination_workload_namespace=\"shop\"} 11\n\
             istio_tcp_sent_bytes_total{reporter=\"destination\",source_workload=\"client\",source_workload_namespace=\"shop\",destination_workload=\"server\",destination_workload_namespace=\"shop\"} 5000\n\
             istio_requests_total{reporter=\"waypoint\",source_workload=\"client\",source_workload_namespace=\"shop\",destination_workload=\"server\",destination_workload_namespace=\"shop\",response_code=\"200\"} 8\n",
        );
        let t = frame(&before, &after, 2.0);
        assert_eq!(t.rows.len(), 1, "{}", t.render(false));
        assert_eq!(
            t.rows[0],
            vec![
                "shop/client",
                "shop/server",
                "3",
                "2.0",
                "2.0k",
                "4.0",
                "14",
                "8"
            ]
        );
        let l = parse_labels("a=\"x\\\"y\",b=\"2\"");
        assert_eq!(l["a"], "x\"y");
        assert_eq!(l["b"], "2");
    }
}
