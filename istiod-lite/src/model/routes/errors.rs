//! Why a rule of an HTTPRoute (or the GRPCRoute read as one) is left out,
//! and why a duration, a share or a DestinationRule host is not
//! understood. The text is what a user reads: in the route's status
//! (`UnsupportedValue`), in `meshctl check` and in the logs.

use super::TRAFFIC_POLICY_KIND;
use crate::config::crds::EXTENSIONS_GROUP;

/// A duration string that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Not a Gateway API `Duration` (GEP-2257).
    #[error("{0:?} is not a Gateway API duration (e.g. \"10s\", \"1m30s\", \"500ms\")")]
    GatewayApi(String),
    /// Not an Istio duration (Go's format, h/m/s/ms units).
    #[error("{0:?} is not a duration (e.g. \"30s\", \"1m\", \"0.5s\")")]
    Istio(String),
    /// Longer than a `u32` of milliseconds (~49 days).
    #[error("{0:?} is too long")]
    TooLong(String),
}

/// A share in percent outside 0-100 (or not a number); `field` is the
/// path the user wrote it at.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {value} is not a percentage between 0 and 100")]
pub struct PercentError {
    pub field: &'static str,
    pub value: f64,
}

/// A DestinationRule `host` with a wildcard: it names no one service.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("wildcard host {0:?} is not supported; name one service")]
pub struct WildcardHost(pub String);

/// A backendRef (of a rule or of a RequestMirror) the waypoint cannot send to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendRefError {
    /// `kind`: as written, with its group when it has one
    /// ("multicluster.x-k8s.io/ServiceImport").
    #[error("backendRef {name} is a {kind}, only Services are supported")]
    NotAService { name: String, kind: String },
    #[error("backendRef {name} has no port")]
    NoPort { name: String },
}

/// Why one rule of a route is left out whole (serving it without the part
/// we cannot carry would be a different route than the user wrote).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RouteError {
    #[error("more than one ExtensionRef filter")]
    ExtensionRefs,
    #[error("more than one RequestMirror filter; the waypoint mirrors to one backend")]
    Mirrors,
    #[error(
        "both the RequestMirror filter and the TrafficPolicy's mirrorPercentage set the mirrored share"
    )]
    MirrorShareTwice,
    /// `field`: "timeouts.request", "timeouts.backendRequest", "retry.backoff".
    #[error("{field}: {source}")]
    Duration {
        field: &'static str,
        source: DurationError,
    },
    #[error(
        "timeouts.backendRequest ({backend_ms} ms) is longer than timeouts.request ({request_ms} ms)"
    )]
    BackendTimeout { backend_ms: u32, request_ms: u32 },
    #[error("retry code {0} is not an HTTP error status")]
    RetryCode(i64),
    /// A path, header or query regex the waypoint could not compile.
    #[error("regex {regex:?} does not parse: {source}")]
    Regex { regex: String, source: regex::Error },
    #[error(transparent)]
    Backend(#[from] BackendRefError),
    #[error("backendRef {backend} filter {filter} is not supported by the waypoint")]
    BackendFilter { backend: String, filter: String },
    #[error("RequestMirror {0}")]
    MirrorBackend(BackendRefError),
    #[error("RequestMirror sets both percent and fraction")]
    MirrorPercentAndFraction,
    #[error(transparent)]
    Percent(#[from] PercentError),
    #[error("RequestMirror fraction {numerator}/{denominator} is not between 0 and 1")]
    MirrorFraction { numerator: i32, denominator: i32 },
    #[error("redirect status {0} is not 301, 302, 303, 307 or 308")]
    RedirectStatus(i64),
    /// A filter type as the user wrote it ("CORS").
    #[error("filter type {0} is not supported by the waypoint")]
    Filter(String),
    #[error(
        "ExtensionRef to {group}/{kind} {name} is not supported (only {EXTENSIONS_GROUP}/{TRAFFIC_POLICY_KIND})"
    )]
    ExtensionKind {
        group: String,
        kind: String,
        name: String,
    },
    #[error("ExtensionRef TrafficPolicy {name} does not exist in namespace {namespace}")]
    ExtensionMissing { name: String, namespace: String },
    /// `problems`: each named by its field path (see `route_extension`).
    #[error("ExtensionRef TrafficPolicy {name} is invalid: {}", problems.join("; "))]
    ExtensionInvalid { name: String, problems: Vec<String> },
}
