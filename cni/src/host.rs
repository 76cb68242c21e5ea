//! The node's side of kubelet probes (nftables in the node's netns, where
//! the kubelet runs): connections the node itself opens to a captured pod
//! leave with source [`PROBE_SOURCE`] ([`PROBE_SOURCE_V6`] over IPv6: SNAT),
//! which the pod's rules let
//! through to the app uncaptured (see [`crate::rules`]). So an HTTP probe
//! reaches the app whatever PeerAuthentication and AuthorizationPolicy say,
//! and a TCP probe to a port nobody listens on is refused by the pod's
//! kernel, not answered by the ztunnel.
//!
//! - sets `captured-v4` and `captured-v6`: the captured pods' addresses,
//!   kept by the agent;
//! - postrouting: TCP to those sets from one of the node's own addresses
//!   (`fib saddr type local`: locally opened, not forwarded from a pod) is
//!   SNATed to the probe source of its family;
//! - forward: anything routed through the node from a probe source is
//!   dropped, so another host cannot pass for the kubelet. (Pods on the
//!   same bridge reach each other without the node routing them: a pod that
//!   may forge source addresses, CAP_NET_RAW, is not stopped here.)

use std::collections::BTreeSet;
use std::net::IpAddr;

use mesh_core::netns::Netns;

use crate::rules::{PROBE_SOURCE, PROBE_SOURCE_V6, RulesError, nft};

pub const TABLE: &str = "ztunnel-host";
const SET: &str = "captured-v4";
const SET6: &str = "captured-v6";

/// The addresses of one family (`v6`), as nft list items; a v4-mapped
/// address is the IPv4 address it is.
fn family(ips: &BTreeSet<IpAddr>, v6: bool) -> Vec<String> {
    ips.iter()
        .map(|ip| ip.to_canonical())
        .filter(|ip| ip.is_ipv6() == v6)
        .map(|ip| ip.to_string())
        .collect()
}

fn elements(v: &[String]) -> String {
    if v.is_empty() {
        String::new()
    } else {
        format!(" elements = {{ {} }};", v.join(", "))
    }
}

pub fn ruleset(ips: &BTreeSet<IpAddr>) -> String {
    let v4 = elements(&family(ips, false));
    let v6 = elements(&family(ips, true));
    format!(
        "table inet {TABLE} {{
  set {SET} {{ type ipv4_addr;{v4} }}
  set {SET6} {{ type ipv6_addr;{v6} }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip daddr @{SET} meta l4proto tcp fib saddr type local snat ip to {PROBE_SOURCE}
    ip6 daddr @{SET6} meta l4proto tcp fib saddr type local snat ip6 to {PROBE_SOURCE_V6}
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    ip saddr {PROBE_SOURCE} drop
    ip6 saddr {PROBE_SOURCE_V6} drop
  }}
}}
"
    )
}

/// Installs (or replaces) the node's table with `ips` as the captured set.
pub fn install(host: &Netns, ips: &BTreeSet<IpAddr>) -> Result<(), RulesError> {
    nft(
        host,
        &format!(
            "table inet {TABLE}\ndelete table inet {TABLE}\n{}",
            ruleset(ips)
        ),
    )
}

/// Adds or removes one pod's addresses (removing one that is not there is
/// not an error).
pub fn update(host: &Netns, ips: &[IpAddr], captured: bool) -> Result<(), RulesError> {
    let set: BTreeSet<IpAddr> = ips.iter().copied().collect();
    let mut script = String::new();
    for (name, v6) in [(SET, false), (SET6, true)] {
        let v = family(&set, v6);
        if v.is_empty() {
            continue;
        }
        let list = v.join(", ");
        script.push_str(&format!("add element inet {TABLE} {name} {{ {list} }}\n"));
        if !captured {
            script.push_str(&format!(
                "delete element inet {TABLE} {name} {{ {list} }}\n"
            ));
        }
    }
    if script.is_empty() {
        return Ok(());
    }
    nft(host, &script)
}

/// Removes the node's table (the agent is uninstalled).
pub fn remove(host: &Netns) -> Result<(), RulesError> {
    nft(
        host,
        &format!("table inet {TABLE}\ndelete table inet {TABLE}\n"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_nodes_own_tcp_to_captured_pods_is_snatted() {
        let ips = BTreeSet::from([
            "10.1.1.5".parse().unwrap(),
            "fd00::5".parse::<IpAddr>().unwrap(),
        ]);
        let r = ruleset(&ips);
        assert!(r.contains("elements = { 10.1.1.5 }"), "{r}");
        assert!(
            r.contains("ip daddr @captured-v4 meta l4proto tcp fib saddr type local snat ip to 169.254.7.127"),
            "{r}"
        );
        assert!(r.contains("ip saddr 169.254.7.127 drop"), "{r}");
        // IPv6 too: a set of their own, SNATed to the IPv6 probe source.
        assert!(r.contains("elements = { fd00::5 }"), "{r}");
        assert!(
            r.contains("ip6 daddr @captured-v6 meta l4proto tcp fib saddr type local snat ip6 to fd16:9254:7127:1337:ffff:ffff:ffff:ffff"),
            "{r}"
        );
        assert!(
            r.contains("ip6 saddr fd16:9254:7127:1337:ffff:ffff:ffff:ffff drop"),
            "{r}"
        );
        assert!(!ruleset(&BTreeSet::new()).contains("elements"));
    }
}
