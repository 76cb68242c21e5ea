//! The node's side of kubelet probes (nftables in the node's netns, where
//! the kubelet runs): connections the node itself opens to a captured pod
//! leave with source [`PROBE_SOURCE`] (SNAT), which the pod's rules let
//! through to the app uncaptured (see [`crate::rules`]). So an HTTP probe
//! reaches the app whatever PeerAuthentication and AuthorizationPolicy say,
//! and a TCP probe to a port nobody listens on is refused by the pod's
//! kernel, not answered by the ztunnel.
//!
//! - set `captured-v4`: the captured pods' IPv4 addresses, kept by the agent;
//! - postrouting: TCP to that set from one of the node's own addresses
//!   (`fib saddr type local`: locally opened, not forwarded from a pod) is
//!   SNATed to [`PROBE_SOURCE`];
//! - forward: anything routed through the node with source [`PROBE_SOURCE`]
//!   is dropped, so another host cannot pass for the kubelet. (Pods on the
//!   same bridge reach each other without the node routing them: a pod that
//!   may forge source addresses, CAP_NET_RAW, is not stopped here.)

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use mesh_core::netns::Netns;

use crate::rules::{PROBE_SOURCE, RulesError, nft};

pub const TABLE: &str = "ztunnel-host";
const SET: &str = "captured-v4";

fn v4(ips: &BTreeSet<IpAddr>) -> Vec<Ipv4Addr> {
    ips.iter()
        .filter_map(|ip| match ip {
            IpAddr::V4(v) => Some(*v),
            IpAddr::V6(_) => None,
        })
        .collect()
}

pub fn ruleset(ips: &BTreeSet<IpAddr>) -> String {
    let elements = {
        let v: Vec<String> = v4(ips).iter().map(|ip| ip.to_string()).collect();
        if v.is_empty() {
            String::new()
        } else {
            format!(" elements = {{ {} }};", v.join(", "))
        }
    };
    format!(
        "table inet {TABLE} {{
  set {SET} {{ type ipv4_addr;{elements} }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip daddr @{SET} meta l4proto tcp fib saddr type local snat ip to {PROBE_SOURCE}
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    ip saddr {PROBE_SOURCE} drop
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
    let v = v4(&set);
    if v.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = v.iter().map(|ip| ip.to_string()).collect();
    let list = list.join(", ");
    let script = if captured {
        format!("add element inet {TABLE} {SET} {{ {list} }}\n")
    } else {
        format!(
            "add element inet {TABLE} {SET} {{ {list} }}\ndelete element inet {TABLE} {SET} {{ {list} }}\n"
        )
    };
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
