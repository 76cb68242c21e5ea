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

/// Why a rule's value cannot be enforced at a ztunnel: the rule fails
/// closed, and the policy's status says why. `field` is where the value
/// is (`from[0].source.ipBlocks`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("{field}: {value:?} is not namespace/name")]
    ServiceAccount { field: String, value: String },
    #[error("{field}: {value:?} is not an IP address or CIDR")]
    Cidr { field: String, value: String },
    #[error("{field}: {value:?} is not a port number")]
    Port { field: String, value: String },
    #[error("{0}: neither values nor notValues")]
    NoValues(String),
    #[error("{0} is empty")]
    Empty(String),
}

/// An `istio.io/dry-run` annotation that is not a boolean.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("annotation {DRY_RUN_ANNOTATION}: {0:?} is not true or false; the policy is enforced")]
pub struct BadDryRun(pub String);

/// `serviceAccounts` entries ("namespace/name") as Istio's
/// `ServiceAccountMatch`; anything else cannot be enforced.
fn service_accounts(field: &str, v: &[String]) -> Result<Vec<pb::ServiceAccountMatch>, RuleError> {
    v.iter()
        .map(|s| match s.split_once('/') {
            // No wildcard: a literal `*` matches no real account, so a DENY
            // naming one would deny nothing.
            Some((ns, sa))
                if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') && !s.contains('*') =>
            {
                Ok(pb::ServiceAccountMatch {
                    namespace: ns.to_string(),
                    service_account: sa.to_string(),
                })
            }
            _ => Err(RuleError::ServiceAccount {
                field: field.to_string(),
                value: s.clone(),
            }),
        })
        .collect()
}

/// An address or CIDR, strictly: `10.0.0.0/8x` or `10.0.0.0/33` is an
/// error, never a narrower block than written.
pub fn parse_cidr(s: &str) -> Option<pb::Address> {
    let (ip, len) = match s.split_once('/') {
        Some((ip, l)) => {
            if l.is_empty() || !l.bytes().all(|b| b.is_ascii_digit()) || l.len() > 3 {
                return None;
            }
            (ip, Some(l.parse::<u32>().ok()?))
        }
        None => (s, None),
    };
    let addr = ip.parse::<std::net::IpAddr>().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let length = len.unwrap_or(max);
    if length > max {
        return None;
    }
    let address = match addr {
        std::net::IpAddr::V4(a) => a.octets().to_vec(),
        std::net::IpAddr::V6(a) => a.octets().to_vec(),
    };
    Some(pb::Address { address, length })
}

fn cidrs(field: &str, v: &[String]) -> Result<Vec<pb::Address>, RuleError> {
    v.iter()
        .map(|s| {
            parse_cidr(s).ok_or_else(|| RuleError::Cidr {
                field: field.to_string(),
                value: s.clone(),
            })
        })
        .collect()
}

fn ports(field: &str, v: &[String]) -> Result<Vec<u32>, RuleError> {
    v.iter()
        .map(|p| match p.parse::<u16>() {
            Ok(n) if n != 0 && !p.starts_with('+') => Ok(n as u32),
            _ => Err(RuleError::Port {
                field: field.to_string(),
                value: p.clone(),
            }),
        })
        .collect()
}

/// Request principals, and remote IPs (the original client behind an
/// ingress or waypoint, which only an L7 proxy knows), as Istio's ambient
/// controller treats them.
fn has_l7_source(s: &Source) -> bool {
    !s.request_principals.is_empty()
        || !s.not_request_principals.is_empty()
        || !s.remote_ip_blocks.is_empty()
        || !s.not_remote_ip_blocks.is_empty()
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

fn source_match(at: &str, s: &Source) -> Result<pb::Match, RuleError> {
    let source_ips = cidrs(&format!("{at}.ipBlocks"), &s.ip_blocks)?;
    let not_source_ips = cidrs(&format!("{at}.notIpBlocks"), &s.not_ip_blocks)?;
    // Remote IPs are L7 here (see `has_l7_source`), yet a value that does
    // not parse is still an invalid value.
    cidrs(&format!("{at}.remoteIpBlocks"), &s.remote_ip_blocks)?;
    cidrs(&format!("{at}.notRemoteIpBlocks"), &s.not_remote_ip_blocks)?;
    let accounts = service_accounts(&format!("{at}.serviceAccounts"), &s.service_accounts)?;
    let not_accounts =
        service_accounts(&format!("{at}.notServiceAccounts"), &s.not_service_accounts)?;
    // Beside Istio's service-account fields, the same accounts as principal
    // suffixes when no principals are set: a ztunnel that predates fields
    // 11 and 12 then still matches them (it would otherwise read an empty
    // match), and a current one reads both as the same constraint.
    let legacy = |list: &[pb::ServiceAccountMatch]| -> Vec<pb::StringMatch> {
        list.iter()
            .map(|a| pb::StringMatch {
                match_type: Some(pb::string_match::MatchType::Suffix(format!(
                    "/ns/{}/sa/{}",
                    a.namespace, a.service_account
                ))),
            })
            .collect()
    };
    let principals = match s.principals.is_empty() {
        true => legacy(&accounts),
        false => strings(&s.principals),
    };
    let not_principals = match s.not_principals.is_empty() {
        true => legacy(&not_accounts),
        false => strings(&s.not_principals),
    };
    Ok(pb::Match {
        namespaces: strings(&s.namespaces),
        not_namespaces: strings(&s.not_namespaces),
        principals,
        not_principals,
        service_accounts: accounts,
        not_service_accounts: not_accounts,
        source_ips,
        not_source_ips,
        ..Default::default()
    })
}

/// A `when` condition on an L4 key, or None for a key a ztunnel cannot
/// check (the caller has already handled those rules).
fn condition_match(at: &str, c: &Condition) -> Result<Option<pb::Match>, RuleError> {
    if c.values.is_empty() && c.not_values.is_empty() {
        return Err(RuleError::NoValues(at.to_string()));
    }
    let mut m = pb::Match::default();
    match c.key.as_str() {
        "source.ip" => {
            m.source_ips = cidrs(at, &c.values)?;
            m.not_source_ips = cidrs(at, &c.not_values)?;
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
            m.destination_ips = cidrs(at, &c.values)?;
            m.not_destination_ips = cidrs(at, &c.not_values)?;
        }
        "destination.port" => {
            m.destination_ports = ports(at, &c.values)?;
            m.not_destination_ports = ports(at, &c.not_values)?;
        }
        _ => return Ok(None),
    }
    Ok(Some(m))
}

/// One clause from the `from` or `to` entries. Every match of the result
/// has a field set (Istio's ztunnel skips an empty match). An entry whose
/// fields are all L7 (only in a DENY rule, whose L7 fields are dropped)
/// holds for any connection, so the whole clause does: None.
fn clause(matches: Vec<pb::Match>) -> Option<pb::Clause> {
    if matches.iter().any(|m| *m == pb::Match::default()) {
        return None;
    }
    Some(pb::Clause { matches })
}

/// The ztunnel form of one rule, or why a value in it cannot be enforced.
fn convert_rule(rule: &AuthorizationRule) -> Result<pb::Rule, RuleError> {
    let mut clauses = Vec::new();
    if !rule.from.is_empty() {
        let mut matches = Vec::new();
        for (i, f) in rule.from.iter().enumerate() {
            let at = format!("from[{i}].source");
            let m = source_match(&at, &f.source)?;
            if m == pb::Match::default() && !has_l7_source(&f.source) {
                return Err(RuleError::Empty(at));
            }
            matches.push(m);
        }
        clauses.extend(clause(matches));
    }
    if !rule.to.is_empty() {
        let mut matches = Vec::new();
        for (i, t) in rule.to.iter().enumerate() {
            let at = format!("to[{i}].operation");
            let m = pb::Match {
                destination_ports: ports(&format!("{at}.ports"), &t.operation.ports)?,
                not_destination_ports: ports(&format!("{at}.notPorts"), &t.operation.not_ports)?,
                ..Default::default()
            };
            if m == pb::Match::default() && !has_l7_operation(&t.operation) {
                return Err(RuleError::Empty(at));
            }
            matches.push(m);
        }
        clauses.extend(clause(matches));
    }
    for (i, c) in rule.when.iter().enumerate() {
        if let Some(m) = condition_match(&format!("when[{i}]"), c)? {
            clauses.push(pb::Clause { matches: vec![m] });
        }
    }
    Ok(pb::Rule { clauses })
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
        // Fail closed: a value that cannot be enforced never widens access.
        match (convert_rule(rule), action) {
            (Ok(r), _) => rules.push(r),
            (Err(why), pb::Action::Allow) => {
                issues.push(format!("rule {i} never matches (fail closed): {why}"))
            }
            (Err(why), pb::Action::Deny) => {
                issues.push(format!(
                    "rule {i} denies every connection in the policy's scope (fail closed): {why}"
                ));
                rules.push(pb::Rule { clauses: vec![] });
            }
        }
    }
    if let Err(why) = dry_run_value(p) {
        issues.push(why.to_string());
        if action == pb::Action::Allow {
            // Meant as a trial, perhaps: it may restrict, never grant.
            rules.clear();
        }
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
            dry_run: dry_run(p),
        }),
        issues,
    )
}

/// Istio's dry-run annotation: the policy is evaluated and logged, never
/// enforced.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// The annotation's value read as Istio reads it (Go's `ParseBool`): Ok
/// false when absent, Err when it is not a boolean.
pub fn dry_run_value(p: &AuthorizationPolicy) -> Result<bool, BadDryRun> {
    let Some(v) = p
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(DRY_RUN_ANNOTATION))
    else {
        return Ok(false);
    };
    match v.as_str() {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        other => Err(BadDryRun(other.to_string())),
    }
}

/// Whether the policy is dry-run. An unreadable annotation is not: the
/// policy is enforced (callers make an enforced ALLOW match nothing, so a
/// policy meant as a trial never grants anything).
pub fn dry_run(p: &AuthorizationPolicy) -> bool {
    dry_run_value(p).unwrap_or(false)
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
            dry_run: false,
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
            mesh_core::state::ip_from_bytes(&x.address)
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
            "notDestinationIps": m.not_destination_ips.iter().map(ip).collect::<Vec<_>>(),
            "destinationPorts": m.destination_ports,
            "notDestinationPorts": m.not_destination_ports,
            "serviceAccounts": m.service_accounts.iter().map(|s| format!("{}/{}", s.namespace, s.service_account)).collect::<Vec<_>>(),
            "notServiceAccounts": m.not_service_accounts.iter().map(|s| format!("{}/{}", s.namespace, s.service_account)).collect::<Vec<_>>(),
        })
    };
    serde_json::json!({
        "name": a.name, "namespace": a.namespace,
        "scope": format!("{:?}", pb::Scope::try_from(a.scope).unwrap_or(pb::Scope::Global)),
        "action": format!("{:?}", pb::Action::try_from(a.action).unwrap_or(pb::Action::Allow)),
        "dryRun": a.dry_run,
        "rules": a.rules.iter().map(|r| r.clauses.iter().map(|c| c.matches.iter().map(m).collect::<Vec<_>>()).collect::<Vec<_>>()).collect::<Vec<_>>(),
    })
}
