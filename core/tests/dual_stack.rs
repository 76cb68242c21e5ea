//! Dual-stack decisions: a connection keeps the family it was made in where
//! the destination has an address of it, and policy IP blocks match an
//! address as the family it really is (a v4-mapped IPv6 address is IPv4).

use std::net::{IpAddr, SocketAddr};

use mesh_core::state::decide::{Route, authorize, resolve};
use mesh_core::state::{LocalConfig, ProxyState};

const STATE: &str = r#"
workloads:
- {uid: "c//Pod/shop/client", name: client, namespace: shop, addresses: [10.1.1.1, "fd00:1::1"], tunnel_protocol: HBONE, service_account: client, node: n1}
- {uid: "c//Pod/shop/server", name: server, namespace: shop, addresses: [10.1.2.1, "fd00:2::1"], tunnel_protocol: HBONE, service_account: server, node: n2,
   services: {"shop/server.shop.svc.cluster.local": [{service_port: 80, target_port: 8080}]}}
- {uid: "c//Pod/shop/old", name: old, namespace: shop, addresses: [10.1.3.1], tunnel_protocol: HBONE, service_account: old, node: n2,
   services: {"shop/old.shop.svc.cluster.local": [{service_port: 80, target_port: 8080}]}}
services:
- {name: server, namespace: shop, hostname: server.shop.svc.cluster.local, addresses: [10.2.0.1, "fd00:f::1"], ports: [{service_port: 80, target_port: 8080}]}
- {name: old, namespace: shop, hostname: old.shop.svc.cluster.local, addresses: ["fd00:f::2"], ports: [{service_port: 80, target_port: 8080}]}
"#;

fn state(policies: &str) -> ProxyState {
    let local: LocalConfig =
        serde_yaml::from_str(&format!("{STATE}policies:\n{policies}")).expect("local config");
    let state = ProxyState::default();
    state.replace(local.to_updates("cluster.local", "test").expect("updates"));
    state
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

/// Where a connection from the client to `dst` goes: (next hop, target).
fn hbone(state: &ProxyState, dst: &str) -> (SocketAddr, SocketAddr) {
    let snap = state.snapshot();
    let src = snap.workload("c//Pod/shop/client").expect("client").clone();
    match resolve(&snap, "", &src, addr(dst)) {
        Ok(Route::Hbone {
            next_hop, target, ..
        }) => (next_hop, target),
        other => panic!("{dst}: {other:?}"),
    }
}

#[test]
fn a_connection_keeps_its_family_where_the_destination_has_it() {
    let s = state("[]\n");
    // A Service's IPv4 VIP leads to its endpoint's IPv4 address, its IPv6
    // VIP to the IPv6 one, and the tunnel goes in the same family.
    assert_eq!(
        hbone(&s, "10.2.0.1:80"),
        (addr("10.1.2.1:15008"), addr("10.1.2.1:8080"))
    );
    assert_eq!(
        hbone(&s, "[fd00:f::1]:80"),
        (addr("[fd00:2::1]:15008"), addr("[fd00:2::1]:8080"))
    );
    // A pod's own IPv6 address is its own.
    assert_eq!(
        hbone(&s, "[fd00:2::1]:9000"),
        (addr("[fd00:2::1]:15008"), addr("[fd00:2::1]:9000"))
    );
    // An endpoint with no address of that family is reached in the other.
    assert_eq!(
        hbone(&s, "[fd00:f::2]:80"),
        (addr("10.1.3.1:15008"), addr("10.1.3.1:8080"))
    );
}

/// Whether the server's policies let a connection from `src` in.
fn allowed(s: &ProxyState, src: &str) -> bool {
    let snap = s.snapshot();
    let dst = snap.workload("c//Pod/shop/server").expect("server").clone();
    let src: IpAddr = src.parse().expect("ip");
    authorize(
        &snap,
        "istio-system",
        &dst,
        None,
        src,
        addr("10.1.2.1:8080"),
    )
    .is_allowed()
}

fn policy(action: &str, blocks: &str) -> String {
    format!(
        "- {{name: p, namespace: shop, scope: NAMESPACE, action: {action}, rules: [{{clauses: [{{matches: [{{source_ips: [{blocks}]}}]}}]}}]}}\n"
    )
}

#[test]
fn ip_blocks_see_a_v4_mapped_address_as_ipv4() {
    // A DENY of an IPv4 block holds for the same address written v4-mapped.
    let deny = state(&policy("DENY", "10.0.0.0/8"));
    assert!(!allowed(&deny, "10.1.1.1"));
    assert!(!allowed(&deny, "::ffff:10.1.1.1"));
    assert!(allowed(&deny, "fd00:1::1"));
    // An IPv6 block holds no IPv4 source, however written.
    let allow6 = state(&policy("ALLOW", "\"::/0\""));
    assert!(allowed(&allow6, "fd00:1::1"));
    assert!(!allowed(&allow6, "10.1.1.1"));
    assert!(!allowed(&allow6, "::ffff:10.1.1.1"));
    // An IPv4 block written v4-mapped is that IPv4 block.
    let deny_mapped = state(&policy("DENY", "\"::ffff:10.0.0.0/104\""));
    assert!(!allowed(&deny_mapped, "10.1.1.1"));
    assert!(allowed(&deny_mapped, "11.1.1.1"));
    assert!(allowed(&deny_mapped, "fd00:1::1"));
}
