//! Gateway API ReferenceGrant: a route may send to (or mirror to) a
//! Service in another namespace only when a ReferenceGrant in that
//! namespace lets the route's kind and namespace refer to it. The owner of
//! the target namespace agrees; the route's owner cannot agree for them.
//!
//! A grant permits when it is in the backend's namespace, some `from` entry
//! names exactly group `gateway.networking.k8s.io`, the route's kind
//! (`HTTPRoute` or `GRPCRoute`) and the route's namespace, and some `to`
//! entry names group `""` (core), kind `Service` and either no name or the
//! backend's name. Anything else (another group or kind, an empty name, a
//! kind we do not know) permits nothing: a grant only ever widens access,
//! so what cannot be understood is never read as agreement.

use std::collections::BTreeMap;

use gateway_api::apis::experimental::httproutes::{HttpRoute, HttpRouteRules};
use gateway_api::apis::standard::referencegrants::ReferenceGrant;

use crate::config::grpcroute::grpc_route_name;

/// ReferenceGrants by (namespace, name).
pub type ReferenceGrants = BTreeMap<(String, String), ReferenceGrant>;

const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
const HTTP_ROUTE: &str = "HTTPRoute";
const GRPC_ROUTE: &str = "GRPCRoute";
const SERVICE: &str = "Service";

/// What refers to a backend: a route's kind and namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Referrer<'a> {
    /// "HTTPRoute" or "GRPCRoute".
    pub kind: &'static str,
    pub namespace: &'a str,
}

impl<'a> Referrer<'a> {
    /// A route of the model (a GRPCRoute is held as the HTTPRoute it
    /// amounts to, under its model name).
    pub fn of(route: &'a HttpRoute) -> Referrer<'a> {
        let name = route.metadata.name.as_deref().unwrap_or_default();
        Referrer {
            kind: if grpc_route_name(name).is_some() {
                GRPC_ROUTE
            } else {
                HTTP_ROUTE
            },
            namespace: route.metadata.namespace.as_deref().unwrap_or_default(),
        }
    }
}

/// Whether `from` may refer to Service `name` in `namespace`: always in its
/// own namespace; in another only when a grant there permits it.
pub fn permits(grants: &ReferenceGrants, from: Referrer<'_>, namespace: &str, name: &str) -> bool {
    namespace == from.namespace
        || grants
            .range((namespace.to_string(), String::new())..)
            .take_while(|((ns, _), _)| ns == namespace)
            .any(|(_, g)| grant_permits(g, from, name))
}

/// Whether one grant (in the backend's namespace) permits the reference.
fn grant_permits(g: &ReferenceGrant, from: Referrer<'_>, name: &str) -> bool {
    let from_ok =
        g.spec.from.iter().any(|f| {
            f.group == GATEWAY_GROUP && f.kind == from.kind && f.namespace == from.namespace
        });
    let to_ok = g.spec.to.iter().any(|t| {
        t.group.is_empty() && t.kind == SERVICE && t.name.as_deref().is_none_or(|n| n == name)
    });
    from_ok && to_ok
}

/// One object a rule refers to, with Gateway API's defaults filled in
/// (group "", kind Service, the route's namespace).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendRef<'r> {
    pub group: &'r str,
    pub kind: &'r str,
    pub namespace: &'r str,
    pub name: &'r str,
}

/// Every object a rule refers to: its backendRefs, then its RequestMirror
/// filters' backends, whatever their kind (the caller checks that).
pub fn rule_refs<'r>(
    rule: &'r HttpRouteRules,
    route_ns: &'r str,
) -> impl Iterator<Item = BackendRef<'r>> {
    let one = move |group: &'r Option<String>,
                    kind: &'r Option<String>,
                    namespace: &'r Option<String>,
                    name: &'r str| BackendRef {
        group: group.as_deref().unwrap_or(""),
        kind: kind.as_deref().unwrap_or(SERVICE),
        namespace: namespace.as_deref().unwrap_or(route_ns),
        name,
    };
    let backends = rule
        .backend_refs
        .iter()
        .flatten()
        .map(move |b| one(&b.group, &b.kind, &b.namespace, &b.name));
    let mirrors = rule
        .filters
        .iter()
        .flatten()
        .filter_map(|f| f.request_mirror.as_ref())
        .map(move |m| {
            let b = &m.backend_ref;
            one(&b.group, &b.kind, &b.namespace, &b.name)
        });
    backends.chain(mirrors)
}

/// Whether a route refers to anything in namespace `ns` other than its
/// own: a grant change there may change what the route may reach.
pub fn refers_into(route: &HttpRoute, ns: &str) -> bool {
    let route_ns = route.metadata.namespace.as_deref().unwrap_or_default();
    route_ns != ns
        && route
            .spec
            .rules
            .iter()
            .flatten()
            .any(|r| rule_refs(r, route_ns).any(|b| b.namespace == ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants(yaml: &str) -> ReferenceGrants {
        serde_yaml::Deserializer::from_str(yaml)
            .map(|d| {
                let g: ReferenceGrant =
                    serde::Deserialize::deserialize(d).expect("test grant parses");
                (
                    (
                        g.metadata.namespace.clone().unwrap_or_default(),
                        g.metadata.name.clone().unwrap_or_default(),
                    ),
                    g,
                )
            })
            .collect()
    }

    fn grant(from: &str, to: &str) -> ReferenceGrants {
        grants(&format!(
            "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\n\
             metadata: {{name: g, namespace: team}}\nspec:\n  from: [{from}]\n  to: [{to}]\n"
        ))
    }

    const FROM_SHOP: &str = "{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: shop}";
    const TO_SERVICES: &str = "{group: \"\", kind: Service}";
    const HTTP_SHOP: Referrer<'static> = Referrer {
        kind: HTTP_ROUTE,
        namespace: "shop",
    };

    #[test]
    fn its_own_namespace_needs_no_grant_another_does() {
        let none = ReferenceGrants::new();
        assert!(permits(&none, HTTP_SHOP, "shop", "web"));
        assert!(!permits(&none, HTTP_SHOP, "team", "api"));
        let g = grant(FROM_SHOP, TO_SERVICES);
        assert!(permits(&g, HTTP_SHOP, "team", "api"));
        assert!(permits(&g, HTTP_SHOP, "team", "anything"));
        // The grant is team's: it permits nothing into another namespace.
        assert!(!permits(&g, HTTP_SHOP, "other", "api"));
    }

    #[test]
    fn from_must_name_the_routes_group_kind_and_namespace() {
        let grpc_shop = Referrer {
            kind: GRPC_ROUTE,
            namespace: "shop",
        };
        let http_elsewhere = Referrer {
            kind: HTTP_ROUTE,
            namespace: "elsewhere",
        };
        let g = grant(FROM_SHOP, TO_SERVICES);
        assert!(!permits(&g, grpc_shop, "team", "api"), "another kind");
        assert!(
            !permits(&g, http_elsewhere, "team", "api"),
            "another namespace"
        );
        let g = grant(
            "{group: gateway.networking.k8s.io, kind: GRPCRoute, namespace: shop}",
            TO_SERVICES,
        );
        assert!(permits(&g, grpc_shop, "team", "api"));
        assert!(!permits(&g, HTTP_SHOP, "team", "api"));
        for from in [
            "{group: example.com, kind: HTTPRoute, namespace: shop}",
            "{group: \"\", kind: HTTPRoute, namespace: shop}",
            "{group: gateway.networking.k8s.io, kind: httproute, namespace: shop}",
            "{group: gateway.networking.k8s.io, kind: Gateway, namespace: shop}",
            "{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: \"\"}",
        ] {
            assert!(
                !permits(&grant(from, TO_SERVICES), HTTP_SHOP, "team", "api"),
                "{from}"
            );
        }
        // Any one matching entry is enough.
        let g = grant(
            &format!("{{group: x, kind: y, namespace: z}}, {FROM_SHOP}"),
            TO_SERVICES,
        );
        assert!(permits(&g, HTTP_SHOP, "team", "api"));
    }

    #[test]
    fn to_must_name_core_services_and_a_name_narrows_it() {
        let named = grant(FROM_SHOP, "{group: \"\", kind: Service, name: api}");
        assert!(permits(&named, HTTP_SHOP, "team", "api"));
        assert!(!permits(&named, HTTP_SHOP, "team", "db"));
        for to in [
            "{group: \"\", kind: Secret}",
            "{group: core, kind: Service}",
            "{group: multicluster.x-k8s.io, kind: ServiceImport}",
            "{group: \"\", kind: service}",
            // An empty name names nothing (the schema refuses it anyway).
            "{group: \"\", kind: Service, name: \"\"}",
        ] {
            assert!(
                !permits(&grant(FROM_SHOP, to), HTTP_SHOP, "team", "api"),
                "{to}"
            );
        }
        // Empty lists permit nothing.
        assert!(!permits(&grant("", TO_SERVICES), HTTP_SHOP, "team", "api"));
        assert!(!permits(&grant(FROM_SHOP, ""), HTTP_SHOP, "team", "api"));
    }

    /// A converted rule: its backends ("service:weight") and mirror backend.
    type Rule = (Vec<String>, Option<String>);

    /// Each converted rule, and the issues.
    fn converted(grants: &ReferenceGrants) -> (Vec<Rule>, Vec<String>) {
        let r: HttpRoute = serde_yaml::from_str(
            r#"
metadata: {name: r, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /both}}]
    backendRefs: [{name: web, port: 80, weight: 3}, {name: api, namespace: team, port: 80}]
    filters: [{type: RequestMirror, requestMirror: {backendRef: {name: shadow, namespace: team, port: 80}, percent: 10}}]
  - backendRefs: [{name: api, namespace: team, port: 80}]
"#,
        )
        .expect("route parses");
        let (routes, issues) = super::super::convert(
            &r,
            "cluster.local",
            &super::super::TrafficPolicies::new(),
            grants,
        );
        let rules = routes
            .iter()
            .map(|r| {
                (
                    r.backends
                        .iter()
                        .map(|b| {
                            if b.invalid {
                                format!("500:{}", b.weight)
                            } else {
                                format!("{}:{}", b.service, b.weight)
                            }
                        })
                        .collect(),
                    r.mirror
                        .as_ref()
                        .and_then(|m| m.backend.as_ref())
                        .map(|b| b.service.clone()),
                )
            })
            .collect();
        (rules, issues)
    }

    #[test]
    fn translation_keeps_only_permitted_backends_and_mirrors() {
        const WEB: &str = "shop/web.shop.svc.cluster.local";
        const API: &str = "team/api.team.svc.cluster.local";
        const SHADOW: &str = "team/shadow.team.svc.cluster.local";
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();

        // No grant: the refused backend keeps its weight as an invalid
        // one (its share answered 500), the mirror goes.
        let (rules, issues) = converted(&ReferenceGrants::new());
        assert_eq!(
            rules,
            vec![
                (s(&[format!("{WEB}:3").as_str(), "500:1"]), None),
                (s(&["500:1"]), None)
            ]
        );
        assert_eq!(
            issues,
            s(&[
                "rule 0: mirror backend team/shadow is in another namespace and no ReferenceGrant there permits it; the mirror is left out",
                "rule 0: backend team/api is in another namespace and no ReferenceGrant there permits it; its share of requests is answered 500",
                "rule 1: backend team/api is in another namespace and no ReferenceGrant there permits it; its share of requests is answered 500",
            ])
        );

        // Granted: everything as written.
        let (rules, issues) = converted(&grant(FROM_SHOP, TO_SERVICES));
        assert!(issues.is_empty(), "{issues:?}");
        assert_eq!(
            rules,
            vec![
                (
                    s(&[format!("{WEB}:3").as_str(), format!("{API}:1").as_str()]),
                    Some(SHADOW.to_string())
                ),
                (s(&[format!("{API}:1").as_str()]), None),
            ]
        );

        // Granted for api only: the mirror to shadow is still left out.
        let (rules, issues) =
            converted(&grant(FROM_SHOP, "{group: \"\", kind: Service, name: api}"));
        assert_eq!(rules[0].1, None);
        assert_eq!(rules[1].0, s(&[format!("{API}:1").as_str()]));
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert!(issues[0].contains("team/shadow"), "{issues:?}");
    }

    #[test]
    fn a_route_refers_into_the_namespaces_of_its_backends_and_mirrors() {
        let r: HttpRoute = serde_yaml::from_str(
            r#"
metadata: {name: grpc:r, namespace: shop}
spec:
  rules:
  - backendRefs: [{name: web, port: 80}, {name: api, namespace: team, port: 80}]
  - backendRefs: [{name: web, port: 80}]
    filters: [{type: RequestMirror, requestMirror: {backendRef: {name: s, namespace: shadow, port: 80}}}]
"#,
        )
        .expect("route parses");
        assert_eq!(
            Referrer::of(&r),
            Referrer {
                kind: GRPC_ROUTE,
                namespace: "shop"
            }
        );
        assert!(refers_into(&r, "team") && refers_into(&r, "shadow"));
        assert!(!refers_into(&r, "shop") && !refers_into(&r, "other"));
    }
}
