//! L4 authorization: the policy types and their evaluation.
//!
//! Semantics (Istio's ztunnel): any matching DENY denies; with no ALLOW
//! policy the connection is allowed; a matching ALLOW allows; otherwise it
//! is denied. A policy matches when any rule matches (so a policy with no
//! rules matches nothing); a rule when all its clauses match (so a rule with
//! no clauses matches everything); a clause when any of its non-empty matches
//! matches, or when it has no matches at all; a match (with at least one
//! field set) when every populated field holds (one of its values) and no
//! `not_` field does. Dry-run policies are evaluated and logged, never
//! enforced.
//!
//! A policy this proxy cannot read is never simply absent: `fail_closed`
//! builds the stand-in that is enforced instead (see `xds.rs`).

use std::net::IpAddr;

use mesh_proto::istio::security as pb;
use serde::{Deserialize, Serialize};

use super::types::{FieldError, ResourceError, ip_from_bytes};
use crate::identity::Identity;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Scope {
    Global,
    Namespace,
    WorkloadSelector,
    /// The stand-in for a policy whose scope could not be read: it covers
    /// its namespace's workloads, and every workload when it is in the root
    /// namespace (the widest the original can have been).
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    Allow,
    Deny,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// Any non-empty value.
    Presence,
}

impl StringMatch {
    fn matches(&self, v: &str) -> bool {
        match self {
            StringMatch::Exact(s) => v == s,
            StringMatch::Prefix(s) => v.starts_with(s.as_str()),
            StringMatch::Suffix(s) => v.ends_with(s.as_str()),
            StringMatch::Presence => !v.is_empty(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    /// A block, in canonical form: one written in the v4-mapped IPv6 range
    /// (`::ffff:10.0.0.0/104`) is the IPv4 block it names (`10.0.0.0/8`).
    pub fn new(addr: IpAddr, len: u8) -> Cidr {
        match addr {
            IpAddr::V6(v6) if len >= 96 => match v6.to_ipv4_mapped() {
                Some(v4) => Cidr {
                    addr: IpAddr::V4(v4),
                    len: len - 96,
                },
                None => Cidr { addr, len },
            },
            _ => Cidr { addr, len },
        }
    }

    /// Whether `ip` is in the block. An address is taken as the family it
    /// really is (a v4-mapped IPv6 address is IPv4), and a block of one
    /// family holds no address of the other.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - self.len as u32).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - self.len as u32).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// A Kubernetes service account: the peer's namespace and name, whatever
/// its trust domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
}

impl ServiceAccount {
    fn matches(&self, id: &Identity) -> bool {
        id.namespace() == self.namespace && id.service_account() == self.name
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Match {
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub source_ips: Vec<Cidr>,
    pub not_source_ips: Vec<Cidr>,
    pub destination_ips: Vec<Cidr>,
    pub not_destination_ips: Vec<Cidr>,
    pub destination_ports: Vec<u16>,
    pub not_destination_ports: Vec<u16>,
    #[serde(default)]
    pub service_accounts: Vec<ServiceAccount>,
    #[serde(default)]
    pub not_service_accounts: Vec<ServiceAccount>,
}

/// What a connection is judged on.
#[derive(Debug, Clone, Copy)]
pub struct Connection<'a> {
    /// None for plaintext (no mTLS) connections.
    pub src_identity: Option<&'a Identity>,
    pub src_ip: IpAddr,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
    /// Every address of the workload the source is attributed to (empty
    /// when none is): blocks are judged on these as well as on `src_ip`
    /// where that leans to denying ([`blocks_hold`]), so a dual-stack
    /// workload cannot step round a block of one family by connecting from
    /// the other.
    pub src_addrs: &'a [IpAddr],
    /// The same for the destination workload and `dst_ip`.
    pub dst_addrs: &'a [IpAddr],
}

/// Whether an address field holds for one side of a connection (its
/// address `ip`, its workload's addresses `workload`), leaning to denying:
/// in a DENY (`deny`) a field holds if any address of the side is `inside`,
/// a `not` field if any is outside; in an ALLOW a field holds for the
/// connection's address alone (an IPv4-only ALLOW admits no IPv6), a `not`
/// field only if no address of the side is inside. The waypoint judges its
/// `source.ip` conditions by this rule too.
pub fn side_holds(
    inside: impl Fn(IpAddr) -> bool,
    not: bool,
    ip: IpAddr,
    workload: &[IpAddr],
    deny: bool,
) -> bool {
    let mut side = std::iter::once(ip).chain(workload.iter().copied());
    match (deny, not) {
        (true, false) => side.any(inside),
        (true, true) => side.any(|a| !inside(a)),
        (false, false) => inside(ip),
        (false, true) => !side.any(inside),
    }
}

/// [`side_holds`] for a list of blocks; an empty list always holds.
fn blocks_hold(blocks: &[Cidr], not: bool, ip: IpAddr, workload: &[IpAddr], deny: bool) -> bool {
    blocks.is_empty()
        || side_holds(
            |a| blocks.iter().any(|n| n.contains(a)),
            not,
            ip,
            workload,
            deny,
        )
}

// A field holds when its list is empty or one value matches.
fn any_or_empty<T>(list: &[T], f: impl Fn(&T) -> bool) -> bool {
    list.is_empty() || list.iter().any(f)
}

impl Match {
    /// No field set: such a match is skipped (it matches nothing).
    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
            && self.not_namespaces.is_empty()
            && self.principals.is_empty()
            && self.not_principals.is_empty()
            && self.source_ips.is_empty()
            && self.not_source_ips.is_empty()
            && self.destination_ips.is_empty()
            && self.not_destination_ips.is_empty()
            && self.destination_ports.is_empty()
            && self.not_destination_ports.is_empty()
            && self.service_accounts.is_empty()
            && self.not_service_accounts.is_empty()
    }

    /// Whether every populated field holds, in a policy that denies
    /// (`deny`) or allows. An empty match never matches.
    pub fn matches(&self, c: &Connection<'_>, deny: bool) -> bool {
        if self.is_empty() {
            return false;
        }
        // Identity-based values never match a connection without an identity.
        let ns = |m: &StringMatch| c.src_identity.is_some_and(|i| m.matches(i.namespace()));
        let pr = |m: &StringMatch| c.src_identity.is_some_and(|i| m.matches(i.principal()));
        let sa = |m: &ServiceAccount| c.src_identity.is_some_and(|i| m.matches(i));
        any_or_empty(&self.service_accounts, sa)
            && !self.not_service_accounts.iter().any(sa)
            && any_or_empty(&self.namespaces, ns)
            && !self.not_namespaces.iter().any(ns)
            && any_or_empty(&self.principals, pr)
            && !self.not_principals.iter().any(pr)
            && blocks_hold(&self.source_ips, false, c.src_ip, c.src_addrs, deny)
            && blocks_hold(&self.not_source_ips, true, c.src_ip, c.src_addrs, deny)
            && blocks_hold(&self.destination_ips, false, c.dst_ip, c.dst_addrs, deny)
            && blocks_hold(&self.not_destination_ips, true, c.dst_ip, c.dst_addrs, deny)
            && any_or_empty(&self.destination_ports, |p| *p == c.dst_port)
            && !self.not_destination_ports.contains(&c.dst_port)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Authorization {
    pub name: String,
    pub namespace: String,
    pub scope: Scope,
    pub action: Action,
    /// OR of rules; each rule an AND of clauses; each clause an OR of matches.
    pub rules: Vec<Vec<Vec<Match>>>,
    /// Evaluated and logged, never enforced.
    #[serde(default)]
    pub dry_run: bool,
    /// Set on the stand-in for a policy this proxy could not read: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_closed: Option<String>,
}

impl Authorization {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn matches(&self, c: &Connection<'_>) -> bool {
        let deny = self.action == Action::Deny;
        self.rules.iter().any(|rule| {
            rule.iter()
                .all(|clause| clause.is_empty() || clause.iter().any(|m| m.matches(c, deny)))
        })
    }

    /// The policy enforced in place of one that could not be read (`name`
    /// is the resource's name, `namespace/name`): an ALLOW that matches
    /// nothing, or, when even the action is unknown, a DENY of everything in
    /// its scope. Either way it never grants what the original might not.
    pub fn fail_closed(
        name: &str,
        action: Option<Action>,
        scope: Option<Scope>,
        why: String,
    ) -> Authorization {
        let (namespace, short) = name.split_once('/').unwrap_or(("", name));
        let action = action.unwrap_or(Action::Deny);
        Authorization {
            name: short.to_string(),
            namespace: namespace.to_string(),
            scope: scope.unwrap_or(Scope::Unknown),
            action,
            rules: match action {
                // No rule: this ALLOW matches nothing, yet it is an ALLOW
                // policy, so what no other ALLOW grants is denied.
                Action::Allow => vec![],
                // One rule with no clauses: matches every connection.
                Action::Deny => vec![vec![]],
            },
            dry_run: false,
            fail_closed: Some(why),
        }
    }

    pub fn from_proto(a: &pb::Authorization) -> Result<Self, ResourceError> {
        let key = format!("{}/{}", a.namespace, a.name);
        let fail = |reason: String| ResourceError::Policy {
            key: key.clone(),
            reason,
        };
        if a.name.is_empty() {
            return Err(fail("no name".into()));
        }
        let scope = match pb::Scope::try_from(a.scope) {
            Ok(pb::Scope::Global) => Scope::Global,
            Ok(pb::Scope::Namespace) => Scope::Namespace,
            Ok(pb::Scope::WorkloadSelector) => Scope::WorkloadSelector,
            Err(_) => return Err(fail(format!("unknown scope {}", a.scope))),
        };
        let action = match pb::Action::try_from(a.action) {
            Ok(pb::Action::Allow) => Action::Allow,
            Ok(pb::Action::Deny) => Action::Deny,
            Err(_) => return Err(fail(format!("unknown action {}", a.action))),
        };
        let rules = a
            .rules
            .iter()
            .map(|r| {
                r.clauses
                    .iter()
                    .map(|c| c.matches.iter().map(convert_match).collect())
                    .collect()
            })
            .collect::<Result<Vec<Vec<Vec<Match>>>, FieldError>>()
            .map_err(|e| fail(e.to_string()))?;
        Ok(Authorization {
            name: a.name.clone(),
            namespace: a.namespace.clone(),
            scope,
            action,
            rules,
            dry_run: a.dry_run,
            fail_closed: None,
        })
    }

    /// Reads what can still be read of a policy that `from_proto` refused,
    /// and builds its fail-closed stand-in (`fail_closed`).
    pub fn fail_closed_from_proto(
        name: &str,
        a: Option<&pb::Authorization>,
        why: String,
    ) -> Authorization {
        let action = a.and_then(|a| match pb::Action::try_from(a.action) {
            Ok(pb::Action::Allow) => Some(Action::Allow),
            Ok(pb::Action::Deny) => Some(Action::Deny),
            Err(_) => None,
        });
        let scope = a.and_then(|a| match pb::Scope::try_from(a.scope) {
            Ok(pb::Scope::Global) => Some(Scope::Global),
            Ok(pb::Scope::Namespace) => Some(Scope::Namespace),
            Ok(pb::Scope::WorkloadSelector) => Some(Scope::WorkloadSelector),
            Err(_) => None,
        });
        // A dry-run policy decides nothing, so its stand-in decides nothing.
        let mut p = Authorization::fail_closed(name, action, scope, why);
        p.dry_run = a.is_some_and(|a| a.dry_run);
        p
    }
}

fn strings(list: &[pb::StringMatch]) -> Result<Vec<StringMatch>, FieldError> {
    use pb::string_match::MatchType;
    list.iter()
        .map(|m| match &m.match_type {
            Some(MatchType::Exact(s)) => Ok(StringMatch::Exact(s.clone())),
            Some(MatchType::Prefix(s)) => Ok(StringMatch::Prefix(s.clone())),
            Some(MatchType::Suffix(s)) => Ok(StringMatch::Suffix(s.clone())),
            Some(MatchType::Presence(_)) => Ok(StringMatch::Presence),
            None => Err(FieldError::NoMatchType),
        })
        .collect()
}

fn cidrs(list: &[pb::Address]) -> Result<Vec<Cidr>, FieldError> {
    list.iter()
        .map(|a| {
            let addr = ip_from_bytes(&a.address)?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            if a.length > max {
                return Err(FieldError::PrefixLength {
                    len: a.length,
                    addr,
                });
            }
            Ok(Cidr::new(addr, a.length as u8))
        })
        .collect()
}

fn port_list(list: &[u32]) -> Result<Vec<u16>, FieldError> {
    list.iter()
        .map(|p| u16::try_from(*p).map_err(|_| FieldError::PortValue(*p)))
        .collect()
}

fn service_accounts(list: &[pb::ServiceAccountMatch]) -> Result<Vec<ServiceAccount>, FieldError> {
    list.iter()
        .map(|m| {
            if m.namespace.is_empty() || m.service_account.is_empty() {
                return Err(FieldError::ServiceAccount {
                    namespace: m.namespace.clone(),
                    name: m.service_account.clone(),
                });
            }
            Ok(ServiceAccount {
                namespace: m.namespace.clone(),
                name: m.service_account.clone(),
            })
        })
        .collect()
}

fn convert_match(m: &pb::Match) -> Result<Match, FieldError> {
    Ok(Match {
        service_accounts: service_accounts(&m.service_accounts)?,
        not_service_accounts: service_accounts(&m.not_service_accounts)?,
        namespaces: strings(&m.namespaces)?,
        not_namespaces: strings(&m.not_namespaces)?,
        principals: strings(&m.principals)?,
        not_principals: strings(&m.not_principals)?,
        source_ips: cidrs(&m.source_ips)?,
        not_source_ips: cidrs(&m.not_source_ips)?,
        destination_ips: cidrs(&m.destination_ips)?,
        not_destination_ips: cidrs(&m.not_destination_ips)?,
        destination_ports: port_list(&m.destination_ports)?,
        not_destination_ports: port_list(&m.not_destination_ports)?,
    })
}

/// The outcome of evaluating the policies that apply to a connection, and
/// which policy decided it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Decision {
    /// No ALLOW policy applies and no DENY matched.
    AllowNoPolicies,
    /// This ALLOW policy matched.
    Allowed { policy: String },
    /// This DENY policy matched.
    Denied { policy: String },
    /// ALLOW policies apply and none matched.
    NotAllowed { allow_policies: Vec<String> },
    /// The peer's address names no workload on any network and may be
    /// anyone on its link (link-local, unspecified, multicast, broadcast):
    /// refused before any policy, whose IP blocks would judge it alone.
    Unattributable { peer: std::net::IpAddr },
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::AllowNoPolicies | Decision::Allowed { .. })
    }
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Decision::AllowNoPolicies => write!(f, "allowed: no ALLOW policy applies"),
            Decision::Allowed { policy } => write!(f, "allowed by {policy}"),
            Decision::Denied { policy } => write!(f, "denied by DENY policy {policy}"),
            Decision::NotAllowed { allow_policies } => {
                write!(
                    f,
                    "denied: no ALLOW policy matched ({})",
                    allow_policies.join(", ")
                )
            }
            Decision::Unattributable { peer } => write!(
                f,
                "denied: source {peer} is not a routable address (link-local, unspecified or multicast): it names no workload"
            ),
        }
    }
}

/// Evaluates `policies` (those that apply to the destination) for `c`.
pub fn evaluate<'p>(
    policies: impl IntoIterator<Item = &'p Authorization>,
    c: &Connection<'_>,
) -> Decision {
    let mut allows = Vec::new();
    let mut allowed_by = None;
    for p in policies {
        if p.dry_run {
            if p.matches(c) {
                tracing::info!(
                    policy = %p.key(),
                    action = ?p.action,
                    src_ip = %c.src_ip,
                    dst = %std::net::SocketAddr::new(c.dst_ip, c.dst_port),
                    "dry-run policy matched (not enforced)"
                );
            }
            continue;
        }
        match p.action {
            Action::Deny if p.matches(c) => return Decision::Denied { policy: p.key() },
            Action::Deny => {}
            Action::Allow => {
                if allowed_by.is_none() && p.matches(c) {
                    allowed_by = Some(p.key());
                }
                allows.push(p.key());
            }
        }
    }
    match (allowed_by, allows.is_empty()) {
        (Some(policy), _) => Decision::Allowed { policy },
        (None, true) => Decision::AllowNoPolicies,
        (None, false) => Decision::NotAllowed {
            allow_policies: allows,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn<'a>(id: Option<&'a Identity>, port: u16) -> Connection<'a> {
        Connection {
            src_identity: id,
            src_ip: "10.0.1.5".parse().unwrap(),
            dst_ip: "10.0.2.9".parse().unwrap(),
            dst_port: port,
            src_addrs: &[],
            dst_addrs: &[],
        }
    }

    fn policy(name: &str, action: Action, m: Match) -> Authorization {
        Authorization {
            name: name.into(),
            namespace: "ns".into(),
            scope: Scope::Namespace,
            action,
            rules: vec![vec![vec![m]]],
            dry_run: false,
            fail_closed: None,
        }
    }

    #[test]
    fn deny_first_then_allow_semantics() {
        let app: Identity = "spiffe://cluster.local/ns/a/sa/app".parse().unwrap();
        let web: Identity = "spiffe://cluster.local/ns/b/sa/web".parse().unwrap();
        let allow_app = policy(
            "allow-app",
            Action::Allow,
            Match {
                principals: vec![StringMatch::Exact("cluster.local/ns/a/sa/app".into())],
                ..Default::default()
            },
        );
        let deny_9000 = policy(
            "deny-9000",
            Action::Deny,
            Match {
                destination_ports: vec![9000],
                ..Default::default()
            },
        );
        assert_eq!(
            evaluate([], &conn(Some(&web), 80)),
            Decision::AllowNoPolicies
        );
        assert!(evaluate([&allow_app], &conn(Some(&app), 80)).is_allowed());
        assert_eq!(
            evaluate([&allow_app], &conn(Some(&web), 80)),
            Decision::NotAllowed {
                allow_policies: vec!["ns/allow-app".into()]
            }
        );
        // DENY wins even when an ALLOW matches.
        assert_eq!(
            evaluate([&allow_app, &deny_9000], &conn(Some(&app), 9000)),
            Decision::Denied {
                policy: "ns/deny-9000".into()
            }
        );
        // A DENY that does not match leaves the rest to decide.
        assert_eq!(
            evaluate([&deny_9000], &conn(None, 80)),
            Decision::AllowNoPolicies
        );
    }

    #[test]
    fn strict_mtls_is_a_deny_without_identity() {
        let strict = policy(
            "strict",
            Action::Deny,
            Match {
                not_principals: vec![StringMatch::Presence],
                ..Default::default()
            },
        );
        let app: Identity = "spiffe://cluster.local/ns/a/sa/app".parse().unwrap();
        assert!(!evaluate([&strict], &conn(None, 80)).is_allowed());
        assert!(evaluate([&strict], &conn(Some(&app), 80)).is_allowed());
    }

    #[test]
    fn fields_and_their_not_forms() {
        let app: Identity = "spiffe://cluster.local/ns/a/sa/app".parse().unwrap();
        let c = conn(Some(&app), 80);
        let m = |m: Match| m.matches(&c, false);
        assert!(m(Match {
            namespaces: vec![StringMatch::Exact("a".into())],
            ..Default::default()
        }));
        assert!(!m(Match {
            not_namespaces: vec![StringMatch::Prefix("a".into())],
            ..Default::default()
        }));
        assert!(m(Match {
            principals: vec![StringMatch::Suffix("/sa/app".into())],
            ..Default::default()
        }));
        let net = |s: &str, len| Cidr {
            addr: s.parse().unwrap(),
            len,
        };
        assert!(m(Match {
            source_ips: vec![net("10.0.0.0", 16)],
            destination_ips: vec![net("10.0.2.0", 24)],
            ..Default::default()
        }));
        assert!(!m(Match {
            not_source_ips: vec![net("10.0.1.5", 32)],
            ..Default::default()
        }));
        assert!(!m(Match {
            not_destination_ports: vec![80],
            ..Default::default()
        }));
        // Identity-based values never match a plaintext connection, and
        // their not_ forms then hold.
        let plain = conn(None, 80);
        assert!(
            !Match {
                namespaces: vec![StringMatch::Presence],
                ..Default::default()
            }
            .matches(&plain, false)
        );
        assert!(
            Match {
                not_principals: vec![StringMatch::Exact("x".into())],
                ..Default::default()
            }
            .matches(&plain, false)
        );
        assert!(net("0.0.0.0", 0).contains("1.2.3.4".parse().unwrap()));
        assert!(!net("10.0.0.0", 8).contains("::1".parse().unwrap()));
    }

    /// IP blocks lean to denying: a DENY's `ipBlocks` match if any address
    /// of the peer and its workload is inside, its `notIpBlocks` if any is
    /// outside; an ALLOW's `ipBlocks` look at the connection's address
    /// alone, its `notIpBlocks` hold only if no address is inside. The same
    /// for the destination's blocks and addresses.
    #[test]
    fn ip_blocks_lean_to_denying_on_every_address_of_a_side() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let net = |s: &str| {
            let (a, l) = s.split_once('/').unwrap();
            Cidr::new(a.parse().unwrap(), l.parse().unwrap())
        };
        let both = [ip("10.0.1.5"), ip("fd00:1::5")];
        let dst_both = [ip("10.0.2.9"), ip("fd00:2::9")];
        let mut c = conn(None, 80);
        c.src_ip = ip("fd00:1::5");
        c.dst_ip = ip("fd00:2::9");
        c.src_addrs = &both;
        c.dst_addrs = &dst_both;
        let src = |blocks: &[&str], not: bool| {
            let v: Vec<Cidr> = blocks.iter().map(|b| net(b)).collect();
            Match {
                source_ips: if not { vec![] } else { v.clone() },
                not_source_ips: if not { v } else { vec![] },
                ..Default::default()
            }
        };
        let dst = |blocks: &[&str], not: bool| {
            let v: Vec<Cidr> = blocks.iter().map(|b| net(b)).collect();
            Match {
                destination_ips: if not { vec![] } else { v.clone() },
                not_destination_ips: if not { v } else { vec![] },
                ..Default::default()
            }
        };
        for (side, m) in [
            ("from", &src as &dyn Fn(&[&str], bool) -> Match),
            ("to", &dst),
        ] {
            let v4 = ["10.0.0.0/8"];
            let all = ["10.0.0.0/8", "fd00::/8"];
            let other = ["fd00:9::/64"];
            // DENY: inside by any address; outside by any address.
            assert!(m(&v4, false).matches(&c, true), "{side}: DENY ipBlocks");
            assert!(m(&v4, true).matches(&c, true), "{side}: DENY notIpBlocks");
            assert!(
                !m(&all, true).matches(&c, true),
                "{side}: DENY notIpBlocks, all inside"
            );
            assert!(
                !m(&other, false).matches(&c, true),
                "{side}: DENY ipBlocks, none inside"
            );
            // ALLOW: the connection's address alone for ipBlocks; no
            // address inside for notIpBlocks.
            assert!(!m(&v4, false).matches(&c, false), "{side}: ALLOW ipBlocks");
            assert!(
                m(&all, false).matches(&c, false),
                "{side}: ALLOW ipBlocks v6"
            );
            assert!(
                !m(&v4, true).matches(&c, false),
                "{side}: ALLOW notIpBlocks"
            );
            assert!(
                m(&other, true).matches(&c, false),
                "{side}: ALLOW notIpBlocks, none inside"
            );
        }
        // With no workload, the connection's addresses alone.
        c.src_addrs = &[];
        c.dst_addrs = &[];
        assert!(src(&["10.0.0.0/8"], true).matches(&c, true));
        assert!(!src(&["fd00::/8"], true).matches(&c, true));
        assert!(src(&["10.0.0.0/8"], true).matches(&c, false));
        assert!(!dst(&["fd00::/8"], true).matches(&c, true));
    }
}
