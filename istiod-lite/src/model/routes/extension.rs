//! Our TrafficPolicy CRD, named by a rule's `ExtensionRef` filter: what it
//! adds to the rule's routes (fault, mirrored share, retry budget, rate limit).

use gateway_api::apis::experimental::httproutes::{HttpRoute, HttpRouteRulesFiltersExtensionRef};
use mesh_proto::mesh::waypoint as pb;

use super::backends::percent_per_million;
use super::durations::parse_istio_duration;
use super::errors::RouteError;
use super::rate_limit::rate_limit;
use super::{
    ALL, MIN_RETRY_CONCURRENCY, RETRY_BUDGET_PERCENT, TRAFFIC_POLICY_KIND, TrafficPolicies,
};
use crate::config::crds::{EXTENSIONS_GROUP, TrafficPolicy};

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

/// Checks a TrafficPolicy field by field: every problem is named by its
/// path; any problem makes the whole object unusable.
pub fn route_extension(tp: &TrafficPolicy) -> Result<RouteExtension, Vec<String>> {
    /// A share that defaults to all requests.
    fn pct(errs: &mut Vec<String>, field: &'static str, v: Option<f64>) -> u32 {
        match v.map(|v| percent_per_million(field, v)) {
            None => ALL,
            Some(Ok(p)) => p,
            Some(Err(e)) => {
                errs.push(e.to_string());
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

pub(super) fn extension(
    r: &HttpRouteRulesFiltersExtensionRef,
    route_ns: &str,
    exts: &TrafficPolicies,
) -> Result<RouteExtension, RouteError> {
    if r.group != EXTENSIONS_GROUP || r.kind != TRAFFIC_POLICY_KIND {
        return Err(RouteError::ExtensionKind {
            group: r.group.clone(),
            kind: r.kind.clone(),
            name: r.name.clone(),
        });
    }
    let tp = exts
        .get(&(route_ns.to_string(), r.name.clone()))
        .ok_or_else(|| RouteError::ExtensionMissing {
            name: r.name.clone(),
            namespace: route_ns.to_string(),
        })?;
    route_extension(tp).map_err(|problems| RouteError::ExtensionInvalid {
        name: r.name.clone(),
        problems,
    })
}
