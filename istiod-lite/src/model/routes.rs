//! HTTPRoutes (GAMMA: parentRef a Service) to the waypoint's route type,
//! `mesh.waypoint.Route`. One output route per (rule, match), sorted in
//! Gateway API precedence order, so a waypoint only walks a list.
//!
//! What cannot be carried is reported, never dropped silently: a rule with a
//! filter we do not implement is left out whole (serving it without the
//! filter would be a different route than the user wrote).
//!
//! What Gateway API has no field for (fault injection, the mirrored share,
//! the retry budget) comes from our TrafficPolicy CRD, named by the rule's
//! `ExtensionRef` filter.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use gateway_api::apis::experimental::httproutes::{
    HttpRoute, HttpRouteRules, HttpRouteRulesFilters, HttpRouteRulesFiltersExtensionRef,
    HttpRouteRulesFiltersRequestMirror, HttpRouteRulesMatches, HttpRouteRulesMatchesHeadersType,
    HttpRouteRulesMatchesMethod, HttpRouteRulesMatchesPathType,
    HttpRouteRulesMatchesQueryParamsType,
};
use mesh_proto::mesh::waypoint as pb;
use pb::string_match::Kind as SM;

use crate::config::crds::{
    DestinationRule, EXTENSIONS_GROUP, FailureMode, RateLimitBy, RateLimitSpec, TrafficPolicy,
};

/// TrafficPolicy objects by (namespace, name), where ExtensionRef filters
/// look them up.
pub type TrafficPolicies = BTreeMap<(String, String), TrafficPolicy>;

const TRAFFIC_POLICY_KIND: &str = "TrafficPolicy";
/// All requests, in the proto's per-million shares.
const ALL: u32 = 1_000_000;

/// Default retry budget when a route asks for retries: retries in flight
/// stay under 20% of requests in flight (Envoy's default budget), at least 3.
const RETRY_BUDGET_PERCENT: u32 = 20;
const MIN_RETRY_CONCURRENCY: u32 = 3;
/// Gateway API's documented default when `retry.backoff` is unset is
/// implementation-specific; 25 ms matches Envoy's base interval.
const DEFAULT_BACKOFF_MS: u32 = 25;

/// The unit at the start of `rest` (h, m, s or ms): milliseconds per unit
/// and the unit's length.
fn duration_unit(rest: &str) -> Option<(u64, usize)> {
    if rest.starts_with("ms") {
        Some((1, 2))
    } else {
        match rest.as_bytes().first()? {
            b'h' => Some((3_600_000, 1)),
            b'm' => Some((60_000, 1)),
            b's' => Some((1_000, 1)),
            _ => None,
        }
    }
}

/// A Gateway API `Duration` (GEP-2257): 1 to 4 groups of up to 5 digits
/// followed by h, m, s or ms, e.g. "1m30s", "500ms". Returns milliseconds.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let bad =
        || format!("{s:?} is not a Gateway API duration (e.g. \"10s\", \"1m30s\", \"500ms\")");
    let (mut rest, mut total, mut groups) = (s, 0u64, 0);
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 5 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit, len) = duration_unit(rest).ok_or_else(bad)?;
        rest = &rest[len..];
        total += n * unit;
        groups += 1;
    }
    if groups == 0 || groups > 4 {
        return Err(bad());
    }
    Ok(total)
}

/// The Services (namespace, name) an HTTPRoute attaches to.
pub fn service_parents(route: &HttpRoute) -> Vec<(String, String)> {
    let ns = route.metadata.namespace.as_deref().unwrap_or_default();
    route
        .spec
        .parent_refs
        .iter()
        .flatten()
        .filter(|p| {
            p.kind.as_deref() == Some("Service") && p.group.as_deref().unwrap_or("").is_empty()
        })
        .map(|p| {
            (
                p.namespace.clone().unwrap_or_else(|| ns.to_string()),
                p.name.clone(),
            )
        })
        .collect()
}

fn string_match(kind: SM) -> pb::StringMatch {
    pb::StringMatch { kind: Some(kind) }
}

fn method(m: &HttpRouteRulesMatchesMethod) -> &'static str {
    use HttpRouteRulesMatchesMethod as M;
    match m {
        M::Get => "GET",
        M::Head => "HEAD",
        M::Post => "POST",
        M::Put => "PUT",
        M::Delete => "DELETE",
        M::Connect => "CONNECT",
        M::Options => "OPTIONS",
        M::Trace => "TRACE",
        M::Patch => "PATCH",
    }
}

fn regex_ok(r: &str) -> Result<(), String> {
    // The waypoint compiles with the same crate and the same whole-string
    // wrapping, so what passes here runs there.
    regex::Regex::new(&format!("^(?:{r})$"))
        .map(|_| ())
        .map_err(|e| format!("regex {r:?} does not parse: {e}"))
}

fn name_value(name: String, value: &str, regex: bool) -> Result<pb::HeaderMatch, String> {
    let kind = if regex {
        regex_ok(value)?;
        SM::Regex(value.into())
    } else {
        SM::Exact(value.into())
    };
    Ok(pb::HeaderMatch {
        name,
        value: Some(string_match(kind)),
    })
}

fn request_match(m: &HttpRouteRulesMatches) -> Result<pb::RouteMatch, String> {
    let path = match &m.path {
        None => None,
        Some(p) => {
            let v = p.value.clone().unwrap_or_else(|| "/".into());
            Some(string_match(
                match p
                    .r#type
                    .as_ref()
                    .unwrap_or(&HttpRouteRulesMatchesPathType::PathPrefix)
                {
                    HttpRouteRulesMatchesPathType::Exact => SM::Exact(v),
                    HttpRouteRulesMatchesPathType::PathPrefix => {
                        // "/a/" and "/a" match the same paths.
                        let t = v.trim_end_matches('/');
                        SM::Prefix(if t.is_empty() { "/".into() } else { t.into() })
                    }
                    HttpRouteRulesMatchesPathType::RegularExpression => {
                        regex_ok(&v)?;
                        SM::Regex(v)
                    }
                },
            ))
        }
    };
    // Header and query matches have distinct generated types of one shape.
    macro_rules! name_values {
        ($list:expr, $regex:path, $name:expr) => {
            $list
                .iter()
                .flatten()
                .map(|h| name_value($name(&h.name), &h.value, matches!(h.r#type, Some($regex))))
                .collect::<Result<Vec<_>, _>>()?
        };
    }
    let headers = name_values!(
        m.headers,
        HttpRouteRulesMatchesHeadersType::RegularExpression,
        |n: &String| n.to_ascii_lowercase()
    );
    // Query parameter names are case-sensitive, unlike header names.
    let query_params = name_values!(
        m.query_params,
        HttpRouteRulesMatchesQueryParamsType::RegularExpression,
        String::clone
    );
    Ok(pb::RouteMatch {
        path,
        headers,
        query_params,
        method: m.method.as_ref().map(method).unwrap_or_default().into(),
    })
}

fn headers<'a>(v: impl Iterator<Item = (&'a str, &'a str)>) -> Vec<pb::Header> {
    v.map(|(n, v)| pb::Header {
        name: n.to_ascii_lowercase(),
        value: v.into(),
    })
    .collect()
}

/// Builds a HeaderEdit from any of Gateway API's (structurally identical)
/// header-modifier types.
macro_rules! header_edit {
    ($m:expr) => {{
        let m = $m;
        pb::HeaderEdit {
            set: headers(
                m.set
                    .iter()
                    .flatten()
                    .map(|h| (h.name.as_str(), h.value.as_str())),
            ),
            add: headers(
                m.add
                    .iter()
                    .flatten()
                    .map(|h| (h.name.as_str(), h.value.as_str())),
            ),
            remove: m
                .remove
                .iter()
                .flatten()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
        }
    }};
}

macro_rules! path_modifier {
    ($p:expr) => {{
        let p = $p;
        match (&p.replace_full_path, &p.replace_prefix_match) {
            (Some(f), _) => Some(pb::PathModifier {
                kind: Some(pb::path_modifier::Kind::ReplaceFullPath(f.clone())),
            }),
            (None, Some(x)) => Some(pb::PathModifier {
                kind: Some(pb::path_modifier::Kind::ReplacePrefixMatch(x.clone())),
            }),
            (None, None) => None,
        }
    }};
}

/// A filter type as the user wrote it ("CORS", not the Rust variant).
fn type_name(t: &impl serde::Serialize) -> String {
    match serde_json::to_value(t) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "(unknown)".into(),
    }
}

fn filter(f: &HttpRouteRulesFilters) -> Result<pb::Filter, String> {
    use pb::filter::Kind;
    let kind = if let Some(m) = &f.request_header_modifier {
        Kind::RequestHeaders(header_edit!(m))
    } else if let Some(m) = &f.response_header_modifier {
        Kind::ResponseHeaders(header_edit!(m))
    } else if let Some(r) = &f.request_redirect {
        let scheme = r
            .scheme
            .as_ref()
            .map(|s| format!("{s:?}").to_ascii_lowercase())
            .unwrap_or_default();
        let status_code = match r.status_code.unwrap_or(302) {
            c @ (301 | 302 | 303 | 307 | 308) => c as u32,
            c => {
                return Err(format!(
                    "redirect status {c} is not 301, 302, 303, 307 or 308"
                ));
            }
        };
        Kind::Redirect(pb::Redirect {
            scheme,
            hostname: r.hostname.clone().unwrap_or_default(),
            port: r.port.unwrap_or(0).max(0) as u32,
            path: r.path.as_ref().and_then(|p| path_modifier!(p)),
            status_code,
        })
    } else if let Some(r) = &f.url_rewrite {
        Kind::Rewrite(pb::Rewrite {
            hostname: r.hostname.clone().unwrap_or_default(),
            path: r.path.as_ref().and_then(|p| path_modifier!(p)),
        })
    } else {
        return Err(format!(
            "filter type {} is not supported by the waypoint",
            type_name(&f.r#type)
        ));
    };
    Ok(pb::Filter { kind: Some(kind) })
}

/// A Service reference ("namespace/hostname", port), as backendRefs and
/// mirror backendRefs both name one.
fn service_ref(
    group: Option<&str>,
    kind: Option<&str>,
    name: &str,
    namespace: Option<&str>,
    port: Option<i32>,
    route_ns: &str,
    domain_suffix: &str,
) -> Result<(String, u32), String> {
    if kind.unwrap_or("Service") != "Service" || !group.unwrap_or("").is_empty() {
        return Err(format!(
            "backendRef {name} is a {}, only Services are supported",
            kind.unwrap_or("Service")
        ));
    }
    let Some(port) = port else {
        return Err(format!("backendRef {name} has no port"));
    };
    let ns = namespace.unwrap_or(route_ns);
    Ok((
        format!("{ns}/{name}.{ns}.svc.{domain_suffix}"),
        port.max(0) as u32,
    ))
}

fn backends(
    rule: &HttpRouteRules,
    route_ns: &str,
    domain_suffix: &str,
) -> Result<Vec<pb::WeightedBackend>, String> {
    let mut out = Vec::new();
    for b in rule.backend_refs.iter().flatten() {
        let (service, port) = service_ref(
            b.group.as_deref(),
            b.kind.as_deref(),
            &b.name,
            b.namespace.as_deref(),
            b.port,
            route_ns,
            domain_suffix,
        )?;
        let (mut req, mut resp) = (None, None);
        for f in b.filters.iter().flatten() {
            if let Some(m) = &f.request_header_modifier {
                req = Some(header_edit!(m));
            } else if let Some(m) = &f.response_header_modifier {
                resp = Some(header_edit!(m));
            } else {
                return Err(format!(
                    "backendRef {} filter {} is not supported by the waypoint",
                    b.name,
                    type_name(&f.r#type)
                ));
            }
        }
        out.push(pb::WeightedBackend {
            service,
            port,
            weight: b.weight.unwrap_or(1).max(0) as u32,
            request_headers: req,
            response_headers: resp,
        });
    }
    Ok(out)
}

/// A share in percent (0-100, fractions allowed) in millionths.
fn percent_per_million(field: &str, v: f64) -> Result<u32, String> {
    if !v.is_finite() || !(0.0..=100.0).contains(&v) {
        return Err(format!(
            "{field}: {v} is not a percentage between 0 and 100"
        ));
    }
    Ok((v * 10_000.0).round() as u32)
}

/// A RequestMirror filter: its backend, and its share in millionths when
/// the filter sets one (`percent` or `fraction`).
fn request_mirror(
    m: &HttpRouteRulesFiltersRequestMirror,
    route_ns: &str,
    domain_suffix: &str,
) -> Result<(pb::WeightedBackend, Option<u32>), String> {
    let b = &m.backend_ref;
    let (service, port) = service_ref(
        b.group.as_deref(),
        b.kind.as_deref(),
        &b.name,
        b.namespace.as_deref(),
        b.port,
        route_ns,
        domain_suffix,
    )
    .map_err(|e| format!("RequestMirror {e}"))?;
    let share = match (m.percent, &m.fraction) {
        (Some(_), Some(_)) => {
            return Err("RequestMirror sets both percent and fraction".into());
        }
        (Some(p), None) => Some(percent_per_million("RequestMirror percent", p as f64)?),
        (None, Some(f)) => {
            let d = f.denominator.unwrap_or(100);
            if d <= 0 || f.numerator < 0 || f.numerator > d {
                return Err(format!(
                    "RequestMirror fraction {}/{d} is not between 0 and 1",
                    f.numerator
                ));
            }
            Some((f.numerator as u64 * ALL as u64 / d as u64) as u32)
        }
        (None, None) => None,
    };
    Ok((
        pb::WeightedBackend {
            service,
            port,
            weight: 1,
            ..Default::default()
        },
        share,
    ))
}

/// What a TrafficPolicy adds to the routes of a rule that references it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteExtension {
    pub fault: Option<pb::Fault>,
    /// Share of requests the rule's RequestMirror mirrors, in millionths.
    pub mirror_per_million: Option<u32>,
    /// (budget_percent, min_retry_concurrency) for the rule's retries.
    pub retry_budget: Option<(u32, u32)>,
    pub rate_limit: Option<pb::RateLimit>,
}

/// The TrafficPolicy whose rateLimit is its namespace's default.
pub const DEFAULT_TRAFFIC_POLICY: &str = "default";

/// A TrafficPolicy's rateLimit as the waypoint applies it; errors by path.
fn rate_limit(r: &RateLimitSpec, source: String, errs: &mut Vec<String>) -> pb::RateLimit {
    let fill_interval_ms = match r.per.as_deref().map(parse_istio_duration) {
        None => 1000,
        Some(Ok(ms)) if (1..=u64::from(u32::MAX)).contains(&ms) => ms as u32,
        Some(Ok(_)) => {
            errs.push("spec.rateLimit.per: must be between 1ms and ~49 days".into());
            1000
        }
        Some(Err(e)) => {
            errs.push(format!("spec.rateLimit.per: {e}"));
            1000
        }
    };
    if r.requests == 0 {
        errs.push("spec.rateLimit.requests: must be at least 1 (to refuse everything, use an AuthorizationPolicy)".into());
    }
    let max_tokens = r.burst.unwrap_or(r.requests);
    if max_tokens == 0 {
        errs.push("spec.rateLimit.burst: must be at least 1".into());
    }
    let by = r.by.unwrap_or_default();
    let header = match (by, r.header.as_deref()) {
        (RateLimitBy::Header, Some(h)) if http::HeaderName::from_bytes(h.as_bytes()).is_ok() => {
            h.to_ascii_lowercase()
        }
        (RateLimitBy::Header, Some(h)) => {
            errs.push(format!("spec.rateLimit.header: {h:?} is not a header name"));
            String::new()
        }
        (RateLimitBy::Header, None) => {
            errs.push("spec.rateLimit.header: required with by: Header".into());
            String::new()
        }
        (_, Some(_)) => {
            errs.push("spec.rateLimit.header: only meaningful with by: Header".into());
            String::new()
        }
        (_, None) => String::new(),
    };
    let global = r.global.as_ref().map(|g| {
        let ok = g
            .store
            .strip_prefix("redis://")
            .is_some_and(|rest| !rest.is_empty());
        if !ok {
            errs.push(format!(
                "spec.rateLimit.global.store: {:?} is not redis://host:port",
                g.store
            ));
        }
        pb::GlobalRateLimit {
            store: g.store.clone(),
            fail_closed: g.failure_mode == Some(FailureMode::Closed),
        }
    });
    pb::RateLimit {
        max_tokens,
        tokens_per_fill: r.requests,
        fill_interval_ms,
        key: match by {
            RateLimitBy::Route => pb::RateLimitKey::Route,
            RateLimitBy::SourcePrincipal => pb::RateLimitKey::SourcePrincipal,
            RateLimitBy::Header => pb::RateLimitKey::Header,
        } as i32,
        header,
        global,
        source,
    }
}

/// Checks a TrafficPolicy field by field: every problem is named by its
/// path; any problem makes the whole object unusable.
pub fn route_extension(tp: &TrafficPolicy) -> Result<RouteExtension, Vec<String>> {
    /// A share that defaults to all requests.
    fn pct(errs: &mut Vec<String>, field: &str, v: Option<f64>) -> u32 {
        match v.map(|v| percent_per_million(field, v)) {
            None => ALL,
            Some(Ok(p)) => p,
            Some(Err(e)) => {
                errs.push(e);
                0
            }
        }
    }
    let mut out = RouteExtension::default();
    let mut errs = Vec::new();
    if let Some(f) = &tp.spec.fault {
        let mut fault = pb::Fault::default();
        if let Some(d) = &f.delay {
            fault.delay_per_million = pct(&mut errs, "spec.fault.delay.percentage", d.percentage);
            match parse_istio_duration(&d.fixed_delay) {
                Ok(ms) => fault.delay_ms = ms.min(u32::MAX as u64) as u32,
                Err(e) => errs.push(format!("spec.fault.delay.fixedDelay: {e}")),
            }
        }
        if let Some(a) = &f.abort {
            fault.abort_per_million = pct(&mut errs, "spec.fault.abort.percentage", a.percentage);
            if (200..=599).contains(&a.http_status) {
                fault.abort_status = a.http_status as u32;
            } else {
                errs.push(format!(
                    "spec.fault.abort.httpStatus: {} is not an HTTP status (200-599)",
                    a.http_status
                ));
            }
        }
        if f.delay.is_none() && f.abort.is_none() {
            errs.push("spec.fault: neither delay nor abort is set".into());
        }
        out.fault = Some(fault);
    }
    if let Some(m) = tp.spec.mirror_percentage {
        out.mirror_per_million = Some(pct(&mut errs, "spec.mirrorPercentage", Some(m)));
    }
    if let Some(b) = &tp.spec.retry_budget {
        let percent = match b.percent {
            None => RETRY_BUDGET_PERCENT,
            Some(p) if p.is_finite() && (0.0..=100.0).contains(&p) => {
                // Whole percents; a share above zero never rounds to none.
                let whole = p.round() as u32;
                if p > 0.0 { whole.max(1) } else { 0 }
            }
            Some(p) => {
                errs.push(format!(
                    "spec.retryBudget.percent: {p} is not a percentage between 0 and 100"
                ));
                0
            }
        };
        out.retry_budget = Some((
            percent,
            b.min_retry_concurrency.unwrap_or(MIN_RETRY_CONCURRENCY),
        ));
    }
    if let Some(r) = &tp.spec.rate_limit {
        let source = format!(
            "{}/{}",
            tp.metadata.namespace.as_deref().unwrap_or_default(),
            tp.metadata.name.as_deref().unwrap_or_default()
        );
        out.rate_limit = Some(rate_limit(r, source, &mut errs));
    }
    if errs.is_empty() { Ok(out) } else { Err(errs) }
}

/// A namespace's default rate limit: the valid rateLimit of its
/// TrafficPolicy named `default`.
pub fn default_rate_limit(ns: &str, exts: &TrafficPolicies) -> Option<pb::RateLimit> {
    let tp = exts.get(&(ns.to_string(), DEFAULT_TRAFFIC_POLICY.to_string()))?;
    route_extension(tp).ok()?.rate_limit
}

/// The TrafficPolicy names an HTTPRoute's rules reference, so a change to
/// one recomputes the routes that use it.
pub fn extension_refs(route: &HttpRoute) -> impl Iterator<Item = &str> {
    route
        .spec
        .rules
        .iter()
        .flatten()
        .flat_map(|r| r.filters.iter().flatten())
        .filter_map(|f| f.extension_ref.as_ref())
        .filter(|r| r.group == EXTENSIONS_GROUP && r.kind == TRAFFIC_POLICY_KIND)
        .map(|r| r.name.as_str())
}

fn extension(
    r: &HttpRouteRulesFiltersExtensionRef,
    route_ns: &str,
    exts: &TrafficPolicies,
) -> Result<RouteExtension, String> {
    if r.group != EXTENSIONS_GROUP || r.kind != TRAFFIC_POLICY_KIND {
        return Err(format!(
            "ExtensionRef to {}/{} {} is not supported (only {EXTENSIONS_GROUP}/{TRAFFIC_POLICY_KIND})",
            r.group, r.kind, r.name
        ));
    }
    let tp = exts
        .get(&(route_ns.to_string(), r.name.clone()))
        .ok_or_else(|| {
            format!(
                "ExtensionRef TrafficPolicy {} does not exist in namespace {route_ns}",
                r.name
            )
        })?;
    route_extension(tp).map_err(|e| {
        format!(
            "ExtensionRef TrafficPolicy {} is invalid: {}",
            r.name,
            e.join("; ")
        )
    })
}

/// The routes of one rule. Problems that leave the rule out are the error;
/// settings that have no effect are noted in `notes` and the rule is kept.
fn rule_routes(
    rule: &HttpRouteRules,
    name: &str,
    route_ns: &str,
    domain_suffix: &str,
    exts: &TrafficPolicies,
    notes: &mut Vec<String>,
) -> Result<Vec<pb::Route>, String> {
    let mut filters = Vec::new();
    let mut ext: Option<RouteExtension> = None;
    let mut mirror: Option<(pb::WeightedBackend, Option<u32>)> = None;
    for f in rule.filters.iter().flatten() {
        if let Some(r) = &f.extension_ref {
            if ext.is_some() {
                return Err("more than one ExtensionRef filter".into());
            }
            ext = Some(extension(r, route_ns, exts)?);
        } else if let Some(m) = &f.request_mirror {
            if mirror.is_some() {
                return Err(
                    "more than one RequestMirror filter; the waypoint mirrors to one backend"
                        .into(),
                );
            }
            mirror = Some(request_mirror(m, route_ns, domain_suffix)?);
        } else {
            filters.push(filter(f)?);
        }
    }
    let ext = ext.unwrap_or_default();
    let mirror = match (mirror, ext.mirror_per_million) {
        (Some((_, Some(_))), Some(_)) => {
            return Err(
                "both the RequestMirror filter and the TrafficPolicy's mirrorPercentage set the mirrored share"
                    .into(),
            );
        }
        (Some((backend, own)), from_ext) => Some(pb::Mirror {
            backend: Some(backend),
            per_million: own.or(from_ext).unwrap_or(ALL),
        }),
        (None, Some(_)) => {
            notes.push(
                "the TrafficPolicy sets mirrorPercentage but the rule has no RequestMirror filter; ignored"
                    .into(),
            );
            None
        }
        (None, None) => None,
    };
    if ext.retry_budget.is_some() && rule.retry.is_none() {
        notes.push("the TrafficPolicy sets retryBudget but the rule has no retry; ignored".into());
    }
    let backends = backends(rule, route_ns, domain_suffix)?;
    let ms = |s: &Option<String>| -> Result<u32, String> {
        s.as_deref()
            .map(parse_duration)
            .transpose()
            .map(|v| v.unwrap_or(0).min(u32::MAX as u64) as u32)
    };
    let (request_timeout_ms, per_try_timeout_ms) = match &rule.timeouts {
        Some(t) => (ms(&t.request)?, ms(&t.backend_request)?),
        None => (0, 0),
    };
    if request_timeout_ms != 0 && per_try_timeout_ms > request_timeout_ms {
        return Err(format!(
            "timeouts.backendRequest ({per_try_timeout_ms} ms) is longer than timeouts.request ({request_timeout_ms} ms)"
        ));
    }
    let retry = match &rule.retry {
        None => None,
        Some(r) => {
            let mut codes = Vec::new();
            for c in r.codes.iter().flatten() {
                if !(400..=599).contains(c) {
                    return Err(format!("retry code {c} is not an HTTP error status"));
                }
                codes.push(*c as u32);
            }
            Some(pb::Retry {
                attempts: r.attempts.unwrap_or(1).clamp(0, 10) as u32,
                codes,
                backoff_ms: match &r.backoff {
                    Some(b) => parse_duration(b)?.min(u32::MAX as u64) as u32,
                    None => DEFAULT_BACKOFF_MS,
                },
                budget_percent: ext.retry_budget.map_or(RETRY_BUDGET_PERCENT, |b| b.0),
                min_retry_concurrency: ext.retry_budget.map_or(MIN_RETRY_CONCURRENCY, |b| b.1),
            })
        }
    };
    let base = pb::Route {
        name: name.to_string(),
        request_match: None,
        filters,
        backends,
        request_timeout_ms,
        per_try_timeout_ms,
        retry,
        fault: ext.fault,
        mirror,
        rate_limit: ext.rate_limit,
    };
    let matches = rule.matches.as_deref().unwrap_or_default();
    if matches.is_empty() {
        // No matches means a PathPrefix "/" match.
        return Ok(vec![pb::Route {
            request_match: Some(pb::RouteMatch {
                path: Some(string_match(SM::Prefix("/".into()))),
                ..Default::default()
            }),
            ..base
        }]);
    }
    matches
        .iter()
        .map(|m| {
            Ok(pb::Route {
                request_match: Some(request_match(m)?),
                ..base.clone()
            })
        })
        .collect()
}

/// The routes one HTTPRoute contributes, with the reasons any rule was
/// left out (and settings that had no effect).
pub fn convert(
    route: &HttpRoute,
    domain_suffix: &str,
    exts: &TrafficPolicies,
) -> (Vec<pb::Route>, Vec<String>) {
    let ns = route.metadata.namespace.as_deref().unwrap_or_default();
    let rname = route.metadata.name.as_deref().unwrap_or_default();
    let (mut out, mut issues) = (Vec::new(), Vec::new());
    for (pns, pname) in service_parents(route) {
        if pns != ns {
            issues.push(format!(
                "parentRef Service {pns}/{pname} is in another namespace; consumer routes are not supported, the route does not apply to it"
            ));
        }
    }
    for (i, rule) in route.spec.rules.iter().flatten().enumerate() {
        let name = format!("{ns}/{rname}/{i}");
        let mut notes = Vec::new();
        match rule_routes(rule, &name, ns, domain_suffix, exts, &mut notes) {
            Ok(r) => out.extend(r),
            Err(e) => issues.push(format!("rule {i} left out: {e}")),
        }
        issues.extend(notes.into_iter().map(|n| format!("rule {i}: {n}")));
    }
    (out, issues)
}

/// Gateway API precedence between two matches (most specific first).
fn precedence(a: &pb::RouteMatch, b: &pb::RouteMatch) -> Ordering {
    let path_rank = |m: &pb::RouteMatch| match m.path.as_ref().and_then(|p| p.kind.as_ref()) {
        Some(SM::Exact(p)) => (2, p.len()),
        Some(SM::Prefix(p)) => (1, p.len()),
        // Regex precedence is implementation-specific; ours ranks it below
        // every exact and prefix match, so a regex never shadows them.
        Some(SM::Regex(_)) => (0, 0),
        None => (1, 1),
    };
    path_rank(b)
        .cmp(&path_rank(a))
        .then_with(|| (!b.method.is_empty()).cmp(&!a.method.is_empty()))
        .then_with(|| b.headers.len().cmp(&a.headers.len()))
        .then_with(|| b.query_params.len().cmp(&a.query_params.len()))
}

/// Sorts routes gathered from several HTTPRoutes. `routes` must be in
/// (oldest route, route name) order already; the sort is stable, so that
/// order breaks ties as Gateway API requires.
pub fn sort(routes: &mut [pb::Route]) {
    let none = pb::RouteMatch::default();
    routes.sort_by(|a, b| {
        precedence(
            a.request_match.as_ref().unwrap_or(&none),
            b.request_match.as_ref().unwrap_or(&none),
        )
    });
}

/// An Istio duration as DestinationRules carry them: Go's format limited to
/// h, m, s and ms units with optional fractions ("30s", "1m30s", "0.5s").
pub fn parse_istio_duration(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a duration (e.g. \"30s\", \"1m\", \"0.5s\")");
    let (mut rest, mut total) = (s, 0f64);
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let n = rest
            .bytes()
            .take_while(|b| b.is_ascii_digit() || *b == b'.')
            .count();
        let v: f64 = rest[..n].parse().map_err(|_| bad())?;
        rest = &rest[n..];
        let (unit, len) = duration_unit(rest).ok_or_else(bad)?;
        rest = &rest[len..];
        total += v * unit as f64;
    }
    if total > u32::MAX as f64 {
        return Err(format!("{s:?} is too long"));
    }
    Ok(total.round() as u64)
}

/// Which service a DestinationRule `host` names: a short name is relative
/// to the rule's namespace. Wildcard hosts are not supported (reported).
pub fn destination_host(host: &str, dr_ns: &str, domain_suffix: &str) -> Result<String, String> {
    if host.contains('*') {
        return Err(format!(
            "wildcard host {host:?} is not supported; name one service"
        ));
    }
    Ok(if host.contains('.') {
        host.to_string()
    } else {
        format!("{host}.{dr_ns}.svc.{domain_suffix}")
    })
}

/// A DestinationRule's traffic policy as the waypoint's backend policy,
/// with a reason for each field it could not take (that field is left at
/// the waypoint's default; the others still apply).
pub fn backend_policy(dr: &DestinationRule) -> (pb::BackendPolicy, Vec<String>) {
    let mut out = pb::BackendPolicy::default();
    let mut issues = Vec::new();
    let Some(tp) = &dr.spec.traffic_policy else {
        return (out, issues);
    };
    let mut ms = |field: &str, v: &Option<String>| -> u32 {
        match v.as_deref().map(parse_istio_duration) {
            None => 0,
            Some(Ok(ms)) => ms as u32,
            Some(Err(e)) => {
                issues.push(format!("{field}: {e}"));
                0
            }
        }
    };
    if let Some(cp) = &tp.connection_pool {
        if let Some(tcp) = &cp.tcp {
            out.max_connections = tcp.max_connections.unwrap_or(0);
            out.connect_timeout_ms = ms("connectionPool.tcp.connectTimeout", &tcp.connect_timeout);
        }
        if let Some(h) = &cp.http {
            out.max_pending_requests = h.http1_max_pending_requests.unwrap_or(0);
            out.max_requests = h.http2_max_requests.unwrap_or(0);
            out.max_requests_per_connection = h.max_requests_per_connection.unwrap_or(0);
            out.max_retries = h.max_retries.unwrap_or(0);
            out.idle_timeout_ms = ms("connectionPool.http.idleTimeout", &h.idle_timeout);
        }
    }
    if let Some(od) = &tp.outlier_detection {
        // Istio's defaults where the rule leaves a field out.
        let or = |v: u32, d: u32| if v == 0 { d } else { v };
        out.outlier_detection = Some(pb::OutlierDetection {
            consecutive_5xx: od.consecutive_5xx_errors.unwrap_or(5),
            interval_ms: or(ms("outlierDetection.interval", &od.interval), 10_000),
            base_ejection_ms: or(
                ms("outlierDetection.baseEjectionTime", &od.base_ejection_time),
                30_000,
            ),
            max_ejection_percent: od.max_ejection_percent.unwrap_or(10).min(100),
        });
    }
    if let Some(simple) = tp.load_balancer.as_ref().and_then(|l| l.simple.as_deref()) {
        out.load_balancer = match simple {
            "LEAST_REQUEST" | "UNSPECIFIED" => pb::LoadBalancer::LeastRequest,
            "ROUND_ROBIN" => pb::LoadBalancer::RoundRobin,
            "RANDOM" => pb::LoadBalancer::Random,
            other => {
                issues.push(format!(
                    "loadBalancer.simple {other:?} is not supported (LEAST_REQUEST, ROUND_ROBIN, RANDOM); using LEAST_REQUEST"
                ));
                pb::LoadBalancer::LeastRequest
            }
        } as i32;
    }
    (out, issues)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(yaml: &str) -> HttpRoute {
        serde_yaml::from_str(yaml).expect("test route parses")
    }

    const CANARY: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
  rules:
  - matches:
    - headers: [{name: X-User, value: tester}]
    backendRefs: [{name: reviews-v2, port: 9080}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: X-Canary, value: "1"}], remove: [X-Debug]}
  - backendRefs:
    - {name: reviews-v1, port: 9080, weight: 90}
    - {name: reviews-v2, port: 9080, weight: 10}
    timeouts: {request: 2s, backendRequest: 500ms}
    retry: {attempts: 3, codes: [503, 502], backoff: 100ms}
"#;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(10_000));
        assert_eq!(parse_duration("500ms"), Ok(500));
        assert_eq!(parse_duration("1h1m1s1ms"), Ok(3_661_001));
        for bad in ["", "10", "1d", "s", "1.5s", "123456s", "1s1s1s1s1s", "-1s"] {
            let e = parse_duration(bad).expect_err(bad);
            assert!(e.contains("not a Gateway API duration"), "{e}");
        }
    }

    #[test]
    fn canary_route_translates() {
        let r = route(CANARY);
        assert_eq!(
            service_parents(&r),
            vec![("shop".to_string(), "reviews".to_string())]
        );
        let (mut routes, issues) = convert(&r, "cluster.local", &TrafficPolicies::new());
        assert!(issues.is_empty(), "{issues:?}");
        sort(&mut routes);
        assert_eq!(routes.len(), 2);

        let header = &routes[0];
        assert_eq!(header.name, "shop/reviews/0");
        let m = header.request_match.as_ref().expect("match");
        assert_eq!(m.headers[0].name, "x-user");
        assert_eq!(
            m.headers[0].value.as_ref().and_then(|v| v.kind.clone()),
            Some(SM::Exact("tester".into()))
        );
        assert_eq!(header.backends.len(), 1);
        assert_eq!(
            header.backends[0].service,
            "shop/reviews-v2.shop.svc.cluster.local"
        );
        let Some(pb::filter::Kind::RequestHeaders(edit)) = &header.filters[0].kind else {
            panic!("header edit expected: {:?}", header.filters)
        };
        assert_eq!(edit.set[0].name, "x-canary");
        assert_eq!(edit.remove, vec!["x-debug".to_string()]);

        let split = &routes[1];
        assert_eq!(
            split
                .backends
                .iter()
                .map(|b| (b.service.as_str(), b.weight))
                .collect::<Vec<_>>(),
            vec![
                ("shop/reviews-v1.shop.svc.cluster.local", 90),
                ("shop/reviews-v2.shop.svc.cluster.local", 10)
            ]
        );
        assert_eq!(
            (split.request_timeout_ms, split.per_try_timeout_ms),
            (2000, 500)
        );
        let retry = split.retry.as_ref().expect("retry");
        assert_eq!((retry.attempts, retry.backoff_ms), (3, 100));
        assert_eq!(retry.codes, vec![503, 502]);
        assert_eq!(retry.budget_percent, RETRY_BUDGET_PERCENT);
    }

    #[test]
    fn precedence_orders_matches() {
        let r = route(
            r#"
metadata: {name: r, namespace: ns}
spec:
  parentRefs: [{kind: Service, group: "", name: s}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /a}}]
    backendRefs: [{name: prefix-short, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /a/b/}}]
    backendRefs: [{name: prefix-long, port: 80}]
  - matches: [{path: {type: Exact, value: /a}}]
    backendRefs: [{name: exact, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /a}, method: POST}]
    backendRefs: [{name: method, port: 80}]
"#,
        );
        let (mut routes, issues) = convert(&r, "cluster.local", &TrafficPolicies::new());
        assert!(issues.is_empty(), "{issues:?}");
        sort(&mut routes);
        let order: Vec<_> = routes
            .iter()
            .map(|r| {
                r.backends[0]
                    .service
                    .split('/')
                    .nth(1)
                    .unwrap_or("")
                    .split('.')
                    .next()
                    .unwrap_or("")
            })
            .collect();
        assert_eq!(
            order,
            vec!["exact", "prefix-long", "method", "prefix-short"]
        );
        // The trailing slash is not part of the prefix.
        let Some(SM::Prefix(p)) = routes[1]
            .request_match
            .as_ref()
            .and_then(|m| m.path.as_ref())
            .and_then(|p| p.kind.clone())
        else {
            panic!("prefix expected")
        };
        assert_eq!(p, "/a/b");
    }

    #[test]
    fn unsupported_and_invalid_rules_are_reported_not_served() {
        let r = route(
            r#"
metadata: {name: r, namespace: ns}
spec:
  parentRefs: [{kind: Service, group: "", name: s}]
  rules:
  - matches: [{path: {type: RegularExpression, value: "/(unclosed"}}]
    backendRefs: [{name: a, port: 80}]
  - backendRefs: [{name: b}]
  - backendRefs: [{name: c, port: 80}]
    timeouts: {request: 1s, backendRequest: 2s}
  - backendRefs: [{name: d, port: 80}]
    retry: {codes: [200]}
  - backendRefs: [{name: e, port: 80}]
    filters: [{type: CORS, cors: {allowOrigins: ["https://x"]}}]
  - backendRefs: [{name: f, port: 80}]
    timeouts: {request: 10 seconds}
  - backendRefs: [{name: ok, port: 80}]
"#,
        );
        let (routes, issues) = convert(&r, "cluster.local", &TrafficPolicies::new());
        assert_eq!(routes.len(), 1, "{routes:?}");
        assert_eq!(routes[0].name, "ns/r/6");
        let want = [
            "rule 0 left out: regex \"/(unclosed\" does not parse",
            "rule 1 left out: backendRef b has no port",
            "rule 2 left out: timeouts.backendRequest (2000 ms) is longer",
            "rule 3 left out: retry code 200 is not an HTTP error status",
            "rule 4 left out: filter type CORS is not supported",
            "rule 5 left out: \"10 seconds\" is not a Gateway API duration",
        ];
        assert_eq!(issues.len(), want.len(), "{issues:?}");
        for (got, want) in issues.iter().zip(want) {
            assert!(got.starts_with(want), "{got:?} should start with {want:?}");
        }
    }

    fn traffic_policies(yaml: &str) -> TrafficPolicies {
        serde_yaml::Deserializer::from_str(yaml)
            .map(|d| {
                let tp: TrafficPolicy =
                    serde::Deserialize::deserialize(d).expect("test TrafficPolicy parses");
                (
                    (
                        tp.metadata.namespace.clone().unwrap_or_default(),
                        tp.metadata.name.clone().unwrap_or_default(),
                    ),
                    tp,
                )
            })
            .collect()
    }

    const EXTENSIONS: &str = r#"
apiVersion: extensions.mesh.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: chaos, namespace: shop}
spec:
  fault:
    delay: {fixedDelay: 1.5s, percentage: 12.5}
    abort: {httpStatus: 503}
  mirrorPercentage: 0.1
  retryBudget: {percent: 35, minRetryConcurrency: 1}
---
apiVersion: extensions.mesh.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: bad, namespace: shop}
spec:
  fault: {delay: {fixedDelay: soon, percentage: 150}, abort: {httpStatus: 700}}
  retryBudget: {percent: -1}
"#;

    #[test]
    fn rate_limits_convert_and_bad_ones_are_named() {
        let exts = traffic_policies(
            r#"
apiVersion: extensions.mesh.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: per-user, namespace: shop}
spec:
  rateLimit: {requests: 5, per: 500ms, burst: 20, by: Header, header: X-User,
              global: {store: "redis://10.0.0.9:6379", failureMode: Closed}}
---
apiVersion: extensions.mesh.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: default, namespace: shop}
spec:
  rateLimit: {requests: 100}
---
apiVersion: extensions.mesh.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: bad, namespace: shop}
spec:
  rateLimit: {requests: 0, per: often, by: Header, global: {store: "http://x"}}
"#,
        );
        let one = |name: &str| {
            route_extension(&exts[&("shop".to_string(), name.to_string())])
                .map(|e| e.rate_limit.expect("a rate limit"))
        };
        let rl = one("per-user").unwrap();
        assert_eq!(
            (rl.max_tokens, rl.tokens_per_fill, rl.fill_interval_ms),
            (20, 5, 500)
        );
        assert_eq!(rl.key, pb::RateLimitKey::Header as i32);
        assert_eq!(rl.header, "x-user");
        assert_eq!(rl.source, "shop/per-user");
        let g = rl.global.expect("global");
        assert!(g.fail_closed);
        assert_eq!(g.store, "redis://10.0.0.9:6379");
        let d = default_rate_limit("shop", &exts).expect("the namespace default");
        assert_eq!(
            (d.max_tokens, d.tokens_per_fill, d.fill_interval_ms, d.key),
            (100, 100, 1000, pb::RateLimitKey::Route as i32)
        );
        assert!(default_rate_limit("other", &exts).is_none());
        let errs = one("bad").unwrap_err();
        for want in [
            "spec.rateLimit.per",
            "spec.rateLimit.requests",
            "spec.rateLimit.burst",
            "spec.rateLimit.header: required",
            "spec.rateLimit.global.store",
        ] {
            assert!(errs.iter().any(|e| e.contains(want)), "{want}: {errs:?}");
        }
    }

    #[test]
    fn extension_ref_adds_fault_mirror_share_and_retry_budget() {
        let r = route(
            r#"
metadata: {name: r, namespace: shop}
spec:
  parentRefs: [{kind: Service, group: "", name: reviews}]
  rules:
  - backendRefs: [{name: reviews, port: 9080}]
    retry: {attempts: 2}
    filters:
    - type: ExtensionRef
      extensionRef: {group: extensions.mesh.dev, kind: TrafficPolicy, name: chaos}
    - type: RequestMirror
      requestMirror: {backendRef: {name: shadow, port: 9080}}
  - matches: [{path: {type: PathPrefix, value: /plain}}]
    backendRefs: [{name: reviews, port: 9080}]
    retry: {attempts: 1}
    filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: shadow, port: 9080}, fraction: {numerator: 1, denominator: 4}}
"#,
        );
        let exts = traffic_policies(EXTENSIONS);
        assert_eq!(extension_refs(&r).collect::<Vec<_>>(), vec!["chaos"]);
        let (mut routes, issues) = convert(&r, "cluster.local", &exts);
        assert!(issues.is_empty(), "{issues:?}");
        sort(&mut routes);
        assert_eq!(routes.len(), 2);
        let (plain, chaos) = (&routes[0], &routes[1]);
        assert_eq!(chaos.name, "shop/r/0");

        let fault = chaos.fault.as_ref().expect("fault");
        assert_eq!(
            (
                fault.delay_ms,
                fault.delay_per_million,
                fault.abort_status,
                fault.abort_per_million
            ),
            (1500, 125_000, 503, ALL),
            "an abort without a percentage aborts every request"
        );
        let mirror = chaos.mirror.as_ref().expect("mirror");
        assert_eq!(mirror.per_million, 1_000);
        assert_eq!(
            mirror
                .backend
                .as_ref()
                .map(|b| (b.service.as_str(), b.port)),
            Some(("shop/shadow.shop.svc.cluster.local", 9080))
        );
        // The mirror is no filter of its own: the route carries it.
        assert!(chaos.filters.is_empty(), "{:?}", chaos.filters);
        let retry = chaos.retry.as_ref().expect("retry");
        assert_eq!((retry.budget_percent, retry.min_retry_concurrency), (35, 1));

        // Without the extension: the filter's own share, default budget, no fault.
        assert!(plain.fault.is_none());
        assert_eq!(plain.mirror.as_ref().map(|m| m.per_million), Some(250_000));
        let retry = plain.retry.as_ref().expect("retry");
        assert_eq!(
            (retry.budget_percent, retry.min_retry_concurrency),
            (RETRY_BUDGET_PERCENT, MIN_RETRY_CONCURRENCY)
        );
    }

    #[test]
    fn a_missing_or_invalid_extension_leaves_the_rule_out() {
        let r = route(
            r#"
metadata: {name: r, namespace: shop}
spec:
  parentRefs: [{kind: Service, group: "", name: reviews}]
  rules:
  - backendRefs: [{name: a, port: 80}]
    filters: [{type: ExtensionRef, extensionRef: {group: extensions.mesh.dev, kind: TrafficPolicy, name: ghost}}]
  - backendRefs: [{name: b, port: 80}]
    filters: [{type: ExtensionRef, extensionRef: {group: extensions.mesh.dev, kind: TrafficPolicy, name: bad}}]
  - backendRefs: [{name: c, port: 80}]
    filters: [{type: ExtensionRef, extensionRef: {group: example.com, kind: Thing, name: chaos}}]
  - backendRefs: [{name: d, port: 80}]
    filters:
    - {type: ExtensionRef, extensionRef: {group: extensions.mesh.dev, kind: TrafficPolicy, name: chaos}}
    - {type: RequestMirror, requestMirror: {backendRef: {name: shadow, port: 80}, percent: 50}}
  - backendRefs: [{name: e, port: 80}]
    filters: [{type: ExtensionRef, extensionRef: {group: extensions.mesh.dev, kind: TrafficPolicy, name: chaos}}]
"#,
        );
        let exts = traffic_policies(EXTENSIONS);
        let (routes, issues) = convert(&r, "cluster.local", &exts);
        // Only the last rule is served; its unused settings are noted.
        assert_eq!(routes.len(), 1, "{routes:?}");
        assert_eq!(routes[0].name, "shop/r/4");
        assert!(routes[0].fault.is_some() && routes[0].mirror.is_none());
        let want = [
            "rule 0 left out: ExtensionRef TrafficPolicy ghost does not exist in namespace shop",
            "rule 1 left out: ExtensionRef TrafficPolicy bad is invalid: spec.fault.delay.percentage: 150 is not a percentage",
            "rule 2 left out: ExtensionRef to example.com/Thing chaos is not supported",
            "rule 3 left out: both the RequestMirror filter and the TrafficPolicy's mirrorPercentage",
            "rule 4: the TrafficPolicy sets mirrorPercentage but the rule has no RequestMirror filter",
            "rule 4: the TrafficPolicy sets retryBudget but the rule has no retry",
        ];
        assert_eq!(issues.len(), want.len(), "{issues:?}");
        for (got, want) in issues.iter().zip(want) {
            assert!(got.starts_with(want), "{got:?} should start with {want:?}");
        }

        // Every problem of the invalid object is named by its field path.
        let errs =
            route_extension(&exts[&("shop".to_string(), "bad".to_string())]).expect_err("invalid");
        let fields: Vec<&str> = errs
            .iter()
            .map(|e| e.split(':').next().unwrap_or_default())
            .collect();
        assert_eq!(
            fields,
            vec![
                "spec.fault.delay.percentage",
                "spec.fault.delay.fixedDelay",
                "spec.fault.abort.httpStatus",
                "spec.retryBudget.percent"
            ]
        );
    }

    #[test]
    fn destination_rules_become_backend_policies() {
        let dr: DestinationRule = serde_yaml::from_str(
            r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: shop}
spec:
  host: web
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 10, connectTimeout: 0.5s}
      http: {http1MaxPendingRequests: 5, maxRetries: 2, idleTimeout: 1m}
    outlierDetection: {consecutive5xxErrors: 3, baseEjectionTime: 1m30s}
    loadBalancer: {simple: PASSTHROUGH}
"#,
        )
        .expect("parses");
        assert_eq!(
            destination_host(&dr.spec.host, "shop", "cluster.local"),
            Ok("web.shop.svc.cluster.local".to_string())
        );
        assert!(destination_host("*.shop.svc.cluster.local", "shop", "x").is_err());
        let (p, issues) = backend_policy(&dr);
        assert_eq!(
            (
                p.max_connections,
                p.connect_timeout_ms,
                p.max_pending_requests
            ),
            (10, 500, 5)
        );
        assert_eq!((p.max_retries, p.idle_timeout_ms), (2, 60_000));
        let od = p.outlier_detection.expect("outlier detection");
        // Fields left out take Istio's defaults.
        assert_eq!(
            (
                od.consecutive_5xx,
                od.interval_ms,
                od.base_ejection_ms,
                od.max_ejection_percent
            ),
            (3, 10_000, 90_000, 10)
        );
        assert_eq!(p.load_balancer, pb::LoadBalancer::LeastRequest as i32);
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert!(issues[0].contains("PASSTHROUGH"), "{issues:?}");

        for bad in ["", "5", "1d", "s", "1..5s"] {
            assert!(parse_istio_duration(bad).is_err(), "{bad:?}");
        }
    }
}
