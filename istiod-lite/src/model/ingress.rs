//! The ingress gateway: each Gateway of class `mesh-ingress` becomes one
//! `mesh.waypoint.Ingress` resource, with Gateway API semantics.
//!
//! - Listeners speak HTTP or HTTPS (TLS terminated here). Anything else,
//!   and HTTPS in Passthrough mode, is not served.
//! - An HTTPS listener serves the first of its `certificateRefs` that
//!   resolves to a valid `kubernetes.io/tls` Secret in the Gateway's own
//!   namespace (ReferenceGrants are read for route backends, not for
//!   certificateRefs). With none, the listener
//!   is left out; every other listener is still served.
//! - HTTPRoutes and GRPCRoutes attach by `parentRefs` (optionally one
//!   listener by `sectionName` and/or `port`), when the listener's
//!   `allowedRoutes` admits the route's kind (both by default) and
//!   namespace and their hostnames intersect.
//! - A backend (or mirror) in another namespace than its route's is used
//!   only when a ReferenceGrant in that namespace permits it
//!   (`routes/grants.rs`): otherwise it is left out and the HTTPRoute's
//!   issue says so (a rule left with no backend answers 500).
//!
//! Why a listener is not served is both a listener condition (cluster mode
//! writes it to the Gateway's status) and a model issue on the Gateway.
//! Key material never leaves this module (and `tls_secret.rs`, which checks
//! a Secret) except in the encoded resource: the model keeps only what a
//! listener serves, and its Debug form hides it.

use std::collections::{BTreeMap, BTreeSet};

use gateway_api::apis::experimental::httproutes::HttpRoute;
use gateway_api::apis::standard::gateways::{
    Gateway, GatewayListeners, GatewayListenersAllowedRoutesNamespacesFrom as From,
    GatewayListenersAllowedRoutesNamespacesSelector, GatewayListenersTlsMode,
};
use mesh_proto::mesh::waypoint as pb;

use super::waypoint::{GATEWAY_GROUP, ports};
use super::workload::labels;
use super::{Model, NsName, routes};

use crate::config::grpcroute::grpc_route_name;
use crate::config::kube::TLS_SECRET_TYPE;
pub(super) const HTTP_ROUTE_KIND: &str = "HTTPRoute";
pub(super) const GRPC_ROUTE_KIND: &str = "GRPCRoute";

/// The route kinds a listener admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteKinds {
    pub http: bool,
    pub grpc: bool,
}

impl RouteKinds {
    /// Whether a route of the model (a GRPCRoute is held as the HTTPRoute
    /// it amounts to) is of a kind admitted.
    pub fn admits(self, route: &HttpRoute) -> bool {
        let name = route.metadata.name.as_deref().unwrap_or_default();
        if grpc_route_name(name).is_some() {
            self.grpc
        } else {
            self.http
        }
    }

    /// Their names, as a listener's `supportedKinds` lists them.
    pub fn names(self) -> Vec<&'static str> {
        [(self.http, HTTP_ROUTE_KIND), (self.grpc, GRPC_ROUTE_KIND)]
            .into_iter()
            .filter_map(|(on, k)| on.then_some(k))
            .collect()
    }
}

/// One condition of a listener's status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerCondition {
    pub type_: &'static str,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

/// A listener's status, as Gateway API reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerStatus {
    pub name: String,
    /// Routes attached (whether or not the listener is served).
    pub attached_routes: i32,
    /// The route kinds `allowedRoutes.kinds` lets attach.
    pub kinds: RouteKinds,
    pub conditions: Vec<ListenerCondition>,
}

/// One ingress Gateway, computed.
#[derive(Debug, Default)]
pub struct Built {
    pub ingress: pb::Ingress,
    pub listeners: Vec<ListenerStatus>,
    /// For the Gateway's model issues.
    pub issues: Vec<String>,
}

fn cond(
    type_: &'static str,
    status: bool,
    reason: &'static str,
    message: String,
) -> ListenerCondition {
    ListenerCondition {
        type_,
        status,
        reason,
        message,
    }
}

/// Whether `name` (exact or wildcard) falls under wildcard suffix `suffix`
/// (".example.com"): a wildcard stands for one or more labels.
fn under(suffix: &str, name: &str) -> bool {
    let name = name.strip_prefix('*').unwrap_or(name);
    name.len() > suffix.len() && name.ends_with(suffix)
}

/// The intersection of two hostnames, each exact or "*."-wildcard: the
/// more specific one when one covers the other.
fn intersect_one(listener: &str, route: &str) -> Option<String> {
    let pick = |s: &str| Some(s.to_string());
    match (listener.strip_prefix('*'), route.strip_prefix('*')) {
        (None, None) => (listener == route).then(|| route.to_string()),
        (Some(l), None) => under(l, route).then(|| route.to_string()),
        (None, Some(r)) => under(r, listener).then(|| listener.to_string()),
        (Some(l), Some(r)) if r == l || under(l, route) => pick(route),
        (Some(_), Some(r)) if under(r, listener) => pick(listener),
        _ => None,
    }
}

/// The hostnames a route serves on a listener (Gateway API's hostname
/// intersection), lower-cased; empty means any host. None: they do not
/// intersect, and the route does not attach to that listener.
pub fn intersect(listener: Option<&str>, route: &[String]) -> Option<Vec<String>> {
    let listener = listener
        .filter(|l| !l.is_empty())
        .map(str::to_ascii_lowercase);
    let route: Vec<String> = route.iter().map(|h| h.to_ascii_lowercase()).collect();
    let out: BTreeSet<String> = match (&listener, route.is_empty()) {
        (None, true) => return Some(Vec::new()),
        (Some(l), true) => return Some(vec![l.clone()]),
        (None, false) => route.into_iter().collect(),
        (Some(l), false) => route.iter().filter_map(|h| intersect_one(l, h)).collect(),
    };
    (!out.is_empty()).then(|| out.into_iter().collect())
}

/// Whether wildcard `w` covers hostname `h` (exact or a narrower wildcard).
fn covers(w: &str, h: &str) -> bool {
    w.strip_prefix('*').is_some_and(|suffix| under(suffix, h))
}

/// A label selector operator other than In, NotIn, Exists, DoesNotExist.
#[derive(Debug, thiserror::Error)]
#[error("selector operator {0:?} is not supported")]
struct UnsupportedOperator(String);

/// Whether a label selector selects `ns`'s labels; Err names what it
/// cannot evaluate.
fn selects(
    model: &Model,
    sel: &GatewayListenersAllowedRoutesNamespacesSelector,
    ns: &str,
) -> Result<bool, UnsupportedOperator> {
    let l = model
        .namespaces
        .get(ns)
        .map(|n| labels(&n.metadata))
        .unwrap_or_default();
    let by_labels = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| l.get(k) == Some(v));
    let mut by_exprs = true;
    for e in sel.match_expressions.iter().flatten() {
        let values = e.values.as_deref().unwrap_or_default();
        let has = l.get(&e.key);
        by_exprs &= match e.operator.as_str() {
            "In" => has.is_some_and(|v| values.contains(v)),
            "NotIn" => has.is_none_or(|v| !values.contains(v)),
            "Exists" => has.is_some(),
            "DoesNotExist" => has.is_none(),
            op => return Err(UnsupportedOperator(op.to_string())),
        };
    }
    Ok(by_labels && by_exprs)
}

/// Whether a listener admits routes from namespace `route_ns`.
pub(super) fn admits_namespace(
    model: &Model,
    gw_ns: &str,
    l: &GatewayListeners,
    route_ns: &str,
    issues: &mut BTreeSet<String>,
) -> bool {
    let ns = l
        .allowed_routes
        .as_ref()
        .and_then(|a| a.namespaces.as_ref());
    match ns.and_then(|n| n.from.as_ref()).unwrap_or(&From::Same) {
        From::Same => route_ns == gw_ns,
        From::All => true,
        From::Selector => match ns.and_then(|n| n.selector.as_ref()) {
            None => {
                issues.insert(format!(
                    "listener {}: allowedRoutes.namespaces.from is Selector but there is no selector; no route is admitted",
                    l.name
                ));
                false
            }
            Some(sel) => selects(model, sel, route_ns).unwrap_or_else(|e| {
                issues.insert(format!(
                    "listener {}: allowedRoutes {e}; no route is admitted",
                    l.name
                ));
                false
            }),
        },
    }
}

/// The route kinds `allowedRoutes.kinds` admits (an HTTP or HTTPS
/// listener's default: HTTPRoute and GRPCRoute), and the kinds it names
/// that we do not serve.
pub(super) fn route_kinds(l: &GatewayListeners) -> (RouteKinds, Vec<String>) {
    let kinds = l
        .allowed_routes
        .as_ref()
        .and_then(|a| a.kinds.as_deref())
        .unwrap_or_default();
    if kinds.is_empty() {
        let all = RouteKinds {
            http: true,
            grpc: true,
        };
        return (all, Vec::new());
    }
    let mut admitted = RouteKinds {
        http: false,
        grpc: false,
    };
    let mut bad = Vec::new();
    for k in kinds {
        let group = k.group.as_deref().unwrap_or(GATEWAY_GROUP);
        match (group, k.kind.as_str()) {
            (GATEWAY_GROUP, HTTP_ROUTE_KIND) => admitted.http = true,
            (GATEWAY_GROUP, GRPC_ROUTE_KIND) => admitted.grpc = true,
            _ => bad.push(format!("{group}/{}", k.kind)),
        }
    }
    (admitted, bad)
}

/// Whether one of the route's parentRefs selects listener `l` of Gateway
/// `gw`.
fn selected_by(route: &HttpRoute, gw: &NsName, l: &GatewayListeners) -> bool {
    let route_ns = route.metadata.namespace.as_deref().unwrap_or_default();
    route.spec.parent_refs.iter().flatten().any(|p| {
        p.group.as_deref().unwrap_or(GATEWAY_GROUP) == GATEWAY_GROUP
            && p.kind.as_deref().unwrap_or("Gateway") == "Gateway"
            && p.name == gw.1
            && p.namespace.as_deref().unwrap_or(route_ns) == gw.0
            && p.section_name.as_deref().is_none_or(|s| s == l.name)
            && p.port.is_none_or(|port| port == l.port)
    })
}

/// The certificate of an HTTPS listener (the first ref that resolves), and
/// the ResolvedRefs (reason, message) for the refs that did not, if any.
fn certificate(
    model: &Model,
    gw_ns: &str,
    l: &GatewayListeners,
) -> (Option<pb::TlsCertificate>, Option<(&'static str, String)>) {
    let refs = l
        .tls
        .as_ref()
        .and_then(|t| t.certificate_refs.as_deref())
        .unwrap_or_default();
    if refs.is_empty() {
        return (
            None,
            Some((
                "InvalidCertificateRef",
                "an HTTPS listener needs tls.certificateRefs".into(),
            )),
        );
    }
    let mut problems = Vec::new();
    let mut not_permitted = false;
    let mut found = None;
    for r in refs {
        let ns = r.namespace.as_deref().unwrap_or(gw_ns);
        let what = format!("Secret {ns}/{}", r.name);
        let (group, kind) = (
            r.group.as_deref().unwrap_or(""),
            r.kind.as_deref().unwrap_or("Secret"),
        );
        if !group.is_empty() || kind != "Secret" {
            problems.push(format!(
                "certificateRef {group}/{kind} {} is not supported (only core Secrets)",
                r.name
            ));
            continue;
        }
        if ns != gw_ns {
            not_permitted = true;
            problems.push(format!(
                "{what} is in another namespace than the Gateway; a certificateRef into another namespace is not supported (no ReferenceGrant is read for Secrets)"
            ));
            continue;
        }
        match model.secrets.get(&(ns.to_string(), r.name.clone())) {
            None => problems.push(format!(
                "{what} not found (only Secrets of type {TLS_SECRET_TYPE} are read)"
            )),
            Some(Err(e)) => problems.push(format!("{what} {e}")),
            Some(Ok(m)) if found.is_none() => {
                found = Some(pb::TlsCertificate {
                    source: format!("{ns}/{}", r.name),
                    cert_chain: m.cert_chain.clone(),
                    private_key: m.private_key.clone(),
                });
            }
            Some(Ok(_)) => {}
        }
    }
    let reason = if not_permitted {
        "RefNotPermitted"
    } else {
        "InvalidCertificateRef"
    };
    let problem = (!problems.is_empty()).then(|| (reason, problems.join("; ")));
    (found, problem)
}

/// The virtual hosts of one listener from its attached routes (each with
/// its effective hostnames, oldest route first). A request for a host sees
/// the routes for that exact host first, then those of each wildcard
/// covering it (most specific first), then those for any host: Gateway
/// API ranks hostname specificity above every other match.
fn virtual_hosts(attached: &[(&[pb::Route], Vec<String>)]) -> Vec<pb::VirtualHost> {
    // "" is the group of routes for any host.
    let mut groups: BTreeMap<String, Vec<pb::Route>> = BTreeMap::new();
    for (rs, hosts) in attached {
        if hosts.is_empty() {
            groups
                .entry(String::new())
                .or_default()
                .extend(rs.iter().cloned());
        }
        for h in hosts {
            groups
                .entry(h.clone())
                .or_default()
                .extend(rs.iter().cloned());
        }
    }
    for rs in groups.values_mut() {
        routes::sort(rs);
    }
    let mut out: Vec<pb::VirtualHost> = Vec::new();
    let any = groups.get("").cloned().unwrap_or_default();
    for (h, own) in groups.iter().filter(|(h, _)| !h.is_empty()) {
        let mut wildcards: Vec<&String> =
            groups.keys().filter(|w| *w != h && covers(w, h)).collect();
        wildcards.sort_by_key(|w| std::cmp::Reverse(w.len()));
        let mut rs = own.clone();
        for w in wildcards {
            rs.extend(groups[w].iter().cloned());
        }
        rs.extend(any.iter().cloned());
        // Hosts that end up with the same routes share a virtual host.
        match out.iter_mut().find(|v| v.routes == rs) {
            Some(v) => v.hostnames.push(h.clone()),
            None => out.push(pb::VirtualHost {
                hostnames: vec![h.clone()],
                routes: rs,
            }),
        }
    }
    if groups.contains_key("") {
        out.push(pb::VirtualHost {
            hostnames: Vec::new(),
            routes: any,
        });
    }
    out
}

/// The HTTPRoutes that some listener of `gw` selects, oldest first, each
/// with its routes converted once (their own issues, backends refused for
/// want of a ReferenceGrant among them, are the HTTPRoute's).
fn attachable_routes<'m>(
    model: &'m Model,
    key: &NsName,
    gw: &Gateway,
) -> (Vec<&'m HttpRoute>, Vec<Vec<pb::Route>>) {
    // HTTPRoutes oldest first, then by name: Gateway API's tie-break.
    let mut http_routes: Vec<&HttpRoute> = model.http_routes.values().collect();
    http_routes.sort_by(|a, b| {
        (
            a.metadata.creation_timestamp.as_ref().map(|t| t.0),
            &a.metadata.name,
        )
            .cmp(&(
                b.metadata.creation_timestamp.as_ref().map(|t| t.0),
                &b.metadata.name,
            ))
    });
    let http_routes: Vec<&HttpRoute> = http_routes
        .into_iter()
        .filter(|r| gw.spec.listeners.iter().any(|l| selected_by(r, key, l)))
        .collect();
    // Converted once per route (their own issues are the HTTPRoute's).
    let converted: Vec<Vec<pb::Route>> = http_routes
        .iter()
        .map(|r| {
            routes::convert(
                r,
                &model.cfg.domain_suffix,
                &model.traffic_policies,
                &model.reference_grants,
            )
            .0
        })
        .collect();

    (http_routes, converted)
}

/// The protocol a listener is served with, or why it is not (an
/// unsupported protocol, or TLS passthrough).
fn listener_protocol(l: &GatewayListeners) -> (Option<pb::ListenerProtocol>, Option<String>) {
    let passthrough =
        l.tls.as_ref().and_then(|t| t.mode.as_ref()) == Some(&GatewayListenersTlsMode::Passthrough);
    let protocol = match l.protocol.as_str() {
        "HTTP" => Some(pb::ListenerProtocol::Http),
        "HTTPS" if !passthrough => Some(pb::ListenerProtocol::Https),
        _ => None,
    };
    let problem = match protocol {
        Some(_) => None,
        None if passthrough => Some(
            "TLS mode Passthrough is not supported; the ingress terminates TLS (HTTPS, mode Terminate)"
                .to_string(),
        ),
        None => Some(format!(
            "protocol {} is not supported; use HTTP or HTTPS",
            l.protocol
        )),
    };
    (protocol, problem)
}

/// Why a listener clashes with one taken before it: listeners on one port
/// must speak one protocol and differ by hostname.
fn conflict(
    protocol: Option<pb::ListenerProtocol>,
    l: &GatewayListeners,
    hostname: &str,
    port_protocols: &BTreeMap<i32, &str>,
    taken: &BTreeSet<(i32, String)>,
) -> Option<(&'static str, String)> {
    match (protocol, port_protocols.get(&l.port)) {
        (None, _) => None,
        (Some(_), Some(p)) if *p != l.protocol => Some((
            "ProtocolConflict",
            format!("port {} is already served as {p}", l.port),
        )),
        (Some(_), _) if taken.contains(&(l.port, hostname.to_string())) => Some((
            "HostnameConflict",
            format!(
                "another listener on port {} has the same hostname {:?}",
                l.port, hostname
            ),
        )),
        (Some(_), _) => None,
    }
}

/// Every Service the listeners' routes send to (or mirror to), with its
/// ports and backend policy.
fn backends(model: &Model, listeners: &[pb::Listener]) -> Vec<pb::IngressBackend> {
    let services: BTreeSet<String> = listeners
        .iter()
        .flat_map(|l| &l.virtual_hosts)
        .flat_map(|v| &v.routes)
        .flat_map(|r| {
            r.backends
                .iter()
                .chain(r.mirror.as_ref().and_then(|m| m.backend.as_ref()))
                .filter(|b| !b.invalid)
                .map(|b| b.service.clone())
        })
        .collect();
    services
        .into_iter()
        .map(|service| {
            let (sns, host) = service.split_once('/').unwrap_or_default();
            let svc_name = host
                .strip_suffix(&format!(".{sns}.svc.{}", model.cfg.domain_suffix))
                .unwrap_or(host);
            let key = (sns.to_string(), svc_name.to_string());
            pb::IngressBackend {
                ports: model.services.get(&key).map(ports).unwrap_or_default(),
                backend_policy: model
                    .destination_rule(sns, host)
                    .map(|r| routes::backend_policy(r).0),
                service,
            }
        })
        .collect()
}

/// The Ingress resource of Gateway `key`, its listeners' status and issues.
pub fn build(model: &Model, key: &NsName, gw: &Gateway) -> Built {
    let (ns, name) = key;
    let mut issues: BTreeSet<String> = BTreeSet::new();
    let (http_routes, converted) = attachable_routes(model, key, gw);

    let mut listeners = Vec::new();
    let mut statuses = Vec::new();
    // Port -> protocol, and (port, hostname) of the listeners taken so far.
    let mut port_protocols: BTreeMap<i32, &str> = BTreeMap::new();
    let mut taken: BTreeSet<(i32, String)> = BTreeSet::new();
    for l in &gw.spec.listeners {
        let mut conditions = Vec::new();
        let hostname = l.hostname.clone().unwrap_or_default().to_ascii_lowercase();
        let (kinds, bad_kinds) = route_kinds(l);
        let (protocol, mut problem) = listener_protocol(l);
        let mut served = protocol.is_some();
        match &problem {
            None => conditions.push(cond("Accepted", true, "Accepted", "accepted".into())),
            Some(msg) => {
                conditions.push(cond("Accepted", false, "UnsupportedProtocol", msg.clone()))
            }
        }
        // Listeners on one port must speak one protocol and differ by
        // hostname, or the proxy could not tell them apart.
        let conflict = conflict(protocol, l, &hostname, &port_protocols, &taken);
        match &conflict {
            Some((reason, msg)) => {
                served = false;
                problem = Some(msg.clone());
                conditions.push(cond("Conflicted", true, reason, msg.clone()));
            }
            None => {
                if protocol.is_some() {
                    port_protocols.entry(l.port).or_insert(l.protocol.as_str());
                    taken.insert((l.port, hostname.clone()));
                }
                conditions.push(cond(
                    "Conflicted",
                    false,
                    "NoConflicts",
                    "no conflicts".into(),
                ));
            }
        }
        let mut certificate_out = None;
        let mut resolved: Option<(&'static str, String)> = None;
        if !bad_kinds.is_empty() {
            resolved = Some((
                "InvalidRouteKinds",
                format!(
                    "allowedRoutes.kinds {} not supported (only {GATEWAY_GROUP}/{HTTP_ROUTE_KIND} and {GATEWAY_GROUP}/{GRPC_ROUTE_KIND})",
                    bad_kinds.join(", ")
                ),
            ));
        }
        if protocol == Some(pb::ListenerProtocol::Https) {
            let (found, cert_problem) = certificate(model, ns, l);
            if let Some((_, msg)) = &cert_problem {
                issues.insert(format!(
                    "listener {}: {msg}{}",
                    l.name,
                    if found.is_some() {
                        "; served with the first certificate that resolved"
                    } else {
                        "; the listener is not served"
                    }
                ));
            }
            if found.is_none() {
                served = false;
                problem = Some(
                    cert_problem
                        .as_ref()
                        .map(|(_, m)| m.clone())
                        .unwrap_or_default(),
                );
            }
            resolved = cert_problem.or(resolved);
            certificate_out = found;
        }
        match resolved {
            Some((reason, msg)) => conditions.push(cond("ResolvedRefs", false, reason, msg)),
            None => conditions.push(cond(
                "ResolvedRefs",
                true,
                "ResolvedRefs",
                "all references resolved".into(),
            )),
        }
        match &problem {
            Some(p) => {
                if protocol.is_none() || conflict.is_some() {
                    issues.insert(format!(
                        "listener {}: {p}; the listener is not served",
                        l.name
                    ));
                }
                conditions.push(cond("Programmed", false, "Invalid", p.clone()));
            }
            None => conditions.push(cond("Programmed", true, "Programmed", "programmed".into())),
        }

        let mut attached: Vec<(&[pb::Route], Vec<String>)> = Vec::new();
        for (r, rs) in http_routes.iter().zip(&converted) {
            let rns = r.metadata.namespace.as_deref().unwrap_or_default();
            if !kinds.admits(r)
                || !selected_by(r, key, l)
                || !admits_namespace(model, ns, l, rns, &mut issues)
            {
                continue;
            }
            let hosts = r.spec.hostnames.as_deref().unwrap_or_default();
            if let Some(effective) = intersect(l.hostname.as_deref(), hosts) {
                attached.push((rs.as_slice(), effective));
            }
        }
        statuses.push(ListenerStatus {
            name: l.name.clone(),
            attached_routes: attached.len() as i32,
            kinds,
            conditions,
        });
        let Some(protocol) = protocol.filter(|_| served) else {
            continue;
        };
        listeners.push(pb::Listener {
            name: l.name.clone(),
            port: l.port.max(0) as u32,
            protocol: protocol as i32,
            hostname,
            certificate: certificate_out,
            virtual_hosts: virtual_hosts(&attached),
        });
    }

    let backends = backends(model, &listeners);
    Built {
        ingress: pb::Ingress {
            namespace: ns.clone(),
            name: name.clone(),
            listeners,
            backends,
        },
        listeners: statuses,
        issues: issues.into_iter().collect(),
    }
}

/// The debug dump's view of an Ingress: listeners, hostnames, route names,
/// the certificate's source. No certificate or key text.
pub fn ingress_json(i: &pb::Ingress) -> serde_json::Value {
    serde_json::json!({
        "gateway": format!("{}/{}", i.namespace, i.name),
        "listeners": i.listeners.iter().map(|l| serde_json::json!({
            "name": l.name,
            "port": l.port,
            "protocol": format!("{:?}", pb::ListenerProtocol::try_from(l.protocol).unwrap_or_default()),
            "hostname": l.hostname,
            "certificate": l.certificate.as_ref().map(|c| c.source.as_str()),
            "virtualHosts": l.virtual_hosts.iter().map(|v| serde_json::json!({
                "hostnames": v.hostnames,
                "routes": v.routes.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "backends": i.backends.iter().map(|b| b.service.as_str()).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::objects::{Change, Object};
    use mesh_proto::INGRESS_TYPE_URL;
    use prost::Message;

    #[test]
    fn hostnames_intersect_as_gateway_api_says() {
        let s = |v: &[&str]| v.iter().map(|h| h.to_string()).collect::<Vec<_>>();
        // (listener hostname, route hostnames, intersection)
        type Case<'a> = (Option<&'a str>, &'a [&'a str], Option<&'a [&'a str]>);
        let cases: &[Case] = &[
            // No hostname on either side: any host.
            (None, &[], Some(&[])),
            (Some(""), &[], Some(&[])),
            // Only one side: that side's.
            (None, &["Shop.Example.com"], Some(&["shop.example.com"])),
            (Some("shop.example.com"), &[], Some(&["shop.example.com"])),
            // Exact against exact.
            (
                Some("shop.example.com"),
                &["shop.example.com"],
                Some(&["shop.example.com"]),
            ),
            (Some("shop.example.com"), &["api.example.com"], None),
            // A wildcard covers one or more labels, never the bare suffix.
            (
                Some("*.example.com"),
                &["shop.example.com"],
                Some(&["shop.example.com"]),
            ),
            (
                Some("*.example.com"),
                &["a.b.example.com"],
                Some(&["a.b.example.com"]),
            ),
            (Some("*.example.com"), &["example.com"], None),
            (Some("*.example.com"), &["shop.example.org"], None),
            (
                Some("shop.example.com"),
                &["*.example.com"],
                Some(&["shop.example.com"]),
            ),
            // Wildcard against wildcard: the narrower.
            (
                Some("*.example.com"),
                &["*.shop.example.com"],
                Some(&["*.shop.example.com"]),
            ),
            (
                Some("*.shop.example.com"),
                &["*.example.com"],
                Some(&["*.shop.example.com"]),
            ),
            (
                Some("*.example.com"),
                &["*.example.com"],
                Some(&["*.example.com"]),
            ),
            (Some("*.example.com"), &["*.example.org"], None),
            // Only the hostnames that intersect are kept.
            (
                Some("*.example.com"),
                &["shop.example.com", "shop.example.org", "api.example.com"],
                Some(&["api.example.com", "shop.example.com"]),
            ),
        ];
        for (l, r, want) in cases {
            assert_eq!(
                intersect(*l, &s(r)),
                want.map(s),
                "listener {l:?} route {r:?}"
            );
        }
    }

    fn model(docs: Vec<serde_json::Value>) -> Model {
        let mut m = Model::new(super::super::ModelConfig::default());
        let changes = docs
            .into_iter()
            .map(|v| Change::Upsert(Object::parse(v).expect("parses").expect("known kind")))
            .collect();
        m.apply(changes);
        m
    }

    fn yaml(text: &str) -> Vec<serde_json::Value> {
        serde_yaml::Deserializer::from_str(text)
            .map(|d| serde::Deserialize::deserialize(d).expect("yaml"))
            .filter(|v: &serde_json::Value| !v.is_null())
            .collect()
    }

    fn ingress(m: &Model, name: &str) -> pb::Ingress {
        let r = m
            .resources(INGRESS_TYPE_URL)
            .and_then(|r| r.get(name))
            .unwrap_or_else(|| panic!("no Ingress {name}"));
        pb::Ingress::decode(r.value()).expect("decodes")
    }

    fn status<'a>(m: &'a Model, gw: &str, listener: &str) -> &'a ListenerStatus {
        m.ingress_listeners
            .get(&("shop".to_string(), gw.to_string()))
            .and_then(|ls| ls.iter().find(|l| l.name == listener))
            .unwrap_or_else(|| panic!("no status for {gw}/{listener}"))
    }

    fn condition<'a>(s: &'a ListenerStatus, t: &str) -> &'a ListenerCondition {
        s.conditions
            .iter()
            .find(|c| c.type_ == t)
            .unwrap_or_else(|| panic!("no {t} in {s:?}"))
    }

    fn tls_secret_doc(name: &str, type_: &str, crt: &str, key: &str) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": "shop"},
            "type": type_,
            "stringData": {"tls.crt": crt, "tls.key": key},
        })
    }

    const GATEWAY: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: edge, namespace: shop}
spec:
  gatewayClassName: mesh-ingress
  listeners:
  - {name: good, port: 443, protocol: HTTPS, hostname: good.example.com, tls: {certificateRefs: [{name: good-cert}]}}
  - {name: bad, port: 443, protocol: HTTPS, hostname: bad.example.com, tls: {certificateRefs: [{name: bad-cert}]}}
  - {name: http, port: 80, protocol: HTTP}
  - {name: tcp, port: 9000, protocol: TCP}
  - {name: passthrough, port: 8443, protocol: HTTPS, tls: {mode: Passthrough}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: shop}
spec:
  parentRefs: [{name: edge}]
  rules: [{backendRefs: [{name: web, port: 8080}]}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.20, ports: [{name: http, port: 8080}]}
"#;

    #[test]
    fn a_bad_certificate_leaves_out_only_its_listener() {
        let good =
            rcgen::generate_simple_self_signed(vec!["good.example.com".into()]).expect("cert");
        let other =
            rcgen::generate_simple_self_signed(vec!["other.example.com".into()]).expect("cert");
        let (crt, key) = (good.cert.pem(), good.signing_key.serialize_pem());
        let other_key = other.signing_key.serialize_pem();
        let bad_cases: Vec<(&str, Option<serde_json::Value>, &str)> = vec![
            ("missing", None, "Secret shop/bad-cert not found"),
            (
                "wrong type",
                Some(tls_secret_doc("bad-cert", "Opaque", &crt, &key)),
                "is of type \"Opaque\", not kubernetes.io/tls",
            ),
            (
                "mismatched key",
                Some(tls_secret_doc(
                    "bad-cert",
                    TLS_SECRET_TYPE,
                    &crt,
                    &other_key,
                )),
                "tls.key does not match the first certificate in tls.crt",
            ),
            (
                "garbage certificate",
                Some(tls_secret_doc(
                    "bad-cert",
                    TLS_SECRET_TYPE,
                    "not a certificate",
                    &key,
                )),
                "no certificate in tls.crt",
            ),
            (
                "garbage key",
                Some(tls_secret_doc(
                    "bad-cert",
                    TLS_SECRET_TYPE,
                    &crt,
                    "-----BEGIN PRIVATE KEY-----\nzzzz\n",
                )),
                "tls.key is not valid PEM",
            ),
        ];
        for (case, bad, want) in bad_cases {
            let mut docs = yaml(GATEWAY);
            docs.push(tls_secret_doc("good-cert", TLS_SECRET_TYPE, &crt, &key));
            docs.extend(bad);
            let m = model(docs);
            let i = ingress(&m, "shop/edge");
            let names: Vec<&str> = i.listeners.iter().map(|l| l.name.as_str()).collect();
            assert_eq!(names, vec!["good", "http"], "{case}");
            let served = &i.listeners[0];
            assert_eq!(served.protocol, pb::ListenerProtocol::Https as i32);
            let c = served.certificate.as_ref().expect("certificate");
            assert_eq!(c.source, "shop/good-cert");
            assert_eq!(
                (c.cert_chain.as_str(), c.private_key.as_str()),
                (crt.as_str(), key.as_str())
            );
            assert_eq!(served.virtual_hosts[0].hostnames, vec!["good.example.com"]);
            assert_eq!(served.virtual_hosts[0].routes[0].name, "shop/web/0");
            assert_eq!(i.backends.len(), 1);
            assert_eq!(i.backends[0].service, "shop/web.shop.svc.cluster.local");
            assert_eq!(i.backends[0].ports[0].port, 8080);

            let bad = status(&m, "edge", "bad");
            let r = condition(bad, "ResolvedRefs");
            assert_eq!(
                (r.status, r.reason),
                (false, "InvalidCertificateRef"),
                "{case}"
            );
            assert!(r.message.contains(want), "{case}: {}", r.message);
            let p = condition(bad, "Programmed");
            assert_eq!((p.status, p.reason), (false, "Invalid"), "{case}");
            assert_eq!(bad.attached_routes, 1, "{case}");
            let good = status(&m, "edge", "good");
            assert!(condition(good, "Programmed").status, "{case}");
            assert!(condition(good, "ResolvedRefs").status, "{case}");

            let issues: Vec<_> = m
                .issues()
                .into_iter()
                .filter(|i| i.object == "Gateway/shop/edge")
                .collect();
            assert!(
                issues.iter().any(|i| i.reason.starts_with("listener bad: ")
                    && i.reason.contains(want)
                    && i.reason.contains("not served")),
                "{case}: {issues:?}"
            );
            // Key material never shows in the debug dump.
            let dump = m.dump().to_string();
            assert!(!dump.contains("PRIVATE KEY"), "{case}");
            assert!(dump.contains("shop/good-cert"), "{case}");
        }
    }

    #[test]
    fn unsupported_protocols_and_foreign_secrets_are_reported() {
        let good = rcgen::generate_simple_self_signed(vec!["x".into()]).expect("cert");
        let mut docs = yaml(GATEWAY);
        docs.extend(yaml(
            r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: foreign, namespace: shop}
spec:
  gatewayClassName: mesh-ingress
  listeners:
  - {name: https, port: 443, protocol: HTTPS, tls: {certificateRefs: [{name: cert, namespace: other}]}}
"#,
        ));
        let mut secret = tls_secret_doc(
            "cert",
            TLS_SECRET_TYPE,
            &good.cert.pem(),
            &good.signing_key.serialize_pem(),
        );
        secret["metadata"]["namespace"] = "other".into();
        docs.push(secret);
        let m = model(docs);
        for (l, want) in [
            ("tcp", "protocol TCP is not supported"),
            ("passthrough", "Passthrough"),
        ] {
            let s = status(&m, "edge", l);
            let a = condition(s, "Accepted");
            assert_eq!((a.status, a.reason), (false, "UnsupportedProtocol"));
            assert!(a.message.contains(want), "{}", a.message);
            assert!(!condition(s, "Programmed").status);
        }
        assert!(ingress(&m, "shop/foreign").listeners.is_empty());
        let r = condition(status(&m, "foreign", "https"), "ResolvedRefs");
        assert_eq!((r.status, r.reason), (false, "RefNotPermitted"));
        assert!(r.message.contains("ReferenceGrant"), "{}", r.message);
    }

    const ROUTES: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Namespace
metadata: {name: team, labels: {ingress: allowed}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: edge, namespace: shop}
spec:
  gatewayClassName: mesh-ingress
  listeners:
  - {name: same, port: 80, protocol: HTTP, hostname: same.example.com}
  - name: all
    port: 80
    protocol: HTTP
    hostname: "*.example.com"
    allowedRoutes: {namespaces: {from: All}}
  - name: selected
    port: 8080
    protocol: HTTP
    allowedRoutes: {namespaces: {from: Selector, selector: {matchLabels: {ingress: allowed}}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: local, namespace: shop}
spec:
  parentRefs: [{name: edge}]
  rules: [{backendRefs: [{name: web, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: remote, namespace: team}
spec:
  parentRefs: [{name: edge, namespace: shop}]
  hostnames: [api.example.com, same.example.com]
  rules: [{backendRefs: [{name: api, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: pinned, namespace: shop}
spec:
  parentRefs: [{name: edge, sectionName: same}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /pinned}}]
    backendRefs: [{name: web, port: 80}, {name: api, namespace: team, port: 80}]
"#;

    fn vhosts(l: &pb::Listener) -> Vec<(Vec<String>, Vec<String>)> {
        l.virtual_hosts
            .iter()
            .map(|v| {
                (
                    v.hostnames.clone(),
                    v.routes.iter().map(|r| r.name.clone()).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn routes_attach_by_parent_namespace_section_and_hostname() {
        let m = model(yaml(ROUTES));
        let i = ingress(&m, "shop/edge");
        let by_name = |n: &str| {
            i.listeners
                .iter()
                .find(|l| l.name == n)
                .unwrap_or_else(|| panic!("listener {n}"))
        };
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        // Same (the default): only routes of the Gateway's namespace; the
        // more specific path of the pinned route first.
        assert_eq!(
            vhosts(by_name("same")),
            vec![(
                s(&["same.example.com"]),
                s(&["shop/pinned/0", "shop/local/0"])
            )]
        );
        // All: the other namespace's route too, with its hostnames under
        // the wildcard, ahead of the wildcard's own (the local route takes
        // the listener's hostname); hosts with the same routes share a
        // virtual host. The pinned route is not on this listener.
        assert_eq!(
            vhosts(by_name("all")),
            vec![
                (s(&["*.example.com"]), s(&["shop/local/0"])),
                (
                    s(&["api.example.com", "same.example.com"]),
                    s(&["team/remote/0", "shop/local/0"])
                ),
            ]
        );
        // Selector: the labelled namespace only (not even the Gateway's own).
        assert_eq!(
            vhosts(by_name("selected")),
            vec![(
                s(&["api.example.com", "same.example.com"]),
                s(&["team/remote/0"])
            )]
        );
        assert_eq!(status(&m, "edge", "same").attached_routes, 2);
        assert_eq!(status(&m, "edge", "all").attached_routes, 2);
        assert_eq!(status(&m, "edge", "selected").attached_routes, 1);
        // The backend in another namespace is refused (its share answered
        // 500) and reported.
        let pinned = &by_name("same").virtual_hosts[0].routes[0];
        assert_eq!(
            pinned
                .backends
                .iter()
                .map(|b| if b.invalid { "500" } else { b.service.as_str() })
                .collect::<Vec<_>>(),
            vec!["shop/web.shop.svc.cluster.local", "500"]
        );
        // (the HTTPRoute's issue: no ReferenceGrant in team permits it).
        assert!(
            m.issues()
                .iter()
                .any(|i| i.object == "HTTPRoute/shop/pinned"
                    && i.reason.contains("team/api")
                    && i.reason.contains("ReferenceGrant")),
            "{:?}",
            m.issues()
        );
        let services: Vec<&str> = i.backends.iter().map(|b| b.service.as_str()).collect();
        assert_eq!(
            services,
            vec![
                "shop/web.shop.svc.cluster.local",
                "team/api.team.svc.cluster.local"
            ]
        );
    }

    const KINDS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: edge, namespace: shop}
spec:
  gatewayClassName: mesh-ingress
  listeners:
  - {name: default, port: 80, protocol: HTTP}
  - name: grpc-only
    port: 81
    protocol: HTTP
    allowedRoutes: {kinds: [{kind: GRPCRoute}]}
  - name: http-only
    port: 82
    protocol: HTTP
    allowedRoutes: {kinds: [{group: gateway.networking.k8s.io, kind: HTTPRoute}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: shop}
spec:
  parentRefs: [{name: edge}]
  rules: [{backendRefs: [{name: web, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: echo, namespace: shop}
spec:
  parentRefs: [{name: edge}]
  rules:
  - matches: [{method: {service: labecho.Echo}}]
    backendRefs: [{name: grpc, port: 80}]
"#;

    #[test]
    fn allowed_route_kinds_admit_grpc_routes_and_http_routes_apart() {
        let m = model(yaml(KINDS));
        let i = ingress(&m, "shop/edge");
        let routes = |n: &str| -> Vec<String> {
            let l = i
                .listeners
                .iter()
                .find(|l| l.name == n)
                .unwrap_or_else(|| panic!("listener {n} served"));
            l.virtual_hosts
                .iter()
                .flat_map(|v| v.routes.iter().map(|r| r.name.clone()))
                .collect()
        };
        // An HTTP listener admits both kinds by default (a method match
        // is a regular expression: ranked after the catch-all); a
        // listener's kinds admit only those kinds.
        assert_eq!(routes("default"), vec!["shop/web/0", "shop/grpc:echo/0"]);
        assert_eq!(routes("grpc-only"), vec!["shop/grpc:echo/0"]);
        assert_eq!(routes("http-only"), vec!["shop/web/0"]);
        for (l, attached, kinds) in [
            ("default", 2, vec!["HTTPRoute", "GRPCRoute"]),
            ("grpc-only", 1, vec!["GRPCRoute"]),
            ("http-only", 1, vec!["HTTPRoute"]),
        ] {
            let st = status(&m, "edge", l);
            assert_eq!(st.attached_routes, attached, "{l}");
            assert_eq!(st.kinds.names(), kinds, "{l}");
            let r = condition(st, "ResolvedRefs");
            assert_eq!((r.status, r.reason), (true, "ResolvedRefs"), "{l}");
        }
    }

    #[test]
    fn a_change_to_a_route_or_secret_recomputes_the_ingress() {
        let mut m = model(yaml(ROUTES));
        let before = m
            .resources(INGRESS_TYPE_URL)
            .and_then(|r| r.get("shop/edge"))
            .map(|r| r.version);
        let d = m.apply(vec![Change::Delete(crate::config::objects::ObjectKey {
            kind: crate::config::objects::Kind::HttpRoute,
            namespace: "team".into(),
            name: "remote".into(),
        })]);
        assert!(d.changed[INGRESS_TYPE_URL].contains("shop/edge"));
        let after = m
            .resources(INGRESS_TYPE_URL)
            .and_then(|r| r.get("shop/edge"))
            .map(|r| r.version);
        assert_ne!(before, after);
        // An unrelated Secret changes nothing in the output.
        let d = m.apply(vec![Change::Upsert(
            Object::parse(tls_secret_doc("unused", TLS_SECRET_TYPE, "x", "y"))
                .expect("parses")
                .expect("known"),
        )]);
        assert!(d.changed.get(INGRESS_TYPE_URL).is_none_or(|c| c.is_empty()));
    }
}
