//! The controller's own Prometheus metrics, on Istio's names where istiod
//! has one (so its dashboards read them) and ours where it has none.
//!
//! | metric | kind | labels |
//! | --- | --- | --- |
//! | `pilot_xds` | gauge: connected proxies | `version` |
//! | `pilot_xds_pushes` | counter: responses sent | `type` |
//! | `pilot_total_xds_rejects` | counter: NACKs | `type` |
//! | `pilot_proxy_convergence_time` | histogram (seconds): config change to push sent | |
//! | `citadel_server_csr_count` | counter: certificate requests | |
//! | `citadel_server_success_cert_issuance_count` | counter: certificates issued | |
//! | `istio_build` | gauge (1) | `component`, `tag` |
//! | `istiod_lite_model_build_seconds` | histogram: applying a batch of changes | |
//! | `istiod_lite_config_objects` | gauge: objects in the model | `kind` |
//! | `istiod_lite_watch_restarts_total` | counter: API server watches started again | `kind` |
//!
//! One set per process (the counters are process-wide, as istiod's are);
//! the gauges are read from the hub when scraped. Istio's counters carry no
//! `_total` suffix (istiod exports them so), so they are written here
//! rather than by `prometheus-client`, which always adds one.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use mesh_proto::{
    ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, INGRESS_TYPE_URL, SERVICE_ROUTES_TYPE_URL,
};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabel {
    pub version: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub component: String,
    pub tag: String,
}

/// A counter with one label, written by hand: with the exact name given
/// (Istio's have no `_total`), and declared even before its first event.
struct ByLabel {
    label: &'static str,
    counts: Mutex<BTreeMap<String, u64>>,
}

impl ByLabel {
    fn new(label: &'static str, start: impl IntoIterator<Item = String>) -> ByLabel {
        ByLabel {
            label,
            counts: Mutex::new(start.into_iter().map(|k| (k, 0)).collect()),
        }
    }

    /// Every xDS type served starts at 0, so a rate over it exists before
    /// the first event.
    fn by_type() -> ByLabel {
        // The types the hub serves (its `TYPES`), each counted from zero.
        let types = [
            ADDRESS_TYPE_URL,
            AUTHORIZATION_TYPE_URL,
            SERVICE_ROUTES_TYPE_URL,
            INGRESS_TYPE_URL,
        ];
        ByLabel::new("type", types.iter().map(|t| type_name(t)))
    }

    fn inc(&self, value: String) {
        *self
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(value)
            .or_default() += 1;
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (v, n) in self.counts.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(out, "{name}{{{}=\"{v}\"}} {n}", self.label);
        }
    }
}

fn write_counter(out: &mut String, name: &str, help: &str, n: &AtomicU64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
        n.load(Ordering::Relaxed)
    );
}

pub struct ControlMetrics {
    registry: Registry,
    connected: Family<VersionLabel, Gauge>,
    pushes: ByLabel,
    rejects: ByLabel,
    convergence: Histogram,
    csrs: AtomicU64,
    issued: AtomicU64,
    model_build: Histogram,
    objects: Family<KindLabel, Gauge>,
    watch_restarts: ByLabel,
}

/// The short name Istio's dashboards show for a type URL (its last
/// path segment, lower-cased: `type.googleapis.com/istio.workload.Address`
/// is `address`).
pub fn type_name(type_url: &str) -> String {
    type_url
        .rsplit(['.', '/'])
        .next()
        .unwrap_or(type_url)
        .to_ascii_lowercase()
}

fn seconds() -> Histogram {
    // 1 ms to ~65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

impl ControlMetrics {
    fn new() -> ControlMetrics {
        let mut registry = Registry::default();
        let m = ControlMetrics {
            connected: Family::default(),
            pushes: ByLabel::by_type(),
            rejects: ByLabel::by_type(),
            convergence: seconds(),
            csrs: AtomicU64::new(0),
            issued: AtomicU64::new(0),
            model_build: seconds(),
            objects: Family::default(),
            watch_restarts: ByLabel::new("kind", []),
            registry: Registry::default(),
        };
        registry.register("pilot_xds", "Connected xDS proxies", m.connected.clone());
        registry.register(
            "pilot_proxy_convergence_time",
            "Seconds from a config change to its push being sent to a proxy",
            m.convergence.clone(),
        );
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                component: "istiod-lite".into(),
                tag: env!("CARGO_PKG_VERSION").into(),
            })
            .set(1);
        registry.register("istio_build", "The running build", build);
        registry.register(
            "istiod_lite_model_build_seconds",
            "Seconds to apply a batch of config changes to the model",
            m.model_build.clone(),
        );
        registry.register(
            "istiod_lite_config_objects",
            "Config objects in the model, by kind",
            m.objects.clone(),
        );
        ControlMetrics { registry, ..m }
    }

    pub fn pushed(&self, type_url: &str) {
        self.pushes.inc(type_name(type_url));
    }

    pub fn rejected(&self, type_url: &str) {
        self.rejects.inc(type_name(type_url));
    }

    pub fn converged(&self, d: Duration) {
        self.convergence.observe(d.as_secs_f64());
    }

    pub fn csr(&self) {
        self.csrs.fetch_add(1, Ordering::Relaxed);
    }

    pub fn issued(&self) {
        self.issued.fetch_add(1, Ordering::Relaxed);
    }

    pub fn model_built(&self, d: Duration) {
        self.model_build.observe(d.as_secs_f64());
    }

    pub fn watch_restarted(&self, kind: &str) {
        self.watch_restarts.inc(kind.to_string());
    }

    /// The text exposition, with the gauges set from the hub's figures
    /// now: its connected proxies and the model's objects per kind.
    pub fn render(&self, connected: usize, objects: Vec<(&'static str, usize)>) -> String {
        self.connected
            .get_or_create(&VersionLabel {
                version: env!("CARGO_PKG_VERSION").into(),
            })
            .set(connected as i64);
        for (kind, n) in objects {
            self.objects
                .get_or_create(&KindLabel { kind: kind.into() })
                .set(n as i64);
        }
        let mut out = String::new();
        self.pushes
            .write(&mut out, "pilot_xds_pushes", "xDS responses sent, by type");
        self.rejects.write(
            &mut out,
            "pilot_total_xds_rejects",
            "xDS responses proxies rejected (NACK), by type",
        );
        write_counter(
            &mut out,
            "citadel_server_csr_count",
            "Certificate signing requests received",
            &self.csrs,
        );
        write_counter(
            &mut out,
            "citadel_server_success_cert_issuance_count",
            "Certificates issued",
            &self.issued,
        );
        self.watch_restarts.write(
            &mut out,
            "istiod_lite_watch_restarts_total",
            "API server watches started again after an error or an expired version, by kind",
        );
        // Writing to a String cannot fail; it ends with `# EOF`.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The process's metrics.
pub fn metrics() -> &'static ControlMetrics {
    static M: OnceLock<ControlMetrics> = OnceLock::new();
    M.get_or_init(ControlMetrics::new)
}

/// The controller's limit on log lines a flood could multiply (a refused
/// CSR, an xDS request refused or cut): each kind at most once per
/// [`mesh_core::loglimit::EVERY`], the next carrying how many were left
/// out; [`log_left_out`] writes the counts nothing else has.
pub fn log_limit() -> &'static std::sync::Arc<mesh_core::loglimit::LogLimit> {
    static LIMIT: OnceLock<std::sync::Arc<mesh_core::loglimit::LogLimit>> = OnceLock::new();
    LIMIT.get_or_init(Default::default)
}

/// Writes a line per kind whose period has passed with lines left out and
/// none written since; the lines written.
pub fn log_left_out(limit: &mesh_core::loglimit::LogLimit, now: std::time::Instant) -> usize {
    let due = limit.due(now);
    for (kind, left_out) in &due {
        tracing::warn!(kind, left_out, "log lines left out in the last period");
    }
    due.len()
}

/// Every period until `stop`, writes what `limits` left out.
pub async fn log_left_out_every(
    limits: Vec<std::sync::Arc<mesh_core::loglimit::LogLimit>>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(mesh_core::loglimit::EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let now = std::time::Instant::now();
        for l in &limits {
            log_left_out(l, now);
        }
    }
}

#[cfg(test)]
mod tests {
    /// Lines left out and never followed by another are written by the
    /// periodic task once their period has passed, once.
    #[test]
    fn left_out_lines_are_written_once_their_period_has_passed() {
        let limit = mesh_core::loglimit::LogLimit::default();
        let now = std::time::Instant::now();
        for _ in 0..5 {
            limit.admit("csr refused", now);
        }
        let later = now + mesh_core::loglimit::EVERY;
        assert_eq!(super::log_left_out(&limit, now), 0, "not yet");
        assert_eq!(super::log_left_out(&limit, later), 1);
        assert_eq!(super::log_left_out(&limit, later), 0, "once");
    }

    use super::*;

    #[test]
    fn type_urls_get_their_short_names() {
        assert_eq!(
            type_name("type.googleapis.com/istio.workload.Address"),
            "address"
        );
        assert_eq!(
            type_name("type.googleapis.com/istio.security.Authorization"),
            "authorization"
        );
    }
}
