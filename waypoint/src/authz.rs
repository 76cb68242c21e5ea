//! L7 authorization at the waypoint, with Istio's semantics and order:
//! every matching CUSTOM policy's provider is asked first (`extauthz.rs`);
//! then any matching DENY denies; with no ALLOW policy the request is
//! allowed; otherwise a matching ALLOW allows and nothing else does.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderMap, HeaderName};
use mesh_core::identity::Identity;
use mesh_core::state::policy::side_holds;
use mesh_core::state::{Snapshot, Workload};
use mesh_proto::mesh::waypoint as pb;

/// Istio's string glob: "abc" exact, "abc*" prefix, "*abc" suffix, "*" any
/// non-empty value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Glob {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Present,
}

impl Glob {
    pub fn new(s: &str) -> Glob {
        if s == "*" {
            Glob::Present
        } else if let Some(p) = s.strip_suffix('*') {
            Glob::Prefix(p.to_string())
        } else if let Some(p) = s.strip_prefix('*') {
            Glob::Suffix(p.to_string())
        } else {
            Glob::Exact(s.to_string())
        }
    }

    pub fn matches(&self, v: &str) -> bool {
        match self {
            Glob::Exact(s) => v == s,
            Glob::Prefix(p) => v.starts_with(p.as_str()),
            Glob::Suffix(p) => v.ends_with(p.as_str()),
            Glob::Present => !v.is_empty(),
        }
    }

    /// Hosts compare without case and without a port.
    fn matches_host(&self, host: &str) -> bool {
        // `Host.` and `Host` name the same host.
        let h = host.to_ascii_lowercase();
        let bare = h.rsplit_once(':').map(|(h, _)| h).unwrap_or(&h);
        let bare = bare.strip_suffix('.').unwrap_or(bare);
        let h = match h.rsplit_once(':') {
            Some((n, p)) if n.ends_with('.') => format!("{}:{p}", &n[..n.len() - 1]),
            _ => h.strip_suffix('.').unwrap_or(&h).to_string(),
        };
        let lower = |g: &Glob| match g {
            Glob::Exact(s) => Glob::Exact(s.to_ascii_lowercase()),
            Glob::Prefix(s) => Glob::Prefix(s.to_ascii_lowercase()),
            Glob::Suffix(s) => Glob::Suffix(s.to_ascii_lowercase()),
            Glob::Present => Glob::Present,
        };
        let g = lower(self);
        g.matches(&h) || g.matches(bare)
    }
}

fn globs(v: &[String]) -> Vec<Glob> {
    v.iter().map(|s| Glob::new(s)).collect()
}

#[derive(Debug, Clone, Copy)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl Cidr {
    fn parse(s: &str) -> Option<Cidr> {
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match l {
            Some(l) => l.parse::<u8>().ok().filter(|l| *l <= max)?,
            None => max,
        };
        // A block written v4-mapped is the IPv4 block it names.
        if let IpAddr::V6(v6) = addr
            && len >= 96
            && let Some(v4) = v6.to_ipv4_mapped()
        {
            return Some(Cidr {
                addr: IpAddr::V4(v4),
                len: len - 96,
            });
        }
        Some(Cidr { addr, len })
    }

    /// An address is matched as the family it really is (v4-mapped is
    /// IPv4); a block holds no address of the other family.
    fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(i)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(n) & mask == u32::from(i) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(i)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(i) & mask
            }
            _ => false,
        }
    }
}

/// Why a policy was rejected.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("policy {policy}: {reason}")]
pub struct PolicyError {
    pub policy: String,
    pub reason: String,
}

fn cidrs(v: &[String], policy: &str) -> Result<Vec<Cidr>, PolicyError> {
    v.iter()
        .map(|s| {
            Cidr::parse(s).ok_or_else(|| PolicyError {
                policy: policy.to_string(),
                reason: format!("{s:?} is not an address or CIDR"),
            })
        })
        .collect()
}

#[derive(Debug, Clone, Default)]
struct Source {
    principals: Vec<Glob>,
    not_principals: Vec<Glob>,
    namespaces: Vec<Glob>,
    not_namespaces: Vec<Glob>,
    ip_blocks: Vec<Cidr>,
    not_ip_blocks: Vec<Cidr>,
}

#[derive(Debug, Clone, Default)]
struct Operation {
    hosts: Vec<Glob>,
    not_hosts: Vec<Glob>,
    ports: Vec<u32>,
    not_ports: Vec<u32>,
    methods: Vec<Glob>,
    not_methods: Vec<Glob>,
    paths: Vec<Glob>,
    not_paths: Vec<Glob>,
}

#[derive(Debug, Clone)]
struct Condition {
    key: String,
    /// For `request.headers[name]`: the name, parsed (so compared without
    /// case); `Some(None)` when it is not a header name at all.
    header: Option<Option<HeaderName>>,
    values: Vec<Glob>,
    not_values: Vec<Glob>,
}

impl Condition {
    fn new(c: &pb::PolicyCondition) -> Condition {
        let header = c
            .key
            .strip_prefix("request.headers[")
            .and_then(|s| s.strip_suffix(']'))
            .map(|h| HeaderName::from_bytes(h.as_bytes()).ok());
        Condition {
            key: c.key.clone(),
            header,
            values: globs(&c.values),
            not_values: globs(&c.not_values),
        }
    }
}

/// A header's values as a condition judges them. Repeats are joined with
/// commas, as Istio does (`x: a` and `x: b` are `a,b`); a DENY also judges
/// each one alone, since a backend may read only one of them (fail closed:
/// more DENY matches, never fewer).
fn header_values(headers: &HeaderMap, name: &HeaderName, deny: bool) -> Vec<String> {
    let each: Vec<String> = headers
        .get_all(name)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    if each.len() < 2 {
        return each;
    }
    let mut out = vec![each.join(",")];
    if deny {
        out.extend(each);
    }
    out
}

#[derive(Debug, Clone, Default)]
struct Rule {
    from: Vec<Source>,
    to: Vec<Operation>,
    when: Vec<Condition>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
    /// Decided by an external authorization server.
    Custom,
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub name: String,
    pub action: Action,
    rules: Vec<Rule>,
    /// Evaluated and logged, never enforced.
    pub dry_run: bool,
    /// CUSTOM only: the server to ask.
    pub provider: Option<Arc<pb::ExtAuthzProvider>>,
}

/// What a request is judged on.
pub struct RequestAttrs<'a> {
    /// False for opaque TCP: there is no method, path, host or header, so
    /// a rule that needs them cannot match an ALLOW and matches a DENY
    /// (deny more, never less: Istio's semantics for fields a proxy cannot
    /// check).
    pub http: bool,
    /// Principal without "spiffe://".
    pub principal: Option<&'a str>,
    pub namespace: Option<&'a str>,
    pub source_ip: IpAddr,
    /// Every address of the workload the source is attributed to (empty
    /// when none is; see `mesh_core::state::decide::attributed`).
    pub source_addrs: &'a [IpAddr],
    pub host: &'a str,
    pub port: u16,
    pub method: &'a str,
    pub path: &'a str,
    pub headers: &'a HeaderMap,
}

/// The outcome and the policy that decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allowed(Option<String>),
    Denied(String),
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allowed(_))
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Allowed(None) => write!(f, "allowed: no ALLOW policy applies"),
            Decision::Allowed(Some(p)) => write!(f, "allowed by {p}"),
            Decision::Denied(why) => write!(f, "denied: {why}"),
        }
    }
}

fn any_or_empty<T>(v: &[T], f: impl Fn(&T) -> bool) -> bool {
    v.is_empty() || v.iter().any(f)
}

fn none<T>(v: &[T], f: impl Fn(&T) -> bool) -> bool {
    !v.iter().any(f)
}

/// Whether a source block field holds, leaning to denying over the
/// source's address and its workload's (`side_holds`).
fn source_holds(blocks: &[Cidr], not: bool, r: &RequestAttrs<'_>, deny: bool) -> bool {
    blocks.is_empty()
        || side_holds(
            |a| blocks.iter().any(|c| c.contains(a)),
            not,
            r.source_ip,
            r.source_addrs,
            deny,
        )
}

impl Source {
    fn matches(&self, r: &RequestAttrs<'_>, deny: bool) -> bool {
        let p = r.principal.unwrap_or("");
        let ns = r.namespace.unwrap_or("");
        // A field that names identities never matches a caller without one.
        (self.principals.is_empty()
            || (r.principal.is_some() && self.principals.iter().any(|g| g.matches(p))))
            && (self.not_principals.is_empty() || none(&self.not_principals, |g| g.matches(p)))
            && (self.namespaces.is_empty()
                || (r.namespace.is_some() && self.namespaces.iter().any(|g| g.matches(ns))))
            && none(&self.not_namespaces, |g| g.matches(ns))
            && source_holds(&self.ip_blocks, false, r, deny)
            && source_holds(&self.not_ip_blocks, true, r, deny)
    }
}

/// Paths compare without the query string.
fn bare_path(p: &str) -> &str {
    p.split_once('?').map(|(p, _)| p).unwrap_or(p)
}

impl Operation {
    fn has_http_fields(&self) -> bool {
        !(self.hosts.is_empty()
            && self.not_hosts.is_empty()
            && self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty())
    }

    fn matches(&self, r: &RequestAttrs<'_>, deny: bool) -> bool {
        let ports = any_or_empty(&self.ports, |p| *p == u32::from(r.port))
            && none(&self.not_ports, |p| *p == u32::from(r.port));
        if !r.http && self.has_http_fields() {
            return ports && deny;
        }
        let path = bare_path(r.path);
        ports
            && any_or_empty(&self.hosts, |g| g.matches_host(r.host))
            && none(&self.not_hosts, |g| g.matches_host(r.host))
            && any_or_empty(&self.methods, |g| g.matches(r.method))
            && none(&self.not_methods, |g| g.matches(r.method))
            && any_or_empty(&self.paths, |g| g.matches(path))
            && none(&self.not_paths, |g| g.matches(path))
    }
}

impl Condition {
    /// The values of the key for this request; `None` when the key is not
    /// one the waypoint can check here (unknown, or HTTP-only on TCP).
    fn value(&self, r: &RequestAttrs<'_>, deny: bool) -> Option<Vec<String>> {
        if let Some(name) = &self.header {
            if !r.http {
                return None;
            }
            return Some(header_values(r.headers, name.as_ref()?, deny));
        }
        let k = self.key.as_str();
        let one = match k {
            "source.principal" => r.principal.unwrap_or("").to_string(),
            "source.namespace" => r.namespace.unwrap_or("").to_string(),
            "source.ip" | "remote.ip" => r.source_ip.to_string(),
            "destination.port" => r.port.to_string(),
            "request.method" if r.http => r.method.to_string(),
            "request.path" if r.http => bare_path(r.path).to_string(),
            "request.host" if r.http => r.host.to_string(),
            _ => return None,
        };
        Some(vec![one])
    }

    fn matches(&self, r: &RequestAttrs<'_>, deny: bool) -> bool {
        // A condition that cannot be checked never lets an ALLOW match and
        // always lets a DENY match.
        let Some(vals) = self.value(r, deny) else {
            return deny;
        };
        let is_ip = matches!(self.key.as_str(), "source.ip" | "remote.ip");
        let is_header = self.header.is_some();
        let m = |g: &Glob, v: &str| {
            // `*` on a header means present, even with an empty value (as
            // Envoy's present_match): `x-debug:` cannot dodge a DENY.
            if is_header && *g == Glob::Present {
                return true;
            }
            if is_ip && let Glob::Exact(s) = g {
                return match (Cidr::parse(s), v.parse::<IpAddr>()) {
                    (Some(c), Ok(ip)) => c.contains(ip),
                    _ => false,
                };
            }
            g.matches(v)
        };
        if is_ip {
            // Every address of the source, leaning to denying, as blocks.
            let side = |gs: &[Glob], not: bool| {
                gs.is_empty()
                    || side_holds(
                        |a| gs.iter().any(|g| m(g, &a.to_string())),
                        not,
                        r.source_ip,
                        r.source_addrs,
                        deny,
                    )
            };
            return side(&self.values, false) && side(&self.not_values, true);
        }
        let holds = |v: &str| {
            (self.values.is_empty() || self.values.iter().any(|g| m(g, v)))
                && !self.not_values.iter().any(|g| m(g, v))
        };
        if vals.is_empty() {
            // An absent header: no value to match, none to exclude.
            return self.values.is_empty();
        }
        // One value except for a repeated header: a DENY matches on any of
        // its readings, an ALLOW on the joined one (the only one it gets).
        if deny {
            vals.iter().any(|v| holds(v))
        } else {
            vals.iter().all(|v| holds(v))
        }
    }
}

impl Rule {
    fn matches(&self, r: &RequestAttrs<'_>, deny: bool) -> bool {
        any_or_empty(&self.from, |s| s.matches(r, deny))
            && any_or_empty(&self.to, |o| o.matches(r, deny))
            && self.when.iter().all(|c| c.matches(r, deny))
    }
}

impl Policy {
    pub fn compile(p: &pb::Policy) -> Result<Policy, PolicyError> {
        let name = p.name.as_str();
        let action = match pb::PolicyAction::try_from(p.action) {
            Ok(pb::PolicyAction::Allow) => Action::Allow,
            Ok(pb::PolicyAction::Deny) => Action::Deny,
            Ok(pb::PolicyAction::Custom) => Action::Custom,
            Err(_) => {
                return Err(PolicyError {
                    policy: name.to_string(),
                    reason: format!("unknown action {}", p.action),
                });
            }
        };
        let rules = p
            .rules
            .iter()
            .map(|r| {
                Ok(Rule {
                    from: r
                        .from
                        .iter()
                        .map(|s| {
                            Ok(Source {
                                principals: globs(&s.principals),
                                not_principals: globs(&s.not_principals),
                                namespaces: globs(&s.namespaces),
                                not_namespaces: globs(&s.not_namespaces),
                                ip_blocks: cidrs(&s.ip_blocks, name)?,
                                not_ip_blocks: cidrs(&s.not_ip_blocks, name)?,
                            })
                        })
                        .collect::<Result<_, PolicyError>>()?,
                    to: r
                        .to
                        .iter()
                        .map(|o| Operation {
                            hosts: globs(&o.hosts),
                            not_hosts: globs(&o.not_hosts),
                            ports: o.ports.clone(),
                            not_ports: o.not_ports.clone(),
                            methods: globs(&o.methods),
                            not_methods: globs(&o.not_methods),
                            paths: globs(&o.paths),
                            not_paths: globs(&o.not_paths),
                        })
                        .collect(),
                    when: r.when.iter().map(Condition::new).collect(),
                })
            })
            .collect::<Result<_, PolicyError>>()?;
        let provider = match (action, &p.provider) {
            (Action::Custom, Some(pr)) if !pr.address.is_empty() => Some(Arc::new(pr.clone())),
            (Action::Custom, _) => {
                return Err(PolicyError {
                    policy: name.to_string(),
                    reason: "CUSTOM without a provider address".into(),
                });
            }
            _ => None,
        };
        Ok(Policy {
            name: name.to_string(),
            action,
            rules,
            dry_run: p.dry_run,
            provider,
        })
    }

    /// The policy enforced in place of one that does not compile: an ALLOW
    /// that matches nothing (what no other ALLOW grants is denied), or a
    /// DENY of every request. Never absent, so never wider than the original.
    pub fn fail_closed(p: &pb::Policy) -> Policy {
        let allow = pb::PolicyAction::try_from(p.action) == Ok(pb::PolicyAction::Allow);
        Policy {
            name: p.name.clone(),
            action: if allow { Action::Allow } else { Action::Deny },
            rules: if allow { vec![] } else { vec![Rule::default()] },
            dry_run: p.dry_run,
            provider: None,
        }
    }

    /// A field that cannot be checked matches a DENY (it denies more) and
    /// a CUSTOM (its provider is asked more), never an ALLOW.
    fn matches(&self, r: &RequestAttrs<'_>) -> bool {
        let deny = self.action != Action::Allow;
        self.rules.iter().any(|rule| rule.matches(r, deny))
    }
}

/// The CUSTOM policies whose rules match the request, in order: their
/// providers are to be asked before anything else.
pub fn custom_matches<'a>(
    policies: &'a [Policy],
    r: &RequestAttrs<'_>,
) -> impl Iterator<Item = &'a Policy> {
    policies
        .iter()
        .filter(move |p| p.action == Action::Custom && !p.dry_run && p.matches(r))
}

/// Judges a request without asking any provider: a matching CUSTOM policy
/// denies (fail closed). The proxy asks them (`extauthz.rs`), then calls
/// [`evaluate_checked`].
pub fn evaluate(policies: &[Policy], r: &RequestAttrs<'_>) -> Decision {
    if let Some(p) = custom_matches(policies, r).next() {
        return Decision::Denied(format!(
            "CUSTOM policy {}: its provider was not asked",
            p.name
        ));
    }
    evaluate_checked(policies, r)
}

/// Why a request from `source` is refused before any policy, CUSTOM
/// included (its provider is never asked): an address that names no
/// workload and may be anyone on its link, as the ztunnel refuses it.
/// None: the policies decide.
pub fn refused_before_policy(source: IpAddr) -> Option<String> {
    (!mesh_core::state::decide::attributable_peer(source)).then(|| {
        format!("source {source} is not a routable address (link-local, unspecified or multicast)")
    })
}

/// DENY, then ALLOW policies, for a request whose CUSTOM policies' providers
/// have allowed it (CUSTOM policies are not ALLOW policies). Dry-run
/// policies are logged when they match, never enforced.
pub fn evaluate_checked(policies: &[Policy], r: &RequestAttrs<'_>) -> Decision {
    if let Some(why) = refused_before_policy(r.source_ip) {
        return Decision::Denied(why);
    }
    for p in policies.iter().filter(|p| p.dry_run && p.matches(r)) {
        tracing::info!(policy = %p.name, action = ?p.action, path = %r.path, "dry-run policy matched (not enforced)");
    }
    let enforced = || policies.iter().filter(|p| !p.dry_run);
    if let Some(p) = enforced().find(|p| p.action == Action::Deny && p.matches(r)) {
        return Decision::Denied(format!("DENY policy {}", p.name));
    }
    let mut allows = enforced().filter(|p| p.action == Action::Allow).peekable();
    if allows.peek().is_none() {
        return Decision::Allowed(None);
    }
    match allows.find(|p| p.matches(r)) {
        Some(p) => Decision::Allowed(Some(p.name.clone())),
        None => Decision::Denied("no ALLOW policy matches".into()),
    }
}

/// The workload a peer is attributed to (by its address in the state,
/// never by a header) and the addresses its IP blocks are judged on
/// (`decide::attributed`): the waypoint's one attribution, on its HBONE
/// and ingress paths.
pub fn attribute_source(
    snap: &Snapshot,
    network: &str,
    peer: IpAddr,
    identity: Option<&Identity>,
) -> (Option<Arc<Workload>>, Vec<IpAddr>) {
    (
        snap.workload_by_ip(network, peer).cloned(),
        mesh_core::state::decide::attributed(snap, network, peer, identity).to_vec(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_blocks_see_a_v4_mapped_address_as_ipv4() {
        let c = |s: &str| Cidr::parse(s).expect("cidr");
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert!(c("10.0.0.0/8").contains(ip("::ffff:10.1.2.3")));
        assert!(!c("::/0").contains(ip("::ffff:10.1.2.3")));
        assert!(!c("::/0").contains(ip("10.1.2.3")));
        assert!(c("::ffff:10.0.0.0/104").contains(ip("10.1.2.3")));
        assert!(!c("::ffff:10.0.0.0/104").contains(ip("11.1.2.3")));
        assert!(c("fd00::/8").contains(ip("fd00:10:101:1::10")));
    }

    #[test]
    fn ip_blocks_hold_for_every_address_of_the_source_where_they_deny() {
        // The client is 10.1.2.3 and fd00:1::3 and comes from its IPv6
        // address.
        let h = HeaderMap::new();
        let both: Vec<IpAddr> = vec![
            "10.1.2.3".parse().expect("ip"),
            "fd00:1::3".parse().expect("ip"),
        ];
        let mut a = attrs("GET", "/", &h);
        a.source_ip = "fd00:1::3".parse().expect("ip");
        a.source_addrs = &both;
        let rule = |blocks: Vec<String>, not: bool| pb::PolicyRule {
            from: vec![pb::PolicySource {
                ip_blocks: if not { vec![] } else { blocks.clone() },
                not_ip_blocks: if not { blocks } else { vec![] },
                ..Default::default()
            }],
            ..Default::default()
        };
        let v4 = || vec!["10.1.0.0/16".to_string()];
        let deny = policy("shop/deny", pb::PolicyAction::Deny, vec![rule(v4(), false)]);
        assert!(!evaluate(std::slice::from_ref(&deny), &a).is_allowed());
        let allow = policy(
            "shop/allow",
            pb::PolicyAction::Allow,
            vec![rule(v4(), false)],
        );
        assert!(!evaluate(std::slice::from_ref(&allow), &a).is_allowed());
        let not = policy("shop/not", pb::PolicyAction::Allow, vec![rule(v4(), true)]);
        assert!(!evaluate(std::slice::from_ref(&not), &a).is_allowed());
        // With no workload to attribute it to, the address alone counts.
        a.source_addrs = &[];
        assert!(evaluate(std::slice::from_ref(&deny), &a).is_allowed());
        assert!(evaluate(&[not], &a).is_allowed());
    }

    /// The client is 10.1.2.3 and fd00:1::3. A DENY's blocks (and
    /// `source.ip`/`remote.ip` values) match if any of its addresses is
    /// inside, its `not` forms if any is outside; an ALLOW's look at the
    /// connection's address alone, its `not` forms hold only if no address
    /// is inside.
    /// A policy of an action on a list of blocks (or their `not` form).
    type MakePolicy = dyn Fn(pb::PolicyAction, &[&str], bool) -> Policy;

    #[test]
    fn ip_blocks_and_ip_conditions_lean_to_denying() {
        use pb::PolicyAction::{Allow, Deny};
        let h = HeaderMap::new();
        let both: Vec<IpAddr> = vec![
            "10.1.2.3".parse().expect("ip"),
            "fd00:1::3".parse().expect("ip"),
        ];
        let from = |action, blocks: &[&str], not: bool| {
            let v: Vec<String> = blocks.iter().map(|b| b.to_string()).collect();
            policy(
                "shop/ip",
                action,
                vec![pb::PolicyRule {
                    from: vec![pb::PolicySource {
                        ip_blocks: if not { vec![] } else { v.clone() },
                        not_ip_blocks: if not { v } else { vec![] },
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
            )
        };
        let cond = |action, key: &str, blocks: &[&str], not: bool| {
            if not {
                when(action, key, &[], blocks)
            } else {
                when(action, key, blocks, &[])
            }
        };
        let v4 = ["10.1.0.0/16"];
        let all = ["10.1.0.0/16", "fd00:1::/64"];
        let other = ["fd00:9::/64"];
        // Each from either address of the client.
        for peer in ["fd00:1::3", "10.1.2.3"] {
            let mut a = attrs("GET", "/", &h);
            a.source_ip = peer.parse().expect("ip");
            a.source_addrs = &both;
            let ok = |p: Policy| evaluate(&[p], &a).is_allowed();
            let peer_v4 = peer == "10.1.2.3";
            let mut judged: Vec<(String, Box<MakePolicy>)> = vec![("from".into(), Box::new(from))];
            for key in ["source.ip", "remote.ip"] {
                judged.push((
                    key.into(),
                    Box::new(move |ac, b: &[&str], n| cond(ac, key, b, n)),
                ));
            }
            for (what, p) in &judged {
                let at = format!("{what} from {peer}");
                // DENY: any address inside; any address outside.
                assert!(!ok(p(Deny, &v4, false)), "{at}: DENY in");
                assert!(!ok(p(Deny, &v4, true)), "{at}: DENY not in");
                assert!(ok(p(Deny, &all, true)), "{at}: DENY not in, all inside");
                assert!(ok(p(Deny, &other, false)), "{at}: DENY in, none inside");
                // ALLOW: the connection's address; no address inside.
                assert_eq!(ok(p(Allow, &v4, false)), peer_v4, "{at}: ALLOW in");
                assert!(ok(p(Allow, &all, false)), "{at}: ALLOW in, both");
                assert!(!ok(p(Allow, &v4, true)), "{at}: ALLOW not in");
                assert!(
                    ok(p(Allow, &other, true)),
                    "{at}: ALLOW not in, none inside"
                );
            }
        }
    }

    fn attrs<'a>(method: &'a str, path: &'a str, h: &'a HeaderMap) -> RequestAttrs<'a> {
        RequestAttrs {
            http: true,
            principal: Some("cluster.local/ns/shop/sa/client"),
            namespace: Some("shop"),
            source_ip: "10.1.2.3".parse().expect("ip"),
            source_addrs: &[],
            host: "orders.shop.svc.cluster.local:80",
            port: 80,
            method,
            path,
            headers: h,
        }
    }

    fn policy(name: &str, action: pb::PolicyAction, rules: Vec<pb::PolicyRule>) -> Policy {
        Policy::compile(&pb::Policy {
            name: name.into(),
            action: action as i32,
            rules,
            dry_run: false,
            provider: None,
        })
        .expect("compiles")
    }

    fn admin_paths() -> Vec<pb::PolicyRule> {
        vec![pb::PolicyRule {
            to: vec![pb::PolicyOperation {
                paths: vec!["/admin*".into()],
                ..Default::default()
            }],
            ..Default::default()
        }]
    }

    fn custom(name: &str, rules: Vec<pb::PolicyRule>) -> Policy {
        Policy::compile(&pb::Policy {
            name: name.into(),
            action: pb::PolicyAction::Custom as i32,
            rules,
            provider: Some(pb::ExtAuthzProvider {
                name: "authz".into(),
                address: "10.0.0.9:9000".into(),
                ..Default::default()
            }),
            dry_run: false,
        })
        .expect("compiles")
    }

    #[test]
    fn a_matching_custom_policy_whose_provider_was_not_asked_denies() {
        let ps = [
            custom("shop/ext", admin_paths()),
            policy(
                "shop/all",
                pb::PolicyAction::Allow,
                vec![pb::PolicyRule::default()],
            ),
        ];
        let h = HeaderMap::new();
        // Its rules do not match: ALLOW decides.
        assert!(evaluate(&ps, &attrs("GET", "/orders", &h)).is_allowed());
        // They match: only the provider could allow it.
        assert!(!evaluate(&ps, &attrs("GET", "/admin/users", &h)).is_allowed());
        let asked: Vec<&str> = custom_matches(&ps, &attrs("GET", "/admin/users", &h))
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(asked, vec!["shop/ext"]);
        assert_eq!(custom_matches(&ps, &attrs("GET", "/orders", &h)).count(), 0);
        // Once the provider allowed it, DENY and ALLOW decide; a CUSTOM
        // policy is not an ALLOW policy.
        assert!(evaluate_checked(&ps, &attrs("GET", "/admin/users", &h)).is_allowed());
        let only_custom = [custom("shop/ext", admin_paths())];
        assert_eq!(
            evaluate_checked(&only_custom, &attrs("GET", "/admin/users", &h)),
            Decision::Allowed(None)
        );
        // On TCP a path cannot be checked: the provider is asked.
        let mut tcp = attrs("", "", &h);
        tcp.http = false;
        assert_eq!(custom_matches(&ps, &tcp).count(), 1);
        // A CUSTOM policy must say whom to ask.
        for provider in [None, Some(pb::ExtAuthzProvider::default())] {
            assert!(
                Policy::compile(&pb::Policy {
                    name: "x/custom".into(),
                    action: pb::PolicyAction::Custom as i32,
                    rules: admin_paths(),
                    provider,
                    dry_run: false,
                })
                .is_err()
            );
        }
    }

    #[test]
    fn allow_get_orders_refuses_post_admin() {
        let p = policy(
            "shop/orders",
            pb::PolicyAction::Allow,
            vec![pb::PolicyRule {
                from: vec![pb::PolicySource {
                    principals: vec!["cluster.local/ns/shop/*".into()],
                    ..Default::default()
                }],
                to: vec![pb::PolicyOperation {
                    methods: vec!["GET".into()],
                    paths: vec!["/orders*".into()],
                    ..Default::default()
                }],
                when: vec![],
            }],
        );
        let h = HeaderMap::new();
        let ps = [p];
        assert_eq!(
            evaluate(&ps, &attrs("GET", "/orders/1?x=1", &h)),
            Decision::Allowed(Some("shop/orders".into()))
        );
        assert!(!evaluate(&ps, &attrs("POST", "/admin", &h)).is_allowed());
        assert!(!evaluate(&ps, &attrs("GET", "/admin", &h)).is_allowed());
    }

    #[test]
    fn deny_wins_and_conditions_read_headers() {
        let deny = policy(
            "shop/no-test",
            pb::PolicyAction::Deny,
            vec![pb::PolicyRule {
                when: vec![pb::PolicyCondition {
                    key: "request.headers[x-env]".into(),
                    values: vec!["test".into()],
                    not_values: vec![],
                }],
                ..Default::default()
            }],
        );
        let allow_all = policy(
            "shop/all",
            pb::PolicyAction::Allow,
            vec![pb::PolicyRule::default()],
        );
        let ps = [deny, allow_all];
        let mut h = HeaderMap::new();
        assert!(evaluate(&ps, &attrs("GET", "/", &h)).is_allowed());
        h.insert("x-env", "test".parse().expect("value"));
        assert_eq!(
            evaluate(&ps, &attrs("GET", "/", &h)),
            Decision::Denied("DENY policy shop/no-test".into())
        );
    }

    fn when(action: pb::PolicyAction, key: &str, values: &[&str], not: &[&str]) -> Policy {
        policy(
            "shop/h",
            action,
            vec![pb::PolicyRule {
                when: vec![pb::PolicyCondition {
                    key: key.into(),
                    values: values.iter().map(|v| v.to_string()).collect(),
                    not_values: not.iter().map(|v| v.to_string()).collect(),
                }],
                ..Default::default()
            }],
        )
    }

    fn allowed(p: Policy, h: &HeaderMap) -> bool {
        evaluate(&[p], &attrs("GET", "/", h)).is_allowed()
    }

    #[test]
    fn header_conditions_ignore_name_case_and_join_repeats() {
        use pb::PolicyAction::{Allow, Deny};
        let mut h = HeaderMap::new();
        h.append("x-role", "admin".parse().expect("value"));
        // The name in the key compares without case.
        assert!(allowed(
            when(Allow, "request.headers[X-Role]", &["admin"], &[]),
            &h
        ));
        assert!(!allowed(
            when(Deny, "request.headers[X-ROLE]", &["admin"], &[]),
            &h
        ));
        // Repeats are one value joined with commas, as Istio does.
        h.append("x-role", "guest".parse().expect("value"));
        assert!(!allowed(
            when(Allow, "request.headers[X-Role]", &["admin"], &[]),
            &h
        ));
        assert!(allowed(
            when(Allow, "request.headers[x-role]", &["admin,guest"], &[]),
            &h
        ));
        assert!(allowed(
            when(Allow, "request.headers[x-role]", &["admin*"], &[]),
            &h
        ));
        assert!(!allowed(
            when(Allow, "request.headers[x-role]", &["*"], &["*guest"]),
            &h
        ));
        assert!(!allowed(
            when(Deny, "request.headers[x-role]", &["admin,guest"], &[]),
            &h
        ));
        // A DENY also judges each repeat alone (a backend may read just one).
        assert!(!allowed(
            when(Deny, "request.headers[x-role]", &["guest"], &[]),
            &h
        ));
        assert!(!allowed(
            when(Deny, "request.headers[x-role]", &[], &["admin"]),
            &h
        ));
        assert!(allowed(
            when(Deny, "request.headers[x-role]", &["root"], &[]),
            &h
        ));
        // Absent: no value matches, none is excluded.
        let none = HeaderMap::new();
        assert!(!allowed(
            when(Allow, "request.headers[x-role]", &["*"], &[]),
            &none
        ));
        assert!(!allowed(
            when(Deny, "request.headers[x-role]", &[], &["admin"]),
            &none
        ));
        // A key that names no header can never be checked: ALLOW never
        // matches, DENY always does.
        assert!(!allowed(
            when(Allow, "request.headers[x role]", &[], &["a"]),
            &h
        ));
        assert!(!allowed(
            when(Deny, "request.headers[x role]", &["a"], &[]),
            &h
        ));
    }

    #[test]
    fn on_tcp_http_fields_never_allow_and_always_deny() {
        let allow_get = policy(
            "shop/get",
            pb::PolicyAction::Allow,
            vec![pb::PolicyRule {
                to: vec![pb::PolicyOperation {
                    methods: vec!["GET".into()],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        );
        let deny_admin = policy(
            "shop/no-admin",
            pb::PolicyAction::Deny,
            vec![pb::PolicyRule {
                to: vec![pb::PolicyOperation {
                    paths: vec!["/admin*".into()],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        );
        let unknown_key = policy(
            "shop/claims",
            pb::PolicyAction::Deny,
            vec![pb::PolicyRule {
                when: vec![pb::PolicyCondition {
                    key: "request.auth.claims[iss]".into(),
                    values: vec!["x".into()],
                    not_values: vec![],
                }],
                ..Default::default()
            }],
        );
        let h = HeaderMap::new();
        let mut tcp = attrs("", "", &h);
        tcp.http = false;
        assert!(!evaluate(std::slice::from_ref(&allow_get), &tcp).is_allowed());
        assert!(!evaluate(std::slice::from_ref(&deny_admin), &tcp).is_allowed());
        assert!(evaluate(std::slice::from_ref(&deny_admin), &attrs("GET", "/x", &h)).is_allowed());
        // A condition the waypoint cannot check makes a DENY match.
        assert!(!evaluate(&[unknown_key], &attrs("GET", "/x", &h)).is_allowed());
    }

    #[test]
    fn ip_blocks_and_hosts() {
        let p = policy(
            "shop/net",
            pb::PolicyAction::Allow,
            vec![pb::PolicyRule {
                from: vec![pb::PolicySource {
                    ip_blocks: vec!["10.1.0.0/16".into()],
                    ..Default::default()
                }],
                to: vec![pb::PolicyOperation {
                    hosts: vec!["Orders.shop.svc.cluster.local".into()],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        );
        let h = HeaderMap::new();
        assert!(evaluate(std::slice::from_ref(&p), &attrs("GET", "/", &h)).is_allowed());
        // A trailing dot names the same host (with or without a port).
        for host in [
            "orders.shop.svc.cluster.local.",
            "orders.shop.svc.cluster.local.:80",
            "ORDERS.shop.svc.cluster.local",
        ] {
            let mut a = attrs("GET", "/", &h);
            a.host = host;
            assert!(
                evaluate(std::slice::from_ref(&p), &a).is_allowed(),
                "{host}"
            );
        }
        let mut a = attrs("GET", "/", &h);
        a.source_ip = "10.2.0.1".parse().expect("ip");
        assert!(!evaluate(&[p], &a).is_allowed());
        assert!(
            Policy::compile(&pb::Policy {
                name: "x/bad".into(),
                action: 0,
                rules: vec![pb::PolicyRule {
                    from: vec![pb::PolicySource {
                        ip_blocks: vec!["10.0.0.0/99".into()],
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                dry_run: false,
                provider: None,
            })
            .is_err()
        );
    }
}
