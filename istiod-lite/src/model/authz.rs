//! AuthorizationPolicy and PeerAuthentication to `istio.security.Authorization`,
//! the L4 form a ztunnel enforces.
//!
//! L7 fields (methods, paths, hosts, request principals, request headers)
//! cannot be checked at L4: an ALLOW rule that carries them is dropped (it
//! never matches at the ztunnel), and a DENY rule loses them (it denies more,
//! never less). Both are reported. Policies attached with `targetRefs` are
//! the waypoint's (`waypoint.rs`).

use mesh_proto::istio::security as pb;

use super::Model;
use crate::config::crds::{
    AuthorizationAction, AuthorizationPolicy, AuthorizationRule, Condition, MtlsMode, Operation,
    PeerAuthentication, Source,
};

fn string_match(s: &str) -> pb::StringMatch {
    use pb::string_match::MatchType;
    let t = if s == "*" {
        MatchType::Presence(())
    } else if let Some(rest) = s.strip_prefix('*') {
        MatchType::Suffix(rest.to_string())
    } else if let Some(rest) = s.strip_suffix('*') {
        MatchType::Prefix(rest.to_string())
    } else {
        MatchType::Exact(s.to_string())
    };
    pb::StringMatch {
        match_type: Some(t),
    }
}

fn strings(v: &[String]) -> Vec<pb::StringMatch> {
    v.iter().map(|s| string_match(s)).collect()
}

/// "ns/sa" service accounts become principal suffix matches.
fn service_accounts(v: &[String], issues: &mut Vec<String>) -> Vec<pb::StringMatch> {
    v.iter()
        .filter_map(|s| match s.split_once('/') {
            Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() => Some(pb::StringMatch {
                match_type: Some(pb::string_match::MatchType::Suffix(format!(
                    "/ns/{ns}/sa/{sa}"
                ))),
            }),
            _ => {
                issues.push(format!(
                    "serviceAccounts entry {s:?} is not namespace/name; ignored"
                ));
                None
            }
        })
        .collect()
}

fn cidrs(v: &[String], issues: &mut Vec<String>) -> Vec<pb::Address> {
    v.iter()
        .filter_map(|s| {
            let (ip, len) = match s.split_once('/') {
                Some((ip, l)) => (ip, l.parse::<u32>().ok()),
                None => (s.as_str(), None),
            };
            match ip.parse::<std::net::IpAddr>() {
                Ok(addr) => {
                    let max = if addr.is_ipv4() { 32 } else { 128 };
                    let bytes = match addr {
                        std::net::IpAddr::V4(a) => a.octets().to_vec(),
                        std::net::IpAddr::V6(a) => a.octets().to_vec(),
                    };
                    Some(pb::Address {
                        address: bytes,
                        length: len.unwrap_or(max).min(max),
                    })
                }
                Err(_) => {
                    issues.push(format!("IP block {s:?} does not parse; ignored"));
                    None
                }
            }
        })
        .collect()
}

fn ports(v: &[String], issues: &mut Vec<String>) -> Vec<u32> {
    v.iter()
        .filter_map(|p| match p.parse::<u16>() {
            Ok(n) => Some(n as u32),
            Err(_) => {
                issues.push(format!("port {p:?} is not a port number; ignored"));
                None
            }
        })
        .collect()
}

fn has_l7_source(s: &Source) -> bool {
    !s.request_principals.is_empty() || !s.not_request_principals.is_empty()
}

fn has_l7_operation(o: &Operation) -> bool {
    !(o.hosts.is_empty()
        && o.not_hosts.is_empty()
        && o.methods.is_empty()
        && o.not_methods.is_empty()
        && o.paths.is_empty()
        && o.not_paths.is_empty())
}

const L4_KEYS: &[&str] = &[
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
];

fn has_l7(rule: &AuthorizationRule) -> bool {
    rule.from.iter().any(|f| has_l7_source(&f.source))
        || rule.to.iter().any(|t| has_l7_operation(&t.operation))
        || rule.when.iter().any(|c| !L4_KEYS.contains(&c.key.as_str()))
}

fn source_match(s: &Source, issues: &mut Vec<String>) -> pb::Match {
    let mut principals = strings(&s.principals);
    principals.extend(service_accounts(&s.service_accounts, issues));
    let mut not_principals = strings(&s.not_principals);
    not_principals.extend(service_accounts(&s.not_service_accounts, issues));
    let mut source_ips = cidrs(&s.ip_blocks, issues);
    source_ips.extend(cidrs(&s.remote_ip_blocks, issues));
    let mut not_source_ips = cidrs(&s.not_ip_blocks, issues);
    not_source_ips.extend(cidrs(&s.not_remote_ip_blocks, issues));
    pb::Match {
        namespaces: strings(&s.namespaces),
        not_namespaces: strings(&s.not_namespaces),
        principals,
        not_principals,
        source_ips,
        not_source_ips,
        ..Default::default()
    }
}

fn condition_match(c: &Condition, issues: &mut Vec<String>) -> Option<pb::Match> {
    let mut m = pb::Match::default();
    match c.key.as_str() {
        "source.ip" | "remote.ip" => {
            m.source_ips = cidrs(&c.values, issues);
            m.not_source_ips = cidrs(&c.not_values, issues);
        }
        "source.namespace" => {
            m.namespaces = strings(&c.values);
            m.not_namespaces = strings(&c.not_values);
        }
        "source.principal" => {
            m.principals = strings(&c.values);
            m.not_principals = strings(&c.not_values);
        }
        "destination.ip" => {
            m.destination_ips = cidrs(&c.values, issues);
            m.not_destination_ips = cidrs(&c.not_values, issues);
        }
        "destination.port" => {
            m.destination_ports = ports(&c.values, issues);
            m.not_destination_ports = ports(&c.not_values, issues);
        }
        _ => return None,
    }
    Some(m)
}

fn convert_rule(rule: &AuthorizationRule, issues: &mut Vec<String>) -> pb::Rule {
    let mut clauses = Vec::new();
    if !rule.from.is_empty() {
        clauses.push(pb::Clause {
            matches: rule
                .from
                .iter()
                .map(|f| source_match(&f.source, issues))
                .collect(),
        });
    }
    if !rule.to.is_empty() {
        clauses.push(pb::Clause {
            matches: rule
                .to
                .iter()
                .map(|t| pb::Match {
                    destination_ports: ports(&t.operation.ports, issues),
                    not_destination_ports: ports(&t.operation.not_ports, issues),
                    ..Default::default()
                })
                .collect(),
        });
    }
    for c in &rule.when {
        if let Some(m) = condition_match(c, issues) {
            clauses.push(pb::Clause { matches: vec![m] });
        }
    }
    pb::Rule { clauses }
}

fn scope(model: &Model, ns: &str, has_selector: bool) -> pb::Scope {
    if has_selector {
        pb::Scope::WorkloadSelector
    } else if ns == model.cfg.root_namespace {
        pb::Scope::Global
    } else {
        pb::Scope::Namespace
    }
}

/// The ztunnel form of a policy, or None when the policy is not for ztunnels
/// (it targets a waypoint) or cannot be enforced; plus the issues found.
pub fn convert(model: &Model, p: &AuthorizationPolicy) -> (Option<pb::Authorization>, Vec<String>) {
    let mut issues = Vec::new();
    let ns = p.metadata.namespace.clone().unwrap_or_default();
    let name = p.metadata.name.clone().unwrap_or_default();
    if !model.namespaces.contains_key(&ns) && ns != model.cfg.root_namespace {
        issues.push(format!(
            "namespace {ns:?} does not exist; the policy applies once it does"
        ));
    }
    if p.spec.has_targets() {
        // Attached to a waypoint: enforced there (`waypoint.rs`), not by
        // ztunnels. Its issues are the waypoint's.
        issues.extend(super::waypoint::target_issues(model, p));
        issues.extend(super::waypoint::convert(model, p).1);
        return (None, issues);
    }
    // CUSTOM: a ztunnel cannot ask the provider (`extauthz.rs`).
    let mut deny_all = false;
    let action = match p.spec.action.unwrap_or_default() {
        AuthorizationAction::Allow => pb::Action::Allow,
        AuthorizationAction::Deny => pb::Action::Deny,
        AuthorizationAction::Custom => {
            deny_all = !super::extauthz::at_ztunnel(model, p, &mut issues);
            pb::Action::Deny
        }
        other => {
            issues.push(format!(
                "action {other:?} is not supported; the policy is ignored"
            ));
            return (None, issues);
        }
    };
    for rule in &p.spec.rules {
        for f in &rule.from {
            for n in f.source.namespaces.iter().chain(&f.source.not_namespaces) {
                if !n.contains('*') && !model.namespaces.contains_key(n) {
                    issues.push(format!(
                        "rule refers to namespace {n:?}, which does not exist"
                    ));
                }
            }
        }
    }
    let mut rules = Vec::new();
    for (i, rule) in p.spec.rules.iter().enumerate() {
        if has_l7(rule) {
            match action {
                pb::Action::Allow => {
                    issues.push(format!(
                        "rule {i} has L7 fields a ztunnel cannot check; it never matches at the ztunnel (use a waypoint)"
                    ));
                    continue;
                }
                pb::Action::Deny => issues.push(format!(
                    "rule {i} has L7 fields a ztunnel cannot check; the ztunnel denies on its L4 fields alone"
                )),
            }
        }
        rules.push(convert_rule(rule, &mut issues));
    }
    if deny_all {
        rules = vec![pb::Rule::default()];
    }
    let has_selector = p
        .spec
        .selector
        .as_ref()
        .is_some_and(|s| !s.match_labels.is_empty());
    (
        Some(pb::Authorization {
            name,
            namespace: ns.clone(),
            scope: scope(model, &ns, has_selector) as i32,
            action: action as i32,
            rules,
        }),
        issues,
    )
}

pub fn peer_auth_policy_name(name: &str) -> String {
    format!("converted_peer_authentication_{name}")
}

/// STRICT becomes a DENY of any connection without a peer identity.
pub fn peer_authentication(
    model: &Model,
    p: &PeerAuthentication,
) -> (Option<pb::Authorization>, Vec<String>) {
    let mut issues = Vec::new();
    let ns = p.metadata.namespace.clone().unwrap_or_default();
    let name = p.metadata.name.clone().unwrap_or_default();
    if !p.spec.port_level_mtls.is_empty() {
        issues.push("portLevelMtls is not supported; the workload-wide mode applies".into());
    }
    let mode = p.spec.mtls.as_ref().map(|m| m.mode).unwrap_or_default();
    let has_selector = p
        .spec
        .selector
        .as_ref()
        .is_some_and(|s| !s.match_labels.is_empty());
    if matches!(mode, MtlsMode::Permissive | MtlsMode::Disable) {
        let overridden = model.peer_auths.iter().any(|((pns, _), other)| {
            other
                .spec
                .mtls
                .as_ref()
                .is_some_and(|m| m.mode == MtlsMode::Strict)
                && (*pns == model.cfg.root_namespace || (*pns == ns && has_selector))
                && !(pns == &ns && other.metadata.name == p.metadata.name)
        });
        if overridden {
            issues.push(format!(
                "{mode:?} under a broader STRICT is not supported: the STRICT policy still applies"
            ));
        }
        return (None, issues);
    }
    if mode != MtlsMode::Strict {
        return (None, issues);
    }
    let deny_plaintext = pb::Match {
        not_principals: vec![pb::StringMatch {
            match_type: Some(pb::string_match::MatchType::Presence(())),
        }],
        ..Default::default()
    };
    (
        Some(pb::Authorization {
            name: peer_auth_policy_name(&name),
            namespace: ns.clone(),
            scope: scope(model, &ns, has_selector) as i32,
            action: pb::Action::Deny as i32,
            rules: vec![pb::Rule {
                clauses: vec![pb::Clause {
                    matches: vec![deny_plaintext],
                }],
            }],
        }),
        issues,
    )
}

fn sm_json(m: &pb::StringMatch) -> String {
    use pb::string_match::MatchType;
    match &m.match_type {
        Some(MatchType::Exact(s)) => s.clone(),
        Some(MatchType::Prefix(s)) => format!("{s}*"),
        Some(MatchType::Suffix(s)) => format!("*{s}"),
        Some(MatchType::Presence(_)) => "*".into(),
        None => String::new(),
    }
}

pub fn authz_json(a: &pb::Authorization) -> serde_json::Value {
    let ip = |x: &pb::Address| {
        format!(
            "{}/{}",
            ztunnel::state::ip_from_bytes(&x.address)
                .map(|i| i.to_string())
                .unwrap_or_default(),
            x.length
        )
    };
    let m = |m: &pb::Match| {
        serde_json::json!({
            "namespaces": m.namespaces.iter().map(sm_json).collect::<Vec<_>>(),
            "notNamespaces": m.not_namespaces.iter().map(sm_json).collect::<Vec<_>>(),
            "principals": m.principals.iter().map(sm_json).collect::<Vec<_>>(),
            "notPrincipals": m.not_principals.iter().map(sm_json).collect::<Vec<_>>(),
            "sourceIps": m.source_ips.iter().map(ip).collect::<Vec<_>>(),
            "notSourceIps": m.not_source_ips.iter().map(ip).collect::<Vec<_>>(),
            "destinationIps": m.destination_ips.iter().map(ip).collect::<Vec<_>>(),
            "destinationPorts": m.destination_ports,
            "notDestinationPorts": m.not_destination_ports,
        })
    };
    serde_json::json!({
        "name": a.name, "namespace": a.namespace,
        "scope": format!("{:?}", pb::Scope::try_from(a.scope).unwrap_or(pb::Scope::Global)),
        "action": format!("{:?}", pb::Action::try_from(a.action).unwrap_or(pb::Action::Allow)),
        "rules": a.rules.iter().map(|r| r.clauses.iter().map(|c| c.matches.iter().map(m).collect::<Vec<_>>()).collect::<Vec<_>>()).collect::<Vec<_>>(),
    })
}
