//! Request telemetry with Istio's names and labels: `istio_requests_total`,
//! `istio_request_duration_milliseconds`, `istio_request_bytes`,
//! `istio_response_bytes`; one access-log line per request; W3C trace
//! context, with spans exported over OTLP/HTTP (JSON) when configured.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_core::metrics::PeerLabels;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tracing::{debug, warn};

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Reporter {
    waypoint,
    /// An ingress gateway reports as the source side, as Istio's do.
    source,
}

/// Envoy's response flags, as Istio reports them.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, Default)]
pub enum Flag {
    #[default]
    None,
    /// No healthy upstream.
    UH,
    /// Upstream connection failure.
    UF,
    /// Upstream overflow: the circuit breaker.
    UO,
    /// Upstream request timeout.
    UT,
    /// Upstream reset.
    UR,
    /// Retry limit or budget exceeded.
    URX,
    /// No route configured.
    NR,
    /// Delayed by fault injection.
    DI,
    /// Aborted by fault injection.
    FI,
    /// Downstream connection termination.
    DC,
    /// Refused by authorization policy.
    RBAC,
    /// Refused by an external authorization server (a CUSTOM policy).
    UAEX,
    /// Refused by a rate limit.
    RL,
}

impl Flag {
    pub fn as_str(&self) -> &'static str {
        match self {
            Flag::None => "-",
            Flag::UH => "UH",
            Flag::UF => "UF",
            Flag::UO => "UO",
            Flag::UT => "UT",
            Flag::UR => "UR",
            Flag::URX => "URX",
            Flag::NR => "NR",
            Flag::DI => "DI",
            Flag::FI => "FI",
            Flag::DC => "DC",
            Flag::RBAC => "RBAC",
            Flag::UAEX => "UAEX",
            Flag::RL => "RL",
        }
    }
}

impl EncodeLabelValue for Flag {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(self.as_str())
    }
}

/// Istio's request metric labels: the peers' as the ztunnel's TCP metrics
/// spell them, and the request's own.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub reporter: Reporter,
    #[prometheus(flatten)]
    pub peers: PeerLabels,
    pub request_protocol: String,
    pub response_code: u16,
    pub grpc_response_status: String,
    pub response_flags: Flag,
    pub connection_security_policy: String,
}

pub struct HttpMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Family<RequestLabels, Histogram>,
    pub request_bytes: Family<RequestLabels, Histogram>,
    pub response_bytes: Family<RequestLabels, Histogram>,
    /// The waypoint's own counters (retry buffer, upgrades).
    pub proxy: crate::proxy_metrics::ProxyMetrics,
}

// Istio's default buckets.
const DURATION_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

impl HttpMetrics {
    pub fn register(registry: &mut Registry) -> HttpMetrics {
        fn durations() -> Histogram {
            Histogram::new(DURATION_BUCKETS)
        }
        fn sizes() -> Histogram {
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                1.0, 10.0, 9,
            ))
        }
        let m = HttpMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(durations as fn() -> Histogram),
            request_bytes: Family::new_with_constructor(sizes as fn() -> Histogram),
            response_bytes: Family::new_with_constructor(sizes as fn() -> Histogram),
            proxy: crate::proxy_metrics::ProxyMetrics::register(registry),
        };
        registry.register("istio_requests", "Requests served", m.requests.clone());
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration",
            m.duration.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request body sizes",
            m.request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response body sizes",
            m.response_bytes.clone(),
        );
        m
    }

    pub fn record(
        &self,
        labels: &RequestLabels,
        duration: Duration,
        req_bytes: u64,
        resp_bytes: u64,
    ) {
        self.requests.get_or_create(labels).inc();
        self.duration
            .get_or_create(labels)
            .observe(duration.as_secs_f64() * 1000.0);
        self.request_bytes
            .get_or_create(labels)
            .observe(req_bytes as f64);
        self.response_bytes
            .get_or_create(labels)
            .observe(resp_bytes as f64);
    }
}

/// W3C trace context of one request: the incoming trace (or a new one),
/// and the span the waypoint starts for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: u128,
    pub parent_span: Option<u64>,
    pub span_id: u64,
    pub flags: u8,
}

impl TraceContext {
    /// Continues the trace in `traceparent` when it is valid, else starts one.
    pub fn continue_or_start(traceparent: Option<&str>) -> TraceContext {
        let span_id = fastrand::u64(1..);
        if let Some((trace_id, parent, flags)) = traceparent.and_then(parse_traceparent) {
            return TraceContext {
                trace_id,
                parent_span: Some(parent),
                span_id,
                flags,
            };
        }
        TraceContext {
            trace_id: fastrand::u128(1..),
            parent_span: None,
            span_id,
            flags: 1,
        }
    }

    /// The header sent upstream: same trace, this span as the parent.
    pub fn traceparent(&self) -> String {
        format!(
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.span_id, self.flags
        )
    }

    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }
}

/// Parses `00-<32 hex>-<16 hex>-<2 hex>`; all-zero ids are invalid.
pub fn parse_traceparent(v: &str) -> Option<(u128, u64, u8)> {
    let parts: Vec<&str> = v.trim().split('-').collect();
    if parts.len() < 4 || parts[0].len() != 2 || parts[0] == "ff" {
        return None;
    }
    // Version 00 has exactly four fields.
    if parts[0] == "00" && parts.len() != 4 {
        return None;
    }
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    };
    if !hex(parts[1], 32) || !hex(parts[2], 16) || !hex(parts[3], 2) {
        return None;
    }
    let trace = u128::from_str_radix(parts[1], 16).ok()?;
    let span = u64::from_str_radix(parts[2], 16).ok()?;
    let flags = u8::from_str_radix(parts[3], 16).ok()?;
    (trace != 0 && span != 0).then_some((trace, span, flags))
}

/// A finished span for export.
#[derive(Debug, Clone)]
pub struct Span {
    pub ctx: TraceContext,
    pub name: String,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(&'static str, String)>,
    pub error: bool,
}

/// Sends spans to an OTLP/HTTP collector in batches; drops them (counted
/// in the log) rather than slow requests when the collector lags.
#[derive(Clone)]
pub struct Exporter {
    tx: Option<mpsc::Sender<Span>>,
}

impl Exporter {
    pub fn disabled() -> Exporter {
        Exporter { tx: None }
    }

    pub fn start(endpoint: String, service_name: String) -> Exporter {
        let (tx, rx) = mpsc::channel(4096);
        tokio::spawn(export_loop(endpoint, service_name, rx));
        Exporter { tx: Some(tx) }
    }

    pub fn export(&self, span: Span) {
        if let Some(tx) = &self.tx
            && tx.try_send(span).is_err()
        {
            debug!("span exporter queue full; span dropped");
        }
    }
}

fn nanos(t: SystemTime) -> String {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
        .to_string()
}

/// The OTLP JSON encoding of a batch (ids are hex, times are strings).
pub fn otlp_json(service_name: &str, spans: &[Span]) -> serde_json::Value {
    let spans: Vec<serde_json::Value> = spans
        .iter()
        .map(|s| {
            serde_json::json!({
                "traceId": format!("{:032x}", s.ctx.trace_id),
                "spanId": format!("{:016x}", s.ctx.span_id),
                "parentSpanId": s.ctx.parent_span.map(|p| format!("{p:016x}")).unwrap_or_default(),
                "name": s.name,
                "kind": 2,
                "startTimeUnixNano": nanos(s.start),
                "endTimeUnixNano": nanos(s.end),
                "attributes": s.attributes.iter().map(|(k, v)| serde_json::json!({
                    "key": k, "value": {"stringValue": v}
                })).collect::<Vec<_>>(),
                "status": {"code": if s.error { 2 } else { 1 }},
            })
        })
        .collect();
    serde_json::json!({
        "resourceSpans": [{
            "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": service_name}}]},
            "scopeSpans": [{"scope": {"name": "waypoint"}, "spans": spans}],
        }]
    })
}

async fn export_loop(endpoint: String, service_name: String, mut rx: mpsc::Receiver<Span>) {
    let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let mut batch = Vec::new();
    loop {
        let more = tokio::select! {
            s = rx.recv() => match s { Some(s) => { batch.push(s); true } None => false },
            _ = tokio::time::sleep(Duration::from_secs(1)), if !batch.is_empty() => true,
        };
        if batch.len() >= 256 || (!batch.is_empty() && (rx.is_empty() || !more)) {
            let body = otlp_json(&service_name, &batch).to_string();
            let n = batch.len();
            batch.clear();
            let req = http::Request::post(&url)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(http_body_util::Full::new(bytes::Bytes::from(body)));
            match req {
                Ok(req) => {
                    match tokio::time::timeout(Duration::from_secs(5), client.request(req)).await {
                        Ok(Ok(r)) if r.status().is_success() => debug!(spans = n, "spans exported"),
                        Ok(Ok(r)) => {
                            warn!(status = %r.status(), spans = n, "OTLP collector refused spans")
                        }
                        Ok(Err(e)) => warn!(error = %e, spans = n, "OTLP export failed"),
                        Err(_) => warn!(spans = n, "OTLP export timed out"),
                    }
                }
                Err(e) => warn!(error = %e, "OTLP endpoint is not a valid URL"),
            }
        }
        if !more {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_continues_the_trace_with_a_new_span() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let c = TraceContext::continue_or_start(Some(tp));
        assert_eq!(c.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(c.parent_span, Some(0x00f067aa0ba902b7));
        let out = c.traceparent();
        assert!(
            out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{out}"
        );
        assert!(!out.contains("00f067aa0ba902b7"));
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "garbage",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad}");
        }
        let fresh = TraceContext::continue_or_start(Some("garbage"));
        assert!(fresh.parent_span.is_none());
    }
}
