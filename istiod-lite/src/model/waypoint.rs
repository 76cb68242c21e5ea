//! What a waypoint gets besides routes: how each port of a service speaks,
//! and the AuthorizationPolicies attached to the service at its waypoint,
//! in the waypoint's own `mesh.waypoint.Policy` form.
//!
//! A policy reaches a waypoint only through `targetRefs` (or the older
//! `targetRef`): the waypoint's Gateway, the Service itself, or, from the
//! root namespace, the `istio-waypoint` GatewayClass (every waypoint).
//! Selector and namespace-wide policies are for ztunnels (`authz.rs`).
//!
//! The waypoint checks L7 fields, but not everything Istio has: request
//! principals (JWT) and condition keys outside [`CONDITION_KEYS`] it cannot
//! check, and a value that does not parse it cannot either. Such a field is
//! enforced fail closed: an ALLOW rule that has one is dropped (it never
//! matches). A DENY rule is kept without a field the waypoint cannot check
//! (it denies more, as Istio's ztunnel treats L7 fields), and becomes a
//! rule that matches every request in the policy's scope when a value is
//! invalid (does not parse, or is refused by Istio's validation, such as an
//! empty `source` or `operation`). All are reported.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Service, ServicePort};
use mesh_proto::mesh::waypoint as pb;

use super::{Model, NsName, WAYPOINT_CLASS};
use crate::config::crds::{
    AuthorizationAction, AuthorizationPolicy, AuthorizationRule, Condition, Operation, Source,
};

/// Group of the Gateway and GatewayClass kinds.
pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// How a port speaks, from its `appProtocol` when set, else its name, as
/// Istio reads them: the part before the first `-` (or `_`) names the
/// protocol ("http-api" is HTTP/1). Anything not known is sniffed.
pub fn port_protocol(p: &ServicePort) -> pb::Protocol {
    // The mesh carries TCP only; other transports never reach a waypoint.
    if matches!(p.protocol.as_deref(), Some("UDP" | "SCTP")) {
        return pb::Protocol::Tcp;
    }
    let v = p
        .app_protocol
        .as_deref()
        .filter(|a| !a.is_empty())
        .or(p.name.as_deref())
        .unwrap_or_default()
        .to_ascii_lowercase();
    protocol(&v)
}

/// One protocol name (already lower-cased).
pub fn protocol(v: &str) -> pb::Protocol {
    use pb::Protocol as P;
    // Kubernetes' own appProtocol names.
    match v {
        "kubernetes.io/h2c" => return P::Http2,
        "kubernetes.io/ws" => return P::Http1,
        "kubernetes.io/wss" => return P::Tcp,
        _ => {}
    }
    match v.split(['-', '_']).next().unwrap_or_default() {
        "http" | "http1" => P::Http1,
        // "grpc-web" lands here too, as in Istio.
        "http2" | "h2c" | "grpc" => P::Http2,
        "tcp" | "tls" | "https" | "mongo" | "mysql" | "redis" | "udp" => P::Tcp,
        _ => P::Sniff,
    }
}

/// Every port of a Service with its protocol.
pub fn ports(svc: &Service) -> Vec<pb::PortProtocol> {
    svc.spec
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .map(|p| pb::PortProtocol {
            port: p.port as u32,
            protocol: port_protocol(p) as i32,
        })
        .collect()
}

/// True when policy `p` (in namespace `p_ns`) is attached to Service `svc`
/// served by waypoint Gateway `gw`.
fn attached(model: &Model, p_ns: &str, p: &AuthorizationPolicy, svc: &NsName, gw: &NsName) -> bool {
    p.spec.targets().any(|t| {
        // A targetRef names an object in the policy's own namespace.
        let same_ns = t.namespace.as_deref().is_none_or(|n| n == p_ns);
        match (t.group.as_str(), t.kind.as_str()) {
            (GATEWAY_GROUP, "Gateway") => same_ns && p_ns == gw.0 && t.name == gw.1,
            ("", "Service") => same_ns && p_ns == svc.0 && t.name == svc.1,
            (GATEWAY_GROUP, "GatewayClass") => {
                p_ns == model.cfg.root_namespace && t.name == WAYPOINT_CLASS
            }
            _ => false,
        }
    })
}

/// The policies that apply to Service `svc` at its waypoint `gw`, sorted
/// by name ("namespace/name"). Policies that cannot be served (AUDIT,
/// CUSTOM) are left out; their issues are reported with the policy.
pub fn policies(model: &Model, svc: &NsName, gw: &NsName) -> Vec<pb::Policy> {
    // Policies attach in their own namespace: the Gateway's, the
    // Service's, or the root namespace (GatewayClass-wide).
    let mut namespaces = vec![gw.0.as_str()];
    for ns in [svc.0.as_str(), model.cfg.root_namespace.as_str()] {
        if !ns.is_empty() && !namespaces.contains(&ns) {
            namespaces.push(ns);
        }
    }
    let mut out: Vec<pb::Policy> = namespaces
        .into_iter()
        .flat_map(|ns| {
            model
                .authz_policies
                .range((ns.to_string(), String::new())..)
                .take_while(move |((n, _), _)| n == ns)
        })
        .filter(|((ns, _), p)| attached(model, ns, p, svc, gw))
        .filter_map(|(_, p)| convert(model, p).0)
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The policies attached to waypoint Gateway `gw` itself (targetRefs to
/// the Gateway, or from the root namespace to the waypoint GatewayClass),
/// sorted by name: what applies to everything the waypoint serves, pod-
/// addressed traffic included. Service-targeted policies are not here.
pub fn gateway_policies(model: &Model, gw: &NsName) -> Vec<pb::Policy> {
    // No Service has an empty namespace, so no Service target matches.
    let none: NsName = (String::new(), String::new());
    policies(model, &none, gw)
}

/// Problems with what a policy is attached to (only for policies that
/// have targets).
pub fn target_issues(model: &Model, p: &AuthorizationPolicy) -> Vec<String> {
    let ns = p.metadata.namespace.as_deref().unwrap_or_default();
    let mut issues = Vec::new();
    if p.spec.target_ref.is_some() && !p.spec.target_refs.is_empty() {
        issues.push("both targetRef and targetRefs are set; both are used".into());
    }
    if p.spec
        .selector
        .as_ref()
        .is_some_and(|s| !s.match_labels.is_empty())
    {
        issues.push(
            "selector is ignored: a policy with targetRefs applies at the waypoint only".into(),
        );
    }
    for t in p.spec.targets() {
        let what = format!("targetRef {}/{} {}", t.group, t.kind, t.name);
        if t.namespace.as_deref().is_some_and(|n| n != ns) {
            issues.push(format!(
                "{what} names namespace {:?}; a policy only attaches in its own namespace",
                t.namespace.as_deref().unwrap_or_default()
            ));
            continue;
        }
        match (t.group.as_str(), t.kind.as_str()) {
            (GATEWAY_GROUP, "Gateway") => {
                let key = (ns.to_string(), t.name.clone());
                match model.gateways.get(&key) {
                    None => issues.push(format!(
                        "{what} does not exist: the policy is enforced nowhere until it does"
                    )),
                    Some(g) if g.spec.gateway_class_name != WAYPOINT_CLASS => issues.push(format!(
                        "{what} is of class {:?}, not a waypoint ({WAYPOINT_CLASS}): the policy is enforced nowhere",
                        g.spec.gateway_class_name
                    )),
                    Some(_) => {}
                }
            }
            ("", "Service") => {
                let key = (ns.to_string(), t.name.clone());
                if !model.services.contains_key(&key) {
                    issues.push(format!(
                        "{what} does not exist: the policy is enforced nowhere until it does"
                    ));
                } else if super::workload::service_waypoint(model, &key).is_none() {
                    issues.push(format!(
                        "{what} uses no waypoint: the policy is enforced nowhere (targetRefs apply at a waypoint)"
                    ));
                }
            }
            (GATEWAY_GROUP, "GatewayClass") => {
                if ns != model.cfg.root_namespace {
                    issues.push(format!(
                        "{what} applies only from the root namespace {:?}; ignored",
                        model.cfg.root_namespace
                    ));
                } else if t.name != WAYPOINT_CLASS {
                    issues.push(format!(
                        "{what} is not the {WAYPOINT_CLASS} class; ignored"
                    ));
                }
            }
            _ => issues.push(format!(
                "{what} is not supported (a Gateway or GatewayClass of group {GATEWAY_GROUP}, or a core Service); ignored"
            )),
        }
    }
    issues
}

/// Condition keys the waypoint evaluates. `request.headers[<name>]` is
/// also accepted (the name is lower-cased); `remote.ip` is taken as
/// `source.ip` (the waypoint trusts no forwarding header).
pub const CONDITION_KEYS: &[&str] = &[
    "source.ip",
    "source.namespace",
    "source.principal",
    "destination.port",
    "request.method",
    "request.path",
];

fn valid_ip_block(s: &str) -> bool {
    let (ip, len) = match s.split_once('/') {
        Some((ip, len)) => (ip, Some(len)),
        None => (s, None),
    };
    let Ok(addr) = ip.parse::<IpAddr>() else {
        return false;
    };
    let max = if addr.is_ipv4() { 32 } else { 128 };
    len.is_none_or(|l| l.parse::<u32>().is_ok_and(|l| l <= max))
}

fn parse_port(s: &str) -> Option<u32> {
    s.parse::<u16>().ok().filter(|p| *p != 0).map(u32::from)
}

/// Converts one rule. A field the waypoint cannot check (or that does not
/// parse) is left empty and named in `problems`; a value that does not
/// parse (or that Istio's validation refuses) also sets `invalid`.
struct RuleConverter {
    problems: Vec<String>,
    invalid: bool,
}

impl RuleConverter {
    fn bad(&mut self, problem: String) {
        self.invalid = true;
        self.problems.push(problem);
    }

    fn ip_blocks(&mut self, field: &str, v: &[String]) -> Vec<String> {
        match v.iter().find(|s| !valid_ip_block(s)) {
            Some(bad) => {
                self.bad(format!("{field}: {bad:?} is not an IP address or CIDR"));
                Vec::new()
            }
            None => v.to_vec(),
        }
    }

    fn ports(&mut self, field: &str, v: &[String]) -> Vec<u32> {
        let parsed: Option<Vec<u32>> = v.iter().map(|s| parse_port(s)).collect();
        parsed.unwrap_or_else(|| {
            if let Some(bad) = v.iter().find(|s| parse_port(s).is_none()) {
                self.bad(format!("{field}: {bad:?} is not a port number"));
            }
            Vec::new()
        })
    }

    fn unsupported(&mut self, field: &str, v: &[String]) {
        if !v.is_empty() {
            self.problems
                .push(format!("{field} is not supported at the waypoint"));
        }
    }

    /// `serviceAccounts` ("ns/sa") as principal suffix globs; they may not
    /// be combined with `principals` (a source's fields must all match, a
    /// list matches any entry).
    fn principals(
        &mut self,
        field: &str,
        principals: &[String],
        accounts_field: &str,
        accounts: &[String],
    ) -> Vec<String> {
        let mut out = principals.to_vec();
        if accounts.is_empty() {
            return out;
        }
        if !principals.is_empty() {
            self.bad(format!("{accounts_field} cannot be combined with {field}"));
            return out;
        }
        for a in accounts {
            match a.split_once('/') {
                Some((ns, sa))
                    if !ns.is_empty()
                        && !sa.is_empty()
                        && !sa.contains('/')
                        && !a.contains('*') =>
                {
                    out.push(format!("*/ns/{ns}/sa/{sa}"))
                }
                _ => {
                    self.bad(format!("{accounts_field}: {a:?} is not namespace/name"));
                    return Vec::new();
                }
            }
        }
        out
    }

    /// `remoteIpBlocks` join `ipBlocks` when only one of them is set.
    fn source_ips(
        &mut self,
        field: &str,
        blocks: &[String],
        remote_field: &str,
        remote: &[String],
    ) -> Vec<String> {
        match (blocks.is_empty(), remote.is_empty()) {
            (_, true) => self.ip_blocks(field, blocks),
            (true, false) => self.ip_blocks(remote_field, remote),
            (false, false) => {
                self.bad(format!("{remote_field} cannot be combined with {field}"));
                self.ip_blocks(field, blocks)
            }
        }
    }

    fn source(&mut self, at: &str, s: &Source) -> pb::PolicySource {
        if *s == Source::default() {
            self.bad(format!("{at} is empty"));
        }
        self.unsupported(&format!("{at}.requestPrincipals"), &s.request_principals);
        self.unsupported(
            &format!("{at}.notRequestPrincipals"),
            &s.not_request_principals,
        );
        pb::PolicySource {
            principals: self.principals(
                &format!("{at}.principals"),
                &s.principals,
                &format!("{at}.serviceAccounts"),
                &s.service_accounts,
            ),
            not_principals: self.principals(
                &format!("{at}.notPrincipals"),
                &s.not_principals,
                &format!("{at}.notServiceAccounts"),
                &s.not_service_accounts,
            ),
            namespaces: s.namespaces.clone(),
            not_namespaces: s.not_namespaces.clone(),
            ip_blocks: self.source_ips(
                &format!("{at}.ipBlocks"),
                &s.ip_blocks,
                &format!("{at}.remoteIpBlocks"),
                &s.remote_ip_blocks,
            ),
            not_ip_blocks: self.source_ips(
                &format!("{at}.notIpBlocks"),
                &s.not_ip_blocks,
                &format!("{at}.notRemoteIpBlocks"),
                &s.not_remote_ip_blocks,
            ),
        }
    }

    fn operation(&mut self, at: &str, o: &Operation) -> pb::PolicyOperation {
        if *o == Operation::default() {
            self.bad(format!("{at} is empty"));
        }
        // Istio's path templates (`{*}`, `{**}`) are not matched here; read
        // literally they would never match, so they count as unchecked.
        let template = |v: &[String]| v.iter().any(|p| p.contains('{') || p.contains('}'));
        let (paths, not_paths) = (
            if template(&o.paths) {
                self.unsupported(&format!("{at}.paths (a path template)"), &o.paths);
                vec![]
            } else {
                o.paths.clone()
            },
            if template(&o.not_paths) {
                self.unsupported(&format!("{at}.notPaths (a path template)"), &o.not_paths);
                vec![]
            } else {
                o.not_paths.clone()
            },
        );
        pb::PolicyOperation {
            hosts: o.hosts.clone(),
            not_hosts: o.not_hosts.clone(),
            ports: self.ports(&format!("{at}.ports"), &o.ports),
            not_ports: self.ports(&format!("{at}.notPorts"), &o.not_ports),
            methods: o.methods.clone(),
            not_methods: o.not_methods.clone(),
            paths,
            not_paths,
        }
    }

    /// A condition, or None when the waypoint cannot check it.
    fn condition(&mut self, at: &str, c: &Condition) -> Option<pb::PolicyCondition> {
        let key = match c.key.as_str() {
            "remote.ip" => "source.ip".to_string(),
            k if CONDITION_KEYS.contains(&k) => k.to_string(),
            k => match k
                .strip_prefix("request.headers[")
                .and_then(|r| r.strip_suffix(']'))
            {
                Some(name) if !name.is_empty() => {
                    format!("request.headers[{}]", name.to_ascii_lowercase())
                }
                _ => {
                    self.problems
                        .push(format!("{at}: key {k:?} is not supported at the waypoint"));
                    return None;
                }
            },
        };
        if c.values.is_empty() && c.not_values.is_empty() {
            self.bad(format!(
                "{at}: {:?} has neither values nor notValues",
                c.key
            ));
            return None;
        }
        let before = self.problems.len();
        let (values, not_values) = match key.as_str() {
            "source.ip" => (
                self.ip_blocks(&format!("{at}.values"), &c.values),
                self.ip_blocks(&format!("{at}.notValues"), &c.not_values),
            ),
            "destination.port" => {
                // Carried as the number's canonical string ("080" is 80),
                // since the waypoint compares strings.
                let canon = |v: Vec<u32>| v.iter().map(u32::to_string).collect::<Vec<_>>();
                (
                    canon(self.ports(&format!("{at}.values"), &c.values)),
                    canon(self.ports(&format!("{at}.notValues"), &c.not_values)),
                )
            }
            _ => (c.values.clone(), c.not_values.clone()),
        };
        if self.problems.len() > before {
            return None;
        }
        Some(pb::PolicyCondition {
            key,
            values,
            not_values,
        })
    }

    fn rule(&mut self, r: &AuthorizationRule) -> pb::PolicyRule {
        pb::PolicyRule {
            from: r
                .from
                .iter()
                .enumerate()
                .map(|(i, f)| self.source(&format!("from[{i}].source"), &f.source))
                .collect(),
            to: r
                .to
                .iter()
                .enumerate()
                .map(|(i, t)| self.operation(&format!("to[{i}].operation"), &t.operation))
                .collect(),
            when: r
                .when
                .iter()
                .enumerate()
                .filter_map(|(i, c)| self.condition(&format!("when[{i}]"), c))
                .collect(),
        }
    }
}

/// The waypoint form of a policy (named "namespace/name"), with the
/// issues found; None when the waypoint cannot serve its action. A CUSTOM
/// policy carries its provider; without a usable one it is a DENY of every
/// request (`extauthz.rs`).
pub fn convert(model: &Model, p: &AuthorizationPolicy) -> (Option<pb::Policy>, Vec<String>) {
    let ns = p.metadata.namespace.as_deref().unwrap_or_default();
    let name = p.metadata.name.as_deref().unwrap_or_default();
    let mut issues = Vec::new();
    let mut provider = None;
    let action = match p.spec.action.unwrap_or_default() {
        AuthorizationAction::Allow => pb::PolicyAction::Allow,
        AuthorizationAction::Deny => pb::PolicyAction::Deny,
        AuthorizationAction::Custom => match super::extauthz::resolve(model, p) {
            Ok((resolved, more)) => {
                issues.extend(more);
                provider = Some(resolved);
                pb::PolicyAction::Custom
            }
            Err(why) => {
                issues.push(format!(
                    "{why}; the policy denies every request it applies to (fail closed)"
                ));
                return (
                    Some(super::extauthz::deny_all(
                        format!("{ns}/{name}"),
                        super::authz::dry_run(p),
                    )),
                    issues,
                );
            }
        },
        other => {
            issues.push(format!(
                "action {} is not supported at the waypoint; the policy is ignored",
                format!("{other:?}").to_ascii_uppercase()
            ));
            return (None, issues);
        }
    };
    if provider.is_none() && p.spec.provider.is_some() {
        issues.push("provider is ignored: the action is not CUSTOM".into());
    }
    let mut rules = Vec::new();
    for (i, r) in p.spec.rules.iter().enumerate() {
        let mut c = RuleConverter {
            problems: Vec::new(),
            invalid: false,
        };
        let rule = c.rule(r);
        if c.problems.is_empty() {
            rules.push(rule);
            continue;
        }
        let problems = c.problems.join("; ");
        match action {
            pb::PolicyAction::Allow => issues.push(format!(
                "rule {i} never matches at the waypoint (left out): {problems}"
            )),
            pb::PolicyAction::Deny if c.invalid => {
                issues.push(format!(
                    "rule {i} denies every request in the policy's scope at the waypoint (fail closed): {problems}"
                ));
                // An empty rule matches every request.
                rules.push(pb::PolicyRule::default());
            }
            pb::PolicyAction::Deny => {
                issues.push(format!(
                    "rule {i} is enforced at the waypoint without what it cannot check (it denies more): {problems}"
                ));
                rules.push(rule);
            }
            pb::PolicyAction::Custom => {
                issues.push(format!(
                    "rule {i} is enforced at the waypoint without what it cannot check (the provider is asked about more requests): {problems}"
                ));
                rules.push(rule);
            }
        }
    }
    if let Err(why) = super::authz::dry_run_value(p) {
        issues.push(why.to_string());
        if action == pb::PolicyAction::Allow {
            rules.clear();
        }
    }
    (
        Some(pb::Policy {
            name: format!("{ns}/{name}"),
            action: action as i32,
            rules,
            dry_run: super::authz::dry_run(p),
            provider,
        }),
        issues,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::crds::AuthorizationPolicy;
    use crate::config::objects::{Change, Object};

    fn port(name: Option<&str>, app: Option<&str>) -> ServicePort {
        ServicePort {
            name: name.map(String::from),
            app_protocol: app.map(String::from),
            port: 80,
            ..Default::default()
        }
    }

    #[test]
    fn port_protocols_follow_istio_naming() {
        use pb::Protocol as P;
        let cases = [
            (Some("http"), None, P::Http1),
            (Some("http-api"), None, P::Http1),
            (Some("HTTP_web"), None, P::Http1),
            (Some("http1"), None, P::Http1),
            (Some("http2"), None, P::Http2),
            (Some("h2c"), None, P::Http2),
            (Some("grpc"), None, P::Http2),
            (Some("grpc-web"), None, P::Http2),
            (Some("tcp-db"), None, P::Tcp),
            (Some("tls"), None, P::Tcp),
            (Some("https"), None, P::Tcp),
            (Some("mongo"), None, P::Tcp),
            (Some("mysql"), None, P::Tcp),
            (Some("redis"), None, P::Tcp),
            (Some("web"), None, P::Sniff),
            (Some("httpx"), None, P::Sniff),
            (None, None, P::Sniff),
            (Some(""), None, P::Sniff),
            // appProtocol wins over the name.
            (Some("http"), Some("tcp"), P::Tcp),
            (Some("tcp"), Some("kubernetes.io/h2c"), P::Http2),
            (Some("tcp"), Some("kubernetes.io/ws"), P::Http1),
            (Some("http"), Some("kubernetes.io/wss"), P::Tcp),
            (Some("web"), Some("grpc"), P::Http2),
            // An empty appProtocol falls back to the name.
            (Some("http"), Some(""), P::Http1),
            (None, Some("example.com/custom"), P::Sniff),
        ];
        for (name, app, want) in cases {
            assert_eq!(port_protocol(&port(name, app)), want, "{name:?} {app:?}");
        }
        let udp = ServicePort {
            protocol: Some("UDP".into()),
            ..port(Some("http"), None)
        };
        assert_eq!(port_protocol(&udp), P::Tcp);
    }

    fn model(yaml: &str) -> Model {
        let mut m = Model::new(super::super::ModelConfig::default());
        let changes = serde_yaml::Deserializer::from_str(yaml)
            .map(|d| {
                let v: serde_json::Value = serde::Deserialize::deserialize(d).expect("yaml");
                Change::Upsert(Object::parse(v).expect("parses").expect("known kind"))
            })
            .collect();
        m.apply(changes);
        m
    }

    fn policy(yaml: &str) -> AuthorizationPolicy {
        serde_yaml::from_str(yaml).expect("test policy parses")
    }

    const POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: on-gateway, namespace: shop}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]
  rules: [{to: [{operation: {methods: [GET]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: on-service, namespace: shop}
spec:
  targetRef: {kind: Service, group: "", name: reviews}
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: on-other-service, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: "", name: ratings}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: on-other-gateway, namespace: shop}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: other}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: by-selector, namespace: shop}
spec:
  selector: {matchLabels: {app: reviews}}
  rules: [{to: [{operation: {methods: [GET]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: namespace-wide, namespace: shop}
spec: {action: DENY, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: all-waypoints, namespace: istio-system}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: GatewayClass, name: istio-waypoint}]
  action: DENY
  rules: [{from: [{source: {namespaces: [banned]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: class-elsewhere, namespace: shop}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: GatewayClass, name: istio-waypoint}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit, namespace: shop}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]
  action: AUDIT
"#;

    #[test]
    fn a_target_that_no_waypoint_serves_is_reported() {
        let m = model(
            r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: edge, namespace: shop}
spec: {gatewayClassName: mesh-ingress, listeners: [{name: http, port: 80, protocol: HTTP}]}
---
apiVersion: v1
kind: Service
metadata: {name: plain, namespace: shop}
spec: {clusterIP: 10.96.0.5, ports: [{port: 80}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: at-edge, namespace: shop}
spec: {targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: edge}], action: DENY, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: at-ghost, namespace: shop}
spec: {targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: ghost}], action: DENY, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: at-plain, namespace: shop}
spec: {targetRefs: [{kind: Service, group: "", name: plain}], action: DENY, rules: [{}]}
"#,
        );
        let issue = |name: &str| {
            m.issues()
                .into_iter()
                .filter(|i| i.object == format!("AuthorizationPolicy/shop/{name}"))
                .map(|i| i.reason)
                .collect::<Vec<_>>()
                .join("; ")
        };
        assert!(
            issue("at-edge").contains("not a waypoint"),
            "{}",
            issue("at-edge")
        );
        assert!(
            issue("at-ghost").contains("does not exist"),
            "{}",
            issue("at-ghost")
        );
        assert!(
            issue("at-plain").contains("uses no waypoint"),
            "{}",
            issue("at-plain")
        );
    }

    #[test]
    fn only_policies_attached_to_the_waypoint_or_service_apply() {
        let m = model(POLICIES);
        let svc = ("shop".to_string(), "reviews".to_string());
        let gw = ("shop".to_string(), "waypoint".to_string());
        let got = policies(&m, &svc, &gw);
        let names: Vec<&str> = got.iter().map(|p| p.name.as_str()).collect();
        // Sorted by "namespace/name"; AUDIT is left out; selector and
        // namespace-wide policies are the ztunnel's; a GatewayClass target
        // counts only from the root namespace.
        assert_eq!(
            names,
            vec![
                "istio-system/all-waypoints",
                "shop/on-gateway",
                "shop/on-service"
            ]
        );
        assert_eq!(got[2].action, pb::PolicyAction::Deny as i32);
        assert_eq!(got[2].rules[0].to[0].paths, vec!["/admin*".to_string()]);
        assert_eq!(got[1].rules[0].to[0].methods, vec!["GET".to_string()]);

        let audit = m
            .issues()
            .into_iter()
            .filter(|i| i.object == "AuthorizationPolicy/shop/audit")
            .collect::<Vec<_>>();
        assert!(
            audit.iter().any(|i| i.reason.contains("AUDIT")),
            "{audit:?}"
        );
        let elsewhere: Vec<_> = m
            .issues()
            .into_iter()
            .filter(|i| i.object == "AuthorizationPolicy/shop/class-elsewhere")
            .collect();
        assert!(
            elsewhere
                .iter()
                .any(|i| i.reason.contains("only from the root namespace")),
            "{elsewhere:?}"
        );
    }

    #[test]
    fn fields_convert() {
        let p = policy(
            r#"
metadata: {name: p, namespace: shop}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/shop/sa/web"]
        notNamespaces: [test]
        remoteIpBlocks: ["10.0.0.0/8"]
        notIpBlocks: ["10.1.0.1"]
    - source: {serviceAccounts: [shop/api]}
    to:
    - operation: {hosts: ["reviews*"], ports: ["9080"], notPorts: ["15000"], methods: [GET], notPaths: ["/admin*"]}
    when:
    - {key: "request.headers[X-User]", values: [tester]}
    - {key: remote.ip, notValues: ["192.168.0.0/16"]}
    - {key: destination.port, values: ["9080"]}
"#,
        );
        let (out, issues) = convert(&Model::default(), &p);
        assert!(issues.is_empty(), "{issues:?}");
        let out = out.expect("policy");
        assert_eq!(out.name, "shop/p");
        assert_eq!(out.action, pb::PolicyAction::Allow as i32);
        let r = &out.rules[0];
        assert_eq!(r.from[0].principals, vec!["cluster.local/ns/shop/sa/web"]);
        assert_eq!(r.from[0].not_namespaces, vec!["test"]);
        assert_eq!(r.from[0].ip_blocks, vec!["10.0.0.0/8"]);
        assert_eq!(r.from[0].not_ip_blocks, vec!["10.1.0.1"]);
        assert_eq!(r.from[1].principals, vec!["*/ns/shop/sa/api"]);
        let op = &r.to[0];
        assert_eq!(
            (op.ports.clone(), op.not_ports.clone()),
            (vec![9080], vec![15000])
        );
        assert_eq!(op.hosts, vec!["reviews*"]);
        assert_eq!(op.not_paths, vec!["/admin*"]);
        let keys: Vec<&str> = r.when.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(
            keys,
            vec!["request.headers[x-user]", "source.ip", "destination.port"]
        );
        assert_eq!(r.when[1].not_values, vec!["192.168.0.0/16"]);
    }

    const UNSUPPORTED_RULES: &str = r#"
  rules:
  - from: [{source: {requestPrincipals: ["issuer/subject"], namespaces: [shop]}}]
  - to: [{operation: {ports: ["http"], methods: [POST]}}]
  - when: [{key: "request.auth.claims[group]", values: [admin]}, {key: request.method, values: [DELETE]}]
  - from: [{source: {ipBlocks: ["10.0.0.0/33"]}}]
  - to: [{operation: {paths: ["/ok"]}}]
"#;

    #[test]
    fn an_allow_rule_the_waypoint_cannot_check_never_matches() {
        let p = policy(&format!(
            "metadata: {{name: p, namespace: shop}}\nspec:\n  targetRefs: [{{kind: Service, group: \"\", name: reviews}}]\n  action: ALLOW\n{UNSUPPORTED_RULES}"
        ));
        let (out, issues) = convert(&Model::default(), &p);
        let out = out.expect("policy");
        // Only the rule with nothing unsupported is left.
        assert_eq!(out.rules.len(), 1, "{out:?}");
        assert_eq!(out.rules[0].to[0].paths, vec!["/ok"]);
        let want = [
            "rule 0 never matches at the waypoint (left out): from[0].source.requestPrincipals is not supported",
            "rule 1 never matches at the waypoint (left out): to[0].operation.ports: \"http\" is not a port number",
            "rule 2 never matches at the waypoint (left out): when[0]: key \"request.auth.claims[group]\" is not supported",
            "rule 3 never matches at the waypoint (left out): from[0].source.ipBlocks: \"10.0.0.0/33\" is not an IP address or CIDR",
        ];
        assert_eq!(issues.len(), want.len(), "{issues:?}");
        for (got, want) in issues.iter().zip(want) {
            assert!(got.starts_with(want), "{got:?} should start with {want:?}");
        }
    }

    #[test]
    fn a_deny_rule_the_waypoint_cannot_fully_check_denies_more() {
        let p = policy(&format!(
            "metadata: {{name: p, namespace: shop}}\nspec:\n  targetRefs: [{{kind: Service, group: \"\", name: reviews}}]\n  action: DENY\n{UNSUPPORTED_RULES}"
        ));
        let (out, issues) = convert(&Model::default(), &p);
        let out = out.expect("policy");
        assert_eq!(out.action, pb::PolicyAction::Deny as i32);
        assert_eq!(out.rules.len(), 5, "{out:?}");
        // Unsupported fields are dropped: the rest of the rule still holds.
        let r0 = &out.rules[0].from[0];
        assert_eq!(r0.namespaces, vec!["shop"]);
        assert!(r0.principals.is_empty());
        let r2 = &out.rules[2].when;
        assert_eq!(r2.len(), 1);
        assert_eq!(r2[0].key, "request.method");
        // An invalid value (a port name, a /33) makes the rule match every
        // request (fail closed), not just the rest of its fields.
        assert_eq!(out.rules[1], pb::PolicyRule::default(), "{out:?}");
        assert_eq!(out.rules[3], pb::PolicyRule::default(), "{out:?}");
        assert_ne!(out.rules[4], pb::PolicyRule::default());
        assert_eq!(issues.len(), 4, "{issues:?}");
        let more = |i: &String| i.contains("without what it cannot check (it denies more)");
        let all = |i: &String| i.contains("denies every request in the policy's scope");
        assert!(more(&issues[0]) && more(&issues[2]), "{issues:?}");
        assert!(all(&issues[1]) && all(&issues[3]), "{issues:?}");
    }
}
