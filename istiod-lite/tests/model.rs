//! The folder source and the model: what users write in, xDS resources out,
//! and every bad input reported by name without losing the rest.

use istiod_lite::model::{Model, ModelConfig};
use mesh_proto::istio::security::{Action, Authorization};
use mesh_proto::istio::workload::{Address, TunnelProtocol, address};
use mesh_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use prost::Message;

mod folder_fixture;
use folder_fixture::Fixture;

const BASE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec:
  nodeName: node-a
  serviceAccountName: web
  containers: [{name: c, image: x, ports: [{name: http, containerPort: 8080}]}]
status: {podIP: 10.0.1.5, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: db-1, namespace: plain, labels: {app: db}}
spec: {nodeName: node-b, containers: [{name: c, image: x}]}
status: {podIP: 10.0.2.7, phase: Running}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {selector: {app: web}, clusterIP: 10.96.0.10, ports: [{port: 80, targetPort: http}]}
"#;

/// The model tests' views of the fixture's resources.
trait Resources {
    fn address(&self, name: &str) -> Option<address::Type>;
    fn authz(&self, name: &str) -> Option<Authorization>;
}

impl Resources for Fixture {
    fn address(&self, name: &str) -> Option<address::Type> {
        let r = self.model.resources(ADDRESS_TYPE_URL)?.get(name)?;
        Address::decode(r.value()).ok()?.r#type
    }

    fn authz(&self, name: &str) -> Option<Authorization> {
        let r = self.model.resources(AUTHORIZATION_TYPE_URL)?.get(name)?;
        Authorization::decode(r.value()).ok()
    }
}

const WEB: &str = "Kubernetes//Pod/shop/web-1";

#[test]
fn pods_and_services_become_workloads_and_services() {
    let mut f = Fixture::new();
    f.write("base.yaml", BASE);
    f.sync();
    let Some(address::Type::Workload(w)) = f.address(WEB) else {
        panic!("no workload {WEB}")
    };
    assert_eq!(w.tunnel_protocol, TunnelProtocol::Hbone as i32);
    assert_eq!(w.addresses, vec![vec![10, 0, 1, 5]]);
    assert_eq!(
        (w.service_account.as_str(), w.node.as_str()),
        ("web", "node-a")
    );
    let ports = &w.services["shop/web.shop.svc.cluster.local"].ports;
    assert_eq!(
        (ports[0].service_port, ports[0].target_port),
        (80, 8080),
        "named targetPort resolved"
    );
    // A pod outside an ambient namespace is known, but not captured.
    let Some(address::Type::Workload(db)) = f.address("Kubernetes//Pod/plain/db-1") else {
        panic!()
    };
    assert_eq!(db.tunnel_protocol, TunnelProtocol::None as i32);
    let Some(address::Type::Service(s)) = f.address("shop/web.shop.svc.cluster.local") else {
        panic!()
    };
    assert_eq!(s.addresses[0].address, vec![10, 96, 0, 10]);
    assert!(f.issues().is_empty(), "{:?}", f.issues());
}

#[test]
fn a_pod_change_touches_only_that_pods_resources() {
    let mut f = Fixture::new();
    f.write("base.yaml", BASE);
    f.sync();
    f.write(
        "base.yaml",
        &BASE.replace("podIP: 10.0.1.5", "podIP: 10.0.1.6"),
    );
    let d = f.sync();
    let changed: Vec<&String> = d.changed.values().flatten().collect();
    assert_eq!(changed, vec![WEB], "{d:?}");
    // Opting the pod out changes it to plain TCP, and nothing else.
    f.write(
        "base.yaml",
        &BASE.replace(
            "labels: {app: web}",
            "labels: {app: web, istio.io/dataplane-mode: none}",
        ),
    );
    let d = f.sync();
    assert_eq!(d.changed.values().flatten().count(), 1);
    let Some(address::Type::Workload(w)) = f.address(WEB) else {
        panic!()
    };
    assert_eq!(w.tunnel_protocol, TunnelProtocol::None as i32);
}

#[test]
fn a_pod_without_an_ip_appears_once_it_has_one() {
    let mut f = Fixture::new();
    f.write(
        "base.yaml",
        &BASE.replace(
            "status: {podIP: 10.0.1.5, phase: Running}",
            "status: {phase: Pending}",
        ),
    );
    f.sync();
    assert!(f.address(WEB).is_none());
    f.write("base.yaml", BASE);
    let d = f.sync();
    assert!(d.changed[ADDRESS_TYPE_URL].contains(WEB));
}

#[test]
fn a_yaml_syntax_error_is_reported_and_the_last_good_objects_stay() {
    let mut f = Fixture::new();
    f.write("base.yaml", BASE);
    f.sync();
    f.write(
        "base.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: [unclosed\n",
    );
    let d = f.sync();
    assert!(d.is_empty(), "nothing changes: {d:?}");
    assert!(f.address(WEB).is_some());
    let issues = f.issues();
    assert!(
        issues
            .iter()
            .any(|i| i.contains("base.yaml") && i.contains("YAML syntax")),
        "{issues:?}"
    );
}

#[test]
fn an_unknown_field_or_kind_is_reported_by_name_and_skipped() {
    let mut f = Fixture::new();
    f.write("base.yaml", BASE);
    f.sync();
    let bad = BASE.replace("  nodeName: node-a", "  nodeName: node-a\n  nodeNmae: typo");
    let bad =
        format!("{bad}\n---\napiVersion: example.com/v1\nkind: Widget\nmetadata: {{name: w}}\n");
    f.write("base.yaml", &bad);
    f.sync();
    let issues = f.issues();
    assert!(
        issues
            .iter()
            .any(|i| i.contains("Pod/shop/web-1") && i.contains("spec.nodeNmae")),
        "{issues:?}"
    );
    assert!(
        issues.iter().any(|i| i.contains("unknown kind \"Widget\"")),
        "{issues:?}"
    );
    // The last good version of the pod is still in force.
    let Some(address::Type::Workload(w)) = f.address(WEB) else {
        panic!()
    };
    assert_eq!(w.node, "node-a");
}

#[test]
fn a_duplicate_object_is_reported_and_the_first_kept() {
    let mut f = Fixture::new();
    f.write("a.yaml", BASE);
    f.write(
        "b.yaml",
        &BASE.replace("podIP: 10.0.1.5", "podIP: 10.9.9.9"),
    );
    f.sync();
    let Some(address::Type::Workload(w)) = f.address(WEB) else {
        panic!()
    };
    assert_eq!(w.addresses, vec![vec![10, 0, 1, 5]]);
    let issues = f.issues();
    assert!(
        issues
            .iter()
            .any(|i| i.contains("b.yaml") && i.contains("duplicate") && i.contains("a.yaml")),
        "{issues:?}"
    );
}

#[test]
fn when_the_first_copy_of_a_pod_goes_the_other_takes_over() {
    // The folder drops its copy of a pod once the model has it; the
    // second file's copy is read again when it is needed.
    let mut f = Fixture::new();
    f.write("a.yaml", BASE);
    f.write(
        "b.yaml",
        &BASE.replace("podIP: 10.0.1.5", "podIP: 10.9.9.9"),
    );
    f.sync();
    std::fs::remove_file(f.dir.path().join("a.yaml")).unwrap();
    f.sync();
    let Some(address::Type::Workload(w)) = f.address(WEB) else {
        panic!("web-1 is still known")
    };
    assert_eq!(w.addresses, vec![vec![10, 9, 9, 9]]);
    // And a pod whose file changes is read again as usual.
    f.write(
        "b.yaml",
        &BASE.replace("podIP: 10.0.1.5", "podIP: 10.9.9.10"),
    );
    f.sync();
    let Some(address::Type::Workload(w)) = f.address(WEB) else {
        panic!("web-1 is still known")
    };
    assert_eq!(w.addresses, vec![vec![10, 9, 9, 10]]);
}

#[test]
fn a_service_without_a_selector_takes_endpoints_from_slices() {
    let mut f = Fixture::new();
    let manual = r#"
---
apiVersion: v1
kind: Service
metadata: {name: legacy, namespace: shop}
spec: {clusterIP: 10.96.0.20, ports: [{name: tcp, port: 9000}]}
"#;
    f.write("base.yaml", &format!("{BASE}{manual}"));
    f.sync();
    let Some(address::Type::Workload(w)) = f.address(WEB) else {
        panic!()
    };
    assert!(
        !w.services
            .contains_key("shop/legacy.shop.svc.cluster.local")
    );
    assert!(f.address("shop/legacy.shop.svc.cluster.local").is_some());
    let slice = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: legacy-1, namespace: shop, labels: {kubernetes.io/service-name: legacy}}
addressType: IPv4
endpoints: [{addresses: [10.0.1.5]}]
ports: [{name: tcp, port: 9100}]
"#;
    f.write("slice.yaml", slice);
    f.sync();
    let Some(address::Type::Workload(w)) = f.address(WEB) else {
        panic!()
    };
    let p = &w.services["shop/legacy.shop.svc.cluster.local"].ports[0];
    assert_eq!((p.service_port, p.target_port), (9000, 9100));
}

#[test]
fn policies_convert_with_their_issues_named() {
    let mut f = Fixture::new();
    let policies = r#"
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-frontend, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/frontend"], namespaces: ["ghost"]}}]
    to: [{operation: {ports: ["8080"]}}]
  - to: [{operation: {methods: ["GET"]}}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: shop}
spec: {mtls: {mode: STRICT}}
"#;
    f.write("base.yaml", &format!("{BASE}{policies}"));
    f.sync();
    let a = f
        .authz("shop/allow-frontend")
        .unwrap_or_else(|| panic!("policy missing: {:?}", f.issues()));
    assert_eq!(a.rules.len(), 1, "the L7 ALLOW rule is dropped");
    assert_eq!(a.rules[0].clauses.len(), 2);
    let issues = f.issues();
    assert!(
        issues
            .iter()
            .any(|i| i.contains("namespace \"ghost\", which does not exist")),
        "{issues:?}"
    );
    assert!(
        issues.iter().any(|i| i.contains("rule 1 has L7 fields")),
        "{issues:?}"
    );
    // The selector policy is listed on the workload it selects.
    let Some(address::Type::Workload(w)) = f.address(WEB) else {
        panic!()
    };
    assert_eq!(
        w.authorization_policies,
        vec!["shop/allow-frontend".to_string()]
    );
    // STRICT is a DENY of anything without a peer identity.
    let s = f
        .authz("shop/converted_peer_authentication_strict")
        .expect("strict");
    assert_eq!(s.action, Action::Deny as i32);
    assert_eq!(s.rules[0].clauses[0].matches[0].not_principals.len(), 1);
}

#[test]
fn the_node_check_reads_the_model() {
    let mut f = Fixture::new();
    f.write("base.yaml", BASE);
    f.sync();
    let web: mesh_core::identity::Identity =
        "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
    assert!(f.model.identity_on_node("node-a", &web));
    assert!(!f.model.identity_on_node("node-b", &web));
    f.write(
        "base.yaml",
        &BASE.replace("nodeName: node-a", "nodeName: node-b"),
    );
    f.sync();
    assert!(f.model.identity_on_node("node-b", &web));
    assert!(!f.model.identity_on_node("node-a", &web));
}

#[test]
fn removing_a_file_removes_its_objects() {
    let mut f = Fixture::new();
    f.write("base.yaml", BASE);
    f.sync();
    std::fs::remove_file(f.dir.path().join("base.yaml")).unwrap();
    let d = f.sync();
    assert!(d.removed[ADDRESS_TYPE_URL].contains(WEB));
    assert!(f.address(WEB).is_none());
}

#[test]
fn versions_are_the_same_for_the_same_config() {
    // A pod backing several services: its services map must encode the same
    // way every time, or every recompute (and every restart) looks like a
    // change to every proxy.
    let mut extra = String::new();
    for i in 0..8 {
        extra.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: shop}}\nspec: {{selector: {{app: web}}, clusterIP: 10.96.1.{i}, ports: [{{port: 80}}]}}\n"
        ));
    }
    let versions = || {
        let mut f = Fixture::new();
        f.write("base.yaml", &format!("{BASE}{extra}"));
        f.sync();
        f.model.resources(ADDRESS_TYPE_URL).unwrap()[WEB].version
    };
    let first = versions();
    for _ in 0..5 {
        assert_eq!(versions(), first);
    }
}

const WAYPOINT: &str = r#"
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
"#;

const WEB_ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /api}}]
    backendRefs: [{name: web, port: 80}]
    timeouts: {request: 1s}
  - matches: [{path: {type: PathPrefix, value: /broken}}]
    backendRefs: [{name: web, port: 80}]
    timeouts: {request: soon}
"#;

#[test]
fn http_routes_reach_the_waypoint_only_for_services_that_have_one() {
    use mesh_proto::SERVICE_ROUTES_TYPE_URL;
    use mesh_proto::mesh::waypoint::ServiceRoutes;
    const KEY: &str = "shop/web.shop.svc.cluster.local";
    let routes = |f: &Fixture| -> Option<ServiceRoutes> {
        let r = f.model.resources(SERVICE_ROUTES_TYPE_URL)?.get(KEY)?;
        ServiceRoutes::decode(r.value()).ok()
    };

    let mut f = Fixture::new();
    f.write("base.yaml", BASE);
    f.write("waypoint.yaml", WAYPOINT);
    f.write("route.yaml", WEB_ROUTE);
    f.sync();
    // No use-waypoint label yet: the service pays nothing, no routes exist.
    assert!(routes(&f).is_none());
    // The bad rule is named; the good one is kept.
    let issues = f.issues();
    assert!(
        issues
            .iter()
            .any(|i| i
                .starts_with("HTTPRoute/shop/web: rule 1 left out: timeouts.request: \"soon\"")),
        "{issues:?}"
    );

    f.write(
        "base.yaml",
        &BASE.replace(
            "metadata: {name: web, namespace: shop}",
            "metadata: {name: web, namespace: shop, labels: {istio.io/use-waypoint: waypoint}}",
        ),
    );
    let delta = f.sync();
    assert!(
        delta
            .changed
            .get(SERVICE_ROUTES_TYPE_URL)
            .is_some_and(|s| s.contains(KEY)),
        "{delta:?}"
    );
    let r = routes(&f).expect("routes for web");
    assert_eq!(r.routes.len(), 1, "{r:?}");
    assert_eq!(r.routes[0].name, "shop/web/0");
    assert_eq!(r.routes[0].request_timeout_ms, 1000);
    assert_eq!(r.routes[0].backends[0].service, KEY);

    // Fixing the route updates the resource; deleting it leaves the
    // service with no routes (plain forwarding), not stale ones.
    f.write("route.yaml", &WEB_ROUTE.replace("soon", "2s"));
    f.sync();
    assert_eq!(routes(&f).expect("routes").routes.len(), 2);
    assert!(!f.issues().iter().any(|i| i.starts_with("HTTPRoute/")));
    std::fs::remove_file(f.dir.path().join("route.yaml")).unwrap();
    f.sync();
    assert_eq!(routes(&f).expect("routes").routes.len(), 0);

    // A DestinationRule for the service becomes its backend policy; a bad
    // field is named and the rest still applies.
    f.write(
        "dr.yaml",
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: shop}
spec:
  host: web
  trafficPolicy:
    connectionPool: {tcp: {maxConnections: 7, connectTimeout: later}}
    outlierDetection: {consecutive5xxErrors: 2, baseEjectionTime: 5s}
"#,
    );
    f.sync();
    let p = routes(&f)
        .and_then(|r| r.backend_policy)
        .expect("backend policy");
    assert_eq!((p.max_connections, p.connect_timeout_ms), (7, 0));
    let od = p.outlier_detection.expect("outlier detection");
    assert_eq!((od.consecutive_5xx, od.base_ejection_ms), (2, 5000));
    let issues = f.issues();
    assert!(
        issues.iter().any(|i| i.starts_with(
            "DestinationRule/shop/web: connectionPool.tcp.connectTimeout: \"later\" is not a duration"
        )),
        "{issues:?}"
    );
    std::fs::remove_file(f.dir.path().join("dr.yaml")).unwrap();
    f.sync();
    assert!(routes(&f).expect("routes").backend_policy.is_none());
    assert!(!f.issues().iter().any(|i| i.starts_with("DestinationRule/")));

    // Removing the waypoint removes the resource.
    std::fs::remove_file(f.dir.path().join("waypoint.yaml")).unwrap();
    let delta = f.sync();
    assert!(routes(&f).is_none());
    assert!(
        delta
            .removed
            .get(SERVICE_ROUTES_TYPE_URL)
            .is_some_and(|s| s.contains(KEY))
    );
}

#[test]
fn waypoint_routes_follow_policies_and_traffic_policies() {
    use mesh_proto::SERVICE_ROUTES_TYPE_URL;
    use mesh_proto::mesh::waypoint::{PolicyAction, ServiceRoutes};
    const KEY: &str = "shop/web.shop.svc.cluster.local";
    let routes = |f: &Fixture| -> ServiceRoutes {
        let r = f
            .model
            .resources(SERVICE_ROUTES_TYPE_URL)
            .and_then(|m| m.get(KEY))
            .expect("routes for web");
        ServiceRoutes::decode(r.value()).expect("decodes")
    };
    let has_issue = |f: &Fixture, prefix: &str| f.issues().iter().any(|i| i.starts_with(prefix));

    let mut f = Fixture::new();
    f.write(
        "base.yaml",
        &BASE.replace(
            "metadata: {name: web, namespace: shop}",
            "metadata: {name: web, namespace: shop, labels: {istio.io/use-waypoint: waypoint}}",
        ),
    );
    f.write("waypoint.yaml", WAYPOINT);
    f.write(
        "route.yaml",
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web}]
  rules:
  - backendRefs: [{name: web, port: 80}]
    filters: [{type: ExtensionRef, extensionRef: {group: extensions.mesh.dev, kind: TrafficPolicy, name: chaos}}]
"#,
    );
    f.sync();
    // The port is named after nothing: sniffed.
    let r = routes(&f);
    assert_eq!(
        (r.ports.len(), r.ports[0].port, r.ports[0].protocol),
        (1, 80, 0)
    );
    // A missing TrafficPolicy leaves the rule out, named.
    assert!(r.routes.is_empty(), "{r:?}");
    assert!(
        has_issue(
            &f,
            "HTTPRoute/shop/web: rule 0 left out: ExtensionRef TrafficPolicy chaos does not exist"
        ),
        "{:?}",
        f.issues()
    );

    // Creating it brings the rule in with its fault.
    let chaos = r#"
apiVersion: extensions.mesh.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: chaos, namespace: shop}
spec: {fault: {abort: {httpStatus: 503, percentage: 10}}}
"#;
    f.write("chaos.yaml", chaos);
    let d = f.sync();
    assert!(d.changed[SERVICE_ROUTES_TYPE_URL].contains(KEY), "{d:?}");
    let r = routes(&f);
    let fault = r.routes[0].fault.as_ref().expect("fault");
    assert_eq!(
        (fault.abort_status, fault.abort_per_million),
        (503, 100_000)
    );
    assert!(!has_issue(&f, "HTTPRoute/"), "{:?}", f.issues());

    // An invalid one is reported by field, and the rule is out again.
    f.write(
        "chaos.yaml",
        &chaos.replace("percentage: 10", "percentage: 110"),
    );
    f.sync();
    assert!(routes(&f).routes.is_empty());
    assert!(
        has_issue(
            &f,
            "TrafficPolicy/shop/chaos: spec.fault.abort.percentage: 110 is not a percentage"
        ),
        "{:?}",
        f.issues()
    );
    assert!(has_issue(
        &f,
        "HTTPRoute/shop/web: rule 0 left out: ExtensionRef TrafficPolicy chaos is invalid"
    ));
    // A typo in a field is refused when the object is read.
    f.write("chaos.yaml", &chaos.replace("percentage", "percentge"));
    f.sync();
    assert!(
        f.issues()
            .iter()
            .any(|i| i.contains("TrafficPolicy/shop/chaos")
                && i.contains("spec.fault.abort.percentge")),
        "{:?}",
        f.issues()
    );

    // A policy attached to the waypoint reaches its routes, not ztunnels;
    // what the waypoint cannot check is reported under the policy's name.
    f.write(
        "policy.yaml",
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: shop}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin*"]}}]
    when: [{key: "request.auth.claims[role]", values: [guest]}]
"#,
    );
    let d = f.sync();
    assert!(d.changed[SERVICE_ROUTES_TYPE_URL].contains(KEY), "{d:?}");
    let r = routes(&f);
    assert_eq!(r.policies.len(), 1);
    assert_eq!(r.policies[0].name, "shop/no-admin");
    assert_eq!(r.policies[0].action, PolicyAction::Deny as i32);
    assert!(r.policies[0].rules[0].when.is_empty());
    assert!(f.authz("shop/no-admin").is_none());
    assert!(
        has_issue(
            &f,
            "AuthorizationPolicy/shop/no-admin: rule 0 is enforced at the waypoint without what it cannot check"
        ),
        "{:?}",
        f.issues()
    );
    std::fs::remove_file(f.dir.path().join("policy.yaml")).unwrap();
    f.sync();
    assert!(routes(&f).policies.is_empty());
    assert!(!has_issue(&f, "AuthorizationPolicy/"));
}

/// Dual-stack: a pod's `podIPs` and a Service's `clusterIPs` reach the
/// proxies in both families (4 and 16 bytes), and `ipBlocks` keep each
/// block's family.
#[test]
fn dual_stack_addresses_and_ip_blocks_pass_through() {
    let mut f = Fixture::new();
    f.write(
        "dual.yaml",
        r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {nodeName: node-a, serviceAccountName: web, containers: [{name: c, image: x}]}
status: {podIP: 10.0.1.5, podIPs: [{ip: 10.0.1.5}, {ip: "fd00:10:0:1::5"}], phase: Running}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {selector: {app: web}, clusterIP: 10.96.0.10, clusterIPs: [10.96.0.10, "fd00:10:96::10"],
       ipFamilies: [IPv4, IPv6], ipFamilyPolicy: PreferDualStack, ports: [{port: 80}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: blocks, namespace: shop}
spec:
  rules: [{from: [{source: {ipBlocks: ["fd00::/8", 10.0.0.0/8], notIpBlocks: ["fd00:10:0:1::5"]}}]}]
"#,
    );
    f.sync();
    assert!(f.issues().is_empty(), "{:?}", f.issues());
    let Some(address::Type::Workload(w)) = f.address(WEB) else {
        panic!("no workload {WEB}")
    };
    let v6 = |s: &str| s.parse::<std::net::Ipv6Addr>().unwrap().octets().to_vec();
    assert_eq!(w.addresses, vec![vec![10, 0, 1, 5], v6("fd00:10:0:1::5")]);
    let Some(address::Type::Service(s)) = f.address("shop/web.shop.svc.cluster.local") else {
        panic!()
    };
    let vips: Vec<Vec<u8>> = s.addresses.iter().map(|a| a.address.clone()).collect();
    assert_eq!(vips, vec![vec![10, 96, 0, 10], v6("fd00:10:96::10")]);
    let p = f.authz("shop/blocks").expect("policy");
    let m = &p.rules[0].clauses[0].matches[0];
    let blocks: Vec<(Vec<u8>, u32)> = m
        .source_ips
        .iter()
        .map(|a| (a.address.clone(), a.length))
        .collect();
    assert_eq!(blocks, vec![(v6("fd00::"), 8), (vec![10, 0, 0, 0], 8)]);
    assert_eq!(m.not_source_ips[0].address, v6("fd00:10:0:1::5"));
    assert_eq!(m.not_source_ips[0].length, 128);
}

/// In cluster mode a Gateway's pod must be one its Deployment made:
/// controlled by the ReplicaSet `<gateway>-<pod-template-hash>` and running
/// as the Gateway's service account. A pod merely labelled is refused.
#[test]
fn a_labelled_pod_not_made_by_the_gateways_deployment_is_refused() {
    let mut m = Model::new(ModelConfig {
        gateway_pods_owned: true,
        ..ModelConfig::default()
    });
    let pod = |name: &str, sa: &str, owner: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, labels: {{gateway.networking.k8s.io/gateway-name: wp, pod-template-hash: 7f9c}}{owner}}}\nspec: {{nodeName: n1, serviceAccountName: {sa}, containers: [{{name: c, image: x}}]}}\nstatus: {{podIP: 10.0.0.{}, phase: Running}}\n---\n",
            name.len()
        )
    };
    let rs = |rs: &str| {
        format!(
            ", ownerReferences: [{{apiVersion: apps/v1, kind: ReplicaSet, name: {rs}, uid: u, controller: true}}]"
        )
    };
    let yaml = format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: wp, namespace: shop}}\nspec: {{gatewayClassName: istio-waypoint, listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]}}\n---\n{}{}{}{}",
        pod("wp-7f9c-a", "wp", &rs("wp-7f9c")),
        pod("lone", "wp", ""),
        pod("other-rs", "wp", &rs("web-7f9c")),
        pod("other-sa", "web", &rs("wp-7f9c")),
    );
    m.apply(parse_all(&yaml));
    assert!(m.waypoint_of_proxy("n1", "waypoint~shop~wp-7f9c-a").is_ok());
    for p in ["lone", "other-rs"] {
        let got = m.waypoint_of_proxy("n1", &format!("waypoint~shop~{p}"));
        let why = got.expect_err(p).to_string();
        assert!(why.contains("Deployment made"), "{p}: {why}");
    }
    let got = m.waypoint_of_proxy("n1", "waypoint~shop~other-sa");
    let why = got.expect_err("another account").to_string();
    assert!(why.contains("service account"), "{why}");
}

fn parse_all(yaml: &str) -> Vec<istiod_lite::config::objects::Change> {
    use istiod_lite::config::objects::{Change, Object};
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| serde_json::Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .map(|v| Change::Upsert(Object::parse(v).unwrap().unwrap()))
        .collect()
}
