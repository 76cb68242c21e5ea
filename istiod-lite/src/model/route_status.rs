//! Gateway API route status: for each HTTPRoute and GRPCRoute, one entry
//! of `status.parents` per parentRef that is ours, saying whether the
//! parent took the route (`Accepted`) and whether its backends resolved
//! (`ResolvedRefs`), as the spec's reasons name it.
//!
//! Ours are: a Gateway of class `mesh-ingress` (the ingress) or
//! `istio-waypoint`, and a Service (the mesh, GAMMA). A parentRef to a
//! Gateway or Service the model does not know, or to another controller's
//! Gateway, gets no entry (the spec: parents an implementation cannot
//! resolve are not listed).
//!
//! - Ingress: `Accepted` when some listener the ref selects (by
//!   `sectionName`/`port`) admits the route's kind and namespace and
//!   shares a hostname with it; else `NoMatchingParent` (no listener
//!   selected), `NotAllowedByListeners` (none admits it) or
//!   `NoMatchingListenerHostname`.
//! - Waypoint Gateway: routes reach a waypoint through their Service
//!   parentRef, never the Gateway's HBONE listener: `NotAllowedByListeners`.
//! - Service: `Accepted`, unless it is in another namespace than the route
//!   (consumer routes are not supported: `UnsupportedValue`).
//! - A route none of whose rules could be converted: `UnsupportedValue`.
//! - `ResolvedRefs` (backendRefs and RequestMirror backends, the same at
//!   every parent): `InvalidKind` for one that is not a core Service,
//!   `RefNotPermitted` for one in another namespace that no ReferenceGrant
//!   there permits (`routes/grants.rs`), `BackendNotFound` for a Service
//!   that does not exist.

use gateway_api::apis::experimental::httproutes::{HttpRoute, HttpRouteParentRefs};
use gateway_api::apis::standard::gateways::Gateway;
use serde_json::{Value, json};

use super::ingress::{
    GRPC_ROUTE_KIND, HTTP_ROUTE_KIND, ListenerCondition, admits_namespace, intersect, route_kinds,
};
use super::waypoint::GATEWAY_GROUP;
use super::{CONTROLLER_NAME, INGRESS_CLASS, Model, WAYPOINT_CLASS, routes};
use crate::config::grpcroute::grpc_route_name;
use crate::config::objects::Object;

/// Which API a route (and its status) belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    Http,
    Grpc,
}

impl RouteKind {
    /// "HTTPRoute" or "GRPCRoute".
    pub fn as_str(self) -> &'static str {
        match self {
            RouteKind::Http => HTTP_ROUTE_KIND,
            RouteKind::Grpc => GRPC_ROUTE_KIND,
        }
    }
}

/// One route and the status entries it should have for our parents.
#[derive(Debug, Clone)]
pub struct RouteView {
    pub kind: RouteKind,
    pub namespace: String,
    /// The object's own name (a GRPCRoute's, not its model name).
    pub name: String,
    pub generation: Option<i64>,
    /// One per parentRef of ours: the parentRef as written, and the
    /// `Accepted` and `ResolvedRefs` conditions.
    pub parents: Vec<(Value, Vec<ListenerCondition>)>,
    /// `status.parents` as the watch last saw it.
    pub current: Vec<Value>,
    /// The object's resourceVersion as the watch last saw it: the write
    /// is conditional on it, so entries another controller wrote since
    /// are never lost (the list is replaced whole).
    pub resource_version: Option<String>,
}

fn cond(type_: &'static str, ok: bool, reason: &'static str, message: String) -> ListenerCondition {
    ListenerCondition {
        type_,
        status: ok,
        reason,
        message,
    }
}

/// The reason of a route's `Accepted` condition at one parent (Gateway
/// API's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Acceptance {
    Accepted,
    NoMatchingParent,
    NotAllowedByListeners,
    NoMatchingListenerHostname,
    UnsupportedValue,
}

impl Acceptance {
    fn reason(self) -> &'static str {
        match self {
            Acceptance::Accepted => "Accepted",
            Acceptance::NoMatchingParent => "NoMatchingParent",
            Acceptance::NotAllowedByListeners => "NotAllowedByListeners",
            Acceptance::NoMatchingListenerHostname => "NoMatchingListenerHostname",
            Acceptance::UnsupportedValue => "UnsupportedValue",
        }
    }
}

/// Which of our parents a parentRef names.
enum Parent<'m> {
    Ingress(&'m Gateway),
    Waypoint,
    Service { same_namespace: bool },
}

fn parent<'m>(model: &'m Model, route_ns: &str, p: &HttpRouteParentRefs) -> Option<Parent<'m>> {
    let group = p.group.as_deref().unwrap_or(GATEWAY_GROUP);
    let kind = p.kind.as_deref().unwrap_or("Gateway");
    let ns = p.namespace.as_deref().unwrap_or(route_ns);
    let key = (ns.to_string(), p.name.clone());
    match (group, kind) {
        (GATEWAY_GROUP, "Gateway") => {
            let gw = model.gateways.get(&key)?;
            let class = gw.spec.gateway_class_name.as_str();
            if !class_is_ours(model, class) {
                return None;
            }
            match class {
                INGRESS_CLASS => Some(Parent::Ingress(gw)),
                WAYPOINT_CLASS => Some(Parent::Waypoint),
                _ => None,
            }
        }
        ("", "Service") => model.services.get(&key).map(|_| Parent::Service {
            same_namespace: ns == route_ns,
        }),
        _ => None,
    }
}

/// Whether GatewayClass `name` exists with our `controllerName`: a
/// Gateway of a class of our name that another controller owns (Istio's
/// `istio-waypoint`, say) is not a parent of ours, and its routes' status
/// is not ours to write.
fn class_is_ours(model: &Model, name: &str) -> bool {
    model.others.values().any(|o| match o {
        Object::GatewayClass(c) => {
            c.metadata.name.as_deref() == Some(name) && c.spec.controller_name == CONTROLLER_NAME
        }
        _ => false,
    })
}

/// The ingress's answer to one parentRef: (reason, message); `Accepted`
/// when some listener takes the route.
fn ingress_accepts(
    model: &Model,
    gw: &Gateway,
    route: &HttpRoute,
    p: &HttpRouteParentRefs,
) -> (Acceptance, String) {
    let route_ns = route.metadata.namespace.as_deref().unwrap_or_default();
    let gw_ns = gw.metadata.namespace.as_deref().unwrap_or_default();
    let selected: Vec<_> = gw
        .spec
        .listeners
        .iter()
        .filter(|l| {
            p.section_name.as_deref().is_none_or(|s| s == l.name)
                && p.port.is_none_or(|port| port == l.port)
        })
        .collect();
    if selected.is_empty() {
        return (
            Acceptance::NoMatchingParent,
            "no listener of the Gateway has the parentRef's sectionName and port".into(),
        );
    }
    let mut ignored = Default::default();
    let allowed: Vec<_> = selected
        .into_iter()
        .filter(|l| {
            route_kinds(l).0.admits(route)
                && admits_namespace(model, gw_ns, l, route_ns, &mut ignored)
        })
        .collect();
    if allowed.is_empty() {
        return (
            Acceptance::NotAllowedByListeners,
            "no listener the parentRef selects allows this kind of route from this namespace"
                .into(),
        );
    }
    let hosts = route.spec.hostnames.as_deref().unwrap_or_default();
    if !allowed
        .iter()
        .any(|l| intersect(l.hostname.as_deref(), hosts).is_some())
    {
        return (
            Acceptance::NoMatchingListenerHostname,
            "the route's hostnames match no hostname of the listeners it may attach to".into(),
        );
    }
    (Acceptance::Accepted, "accepted by istiod-lite".into())
}

/// `ResolvedRefs` for a route (the same at every parent): its backendRefs
/// and RequestMirror backends must be core Services, in its own namespace
/// or permitted by a ReferenceGrant in theirs, that exist.
fn resolved_refs(model: &Model, route: &HttpRoute) -> ListenerCondition {
    let route_ns = route.metadata.namespace.as_deref().unwrap_or_default();
    let referrer = routes::Referrer::of(route);
    let (mut kind, mut permit, mut missing) = (Vec::new(), Vec::new(), Vec::new());
    for rule in route.spec.rules.iter().flatten() {
        for b in routes::rule_refs(rule, route_ns) {
            let (ns, name) = (b.namespace, b.name);
            if !b.group.is_empty() || b.kind != "Service" {
                kind.push(format!("{}/{} {name}", b.group, b.kind));
            } else if !routes::permits(&model.reference_grants, referrer, ns, name) {
                permit.push(format!("Service {ns}/{name}"));
            } else if !model
                .services
                .contains_key(&(ns.to_string(), name.to_string()))
            {
                missing.push(format!("Service {ns}/{name}"));
            }
        }
    }
    if !kind.is_empty() {
        let msg = format!("not a core Service: {}", kind.join(", "));
        return cond("ResolvedRefs", false, "InvalidKind", msg);
    }
    if !permit.is_empty() {
        let msg = format!(
            "in another namespace, and no ReferenceGrant there permits this {} from {route_ns}: {}",
            referrer.kind,
            permit.join(", ")
        );
        return cond("ResolvedRefs", false, "RefNotPermitted", msg);
    }
    if !missing.is_empty() {
        let msg = format!("not found: {}", missing.join(", "));
        return cond("ResolvedRefs", false, "BackendNotFound", msg);
    }
    cond(
        "ResolvedRefs",
        true,
        "ResolvedRefs",
        "all references resolved".into(),
    )
}

/// A parentRef as a status entry names it.
fn parent_ref_json(p: &HttpRouteParentRefs) -> Value {
    let mut v = json!({"name": p.name});
    for (k, val) in [
        ("group", p.group.as_ref().map(|s| json!(s))),
        ("kind", p.kind.as_ref().map(|s| json!(s))),
        ("namespace", p.namespace.as_ref().map(|s| json!(s))),
        ("sectionName", p.section_name.as_ref().map(|s| json!(s))),
        ("port", p.port.map(|n| json!(n))),
    ] {
        if let Some(val) = val {
            v[k] = val;
        }
    }
    v
}

/// The status entries of one route.
fn route_view(model: &Model, route: &HttpRoute) -> RouteView {
    let ns = route.metadata.namespace.clone().unwrap_or_default();
    let model_name = route.metadata.name.clone().unwrap_or_default();
    let (kind, name) = match grpc_route_name(&model_name) {
        Some(n) => (RouteKind::Grpc, n.to_string()),
        None => (RouteKind::Http, model_name.clone()),
    };
    let rules = route.spec.rules.as_ref().map_or(0, Vec::len);
    let converted = routes::convert(
        route,
        &model.cfg.domain_suffix,
        &model.traffic_policies,
        &model.reference_grants,
    );
    let unsupported = (rules > 0 && converted.0.is_empty()).then(|| converted.1.join("; "));
    let mut parents = Vec::new();
    for p in route.spec.parent_refs.iter().flatten() {
        let Some(target) = parent(model, &ns, p) else {
            continue;
        };
        let (reason, message) = match &target {
            Parent::Ingress(gw) => ingress_accepts(model, gw, route, p),
            Parent::Waypoint => (
                Acceptance::NotAllowedByListeners,
                "a waypoint takes routes through their Service parentRef (group \"\", kind Service), not its Gateway".into(),
            ),
            Parent::Service {
                same_namespace: false,
            } => (
                Acceptance::UnsupportedValue,
                "the Service is in another namespace than the route; consumer routes are not supported".into(),
            ),
            Parent::Service { .. } => (Acceptance::Accepted, "accepted by istiod-lite".into()),
        };
        let (reason, message) = match (reason, &unsupported) {
            (Acceptance::Accepted, Some(why)) => (
                Acceptance::UnsupportedValue,
                format!("no rule could be implemented: {why}"),
            ),
            _ => (reason, message),
        };
        let accepted = cond(
            "Accepted",
            reason == Acceptance::Accepted,
            reason.reason(),
            message,
        );
        let resolved = resolved_refs(model, route);
        parents.push((parent_ref_json(p), vec![accepted, resolved]));
    }
    let current = route
        .status
        .as_ref()
        .and_then(|s| serde_json::to_value(&s.parents).ok())
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default();
    RouteView {
        kind,
        namespace: ns,
        name,
        generation: route.metadata.generation,
        parents,
        current,
        resource_version: route.metadata.resource_version.clone(),
    }
}

impl Model {
    /// Every route with a parent of ours, and the status it should have.
    pub fn route_views(&self) -> Vec<RouteView> {
        self.http_routes
            .values()
            .map(|r| route_view(self, r))
            .filter(|v| !v.parents.is_empty() || !v.current.is_empty())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::objects::Change;

    const DOCS: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: mesh-ingress}
spec: {controllerName: mesh.dev/istiod-lite}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: istio-waypoint}
spec: {controllerName: mesh.dev/istiod-lite}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Namespace
metadata: {name: team}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: edge, namespace: shop}
spec:
  gatewayClassName: mesh-ingress
  listeners:
  - {name: web, port: 80, protocol: HTTP, hostname: web.example.com}
  - name: grpc
    port: 81
    protocol: HTTP
    allowedRoutes: {kinds: [{kind: GRPCRoute}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: theirs, namespace: shop}
spec:
  gatewayClassName: someone-else
  listeners: [{name: http, port: 80, protocol: HTTP}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: team}
spec: {clusterIP: 10.96.0.11, ports: [{name: http, port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: ok, namespace: shop, generation: 3}
spec:
  parentRefs: [{name: edge, sectionName: web}]
  hostnames: [web.example.com]
  rules: [{backendRefs: [{name: web, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: refused, namespace: shop}
spec:
  parentRefs:
  - {name: edge, sectionName: nope}
  - {name: edge, sectionName: grpc}
  - {name: edge, sectionName: web}
  - {name: theirs}
  - {name: ghost}
  - {group: "", kind: Service, name: ghost}
  - {group: "", kind: Service, name: web}
  - {name: waypoint}
  hostnames: [other.example.org]
  rules: [{backendRefs: [{name: missing, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: refs, namespace: shop}
spec:
  parentRefs: [{name: edge, sectionName: web}, {group: "", kind: Service, name: web}]
  rules: [{backendRefs: [{name: api, namespace: team, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: kinds, namespace: team}
spec:
  parentRefs: [{group: "", kind: Service, name: web, namespace: shop}, {group: "", kind: Service, name: api}]
  rules: [{backendRefs: [{group: multicluster.x-k8s.io, kind: ServiceImport, name: api, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: echo, namespace: shop}
spec:
  parentRefs: [{name: edge, sectionName: grpc}, {name: edge, sectionName: web}]
  rules: [{backendRefs: [{name: web, port: 80}]}]
"#;

    fn model() -> Model {
        model_of(DOCS)
    }

    fn model_of(docs: &str) -> Model {
        let mut m = Model::new(super::super::ModelConfig::default());
        let changes = serde_yaml::Deserializer::from_str(docs)
            .map(|d| serde::Deserialize::deserialize(d).expect("yaml"))
            .filter(|v: &Value| !v.is_null())
            .map(|v| Change::Upsert(Object::parse(v).expect("parses").expect("known kind")))
            .collect();
        m.apply(changes);
        m
    }

    /// (parentRef name/sectionName or kind, Accepted reason, ResolvedRefs
    /// reason) of each entry of a route.
    fn entries(
        views: &[RouteView],
        kind: &str,
        ns: &str,
        name: &str,
    ) -> Vec<(String, String, String)> {
        let v = views
            .iter()
            .find(|v| v.kind.as_str() == kind && v.namespace == ns && v.name == name)
            .unwrap_or_else(|| panic!("no view of {kind} {ns}/{name}"));
        v.parents
            .iter()
            .map(|(p, c)| {
                let what = match p["kind"].as_str() {
                    Some("Service") => format!("Service {}", p["name"].as_str().unwrap_or("")),
                    _ => format!(
                        "{}/{}",
                        p["name"].as_str().unwrap_or(""),
                        p["sectionName"].as_str().unwrap_or("")
                    ),
                };
                assert_eq!((c[0].type_, c[1].type_), ("Accepted", "ResolvedRefs"));
                assert_eq!(c[0].status, c[0].reason == "Accepted", "{what}");
                assert_eq!(c[1].status, c[1].reason == "ResolvedRefs", "{what}");
                (what, c[0].reason.to_string(), c[1].reason.to_string())
            })
            .collect()
    }

    #[test]
    fn a_class_of_our_name_but_another_controller_is_not_ours() {
        // Istio's own `istio-waypoint` and a `mesh-ingress` of someone
        // else: their Gateways' routes get no entry of ours.
        let docs = DOCS.replace(
            "spec: {controllerName: mesh.dev/istiod-lite}",
            "spec: {controllerName: istio.io/gateway-controller}",
        );
        let views = model_of(&docs).route_views();
        for name in ["ok", "echo"] {
            assert!(
                views.iter().all(|v| v.name != name),
                "{name} has entries for parents of another controller"
            );
        }
        let refused = views.iter().find(|v| v.name == "refused").expect("refused");
        assert!(
            refused
                .parents
                .iter()
                .all(|(p, _)| p["kind"].as_str() == Some("Service")),
            "{:?}",
            refused.parents
        );
    }

    fn t(a: &str, b: &str, c: &str) -> (String, String, String) {
        (a.into(), b.into(), c.into())
    }

    #[test]
    fn each_parent_of_ours_gets_the_reason_gateway_api_names() {
        let views = model().route_views();
        let ok = views.iter().find(|v| v.name == "ok").expect("ok");
        assert_eq!(ok.generation, Some(3));
        assert_eq!(
            ok.parents[0].0,
            serde_json::json!({"name": "edge", "sectionName": "web"})
        );
        assert_eq!(
            entries(&views, "HTTPRoute", "shop", "ok"),
            vec![t("edge/web", "Accepted", "ResolvedRefs")]
        );
        // Another controller's Gateway and parents that do not exist get
        // no entry.
        assert_eq!(
            entries(&views, "HTTPRoute", "shop", "refused"),
            vec![
                t("edge/nope", "NoMatchingParent", "BackendNotFound"),
                t("edge/grpc", "NotAllowedByListeners", "BackendNotFound"),
                t("edge/web", "NoMatchingListenerHostname", "BackendNotFound"),
                t("Service web", "Accepted", "BackendNotFound"),
                t("waypoint/", "NotAllowedByListeners", "BackendNotFound"),
            ]
        );
        // A backend in another namespace, and no ReferenceGrant there:
        // refused at the ingress and at the waypoint alike.
        assert_eq!(
            entries(&views, "HTTPRoute", "shop", "refs"),
            vec![
                t("edge/web", "Accepted", "RefNotPermitted"),
                t("Service web", "Accepted", "RefNotPermitted"),
            ]
        );
        // A Service in another namespace (a consumer route); a backend that
        // is not a Service: its only rule is left out.
        assert_eq!(
            entries(&views, "HTTPRoute", "team", "kinds"),
            vec![
                t("Service web", "UnsupportedValue", "InvalidKind"),
                t("Service api", "UnsupportedValue", "InvalidKind"),
            ]
        );
        // A GRPCRoute by its own name and kind; the listener that admits
        // only GRPCRoutes takes it, and so does one with both by default.
        assert_eq!(
            entries(&views, "GRPCRoute", "shop", "echo"),
            vec![
                t("edge/grpc", "Accepted", "ResolvedRefs"),
                t("edge/web", "Accepted", "ResolvedRefs"),
            ]
        );
    }
}
