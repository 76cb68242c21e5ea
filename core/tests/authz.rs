//! L4 authorization through the ztunnel's real path: `istio.security`
//! resources as a control plane sends them, converted by the xDS sink,
//! applied to the proxy state, decided by `inbound::authorize`.
//!
//! Covers Istio's ztunnel semantics for empty matches, clauses and rules,
//! service-account matches, dry-run, and what happens to a policy the
//! ztunnel cannot read (it is enforced as a fail-closed stand-in, never
//! simply absent).

use std::net::{IpAddr, SocketAddr};

use mesh_core::identity::Identity;
use mesh_core::state::ProxyState;
use mesh_core::state::decide::authorize;
use mesh_core::xds::state_updates;
use mesh_proto::envoy::service::discovery::v3::Resource;
use mesh_proto::istio::security::{
    self as sec, Authorization, Clause, Match, Rule, ServiceAccountMatch, StringMatch, string_match,
};
use mesh_proto::istio::workload::{self as wl, Address, address};
use mesh_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use prost::Message;

const TD: &str = "cluster.local";
const SERVER_IP: [u8; 4] = [10, 9, 0, 2];

fn resource(name: &str, type_url: &str, value: Vec<u8>) -> Resource {
    Resource {
        name: name.into(),
        version: "1".into(),
        resource: Some(prost_types::Any {
            type_url: type_url.into(),
            value,
        }),
        ..Default::default()
    }
}

fn server() -> Resource {
    let w = wl::Workload {
        uid: "uid-server".into(),
        name: "server".into(),
        namespace: "shop".into(),
        addresses: vec![SERVER_IP.to_vec()],
        service_account: "server".into(),
        trust_domain: TD.into(),
        tunnel_protocol: wl::TunnelProtocol::Hbone as i32,
        authorization_policies: vec!["shop/selected".into()],
        ..Default::default()
    };
    let a = Address {
        r#type: Some(address::Type::Workload(w)),
    };
    resource("uid-server", ADDRESS_TYPE_URL, a.encode_to_vec())
}

/// A state holding the server workload and `policies` (already encoded),
/// and the names the sink refused.
fn state(policies: Vec<Resource>) -> (ProxyState, Vec<String>) {
    let st = ProxyState::default();
    let (u, rejected) = state_updates(TD, ADDRESS_TYPE_URL, &[server()], &[]);
    assert!(rejected.is_empty(), "{rejected:?}");
    st.apply(u);
    let (u, rejected) = state_updates(TD, AUTHORIZATION_TYPE_URL, &policies, &[]);
    st.apply(u);
    (st, rejected.into_iter().map(|(n, _)| n).collect())
}

fn policy(p: &Authorization) -> Resource {
    resource(
        &format!("{}/{}", p.namespace, p.name),
        AUTHORIZATION_TYPE_URL,
        p.encode_to_vec(),
    )
}

fn allowed(st: &ProxyState, from: Option<&str>, src_ip: &str, port: u16) -> bool {
    let snap = st.snapshot();
    let ip = IpAddr::from(SERVER_IP);
    let dst = snap
        .workload_by_ip("", ip)
        .expect("server workload")
        .clone();
    let id: Option<Identity> = from.map(|f| f.parse().expect("identity"));
    authorize(
        &snap,
        "istio-system",
        &dst,
        id.as_ref(),
        src_ip.parse().expect("ip"),
        SocketAddr::new(ip, port),
    )
    .is_allowed()
}

fn exact(s: &str) -> StringMatch {
    StringMatch {
        match_type: Some(string_match::MatchType::Exact(s.into())),
    }
}

fn auth(name: &str, action: sec::Action, rules: Vec<Rule>) -> Authorization {
    Authorization {
        name: name.into(),
        namespace: "shop".into(),
        scope: sec::Scope::Namespace as i32,
        action: action as i32,
        rules,
        dry_run: false,
    }
}

fn rule(clauses: Vec<Vec<Match>>) -> Rule {
    Rule {
        clauses: clauses
            .into_iter()
            .map(|matches| Clause { matches })
            .collect(),
    }
}

const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/client";
const OTHER: &str = "spiffe://cluster.local/ns/other/sa/web";

#[test]
fn a_policy_with_no_rules_matches_nothing() {
    // ALLOW with no rules: an ALLOW policy applies and none matches.
    let (st, _) = state(vec![policy(&auth("a", sec::Action::Allow, vec![]))]);
    assert!(!allowed(&st, Some(CLIENT), "10.9.0.1", 80));
    // DENY with no rules denies nothing.
    let (st, _) = state(vec![policy(&auth("d", sec::Action::Deny, vec![]))]);
    assert!(allowed(&st, Some(CLIENT), "10.9.0.1", 80));
}

#[test]
fn a_rule_with_no_clauses_matches_everything() {
    let (st, _) = state(vec![policy(&auth(
        "d",
        sec::Action::Deny,
        vec![rule(vec![])],
    ))]);
    assert!(!allowed(&st, Some(CLIENT), "10.9.0.1", 80));
    assert!(!allowed(&st, None, "10.9.0.1", 80));
}

#[test]
fn an_empty_clause_holds_and_an_empty_match_is_skipped() {
    let ports = Match {
        destination_ports: vec![80],
        ..Default::default()
    };
    // A clause with no matches holds: the rule is decided by its port clause.
    let (st, _) = state(vec![policy(&auth(
        "a",
        sec::Action::Allow,
        vec![rule(vec![vec![], vec![ports.clone()]])],
    ))]);
    assert!(allowed(&st, Some(CLIENT), "10.9.0.1", 80));
    assert!(!allowed(&st, Some(CLIENT), "10.9.0.1", 81));
    // An empty match never matches: a clause of only an empty match fails,
    // so this ALLOW allows nothing (and the DENY below denies nothing).
    let (st, _) = state(vec![policy(&auth(
        "a",
        sec::Action::Allow,
        vec![rule(vec![vec![Match::default()]])],
    ))]);
    assert!(!allowed(&st, Some(CLIENT), "10.9.0.1", 80));
    let (st, _) = state(vec![policy(&auth(
        "d",
        sec::Action::Deny,
        vec![rule(vec![vec![Match::default()]])],
    ))]);
    assert!(allowed(&st, Some(CLIENT), "10.9.0.1", 80));
    // Beside a real match the empty one is just skipped.
    let (st, _) = state(vec![policy(&auth(
        "a",
        sec::Action::Allow,
        vec![rule(vec![vec![Match::default(), ports]])],
    ))]);
    assert!(allowed(&st, Some(CLIENT), "10.9.0.1", 80));
    assert!(!allowed(&st, Some(CLIENT), "10.9.0.1", 81));
}

#[test]
fn service_account_matches_read_namespace_and_name() {
    let sa = |ns: &str, name: &str| ServiceAccountMatch {
        namespace: ns.into(),
        service_account: name.into(),
    };
    let only_sa = Match {
        service_accounts: vec![sa("shop", "client")],
        ..Default::default()
    };
    let (st, rejected) = state(vec![policy(&auth(
        "a",
        sec::Action::Allow,
        vec![rule(vec![vec![only_sa]])],
    ))]);
    assert!(rejected.is_empty());
    assert!(allowed(&st, Some(CLIENT), "10.9.0.1", 80));
    // Another trust domain, same namespace and account: still that account.
    assert!(allowed(
        &st,
        Some("spiffe://other.td/ns/shop/sa/client"),
        "10.9.0.1",
        80
    ));
    assert!(!allowed(&st, Some(OTHER), "10.9.0.1", 80));
    assert!(!allowed(&st, None, "10.9.0.1", 80));
    let not_sa = Match {
        not_service_accounts: vec![sa("other", "web")],
        ..Default::default()
    };
    let (st, _) = state(vec![policy(&auth(
        "d",
        sec::Action::Deny,
        vec![rule(vec![vec![not_sa]])],
    ))]);
    assert!(allowed(&st, Some(OTHER), "10.9.0.1", 80));
    assert!(!allowed(&st, Some(CLIENT), "10.9.0.1", 80));
}

#[test]
fn a_dry_run_policy_is_never_enforced() {
    let mut deny_all = auth("d", sec::Action::Deny, vec![rule(vec![])]);
    deny_all.dry_run = true;
    let mut allow_none = auth("a", sec::Action::Allow, vec![]);
    allow_none.dry_run = true;
    let (st, _) = state(vec![policy(&deny_all), policy(&allow_none)]);
    assert!(allowed(&st, Some(CLIENT), "10.9.0.1", 80));
}

#[test]
fn a_policy_the_ztunnel_cannot_read_is_enforced_fail_closed() {
    // Unknown action: the stand-in denies everything in the namespace.
    let mut unknown_action = auth("weird", sec::Action::Deny, vec![rule(vec![])]);
    unknown_action.action = 7;
    let (st, rejected) = state(vec![policy(&unknown_action)]);
    assert_eq!(rejected, vec!["shop/weird".to_string()], "it is NACKed");
    assert!(!allowed(&st, Some(CLIENT), "10.9.0.1", 80));

    // A DENY the ztunnel cannot read (a string match without a type): the
    // stand-in denies everything the original could have.
    let bad_match = Match {
        principals: vec![StringMatch { match_type: None }],
        ..Default::default()
    };
    let deny = auth(
        "deny-bad",
        sec::Action::Deny,
        vec![rule(vec![vec![bad_match.clone()]])],
    );
    let (st, rejected) = state(vec![policy(&deny)]);
    assert_eq!(rejected.len(), 1);
    assert!(!allowed(&st, Some(CLIENT), "10.9.0.1", 80));

    // An ALLOW it cannot read still counts as an ALLOW that matches nothing:
    // what no other ALLOW grants is denied; another ALLOW still grants.
    let allow_bad = auth(
        "allow-bad",
        sec::Action::Allow,
        vec![rule(vec![vec![bad_match]])],
    );
    let (st, _) = state(vec![policy(&allow_bad)]);
    assert!(!allowed(&st, Some(CLIENT), "10.9.0.1", 80));
    let allow_client = auth(
        "allow-client",
        sec::Action::Allow,
        vec![rule(vec![vec![Match {
            principals: vec![exact("cluster.local/ns/shop/sa/client")],
            ..Default::default()
        }]])],
    );
    let (st, _) = state(vec![policy(&allow_bad), policy(&allow_client)]);
    assert!(allowed(&st, Some(CLIENT), "10.9.0.1", 80));
    assert!(!allowed(&st, Some(OTHER), "10.9.0.1", 80));

    // Bytes that do not decode at all: a DENY of the policy's namespace.
    let garbage = resource(
        "shop/garbage",
        AUTHORIZATION_TYPE_URL,
        vec![0xff, 0xff, 0xff],
    );
    let (st, rejected) = state(vec![garbage]);
    assert_eq!(rejected, vec!["shop/garbage".to_string()]);
    assert!(!allowed(&st, Some(CLIENT), "10.9.0.1", 80));
    // ... which a later good version replaces.
    let fixed = auth("garbage", sec::Action::Allow, vec![rule(vec![])]);
    let (u, rejected) = state_updates(TD, AUTHORIZATION_TYPE_URL, &[policy(&fixed)], &[]);
    assert!(rejected.is_empty());
    st.apply(u);
    assert!(allowed(&st, Some(CLIENT), "10.9.0.1", 80));
}

#[test]
fn a_stand_in_covers_no_other_namespace() {
    let mut unknown = auth("weird", sec::Action::Deny, vec![]);
    unknown.namespace = "elsewhere".into();
    unknown.action = 9;
    unknown.scope = 9;
    let (st, _) = state(vec![policy(&unknown)]);
    assert!(allowed(&st, Some(CLIENT), "10.9.0.1", 80));
    // In the root namespace it covers the mesh.
    unknown.namespace = "istio-system".into();
    let (st, _) = state(vec![policy(&unknown)]);
    assert!(!allowed(&st, Some(CLIENT), "10.9.0.1", 80));
}

/// A peer address that names no workload anywhere and may be anyone on
/// the link (IPv6 link-local, IPv4 link-local, unspecified, multicast,
/// broadcast) is refused before any policy: IP blocks judged on it alone
/// would let a pod escape a DENY naming its real addresses. Failed first:
/// allowed (no policy applies, and a DENY of the caller's addresses
/// missed).
#[test]
fn a_peer_without_a_routable_address_is_refused() {
    let (st, _) = state(vec![]);
    for ip in [
        "fe80::1",
        "febf::1",
        "fec0::1",
        "169.254.3.4",
        "::",
        "0.0.0.0",
        "ff02::1",
        "224.0.0.1",
        "255.255.255.255",
        "::ffff:169.254.3.4",
    ] {
        assert!(!allowed(&st, None, ip, 80), "{ip}");
    }
    // Global and unique-local addresses are judged by policy, as is
    // loopback (which the kernel never takes from outside).
    for ip in [
        "10.9.0.1",
        "fd00:10:1:1::2",
        "2001:db8::1",
        "127.0.0.1",
        "::1",
    ] {
        assert!(allowed(&st, None, ip, 80), "{ip}");
    }
    // A DENY of the caller's addresses is not escaped from its link-local.
    let deny = auth(
        "deny-caller",
        sec::Action::Deny,
        vec![rule(vec![vec![Match {
            source_ips: vec![mesh_proto::istio::security::Address {
                address: vec![10, 9, 0, 1],
                length: 32,
            }],
            ..Default::default()
        }]])],
    );
    let (st, _) = state(vec![policy(&deny)]);
    assert!(!allowed(&st, None, "10.9.0.1", 80));
    assert!(!allowed(&st, None, "fe80::1234", 80));
}
