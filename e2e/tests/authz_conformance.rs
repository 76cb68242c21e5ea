//! Authorization conformance: one table of cases, each one decision, each
//! citing the rule of Istio's documentation it checks, run through the
//! real pipeline on both proxies:
//!
//! AuthorizationPolicy YAML -> istiod-lite's model (folder source) ->
//! - the ztunnel: `istio.security.Authorization` and workload resources ->
//!   the ztunnel's xDS sink -> its proxy state -> `inbound::authorize`;
//! - the waypoint: the service's `ServiceRoutes` -> `authz::Policy::compile`
//!   -> `authz::evaluate`.
//!
//! A table spec is written once, without a target: the harness attaches it
//! to the server pod with a `selector` (what the ztunnel enforces) and to the
//! waypoint's Gateway with `targetRefs` (what the waypoint enforces).
//! Targeting cases give whole policies instead.
//!
//! Citations, from Istio's AuthorizationPolicy reference ("ref"), its
//! ambient pages ("ambient-l4", the ztunnel's L4 policy; "ambient-l7",
//! the waypoint's), the security concepts page ("concepts") and this
//! project's docs/security.md ("security", where we go beyond Istio's text:
//! fail closed on values a proxy cannot enforce).

use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, HeaderName, HeaderValue};
use istiod_lite::config::folder::FolderSource;
use istiod_lite::model::{Model, ModelConfig};
use mesh_core::identity::Identity;
use mesh_core::state::ProxyState;
use mesh_proto::envoy::service::discovery::v3::Resource;
use mesh_proto::mesh::waypoint::ServiceRoutes;
use mesh_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, SERVICE_ROUTES_TYPE_URL};
use prost::Message;

const BASE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: wp}}
---
apiVersion: v1
kind: Namespace
metadata: {name: other, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: istio-system}
---
apiVersion: v1
kind: Pod
metadata: {name: server-1, namespace: shop, labels: {app: server}}
spec: {nodeName: node-a, serviceAccountName: server, containers: [{name: c, image: x}]}
status: {podIP: 10.1.0.9, podIPs: [{ip: 10.1.0.9}, {ip: "fd00:1::9"}], phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: client-1, namespace: shop, labels: {app: client}}
spec: {nodeName: node-b, serviceAccountName: client, containers: [{name: c, image: x}]}
status: {podIP: 10.1.0.5, podIPs: [{ip: 10.1.0.5}, {ip: "fd00:1::5"}], phase: Running}
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: shop}
spec: {selector: {app: server}, clusterIP: 10.96.0.10, ports: [{name: http, port: 8080, targetPort: 8080}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: shop}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Service
metadata: {name: wp, namespace: shop}
spec: {clusterIP: 10.96.0.99, ports: [{port: 15008}]}
"#;

/// One external authorization provider, for CUSTOM policies.
const MESH: &str = r#"
extensionProviders:
- name: authz
  envoyExtAuthzGrpc: {service: ext-authz.shop.svc.cluster.local, port: 9000}
"#;

const SERVER_IP: &str = "10.1.0.9";
const SERVICE_KEY: &str = "shop/server.shop.svc.cluster.local";
const HOST: &str = "server.shop.svc.cluster.local";
const C: &str = "cluster.local/ns/shop/sa/client";
const W: &str = "cluster.local/ns/other/sa/web";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum E {
    A,
    D,
}
use E::{A, D};

#[derive(Debug, Clone)]
struct Req {
    /// Principal without "spiffe://"; None for plaintext.
    from: Option<&'static str>,
    src_ip: &'static str,
    /// The destination address the client dialled (the server's IPv4 or
    /// IPv6 address).
    dst_ip: &'static str,
    port: u16,
    /// False: opaque TCP at the waypoint (no method, path, host, headers).
    http: bool,
    method: &'static str,
    path: &'static str,
    host: &'static str,
    headers: Vec<(&'static str, &'static str)>,
}

fn req() -> Req {
    Req {
        from: Some(C),
        src_ip: "10.1.0.5",
        dst_ip: SERVER_IP,
        port: 8080,
        http: true,
        method: "GET",
        path: "/",
        host: HOST,
        headers: vec![],
    }
}

impl Req {
    fn from(mut self, p: &'static str) -> Self {
        self.from = Some(p);
        self
    }
    fn plaintext(mut self) -> Self {
        self.from = None;
        self
    }
    fn ip(mut self, ip: &'static str) -> Self {
        self.src_ip = ip;
        self
    }
    /// From the client's IPv6 address to the server's: a connection in
    /// one family, as a dual-stack client makes it.
    fn v6(mut self) -> Self {
        self.src_ip = "fd00:1::5";
        self.dst_ip = "fd00:1::9";
        self
    }
    fn to(mut self, ip: &'static str) -> Self {
        self.dst_ip = ip;
        self
    }
    fn port(mut self, p: u16) -> Self {
        self.port = p;
        self
    }
    fn tcp(mut self) -> Self {
        self.http = false;
        self
    }
    fn method(mut self, m: &'static str) -> Self {
        self.method = m;
        self
    }
    fn path(mut self, p: &'static str) -> Self {
        self.path = p;
        self
    }
    fn host(mut self, h: &'static str) -> Self {
        self.host = h;
        self
    }
    fn header(mut self, n: &'static str, v: &'static str) -> Self {
        self.headers.push((n, v));
        self
    }
}

struct Case {
    cite: &'static str,
    /// Policy specs (flow YAML mappings, without selector or targetRefs);
    /// `dryRun: true` in one becomes the `istio.io/dry-run` annotation.
    specs: Vec<&'static str>,
    /// Whole AuthorizationPolicy documents instead (targeting cases).
    raw: Option<&'static str>,
    req: Req,
    ztunnel: E,
    waypoint: E,
}

fn c(cite: &'static str, specs: &[&'static str], req: Req, ztunnel: E, waypoint: E) -> Case {
    Case {
        cite,
        specs: specs.to_vec(),
        raw: None,
        req,
        ztunnel,
        waypoint,
    }
}

fn raw(cite: &'static str, docs: &'static str, req: Req, ztunnel: E, waypoint: E) -> Case {
    Case {
        cite,
        specs: vec![],
        raw: Some(docs),
        req,
        ztunnel,
        waypoint,
    }
}

/// The policy documents of a case.
fn policy_docs(case: &Case) -> String {
    if let Some(r) = case.raw {
        return r.to_string();
    }
    let mut out = String::new();
    for (i, spec) in case.specs.iter().enumerate() {
        let mut v: serde_yaml::Mapping = serde_yaml::from_str(spec).expect("spec parses");
        let annotations = match v.remove("dryRun") {
            Some(serde_yaml::Value::Bool(true)) => {
                "annotations: {istio.io/dry-run: \"true\"}".to_string()
            }
            Some(serde_yaml::Value::String(s)) => {
                format!("annotations: {{istio.io/dry-run: \"{s}\"}}")
            }
            _ => "annotations: {}".to_string(),
        };
        for (name, target) in [
            (format!("zt{i}"), "selector: {matchLabels: {app: server}}"),
            (
                format!("wp{i}"),
                "targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: wp}]",
            ),
        ] {
            let mut m = v.clone();
            let t: serde_yaml::Mapping = serde_yaml::from_str(&format!("{{{target}}}")).unwrap();
            m.extend(t);
            let spec = serde_yaml::to_string(&m).unwrap();
            let spec: String = spec.lines().map(|l| format!("  {l}\n")).collect();
            out.push_str(&format!(
                "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: shop, {annotations}}}\nspec:\n{spec}"
            ));
        }
    }
    out
}

fn model(case: &Case) -> Model {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("base.yaml"), BASE).expect("write");
    std::fs::write(dir.path().join("policies.yaml"), policy_docs(case)).expect("write");
    let mut src = FolderSource::new(dir.path());
    let mesh = istiod_lite::config::mesh::MeshConfig::parse(MESH).expect("mesh config");
    let mut model = Model::new(ModelConfig {
        mesh,
        ..ModelConfig::default()
    });
    model.apply(src.scan());
    model
}

fn resources(model: &Model, type_url: &str) -> Vec<Resource> {
    model
        .resources(type_url)
        .map(|m| {
            m.values()
                // The wire form, as a proxy receives it: one that does
                // not decode fails the test (never silently left out).
                .map(|r| {
                    Resource::decode(r.wire().clone())
                        .unwrap_or_else(|e| panic!("{type_url} {}: undecodable: {e}", r.name))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The proxy state both proxies build from the model's xDS resources.
fn mesh_state(model: &Model) -> ProxyState {
    let st = ProxyState::default();
    for t in [ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL] {
        let (u, rejected) =
            mesh_core::xds::state_updates("cluster.local", t, &resources(model, t), &[]);
        assert!(rejected.is_empty(), "the proxy refused {rejected:?}");
        st.apply(u);
    }
    st
}

fn identity(r: &Req) -> Option<Identity> {
    r.from
        .map(|p| format!("spiffe://{p}").parse().expect("identity"))
}

fn ztunnel_decision(model: &Model, r: &Req) -> E {
    let snap = mesh_state(model).snapshot();
    let ip: IpAddr = r.dst_ip.parse().unwrap();
    let dst = snap
        .workload_by_ip("", ip)
        .expect("server workload")
        .clone();
    let id = identity(r);
    let d = mesh_core::state::decide::authorize(
        &snap,
        "istio-system",
        &dst,
        id.as_ref(),
        r.src_ip.parse().unwrap(),
        SocketAddr::new(ip, r.port),
    );
    if d.is_allowed() { A } else { D }
}

fn waypoint_decision(model: &Model, r: &Req) -> E {
    let res = model
        .resources(SERVICE_ROUTES_TYPE_URL)
        .and_then(|m| m.get(SERVICE_KEY))
        .expect("the service's waypoint config");
    let routes = ServiceRoutes::decode(res.value()).expect("decodes");
    let policies: Vec<waypoint::authz::Policy> = routes
        .policies
        .iter()
        .map(|p| waypoint::authz::Policy::compile(p).expect("the waypoint compiles it"))
        .collect();
    let mut headers = HeaderMap::new();
    for (n, v) in &r.headers {
        headers.append(
            HeaderName::from_bytes(n.as_bytes()).unwrap(),
            HeaderValue::from_static(v),
        );
    }
    let ns = r.from.and_then(|p| p.split('/').nth(2));
    // The source's workload as the waypoint attributes it: its own
    // function, which its HBONE and ingress paths call.
    let snap = mesh_state(model).snapshot();
    let src_ip: IpAddr = r.src_ip.parse().unwrap();
    let id = identity(r);
    let (_, source_addrs) = waypoint::authz::attribute_source(&snap, "", src_ip, id.as_ref());
    let attrs = waypoint::authz::RequestAttrs {
        http: r.http,
        principal: r.from,
        namespace: ns,
        source_ip: src_ip,
        source_addrs: &source_addrs,
        host: r.host,
        port: r.port,
        method: r.method,
        path: r.path,
        headers: &headers,
    };
    if waypoint::authz::evaluate(&policies, &attrs).is_allowed() {
        A
    } else {
        D
    }
}

const ZT_ROOT_ALLOW_W: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mesh-allow-web, namespace: istio-system}
spec: {action: ALLOW, rules: [{from: [{source: {principals: ["cluster.local/ns/other/sa/web"]}}]}]}
"#;

const CLASS_DENY_ALL: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: all-waypoints, namespace: istio-system}
spec:
  targetRefs: [{kind: GatewayClass, group: gateway.networking.k8s.io, name: istio-waypoint}]
  action: DENY
  rules: [{}]
"#;

const SELECTOR_OTHER_DENY_ALL: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: other-app, namespace: shop}
spec: {selector: {matchLabels: {app: other}}, action: DENY, rules: [{}]}
"#;

const NAMESPACE_DENY_ALL: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ns-wide, namespace: shop}
spec: {action: DENY, rules: [{}]}
"#;

const OTHER_NAMESPACE_DENY_ALL: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ns-wide, namespace: other}
spec: {action: DENY, rules: [{}]}
"#;

const SERVICE_DENY_ALL: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: svc, namespace: shop}
spec: {targetRefs: [{kind: Service, group: "", name: server}], action: DENY, rules: [{}]}
"#;

const GATEWAY_DENY_ALL: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: gw, namespace: shop}
spec: {targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: wp}], action: DENY, rules: [{}]}
"#;

const OTHER_GATEWAY_DENY_ALL: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: gw, namespace: shop}
spec: {targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: not-ours}], action: DENY, rules: [{}]}
"#;

const CROSS_NAMESPACE_TARGET: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reach, namespace: other}
spec: {targetRefs: [{kind: Service, group: "", name: server, namespace: shop}], action: DENY, rules: [{}]}
"#;

#[rustfmt::skip]
fn cases() -> Vec<Case> {
    vec![
        // Evaluation order and defaults.
        c("ref: no ALLOW policies for the workload: allow", &[], req(), A, A),
        c("ref: any ALLOW policy matches: allow", &["{action: ALLOW, rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]}]}"], req(), A, A),
        c("ref: ALLOW policies exist, none matches: deny", &["{action: ALLOW, rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]}]}"], req().from(W), D, D),
        c("ref: any DENY policy matches: deny", &["{action: DENY, rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]}]}"], req(), D, D),
        c("ref: a DENY that does not match decides nothing", &["{action: DENY, rules: [{from: [{source: {principals: [cluster.local/ns/other/sa/web]}}]}]}"], req(), A, A),
        c("ref: DENY is evaluated before ALLOW", &["{action: ALLOW, rules: [{}]}", "{action: DENY, rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]}]}"], req(), D, D),
        c("ref: allow-nothing (ALLOW without rules) matches nothing", &["{action: ALLOW}"], req(), D, D),
        c("ref: allow-all (ALLOW with an empty rule) matches everything", &["{action: ALLOW, rules: [{}]}"], req().plaintext(), A, A),
        c("ref: deny-all (DENY with an empty rule)", &["{action: DENY, rules: [{}]}"], req(), D, D),
        c("ref: a DENY without rules matches nothing", &["{action: DENY}"], req(), A, A),
        c("ref: any one of several ALLOW policies", &["{action: ALLOW, rules: [{from: [{source: {principals: [cluster.local/ns/other/sa/web]}}]}]}", "{action: ALLOW, rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]}]}"], req(), A, A),
        c("ref: several ALLOW policies, none matches", &["{action: ALLOW, rules: [{from: [{source: {principals: [cluster.local/ns/other/sa/web]}}]}]}", "{action: ALLOW, rules: [{from: [{source: {namespaces: [other]}}]}]}"], req(), D, D),
        c("ref: an unmatched ALLOW still denies beside a non-matching DENY", &["{action: ALLOW, rules: [{from: [{source: {principals: [cluster.local/ns/other/sa/web]}}]}]}", "{action: DENY, rules: [{from: [{source: {principals: [cluster.local/ns/other/sa/web]}}]}]}"], req(), D, D),
        // principals
        c("ref: principals, prefix match abc*", &["{action: ALLOW, rules: [{from: [{source: {principals: [\"cluster.local/ns/shop/*\"]}}]}]}"], req(), A, A),
        c("ref: principals, suffix match *abc", &["{action: ALLOW, rules: [{from: [{source: {principals: [\"*/sa/client\"]}}]}]}"], req(), A, A),
        c("ref: principals, presence match *", &["{action: ALLOW, rules: [{from: [{source: {principals: [\"*\"]}}]}]}"], req(), A, A),
        c("ref: principals need mTLS: presence fails on plaintext", &["{action: ALLOW, rules: [{from: [{source: {principals: [\"*\"]}}]}]}"], req().plaintext(), D, D),
        c("ref: principals need mTLS: exact fails on plaintext", &["{action: ALLOW, rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]}]}"], req().plaintext(), D, D),
        c("ref: notPrincipals, another peer passes", &["{action: ALLOW, rules: [{from: [{source: {notPrincipals: [cluster.local/ns/other/sa/web]}}]}]}"], req(), A, A),
        c("ref: notPrincipals, the named peer fails", &["{action: ALLOW, rules: [{from: [{source: {notPrincipals: [cluster.local/ns/shop/sa/client]}}]}]}"], req(), D, D),
        c("concepts: DENY notPrincipals * refuses plaintext (require mTLS)", &["{action: DENY, rules: [{from: [{source: {notPrincipals: [\"*\"]}}]}]}"], req().plaintext(), D, D),
        c("concepts: DENY notPrincipals * passes mTLS", &["{action: DENY, rules: [{from: [{source: {notPrincipals: [\"*\"]}}]}]}"], req(), A, A),
        c("ref: principals and notPrincipals in one source are ANDed", &["{action: ALLOW, rules: [{from: [{source: {principals: [\"cluster.local/ns/shop/*\"], notPrincipals: [cluster.local/ns/shop/sa/client]}}]}]}"], req(), D, D),
        c("ref: principals, exact match of another trust domain fails", &["{action: ALLOW, rules: [{from: [{source: {principals: [other.td/ns/shop/sa/client]}}]}]}"], req(), D, D),
        // namespaces
        c("ref: namespaces, exact", &["{action: ALLOW, rules: [{from: [{source: {namespaces: [shop]}}]}]}"], req(), A, A),
        c("ref: namespaces, another namespace fails", &["{action: ALLOW, rules: [{from: [{source: {namespaces: [shop]}}]}]}"], req().from(W), D, D),
        c("ref: namespaces, prefix", &["{action: ALLOW, rules: [{from: [{source: {namespaces: [\"sh*\"]}}]}]}"], req(), A, A),
        c("ref: namespaces require mTLS", &["{action: ALLOW, rules: [{from: [{source: {namespaces: [\"*\"]}}]}]}"], req().plaintext(), D, D),
        c("ref: notNamespaces, the named namespace fails", &["{action: ALLOW, rules: [{from: [{source: {notNamespaces: [other]}}]}]}"], req().from(W), D, D),
        c("ref: notNamespaces, another namespace passes", &["{action: ALLOW, rules: [{from: [{source: {notNamespaces: [other]}}]}]}"], req(), A, A),
        c("ref: DENY by namespace", &["{action: DENY, rules: [{from: [{source: {namespaces: [other]}}]}]}"], req().from(W), D, D),
        c("ref: DENY notNamespaces holds for plaintext (no namespace)", &["{action: DENY, rules: [{from: [{source: {notNamespaces: [shop]}}]}]}"], req().plaintext(), D, D),
        c("ref: DENY notNamespaces, the own namespace passes", &["{action: DENY, rules: [{from: [{source: {notNamespaces: [shop]}}]}]}"], req(), A, A),
        // serviceAccounts
        c("ref: serviceAccounts ns/name", &["{action: ALLOW, rules: [{from: [{source: {serviceAccounts: [shop/client]}}]}]}"], req(), A, A),
        c("ref: serviceAccounts, another account fails", &["{action: ALLOW, rules: [{from: [{source: {serviceAccounts: [shop/client]}}]}]}"], req().from(W), D, D),
        c("ref: serviceAccounts require mTLS", &["{action: ALLOW, rules: [{from: [{source: {serviceAccounts: [shop/client]}}]}]}"], req().plaintext(), D, D),
        c("ref: notServiceAccounts, the named account fails", &["{action: ALLOW, rules: [{from: [{source: {notServiceAccounts: [other/web]}}]}]}"], req().from(W), D, D),
        c("ref: notServiceAccounts, another account passes", &["{action: ALLOW, rules: [{from: [{source: {notServiceAccounts: [other/web]}}]}]}"], req(), A, A),
        c("ref: serviceAccounts match any trust domain", &["{action: ALLOW, rules: [{from: [{source: {serviceAccounts: [shop/client]}}]}]}"], req().from("other.td/ns/shop/sa/client"), A, A),
        c("ref: DENY by serviceAccounts", &["{action: DENY, rules: [{from: [{source: {serviceAccounts: [other/web]}}]}]}"], req().from(W), D, D),
        // ipBlocks and remoteIpBlocks
        c("ref: ipBlocks, single IP", &["{action: ALLOW, rules: [{from: [{source: {ipBlocks: [10.1.0.5]}}]}]}"], req(), A, A),
        c("ref: ipBlocks, CIDR", &["{action: ALLOW, rules: [{from: [{source: {ipBlocks: [10.1.0.0/16]}}]}]}"], req(), A, A),
        c("ref: ipBlocks, outside the CIDR", &["{action: ALLOW, rules: [{from: [{source: {ipBlocks: [10.2.0.0/16]}}]}]}"], req(), D, D),
        c("ref: notIpBlocks", &["{action: ALLOW, rules: [{from: [{source: {notIpBlocks: [10.1.0.0/16]}}]}]}"], req(), D, D),
        c("ref: DENY by ipBlocks", &["{action: DENY, rules: [{from: [{source: {ipBlocks: [10.1.0.0/24]}}]}]}"], req(), D, D),
        c("ref: DENY notIpBlocks, inside passes (every address of the dual-stack source inside)", &["{action: DENY, rules: [{from: [{source: {notIpBlocks: [10.1.0.0/24, \"fd00:1::/64\"]}}]}]}"], req(), A, A),
        c("ref: DENY notIpBlocks, outside denied", &["{action: DENY, rules: [{from: [{source: {notIpBlocks: [10.1.0.0/24]}}]}]}"], req().ip("10.7.0.1"), D, D),
        c("ambient-l4: remoteIpBlocks is L7 (the original client): an ALLOW rule with it never matches at the ztunnel; the waypoint takes the source address (security: no forwarding header is trusted)", &["{action: ALLOW, rules: [{from: [{source: {remoteIpBlocks: [10.1.0.5]}}]}]}"], req(), D, A),
        c("ambient-l4: a DENY on remoteIpBlocks denies on its L4 fields alone at the ztunnel", &["{action: DENY, rules: [{from: [{source: {remoteIpBlocks: [10.7.0.0/16]}}]}]}"], req(), D, A),
        c("security: notRemoteIpBlocks is the source address at the waypoint", &["{action: ALLOW, rules: [{from: [{source: {notRemoteIpBlocks: [10.1.0.5]}}]}]}"], req(), D, D),
        c("ref: an IPv6 block never holds an IPv4 source", &["{action: ALLOW, rules: [{from: [{source: {ipBlocks: [\"fd00::/8\"]}}]}]}"], req(), D, D),
        c("ref: 0.0.0.0/0 holds every IPv4 source", &["{action: ALLOW, rules: [{from: [{source: {ipBlocks: [0.0.0.0/0]}}]}]}"], req(), A, A),
        // ipBlocks in a dual-stack cluster (the client is 10.1.0.5 and fd00:1::5)
        c("security: a DENY of the source's IPv4 block holds when it comes from its IPv6 address", &["{action: DENY, rules: [{from: [{source: {ipBlocks: [10.1.0.0/24]}}]}]}"], req().ip("fd00:1::5"), D, D),
        c("security: a DENY of the source's IPv4 block holds for plaintext from its IPv6 address", &["{action: DENY, rules: [{from: [{source: {ipBlocks: [10.1.0.0/24]}}]}]}"], req().plaintext().ip("fd00:1::5"), D, D),
        c("security: a DENY of the source's IPv6 block holds when it comes from its IPv4 address", &["{action: DENY, rules: [{from: [{source: {ipBlocks: [\"fd00:1::/64\"]}}]}]}"], req(), D, D),
        c("security: an identity that does not own the address's workload is judged on the address alone", &["{action: DENY, rules: [{from: [{source: {ipBlocks: [10.1.0.0/24]}}]}]}"], req().from(W).ip("fd00:1::5"), A, A),
        c("security: an IPv4-only ALLOW does not admit the source's IPv6 address", &["{action: ALLOW, rules: [{from: [{source: {ipBlocks: [10.1.0.0/24]}}]}]}"], req().ip("fd00:1::5"), D, D),
        c("security: notIpBlocks excludes the source from its IPv6 address too", &["{action: ALLOW, rules: [{from: [{source: {notIpBlocks: [10.1.0.0/24]}}]}]}"], req().ip("fd00:1::5"), D, D),
        c("security: a DENY notIpBlocks of the source's IPv4 block holds when it comes from its IPv6 address", &["{action: DENY, rules: [{from: [{source: {notIpBlocks: [10.1.0.0/24]}}]}]}"], req().ip("fd00:1::5"), D, D),
        c("security: a DENY notIpBlocks holds when any address of the source is outside the blocks", &["{action: DENY, rules: [{from: [{source: {notIpBlocks: [10.1.0.0/24]}}]}]}"], req(), D, D),
        c("security: a DENY notIpBlocks holds for plaintext from an address of the source outside the blocks", &["{action: DENY, rules: [{from: [{source: {notIpBlocks: [\"fd00:1::/64\"]}}]}]}"], req().plaintext(), D, D),
        c("security: an ALLOW notIpBlocks does not admit the source from its other address", &["{action: ALLOW, rules: [{from: [{source: {notIpBlocks: [\"fd00:1::/64\"]}}]}]}"], req(), D, D),
        c("security: a DENY on destination.ip notValues holds when any address of the dual-stack destination is outside (the waypoint cannot check it)", &["{action: DENY, rules: [{when: [{key: destination.ip, notValues: [10.1.0.9]}]}]}"], req(), D, D),
        c("security: a DENY on destination.ip notValues with every address of the destination passes at the ztunnel", &["{action: DENY, rules: [{when: [{key: destination.ip, notValues: [10.1.0.9, \"fd00:1::9\"]}]}]}"], req(), A, D),
        c("security: a DENY on destination.ip holds for any address of the destination", &["{action: DENY, rules: [{when: [{key: destination.ip, values: [\"fd00:1::9\"]}]}]}"], req(), D, D),
        c("security: a DENY when source.ip of the source's IPv4 block holds from its IPv6 address", &["{action: DENY, rules: [{when: [{key: source.ip, values: [10.1.0.0/24]}]}]}"], req().ip("fd00:1::5"), D, D),
        c("security: a DENY when source.ip notValues holds when any address of the source is outside", &["{action: DENY, rules: [{when: [{key: source.ip, notValues: [10.1.0.0/24]}]}]}"], req(), D, D),
        c("security: a DENY when source.ip notValues with every address of the source passes", &["{action: DENY, rules: [{when: [{key: source.ip, notValues: [10.1.0.0/24, \"fd00:1::/64\"]}]}]}"], req(), A, A),
        c("security: an ALLOW when source.ip notValues does not admit the source from its other address", &["{action: ALLOW, rules: [{when: [{key: source.ip, notValues: [10.1.0.0/24]}]}]}"], req().ip("fd00:1::5"), D, D),
        c("security: an ALLOW when source.ip is the connection's address alone", &["{action: ALLOW, rules: [{when: [{key: source.ip, values: [10.1.0.0/24]}]}]}"], req().ip("fd00:1::5"), D, D),
        c("security: a DENY when remote.ip of the source's IPv4 block holds at the waypoint from its IPv6 address", &["{action: DENY, rules: [{when: [{key: remote.ip, values: [10.1.0.0/24]}]}]}"], req().ip("fd00:1::5"), D, D),
        // The same over IPv6 end to end (client fd00:1::5 to server fd00:1::9).
        c("security: an IPv6 connection is judged on its IPv6 source", &["{action: ALLOW, rules: [{from: [{source: {ipBlocks: [\"fd00:1::/64\"]}}]}]}"], req().v6(), A, A),
        c("security: a DENY of the source's IPv4 block holds for its IPv6 connection", &["{action: DENY, rules: [{from: [{source: {ipBlocks: [10.1.0.0/24]}}]}]}"], req().v6(), D, D),
        c("security: a DENY of the source's IPv4 block holds for its plaintext IPv6 connection", &["{action: DENY, rules: [{from: [{source: {ipBlocks: [10.1.0.5/32]}}]}]}"], req().plaintext().v6(), D, D),
        c("security: an IPv4-only ALLOW does not admit an IPv6 connection", &["{action: ALLOW, rules: [{from: [{source: {ipBlocks: [10.1.0.0/24]}}]}]}"], req().v6(), D, D),
        c("security: a DENY notIpBlocks of both families passes an IPv6 connection from inside", &["{action: DENY, rules: [{from: [{source: {notIpBlocks: [10.1.0.0/24, \"fd00:1::/64\"]}}]}]}"], req().v6(), A, A),
        c("security: a DENY on destination.ip of the destination's IPv4 address holds for its IPv6 address", &["{action: DENY, rules: [{when: [{key: destination.ip, values: [10.1.0.9]}]}]}"], req().v6(), D, D),
        c("security: a DENY on destination.ip notValues with both destination addresses passes an IPv6 connection at the ztunnel", &["{action: DENY, rules: [{when: [{key: destination.ip, notValues: [10.1.0.9, \"fd00:1::9\"]}]}]}"], req().v6(), A, D),
        c("security: an ALLOW on destination.ip of the IPv6 address admits the IPv6 connection at the ztunnel", &["{action: ALLOW, rules: [{when: [{key: destination.ip, values: [\"fd00:1::9\"]}]}]}"], req().v6(), A, D),
        c("security: an ALLOW on destination.ip of the IPv4 address does not admit the IPv6 connection", &["{action: ALLOW, rules: [{when: [{key: destination.ip, values: [10.1.0.9]}]}]}"], req().v6(), D, D),
        c("security: a DENY when source.ip of the source's IPv6 address holds over IPv4", &["{action: DENY, rules: [{when: [{key: source.ip, values: [\"fd00:1::5\"]}]}]}"], req(), D, D),
        // A source address that names no workload and may be anyone on the
        // link (a pod on the same bridge calling from its link-local
        // address) is refused before any policy: IP blocks would judge it
        // alone.
        c("security: a link-local IPv6 source is refused", &[], req().plaintext().ip("fe80::5").to("fd00:1::9"), D, D),
        c("security: a link-local IPv6 source does not escape a DENY of the caller's addresses", &["{action: DENY, rules: [{from: [{source: {ipBlocks: [10.1.0.5/32, \"fd00:1::5/128\"]}}]}]}"], req().plaintext().ip("fe80::5").to("fd00:1::9"), D, D),
        c("security: a link-local IPv6 source is not admitted by an ALLOW notIpBlocks of the caller's addresses", &["{action: ALLOW, rules: [{from: [{source: {notIpBlocks: [10.1.0.5/32, \"fd00:1::5/128\"]}}]}]}"], req().plaintext().ip("fe80::5").to("fd00:1::9"), D, D),
        c("security: a link-local IPv4 source is refused", &[], req().plaintext().ip("169.254.3.4"), D, D),
        c("security: an unspecified source is refused", &[], req().plaintext().ip("::").to("fd00:1::9"), D, D),
        c("security: notIpBlocks does not exclude a source with no address in the blocks", &["{action: ALLOW, rules: [{from: [{source: {notIpBlocks: [10.1.0.0/24]}}]}]}"], req().ip("fd00:9::9"), A, A),
        // ports
        c("ref: ports", &["{action: ALLOW, rules: [{to: [{operation: {ports: [\"8080\"]}}]}]}"], req(), A, A),
        c("ref: ports, another port fails", &["{action: ALLOW, rules: [{to: [{operation: {ports: [\"9090\"]}}]}]}"], req(), D, D),
        c("ref: notPorts", &["{action: ALLOW, rules: [{to: [{operation: {notPorts: [\"8080\"]}}]}]}"], req(), D, D),
        c("ref: DENY by ports", &["{action: DENY, rules: [{to: [{operation: {ports: [\"8080\"]}}]}]}"], req(), D, D),
        c("ref: DENY notPorts, the port passes", &["{action: DENY, rules: [{to: [{operation: {notPorts: [\"8080\"]}}]}]}"], req(), A, A),
        c("ref: ports, the connection's port is what is compared", &["{action: ALLOW, rules: [{to: [{operation: {ports: [\"8080\"]}}]}]}"], req().port(9090), D, D),
        c("ref: ports, any of several", &["{action: ALLOW, rules: [{to: [{operation: {ports: [\"9090\", \"8080\"]}}]}]}"], req(), A, A),
        // Structure of a rule.
        c("ref: from, to and when of a rule are ANDed", &["{action: ALLOW, rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}], to: [{operation: {ports: [\"9090\"]}}]}]}"], req(), D, D),
        c("ref: sources of a rule are ORed", &["{action: ALLOW, rules: [{from: [{source: {principals: [cluster.local/ns/other/sa/web]}}, {source: {principals: [cluster.local/ns/shop/sa/client]}}]}]}"], req(), A, A),
        c("ref: operations of a rule are ORed", &["{action: ALLOW, rules: [{to: [{operation: {ports: [\"9090\"]}}, {operation: {ports: [\"8080\"]}}]}]}"], req(), A, A),
        c("ref: fields of one source are ANDed", &["{action: ALLOW, rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/client], ipBlocks: [10.2.0.0/16]}}]}]}"], req(), D, D),
        c("ref: rules of a policy are ORed", &["{action: ALLOW, rules: [{from: [{source: {principals: [cluster.local/ns/other/sa/web]}}]}, {to: [{operation: {ports: [\"8080\"]}}]}]}"], req(), A, A),
        c("ref: every condition must hold", &["{action: ALLOW, rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}], when: [{key: destination.port, values: [\"9090\"]}]}]}"], req(), D, D),
        // when
        c("ref: when source.ip", &["{action: ALLOW, rules: [{when: [{key: source.ip, values: [10.1.0.0/16]}]}]}"], req(), A, A),
        c("ref: when source.ip notValues", &["{action: ALLOW, rules: [{when: [{key: source.ip, notValues: [10.1.0.5]}]}]}"], req(), D, D),
        c("ref: when source.namespace", &["{action: ALLOW, rules: [{when: [{key: source.namespace, values: [shop]}]}]}"], req(), A, A),
        c("ref: when source.principal", &["{action: ALLOW, rules: [{when: [{key: source.principal, values: [cluster.local/ns/shop/sa/client]}]}]}"], req(), A, A),
        c("ref: when destination.port", &["{action: ALLOW, rules: [{when: [{key: destination.port, values: [\"8080\"]}]}]}"], req(), A, A),
        c("ref: when destination.port, another port fails", &["{action: ALLOW, rules: [{when: [{key: destination.port, values: [\"9090\"]}]}]}"], req(), D, D),
        c("ref: DENY when destination.port notValues, the port passes", &["{action: DENY, rules: [{when: [{key: destination.port, notValues: [\"8080\"]}]}]}"], req(), A, A),
        c("ambient-l4: when remote.ip is L7: never matches an ALLOW at the ztunnel; the source address at the waypoint", &["{action: ALLOW, rules: [{when: [{key: remote.ip, values: [10.1.0.5]}]}]}"], req(), D, A),
        c("ambient-l7: destination.ip is an L4 key; the waypoint cannot check it, so the ALLOW rule never matches there", &["{action: ALLOW, rules: [{when: [{key: destination.ip, values: [10.1.0.9]}]}]}"], req(), A, D),
        // L7 fields: the waypoint checks them; the ztunnel cannot.
        c("ambient-l4: an ALLOW rule with L7 fields never matches at the ztunnel", &["{action: ALLOW, rules: [{to: [{operation: {methods: [GET]}}]}]}"], req(), D, A),
        c("ref: methods, another method fails", &["{action: ALLOW, rules: [{to: [{operation: {methods: [GET]}}]}]}"], req().method("POST"), D, D),
        c("ambient-l4: a DENY rule with L7 fields denies on its L4 fields alone at the ztunnel", &["{action: DENY, rules: [{to: [{operation: {methods: [POST]}}]}]}"], req(), D, A),
        c("ref: DENY by method", &["{action: DENY, rules: [{to: [{operation: {methods: [POST]}}]}]}"], req().method("POST"), D, D),
        c("ref: paths, exact", &["{action: ALLOW, rules: [{to: [{operation: {paths: [/orders]}}]}]}"], req().path("/orders"), D, A),
        c("ref: paths, exact does not match a longer path", &["{action: ALLOW, rules: [{to: [{operation: {paths: [/orders]}}]}]}"], req().path("/orders/1"), D, D),
        c("ref: paths, prefix", &["{action: ALLOW, rules: [{to: [{operation: {paths: [\"/orders/*\"]}}]}]}"], req().path("/orders/1"), D, A),
        c("ref: paths, suffix", &["{action: ALLOW, rules: [{to: [{operation: {paths: [\"*.json\"]}}]}]}"], req().path("/a/b.json"), D, A),
        c("ref: paths, presence", &["{action: ALLOW, rules: [{to: [{operation: {paths: [\"*\"]}}]}]}"], req(), D, A),
        c("ref: paths match without the query", &["{action: ALLOW, rules: [{to: [{operation: {paths: [/orders]}}]}]}"], req().path("/orders?x=1"), D, A),
        c("ref: DENY by path prefix", &["{action: DENY, rules: [{to: [{operation: {paths: [\"/admin*\"]}}]}]}"], req().path("/admin/x"), D, D),
        c("ambient-l4: DENY by path: the ztunnel denies on L4 alone", &["{action: DENY, rules: [{to: [{operation: {paths: [\"/admin*\"]}}]}]}"], req().path("/public"), D, A),
        c("ref: notPaths, another path passes", &["{action: ALLOW, rules: [{to: [{operation: {notPaths: [\"/admin*\"]}}]}]}"], req().path("/public"), D, A),
        c("ref: notPaths, the named path fails", &["{action: ALLOW, rules: [{to: [{operation: {notPaths: [\"/admin*\"]}}]}]}"], req().path("/admin"), D, D),
        c("ref: hosts", &["{action: ALLOW, rules: [{to: [{operation: {hosts: [server.shop.svc.cluster.local]}}]}]}"], req(), D, A),
        c("ref: hosts match case-insensitively", &["{action: ALLOW, rules: [{to: [{operation: {hosts: [SERVER.shop.svc.cluster.local]}}]}]}"], req(), D, A),
        c("ref: hosts, suffix", &["{action: ALLOW, rules: [{to: [{operation: {hosts: [\"*.shop.svc.cluster.local\"]}}]}]}"], req(), D, A),
        c("ref: hosts, another host fails", &["{action: ALLOW, rules: [{to: [{operation: {hosts: [other.example]}}]}]}"], req(), D, D),
        c("ref: hosts with a port in the request", &["{action: ALLOW, rules: [{to: [{operation: {hosts: [server.shop.svc.cluster.local]}}]}]}"], req().host("server.shop.svc.cluster.local:8080"), D, A),
        c("ref: notHosts", &["{action: ALLOW, rules: [{to: [{operation: {notHosts: [server.shop.svc.cluster.local]}}]}]}"], req(), D, D),
        c("ref: fields of one operation are ANDed", &["{action: ALLOW, rules: [{to: [{operation: {methods: [GET], ports: [\"8080\"], hosts: [server.shop.svc.cluster.local]}}]}]}"], req(), D, A),
        c("ambient-l4: a DENY with L7 fields whose L4 fields do not hold passes", &["{action: DENY, rules: [{to: [{operation: {methods: [GET], ports: [\"9090\"]}}]}]}"], req(), A, A),
        c("ambient-l4: a DENY with L7 fields whose L4 fields hold", &["{action: DENY, rules: [{to: [{operation: {methods: [GET], ports: [\"8080\"]}}]}]}"], req(), D, D),
        c("ref: when request.headers", &["{action: ALLOW, rules: [{when: [{key: \"request.headers[x-user]\", values: [alice]}]}]}"], req().header("x-user", "alice"), D, A),
        c("ref: when request.headers, another value fails", &["{action: ALLOW, rules: [{when: [{key: \"request.headers[x-user]\", values: [alice]}]}]}"], req().header("x-user", "bob"), D, D),
        c("ref: when request.headers, an absent header fails", &["{action: ALLOW, rules: [{when: [{key: \"request.headers[x-user]\", values: [alice]}]}]}"], req(), D, D),
        c("ref: header names compare case-insensitively", &["{action: ALLOW, rules: [{when: [{key: \"request.headers[X-User]\", values: [alice]}]}]}"], req().header("x-user", "alice"), D, A),
        c("ref: DENY when request.headers notValues, the value passes at the waypoint", &["{action: DENY, rules: [{when: [{key: \"request.headers[x-user]\", notValues: [alice]}]}]}"], req().header("x-user", "alice"), D, A),
        c("ref: when request.method", &["{action: ALLOW, rules: [{when: [{key: request.method, values: [GET]}]}]}"], req(), D, A),
        c("ref: when request.path", &["{action: ALLOW, rules: [{when: [{key: request.path, values: [/orders]}]}]}"], req().path("/orders"), D, A),
        c("ambient-l7: requestPrincipals are not checked: the ALLOW rule never matches", &["{action: ALLOW, rules: [{from: [{source: {requestPrincipals: [\"*\"]}}]}]}"], req(), D, D),
        c("ambient-l7: requestPrincipals are not checked: the DENY rule denies", &["{action: DENY, rules: [{from: [{source: {requestPrincipals: [\"*\"]}}]}]}"], req(), D, D),
        c("ambient-l7: JWT claims are not checked: the ALLOW rule never matches", &["{action: ALLOW, rules: [{when: [{key: \"request.auth.claims[group]\", values: [admin]}]}]}"], req(), D, D),
        c("ambient-l7: JWT claims are not checked: the DENY rule denies", &["{action: DENY, rules: [{when: [{key: \"request.auth.claims[group]\", values: [admin]}]}]}"], req(), D, D),
        // Opaque TCP through the waypoint.
        c("ambient-l7: on opaque TCP an ALLOW rule with HTTP fields never matches", &["{action: ALLOW, rules: [{to: [{operation: {methods: [GET]}}]}]}"], req().tcp(), D, D),
        c("ambient-l7: on opaque TCP a DENY rule with HTTP fields matches", &["{action: DENY, rules: [{to: [{operation: {paths: [/admin]}}]}]}"], req().tcp(), D, D),
        c("ambient-l7: on opaque TCP L4 fields still decide", &["{action: ALLOW, rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]}]}"], req().tcp(), A, A),
        // Fail closed on values that cannot be enforced.
        c("security: an ALLOW whose only ports are invalid denies", &["{action: ALLOW, rules: [{to: [{operation: {ports: [http]}}]}]}"], req(), D, D),
        c("security: an invalid ALLOW rule is dropped; the others still allow", &["{action: ALLOW, rules: [{to: [{operation: {ports: [http]}}]}, {from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]}]}"], req(), A, A),
        c("security: a DENY with an invalid ipBlock denies everything in scope", &["{action: DENY, rules: [{from: [{source: {ipBlocks: [10.0.0.0/8x]}}]}]}"], req().ip("10.9.9.9"), D, D),
        c("security: an ALLOW with an invalid ipBlock matches nothing", &["{action: ALLOW, rules: [{from: [{source: {ipBlocks: [10.0.0.0/8x]}}]}]}"], req(), D, D),
        c("security: a prefix length over 32 is invalid, not narrowed", &["{action: ALLOW, rules: [{from: [{source: {ipBlocks: [10.1.0.0/33]}}]}]}"], req(), D, D),
        c("security: an ALLOW with an invalid serviceAccount matches nothing", &["{action: ALLOW, rules: [{from: [{source: {serviceAccounts: [justname]}}]}]}"], req(), D, D),
        c("security: a DENY with an invalid serviceAccount denies everything", &["{action: DENY, rules: [{from: [{source: {serviceAccounts: [justname]}}]}]}"], req(), D, D),
        c("security: a DENY with an invalid notPort denies everything", &["{action: DENY, rules: [{to: [{operation: {notPorts: [\"99999\"]}}]}]}"], req(), D, D),
        c("security: an empty source is invalid (Istio validation)", &["{action: ALLOW, rules: [{from: [{source: {}}]}]}"], req(), D, D),
        c("security: an empty operation is invalid (Istio validation)", &["{action: ALLOW, rules: [{to: [{operation: {}}]}]}"], req(), D, D),
        c("security: a condition without values is invalid", &["{action: ALLOW, rules: [{when: [{key: source.ip}]}]}"], req(), D, D),
        c("security: a DENY condition with an invalid IP denies everything", &["{action: DENY, rules: [{when: [{key: source.ip, values: [bad]}]}]}"], req(), D, D),
        c("security: a wildcard in serviceAccounts is invalid: the DENY denies everything", &["{action: DENY, rules: [{from: [{source: {serviceAccounts: [\"*/admin\"]}}]}]}"], req(), D, D),
        c("security: a path template is not checked: the ALLOW rule never matches", &["{action: ALLOW, rules: [{to: [{operation: {paths: [\"/orders/{*}\"]}}]}]}"], req().path("/orders/1"), D, D),
        c("security: a path template is not checked: the DENY denies more", &["{action: DENY, rules: [{to: [{operation: {paths: [\"/admin/{**}\"]}}]}]}"], req().path("/public"), D, D),
        c("ref: `*` on a header means present, an empty value included", &["{action: DENY, rules: [{when: [{key: \"request.headers[x-debug]\", values: [\"*\"]}]}]}"], req().header("x-debug", ""), D, D),
        c("ref: `*` on a header: an absent header is not present", &["{action: DENY, rules: [{when: [{key: \"request.headers[x-debug]\", values: [\"*\"]}]}]}"], req(), D, A),
        c("ref: destination.port values are numbers (080 is 80)", &["{action: DENY, rules: [{when: [{key: destination.port, values: [\"08080\"]}]}]}"], req(), D, D),
        c("ref: hosts: a trailing dot names the same host", &["{action: DENY, rules: [{to: [{operation: {hosts: [server.shop.svc.cluster.local]}}]}]}"], req().host("server.shop.svc.cluster.local."), D, D),
        // CUSTOM (the waypoint's evaluator here is the one that asks no
        // provider: a matching CUSTOM policy denies; waypoint/tests/extauthz.rs
        // and e2e/tests/extauthz.rs ask real ones).
        c("ref: CUSTOM is evaluated first: a matching CUSTOM policy whose provider has not allowed denies", &["{action: CUSTOM, provider: {name: authz}, rules: [{to: [{operation: {paths: [\"/admin*\"]}}]}]}"], req().path("/admin"), D, D),
        c("ref: a CUSTOM policy that does not match decides nothing (at the ztunnel: a DENY of its L4 match)", &["{action: CUSTOM, provider: {name: authz}, rules: [{to: [{operation: {paths: [\"/admin*\"]}}]}]}"], req().path("/public"), D, A),
        c("ref: a CUSTOM policy is not an ALLOW policy", &["{action: CUSTOM, provider: {name: authz}, rules: [{from: [{source: {principals: [cluster.local/ns/other/sa/web]}}]}]}"], req(), A, A),
        c("security: CUSTOM with an unknown provider denies everything in its scope", &["{action: CUSTOM, provider: {name: nobody}, rules: [{to: [{operation: {paths: [\"/admin*\"]}}]}]}"], req().path("/public"), D, D),
        c("ref: a dry-run CUSTOM policy is not enforced", &["{action: CUSTOM, provider: {name: authz}, rules: [{}], dryRun: true}"], req(), A, A),
        // Dry run.
        c("ref: dry-run (istio.io/dry-run) DENY is not enforced", &["{action: DENY, rules: [{}], dryRun: true}"], req(), A, A),
        c("ref: a dry-run ALLOW does not make other traffic denied", &["{action: ALLOW, rules: [{from: [{source: {principals: [cluster.local/ns/other/sa/web]}}]}], dryRun: true}"], req(), A, A),
        c("ref: a dry-run policy beside an enforced one", &["{action: DENY, rules: [{}], dryRun: true}", "{action: ALLOW, rules: [{from: [{source: {principals: [cluster.local/ns/other/sa/web]}}]}]}"], req(), D, D),
        c("ref: dry-run annotation read as Go's ParseBool (\"1\" is true)", &["{action: DENY, rules: [{}], dryRun: \"1\"}"], req(), A, A),
        c("security: an unreadable dry-run annotation: a DENY is enforced", &["{action: DENY, rules: [{}], dryRun: \"maybe\"}"], req(), D, D),
        c("security: an unreadable dry-run annotation: an ALLOW grants nothing", &["{action: ALLOW, rules: [{}], dryRun: \"maybe\"}"], req(), D, D),
        // Targeting.
        raw("ref: a policy in the root namespace applies to every workload (ztunnel); without targetRefs it is not a waypoint's", ZT_ROOT_ALLOW_W, req(), D, A),
        raw("ambient-l7: targetRefs to the istio-waypoint GatewayClass from the root namespace covers every waypoint", CLASS_DENY_ALL, req(), A, D),
        raw("ref: a selector that selects other workloads does not apply", SELECTOR_OTHER_DENY_ALL, req(), A, A),
        raw("ref: a policy without selector covers its namespace's workloads; not a waypoint's", NAMESPACE_DENY_ALL, req(), D, A),
        raw("ref: a namespace-wide policy covers no other namespace", OTHER_NAMESPACE_DENY_ALL, req(), A, A),
        raw("ambient-l7: targetRefs to a Service applies at its waypoint, not at the ztunnel", SERVICE_DENY_ALL, req(), A, D),
        raw("ambient-l7: targetRefs to the waypoint's Gateway applies at the waypoint", GATEWAY_DENY_ALL, req(), A, D),
        raw("ambient-l7: targetRefs to another Gateway does not apply", OTHER_GATEWAY_DENY_ALL, req(), A, A),
        raw("ref: targetRefs name objects in the policy's own namespace only", CROSS_NAMESPACE_TARGET, req(), A, A),
    ]
}

#[test]
fn the_conformance_table_holds_on_both_evaluators() {
    let cases = cases();
    assert!(cases.len() >= 100, "{} cases", cases.len());
    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let m = model(case);
        let z = ztunnel_decision(&m, &case.req);
        let w = waypoint_decision(&m, &case.req);
        if z != case.ztunnel || w != case.waypoint {
            failures.push(format!(
                "case {i} ({}): ztunnel {z:?} (want {:?}), waypoint {w:?} (want {:?}); request {:?}; policies:\n{}",
                case.cite,
                case.ztunnel,
                case.waypoint,
                case.req,
                policy_docs(case)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases fail:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}
