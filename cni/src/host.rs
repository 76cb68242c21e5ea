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
//!   dropped, so another host cannot pass for the kubelet;
//! - a `bridge` table of the same name: frames a bridge of the node
//!   forwards from one port to another with a probe source are dropped
//!   (pods on one bridge reach each other without the node routing them,
//!   and without `br_netfilter` no `inet` chain sees those frames), so a
//!   pod that may forge source addresses (CAP_NET_RAW) cannot pass for the
//!   kubelet to its neighbours. The node's own probes leave through the
//!   bridge's output hook, not its forward one.
//!
//! Both tables are replaced together, in one transaction, and removed
//! together.

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
table bridge {TABLE} {{
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
    nft(host, &install_script(ips))
}

/// The script replacing the node's tables (one transaction).
fn install_script(ips: &BTreeSet<IpAddr>) -> String {
    format!("{}{}", removal_script(), ruleset(ips))
}

/// The script removing the node's tables (none there is no error).
fn removal_script() -> String {
    format!(
        "table inet {TABLE}\ndelete table inet {TABLE}\ntable bridge {TABLE}\ndelete table bridge {TABLE}\n"
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
    nft(host, &removal_script())
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

    /// Pods on one node bridge reach each other without the node routing
    /// them, so the inet forward drop never sees their frames: a bridge
    /// table drops frames forwarded from one port to another with a probe
    /// source (a pod that may forge addresses, CAP_NET_RAW). The node's
    /// own probes leave through the bridge's output hook, not its forward
    /// one. Installed and removed with the inet table. Failed first: no
    /// bridge table.
    #[test]
    fn a_bridge_table_drops_probe_sources_between_pods() {
        let r = ruleset(&BTreeSet::new());
        let bridge = r
            .find("table bridge ztunnel-host {")
            .expect("a bridge table");
        let b = &r[bridge..];
        let fwd = b
            .find("type filter hook forward priority filter; policy accept;")
            .expect("its forward chain");
        assert!(b[fwd..].contains("ip saddr 169.254.7.127 drop"), "{r}");
        assert!(
            b[fwd..].contains("ip6 saddr fd16:9254:7127:1337:ffff:ffff:ffff:ffff drop"),
            "{r}"
        );
        assert!(!b.contains("hook output"), "{r}");
        // Replaced whole (idempotent) and removed with the inet table.
        let s = install_script(&BTreeSet::new());
        assert!(
            s.starts_with("table inet ztunnel-host\ndelete table inet ztunnel-host\ntable bridge ztunnel-host\ndelete table bridge ztunnel-host\n"),
            "{s}"
        );
        assert_eq!(
            removal_script(),
            "table inet ztunnel-host\ndelete table inet ztunnel-host\ntable bridge ztunnel-host\ndelete table bridge ztunnel-host\n"
        );
    }
}
