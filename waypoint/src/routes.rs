//! The route table: each service's `ServiceRoutes` from the controller,
//! compiled once (regexes, weights, defaults) so a request only matches.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{HeaderMap, Method};
use mesh_proto::mesh::waypoint as pb;
use regex::Regex;

use crate::authz::{Policy, PolicyError};
use crate::ratelimit::Limit;

/// The key a waypoint uses for traffic addressed to one pod (a workload
/// that uses it), in place of a service key.
pub const WORKLOAD_KEY: &str = "workload:";

/// Why a ServiceRoutes resource was rejected.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    #[error("route {route}: regex {regex:?}: {reason}")]
    Regex {
        route: String,
        regex: String,
        reason: String,
    },
    #[error("route {route}: {reason}")]
    Invalid { route: String, reason: String },
    #[error(transparent)]
    Policy(#[from] PolicyError),
}

#[derive(Debug, Clone)]
pub enum StrMatch {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

impl StrMatch {
    fn compile(m: &pb::StringMatch, route: &str) -> Result<Option<StrMatch>, RouteError> {
        Ok(match &m.kind {
            None => None,
            Some(pb::string_match::Kind::Exact(s)) => Some(StrMatch::Exact(s.clone())),
            Some(pb::string_match::Kind::Prefix(s)) => Some(StrMatch::Prefix(s.clone())),
            Some(pb::string_match::Kind::Regex(r)) => {
                // Whole-string match, as Gateway API means it.
                let re = Regex::new(&format!("^(?:{r})$")).map_err(|e| RouteError::Regex {
                    route: route.to_string(),
                    regex: r.clone(),
                    reason: e.to_string(),
                })?;
                Some(StrMatch::Regex(re))
            }
        })
    }

    /// Path semantics: a prefix matches whole segments ("/a" matches "/a"
    /// and "/a/b", not "/ab").
    pub fn matches_path(&self, path: &str) -> bool {
        match self {
            StrMatch::Exact(s) => path == s,
            StrMatch::Prefix(p) => {
                let p = p.trim_end_matches('/');
                p.is_empty()
                    || (path.starts_with(p)
                        && matches!(path.as_bytes().get(p.len()), None | Some(b'/')))
            }
            StrMatch::Regex(r) => r.is_match(path),
        }
    }

    pub fn matches_value(&self, v: &str) -> bool {
        match self {
            StrMatch::Exact(s) => v == s,
            StrMatch::Prefix(p) => v.starts_with(p.as_str()),
            StrMatch::Regex(r) => r.is_match(v),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Matcher {
    pub path: Option<StrMatch>,
    pub headers: Vec<(http::HeaderName, StrMatch)>,
    pub query: Vec<(String, StrMatch)>,
    pub method: Option<Method>,
}

/// The parts of a request a route matches on.
pub struct RequestView<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

impl Matcher {
    pub fn matches(&self, r: &RequestView<'_>) -> bool {
        if let Some(m) = &self.method
            && m != r.method
        {
            return false;
        }
        if let Some(p) = &self.path
            && !p.matches_path(r.path)
        {
            return false;
        }
        for (name, m) in &self.headers {
            // Repeated headers are matched joined with commas (RFC 9110).
            let values: Vec<&str> = r
                .headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            if values.is_empty() || !m.matches_value(&values.join(",")) {
                return false;
            }
        }
        for (name, m) in &self.query {
            // The first occurrence counts, as Gateway API recommends.
            let found = r.query.and_then(|q| {
                q.split('&').find_map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (k == name).then_some(v)
                })
            });
            if !found.is_some_and(|v| m.matches_value(v)) {
                return false;
            }
        }
        true
    }
}

#[derive(Debug, Clone)]
pub struct Backend {
    /// "namespace/hostname".
    pub service: String,
    /// 0 = the port the request arrived on.
    pub port: u16,
    pub weight: u32,
    pub request_headers: Option<pb::HeaderEdit>,
    pub response_headers: Option<pb::HeaderEdit>,
}

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub codes: Vec<u16>,
    /// gRPC status codes retried (a trailers-only answer's `grpc-status`).
    pub grpc_codes: Vec<u32>,
    pub backoff: Duration,
    pub budget_percent: u32,
    pub min_retry_concurrency: u32,
}

#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    pub matcher: Option<Matcher>,
    pub filters: Vec<pb::filter::Kind>,
    pub backends: Vec<Backend>,
    total_weight: u64,
    pub request_timeout: Option<Duration>,
    pub per_try_timeout: Option<Duration>,
    pub retry: Option<RetryPolicy>,
    pub fault: Option<pb::Fault>,
    pub mirror: Option<(Backend, u32)>,
    /// Its own limit, else the namespace default; None costs nothing.
    pub rate_limit: Option<Arc<Limit>>,
}

impl Route {
    /// A weighted pick; `None` when every weight is zero, or the pick falls
    /// on the share of a backend marked invalid (Gateway API: 500).
    pub fn pick_backend(&self) -> Option<&Backend> {
        if self.total_weight == 0 {
            return None;
        }
        let mut n = fastrand::u64(0..self.total_weight);
        for b in &self.backends {
            if n < u64::from(b.weight) {
                return Some(b);
            }
            n -= u64::from(b.weight);
        }
        None
    }

    /// The route for requests no rule matches: the service itself.
    pub fn default_for(service: &str) -> Route {
        Route {
            name: "default".into(),
            matcher: None,
            filters: Vec::new(),
            backends: vec![Backend {
                service: service.to_string(),
                port: 0,
                weight: 1,
                request_headers: None,
                response_headers: None,
            }],
            total_weight: 1,
            request_timeout: None,
            per_try_timeout: None,
            retry: None,
            fault: None,
            mirror: None,
            rate_limit: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbKind {
    LeastRequest,
    RoundRobin,
    Random,
}

#[derive(Debug, Clone)]
pub struct Outlier {
    pub consecutive_5xx: u32,
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
}

/// The backend side of a service: load balancing, circuit breaking,
/// outlier ejection. Zero limits mean unlimited, as in Istio.
#[derive(Debug, Clone)]
pub struct BackendPolicy {
    pub lb: LbKind,
    pub max_connections: u32,
    pub max_pending_requests: u32,
    pub max_requests: u32,
    pub max_requests_per_connection: u32,
    pub connect_timeout: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    pub outlier: Option<Outlier>,
    pub max_retries: u32,
}

impl Default for BackendPolicy {
    fn default() -> Self {
        BackendPolicy {
            lb: LbKind::LeastRequest,
            max_connections: 0,
            max_pending_requests: 0,
            max_requests: 0,
            max_requests_per_connection: 0,
            connect_timeout: None,
            idle_timeout: None,
            outlier: None,
            max_retries: 0,
        }
    }
}

fn ms(v: u32) -> Option<Duration> {
    (v > 0).then(|| Duration::from_millis(u64::from(v)))
}

impl BackendPolicy {
    fn from_proto(p: &pb::BackendPolicy) -> BackendPolicy {
        BackendPolicy {
            lb: match pb::LoadBalancer::try_from(p.load_balancer) {
                Ok(pb::LoadBalancer::RoundRobin) => LbKind::RoundRobin,
                Ok(pb::LoadBalancer::Random) => LbKind::Random,
                _ => LbKind::LeastRequest,
            },
            max_connections: p.max_connections,
            max_pending_requests: p.max_pending_requests,
            max_requests: p.max_requests,
            max_requests_per_connection: p.max_requests_per_connection,
            connect_timeout: ms(p.connect_timeout_ms),
            idle_timeout: ms(p.idle_timeout_ms),
            outlier: p.outlier_detection.as_ref().and_then(|o| {
                (o.consecutive_5xx > 0).then(|| Outlier {
                    consecutive_5xx: o.consecutive_5xx,
                    base_ejection: Duration::from_millis(u64::from(o.base_ejection_ms.max(1))),
                    max_ejection_percent: o.max_ejection_percent,
                })
            }),
            max_retries: p.max_retries,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortProtocol {
    Sniff,
    Http1,
    Http2,
    Tcp,
}

/// One service as the waypoint serves it.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub key: String,
    pub hostname: String,
    pub namespace: String,
    pub routes: Vec<Route>,
    /// For requests no route matches: the service itself (GAMMA); None at
    /// an ingress, where they get 404.
    pub default_route: Option<Route>,
    pub backend: BackendPolicy,
    pub ports: HashMap<u16, PortProtocol>,
    /// Shared: a pod-addressed request takes its Gateway's without a copy.
    pub policies: Arc<[Policy]>,
}

impl ServiceConfig {
    pub fn compile(name: &str, s: &pb::ServiceRoutes) -> Result<ServiceConfig, RouteError> {
        let key = if name.is_empty() {
            format!("{}/{}", s.namespace, s.hostname)
        } else {
            name.to_string()
        };
        let default_limit = s
            .default_rate_limit
            .as_ref()
            .map(|l| Limit::compile(&format!("{key}#default"), l).map(Arc::new))
            .transpose()
            .map_err(|e| RouteError::Invalid {
                route: format!("{key} (namespace default rate limit)"),
                reason: e.to_string(),
            })?;
        let mut routes = s
            .routes
            .iter()
            .map(compile_route)
            .collect::<Result<Vec<_>, _>>()?;
        for r in &mut routes {
            if r.rate_limit.is_none() {
                r.rate_limit = default_limit.clone();
            }
        }
        let mut default_route = Route::default_for(&key);
        default_route.rate_limit = default_limit;
        let ports = compile_ports(&s.ports);
        let policies = s
            .policies
            .iter()
            .map(Policy::compile)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ServiceConfig {
            default_route: Some(default_route),
            key,
            hostname: s.hostname.clone(),
            namespace: s.namespace.clone(),
            routes,
            backend: s
                .backend_policy
                .as_ref()
                .map(BackendPolicy::from_proto)
                .unwrap_or_default(),
            ports,
            policies: policies.into(),
        })
    }

    /// A service with no routes, policies or backend policy of its own.
    pub fn default_for(key: &str) -> ServiceConfig {
        let (namespace, hostname) = if key.starts_with(WORKLOAD_KEY) {
            ("", "")
        } else {
            key.split_once('/').unwrap_or(("", key))
        };
        ServiceConfig {
            key: key.to_string(),
            hostname: hostname.to_string(),
            namespace: namespace.to_string(),
            routes: vec![],
            default_route: Some(Route::default_for(key)),
            backend: BackendPolicy::default(),
            ports: HashMap::new(),
            policies: Arc::from([]),
        }
    }

    /// The first route that matches, else the default (if any).
    pub fn route(&self, r: &RequestView<'_>) -> Option<&Route> {
        self.routes
            .iter()
            .find(|route| route.matcher.as_ref().is_none_or(|m| m.matches(r)))
            .or(self.default_route.as_ref())
    }

    /// One virtual host of an ingress listener: its routes, no default.
    pub fn compile_virtual_host(
        key: String,
        namespace: &str,
        vh: &pb::VirtualHost,
    ) -> Result<ServiceConfig, RouteError> {
        Ok(ServiceConfig {
            hostname: String::new(),
            namespace: namespace.to_string(),
            routes: vh
                .routes
                .iter()
                .map(compile_route)
                .collect::<Result<Vec<_>, _>>()?,
            default_route: None,
            backend: BackendPolicy::default(),
            ports: HashMap::new(),
            policies: Arc::from([]),
            key,
        })
    }

    /// A backend Service of an ingress: how its ports speak, its policy.
    pub fn compile_backend_service(b: &pb::IngressBackend) -> ServiceConfig {
        let mut s = ServiceConfig::default_for(&b.service);
        s.ports = compile_ports(&b.ports);
        if let Some(p) = &b.backend_policy {
            s.backend = BackendPolicy::from_proto(p);
        }
        s
    }

    pub fn protocol(&self, port: u16) -> PortProtocol {
        self.ports
            .get(&port)
            .copied()
            .unwrap_or(PortProtocol::Sniff)
    }
}

fn compile_ports(ports: &[pb::PortProtocol]) -> HashMap<u16, PortProtocol> {
    ports
        .iter()
        .filter_map(|p| {
            let port = u16::try_from(p.port).ok()?;
            let proto = match pb::Protocol::try_from(p.protocol) {
                Ok(pb::Protocol::Http1) => PortProtocol::Http1,
                Ok(pb::Protocol::Http2) => PortProtocol::Http2,
                Ok(pb::Protocol::Tcp) => PortProtocol::Tcp,
                _ => PortProtocol::Sniff,
            };
            Some((port, proto))
        })
        .collect()
}

fn compile_backend(b: &pb::WeightedBackend, route: &str) -> Result<Backend, RouteError> {
    Ok(Backend {
        service: b.service.clone(),
        port: u16::try_from(b.port).map_err(|_| RouteError::Invalid {
            route: route.to_string(),
            reason: format!("backend port {} is out of range", b.port),
        })?,
        weight: b.weight,
        request_headers: b.request_headers.clone(),
        response_headers: b.response_headers.clone(),
    })
}

fn compile_route(r: &pb::Route) -> Result<Route, RouteError> {
    let name = r.name.as_str();
    let invalid = |reason: String| RouteError::Invalid {
        route: name.to_string(),
        reason,
    };
    let matcher = match &r.request_match {
        None => None,
        Some(m) => Some(Matcher {
            path: match &m.path {
                Some(p) => StrMatch::compile(p, name)?,
                None => None,
            },
            headers: m
                .headers
                .iter()
                .map(|h| {
                    let hn = http::HeaderName::from_bytes(h.name.as_bytes())
                        .map_err(|_| invalid(format!("header name {:?}", h.name)))?;
                    let v = h
                        .value
                        .as_ref()
                        .map(|v| StrMatch::compile(v, name))
                        .transpose()?
                        .flatten()
                        .ok_or_else(|| {
                            invalid(format!("header {:?} has no value match", h.name))
                        })?;
                    Ok((hn, v))
                })
                .collect::<Result<_, RouteError>>()?,
            query: m
                .query_params
                .iter()
                .map(|q| {
                    let v = q
                        .value
                        .as_ref()
                        .map(|v| StrMatch::compile(v, name))
                        .transpose()?
                        .flatten()
                        .ok_or_else(|| invalid(format!("query {:?} has no value match", q.name)))?;
                    Ok((q.name.clone(), v))
                })
                .collect::<Result<_, RouteError>>()?,
            method: if m.method.is_empty() {
                None
            } else {
                Some(
                    Method::from_bytes(m.method.as_bytes())
                        .map_err(|_| invalid(format!("method {:?}", m.method)))?,
                )
            },
        }),
    };
    // A backend marked invalid is never picked, but keeps its share of
    // the weight: the requests that fall on it are answered 500.
    let backends = r
        .backends
        .iter()
        .filter(|b| !b.invalid)
        .map(|b| compile_backend(b, name))
        .collect::<Result<Vec<_>, _>>()?;
    let total_weight = r.backends.iter().map(|b| u64::from(b.weight)).sum();
    let mirror = match &r.mirror {
        Some(m) => match &m.backend {
            Some(b) if b.invalid => None,
            Some(b) => Some((compile_backend(b, name)?, m.per_million)),
            None => return Err(invalid("mirror has no backend".into())),
        },
        None => None,
    };
    Ok(Route {
        name: name.to_string(),
        matcher,
        filters: r.filters.iter().filter_map(|f| f.kind.clone()).collect(),
        backends,
        total_weight,
        request_timeout: ms(r.request_timeout_ms),
        per_try_timeout: ms(r.per_try_timeout_ms),
        retry: r.retry.as_ref().map(|x| RetryPolicy {
            attempts: x.attempts,
            codes: x
                .codes
                .iter()
                .filter_map(|c| u16::try_from(*c).ok())
                .collect(),
            grpc_codes: x.grpc_codes.clone(),
            backoff: Duration::from_millis(u64::from(x.backoff_ms.max(1))),
            budget_percent: x.budget_percent,
            min_retry_concurrency: x.min_retry_concurrency,
        }),
        fault: r.fault,
        mirror,
        rate_limit: r
            .rate_limit
            .as_ref()
            .map(|l| Limit::compile(name, l).map(Arc::new))
            .transpose()
            .map_err(|e| invalid(e.to_string()))?,
    })
}

/// Every service's config, swapped whole on each xDS response.
#[derive(Default, Clone)]
pub struct RouteTable {
    inner: Arc<ArcSwap<HashMap<String, Arc<ServiceConfig>>>>,
}

impl RouteTable {
    pub fn get(&self, key: &str) -> Option<Arc<ServiceConfig>> {
        self.inner.load().get(key).cloned()
    }

    pub fn len(&self) -> usize {
        self.inner.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn update(&self, add: Vec<ServiceConfig>, remove: &[String]) {
        let mut next = HashMap::clone(&self.inner.load());
        for k in remove {
            next.remove(k);
        }
        for s in add {
            next.insert(s.key.clone(), Arc::new(s));
        }
        self.inner.store(Arc::new(next));
    }

    pub fn keys(&self) -> Vec<String> {
        let mut k: Vec<String> = self.inner.load().keys().cloned().collect();
        k.sort();
        k
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sm(kind: pb::string_match::Kind) -> Option<pb::StringMatch> {
        Some(pb::StringMatch { kind: Some(kind) })
    }

    fn name_of(s: &ServiceConfig, r: &RequestView<'_>) -> String {
        s.route(r)
            .map_or_else(|| "<none>".into(), |r| r.name.clone())
    }

    fn view<'a>(
        m: &'a Method,
        path: &'a str,
        q: Option<&'a str>,
        h: &'a HeaderMap,
    ) -> RequestView<'a> {
        RequestView {
            method: m,
            path,
            query: q,
            headers: h,
        }
    }

    /// A backend the controller marks invalid (a refused cross-namespace
    /// one) is never picked, and keeps its share: the requests that fall
    /// on it get no backend (500).
    #[test]
    fn an_invalid_backend_keeps_its_share_and_is_never_picked() {
        let routes = pb::ServiceRoutes {
            routes: vec![pb::Route {
                name: "shop/r/0".into(),
                backends: vec![
                    pb::WeightedBackend {
                        service: "shop/r.shop.svc.cluster.local".into(),
                        weight: 1,
                        ..Default::default()
                    },
                    pb::WeightedBackend {
                        weight: 1,
                        invalid: true,
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }],
            ..Default::default()
        };
        let s = ServiceConfig::compile("shop/r.shop.svc.cluster.local", &routes).expect("compiles");
        let (get, h) = (Method::GET, HeaderMap::new());
        let r = s.route(&view(&get, "/", None, &h)).expect("a route");
        assert_eq!(r.name, "shop/r/0");
        let (mut picked, mut none) = (0, 0);
        for _ in 0..400 {
            match r.pick_backend() {
                Some(b) => {
                    assert_eq!(b.service, "shop/r.shop.svc.cluster.local");
                    picked += 1;
                }
                None => none += 1,
            }
        }
        assert!(picked >= 100 && none >= 100, "{picked} picked, {none} none");
    }

    #[test]
    fn path_prefix_matches_whole_segments() {
        let p = StrMatch::Prefix("/api".into());
        assert!(p.matches_path("/api"));
        assert!(p.matches_path("/api/v1"));
        assert!(!p.matches_path("/apix"));
        assert!(StrMatch::Prefix("/".into()).matches_path("/anything"));
        assert!(StrMatch::Prefix("/api/".into()).matches_path("/api/x"));
    }

    #[test]
    fn header_matches_ignore_name_case_and_join_repeats() {
        let routes = pb::ServiceRoutes {
            routes: vec![pb::Route {
                name: "shop/r/0".into(),
                request_match: Some(pb::RouteMatch {
                    headers: vec![pb::HeaderMatch {
                        name: "X-Version".into(),
                        value: sm(pb::string_match::Kind::Exact("v1,v2".into())),
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let s = ServiceConfig::compile("shop/r.shop.svc.cluster.local", &routes).expect("compiles");
        let get = Method::GET;
        let mut h = HeaderMap::new();
        h.append("x-version", "v1".parse().expect("value"));
        assert_eq!(name_of(&s, &view(&get, "/", None, &h)), "default");
        h.append("x-version", "v2".parse().expect("value"));
        assert_eq!(name_of(&s, &view(&get, "/", None, &h)), "shop/r/0");
    }

    #[test]
    fn first_matching_route_wins_and_unmatched_go_to_the_service() {
        let routes = pb::ServiceRoutes {
            hostname: "r.shop.svc.cluster.local".into(),
            namespace: "shop".into(),
            routes: vec![
                pb::Route {
                    name: "shop/r/0".into(),
                    request_match: Some(pb::RouteMatch {
                        headers: vec![pb::HeaderMatch {
                            name: "x-version".into(),
                            value: sm(pb::string_match::Kind::Exact("v2".into())),
                        }],
                        ..Default::default()
                    }),
                    backends: vec![pb::WeightedBackend {
                        service: "shop/r-v2.shop.svc.cluster.local".into(),
                        weight: 1,
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                pb::Route {
                    name: "shop/r/1".into(),
                    request_match: Some(pb::RouteMatch {
                        path: sm(pb::string_match::Kind::Regex("/items/[0-9]+".into())),
                        query_params: vec![pb::HeaderMatch {
                            name: "debug".into(),
                            value: sm(pb::string_match::Kind::Exact("1".into())),
                        }],
                        method: "GET".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let s = ServiceConfig::compile("shop/r.shop.svc.cluster.local", &routes).expect("compiles");
        let get = Method::GET;
        let mut h = HeaderMap::new();
        assert_eq!(name_of(&s, &view(&get, "/", None, &h)), "default");
        h.insert("x-version", "v2".parse().expect("value"));
        assert_eq!(name_of(&s, &view(&get, "/", None, &h)), "shop/r/0");
        let h = HeaderMap::new();
        assert_eq!(
            name_of(&s, &view(&get, "/items/12", Some("a=b&debug=1"), &h)),
            "shop/r/1"
        );
        assert_eq!(
            name_of(&s, &view(&get, "/items/12x", Some("debug=1"), &h)),
            "default"
        );
        assert_eq!(
            name_of(&s, &view(&Method::POST, "/items/12", Some("debug=1"), &h)),
            "default"
        );
        // A route with no backends picks none (the caller answers 500).
        assert!(s.routes[1].pick_backend().is_none());
    }

    #[test]
    fn a_bad_regex_rejects_the_resource_by_route_name() {
        let routes = pb::ServiceRoutes {
            routes: vec![pb::Route {
                name: "shop/r/0".into(),
                request_match: Some(pb::RouteMatch {
                    path: sm(pb::string_match::Kind::Regex("(".into())),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let e = ServiceConfig::compile("x", &routes).expect_err("rejected");
        assert!(e.to_string().contains("shop/r/0"), "{e}");
    }

    #[test]
    fn weighted_picks_follow_the_weights() {
        let mut r = Route::default_for("a");
        r.backends = vec![
            Backend {
                service: "v1".into(),
                port: 0,
                weight: 90,
                request_headers: None,
                response_headers: None,
            },
            Backend {
                service: "v2".into(),
                port: 0,
                weight: 10,
                request_headers: None,
                response_headers: None,
            },
        ];
        r.total_weight = 100;
        let v2 = (0..10_000)
            .filter(|_| r.pick_backend().is_some_and(|b| b.service == "v2"))
            .count();
        assert!((700..1300).contains(&v2), "{v2}");
    }
}
