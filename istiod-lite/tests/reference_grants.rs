//! Cross-namespace backends and ReferenceGrants, from the folder source
//! through the model: a route's backend (or mirror) in another namespace
//! is used only while a ReferenceGrant in that namespace lets the route's
//! kind and namespace refer to that Service, at the waypoint and at the
//! ingress alike, and route status says `RefNotPermitted` otherwise.

use istiod_lite::model::route_status::RouteView;

use mesh_proto::mesh::waypoint::{Ingress, ServiceRoutes};
use mesh_proto::{INGRESS_TYPE_URL, SERVICE_ROUTES_TYPE_URL};
use prost::Message;

mod folder_fixture;
use folder_fixture::Fixture;

const KEY: &str = "shop/web.shop.svc.cluster.local";
const API: &str = "team/api.team.svc.cluster.local";
const SHADOW: &str = "team/shadow.team.svc.cluster.local";

const BASE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: istio-waypoint}
spec: {controllerName: mesh.dev/istiod-lite}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: mesh-ingress}
spec: {controllerName: mesh.dev/istiod-lite}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: team, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Service
metadata: {name: waypoint, namespace: shop}
spec: {clusterIP: 10.96.0.99, ports: [{port: 15008}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: edge, namespace: shop}
spec:
  gatewayClassName: mesh-ingress
  listeners: [{name: http, port: 80, protocol: HTTP}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop, labels: {istio.io/use-waypoint: waypoint}}
spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: team}
spec: {clusterIP: 10.96.0.11, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: shadow, namespace: team}
spec: {clusterIP: 10.96.0.12, ports: [{name: http, port: 80}]}
"#;

/// Rule 0: a backend of its own namespace and one in `team`, mirrored to
/// `team/shadow`; rule 1: only the one in `team`. Parents: the waypoint
/// (through Service web) and the ingress.
const ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}, {name: edge}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /both}}]
    backendRefs: [{name: web, port: 80}, {name: api, namespace: team, port: 80}]
    filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: shadow, namespace: team, port: 80}}
  - matches: [{path: {type: PathPrefix, value: /team}}]
    backendRefs: [{name: api, namespace: team, port: 80}]
"#;

/// A grant in `team` for HTTPRoutes of `shop` to every Service there.
const GRANT: &str = r#"
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: from-shop, namespace: team}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: shop}]
  to: [{group: "", kind: Service}]
"#;

/// A rule: its name, its backends and its mirror backend.
type Rule = (String, Vec<String>, Option<String>);

/// The folder with the shop's base objects and its route, read.
fn fixture() -> Fixture {
    let mut f = Fixture::new();
    f.write("base.yaml", BASE);
    f.write("route.yaml", ROUTE);
    f.sync();
    f
}

/// The ReferenceGrant tests' views of the fixture.
trait Views {
    fn remove(&self, name: &str);
    fn waypoint(&self) -> ServiceRoutes;
    fn ingress(&self) -> Ingress;
    fn waypoint_rules(&self) -> Vec<Rule>;
    fn ingress_rules(&self) -> Vec<Rule>;
    fn resolved_refs(&self) -> Vec<(String, bool, String, String)>;
}

impl Views for Fixture {
    fn remove(&self, name: &str) {
        std::fs::remove_file(self.dir.path().join(name)).expect("remove");
    }

    fn waypoint(&self) -> ServiceRoutes {
        let r = self
            .model
            .resources(SERVICE_ROUTES_TYPE_URL)
            .and_then(|m| m.get(KEY))
            .expect("web's waypoint routes");
        ServiceRoutes::decode(r.value()).expect("decodes")
    }

    fn ingress(&self) -> Ingress {
        let r = self
            .model
            .resources(INGRESS_TYPE_URL)
            .and_then(|m| m.get("shop/edge"))
            .expect("the ingress");
        Ingress::decode(r.value()).expect("decodes")
    }

    /// (rule name, its backends, its mirror backend) of the waypoint's routes.
    fn waypoint_rules(&self) -> Vec<Rule> {
        let mut v: Vec<_> = self
            .waypoint()
            .routes
            .iter()
            .map(|r| {
                (
                    r.name.clone(),
                    r.backends.iter().map(backend_name).collect(),
                    r.mirror
                        .as_ref()
                        .and_then(|m| m.backend.as_ref())
                        .map(|b| b.service.clone()),
                )
            })
            .collect();
        v.sort();
        v
    }

    /// The same of the ingress's routes (one listener, one virtual host).
    fn ingress_rules(&self) -> Vec<Rule> {
        let i = self.ingress();
        let mut v: Vec<_> = i
            .listeners
            .iter()
            .flat_map(|l| &l.virtual_hosts)
            .flat_map(|h| &h.routes)
            .map(|r| {
                (
                    r.name.clone(),
                    r.backends.iter().map(backend_name).collect(),
                    r.mirror
                        .as_ref()
                        .and_then(|m| m.backend.as_ref())
                        .map(|b| b.service.clone()),
                )
            })
            .collect();
        v.sort();
        v
    }

    /// (parent kind, ResolvedRefs status, reason, message) of each status
    /// entry of HTTPRoute shop/web.
    fn resolved_refs(&self) -> Vec<(String, bool, String, String)> {
        let views: Vec<RouteView> = self.model.route_views();
        let v = views
            .iter()
            .find(|v| v.namespace == "shop" && v.name == "web")
            .expect("a status for shop/web");
        v.parents
            .iter()
            .map(|(p, c)| {
                let r = c
                    .iter()
                    .find(|c| c.type_ == "ResolvedRefs")
                    .expect("ResolvedRefs");
                (
                    p["kind"].as_str().unwrap_or("Gateway").to_string(),
                    r.status,
                    r.reason.to_string(),
                    r.message.clone(),
                )
            })
            .collect()
    }
}

/// A backend's service, or `500` for one marked invalid (its share is
/// answered 500; it names no service).
fn backend_name(b: &mesh_proto::mesh::waypoint::WeightedBackend) -> String {
    if b.invalid {
        assert!(b.service.is_empty() && b.port == 0, "{b:?}");
        "500".to_string()
    } else {
        b.service.clone()
    }
}

fn rule(name: &str, backends: &[&str], mirror: Option<&str>) -> Rule {
    (
        name.to_string(),
        backends.iter().map(|s| s.to_string()).collect(),
        mirror.map(str::to_string),
    )
}

/// Without a grant: each rule keeps its own namespace's backends, the
/// refused one keeps its share as an invalid backend (answered 500), the
/// mirror is left out, and both parents say `RefNotPermitted`.
fn refused(f: &Fixture) {
    let want = vec![
        rule("shop/web/0", &[KEY, "500"], None),
        rule("shop/web/1", &["500"], None),
    ];
    assert_eq!(f.waypoint_rules(), want, "waypoint");
    assert_eq!(f.ingress_rules(), want, "ingress");
    let refs = f.resolved_refs();
    assert_eq!(refs.len(), 2, "{refs:?}");
    for (parent, ok, reason, message) in &refs {
        assert!(!ok, "{parent}: {refs:?}");
        assert_eq!(reason, "RefNotPermitted", "{parent}: {refs:?}");
        assert!(
            message.contains("Service team/api") && message.contains("Service team/shadow"),
            "{parent}: {message}"
        );
    }
}

fn permitted(f: &Fixture) {
    let want = vec![
        rule("shop/web/0", &[KEY, API], Some(SHADOW)),
        rule("shop/web/1", &[API], None),
    ];
    assert_eq!(f.waypoint_rules(), want, "waypoint");
    assert_eq!(f.ingress_rules(), want, "ingress");
    for (parent, ok, reason, _) in f.resolved_refs() {
        assert!(ok && reason == "ResolvedRefs", "{parent}: {reason}");
    }
}

#[test]
fn a_waypoint_refuses_a_cross_namespace_backend_without_a_reference_grant() {
    let f = fixture();
    refused(&f);
    let issues = f.issues();
    for want in [
        "HTTPRoute/shop/web: rule 0: backend team/api is in another namespace and no ReferenceGrant there permits it; its share of requests is answered 500",
        "HTTPRoute/shop/web: rule 0: mirror backend team/shadow is in another namespace and no ReferenceGrant there permits it; the mirror is left out",
        "HTTPRoute/shop/web: rule 1: backend team/api is in another namespace and no ReferenceGrant there permits it; its share of requests is answered 500",
    ] {
        assert!(issues.iter().any(|i| i == want), "{want}\n{issues:#?}");
    }
}

#[test]
fn a_reference_grant_permits_and_its_removal_or_change_takes_effect_on_the_next_push() {
    let mut f = fixture();
    refused(&f);

    f.write("grant.yaml", GRANT);
    let d = f.sync();
    assert!(f.issues().is_empty(), "{:#?}", f.issues());
    assert!(d.changed[SERVICE_ROUTES_TYPE_URL].contains(KEY), "{d:?}");
    assert!(d.changed[INGRESS_TYPE_URL].contains("shop/edge"), "{d:?}");
    permitted(&f);

    // Removed: the backends go with it.
    f.remove("grant.yaml");
    let d = f.sync();
    assert!(d.changed[SERVICE_ROUTES_TYPE_URL].contains(KEY), "{d:?}");
    refused(&f);

    // For another namespace, or another kind of route, it permits nothing.
    f.write(
        "grant.yaml",
        &GRANT.replace("namespace: shop}]", "namespace: other}]"),
    );
    f.sync();
    refused(&f);
    f.write(
        "grant.yaml",
        &GRANT.replace("kind: HTTPRoute", "kind: GRPCRoute"),
    );
    f.sync();
    refused(&f);
    // Nor to another kind of object, or the right kind in another group.
    f.write(
        "grant.yaml",
        &GRANT.replace("kind: Service}", "kind: Secret}"),
    );
    f.sync();
    refused(&f);
    f.write(
        "grant.yaml",
        &GRANT.replace("group: gateway.networking.k8s.io", "group: example.com"),
    );
    f.sync();
    refused(&f);

    // A named `to` permits that Service only: api, not the mirror's shadow.
    f.write(
        "grant.yaml",
        &GRANT.replace("kind: Service}", "kind: Service, name: api}"),
    );
    f.sync();
    assert_eq!(
        f.waypoint_rules(),
        vec![
            rule("shop/web/0", &[KEY, API], None),
            rule("shop/web/1", &[API], None),
        ]
    );
    for (parent, ok, reason, message) in f.resolved_refs() {
        assert!(!ok && reason == "RefNotPermitted", "{parent}: {reason}");
        assert!(
            message.contains("team/shadow") && !message.contains("team/api"),
            "{message}"
        );
    }
    f.write(
        "grant.yaml",
        &GRANT.replace("kind: Service}", "kind: Service, name: other}"),
    );
    f.sync();
    refused(&f);

    // Back to the whole grant, then a malformed version of it: the last
    // good version is not kept, it permits nothing.
    f.write("grant.yaml", GRANT);
    f.sync();
    permitted(&f);
    f.write("grant.yaml", &GRANT.replace("  to: [", "  too: ["));
    f.sync();
    refused(&f);
    assert!(
        f.issues().iter().any(|i| i.contains("ReferenceGrant")),
        "{:#?}",
        f.issues()
    );
    // A YAML syntax error in its file: other kinds keep their last good
    // version, a grant does not.
    f.write("grant.yaml", GRANT);
    f.sync();
    permitted(&f);
    f.write("grant.yaml", &format!("{GRANT}  bad: [unclosed\n"));
    f.sync();
    refused(&f);
    assert!(
        f.issues().iter().any(|i| i.contains("YAML syntax")),
        "{:#?}",
        f.issues()
    );
}

#[test]
fn a_grpc_route_needs_a_grant_for_grpc_routes() {
    let mut f = fixture();
    f.write(
        "route.yaml",
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: web, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
  - backendRefs: [{name: api, namespace: team, port: 80}]
"#,
    );
    f.write("grant.yaml", GRANT);
    f.sync();
    let backends = |f: &Fixture| -> Vec<String> {
        f.waypoint()
            .routes
            .iter()
            .flat_map(|r| r.backends.iter().filter(|b| !b.invalid))
            .map(|b| b.service.clone())
            .collect()
    };
    assert!(
        backends(&f).is_empty(),
        "an HTTPRoute grant: {:?}",
        backends(&f)
    );
    f.write(
        "grant.yaml",
        &GRANT.replace("kind: HTTPRoute", "kind: GRPCRoute"),
    );
    f.sync();
    assert_eq!(backends(&f), vec![API.to_string()]);
}

/// A grant in the route's own namespace (not the backend's) permits
/// nothing: known before the route is, so the route is translated with it.
#[test]
fn a_grant_in_the_routes_own_namespace_permits_nothing() {
    let mut f = fixture();
    f.remove("route.yaml");
    f.sync();
    f.write(
        "grant.yaml",
        &GRANT.replace("namespace: team}", "namespace: shop}"),
    );
    f.sync();
    f.write("route.yaml", ROUTE);
    let d = f.sync();
    assert!(d.changed[SERVICE_ROUTES_TYPE_URL].contains(KEY), "{d:?}");
    assert!(d.changed[INGRESS_TYPE_URL].contains("shop/edge"), "{d:?}");
    refused(&f);
}

/// The same grant in two files: neither copy is used (the first by path
/// would win, and a broken first copy would hand over to the second).
#[test]
fn a_grant_defined_in_two_files_permits_nothing() {
    let mut f = fixture();
    f.write(
        "a-grant.yaml",
        &GRANT.replace("kind: Service}", "kind: Service, name: api}"),
    );
    f.write("b-grant.yaml", GRANT);
    f.sync();
    refused(&f);
    let issues = f.issues();
    assert!(
        issues
            .iter()
            .any(|i| i.contains("ReferenceGrant/team/from-shop") && i.contains("every copy")),
        "{issues:#?}"
    );
    // One copy left: it is used.
    f.remove("a-grant.yaml");
    f.sync();
    permitted(&f);
}

/// A copy that does not parse, beside one that does: neither is used.
#[test]
fn a_grant_with_a_broken_copy_in_another_file_permits_nothing() {
    let mut f = fixture();
    f.write("b-grant.yaml", GRANT);
    f.sync();
    permitted(&f);
    f.write("a-grant.yaml", &GRANT.replace("  to: [", "  too: ["));
    f.sync();
    refused(&f);
    // A YAML syntax error in the file of a copy that was read before.
    f.write("a-grant.yaml", GRANT);
    f.sync();
    refused(&f);
    f.write("a-grant.yaml", &format!("{GRANT}  bad: [unclosed\n"));
    f.sync();
    refused(&f);
    assert!(
        f.issues().iter().any(|i| i.contains("every copy")),
        "{:#?}",
        f.issues()
    );
}

/// A file read for the first time (a new file, or any file after a
/// restart) holding a copy of a grant and then a YAML syntax error: the
/// copy was read, so the other file's copy is not used alone.
#[test]
fn a_new_file_with_a_grant_copy_then_a_syntax_error_permits_nothing() {
    let mut f = fixture();
    f.write("b-grant.yaml", GRANT);
    f.write(
        "a-grant.yaml",
        &format!("{GRANT}---\nkind: Service\nmetadata: [unclosed\n"),
    );
    f.sync();
    refused(&f);
    assert!(
        f.issues().iter().any(|i| i.contains("YAML syntax")),
        "{:#?}",
        f.issues()
    );
}

/// Folder object names are Kubernetes names: an HTTPRoute named like the
/// model's name of a GRPCRoute (`grpc:web`) is refused, so it can neither
/// use a grant for GRPCRoutes nor collide with a GRPCRoute.
#[test]
fn a_folder_object_with_a_name_kubernetes_would_refuse_is_reported_and_skipped() {
    let mut f = fixture();
    f.remove("route.yaml");
    f.write(
        "route.yaml",
        &ROUTE.replace(
            "{name: web, namespace: shop}",
            "{name: \"grpc:web\", namespace: shop}",
        ),
    );
    f.write(
        "grant.yaml",
        &GRANT.replace("kind: HTTPRoute", "kind: GRPCRoute"),
    );
    f.sync();
    let routes = f
        .model
        .resources(SERVICE_ROUTES_TYPE_URL)
        .and_then(|m| m.get(KEY))
        .map(|r| ServiceRoutes::decode(r.value()).expect("decodes").routes)
        .unwrap_or_default();
    assert!(routes.is_empty(), "{routes:?}");
    let issues = f.issues();
    assert!(
        issues
            .iter()
            .any(|i| i.contains("grpc:web") && i.contains("not a valid name")),
        "{issues:#?}"
    );
    // A namespace that is not a DNS-1123 label, and a name too long.
    f.write(
        "route.yaml",
        &ROUTE.replace("namespace: shop}", "namespace: Shop.x}"),
    );
    f.write(
        "svc.yaml",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {}, namespace: shop}}\nspec: {{clusterIP: 10.96.0.20, ports: [{{port: 80}}]}}\n",
            "a".repeat(254)
        ),
    );
    f.sync();
    let issues = f.issues();
    assert!(
        issues
            .iter()
            .any(|i| i.contains("Shop.x") && i.contains("not a valid namespace")),
        "{issues:#?}"
    );
    assert!(
        issues
            .iter()
            .any(|i| i.contains("svc.yaml") && i.contains("not a valid name")),
        "{issues:#?}"
    );
    // Valid names are read.
    f.write("route.yaml", ROUTE);
    f.remove("svc.yaml");
    f.write("grant.yaml", GRANT);
    f.sync();
    permitted(&f);
}
