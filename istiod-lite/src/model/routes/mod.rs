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

#[macro_use]
mod filters;
mod backend_policy;
mod backends;
mod durations;
mod errors;
mod extension;
mod grants;
mod matches;
mod rate_limit;

use std::cmp::Ordering;
use std::collections::BTreeMap;

use gateway_api::apis::experimental::httproutes::{HttpRoute, HttpRouteRules};
use mesh_proto::mesh::waypoint as pb;
use pb::string_match::Kind as SM;

use crate::config::crds::TrafficPolicy;
use backends::{backends, request_mirror};
use extension::extension;
use filters::filter;
use matches::{request_match, string_match};

pub use backend_policy::{backend_policy, destination_host};
pub use durations::{parse_duration, parse_istio_duration};
pub use errors::{BackendRefError, DurationError, PercentError, RouteError, WildcardHost};
pub use extension::{DEFAULT_TRAFFIC_POLICY, RouteExtension, extension_refs, route_extension};
pub use grants::{BackendRef, ReferenceGrants, Referrer, permits, refers_into, rule_refs};
pub use rate_limit::default_rate_limit;

/// TrafficPolicy objects by (namespace, name), where ExtensionRef filters
/// look them up.
pub type TrafficPolicies = BTreeMap<(String, String), TrafficPolicy>;

/// What a route's rules are converted with: the route's kind and
/// namespace, and the inputs its rules may refer to.
#[derive(Clone, Copy)]
pub struct Scope<'a> {
    pub referrer: Referrer<'a>,
    pub domain_suffix: &'a str,
    pub exts: &'a TrafficPolicies,
    pub grants: &'a ReferenceGrants,
}

impl Scope<'_> {
    fn route_ns(&self) -> &str {
        self.referrer.namespace
    }
}

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
/// The gRPC statuses a route's retry policy retries for gRPC requests:
/// CANCELLED, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, UNAVAILABLE (Envoy's
/// `retry_on` gRPC conditions; Gateway API's `retry` names HTTP codes only).
const GRPC_RETRY_CODES: [u32; 4] = [1, 4, 8, 14];

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

/// A Gateway API duration at `field` in milliseconds (0 when unset),
/// capped at `u32::MAX`.
fn ms(field: &'static str, s: Option<&str>) -> Result<u32, RouteError> {
    s.map(parse_duration)
        .transpose()
        .map(|v| v.unwrap_or(0).min(u32::MAX as u64) as u32)
        .map_err(|source| RouteError::Duration { field, source })
}

/// The routes of one rule. Problems that leave the rule out are the error;
/// settings that have no effect are noted in `notes` and the rule is kept.
fn rule_routes(
    rule: &HttpRouteRules,
    name: &str,
    scope: Scope<'_>,
    notes: &mut Vec<String>,
) -> Result<Vec<pb::Route>, RouteError> {
    let route_ns = scope.route_ns();
    let mut filters = Vec::new();
    let mut ext: Option<RouteExtension> = None;
    let mut mirror: Option<(Option<pb::WeightedBackend>, Option<u32>)> = None;
    for f in rule.filters.iter().flatten() {
        if let Some(r) = &f.extension_ref {
            if ext.is_some() {
                return Err(RouteError::ExtensionRefs);
            }
            ext = Some(extension(r, route_ns, scope.exts)?);
        } else if let Some(m) = &f.request_mirror {
            if mirror.is_some() {
                return Err(RouteError::Mirrors);
            }
            mirror = Some(request_mirror(m, scope, notes)?);
        } else {
            filters.push(filter(f)?);
        }
    }
    let ext = ext.unwrap_or_default();
    let mirror = match (mirror, ext.mirror_per_million) {
        (Some((_, Some(_))), Some(_)) => {
            return Err(RouteError::MirrorShareTwice);
        }
        (Some((Some(backend), own)), from_ext) => Some(pb::Mirror {
            backend: Some(backend),
            per_million: own.or(from_ext).unwrap_or(ALL),
        }),
        // Its backend may not be reached (noted by `request_mirror`).
        (Some((None, _)), _) => None,
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
    let backends = backends(rule, scope, notes)?;
    let (request_timeout_ms, per_try_timeout_ms) = match &rule.timeouts {
        Some(t) => (
            ms("timeouts.request", t.request.as_deref())?,
            ms("timeouts.backendRequest", t.backend_request.as_deref())?,
        ),
        None => (0, 0),
    };
    if request_timeout_ms != 0 && per_try_timeout_ms > request_timeout_ms {
        return Err(RouteError::BackendTimeout {
            backend_ms: per_try_timeout_ms,
            request_ms: request_timeout_ms,
        });
    }
    let retry = match &rule.retry {
        None => None,
        Some(r) => {
            let mut codes = Vec::new();
            for c in r.codes.iter().flatten() {
                if !(400..=599).contains(c) {
                    return Err(RouteError::RetryCode(*c));
                }
                codes.push(*c as u32);
            }
            Some(pb::Retry {
                attempts: r.attempts.unwrap_or(1).clamp(0, 10) as u32,
                codes,
                grpc_codes: GRPC_RETRY_CODES.to_vec(),
                backoff_ms: match &r.backoff {
                    Some(b) => ms("retry.backoff", Some(b))?,
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
/// A backend (or mirror) in another namespace is used only when a
/// ReferenceGrant there permits it ([`permits`]); otherwise it is left out
/// and noted, and a rule left with no backend answers 500.
pub fn convert(
    route: &HttpRoute,
    domain_suffix: &str,
    exts: &TrafficPolicies,
    grants: &ReferenceGrants,
) -> (Vec<pb::Route>, Vec<String>) {
    let ns = route.metadata.namespace.as_deref().unwrap_or_default();
    let scope = Scope {
        referrer: Referrer::of(route),
        domain_suffix,
        exts,
        grants,
    };
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
        match rule_routes(rule, &name, scope, &mut notes) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::crds::DestinationRule;

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
            assert_eq!(e, DurationError::GatewayApi(bad.to_string()));
            assert!(e.to_string().contains("not a Gateway API duration"), "{e}");
        }
    }

    #[test]
    fn canary_route_translates() {
        let r = route(CANARY);
        assert_eq!(
            service_parents(&r),
            vec![("shop".to_string(), "reviews".to_string())]
        );
        let (mut routes, issues) = convert(
            &r,
            "cluster.local",
            &TrafficPolicies::new(),
            &ReferenceGrants::new(),
        );
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
        let (mut routes, issues) = convert(
            &r,
            "cluster.local",
            &TrafficPolicies::new(),
            &ReferenceGrants::new(),
        );
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
  - backendRefs: [{group: multicluster.x-k8s.io, kind: ServiceImport, name: g, port: 80}]
  - backendRefs: [{name: ok, port: 80}]
"#,
        );
        let (routes, issues) = convert(
            &r,
            "cluster.local",
            &TrafficPolicies::new(),
            &ReferenceGrants::new(),
        );
        assert_eq!(routes.len(), 1, "{routes:?}");
        assert_eq!(routes[0].name, "ns/r/7");
        let want = [
            "rule 0 left out: regex \"/(unclosed\" does not parse",
            "rule 1 left out: backendRef b has no port",
            "rule 2 left out: timeouts.backendRequest (2000 ms) is longer",
            "rule 3 left out: retry code 200 is not an HTTP error status",
            "rule 4 left out: filter type CORS is not supported",
            "rule 5 left out: timeouts.request: \"10 seconds\" is not a Gateway API duration",
            "rule 6 left out: backendRef g is a multicluster.x-k8s.io/ServiceImport, only Services are supported",
        ];
        assert_eq!(issues.len(), want.len(), "{issues:?}");
        for (got, want) in issues.iter().zip(want) {
            assert!(got.starts_with(want), "{got:?} should start with {want:?}");
        }

        // The reasons are variants a caller can tell apart, with their context.
        let rules = r.spec.rules.as_deref().unwrap_or_default();
        let why = |i: usize| {
            rule_routes(
                &rules[i],
                "x",
                Scope {
                    referrer: Referrer {
                        kind: "HTTPRoute",
                        namespace: "ns",
                    },
                    domain_suffix: "cluster.local",
                    exts: &TrafficPolicies::new(),
                    grants: &ReferenceGrants::new(),
                },
                &mut Vec::new(),
            )
            .expect_err("left out")
        };
        assert!(matches!(why(0), RouteError::Regex { regex, .. } if regex == "/(unclosed"));
        assert_eq!(
            why(1),
            RouteError::Backend(BackendRefError::NoPort { name: "b".into() })
        );
        assert_eq!(
            why(2),
            RouteError::BackendTimeout {
                backend_ms: 2000,
                request_ms: 1000
            }
        );
        assert_eq!(why(3), RouteError::RetryCode(200));
        assert_eq!(why(4), RouteError::Filter("CORS".into()));
        assert_eq!(
            why(5),
            RouteError::Duration {
                field: "timeouts.request",
                source: DurationError::GatewayApi("10 seconds".into())
            }
        );
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
        let (mut routes, issues) = convert(&r, "cluster.local", &exts, &ReferenceGrants::new());
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
        let (routes, issues) = convert(&r, "cluster.local", &exts, &ReferenceGrants::new());
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
