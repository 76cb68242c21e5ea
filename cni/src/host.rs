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
//!   dropped, so another host cannot pass for the kubelet; so is TCP to a
//!   captured pod routed through it from one of the node's own addresses
//!   (`fib saddr type local`; ICMPv6 too, which NAT would rewrite as
//!   related to a probe), and anything forwarded that belongs to a probe
//!   connection (`ct reply ... daddr` a probe source: a forged ICMP error
//!   about a live probe, from any source, which NAT would deliver as the
//!   probe source's; a probe connection itself is never forwarded), which postrouting would otherwise take for
//!   the node's own and SNAT to the probe source (IPv6 has no
//!   martian-source check to drop it first). The node's own traffic never
//!   crosses forward (output, then postrouting), and a forwarded reply is
//!   un-DNATed to a node address only after it, at postrouting;
//! - a `bridge` table of the same name: frames a bridge of the node
//!   forwards from one port to another with a probe source are dropped
//!   (pods on one bridge reach each other without the node routing them,
//!   and without `br_netfilter` no `inet` chain sees those frames), so a
//!   pod that may forge source addresses (CAP_NET_RAW) cannot pass for the
//!   kubelet to its neighbours. The node's own probes leave through the
//!   bridge's output hook, not its forward one. A frame whose packet is
//!   still inside a VLAN tag when it reaches forward (`meta protocol` is
//!   802.1Q or 802.1ad) is dropped there too, whatever it carries: the
//!   address rules depend on `meta protocol ip`/`ip6`, and a pod's kernel
//!   strips VLAN ID 0 (priority) tags, two of them too, and takes the
//!   packet. That covers a tag inside a tag on any bridge, and on a bridge
//!   with VLAN filtering a frame whose one tag the bridge did not take as
//!   its own (another protocol) or whose outer tag it took and cleared. A
//!   frame whose tag the kernel took off on receipt (the usual single tag,
//!   or the port VLAN a filtering bridge adds) has the packet's own
//!   protocol there and is judged by the address rules: dropping on
//!   `ether type` instead would stop all of a filtering bridge's traffic.
//!
//! Each table is replaced, and removed, in a transaction of its own, the
//! `inet` one first, so a kernel that refuses the bridge family keeps the
//! `inet` table (the refusal is logged) and still loses it on removal. The
//! agent removes both only when it is uninstalled (its DaemonSet gone or
//! being deleted, [`crate::uninstalling`]); a restart or a roll keeps
//! them, so the kubelet's probes never meet a node without them.

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
    format!("{}{}", inet_ruleset(ips), bridge_ruleset())
}

/// The node's `inet` table: the probe SNAT and the forward drops.
fn inet_ruleset(ips: &BTreeSet<IpAddr>) -> String {
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
    ip daddr @{SET} meta l4proto tcp fib saddr type local drop
    ip6 daddr @{SET6} meta l4proto tcp fib saddr type local drop
    ip6 daddr @{SET6} meta l4proto ipv6-icmp fib saddr type local drop
    ct reply ip daddr {PROBE_SOURCE} drop
    ct reply ip6 daddr {PROBE_SOURCE_V6} drop
  }}
}}
"
    )
}

/// The node's `bridge` table: frames bridged between pods from a probe
/// source, or in a VLAN tag, are dropped.
fn bridge_ruleset() -> String {
    format!(
        "table bridge {TABLE} {{
  chain forward {{
    type filter hook forward priority filter; policy accept;
    meta protocol {{ 8021q, 8021ad }} drop
    ip saddr {PROBE_SOURCE} drop
    ip6 saddr {PROBE_SOURCE_V6} drop
  }}
}}
"
    )
}

/// Installs (or replaces) the node's table with `ips` as the captured set.
pub fn install(host: &Netns, ips: &BTreeSet<IpAddr>) -> Result<(), RulesError> {
    install_with(&|script: &str| nft(host, script), ips)
}

/// [`install`] through `run`, which applies one nft script.
///
/// The `inet` table goes first, in a transaction of its own: if it fails,
/// that is the error. The `bridge` table follows in a second one, so a
/// kernel without nftables' bridge family (or one refusing it for any
/// other reason) keeps the `inet` table; that failure is logged, and
/// bridged frames between pods are then not filtered (as on a node before
/// the bridge table existed).
fn install_with(
    run: &dyn Fn(&str) -> Result<(), RulesError>,
    ips: &BTreeSet<IpAddr>,
) -> Result<(), RulesError> {
    run(&format!(
        "table inet {TABLE}\ndelete table inet {TABLE}\n{}",
        inet_ruleset(ips)
    ))?;
    let bridge = format!(
        "table bridge {TABLE}\ndelete table bridge {TABLE}\n{}",
        bridge_ruleset()
    );
    if let Err(e) = run(&bridge) {
        tracing::warn!(error = %e, "cannot install the node's bridge table: frames bridged between pods from a probe source are not dropped on this node");
    }
    Ok(())
}

/// Puts the node's tables back with `ips` when its `inet` table is gone
/// (an older agent's late removal, an admin's): whether it did. The
/// `bridge` table comes and goes with it, and is not looked at on its own
/// (a kernel without the bridge family never has one).
pub fn ensure(host: &Netns, ips: &BTreeSet<IpAddr>) -> Result<bool, RulesError> {
    ensure_with(&|script: &str| nft(host, script), ips)
}

fn ensure_with(
    run: &dyn Fn(&str) -> Result<(), RulesError>,
    ips: &BTreeSet<IpAddr>,
) -> Result<bool, RulesError> {
    if run(&format!("list table inet {TABLE}\n")).is_ok() {
        return Ok(false);
    }
    install_with(run, ips).map(|()| true)
}

/// The script removing the node's `family` table (none there is no error).
fn removal_script(family: &str) -> String {
    format!("table {family} {TABLE}\ndelete table {family} {TABLE}\n")
}

/// Adds or removes one pod's addresses (removing one that is not there is
/// not an error). When that fails (the table is gone), the tables are
/// installed afresh with `all`, the captured set after this change.
pub fn update(
    host: &Netns,
    ips: &[IpAddr],
    captured: bool,
    all: &BTreeSet<IpAddr>,
) -> Result<(), RulesError> {
    update_with(&|script: &str| nft(host, script), ips, captured, all)
}

fn update_with(
    run: &dyn Fn(&str) -> Result<(), RulesError>,
    ips: &[IpAddr],
    captured: bool,
    all: &BTreeSet<IpAddr>,
) -> Result<(), RulesError> {
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
    match run(&script) {
        Ok(()) => Ok(()),
        Err(e) => {
            tracing::warn!(error = %e, "updating the node's probe set failed: installing the node's tables afresh");
            install_with(run, all)
        }
    }
}

/// Removes the node's tables (the agent is uninstalled).
pub fn remove(host: &Netns) -> Result<(), RulesError> {
    remove_with(&|script: &str| nft(host, script))
}

/// [`remove`] through `run`: each table in a transaction of its own, as
/// they are installed, so a kernel that refuses the bridge family (it never
/// had that table) still loses the `inet` one. The `inet` table's failure
/// is the error; the bridge table's is logged.
fn remove_with(run: &dyn Fn(&str) -> Result<(), RulesError>) -> Result<(), RulesError> {
    let inet = run(&removal_script("inet"));
    if let Err(e) = run(&removal_script("bridge")) {
        tracing::warn!(error = %e, "cannot remove the node's bridge table");
    }
    inet
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kernel without nftables' bridge family refuses the bridge table:
    /// the `inet` table (the forward drop of probe sources, the probe SNAT)
    /// is installed all the same, never lost with it.
    #[test]
    fn a_refused_bridge_table_leaves_the_inet_table_installed() {
        let applied = std::cell::RefCell::new(Vec::<String>::new());
        let run = |script: &str| {
            if script.contains("table bridge") {
                return Err(RulesError::Failed(
                    "nft".into(),
                    "Error: Could not process rule: Operation not supported".into(),
                ));
            }
            applied.borrow_mut().push(script.to_string());
            Ok(())
        };
        let ips = BTreeSet::from(["10.1.1.5".parse::<IpAddr>().unwrap()]);
        let r = install_with(&run, &ips);
        assert!(r.is_ok(), "{r:?}");
        let applied = applied.borrow();
        assert_eq!(applied.len(), 1, "{applied:?}");
        assert!(
            applied[0].contains(&format!("ip saddr {PROBE_SOURCE} drop")),
            "{applied:?}"
        );
    }

    /// Removal mirrors installation: a kernel that refuses the bridge
    /// family (it never had the bridge table) must not keep the `inet`
    /// table, with its probe SNAT, once the agent is uninstalled. Failed
    /// first: both tables went in one transaction, which the bridge
    /// family's refusal failed whole.
    #[test]
    fn a_refused_bridge_family_does_not_keep_the_inet_table_on_removal() {
        let applied = std::cell::RefCell::new(Vec::<String>::new());
        let run = |script: &str| {
            if script.contains("table bridge") {
                return Err(RulesError::Failed(
                    "nft".into(),
                    "Error: Could not process rule: Operation not supported".into(),
                ));
            }
            applied.borrow_mut().push(script.to_string());
            Ok(())
        };
        let r = remove_with(&run);
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(
            *applied.borrow(),
            [format!("table inet {TABLE}\ndelete table inet {TABLE}\n")]
        );
    }

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
        // One chain, on the forward hook: the node's own probes (output
        // hook) are never touched.
        let hooks: Vec<&str> = b
            .split("hook ")
            .skip(1)
            .filter_map(|h| h.split_whitespace().next())
            .collect();
        assert_eq!(hooks, ["forward"], "{r}");
        // Replaced whole (idempotent) and removed with the inet table.
        let scripts = std::cell::RefCell::new(Vec::<String>::new());
        let run = |script: &str| {
            scripts.borrow_mut().push(script.to_string());
            Ok(())
        };
        install_with(&run, &BTreeSet::new()).expect("installed");
        let scripts = scripts.borrow();
        assert_eq!(scripts.len(), 2, "{scripts:?}");
        assert!(
            scripts[0].starts_with(
                "table inet ztunnel-host\ndelete table inet ztunnel-host\ntable inet ztunnel-host {"
            ),
            "{scripts:?}"
        );
        assert!(
            scripts[1].starts_with("table bridge ztunnel-host\ndelete table bridge ztunnel-host\ntable bridge ztunnel-host {"),
            "{scripts:?}"
        );
        assert_eq!(
            removal_script("bridge"),
            "table bridge ztunnel-host\ndelete table bridge ztunnel-host\n"
        );
    }

    /// A frame in two VLAN ID 0 tags (802.1ad, 802.1Q: the receiving pod's
    /// kernel strips both and accepts it) is not `meta protocol ip` on the
    /// bridge, so it would pass the probe-source drops: the forward chain
    /// drops any frame whose packet is still in a tag (`meta protocol`),
    /// before those rules. It never drops on the frame's outer tag (`ether
    /// type`): a bridge with VLAN filtering tags every frame it takes in
    /// with its port's VLAN, which nft reads back there, so such a rule
    /// stopped all of that bridge's traffic; nor on `ether type 8021q vlan
    /// type ...`, which a filtering bridge's cleared outer tag slips past
    /// (failed first on both).
    #[test]
    fn the_bridge_table_drops_a_packet_still_in_a_tag_and_never_on_the_outer_tag() {
        let r = ruleset(&BTreeSet::new());
        let b = &r[r
            .find("table bridge ztunnel-host {")
            .expect("a bridge table")..];
        let probe = b.find("ip saddr 169.254.7.127 drop").expect("probe drop");
        let tag = b
            .find("meta protocol { 8021q, 8021ad } drop")
            .unwrap_or_else(|| panic!("a packet still in a tag: {r}"));
        assert!(tag < probe, "{r}");
        for line in b.lines().filter(|l| l.contains("drop")) {
            assert!(
                !line.contains("ether type"),
                "a rule on the outer tag: {line}"
            );
        }
    }

    /// A forged ICMP error (from any source) about a live probe connection
    /// is RELATED to it, and NAT rewrites such an error as coming from the
    /// probe source on its way to the pod: a pod could fail another pod's
    /// probes. Nothing of a probe connection is ever forwarded (the node
    /// opens it: output, input), so the forward chain drops whatever belongs
    /// to a connection whose reply goes to a probe source. Failed first: no
    /// such rule.
    #[test]
    fn nothing_forwarded_belongs_to_a_probe_connection() {
        let r = ruleset(&BTreeSet::new());
        let inet = &r[..r.find("table bridge").expect("a bridge table")];
        let fwd = inet
            .find("type filter hook forward priority filter; policy accept;")
            .expect("the inet forward chain");
        let chain = &inet[fwd..];
        for rule in [
            "ct reply ip daddr 169.254.7.127 drop",
            "ct reply ip6 daddr fd16:9254:7127:1337:ffff:ffff:ffff:ffff drop",
        ] {
            assert!(chain.contains(rule), "{rule}: {r}");
        }
    }

    /// Over IPv6 (no martian-source check) a packet routed through the node
    /// with one of the node's own addresses as its source would meet
    /// postrouting's `fib saddr type local` and leave SNATed to the probe
    /// source: the forward chain drops it first. The node's own traffic
    /// never crosses forward (output, then postrouting), and a forwarded
    /// reply's un-DNAT to a node address happens after forward, at
    /// postrouting. Failed first: no such rule.
    #[test]
    fn forwarded_packets_from_a_node_address_are_dropped() {
        let r = ruleset(&BTreeSet::new());
        let inet = &r[..r.find("table bridge").expect("a bridge table")];
        let fwd = inet
            .find("type filter hook forward priority filter; policy accept;")
            .expect("the inet forward chain");
        let chain = &inet[fwd..inet[fwd..].find('}').map_or(inet.len(), |e| fwd + e)];
        for rule in [
            "ip daddr @captured-v4 meta l4proto tcp fib saddr type local drop",
            "ip6 daddr @captured-v6 meta l4proto tcp fib saddr type local drop",
            "ip6 daddr @captured-v6 meta l4proto ipv6-icmp fib saddr type local drop",
        ] {
            assert!(chain.contains(rule), "{rule}: {r}");
        }
        // Only what postrouting would SNAT to the probe source: other
        // forwarded traffic with a local source (direct server return,
        // shared VIPs) is none of this table's business.
        assert!(
            !chain
                .lines()
                .any(|l| l.trim() == "fib saddr type local drop"),
            "{r}"
        );
    }

    /// The node's tables gone under a running agent: `ensure` and a failed
    /// `update` install them afresh with every held address. Failed first:
    /// nothing put them back.
    #[test]
    fn missing_tables_are_installed_afresh() {
        let tables = std::cell::RefCell::new(Vec::<String>::new());
        let applied = std::cell::RefCell::new(Vec::<String>::new());
        let run = |script: &str| {
            let missing = || {
                Err(RulesError::Failed(
                    "nft".into(),
                    "No such file or directory".into(),
                ))
            };
            if script.starts_with("list table") || script.starts_with("add element") {
                if tables.borrow().is_empty() {
                    return missing();
                }
                return Ok(());
            }
            if script.contains("table inet") {
                tables.borrow_mut().push("inet".into());
            }
            applied.borrow_mut().push(script.to_string());
            Ok(())
        };
        let a: IpAddr = "10.1.1.5".parse().unwrap();
        let b: IpAddr = "10.1.1.6".parse().unwrap();
        let all = BTreeSet::from([a, b]);
        assert!(update_with(&run, &[b], true, &all).is_ok());
        assert!(
            applied
                .borrow()
                .iter()
                .any(|s| s.contains("10.1.1.5") && s.contains("10.1.1.6")),
            "a failed update installs with every held address: {:?}",
            applied.borrow()
        );
        tables.borrow_mut().clear();
        applied.borrow_mut().clear();
        assert!(matches!(ensure_with(&run, &all), Ok(true)));
        assert!(applied.borrow().iter().any(|s| s.contains("table bridge")));
        assert!(matches!(ensure_with(&run, &all), Ok(false)), "there now");
    }
}
