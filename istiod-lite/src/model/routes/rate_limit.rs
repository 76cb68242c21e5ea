//! A TrafficPolicy's rate limit, and a namespace's default one.

use mesh_proto::mesh::waypoint as pb;

use super::TrafficPolicies;
use super::durations::parse_istio_duration;
use super::extension::{DEFAULT_TRAFFIC_POLICY, route_extension};
use crate::config::crds::{FailureMode, RateLimitBy, RateLimitSpec};

/// A TrafficPolicy's rateLimit as the waypoint applies it; errors by path.
pub(super) fn rate_limit(
    r: &RateLimitSpec,
    source: String,
    errs: &mut Vec<String>,
) -> pb::RateLimit {
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

/// A namespace's default rate limit: the valid rateLimit of its
/// TrafficPolicy named `default`.
pub fn default_rate_limit(ns: &str, exts: &TrafficPolicies) -> Option<pb::RateLimit> {
    let tp = exts.get(&(ns.to_string(), DEFAULT_TRAFFIC_POLICY.to_string()))?;
    route_extension(tp).ok()?.rate_limit
}
